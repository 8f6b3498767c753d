//! `config.json` and `generation_config.json`, read into one checked [`ModelConfig`].
//!
//! Two layouts exist in the wild: the classic one (`rope_theta`, `rope_scaling`, `torch_dtype`) and
//! the transformers ≥ 5 one (`rope_parameters`, `dtype`). Both resolve to the same [`RopeConfig`].
//! Every value the forward pass relies on is checked here, so a bad config fails at load with the
//! file named instead of producing a shape panic later.

use std::path::Path;

use serde_json::{Map, Value};

use crate::weights::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

    fn from_hf_name(name: &str) -> Option<Architecture> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's piecewise scaling of low and high frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Each frequency divided by its own factor (`head_dim / 2` of them): how GGUF files store
    /// Llama 3.1's scaling, precomputed (`rope_freqs.weight`).
    PerFrequency {
        divisors: Vec<f32>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub rope: RopeConfig,
    /// Attention looks back at most this many tokens (Mistral's `sliding_window`).
    pub sliding_window: Option<usize>,
    /// The dtype the checkpoint declares, if it declares one.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    /// EOS ids from config.json and generation_config.json together.
    pub eos_token_ids: Vec<u32>,
    /// Sampling defaults from generation_config.json.
    pub generation_defaults: GenerationDefaults,
}

