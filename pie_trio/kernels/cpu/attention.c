/* Attention and rotary for fp32 decode-sized blocks, straight from the KV pages.
 *
 * At a few query rows per sequence torch's CPU attention costs its dispatch, views and a
 * context gather more than the arithmetic; these loops read keys and values where they lie.
 * Layouts are those of torch_ops: activations token-major `[rows, heads, d]`, a layer's cache
 * `[kv_heads, slots, d]` (slot = page * page_size + offset).
 */
#include "kernels.h"
#include "pool.h"
#include "simd.h"

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Rotate the queries and keys of fused QKV rows `[rows, (heads + 2 kv_heads) * d]` by each
 * row's position ("rotate half": `x * cos + roll(x, d/2) * signed_sin`, the tables being
 * torch_ops.rotary_tables'), write queries to `q_out` `[rows, heads, d]` and keys and values
 * into the caches at `slots[row]` (negative: not stored). */
void rotary_kv_write(const float *qkv, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d,
                     const float *cos_table, const float *sin_table, const int64_t *positions,
                     const int64_t *slots, float *k_cache, float *v_cache, int64_t cache_slots,
                     float *q_out) {
    const int64_t width = (heads + 2 * kv_heads) * d, half = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_table + positions[r] * d, *s = sin_table + positions[r] * d;
        const int64_t slot = slots[r];
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const float *x = qkv + r * width + h * d;
            float *y;
            if (h < heads)
                y = q_out + (r * heads + h) * d;
            else if (slot >= 0)
                y = k_cache + ((h - heads) * cache_slots + slot) * d;
            else
                continue;
            for (int64_t i = 0; i < d; i++) y[i] = x[i] * c[i] + x[(i + half) % d] * s[i];
        }
        if (slot < 0) continue;
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *x = qkv + r * width + (heads + kv_heads + h) * d;
            float *y = v_cache + (h * cache_slots + slot) * d;
            for (int64_t i = 0; i < d; i++) y[i] = x[i];
        }
    }
}

struct attention {
    const float *q;
    int64_t queries, heads, d, group;
    const float *k_cache, *v_cache;
    int64_t cache_slots;
    const int64_t *table;
    int64_t table_cols, page_size, span_start;
    const int32_t *lengths;
    int64_t length;
    const uint8_t *mask;
    int causal;
    float scale;
    float *out;
    int64_t pairs;
    _Atomic int failed;
};

/* The slots of the keys query row `row` attends, in key order; returns how many. */
static int64_t row_slots(const struct attention *job, int64_t row, int64_t *where) {
    const int64_t queries = job->queries, b = row / queries, i = row % queries;
    const int64_t len_b = job->lengths ? job->lengths[b] : job->length;
    const uint8_t *allowed = job->mask ? job->mask + (b * queries + i) * job->length : NULL;
    const int64_t last = job->causal ? len_b - queries + i : len_b - 1;
    const int64_t *pages = job->table ? job->table + b * job->table_cols : NULL;
    const int64_t page_size = job->page_size;
    int64_t n = 0;
    for (int64_t j = 0; j < len_b && j <= last; j++) {
        if (allowed && !allowed[j]) continue;
        where[n++] = !pages         ? job->span_start + j
                     : page_size == 1 ? pages[j] /* a slot table: no division per key */
                                      : pages[j / page_size] * page_size + j % page_size;
    }
    return n;
}

/* scores[0, n) = e^(score - best); returns their sum. */
static float exponentiate(float *scores, int64_t n, float best) {
    const __m256 shift = _mm256_set1_ps(best);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
        _mm256_storeu_ps(scores + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum), tail[8] = {0};
    if (j < n) { /* the last few through one padded vector */
        memcpy(tail, scores + j, sizeof(float) * (size_t)(n - j));
        _mm256_storeu_ps(tail, exp256(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)));
        for (int64_t k = 0; k < n - j; k++) total += scores[j + k] = tail[k];
    }
    return total;
}

/* o = sum_j weights[j] * values[where[j]] * scale over d floats: 64 columns at a time in
 * registers (one pass over the keys each), then 8, then one. */
