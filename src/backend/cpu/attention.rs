//! Paged attention on the CPU: one query head against the keys and values it sees.
//!
//! **Arithmetic.** [`attend_one`] defines every result: each score is `dot`'s eight lanes (lane `l`
//! a fused multiply-add chain over inputs `8c + l`), their fixed tree, then the scale; the softmax
//! takes the maximum, [`exp_nonpositive`] of each score minus it, and their sum in eight lanes; each
//! output is a fused multiply-add chain over the keys in order. Faster kernels compute several
//! heads at once or use explicit vector instructions, and reproduce exactly those operations in
//! that order, so a head's bits depend neither on the heads beside it nor on the instruction set
//! (tested bit for bit). On x86-64 without FMA the fused operations go through libm: correct, slow.
//!
//! **Work.** The backend hands a task a [`Tile`]: up to four consecutive tokens of one sequence
//! and their heads that share a KV head; tasks go sequence by sequence and KV head by KV head
//! within each, so that a thread keeps reading one head's keys and values from its caches through
//! a sequence's tiles, and a decoding sequence's heads in memory order. The AVX2 kernels pass over
//! the keys in blocks that stay in the first-level cache, take two tokens at a time through the
//! weighted sums of values, and fetch the cache's scattered rows a few keys ahead.

use super::Isa;

/// A task's reusable buffers: the scores of the heads it is computing, and the cache offsets of
/// their keys.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    rows: Vec<usize>,
}

/// The keys and values one token sees through one KV head.
pub(super) struct Keys<'a> {
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
    pub block_table: &'a [u32],
    pub block_size: usize,
    /// Values per cached token (all KV heads), and where this KV head's start.
    pub kv_width: usize,
    pub kv_offset: usize,
    /// Key positions `first..=pos` are visible.
    pub first: usize,
    pub pos: usize,
}

impl Keys<'_> {
    /// The offset of each visible key's row in the cache, in key order: one block-table lookup
    /// (and one division) per block, not per key.
    fn rows(&self, rows: &mut Vec<usize>) {
        rows.clear();
        let bs = self.block_size;
        let mut j = self.first;
        while j <= self.pos {
            let b = j / bs;
            let base = self.block_table[b] as usize * bs;
            let end = ((b + 1) * bs).min(self.pos + 1);
            rows.extend((j..end).map(|jj| (base + jj - b * bs) * self.kv_width + self.kv_offset));
            j = end;
        }
    }
}

/// Consecutive tokens of one sequence, and the query heads of theirs that share one KV head.
pub(super) struct Tile<'a> {
    /// The keys the tile's tokens see together: `first` is the first token's first visible key,
    /// `pos` the last token's position.
    pub keys: Keys<'a>,
    pub tokens: usize,
    /// The sliding window, if any: token `i` sees keys from `pos_i + 1 - window`.
    pub window: Option<usize>,
    /// Token `i`'s heads, `head_dim` values each, at `qs[i * q_stride..]`.
    pub qs: &'a [f32],
    pub q_stride: usize,
}

impl Tile<'_> {
    /// Token `i`'s keys, as a range of the tile's rows.
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let pos = self.keys.pos + 1 + i - self.tokens;
        let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        first - self.keys.first..pos + 1 - self.keys.first
    }
}

