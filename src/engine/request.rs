//! What goes into the engine (a request: prompt ids and sampling parameters) and what comes out
//! (per-step outputs of each of its sequences).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use super::structured::{Grammar, Grammars, StructuredOutput};

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
/// vLLM's default `--max-logprobs`.
pub const DEFAULT_MAX_LOGPROBS: usize = 20;
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
    pub max_tokens: MaxTokens,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    /// Return this many top alternatives with each token's logprob (`Some(0)`: the token's only).
    pub logprobs: Option<usize>,
    /// The same for each prompt token after the first (vLLM's `prompt_logprobs`), computed by
    /// every sequence of the request in its prefill, which then skips the prefix cache.
    pub prompt_logprobs: Option<usize>,
    pub skip_special_tokens: bool,
    /// Holds the output to a JSON schema, regex, choice or grammar.
    pub structured_output: Option<StructuredOutput>,
    /// Only these tokens may be generated (vLLM's `allowed_token_ids`); empty: any.
    pub allowed_token_ids: Vec<u32>,
    /// Token sequences never generated (vLLM's `bad_words`, tokenized): the last token of each is
    /// masked whenever the output ends with the ones before it.
    pub bad_words: Vec<Vec<u32>>,
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
            max_tokens: MaxTokens::Exact(16),
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            structured_output: None,
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
        }
    }
}

/// How many tokens a request may generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxTokens {
    /// The client's own number: a prompt that leaves less room in the context is refused.
    Exact(usize),
    /// A default (OpenAI's, or the model's generation config): lowered to the room the prompt
    /// leaves, as vLLM does.
    UpTo(usize),
    /// Until the context is full.
    Unlimited,
}

