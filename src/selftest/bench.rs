//! Benchmarks of the CUDA backend on a device, each against a physical limit measured in the same
//! run: device-to-device copy bandwidth; decode attention's bandwidth (bytes of K and V read ÷
//! time, L2 flushed before each run, timed with CUDA events); and model decode throughput with
//! dummy weights against the weight-read floor, with where one eager step's device time goes.

use super::Row;
use super::profile::{OpTime, ProfiledDevice};
use crate::backend::cuda::CudaBackend;
use crate::backend::cuda::device::{DeviceError, DeviceHandle};
use crate::backend::{AttentionParams, Backend, BatchLayout, KvCacheShape, RowSampling, SeqLayout, cache_slot};
use crate::model::{Executor, ModelConfig, ModelRunner, Weights};
use crate::weights::DType;

/// Shapes and repetitions of one benchmark run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub copy_bytes: usize,
    pub flush_bytes: usize,
    pub iterations: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub attention_batches: Vec<usize>,
    pub attention_contexts: Vec<usize>,
    /// `config.json` of the model whose decode is timed.
    pub model_config: String,
    pub decode_batches: Vec<usize>,
    pub prompt_len: usize,
    pub decode_steps: usize,
}

/// Llama-3-8B's shapes: 32 layers, hidden 4096, 32 query and 8 KV heads of 128, vocabulary 128,256.
pub const LLAMA3_8B_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
  "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": false,
  "bos_token_id": 128000, "eos_token_id": 128001}"#;

/// A model small enough for the emulated device.
pub const TINY_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": false}"#;

impl Plan {
    /// What the GPU check measures: 32 query heads, 8 KV heads, head_dim 128; batch 1, 16, 64,
    /// 128; contexts 512, 2k, 8k; a Llama-3-8B-shaped model at batch 1 and 64.
    pub fn full() -> Plan {
        Plan {
            copy_bytes: 1 << 30,
            flush_bytes: 256 << 20,
            iterations: 20,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            attention_batches: vec![1, 16, 64, 128],
            attention_contexts: vec![512, 2048, 8192],
            model_config: LLAMA3_8B_CONFIG.to_string(),
            decode_batches: vec![1, 64],
            prompt_len: 128,
            decode_steps: 32,
        }
    }

    /// The same code paths on sizes the emulated device runs in seconds.
    pub fn quick() -> Plan {
        Plan {
            copy_bytes: 1 << 20,
            flush_bytes: 1 << 20,
            iterations: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            attention_batches: vec![1, 2],
            attention_contexts: vec![40],
            model_config: TINY_CONFIG.to_string(),
            decode_batches: vec![1, 2],
            prompt_len: 8,
            decode_steps: 4,
        }
    }
}

fn device_error(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Driver(e.to_string())
}

/// Device-to-device copy bandwidth, bytes read plus bytes written per second.
pub fn copy_bandwidth(handle: &DeviceHandle, plan: &Plan) -> Result<f64, DeviceError> {
    let src = handle.buffer_exact(plan.copy_bytes)?;
    let dst = handle.buffer_exact(plan.copy_bytes)?;
    let device = handle.device();
    device.copy_on_device(dst.ptr(), src.ptr(), plan.copy_bytes)?;
    let seconds = device.time(&mut || {
        for _ in 0..plan.iterations {
            device.copy_on_device(dst.ptr(), src.ptr(), plan.copy_bytes)?;
        }
        Ok(())
    })?;
    Ok(2.0 * plan.copy_bytes as f64 * plan.iterations as f64 / seconds)
}

