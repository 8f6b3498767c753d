//! The whole model through the CUDA backend against transformers' outputs (the reference fixtures:
//! tiny models with `reference.json` and `reference_logits.safetensors`), and the engine's
//! batching invariance on the device. The integration tests run these on the emulated device;
//! `pagoda selftest --fixtures DIR` runs them on a GPU.

use std::path::Path;

use serde_json::Value;

use super::Row;
use crate::backend::cuda::CudaBackend;
use crate::backend::cuda::device::DeviceHandle;
use crate::backend::sampling::argmax;
use crate::backend::{Backend, BatchLayout, KvCacheShape, SeqLayout, cache_slot};
use crate::engine::{EngineRequest, MaxTokens, RequestId, SamplingParams};
use crate::launch::{DeviceKind, EngineOptions, load_engine};
use crate::model::{Executor, ModelFiles, ModelRunner};
use crate::weights::{DType, WeightStore};

/// The fixture models, one with f32 weights and one with bf16.
pub const MODELS: [&str; 2] = ["tiny-llama", "tiny-llama-bf16"];

/// Largest |logit difference| to transformers (f32 arithmetic) per compute dtype, for logits of up
/// to ~8.5 in magnitude. f32 is held to the CPU backend's tolerance. In f16 and bf16 every
/// activation, weight and cache entry is rounded and the fixtures' large random weights amplify
/// that: the worst cases measured on the emulated device are 0.048 (f16, 11 bits of mantissa) and
/// 0.58 (bf16, 8 bits: the same error times 2³ within noise). The f32 run proves the arithmetic.
pub fn logits_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-3,
        DType::F16 => 0.1,
        DType::BF16 => 0.8,
    }
}

struct Prompt {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    margins: Vec<f32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
}

