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
 * Blocks go eight at a time, interleaved (`cpu_kernels.pack_q4`): a group's 128 bytes are four
 * runs of 32, and in run c the four bytes at 4j..4j+3 are bytes 4c..4c+3 of block j. One load
 * thus holds four of each block's bytes, eight blocks side by side, and the activation digits
 * are laid out to match: every integer product of a run lands in the int32 lane of its own
 * block, and the group's eight block sums need no horizontal adds. (16-bit partial sums stay
 * exact: eight vpmaddubsw results add to at most 16 * 15 * 127 per lane.) Blocks past the
 * last whole group keep GGUF's layout and go one at a time.
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
#define RUNS 4  /* 32-byte runs of a group's nibbles */
#define TILE 4  /* input rows sharing one unpacked group */
#define VNNI_TILE 8 /* the same with AVX-512's 32 registers */
#define BASE 254

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
    if (i < groups * GROUP) { /* interleaved: element e of block j at run e % 16 / 4, lane j */
        const int64_t base = i / GROUP * GROUP * BLOCK, j = i % GROUP;
        for (int c = 0; c < RUNS; c++)
            for (int half = 0; half < 2; half++) {
                const int64_t at = base + c * 2 * BLOCK + half * BLOCK + 4 * j;
                memcpy(hi + at, h8 + half * (BLOCK / 2) + 4 * c, 4);
                memcpy(lo + at, l8 + half * (BLOCK / 2) + 4 * c, 4);
            }
    } else { /* a lone block: in order */
        memcpy(hi + i * BLOCK, h8, BLOCK);
        memcpy(lo + i * BLOCK, l8, BLOCK);
    }
    dx[i] = unit;
    sums[i] = hsum(total);
}

/* The group's eight blocks' sum(q * (254 hi + lo)), block j in lane j. */
static inline __m256i group_dot(const __m256i low[RUNS], const __m256i high[RUNS],
                                const int8_t *hi, const int8_t *lo) {
    const __m256i *h = (const __m256i *)hi, *l = (const __m256i *)lo;
    __m256i sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
    for (int c = 0; c < RUNS; c++) {
        sh = _mm256_add_epi16(sh, _mm256_add_epi16(
                 _mm256_maddubs_epi16(low[c], _mm256_loadu_si256(h + 2 * c)),
                 _mm256_maddubs_epi16(high[c], _mm256_loadu_si256(h + 2 * c + 1))));
        sl = _mm256_add_epi16(sl, _mm256_add_epi16(
                 _mm256_maddubs_epi16(low[c], _mm256_loadu_si256(l + 2 * c)),
                 _mm256_maddubs_epi16(high[c], _mm256_loadu_si256(l + 2 * c + 1))));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(sh, _mm256_set1_epi16(BASE)),
                            _mm256_madd_epi16(sl, _mm256_set1_epi16(1)));
}

static inline __m256i unpack_single(const uint8_t *nibbles) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)nibbles);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(high, low);
}

/* One block outside the groups, digits in natural order: sum(q * (254 hi + lo)) in eight
 * int32 lanes of four products each (their total is the block's). */
static inline __m256i single_sums(__m256i w, const int8_t *hi, const int8_t *lo) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)hi);
    const __m256i l = _mm256_loadu_si256((const __m256i *)lo);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, h), _mm256_set1_epi16(BASE)),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, l), _mm256_set1_epi16(1)));
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

/* A group's nibbles as eight blocks' low and high values, four runs of 32 bytes each. */
static inline __attribute__((always_inline)) void unpack_group(const uint8_t *nibbles,
                                                               __m256i low[RUNS],
                                                               __m256i high[RUNS]) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < RUNS; c++) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)nibbles + c);
        low[c] = _mm256_and_si256(bytes, mask);
        high[c] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    }
}

/* Output row o against input rows r .. r + n - 1 into result[0 .. n - 1], `tile` rows at most,
 * through `group_dot_of` (a whole run of eight blocks) and `single_sums_of` (a block past the
 * last whole run: GGUF's layout, digits in order); one body for the AVX2 and VNNI paths. The
 * blocks past the last run add their lane sums scaled in place, with no horizontal add per
 * block and row, and their offset terms in lane 0. */
