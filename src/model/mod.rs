//! Models: what a checkpoint folder holds ([`ModelFiles`]), the architectures written over the
//! backend's operations, and [`ModelRunner`], which owns a backend, a model and its KV cache and
//! runs forward passes for the engine through the [`Executor`] trait.

pub mod config;
pub mod demo;
mod llama;
pub mod rope;

use std::path::{Path, PathBuf};

use crate::backend::{Backend, BackendError, BatchLayout, KvCacheShape, RowSampling, SampledRow};
use crate::tokenizer::{Tokenizer, TokenizerError, TokenizerFiles};
use crate::weights::{WeightStore, WeightsError};
pub use config::{Architecture, ConfigError, ModelConfig};
pub use llama::Llama;

/// Everything that can go wrong loading a model; each message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model folder {0} does not exist")]
    NoSuchFolder(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Invalid(String),
}

impl From<llama::BuildError> for LoadError {
    fn from(e: llama::BuildError) -> LoadError {
        match e {
            llama::BuildError::Weights(e) => LoadError::Weights(e),
            llama::BuildError::Backend(e) => LoadError::Backend(e),
        }
    }
}

/// Where a model's weights come from.
pub enum Weights {
    /// The checkpoint's tensors, memory-mapped.
    Stored(WeightStore),
    /// Random values of the model's shapes made by the backend, no file read (vLLM's
    /// `--load-format dummy`, for benchmarks).
    Dummy { seed: u64 },
}

impl Weights {
    /// The dtype most of the weight bytes are stored in; `None` for dummy weights.
    pub fn dominant_dtype(&self) -> Option<crate::weights::DType> {
        match self {
            Weights::Stored(store) => store.dominant_dtype(),
            Weights::Dummy { .. } => None,
        }
    }

    /// Bytes of stored tensor data; 0 for dummy weights, which have no files.
    pub fn num_bytes(&self) -> usize {
        match self {
            Weights::Stored(store) => store.num_bytes(),
            Weights::Dummy { .. } => 0,
        }
    }
}

/// A model's files, opened and checked: config, weights (memory-mapped) and tokenizer.
pub struct ModelFiles {
    /// Where it came from, for logs: the folder, or the demo model's name.
    pub origin: String,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

impl ModelFiles {
    pub fn load(dir: &Path) -> Result<ModelFiles, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NoSuchFolder(dir.to_path_buf()));
        }
        let config = ModelConfig::load(dir)?;
        let weights = Weights::Stored(WeightStore::open(dir)?);
        let tokenizer = Tokenizer::load(dir)?;
        Ok(ModelFiles { origin: dir.display().to_string(), config, weights, tokenizer })
    }

    /// A folder's config and tokenizer with random weights of its shapes; no weight file is read.
    pub fn load_dummy(dir: &Path) -> Result<ModelFiles, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NoSuchFolder(dir.to_path_buf()));
        }
        let config = ModelConfig::load(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        Ok(ModelFiles {
            origin: format!("{} (dummy weights)", dir.display()),
            config,
            weights: Weights::Dummy { seed: 0 },
            tokenizer,
        })
    }

    /// The embedded demo model (or a larger random model for benchmarks), built in memory.
    pub fn demo(spec: &demo::DemoSpec) -> Result<ModelFiles, LoadError> {
        let origin = demo::DEMO_MODEL_NAME;
        let config = ModelConfig::from_json(&format!("{origin}/config.json"), &spec.config_json())?;
        let weights =
            Weights::Stored(WeightStore::from_bytes(&format!("{origin}/model.safetensors"), spec.safetensors())?);
        let tokenizer_config = demo::tokenizer_config_json();
        let tokenizer = Tokenizer::from_files(&TokenizerFiles {
            tokenizer_json: demo::tokenizer_json(),
            tokenizer_config: Some(&tokenizer_config),
            chat_template: None,
            origin,
        })?;
        Ok(ModelFiles { origin: origin.to_string(), config, weights, tokenizer })
    }
}

