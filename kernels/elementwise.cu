// The model's small operations: row gathers (embedding, logits rows), RMSNorm (alone and fused
// with the residual add), residual add, bias add, SiLU·mul, and rotary embedding fused with the
// KV-cache write. Each is memory-bound: one pass over its inputs, f32 arithmetic, the result
// rounded once to the activation dtype. Launch geometry: src/backend/cuda/geometry.rs.
#include "common.cuh"

namespace pagoda {

// out[r] = x[rows[r]] for r < gridDim.x. Serves the embedding (x is the table, rows the token ids)
// and the gather of the rows that need logits. grid (num_rows), block 128.
//   out  [num_rows, width]      x [*, width] row-major      rows [num_rows]
template <typename T>
__device__ void gather_rows(T* __restrict__ out, const T* __restrict__ x, const unsigned* __restrict__ rows,
                            int width) {
  const size_t src = (size_t)rows[blockIdx.x] * width, dst = (size_t)blockIdx.x * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) out[dst + i] = x[src + i];
}

// out[r] = columns [first, first + width) of x[r]. grid (rows, ceil(width / 128)), block 128: one
// element per thread, so a single row (a decode step) still spreads over the GPU (one block per
// row took 20 us for a 14336-wide row on an H200).
//   out [rows, width]      x [rows, x_cols]
template <typename T>
__device__ void copy_columns(T* __restrict__ out, const T* __restrict__ x, int x_cols, int first, int width) {
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i < width) out[(size_t)blockIdx.x * width + i] = x[(size_t)blockIdx.x * x_cols + first + i];
}

// RMSNorm of one row per block, optionally adding `delta` into `residual` first:
//   residual[r] += delta[r] (rounded to T, as the unfused add would), out[r] = norm(residual[r]) * w.
// With delta == nullptr, residual is only read. grid (rows), block 256 (a multiple of 32).
//   residual, delta, out  [rows, width]      weight [width]
template <typename T>
__device__ void add_rms_norm(T* __restrict__ residual, const T* __restrict__ delta, T* __restrict__ out,
                             const T* __restrict__ weight, int width, float eps) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * width;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = to_float(residual[row + i]);
    if (delta != nullptr) {
      const T sum = from_float<T>(v + to_float(delta[row + i]));
      residual[row + i] = sum;
      v = to_float(sum);
    }
    sum_sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sum_sq, scratch) / width + eps);
  // Each thread re-reads only the elements it wrote itself, so no barrier is needed here.
  for (int i = threadIdx.x; i < width; i += blockDim.x)
    out[row + i] = from_float<T>(to_float(weight[i]) * (to_float(residual[row + i]) * inv));
}

// x[i] += y[i]. grid (ceil(len / 256)), block 256.
template <typename T>
__device__ void add(T* __restrict__ x, const T* __restrict__ y, unsigned len) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
}

// x[r, c] += bias[c]. grid (ceil(rows * cols / 256)), block 256.
template <typename T>
__device__ void add_bias(T* __restrict__ x, const T* __restrict__ bias, unsigned len, unsigned cols) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % cols]));
}

// out[i] = silu(gate[i]) * up[i]. grid (ceil(len / 256)), block 256.
template <typename T>
__device__ void silu_mul(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, unsigned len) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.f + expf(-g)) * to_float(up[i]));
  }
}

// Rotates one head vector in place (non-interleaved `rotate_half` pairing: element i with i + half).
//   cs: the position's row of the table, cos of the half frequencies then their sines.
template <typename T>
__device__ __forceinline__ void rotate_pair(T* __restrict__ head, const float* __restrict__ cs, int i, int half) {
  const float a = to_float(head[i]), b = to_float(head[i + half]);
  const float c = cs[i], s = cs[half + i];
  head[i] = from_float<T>(a * c - b * s);
  head[i + half] = from_float<T>(b * c + a * s);
}

