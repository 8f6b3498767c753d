//! A `tokenizers` tokenizer built from the vocabulary a GGUF file carries (`tokenizer.ggml.*`).
//!
//! GGUF stores the pieces of a Hugging Face tokenizer rather than the tokenizer itself: the tokens,
//! their types, the BPE merges and a name for the pre-tokenizer (which llama.cpp maps to its own
//! splitting rules). This module writes the `tokenizer.json` those pieces describe, so encoding and
//! decoding go through the same `tokenizers` code as a Hugging Face folder. Two vocabularies:
//!
//! - `gpt2`, byte-level BPE (Llama 3, Qwen2, SmolLM): the merges are in the file. As in
//!   transformers' (and so vLLM's) conversion, no BOS token is added to prompts even where
//!   llama.cpp's `add_bos_token` says so; chat templates that want one write it themselves.
//! - `llama`, SentencePiece BPE (Llama 2, Mistral): the file has scores instead of merges; the
//!   merges are every split of a token into two tokens, ranked by the merged token's score (how
//!   transformers rebuilds them), with SentencePiece's `▁` for spaces, byte fallback through the
//!   `<0xNN>` tokens, and the BOS token added as `add_bos_token` says (default: yes).

use serde_json::{Value, json};

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The `tokenizer.ggml.*` metadata of a GGUF file.
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: which splitting rules the BPE runs after.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// SentencePiece scores (`llama` vocabularies).
    pub scores: Vec<f32>,
    pub bos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (`llama` vocabularies; default true).
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (`llama` vocabularies; default true).
    pub add_space_prefix: Option<bool>,
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
        if self.token_types.len() != self.tokens.len() {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                self.token_types.len(),
                self.tokens.len()
            ));
        }
        let tokenizer = match self.model.as_str() {
            "gpt2" => self.byte_level_json()?,
            "llama" => self.sentencepiece_json()?,
            other => {
                return Err(format!(
                    "tokenizer.ggml.model '{other}' is not supported: byte-level BPE ('gpt2': Llama 3, Qwen2, SmolLM) \
                     and SentencePiece BPE ('llama': Llama 2, Mistral) are"
                ));
            }
        };
        let config = json!({
            "bos_token": self.token_text(self.bos_token_id, "bos_token_id")?,
            "eos_token": self.token_text(self.eos_token_id, "eos_token_id")?,
            "chat_template": self.chat_template,
        });
        Ok((tokenizer, config))
    }

    /// A token's text by id, for the special tokens the metadata names.
    fn token_text(&self, id: Option<u32>, key: &str) -> Result<Option<&str>, String> {
        id.map(|id| {
            self.tokens.get(id as usize).map(String::as_str).ok_or_else(|| {
                format!("tokenizer.ggml.{key} {id} is not a token id (vocabulary of {})", self.tokens.len())
            })
        })
        .transpose()
    }

    /// Token text → id; a repeated text keeps its first id, as a Hugging Face vocabulary does.
    fn vocab(&self) -> serde_json::Map<String, Value> {
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        for (id, token) in self.tokens.iter().enumerate() {
            vocab.entry(token.clone()).or_insert(json!(id));
        }
        vocab
    }

    /// Control, user-defined and unknown tokens as `added_tokens`: matched whole in text; all but
    /// the user-defined ones special (skipped when decoding).
    fn added_tokens(&self) -> Vec<Value> {
        let mut added = Vec::new();
        for (id, (token, &kind)) in self.tokens.iter().zip(&self.token_types).enumerate() {
            if kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED || kind == TOKEN_UNKNOWN {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": kind != TOKEN_USER_DEFINED,
                }));
            }
        }
        added
    }

    fn byte_level_json(&self) -> Result<Value, String> {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]})
        };
        let (pre_tokenizer, ignore_merges) = match self.pre.as_deref().unwrap_or("default") {
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
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": self.vocab(), "merges": self.merges,
            },
        }))
    }

    fn sentencepiece_json(&self) -> Result<Value, String> {
        if self.scores.len() != self.tokens.len() {
            return Err(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                self.scores.len(),
                self.tokens.len()
            ));
        }
        let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (id, token) in self.tokens.iter().enumerate() {
            ids.entry(token.as_str()).or_insert(id);
        }
        // Every way to make a normal token from two tokens is a merge, ranked by the merged
        // token's score (higher first), then by the ids of its parts.
        let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if self.token_types[id] != TOKEN_NORMAL && self.token_types[id] != TOKEN_USER_DEFINED {
                continue;
            }
            for (at, _) in token.char_indices().skip(1) {
                let (left, right) = token.split_at(at);
                if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                    merges.push((self.scores[id], id, l, r));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
        let merges: Vec<Value> = merges.iter().map(|&(_, _, l, r)| json!([self.tokens[l], self.tokens[r]])).collect();
        let unk = self.token_text(Some(self.unknown_token_id.unwrap_or(0)), "unknown_token_id")?;
        let space_prefix = self.add_space_prefix.unwrap_or(true);
        let mut normalizers = Vec::new();
        if space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": SPIECE_SPACE}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let bos = match self.add_bos_token.unwrap_or(true) {
            true => self.token_text(self.bos_token_id, "bos_token_id")?,
            false => None,
        };
        let post_processor = match bos {
            None => Value::Null,
            Some(text) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {text: {"id": text, "ids": [self.bos_token_id], "tokens": [text]}},
            }),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": post_processor,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": self.vocab(), "merges": merges,
            },
        }))
    }
}

