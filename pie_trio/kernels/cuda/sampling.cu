// Batched sampling: one block per output row shapes its logits and draws its token, for every
// row of the batch in one launch, whatever mix of samplers the rows carry.
//
// Per row, in the order of pie_trio/model/sampling.py:
//   1. the vocabulary bitmask (bit t % 8 of byte t / 8; `mask_index[row]` picks a mask row, -1
//      for none) sets forbidden logits to -inf, then the logit bias (CSR: `bias_offsets`,
//      `bias_ids`, `bias_values`) is added. Both are written back into `logits`, so top-k
//      distributions read afterwards see the shaped logits, as in the reference.
//   2. temperature <= 0: the argmax (lowest id on ties, as torch.argmax).
//   3. else z = logits / temperature; top-k keeps z >= the k-th largest (ties kept); softmax over
//      what is kept; top-p keeps token i when the mass of strictly more likely tokens is below
//      top_p; min-p keeps p >= min_p * max p; a token is drawn in proportion to what is kept.
// Thresholds are found by radix search over the float bits (no sort): 32 block-wide counting
// passes for top-k and 31 summing passes for top-p, each over the row held in L2.
// The draw is u = hash(seeds[row]) in [0, 1): counter-based, so a seed gives the same token
// for the same logits on every run.
#include "common.cuh"

#define THREADS 1024

__device__ __forceinline__ unsigned int order_key(float x) {
  const unsigned int bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct RowFilter {  // what steps 3's filters decided, shared by every pass after them
  const float* logits;
  float inv_temperature;
  unsigned int kth_key;  // keep z with order_key(z) >= kth_key (0: no top-k)
  float max_z;
  float inv_sum;
  __device__ float z(int t) const { return logits[t] * inv_temperature; }
  __device__ float prob(int t) const {
    const float zt = z(t);
    if (order_key(zt) < kth_key || zt == -INFINITY) return 0.0f;
    return expf(zt - max_z) * inv_sum;
  }
};

__device__ void shape_row(float* logits, int vocab, const unsigned char* mask_row,
                          const int* bias_ids, const float* bias_values, int bias_begin,
                          int bias_end) {
  if (mask_row) {
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
      if (!((mask_row[t >> 3] >> (t & 7)) & 1)) logits[t] = -INFINITY;
    }
    __syncthreads();
  }
  for (int i = bias_begin + threadIdx.x; i < bias_end; i += blockDim.x) {
    logits[bias_ids[i]] += bias_values[i];
  }
  __syncthreads();
}

__device__ long long argmax_row(const float* logits, int vocab, float* f_scratch,
                                int* i_scratch) {
  float best = -INFINITY;
  int best_id = vocab;  // "none yet": loses every tie
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
    const float x = logits[t];
    if (x > best || (x == best && t < best_id)) best = x, best_id = t;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    if (other > best || (other == best && other_id < best_id)) best = other, best_id = other_id;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) f_scratch[warp] = best, i_scratch[warp] = best_id;
  __syncthreads();
  best = -INFINITY, best_id = vocab;
  for (int w = 0; w < warps; ++w) {
    if (f_scratch[w] > best || (f_scratch[w] == best && i_scratch[w] < best_id)) {
      best = f_scratch[w], best_id = i_scratch[w];
    }
  }
  return best_id < vocab ? best_id : 0;  // an all -inf (or NaN) row: token 0, as argmax
}

// The k-th largest key of z: the largest x with at least k keys >= x.
__device__ unsigned int kth_largest_key(const RowFilter& f, int vocab, int k, float* scratch) {
  unsigned int prefix = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned int candidate = prefix | (1u << bit);
    float count = 0.0f;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
      count += order_key(f.z(t)) >= candidate ? 1.0f : 0.0f;
    }
    if (block_sum(count, scratch) >= (float)k) prefix = candidate;
  }
  return prefix;
}

