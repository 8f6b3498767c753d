//! The CUDA backend on the emulated device: the conformance checks against the CPU backend
//! (`selftest::ops`, the same ones `pagoda selftest` runs on a GPU) with the emulator's tight
//! tolerances and attention in three thread orders, GEMMs against cuBLAS's documented semantics,
//! and the errors a bad launch or batch gives.

use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::device::{Device, DeviceHandle, GemmCall, Transpose};
use super::emulated::{EmulatedDevice, ThreadOrder};
use crate::backend::{Backend, BatchLayout, SeqLayout};
use crate::selftest::ops::{self as conformance, Check, Rig, Tolerances};
use crate::weights::DType;

/// An emulated device with 4 multiprocessors, so that long contexts are split.
fn emulated() -> (Arc<EmulatedDevice>, DeviceHandle) {
    let device = Arc::new(EmulatedDevice::new(1 << 30, 4));
    (device.clone(), DeviceHandle::new(device))
}

fn assert_all_pass(checks: &[Check]) {
    assert!(!checks.is_empty());
    for c in checks {
        assert!(c.passed(), "{} ({}): relative error {} > {}", c.name, c.dtype, c.error, c.tolerance);
    }
}

fn rig(dtype: DType) -> Rig {
    Rig::new(&emulated().1, dtype, Tolerances::EMULATED)
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
fn linear_with_and_without_bias_and_the_logits_match_the_cpu() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::linear(&mut rig(dtype)).unwrap());
        let r = rig(dtype);
        let wrong = r.cuda.tensor_from_f32(&[0.0; 12], 3, 4).unwrap();
        let (_, w) = rig(dtype).weights(&[5, 6], 1.0).unwrap();
        assert!(r.cuda.linear(&wrong, &w, None).is_err());
    }
}

