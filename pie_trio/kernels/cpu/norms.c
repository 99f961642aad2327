/* RMS norm of fp32 rows, optionally of a residual sum: one pass per row where torch's CPU
 * decomposition runs about eight ops (pow, mean, add, rsqrt, two products and their
 * temporaries), each a dispatch that costs more than the arithmetic at decode sizes.
 *
 * add_rms_norm: total = hidden + delta (with delta NULL: the norm of hidden alone, total
 * unwritten), out = total * rsqrt(mean(total^2) + eps) * weight, row by row. The sum of
 * squares is accumulated in double.
 *
 * silu_mul: SwiGLU of a fused gate/up projection `[rows, 2 * ffn]`: silu(gate) * up, eight
 * lanes at a time (simd.h's exp; a scalar call of expf per element was a tenth of a batch-1
 * step's serial time).
 */
#include "kernels.h"
#include "simd.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>

void add_rms_norm(const float *hidden, const float *delta, const float *weight, float eps,
                  int64_t rows, int64_t dim, float *total, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *h = hidden + r * dim;
        if (delta != NULL) {
            const float *e = delta + r * dim;
            float *t = total + r * dim;
            for (int64_t j = 0; j < dim; j++) t[j] = h[j] + e[j];
            h = t;
        }
        double squares = 0.0;
        for (int64_t j = 0; j < dim; j++) squares += (double)h[j] * h[j];
        const float scale = (float)(1.0 / sqrt(squares / (double)dim + (double)eps));
        float *o = out + r * dim;
        for (int64_t j = 0; j < dim; j++) o[j] = h[j] * scale * weight[j];
    }
}

void silu_mul(const float *gate_up, int64_t rows, int64_t ffn, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * ffn, *up = gate + ffn;
        float *o = out + r * ffn;
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        int64_t j = 0;
        for (; j + 8 <= ffn; j += 8) {
            const __m256 g = _mm256_loadu_ps(gate + j);
            const __m256 e = exp256(_mm256_xor_ps(g, sign));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                  _mm256_loadu_ps(up + j)));
        }
        for (; j < ffn; j++) o[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
    }
}
