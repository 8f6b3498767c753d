//! What goes into the engine (a request: prompt ids and sampling parameters) and what comes out
//! (per-step outputs of each of its sequences).

use std::fmt;
use std::time::Instant;

/// A request's id, as the client or the server chose it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub String);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Limits that requests are checked against.
pub const MAX_N: usize = 128;
pub const MAX_LOGPROBS: usize = 20;
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes: each generated token is checked against every stop string.
pub const MAX_STOP_STRING_BYTES: usize = 1024;
/// Most entries of `stop_token_ids` and of `logit_bias`.
pub const MAX_TOKEN_LIST: usize = 1024;

/// How tokens are chosen and when generation stops; names and meanings follow vLLM.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Independent completions of the prompt.
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed and prompt give the same tokens; completion `i` of `n` uses `seed + i`.
    pub seed: Option<u64>,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    /// Return this many top alternatives with each token's logprob (`Some(0)`: the token's only).
    pub logprobs: Option<usize>,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: Some(16),
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    /// Checks every value against its range; the error names the parameter as the API spells it.
    pub fn validate(&self, vocab_size: usize) -> Result<(), RequestError> {
        let bad = |param: &'static str, message: String| Err(RequestError::InvalidParam { param, message });
        if self.n == 0 || self.n > MAX_N {
            return bad("n", format!("n must be between 1 and {MAX_N}, got {}", self.n));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", format!("temperature must be at least 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (param, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&value) {
                return bad(param, format!("{param} must be in [-2, 2], got {value}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 2], got {}", self.repetition_penalty),
            );
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return bad(
                    "logit_bias",
                    format!("logit_bias token id {token} is outside the vocabulary of {vocab_size}"),
                );
            }
            if !(-100.0..=100.0).contains(&bias) {
                return bad("logit_bias", format!("logit_bias values must be in [-100, 100], got {bias}"));
            }
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "max_tokens must be at least 1, got 0".into());
        }
        if let Some(max) = self.max_tokens
            && self.min_tokens > max
        {
            return bad("min_tokens", format!("min_tokens ({}) must not exceed max_tokens ({max})", self.min_tokens));
        }
        if let Some(k) = self.logprobs
            && k > MAX_LOGPROBS
        {
            return bad("logprobs", format!("at most {MAX_LOGPROBS} logprobs can be requested, got {k}"));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", self.stop.len()),
            );
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop strings must not be empty".into());
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return bad(
                "stop",
                format!("stop strings are limited to {MAX_STOP_STRING_BYTES} bytes, got {}", long.len()),
            );
        }
        if self.stop_token_ids.len() > MAX_TOKEN_LIST {
            return bad(
                "stop_token_ids",
                format!("at most {MAX_TOKEN_LIST} stop token ids are allowed, got {}", self.stop_token_ids.len()),
            );
        }
        if self.logit_bias.len() > MAX_TOKEN_LIST {
            return bad(
                "logit_bias",
                format!("logit_bias is limited to {MAX_TOKEN_LIST} tokens, got {}", self.logit_bias.len()),
            );
        }
        if let Some(&t) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return bad("stop_token_ids", format!("stop token id {t} is outside the vocabulary of {vocab_size}"));
        }
        Ok(())
    }
}

/// A request as the engine takes it: the prompt already tokenized.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub arrival: Instant,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("{message}")]
    InvalidParam { param: &'static str, message: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} in the prompt is outside the vocabulary of {vocab_size}")]
    InvalidTokenId { token: u32, vocab_size: usize },
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but {} were requested ({num_prompt_tokens} in the prompt, {} for the completion)",
        num_prompt_tokens + max_tokens.unwrap_or(0),
        max_tokens.map_or("none left".to_string(), |m| m.to_string())
    )]
    ContextTooLong { num_prompt_tokens: usize, max_tokens: Option<usize>, max_model_len: usize },
    #[error("a request with id '{0}' is already running")]
    DuplicateId(RequestId),
}

impl RequestError {
    /// The request field at fault, as the API names it.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            RequestError::InvalidParam { param, .. } => Some(param),
            RequestError::EmptyPrompt | RequestError::InvalidTokenId { .. } => Some("prompt"),
            RequestError::ContextTooLong { max_tokens: Some(_), .. } => Some("max_tokens"),
            RequestError::ContextTooLong { max_tokens: None, .. } => Some("prompt"),
            RequestError::DuplicateId(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled (client gone, shutdown).
    Abort,
}

impl FinishReason {
    /// The name OpenAI's API and vLLM's metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What stopped a sequence with [`FinishReason::Stop`], other than EOS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The logprob of a chosen token and the top alternatives at its position, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Timestamps of one sequence's life, for latency metrics.
#[derive(Clone, Copy, Debug)]
pub struct SeqTimings {
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

/// What one sequence produced in one step.
#[derive(Clone, Debug)]
pub struct RequestOutput {
    pub request_id: RequestId,
    /// Which of the request's `n` sequences.
    pub index: usize,
    /// Tokens generated this step.
    pub token_ids: Vec<u32>,
    /// Text that became final this step (text can lag tokens: an incomplete character, or a
    /// possible start of a stop string, is held back).
    pub text: String,
    /// One entry per token of `token_ids` when logprobs were requested.
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    pub num_prompt_tokens: usize,
    /// Tokens generated so far, this step's included.
    pub num_output_tokens: usize,
    /// Prompt tokens found in the prefix cache.
    pub num_cached_tokens: usize,
    pub timings: SeqTimings,
    /// Why the engine gave up on the sequence when a step failed (the output is then an `Abort`).
    pub error: Option<String>,
}

impl RequestOutput {
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}