/// Decode attention (one query token per sequence) over `batch` sequences of `context` keys.
/// Returns seconds per call and bytes of K and V read per call.
pub fn decode_attention(
    backend: &CudaBackend,
    handle: &DeviceHandle,
    plan: &Plan,
    batch: usize,
    context: usize,
) -> Result<(f64, usize), DeviceError> {
    let block_size = 16;
    let blocks_per_seq = context.div_ceil(block_size);
    let shape = KvCacheShape {
        num_layers: 1,
        num_blocks: batch * blocks_per_seq,
        block_size,
        num_kv_heads: plan.num_kv_heads,
        head_dim: plan.head_dim,
        dtype: backend.kv_cache_dtype(),
    };
    let mut cache = backend.new_kv_cache(shape).map_err(device_error)?;
    backend.fill_kv_cache_random(&mut cache, 1).map_err(device_error)?;
    let mut layout = BatchLayout::default();
    for s in 0..batch {
        let table: Vec<u32> = (s * blocks_per_seq..(s + 1) * blocks_per_seq).map(|b| b as u32).collect();
        let pos = context - 1;
        layout.token_ids.push(0);
        layout.positions.push(pos as u32);
        layout.slot_mapping.push(cache_slot(&table, pos, block_size));
        layout.seqs.push(SeqLayout { query_start: s, query_len: 1, context_len: context, block_table: table });
    }
    let batch_meta = backend.prepare_batch(&layout).map_err(device_error)?;
    let width = plan.num_heads * plan.head_dim;
    let q_values: Vec<f32> = (0..batch * width).map(|i| crate::backend::dummy_value(3, i as u64) * 1e3).collect();
    let q = backend.tensor_from_f32(&q_values, batch, width).map_err(device_error)?;
    let params = AttentionParams {
        num_heads: plan.num_heads,
        num_kv_heads: plan.num_kv_heads,
        head_dim: plan.head_dim,
        scale: 1.0 / (plan.head_dim as f32).sqrt(),
        sliding_window: None,
    };
    let flush = handle.buffer_exact(plan.flush_bytes)?;
    let device = handle.device();
    let mut run = || backend.paged_attention(&q, &cache, 0, &batch_meta, &params).map(|_| ()).map_err(device_error);
    for _ in 0..3 {
        run()?;
    }
    let mut total = 0.0;
    for _ in 0..plan.iterations {
        // Evict K and V from L2, so every call reads them from memory.
        device.memset(flush.ptr(), 0, plan.flush_bytes)?;
        total += device.time(&mut run)?;
    }
    let bytes = 2 * batch * context * plan.num_kv_heads * plan.head_dim * backend.dtype().size_in_bytes();
    Ok((total / plan.iterations as f64, bytes))
}

/// Parameters of a Llama-family model, for its weight bytes.
pub fn num_parameters(c: &ModelConfig) -> usize {
    let (h, q, kv, i) =
        (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
    let per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * i;
    let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * h };
    c.vocab_size * h + c.num_hidden_layers * per_layer + h + head
}

/// One batch size's decode speed, and where the device time of one more step went when profiled.
pub struct DecodeSpeed {
    pub batch: usize,
    pub tokens_per_second: f64,
    pub profile: Option<Vec<OpTime>>,
}

