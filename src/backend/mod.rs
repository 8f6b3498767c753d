//! The operation boundary between the model and the hardware.
//!
//! The model forward (`model::llama`) is written once over the [`Backend`] trait: embedding,
//! linear (matmul plus optional bias), RMSNorm, rotary embedding, KV-cache write, paged attention,
//! SiLU·mul, residual add, and row gathering for the logits. A backend owns its tensor, weight and
//! KV-cache types; the model never sees their memory. `cpu` computes in f32 on the host; `cuda`
//! runs cuBLAS and the kernels of `kernels/*.cu` on a GPU (or on the CPU under emulation, in
//! tests), without the model code changing.
//!
//! A batch is described on the host by a [`BatchLayout`] (flattened tokens of several sequences,
//! their positions, the KV-cache slot each token writes, and each sequence's block table), which
//! the backend turns into its own [`Backend::Batch`] once per forward pass.

pub mod cpu;
pub mod cuda;
pub mod sampling;

pub use sampling::{Draw, LogitEdit, RowLogprobs, RowSampling, SampledRow};

use crate::weights::{DType, RawTensor};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("weight '{name}': {message}")]
    Weight { name: String, message: String },
    #[error("KV cache of {num_bytes} bytes could not be allocated: {message}")]
    KvCacheAllocation { num_bytes: usize, message: String },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("device: {0}")]
    Device(String),
}

/// Dummy weights are uniform in `[-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE]`, as vLLM's
/// `--load-format dummy` makes them.
pub const DUMMY_WEIGHT_RANGE: f32 = 1e-3;

/// The `idx`-th dummy value of stream `seed`: a counter-based hash, so any device computes any
/// element on its own and gets the same bits (the CUDA kernel `pagoda_fill_uniform_*` computes
/// exactly this).
pub fn dummy_value(seed: u64, idx: u64) -> f32 {
    let mut z = seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 random bits → [0, 1) exactly representable in f32, then to the range.
    let unit = (z >> 40) as f32 / (1u32 << 24) as f32;
    (unit * 2.0 - 1.0) * DUMMY_WEIGHT_RANGE
}

/// `[rows, cols]` of a weight of `shape`: a vector is one row, a matrix `[out, in]` is itself.
pub fn weight_dims(name: &str, shape: &[usize]) -> Result<(usize, usize), BackendError> {
    match shape {
        [n] => Ok((1, *n)),
        [r, c] => Ok((*r, *c)),
        other => Err(BackendError::Weight {
            name: name.to_string(),
            message: format!("expected a vector or a matrix, found shape {other:?}"),
        }),
    }
}

/// Checks that column blocks of `widths` cover a tensor of `cols` columns exactly.
pub fn check_split(widths: &[usize], cols: usize) -> Result<(), BackendError> {
    if widths.iter().sum::<usize>() != cols {
        return Err(BackendError::Batch(format!("split_columns: {widths:?} do not add up to {cols}")));
    }
    Ok(())
}

/// Geometry of the paged KV cache: per layer, K and V each `[num_blocks, block_size, num_kv_heads,
/// head_dim]` elements of `dtype`, so a token's slot is `block_id * block_size + offset_in_block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `--kv-cache-dtype auto`: the dtype the backend computes in (f32 on the CPU).
    pub dtype: DType,
}

impl KvCacheShape {
    /// Bytes one block takes across all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// The KV-cache slot of position `pos` of a sequence whose blocks are `block_table`: the one place
/// the paging formula is written (`block_id * block_size + offset_in_block`).
pub fn cache_slot(block_table: &[u32], pos: usize, block_size: usize) -> u32 {
    block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}

/// One sequence's part of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// Index of the sequence's first token in the flattened batch.
    pub query_start: usize,
    /// Tokens this pass computes for the sequence (a prefill chunk, or 1 for a decode).
    pub query_len: usize,
    /// Tokens in the KV cache once this pass has written its own: attention reads `[0, context_len)`.
    pub context_len: usize,
    /// Physical block of each logical block of the sequence.
    pub block_table: Vec<u32>,
}