impl MaxTokens {
    fn limit(self) -> Option<usize> {
        match self {
            MaxTokens::Exact(n) | MaxTokens::UpTo(n) => Some(n),
            MaxTokens::Unlimited => None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    /// Checks every value against its range; the error names the parameter as the API spells it.
    fn validate(&self, vocab_size: usize, max_logprobs: usize) -> Result<(), RequestError> {
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
        if self.max_tokens.limit() == Some(0) {
            return bad("max_tokens", "max_tokens must be at least 1, got 0".into());
        }
        if let Some(max) = self.max_tokens.limit()
            && self.min_tokens > max
        {
            return bad("min_tokens", format!("min_tokens ({}) must not exceed max_tokens ({max})", self.min_tokens));
        }
        for (param, k) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if let Some(k) = k
                && k > max_logprobs
            {
                return bad(
                    param,
                    format!("at most {max_logprobs} logprobs can be requested (--max-logprobs), got {k}"),
                );
            }
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
        for (param, list) in [("allowed_token_ids", &self.allowed_token_ids), ("bad_words", &self.bad_words.concat())] {
            if list.len() > MAX_TOKEN_LIST {
                return bad(param, format!("{param} is limited to {MAX_TOKEN_LIST} tokens, got {}", list.len()));
            }
            if let Some(&t) = list.iter().find(|&&t| t as usize >= vocab_size) {
                return bad(param, format!("{param} token id {t} is outside the vocabulary of {vocab_size}"));
            }
        }
        // The grammar decides where a structured output ends: with EOS, at once.
        if self.structured_output.is_some() {
            if self.ignore_eos {
                return bad(
                    "ignore_eos",
                    "ignore_eos cannot be combined with structured outputs, which end with EOS".into(),
                );
            }
            if self.min_tokens > 0 {
                return bad(
                    "min_tokens",
                    "min_tokens cannot be combined with structured outputs, which end with EOS where the grammar does"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// A request as a client asked for it: the prompt already tokenized, every default applied, but
/// not yet checked. [`EngineRequest::validate`] turns it into the [`ValidRequest`] the engine takes.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub arrival: Instant,
}

/// What a model allows a request: its vocabulary, its context length, and the grammars its
/// vocabulary can be held to (`None`: no structured outputs).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub vocab_size: usize,
    pub max_model_len: usize,
    pub max_logprobs: usize,
    pub grammars: Option<Arc<Grammars>>,
}

impl EngineRequest {
    /// The one check of a request: every sampling parameter in its range, a non-empty prompt of
    /// known token ids, and room in the context for the prompt and its completion. A default
    /// `max_tokens` is fitted to the room left here, once; a structured output's constraint is
    /// compiled here, once.
    pub fn validate(self, limits: &RequestLimits) -> Result<ValidRequest, RequestError> {
        let &RequestLimits { vocab_size, max_model_len, max_logprobs, ref grammars } = limits;
        self.params.validate(vocab_size, max_logprobs)?;
        let prompt = &self.prompt_token_ids;
        if prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&token) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(RequestError::InvalidTokenId { token, vocab_size });
        }
        let room = max_model_len.saturating_sub(prompt.len());
        let too_long = |max_tokens: Option<usize>| RequestError::ContextTooLong {
            num_prompt_tokens: prompt.len(),
            max_tokens,
            max_model_len,
        };
        let max_tokens = match self.params.max_tokens {
            MaxTokens::Exact(max) if max > room || room == 0 => return Err(too_long(Some(max))),
            _ if room == 0 => return Err(too_long(None)),
            MaxTokens::Exact(max) => max,
            MaxTokens::UpTo(max) => max.min(room),
            MaxTokens::Unlimited => room,
        };
        let grammar = match &self.params.structured_output {
            None => None,
            Some(spec) => {
                let grammars = grammars.as_ref().ok_or_else(|| RequestError::InvalidParam {
                    param: "structured_outputs",
                    message: "structured outputs are not available for this model".into(),
                })?;
                let grammar = grammars
                    .compile(spec)
                    .map_err(|message| RequestError::InvalidParam { param: "structured_outputs", message })?;
                // A contradiction that shows at the first token is the client's to fix.
                if !self.params.allowed_token_ids.is_empty() {
                    let first = grammar
                        .clone()
                        .mask()
                        .map_err(|message| RequestError::InvalidParam { param: "structured_outputs", message })?;
                    let allowed = |t: u32| first.get(t as usize / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
                    if !self.params.allowed_token_ids.iter().any(|&t| allowed(t)) {
                        return Err(RequestError::InvalidParam {
                            param: "allowed_token_ids",
                            message: "none of allowed_token_ids can start the structured output".into(),
                        });
                    }
                }
                Some(grammar)
            }
        };
        Ok(ValidRequest { request: self, max_tokens, grammar })
    }
}

/// A request that passed [`EngineRequest::validate`]: the only kind the engine accepts, so the
/// engine never checks a request again.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    request: EngineRequest,
    max_tokens: usize,
    /// The compiled constraint, in its start state.
    grammar: Option<Grammar>,
}

impl ValidRequest {
    pub fn id(&self) -> &RequestId {
        &self.request.id
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.request.prompt_token_ids
    }

    pub fn params(&self) -> &SamplingParams {
        &self.request.params
    }

    /// Tokens each sequence may generate, fitted to the context.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn into_parts(self) -> (EngineRequest, usize, Option<Grammar>) {
        (self.request, self.max_tokens, self.grammar)
    }
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

/// The logprob of a chosen (or prompt) token and the top alternatives at its position, most
/// likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// How many tokens were at least as likely (itself included): 1 for the most likely.
    pub rank: u32,
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
    /// With `prompt_logprobs`, on the output of the sequence's first token: one entry per prompt
    /// token after the first (the first has no logprob).
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    pub num_prompt_tokens: usize,
    /// Tokens generated so far, this step's included.
    pub num_output_tokens: usize,
    /// Prompt tokens found in the prefix cache.
    pub num_cached_tokens: usize,
    /// Times the sequence was preempted (and its KV recomputed) so far.
    pub num_preemptions: usize,
    pub timings: SeqTimings,
    /// Why the engine gave up on the sequence when a step failed (the output is then an `Abort`).
    pub error: Option<String>,
}

impl RequestOutput {
    /// Adds a later step's output of the same sequence: the tokens, text and logprobs so far,
    /// and the latest counts and finish.
    pub fn append(&mut self, later: RequestOutput) {
        self.token_ids.extend(later.token_ids);
        self.text.push_str(&later.text);
        self.logprobs.extend(later.logprobs);
        if later.prompt_logprobs.is_some() {
            self.prompt_logprobs = later.prompt_logprobs;
        }
        self.num_prompt_tokens = later.num_prompt_tokens;
        self.num_output_tokens = later.num_output_tokens;
        self.num_cached_tokens = later.num_cached_tokens;
        self.num_preemptions = later.num_preemptions;
        self.timings = later.timings;
        if later.finish_reason.is_some() {
            self.finish_reason = later.finish_reason;
            self.stop_reason = later.stop_reason;
        }
        if later.error.is_some() {
            self.error = later.error;
        }
    }

    /// Files `out` under its sequence in `outputs`, appended to what that sequence produced
    /// before: a whole sequence's output gathered from its steps.
    pub fn gather(outputs: &mut std::collections::HashMap<(RequestId, usize), RequestOutput>, out: RequestOutput) {
        match outputs.entry((out.request_id.clone(), out.index)) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().append(out),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out);
            }
        }
    }

    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits =
        RequestLimits { vocab_size: 100, max_model_len: 32, max_logprobs: DEFAULT_MAX_LOGPROBS, grammars: None };

    fn check(params: SamplingParams, prompt: Vec<u32>) -> Result<usize, RequestError> {
        let request =
            EngineRequest { id: RequestId("r".into()), prompt_token_ids: prompt, params, arrival: Instant::now() };
        request.validate(&LIMITS).map(|r| r.max_tokens())
    }

    /// `EngineRequest::validate` is the one function that refuses a request; every field it checks
    /// is named in its error as the API spells it.
    #[test]
    fn validate_refuses_each_invalid_field_and_names_it() {
        let ok = SamplingParams::default;
        assert_eq!(check(ok(), vec![1, 2]), Ok(16));
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { n: 0, ..ok() }, "n"),
            (SamplingParams { n: MAX_N + 1, ..ok() }, "n"),
            (SamplingParams { temperature: -0.5, ..ok() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..ok() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..ok() }, "top_p"),
            (SamplingParams { min_p: 1.5, ..ok() }, "min_p"),
            (SamplingParams { presence_penalty: 2.5, ..ok() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -2.5, ..ok() }, "frequency_penalty"),
            (SamplingParams { repetition_penalty: 0.0, ..ok() }, "repetition_penalty"),
            (SamplingParams { logit_bias: vec![(100, 1.0)], ..ok() }, "logit_bias"),
            (SamplingParams { logit_bias: vec![(1, 101.0)], ..ok() }, "logit_bias"),
            (SamplingParams { max_tokens: MaxTokens::Exact(0), ..ok() }, "max_tokens"),
            (SamplingParams { min_tokens: 17, ..ok() }, "min_tokens"),
            (SamplingParams { logprobs: Some(DEFAULT_MAX_LOGPROBS + 1), ..ok() }, "logprobs"),
            (SamplingParams { stop: vec![String::new()], ..ok() }, "stop"),
            (SamplingParams { stop: vec!["x".repeat(MAX_STOP_STRING_BYTES + 1)], ..ok() }, "stop"),
            (SamplingParams { stop_token_ids: vec![100], ..ok() }, "stop_token_ids"),
            (SamplingParams { max_tokens: MaxTokens::Exact(31), ..ok() }, "max_tokens"),
        ];
        for (params, field) in cases {
            let err = check(params.clone(), vec![1, 2]).expect_err(field);
            assert_eq!(err.param(), Some(field), "{params:?}: {err}");
        }
        assert_eq!(check(ok(), vec![]).unwrap_err().param(), Some("prompt"));
        assert_eq!(check(ok(), vec![100]).unwrap_err().param(), Some("prompt"));
        // At the limits: the largest values accepted.
        let edge = SamplingParams {
            n: MAX_N,
            logprobs: Some(DEFAULT_MAX_LOGPROBS),
            max_tokens: MaxTokens::Exact(30),
            min_tokens: 30,
            stop: vec!["x".repeat(MAX_STOP_STRING_BYTES)],
            ..ok()
        };
        assert_eq!(check(edge, vec![1, 2]), Ok(30));
    }
}
