//! The CUDA backend's operations against the CPU backend, on any device: random inputs rounded to
//! the dtype so both sides see the same values, errors measured norm-relative
//! (`‖cuda − cpu‖ / ‖cpu‖`). The CUDA backend's unit tests run these on the emulated device with
//! tight tolerances (and every thread order); `pagoda selftest` runs them on a real GPU with the
//! tolerances its fast-math arithmetic allows.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::cuda::device::DeviceHandle;
use crate::backend::cuda::{CudaBackend, CudaBatch, CudaKvCache, CudaTensor, CudaWeight, encode};
use crate::backend::{
    AttentionParams, Backend, BackendError, BatchLayout, Draw, KvCacheShape, LogitEdit, RowSampling, SampledRow,
    SeqLayout,
};
use crate::model::config::{RopeConfig, RopeScaling};
use crate::weights::{DType, WeightStore, serialize};

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Largest norm-relative error accepted per dtype.
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub f32: f32,
    pub f16: f32,
    pub bf16: f32,
    /// Sampled tokens of [`sampling`]'s 64 rows that may differ from the host's pick.
    pub sampled_mismatches: f32,
}

impl Tolerances {
    /// The emulator computes exactly what the source says: the output is rounded once to the
    /// dtype and only the order of f32 sums differs from the CPU.
    pub const EMULATED: Tolerances = Tolerances { f32: 1e-5, f16: 2e-3, bf16: 1e-2, sampled_mismatches: 0.0 };
    /// A GPU adds fast-math intrinsics (`exp2f`, `rsqrtf`, `expf`, division) and FMA contraction,
    /// which can move a draw that falls within rounding of a token boundary to its neighbour.
    pub const GPU: Tolerances = Tolerances { f32: 1e-3, f16: 1e-3, bf16: 1e-2, sampled_mismatches: 2.0 };

    pub fn of(&self, dtype: DType) -> f32 {
        match dtype {
            DType::F32 => self.f32,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
        }
    }
}

/// One comparison's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub dtype: DType,
    pub error: f32,
    pub tolerance: f32,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

pub fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    if ours.len() != reference.len() || ours.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff.sqrt() / norm.sqrt().max(1e-30)) as f32
}

/// A CUDA backend in one dtype with a seeded generator for inputs.
pub struct Rig {
    pub cuda: CudaBackend,
    pub rng: ChaCha8Rng,
    tolerances: Tolerances,
}

impl Rig {
    pub fn new(handle: &DeviceHandle, dtype: DType, tolerances: Tolerances) -> Rig {
        Rig { cuda: CudaBackend::new(handle.clone(), dtype), rng: ChaCha8Rng::seed_from_u64(7), tolerances }
    }

    pub fn dtype(&self) -> DType {
        self.cuda.dtype()
    }

    /// Compares the CUDA result with the CPU's.
    pub fn check(&self, name: &str, ours: &CudaTensor, reference: &[f32]) -> Result<Check, BackendError> {
        Ok(Check {
            name: name.to_string(),
            dtype: self.dtype(),
            error: relative_error(&self.cuda.to_host(ours)?, reference),
            tolerance: self.tolerances.of(self.dtype()),
        })
    }