#define DOT_TILE(job, o, r, n, result, tile, group_dot_of, single_sums_of)                        \
    do {                                                                                        \
        const int64_t in = (job)->in, blocks = (job)->blocks;                                  \
        const uint8_t *qs = (job)->qs + (o) * blocks * (BLOCK / 2);                             \
        const uint16_t *d = (job)->d + (o) * blocks, *m = (job)->m + (o) * blocks;              \
        __m256 acc[tile];                                                                       \
        for (int i = 0; i < (n); i++) acc[i] = _mm256_setzero_ps();                             \
        for (int64_t g = 0; g < (job)->groups; g++) {                                           \
            __m256i low[RUNS], high[RUNS];                                                      \
            unpack_group(qs + g * GROUP * (BLOCK / 2), low, high);                              \
            const __m256 dg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g * GROUP))); \
            const __m256 mg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g * GROUP))); \
            for (int i = 0; i < (n); i++) {                                                     \
                const int64_t at = ((r) + i) * in + g * GROUP * BLOCK;                          \
                const int64_t k = ((r) + i) * blocks + g * GROUP;                               \
                const __m256i sums = group_dot_of(low, high, (job)->hi + at, (job)->lo + at);   \
                const __m256 scale = _mm256_mul_ps(dg, _mm256_loadu_ps((job)->dx + k));         \
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[i]);              \
                acc[i] = _mm256_fmadd_ps(mg, _mm256_loadu_ps((job)->sums + k), acc[i]);         \
            }                                                                                   \
        }                                                                                       \
        for (int64_t b = (job)->groups * GROUP; b < blocks; b++) {                              \
            const __m256i w = unpack_single(qs + b * (BLOCK / 2));                              \
            const float db = _cvtsh_ss(d[b]), mb = _cvtsh_ss(m[b]);                             \
            for (int i = 0; i < (n); i++) {                                                     \
                const int64_t at = ((r) + i) * in + b * BLOCK, k = ((r) + i) * blocks + b;      \
                const __m256 lanes =                                                            \
                    _mm256_cvtepi32_ps(single_sums_of(w, (job)->hi + at, (job)->lo + at));      \
                acc[i] = _mm256_fmadd_ps(lanes, _mm256_set1_ps(db * (job)->dx[k]), acc[i]);     \
                acc[i] = _mm256_add_ps(acc[i], _mm256_setr_ps(mb * (job)->sums[k], 0, 0, 0, 0,  \
                                                              0, 0, 0));                        \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < (n); i++) (result)[i] = hsum(acc[i]);                               \
    } while (0)

static inline __attribute__((always_inline)) void dot_tile(const struct matmul *job, int64_t o,
                                                           int64_t r, int n, float *result) {
    DOT_TILE(job, o, r, n, result, TILE, group_dot, single_sums);
}

/* dot_tile with `n` a constant in each inlined copy. */
static void dot_tile_any(const struct matmul *job, int64_t o, int64_t r, int n, float *result) {
    switch (n) {
    case 4: dot_tile(job, o, r, 4, result); break;
    case 3: dot_tile(job, o, r, 3, result); break;
    case 2: dot_tile(job, o, r, 2, result); break;
    default: dot_tile(job, o, r, 1, result); break;
    }
}

/* -- AVX-512 VNNI ------------------------------------------------------------------------
 * vpdpbusd multiplies four unsigned bytes by four signed ones and adds the four products to an
 * int32 lane: one instruction where AVX2 needs vpmaddubsw and a 16-bit add (and, once per
 * group, vpmaddwd). The block sums are exact integers either way, combined into the same
 * int32 before the same float arithmetic, so this path's results are AVX2's bit for bit.
 * EVEX encoding has 32 vector registers: eight input rows share one unpacked group. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))

/* 254 sh + sl (= 256 sh - 2 sh + sl) from the high and low digits' int32 sums, exact. */
static inline __m256i digits_total(__m256i sh, __m256i sl) {
    return _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(sh, 8), _mm256_slli_epi32(sh, 1)),
                            sl);
}

