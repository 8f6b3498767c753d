//! `y[m, n] = x[m, k] · w[n, k]ᵀ` for the CPU backend, over weights repacked once at load.
//!
//! **Layout.** A weight matrix is cut into panels of [`PANEL`] output features. Inside a panel the
//! values of its 16 features for input `c` are contiguous, input after input (`k`-major), in the
//! weight's own dtype (f32, bf16 or f16; bf16 in the order [`Elem::slot`] gives); the last panel is
//! padded with zeros. A product streams
//! each panel once per block of activation rows and widens its values in registers, so a decode
//! step reads every weight byte once whatever the batch size, and nothing is packed or widened
//! into memory per step.
//!
//! **Arithmetic.** Every output element is computed as
//! `acc = 0; for c in 0..k { acc = fma(x[c], w[c], acc) }`: one fused multiply-add per input, in
//! input order, into one f32. Every kernel (any number of rows or panels at once, any instruction
//! set) performs exactly that sequence, and blocking the inner dimension stores and reloads the
//! exact accumulator. A row's result therefore does not depend on the batch it is in, on the
//! blocking, on the thread count or on the CPU's vector width: bitwise. [`reference`] is that loop
//! written out plainly; the tests compare every kernel with it bit for bit.
//!
//! **Kernels.** One generic kernel, [`kernel`], written so the compiler keeps its accumulators in
//! registers and vectorises the 16 lanes; it is compiled once per instruction set (AVX-512F,
//! AVX2+FMA, and the build's baseline, which is NEON on arm64) and the best one the CPU has is
//! chosen at run time ([`Isa::detected`]). On AVX2+FMA, the blocked product of f32, bf16 or f16
//! panels (prefill, batches) runs explicit intrinsic kernels instead ([`x86`]), with the same
//! operations.
//! AVX-512 BF16's `vdpbf16ps` is deliberately not used:
//! it adds pairs of products before rounding, which would make results depend on the CPU.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::weights::DType;

/// Output features per panel.
pub const PANEL: usize = 16;
/// Inputs per block of the inner dimension: a panel's block (8 KiB in bf16) stays in L1 while a
/// block of rows passes over it.
const KC: usize = 256;
/// Activation rows per block: `MB × KC` f32 (64 KiB) stay in L2 while the panels pass.
const MB: usize = 64;

/// A stored weight value, widened to f32 in registers.
pub trait Elem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// Where feature `t`'s value sits among the 16 stored values of one input in a panel.
    #[inline(always)]
    fn slot(t: usize) -> usize {
        t
    }

    /// The 16 stored values at `src`, widened, in feature order.
    ///
    /// # Safety
    /// `src` points to 16 readable values (any alignment of `Self`).
    #[inline(always)]
    unsafe fn widen_row(src: *const Self) -> [f32; PANEL] {
        let mut out = [0f32; PANEL];
        for (t, o) in out.iter_mut().enumerate() {
            // SAFETY: the caller's.
            *o = unsafe { *src.add(Self::slot(t)) }.widen();
        }
        out
    }

    /// Whether [`Elem::widen_avx2`] is implemented, so [`x86::kernel`] can run this dtype.
    const AVX2: bool = false;

    /// [`Elem::widen_row`] into two vectors (features 0–7, then 8–15).
    ///
    /// # Safety
    /// As `widen_row`'s, on a CPU with AVX2; only called where `AVX2` is true.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn widen_avx2(_src: *const Self) -> [std::arch::x86_64::__m256; 2] {
        unreachable!("no AVX2 widening for this dtype")
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    const AVX2: bool = true;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn widen_avx2(src: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: 16 readable values.
        unsafe { [_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8))] }
    }
}

