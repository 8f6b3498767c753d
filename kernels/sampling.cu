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

// tokens[r] = the first index of the largest logit of row r, NaN counting as -inf (as the host
// sampler's argmax). grid (rows), block 256.
//   logits [rows, vocab] f32;  tokens [rows]
__device__ void argmax(unsigned* __restrict__ tokens, const float* __restrict__ logits, int vocab) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float v = neg_inf();
  int idx = 0x7fffffff;
  // Each thread walks its indices upwards, so a strict > keeps its first maximum.
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
  if (warp == 0) {
    v = lane < num_warps ? s_v[lane] : neg_inf();
    idx = lane < num_warps ? s_i[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, v, o);
      const int oi = __shfl_xor_sync(FULL_MASK, idx, o);
      keep_better(v, idx, ov, oi);
    }
    if (lane == 0) tokens[blockIdx.x] = (unsigned)idx;
  }
}

}  // namespace pagoda

extern "C" __global__ void __launch_bounds__(256) pagoda_argmax_f32(unsigned* tokens, const float* logits, int vocab) {
  pagoda::argmax(tokens, logits, vocab);
}
PAGODA_REGISTER(pagoda_argmax_f32)