/// What the engine needs from a model: run one batch, and sample or return the requested rows.
pub trait Executor: Send {
    /// Runs `layout` and returns `[logits_rows.len(), vocab_size]` logits, row-major.
    fn execute(&mut self, layout: &BatchLayout, logits_rows: &[u32]) -> Result<Vec<f32>, BackendError>;
    /// Runs `layout` and picks a token for each of `logits_rows` by its rule in `sampling`, where
    /// the logits are: only the ids and the logprobs asked for leave the device.
    fn execute_step(
        &mut self,
        layout: &BatchLayout,
        logits_rows: &[u32],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledRow>, BackendError>;
    fn vocab_size(&self) -> usize;
    fn backend_name(&self) -> &'static str;
    fn kv_cache_shape(&self) -> KvCacheShape;
}

/// A backend with a model bound to it and the KV cache that model's layers write.
pub struct ModelRunner<B: Backend> {
    backend: B,
    model: Llama<B>,
    cache: B::KvCache,
    cache_shape: KvCacheShape,
    vocab_size: usize,
}

impl<B: Backend> ModelRunner<B> {
    /// Binds the weights and allocates a KV cache of `num_blocks` blocks of `block_size` tokens.
    /// `max_model_len` sizes the rotary table: no position at or beyond it can be run.
    pub fn new(
        backend: B,
        files: &ModelFiles,
        max_model_len: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<ModelRunner<B>, LoadError> {
        Self::from_parts(backend, &files.config, &files.weights, max_model_len, num_blocks, block_size)
    }

    /// [`ModelRunner::new`] from a config and weights, with no tokenizer (for benchmarks).
    pub fn from_parts(
        backend: B,
        config: &ModelConfig,
        weights: &Weights,
        max_model_len: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<ModelRunner<B>, LoadError> {
        let model = Llama::load(&backend, config, weights, max_model_len)?;
        let cache_shape = KvCacheShape {
            num_layers: config.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            dtype: backend.kv_cache_dtype(),
        };
        let cache = backend.new_kv_cache(cache_shape)?;
        Ok(ModelRunner { backend, model, cache, cache_shape, vocab_size: config.vocab_size })
    }

    /// Replaces the KV cache with one of `num_blocks` blocks (the old one is freed first), as
    /// after a profiling pass on a small cache. Its contents are lost.
    pub fn resize_kv_cache(&mut self, num_blocks: usize) -> Result<(), LoadError> {
        let shape = KvCacheShape { num_blocks, ..self.cache_shape };
        let small = KvCacheShape { num_blocks: 1, ..self.cache_shape };
        self.cache = self.backend.new_kv_cache(small)?;
        self.cache = self.backend.new_kv_cache(shape)?;
        self.cache_shape = shape;
        Ok(())
    }

    /// The backend and the KV cache, for tests that fill unwritten cache slots with NaN.
    pub fn backend_and_kv_cache(&mut self) -> (&B, &mut B::KvCache) {
        (&self.backend, &mut self.cache)
    }
}

impl<B: Backend> ModelRunner<B> {
    fn forward(&mut self, layout: &BatchLayout, logits_rows: &[u32]) -> Result<B::Tensor, BackendError> {
        layout.validate(&self.cache_shape)?;
        let batch = self.backend.prepare_batch(layout)?;
        self.model.forward(&self.backend, &batch, &mut self.cache, logits_rows)
    }
}

impl<B: Backend> Executor for ModelRunner<B> {
    fn execute(&mut self, layout: &BatchLayout, logits_rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        let logits = self.forward(layout, logits_rows)?;
        self.backend.to_host(&logits)
    }

    fn execute_step(
        &mut self,
        layout: &BatchLayout,
        logits_rows: &[u32],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledRow>, BackendError> {
        if sampling.len() != logits_rows.len() {
            return Err(BackendError::Batch("one sampling rule per sampled row is needed".into()));
        }
        let logits = self.forward(layout, logits_rows)?;
        self.backend.sample_rows(&logits, sampling)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn kv_cache_shape(&self) -> KvCacheShape {
        self.cache_shape
    }
}
