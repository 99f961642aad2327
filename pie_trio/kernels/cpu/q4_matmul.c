/* y = x W^T (+ bias) with W in GGUF 4-bit blocks; x and y fp32 (AVX2, FMA, F16C).
 *
 * W is [out, in] in blocks of 32 inputs, w = d*q + m with q in 0..15 (Q4_1; Q4_0 has m = -8d):
 * 16 bytes per block, byte j holding q[j] in its low nibble and q[j + 16] in its high one
 * (GGUF's order), and d, m fp16 [out, in / 32] beside them (GGUF's own precision: exact), 20
 * bytes a block in all. At a few rows the kernel reads weights as fast as memory gives them,
 * so their size is its speed.
 *
 * Activations are written per block of 32 in base 254 with two signed int8 digits and a scale:
 * x ~= dx * (254 * hi + lo), dx = max|x| / (127 * 254), so |hi|, |lo| <= 127 and the rounding
 * error is at most dx / 2 (about 16 bits, finer than bf16's 8). A block's sum(q * x) is then
 * integer dot products of unsigned 4-bit weights and signed 8-bit digits (vpmaddubsw: 2 * 15 *
 * 127, twice, fits 16 bits; vpmaddwd weighs the high digit's pairs by 254), exact in int32
 * and in its conversion to fp32 (< 2^24): llama.cpp's integer scheme with one more digit. The
 * offset term m * sum(x) uses the exact fp32 block sums.
 *
 * Blocks go eight at a time. One 32-byte load holds two blocks' nibbles; the activation
 * digits are laid out to match (the low halves of both blocks, then the high halves), and two
 * rounds of vphaddd leave the eight blocks' sums in one vector, in the order [0 2 4 6 1 3 5 7]
 * -- which is how d, m and the activations' scales and sums are stored within each group of
 * eight, so one FMA scales all eight. Blocks past the last whole group go one at a time.
 *
 * Threads (pool.c's) split the output rows.
 */
#include "kernels.h"
#include "pool.h"
#include "simd.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define GROUP 8 /* blocks per vector of sums */
#define TILE 4  /* input rows sharing one unpacked group */
#define BASE 254

/* Where block j of a group goes in the group's scales and sums. */
static inline int slot_of(int j) { return (j & 1) ? GROUP / 2 + j / 2 : j / 2; }

/* The 32 lanes of four int32 vectors as int8, in order (saturating; the digits fit). */
static inline __m256i pack_digits(const __m256i v[4]) {
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                             _mm256_packs_epi32(v[2], v[3]));
    /* the packs work within 128-bit lanes, leaving the four bytes of v[0][0..3], v[1][0..3],
     * v[2][0..3], v[3][0..3], v[0][4..7], ...: put the dwords back in order */
    return _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Block i of a row: its digits, scale and sum, stored where the kernel reads them. Eight
 * lanes at a time: at batch 1 this runs on the calling thread alone while the pool waits, and
 * element by element (three libm calls each) it was a twentieth of a decode step. */
