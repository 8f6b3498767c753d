//! The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2), written once over [`Backend`].
//!
//! The three architectures differ only in what `ModelConfig` already resolved: biases on the
//! projections (Qwen2, Llama's `attention_bias`), tied embeddings, a sliding window (Mistral), and
//! the rotary scaling. Weights are looked up by their checkpoint names.

use super::Weights;
use super::config::ModelConfig;
use super::rope;
use crate::backend::{AttentionParams, Backend, BackendError};
use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

struct Linear<B: Backend> {
    weight: B::Weight,
    bias: Option<B::Weight>,
}

struct Layer<B: Backend> {
    input_layernorm: B::Weight,
    /// q_proj, k_proj and v_proj stacked: one matmul, its output split into q, k and v.
    qkv_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_layernorm: B::Weight,
    /// gate_proj and up_proj stacked.
    gate_up_proj: Linear<B>,
    down_proj: Linear<B>,
}

pub struct Llama<B: Backend> {
    config: ModelConfig,
    embed_tokens: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<B::Weight>,
    /// `[max_positions, head_dim]`, see [`Backend::rotary`].
    cos_sin: B::Weight,
    attention: AttentionParams,
}

impl<B: Backend> Llama<B> {
    /// Binds every weight of `config`'s shapes from `weights`; `max_positions` sizes the rotary
    /// table.
    pub fn load(
        backend: &B,
        config: &ModelConfig,
        weights: &Weights,
        max_positions: usize,
    ) -> Result<Self, BuildError> {
        let c = config;
        let (hidden, q_width, kv_width) =
            (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let weight = |name: &str, shape: &[usize]| -> Result<B::Weight, BuildError> {
            match weights {
                Weights::Stored(store) => Ok(backend.load_weight(&store.tensor(name, shape)?)?),
                // Each tensor's values depend only on the seed and its name.
                Weights::Dummy { seed } => {
                    Ok(backend.random_weight(name, shape, seed ^ xxhash_rust::xxh3::xxh3_64(name.as_bytes()))?)
                }
            }
        };
        let linear = |prefix: &str, out: usize, inp: usize, bias: bool| -> Result<Linear<B>, BuildError> {
            Ok(Linear {
                weight: weight(&format!("{prefix}.weight"), &[out, inp])?,
                bias: if bias { Some(weight(&format!("{prefix}.bias"), &[out])?) } else { None },
            })
        };
        // Projections that read the same input, stacked by rows (and their biases, if any).
        let stacked = |parts: Vec<Linear<B>>| -> Result<Linear<B>, BuildError> {
            let (weights, biases): (Vec<_>, Vec<_>) = parts.into_iter().map(|l| (l.weight, l.bias)).unzip();
            let biases: Option<Vec<_>> = biases.into_iter().collect();
            Ok(Linear {
                weight: backend.stack_weights(weights)?,
                bias: biases.map(|b| backend.stack_weights(b)).transpose()?,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: weight(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                qkv_proj: stacked(vec![
                    linear(&format!("{p}.self_attn.q_proj"), q_width, hidden, c.qkv_bias)?,
                    linear(&format!("{p}.self_attn.k_proj"), kv_width, hidden, c.qkv_bias)?,
                    linear(&format!("{p}.self_attn.v_proj"), kv_width, hidden, c.qkv_bias)?,
                ])?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), hidden, q_width, c.o_bias)?,
                post_attention_layernorm: weight(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                gate_up_proj: stacked(vec![
                    linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, hidden, c.mlp_bias)?,
                    linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, hidden, c.mlp_bias)?,
                ])?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), hidden, c.intermediate_size, c.mlp_bias)?,
            });
        }
        let embed_tokens = weight("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(weight("lm_head.weight", &[c.vocab_size, hidden])?) };
        let table = rope::cos_sin_table(&c.rope, c.head_dim, max_positions);
        Ok(Llama {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: weight("model.norm.weight", &[hidden])?,
            lm_head,
            cos_sin: backend.weight_from_f32(table, [max_positions, c.head_dim])?,
            attention: AttentionParams {
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                sliding_window: c.sliding_window,
            },
        })
    }

    fn linear(backend: &B, x: &B::Tensor, l: &Linear<B>) -> Result<B::Tensor, BackendError> {
        backend.linear(x, &l.weight, l.bias.as_ref())
    }

    /// Runs the batch through every layer, writing its K and V into `cache`, and returns the logits
    /// `[rows, vocab]` of the requested rows of the batch (`None`: every row).
    pub fn forward(
        &self,
        backend: &B,
        batch: &B::Batch,
        cache: &mut B::KvCache,
        logits_rows: Option<&[u32]>,
    ) -> Result<B::Tensor, BackendError> {
        self.logits(backend, &self.final_hidden(backend, batch, cache, logits_rows)?)
    }

    /// The output projection of [`Llama::final_hidden`]'s rows.
    pub fn logits(&self, backend: &B, hidden: &B::Tensor) -> Result<B::Tensor, BackendError> {
        backend.logits(hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// [`Llama::forward`] up to the final norm: `[rows, hidden]`.
    pub fn final_hidden(
        &self,
        backend: &B,
        batch: &B::Batch,
        cache: &mut B::KvCache,
        logits_rows: Option<&[u32]>,
    ) -> Result<B::Tensor, BackendError> {
        let (c, attn) = (&self.config, &self.attention);
        let mut hidden = backend.embedding(&self.embed_tokens, batch)?;
        // The MLP output of the previous layer, added to `hidden` together with the next norm.
        let mut pending: Option<B::Tensor> = None;
        for (idx, layer) in self.layers.iter().enumerate() {
            let x = match pending.take() {
                None => backend.rms_norm(&hidden, &layer.input_layernorm, c.rms_norm_eps)?,
                Some(delta) => backend.add_rms_norm(&mut hidden, &delta, &layer.input_layernorm, c.rms_norm_eps)?,
            };
            let qkv = Self::linear(backend, &x, &layer.qkv_proj)?;
            let q_width = attn.num_heads * attn.head_dim;
            let kv_width = attn.num_kv_heads * attn.head_dim;
            let [mut q, mut k, v]: [B::Tensor; 3] = backend
                .split_columns(&qkv, &[q_width, kv_width, kv_width])?
                .try_into()
                .map_err(|_| BackendError::Batch("split_columns returned the wrong number of parts".into()))?;
            backend.rotary_write_kv_cache(&mut q, &mut k, &v, cache, idx, &self.cos_sin, batch, attn)?;
            let context = backend.paged_attention(&q, cache, idx, batch, attn)?;
            let attn_out = Self::linear(backend, &context, &layer.o_proj)?;
            let x = backend.add_rms_norm(&mut hidden, &attn_out, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            let gate_up = Self::linear(backend, &x, &layer.gate_up_proj)?;
            let [gate, up]: [B::Tensor; 2] = backend
                .split_columns(&gate_up, &[c.intermediate_size, c.intermediate_size])?
                .try_into()
                .map_err(|_| BackendError::Batch("split_columns returned the wrong number of parts".into()))?;
            pending = Some(Self::linear(backend, &backend.silu_mul(&gate, &up)?, &layer.down_proj)?);
        }
        // Only the rows that are sampled need the last residual add, the final norm and the
        // (large) output projection.
        let gather = |x: B::Tensor| match logits_rows {
            Some(rows) => backend.gather_rows(&x, rows),
            None => Ok(x),
        };
        let mut last = gather(hidden)?;
        match pending {
            None => backend.rms_norm(&last, &self.norm, c.rms_norm_eps),
            Some(delta) => backend.add_rms_norm(&mut last, &gather(delta)?, &self.norm, c.rms_norm_eps),
        }
    }
}
