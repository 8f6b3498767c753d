//! Structured outputs: a request's output held to a JSON schema, a regular expression, a list of
//! choices or a Lark grammar, by masking every token that would leave the grammar before each
//! pick. The grammar engine is `llguidance` (the one behind vLLM's and SGLang's `guidance`
//! backends); this file adapts it to our tokenizer and sampler.
//!
//! A [`StructuredOutput`] is what the client asked for; [`Grammars::compile`] checks it (an invalid
//! schema, regex or grammar is an error naming the problem) and gives a [`Grammar`], the state of
//! one sequence: [`Grammar::mask`] before a pick, [`Grammar::advance`] after it. EOS is allowed
//! exactly where the grammar may end, so a finished output ends with EOS.

use std::fmt;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::tokenizer::Tokenizer;

/// Longest schema, regex or grammar a request may send, in bytes (the body limit bounds it too;
/// this keeps one request from spending seconds compiling).
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;
/// Most entries of a `choice` list.
pub const MAX_CHOICES: usize = 1024;

/// A constraint on a request's output, as the API asked for it.
#[derive(Clone, Debug, PartialEq)]
pub enum StructuredOutput {
    /// JSON valid against `schema` (`{"type": "object"}` for `json_object`).
    Json { schema: Value, options: JsonOptions },
    /// Text that the whole regular expression matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Grammar(String),
}

/// vLLM's options for JSON outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonOptions {
    /// No whitespace outside strings (vLLM's `disable_any_whitespace`).
    pub no_whitespace: bool,
    /// Whitespace that may appear between JSON tokens, as a regex (`whitespace_pattern`).
    pub whitespace_pattern: Option<String>,
    /// Objects without `additionalProperties` take it as false (`disable_additional_properties`).
    pub no_additional_properties: bool,
    /// Schema keywords llguidance does not know are ignored instead of refused (OpenAI's
    /// `strict: false`).
    pub lenient: bool,
}

impl StructuredOutput {
    /// The constraint as llguidance takes it.
    fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        let size = match self {
            StructuredOutput::Json { schema, .. } => schema.to_string().len(),
            StructuredOutput::Regex(s) | StructuredOutput::Grammar(s) => s.len(),
            StructuredOutput::Choice(c) => c.iter().map(String::len).sum(),
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(format!("the constraint is {size} bytes; at most {MAX_GRAMMAR_BYTES} are allowed"));
        }
        Ok(match self {
            StructuredOutput::Json { schema, options } => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("the JSON schema must be an object".into());
                }
                let mut schema = schema.clone();
                if options.no_additional_properties {
                    close_objects(&mut schema);
                }
                if let Value::Object(map) = &mut schema {
                    let mut guidance = serde_json::Map::new();
                    guidance.insert("whitespace_flexible".into(), Value::Bool(!options.no_whitespace));
                    if let Some(pattern) = &options.whitespace_pattern {
                        guidance.insert("whitespace_pattern".into(), Value::String(pattern.clone()));
                    }
                    guidance.insert("lenient".into(), Value::Bool(options.lenient));
                    map.insert("x-guidance".into(), Value::Object(guidance));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            StructuredOutput::Regex(rx) => TopLevelGrammar::from_regex(rx),
            StructuredOutput::Choice(choices) => {
                if choices.is_empty() {
                    return Err("choice needs at least one string".into());
                }
                if choices.len() > MAX_CHOICES {
                    return Err(format!("choice allows at most {MAX_CHOICES} strings, got {}", choices.len()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            StructuredOutput::Grammar(text) => {
                if text.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                TopLevelGrammar::from_lark(text.clone())
            }
        })
    }
}

/// Sets `additionalProperties: false` on every object schema that does not say.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object = map.get("type").is_some_and(|t| t == "object") || map.contains_key("properties");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// The grammar compiler of one model: its vocabulary as llguidance's token trie, built on first
/// use (a model whose clients never ask for structured outputs never pays for it).
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl fmt::Debug for Grammars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_token_ids: Vec<u32>) -> Grammars {
        Grammars { tokenizer, vocab_size, eos_token_ids, factory: OnceLock::new() }
    }

    /// Checks a constraint and gives the grammar state a sequence starts from.
    pub fn compile(&self, spec: &StructuredOutput) -> Result<Grammar, String> {
        let factory = self
            .factory
            .get_or_init(|| self.build_factory())
            .as_ref()
            .map_err(|e| format!("structured outputs are not available for this model: {e}"))?;
        let grammar = spec.to_grammar()?;
        let parser = factory.create_parser(grammar).map_err(|e| clean_error(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(clean_error(&e));
        }
        Ok(Grammar { matcher, eos_token_ids: self.eos_token_ids.clone(), words: self.vocab_size.div_ceil(32) })
    }

    fn build_factory(&self) -> Result<ParserFactory, String> {
        let json: Value = serde_json::from_str(&self.tokenizer.to_json()).map_err(|e| e.to_string())?;
        // llguidance reads the token bytes from tokenizer.json; it panics on shapes it does not
        // know, which must not take the server down.
        let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| "the tokenizer's vocabulary could not be read as bytes".to_string())?
            .map_err(|e| format!("the tokenizer's vocabulary could not be read as bytes: {e}"))?;
        let mut words = bytes;
        if words.len() > self.vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, more than the model's {} logits",
                words.len(),
                self.vocab_size
            ));
        }
        // Ids the model has but the tokenizer does not (padding) are never allowed.
        words.resize(self.vocab_size, Vec::new());
        let eos = *self.eos_token_ids.first().ok_or("the model names no end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(self.vocab_size as u32, eos), &words);
        let env: TokEnv = Arc::new(ModelTokEnv { trie, tokenizer: self.tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    }
}

/// llguidance's view of our tokenizer.
struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer.encode(&String::from_utf8_lossy(s), false).unwrap_or_default()
    }
}