    /// Uniform values in [-scale, scale], rounded to the rig's dtype.
    pub fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        let raw: Vec<f32> =
            (0..len).map(|_| ((self.rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale).collect();
        round(&raw, self.dtype())
    }

    pub fn tensors(&mut self, rows: usize, cols: usize, scale: f32) -> Result<(CpuTensor, CudaTensor), BackendError> {
        let data = self.values(rows * cols, scale);
        let cuda = self.cuda.tensor_from_f32(&data, rows, cols)?;
        Ok((CpuTensor { data, rows, cols }, cuda))
    }

    /// The same weight on both backends, stored in the rig's dtype.
    pub fn weights(&mut self, shape: &[usize], scale: f32) -> Result<(CpuWeight, CudaWeight), BackendError> {
        let data = self.values(shape.iter().product(), scale);
        let bytes = encode(&data, self.dtype());
        let file = serialize(&[("w".into(), self.dtype(), shape.to_vec(), bytes)]);
        let store = WeightStore::from_bytes("conformance", file).map_err(|e| BackendError::Batch(e.to_string()))?;
        let raw = store.tensor("w", shape).map_err(|e| BackendError::Batch(e.to_string()))?;
        Ok((CpuBackend.load_weight(&raw)?, self.cuda.load_weight(&raw)?))
    }
}

pub fn round(values: &[f32], dtype: DType) -> Vec<f32> {
    let bytes = encode(values, dtype);
    let mut out = vec![0f32; values.len()];
    crate::weights::convert_to_f32(dtype, &bytes, &mut out);
    out
}

/// Linear layers with and without bias, and the f32 logits projection.
pub fn linear(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let (x_cpu, x_cuda) = rig.tensors(5, 40, 1.0)?;
    let (w_cpu, w_cuda) = rig.weights(&[33, 40], 0.5)?;
    let (b_cpu, b_cuda) = rig.weights(&[33], 0.5)?;
    Ok(vec![
        rig.check("linear", &rig.cuda.linear(&x_cuda, &w_cuda, None)?, &CpuBackend.linear(&x_cpu, &w_cpu, None)?.data)?,
        rig.check(
            "linear + bias",
            &rig.cuda.linear(&x_cuda, &w_cuda, Some(&b_cuda))?,
            &CpuBackend.linear(&x_cpu, &w_cpu, Some(&b_cpu))?.data,
        )?,
        rig.check("logits", &rig.cuda.logits(&x_cuda, &w_cuda)?, &CpuBackend.logits(&x_cpu, &w_cpu)?.data)?,
    ])
}

/// Three projections stacked into one weight (with their biases), one matmul, its output split
/// into columns: each part equals the CPU's own matmul of that weight.
pub fn stacked_linear(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let (x_cpu, x_cuda) = rig.tensors(4, 40, 1.0)?;
    let widths = [24, 8, 8];
    let (mut cpu_parts, mut cuda_weights, mut cuda_biases) = (Vec::new(), Vec::new(), Vec::new());
    for &w in &widths {
        let (w_cpu, w_cuda) = rig.weights(&[w, 40], 0.5)?;
        let (b_cpu, b_cuda) = rig.weights(&[w], 0.5)?;
        cpu_parts.push(CpuBackend.linear(&x_cpu, &w_cpu, Some(&b_cpu))?);
        cuda_weights.push(w_cuda);
        cuda_biases.push(b_cuda);
    }
    let w = rig.cuda.stack_weights(cuda_weights)?;
    let b = rig.cuda.stack_weights(cuda_biases)?;
    let parts = rig.cuda.split_columns(&rig.cuda.linear(&x_cuda, &w, Some(&b))?, &widths)?;
    let mut checks = Vec::new();
    for (idx, (ours, reference)) in parts.iter().zip(&cpu_parts).enumerate() {
        checks.push(rig.check(&format!("stacked linear, part {idx}"), ours, &reference.data)?);
    }
    Ok(checks)
}

/// RMSNorm alone and fused with the residual add (its output and the updated residual), the add,
/// and SiLU·mul, at a width below and one above a block's thread count.
pub fn small_ops(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let mut checks = Vec::new();
    for width in [64, 1000] {
        let (h_cpu, mut h_cuda) = rig.tensors(3, width, 2.0)?;
        let (d_cpu, d_cuda) = rig.tensors(3, width, 2.0)?;
        let (w_cpu, w_cuda) = rig.weights(&[width], 1.0)?;
        let name = |op: &str| format!("{op} (width {width})");
        let reference = CpuBackend.rms_norm(&h_cpu, &w_cpu, 1e-5)?;
        checks.push(rig.check(&name("rms_norm"), &rig.cuda.rms_norm(&h_cuda, &w_cuda, 1e-5)?, &reference.data)?);
        let mut h_ref = h_cpu.clone();
        let reference = CpuBackend.add_rms_norm(&mut h_ref, &d_cpu, &w_cpu, 1e-5)?;
        let ours = rig.cuda.add_rms_norm(&mut h_cuda, &d_cuda, &w_cuda, 1e-5)?;
        checks.push(rig.check(&name("add_rms_norm"), &ours, &reference.data)?);
        checks.push(rig.check(&name("add_rms_norm residual"), &h_cuda, &h_ref.data)?);
        rig.cuda.add_assign(&mut h_cuda, &d_cuda)?;
        CpuBackend.add_assign(&mut h_ref, &d_cpu)?;
        checks.push(rig.check(&name("add"), &h_cuda, &h_ref.data)?);
        let reference = CpuBackend.silu_mul(&h_ref, &d_cpu)?;
        checks.push(rig.check(&name("silu_mul"), &rig.cuda.silu_mul(&h_cuda, &d_cuda)?, &reference.data)?);
    }
    Ok(checks)
}

/// The embedding gather and the row gather: exact copies.
pub fn gathers(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let (table_cpu, table_cuda) = rig.weights(&[50, 24], 1.0)?;
    let layout = BatchLayout {
        token_ids: vec![3, 49, 0, 3],
        positions: vec![0, 1, 2, 3],
        slot_mapping: vec![0, 1, 2, 3],
        seqs: vec![SeqLayout { query_start: 0, query_len: 4, context_len: 4, block_table: vec![0] }],
    };
    let ours = rig.cuda.embedding(&table_cuda, &rig.cuda.prepare_batch(&layout)?)?;
    let reference = CpuBackend.embedding(&table_cpu, &CpuBackend.prepare_batch(&layout)?)?;
    let exact = |mut c: Check| {
        c.tolerance = 0.0;
        c
    };
    Ok(vec![
        exact(rig.check("embedding", &ours, &reference.data)?),
        exact(rig.check(
            "gather_rows",
            &rig.cuda.gather_rows(&ours, &[3, 1])?,
            &CpuBackend.gather_rows(&reference, &[3, 1])?.data,
        )?),
    ])
}

/// Greedy picks on the device equal the host sampler's argmax of the same logits: random rows, and
/// in f32 rows with ties, -inf and NaN.
pub fn argmax(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let (_, x) = rig.tensors(6, 40, 1.0)?;
    let (_, w) = rig.weights(&[1000, 40], 1.0)?;
    let logits = rig.cuda.logits(&x, &w)?;
    let mut rows: Vec<Vec<f32>> = rig.cuda.to_host(&logits)?.chunks_exact(1000).map(<[f32]>::to_vec).collect();
    let greedy = |n: usize| vec![RowSampling::greedy(); n];
    let tokens = |rows: Vec<SampledRow>| rows.into_iter().map(|r| r.token).collect::<Vec<_>>();
    let mut ours = tokens(rig.cuda.sample_rows(&logits, &greedy(6))?);
    if rig.dtype() == DType::F32 {
        let special = vec![
            vec![1.0, 3.0, 3.0, -1.0],
            vec![f32::NEG_INFINITY; 4],
            vec![f32::NAN, 2.0, 2.0, f32::NAN],
            vec![f32::NAN; 4],
            vec![-5.0, -4.0, f32::NEG_INFINITY, -4.0],
        ];
        let flat: Vec<f32> = special.concat();
        ours.extend(tokens(
            rig.cuda.sample_rows(&rig.cuda.tensor_from_f32(&flat, special.len(), 4)?, &greedy(special.len()))?,
        ));
        rows.extend(special);
    }
    let wrong = rows.iter().zip(&ours).filter(|(row, t)| crate::backend::sampling::argmax(row) != **t).count();
    Ok(vec![Check {
        name: format!("argmax of {} rows", rows.len()),
        dtype: rig.dtype(),
        error: wrong as f32,
        tolerance: 0.0,
    }])
}

/// Every sampling rule on the device picks what `backend::sampling::sample_row` picks on the host
/// from the same logits (greedy and draws; temperature, min-p, top-k, top-p; the logit edits;
/// logprobs within rounding and ranks; token masks; forced tokens), with rows of ties where top-k
/// must break them by index.
pub fn sampling(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let rows = 64;
    // Small weights: flat distributions, where a wrong walk or a wrong cut picks another token.
    let (_, x) = rig.tensors(rows, 40, 1.0)?;
    let (_, w) = rig.weights(&[1000, 40], 0.2)?;
    let mut host = rig.cuda.to_host(&rig.cuda.logits(&x, &w)?)?;
    // Rows 56..64 (one of each rule): plateaus of equal logits, so that top-k and top-p cut inside
    // a run of ties, drawn near the end of the kept mass, where an extra tie would be picked (and
    // not at a multiple of the plateaus' period, where a boundary falls within rounding).
    for (r, row) in host.chunks_exact_mut(1000).enumerate().skip(56) {
        for (j, l) in row.iter_mut().enumerate() {
            *l = ((j * 7 + r) % 5) as f32 * 0.5;
        }
    }
    let rules: Vec<RowSampling> = (0..rows).map(|r| sampling_rule(r, rows)).collect();
    let logits = rig.cuda.logits_from_f32(&host, rows, 1000)?;
    let ours = rig.cuda.sample_rows(&logits, &rules)?;
    let expected = CpuBackend.sample_rows(&CpuTensor { data: host, rows, cols: 1000 }, &rules)?;
    let wrong_tokens = ours.iter().zip(&expected).filter(|(a, b)| a.token != b.token).count();
    let mut logprob_error = 0f32;
    let mut wrong_top = 0;
    for (a, b) in ours.iter().zip(&expected) {
        match (&a.logprobs, &b.logprobs) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                logprob_error = logprob_error.max((a.logprob - b.logprob).abs());
                wrong_top += usize::from(a.rank != b.rank);
                for (x, y) in a.top.iter().zip(&b.top) {
                    logprob_error = logprob_error.max((x.1 - y.1).abs());
                }
                wrong_top += usize::from(a.top.iter().map(|t| t.0).ne(b.top.iter().map(|t| t.0)));
            }
            _ => wrong_top += 1,
        }
    }
    Ok(vec![
        Check {
            name: format!("sampled tokens of {rows} rows"),
            dtype: rig.dtype(),
            error: wrong_tokens as f32,
            tolerance: rig.tolerances.sampled_mismatches,
        },
        Check {
            name: "top logprob tokens and ranks".into(),
            dtype: rig.dtype(),
            error: wrong_top as f32,
            tolerance: 0.0,
        },
        Check { name: "logprobs (absolute)".into(), dtype: rig.dtype(), error: logprob_error, tolerance: 1e-4 },
    ])
}

