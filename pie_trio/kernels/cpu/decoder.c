/* Every decoder layer of a Llama-family model for a decode-sized batch, in one call.
 *
 * At a few rows a layer's arithmetic takes a few hundred microseconds and the Python around
 * its dozen ops (each a ctypes call, tensor allocations, a dispatch) about as much again. This
 * loop runs the same kernels (q4_matmul, rotary_kv_write, paged_attention, add_rms_norm,
 * silu_mul) in the same order on the same data as llama.py's op-by-op forward with native
 * kernels, so its results are that forward's bit for bit; only the Python between the kernels
 * is gone. Projections must all be native int4 (`struct projection`), activations fp32.
 * Batches of more rows than q4_matmul takes run the projections' panels (panels.c), as the
 * op-by-op forward does; without panels the caller keeps such batches to itself.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

struct projection { /* a q4_matmul weight: y = x W^T + bias */
    const uint8_t *nibbles;
    const uint16_t *d, *m; /* fp16 */
    const float *bias;     /* may be NULL */
    int64_t out;
    const uint8_t *panels; /* the same weight in 4-bit panels (panel_matmul), or NULL */
};

struct layer {
    const float *input_norm, *post_norm;
    struct projection qkv, attn_out, gate_up, down;
};

/* The model's shape and tables, fixed at load. */
struct decoder {
    const struct layer *layers;
    int64_t num_layers, hidden, heads, kv_heads, head_dim, ffn;
    float eps, scale;
    const float *rope_cos, *rope_sin; /* [max_position, head_dim] */
    int64_t kernel_max_rows; /* larger batches run the panels */
};

/* One attention group (batch.py's AttentionGroup): its `batch * queries` query rows are
 * consecutive from `first_row`, or listed in `rows` with the real ones flagged in `valid`
 * (NULL: all real). */
struct group {
    int64_t first_row, batch, queries;
    const int64_t *rows;
    const uint8_t *valid;
    const int64_t *table; /* [batch, length] slot ids, or NULL for the span */
    int64_t span_start, length;
    const uint8_t *mask; /* [batch, queries, length] or NULL */
    int64_t causal;
};

/* This step's rows: where their K/V go, and the layer-major caches they attend over. */
struct step {
    int64_t rows;
    const int64_t *positions, *write_slots;
    const struct group *groups;
    int64_t num_groups;
    float *k_cache, *v_cache; /* [layers, kv_heads, cache_slots, head_dim] */
    int64_t cache_slots;
    int threads;
};

static int project(const struct decoder *model, const float *x, int64_t rows, int64_t in,
                   const struct projection *p, float *y, int threads) {
    if (p->panels && rows > model->kernel_max_rows)
        return panel_matmul(x, rows, in, p->panels, 4, p->out, p->bias, y, threads);
    return q4_matmul(x, rows, in, p->nibbles, p->d, p->m, p->out, p->bias, y, threads);
}

static int attend_group(const struct decoder *model, const struct step *step,
                        const struct group *group, const float *q, const float *k_cache,
                        const float *v_cache, float *out) {
    return paged_attention(q, group->batch, group->queries, model->heads, model->kv_heads,
                           model->head_dim, k_cache, v_cache, step->cache_slots, group->table,
                           group->table ? group->length : 0, 1, group->span_start, NULL,
                           group->length, group->mask, (int)group->causal, model->scale, out,
                           step->threads);
}

/* A group of listed rows: gather its queries, attend, scatter the real rows' outputs. */
static int attend_listed(const struct decoder *model, const struct step *step,
                         const struct group *group, const float *q, const float *k_cache,
                         const float *v_cache, float *out) {
    const int64_t width = model->heads * model->head_dim, count = group->batch * group->queries;
    float *block = malloc(sizeof(float) * (size_t)(2 * count * width));
    if (block == NULL) return -1;
    float *result = block + count * width;
    for (int64_t i = 0; i < count; i++)
        memcpy(block + i * width, q + group->rows[i] * width, sizeof(float) * (size_t)width);
    const int status = attend_group(model, step, group, block, k_cache, v_cache, result);
    for (int64_t i = 0; status == 0 && i < count; i++)
        if (group->valid == NULL || group->valid[i])
            memcpy(out + group->rows[i] * width, result + i * width,
                   sizeof(float) * (size_t)width);
    free(block);
    return status;
}

