//! A `tokenizers` tokenizer built from the vocabulary a GGUF file carries (`tokenizer.ggml.*`).
//!
//! GGUF stores the pieces of a Hugging Face tokenizer rather than the tokenizer itself: the tokens,
//! their types, the BPE merges and a name for the pre-tokenizer (which llama.cpp maps to its own
//! splitting rules). This module writes the `tokenizer.json` those pieces describe, so encoding and
//! decoding go through the same `tokenizers` code as a Hugging Face folder. It reads what
//! transformers reads: a GGUF tokenizer gets no BOS token added to prompts, as transformers' (and
//! so vLLM's) conversion does, even where llama.cpp's `add_bos_token` says otherwise; chat
//! templates that want one write it themselves.

use serde_json::{Value, json};

/// llama.cpp's token types.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The `tokenizer.ggml.*` metadata of a GGUF file.
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) is the one read.
    pub model: String,
    /// `tokenizer.ggml.pre`: which splitting rules the BPE runs after.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub chat_template: Option<String>,
}

/// Llama 3's splitting rule (its `tokenizer.json`'s `Split` pattern): contractions, words with one
/// leading non-letter, numbers in groups of up to three digits, punctuation runs, newlines.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with numbers split into single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub const SUPPORTED_PRE: &str = "default, gpt2, llama-bpe, qwen2, smollm, starcoder, refact";

impl GgufVocab {
    /// The `tokenizer.json` and `tokenizer_config.json` these pieces describe.
    pub fn to_json(&self) -> Result<(Value, Value), String> {
        if self.tokens.is_empty() {
            return Err("the file holds no tokenizer (no tokenizer.ggml.tokens)".into());
        }
        if self.model != "gpt2" {
            return Err(format!(
                "tokenizer.ggml.model '{}' is not supported: only byte-level BPE ('gpt2', as Llama 3, Qwen2 and SmolLM use) is read",
                self.model
            ));
        }
        if self.token_types.len() != self.tokens.len() {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                self.token_types.len(),
                self.tokens.len()
            ));
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]})
        };
        let pre = self.pre.as_deref().unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
            "llama-bpe" | "llama3" => (split(LLAMA3_SPLIT), true),
            "qwen2" => (split(QWEN2_SPLIT), false),
            "smollm" | "starcoder" | "refact" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]}),
                false,
            ),
            other => {
                return Err(format!("tokenizer.ggml.pre '{other}' is not supported; supported: {SUPPORTED_PRE}"));
            }
        };
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        let mut added = Vec::new();
        for (id, (token, &kind)) in self.tokens.iter().zip(&self.token_types).enumerate() {
            // A repeated token text keeps its first id, as a Hugging Face vocabulary does.
            vocab.entry(token.clone()).or_insert(json!(id));
            if kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": kind == TOKEN_CONTROL,
                }));
            }
        }
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocab, "merges": self.merges,
            },
        });
        let token = |id: Option<u32>, key: &str| -> Result<Value, String> {
            match id {
                None => Ok(Value::Null),
                Some(id) => self.tokens.get(id as usize).map(|t| json!(t)).ok_or_else(|| {
                    format!("tokenizer.ggml.{key} {id} is not a token id (vocabulary of {})", self.tokens.len())
                }),
            }
        };
        let config = json!({
            "bos_token": token(self.bos_token_id, "bos_token_id")?,
            "eos_token": token(self.eos_token_id, "eos_token_id")?,
            "chat_template": self.chat_template,
        });
        Ok((tokenizer, config))
    }
}
