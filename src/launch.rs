//! From checked options to a ready engine: load the model (a folder or the embedded demo), size
//! the KV cache, resolve the context length, and bind everything to a backend.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::KvCacheShape;
use crate::backend::cpu::CpuBackend;
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::model::config::GenerationDefaults;
use crate::model::demo::{DEMO_MODEL_NAME, DemoSpec};
use crate::model::{Architecture, LoadError, ModelFiles, ModelRunner};
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
}

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
    pub served_model_name: String,
    pub origin: String,
    pub architecture: Architecture,
    pub stored_dtype: Option<DType>,
    pub max_model_len: usize,
    pub backend: &'static str,
    pub kv_cache: KvCacheShape,
    pub is_demo: bool,
    pub generation_defaults: GenerationDefaults,
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
    let files = match &opts.model {
        Some(dir) => ModelFiles::load(dir)?,
        None => ModelFiles::demo(&DemoSpec::demo())?,
    };
    let config = &files.config;
    if opts.dtype.is_some_and(|d| d != DType::F32) {
        tracing::info!("the CPU backend computes in float32; --dtype only selects what GPU backends compute in");
    }

    let shape_for = |num_blocks| KvCacheShape {
        num_layers: config.num_hidden_layers,
        num_blocks,
        block_size: opts.block_size,
        num_kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
    };
    let bytes_per_block = shape_for(1).bytes_per_block(DType::F32);
    let num_blocks = match (opts.num_gpu_blocks_override, opts.kv_cache_memory_bytes) {
        (Some(n), _) => n,
        (None, Some(bytes)) => bytes / bytes_per_block,
        (None, None) => DEFAULT_CPU_KV_CACHE_BYTES / bytes_per_block,
    };
    if num_blocks == 0 {
        return Err(LaunchError::Invalid(format!(
            "the KV cache has no room for a single block of {bytes_per_block} bytes: raise --kv-cache-memory-bytes"
        )));
    }
    let capacity = num_blocks * opts.block_size;
    let derived_len = config.max_position_embeddings;
    let max_model_len = match opts.max_model_len {
        Some(0) => return Err(LaunchError::Invalid("--max-model-len must be positive".into())),
        Some(len) if len > derived_len => {
            return Err(LaunchError::Invalid(format!(
                "--max-model-len {len} exceeds the model's maximum context of {derived_len} (max_position_embeddings)"
            )));
        }
        Some(len) => len,
        None if capacity < derived_len => {
            tracing::warn!(
                capacity,
                derived_len,
                "the KV cache cannot hold the model's full context; max_model_len lowered to fit"
            );
            capacity
        }
        None => derived_len,
    };

    let runner = ModelRunner::new(CpuBackend::new(), &files, max_model_len, num_blocks, opts.block_size)?;
    let engine_config = EngineConfig {
        max_model_len,
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        enable_prefix_caching: opts.enable_prefix_caching,
        enable_chunked_prefill: opts.enable_chunked_prefill,
    };
    let info = ModelInfo {
        served_model_name: served_model_name(opts),
        origin: files.origin.clone(),
        architecture: config.architecture,
        stored_dtype: config.dtype.or(files.weights.dominant_dtype()),
        max_model_len,
        backend: "cpu",
        kv_cache: shape_for(num_blocks),
        is_demo: opts.model.is_none(),
        generation_defaults: config.generation_defaults.clone(),
    };
    let eos = config.eos_token_ids.clone();
    let engine = Engine::new(engine_config, Box::new(runner), Arc::new(files.tokenizer), eos)?;
    tracing::info!(
        model = %info.origin,
        architecture = info.architecture.hf_name(),
        max_model_len,
        num_kv_blocks = num_blocks,
        kv_cache_bytes = num_blocks * bytes_per_block,
        "model loaded"
    );
    Ok(LoadedEngine { engine, info })
}