/// The sampling values a model's `generation_config.json` recommends; servers use them for
/// fields a request leaves out (vLLM's `--generation-config auto`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// The defaults `value` gives, and the keys it holds with a value of the wrong type (which
    /// are left out, so requests get Pagoda's own defaults for them).
    fn from_json(value: &Value) -> (GenerationDefaults, Vec<String>) {
        let mut wrong = Vec::new();
        let mut read = |key: &str, want: &str, parse: &dyn Fn(&Value) -> Option<f64>| match value.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let parsed = parse(v);
                if parsed.is_none() {
                    wrong.push(format!("{key} is {v}, not {want}"));
                }
                parsed
            }
        };
        let number = |v: &Value| v.as_f64().filter(|v| v.is_finite());
        let count = |v: &Value| v.as_u64().map(|v| v as f64);
        let defaults = GenerationDefaults {
            temperature: read("temperature", "a number", &number).map(|v| v as f32),
            top_p: read("top_p", "a number", &number).map(|v| v as f32),
            top_k: read("top_k", "a non-negative integer", &count).map(|v| v as usize),
            min_p: read("min_p", "a number", &number).map(|v| v as f32),
            repetition_penalty: read("repetition_penalty", "a number", &number).map(|v| v as f32),
            max_new_tokens: read("max_new_tokens", "a non-negative integer", &count).map(|v| v as usize),
        };
        (defaults, wrong)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ModelConfig {
    /// Reads `config.json` and, when present, `generation_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            path: path.display().to_string(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "not found: a Hugging Face model folder needs a config.json".to_string()
            } else {
                e.to_string()
            },
        })?;
        let mut config = ModelConfig::from_json(&path.display().to_string(), &text)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let gen_name = gen_path.display().to_string();
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| ConfigError { path: gen_name.clone(), message: format!("not valid JSON: {e}") })?;
            for id in token_id_list(&value, "eos_token_id", &gen_name)? {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
            let (defaults, wrong) = GenerationDefaults::from_json(&value);
            for problem in wrong {
                tracing::warn!(file = %gen_name, "{problem}: ignored, so requests get the default for it");
            }
            config.generation_defaults = defaults;
        }
        Ok(config)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json(path: &str, text: &str) -> Result<ModelConfig, ConfigError> {
        let err = |message: String| ConfigError { path: path.to_string(), message };
        let value: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let fields = Fields { obj, path };

        let architecture = architecture(obj).map_err(err)?;
        let AttentionShape { hidden_size, num_attention_heads, num_key_value_heads, head_dim } =
            attention_shape(&fields)?;
        match obj.get("hidden_act").and_then(|v| v.as_str()) {
            None | Some("silu") => {}
            Some(other) => return Err(err(format!("hidden_act {other} is not supported (only silu)"))),
        }

        let default_max_positions = match architecture {
            Architecture::Llama => 2048,
            Architecture::Mistral => 32768,
            Architecture::Qwen2 => 32768,
        };
        let attention_bias = fields.bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => fields.optional_positive("sliding_window")?,
            Architecture::Qwen2 if fields.bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(err("use_sliding_window is true: Qwen2 sliding-window attention is not supported".into()));
            }
            _ => None,
        };

        let dtype = config_dtype(obj).map_err(err)?;

        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: fields.positive("intermediate_size")?,
            num_hidden_layers: fields.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: fields.positive("vocab_size")?,
            rms_norm_eps: fields.float("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position_embeddings: fields
                .optional_positive("max_position_embeddings")?
                .unwrap_or(default_max_positions),
            tie_word_embeddings: fields.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && fields.bool("mlp_bias")?.unwrap_or(false),
            rope: parse_rope(&fields)?,
            sliding_window,
            dtype,
            bos_token_id: token_id_list(&value, "bos_token_id", path)?.first().copied(),
            eos_token_ids: token_id_list(&value, "eos_token_id", path)?,
            generation_defaults: GenerationDefaults::default(),
        };
        Ok(config)
    }

    pub fn num_queries_per_kv(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// The first of `architectures`, which must be one Pagoda serves.
fn architecture(obj: &serde_json::Map<String, Value>) -> Result<Architecture, String> {
    let names: Vec<&str> = match obj.get("architectures") {
        Some(Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    match names.first() {
        None => Err(format!("no \"architectures\" entry; supported: {}", Architecture::SUPPORTED)),
        Some(name) => Architecture::from_hf_name(name)
            .ok_or_else(|| format!("architecture {name} is not supported; supported: {}", Architecture::SUPPORTED)),
    }
}

struct AttentionShape {
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
}

/// The attention's shape, checked: whole KV-head groups, an even head size for the rotation.
fn attention_shape(fields: &Fields) -> Result<AttentionShape, ConfigError> {
    let hidden_size = fields.positive("hidden_size")?;
    let num_attention_heads = fields.positive("num_attention_heads")?;
    let num_key_value_heads = fields.optional_positive("num_key_value_heads")?.unwrap_or(num_attention_heads);
    let head_dim = match fields.optional_positive("head_dim")? {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(fields.err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
            )));
        }
    };
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(fields.err(format!(
            "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        )));
    }
    if head_dim % 2 != 0 {
        return Err(fields.err(format!("head_dim {head_dim} must be even for rotary embeddings")));
    }
    Ok(AttentionShape { hidden_size, num_attention_heads, num_key_value_heads, head_dim })
}

/// `dtype` (transformers ≥ 5) or `torch_dtype`, if given.
fn config_dtype(obj: &serde_json::Map<String, Value>) -> Result<Option<DType>, String> {
    match obj.get("dtype").or_else(|| obj.get("torch_dtype")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => DType::from_config_name(name)
            .map(Some)
            .ok_or_else(|| format!("dtype {name} is not supported (float32, float16 or bfloat16)")),
        Some(other) => Err(format!("dtype must be a string, found {other}")),
    }
}

/// Typed access to the fields of one JSON object with errors naming the file and the key.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a str,
}

impl Fields<'_> {
    fn err(&self, message: String) -> ConfigError {
        ConfigError { path: self.path.to_string(), message }
    }

    fn optional_positive(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v > 0 && v <= u32::MAX as u64 => Ok(Some(v as usize)),
                _ => Err(self.err(format!("{key} must be a positive integer, found {n}"))),
            },
            Some(other) => Err(self.err(format!("{key} must be a positive integer, found {other}"))),
        }
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        self.optional_positive(key)?.ok_or_else(|| self.err(format!("{key} is missing")))
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        float_field(self.obj, key).map_err(|m| self.err(m))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(format!("{key} must be true or false, found {other}"))),
        }
    }
}

fn float_field(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() && v > 0.0 => Ok(Some(v)),
            _ => Err(format!("{key} must be a positive number, found {n}")),
        },
        Some(other) => Err(format!("{key} must be a number, found {other}")),
    }
}

/// A token id field that may be an integer, a list of integers or null.
fn token_id_list(value: &Value, key: &str, path: &str) -> Result<Vec<u32>, ConfigError> {
    let err = |found: &Value| ConfigError {
        path: path.to_string(),
        message: format!("{key} must be a token id or a list of token ids, found {found}"),
    };
    let as_id = |v: &Value| v.as_u64().filter(|&id| id <= u32::MAX as u64).map(|id| id as u32);
    match value.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| as_id(v).ok_or_else(|| err(v))).collect(),
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(|| err(v)),
    }
}

