// Paged attention over Pagoda's KV cache: pagoda_paged_attention serves any batch and is the one
// decode steps use; pagoda_prefill_attention (below) serves steps with prompt chunks.
//
// Layout, per layer: K and V each [num_blocks, block_size, num_kv_heads, HEAD_DIM] in the
// activation dtype T; the token at position j of a sequence lives in slot
// block_table[j / block_size] * block_size + j % block_size.
//
// One thread block per (KV head, query token, split) serves the GROUP query heads that share the
// KV head, so each K and V vector is read once for the whole group. A query token at position p
// attends to positions [max(0, p + 1 - sliding_window), p]: causal masking, chunked prefill (a
// chunk attends to its cached prefix and to itself) and prefix-cache hits need nothing else. The
// keys are cut into `gridDim.z` equal splits when the batch is too small to fill the GPU; each split
// writes a partial result and its log-sum-exp, and pagoda_attention_merge combines them (a fixed
// set of split counts, so a step can be captured in a CUDA graph).
//
// Inside a block, each warp takes TOKENS_PER_WARP keys per step (LANES lanes × 16-byte loads cover
// one head vector), reduces q·k over those lanes with shuffles and keeps an online softmax in f32
// (base 2, scores pre-scaled by log2(e)). The token groups of a warp are merged by shuffles, the
// warps through shared memory.
#include "common.cuh"

namespace pagoda {

constexpr int ATTENTION_WARPS = 4;  // block of 128 threads

template <typename T, int HEAD_DIM>
struct AttentionShape {
  static constexpr int VEC = (HEAD_DIM / 32 > 16 / (int)sizeof(T)) ? HEAD_DIM / 32 : 16 / (int)sizeof(T);
  static constexpr int LANES = HEAD_DIM / VEC;  // lanes that hold one head vector
  static constexpr int TOKENS_PER_WARP = 32 / LANES;
  static_assert(LANES * VEC == HEAD_DIM && LANES <= 32 && 32 % LANES == 0, "unsupported head_dim");
};

// out          [num_tokens, num_heads, HEAD_DIM] T (written when gridDim.z == 1)
// partial_out  [num_tokens, num_heads, num_splits, HEAD_DIM] f32 (written when gridDim.z > 1)
// partial_lse  [num_tokens, num_heads, num_splits] f32, base-2 log-sum-exp of the scaled scores
// q            [num_tokens, num_heads, HEAD_DIM]
// block_tables [num_seqs, max_blocks_per_seq];  token_seq, positions [num_tokens]
// `group` (query heads per KV head) is at most GROUP; sliding_window 0 means none.
template <typename T, int HEAD_DIM, int GROUP>
__device__ void paged_attention(T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_lse,
                                const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const unsigned* __restrict__ block_tables, const unsigned* __restrict__ token_seq,
                                const unsigned* __restrict__ positions, int max_blocks_per_seq, int block_size,
                                int num_kv_heads, int group, int sliding_window, float scale) {
  using S = AttentionShape<T, HEAD_DIM>;
  constexpr int VEC = S::VEC, LANES = S::LANES, TOKENS_PER_WARP = S::TOKENS_PER_WARP;
  constexpr int TOKENS_PER_STEP = TOKENS_PER_WARP * ATTENTION_WARPS;
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = neg_inf();

  const int kv_head = blockIdx.x, t = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
  const int num_heads = num_kv_heads * group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / LANES, dl = lane % LANES;

  // The keys this block reads: its split of the token's visible window.
  const int end = (int)positions[t] + 1;
  const int start = (sliding_window > 0 && end > sliding_window) ? end - sliding_window : 0;
  const int chunk = (end - start + num_splits - 1) / num_splits;
  const int split_start = start + split * chunk;
  const int split_end = split_start + chunk < end ? split_start + chunk : end;
  const unsigned* __restrict__ table = block_tables + (size_t)token_seq[t] * max_blocks_per_seq;

  // This lane's VEC dims of each query head of the group, pre-scaled; padding heads are zero.
  float qr[GROUP][VEC];
  const float qscale = scale * LOG2E;
#pragma unroll
  for (int g = 0; g < GROUP; g++) {
    if (g < group) {
      load_floats<T, VEC>(q + ((size_t)t * num_heads + (size_t)kv_head * group + g) * HEAD_DIM + dl * VEC, qr[g]);
#pragma unroll
      for (int i = 0; i < VEC; i++) qr[g][i] *= qscale;
    } else {
#pragma unroll
      for (int i = 0; i < VEC; i++) qr[g][i] = 0.f;
    }
  }
  float m[GROUP], l[GROUP], acc[GROUP][VEC];
#pragma unroll
  for (int g = 0; g < GROUP; g++) {
    m[g] = NEG_INF;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; i++) acc[g][i] = 0.f;
  }