static void quantize_block(const float *xb, int64_t i, int64_t groups, int8_t *hi, int8_t *lo,
                           float *dx, float *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int q = 0; q < 4; q++) {
        v[q] = _mm256_loadu_ps(xb + 8 * q);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[q]));
        total = _mm256_add_ps(total, v[q]);
    }
    const float largest = hmax(amax);
    const float unit = largest / (127.0f * BASE), inverse = largest > 0.0f ? 1.0f / unit : 0.0f;
    const __m256 limit = _mm256_set1_ps(127.0f * BASE), base = _mm256_set1_ps(BASE);
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i h32[4], l32[4];
    for (int q = 0; q < 4; q++) {
        /* n = 254 h + l with both digits nearest, in floats (exact: |n| < 2^15) */
        __m256 n = _mm256_round_ps(_mm256_mul_ps(v[q], _mm256_set1_ps(inverse)), nearest);
        n = _mm256_min_ps(_mm256_max_ps(n, _mm256_xor_ps(limit, sign)), limit);
        const __m256 h = _mm256_round_ps(_mm256_mul_ps(n, _mm256_set1_ps(1.0f / BASE)), nearest);
        h32[q] = _mm256_cvtps_epi32(h);
        l32[q] = _mm256_cvtps_epi32(_mm256_fnmadd_ps(h, base, n));
    }
    int8_t h8[BLOCK], l8[BLOCK];
    _mm256_storeu_si256((__m256i *)h8, pack_digits(h32));
    _mm256_storeu_si256((__m256i *)l8, pack_digits(l32));
    int64_t low = i * BLOCK, high = low + BLOCK / 2, scale_at = i; /* a lone block: in order */
    if (i < groups * GROUP) { /* in a pair: both blocks' low halves, then both high halves */
        low = i / 2 * 2 * BLOCK + (i & 1) * (BLOCK / 2);
        high = low + BLOCK;
        scale_at = i - i % GROUP + slot_of((int)(i % GROUP));
    }
    memcpy(hi + low, h8, BLOCK / 2);
    memcpy(hi + high, h8 + BLOCK / 2, BLOCK / 2);
    memcpy(lo + low, l8, BLOCK / 2);
    memcpy(lo + high, l8 + BLOCK / 2, BLOCK / 2);
    dx[scale_at] = unit;
    sums[scale_at] = hsum(total);
}

/* sum(q * (254 hi + lo)) of one pair of blocks: block one's in lanes 0-3, two's in 4-7. */
static inline __m256i pair_dot(__m256i low, __m256i high, const int8_t *hi, const int8_t *lo) {
    const __m256i base = _mm256_set1_epi16(BASE), ones = _mm256_set1_epi16(1);
    const __m256i *h = (const __m256i *)hi, *l = (const __m256i *)lo;
    const __m256i sh = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256(h)),
                                        _mm256_maddubs_epi16(high, _mm256_loadu_si256(h + 1)));
    const __m256i sl = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256(l)),
                                        _mm256_maddubs_epi16(high, _mm256_loadu_si256(l + 1)));
    return _mm256_add_epi32(_mm256_madd_epi16(sh, base), _mm256_madd_epi16(sl, ones));
}

static inline __m256i unpack_single(const uint8_t *nibbles) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)nibbles);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(high, low);
}

/* One block outside the groups, digits in natural order: sum(q * x) / dx as an int32 sum. */
static inline float single_dot(__m256i w, const int8_t *hi, const int8_t *lo) {
    const __m256i ones = _mm256_set1_epi16(1), base = _mm256_set1_epi16(BASE);
    const __m256i h = _mm256_loadu_si256((const __m256i *)hi);
    const __m256i l = _mm256_loadu_si256((const __m256i *)lo);
    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, h), base),
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(w, l), ones));
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return (float)_mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

struct matmul {
    const int8_t *hi, *lo;
    const float *dx, *sums;
    int64_t rows, in, blocks, groups, out;
    const uint8_t *qs;
    const uint16_t *d, *m; /* fp16 */
    const float *bias;
    float *y;
};