fn parse_rope(fields: &Fields) -> Result<RopeConfig, ConfigError> {
    // transformers ≥ 5 keeps theta and scaling together in `rope_parameters`; the classic layout has
    // `rope_theta` at the top level and an optional `rope_scaling` object.
    let (params, theta) = match fields.obj.get("rope_parameters") {
        Some(Value::Object(params)) => {
            let theta = float_field(params, "rope_theta").map_err(|m| fields.err(format!("rope_parameters: {m}")))?;
            (Some(params), theta.or(fields.float("rope_theta")?))
        }
        None | Some(Value::Null) => match fields.obj.get("rope_scaling") {
            Some(Value::Object(params)) => (Some(params), fields.float("rope_theta")?),
            None | Some(Value::Null) => (None, fields.float("rope_theta")?),
            Some(other) => return Err(fields.err(format!("rope_scaling must be an object or null, found {other}"))),
        },
        Some(other) => return Err(fields.err(format!("rope_parameters must be an object, found {other}"))),
    };
    let theta = theta.unwrap_or(10000.0) as f32;
    let Some(params) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::None });
    };
    let section = if fields.obj.contains_key("rope_parameters") { "rope_parameters" } else { "rope_scaling" };
    let rope_type =
        params.get("rope_type").or_else(|| params.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let number = |key: &str| -> Result<f32, ConfigError> {
        float_field(params, key)
            .map_err(|m| fields.err(format!("{section}: {m}")))?
            .map(|v| v as f32)
            .ok_or_else(|| fields.err(format!("{section}: rope type {rope_type} needs {key}")))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: number("factor")? },
        "llama3" => {
            let original = number("original_max_position_embeddings")? as usize;
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            if high <= low {
                return Err(fields
                    .err(format!("{section}: high_freq_factor {high} must be greater than low_freq_factor {low}")));
            }
            RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(fields.err(format!("{section}: rope type {other} is not supported (default, linear, llama3)")));
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json("config.json", json).map_err(|e| e.to_string())
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn generation_config_values_of_the_wrong_type_are_named_and_left_out() {
        let value: Value = serde_json::from_str(
            r#"{"temperature": "0.7", "top_p": 0.9, "top_k": -1, "max_new_tokens": null, "min_p": [0.1]}"#,
        )
        .unwrap();
        let (defaults, wrong) = GenerationDefaults::from_json(&value);
        assert_eq!(defaults, GenerationDefaults { top_p: Some(0.9), ..GenerationDefaults::default() });
        assert_eq!(
            wrong,
            vec![
                "temperature is \"0.7\", not a number",
                "top_k is -1, not a non-negative integer",
                "min_p is [0.1], not a number"
            ]
        );
    }

    #[test]
    fn classic_and_v5_layouts_give_the_same_rope() {
        let classic = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "dtype": "bfloat16",
            "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(classic.rope, v5.rope);
        assert_eq!(classic.rope.theta, 500000.0);
        assert_eq!(classic.dtype, Some(DType::BF16));
        assert_eq!(v5.dtype, Some(DType::BF16));
        assert!(matches!(v5.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn defaults_follow_transformers() {
        let c =
            parse(&format!(r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "num_key_value_heads": 2}}"#)).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_queries_per_kv(), 2);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.rope, RopeConfig { theta: 10000.0, scaling: RopeScaling::None });
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn explicit_head_dim_wins() {
        let c = parse(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "head_dim": 32, "sliding_window": 4096}}"#
        ))
        .unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.sliding_window, Some(4096));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let cases = [
            (
                r#"{"architectures": ["GPT2LMHeadModel"]}"#.to_string(),
                "config.json: architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            ),
            (
                r#"{"hidden_size": 3}"#.to_string(),
                "config.json: no \"architectures\" entry; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            ),
            (
                r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#.to_string(),
                "config.json: num_attention_heads is missing",
            ),
            (
                format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "num_key_value_heads": 3}}"#),
                "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3",
            ),
            (
                format!(
                    r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#
                ),
                "config.json: rope_scaling: rope type yarn is not supported (default, linear, llama3)",
            ),
            (
                format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "hidden_act": "gelu"}}"#),
                "config.json: hidden_act gelu is not supported (only silu)",
            ),
            (
                format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "vocab_size": -5}}"#),
                "config.json: vocab_size must be a positive integer, found -5",
            ),
            ("{not json".to_string(), "config.json: not valid JSON: key must be a string at line 1 column 2"),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(&json).err().unwrap(), expected);
        }
    }
}