/// The rule of row `r` in [`sampling`]: one of each kind in turn, with uniform numbers spread over
/// [0, 1).
fn sampling_rule(r: usize, rows: usize) -> RowSampling {
    let uniform = if r >= 56 { 0.9973 - (r - 56) as f32 * 0.0021 } else { (r as f32 * 0.618_034) % 1.0 };
    let d = |temperature, min_p, top_k, top_p| Draw { temperature, min_p, top_k, top_p, uniform };
    let edits = vec![
        LogitEdit { token: 3, add: f32::NEG_INFINITY, repetition: 1.0, subtract: 0.0 },
        LogitEdit { token: 10, add: 2.5, repetition: 1.3, subtract: 0.0 },
        LogitEdit { token: 11, add: 0.0, repetition: 1.3, subtract: 0.75 },
        LogitEdit { token: 999, add: -1.0, repetition: 1.2, subtract: 0.1 },
        LogitEdit { token: 5000, add: 9.0, repetition: 1.0, subtract: 0.0 },
    ];
    let mut rule = match r % 8 {
        0 => RowSampling::greedy(),
        1 => RowSampling::draw(d(1.0, 0.0, 0, 1.0)),
        2 => RowSampling::draw(d(0.3, 0.0, 0, 1.0)),
        3 => RowSampling::draw(d(1.5, 0.2, 0, 1.0)),
        4 => RowSampling::draw(d(1.0, 0.0, 1 + (r as u32 * 13) % 40, 1.0)),
        5 => RowSampling::draw(d(0.8, 0.0, 0, 0.05 + (r as f32 / rows as f32) * 0.9)),
        6 => RowSampling::draw(d(1.2, 0.05, 50, 0.7)),
        _ => RowSampling { edits: edits.clone(), ..RowSampling::greedy() },
    };
    if r.is_multiple_of(3) {
        rule.edits = edits;
    }
    if r.is_multiple_of(5) {
        rule.logprobs = Some((r % 7) as u32);
    }
    // A structured output's token mask on every fourth row, on some shorter than the vocabulary
    // (allowing nothing past its end).
    if r % 4 == 1 {
        let words = if r % 8 == 5 { 20 } else { 1000usize.div_ceil(32) };
        let mut mask = vec![0u32; words];
        for t in (0..words * 32).filter(|t| (t * 31 + r) % 7 < 2) {
            mask[t / 32] |= 1 << (t % 32);
        }
        rule.allowed = Some(mask);
    }
    // A prompt position's logprobs (its token forced, whatever else the rule says) on every
    // eleventh row, one of them past the vocabulary.
    if r % 11 == 2 {
        rule.forced = Some(if r == 13 { 1000 } else { (r * 37 % 1000) as u32 });
        rule.logprobs = Some((r % 4) as u32);
    }
    rule
}

