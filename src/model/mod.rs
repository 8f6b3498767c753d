//! Models: what a checkpoint folder holds ([`ModelFiles`]), the architectures written over the
//! backend's operations, and [`ModelRunner`], which owns a backend, a model and its KV cache and
//! runs forward passes for the engine through the [`Executor`] trait.

pub mod config;
pub mod demo;
pub mod gguf;
mod llama;
pub mod rope;

use std::path::{Path, PathBuf};

use crate::backend::{Backend, KvCacheShape, NO_SLOT};
// The vocabulary of the `Executor` interface, defined by the backend that computes it: the engine
// names these through `model` (its one way down), never `backend` directly.
pub use crate::backend::sampling::sample_row;
pub use crate::backend::{BackendError, BatchLayout, Draw, LogitEdit, RowSampling, SampledRow, SeqLayout, cache_slot};
use crate::tokenizer::{Tokenizer, TokenizerError, TokenizerFiles};
use crate::weights::{WeightStore, WeightsError};
pub use config::{Architecture, ConfigError, ModelConfig};
pub use llama::Llama;

/// Everything that can go wrong loading a model; each message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model folder {0} does not exist")]
    NoSuchFolder(PathBuf),
    #[error("model file {0} does not exist")]
    NoSuchFile(PathBuf),
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
    /// A Hugging Face folder, or a `.gguf` file.
    pub fn load(dir: &Path) -> Result<ModelFiles, LoadError> {
        if gguf::is_gguf(dir) {
            return Self::load_gguf(dir, false);
        }
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
        if gguf::is_gguf(dir) {
            return Self::load_gguf(dir, true);
        }
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

    fn load_gguf(path: &Path, dummy: bool) -> Result<ModelFiles, LoadError> {
        if !path.is_file() {
            return Err(LoadError::NoSuchFile(path.to_path_buf()));
        }
        gguf::load(path, dummy)
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
    /// [`Backend::kv_cache_commits_on_write`].
    fn kv_cache_commits_on_write(&self) -> bool;
}

/// A backend with a model bound to it and the KV cache that model's layers write.
pub struct ModelRunner<B: Backend> {
    backend: B,
    model: Llama<B>,
    cache: B::KvCache,
    cache_shape: KvCacheShape,
    vocab_size: usize,
    /// Decode graphs by ascending size (none on the CPU, with `--enforce-eager`, or before
    /// `capture_decode_graphs`).
    graphs: Vec<DecodeGraph<B>>,
}

/// A decode step of `size` tokens captured once (`Backend::capture`): `batch` is the metadata
/// buffer its kernels read, `hidden` the final hidden states it writes. Smaller steps are padded
/// to `size` with tokens that write no cache slot.
struct DecodeGraph<B: Backend> {
    size: usize,
    /// Block-table width every sequence is padded to: the blocks of the longest context.
    table_width: usize,
    batch: B::Batch,
    graph: B::Graph,
    hidden: B::Tensor,
}

/// The largest decode step captured, as vLLM's default: beyond it, steps run eagerly.
pub const MAX_GRAPH_SIZE: usize = 256;

/// The most rows of logits a step holds at once (`[rows, vocab]` f32): a step that samples more
/// (prompt logprobs, or more sequences) computes and samples them this many at a time. The
/// profiling pass that sizes the KV cache measures this many.
pub const MAX_LOGITS_ROWS: usize = 256;

/// The decode batch sizes graphs are captured for: powers of two below `max_num_seqs` (capped at
/// [`MAX_GRAPH_SIZE`]), and that cap itself, so a step pads at most to twice its size.
pub fn graph_sizes(max_num_seqs: usize) -> Vec<usize> {
    let cap = max_num_seqs.clamp(1, MAX_GRAPH_SIZE);
    let mut sizes: Vec<usize> = (0..).map(|i| 1usize << i).take_while(|&s| s < cap).collect();
    sizes.push(cap);
    sizes
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
        Ok(ModelRunner { backend, model, cache, cache_shape, vocab_size: config.vocab_size, graphs: Vec::new() })
    }

    /// Replaces the KV cache with one of `num_blocks` blocks (the old one is freed first), as
    /// after a profiling pass on a small cache. Its contents are lost.
    pub fn resize_kv_cache(&mut self, num_blocks: usize) -> Result<(), LoadError> {
        // The graphs address the old cache.
        self.graphs.clear();
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
    /// Captures a graph of the decode step for each of `sizes` (ascending), for contexts up to
    /// `max_model_len`; returns how many were captured (none where the backend has no graphs).
    /// Each is run eagerly first, so that libraries finish their lazy setup outside the capture.
    pub fn capture_decode_graphs(&mut self, sizes: &[usize], max_model_len: usize) -> Result<usize, LoadError> {
        self.graphs.clear();
        let table_width = max_model_len.div_ceil(self.cache_shape.block_size).max(1);
        let mut graphs = Vec::new();
        // Largest first: the smaller graphs reuse the pool's buffers.
        for &size in sizes.iter().rev() {
            let layout = pad_decode_layout(&BatchLayout::default(), size, table_width, max_model_len);
            let (backend, model, cache) = (&self.backend, &self.model, &mut self.cache);
            let batch = backend.prepare_batch(&layout)?;
            model.final_hidden(backend, &batch, cache, None)?;
            let Some((graph, hidden)) = backend.capture(|| model.final_hidden(backend, &batch, cache, None))? else {
                return Ok(0);
            };
            graphs.push(DecodeGraph { size, table_width, batch, graph, hidden });
        }
        graphs.reverse();
        self.graphs = graphs;
        Ok(self.graphs.len())
    }

    /// The logits of `logits_rows`, and how many of their rows are real: a decode step that a
    /// graph covers replays it (its logits then have the graph's padded rows after the real ones).
    fn forward(&mut self, layout: &BatchLayout, logits_rows: &[u32]) -> Result<(B::Tensor, usize), BackendError> {
        layout.validate(&self.cache_shape)?;
        let n = layout.num_tokens();
        let every_row = logits_rows.len() == n && logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        let decode = layout.seqs.iter().all(|s| s.query_len == 1) && every_row && n > 0;
        if decode
            && let Some(g) = self.graphs.iter_mut().find(|g| g.size >= n)
            && layout.seqs.iter().all(|s| s.block_table.len() <= g.table_width)
        {
            let padded = pad_decode_layout(layout, g.size, g.table_width, 1);
            self.backend.update_batch(&mut g.batch, &padded)?;
            self.backend.replay(&g.graph)?;
            return Ok((self.model.logits(&self.backend, &g.hidden)?, n));
        }
        let batch = self.backend.prepare_batch(layout)?;
        let rows = if every_row { None } else { Some(logits_rows) };
        Ok((self.model.forward(&self.backend, &batch, &mut self.cache, rows)?, logits_rows.len()))
    }
}

impl<B: Backend> ModelRunner<B> {
    /// [`Executor::execute_step`] for more rows than [`MAX_LOGITS_ROWS`] (a step with prompt
    /// logprobs): the final hidden states of all of them, then their logits and picks a slice at
    /// a time, so the logits never take more memory than the profiling pass measured.
    fn execute_in_slices(
        &mut self,
        layout: &BatchLayout,
        logits_rows: &[u32],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledRow>, BackendError> {
        layout.validate(&self.cache_shape)?;
        let batch = self.backend.prepare_batch(layout)?;
        let hidden = self.model.final_hidden(&self.backend, &batch, &mut self.cache, Some(logits_rows))?;
        let mut picked = Vec::with_capacity(sampling.len());
        for (i, rules) in sampling.chunks(MAX_LOGITS_ROWS).enumerate() {
            let start = (i * MAX_LOGITS_ROWS) as u32;
            let rows: Vec<u32> = (start..start + rules.len() as u32).collect();
            let logits = self.model.logits(&self.backend, &self.backend.gather_rows(&hidden, &rows)?)?;
            picked.extend(self.backend.sample_rows(&logits, rules)?);
        }
        Ok(picked)
    }

    /// One forward pass of at most [`MAX_LOGITS_ROWS`] sampled rows, and their tokens.
    fn sample_step(
        &mut self,
        layout: &BatchLayout,
        logits_rows: &[u32],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledRow>, BackendError> {
        let (logits, _) = self.forward(layout, logits_rows)?;
        let padded_rows = self.backend.rows(&logits);
        if padded_rows <= sampling.len() {
            return self.backend.sample_rows(&logits, sampling);
        }
        // A graph's padding rows are picked greedily and dropped.
        let mut rules = sampling.to_vec();
        rules.resize(padded_rows, RowSampling::greedy());
        let mut picked = self.backend.sample_rows(&logits, &rules)?;
        picked.truncate(sampling.len());
        Ok(picked)
    }
}

/// `layout` (one token per sequence) padded to `size` sequences, every block table padded with
/// zeros to `table_width`. A padding token is token 0 at position 0 writing no cache slot
/// ([`NO_SLOT`]), in a sequence of its own with a context of `pad_context` (the longest context,
/// when capturing, so that the captured attention splits suit any step).
fn pad_decode_layout(layout: &BatchLayout, size: usize, table_width: usize, pad_context: usize) -> BatchLayout {
    let mut padded = layout.clone();
    for seq in &mut padded.seqs {
        seq.block_table.resize(table_width, 0);
    }
    for i in layout.num_tokens()..size {
        padded.token_ids.push(0);
        padded.positions.push(0);
        padded.slot_mapping.push(NO_SLOT);
        padded.seqs.push(SeqLayout {
            query_start: i,
            query_len: 1,
            context_len: pad_context,
            block_table: vec![0; table_width],
        });
    }
    padded
}

impl<B: Backend> Executor for ModelRunner<B> {
    fn execute(&mut self, layout: &BatchLayout, logits_rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        B::run_step(|| {
            let (logits, rows) = self.forward(layout, logits_rows)?;
            let mut host = self.backend.to_host(&logits)?;
            host.truncate(rows * self.vocab_size);
            Ok(host)
        })
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
        B::run_step(|| {
            if logits_rows.len() > MAX_LOGITS_ROWS {
                self.execute_in_slices(layout, logits_rows, sampling)
            } else {
                self.sample_step(layout, logits_rows, sampling)
            }
        })
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

    fn kv_cache_commits_on_write(&self) -> bool {
        self.backend.kv_cache_commits_on_write()
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;

    #[test]
    fn graph_sizes_double_up_to_max_num_seqs_and_stop_at_256() {
        assert_eq!(graph_sizes(256), vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(graph_sizes(100), vec![1, 2, 4, 8, 16, 32, 64, 100]);
        assert_eq!(graph_sizes(1024), vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(graph_sizes(1), vec![1]);
        assert_eq!(graph_sizes(0), vec![1]);
    }

    #[test]
    fn padding_writes_no_slot_and_keeps_every_table_at_the_graph_width() {
        let layout = BatchLayout {
            token_ids: vec![5, 6],
            positions: vec![9, 3],
            slot_mapping: vec![41, 67],
            seqs: vec![
                SeqLayout { query_start: 0, query_len: 1, context_len: 10, block_table: vec![2] },
                SeqLayout { query_start: 1, query_len: 1, context_len: 4, block_table: vec![4, 1] },
            ],
        };
        let padded = pad_decode_layout(&layout, 4, 3, 1);
        assert_eq!(padded.token_ids, [5, 6, 0, 0]);
        assert_eq!(padded.positions, [9, 3, 0, 0]);
        assert_eq!(padded.slot_mapping, [41, 67, NO_SLOT, NO_SLOT]);
        assert!(padded.seqs.iter().all(|s| s.block_table.len() == 3 && s.query_len == 1));
        assert_eq!(padded.seqs[1].block_table, [4, 1, 0]);
        assert_eq!(padded.seqs[3].query_start, 3);
    }
}
