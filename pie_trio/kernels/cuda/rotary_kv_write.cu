// Fused rotary embedding + KV-page write, straight from the fused QKV projection.
//
// Per token row of `qkv` ([rows, (heads + 2 * kv_heads) * head_dim], row stride in elements):
// the query heads are rotated into `q_out` [rows, heads, head_dim]; the key heads are rotated and
// the value heads copied into their cache slot `slots[row]` of this layer's K/V
// ([kv_heads, cache_slots, head_dim]). A negative slot writes nothing (the padding rows of a
// captured decode batch). Rotation is the "rotate half" convention of torch_ops.apply_rotary,
// with its tables (`cos`, signed `sin`: [max_position, head_dim]) indexed by `positions[row]`,
// rounded as it rounds: `x * cos` to the dtype, then `+ partner * sin`.
#include "common.cuh"

template <typename T>
__device__ void rotary_kv_write(const T* __restrict__ qkv, long long qkv_row_stride,
                                const T* __restrict__ cos, const T* __restrict__ sin,
                                const long long* __restrict__ positions,
                                const long long* __restrict__ slots, T* __restrict__ q_out,
                                T* __restrict__ k_cache, T* __restrict__ v_cache,
                                long long cache_slots, int heads, int kv_heads, int head_dim) {
  const int row = blockIdx.x, D = head_dim, half = head_dim / 2;
  const T* x = qkv + (long long)row * qkv_row_stride;
  const long long position = positions[row], slot = slots[row];
  const int rotated = heads + kv_heads;
  for (int idx = threadIdx.x; idx < (rotated + kv_heads) * D; idx += blockDim.x) {
    const int head = idx / D, d = idx % D;
    if (head >= rotated) {  // a value head: copied as it is
      if (slot >= 0) {
        v_cache[((long long)(head - rotated) * cache_slots + slot) * D + d] = x[idx];
      }
      continue;
    }
    const float c = to_float(cos[position * D + d]), s = to_float(sin[position * D + d]);
    const float partner = to_float(x[head * D + (d + half) % D]);
    const float value = round_to<T>(to_float(x[idx]) * c) + partner * s;
    if (head < heads) {
      q_out[((long long)row * heads + head) * D + d] = from_float<T>(value);
    } else if (slot >= 0) {
      k_cache[((long long)(head - heads) * cache_slots + slot) * D + d] = from_float<T>(value);
    }
  }
}

#define PIE_ROTARY_KV_WRITE(SUFFIX, TYPE)                                                       \
  extern "C" __global__ void rotary_kv_write_##SUFFIX(                                         \
      const TYPE* qkv, long long qkv_row_stride, const TYPE* cos, const TYPE* sin,             \
      const long long* positions, const long long* slots, TYPE* q_out, TYPE* k_cache,          \
      TYPE* v_cache, long long cache_slots, int heads, int kv_heads, int head_dim) {           \
    rotary_kv_write<TYPE>(qkv, qkv_row_stride, cos, sin, positions, slots, q_out, k_cache,     \
                          v_cache, cache_slots, heads, kv_heads, head_dim);                    \
  }

PIE_FOR_EACH_DTYPE(PIE_ROTARY_KV_WRITE)