/// Decode throughput of `plan.model_config` with dummy weights: for each batch size, `batch`
/// prompts of `prompt_len` tokens prefilled together, then `decode_steps` steps of one token per
/// sequence, each picked greedily on the device (`execute_step`, as the engine does: only the ids
/// reach the host). With `graphs`, decode steps replay CUDA graphs captured for the plan's batch
/// sizes, as a server does by default; without, they run eagerly (`--enforce-eager`). With a
/// `profiler` (the device under `handle`), one more step runs with every operation timed.
pub fn decode_throughput(
    handle: &DeviceHandle,
    dtype: DType,
    plan: &Plan,
    graphs: bool,
    profiler: Option<&ProfiledDevice>,
) -> Result<Vec<DecodeSpeed>, String> {
    let config = ModelConfig::from_json("benchmark/config.json", &plan.model_config).map_err(|e| e.to_string())?;
    let block_size = 16;
    let max_batch = plan.decode_batches.iter().copied().max().unwrap_or(1);
    let max_len = plan.prompt_len + plan.decode_steps + 1;
    let blocks_per_seq = max_len.div_ceil(block_size);
    let backend = CudaBackend::new(handle.clone(), dtype);
    let mut runner = ModelRunner::from_parts(
        backend,
        &config,
        &Weights::Dummy { seed: 0 },
        max_len,
        max_batch * blocks_per_seq,
        block_size,
    )
    .map_err(|e| e.to_string())?;
    if graphs {
        let mut sizes = plan.decode_batches.clone();
        sizes.sort_unstable();
        sizes.dedup();
        runner.capture_decode_graphs(&sizes, max_len).map_err(|e| e.to_string())?;
    }
    let vocab = config.vocab_size;
    let mut results = Vec::new();
    for &batch in &plan.decode_batches {
        let greedy = vec![RowSampling::greedy(); batch];
        let table =
            |s: usize| -> Vec<u32> { (s * blocks_per_seq..(s + 1) * blocks_per_seq).map(|b| b as u32).collect() };
        let slot = |s: usize, p: usize| cache_slot(&table(s), p, block_size);
        let step = |runner: &mut ModelRunner<CudaBackend>, start: usize, len: usize, tokens: &[u32]| {
            let mut layout = BatchLayout::default();
            for (s, &token) in tokens.iter().enumerate().take(batch) {
                layout.seqs.push(SeqLayout {
                    query_start: layout.token_ids.len(),
                    query_len: len,
                    context_len: start + len,
                    block_table: table(s),
                });
                for p in start..start + len {
                    layout.token_ids.push(token % vocab as u32);
                    layout.positions.push(p as u32);
                    layout.slot_mapping.push(slot(s, p));
                }
            }
            let rows: Vec<u32> = (0..batch).map(|s| (s * len + len - 1) as u32).collect();
            let picked = runner.execute_step(&layout, &rows, &greedy).map_err(|e| e.to_string())?;
            Ok::<Vec<u32>, String>(picked.iter().map(|row| row.token).collect())
        };
        let mut tokens: Vec<u32> = (0..batch as u32).collect();
        tokens = step(&mut runner, 0, plan.prompt_len, &tokens)?;
        // Two steps to warm up (the activation pool fills), then the timed ones.
        let warmup = 2.min(plan.decode_steps);
        for s in 0..warmup {
            tokens = step(&mut runner, plan.prompt_len + s, 1, &tokens)?;
        }
        let started = std::time::Instant::now();
        for s in warmup..plan.decode_steps {
            tokens = step(&mut runner, plan.prompt_len + s, 1, &tokens)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let profile = match profiler {
            Some(profiler) => {
                let (picked, ops) =
                    profiler.profile(|| step(&mut runner, plan.prompt_len + plan.decode_steps, 1, &tokens));
                picked?;
                Some(ops)
            }
            None => None,
        };
        results.push(DecodeSpeed {
            batch,
            tokens_per_second: (batch * (plan.decode_steps - warmup)) as f64 / seconds,
            profile,
        });
    }
    Ok(results)
}

/// Every benchmark, as report rows.
pub fn rows(handle: &DeviceHandle, plan: &Plan) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let copy = copy_bandwidth(handle, plan).map_err(|e| e.to_string())?;
    rows.push(Row::measure(
        "bench",
        "device copy bandwidth (read + write)".into(),
        format!("{:.0} GB/s", copy / 1e9),
        copy / 1e9,
    ));
    let backend = CudaBackend::new(handle.clone(), DType::BF16);
    for &batch in &plan.attention_batches {
        for &context in &plan.attention_contexts {
            let (seconds, bytes) =
                decode_attention(&backend, handle, plan, batch, context).map_err(|e| e.to_string())?;
            let bandwidth = bytes as f64 / seconds;
            rows.push(Row::measure(
                "bench",
                format!("decode attention bf16 batch {batch} context {context}"),
                format!(
                    "{:.1} us, {:.0} GB/s, {:.0}% of copy",
                    seconds * 1e6,
                    bandwidth / 1e9,
                    100.0 * bandwidth / copy
                ),
                seconds * 1e6,
            ));
        }
    }
    let config = ModelConfig::from_json("benchmark/config.json", &plan.model_config).map_err(|e| e.to_string())?;
    let weight_bytes = num_parameters(&config) * DType::BF16.size_in_bytes();
    let floor = copy / weight_bytes as f64;
    rows.push(Row::measure(
        "bench",
        "weight-read floor for one sequence (copy bandwidth / weight bytes)".into(),
        format!("{floor:.0} tok/s ({:.2} GB of weights)", weight_bytes as f64 / 1e9),
        floor,
    ));
    // The eager run's model sits on a device that can time each operation of one more step.
    // The graph run's buffers (its weights among them) go back to the device first: the eager
    // run's handle has a pool of its own.
    handle.release_pool();
    let profiler = ProfiledDevice::new(handle.shared_device());
    let profiled = DeviceHandle::new(profiler.clone());
    for (graphs, mode) in [(true, ""), (false, "eager, ")] {
        let (handle, profiler) = if graphs { (handle, None) } else { (&profiled, Some(&*profiler)) };
        for speed in decode_throughput(handle, DType::BF16, plan, graphs, profiler)? {
            let (batch, tokens_per_second) = (speed.batch, speed.tokens_per_second);
            let value = if batch == 1 {
                format!("{tokens_per_second:.1} tok/s, {:.0}% of the floor", 100.0 * tokens_per_second / floor)
            } else {
                format!("{tokens_per_second:.1} tok/s")
            };
            let name = format!("decode bf16 dummy weights, {mode}batch {batch}");
            rows.push(Row::measure("bench", name, value, tokens_per_second));
            if let Some(ops) = speed.profile {
                rows.extend(profile_rows(batch, batch as f64 / tokens_per_second, &ops));
            }
        }
    }
    Ok(rows)
}

/// Rows of one profiled decode step: its operations by kind, the most expensive first, and their
/// sum against the step's time when nothing waits for each operation (`step_seconds`).
fn profile_rows(batch: usize, step_seconds: f64, ops: &[OpTime]) -> Vec<Row> {
    let total: f64 = ops.iter().map(|op| op.seconds).sum();
    let count: usize = ops.iter().map(|op| op.count).sum();
    let mut rows = vec![Row::measure(
        "profile",
        format!("decode step profile, batch {batch}: all {count} operations, each waited for"),
        format!("{:.1} us (an eager step takes {:.1} us)", total * 1e6, step_seconds * 1e6),
        total * 1e6,
    )];
    for op in ops {
        rows.push(Row::measure(
            "profile",
            format!("decode step profile, batch {batch}: {}", op.name),
            format!("{}x, {:.1} us, {:.0}%", op.count, op.seconds * 1e6, 100.0 * op.seconds / total),
            op.seconds * 1e6,
        ));
    }
    rows
}