/// Dummy weights made on the device equal the host's stream, element for element.
pub fn dummy_weights(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let shape = [37, 300];
    let ours = rig.cuda.weight_to_host(&rig.cuda.random_weight("dummy", &shape, 42)?)?;
    let host: Vec<f32> = (0..37 * 300).map(|i| crate::backend::dummy_value(42, i)).collect();
    let reference = round(&host, rig.dtype());
    let error = relative_error(&ours, &reference);
    Ok(vec![Check { name: "dummy weights".into(), dtype: rig.dtype(), error, tolerance: 1e-6 }])
}

/// An attention problem: sequences as (context length, query length), the query being the last
/// tokens of the context and the rest already cached (a prefix hit or an earlier chunk).
#[derive(Clone, Debug)]
pub struct AttentionCase {
    pub head_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub seqs: Vec<(usize, usize)>,
    pub sliding_window: Option<usize>,
}

pub const BLOCK_SIZE: usize = 16;

/// Lengths around a block boundary, a partial last block, a chunk attending to its cached prefix:
/// a step with prompt chunks (the prefill kernel).
pub const MIXED_SEQS: [(usize, usize); 6] = [(1, 1), (15, 15), (16, 16), (17, 17), (40, 8), (37, 1)];
/// The same lengths one token at a time: a decode step (the paged decode kernel).
pub const DECODE_SEQS: [(usize, usize); 6] = [(1, 1), (15, 1), (16, 1), (17, 1), (40, 1), (37, 1)];