#[test]
fn stacked_projections_split_into_the_separate_results() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::stacked_linear(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn norms_adds_and_silu_match_the_cpu() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::small_ops(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn fused_rotary_and_cache_write_match_the_unfused_cpu_path() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::fused_rotary(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn greedy_picks_on_the_device_equal_the_host_argmax() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::argmax(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn every_sampling_rule_on_the_device_picks_what_the_host_picks() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::sampling(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn dummy_weights_are_the_hosts_stream() {
    for dtype in conformance::DTYPES {
        assert_all_pass(&conformance::dummy_weights(&mut rig(dtype)).unwrap());
    }
}

#[test]
fn attention_matches_the_cpu_in_every_case_and_thread_order() {
    let (device, handle) = emulated();
    let orders: [&dyn Fn(); 3] = [
        &|| device.set_thread_order(ThreadOrder::Forward, 1),
        &|| device.set_thread_order(ThreadOrder::Reverse, 1),
        &|| device.set_thread_order(ThreadOrder::Random, 5),
    ];
    let mut num_checks = 0;
    for (case, dtypes) in conformance::attention_cases() {
        for dtype in dtypes {
            let mut rig = Rig::new(&handle, dtype, Tolerances::EMULATED);
            let setup = conformance::attention_setup(&mut rig, &case).unwrap();
            for order in orders {
                order();
                let check = conformance::attention_check(&rig, &case, &setup).unwrap();
                assert_all_pass(std::slice::from_ref(&check));
                num_checks += 1;
            }
        }
    }
    assert_eq!(num_checks, 3 * 24);
}

#[test]
fn steps_with_prompt_chunks_use_the_prefill_kernel_and_decode_steps_the_decode_kernel() {
    let (device, handle) = emulated();
    let attention_kernels = |seqs: &[(usize, usize)]| {
        let case = conformance::AttentionCase {
            head_dim: 64,
            num_heads: 4,
            num_kv_heads: 2,
            seqs: seqs.to_vec(),
            sliding_window: None,
        };
        let mut rig = Rig::new(&handle, DType::BF16, Tolerances::EMULATED);
        let setup = conformance::attention_setup(&mut rig, &case).unwrap();
        device.take_launched();
        assert_all_pass(&[conformance::attention_check(&rig, &case, &setup).unwrap()]);
        device.take_launched()
    };
    assert_eq!(attention_kernels(&conformance::MIXED_SEQS), ["pagoda_prefill_attention_h64_g2_bf16"]);
    assert_eq!(attention_kernels(&conformance::DECODE_SEQS), ["pagoda_paged_attention_h64_g2_bf16"]);
}

#[test]
fn long_contexts_on_few_multiprocessors_are_split() {
    // What the split cases of conformance::attention_cases rely on, on the emulated device's 4 SMs.
    assert_eq!(super::geometry::attention_splits(1, 2, 600, 4), 2);
    assert_eq!(super::geometry::attention_splits(2, 2, 1100, 4), 4);
}

#[test]
fn the_whole_conformance_run_passes() {
    let (_, handle) = emulated();
    let checks = conformance::run_all(&handle, Tolerances::EMULATED, &[&|| ()]).unwrap();
    assert_all_pass(&checks);
}

#[test]
fn embedding_and_row_gathers_copy_the_right_rows_and_refuse_bad_ids() {
    for dtype in conformance::DTYPES {
        let mut r = rig(dtype);
        assert_all_pass(&conformance::gathers(&mut r).unwrap());
        let (_, table) = r.weights(&[50, 24], 1.0).unwrap();
        let layout = BatchLayout {
            token_ids: vec![50, 0],
            positions: vec![0, 1],
            slot_mapping: vec![0, 1],
            seqs: vec![SeqLayout { query_start: 0, query_len: 2, context_len: 2, block_table: vec![0] }],
        };
        let err = r.cuda.embedding(&table, &r.cuda.prepare_batch(&layout).unwrap()).err().unwrap();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        let (_, x) = r.tensors(2, 3, 1.0).unwrap();
        assert!(r.cuda.gather_rows(&x, &[2]).is_err());
    }
}

#[test]
fn a_launch_with_the_wrong_arguments_is_an_error_not_a_crash() {
    let (device, _) = emulated();
    let err = device.launch("pagoda_add_f32", super::geometry::elementwise(4), &[]).unwrap_err();
    assert!(err.to_string().contains("takes 3 arguments, 0 given"), "{err}");
    let err = device.launch("pagoda_no_such_kernel", super::geometry::elementwise(4), &[]).unwrap_err();
    assert!(err.to_string().contains("no kernel named"), "{err}");
}

/// The runners of [`decode_steps_replay_graphs_and_give_what_eager_steps_give`]: a small model
/// with a head size the kernels serve, on one emulated device.
fn graph_test_runner(handle: &DeviceHandle, graph_sizes: &[usize]) -> crate::model::ModelRunner<super::CudaBackend> {
    use crate::model::demo::DemoSpec;
    let spec = DemoSpec {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        vocab_size: 300,
        max_position_embeddings: 256,
        ..DemoSpec::demo()
    };
    let files = crate::model::ModelFiles::demo(&spec).unwrap();
    let backend = super::CudaBackend::new(handle.clone(), DType::F32);
    let mut runner = crate::model::ModelRunner::new(backend, &files, 128, 16, 16).unwrap();
    if !graph_sizes.is_empty() {
        assert_eq!(runner.capture_decode_graphs(graph_sizes, 128).unwrap(), graph_sizes.len());
    }
    runner
}

/// Decode steps a graph covers replay it (padded to the graph's size with tokens that write no
/// cache slot) and give the eager steps' logits; prefill steps and decode steps larger than every
/// graph run eagerly; a step of a shape seen before allocates nothing.
#[test]
fn decode_steps_replay_graphs_and_give_what_eager_steps_give() {
    use crate::model::Executor;
    let (device, handle) = emulated();
    let mut eager = graph_test_runner(&handle, &[]);
    let mut graphed = graph_test_runner(&handle, &[1, 2, 4]);
    // Five sequences of 3, 9, 16, 17 and 20 prompt tokens; sequence s owns blocks 2s and 2s + 1.
    let lens = [3usize, 9, 16, 17, 20];
    let step = |seqs: &[usize], start: &dyn Fn(usize) -> usize, len: &dyn Fn(usize) -> usize| {
        let mut layout = BatchLayout::default();
        for &s in seqs {
            let (from, n) = (start(s), len(s));
            layout.seqs.push(SeqLayout {
                query_start: layout.token_ids.len(),
                query_len: n,
                context_len: from + n,
                block_table: vec![2 * s as u32, 2 * s as u32 + 1],
            });
            for p in from..from + n {
                layout.token_ids.push((7 * s + 3 * p + 1) as u32 % 300);
                layout.positions.push(p as u32);
                layout.slot_mapping.push((2 * s * 16 + p) as u32);
            }
        }
        let rows: Vec<u32> = layout.seqs.iter().map(|q| (q.query_start + q.query_len - 1) as u32).collect();
        (layout, rows)
    };
    let run = |eager: &mut dyn Executor, graphed: &mut dyn Executor, (layout, rows): (BatchLayout, Vec<u32>)| {
        let before = device.num_replays();
        let a = eager.execute(&layout, &rows).unwrap();
        let b = graphed.execute(&layout, &rows).unwrap();
        assert_eq!(a.len(), rows.len() * 300);
        let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(diff <= 1e-5 * norm, "graphed logits differ: {diff} of {norm}");
        device.num_replays() - before
    };
    let all = [0, 1, 2, 3, 4];
    assert_eq!(run(&mut eager, &mut graphed, step(&all, &|_| 0, &|s| lens[s])), 0, "prefill runs eagerly");
    let mut pos = lens;
    // Decode steps of 3 (the graph of 4), 1, 3 again (reading what the first wrote), and 5.
    for (i, seqs) in [&[0, 2, 4][..], &[1], &[0, 2, 4], &all].into_iter().enumerate() {
        let allocs = device.num_allocs();
        let replays = run(&mut eager, &mut graphed, step(seqs, &|s| pos[s], &|_| 1));
        assert_eq!(replays, u64::from(seqs.len() <= 4), "decode of {} sequences", seqs.len());
        if i == 2 {
            // A step of a shape run before takes every buffer from the pool, eager or replayed.
            assert_eq!(device.num_allocs(), allocs, "a warmed-up decode step allocated device memory");
        }
        for &s in seqs {
            pos[s] += 1;
        }
    }
}

/// Inside a capture, CUDA refuses host copies; the capture ends anyway and the device works on.
#[test]
fn a_capture_refuses_host_copies_and_leaves_the_device_usable() {
    let (_, handle) = emulated();
    let err = handle.capture(|| handle.upload(&[1, 2, 3])).err().unwrap();
    assert!(err.to_string().contains("not permitted while a graph is being captured"), "{err}");
    assert_eq!(handle.upload(&[4, 5]).unwrap().to_host().unwrap()[..2], [4, 5]);
    // A captured launch runs only when replayed.
    let buf = handle.upload(&[0u8; 16]).unwrap();
    let ptr = buf.ptr();
    let (graph, ()) = handle
        .capture(|| {
            handle.device().launch(
                "pagoda_add_f32",
                super::geometry::elementwise(4),
                &[
                    super::device::KernelArg::Ptr(ptr),
                    super::device::KernelArg::Ptr(ptr),
                    super::device::KernelArg::U32(4),
                ],
            )
        })
        .unwrap();
    let ones: Vec<u8> = [1f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect();
    handle.device().copy_to_device(ptr, &ones).unwrap();
    graph.replay().unwrap();
    graph.replay().unwrap();
    let out = buf.to_host().unwrap();
    assert_eq!(f32::from_le_bytes(out[..4].try_into().unwrap()), 4.0, "x += x twice");
}
