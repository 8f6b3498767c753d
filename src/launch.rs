//! From checked options to a ready engine: load the model (a folder or the embedded demo), choose
//! the device, size the KV cache, resolve the context length, and bind everything to a backend.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::device::DeviceHandle;
use crate::backend::cuda::{CudaBackend, check_attention_shape, driver};
use crate::backend::{Backend, BatchLayout, KvCacheShape, SeqLayout};
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::model::config::GenerationDefaults;
use crate::model::demo::{DEMO_MODEL_NAME, DemoSpec};
use crate::model::{
    Architecture, Executor, LoadError, MAX_LOGITS_ROWS, ModelConfig, ModelFiles, ModelRunner, Weights, graph_sizes,
};
use crate::weights::DType;

/// KV-cache memory on the CPU when nothing is said (vLLM's CPU default is 4 GiB as well). Pages
/// are committed only as blocks are written, so a large default costs nothing up front.
pub const DEFAULT_CPU_KV_CACHE_BYTES: usize = 4 << 30;

/// Engine options after parsing, before they are checked against the model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// A model folder; `None` runs the embedded demo model.
    pub model: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    pub num_gpu_blocks_override: Option<usize>,
    pub kv_cache_memory_bytes: Option<usize>,
    /// Requested compute dtype; `None` is `auto`.
    pub dtype: Option<DType>,
    pub device: DeviceKind,
    /// `dummy`: random weights of the model's shapes, no weight file read (for benchmarks).
    pub load_format: LoadFormat,
    /// Share of the GPU's memory Pagoda may use (weights, activations and the KV cache).
    pub gpu_memory_utilization: f32,
    /// Threads of the CPU compute pool (`--num-threads`); `None`: rayon's default, the cores this
    /// process may use.
    pub num_threads: Option<usize>,
    /// No CUDA graphs: every step runs eagerly (`--enforce-eager`).
    pub enforce_eager: bool,
    /// GPUs one model is split over (`--tensor-parallel-size`); only 1 is implemented.
    pub tensor_parallel_size: usize,
    pub pipeline_parallel_size: usize,
    /// Seeds the draws of requests that give no seed of their own (`--seed`).
    pub seed: Option<u64>,
    /// Most top logprobs a request may ask for (`--max-logprobs`).
    pub max_logprobs: usize,
    /// A chat template replacing the model's (`--chat-template`: already read from its file).
    pub chat_template: Option<String>,
}

/// `--device`: where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceKind {
    /// CUDA when a driver and a device are present, else the CPU; the log says which and why.
    #[default]
    Auto,
    Cpu,
    Cuda,
    /// The CUDA backend on the CPU emulation of CUDA (tests only): host memory, the kernels
    /// compiled for the CPU, cuBLAS's semantics on the CPU.
    #[cfg(feature = "cuda-emu")]
    EmulatedCuda,
}

/// `--load-format`: how the weights are loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadFormat {
    /// The checkpoint's safetensors files.
    #[default]
    Auto,
    /// Random values of the model's shapes, made on the device (vLLM's `dummy`).
    Dummy,
}

/// vLLM's default share of GPU memory.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f32 = 0.9;

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            model: None,
            served_model_name: None,
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            block_size: 16,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            num_gpu_blocks_override: None,
            kv_cache_memory_bytes: None,
            dtype: None,
            device: DeviceKind::Auto,
            load_format: LoadFormat::Auto,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            num_threads: None,
            enforce_eager: false,
            tensor_parallel_size: 1,
            pipeline_parallel_size: 1,
            seed: None,
            max_logprobs: crate::engine::request::DEFAULT_MAX_LOGPROBS,
            chat_template: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Invalid(String),
}

/// What was loaded, for logs, `/v1/models` and `/version`.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub origin: String,
    pub architecture: Architecture,
    pub max_model_len: usize,
    pub backend: &'static str,
    pub generation_defaults: GenerationDefaults,
    /// The KV cache's blocks and tokens per block.
    pub num_kv_blocks: usize,
    pub block_size: usize,
}

/// The name clients use for the model: `--served-model-name`, else the `--model` value, else the
/// demo model's name.
pub fn served_model_name(opts: &EngineOptions) -> String {
    match (&opts.served_model_name, &opts.model) {
        (Some(name), _) => name.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => DEMO_MODEL_NAME.to_string(),
    }
}

