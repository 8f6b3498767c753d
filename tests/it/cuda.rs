//! The whole model through the CUDA backend's code with no GPU: the emulated device runs the real
//! kernels of `kernels/*.cu` (compiled for the CPU) and cuBLAS's GEMM semantics, and the results
//! must reproduce transformers' outputs and the CPU engine's batching invariance.
//!
//! Built only with the `cuda-emu` feature (./test.sh turns it on); without it the test below says
//! it did not run.

#[cfg(not(feature = "cuda-emu"))]
#[test]
fn cuda_backend_under_emulation() {
    crate::common::tool_missing("the CUDA emulation is not built (cargo test --features cuda-emu, as ./test.sh runs)");
}

#[cfg(feature = "cuda-emu")]
mod emulated {
    use std::sync::Arc;

    use pagoda::backend::cuda::CudaBackend;
    use pagoda::backend::cuda::device::DeviceHandle;
    use pagoda::backend::cuda::emulated::EmulatedDevice;
    use pagoda::backend::{BatchLayout, SeqLayout};
    use pagoda::engine::sampler::argmax;
    use pagoda::launch::DeviceKind;
    use pagoda::model::{Executor, ModelFiles, ModelRunner};
    use pagoda::weights::{DType, WeightStore};

    use crate::common::*;

    /// Largest |logit difference| to transformers (f32 arithmetic) per compute dtype, for logits of
    /// up to ~8.5 in magnitude. f32 is held to the CPU's tolerance. In f16 and bf16 every
    /// activation, weight and cache entry is rounded; the fixtures' large random weights amplify
    /// that, and the measured worst cases are 0.048 (f16, 11 bits of mantissa) and 0.58 (bf16, 8
    /// bits: the same error times 2³ within noise). The f32 run is what proves the arithmetic.
    fn logits_tolerance(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 1e-3,
            DType::F16 => 0.1,
            DType::BF16 => 0.8,
        }
    }

    fn reference_logits(model: &str, prompt_idx: usize, num_rows: usize) -> Vec<f32> {
        let store = WeightStore::open_file(&fixture(model).join("reference_logits.safetensors")).unwrap();
        store.tensor(&format!("prompt{prompt_idx}"), &[num_rows, 1024]).unwrap().to_f32_vec()
    }

    /// The logits of every position of `tokens`, computed in chunks of `chunk` tokens through the
    /// CUDA backend on an emulated device, blocks laid out in reverse and every unwritten cache
    /// slot NaN.
    fn cuda_logits(files: &ModelFiles, dtype: DType, tokens: &[u32], chunk: usize) -> Vec<f32> {
        let block_size = 16;
        let num_blocks = tokens.len().div_ceil(block_size) + 2;
        let device = Arc::new(EmulatedDevice::new(1 << 30, 4));
        let backend = CudaBackend::new(DeviceHandle::new(device), dtype);
        let mut runner = ModelRunner::new(backend, files, 512, num_blocks, block_size).unwrap();
        let (backend, cache) = runner.backend_and_kv_cache();
        backend.poison_kv_cache(cache).unwrap();
        let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
        let mut all = Vec::new();
        for start in (0..tokens.len()).step_by(chunk) {
            let end = (start + chunk).min(tokens.len());
            let slot = |p: usize| block_table[p / block_size] * block_size as u32 + (p % block_size) as u32;
            let layout = BatchLayout {
                token_ids: tokens[start..end].to_vec(),
                positions: (start as u32..end as u32).collect(),
                slot_mapping: (start..end).map(slot).collect(),
                seqs: vec![SeqLayout {
                    query_start: 0,
                    query_len: end - start,
                    context_len: end,
                    block_table: block_table.clone(),
                }],
            };
            let rows: Vec<u32> = (0..(end - start) as u32).collect();
            all.extend(runner.execute(&layout, &rows).unwrap());
        }
        all
    }

    #[test]
    fn fixtures_logits_and_greedy_choices_match_transformers() {
        // Both fixtures (f32 and bf16 weights) computed in every dtype.
        for (model, dtype) in MODELS.iter().flat_map(|&m| [DType::F32, DType::F16, DType::BF16].map(|d| (m, d))) {
            let files = ModelFiles::load(&fixture(model)).unwrap();
            let tolerance = logits_tolerance(dtype);
            for (idx, p) in reference(model).prompts.iter().enumerate() {
                let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
                let expected = reference_logits(model, idx, tokens.len());
                for chunk in [tokens.len(), 7, 1] {
                    let ours = cuda_logits(&files, dtype, &tokens, chunk);
                    let worst = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    let largest = expected.iter().map(|a| a.abs()).fold(0f32, f32::max);
                    assert!(
                        worst <= tolerance,
                        "{model} in {dtype}, prompt {idx}, chunks of {chunk}: |logit difference| {worst} > {tolerance} \
                         (largest |logit| {largest})"
                    );
                    // The greedy token after each generated prefix, wherever the reference margin
                    // is wider than what this dtype can blur.
                    let first = p.prompt_ids.len() - 1;
                    for (step, s) in p.steps.iter().enumerate() {
                        if s.margin > 2.0 * tolerance {
                            let row = &ours[(first + step) * 1024..(first + step + 1) * 1024];
                            assert_eq!(argmax(row), p.greedy_ids[step], "{model} in {dtype}, prompt {idx} step {step}");
                        }
                    }
                }
            }
        }
    }

    /// The CPU engine's batching test, on the CUDA backend: requests alone and together (chunked,
    /// preempted) give the same greedy tokens, and the same as the CPU engine gives.
    #[test]
    fn greedy_tokens_do_not_depend_on_batching_and_equal_the_cpu_engine() {
        let reference = reference("tiny-llama");
        let stream: Vec<u32> =
            reference.prompts.iter().flat_map(|p| p.prompt_ids[1..].to_vec()).cycle().take(2000).collect();
        let prompts: Vec<Vec<u32>> = (0..12)
            .map(|i| {
                let mut p = vec![0];
                p.extend_from_slice(&stream[(i * 53) % 1000..][..(i * 37) % 90]);
                p
            })
            .collect();
        let max_tokens = |i: usize| 6 + (i * 5) % 11;
        let on_cuda = |o: &mut pagoda::launch::EngineOptions| {
            o.device = DeviceKind::EmulatedCuda;
            o.dtype = Some(DType::F32);
            o.max_model_len = Some(128);
        };
        let mut alone = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut cuda = engine("tiny-llama", on_cuda);
            let ours = run(&mut cuda, vec![request("a", p.clone(), greedy(max_tokens(i)))]).remove(0).token_ids;
            let mut cpu = engine("tiny-llama", |o| o.max_model_len = Some(128));
            let cpu_tokens = run(&mut cpu, vec![request("a", p.clone(), greedy(max_tokens(i)))]).remove(0).token_ids;
            assert_eq!(ours, cpu_tokens, "prompt {i}: the CUDA backend and the CPU disagree");
            alone.push(ours);
        }
        let mut engine = engine("tiny-llama", |o| {
            on_cuda(o);
            o.num_gpu_blocks_override = Some(10);
            o.max_num_batched_tokens = 48;
        });
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(&format!("{i:02}"), p.clone(), greedy(max_tokens(i))))
            .collect();
        let together = run(&mut engine, requests);
        let stats = engine.stats();
        assert!(stats.num_preemptions > 0, "10 blocks were meant to force preemption");
        assert_eq!(stats.kv_cache_usage, 0.0, "every block returns to the pool");
        for (i, c) in together.iter().enumerate() {
            assert_eq!(c.token_ids, alone[i], "request {i} changed when batched on the CUDA backend");
        }
    }
}
