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

/* One (query row, head) pair: softmax(q k^T * scale) v over the keys it may attend. */
static void attend_pair(const struct attention *job, int64_t p, float *scores, int64_t *where) {
    const int64_t queries = job->queries, d = job->d, length = job->length;
    const int64_t row = p / job->heads, h = p % job->heads, b = row / queries, i = row % queries;
    const int64_t kvh = h / job->group, len_b = job->lengths ? job->lengths[b] : length;
    const float *qv = job->q + p * d;
    float *o = job->out + p * d;
    for (int64_t k = 0; k < d; k++) o[k] = 0.0f;
    const uint8_t *allowed = job->mask ? job->mask + (b * queries + i) * length : NULL;
    const int64_t last = job->causal ? len_b - queries + i : len_b - 1;
    int64_t n = 0;
    float best = -INFINITY;
    for (int64_t j = 0; j < len_b && j <= last; j++) {
        if (allowed && !allowed[j]) continue;
        const int64_t slot =
            job->table ? job->table[b * job->table_cols + j / job->page_size] * job->page_size +
                             j % job->page_size
                       : job->span_start + j;
        const float score =
            dot(qv, job->k_cache + (kvh * job->cache_slots + slot) * d, d) * job->scale;
        scores[n] = score;
        where[n++] = slot;
        best = score > best ? score : best;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) total += scores[j] = expf(scores[j] - best);
    for (int64_t j = 0; j < n; j++) {
        const float weight = scores[j] / total;
        const float *v = job->v_cache + (kvh * job->cache_slots + where[j]) * d;
        for (int64_t k = 0; k < d; k++) o[k] += weight * v[k];
    }
}

static void attention_part(void *context, int index, int parts) {
    struct attention *job = context;
    int64_t first, last;
    pool_share(job->pairs, index, parts, &first, &last);
    if (first == last) return;
    const size_t keys = (size_t)(job->length > 0 ? job->length : 1);
    float *scores = malloc(sizeof(float) * keys);
    int64_t *where = malloc(sizeof(int64_t) * keys);
    if (scores == NULL || where == NULL)
        atomic_store(&job->failed, 1);
    else
        for (int64_t p = first; p < last; p++) attend_pair(job, p, scores, where);
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
    const int parallel = job.pairs * length * d > (1 << 18);
    pool_run(attention_part, &job, parallel ? threads : 1);
    return atomic_load(&job.failed) ? -1 : 0;
}