/// llguidance's errors carry its own context lines; the first line says what is wrong.
fn clean_error(message: &str) -> String {
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim();
    format!("invalid constraint: {first}")
}

/// One sequence's place in its grammar.
pub struct Grammar {
    matcher: Matcher,
    eos_token_ids: Vec<u32>,
    /// Bitmask words covering the vocabulary.
    words: usize,
}

impl Clone for Grammar {
    /// An independent copy (for the `n` sequences of a request).
    fn clone(&self) -> Grammar {
        Grammar { matcher: self.matcher.deep_clone(), eos_token_ids: self.eos_token_ids.clone(), words: self.words }
    }
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

impl Grammar {
    /// The tokens allowed next, as a bitmask over the vocabulary (bit `t % 32` of word `t / 32`).
    /// Where the grammar may end, every EOS id is allowed; where it must end, only they are.
    pub fn mask(&mut self) -> Result<Vec<u32>, String> {
        let vob = self.matcher.compute_mask_or_eos().map_err(|e| format!("structured output: {e}"))?;
        let mut mask = vob.as_slice().to_vec();
        mask.resize(self.words, 0);
        let eos_allowed = self.eos_token_ids.iter().any(|&t| vob.is_allowed(t));
        for &t in &self.eos_token_ids {
            let (word, bit) = (t as usize / 32, t % 32);
            if let Some(w) = mask.get_mut(word) {
                if eos_allowed {
                    *w |= 1 << bit;
                } else {
                    *w &= !(1 << bit);
                }
            }
        }
        if mask.iter().all(|&w| w == 0) {
            return Err("structured output: the grammar allows no token here".into());
        }
        Ok(mask)
    }

    /// Moves past a picked token (one the last mask allowed, other than EOS).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| format!("structured output: {e}"))
    }
}

/// The schema `json_object` stands for.
pub fn any_object() -> Value {
    json!({"type": "object"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(mask: &[u32], t: u32) -> bool {
        mask[t as usize / 32] >> (t % 32) & 1 == 1
    }

    pub(crate) fn tiny() -> Grammars {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-llama");
        let tokenizer = Arc::new(Tokenizer::load(&dir).unwrap());
        Grammars::new(tokenizer, 1024, vec![1, 4])
    }

    /// Walks the grammar greedily by the token whose text is `text`'s next bytes.
    fn feed(grammar: &mut Grammar, tokenizer: &Tokenizer, text: &str) {
        for t in tokenizer.encode(text, false).unwrap() {
            let mask = grammar.mask().unwrap();
            assert!(allowed(&mask, t), "token {t} ({:?}) refused in {text:?}", tokenizer.decode(&[t], false));
            grammar.advance(t).unwrap();
        }
    }

    #[test]
    fn a_choice_allows_its_strings_then_only_eos() {
        let grammars = tiny();
        let tokenizer = grammars.tokenizer.clone();
        let mut g = grammars.compile(&StructuredOutput::Choice(vec!["yes".into(), "no".into()])).unwrap();
        let first = g.mask().unwrap();
        assert!(!allowed(&first, 1) && !allowed(&first, 4), "EOS before any choice");
        feed(&mut g, &tokenizer, "no");
        let last = g.mask().unwrap();
        assert!(allowed(&last, 1) && allowed(&last, 4));
        assert_eq!(last.iter().map(|w| w.count_ones()).sum::<u32>(), 2, "only the EOS ids after the choice");
    }

    #[test]
    fn invalid_constraints_name_the_problem() {
        let grammars = tiny();
        let err = |spec| grammars.compile(&spec).unwrap_err();
        assert!(err(StructuredOutput::Regex("(unclosed".into())).contains("invalid constraint"));
        let e = err(StructuredOutput::Json { schema: json!({"type": "nonsense"}), options: JsonOptions::default() });
        assert!(e.contains("nonsense"), "{e}");
        assert!(err(StructuredOutput::Grammar("start: missing_rule".into())).contains("missing_rule"));
        assert!(err(StructuredOutput::Choice(vec![])).contains("at least one"));
        let big = "a".repeat(MAX_GRAMMAR_BYTES + 1);
        assert!(err(StructuredOutput::Regex(big)).contains("at most"));
        // At the limit it compiles.
        assert!(grammars.compile(&StructuredOutput::Regex("a".repeat(MAX_GRAMMAR_BYTES))).is_ok());
    }

    #[test]
    fn closing_objects_reaches_nested_schemas_but_keeps_explicit_choices() {
        let mut schema = json!({"type": "object", "properties": {"a": {"type": "object"},
            "b": {"type": "object", "additionalProperties": true}}});
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["b"]["additionalProperties"], true);
    }
}
