//! A model from one GGUF file: the configuration from its `{arch}.*` metadata, the tokenizer and
//! chat template from its `tokenizer.*` metadata, the weights dequantized at load.
//!
//! The configuration is written as the `config.json` transformers would make of the file and
//! checked by the same code as a Hugging Face folder's, so both formats meet the same rules.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use super::config::{ModelConfig, RopeScaling};
use super::{LoadError, ModelFiles, Weights};
use crate::tokenizer::{GgufVocab, Tokenizer};
use crate::weights::{MetaValue, WeightStore};

/// GGUF architectures read, and the Hugging Face architecture each one is.
const ARCHITECTURES: &[(&str, &str)] = &[("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")];

/// Tokens that end a turn in the chat formats of the families served: each one, when the
/// vocabulary has it as a control token, stops generation as llama.cpp's end-of-generation set
/// does (GGUF files often name only one end token, and not always the one chat turns end with).
const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"];

/// Is `path` a GGUF file (by its name)?
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Opens `path`; with `dummy`, its weights are replaced by random values of the same shapes.
pub fn load(path: &Path, dummy: bool) -> Result<ModelFiles, LoadError> {
    let origin = path.display().to_string();
    let invalid = |message: String| LoadError::Invalid(format!("{origin}: {message}"));
    let (store, meta) = WeightStore::open_gguf(path)?;
    let meta = Metadata(&meta);
    let vocab = GgufVocab {
        model: meta.string("tokenizer.ggml.model").map_err(invalid)?.unwrap_or_default(),
        pre: meta.string("tokenizer.ggml.pre").map_err(invalid)?,
        tokens: meta.list("tokenizer.ggml.tokens", |v| v.as_str().map(str::to_string)).map_err(invalid)?,
        token_types: match meta.0.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => meta.list("tokenizer.ggml.token_type", |v| v.as_u64().map(|t| t as i32)).map_err(invalid)?,
        },
        merges: meta.list("tokenizer.ggml.merges", |v| v.as_str().map(str::to_string)).map_err(invalid)?,
        scores: meta.list("tokenizer.ggml.scores", |v| v.as_f64().map(|s| s as f32)).map_err(invalid)?,
        bos_token_id: meta.uint("tokenizer.ggml.bos_token_id").map_err(invalid)?.map(|v| v as u32),
        unknown_token_id: meta.uint("tokenizer.ggml.unknown_token_id").map_err(invalid)?.map(|v| v as u32),
        add_bos_token: meta.get("tokenizer.ggml.add_bos_token", "a boolean", MetaValue::as_bool).map_err(invalid)?,
        add_space_prefix: meta
            .get("tokenizer.ggml.add_space_prefix", "a boolean", MetaValue::as_bool)
            .map_err(invalid)?,
        eos_token_id: meta.uint("tokenizer.ggml.eos_token_id").map_err(invalid)?.map(|v| v as u32),
        chat_template: meta.string("tokenizer.chat_template").map_err(invalid)?,
    };
    let config = config(&meta, &store, &vocab, &origin)?;
    let tokenizer = Tokenizer::from_gguf(&vocab, &origin)?;
    let (origin, weights) = match dummy {
        false => (origin, Weights::Stored(store)),
        true => (format!("{origin} (dummy weights)"), Weights::Dummy { seed: 0 }),
    };
    Ok(ModelFiles { origin, config, weights, tokenizer })
}