pub struct LoadedEngine {
    pub engine: Engine,
    pub info: ModelInfo,
}

pub fn load_engine(opts: &EngineOptions) -> Result<LoadedEngine, LaunchError> {
    if opts.block_size == 0 || opts.block_size > 256 || !opts.block_size.is_power_of_two() {
        return Err(LaunchError::Invalid(format!(
            "--block-size must be a power of two up to 256, got {}",
            opts.block_size
        )));
    }
    if !(opts.gpu_memory_utilization > 0.0 && opts.gpu_memory_utilization <= 1.0) {
        return Err(LaunchError::Invalid(format!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            opts.gpu_memory_utilization
        )));
    }
    for (flag, size) in [
        ("--tensor-parallel-size", opts.tensor_parallel_size),
        ("--pipeline-parallel-size", opts.pipeline_parallel_size),
    ] {
        if size != 1 {
            return Err(LaunchError::Invalid(format!(
                "{flag} {size}: Pagoda runs a model on one GPU; splitting it over several is not supported yet"
            )));
        }
    }
    set_num_threads(opts.num_threads)?;
    let mut files = match (&opts.model, opts.load_format) {
        (Some(dir), LoadFormat::Auto) => ModelFiles::load(dir)?,
        (Some(dir), LoadFormat::Dummy) => ModelFiles::load_dummy(dir)?,
        (None, _) => ModelFiles::demo(&DemoSpec::demo())?,
    };
    if let Some(template) = &opts.chat_template {
        files
            .tokenizer
            .set_chat_template(template)
            .map_err(|e| LaunchError::Invalid(format!("--chat-template: {e}")))?;
    }
    if opts.load_format == LoadFormat::Dummy {
        tracing::warn!("--load-format dummy: the weights are random; the output is meaningless");
        files.weights = Weights::Dummy { seed: 0 };
    }
    let bound = match choose_device(opts.device)? {
        None => bind_cpu(opts, &files)?,
        Some(handle) => bind_cuda(opts, &files, handle)?,
    };
    let config = &files.config;
    let engine_config = EngineConfig {
        max_model_len: bound.max_model_len,
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        enable_prefix_caching: opts.enable_prefix_caching,
        enable_chunked_prefill: opts.enable_chunked_prefill,
        seed: opts.seed,
        max_logprobs: opts.max_logprobs,
    };
    let kv_cache = bound.executor.kv_cache_shape();
    let info = ModelInfo {
        origin: files.origin.clone(),
        architecture: config.architecture,
        max_model_len: bound.max_model_len,
        backend: bound.executor.backend_name(),
        generation_defaults: config.generation_defaults.clone(),
        num_kv_blocks: kv_cache.num_blocks,
        block_size: kv_cache.block_size,
    };
    let eos = config.eos_token_ids.clone();
    let engine = Engine::new(engine_config, bound.executor, Arc::new(files.tokenizer), eos)?;
    tracing::info!(
        model = %info.origin,
        architecture = info.architecture.hf_name(),
        backend = info.backend,
        max_model_len = info.max_model_len,
        num_kv_blocks = kv_cache.num_blocks,
        kv_cache_tokens = kv_cache.num_blocks * kv_cache.block_size,
        kv_cache_bytes = kv_cache.num_blocks * bound.bytes_per_block,
        "model loaded"
    );
    Ok(LoadedEngine { engine, info })
}

/// Sizes the process's compute pool (rayon's global pool, which the CPU backend's parallel
/// sections run on). It can be sized once; asking again for the size it has is not an error.
fn set_num_threads(num_threads: Option<usize>) -> Result<(), LaunchError> {
    let Some(n) = num_threads else { return Ok(()) };
    let built =
        rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("pagoda-compute-{i}")).build_global();
    match built {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(e) => Err(LaunchError::Invalid(format!(
            "--num-threads {n}: this process's compute pool already runs {} threads ({e})",
            rayon::current_num_threads()
        ))),
    }
}

/// A model bound to a backend with its KV cache, and the context length that cache allows.
struct BoundModel {
    executor: Box<dyn Executor>,
    max_model_len: usize,
    bytes_per_block: usize,
}

