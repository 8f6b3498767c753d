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

// The better of (v, i) over the block, by keep_better; every thread gets it. blockDim.x a
// multiple of 32.
__device__ void block_best(float& v, int& idx) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
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
}

// The first index of the largest value of `row`, NaN counting as -inf (as the host sampler's
// argmax); every thread of the block gets it.
__device__ __forceinline__ int row_argmax(const float* __restrict__ row, int vocab) {
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
  block_best(v, idx);
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

// The sum of the threads' `v` before this one, in thread order; `incl` gets it plus `v` and
// `total` the whole block's. A thread's `incl` is bitwise the next thread's result, so the
// intervals [result, incl) tile [0, total) with no gap or overlap. `scratch`: 32 shared floats.
__device__ __forceinline__ float block_exclusive_scan(float v, float& incl, float& total, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  float in_warp = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(FULL_MASK, in_warp, o);
    if (lane >= o) in_warp += n;
  }
  const float before_in_warp = __shfl_up_sync(FULL_MASK, in_warp, 1);
  if (lane == 31) scratch[warp] = in_warp;
  __syncthreads();
  float offset = 0.f;
  for (int w = 0; w < warp; w++) offset += scratch[w];
  float all = 0.f;
  for (int w = 0; w < num_warps; w++) all += scratch[w];
  __syncthreads();  // scratch may be reused right after
  incl = in_warp + offset;
  total = all;
  return (lane == 0 ? 0.f : before_in_warp) + offset;
}

// One row's rule, as the host packs it (6 words, backend::Draw): temperature (0 for greedy),
// min_p, top_p, uniform (f32 bits), top_k (0: none), then the forced token (~0u: none; the row's
// token is it, not a pick: backend::RowSampling::forced).
struct Rule {
  float temperature, min_p, top_p, uniform;
  unsigned top_k, forced;
};

constexpr int RULE_WORDS = 6;
constexpr unsigned NOT_FORCED = ~0u;

__device__ __forceinline__ Rule load_rule(const unsigned* __restrict__ w) {
  return Rule{__uint_as_float(w[0]), __uint_as_float(w[1]), __uint_as_float(w[2]), __uint_as_float(w[3]), w[4], w[5]};
}

// A token's probability before the top-k/top-p cut, relative to the most likely token's (1):
// exp(l / T - max / T), zero below min_p (NaN counting as zero), as backend::sampling::draw.
__device__ __forceinline__ float rule_prob(float logit, const Rule& r, float max_t) {
  const float p = expf(logit / r.temperature - max_t);
  return p >= r.min_p ? p : 0.f;
}

// The kept tokens after top-k and top-p: every probability whose bits (a non-negative float's
// bits order as its value) exceed `key`, and the first `ties` in index order equal to it.
struct Cut {
  unsigned key;
  int ties;
};

// How many probabilities have bits >= key, and their mass, over the block.
__device__ __forceinline__ void count_mass_from(const float* __restrict__ row, int vocab, const Rule& r, float max_t, unsigned key,
                                float& count, float& mass, float* scratch) {
  float c = 0.f, m = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float p = rule_prob(row[j], r, max_t);
    if (__float_as_uint(p) >= key) {
      c += 1.f;
      m += p;
    }
  }
  count = block_sum(c, scratch);
  mass = block_sum(m, scratch);
}

// Bits above the largest possible probability (1.0).
constexpr unsigned KEY_END = 0x3f800001u;

// The cut of backend::sampling::draw, found by bisection over the probabilities' bits, so that no
// sort is needed and every sum has a fixed order (the same seed draws the same token).
__device__ __forceinline__ Cut row_cut(const float* __restrict__ row, int vocab, const Rule& r, float max_t, float* scratch) {
  Cut cut{0u, vocab};  // everything
  float count, mass, count_above, mass_above;
  if (r.top_k > 0 && r.top_k < (unsigned)vocab) {
    // The largest key with at least top_k probabilities at or above it.
    unsigned lo = 0u, hi = KEY_END;
    while (hi - lo > 1) {
      const unsigned mid = lo + (hi - lo) / 2;
      count_mass_from(row, vocab, r, max_t, mid, count, mass, scratch);
      if (count >= (float)r.top_k) lo = mid; else hi = mid;
    }
    count_mass_from(row, vocab, r, max_t, lo + 1, count_above, mass_above, scratch);
    cut = Cut{lo, (int)r.top_k - (int)count_above};
  }
  if (r.top_p < 1.f) {
    count_mass_from(row, vocab, r, max_t, cut.key + 1, count_above, mass_above, scratch);
    const float target = r.top_p * (mass_above + (float)cut.ties * __uint_as_float(cut.key));
    if (!(target > 0.f)) return cut;
    // The largest key whose probabilities at or above it (within the cut) reach the target.
    unsigned lo = cut.key, hi = KEY_END;
    while (hi - lo > 1) {
      const unsigned mid = lo + (hi - lo) / 2;
      count_mass_from(row, vocab, r, max_t, mid, count, mass, scratch);
      if (mass >= target) lo = mid; else hi = mid;
    }
    int ties_at_most = cut.ties;
    if (lo > cut.key) {
      count_mass_from(row, vocab, r, max_t, lo, count, mass, scratch);
      count_mass_from(row, vocab, r, max_t, lo + 1, count_above, mass_above, scratch);
      ties_at_most = (int)(count - count_above);
    }
    const float p = __uint_as_float(lo);
    // The fewest ties that take the mass to the target, as the host's walk in sorted order.
    int ties = ties_at_most;
    if (p > 0.f) ties = imax(1, imin(ties_at_most, (int)ceilf((target - mass_above) / p)));
    cut = Cut{lo, ties};
  }
  return cut;
}