/// SentencePiece's stand-in for a space.
const SPIECE_SPACE: &str = "\u{2581}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    /// A small SentencePiece vocabulary laid out as Llama 2's GGUF files lay theirs out: unknown,
    /// BOS and EOS, the 256 byte tokens, then pieces with scores.
    fn sentencepiece_vocab() -> GgufVocab {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [
            ("ll", -1.0),
            ("▁h", -2.0),
            ("▁he", -3.0),
            ("llo", -4.0),
            ("▁hello", -5.0),
            ("▁w", -6.0),
            ("or", -7.0),
            ("▁wor", -8.0),
            ("ld", -9.0),
            ("▁", -10.0),
            ("h", -11.0),
            ("e", -12.0),
            ("l", -13.0),
            ("o", -14.0),
            ("w", -15.0),
            ("r", -16.0),
            ("d", -17.0),
        ];
        for (piece, score) in pieces {
            tokens.push(piece.to_string());
            types.push(TOKEN_NORMAL);
            scores.push(score);
        }
        GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens,
            token_types: types,
            merges: Vec::new(),
            scores,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            add_bos_token: None,
            add_space_prefix: None,
            chat_template: None,
        }
    }

    #[test]
    fn sentencepiece_vocabularies_merge_by_score_fall_back_to_bytes_and_add_bos() {
        let vocab = sentencepiece_vocab();
        let tok = Tokenizer::from_gguf(&vocab, "test.gguf").unwrap();
        let id = |piece: &str| vocab.tokens.iter().position(|t| t == piece).unwrap() as u32;
        // "▁hello▁world": the highest-scoring merges first, as SentencePiece's BPE applies them.
        let ids = tok.encode("hello world", true).unwrap();
        assert_eq!(ids, vec![1, id("▁hello"), id("▁wor"), id("ld")]);
        assert_eq!(tok.decode(&ids, true), "hello world");
        // A character with no piece becomes its UTF-8 bytes, and decodes back.
        let ids = tok.encode("hé", false).unwrap();
        assert_eq!(ids, vec![id("▁h"), 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.decode(&ids, true), "hé");
        // Control tokens in text are single tokens, and skipped when decoding.
        assert_eq!(tok.encode("hello</s>", false).unwrap(), vec![id("▁hello"), 2]);
        assert_eq!(tok.bos_token(), Some("<s>"));

        let no_bos = GgufVocab { add_bos_token: Some(false), ..sentencepiece_vocab() };
        let tok = Tokenizer::from_gguf(&no_bos, "test.gguf").unwrap();
        assert_eq!(tok.encode("hello", true).unwrap(), vec![id("▁hello")]);
    }

    #[test]
    fn unreadable_vocabularies_are_named() {
        let bad = |v: GgufVocab| match Tokenizer::from_gguf(&v, "m.gguf") {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        let err = bad(GgufVocab { model: "bert".into(), ..sentencepiece_vocab() });
        assert!(err.starts_with("m.gguf: tokenizer.ggml.model 'bert' is not supported"), "{err}");
        let err = bad(GgufVocab { model: "gpt2".into(), pre: Some("falcon".into()), ..sentencepiece_vocab() });
        assert!(err.contains("tokenizer.ggml.pre 'falcon' is not supported"), "{err}");
        let err = bad(GgufVocab { scores: vec![0.0], ..sentencepiece_vocab() });
        assert!(err.contains("tokenizer.ggml.scores has 1 entries for 276 tokens"), "{err}");
        let err = bad(GgufVocab { bos_token_id: Some(999), ..sentencepiece_vocab() });
        assert!(err.contains("tokenizer.ggml.bos_token_id 999 is not a token id"), "{err}");
    }
}