/// What `--device auto` picks: the first GPU when the driver reports one and it opens, else the
/// reason it cannot (then the CPU serves). It opens the GPU as the server does (context, kernels,
/// cuBLAS), so `pagoda info`, which asks it too, gives the server's answer.
pub fn auto_device() -> Result<DeviceHandle, String> {
    match driver::device_count() {
        Ok(0) => Err("the NVIDIA driver reports no GPU".to_string()),
        Ok(_) => open_first_gpu().map_err(|e| format!("the GPU could not be used: {e}")),
        Err(e) => Err(e.to_string()),
    }
}

/// GPU 0 with its buffer pool.
fn open_first_gpu() -> Result<DeviceHandle, crate::backend::cuda::device::DeviceError> {
    driver::CudaDevice::open(0).map(|d| DeviceHandle::new(Arc::new(d)))
}

/// The device `kind` names, opened; `None` for the CPU. `auto` falls back to the CPU, saying why
/// in one log line; an explicit `cuda` that cannot be had is an error.
pub fn choose_device(kind: DeviceKind) -> Result<Option<DeviceHandle>, LaunchError> {
    match kind {
        DeviceKind::Cpu => {
            tracing::info!(device = "cpu", "device chosen: cpu (--device cpu)");
            Ok(None)
        }
        DeviceKind::Cuda => match open_first_gpu() {
            Ok(handle) => {
                tracing::info!(device = "cuda", gpu = %handle.device().name(), "device chosen: cuda (--device cuda)");
                Ok(Some(handle))
            }
            Err(e) => Err(LaunchError::Invalid(format!("--device cuda: {e}"))),
        },
        DeviceKind::Auto => match auto_device() {
            Ok(handle) => {
                tracing::info!(device = "cuda", gpu = %handle.device().name(), "device chosen: cuda (a GPU is present)");
                Ok(Some(handle))
            }
            Err(why_not) => {
                tracing::info!(device = "cpu", reason = %why_not, "device chosen: cpu, because {why_not}");
                Ok(None)
            }
        },
        #[cfg(feature = "cuda-emu")]
        DeviceKind::EmulatedCuda => {
            // Tests size the device's memory, and make one launch fail to see a failing step.
            let env = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
            let device = crate::backend::cuda::emulated::EmulatedDevice::new(
                env("PAGODA_EMULATED_MEMORY").unwrap_or(8 << 30),
                4,
            );
            if let Some(n) = env("PAGODA_EMULATED_FAIL_LAUNCH") {
                device.fail_launch(n as u64);
            }
            Ok(Some(DeviceHandle::new(Arc::new(device))))
        }
    }
}

/// The context length: `--max-model-len` if given (checked against the model), else the model's
/// maximum, lowered with a warning to what the KV cache holds.
fn resolve_max_model_len(
    opts: &EngineOptions,
    config: &ModelConfig,
    capacity_tokens: usize,
) -> Result<usize, LaunchError> {
    let derived_len = config.max_position_embeddings;
    match opts.max_model_len {
        Some(0) => Err(LaunchError::Invalid("--max-model-len must be positive".into())),
        Some(len) if len > derived_len => Err(LaunchError::Invalid(format!(
            "--max-model-len {len} exceeds the model's maximum context of {derived_len} (max_position_embeddings)"
        ))),
        Some(len) => Ok(len),
        None if capacity_tokens < derived_len => {
            tracing::warn!(
                capacity_tokens,
                derived_len,
                "the KV cache cannot hold the model's full context; max_model_len lowered to fit"
            );
            Ok(capacity_tokens)
        }
        None => Ok(derived_len),
    }
}

/// Bytes of one KV-cache block of `block_size` tokens in `dtype` for `config`'s layers and heads.
fn bytes_per_block(config: &ModelConfig, block_size: usize, dtype: DType) -> usize {
    let shape = KvCacheShape {
        num_layers: config.num_hidden_layers,
        num_blocks: 1,
        block_size,
        num_kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        dtype,
    };
    shape.bytes_per_block()
}

fn no_room(bytes_per_block: usize, hint: &str) -> LaunchError {
    LaunchError::Invalid(format!("the KV cache has no room for a single block of {bytes_per_block} bytes: {hint}"))
}