/// bfloat16 bits: the high half of an f32.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// In a panel, bf16 values are interleaved so that each 32-bit word holds features `t` (low half)
/// and `t + 8` (high half): one load, a shift and a mask widen 16 values.
impl Elem for Bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    #[inline(always)]
    fn slot(t: usize) -> usize {
        if t < 8 { 2 * t } else { 2 * (t - 8) + 1 }
    }

    #[inline(always)]
    unsafe fn widen_row(src: *const Bf16) -> [f32; PANEL] {
        // SAFETY: the caller's; 16 bf16 values are 8 words.
        let words = unsafe { (src as *const [u32; 8]).read_unaligned() };
        let mut out = [0f32; PANEL];
        for t in 0..8 {
            let word = u32::from_le(words[t]);
            out[t] = f32::from_bits(word << 16);
            out[t + 8] = f32::from_bits(word & 0xffff_0000);
        }
        out
    }

    const AVX2: bool = true;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn widen_avx2(src: *const Bf16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: 16 values are 32 readable bytes.
        let words = unsafe { _mm256_loadu_si256(src as *const __m256i) };
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        [_mm256_castsi256_ps(_mm256_slli_epi32::<16>(words)), _mm256_castsi256_ps(_mm256_and_si256(words, high))]
    }
}

/// IEEE half-precision bits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Elem for F16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.0)
    }

    const AVX2: bool = true;

    /// F16C's conversion, exact as [`f16_to_f32`] is (a NaN stays a NaN).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn widen_avx2(src: *const F16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: 16 values are 32 readable bytes.
        unsafe {
            let low = _mm_loadu_si128(src as *const __m128i);
            let high = _mm_loadu_si128(src.add(8) as *const __m128i);
            [_mm256_cvtph_ps(low), _mm256_cvtph_ps(high)]
        }
    }
}

/// Exact f16 → f32 without branches (so it vectorises): the exponent and mantissa are moved into
/// place and rescaled by 2^112, which is exact for normal and subnormal values alike; infinities
/// and NaNs keep an all-ones exponent.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let magnitude = h & 0x7fff;
    let finite = f32::from_bits(magnitude << 13) * f32::from_bits((127 + 112) << 23);
    let special = f32::from_bits((magnitude << 13) | 0x7f80_0000);
    let value = if magnitude >= 0x7c00 { special } else { finite };
    f32::from_bits(value.to_bits() | ((h & 0x8000) << 16))
}

enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<Bf16>),
    F16(Vec<F16>),
}

/// A matrix `[n, k]` in panels (see the module documentation).
pub struct PackedMatrix {
    n: usize,
    k: usize,
    panels: Panels,
}

impl PackedMatrix {
    /// Repacks a row-major matrix stored as `dtype` (little-endian bytes, any alignment).
    pub fn from_stored(dtype: DType, bytes: &[u8], n: usize, k: usize) -> PackedMatrix {
        assert_eq!(bytes.len(), n * k * dtype.size_in_bytes(), "the bytes do not hold [{n}, {k}]");
        let bits16 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
        let panels = match dtype {
            DType::F32 => Panels::F32(pack(n, k, |i| {
                f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
            })),
            DType::BF16 => Panels::Bf16(pack(n, k, |i| Bf16(bits16(&bytes[2 * i..])))),
            DType::F16 => Panels::F16(pack(n, k, |i| F16(bits16(&bytes[2 * i..])))),
        };
        PackedMatrix { n, k, panels }
    }

