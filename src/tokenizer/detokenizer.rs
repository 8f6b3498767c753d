//! Incremental detokenization: text for each new token as it is generated, never half a
//! character.
//!
//! A byte-level token can end in the middle of a UTF-8 sequence, and some tokenizers decide a
//! token's leading space from its left neighbour. So each step decodes a short window of recent
//! tokens twice (with and without the newest ones) and emits the difference, but only once that
//! text no longer ends in U+FFFD, the mark of an incomplete sequence. A few tokens of the prompt
//! seed the window so the first generated token gets the right spacing.

use super::Tokenizer;

/// Prompt tokens used as left context for the first generated token.
const PROMPT_CONTEXT_TOKENS: usize = 5;
/// A UTF-8 character spans at most four byte tokens: beyond this many tokens still incomplete,
/// the bytes are invalid and are emitted as U+FFFD rather than held forever.
const MAX_PENDING_TOKENS: usize = 6;

pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the window that gives the decoded text its context.
    prefix_offset: usize,
    /// Tokens before this have been emitted as text.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool) -> IncrementalDetokenizer {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        IncrementalDetokenizer {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            skip_special_tokens,
        }
    }

    /// Adds a generated token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let pending = self.ids.len() - self.read_offset;
        self.advance(tokenizer, pending > MAX_PENDING_TOKENS)
    }

    /// Returns whatever text is still held back: the end of the output has been reached, so an
    /// incomplete character is final and comes out as U+FFFD.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        self.advance(tokenizer, true)
    }

    fn advance(&mut self, tokenizer: &Tokenizer, force: bool) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens);
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens);
        if !force && (full.len() <= prefix.len() || full.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let new_text = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // The window's text changed as a whole (a tokenizer that rewrites earlier spacing):
            // emit from the first character boundary past the old text.
            None => {
                let mut cut = prefix.len().min(full.len());
                while !full.is_char_boundary(cut) {
                    cut += 1;
                }
                full[cut..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        new_text
    }
}