fn bind_cpu(opts: &EngineOptions, files: &ModelFiles) -> Result<BoundModel, LaunchError> {
    let config = &files.config;
    if opts.dtype.is_some_and(|d| d != DType::F32) {
        tracing::info!("the CPU backend computes in float32; --dtype only selects what GPU backends compute in");
    }
    let bytes_per_block = bytes_per_block(config, opts.block_size, CpuBackend::new().kv_cache_dtype());
    let num_blocks = match (opts.num_gpu_blocks_override, opts.kv_cache_memory_bytes) {
        (Some(n), _) => n,
        (None, Some(bytes)) => bytes / bytes_per_block,
        (None, None) => DEFAULT_CPU_KV_CACHE_BYTES / bytes_per_block,
    };
    if num_blocks == 0 {
        return Err(no_room(bytes_per_block, "raise --kv-cache-memory-bytes"));
    }
    let max_model_len = resolve_max_model_len(opts, config, num_blocks * opts.block_size)?;
    tracing::info!(
        threads = rayon::current_num_threads(),
        kernels = crate::backend::cpu::Isa::detected().name(),
        "the CPU backend computes in f32 with weights in their stored dtype"
    );
    let runner = ModelRunner::new(CpuBackend::new(), files, max_model_len, num_blocks, opts.block_size)?;
    Ok(BoundModel { executor: Box::new(runner), max_model_len, bytes_per_block })
}

/// The dtype the GPU computes in: `--dtype`, else the checkpoint's, with float32 checkpoints run
/// in bfloat16 as vLLM's `auto` does.
fn gpu_dtype(opts: &EngineOptions, files: &ModelFiles) -> DType {
    opts.dtype.unwrap_or(match files.config.dtype.or(files.weights.dominant_dtype()) {
        Some(DType::F16) => DType::F16,
        _ => DType::BF16,
    })
}