  const size_t token_stride = (size_t)num_kv_heads * HEAD_DIM;
  const size_t head_off = (size_t)kv_head * HEAD_DIM + dl * VEC;
  // `base` is the same for every lane of a warp, so the shuffles below are never divergent; the
  // last step may run past the split: those lanes read nothing and only take part in shuffles.
  for (int base = split_start + warp * TOKENS_PER_WARP; base < split_end; base += TOKENS_PER_STEP) {
    const int j = base + sub;
    const bool valid = j < split_end;
    float kf[VEC], vf[VEC];
    if (valid) {
      const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
      load_floats<T, VEC>(k_cache + slot * token_stride + head_off, kf);
      load_floats<T, VEC>(v_cache + slot * token_stride + head_off, vf);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; i++) kf[i] = vf[i] = 0.f;
    }
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; i++) s = fmaf(qr[g][i], kf[i], s);
#pragma unroll
      for (int o = LANES / 2; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
      if (valid) {
        const float m_new = fmaxf(m[g], s);
        const float alpha = exp2f(m[g] - m_new);  // 0 on the first key (m = -inf, m_new finite)
        const float p = exp2f(s - m_new);
        l[g] = l[g] * alpha + p;
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[g][i] = fmaf(p, vf[i], acc[g][i] * alpha);
        m[g] = m_new;
      }
    }
  }

  // Merge the token groups of the warp: lanes dl, dl + LANES, ... hold the same dims.
#pragma unroll
  for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
      const float m_o = __shfl_xor_sync(FULL_MASK, m[g], o);
      const float l_o = __shfl_xor_sync(FULL_MASK, l[g], o);
      const float m_new = fmaxf(m[g], m_o);
      // A side that saw no key has m = -inf; exp2f(-inf - -inf) would be NaN.
      const float a = m[g] == NEG_INF ? 0.f : exp2f(m[g] - m_new);
      const float b = m_o == NEG_INF ? 0.f : exp2f(m_o - m_new);
      l[g] = l[g] * a + l_o * b;
#pragma unroll
      for (int i = 0; i < VEC; i++) {
        const float acc_o = __shfl_xor_sync(FULL_MASK, acc[g][i], o);
        acc[g][i] = acc[g][i] * a + acc_o * b;
      }
      m[g] = m_new;
    }
  }

  // Merge the warps through shared memory.
  __shared__ float s_m[ATTENTION_WARPS][GROUP];
  __shared__ float s_l[ATTENTION_WARPS][GROUP];
  __shared__ __align__(16) float s_acc[ATTENTION_WARPS][GROUP][HEAD_DIM];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
#pragma unroll
      for (int i = 0; i < VEC; i++) s_acc[warp][g][dl * VEC + i] = acc[g][i];
      if (dl == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += blockDim.x) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATTENTION_WARPS; w++) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < ATTENTION_WARPS; w++) {
      const float mw = s_m[w][g];
      if (mw != NEG_INF) {
        const float f = exp2f(mw - mx);
        sum += s_l[w][g] * f;
        o += s_acc[w][g][d] * f;
      }
    }
    const size_t row = (size_t)t * num_heads + (size_t)kv_head * group + g;
    if (num_splits == 1) {
      out[row * HEAD_DIM + d] = from_float<T>(o / sum);  // the window always holds the token itself
    } else {
      // A split past the end of a short sequence saw no key: weight zero in the merge.
      const size_t p = row * num_splits + split;
      partial_out[p * HEAD_DIM + d] = sum > 0.f ? o / sum : 0.f;
      if (d == 0) partial_lse[p] = sum > 0.f ? mx + log2f(sum) : NEG_INF;
    }
  }
}