// The smallest probability key x whose strictly larger probabilities sum below top_p.
__device__ unsigned int top_p_key(const RowFilter& f, int vocab, float top_p, float* scratch) {
  unsigned int lo = 0, hi = 0x7F800000u;  // keys of positive floats, up to +inf
  while (lo < hi) {
    const unsigned int mid = lo + (hi - lo) / 2;
    float mass = 0.0f;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
      const float p = f.prob(t);
      mass += __float_as_uint(p) > mid ? p : 0.0f;
    }
    if (block_sum(mass, scratch) < top_p) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Draw a token with weight `prob(t)` when its key passes `min_key` and p >= `floor`.
__device__ long long draw(const RowFilter& f, int vocab, unsigned int min_key, float floor,
                          float u, float* partial) {
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
  float mine = 0.0f;
  for (int t = begin; t < end; ++t) {
    const float p = f.prob(t);
    if (__float_as_uint(p) >= min_key && p >= floor) mine += p;
  }
  partial[threadIdx.x] = mine;
  __syncthreads();
  __shared__ long long chosen;
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int i = 0; i < blockDim.x; ++i) total += partial[i];
    const float target = u * total;
    float seen = 0.0f;
    long long token = -1;
    for (int i = 0; i < blockDim.x && token < 0; ++i) {
      if (partial[i] <= 0.0f) continue;
      if (seen + partial[i] <= target) { seen += partial[i]; continue; }
      const int b = min(vocab, i * chunk), e = min(vocab, b + chunk);
      for (int t = b; t < e && token < 0; ++t) {
        const float p = f.prob(t);
        if (__float_as_uint(p) < min_key || p < floor) continue;
        seen += p;
        if (seen > target) token = t;
      }
    }
    // Rounding can leave the target just past the end: take the last kept token then.
    for (int t = vocab - 1; t >= 0 && token < 0; --t) {
      const float p = f.prob(t);
      if (p > 0.0f && __float_as_uint(p) >= min_key && p >= floor) token = t;
    }
    chosen = token < 0 ? 0 : token;
  }
  __syncthreads();
  return chosen;
}

extern "C" __global__ void __launch_bounds__(THREADS) sample_rows(
    float* logits, int vocab, const float* temperature, const int* top_k, const float* top_p,
    const float* min_p, const unsigned long long* seeds, const unsigned char* masks,
    int mask_bytes, const int* mask_index, const int* bias_offsets, const int* bias_ids,
    const float* bias_values, long long* tokens) {
  __shared__ float scratch[32];
  __shared__ int i_scratch[32];
  __shared__ float partial[THREADS];
  const int row = blockIdx.x;
  float* row_logits = logits + (long long)row * vocab;
  const unsigned char* mask_row =
      masks && mask_index[row] >= 0 ? masks + (long long)mask_index[row] * mask_bytes : nullptr;
  const int bias_begin = bias_offsets ? bias_offsets[row] : 0;
  const int bias_end = bias_offsets ? bias_offsets[row + 1] : 0;
  shape_row(row_logits, vocab, mask_row, bias_ids, bias_values, bias_begin, bias_end);

  if (temperature[row] <= 0.0f) {
    const long long token = argmax_row(row_logits, vocab, scratch, i_scratch);
    if (threadIdx.x == 0) tokens[row] = token;
    return;
  }
  RowFilter f{row_logits, 1.0f / temperature[row], 0u, 0.0f, 0.0f};
  if (top_k[row] > 0 && top_k[row] < vocab) f.kth_key = kth_largest_key(f, vocab, top_k[row], scratch);
  float local_max = -INFINITY;
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
    const float z = f.z(t);
    if (order_key(z) >= f.kth_key) local_max = fmaxf(local_max, z);
  }
  f.max_z = block_max(local_max, scratch);
  if (f.max_z == -INFINITY) {  // nothing allowed at all: fall back to the argmax, token 0
    if (threadIdx.x == 0) tokens[row] = 0;
    return;
  }
  f.inv_sum = 1.0f;
  float sum = 0.0f;
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) sum += f.prob(t);
  f.inv_sum = 1.0f / block_sum(sum, scratch);

  const unsigned int min_key = top_p[row] < 1.0f ? top_p_key(f, vocab, top_p[row], scratch) : 0u;
  // The most likely token survives every filter, so max p is exp(0) / sum.
  const float floor = min_p[row] > 0.0f ? min_p[row] * f.inv_sum : 0.0f;
  const float u = (float)(splitmix64(seeds[row]) >> 40) * (1.0f / 16777216.0f);
  const long long token = draw(f, vocab, min_key, floor, u, partial);
  if (threadIdx.x == 0) tokens[row] = token;
}