fn bind_cuda(opts: &EngineOptions, files: &ModelFiles, handle: DeviceHandle) -> Result<BoundModel, LaunchError> {
    let config = &files.config;
    let dtype = gpu_dtype(opts, files);
    check_attention_shape(dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        .map_err(|e| LaunchError::Invalid(format!("{e}; serve it on the CPU with --device cpu")))?;
    let backend = CudaBackend::new(handle.clone(), dtype);
    let bytes_per_block = bytes_per_block(config, opts.block_size, backend.kv_cache_dtype());
    let explicit_blocks = match (opts.num_gpu_blocks_override, opts.kv_cache_memory_bytes) {
        (Some(n), _) => Some(n),
        (None, Some(bytes)) => Some(bytes / bytes_per_block),
        (None, None) => None,
    };
    if let Some(num_blocks) = explicit_blocks {
        if num_blocks == 0 {
            return Err(no_room(bytes_per_block, "raise --kv-cache-memory-bytes or --num-gpu-blocks-override"));
        }
        let max_model_len = resolve_max_model_len(opts, config, num_blocks * opts.block_size)?;
        let mut runner = ModelRunner::new(backend, files, max_model_len, num_blocks, opts.block_size)?;
        capture_graphs(opts, &mut runner, max_model_len)?;
        return Ok(BoundModel { executor: Box::new(runner), max_model_len, bytes_per_block });
    }
    // Size the cache from what is left after the weights and the activations of the largest step:
    // load with a cache just big enough for a profiling pass at the full token budget, run it
    // (the activation pool keeps its peak), then give the cache the rest of the allowed memory.
    let provisional_len = opts.max_model_len.unwrap_or(config.max_position_embeddings);
    let profile_tokens = opts.max_num_batched_tokens.min(provisional_len).max(1);
    let profile_blocks = profile_tokens.div_ceil(opts.block_size);
    let mut runner = ModelRunner::new(backend, files, provisional_len, profile_blocks, opts.block_size)?;
    let layout = profile_layout(profile_tokens, profile_blocks);
    // A step holds at most MAX_LOGITS_ROWS rows of logits (more are sampled in slices).
    let logits_rows: Vec<u32> =
        (profile_tokens.saturating_sub(MAX_LOGITS_ROWS) as u32..profile_tokens as u32).collect();
    runner.execute(&layout, &logits_rows).map_err(LoadError::Backend)?;
    let (free, total) = handle.device().memory_info().map_err(|e| LaunchError::Invalid(e.to_string()))?;
    let num_blocks = kv_blocks_from_memory(
        total,
        free,
        profile_blocks * bytes_per_block,
        opts.gpu_memory_utilization,
        bytes_per_block,
    );
    if num_blocks == 0 {
        return Err(no_room(
            bytes_per_block,
            &format!(
                "the weights and activations leave nothing of {:.1} GiB × --gpu-memory-utilization {}; raise it or                  lower --max-num-batched-tokens",
                total as f64 / (1u64 << 30) as f64,
                opts.gpu_memory_utilization
            ),
        ));
    }
    runner.resize_kv_cache(num_blocks)?;
    let max_model_len = resolve_max_model_len(opts, config, num_blocks * opts.block_size)?;
    tracing::info!(num_blocks, capacity_tokens = num_blocks * opts.block_size, "KV cache sized from GPU memory");
    capture_graphs(opts, &mut runner, max_model_len)?;
    Ok(BoundModel { executor: Box::new(runner), max_model_len, bytes_per_block })
}

/// Captures the decode graphs (after the KV cache has its final size: they address it), unless
/// `--enforce-eager`. Their memory comes from what `--gpu-memory-utilization` leaves.
fn capture_graphs(
    opts: &EngineOptions,
    runner: &mut ModelRunner<CudaBackend>,
    max_model_len: usize,
) -> Result<(), LaunchError> {
    if opts.enforce_eager {
        tracing::info!("--enforce-eager: every step runs eagerly, no CUDA graphs");
        return Ok(());
    }
    let sizes = graph_sizes(opts.max_num_seqs);
    let started = std::time::Instant::now();
    let captured = runner.capture_decode_graphs(&sizes, max_model_len)?;
    tracing::info!(captured, ?sizes, seconds = started.elapsed().as_secs_f64(), "decode steps run from CUDA graphs");
    Ok(())
}

/// One sequence of `num_tokens` tokens in blocks `0..num_blocks`: the largest step the engine runs.
fn profile_layout(num_tokens: usize, num_blocks: usize) -> BatchLayout {
    BatchLayout {
        token_ids: vec![0; num_tokens],
        positions: (0..num_tokens as u32).collect(),
        slot_mapping: (0..num_tokens as u32).collect(),
        seqs: vec![SeqLayout {
            query_start: 0,
            query_len: num_tokens,
            context_len: num_tokens,
            block_table: (0..num_blocks as u32).collect(),
        }],
    }
}

/// KV blocks that fit in `utilization × total` once what is in use now (weights, the activation
/// pool at its peak, and the profiling cache of `profile_cache_bytes`, which is freed) is taken.
pub fn kv_blocks_from_memory(
    total: usize,
    free: usize,
    profile_cache_bytes: usize,
    utilization: f32,
    bytes_per_block: usize,
) -> usize {
    // Rounded to six digits so that 0.9 as an f32 (0.899999976…) means 0.9.
    let utilization = (utilization as f64 * 1e6).round() / 1e6;
    let allowed = (total as f64 * utilization) as usize;
    let in_use = total.saturating_sub(free).saturating_sub(profile_cache_bytes);
    allowed.saturating_sub(in_use) / bytes_per_block.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_gets_what_the_utilization_leaves() {
        let gib = 1usize << 30;
        // 140 GiB GPU, 17 GiB used by weights and activations (plus a 1 GiB profiling cache).
        let blocks = kv_blocks_from_memory(140 * gib, 140 * gib - 18 * gib, gib, 0.9, 2 * 1024 * 1024);
        assert_eq!(blocks, ((140.0 * 0.9) as usize - 17) * 512);
        // Nothing left: zero blocks, never an underflow.
        assert_eq!(kv_blocks_from_memory(10 * gib, gib, 0, 0.5, 1024), 0);
        assert_eq!(kv_blocks_from_memory(10 * gib, 10 * gib, 0, 1.0, 1024), 10 * gib / 1024);
    }

    #[test]
    fn float32_checkpoints_run_in_bfloat16_on_gpus_unless_told() {
        let files = ModelFiles::demo(&DemoSpec::demo()).unwrap();
        let opts = EngineOptions::default();
        let stored = files.config.dtype.or(files.weights.dominant_dtype());
        let expected = if stored == Some(DType::F16) { DType::F16 } else { DType::BF16 };
        assert_eq!(gpu_dtype(&opts, &files), expected);
        let opts = EngineOptions { dtype: Some(DType::F32), ..EngineOptions::default() };
        assert_eq!(gpu_dtype(&opts, &files), DType::F32);
    }
}