/// A case's inputs laid out on both backends: the cache filled through `write_kv_cache` over
/// scrambled blocks (every slot no sequence owns is NaN on the CUDA side), the queries, and the
/// CPU's answer.
pub struct AttentionSetup {
    cuda_cache: CudaKvCache,
    cuda_batch: CudaBatch,
    q_cuda: CudaTensor,
    params: AttentionParams,
    reference: Vec<f32>,
}

pub fn attention_setup(rig: &mut Rig, case: &AttentionCase) -> Result<AttentionSetup, BackendError> {
    let kv_width = case.num_kv_heads * case.head_dim;
    let num_blocks: usize = case.seqs.iter().map(|(c, _)| c.div_ceil(BLOCK_SIZE)).sum::<usize>() + 5;
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rig.rng.next_u32() as usize % (i + 1));
    }
    let mut next = 0;
    let tables: Vec<Vec<u32>> = case
        .seqs
        .iter()
        .map(|&(ctx, _)| {
            let n = ctx.div_ceil(BLOCK_SIZE);
            next += n;
            order[next - n..next].to_vec()
        })
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32;
    let layout_of = |query: &dyn Fn(usize) -> usize| {
        let mut layout = BatchLayout::default();
        for (s, &(ctx, _)) in case.seqs.iter().enumerate() {
            let q = query(s);
            layout.seqs.push(SeqLayout {
                query_start: layout.token_ids.len(),
                query_len: q,
                context_len: ctx,
                block_table: tables[s].clone(),
            });
            for p in ctx - q..ctx {
                layout.token_ids.push(0);
                layout.positions.push(p as u32);
                layout.slot_mapping.push(slot(s, p));
            }
        }
        layout
    };
    let fill = layout_of(&|s| case.seqs[s].0);
    let attend = layout_of(&|s| case.seqs[s].1);
    let shape = KvCacheShape {
        num_layers: 1,
        num_blocks,
        block_size: BLOCK_SIZE,
        num_kv_heads: case.num_kv_heads,
        head_dim: case.head_dim,
        dtype: rig.dtype(),
    };
    fill.validate(&shape)?;
    attend.validate(&shape)?;
    let mut cpu_cache = CpuBackend.new_kv_cache(KvCacheShape { dtype: DType::F32, ..shape })?;
    let mut cuda_cache = rig.cuda.new_kv_cache(KvCacheShape { dtype: rig.dtype(), ..shape })?;
    rig.cuda.poison_kv_cache(&mut cuda_cache)?;
    let (k_cpu, k_cuda) = rig.tensors(fill.num_tokens(), kv_width, 1.0)?;
    let (v_cpu, v_cuda) = rig.tensors(fill.num_tokens(), kv_width, 1.0)?;
    CpuBackend.write_kv_cache(&mut cpu_cache, 0, &k_cpu, &v_cpu, &CpuBackend.prepare_batch(&fill)?)?;
    rig.cuda.write_kv_cache(&mut cuda_cache, 0, &k_cuda, &v_cuda, &rig.cuda.prepare_batch(&fill)?)?;
    let (q_cpu, q_cuda) = rig.tensors(attend.num_tokens(), case.num_heads * case.head_dim, 1.0)?;
    let params = AttentionParams {
        num_heads: case.num_heads,
        num_kv_heads: case.num_kv_heads,
        head_dim: case.head_dim,
        scale: 1.0 / (case.head_dim as f32).sqrt(),
        sliding_window: case.sliding_window,
    };
    let reference = std::mem::take(
        &mut CpuBackend.paged_attention(&q_cpu, &cpu_cache, 0, &CpuBackend.prepare_batch(&attend)?, &params)?.data,
    );
    Ok(AttentionSetup { cuda_cache, cuda_batch: rig.cuda.prepare_batch(&attend)?, q_cuda, params, reference })
}

