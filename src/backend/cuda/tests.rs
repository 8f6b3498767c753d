//! The CUDA backend on the emulated device against the CPU backend: every operation, every
//! activation dtype, random inputs rounded to that dtype so both sides see the same values, and
//! errors measured norm-relative (`‖ours − cpu‖ / ‖cpu‖`) against a tolerance per dtype. Attention
//! runs over scattered blocks with every slot no sequence owns filled with NaN, in three thread
//! orders. GEMMs are checked against cuBLAS's documented semantics directly.

use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::device::{Device, DeviceHandle, GemmCall, Transpose};
use super::emulated::{EmulatedDevice, ThreadOrder};
use super::{CudaBackend, CudaTensor, CudaWeight, encode};
use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::{AttentionParams, Backend, BatchLayout, KvCacheShape, SeqLayout};
use crate::model::config::{RopeConfig, RopeScaling};
use crate::weights::{DType, WeightStore, serialize};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Norm-relative error allowed: the output is rounded once to the dtype, and f32 sums differ in
/// order between the two backends.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

struct Rig {
    device: Arc<EmulatedDevice>,
    cuda: CudaBackend,
    rng: ChaCha8Rng,
}

fn rig(dtype: DType, num_sms: usize) -> Rig {
    let device = Arc::new(EmulatedDevice::new(1 << 30, num_sms));
    let cuda = CudaBackend::new(DeviceHandle::new(device.clone()), dtype);
    Rig { device, cuda, rng: ChaCha8Rng::seed_from_u64(7) }
}

impl Rig {
    fn dtype(&self) -> DType {
        self.cuda.dtype()
    }

    /// Uniform values in [-scale, scale], rounded to the rig's dtype.
    fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        let raw: Vec<f32> =
            (0..len).map(|_| ((self.rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale).collect();
        round(&raw, self.dtype())
    }

    fn tensors(&mut self, rows: usize, cols: usize, scale: f32) -> (CpuTensor, CudaTensor) {
        let data = self.values(rows * cols, scale);
        let cuda = self.cuda.tensor_from_f32(&data, rows, cols).unwrap();
        (CpuTensor { data, rows, cols }, cuda)
    }

    /// The same weight on both backends, stored in the rig's dtype.
    fn weights(&mut self, shape: &[usize], scale: f32) -> (CpuWeight, CudaWeight) {
        let data = self.values(shape.iter().product(), scale);
        let bytes = encode(&data, self.dtype());
        let store =
            WeightStore::from_bytes("test", serialize(&[("w".into(), self.dtype(), shape.to_vec(), bytes)])).unwrap();
        let raw = store.tensor("w", shape).unwrap();
        (CpuBackend.load_weight(&raw).unwrap(), self.cuda.load_weight(&raw).unwrap())
    }
}

fn round(values: &[f32], dtype: DType) -> Vec<f32> {
    let bytes = encode(values, dtype);
    let mut out = vec![0f32; values.len()];
    crate::weights::convert_to_f32(dtype, &bytes, &mut out);
    out
}

fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    if ours.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff.sqrt() / norm.sqrt().max(1e-30)) as f32
}

fn assert_close(what: &str, dtype: DType, ours: &[f32], reference: &[f32]) {
    let err = relative_error(ours, reference);
    assert!(err <= tolerance(dtype), "{what} ({dtype}): relative error {err} > {}", tolerance(dtype));
}

