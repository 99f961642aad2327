// Attention over the paged KV pool, for decode groups and prefill blocks alike.
//
// One block owns one (query tile, KV head, sequence): every query head of that KV head (the GQA
// group) and every query of the tile, so each K/V row is read from its page once per block and
// never gathered into a contiguous copy. Keys stream through shared memory in tiles of 32 with an
// online softmax (FlashAttention's running max and sum), in fp32 whatever the storage dtype.
//
// Layouts (those of pie_trio/kernels/torch_ops.py):
//   q      [sequences * queries, heads, head_dim]; row stride `q_row_stride` elements
//   cache  [kv_heads, cache_slots, head_dim] for K and V (one layer)
//   table  key j of sequence b sits in slot table[b * table_stride + j / page_size] * page_size
//          + j % page_size; a page table with page_size 1 is a slot table. A null table means
//          the context is the consecutive slots from `span_start`.
//   lengths[b]: keys of sequence b (null: `length` for all)
//   mask   [sequences, queries, mask_stride] bytes, nonzero = attend (null: none)
//   causal query i of a block of n sees keys j <= lengths[b] - n + i
//   out    [sequences * queries, heads, head_dim], contiguous
// Rows with nothing to attend come out as zeros, as in the reference.
#include "common.cuh"

#define KEY_TILE 32
#define THREADS 256
#define ACC_PER_THREAD 32  // rows * head_dim <= THREADS * ACC_PER_THREAD

template <typename T>
__device__ void paged_attention(
    const T* __restrict__ q, long long q_row_stride,
    const T* __restrict__ k_cache, const T* __restrict__ v_cache, long long cache_slots,
    const long long* __restrict__ table, long long table_stride, int page_size,
    long long span_start, const int* __restrict__ lengths, int length,
    const unsigned char* __restrict__ mask, long long mask_stride,
    T* __restrict__ out, int queries, int heads, int kv_heads, int head_dim,
    int query_tile, int causal, float scale) {
  extern __shared__ float smem[];
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int q0 = blockIdx.x * query_tile;
  const int tile_queries = min(query_tile, queries - q0);
  if (tile_queries <= 0) return;
  const int group = heads / kv_heads;
  const int rows = group * tile_queries;
  const int D = head_dim;
  const int seq_len = lengths ? lengths[b] : length;

  float* q_s = smem;                        // [rows, D]
  float* k_s = q_s + rows * D;              // [KEY_TILE, D + 1]: padded against bank conflicts
  float* v_s = k_s + KEY_TILE * (D + 1);    // [KEY_TILE, D]
  float* p_s = v_s + KEY_TILE * D;          // [rows, KEY_TILE]
  float* m_s = p_s + rows * KEY_TILE;       // running max per row
  float* l_s = m_s + rows;                  // running sum per row
  float* a_s = l_s + rows;                  // this tile's rescale factor per row

  // Row r is query head kvh * group + r / tile_queries at query q0 + r % tile_queries.
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int head = kvh * group + r / tile_queries, qi = q0 + r % tile_queries;
    q_s[idx] = to_float(q[((long long)b * queries + qi) * q_row_stride + (long long)head * D + d]);
  }
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.0f;
  }
  float acc[ACC_PER_THREAD];
#pragma unroll
  for (int i = 0; i < ACC_PER_THREAD; ++i) acc[i] = 0.0f;

  // Keys past the last query's causal limit are never read.
  int key_end = seq_len;
  if (causal) key_end = min(key_end, seq_len - queries + q0 + tile_queries);
  if (mask) key_end = (int)min((long long)key_end, mask_stride);
  __syncthreads();

  for (int j0 = 0; j0 < key_end; j0 += KEY_TILE) {
    for (int idx = threadIdx.x; idx < KEY_TILE * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx % D, j = j0 + jj;
      float kx = 0.0f, vx = 0.0f;
      if (j < key_end) {
        const long long slot = table
            ? table[b * table_stride + j / page_size] * page_size + j % page_size
            : span_start + j;
        const long long at = ((long long)kvh * cache_slots + slot) * D + d;
        kx = to_float(k_cache[at]);
        vx = to_float(v_cache[at]);
      }
      k_s[jj * (D + 1) + d] = kx;
      v_s[jj * D + d] = vx;
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < rows * KEY_TILE; idx += blockDim.x) {
      const int r = idx / KEY_TILE, jj = idx % KEY_TILE, j = j0 + jj;
      const int qi = q0 + r % tile_queries;
      bool allowed = j < key_end;
      if (allowed && causal) allowed = j <= seq_len - queries + qi;
      if (allowed && mask) allowed = mask[((long long)b * queries + qi) * mask_stride + j] != 0;
      float s = -INFINITY;
      if (allowed) {
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += q_s[r * D + d] * k_s[jj * (D + 1) + d];
        s = dot * scale;
      }
      p_s[idx] = s;
    }
    __syncthreads();

    // One warp per row: KEY_TILE is the warp size, so a lane holds one key of the tile.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int r = warp; r < rows; r += warps) {
      const float s = p_s[r * KEY_TILE + lane];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      float p = 0.0f, alpha = 1.0f;
      if (m_new != -INFINITY) {
        p = s == -INFINITY ? 0.0f : expf(s - m_new);
        alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      }
      const float p_sum = warp_sum(p);
      p_s[r * KEY_TILE + lane] = p;
      if (lane == 0) {
        l_s[r] = l_s[r] * alpha + p_sum;
        m_s[r] = m_new;
        a_s[r] = alpha;
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < ACC_PER_THREAD; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < rows * D) {
        const int r = idx / D, d = idx % D;
        float a = acc[i] * a_s[r];
        for (int jj = 0; jj < KEY_TILE; ++jj) a += p_s[r * KEY_TILE + jj] * v_s[jj * D + d];
        acc[i] = a;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < ACC_PER_THREAD; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < rows * D) {
      const int r = idx / D, d = idx % D;
      const int head = kvh * group + r / tile_queries, qi = q0 + r % tile_queries;
      const float l = l_s[r];
      out[(((long long)b * queries + qi) * heads + head) * D + d] =
          from_float<T>(l > 0.0f ? acc[i] / l : 0.0f);
    }
  }
}

#define PIE_PAGED_ATTENTION(SUFFIX, TYPE)                                                       \
  extern "C" __global__ void __launch_bounds__(THREADS) paged_attention_##SUFFIX(              \
      const TYPE* q, long long q_row_stride, const TYPE* k_cache, const TYPE* v_cache,         \
      long long cache_slots, const long long* table, long long table_stride, int page_size,    \
      long long span_start, const int* lengths, int length, const unsigned char* mask,         \
      long long mask_stride, TYPE* out, int queries, int heads, int kv_heads, int head_dim,    \
      int query_tile, int causal, float scale) {                                               \
    paged_attention<TYPE>(q, q_row_stride, k_cache, v_cache, cache_slots, table, table_stride, \
                          page_size, span_start, lengths, length, mask, mask_stride, out,      \
                          queries, heads, kv_heads, head_dim, query_tile, causal, scale);      \
  }

PIE_FOR_EACH_DTYPE(PIE_PAGED_ATTENTION)