static inline __attribute__((always_inline)) VNNI_TARGET __m256i
group_dot_vnni(const __m256i low[RUNS], const __m256i high[RUNS], const int8_t *hi,
               const int8_t *lo) {
    const __m256i *h = (const __m256i *)hi, *l = (const __m256i *)lo;
    /* four chains (digit x low / high nibbles), each half as long as one per digit */
    __m256i hl = _mm256_setzero_si256(), hh = hl, ll = hl, lh = hl;
    for (int c = 0; c < RUNS; c++) {
        hl = _mm256_dpbusd_epi32(hl, low[c], _mm256_loadu_si256(h + 2 * c));
        hh = _mm256_dpbusd_epi32(hh, high[c], _mm256_loadu_si256(h + 2 * c + 1));
        ll = _mm256_dpbusd_epi32(ll, low[c], _mm256_loadu_si256(l + 2 * c));
        lh = _mm256_dpbusd_epi32(lh, high[c], _mm256_loadu_si256(l + 2 * c + 1));
    }
    return digits_total(_mm256_add_epi32(hl, hh), _mm256_add_epi32(ll, lh));
}

static inline __attribute__((always_inline)) VNNI_TARGET __m256i
single_sums_vnni(__m256i w, const int8_t *hi, const int8_t *lo) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i sh = _mm256_dpbusd_epi32(zero, w, _mm256_loadu_si256((const __m256i *)hi));
    const __m256i sl = _mm256_dpbusd_epi32(zero, w, _mm256_loadu_si256((const __m256i *)lo));
    return digits_total(sh, sl);
}

static inline __attribute__((always_inline)) VNNI_TARGET void
dot_tile_vnni(const struct matmul *job, int64_t o, int64_t r, int n, float *result) {
    DOT_TILE(job, o, r, n, result, VNNI_TILE, group_dot_vnni, single_sums_vnni);
}

static VNNI_TARGET void dot_tile_vnni_any(const struct matmul *job, int64_t o, int64_t r, int n,
                                          float *result) {
    switch (n) {
    case 8: dot_tile_vnni(job, o, r, 8, result); break;
    case 7: dot_tile_vnni(job, o, r, 7, result); break;
    case 6: dot_tile_vnni(job, o, r, 6, result); break;
    case 5: dot_tile_vnni(job, o, r, 5, result); break;
    case 4: dot_tile_vnni(job, o, r, 4, result); break;
    case 3: dot_tile_vnni(job, o, r, 3, result); break;
    case 2: dot_tile_vnni(job, o, r, 2, result); break;
    default: dot_tile_vnni(job, o, r, 1, result); break;
    }
}

/* -- the threads' shares ---------------------------------------------------------------- */

/* Output row o against input rows r .. r + n - 1, n at most the tile the function was made for. */
typedef void (*tile_fn)(const struct matmul *job, int64_t o, int64_t r, int n, float *result);

static tile_fn tile_function = dot_tile_any; /* q4_matmul_use_vnni may choose VNNI's */
static int tile_rows = TILE;

/* Use the AVX-512 VNNI path (`want` nonzero) where the CPU and the OS support it, else AVX2's;
 * returns 1 if the VNNI path is now in use. Until called, the AVX2 path runs. */
int q4_matmul_use_vnni(int want) {
    __builtin_cpu_init();
    const int vnni = want && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vnni");
    tile_function = vnni ? dot_tile_vnni_any : dot_tile_any;
    tile_rows = vnni ? VNNI_TILE : TILE;
    return vnni;
}

static void matmul_part(void *context, int index, int parts) {
    const struct matmul *job = context;
    const tile_fn tile = tile_function;
    const int64_t tile_size = tile_rows;
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
        for (int64_t r = 0; r < job->rows; r += tile_size) {
            float result[VNNI_TILE];
            const int64_t n = job->rows - r < tile_size ? job->rows - r : tile_size;
            tile(job, o, r, (int)n, result);
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