/// Attention for a tile: `outs` (zeros on entry) receives token after token, `heads` heads of
/// `head_dim` values each. Each head's result is [`attend_one`]'s, bit for bit.
pub(super) fn attend_tile(
    isa: Isa,
    tile: &Tile,
    heads: usize,
    head_dim: usize,
    scale: f32,
    scratch: &mut Scratch,
    outs: &mut [f32],
) {
    let Scratch { scores, rows } = scratch;
    tile.keys.rows(rows);
    let width = heads * head_dim;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && head_dim.is_multiple_of(8) {
        // Up to three heads per pass over the keys and values (the most whose sums fit in
        // registers), in groups as even as possible: 4 heads as 2 + 2, 8 as 3 + 3 + 2.
        let passes = heads.div_ceil(3);
        let mut first = 0;
        for pass in 0..passes {
            let h = (heads - first) / (passes - pass);
            let queries: Vec<x86::Query> = (0..tile.tokens)
                .map(|i| x86::Query {
                    q: tile.qs[i * tile.q_stride + first * head_dim..][..h * head_dim].as_ptr(),
                    out: outs[i * width + first * head_dim..][..h * head_dim].as_mut_ptr(),
                    keys: tile.range(i),
                })
                .collect();
            let (k, v) = (tile.keys.k_cache, tile.keys.v_cache);
            // SAFETY: `Isa::detected` found AVX2 and FMA on this CPU; every row lies in the
            // caches with `head_dim` values after it (`Keys::rows`); each query points to `h`
            // whole heads of `qs` and of `outs`, and its keys lie within `rows`.
            unsafe {
                match h {
                    3 => x86::attend::<3, 3, 2, 2>(k, v, rows, &queries, head_dim, scale, scores),
                    2 => x86::attend::<2, 4, 4, 2>(k, v, rows, &queries, head_dim, scale, scores),
                    _ => x86::attend::<1, 4, 4, 4>(k, v, rows, &queries, head_dim, scale, scores),
                }
            }
            first += h;
        }
        return;
    }
    for i in 0..tile.tokens {
        let keys = &rows[tile.range(i)];
        let qs = &tile.qs[i * tile.q_stride..][..width];
        for (q, o) in qs.chunks_exact(head_dim).zip(outs[i * width..(i + 1) * width].chunks_exact_mut(head_dim)) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::detected` found AVX2 and FMA on this CPU.
                Isa::Avx2 | Isa::Avx512 => unsafe { attend_one_avx2(&tile.keys, keys, q, scale, scores, o) },
                _ => attend_one(&tile.keys, keys, q, scale, scores, o),
            }
        }
    }
}

/// [`attend_one`] with hardware fused multiply-adds (libm's otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_one_avx2(keys: &Keys, rows: &[usize], q: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one(keys, rows, q, scale, scores, out)
}

/// One head of any size against the keys at `rows`, one key at a time: the definition (module
/// documentation).
#[inline(always)]
fn attend_one(keys: &Keys, rows: &[usize], q: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = q.len();
    scores.clear();
    for &row in rows {
        scores.push(score(q, &keys.k_cache[row..row + d]) * scale);
    }
    softmax_weights(scores);
    for (&p, &row) in scores.iter().zip(rows) {
        for (o, &v) in out.iter_mut().zip(&keys.v_cache[row..row + d]) {
            *o = p.mul_add(v, *o);
        }
    }
}

/// `q · k`: eight lanes of fused multiply-adds, their tree, then the tail one by one.
#[inline(always)]
fn score(q: &[f32], k: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks_q = q.chunks_exact(8);
    let mut chunks_k = k.chunks_exact(8);
    for (cq, ck) in (&mut chunks_q).zip(&mut chunks_k) {
        for l in 0..8 {
            lanes[l] = cq[l].mul_add(ck[l], lanes[l]);
        }
    }
    let tree = super::lane_sum(&lanes);
    if chunks_q.remainder().is_empty() {
        return tree;
    }
    let mut tail = 0f32;
    for (x, y) in chunks_q.remainder().iter().zip(chunks_k.remainder()) {
        tail = x.mul_add(*y, tail);
    }
    tree + tail
}

/// Scores into softmax weights in place: `e^(s - max) / Σ`, the maximum and the sum over eight
/// lanes (score `j` in lane `j % 8`), so that it vectorises.
#[inline(always)]
fn softmax_weights(scores: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = scores.chunks_exact(8);
    for chunk in &mut chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(chunk[l]);
        }
    }
    let max = chunks.remainder().iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)), |m, &x| m.max(x));
    let mut sums = [0f32; 8];
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for l in 0..8 {
            chunk[l] = exp_nonpositive(chunk[l] - max);
            sums[l] += chunk[l];
        }
    }
    let mut tail = 0f32;
    for s in chunks.into_remainder() {
        *s = exp_nonpositive(*s - max);
        tail += *s;
    }
    let inv = 1.0 / (super::lane_sum(&sums) + tail);
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Adding 1.5 × 2^23 rounds to an integer, which the low bits then hold.
const SHIFTER: f32 = 12_582_912.0;
/// ln 2 in two parts; `n × LN2_HI` is exact for the |n| ≤ 126 used here.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// The Taylor coefficients of `e^r` after `1 / 7!`, highest first (Horner's order).
const TAYLOR: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x` for `x ≤ 0` within 2 ulp, from multiplies, adds and integer operations only, so that it
/// vectorises and gives the same bits on every instruction set (a library `expf` does neither).
/// Results that would be subnormal (`x < -87`) are 0; NaN stays NaN.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    // x = n ln 2 + r with |r| ≤ ln 2 / 2, and e^r by its Taylor series to r^7 (error < 1e-8).
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in TAYLOR {
        p = p * r + c;
    }
    // 2^n from n's bits (n in [-126, 0] wherever the result is kept).
    let two_n = f32::from_bits(shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23);
    let y = p * two_n;
    if x < -87.0 { 0.0 } else { y }
}

/// AVX2+FMA kernels: `H` heads at once, sharing each pass over the keys and values. (No closures hold
/// intrinsics here: a closure does not inherit its function's target features.)
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LN2_HI, LN2_LO, SHIFTER, TAYLOR, exp_nonpositive};

    /// Keys per block: a block's keys, then its values (16 KiB each at 64 values per head), stay
    /// in the first-level cache while every token of the tile passes over them.
    const BLOCK: usize = 64;
    /// How many keys ahead a key's or value's row is fetched into the cache.
    const AHEAD: usize = 8;

    /// Asks for the `d` values at `p` (a hint: never faults, changes no result).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn prefetch_row(p: *const f32, d: usize) {
        for c in (0..d).step_by(16) {
            // SAFETY: a prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c) as *const i8);
        }
    }

    /// One token's `H` heads: their queries, their outputs, and their keys (a range of the rows).
    pub struct Query {
        pub q: *const f32,
        pub out: *mut f32,
        pub keys: std::ops::Range<usize>,
    }

    /// `attend_one` for `H` (1 to 3) heads of `d` (a multiple of 8) values of each query, over the
    /// keys and values at `rows`: block of keys by block of keys, every query's part of a block
    /// while it is in the cache. Scores go `K` keys at a time and weighted sums `8T` outputs at a
    /// time, or `8P` outputs of two queries over the keys they share, sized so that the sums stay
    /// in the 16 vector registers (`H × K`, `H × T` and `2 × H × P`).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every row starts `d` readable values in `k` and `v`; each query's
    /// `q` and `out` hold `H × d` values and its keys lie within `rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend<const H: usize, const K: usize, const T: usize, const P: usize>(
        k: &[f32],
        v: &[f32],
        rows: &[usize],
        queries: &[Query],
        d: usize,
        scale: f32,
        scores: &mut Vec<f32>,
    ) {
        // Each query's scores: `H` runs of its key count, one after the other.
        let mut offsets = Vec::with_capacity(queries.len());
        let mut total = 0;
        for query in queries {
            offsets.push(total);
            total += H * query.keys.len();
        }
        scores.clear();
        scores.resize(total, 0.0);
        let (k, v, s) = (k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
        // SAFETY (the whole body): the caller's bounds; `scores` holds every query's runs.
        unsafe {
            let scale = _mm_set1_ps(scale);
            for b0 in (0..rows.len()).step_by(BLOCK) {
                let b1 = (b0 + BLOCK).min(rows.len());
                for (query, &offset) in queries.iter().zip(&offsets) {
                    let (lo, hi) = (query.keys.start.max(b0), query.keys.end.min(b1));
                    let n = query.keys.len();
                    // `K` keys at a time; past `hi`, the last row again, whose lanes are dropped.
                    let mut j = lo;
                    while j < hi {
                        let mut kr = [k; K];
                        for (i, kr) in kr.iter_mut().enumerate() {
                            *kr = k.add(rows[(j + i).min(hi - 1)]);
                            // The cache's rows are scattered over its blocks: fetch ahead.
                            if let Some(&ahead) = rows.get(j + i + AHEAD) {
                                prefetch_row(k.add(ahead), d);
                            }
                        }
                        let mut acc = [[_mm256_setzero_ps(); K]; H];
                        let mut c = 0;
                        while c < d {
                            let mut kv = [_mm256_setzero_ps(); K];
                            for i in 0..K {
                                kv[i] = _mm256_loadu_ps(kr[i].add(c));
                            }
                            for (h, acc) in acc.iter_mut().enumerate() {
                                let qv = _mm256_loadu_ps(query.q.add(h * d + c));
                                for i in 0..K {
                                    acc[i] = _mm256_fmadd_ps(qv, kv[i], acc[i]);
                                }
                            }
                            c += 8;
                        }
                        for (h, acc) in acc.iter().enumerate() {
                            let mut four = [_mm256_setzero_ps(); 4];
                            four[..K].copy_from_slice(acc);
                            let mut lanes = [0f32; 4];
                            _mm_storeu_ps(lanes.as_mut_ptr(), _mm_mul_ps(lane_trees(&four), scale));
                            let dst = s.add(offset + h * n + j - query.keys.start);
                            std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, K.min(hi - j));
                        }
                        j += K;
                    }
                }
            }
            for (query, &offset) in queries.iter().zip(&offsets) {
                let n = query.keys.len();
                for h in 0..H {
                    softmax_weights(&mut scores[offset + h * n..offset + (h + 1) * n]);
                }
            }
            // The weighted sums of values, block by block, each output a chain over the keys in
            // order (stored and reloaded between calls). Two queries at a time go together over
            // the keys they share, each alone over the keys before and after those.
            let s = scores.as_ptr();
            let part = |i: usize, b0: usize, b1: usize| {
                let (query, offset) = (&queries[i], offsets[i]);
                let (lo, hi) = (query.keys.start.max(b0), query.keys.end.min(b1));
                // `offset` is within `scores`.
                let weights = s.add(offset);
                Part { lo, hi, first: query.keys.start, n: query.keys.len(), weights, out: query.out }
            };
            for b0 in (0..rows.len()).step_by(BLOCK) {
                let b1 = (b0 + BLOCK).min(rows.len());
                let mut i = 0;
                while i < queries.len() {
                    let a = part(i, b0, b1);
                    if i + 1 == queries.len() {
                        alone::<H, T>(v, rows, d, &a, a.lo, a.hi);
                        break;
                    }
                    let b = part(i + 1, b0, b1);
                    let (lo, hi) = (a.lo.max(b.lo), a.hi.min(b.hi));
                    if lo < hi {
                        alone::<H, T>(v, rows, d, &a, a.lo, lo);
                        alone::<H, T>(v, rows, d, &b, b.lo, lo);
                        let mut d0 = 0;
                        while d0 + 8 * P <= d {
                            weighted_sum_pair::<H, P>(v, &rows[lo..hi], [&a, &b], lo, d, d0);
                            d0 += 8 * P;
                        }
                        while d0 < d {
                            for q in [&a, &b] {
                                weighted_sum::<H, 1>(v, &rows[lo..hi], q.weight(lo), q.n, d, d0, q.out);
                            }
                            d0 += 8;
                        }
                        alone::<H, T>(v, rows, d, &a, hi, a.hi);
                        alone::<H, T>(v, rows, d, &b, hi, b.hi);
                    } else {
                        alone::<H, T>(v, rows, d, &a, a.lo, a.hi);
                        alone::<H, T>(v, rows, d, &b, b.lo, b.hi);
                    }
                    i += 2;
                }
            }
        }
    }

    /// One query's part of a block: its keys `[lo, hi)` there, its first key and key count `n`,
    /// its weights (`H` runs of `n`), and its outputs.
    struct Part {
        lo: usize,
        hi: usize,
        first: usize,
        n: usize,
        weights: *const f32,
        out: *mut f32,
    }

    impl Part {
        /// Key `j`'s weight for the first head.
        ///
        /// # Safety
        /// `j` is one of the query's keys.
        unsafe fn weight(&self, j: usize) -> *const f32 {
            // SAFETY: the caller's.
            unsafe { self.weights.add(j - self.first) }
        }
    }

    /// One query's weighted sums over its keys `[lo, hi)` (none if empty): `8T` outputs of every
    /// head at a time, then 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn alone<const H: usize, const T: usize>(
        v: *const f32,
        rows: &[usize],
        d: usize,
        q: &Part,
        lo: usize,
        hi: usize,
    ) {
        if lo >= hi {
            return;
        }
        // SAFETY: the caller's bounds; `lo` is one of the query's keys.
        unsafe {
            let (rows, weights) = (&rows[lo..hi], q.weight(lo));
            let mut d0 = 0;
            while d0 + 8 * T <= d {
                weighted_sum::<H, T>(v, rows, weights, q.n, d, d0, q.out);
                d0 += 8 * T;
            }
            while d0 < d {
                weighted_sum::<H, 1>(v, rows, weights, q.n, d, d0, q.out);
                d0 += 8;
            }
        }
    }

    /// [`weighted_sum`] for two queries over the same keys (from key `lo`): each value vector is
    /// loaded once for both, and the `2 × H × P` chains keep both FMA units busy.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum_pair<const H: usize, const P: usize>(
        v: *const f32,
        rows: &[usize],
        queries: [&Part; 2],
        lo: usize,
        d: usize,
        d0: usize,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); P]; H]; 2];
            for (q, acc) in queries.iter().zip(acc.iter_mut()) {
                for (h, acc) in acc.iter_mut().enumerate() {
                    for (t, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_loadu_ps(q.out.add(h * d + d0 + 8 * t));
                    }
                }
            }
            let weights = [queries[0].weight(lo), queries[1].weight(lo)];
            let n = [queries[0].n, queries[1].n];
            for (j, &row) in rows.iter().enumerate() {
                if let (0, Some(&ahead)) = (d0, rows.get(j + AHEAD)) {
                    prefetch_row(v.add(ahead), d);
                }
                let mut vr = [_mm256_setzero_ps(); P];
                for (t, vr) in vr.iter_mut().enumerate() {
                    *vr = _mm256_loadu_ps(v.add(row + d0 + 8 * t));
                }
                for ((acc, weights), n) in acc.iter_mut().zip(weights).zip(n) {
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let p = _mm256_broadcast_ss(&*weights.add(h * n + j));
                        for t in 0..P {
                            acc[t] = _mm256_fmadd_ps(p, vr[t], acc[t]);
                        }
                    }
                }
            }
            for (q, acc) in queries.iter().zip(acc.iter()) {
                for (h, acc) in acc.iter().enumerate() {
                    for (t, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(q.out.add(h * d + d0 + 8 * t), *acc);
                    }
                }
            }
        }
    }

    /// Outputs `[d0, d0 + 8T)` of `H` heads: a fused multiply-add chain over the keys in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum<const H: usize, const T: usize>(
        v: *const f32,
        rows: &[usize],
        weights: *const f32,
        n: usize,
        d: usize,
        d0: usize,
        outs: *mut f32,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; H];
            for (h, acc) in acc.iter_mut().enumerate() {
                for (t, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_loadu_ps(outs.add(h * d + d0 + 8 * t));
                }
            }
            for (j, &row) in rows.iter().enumerate() {
                if let (0, Some(&ahead)) = (d0, rows.get(j + AHEAD)) {
                    prefetch_row(v.add(ahead), d);
                }
                let mut vr = [_mm256_setzero_ps(); T];
                for (t, vr) in vr.iter_mut().enumerate() {
                    *vr = _mm256_loadu_ps(v.add(row + d0 + 8 * t));
                }
                for (h, acc) in acc.iter_mut().enumerate() {
                    let p = _mm256_broadcast_ss(&*weights.add(h * n + j));
                    for t in 0..T {
                        acc[t] = _mm256_fmadd_ps(p, vr[t], acc[t]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (t, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(outs.add(h * d + d0 + 8 * t), *acc);
                }
            }
        }
    }

    /// [`super::softmax_weights`] in vector instructions, operation for operation: the eight
    /// lanes are the vector's (the compiler vectorised the plain version two lanes at a time).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_weights(scores: &mut [f32]) {
        let chunks = scores.len() / 8;
        let tail = chunks * 8;
        let p = scores.as_mut_ptr();
        // SAFETY: every access is within the first `chunks * 8` values of `scores`.
        unsafe {
            // `_mm256_max_ps(s, m)` keeps `m` where `s` is NaN, as `m.max(s)` does.
            let mut lanes = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in 0..chunks {
                lanes = _mm256_max_ps(_mm256_loadu_ps(p.add(8 * c)), lanes);
            }
            let mut each = [0f32; 8];
            _mm256_storeu_ps(each.as_mut_ptr(), lanes);
            let max =
                scores[tail..].iter().fold(each.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)), |m, &x| m.max(x));
            let mut sums = _mm256_setzero_ps();
            for c in 0..chunks {
                let e = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(8 * c)), _mm256_set1_ps(max)));
                _mm256_storeu_ps(p.add(8 * c), e);
                sums = _mm256_add_ps(sums, e);
            }
            let mut rest = 0f32;
            for s in &mut scores[tail..] {
                *s = exp_nonpositive(*s - max);
                rest += *s;
            }
            _mm256_storeu_ps(each.as_mut_ptr(), sums);
            let inv = 1.0 / (crate::backend::cpu::lane_sum(&each) + rest);
            let p = scores.as_mut_ptr();
            for c in 0..chunks {
                _mm256_storeu_ps(p.add(8 * c), _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * c)), _mm256_set1_ps(inv)));
            }
            for s in &mut scores[tail..] {
                *s *= inv;
            }
        }
    }

    /// [`exp_nonpositive`] of eight values, operation for operation (separate multiplies and adds:
    /// no fused ones).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_nonpositive_avx2(x: __m256) -> __m256 {
        let shifter = _mm256_set1_ps(SHIFTER);
        let shifted = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), shifter);
        let n = _mm256_sub_ps(shifted, shifter);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in TAYLOR {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let bits = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(SHIFTER.to_bits() as i32));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(bits, _mm256_set1_epi32(127))));
        let y = _mm256_mul_ps(p, two_n);
        // `x < -87 ? 0 : y`, NaN staying NaN: keep `y` where `x` is not less than -87.
        _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(-87.0)), y)
    }

    /// `lane_sum` of four vectors at once: `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lane_trees(a: &[__m256; 4]) -> __m128 {
        let [x0, x1, x2, x3] = [half_sum(a[0]), half_sum(a[1]), half_sum(a[2]), half_sum(a[3])];
        _mm_hadd_ps(_mm_hadd_ps(x0, x1), _mm_hadd_ps(x2, x3))
    }

    /// `[l0 + l4, l1 + l5, l2 + l6, l3 + l7]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn half_sum(x: __m256) -> __m128 {
        _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Isa;

    /// The kernels, for tiles of 1 to 5 tokens and 1 to 7 heads sharing a KV head (in passes of
    /// up to three), give `attend_one`'s bits for each head, for key counts around their groups of
    /// four and their blocks, with and without a sliding window, for head sizes with and without a
    /// tail of eight, on every instruction set this CPU has.
    #[test]
    fn every_kernel_equals_the_one_key_at_a_time_definition_bit_for_bit() {
        let value = |i: usize| ((i * 2654435761usize) % 1000) as f32 / 250.0 - 2.0;
        for d in [64usize, 32, 128, 48, 8, 20] {
            let (block_size, kv_width, kv_offset) = (16, 2 * d, d);
            let k_cache: Vec<f32> = (0..160 * kv_width).map(value).collect();
            let v_cache: Vec<f32> = (0..160 * kv_width).map(|i| value(i + 7)).collect();
            let block_table: Vec<u32> = (0..10).map(|b| (b * 7 % 10) as u32).collect();
            let cases: &[(usize, usize)] =
                if d == 64 { &[(1, 1), (3, 2), (4, 3), (5, 4), (2, 7)] } else { &[(1, 1), (4, 3), (2, 2)] };
            for &(tokens, heads) in cases {
                let q_stride = heads * d + 5;
                let qs: Vec<f32> = (0..tokens * q_stride).map(|i| value(i * 3 + 1)).collect();
                let last_positions: &[usize] = if d == 64 { &[4, 7, 63, 64, 65, 130, 150] } else { &[9, 70] };
                for &pos in last_positions.iter().filter(|&&p| p + 1 >= tokens) {
                    for window in [None, Some(5), Some(70)] {
                        let first_pos = pos + 1 - tokens;
                        let first = window.map_or(0, |w| (first_pos + 1).saturating_sub(w));
                        let keys = Keys {
                            k_cache: &k_cache,
                            v_cache: &v_cache,
                            block_table: &block_table,
                            block_size,
                            kv_width,
                            kv_offset,
                            first,
                            pos,
                        };
                        let tile = Tile { keys, tokens, window, qs: &qs, q_stride };
                        let mut expected = vec![0f32; tokens * heads * d];
                        for i in 0..tokens {
                            let token_pos = first_pos + i;
                            let token_keys = Keys {
                                first: window.map_or(0, |w| (token_pos + 1).saturating_sub(w)),
                                pos: token_pos,
                                ..tile.keys
                            };
                            let mut rows = Vec::new();
                            token_keys.rows(&mut rows);
                            for h in 0..heads {
                                let q = &qs[i * q_stride + h * d..][..d];
                                let o = &mut expected[(i * heads + h) * d..][..d];
                                attend_one(&token_keys, &rows, q, 0.125, &mut Vec::new(), o);
                            }
                        }
                        for isa in Isa::available() {
                            let mut got = vec![0f32; tokens * heads * d];
                            attend_tile(isa, &tile, heads, d, 0.125, &mut Scratch::default(), &mut got);
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&expected),
                                "d {d}, {tokens} tokens, {heads} heads, last position {pos}, window {window:?}, {isa:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The softmax's exponential against f64's over its whole domain: within 2 ulp where the
    /// result is normal, 0 below, 1 at 0, NaN for NaN.
    #[test]
    fn the_softmax_exponential_is_accurate_everywhere_it_is_used() {
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > -90.0 {
            let got = exp_nonpositive(x);
            if x >= -87.0 {
                let exact = (x as f64).exp();
                let ulp = f32::from_bits((exact as f32).to_bits() + 1) as f64 - (exact as f32) as f64;
                worst = worst.max((got as f64 - exact).abs() / ulp);
            } else {
                assert_eq!(got, 0.0, "e^{x}");
            }
            x = f32::from_bits(x.to_bits() + 997).min(x - 1e-6);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// The AVX2 softmax gives the plain one's bits, for every length around its groups of eight.
    #[test]
    fn the_vector_softmax_gives_the_plain_one_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::available().contains(&Isa::Avx2) {
                println!("not run: this CPU has no AVX2+FMA");
                return;
            }
            // Scores far apart (weights that underflow to 0), close together, and a NaN.
            for n in 0..=41usize {
                for spread in [0.01f32, 3.0, 60.0, 300.0] {
                    let mut plain: Vec<f32> =
                        (0..n).map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.7) * spread).collect();
                    if n == 13 {
                        plain[5] = f32::NAN;
                    }
                    let mut vector = plain.clone();
                    softmax_weights(&mut plain);
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { x86::softmax_weights(&mut vector) };
                    let same = plain.iter().zip(&vector).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "n {n}, spread {spread}: {plain:?} vs {vector:?}");
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        println!("not run: no vector softmax on this architecture");
    }

    /// Softmax weights sum to 1 and keep their order, the largest score getting the largest.
    #[test]
    fn softmax_weights_are_a_distribution() {
        for n in [1usize, 7, 8, 9, 100] {
            let mut s: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            let argmax = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            softmax_weights(&mut s);
            assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5, "n {n}");
            assert_eq!(s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0, argmax);
        }
    }
}
