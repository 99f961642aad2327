/* y = x W^T (+ bias) with W in GGUF 4-bit blocks; x and y fp32 (AVX2, FMA, OpenMP).
 *
 * W is [out, in] in blocks of 32 inputs, w = d*q + m with q in 0..15 (Q4_1; Q4_0 has m = -8d):
 * 16 bytes per block, byte j holding q[j] in its low nibble and q[j + 16] in its high one
 * (GGUF's order), and d, m fp32 [out, in / 32] beside them. (GGUF's own interleaved blocks with
 * fp16 scales read fewer bytes but measured slower here: the kernel is not bound by reading.)
 *
 * Activations are written per block of 32 in base 254 with two signed int8 digits and a scale:
 * x ~= dx * (254 * hi + lo), dx = max|x| / (127 * 254), so |hi|, |lo| <= 127 and the rounding
 * error is at most dx / 2 (about 16 bits, finer than bf16's 8). A block's sum(q * x) is then
 * two integer dot products of unsigned 4-bit weights and signed 8-bit digits (vpmaddubsw:
 * 2 * 15 * 127 fits 16 bits; vpmaddwd weighs the high digit's pairs by 254), an int32 sum and
 * one fp32 FMA: llama.cpp's integer scheme with one more digit. The offset term m * sum(x)
 * uses the exact fp32 block sums.
 *
 * Threads (pool.c's) split the output rows.
 */
#include "pool.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define TILE 4 /* input rows sharing one unpacked block */
#define BASE 254

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum(m * sums) over a row's blocks, 8 lanes at a time. */
static inline float offsets(const float *m, const float *sums, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(sums + b), acc);
    float total = hsum(acc);
    for (; b < blocks; b++) total += m[b] * sums[b];
    return total;
}

static void quantize_rows(const float *x, int64_t count, int8_t *hi, int8_t *lo, float *dx,
                          float *sums) {
    for (int64_t i = 0; i < count; i++) { /* one block of 32 */
        const float *xb = x + i * BLOCK;
        float amax = 0.0f, s = 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            amax = fmaxf(amax, fabsf(xb[j]));
            s += xb[j];
        }
        const float unit = amax / (127.0f * BASE), inverse = amax > 0.0f ? 1.0f / unit : 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            /* n = 254 h + l with both digits nearest, in floats (exact: |n| < 2^15) */
            const float n = fminf(fmaxf(rintf(xb[j] * inverse), -127.0f * BASE), 127.0f * BASE);
            const float h = rintf(n * (1.0f / BASE));
            hi[i * BLOCK + j] = (int8_t)h;
            lo[i * BLOCK + j] = (int8_t)(n - h * BASE);
        }
        dx[i] = unit;
        sums[i] = s;
    }
}

static inline __m256i unpack(const uint8_t *nibbles) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)nibbles);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(high, low);
}

/* acc + this block's sum(q * digits) * scale, for one input row. */
static inline __attribute__((always_inline)) __m256
block_dot(__m256i w, const int8_t *hi, const int8_t *lo, float scale,
                               __m256 acc) {
    const __m256i ones = _mm256_set1_epi16(1), base = _mm256_set1_epi16(BASE);
    const __m256i h = _mm256_loadu_si256((const __m256i *)hi);
    const __m256i l = _mm256_loadu_si256((const __m256i *)lo);
    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, h), base),
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(w, l), ones));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc);
}

/* One output row against `rows` (1..TILE) input rows, `rows` a constant at each call site so
 * the accumulators stay in registers. Blocks go two at a time into separate accumulators:
 * two FMA chains instead of one. */
static inline __attribute__((always_inline)) void dot_tile(
    const int8_t *hi, const int8_t *lo, const float *dx, const float *sums, int64_t in,
    int rows, const uint8_t *qs, const float *d, const float *m, int64_t blocks,
    float out[TILE]) {
    __m256 acc[TILE][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const __m256i w0 = unpack(qs + b * (BLOCK / 2)), w1 = unpack(qs + (b + 1) * (BLOCK / 2));
        for (int r = 0; r < rows; r++) {
            const int64_t at = r * in + b * BLOCK, k = r * blocks + b;
            acc[r][0] = block_dot(w0, hi + at, lo + at, d[b] * dx[k], acc[r][0]);
            acc[r][1] = block_dot(w1, hi + at + BLOCK, lo + at + BLOCK, d[b + 1] * dx[k + 1],
                                  acc[r][1]);
        }
    }
    if (b < blocks) {
        const __m256i w0 = unpack(qs + b * (BLOCK / 2));
        for (int r = 0; r < rows; r++) {
            const int64_t at = r * in + b * BLOCK;
            acc[r][0] = block_dot(w0, hi + at, lo + at, d[b] * dx[r * blocks + b], acc[r][0]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + offsets(m, sums + r * blocks, blocks);
}

static void tile(const int8_t *hi, const int8_t *lo, const float *dx, const float *sums,
                 int64_t in, int rows, const uint8_t *qs, const float *d, const float *m,
                 int64_t blocks, float out[TILE]) {
    switch (rows) {
    case 4: dot_tile(hi, lo, dx, sums, in, 4, qs, d, m, blocks, out); break;
    case 3: dot_tile(hi, lo, dx, sums, in, 3, qs, d, m, blocks, out); break;
    case 2: dot_tile(hi, lo, dx, sums, in, 2, qs, d, m, blocks, out); break;
    default: dot_tile(hi, lo, dx, sums, in, 1, qs, d, m, blocks, out); break;
    }
}

struct matmul {
    const int8_t *hi, *lo;
    const float *dx, *sums;
    int64_t rows, in, blocks, out;
    const uint8_t *qs;
    const float *d, *m, *bias;
    float *y;
};

static void matmul_part(void *context, int index, int parts) {
    const struct matmul *job = context;
    const int64_t rows = job->rows, in = job->in, blocks = job->blocks, out = job->out;
    int64_t first, last;
    pool_share(out, index, parts, &first, &last);
    for (int64_t o = first; o < last; o++) {
        const uint8_t *qs_o = job->qs + o * blocks * (BLOCK / 2);
        const float *d_o = job->d + o * blocks, *m_o = job->m + o * blocks;
        const float b_o = job->bias ? job->bias[o] : 0.0f;
        for (int64_t r = 0; r < rows; r += TILE) {
            const int n = rows - r < TILE ? (int)(rows - r) : TILE;
            float result[TILE];
            tile(job->hi + r * in, job->lo + r * in, job->dx + r * blocks,
                 job->sums + r * blocks, in, n, qs_o, d_o, m_o, blocks, result);
            for (int i = 0; i < n; i++) job->y[(r + i) * out + o] = result[i] + b_o;
        }
    }
}

/* Returns 0, or -1 when the activation digits could not be allocated. */
int q4_matmul(const float *x, int64_t rows, int64_t in, const uint8_t *qs, const float *d,
              const float *m, int64_t out, const float *bias, float *y, int threads) {
    const int64_t blocks = in / BLOCK, count = rows * blocks;
    int8_t *hi = malloc((size_t)(2 * rows * in));
    float *dx = malloc(sizeof(float) * (size_t)(2 * count));
    if (hi == NULL || dx == NULL) {
        free(hi), free(dx);
        return -1;
    }
    int8_t *lo = hi + rows * in;
    float *sums = dx + count;
    quantize_rows(x, count, hi, lo, dx, sums);
    struct matmul job = {hi, lo, dx, sums, rows, in, blocks, out, qs, d, m, bias, y};
    pool_run(matmul_part, &job, threads);
    free(hi), free(dx);
    return 0;
}