/// The host-side description of one forward pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    /// `[num_tokens]` token ids, sequences one after another.
    pub token_ids: Vec<u32>,
    /// `[num_tokens]` absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// `[num_tokens]` KV-cache slot each token's K and V are written to.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqLayout>,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Checks the invariants every backend relies on, so a scheduler bug surfaces as an error
    /// rather than an out-of-bounds access in a kernel.
    pub fn validate(&self, cache: &KvCacheShape) -> Result<(), BackendError> {
        let n = self.token_ids.len();
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return Err(BackendError::Batch("token_ids, positions and slot_mapping differ in length".into()));
        }
        let num_slots = cache.num_blocks * cache.block_size;
        if let Some(slot) = self.slot_mapping.iter().find(|&&s| s as usize >= num_slots) {
            return Err(BackendError::Batch(format!("slot {slot} is outside the cache of {num_slots} slots")));
        }
        let mut next_start = 0;
        for (idx, seq) in self.seqs.iter().enumerate() {
            if seq.query_start != next_start || seq.query_len == 0 || seq.query_len > seq.context_len {
                return Err(BackendError::Batch(format!("sequence {idx} has an inconsistent query range")));
            }
            if seq.block_table.len() * cache.block_size < seq.context_len {
                return Err(BackendError::Batch(format!("sequence {idx} has too few blocks for its context")));
            }
            if seq.block_table.iter().any(|&b| b as usize >= cache.num_blocks) {
                return Err(BackendError::Batch(format!("sequence {idx} names a block outside the cache")));
            }
            next_start += seq.query_len;
        }
        if next_start != n {
            return Err(BackendError::Batch("sequences do not cover the batch's tokens".into()));
        }
        Ok(())
    }
}

/// The slot of a token that writes nothing to the KV cache: the padding of a decode step replayed
/// from a graph captured for more tokens. Only the model runner's padding uses it.
pub const NO_SLOT: u32 = u32::MAX;

/// Shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Attend to at most this many most recent tokens (including the query's own).
    pub sliding_window: Option<usize>,
}

