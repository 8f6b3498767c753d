//! Text in and out: the `tokenizers` crate over `tokenizer.json` (or the vocabulary of a GGUF
//! file), the chat template, and incremental detokenization for streaming.

mod chat;
mod detokenizer;
mod gguf;

use std::path::Path;

use serde_json::Value;

pub use chat::{ChatTemplate, TemplateError};
pub use detokenizer::IncrementalDetokenizer;
pub use gguf::GgufVocab;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TokenizerError {
    pub path: String,
    pub message: String,
}

/// Bytes of a long text tokenized first, per token a request may hold, by
/// [`Tokenizer::encode_within`]: ordinary text averages about four bytes a token, so that prefix
/// holds more tokens than allowed whenever the whole text does by far.
pub const PREFIX_BYTES_PER_TOKEN: usize = 16;

/// Tokenizing a text this long leaves tens of megabytes of freed scratch memory behind, which is
/// handed back to the system afterwards.
const LARGE_TEXT_BYTES: usize = 1 << 20;

/// Returns the allocator's free memory to the system (glibc keeps it otherwise): after work on a
/// large text, whose scratch memory would stay with the process.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of glibc's heap; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `tokenizer_config.json` as read (`null` without one).
    config: Value,
    chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The files a tokenizer is built from, already read.
pub struct TokenizerFiles<'a> {
    /// `tokenizer.json`.
    pub tokenizer_json: &'a [u8],
    /// `tokenizer_config.json`, if any.
    pub tokenizer_config: Option<&'a str>,
    /// `chat_template.jinja`, if any; it takes precedence over the config's `chat_template`.
    pub chat_template: Option<&'a str>,
    /// How errors name the folder the files came from.
    pub origin: &'a str,
}

impl Tokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from `dir`.
    pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let read = |name: &str| -> Result<Option<Vec<u8>>, TokenizerError> {
            match std::fs::read(dir.join(name)) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(TokenizerError { path: dir.join(name).display().to_string(), message: e.to_string() }),
            }
        };
        let json = read("tokenizer.json")?.ok_or_else(|| TokenizerError {
            path: dir.join("tokenizer.json").display().to_string(),
            message: "not found: the model needs a fast tokenizer (tokenizer.json)".into(),
        })?;
        let text = |name: &str, bytes: Option<Vec<u8>>| -> Result<Option<String>, TokenizerError> {
            bytes
                .map(|b| {
                    String::from_utf8(b).map_err(|_| TokenizerError {
                        path: dir.join(name).display().to_string(),
                        message: "not valid UTF-8".into(),
                    })
                })
                .transpose()
        };
        let config = text("tokenizer_config.json", read("tokenizer_config.json")?)?;
        let template = text("chat_template.jinja", read("chat_template.jinja")?)?;
        Tokenizer::from_files(&TokenizerFiles {
            tokenizer_json: &json,
            tokenizer_config: config.as_deref(),
            chat_template: template.as_deref(),
            origin: &dir.display().to_string(),
        })
    }

    /// The tokenizer a GGUF file's vocabulary describes; `origin` names the file in errors.
    pub fn from_gguf(vocab: &GgufVocab, origin: &str) -> Result<Tokenizer, TokenizerError> {
        let (tokenizer, config) =
            vocab.to_json().map_err(|message| TokenizerError { path: origin.to_string(), message })?;
        Tokenizer::from_files(&TokenizerFiles {
            tokenizer_json: tokenizer.to_string().as_bytes(),
            tokenizer_config: Some(&config.to_string()),
            chat_template: None,
            origin,
        })
    }

    pub fn from_files(files: &TokenizerFiles) -> Result<Tokenizer, TokenizerError> {
        let err = |file: &str, message: String| TokenizerError { path: format!("{}/{file}", files.origin), message };
        let inner = tokenizers::Tokenizer::from_bytes(files.tokenizer_json)
            .map_err(|e| err("tokenizer.json", format!("cannot be loaded: {e}")))?;
        let config: Value = match files.tokenizer_config {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| err("tokenizer_config.json", format!("not valid JSON: {e}")))?
            }
            None => Value::Null,
        };
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");
        let (template_file, source) = match files.chat_template {
            Some(source) => ("chat_template.jinja", Some(source.to_string())),
            None => ("tokenizer_config.json", config_chat_template(&config)),
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(s, bos_token.clone(), eos_token.clone()))
            .transpose()
            .map_err(|e| err(template_file, e.to_string()))?;
        Ok(Tokenizer { inner, config, chat_template, bos_token, eos_token })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError { path: "tokenizer".into(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`], unless `text` has more than `max_tokens` tokens (then `Err` with a
    /// lower bound of how many), found without tokenizing all of a long text: a text longer than
    /// [`PREFIX_BYTES_PER_TOKEN`] bytes per token allowed is first tokenized up to its last space
    /// there. Every tokenizer Pagoda loads (byte-level BPE, SentencePiece) ends a pre-token before
    /// a space, so that prefix's tokens are the whole text's first tokens: when they are already
    /// too many, the rest is never read. Otherwise (unusually long tokens, no space) the whole
    /// text is tokenized and counted.
    pub fn encode_within(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<Result<Vec<u32>, usize>, TokenizerError> {
        let window = max_tokens.saturating_add(2).saturating_mul(PREFIX_BYTES_PER_TOKEN);
        if text.len() > window
            && let Some(cut) = text[..text.floor_char_boundary(window)].rfind(' ')
        {
            // The prefix may end in a special token (EOS) the whole text's ids have too, or not.
            let prefix = self.encode(&text[..cut], add_special_tokens)?;
            if prefix.len() > max_tokens + 1 {
                return Ok(Err(prefix.len() - 1));
            }
        }
        let ids = self.encode(text, add_special_tokens)?;
        if text.len() > LARGE_TEXT_BYTES {
            release_free_memory();
        }
        Ok(if ids.len() > max_tokens { Err(ids.len()) } else { Ok(ids) })
    }

    /// Decodes ids to text. Ids the tokenizer does not know decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.inner.decode(ids, skip_special_tokens).unwrap_or_default()
    }

    /// The vocabulary entry of an id as the tokenizer stores it (byte-level tokens look like
    /// `Ġword`), for vLLM's `token_strs`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given by its text (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text (also for one built from a GGUF vocabulary).
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).unwrap_or_default()
    }

    /// vLLM's `/tokenizer_info`: the tokenizer's configuration (`tokenizer_config.json` without
    /// its file names), its class and its chat template.
    pub fn info(&self) -> Value {
        let mut info = self.config.as_object().cloned().unwrap_or_default();
        info.remove("vocab_file");
        info.remove("merges_file");
        info.entry("tokenizer_class").or_insert_with(|| Value::from("PreTrainedTokenizerFast"));
        match &self.chat_template {
            Some(t) => info.insert("chat_template".into(), Value::from(t.source())),
            None => info.remove("chat_template"),
        };
        Value::Object(info)
    }

    /// Replaces the model's chat template (`--chat-template`).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), TemplateError> {
        self.chat_template =
            Some(ChatTemplate::new(source.to_string(), self.bos_token.clone(), self.eos_token.clone())?);
        Ok(())
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an AddedToken object with `content`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is the one used.
fn config_chat_template(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    }
}