// For one token per block: rotary embedding of q (when q is given) and of k (when cos_sin is given
// and k is), then k and v stored at the token's cache slot (when the caches are given). The model
// calls it with everything at once; the three parts alone serve the unfused Backend operations.
// grid (num_tokens), block 128.
//   q [n, num_heads * head_dim] rotated in place;  k, v [n, num_kv_heads * head_dim], k rotated in
//   place;  cos_sin [max_positions, head_dim] f32;  positions, slots [n];
//   k_cache, v_cache [num_blocks * block_size, num_kv_heads * head_dim] (this layer's part).
constexpr unsigned NO_SLOT = 0xffffffffu;  // backend::NO_SLOT
template <typename T>
__device__ void rotary_write_kv(T* __restrict__ q, T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ k_cache, T* __restrict__ v_cache, const float* __restrict__ cos_sin,
                                const unsigned* __restrict__ positions, const unsigned* __restrict__ slots,
                                int num_heads, int num_kv_heads, int head_dim) {
  const int t = blockIdx.x, half = head_dim / 2;
  const int kv_width = num_kv_heads * head_dim;
  T* k_row = k == nullptr ? nullptr : k + (size_t)t * kv_width;
  if (cos_sin != nullptr) {
    const float* cs = cos_sin + (size_t)positions[t] * head_dim;
    if (q != nullptr) {
      T* q_row = q + (size_t)t * num_heads * head_dim;
      for (int p = threadIdx.x; p < num_heads * half; p += blockDim.x)
        rotate_pair(q_row + (p / half) * head_dim, cs, p % half, half);
    }
    if (k_row != nullptr)
      for (int p = threadIdx.x; p < num_kv_heads * half; p += blockDim.x)
        rotate_pair(k_row + (p / half) * head_dim, cs, p % half, half);
  }
  // The pairs a thread rotated are not the elements it copies below.
  __syncthreads();
  // NO_SLOT: a padding token of a captured decode graph, which owns no slot.
  if (k_cache != nullptr && slots[t] != NO_SLOT) {
    const size_t dst = (size_t)slots[t] * kv_width;
    const T* v_row = v + (size_t)t * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
      k_cache[dst + i] = k_row[i];
      v_cache[dst + i] = v_row[i];
    }
  }
}

// out[i] = the (first + i)-th value of the dummy-weight stream `seed`: uniform in [-range, range],
// the same bits as backend::dummy_value on the host (--load-format dummy). grid (ceil(len / 256)),
// block 256.
template <typename T>
__device__ void fill_uniform(T* __restrict__ out, unsigned len, unsigned long long first, unsigned long long seed,
                             float range) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= len) return;
  unsigned long long z = seed ^ ((first + i) * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float unit = (float)(unsigned)(z >> 40) / 16777216.f;
  out[i] = from_float<T>((unit * 2.f - 1.f) * range);
}

}  // namespace pagoda

#define GATHER_PARAMS(T) (T * out, const T* x, const unsigned* rows, int width)
#define GATHER_BODY(T) pagoda::gather_rows<T>(out, x, rows, width)
PAGODA_KERNEL_ALL_DTYPES(gather_rows, 128, GATHER_PARAMS, GATHER_BODY)

#define COLUMNS_PARAMS(T) (T * out, const T* x, int x_cols, int first, int width)
#define COLUMNS_BODY(T) pagoda::copy_columns<T>(out, x, x_cols, first, width)
PAGODA_KERNEL_ALL_DTYPES(copy_columns, 128, COLUMNS_PARAMS, COLUMNS_BODY)

#define NORM_PARAMS(T) (T * residual, const T* delta, T* out, const T* weight, int width, float eps)
#define NORM_BODY(T) pagoda::add_rms_norm<T>(residual, delta, out, weight, width, eps)
PAGODA_KERNEL_ALL_DTYPES(add_rms_norm, 256, NORM_PARAMS, NORM_BODY)

#define ADD_PARAMS(T) (T * x, const T* y, unsigned len)
#define ADD_BODY(T) pagoda::add<T>(x, y, len)
PAGODA_KERNEL_ALL_DTYPES(add, 256, ADD_PARAMS, ADD_BODY)

#define BIAS_PARAMS(T) (T * x, const T* bias, unsigned len, unsigned cols)
#define BIAS_BODY(T) pagoda::add_bias<T>(x, bias, len, cols)
PAGODA_KERNEL_ALL_DTYPES(add_bias, 256, BIAS_PARAMS, BIAS_BODY)

#define SILU_PARAMS(T) (T * out, const T* gate, const T* up, unsigned len)
#define SILU_BODY(T) pagoda::silu_mul<T>(out, gate, up, len)
PAGODA_KERNEL_ALL_DTYPES(silu_mul, 256, SILU_PARAMS, SILU_BODY)

#define ROTARY_PARAMS(T)                                                                                   \
  (T * q, T* k, const T* v, T* k_cache, T* v_cache, const float* cos_sin, const unsigned* positions,     \
   const unsigned* slots, int num_heads, int num_kv_heads, int head_dim)
#define ROTARY_BODY(T) \
  pagoda::rotary_write_kv<T>(q, k, v, k_cache, v_cache, cos_sin, positions, slots, num_heads, num_kv_heads, head_dim)
PAGODA_KERNEL_ALL_DTYPES(rotary_write_kv, 128, ROTARY_PARAMS, ROTARY_BODY)

#define FILL_PARAMS(T) (T * out, unsigned len, unsigned long long first, unsigned long long seed, float range)
#define FILL_BODY(T) pagoda::fill_uniform<T>(out, len, first, seed, range)
PAGODA_KERNEL_ALL_DTYPES(fill_uniform, 256, FILL_PARAMS, FILL_BODY)
