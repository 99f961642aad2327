/* The entry points of this directory's kernels, for the ones that call the others. */
#ifndef PIE_TRIO_KERNELS_H
#define PIE_TRIO_KERNELS_H

#include <stdint.h>

int q4_matmul(const float *x, int64_t rows, int64_t in, const uint8_t *qs, const uint16_t *d,
              const uint16_t *m, int64_t out, const float *bias, float *y, int threads);

int panel_matmul(const float *x, int64_t rows, int64_t in, const uint8_t *panels, int bits,
                 int64_t out, const float *bias, float *y, int threads);

void add_rms_norm(const float *hidden, const float *delta, const float *weight, float eps,
                  int64_t rows, int64_t dim, float *total, float *out);

void silu_mul(const float *gate_up, int64_t rows, int64_t ffn, float *out);

void rotary_kv_write(const float *qkv, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d,
                     const float *cos_table, const float *sin_table, const int64_t *positions,
                     const int64_t *slots, float *k_cache, float *v_cache, int64_t cache_slots,
                     float *q_out);

int paged_attention(const float *q, int64_t batch, int64_t queries, int64_t heads,
                    int64_t kv_heads, int64_t d, const float *k_cache, const float *v_cache,
                    int64_t cache_slots, const int64_t *table, int64_t table_cols,
                    int64_t page_size, int64_t span_start, const int32_t *lengths,
                    int64_t length, const uint8_t *mask, int causal, float scale, float *out,
                    int threads);

#endif