/// Runs the case's attention on the device and compares it with the CPU.
pub fn attention_check(rig: &Rig, case: &AttentionCase, setup: &AttentionSetup) -> Result<Check, BackendError> {
    let ours = rig.cuda.paged_attention(&setup.q_cuda, &setup.cuda_cache, 0, &setup.cuda_batch, &setup.params)?;
    let name = format!(
        "attention head_dim {} heads {}/{} seqs {:?}{}",
        case.head_dim,
        case.num_heads,
        case.num_kv_heads,
        case.seqs,
        case.sliding_window.map_or(String::new(), |w| format!(" window {w}"))
    );
    rig.check(&name, &ours, &setup.reference)
}

/// Rotary embedding fused with the KV-cache write against the CPU's unfused path: the rotated q
/// and k, and attention over what was written (in layer 1, so a write into layer 0 is caught).
pub fn fused_rotary(rig: &mut Rig) -> Result<Vec<Check>, BackendError> {
    let (head_dim, num_heads, num_kv_heads) = (64, 4, 2);
    let shape = KvCacheShape {
        num_layers: 2,
        num_blocks: 4,
        block_size: BLOCK_SIZE,
        num_kv_heads,
        head_dim,
        dtype: DType::F32,
    };
    let n = 20;
    let layout = BatchLayout {
        token_ids: vec![0; n],
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n as u32).map(|p| if p < 16 { 48 + p } else { p - 16 }).collect(),
        seqs: vec![SeqLayout { query_start: 0, query_len: n, context_len: n, block_table: vec![3, 0] }],
    };
    let rope = RopeConfig { theta: 10000.0, scaling: RopeScaling::None };
    let table = crate::model::rope::cos_sin_table(&rope, head_dim, 64);
    let cpu_table = CpuBackend.weight_from_f32(table.clone(), [64, head_dim])?;
    let cuda_table = rig.cuda.weight_from_f32(table, [64, head_dim])?;
    let (mut q_cpu, mut q_cuda) = rig.tensors(n, num_heads * head_dim, 1.0)?;
    let (mut k_cpu, mut k_cuda) = rig.tensors(n, num_kv_heads * head_dim, 1.0)?;
    let (v_cpu, v_cuda) = rig.tensors(n, num_kv_heads * head_dim, 1.0)?;
    let params = AttentionParams { num_heads, num_kv_heads, head_dim, scale: 0.125, sliding_window: None };
    let mut cpu_cache = CpuBackend.new_kv_cache(KvCacheShape { dtype: DType::F32, ..shape })?;
    let mut cuda_cache = rig.cuda.new_kv_cache(KvCacheShape { dtype: rig.dtype(), ..shape })?;
    rig.cuda.poison_kv_cache(&mut cuda_cache)?;
    let cpu_batch = CpuBackend.prepare_batch(&layout)?;
    let cuda_batch = rig.cuda.prepare_batch(&layout)?;
    CpuBackend.rotary_write_kv_cache(
        &mut q_cpu,
        &mut k_cpu,
        &v_cpu,
        &mut cpu_cache,
        1,
        &cpu_table,
        &cpu_batch,
        &params,
    )?;
    rig.cuda.rotary_write_kv_cache(
        &mut q_cuda,
        &mut k_cuda,
        &v_cuda,
        &mut cuda_cache,
        1,
        &cuda_table,
        &cuda_batch,
        &params,
    )?;
    let reference = CpuBackend.paged_attention(&q_cpu, &cpu_cache, 1, &cpu_batch, &params)?;
    let ours = rig.cuda.paged_attention(&q_cuda, &cuda_cache, 1, &cuda_batch, &params)?;
    Ok(vec![
        rig.check("rotary q", &q_cuda, &q_cpu.data)?,
        rig.check("rotary k", &k_cuda, &k_cpu.data)?,
        rig.check("attention after the fused cache write", &ours, &reference.data)?,
    ])
}