    /// Repacks a row-major f32 matrix.
    pub fn from_f32(values: &[f32], n: usize, k: usize) -> PackedMatrix {
        assert_eq!(values.len(), n * k, "the values do not fill [{n}, {k}]");
        PackedMatrix { n, k, panels: Panels::F32(pack(n, k, |i| values[i])) }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    fn num_panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Row `j` widened to f32 (for an embedding lookup from a tied table).
    pub fn row_to_f32(&self, j: usize, out: &mut [f32]) {
        fn gather<E: Elem>(data: &[E], j: usize, k: usize, out: &mut [f32]) {
            let panel = &data[(j / PANEL) * k * PANEL..][..k * PANEL];
            for (c, o) in out.iter_mut().enumerate() {
                *o = panel[c * PANEL + E::slot(j % PANEL)].widen();
            }
        }
        match &self.panels {
            Panels::F32(d) => gather(d, j, self.k, out),
            Panels::Bf16(d) => gather(d, j, self.k, out),
            Panels::F16(d) => gather(d, j, self.k, out),
        }
    }
}

/// Packs `[n, k]` row-major values (`value(row * k + col)`) into zero-padded panels, in parallel.
fn pack<E: Elem + Default>(n: usize, k: usize, value: impl Fn(usize) -> E + Sync) -> Vec<E> {
    let mut out = vec![E::default(); n.div_ceil(PANEL) * PANEL * k];
    out.par_chunks_mut((PANEL * k).max(1)).enumerate().for_each(|(p, panel)| {
        for t in 0..PANEL.min(n - p * PANEL) {
            let row = p * PANEL + t;
            for c in 0..k {
                panel[c * PANEL + E::slot(t)] = value(row * k + c);
            }
        }
    });
    out
}

/// The instruction sets a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The build's baseline (scalar or SSE2 on x86-64 with `fma` through libm; NEON on arm64).
    Baseline,
    /// AVX2 with FMA and F16C (every CPU with AVX2 and FMA has F16C).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// Every instruction set this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    isas.push(Isa::Avx512);
                }
            }
        }
        isas
    }

    /// The best instruction set this CPU has, found once.
    pub fn detected() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().unwrap_or(&Isa::Baseline))
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512f",
        }
    }
}