static void weighted_sum(const float *weights, const int64_t *where, int64_t n,
                         const float *values, int64_t d, float scale, float *o) {
    int64_t k = 0;
    for (; k + 64 <= d; k += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 w = _mm256_set1_ps(weights[j]);
            const float *v = values + where[j] * d + k;
            for (int c = 0; c < 8; c++)
                acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
        }
        for (int c = 0; c < 8; c++)
            _mm256_storeu_ps(o + k + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(scale)));
    }
    for (; k + 8 <= d; k += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[j]),
                                  _mm256_loadu_ps(values + where[j] * d + k), acc);
        _mm256_storeu_ps(o + k, _mm256_mul_ps(acc, _mm256_set1_ps(scale)));
    }
    for (; k < d; k++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc += weights[j] * values[where[j] * d + k];
        o[k] = acc * scale;
    }
}

/* One (query row, head) pair over the `n` keys at `where`: softmax(q k^T * scale) v. */
static void attend_pair(const struct attention *job, int64_t p, const int64_t *where,
                        int64_t n, float *scores) {
    const int64_t d = job->d, kvh = p % job->heads / job->group;
    const float *qv = job->q + p * d;
    const float *keys = job->k_cache + kvh * job->cache_slots * d;
    float best = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        const float score = dot(qv, keys + where[j] * d, d) * job->scale;
        scores[j] = score;
        best = score > best ? score : best;
    }
    const float total = exponentiate(scores, n, best);
    weighted_sum(scores, where, n, job->v_cache + kvh * job->cache_slots * d, d,
                 n ? 1.0f / total : 0.0f, job->out + p * d);
}

/* A share of the pairs; a row's key slots are listed once for all its heads. */
static void attention_part(void *context, int index, int parts) {
    struct attention *job = context;
    int64_t first, last;
    pool_share(job->pairs, index, parts, &first, &last);
    if (first == last) return;
    const size_t keys = (size_t)(job->length > 0 ? job->length : 1);
    float *scores = malloc(sizeof(float) * keys);
    int64_t *where = malloc(sizeof(int64_t) * keys);
    if (scores == NULL || where == NULL) {
        atomic_store(&job->failed, 1);
    } else {
        int64_t row = -1, n = 0;
        for (int64_t p = first; p < last; p++) {
            if (p / job->heads != row) n = row_slots(job, row = p / job->heads, where);
            attend_pair(job, p, where, n, scores);
        }
    }
    free(scores);
    free(where);
}

/* Attention of `[batch * queries, heads, d]` query rows over paged contexts.
 * Key j of sequence b sits in slot `table[b * table_cols + j / page_size] * page_size +
 * j % page_size`, or `span_start + j` without a table; it exists when j < lengths[b] (or
 * `length` without lengths). Query i of n attends key j where mask[(b * n + i) * length + j]
 * is set (with a mask), or where j <= length_b - n + i (causal), or every key. Rows with
 * nothing to attend are zeros. Threads split the (row, head) pairs when the work is large.
 * Returns 0, or -1 when a score buffer could not be allocated. */
int paged_attention(const float *q, int64_t batch, int64_t queries, int64_t heads,
                     int64_t kv_heads, int64_t d, const float *k_cache, const float *v_cache,
                     int64_t cache_slots, const int64_t *table, int64_t table_cols,
                     int64_t page_size, int64_t span_start, const int32_t *lengths,
                     int64_t length, const uint8_t *mask, int causal, float scale, float *out,
                     int threads) {
    struct attention job = {q, queries, heads, d, heads / kv_heads, k_cache, v_cache,
                            cache_slots, table, table_cols, page_size, span_start, lengths,
                            length, mask, causal, scale, out, batch * queries * heads, 0};
    /* split from a few thousand multiply-adds a part: a batch-1 decode step's 9 heads over a
     * couple of hundred keys already pay for the pool's hand-off */
    const int parallel = job.pairs > 1 && job.pairs * length * d > (1 << 14);
    pool_run(attention_part, &job, parallel ? threads : 1);
    return atomic_load(&job.failed) ? -1 : 0;
}
