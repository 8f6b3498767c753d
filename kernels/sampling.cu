// Sampling on the device, so that only token ids leave it. Launch geometry:
// src/backend/cuda/geometry.rs.
#include "common.cuh"

namespace pagoda {

// The better of two (value, index) candidates: the larger value, the lower index on a tie.
__device__ __forceinline__ void keep_better(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// The first index of the largest value of `row`, NaN counting as -inf (as the host sampler's
// argmax); every thread of the block gets it. blockDim.x a multiple of 32.
__device__ int row_argmax(const float* __restrict__ row, int vocab) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  float v = neg_inf();
  int idx = 0x7fffffff;
  // Each thread walks its indices upwards, so it keeps its first maximum.
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float x = isnan(row[j]) ? neg_inf() : row[j];
    if (x > v || (x == v && j < idx)) {
      v = x;
      idx = j;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, v, o);
    const int oi = __shfl_xor_sync(FULL_MASK, idx, o);
    keep_better(v, idx, ov, oi);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  if (lane == 0) {
    s_v[warp] = v;
    s_i[warp] = idx;
  }
  __syncthreads();
  v = lane < num_warps ? s_v[lane] : neg_inf();
  idx = lane < num_warps ? s_i[lane] : 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, v, o);
    const int oi = __shfl_xor_sync(FULL_MASK, idx, o);
    keep_better(v, idx, ov, oi);
  }
  __syncthreads();  // s_v and s_i may be reused right after
  return idx;
}

// tokens[r] = row_argmax of row r. grid (rows), block 256.
//   logits [rows, vocab] f32;  tokens [rows]
__device__ void argmax(unsigned* __restrict__ tokens, const float* __restrict__ logits, int vocab) {
  const int idx = row_argmax(logits + (size_t)blockIdx.x * vocab, vocab);
  if (threadIdx.x == 0) tokens[blockIdx.x] = (unsigned)idx;
}

// Largest of `v` over the block; every thread gets it. `scratch` is 32 floats of shared memory.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : neg_inf();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  __syncthreads();
  return v;
}

// The token backend::draw_by_index draws from `row`: probabilities exp(l / T - max / T), those
// below min_p zeroed, walked in index order until uniform × their sum is used up. Each thread owns
// a contiguous chunk of the vocabulary; a block-wide scan of the chunk sums finds the chunk the
// target falls in, and its thread walks it as the host would. Every thread gets the token.
__device__ int row_draw(const float* __restrict__ row, int vocab, float temperature, float min_p, float uniform) {
  __shared__ float s_scratch[32];
  __shared__ float s_total;
  __shared__ int s_token;
  __shared__ int s_last[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  float m = neg_inf();
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
  const float max_t = block_max(m, s_scratch) / temperature;
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int c0 = imin(vocab, (int)threadIdx.x * chunk), c1 = imin(vocab, c0 + chunk);
  float sum = 0.f;
  int last = -1;  // the chunk's last token with any probability
  for (int j = c0; j < c1; j++) {
    float p = expf(row[j] / temperature - max_t);
    if (p < min_p) p = 0.f;
    sum += p;
    if (p > 0.f) last = j;
  }
  // Inclusive scan of the chunk sums: within the warp, then over the warps' totals.
  float incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(FULL_MASK, incl, o);
    if (lane >= o) incl += n;
  }
  const float before_in_warp = __shfl_up_sync(FULL_MASK, incl, 1);
  if (lane == 31) s_scratch[warp] = incl;
  int last_in_warp = last;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) last_in_warp = imax(last_in_warp, __shfl_xor_sync(FULL_MASK, last_in_warp, o));
  if (lane == 0) s_last[warp] = last_in_warp;
  if (threadIdx.x == 0) s_token = -1;
  __syncthreads();
  float offset = 0.f;
  for (int w = 0; w < warp; w++) offset += s_scratch[w];
  const float excl = (lane == 0 ? 0.f : before_in_warp) + offset;
  incl += offset;
  if (threadIdx.x == blockDim.x - 1) s_total = incl;
  __syncthreads();
  const float target = uniform * s_total;
  if (sum > 0.f && excl <= target && target < incl) {
    float t = target - excl;
    int token = last;  // rounding inside the chunk: its last token with any probability
    for (int j = c0; j < c1; j++) {
      float p = expf(row[j] / temperature - max_t);
      if (p < min_p) p = 0.f;
      if (t < p) {
        token = j;
        break;
      }
      t -= p;
    }
    s_token = token;
  }
  __syncthreads();
  int token = s_token;
  if (token < 0) {
    // Rounding past the end: the last token with any probability, as the host falls back to.
    int overall = -1;
    for (int w = 0; w < num_warps; w++) overall = imax(overall, s_last[w]);
    token = overall < 0 ? 0 : overall;
  }
  __syncthreads();  // the shared values may be reused right after
  return token;
}

// tokens[r] = row r's token by its rule: rules[r] = (temperature, min_p, uniform), temperature 0
// meaning greedy. grid (rows), block 256.
//   logits [rows, vocab] f32;  rules [rows, 3] f32;  tokens [rows]
__device__ void sample(unsigned* __restrict__ tokens, const float* __restrict__ logits, const float* __restrict__ rules,
                       int vocab) {
  const float* row = logits + (size_t)blockIdx.x * vocab;
  const float temperature = rules[3 * blockIdx.x], min_p = rules[3 * blockIdx.x + 1];
  const float uniform = rules[3 * blockIdx.x + 2];
  const int token = temperature == 0.f ? row_argmax(row, vocab) : row_draw(row, vocab, temperature, min_p, uniform);
  if (threadIdx.x == 0) tokens[blockIdx.x] = (unsigned)token;
}

}  // namespace pagoda

extern "C" __global__ void __launch_bounds__(256) pagoda_argmax_f32(unsigned* tokens, const float* logits, int vocab) {
  pagoda::argmax(tokens, logits, vocab);
}
PAGODA_REGISTER(pagoda_argmax_f32)

extern "C" __global__ void __launch_bounds__(256)
    pagoda_sample_f32(unsigned* tokens, const float* logits, const float* rules, int vocab) {
  pagoda::sample(tokens, logits, rules, vocab);
}
PAGODA_REGISTER(pagoda_sample_f32)
