/* y = x W^T (+ bias) for batches of many rows, W in 4-bit or 8-bit blocks kept in column
 * panels (AVX2, FMA); x and y fp32.
 *
 * q4_matmul.c multiplies int8 activations with 4-bit weights: at a few rows the weights' bytes
 * are the cost, and it wins. From a dozen rows on the arithmetic is, and AVX2 has no integer
 * dot product faster than fp32 FMAs, so a dense fp32 copy's matmul (oneDNN) took over there
 * and read 4 bytes a weight (425 MB a step for SmolLM2-135M's projections, 113 MB for its LM
 * head). This kernel does the dense copy's arithmetic from the blocks instead: each thread
 * dequantises one panel of 16 output columns at a time (fp32, into its own cache) and
 * multiplies every row of x by it with FMAs. The weights cross memory once a call at 0.75
 * (4-bit) or 1.125 (8-bit) bytes each; the dequantised panel is reused by every row while it
 * is hot.
 *
 * Panel layouts (`cpu_kernels.pack_q4_panels`, `pack_q8_panels`): panel p holds output columns
 * 16p..16p+15 and, for each block of 32 inputs in order,
 * - 4-bit, 384 bytes: d[16] and m[16] as fp32 (the columns' scales and offsets, w = d*q + m),
 *   then 32 rows of 8 bytes, one per input, byte j holding column j's value in its low nibble
 *   and column j+8's in its high one;
 * - 8-bit, 576 bytes: d[16] as fp32 (w = d*q), then 32 rows of 16 signed bytes, one per input.
 *
 * Dequantisation rounds as `Q4Weight.dequantize` and gguf's Q8_0 do (`q*d`, then `+ m`), so
 * the panel holds the dense copy's very numbers; each output is then one fp32 sum over the
 * inputs in order (one FMA per input), whatever the row count or the other rows: a row's
 * result does not depend on the batch it came in.
 *
 * Threads (pool.c's) split the panels.
 */
#include "kernels.h"
#include "pool.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define COLS 16  /* output columns per panel: two vectors */
#define BLOCK 32 /* inputs per scale */
#define TILE 6 /* rows per register tile: 12 accumulators, 2 weight vectors, 1 broadcast */
#define Q4_BLOCK_BYTES (2 * COLS * 4 + BLOCK * COLS / 2)
#define Q8_BLOCK_BYTES (COLS * 4 + BLOCK * COLS)

/* 4-bit panel `src` (`blocks` blocks of inputs) as fp32 `w` [inputs][16]. */
static void dequantise_q4(const uint8_t *src, int64_t blocks, float *w) {
    const __m256i low = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < blocks; b++, src += Q4_BLOCK_BYTES) {
        const float *d = (const float *)src, *m = d + COLS;
        const uint8_t *nibbles = src + 2 * COLS * 4;
        const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
        const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
        float *out = w + b * BLOCK * COLS;
        for (int k = 0; k < BLOCK; k++) {
            const __m256i q = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64((const __m128i *)(nibbles + k * COLS / 2)));
            __m256 p0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low)), d0);
            __m256 p1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), d1);
            /* keep the product rounded on its own: a fused multiply-add would round once and
             * no longer give the dense copy's numbers */
            __asm__("" : "+x"(p0), "+x"(p1));
            _mm256_store_ps(out + k * COLS, _mm256_add_ps(p0, m0));
            _mm256_store_ps(out + k * COLS + 8, _mm256_add_ps(p1, m1));
        }
    }
}

/* 8-bit panel `src` (`blocks` blocks of inputs) as fp32 `w` [inputs][16]. */
static void dequantise_q8(const uint8_t *src, int64_t blocks, float *w) {
    for (int64_t b = 0; b < blocks; b++, src += Q8_BLOCK_BYTES) {
        const float *d = (const float *)src;
        const int8_t *values = (const int8_t *)(src + COLS * 4);
        const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
        float *out = w + b * BLOCK * COLS;
        for (int k = 0; k < BLOCK; k++) {
            const __m128i q = _mm_loadu_si128((const __m128i *)(values + k * COLS));
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
            _mm256_store_ps(out + k * COLS, _mm256_mul_ps(q0, d0));
            _mm256_store_ps(out + k * COLS + 8, _mm256_mul_ps(q1, d1));
        }
    }
}