/// The attention cases every device is checked on: every dtype on the mixed lengths; GQA 1, a
/// group of 3 in the bucket of 4 (padding heads), GQA 8, head_dim 16 and 32; a sliding window; and,
/// on a device with few multiprocessors (the emulated one), contexts long enough to be split.
pub fn attention_cases() -> Vec<(AttentionCase, Vec<DType>)> {
    let case = |head_dim, num_heads, num_kv_heads, seqs: &[(usize, usize)], sliding_window| AttentionCase {
        head_dim,
        num_heads,
        num_kv_heads,
        seqs: seqs.to_vec(),
        sliding_window,
    };
    vec![
        (case(128, 8, 2, &MIXED_SEQS, None), DTYPES.to_vec()),
        (case(64, 4, 4, &MIXED_SEQS, None), vec![DType::BF16]),
        (case(64, 6, 2, &MIXED_SEQS, None), vec![DType::BF16]),
        (case(128, 8, 1, &MIXED_SEQS, None), vec![DType::BF16]),
        (case(16, 4, 2, &MIXED_SEQS, None), vec![DType::BF16]),
        // The embedded demo model's shape.
        (case(32, 4, 2, &MIXED_SEQS, None), DTYPES.to_vec()),
        (case(128, 8, 2, &DECODE_SEQS, None), DTYPES.to_vec()),
        (case(32, 4, 2, &DECODE_SEQS, None), vec![DType::BF16]),
        (case(64, 4, 4, &DECODE_SEQS, None), vec![DType::BF16]),
        (case(128, 8, 1, &DECODE_SEQS, None), vec![DType::BF16]),
        (case(16, 4, 2, &DECODE_SEQS, None), vec![DType::F16]),
        // Chunks longer than a query tile (32 / group tokens), with a cached prefix.
        (case(128, 4, 4, &[(90, 70), (33, 33), (2, 1)], None), vec![DType::BF16]),
        (case(64, 8, 1, &[(75, 75), (20, 3)], None), vec![DType::F16]),
        (case(64, 4, 2, &[(40, 40), (33, 1), (5, 5)], Some(9)), vec![DType::F32]),
        (case(64, 4, 2, &[(40, 1), (33, 1)], Some(9)), vec![DType::F32]),
        (case(64, 8, 2, &[(600, 1)], None), vec![DType::F32]),
        (case(64, 8, 2, &[(1100, 1), (5, 1)], None), vec![DType::F32, DType::BF16]),
    ]
}

/// Every check on `handle`'s device, the attention ones once per entry of `reruns` (a hook run
/// before each repetition, which the emulated device uses to change its thread order).
pub fn run_all(
    handle: &DeviceHandle,
    tolerances: Tolerances,
    reruns: &[&dyn Fn()],
) -> Result<Vec<Check>, BackendError> {
    let mut checks = Vec::new();
    for dtype in DTYPES {
        let mut rig = Rig::new(handle, dtype, tolerances);
        checks.extend(linear(&mut rig)?);
        checks.extend(stacked_linear(&mut rig)?);
        checks.extend(small_ops(&mut rig)?);
        checks.extend(gathers(&mut rig)?);
        checks.extend(fused_rotary(&mut rig)?);
        checks.extend(dummy_weights(&mut rig)?);
        checks.extend(argmax(&mut rig)?);
        checks.extend(sampling(&mut rig)?);
    }
    for (case, dtypes) in attention_cases() {
        for dtype in dtypes {
            let mut rig = Rig::new(handle, dtype, tolerances);
            let setup = attention_setup(&mut rig, &case)?;
            for rerun in reruns {
                rerun();
                checks.push(attention_check(&rig, &case, &setup)?);
            }
        }
    }
    Ok(checks)
}