static int attend(const struct decoder *model, const struct step *step, const float *q,
                  const float *k_cache, const float *v_cache, float *out) {
    const int64_t width = model->heads * model->head_dim;
    for (int64_t g = 0; g < step->num_groups; g++) {
        const struct group *group = &step->groups[g];
        const int64_t at = group->first_row * width;
        const int status =
            group->rows ? attend_listed(model, step, group, q, k_cache, v_cache, out)
                        : attend_group(model, step, group, q + at, k_cache, v_cache, out + at);
        if (status != 0) return -1;
    }
    return 0;
}

/* One layer: hidden += attention(x), x = post-norm; hidden += mlp(x), x = `next_norm` (or,
 * for the last layer, hidden alone). */
static int layer_forward(const struct decoder *model, const struct step *step, int64_t i,
                         float *hidden, float *x, float *scratch, float *delta) {
    const struct layer *layer = &model->layers[i];
    const int64_t rows = step->rows, width = model->heads * model->head_dim;
    const int64_t layer_size = model->kv_heads * step->cache_slots * model->head_dim;
    float *k_cache = step->k_cache + i * layer_size, *v_cache = step->v_cache + i * layer_size;
    float *qkv = scratch, *q = qkv + rows * layer->qkv.out, *attn = q + rows * width;
    if (project(model, x, rows, model->hidden, &layer->qkv, qkv, step->threads)) return -1;
    rotary_kv_write(qkv, rows, model->heads, model->kv_heads, model->head_dim, model->rope_cos,
                    model->rope_sin, step->positions, step->write_slots, k_cache, v_cache,
                    step->cache_slots, q);
    if (attend(model, step, q, k_cache, v_cache, attn)) return -1;
    if (project(model, attn, rows, width, &layer->attn_out, delta, step->threads)) return -1;
    add_rms_norm(hidden, delta, layer->post_norm, model->eps, rows, model->hidden, hidden, x);
    float *gate_up = scratch, *act = gate_up + rows * 2 * model->ffn;
    if (project(model, x, rows, model->hidden, &layer->gate_up, gate_up, step->threads))
        return -1;
    silu_mul(gate_up, rows, model->ffn, act);
    if (project(model, act, rows, model->ffn, &layer->down, delta, step->threads)) return -1;
    if (i + 1 < model->num_layers)
        add_rms_norm(hidden, delta, model->layers[i + 1].input_norm, model->eps, rows,
                     model->hidden, hidden, x);
    else
        for (int64_t j = 0; j < rows * model->hidden; j++) hidden[j] += delta[j];
    return 0;
}

/* Run every layer over `hidden` `[rows, hidden]` (the input embeddings; the final residual
 * stream on return), writing this step's K/V. Returns 0, or -1 when out of memory. */
int decode_layers(const struct decoder *model, const struct step *step, float *hidden) {
    const int64_t rows = step->rows, width = model->heads * model->head_dim;
    const int64_t qkv = (model->heads + 2 * model->kv_heads) * model->head_dim;
    const int64_t attention = qkv + 2 * width, mlp = 3 * model->ffn;
    const int64_t shared = attention > mlp ? attention : mlp; /* one phase's buffers at a time */
    float *x = malloc(sizeof(float) * (size_t)(rows * 2 * model->hidden));
    float *scratch = malloc(sizeof(float) * (size_t)(rows * shared));
    int status = x && scratch ? 0 : -1;
    if (status == 0)
        add_rms_norm(hidden, NULL, model->layers[0].input_norm, model->eps, rows, model->hidden,
                     NULL, x);
    for (int64_t i = 0; status == 0 && i < model->num_layers; i++)
        status = layer_forward(model, step, i, hidden, x, scratch, x + rows * model->hidden);
    free(x);
    free(scratch);
    return status;
}