/* `rows` (at most TILE) rows of x times one dequantised panel, into y's 16 columns. Inlined
 * with a constant `rows`, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t in,
                                                       const float *w, const float *bias,
                                                       float *y, int64_t out, int rows) {
    __m256 acc[TILE][2];
    const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (int r = 0; r < rows; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < in; k++) {
        const __m256 w0 = _mm256_load_ps(w + k * COLS), w1 = _mm256_load_ps(w + k * COLS + 8);
        for (int r = 0; r < rows; r++) {
            const __m256 xk = _mm256_broadcast_ss(x + r * in + k);
            acc[r][0] = _mm256_fmadd_ps(xk, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xk, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(y + r * out, _mm256_add_ps(acc[r][0], b0));
        _mm256_storeu_ps(y + r * out + 8, _mm256_add_ps(acc[r][1], b1));
    }
}

/* The rows of the next tile, `left` rows to go. A tile of one to three rows leaves too few
 * independent FMA chains to hide their latency (32 rows as 6+6+6+6+6+2 ran at 0.72x the speed
 * of 30), so seven to nine rows go as two tiles of three to five. */
static inline int64_t tile_rows(int64_t left) {
    if (left > TILE && left < TILE + 4) return left - left / 2;
    return left < TILE ? left : TILE;
}

typedef struct {
    const float *x;
    int64_t rows, in;
    const uint8_t *panels;
    int bits; /* 4 or 8 */
    int64_t out;
    const float *bias;
    float *y;
    int failed; /* a part found no memory for its panel */
} panel_job;

static void panel_part(void *context, int index, int parts) {
    panel_job *job = context;
    int64_t first, last;
    pool_share(job->out / COLS, index, parts, &first, &last);
    if (first == last) return;
    const int64_t blocks = job->in / BLOCK, in = job->in;
    float *w = aligned_alloc(32, (size_t)in * COLS * sizeof(float));
    if (!w) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const int64_t panel_bytes = blocks * (job->bits == 4 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES);
    for (int64_t p = first; p < last; p++) {
        if (job->bits == 4)
            dequantise_q4(job->panels + p * panel_bytes, blocks, w);
        else
            dequantise_q8(job->panels + p * panel_bytes, blocks, w);
        const float *bias = job->bias ? job->bias + p * COLS : NULL;
        float *y = job->y + p * COLS;
        for (int64_t r = 0; r < job->rows;) {
            const int64_t rows = tile_rows(job->rows - r);
            const float *x = job->x + r * in;
            float *yr = y + r * job->out;
            switch (rows) { /* one constant row count per case, as above */
            case 6: tile(x, in, w, bias, yr, job->out, 6); break;
            case 5: tile(x, in, w, bias, yr, job->out, 5); break;
            case 4: tile(x, in, w, bias, yr, job->out, 4); break;
            case 3: tile(x, in, w, bias, yr, job->out, 3); break;
            case 2: tile(x, in, w, bias, yr, job->out, 2); break;
            default: tile(x, in, w, bias, yr, job->out, 1); break;
            }
            r += rows;
        }
    }
    free(w);
}

/* x [rows, in], `bits`-bit panels of W [out, in] (out a multiple of 16, in of 32), bias [out]
 * or NULL, y [rows, out]. Returns 0, or -1 when a thread found no memory for its panel. */
int panel_matmul(const float *x, int64_t rows, int64_t in, const uint8_t *panels, int bits,
                 int64_t out, const float *bias, float *y, int threads) {
    panel_job job = {x, rows, in, panels, bits, out, bias, y, 0};
    pool_run(panel_part, &job, threads);
    return job.failed ? -1 : 0;
}