#[test]
fn gemm_follows_cublas_semantics_for_every_transpose_and_leading_dimension() {
    let device = EmulatedDevice::new(1 << 20, 1);
    let (m, n, k) = (5usize, 7usize, 9usize);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut value = || (rng.next_u32() % 17) as f32 * 0.25 - 2.0;
    for transa in [Transpose::No, Transpose::Yes] {
        for transb in [Transpose::No, Transpose::Yes] {
            // Column-major storage with padded leading dimensions.
            let (rows_a, cols_a) = if transa == Transpose::No { (m, k) } else { (k, m) };
            let (rows_b, cols_b) = if transb == Transpose::No { (k, n) } else { (n, k) };
            let (lda, ldb, ldc) = (rows_a + 3, rows_b + 1, m + 2);
            let a: Vec<f32> = (0..lda * cols_a).map(|_| value()).collect();
            let b: Vec<f32> = (0..ldb * cols_b).map(|_| value()).collect();
            let c0: Vec<f32> = (0..ldc * n).map(|_| value()).collect();
            let op_a = |i: usize, l: usize| if transa == Transpose::No { a[i + l * lda] } else { a[l + i * lda] };
            let op_b = |l: usize, j: usize| if transb == Transpose::No { b[l + j * ldb] } else { b[j + l * ldb] };
            let upload = |v: &[f32]| {
                let p = device.alloc(v.len() * 4).unwrap();
                device.copy_to_device(p, bytemuck::cast_slice(v)).unwrap();
                p
            };
            let (pa, pb, pc) = (upload(&a), upload(&b), upload(&c0));
            let call = GemmCall {
                transa,
                transb,
                m,
                n,
                k,
                alpha: 1.5,
                a: pa,
                lda,
                b: pb,
                ldb,
                beta: 0.5,
                c: pc,
                ldc,
                dtype: DType::F32,
                c_dtype: DType::F32,
            };
            device.gemm(&call).unwrap();
            let mut c = vec![0f32; ldc * n];
            device.copy_to_host(pc, bytemuck::cast_slice_mut(&mut c)).unwrap();
            for j in 0..n {
                for i in 0..ldc {
                    let expected = if i < m {
                        1.5 * (0..k).map(|l| op_a(i, l) * op_b(l, j)).sum::<f32>() + 0.5 * c0[i + j * ldc]
                    } else {
                        c0[i + j * ldc] // padding rows are never written
                    };
                    assert!((c[i + j * ldc] - expected).abs() < 1e-4, "{transa:?}/{transb:?} C[{i},{j}]");
                }
            }
            // cuBLAS refuses a leading dimension smaller than the rows; an operand reaching past
            // its allocation is caught too.
            assert!(device.gemm(&GemmCall { lda: rows_a - 1, ..call }).is_err());
            assert!(device.gemm(&GemmCall { ldb: ldb * 4, ..call }).is_err());
        }
    }
}