/* Output row o against input rows r .. r + n - 1 (n <= TILE, a constant at each call site). */
static inline __attribute__((always_inline)) void dot_tile(const struct matmul *job, int64_t o,
                                                           int64_t r, int n, float *result) {
    const int64_t in = job->in, blocks = job->blocks;
    const uint8_t *qs = job->qs + o * blocks * (BLOCK / 2);
    const uint16_t *d = job->d + o * blocks, *m = job->m + o * blocks;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[TILE];
    for (int i = 0; i < n; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < job->groups; g++) {
        __m256i low[GROUP / 2], high[GROUP / 2];
        for (int p = 0; p < GROUP / 2; p++) {
            const __m256i bytes =
                _mm256_loadu_si256((const __m256i *)(qs + (g * GROUP + 2 * p) * (BLOCK / 2)));
            low[p] = _mm256_and_si256(bytes, mask);
            high[p] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
        }
        const __m256 dg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g * GROUP)));
        const __m256 mg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g * GROUP)));
        for (int i = 0; i < n; i++) {
            const int64_t at = (r + i) * in + g * GROUP * BLOCK, k = (r + i) * blocks + g * GROUP;
            const int8_t *hi = job->hi + at, *lo = job->lo + at;
            const __m256i v0 = pair_dot(low[0], high[0], hi, lo);
            const __m256i v1 = pair_dot(low[1], high[1], hi + 2 * BLOCK, lo + 2 * BLOCK);
            const __m256i v2 = pair_dot(low[2], high[2], hi + 4 * BLOCK, lo + 4 * BLOCK);
            const __m256i v3 = pair_dot(low[3], high[3], hi + 6 * BLOCK, lo + 6 * BLOCK);
            const __m256i sums =
                _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
            const __m256 scale = _mm256_mul_ps(dg, _mm256_loadu_ps(job->dx + k));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[i]);
            acc[i] = _mm256_fmadd_ps(mg, _mm256_loadu_ps(job->sums + k), acc[i]);
        }
    }
    for (int i = 0; i < n; i++) result[i] = hsum(acc[i]);
    for (int64_t b = job->groups * GROUP; b < blocks; b++) {
        const __m256i w = unpack_single(qs + b * (BLOCK / 2));
        const float db = _cvtsh_ss(d[b]), mb = _cvtsh_ss(m[b]);
        for (int i = 0; i < n; i++) {
            const int64_t at = (r + i) * in + b * BLOCK, k = (r + i) * blocks + b;
            result[i] += single_dot(w, job->hi + at, job->lo + at) * (db * job->dx[k]) +
                         mb * job->sums[k];
        }
    }
}

static void matmul_part(void *context, int index, int parts) {
    const struct matmul *job = context;
    int64_t first, last;
    pool_share(job->out, index, parts, &first, &last);
    const int64_t row_bytes = job->blocks * (BLOCK / 2);
    for (int64_t o = first; o < last; o++) {
        /* the row after next: the hardware prefetcher alone left the kernel at half the
         * memory's speed */
        if (o + 2 < last)
            for (int64_t b = 0; b < row_bytes; b += 64)
                _mm_prefetch((const char *)job->qs + (o + 2) * row_bytes + b, _MM_HINT_T0);
        const float b_o = job->bias ? job->bias[o] : 0.0f;
        for (int64_t r = 0; r < job->rows; r += TILE) {
            float result[TILE];
            const int64_t n = job->rows - r < TILE ? job->rows - r : TILE;
            switch (n) {
            case 4: dot_tile(job, o, r, 4, result); break;
            case 3: dot_tile(job, o, r, 3, result); break;
            case 2: dot_tile(job, o, r, 2, result); break;
            default: dot_tile(job, o, r, 1, result); break;
            }
            for (int64_t i = 0; i < n; i++) job->y[(r + i) * job->out + o] = result[i] + b_o;
        }
    }
}

/* Returns 0, or -1 when the activation digits could not be allocated. */
int q4_matmul(const float *x, int64_t rows, int64_t in, const uint8_t *qs, const uint16_t *d,
              const uint16_t *m, int64_t out, const float *bias, float *y, int threads) {
    const int64_t blocks = in / BLOCK, groups = blocks / GROUP, count = rows * blocks;
    int8_t *hi = malloc((size_t)(2 * rows * in));
    float *dx = malloc(sizeof(float) * (size_t)(2 * count));
    if (hi == NULL || dx == NULL) {
        free(hi), free(dx);
        return -1;
    }
    int8_t *lo = hi + rows * in;
    float *sums = dx + count;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < blocks; i++)
            quantize_block(x + r * in + i * BLOCK, i, groups, hi + r * in, lo + r * in,
                           dx + r * blocks, sums + r * blocks);
    struct matmul job = {hi, lo, dx, sums, rows, in, blocks, groups, out, qs, d, m, bias, y};
    pool_run(matmul_part, &job, threads);
    free(hi), free(dx);
    return 0;
}