// The token backend::sampling::draw draws from `row`. Each thread owns a contiguous chunk of the
// vocabulary; block-wide scans of the chunks' tie counts and kept masses find the chunk the
// target falls in, and its thread walks it as the host would. Every thread gets the token.
__device__ int row_draw(const float* __restrict__ row, int vocab, const Rule& r) {
  __shared__ float s_scratch[32];
  __shared__ int s_token;
  __shared__ int s_last[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  float m = neg_inf();
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
  const float max_t = block_max(m, s_scratch) / r.temperature;
  const Cut cut = row_cut(row, vocab, r, max_t, s_scratch);
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int c0 = imin(vocab, (int)threadIdx.x * chunk), c1 = imin(vocab, c0 + chunk);
  // Ties at the cut before this chunk, so the chunk knows which of its own are kept.
  float ties_here = 0.f, ignored_incl, ignored_total;
  for (int j = c0; j < c1; j++) ties_here += __float_as_uint(rule_prob(row[j], r, max_t)) == cut.key ? 1.f : 0.f;
  const int ties_before = (int)block_exclusive_scan(ties_here, ignored_incl, ignored_total, s_scratch);
  float sum = 0.f;
  int last = -1;  // the chunk's last kept token with any probability
  int rank = ties_before;
  for (int j = c0; j < c1; j++) {
    const float p = rule_prob(row[j], r, max_t);
    const unsigned key = __float_as_uint(p);
    const bool kept = key > cut.key || (key == cut.key && rank++ < cut.ties);
    if (kept && p > 0.f) {
      sum += p;
      last = j;
    }
  }
  float incl, total;
  const float excl = block_exclusive_scan(sum, incl, total, s_scratch);
  int last_in_warp = last;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) last_in_warp = imax(last_in_warp, __shfl_xor_sync(FULL_MASK, last_in_warp, o));
  if (lane == 0) s_last[warp] = last_in_warp;
  if (threadIdx.x == 0) s_token = -1;
  __syncthreads();
  const float target = r.uniform * total;
  if (sum > 0.f && excl <= target && target < incl) {
    float t = target - excl;
    int token = last;  // rounding inside the chunk: its last kept token with any probability
    rank = ties_before;
    for (int j = c0; j < c1; j++) {
      const float p = rule_prob(row[j], r, max_t);
      const unsigned key = __float_as_uint(p);
      const bool kept = key > cut.key || (key == cut.key && rank++ < cut.ties);
      if (!kept || !(p > 0.f)) continue;
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
    // Rounding past the end: the last kept token with any probability, as the host falls back to.
    int overall = -1;
    for (int w = 0; w < num_warps; w++) overall = imax(overall, s_last[w]);
    token = overall < 0 ? 0 : overall;
  }
  __syncthreads();  // the shared values may be reused right after
  return token;
}

// tokens[r] = row r's token by its rule (rules: [rows, RULE_WORDS] words, load_rule), temperature
// 0 meaning greedy. grid (rows), block 256.
//   logits [rows, vocab] f32;  tokens [rows]
__device__ void sample(unsigned* __restrict__ tokens, const float* __restrict__ logits,
                       const unsigned* __restrict__ rules, int vocab) {
  const float* row = logits + (size_t)blockIdx.x * vocab;
  const Rule r = load_rule(rules + RULE_WORDS * blockIdx.x);
  // The rule is the block's own, so every thread takes the same branch.
  if (r.forced != NOT_FORCED) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = r.forced;
    return;
  }
  const int token = r.temperature == 0.f ? row_argmax(row, vocab) : row_draw(row, vocab, r);
  if (threadIdx.x == 0) tokens[blockIdx.x] = (unsigned)token;
}

