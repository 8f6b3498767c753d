//! The embedded demo model: a small Llama with deterministic random weights, a real byte-level BPE
//! tokenizer and a Llama 3 style chat template, so that `pagoda serve` starts anywhere with no
//! download. Its name says what it is: its text is meaningless.
//!
//! The same generator builds larger random models with real shapes for benchmarks.

use serde_json::json;

use crate::weights::{self, DType};

/// The served name of the demo model.
pub const DEMO_MODEL_NAME: &str = "pagoda-demo-random-weights";

const TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/demo/tokenizer.json");
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// Shapes and seed of a random-weight Llama: a checkpoint to write. It is not a `ModelConfig`
/// on purpose: it emits a `config.json` and a safetensors file, which then go through the same
/// loader and checks as any model folder, so the demo model exercises the real load path.
#[derive(Clone, Debug)]
pub struct DemoSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub dtype: DType,
    pub seed: u64,
}

impl DemoSpec {
    /// What `pagoda serve` runs with no `--model`: about 4 M parameters.
    pub fn demo() -> DemoSpec {
        DemoSpec {
            hidden_size: 256,
            intermediate_size: 704,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 32,
            vocab_size: 1024,
            max_position_embeddings: 4096,
            dtype: DType::F32,
            seed: 0x5eed_0f9a_90da,
        }
    }

    /// `config.json` for these shapes (classic layout).
    pub fn config_json(&self) -> String {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 0,
            "eos_token_id": [1, 4],
            "torch_dtype": self.dtype.to_string(),
        })
        .to_string()
    }

    /// The weights as one safetensors file. Values are uniform in ±√(3/fan_in) (unit variance
    /// after each projection), norms are ones; the same seed always gives the same bytes.
    pub fn safetensors(&self) -> Vec<u8> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
        }
        shapes.push(("model.norm.weight".into(), vec![h]));
        shapes.push(("lm_head.weight".into(), vec![self.vocab_size, h]));

        let mut rng = SplitMix64(self.seed);
        let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = if shape.len() == 1 {
                    vec![1.0; n]
                } else {
                    // Embeddings feed a norm, so their scale is free; projections keep unit variance.
                    let fan_in = if name.contains("embed_tokens") { 3 } else { shape[1] };
                    let bound = (3.0 / fan_in as f32).sqrt();
                    (0..n).map(|_| rng.next_unit() * bound).collect()
                };
                let bytes = match self.dtype {
                    DType::F32 => bytemuck::cast_slice::<f32, u8>(&values).to_vec(),
                    DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                    DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                };
                (name, self.dtype, shape, bytes)
            })
            .collect();
        weights::serialize(&tensors)
    }
}

pub fn tokenizer_json() -> &'static [u8] {
    TOKENIZER_JSON
}

/// `tokenizer_config.json` for the demo tokenizer.
pub fn tokenizer_config_json() -> String {
    json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE,
    })
    .to_string()
}

/// Writes the demo model as a Hugging Face model folder (for trying the sync path, tests and VM
/// images that need a real folder to serve).
pub fn export(spec: &DemoSpec, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), spec.config_json())?;
    std::fs::write(dir.join("generation_config.json"), json!({"bos_token_id": 0, "eos_token_id": [1, 4]}).to_string())?;
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON)?;
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config_json())?;
    std::fs::write(dir.join("model.safetensors"), spec.safetensors())
}

/// A small, fast, deterministic generator (SplitMix64); quality is ample for random weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