fn prompts(model_dir: &Path) -> Result<Vec<Prompt>, String> {
    let path = model_dir.join("reference.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts = v["prompts"].as_array().ok_or_else(|| format!("{}: no prompts", path.display()))?;
    Ok(prompts
        .iter()
        .map(|p| Prompt {
            prompt_ids: ids(&p["prompt_ids"]),
            greedy_ids: ids(&p["greedy_ids"]),
            margins: p["steps"]
                .as_array()
                .map(|s| s.iter().map(|s| s["margin"].as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default(),
        })
        .collect())
}

/// The logits of every position of `tokens`, computed in chunks of `chunk` tokens with the
/// runner's KV cache blocks used in reverse order (so paging is really exercised). The cache must
/// hold `tokens`.
pub fn chunked_logits<B: Backend>(
    runner: &mut ModelRunner<B>,
    tokens: &[u32],
    chunk: usize,
) -> Result<Vec<f32>, String> {
    let KvCacheShape { block_size, num_blocks, .. } = runner.kv_cache_shape();
    let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut all = Vec::new();
    for start in (0..tokens.len()).step_by(chunk) {
        let end = (start + chunk).min(tokens.len());
        let slot = |p: usize| cache_slot(&block_table, p, block_size);
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
        all.extend(runner.execute(&layout, &rows).map_err(|e| e.to_string())?);
    }
    Ok(all)
}

/// [`chunked_logits`] through the CUDA backend, every cache slot NaN until written.
fn logits(
    handle: &DeviceHandle,
    files: &ModelFiles,
    dtype: DType,
    tokens: &[u32],
    chunk: usize,
) -> Result<Vec<f32>, String> {
    let block_size = 16;
    let num_blocks = tokens.len().div_ceil(block_size) + 2;
    let backend = CudaBackend::new(handle.clone(), dtype);
    let mut runner = ModelRunner::new(backend, files, 512, num_blocks, block_size).map_err(|e| e.to_string())?;
    let (backend, cache) = runner.backend_and_kv_cache();
    backend.poison_kv_cache(cache).map_err(|e| e.to_string())?;
    chunked_logits(&mut runner, tokens, chunk)
}

/// Both fixtures in every dtype, each prompt in one pass, in chunks of 7 and of 1: the largest
/// logit difference to transformers, and the greedy token after every generated prefix wherever
/// the reference margin is wider than twice the dtype's tolerance.
pub fn logits_rows(handle: &DeviceHandle, fixtures: &Path) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for model in MODELS {
        let dir = fixtures.join(model);
        let files = ModelFiles::load(&dir).map_err(|e| e.to_string())?;
        let vocab = files.config.vocab_size;
        let prompts = prompts(&dir)?;
        let reference = WeightStore::open_file(&dir.join("reference_logits.safetensors")).map_err(|e| e.to_string())?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tolerance = logits_tolerance(dtype);
            let (mut worst, mut greedy_checked, mut greedy_wrong) = (0f32, 0, 0);
            for (idx, p) in prompts.iter().enumerate() {
                let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
                let expected = reference
                    .tensor(&format!("prompt{idx}"), &[tokens.len(), vocab])
                    .map_err(|e| e.to_string())?
                    .to_f32_vec();
                for chunk in [tokens.len(), 7, 1] {
                    let ours = logits(handle, &files, dtype, &tokens, chunk)?;
                    for (a, b) in ours.iter().zip(&expected) {
                        // NaN counts as an infinite difference.
                        let d = (a - b).abs();
                        worst = if d.is_nan() { f32::INFINITY } else { worst.max(d) };
                    }
                    let first = p.prompt_ids.len() - 1;
                    for (step, &margin) in p.margins.iter().enumerate() {
                        if margin > 2.0 * tolerance {
                            greedy_checked += 1;
                            let row = &ours[(first + step) * vocab..(first + step + 1) * vocab];
                            if argmax(row) != p.greedy_ids[step] {
                                greedy_wrong += 1;
                            }
                        }
                    }
                }
            }
            rows.push(Row::check(
                "fixtures",
                format!("{model} logits in {dtype}: max |difference| (tolerance {tolerance})"),
                format!("{worst:.2e}"),
                worst <= tolerance,
            ));
            rows.push(Row::check(
                "fixtures",
                format!("{model} greedy tokens in {dtype} where the margin allows"),
                format!("{} of {greedy_checked}", greedy_checked - greedy_wrong),
                greedy_wrong == 0 && greedy_checked > 0,
            ));
        }
    }
    Ok(rows)
}

/// The CPU engine's batching test on `device`: twelve requests alone and together (chunked by a
/// 48-token budget, preempted by a 10-block cache) give the same greedy tokens, and the same as
/// the CPU engine gives (f32 on both).
pub fn batching_rows(fixtures: &Path, device: DeviceKind) -> Result<Vec<Row>, String> {
    let dir = fixtures.join("tiny-llama");
    let stream: Vec<u32> = prompts(&dir)?.iter().flat_map(|p| p.prompt_ids[1..].to_vec()).cycle().take(2000).collect();
    let greedy = |max_tokens| SamplingParams {
        max_tokens: MaxTokens::Exact(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let requests: Vec<(Vec<u32>, SamplingParams)> = (0..12)
        .map(|i| {
            let mut p = vec![0];
            p.extend_from_slice(&stream[(i * 53) % 1000..][..(i * 37) % 90]);
            (p, greedy(6 + (i * 5) % 11))
        })
        .collect();
    let options = |device, tweak: &dyn Fn(&mut EngineOptions)| {
        let mut o = EngineOptions {
            model: Some(dir.clone()),
            device,
            dtype: Some(DType::F32),
            max_model_len: Some(128),
            num_gpu_blocks_override: Some(256),
            ..EngineOptions::default()
        };
        tweak(&mut o);
        o
    };
    let generate =
        |opts: &EngineOptions, batch: &[(Vec<u32>, SamplingParams)]| -> Result<(Vec<Vec<u32>>, u64), String> {
            let mut engine = load_engine(opts).map_err(|e| e.to_string())?.engine;
            for (i, (prompt, params)) in batch.iter().enumerate() {
                let request = EngineRequest {
                    id: RequestId(format!("{i:02}")),
                    prompt_token_ids: prompt.clone(),
                    params: params.clone(),
                    arrival: std::time::Instant::now(),
                };
                let request = request.validate(&engine.limits()).map_err(|e| e.to_string())?;
                engine.add_request(request).map_err(|e| e.to_string())?;
            }
            let done = engine.run_to_completion().map_err(|e| e.to_string())?;
            Ok((done.into_iter().map(|c| c.token_ids).collect(), engine.stats().num_preemptions))
        };
    let (mut same_as_cpu, mut alone) = (0, Vec::new());
    for request in &requests {
        let (ours, _) = generate(&options(device, &|_| ()), std::slice::from_ref(request))?;
        let (cpu, _) = generate(&options(DeviceKind::Cpu, &|_| ()), std::slice::from_ref(request))?;
        same_as_cpu += usize::from(ours == cpu);
        alone.push(ours.into_iter().next().unwrap_or_default());
    }
    let together_opts = options(device, &|o| {
        o.num_gpu_blocks_override = Some(10);
        o.max_num_batched_tokens = 48;
    });
    let (together, preemptions) = generate(&together_opts, &requests)?;
    let same_batched = together.iter().zip(&alone).filter(|(a, b)| a == b).count();
    let n = requests.len();
    // Seeded sampling with every parameter the device applies (temperature, min-p, top-k, top-p,
    // penalties, logit bias, min_tokens), drawn on the device: the CPU engine's tokens.
    let seeded: Vec<(Vec<u32>, SamplingParams)> = requests
        .iter()
        .take(6)
        .enumerate()
        .map(|(i, (prompt, _))| {
            let params = SamplingParams {
                temperature: 0.6 + 0.2 * i as f32,
                min_p: if i % 2 == 0 { 0.0 } else { 0.05 },
                top_k: [0, 5, 40][i % 3],
                top_p: [1.0, 0.9, 0.6][(i / 2) % 3],
                repetition_penalty: if i % 2 == 1 { 1.2 } else { 1.0 },
                frequency_penalty: if i >= 3 { 0.3 } else { 0.0 },
                presence_penalty: if i == 4 { -0.2 } else { 0.0 },
                logit_bias: if i == 5 { vec![(7, 3.0), (9, -100.0)] } else { Vec::new() },
                min_tokens: 4,
                seed: Some(i as u64),
                ..greedy(12)
            };
            (prompt.clone(), params)
        })
        .collect();
    let (seeded_ours, _) = generate(&options(device, &|_| ()), &seeded)?;
    let (seeded_cpu, _) = generate(&options(DeviceKind::Cpu, &|_| ()), &seeded)?;
    let same_seeded = seeded_ours.iter().zip(&seeded_cpu).filter(|(a, b)| a == b).count();
    Ok(vec![
        Row::check(
            "batching",
            "greedy tokens equal to the CPU engine's (f32)".into(),
            format!("{same_as_cpu} of {n}"),
            same_as_cpu == n,
        ),
        Row::check(
            "batching",
            format!("greedy tokens alone and batched ({preemptions} preemptions)"),
            format!("{same_batched} of {n}"),
            same_batched == n && preemptions > 0,
        ),
        Row::check(
            "batching",
            "seeded draws (every sampling parameter) equal to the CPU engine's (f32)".into(),
            format!("{same_seeded} of {}", seeded.len()),
            same_seeded == seeded.len(),
        ),
    ])
}