// The logit processors, as backend::LogitEdit::apply: edits [n, 5] words (row, token, add,
// repetition, subtract; f32 bits), at most one per (row, token). One thread per edit.
//   logits [rows, vocab] f32, changed in place
__device__ void logit_edits(float* __restrict__ logits, const unsigned* __restrict__ edits, int n, int vocab) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const unsigned* w = edits + 5 * e;
  if (w[1] >= (unsigned)vocab) return;
  float* l = logits + (size_t)w[0] * vocab + w[1];
  const float repetition = __uint_as_float(w[3]);
  float x = *l + __uint_as_float(w[2]);
  if (repetition != 1.f) x = x > 0.f ? x / repetition : x * repetition;
  *l = x - __uint_as_float(w[4]);
}

// backend::sampling::apply_mask: in each of the n masked rows (their indices first, then one
// bitmask of `words` words per row), every logit whose bit is clear becomes -inf.
// grid-stride over n * vocab, block 256.
//   logits [rows, vocab] f32;  masks [n] row indices, then [n, words] bits
__device__ void token_mask(float* __restrict__ logits, const unsigned* __restrict__ masks, int n, int words,
                           int vocab) {
  const size_t total = (size_t)n * vocab;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const int m = (int)(i / vocab);
    const int j = (int)(i % vocab);
    const unsigned bits = masks[n + (size_t)m * words + j / 32];
    if (((bits >> (j % 32)) & 1u) == 0u) logits[(size_t)masks[m] * vocab + j] = neg_inf();
  }
}

// backend::sampling::row_logprobs of raw row r for the token tokens[token_rows[r]]: out row r is
// [its logprob, its rank (bits), then k pairs (token id as bits, logprob), most likely first, ties
// by lower index]. grid (rows), block 256.
//   raw [rows, vocab] f32;  out [rows, 2 + 2k]
__device__ void logprobs(float* __restrict__ out, const float* __restrict__ raw, const unsigned* __restrict__ tokens,
                         const unsigned* __restrict__ token_rows, int k, int vocab) {
  __shared__ float s_scratch[32];
  const float* row = raw + (size_t)blockIdx.x * vocab;
  float m = neg_inf();
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_max(m, s_scratch);
  float s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(row[j] - m);
  const float log_sum_exp = m + logf(block_sum(s, s_scratch));
  float* o = out + (size_t)blockIdx.x * (2 + 2 * k);
  const unsigned token = tokens[token_rows[blockIdx.x]];
  const float chosen = token < (unsigned)vocab ? row[token] : neg_inf();
  // The rank: how many logits are at least the chosen one's (a count below 2^24 is exact in f32).
  float at_least = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) at_least += row[j] >= chosen ? 1.f : 0.f;
  at_least = block_sum(at_least, s_scratch);
  if (threadIdx.x == 0) {
    o[0] = chosen - log_sum_exp;
    o[1] = __uint_as_float((unsigned)at_least);
  }
  // The t-th most likely is the best of those after the (t-1)-th in the order.
  float prev_v = __int_as_float(0x7f800000);
  int prev_i = -1;
  for (int t = 0; t < k; t++) {
    float v = neg_inf();
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float x = isnan(row[j]) ? neg_inf() : row[j];
      const bool after = x < prev_v || (x == prev_v && j > prev_i);
      if (after && (x > v || (x == v && j < idx))) {
        v = x;
        idx = j;
      }
    }
    block_best(v, idx);
    if (threadIdx.x == 0) {
      o[2 + 2 * t] = __uint_as_float((unsigned)idx);
      o[3 + 2 * t] = v - log_sum_exp;
    }
    prev_v = v;
    prev_i = idx;
  }
}

}  // namespace pagoda

extern "C" __global__ void __launch_bounds__(256) pagoda_argmax_f32(unsigned* tokens, const float* logits, int vocab) {
  pagoda::argmax(tokens, logits, vocab);
}
PAGODA_REGISTER(pagoda_argmax_f32)

extern "C" __global__ void __launch_bounds__(256, 1)
    pagoda_sample_f32(unsigned* tokens, const float* logits, const unsigned* rules, int vocab) {
  pagoda::sample(tokens, logits, rules, vocab);
}
PAGODA_REGISTER(pagoda_sample_f32)

extern "C" __global__ void __launch_bounds__(256)
    pagoda_logit_edits_f32(float* logits, const unsigned* edits, int n, int vocab) {
  pagoda::logit_edits(logits, edits, n, vocab);
}
PAGODA_REGISTER(pagoda_logit_edits_f32)

extern "C" __global__ void __launch_bounds__(256)
    pagoda_token_mask_f32(float* logits, const unsigned* masks, int n, int words, int vocab) {
  pagoda::token_mask(logits, masks, n, words, vocab);
}
PAGODA_REGISTER(pagoda_token_mask_f32)

extern "C" __global__ void __launch_bounds__(256) pagoda_logprobs_f32(float* out, const float* raw,
                                                                       const unsigned* tokens,
                                                                       const unsigned* token_rows, int k, int vocab) {
  pagoda::logprobs(out, raw, tokens, token_rows, k, vocab);
}
PAGODA_REGISTER(pagoda_logprobs_f32)