/// The configuration a GGUF file's metadata describes.
fn config(meta: &Metadata, store: &WeightStore, vocab: &GgufVocab, origin: &str) -> Result<ModelConfig, LoadError> {
    let invalid = |message: String| LoadError::Invalid(format!("{origin}: {message}"));
    let arch = meta.string("general.architecture").map_err(invalid)?.unwrap_or_default();
    let supported = ARCHITECTURES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ");
    let hf_arch = ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, hf)| *hf)
        .ok_or_else(|| invalid(format!("GGUF architecture '{arch}' is not supported; supported: {supported}")))?;
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| meta.uint(&key(k)).map_err(invalid);
    let required = |k: &str| uint(k)?.ok_or_else(|| invalid(format!("metadata '{}' is missing", key(k))));
    if uint("expert_count")?.is_some_and(|n| n > 0) {
        return Err(invalid("mixture-of-experts models are not supported".into()));
    }
    let heads = required("attention.head_count")?;
    let hidden = required("embedding_length")?;
    let vocab_size = store.shape("model.embed_tokens.weight")?[0];
    let mut config = json!({
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length")?,
        "num_hidden_layers": required("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": uint("attention.head_count_kv")?.unwrap_or(heads),
        "vocab_size": vocab_size,
        "max_position_embeddings": uint("context_length")?,
        "rms_norm_eps": meta.float(&key("attention.layer_norm_rms_epsilon")).map_err(invalid)?,
        "rope_theta": meta.float(&key("rope.freq_base")).map_err(invalid)?,
        "tie_word_embeddings": !store.contains("lm_head.weight"),
        "attention_bias": arch == "llama" && store.contains("model.layers.0.self_attn.q_proj.bias"),
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
    });
    if let Some(head_dim) = uint("attention.key_length")? {
        config["head_dim"] = json!(head_dim);
    }
    match meta.string(&key("rope.scaling.type")).map_err(invalid)?.as_deref() {
        None | Some("none") => {}
        Some("linear") => {
            let factor = meta.float(&key("rope.scaling.factor")).map_err(invalid)?;
            config["rope_scaling"] = json!({"type": "linear", "factor": factor});
        }
        Some(other) => return Err(invalid(format!("rope scaling '{other}' is not supported (linear)"))),
    }
    let config = Value::Object(
        config
            .as_object()
            .expect("object")
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let mut config = ModelConfig::from_json(origin, &config.to_string())?;
    if store.contains("rope_freqs.weight") {
        let divisors = store.tensor("rope_freqs.weight", &[config.head_dim / 2])?.to_f32_vec();
        if divisors.iter().any(|d| !(d.is_finite() && *d > 0.0)) {
            return Err(invalid("rope_freqs.weight holds a factor that is not a positive number".into()));
        }
        config.rope.scaling = RopeScaling::PerFrequency { divisors };
    }
    for (id, token) in vocab.tokens.iter().enumerate() {
        let control = vocab.token_types.get(id) == Some(&3);
        if control && END_OF_TURN_TOKENS.contains(&token.as_str()) && !config.eos_token_ids.contains(&(id as u32)) {
            config.eos_token_ids.push(id as u32);
        }
    }
    for extra in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta.uint(extra).map_err(invalid)?.map(|v| v as u32)
            && !config.eos_token_ids.contains(&id)
        {
            config.eos_token_ids.push(id);
        }
    }
    Ok(config)
}

/// Typed reads of GGUF metadata, with messages naming the key.
struct Metadata<'a>(&'a HashMap<String, MetaValue>);

impl Metadata<'_> {
    fn get<T>(&self, key: &str, what: &str, read: impl Fn(&MetaValue) -> Option<T>) -> Result<Option<T>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| format!("metadata '{key}' is not {what}")),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key, "a non-negative integer", MetaValue::as_u64)
    }

    fn float(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key, "a number", MetaValue::as_f64)
    }

    fn string(&self, key: &str) -> Result<Option<String>, String> {
        self.get(key, "a string", |v| v.as_str().map(str::to_string))
    }

    /// An array whose every item `read` accepts; missing is empty.
    fn list<T>(&self, key: &str, read: impl Fn(&MetaValue) -> Option<T>) -> Result<Vec<T>, String> {
        let Some(value) = self.0.get(key) else {
            return Ok(Vec::new());
        };
        let items = value.as_array().ok_or_else(|| format!("metadata '{key}' is not an array"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| read(v).ok_or_else(|| format!("metadata '{key}' item {i} has the wrong type")))
            .collect()
    }
}