// Combines the splits of pagoda_paged_attention. grid (num_tokens, num_heads), block 128.
//   out [num_tokens, num_heads, head_dim];  partial_out, partial_lse as written above.
template <typename T>
__device__ void attention_merge(T* __restrict__ out, const float* __restrict__ partial_out,
                                const float* __restrict__ partial_lse, int num_splits, int head_dim) {
  const size_t row = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
  const float* lse = partial_lse + row * num_splits;
  float mx = neg_inf();
  for (int s = 0; s < num_splits; s++) mx = fmaxf(mx, lse[s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f, o = 0.f;
    for (int s = 0; s < num_splits; s++) {
      if (lse[s] == neg_inf()) continue;
      const float w = exp2f(lse[s] - mx);
      sum += w;
      o += w * partial_out[(row * num_splits + s) * head_dim + d];
    }
    out[row * head_dim + d] = from_float<T>(o / sum);
  }
}

// Prefill attention, flash-style: one thread block per (KV head, tile of a sequence's query
// tokens, sequence) computes PREFILL_ROWS query rows (TILE_TOKENS tokens × GROUP heads of the KV
// head) against tiles of PREFILL_KEYS keys staged in shared memory, so each key and value is read
// from the cache once per tile of queries instead of once per query token. The masking is the
// decode kernel's (causal, sliding window), so chunked prefill and prefix-cache hits need nothing
// else. Each row belongs to PREFILL_TPR consecutive threads; thread h of a row owns the dims
// i * PREFILL_TPR + h (so the threads of a row read neighbouring shared-memory words), computes its
// part of each score and completes it with shuffles, and keeps its dims of the output.
constexpr int PREFILL_ROWS = 32;  // with 128 threads
constexpr int PREFILL_TPR = 4;
constexpr int PREFILL_KEYS = 32;

// out [num_tokens, num_heads, HEAD_DIM];  q likewise;  seq_query_start [num_seqs + 1] (the first
// token of each sequence, then the number of tokens);  the rest as paged_attention.
// grid (num_kv_heads, tiles of the longest query, num_seqs), block 128.
template <typename T, int HEAD_DIM, int GROUP>
__device__ void prefill_attention(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache, const unsigned* __restrict__ block_tables,
                                  const unsigned* __restrict__ seq_query_start, const unsigned* __restrict__ positions,
                                  int max_blocks_per_seq, int block_size, int num_kv_heads, int group,
                                  int sliding_window, float scale) {
  constexpr int TILE_TOKENS = PREFILL_ROWS / GROUP;
  constexpr int DIMS = HEAD_DIM / PREFILL_TPR;  // per thread
  constexpr int PER_VEC = 16 / (int)sizeof(T);   // elements per 16-byte load
  constexpr int VECS_PER_KEY = HEAD_DIM / PER_VEC;
  constexpr float LOG2E = 1.4426950408889634f;
  static_assert(PREFILL_ROWS % GROUP == 0 && HEAD_DIM % PREFILL_TPR == 0 && HEAD_DIM % PER_VEC == 0, "shape");
  const float NEG_INF = neg_inf();
  __shared__ __align__(16) T s_k[PREFILL_KEYS][HEAD_DIM];
  __shared__ __align__(16) T s_v[PREFILL_KEYS][HEAD_DIM];

  const int kv_head = blockIdx.x, seq = blockIdx.z;
  const int q_begin = (int)seq_query_start[seq], q_end = (int)seq_query_start[seq + 1];
  const int t0 = q_begin + (int)blockIdx.y * TILE_TOKENS;
  if (t0 >= q_end) return;  // the whole block: this sequence has fewer tiles
  const int num_tile_tokens = imin(TILE_TOKENS, q_end - t0);
  const int num_heads = num_kv_heads * group;
  const int row = threadIdx.x / PREFILL_TPR, h = threadIdx.x % PREFILL_TPR;
  const int g = row % GROUP, tok = row / GROUP;
  const bool active = tok < num_tile_tokens && g < group;
  const int t = t0 + (active ? tok : 0);
  const int pos = (int)positions[t];
  const int row_start = (sliding_window > 0 && pos + 1 > sliding_window) ? pos + 1 - sliding_window : 0;
  // The keys any row of the tile sees: from the first token's window to the last token.
  const int first_pos = (int)positions[t0];
  const int key_begin = (sliding_window > 0 && first_pos + 1 > sliding_window) ? first_pos + 1 - sliding_window : 0;
  const int key_end = (int)positions[t0 + num_tile_tokens - 1] + 1;
  const unsigned* __restrict__ table = block_tables + (size_t)seq * max_blocks_per_seq;
  const size_t token_stride = (size_t)num_kv_heads * HEAD_DIM;

  float qr[DIMS], acc[DIMS];
  const float qscale = scale * LOG2E;
  const size_t q_row = ((size_t)t * num_heads + (size_t)kv_head * group + (active ? g : 0)) * HEAD_DIM;
#pragma unroll
  for (int i = 0; i < DIMS; i++) {
    qr[i] = active ? to_float(q[q_row + i * PREFILL_TPR + h]) * qscale : 0.f;
    acc[i] = 0.f;
  }
  float m = NEG_INF, l = 0.f;

  for (int kb = key_begin; kb < key_end; kb += PREFILL_KEYS) {
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < PREFILL_KEYS * VECS_PER_KEY; idx += blockDim.x) {
      const int k = idx / VECS_PER_KEY, v = idx % VECS_PER_KEY, j = kb + k;
      uint4 kw = {0u, 0u, 0u, 0u}, vw = kw;  // keys past the tile: zeros, never NaN
      if (j < key_end) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const size_t off = slot * token_stride + (size_t)kv_head * HEAD_DIM + v * PER_VEC;
        kw = *reinterpret_cast<const uint4*>(k_cache + off);
        vw = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      *reinterpret_cast<uint4*>(&s_k[k][v * PER_VEC]) = kw;
      *reinterpret_cast<uint4*>(&s_v[k][v * PER_VEC]) = vw;
    }
    __syncthreads();
    float sc[PREFILL_KEYS];
    float tile_max = NEG_INF;
#pragma unroll
    for (int k = 0; k < PREFILL_KEYS; k++) {
      float part = 0.f;
#pragma unroll
      for (int i = 0; i < DIMS; i++) part = fmaf(qr[i], to_float(s_k[k][i * PREFILL_TPR + h]), part);
#pragma unroll
      for (int o = PREFILL_TPR / 2; o > 0; o >>= 1) part += __shfl_xor_sync(FULL_MASK, part, o);
      const int j = kb + k;
      sc[k] = (active && j >= row_start && j <= pos) ? part : NEG_INF;
      tile_max = fmaxf(tile_max, sc[k]);
    }
    const float m_new = fmaxf(m, tile_max);
    if (m_new == NEG_INF) continue;  // no key of this row yet (the threads of a row agree)
    const float alpha = exp2f(m - m_new);  // 0 while m = -inf
    l *= alpha;
#pragma unroll
    for (int i = 0; i < DIMS; i++) acc[i] *= alpha;
#pragma unroll
    for (int k = 0; k < PREFILL_KEYS; k++) {
      const float p = exp2f(sc[k] - m_new);  // 0 for masked keys
      l += p;
#pragma unroll
      for (int i = 0; i < DIMS; i++) acc[i] = fmaf(p, to_float(s_v[k][i * PREFILL_TPR + h]), acc[i]);
    }
    m = m_new;
  }
  if (active) {
    const float inv = 1.f / l;  // the window always holds the token itself
#pragma unroll
    for (int i = 0; i < DIMS; i++) out[q_row + i * PREFILL_TPR + h] = from_float<T>(acc[i] * inv);
  }
}

}  // namespace pagoda