/// Writes `x [m, k] · (parts stacked by rows)ᵀ` into `out [m, ldo]`, part `i` into the columns
/// after those of parts `0..i`. Stacked parts run as one parallel section.
pub fn matmul(isa: Isa, x: &[f32], m: usize, parts: &[&PackedMatrix], out: &mut [f32], ldo: usize) {
    let width: usize = parts.iter().map(|p| p.n).sum();
    let k = parts.first().map_or(0, |p| p.k);
    assert!(parts.iter().all(|p| p.k == k), "stacked parts differ in width");
    assert!(x.len() >= m * k && width <= ldo && out.len() >= m * ldo, "matmul: shapes do not fit");
    if m == 0 || width == 0 {
        return;
    }
    // Tasks: runs of panels, as even as they can be and enough for every thread to get several,
    // each over one block of `MB` rows when there are more (prefill), run after run. How the
    // work is split changes no result, only the balance.
    let threads = rayon::current_num_threads();
    let row_blocks: Vec<(usize, usize)> = (0..m).step_by(MB).map(|r0| (r0, MB.min(m - r0))).collect();
    let mut tasks = Vec::new();
    let mut first_col = 0;
    for part in parts {
        let panels = part.num_panels();
        let runs = (4 * threads).clamp(1, panels.max(1));
        for i in 0..runs {
            let (p0, p1) = (i * panels / runs, (i + 1) * panels / runs);
            tasks.extend(row_blocks.iter().map(|&rows| (*part, first_col, p0, p1, rows)));
        }
        first_col += part.n;
    }
    let out_ptr = SharedOut(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(part, first_col, p0, p1, (r0, rows))| {
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        // SAFETY: rows `[r0, r0 + rows)` lie within the `m` rows of `x` and of `out`.
        let (x, out) = unsafe { (x.as_ptr().add(r0 * k), out_ptr.0.add(r0 * ldo)) };
        let task = Task { x, m: rows, k, p0, p1, n: part.n, out, first_col, ldo };
        // SAFETY: the task's `rows` rows of `k` values lie within `x`; its panels lie within the
        // part; it writes columns `first_col + [p0, p1) × PANEL` (clipped to the part's `n`) of
        // its rows of `out`, which no other task writes, all within `m × ldo` as asserted above.
        unsafe {
            match &part.panels {
                Panels::F32(d) => run(isa, &task, d.as_ptr()),
                Panels::Bf16(d) => run(isa, &task, d.as_ptr()),
                Panels::F16(d) => run(isa, &task, d.as_ptr()),
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns of the output, which outlives the parallel section.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// One task: panels `[p0, p1)` of a part of `n` features, into columns from `first_col`.
struct Task {
    x: *const f32,
    m: usize,
    k: usize,
    p0: usize,
    p1: usize,
    n: usize,
    out: *mut f32,
    first_col: usize,
    ldo: usize,
}

unsafe fn run<E: Elem>(isa: Isa, task: &Task, panels: *const E) {
    // SAFETY (all arms): forwarded from `matmul`; the feature-gated arms run only where
    // `Isa::available` found the features.
    unsafe {
        match isa {
            Isa::Baseline => task_body::<E, false>(task, panels),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => task_avx2(task, panels),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => task_avx512(task, panels),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<E: Elem>(task: &Task, panels: *const E) {
    // SAFETY: forwarded.
    unsafe { task_body::<E, true>(task, panels) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn task_avx512<E: Elem>(task: &Task, panels: *const E) {
    // SAFETY: forwarded.
    unsafe { task_body::<E, false>(task, panels) }
}

/// A task's loops. `AVX2`: the caller has AVX2, FMA and F16C, and [`x86::kernel`] runs the
/// blocks of one panel.
#[inline(always)]
unsafe fn task_body<E: Elem, const AVX2: bool>(t: &Task, panels: *const E) {
    debug_assert!(t.m <= MB, "a task takes one block of rows");
    // (No closures here: a closure would not inherit the target features of the function it is
    // inlined from; `block` is a function marked to be inlined.)
    if t.m <= 3 {
        // Decode-shaped: the activations fit in L1 whole, so the inner dimension is not blocked
        // and each panel streams from memory in one pass; several panels at once give enough
        // independent sums.
        let np = if t.m == 1 { 4 } else { 2 };
        let mut p = t.p0;
        while p < t.p1 {
            let step = np.min(t.p1 - p);
            // SAFETY: within the task's rows and panels.
            unsafe { block::<E, AVX2>(t, panels, (0, p, t.m, step), 0, t.k, true, None) };
            p += step;
        }
        return;
    }
    // Panel after panel, each block of its inputs (a few KiB that stay in L1) through every group
    // of up to 6 rows: the task reads its panels in memory order, once. Meanwhile each group
    // fetches its share of the next block into the cache (a share as large as its part of the
    // work), so that the next block's rows do not wait on memory.
    for p in t.p0..t.p1 {
        for c0 in (0..t.k).step_by(KC) {
            let kc = KC.min(t.k - c0);
            let more = p + 1 < t.p1 || c0 + kc < t.k;
            let mut r = 0;
            while r < t.m {
                let mr = 6.min(t.m - r);
                let (from, to) = (KC * r / t.m, KC * (r + mr) / t.m);
                let share = more.then_some((from, to - from));
                // SAFETY: within the task's rows and panels.
                unsafe { block::<E, AVX2>(t, panels, (r, p, mr, 1), c0, kc, c0 == 0, share) };
                r += mr;
            }
        }
    }
}

/// One kernel call: `mr` rows from `r` and `np` panels from `p`, inputs `[c0, c0 + kc)`.
/// `prefetch`: `(from, len)`, which inputs of the next block in memory (the panel's next block, or
/// the next panel's first) to fetch into the cache meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<E: Elem, const AVX2: bool>(
    t: &Task,
    panels: *const E,
    (r, p, mr, np): (usize, usize, usize, usize),
    c0: usize,
    kc: usize,
    first: bool,
    prefetch: Option<(usize, usize)>,
) {
    let panel_len = t.k * PANEL;
    // SAFETY: row `r` of x starts at `r * k`, panel `p` at `p * panel_len`; the caller keeps
    // `mr` rows and `np` panels within the task, and `valid` clips the columns to the part.
    unsafe {
        let size = PANEL * std::mem::size_of::<E>();
        let w = panels.add(p * panel_len + c0 * PANEL);
        let (next, next_step) = match prefetch {
            // The next block starts right after this one (a panel's `k` inputs are followed by
            // the next panel's). Spread over the `kc` inputs of this call, rounded up; the
            // addresses may pass the matrix's end, which a prefetch may touch.
            Some((from, len)) => ((w as *const u8).wrapping_add((kc + from) * size), (len * size).div_ceil(kc)),
            None => (std::ptr::null(), 0),
        };
        let args = Args {
            x: t.x.add(r * t.k + c0),
            ldx: t.k,
            kc,
            out: t.out.add(r * t.ldo + t.first_col + p * PANEL),
            ldo: t.ldo,
            valid: (t.n - p * PANEL).min(np * PANEL),
            first,
            next,
            next_step,
        };
        #[cfg(target_arch = "x86_64")]
        if AVX2 && E::AVX2 && np == 1 {
            return x86::dispatch(&args, w, mr);
        }
        dispatch(&args, w, panel_len, mr, np)
    }
}

/// Where a kernel call reads and writes.
struct Args {
    x: *const f32,
    ldx: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    /// Output columns to write (the rest of the panels are padding).
    valid: usize,
    /// The first block of the inner dimension starts from zero; later ones from `out`.
    first: bool,
    /// Where this call's share of the next block to prefetch starts (no effect on results), or
    /// null; input `c` fetches `next + c * next_step`.
    next: *const u8,
    next_step: usize,
}

/// Asks for the cache line at `p` (a hint: never faults, changes no result).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
unsafe fn dispatch<E: Elem>(a: &Args, w: *const E, stride: usize, mr: usize, np: usize) {
    // SAFETY: forwarded; every (mr, np) pair `task_body` makes has an arm.
    unsafe {
        match (mr, np) {
            (1, 4) => kernel::<E, 1, 4>(a, w, stride),
            (1, 3) => kernel::<E, 1, 3>(a, w, stride),
            (1, 2) => kernel::<E, 1, 2>(a, w, stride),
            (2, 2) => kernel::<E, 2, 2>(a, w, stride),
            (3, 2) => kernel::<E, 3, 2>(a, w, stride),
            (1, 1) => kernel::<E, 1, 1>(a, w, stride),
            (2, 1) => kernel::<E, 2, 1>(a, w, stride),
            (3, 1) => kernel::<E, 3, 1>(a, w, stride),
            (4, 1) => kernel::<E, 4, 1>(a, w, stride),
            (5, 1) => kernel::<E, 5, 1>(a, w, stride),
            (6, 1) => kernel::<E, 6, 1>(a, w, stride),
            _ => unreachable!("no kernel for {mr} rows × {np} panels"),
        }
    }
}

/// `MR` rows × `NP` panels over one block of the inner dimension. The accumulators are a fixed-size
/// array indexed by constants only, so they live in vector registers.
#[inline(always)]
unsafe fn kernel<E: Elem, const MR: usize, const NP: usize>(a: &Args, w: *const E, stride: usize) {
    let mut acc = [[[0f32; PANEL]; NP]; MR];
    let full = a.valid == NP * PANEL;
    // SAFETY: the caller guarantees `MR` rows of `kc` inputs at `x` (row stride `ldx`), `NP`
    // panels of `kc` inputs at `w` (panel stride `stride`), and `MR` rows of `valid` columns at
    // `out` (row stride `ldo`).
    unsafe {
        if !a.first {
            for (i, row) in acc.iter_mut().enumerate() {
                let src = a.out.add(i * a.ldo);
                if full {
                    for (p, lanes) in row.iter_mut().enumerate() {
                        *lanes = *(src.add(p * PANEL) as *const [f32; PANEL]);
                    }
                } else {
                    // Indexed by a variable, so through a copy: `acc` itself is only ever
                    // indexed by constants, which keeps it in registers.
                    let mut buf = [[0f32; PANEL]; NP];
                    for col in 0..a.valid {
                        buf[col / PANEL][col % PANEL] = *src.add(col);
                    }
                    *row = buf;
                }
            }
        }
        for c in 0..a.kc {
            if !a.next.is_null() {
                prefetch(a.next.wrapping_add(c * a.next_step));
            }
            let mut wv = [[0f32; PANEL]; NP];
            for (p, lanes) in wv.iter_mut().enumerate() {
                *lanes = E::widen_row(w.add(p * stride + c * PANEL));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = *a.x.add(i * a.ldx + c);
                for (lanes, wl) in row.iter_mut().zip(&wv) {
                    for (acc, w) in lanes.iter_mut().zip(wl) {
                        *acc = xv.mul_add(*w, *acc);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let dst = a.out.add(i * a.ldo);
            if full {
                for (p, lanes) in row.iter().enumerate() {
                    *(dst.add(p * PANEL) as *mut [f32; PANEL]) = *lanes;
                }
            } else {
                let buf = *row;
                for col in 0..a.valid {
                    *dst.add(col) = buf[col / PANEL][col % PANEL];
                }
            }
        }
    }
}

/// Explicit AVX2+FMA kernels for the blocked product (one panel, up to 6 rows): the generic
/// [`kernel`]'s arithmetic, with the register use spelled out. (Compiled from the generic code, the
/// 6-row kernel spent a third of its instructions on register moves and a zero register.)
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Args, Elem, PANEL, prefetch};

    /// # Safety
    /// As [`super::dispatch`]'s, with one panel, on a CPU with AVX2, FMA and F16C, for a dtype
    /// with `E::AVX2`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dispatch<E: Elem>(a: &Args, w: *const E, mr: usize) {
        // SAFETY: forwarded.
        unsafe {
            match (mr, a.next.is_null()) {
                (6, true) => kernel::<E, 6, false>(a, w),
                (6, false) => kernel::<E, 6, true>(a, w),
                (5, true) => kernel::<E, 5, false>(a, w),
                (5, false) => kernel::<E, 5, true>(a, w),
                (4, true) => kernel::<E, 4, false>(a, w),
                (4, false) => kernel::<E, 4, true>(a, w),
                (3, true) => kernel::<E, 3, false>(a, w),
                (3, false) => kernel::<E, 3, true>(a, w),
                (2, true) => kernel::<E, 2, false>(a, w),
                (2, false) => kernel::<E, 2, true>(a, w),
                (1, true) => kernel::<E, 1, false>(a, w),
                (1, false) => kernel::<E, 1, true>(a, w),
                _ => unreachable!("no kernel for {mr} rows"),
            }
        }
    }

    /// `MR` rows × one panel over a block of the inner dimension: `acc = fma(x, w, acc)` per input
    /// in order, as [`super::kernel`]. `PREFETCH`: also fetch this call's share of the next block
    /// (`a.next`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<E: Elem, const MR: usize, const PREFETCH: bool>(a: &Args, w: *const E) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let full = a.valid == PANEL;
        // SAFETY: the caller's (see `super::kernel`).
        unsafe {
            if !a.first {
                for (i, acc) in acc.iter_mut().enumerate() {
                    let src = a.out.add(i * a.ldo);
                    if full {
                        *acc = [_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8))];
                    } else {
                        // Through a copy, as a partial panel's padding columns are not in `out`
                        // (a copy of a variable length is a call, kept off the common path).
                        let mut buf = [0f32; PANEL];
                        std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), a.valid);
                        *acc = [_mm256_loadu_ps(buf.as_ptr()), _mm256_loadu_ps(buf.as_ptr().add(8))];
                    }
                }
            }
            let rows: [*const f32; MR] = std::array::from_fn(|i| a.x.add(i * a.ldx));
            for c in 0..a.kc {
                if PREFETCH {
                    prefetch(a.next.wrapping_add(c * a.next_step));
                }
                let [w0, w1] = E::widen_avx2(w.add(c * PANEL));
                for i in 0..MR {
                    let xv = _mm256_broadcast_ss(&*rows[i].add(c));
                    acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let dst = a.out.add(i * a.ldo);
                if full {
                    _mm256_storeu_ps(dst, acc[0]);
                    _mm256_storeu_ps(dst.add(8), acc[1]);
                } else {
                    let mut buf = [0f32; PANEL];
                    _mm256_storeu_ps(buf.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), acc[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, a.valid);
                }
            }
        }
    }
}

/// The product as the module documentation defines it, one element at a time: what every kernel
/// must equal bit for bit.
pub fn reference(x: &[f32], m: usize, k: usize, w: impl Fn(usize, usize) -> f32, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for c in 0..k {
                acc = x[i * k + c].mul_add(w(j, c), acc);
            }
            out[i * n + j] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Both widenings, the plain one and F16C's (where this CPU has it).
    #[test]
    fn f16_widening_is_exact_for_every_value() {
        let check = |h: u16, ours: f32| {
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        };
        for h in 0..=u16::MAX {
            check(h, f16_to_f32(h));
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::available().contains(&Isa::Avx2) {
            let all: Vec<F16> = (0..=u16::MAX).map(F16).collect();
            for (i, chunk) in all.chunks_exact(PANEL).enumerate() {
                let mut out = [0f32; PANEL];
                // SAFETY: this CPU has AVX2 and F16C; the chunk holds 16 values.
                unsafe {
                    let [low, high] = F16::widen_avx2(chunk.as_ptr());
                    std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), low);
                    std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr().add(8), high);
                }
                for (t, &v) in out.iter().enumerate() {
                    check((i * PANEL + t) as u16, v);
                }
            }
        } else {
            println!("F16C widening not tested: this CPU has no AVX2 with F16C");
        }
    }

    /// Every instruction set, every dtype, shapes around every blocking edge (rows around the
    /// decode and micro-kernel sizes and `MB`, features around `PANEL`, inputs around `KC`), and
    /// stacked parts: bit for bit the reference.
    #[test]
    fn every_kernel_equals_the_reference_bit_for_bit() {
        let isas = Isa::available();
        println!("instruction sets tested: {:?} (the best one here: {:?})", isas, Isa::detected());
        let mut next = lcg(7);
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 576, 64),
            (2, 256, 33),
            (3, 257, 17),
            (4, 100, 48),
            (7, 513, 31),
            (8, 40, 16),
            (9, 33, 20),
            (11, 270, 17),
            (13, 64, 80),
            (16, 600, 50),
            (65, 300, 40),
            (130, 31, 15),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let values: Vec<f32> = (0..n * k).map(|_| next()).collect();
                let bytes: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| match dtype {
                        DType::F32 => v.to_le_bytes().to_vec(),
                        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    })
                    .collect();
                let stored = |j: usize, c: usize| {
                    let v = values[j * k + c];
                    match dtype {
                        DType::F32 => v,
                        DType::BF16 => half::bf16::from_f32(v).to_f32(),
                        DType::F16 => half::f16::from_f32(v).to_f32(),
                    }
                };
                let w = PackedMatrix::from_stored(dtype, &bytes, n, k);
                let expected = reference(&x, m, k, stored, n);
                // The same matrix stacked twice, into a wider output with a spare column, which
                // stays as it was. (Outputs start as NaN: every element must be written.)
                let ldo = 2 * n + 1;
                let mut stacked_expected = vec![f32::NAN; m * ldo];
                for i in 0..m {
                    for half in 0..2 {
                        stacked_expected[i * ldo + half * n..][..n].copy_from_slice(&expected[i * n..][..n]);
                    }
                }
                for &isa in &isas {
                    let mut out = vec![f32::NAN; m * n];
                    matmul(isa, &x, m, &[&w], &mut out, n);
                    let same = out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {dtype} m={m} k={k} n={n}");
                    let mut out = vec![f32::NAN; m * ldo];
                    matmul(isa, &x, m, &[&w, &w], &mut out, ldo);
                    let same = out.iter().zip(&stacked_expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {dtype} stacked, m={m} k={k} n={n}");
                }
                // The thread count splits the work differently and changes nothing.
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut out = vec![f32::NAN; m * n];
                    pool.install(|| matmul(Isa::detected(), &x, m, &[&w], &mut out, n));
                    let same = out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{threads} threads, {dtype} m={m} k={k} n={n}");
                }
                let mut row = vec![0f32; k];
                w.row_to_f32(n - 1, &mut row);
                assert!(row.iter().enumerate().all(|(c, &v)| v == stored(n - 1, c)), "{dtype} row gather");
            }
        }
    }
}