#[test]
fn linear_with_and_without_bias_matches_the_cpu() {
    for dtype in DTYPES {
        let mut r = rig(dtype, 4);
        let (x_cpu, x_cuda) = r.tensors(5, 40, 1.0);
        let (w_cpu, w_cuda) = r.weights(&[33, 40], 0.5);
        let (b_cpu, b_cuda) = r.weights(&[33], 0.5);
        let ours = r.cuda.linear(&x_cuda, &w_cuda, None).unwrap();
        let reference = CpuBackend.linear(&x_cpu, &w_cpu, None).unwrap();
        assert_close("linear", dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
        let ours = r.cuda.linear(&x_cuda, &w_cuda, Some(&b_cuda)).unwrap();
        let reference = CpuBackend.linear(&x_cpu, &w_cpu, Some(&b_cpu)).unwrap();
        assert_close("linear + bias", dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
        let wrong = r.cuda.tensor_from_f32(&[0.0; 12], 3, 4).unwrap();
        assert!(r.cuda.linear(&wrong, &w_cuda, None).is_err());
    }
}

#[test]
fn norms_adds_and_silu_match_the_cpu() {
    for dtype in DTYPES {
        for width in [64, 1000] {
            let mut r = rig(dtype, 4);
            let (h_cpu, mut h_cuda) = r.tensors(3, width, 2.0);
            let (d_cpu, d_cuda) = r.tensors(3, width, 2.0);
            let (w_cpu, w_cuda) = r.weights(&[width], 1.0);
            let what = format!("width {width}");

            let ours = r.cuda.rms_norm(&h_cuda, &w_cuda, 1e-5).unwrap();
            let reference = CpuBackend.rms_norm(&h_cpu, &w_cpu, 1e-5).unwrap();
            assert_close(&format!("rms_norm {what}"), dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);

            let mut h_ref = h_cpu.clone();
            let reference = CpuBackend.add_rms_norm(&mut h_ref, &d_cpu, &w_cpu, 1e-5).unwrap();
            let ours = r.cuda.add_rms_norm(&mut h_cuda, &d_cuda, &w_cuda, 1e-5).unwrap();
            assert_close(&format!("add_rms_norm {what}"), dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
            assert_close(&format!("add_rms_norm sum {what}"), dtype, &r.cuda.to_host(&h_cuda).unwrap(), &h_ref.data);

            r.cuda.add_assign(&mut h_cuda, &d_cuda).unwrap();
            CpuBackend.add_assign(&mut h_ref, &d_cpu).unwrap();
            assert_close(&format!("add {what}"), dtype, &r.cuda.to_host(&h_cuda).unwrap(), &h_ref.data);

            let ours = r.cuda.silu_mul(&h_cuda, &d_cuda).unwrap();
            let reference = CpuBackend.silu_mul(&h_ref, &d_cpu).unwrap();
            assert_close(&format!("silu_mul {what}"), dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
        }
    }
}

#[test]
fn embedding_and_row_gathers_copy_the_right_rows() {
    for dtype in DTYPES {
        let mut r = rig(dtype, 4);
        let (table_cpu, table_cuda) = r.weights(&[50, 24], 1.0);
        let layout = BatchLayout {
            token_ids: vec![3, 49, 0, 3],
            positions: vec![0, 1, 2, 3],
            slot_mapping: vec![0, 1, 2, 3],
            seqs: vec![SeqLayout { query_start: 0, query_len: 4, context_len: 4, block_table: vec![0] }],
        };
        let ours = r.cuda.embedding(&table_cuda, &r.cuda.prepare_batch(&layout).unwrap()).unwrap();
        let reference = CpuBackend.embedding(&table_cpu, &CpuBackend.prepare_batch(&layout).unwrap()).unwrap();
        assert_eq!(r.cuda.to_host(&ours).unwrap(), reference.data);
        let gathered = r.cuda.gather_rows(&ours, &[3, 1]).unwrap();
        assert_eq!(r.cuda.to_host(&gathered).unwrap(), CpuBackend.gather_rows(&reference, &[3, 1]).unwrap().data);
        assert!(r.cuda.gather_rows(&ours, &[4]).is_err());
        let bad = BatchLayout { token_ids: vec![50, 0, 0, 0], ..layout };
        let err = r.cuda.embedding(&table_cuda, &r.cuda.prepare_batch(&bad).unwrap()).err().unwrap();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}

/// Sequences given as (context length, query length): the query is the last tokens of the
/// context, the rest is already in the cache (a prefix hit or an earlier chunk).
struct AttentionCase {
    head_dim: usize,
    num_heads: usize,
    num_kv_heads: usize,
    seqs: Vec<(usize, usize)>,
    sliding_window: Option<usize>,
    num_sms: usize,
}

const BLOCK_SIZE: usize = 16;

/// Runs one case on both backends: the cache filled through `write_kv_cache` (all context tokens),
/// then attention of the query tokens, on the emulated device in every thread order.
fn check_attention(case: &AttentionCase, dtype: DType) {
    let mut r = rig(dtype, case.num_sms);
    let kv_width = case.num_kv_heads * case.head_dim;
    let num_blocks: usize = case.seqs.iter().map(|(c, _)| c.div_ceil(BLOCK_SIZE)).sum::<usize>() + 5;
    // Physical blocks handed out in a scrambled order.
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, r.rng.next_u32() as usize % (i + 1));
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
    };
    fill.validate(&shape).unwrap();
    attend.validate(&shape).unwrap();

    let mut cpu_cache = CpuBackend.new_kv_cache(shape).unwrap();
    let mut cuda_cache = r.cuda.new_kv_cache(shape).unwrap();
    r.cuda.poison_kv_cache(&mut cuda_cache).unwrap();
    let (k_cpu, k_cuda) = r.tensors(fill.num_tokens(), kv_width, 1.0);
    let (v_cpu, v_cuda) = r.tensors(fill.num_tokens(), kv_width, 1.0);
    let cpu_fill = CpuBackend.prepare_batch(&fill).unwrap();
    CpuBackend.write_kv_cache(&mut cpu_cache, 0, &k_cpu, &v_cpu, &cpu_fill).unwrap();
    r.cuda.write_kv_cache(&mut cuda_cache, 0, &k_cuda, &v_cuda, &r.cuda.prepare_batch(&fill).unwrap()).unwrap();

    let (q_cpu, q_cuda) = r.tensors(attend.num_tokens(), case.num_heads * case.head_dim, 1.0);
    let params = AttentionParams {
        num_heads: case.num_heads,
        num_kv_heads: case.num_kv_heads,
        head_dim: case.head_dim,
        scale: 1.0 / (case.head_dim as f32).sqrt(),
        sliding_window: case.sliding_window,
    };
    let reference = CpuBackend
        .paged_attention(&q_cpu, &cpu_cache, 0, &CpuBackend.prepare_batch(&attend).unwrap(), &params)
        .unwrap();
    let cuda_batch = r.cuda.prepare_batch(&attend).unwrap();
    for (thread_order, seed) in [(ThreadOrder::Forward, 1), (ThreadOrder::Reverse, 1), (ThreadOrder::Random, 5)] {
        r.device.set_thread_order(thread_order, seed);
        let ours = r.cuda.paged_attention(&q_cuda, &cuda_cache, 0, &cuda_batch, &params).unwrap();
        let what = format!(
            "attention head_dim {} heads {}/{} seqs {:?} window {:?} ({thread_order:?})",
            case.head_dim, case.num_heads, case.num_kv_heads, case.seqs, case.sliding_window
        );
        assert_close(&what, dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
    }
}

/// Lengths around a block boundary, a partial last block, a chunk attending to its cached prefix.
const MIXED_SEQS: [(usize, usize); 6] = [(1, 1), (15, 15), (16, 16), (17, 17), (40, 8), (37, 1)];

#[test]
fn attention_matches_the_cpu_for_every_dtype() {
    for dtype in DTYPES {
        let case = AttentionCase {
            head_dim: 128,
            num_heads: 8,
            num_kv_heads: 2,
            seqs: MIXED_SEQS.to_vec(),
            sliding_window: None,
            num_sms: 64,
        };
        check_attention(&case, dtype);
    }
}

#[test]
fn attention_matches_the_cpu_for_every_group_size_and_head_dim() {
    // GQA 1, a group of 3 in the bucket of 4 (padding heads), GQA 8, and the fixtures' head_dim 16.
    for (head_dim, num_heads, num_kv_heads) in [(64, 4, 4), (64, 6, 2), (128, 8, 1), (16, 4, 2)] {
        let case = AttentionCase {
            head_dim,
            num_heads,
            num_kv_heads,
            seqs: MIXED_SEQS.to_vec(),
            sliding_window: None,
            num_sms: 64,
        };
        check_attention(&case, DType::BF16);
    }
}

#[test]
fn attention_honours_a_sliding_window() {
    let case = AttentionCase {
        head_dim: 64,
        num_heads: 4,
        num_kv_heads: 2,
        seqs: vec![(40, 40), (33, 1), (5, 5)],
        sliding_window: Some(9),
        num_sms: 64,
    };
    check_attention(&case, DType::F32);
}

#[test]
fn attention_split_over_the_sequence_merges_to_the_same_result() {
    // 4 SMs: one decode of 600 keys takes 2 splits; with a second, short sequence 1,100 keys take
    // 4, and the short sequence's later splits see no key at all.
    assert_eq!(super::geometry::attention_splits(1, 2, 600, 4), 2);
    assert_eq!(super::geometry::attention_splits(2, 2, 1100, 4), 4);
    for seqs in [vec![(600, 1)], vec![(1100, 1), (5, 1)]] {
        let case =
            AttentionCase { head_dim: 64, num_heads: 8, num_kv_heads: 2, seqs, sliding_window: None, num_sms: 4 };
        check_attention(&case, DType::F32);
    }
}

#[test]
fn fused_rotary_and_cache_write_match_the_unfused_cpu_path() {
    for dtype in DTYPES {
        let mut r = rig(dtype, 64);
        let (head_dim, num_heads, num_kv_heads) = (64, 4, 2);
        let shape = KvCacheShape { num_layers: 2, num_blocks: 4, block_size: BLOCK_SIZE, num_kv_heads, head_dim };
        let n = 20;
        let layout = BatchLayout {
            token_ids: vec![0; n],
            positions: (0..n as u32).collect(),
            slot_mapping: (0..n as u32).map(|p| if p < 16 { 48 + p } else { p - 16 }).collect(),
            seqs: vec![SeqLayout { query_start: 0, query_len: n, context_len: n, block_table: vec![3, 0] }],
        };
        let rope = RopeConfig { theta: 10000.0, scaling: RopeScaling::None };
        let table = crate::model::rope::cos_sin_table(&rope, head_dim, 64);
        let cpu_table = CpuBackend.weight_from_f32(table.clone(), [64, head_dim]).unwrap();
        let cuda_table = r.cuda.weight_from_f32(table, [64, head_dim]).unwrap();
        let (mut q_cpu, mut q_cuda) = r.tensors(n, num_heads * head_dim, 1.0);
        let (mut k_cpu, mut k_cuda) = r.tensors(n, num_kv_heads * head_dim, 1.0);
        let (v_cpu, v_cuda) = r.tensors(n, num_kv_heads * head_dim, 1.0);
        let params = AttentionParams { num_heads, num_kv_heads, head_dim, scale: 0.125, sliding_window: None };
        let mut cpu_cache = CpuBackend.new_kv_cache(shape).unwrap();
        let mut cuda_cache = r.cuda.new_kv_cache(shape).unwrap();
        r.cuda.poison_kv_cache(&mut cuda_cache).unwrap();
        let cpu_batch = CpuBackend.prepare_batch(&layout).unwrap();
        let cuda_batch = r.cuda.prepare_batch(&layout).unwrap();
        // Layer 1, so that a write landing in layer 0 would be missed by the attention below.
        CpuBackend
            .rotary_write_kv_cache(&mut q_cpu, &mut k_cpu, &v_cpu, &mut cpu_cache, 1, &cpu_table, &cpu_batch, &params)
            .unwrap();
        r.cuda
            .rotary_write_kv_cache(
                &mut q_cuda,
                &mut k_cuda,
                &v_cuda,
                &mut cuda_cache,
                1,
                &cuda_table,
                &cuda_batch,
                &params,
            )
            .unwrap();
        assert_close("rotated q", dtype, &r.cuda.to_host(&q_cuda).unwrap(), &q_cpu.data);
        assert_close("rotated k", dtype, &r.cuda.to_host(&k_cuda).unwrap(), &k_cpu.data);
        let reference = CpuBackend.paged_attention(&q_cpu, &cpu_cache, 1, &cpu_batch, &params).unwrap();
        let ours = r.cuda.paged_attention(&q_cuda, &cuda_cache, 1, &cuda_batch, &params).unwrap();
        assert_close("attention over the written cache", dtype, &r.cuda.to_host(&ours).unwrap(), &reference.data);
        // A position beyond the rotary table is refused before any launch.
        let far = BatchLayout { positions: vec![64; n], ..layout };
        let err = r.cuda.rotary(&mut q_cuda, num_heads, head_dim, &cuda_table, &r.cuda.prepare_batch(&far).unwrap());
        assert!(err.unwrap_err().to_string().contains("beyond the rotary table"));
    }
}

#[test]
fn a_launch_with_the_wrong_arguments_is_an_error_not_a_crash() {
    let r = rig(DType::F32, 4);
    let err = r.device.launch("pagoda_add_f32", super::geometry::elementwise(4), &[]).unwrap_err();
    assert!(err.to_string().contains("takes 3 arguments, 0 given"), "{err}");
    let err = r.device.launch("pagoda_no_such_kernel", super::geometry::elementwise(4), &[]).unwrap_err();
    assert!(err.to_string().contains("no kernel named"), "{err}");
}
