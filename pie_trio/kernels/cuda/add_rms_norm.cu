// Fused residual add + RMSNorm: `hidden += delta` and `normed = rms_norm(hidden) * weight` in one
// pass over each row, instead of an add kernel and a norm kernel that read the row twice more.
//
// Rounding follows the torch reference (torch_ops.rms_norm after a plain add): the sum is rounded
// to the storage dtype before it is normed, the norm runs in fp32, the normalised row is rounded
// to the dtype and only then multiplied by the weight. `hidden_out` may alias `hidden`.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm(const T* hidden, const T* __restrict__ delta, T* hidden_out,
                             T* __restrict__ normed, const T* __restrict__ weight, int width,
                             float eps) {
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * width;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float h = round_to<T>(to_float(hidden[base + i]) + to_float(delta[base + i]));
    hidden_out[base + i] = from_float<T>(h);
    squares += h * h;
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / width + eps);
  // Each thread reads back only the elements it wrote itself: no barrier needed.
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float n = round_to<T>(to_float(hidden_out[base + i]) * rstd);
    normed[base + i] = from_float<T>(n * to_float(weight[i]));
  }
}

#define PIE_ADD_RMS_NORM(SUFFIX, TYPE)                                                       \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const TYPE* hidden, const TYPE* delta,   \
                                                   TYPE* hidden_out, TYPE* normed,         \
                                                   const TYPE* weight, int width, float eps) { \
    add_rms_norm<TYPE>(hidden, delta, hidden_out, normed, weight, width, eps);              \
  }

PIE_FOR_EACH_DTYPE(PIE_ADD_RMS_NORM)