/// The operations the model is written over. Activations are 2-D `[num_tokens, width]`, row-major.
pub trait Backend: Send + Sync + 'static {
    type Tensor: Send;
    type Weight: Send + Sync;
    type KvCache: Send;
    type Batch: Send;
    /// Work captured once and replayed as a whole (CUDA graphs); `()` where there are none.
    type Graph: Send;

    /// A short name for logs and `/version` ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Runs one step's work, where this backend wants it run: the CPU backend runs it on a worker
    /// of its thread pool, so that each of the step's many parallel sections starts from a worker
    /// (the other workers steal from it) instead of waking a sleeping caller when it ends.
    fn run_step<T: Send>(work: impl FnOnce() -> T + Send) -> T {
        work()
    }

    /// Makes a stored tensor usable as a weight (1-D vectors and 2-D `[out, in]` matrices).
    fn load_weight(&self, raw: &RawTensor) -> Result<Self::Weight, BackendError>;
    /// A weight of `shape` filled with uniform values in ±[`DUMMY_WEIGHT_RANGE`] drawn from
    /// `seed` (`--load-format dummy`): the same values for the same seed on every backend.
    fn random_weight(&self, name: &str, shape: &[usize], seed: u64) -> Result<Self::Weight, BackendError>;
    /// Weights of one input width stacked by rows into one `[Σ rows, cols]` weight (q/k/v,
    /// gate/up), so that one matmul computes them all; vectors (their biases) are concatenated.
    fn stack_weights(&self, parts: Vec<Self::Weight>) -> Result<Self::Weight, BackendError>;
    /// `x [n, Σ widths]` cut into column blocks of `widths`, in order.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>, BackendError>;
    /// A weight computed on the host (the rotary table).
    fn weight_from_f32(&self, data: Vec<f32>, shape: [usize; 2]) -> Result<Self::Weight, BackendError>;
    /// The element type of this backend's KV cache (`--kv-cache-dtype auto`).
    fn kv_cache_dtype(&self) -> DType;
    /// Whether the KV cache's memory is only committed where it is first written (host memory),
    /// so that reusing written blocks first keeps the process small.
    fn kv_cache_commits_on_write(&self) -> bool {
        false
    }
    /// A KV cache of `shape`, whose dtype must be [`Backend::kv_cache_dtype`].
    fn new_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache, BackendError>;
    fn prepare_batch(&self, layout: &BatchLayout) -> Result<Self::Batch, BackendError>;
    /// Rewrites `batch` in place for `layout`, which has its shape (tokens, sequences, block-table
    /// width), in one upload: work captured reading `batch` then computes `layout`.
    fn update_batch(&self, batch: &mut Self::Batch, layout: &BatchLayout) -> Result<(), BackendError>;
    /// Records the work `capture` issues as a graph instead of running it; `None` (and `capture`
    /// not called) where this backend has no graphs. The work must not copy to or from the host.
    fn capture<T>(
        &self,
        capture: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<Option<(Self::Graph, T)>, BackendError>;
    /// Runs a captured graph again, on the buffers it captured.
    fn replay(&self, graph: &Self::Graph) -> Result<(), BackendError>;

    /// Rows of `table` `[vocab, hidden]` for the batch's token ids.
    fn embedding(&self, table: &Self::Weight, batch: &Self::Batch) -> Result<Self::Tensor, BackendError>;
    /// `x [n, in] · w[out, in]ᵀ (+ bias[out])`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor, BackendError>;
    /// The output projection `x [n, hidden] · w[vocab, hidden]ᵀ`, in f32 where the backend
    /// computes in less, so that sampling and logprobs see full-precision logits.
    fn logits(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor, BackendError> {
        self.linear(x, w, None)
    }
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor, BackendError>;
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), BackendError>;
    /// `hidden += delta`, then the RMSNorm of the sum. A backend may fuse the two.
    fn add_rms_norm(
        &self,
        hidden: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor, BackendError> {
        self.add_assign(hidden, delta)?;
        self.rms_norm(hidden, weight, eps)
    }
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor, BackendError>;
    /// Rotates `x [n, num_heads * head_dim]` in place by each token's position, with the
    /// non-interleaved (`rotate_half`) pairing. `cos_sin` is `[max_positions, head_dim]`: the
    /// cosines of the `head_dim / 2` frequencies, then their sines.
    fn rotary(
        &self,
        x: &mut Self::Tensor,
        num_heads: usize,
        head_dim: usize,
        cos_sin: &Self::Weight,
        batch: &Self::Batch,
    ) -> Result<(), BackendError>;
    /// Stores each token's K and V `[n, num_kv_heads * head_dim]` at its slot in layer `layer`.
    fn write_kv_cache(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<(), BackendError>;
    /// Rotary embedding of `q` and `k`, then `k` and `v` stored in layer `layer` of the cache. A
    /// backend may fuse the three; `k` holds the rotated keys afterwards either way.
    #[allow(clippy::too_many_arguments)]
    fn rotary_write_kv_cache(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        cos_sin: &Self::Weight,
        batch: &Self::Batch,
        params: &AttentionParams,
    ) -> Result<(), BackendError> {
        self.rotary(q, params.num_heads, params.head_dim, cos_sin, batch)?;
        self.rotary(k, params.num_kv_heads, params.head_dim, cos_sin, batch)?;
        self.write_kv_cache(cache, layer, k, v, batch)
    }
    /// Causal attention of `q [n, num_heads * head_dim]` over each sequence's cached K and V, read
    /// through its block table. Returns `[n, num_heads * head_dim]`.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        batch: &Self::Batch,
        params: &AttentionParams,
    ) -> Result<Self::Tensor, BackendError>;
    /// The given rows of `x`, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor, BackendError>;
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    /// The number of rows of `x`.
    fn rows(&self, x: &Self::Tensor) -> usize;
    /// A token for each row of f32 logits `x`, picked as `sampling` says ([`sampling::sample_row`]
    /// defines it) where the logits are: only the ids and the logprobs asked for leave the device.
    /// `x` is used up.
    fn sample_rows(&self, x: &Self::Tensor, sampling: &[RowSampling]) -> Result<Vec<SampledRow>, BackendError>;
}