#define ATTENTION_ARGS(T)                                                                                      \
  (T * out, float* partial_out, float* partial_lse, const T* q, const T* k_cache, const T* v_cache,          \
   const unsigned* block_tables, const unsigned* token_seq, const unsigned* positions, int max_blocks_per_seq, \
   int block_size, int num_kv_heads, int group, int sliding_window, float scale)
#define ATTENTION_KERNEL(HD, G, SUFFIX, TYPE)                                                                     \
  extern "C" __global__ void __launch_bounds__(128, 1) pagoda_paged_attention_h##HD##_g##G##_##SUFFIX ATTENTION_ARGS( \
      TYPE) {                                                                                                     \
    pagoda::paged_attention<TYPE, HD, G>(out, partial_out, partial_lse, q, k_cache, v_cache, block_tables,       \
                                         token_seq, positions, max_blocks_per_seq, block_size, num_kv_heads,     \
                                         group, sliding_window, scale);                                          \
  }                                                                                                               \
  PAGODA_REGISTER(pagoda_paged_attention_h##HD##_g##G##_##SUFFIX)
// Every attention kernel K is instantiated for head sizes 16 (the test fixtures), 32 (the embedded
// demo model), 64 and 128, groups of up to 1, 2, 4 and 8 query heads per KV head, and every dtype
// (geometry.rs names them).
#define ATTENTION_GROUPS(K, HD, SUFFIX, TYPE) K(HD, 1, SUFFIX, TYPE) K(HD, 2, SUFFIX, TYPE) K(HD, 4, SUFFIX, TYPE) K(HD, 8, SUFFIX, TYPE)
#define ATTENTION_HEAD_DIMS(K, SUFFIX, TYPE)                                \
  ATTENTION_GROUPS(K, 16, SUFFIX, TYPE) ATTENTION_GROUPS(K, 32, SUFFIX, TYPE) \
  ATTENTION_GROUPS(K, 64, SUFFIX, TYPE) ATTENTION_GROUPS(K, 128, SUFFIX, TYPE)
#define ATTENTION_INSTANCES(K) \
  ATTENTION_HEAD_DIMS(K, f32, float) ATTENTION_HEAD_DIMS(K, f16, f16) ATTENTION_HEAD_DIMS(K, bf16, bf16)
ATTENTION_INSTANCES(ATTENTION_KERNEL)

#define PREFILL_ARGS(T)                                                                                        \
  (T * out, const T* q, const T* k_cache, const T* v_cache, const unsigned* block_tables,                      \
   const unsigned* seq_query_start, const unsigned* positions, int max_blocks_per_seq, int block_size,         \
   int num_kv_heads, int group, int sliding_window, float scale)
#define PREFILL_KERNEL(HD, G, SUFFIX, TYPE)                                                                       \
  extern "C" __global__ void __launch_bounds__(128, 1) pagoda_prefill_attention_h##HD##_g##G##_##SUFFIX PREFILL_ARGS( \
      TYPE) {                                                                                                     \
    pagoda::prefill_attention<TYPE, HD, G>(out, q, k_cache, v_cache, block_tables, seq_query_start, positions,   \
                                           max_blocks_per_seq, block_size, num_kv_heads, group, sliding_window, \
                                           scale);                                                               \
  }                                                                                                               \
  PAGODA_REGISTER(pagoda_prefill_attention_h##HD##_g##G##_##SUFFIX)
ATTENTION_INSTANCES(PREFILL_KERNEL)

#define MERGE_PARAMS(T) (T * out, const float* partial_out, const float* partial_lse, int num_splits, int head_dim)
#define MERGE_BODY(T) pagoda::attention_merge<T>(out, partial_out, partial_lse, num_splits, head_dim)
PAGODA_KERNEL_ALL_DTYPES(attention_merge, 128, MERGE_PARAMS, MERGE_BODY)
