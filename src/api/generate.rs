//! `/v1/completions`, `/v1/chat/completions`, `/tokenize` and `/detokenize`: from the request's
//! JSON to engine requests, and from engine outputs to a response or a server-sent event stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::openai::*;
use super::tools::{self, ToolCall, ToolMode, ToolParser};
use super::{
    ApiError, AppState, InFlight, LoadedModel, ResponseBody, json_response, off_runtime, sse_response, unix_now,
    with_guard,
};
use crate::engine::driver::SubmitError;
use crate::engine::structured::{JsonOptions, StructuredOutput, any_object};
use crate::engine::{
    EngineRequest, FinishReason, MaxTokens, RequestId, RequestOutput, SamplingParams, StopReason, TokenLogprobs,
};
use crate::tokenizer::Tokenizer;
use tracing::Instrument;

/// Chunks buffered between the engine and a slow client before the stream waits.
const STREAM_BUFFER: usize = 64;
/// `max_tokens` of a completion request that gives none (OpenAI's default).
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// Which endpoint a request came to: their defaults differ.
#[derive(Clone, Copy)]
enum Endpoint {
    Completions,
    Chat,
}

/// Every default a request's sampling gets, in one place: the client's value, else the model's
/// generation config (unless `--generation-config vllm`), else OpenAI's and vLLM's. A
/// `max_tokens` the client sent is exact; a default one is fitted to the room the prompt leaves
/// (by [`EngineRequest::validate`](crate::engine::EngineRequest::validate), which checks every
/// value once).
fn sampling_params(
    state: &AppState,
    loaded: &LoadedModel,
    endpoint: Endpoint,
    fields: &SamplingFields,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
) -> Result<SamplingParams, ApiError> {
    let model = if state.config.use_generation_config { loaded.defaults.clone() } else { Default::default() };
    let top_k = match fields.top_k {
        None => model.top_k.unwrap_or(0),
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(
                format!("top_k must be -1 (disabled) or positive, got {k}"),
                Some("top_k"),
            ));
        }
    };
    let mut logit_bias = Vec::new();
    for (token, bias) in fields.logit_bias.iter().flatten() {
        let id = token.parse::<u32>().map_err(|_| {
            ApiError::bad_request(format!("logit_bias keys must be token ids, got '{token}'"), Some("logit_bias"))
        })?;
        logit_bias.push((id, *bias));
    }
    let max_tokens = match (max_tokens, endpoint, model.max_new_tokens) {
        (Some(m), _, _) => MaxTokens::Exact(m as usize),
        // OpenAI's default for completions, whatever the generation config says (as vLLM).
        (None, Endpoint::Completions, _) => MaxTokens::UpTo(DEFAULT_COMPLETION_MAX_TOKENS),
        (None, Endpoint::Chat, Some(m)) => MaxTokens::UpTo(m),
        (None, Endpoint::Chat, None) => MaxTokens::Unlimited,
    };
    Ok(SamplingParams {
        n: fields.n.unwrap_or(1) as usize,
        temperature: fields.temperature.or(model.temperature).unwrap_or(1.0),
        top_p: fields.top_p.or(model.top_p).unwrap_or(1.0),
        top_k,
        min_p: fields.min_p.or(model.min_p).unwrap_or(0.0),
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: fields.repetition_penalty.or(model.repetition_penalty).unwrap_or(1.0),
        logit_bias,
        seed: fields.seed.map(|s| s as u64),
        max_tokens,
        min_tokens: fields.min_tokens.unwrap_or(0) as usize,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        stop: fields.stop.0.clone(),
        stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        include_stop_str_in_output: fields.include_stop_str_in_output.unwrap_or(false),
        logprobs: logprobs.map(|k| k as usize),
        prompt_logprobs: match fields.prompt_logprobs {
            None => None,
            Some(-1) => Some(loaded.limits.vocab_size),
            Some(k) if k >= 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::bad_request(
                    format!("prompt_logprobs must be -1 (the whole vocabulary) or at least 0, got {k}"),
                    Some("prompt_logprobs"),
                ));
            }
        },
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
        structured_output: structured_output(fields)?,
        allowed_token_ids: match &fields.allowed_token_ids {
            Some(ids) if ids.is_empty() => {
                return Err(ApiError::bad_request(
                    "allowed_token_ids must not be empty (leave it out to allow every token)",
                    Some("allowed_token_ids"),
                ));
            }
            ids => ids.clone().unwrap_or_default(),
        },
        bad_words: bad_words(&loaded.tokenizer, fields.bad_words.as_deref().unwrap_or_default())?,
    })
}

/// A request's sampling parameters for `--enable-log-requests`: numbers and sizes, never the
/// client's text (stop strings, schemas, choices, bad words).
fn params_summary(p: &SamplingParams) -> String {
    let constraint = match &p.structured_output {
        None => "none",
        Some(StructuredOutput::Json { .. }) => "json",
        Some(StructuredOutput::Regex(_)) => "regex",
        Some(StructuredOutput::Choice(_)) => "choice",
        Some(StructuredOutput::Grammar(_)) => "grammar",
    };
    format!(
        "n={} temperature={} top_p={} top_k={} min_p={} max_tokens={:?} min_tokens={} seed={:?} logprobs={:?} \
         stop_strings={} stop_token_ids={} logit_bias={} bad_words={} allowed_token_ids={} structured_output={constraint}",
        p.n,
        p.temperature,
        p.top_p,
        p.top_k,
        p.min_p,
        p.max_tokens,
        p.min_tokens,
        p.seed,
        p.logprobs,
        p.stop.len(),
        p.stop_token_ids.len(),
        p.logit_bias.len(),
        p.bad_words.len(),
        p.allowed_token_ids.len(),
    )
}

/// vLLM's `truncate_prompt_tokens`: keep each prompt's last `k` tokens (-1: as many as the
/// context holds).
fn truncate_prompts(prompts: &mut [Vec<u32>], k: Option<i64>, max_model_len: usize) -> Result<(), ApiError> {
    let keep = match k {
        None => return Ok(()),
        Some(-1) => max_model_len,
        Some(k) if k >= 1 && k as u64 <= max_model_len as u64 => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(
                format!("truncate_prompt_tokens must be -1 or between 1 and max_model_len ({max_model_len}), got {k}"),
                Some("truncate_prompt_tokens"),
            ));
        }
    };
    for prompt in prompts {
        let cut = prompt.len().saturating_sub(keep);
        prompt.drain(..cut);
    }
    Ok(())
}

/// What a prompt's tokenization is checked against: a prompt with more tokens than the context is
/// refused without tokenizing all of it, unless it is to be truncated.
#[derive(Clone, Copy)]
struct PromptContext {
    max_model_len: usize,
    /// `truncate_prompt_tokens` is set: every token is needed to keep the last ones.
    truncating: bool,
}

impl PromptContext {
    fn of(loaded: &LoadedModel, fields: &SamplingFields) -> PromptContext {
        PromptContext { max_model_len: loaded.model.max_model_len, truncating: fields.truncate_prompt_tokens.is_some() }
    }

    fn encode(
        &self,
        tok: &Tokenizer,
        text: &str,
        add_special: bool,
        param: &'static str,
    ) -> Result<Vec<u32>, ApiError> {
        let limit = if self.truncating { usize::MAX } else { self.max_model_len };
        match tok.encode_within(text, add_special, limit) {
            Ok(Ok(ids)) => Ok(ids),
            Ok(Err(at_least)) => Err(ApiError::bad_request(
                format!(
                    "the prompt has at least {at_least} tokens, more than this model's maximum context length of {} \
                     (truncate_prompt_tokens keeps its last ones)",
                    self.max_model_len
                ),
                Some(param),
            )),
            Err(e) => Err(ApiError::bad_request(e.message, Some(param))),
        }
    }
}

/// vLLM's reading of `bad_words`: each word's tokens as written and with a leading space (when
/// that is another token sequence of the same length).
fn bad_words(tok: &Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| tok.encode(text, false).map_err(|e| ApiError::bad_request(e.message, Some("bad_words")));
    let mut out: Vec<Vec<u32>> = Vec::new();
    for word in words {
        let word = word.trim_start();
        if word.is_empty() {
            return Err(ApiError::bad_request("bad_words must not hold an empty word", Some("bad_words")));
        }
        let plain = encode(word)?;
        let spaced = encode(&format!(" {word}"))?;
        if spaced.len() == plain.len() && spaced.first() != plain.first() {
            out.push(spaced);
        }
        out.push(plain);
    }
    Ok(out)
}

/// vLLM's options for JSON constraints (`structured_outputs.disable_any_whitespace`, …), which
/// shape every JSON constraint of the request: its schema, `response_format`'s, a tool call's.
fn json_options(fields: &SamplingFields) -> JsonOptions {
    let p = fields.structured_outputs.as_ref();
    JsonOptions {
        no_whitespace: p.is_some_and(|p| p.disable_any_whitespace),
        whitespace_pattern: p.and_then(|p| p.whitespace_pattern.clone()).or(fields.guided_whitespace_pattern.clone()),
        no_additional_properties: p.is_some_and(|p| p.disable_additional_properties),
        lenient: false,
    }
}

/// The one constraint a request's structured-output fields ask for, if any: `response_format`,
/// vLLM's `structured_outputs`, or its older `guided_*` fields. More than one is refused, as is a
/// constraint Pagoda cannot enforce; the constraint itself is compiled (and checked) by
/// `EngineRequest::validate`.
fn structured_output(fields: &SamplingFields) -> Result<Option<StructuredOutput>, ApiError> {
    let bad = |message: String, param: &'static str| Err(ApiError::bad_request(message, Some(param)));
    let mut found: Vec<(&'static str, StructuredOutput)> = Vec::new();
    let json = |schema: Value, options: JsonOptions| StructuredOutput::Json { schema, options };
    let p = fields.structured_outputs.clone().unwrap_or_default();
    // vLLM's JSON options also shape a `response_format` schema.
    let options = json_options(fields);
    if let Some(format) = &fields.response_format {
        match format.kind.as_str() {
            "text" => {}
            "json_object" => found.push(("response_format", json(any_object(), options.clone()))),
            "json_schema" => {
                let Some(schema) = format.json_schema.as_ref().and_then(|f| f.schema.clone()) else {
                    return bad(
                        "response_format of type json_schema needs json_schema.schema".into(),
                        "response_format",
                    );
                };
                // Without `strict`, schema keywords the grammar engine does not know are ignored.
                let strict = format.json_schema.as_ref().and_then(|f| f.strict).unwrap_or(false);
                found.push(("response_format", json(schema, JsonOptions { lenient: !strict, ..options.clone() })));
            }
            other => {
                return bad(
                    format!("response_format type '{other}' is not supported; use text, json_object or json_schema"),
                    "response_format",
                );
            }
        }
    }
    if p.structural_tag.is_some() {
        return bad("structured_outputs.structural_tag is not supported".into(), "structured_outputs");
    }
    let schema_of = |value: Value, param: &'static str| -> Result<Value, ApiError> {
        match value {
            // vLLM takes a schema as an object or as its JSON text.
            Value::String(text) => serde_json::from_str(&text)
                .map_err(|e| ApiError::bad_request(format!("{param} is not a JSON schema: {e}"), Some(param))),
            other => Ok(other),
        }
    };
    for (param, schema) in [("structured_outputs", p.json), ("guided_json", fields.guided_json.clone())] {
        if let Some(schema) = schema {
            found.push((param, json(schema_of(schema, param)?, options.clone())));
        }
    }
    if p.json_object == Some(true) {
        found.push(("structured_outputs", json(any_object(), options.clone())));
    }
    for (param, regex) in [("structured_outputs", p.regex), ("guided_regex", fields.guided_regex.clone())] {
        if let Some(regex) = regex {
            found.push((param, StructuredOutput::Regex(regex)));
        }
    }
    for (param, choice) in [("structured_outputs", p.choice), ("guided_choice", fields.guided_choice.clone())] {
        if let Some(choice) = choice {
            found.push((param, StructuredOutput::Choice(choice)));
        }
    }
    for (param, grammar) in [("structured_outputs", p.grammar), ("guided_grammar", fields.guided_grammar.clone())] {
        if let Some(grammar) = grammar {
            found.push((param, StructuredOutput::Grammar(grammar)));
        }
    }
    if let Some(backend) = &fields.guided_decoding_backend
        && !matches!(backend.as_str(), "auto" | "guidance" | "llguidance")
    {
        return bad(
            format!("guided_decoding_backend '{backend}' is not available; Pagoda's structured outputs use guidance"),
            "guided_decoding_backend",
        );
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, spec)| spec)),
        _ => bad(
            format!(
                "only one structured-output constraint can be given; this request has {}",
                found.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
            ),
            found[1].0,
        ),
    }
}

/// A request's sequences running in the engine, their outputs arriving on one channel.
struct Submission {
    rx: UnboundedReceiver<RequestOutput>,
    prompt_of: HashMap<RequestId, usize>,
    n: usize,
    prompt_lens: Vec<usize>,
    /// Each prompt's ids, kept for `return_token_ids`.
    prompt_ids: Vec<Vec<u32>>,
}

impl Submission {
    /// Checks every prompt (once, by [`EngineRequest::validate`], off the async threads: it
    /// compiles a structured output's grammar) and the queue, then submits one engine request per
    /// prompt.
    async fn start(state: &AppState, prompts: Vec<Vec<u32>>, params: SamplingParams) -> Result<Submission, ApiError> {
        let loaded = state.ready()?;
        let arrival = Instant::now();
        // Engine ids are ours alone: a client's x-request-id may repeat.
        let base = uuid::Uuid::new_v4().simple().to_string();
        let prompt_lens = prompts.iter().map(Vec::len).collect();
        let prompt_ids = prompts.clone();
        let work = (loaded.limits.clone(), base.clone(), params.clone());
        let requests = off_runtime(state, move || {
            let (limits, base, params) = work;
            let mut requests = Vec::with_capacity(prompts.len());
            for (idx, prompt) in prompts.into_iter().enumerate() {
                let id = RequestId(format!("{base}-{idx}"));
                let request = EngineRequest { id, prompt_token_ids: prompt, params: params.clone(), arrival };
                requests.push(request.validate(&limits)?);
            }
            Ok::<_, ApiError>(requests)
        })
        .await??;
        if state.config.log_request_params {
            let prompt_tokens: Vec<usize> = requests.iter().map(|r| r.prompt_token_ids().len()).collect();
            tracing::info!(request = %base, ?prompt_tokens, params = %params_summary(&params), "received request");
        }
        let num_seqs = requests.len() * params.n;
        if num_seqs > state.config.max_queue {
            return Err(ApiError::bad_request(
                format!(
                    "this request needs {num_seqs} sequences, more than the queue holds ({})",
                    state.config.max_queue
                ),
                Some("n"),
            ));
        }
        let (tx, rx) = unbounded_channel();
        let prompt_of = requests.iter().enumerate().map(|(idx, r)| (r.id().clone(), idx)).collect();
        match loaded.engine.submit_all(requests, tx, state.config.max_queue) {
            Ok(()) => {}
            Err(SubmitError::QueueFull) => return Err(ApiError::QueueFull { retry_after_secs: 1 }),
            Err(e @ SubmitError::Stopped(_)) => return Err(ApiError::Internal(e.to_string())),
        }
        Ok(Submission { rx, prompt_of, n: params.n, prompt_lens, prompt_ids })
    }

    /// The next output and the choice index it belongs to (`prompt * n + sequence`).
    async fn next(&mut self) -> Option<(usize, RequestOutput)> {
        let out = self.rx.recv().await?;
        let prompt = self.prompt_of.get(&out.request_id).copied().unwrap_or(0);
        Some((prompt * self.n + out.index, out))
    }

    fn num_choices(&self) -> usize {
        self.prompt_lens.len() * self.n
    }
}

/// The error for sequences the engine dropped without finishing them (it stopped or failed).
fn unfinished() -> ApiError {
    ApiError::Internal("the engine stopped before finishing this request".into())
}

/// The error for a sequence whose step failed on the device.
fn step_failed(error: &str) -> ApiError {
    ApiError::Internal(format!("the model failed while running this request: {error}"))
}

/// Drains a run for a non-streamed response: each output goes to `apply` with its choice index;
/// returns the usage. Logs the finished request.
async fn collect(
    mut run: Submission,
    user: Option<&str>,
    mut apply: impl FnMut(usize, &RequestOutput),
) -> Result<Usage, ApiError> {
    let started = Instant::now();
    let mut usage = Usage { prompt_tokens: run.prompt_lens.iter().sum(), ..Usage::default() };
    let mut reasons = vec![None; run.num_choices()];
    while let Some((idx, out)) = run.next().await {
        if let Some(error) = &out.error {
            return Err(step_failed(error));
        }
        usage.completion_tokens += out.token_ids.len();
        reasons[idx] = finish_reason(&out).or(reasons[idx]);
        apply(idx, &out);
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    if reasons.iter().any(Option::is_none) {
        tracing::error!("the engine dropped a request without finishing it");
        return Err(unfinished());
    }
    log_finished(started, &usage, &reasons, user);
    Ok(usage)
}

/// Drives a run for a streamed response: `opening` chunks first, then `render`'s chunk for each
/// output (none to skip it), the usage chunk if `usage_chunk` gives one, and `[DONE]`. A client
/// that goes away cancels the run at once (dropping it aborts its sequences), even while no chunk
/// is due; a sequence the engine dropped ends the stream with an error event.
async fn stream(
    mut run: Submission,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    opening: Vec<Bytes>,
    mut render: impl FnMut(usize, &RequestOutput) -> Option<Bytes>,
    usage_chunk: impl FnOnce(Usage) -> Option<Bytes>,
    user: Option<String>,
) {
    let started = Instant::now();
    for chunk in opening {
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
    let mut usage = Usage { prompt_tokens: run.prompt_lens.iter().sum(), ..Usage::default() };
    let mut reasons = vec![None; run.num_choices()];
    loop {
        let next = tokio::select! {
            next = run.next() => next,
            _ = tx.closed() => return,
        };
        let Some((idx, out)) = next else { break };
        if let Some(error) = &out.error {
            let _ = tx.send(sse_event(&step_failed(error).body())).await;
            let _ = tx.send(Bytes::from_static(SSE_DONE)).await;
            return;
        }
        usage.completion_tokens += out.token_ids.len();
        reasons[idx] = finish_reason(&out).or(reasons[idx]);
        if let Some(chunk) = render(idx, &out)
            && tx.send(chunk).await.is_err()
        {
            return;
        }
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    if reasons.iter().any(Option::is_none) {
        tracing::error!("the engine dropped a streamed request without finishing it");
        let _ = tx.send(sse_event(&unfinished().body())).await;
        let _ = tx.send(Bytes::from_static(SSE_DONE)).await;
        return;
    }
    if let Some(chunk) = usage_chunk(usage) {
        let _ = tx.send(chunk).await;
    }
    let _ = tx.send(Bytes::from_static(SSE_DONE)).await;
    log_finished(started, &usage, &reasons, user.as_deref());
}

fn finish_reason(out: &RequestOutput) -> Option<&'static str> {
    out.finish_reason.map(FinishReason::as_str)
}

fn stop_reason(out: &RequestOutput) -> Option<Value> {
    match &out.stop_reason {
        Some(StopReason::Token(t)) => Some(Value::from(*t)),
        Some(StopReason::Text(s)) => Some(Value::from(s.clone())),
        None => None,
    }
}

/// How logprobs name a token: its text, or `token_id:<id>` (`return_tokens_as_token_ids`).
#[derive(Clone)]
struct TokenNames {
    tok: Arc<Tokenizer>,
    as_ids: bool,
}

impl TokenNames {
    fn new(tok: &Arc<Tokenizer>, fields: &SamplingFields) -> TokenNames {
        TokenNames { tok: tok.clone(), as_ids: fields.return_tokens_as_token_ids.unwrap_or(false) }
    }
}

fn token_text(names: &TokenNames, id: u32) -> String {
    if names.as_ids { format!("token_id:{id}") } else { names.tok.decode(&[id], false) }
}

/// The usage so far of each choice of a stream with `continuous_usage_stats`, as vLLM reports it:
/// the choice's prompt and the tokens that choice generated.
struct RunningUsage {
    prompt_lens: Vec<usize>,
    n: usize,
    completion_tokens: Vec<usize>,
}

impl RunningUsage {
    fn new(run: &Submission) -> RunningUsage {
        RunningUsage { prompt_lens: run.prompt_lens.clone(), n: run.n, completion_tokens: vec![0; run.num_choices()] }
    }

    fn add(&mut self, idx: usize, out: &RequestOutput) -> Usage {
        self.completion_tokens[idx] += out.token_ids.len();
        let prompt_tokens = self.prompt_lens[idx / self.n];
        Usage {
            prompt_tokens,
            completion_tokens: self.completion_tokens[idx],
            total_tokens: prompt_tokens + self.completion_tokens[idx],
        }
    }
}

/// Appends tokens to the legacy logprobs format, each with at most `max_top` alternatives;
/// `offset` is the running character offset.
fn extend_completion_logprobs(
    tok: &TokenNames,
    target: &mut CompletionLogprobs,
    entries: &[TokenLogprobs],
    max_top: usize,
    offset: &mut usize,
) {
    for lp in entries {
        let text = token_text(tok, lp.token_id);
        target.text_offset.push(*offset);
        *offset += text.chars().count();
        target.tokens.push(text);
        target.token_logprobs.push(Some(lp.logprob.max(MIN_LOGPROB)));
        let mut top = serde_json::Map::new();
        for &(id, logprob) in lp.top.iter().take(max_top) {
            top.entry(token_text(tok, id)).or_insert(Value::from(logprob.max(MIN_LOGPROB)));
        }
        target.top_logprobs.push(Some(top));
    }
}

/// The logprob reported for a token of no probability (JSON has no -inf), as vLLM reports it.
const MIN_LOGPROB: f32 = -9999.0;

/// An echoed prompt's tokens in the legacy logprobs format: the first with `null` (nothing
/// predicts it), then each with its logprob and `top` alternatives (`entries`, one per token
/// after the first).
fn extend_echo_logprobs(
    tok: &TokenNames,
    target: &mut CompletionLogprobs,
    prompt: &[u32],
    entries: &[TokenLogprobs],
    top: usize,
    offset: &mut usize,
) {
    if let Some(&first) = prompt.first() {
        let text = token_text(tok, first);
        target.text_offset.push(*offset);
        *offset += text.chars().count();
        target.tokens.push(text);
        target.token_logprobs.push(None);
        target.top_logprobs.push(None);
    }
    extend_completion_logprobs(tok, target, entries, top, offset);
}

/// vLLM's `prompt_logprobs` field from a sequence's prompt logprobs, with `top` alternatives each.
fn prompt_logprobs_json(tok: &TokenNames, entries: &[TokenLogprobs], top: usize) -> PromptLogprobs {
    let entry = |id: u32, logprob: f32, rank: u32| serde_json::json!({ "logprob": logprob.max(MIN_LOGPROB), "rank": rank, "decoded_token": token_text(tok, id) });
    let positions = entries.iter().map(|lp| {
        let mut m = serde_json::Map::new();
        m.insert(lp.token_id.to_string(), entry(lp.token_id, lp.logprob, lp.rank));
        for (i, &(id, logprob)) in lp.top.iter().take(top).enumerate() {
            m.entry(id.to_string()).or_insert_with(|| entry(id, logprob, i as u32 + 1));
        }
        Some(m)
    });
    std::iter::once(None).chain(positions).collect()
}

fn chat_logprobs(tok: &TokenNames, entries: &[TokenLogprobs]) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tok, id);
        ChatTokenLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
    };
    ChatLogprobs {
        content: entries
            .iter()
            .map(|lp| {
                let main = entry(lp.token_id, lp.logprob);
                ChatLogprobEntry {
                    token: main.token,
                    logprob: main.logprob,
                    bytes: main.bytes,
                    top_logprobs: lp.top.iter().map(|&(id, v)| entry(id, v)).collect(),
                }
            })
            .collect(),
    }
}

fn sse_event(value: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, value).expect("API types serialize");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

fn log_finished(started: Instant, usage: &Usage, reasons: &[Option<&'static str>], user: Option<&str>) {
    tracing::info!(
        user,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        finish_reasons = ?reasons,
        seconds = started.elapsed().as_secs_f64(),
        "generation finished"
    );
}

pub async fn completions(
    state: Arc<AppState>,
    mut req: CompletionRequest,
    request_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let loaded = state.ready()?;
    let model = state.check_model(req.model.as_deref())?;
    force_usage(&state, &mut req.stream_options);
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported", Some("suffix")));
    }
    if req.best_of.is_some_and(|b| b != req.sampling.n.unwrap_or(1)) {
        return Err(ApiError::bad_request("best_of other than n is not supported", Some("best_of")));
    }
    no_streamed_prompt_logprobs(req.stream, &req.sampling)?;
    // `echo` with `max_tokens: 0` returns the prompt alone (with its logprobs: what evaluation
    // harnesses ask for); as in vLLM one token is generated and not returned.
    let echo_only = req.echo && req.max_tokens == Some(0);
    let max_tokens = if echo_only { Some(1) } else { req.max_tokens };
    let mut params = sampling_params(&state, loaded, Endpoint::Completions, &req.sampling, max_tokens, req.logprobs)?;
    let prompt_top = params.prompt_logprobs;
    if req.echo && params.logprobs.is_some() {
        // The echoed prompt's tokens have logprobs too.
        params.prompt_logprobs = params.prompt_logprobs.max(params.logprobs);
    }
    let tok = loaded.tokenizer.clone();
    let add_special = req.add_special_tokens.unwrap_or(true);
    let context = PromptContext::of(loaded, &req.sampling);
    let mut prompts: Vec<Vec<u32>> = match &req.prompt {
        Prompt::Texts(texts) => {
            let (texts, tok) = (texts.clone(), tok.clone());
            off_runtime(&state, move || {
                texts.iter().map(|t| context.encode(&tok, t, add_special, "prompt")).collect::<Result<_, _>>()
            })
            .await??
        }
        Prompt::Tokens(lists) => lists.clone(),
    };
    truncate_prompts(&mut prompts, req.sampling.truncate_prompt_tokens, loaded.model.max_model_len)?;
    let texts: Vec<String> = match (&req.prompt, req.echo) {
        (_, false) => vec![String::new(); prompts.len()],
        // What the model saw: the truncated prompt.
        (_, true) if req.sampling.truncate_prompt_tokens.is_some() => {
            prompts.iter().map(|ids| tok.decode(ids, false)).collect()
        }
        (Prompt::Texts(texts), true) => texts.clone(),
        (Prompt::Tokens(lists), true) => lists.iter().map(|ids| tok.decode(ids, false)).collect(),
    };
    let echo = Echo { texts, only: echo_only, prompt_top };
    let run = Submission::start(&state, prompts, params).await?;
    let guard = InFlight::new(&state);
    let meta = ResponseMeta { id: format!("cmpl-{request_id}"), model, created: unix_now() };
    if req.stream {
        return Ok(with_guard(stream_completion(run, meta, &req, tok, echo), guard));
    }
    let response = collect_completion(run, meta, &req, tok, echo).await?;
    Ok(with_guard(json_response(StatusCode::OK, &response), guard))
}

/// vLLM answers `prompt_logprobs` only in whole responses.
fn no_streamed_prompt_logprobs(stream: bool, fields: &SamplingFields) -> Result<(), ApiError> {
    if stream && fields.prompt_logprobs.is_some() {
        return Err(ApiError::bad_request(
            "prompt_logprobs are not available when stream is true",
            Some("prompt_logprobs"),
        ));
    }
    Ok(())
}

/// What a completion adds to its choices besides the generated text: the prompt's text when it
/// is echoed (its logprobs too, when logprobs are asked for), and `prompt_logprobs`.
struct Echo {
    /// Each prompt's text, or empty strings without `echo`.
    texts: Vec<String>,
    /// `echo` with `max_tokens: 0`: the prompt alone, without the token generated.
    only: bool,
    /// `prompt_logprobs`' top count, when the request asked for them.
    prompt_top: Option<usize>,
}

impl Echo {
    /// `out` without what it generated, for a response that echoes the prompt alone.
    fn generated<'a>(&self, out: &'a RequestOutput) -> (&'a str, &'a [u32], &'a [TokenLogprobs]) {
        if self.only { ("", &[], &[]) } else { (&out.text, &out.token_ids, &out.logprobs) }
    }
}

/// `--enable-force-include-usage`: a stream ends with its usage whether or not it asked.
fn force_usage(state: &AppState, options: &mut Option<StreamOptions>) {
    if state.config.force_include_usage {
        options.get_or_insert_with(StreamOptions::default).include_usage = true;
    }
}

/// What every response and chunk of one request repeats.
struct ResponseMeta {
    id: String,
    model: String,
    created: u64,
}

/// A completion answered as server-sent events.
fn stream_completion(
    run: Submission,
    meta: ResponseMeta,
    req: &CompletionRequest,
    tok: Arc<Tokenizer>,
    echo: Echo,
) -> Response<ResponseBody> {
    let ResponseMeta { id, model, created } = meta;
    let (want_logprobs, n) = (req.logprobs.is_some(), run.n);
    let echo_logprobs = req.echo && want_logprobs;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let continuous = req.stream_options.as_ref().is_some_and(|o| o.continuous_usage_stats);
    let token_ids = req.sampling.return_token_ids.unwrap_or(false);
    let names = TokenNames::new(&tok, &req.sampling);
    let prompt_ids = run.prompt_ids.clone();
    let top = req.logprobs.unwrap_or(0) as usize;
    let mut running = RunningUsage::new(&run);
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let mut offsets = vec![0usize; run.num_choices()];
    let mut started_choice = vec![false; run.num_choices()];
    let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionChunk {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage: include_usage.then_some(usage),
    };
    let usage_chunk = {
        let chunk = chunk.clone();
        move |usage| include_usage.then(|| sse_event(&chunk(vec![], Some(usage))))
    };
    let render = move |idx: usize, out: &RequestOutput| {
        let usage = running.add(idx, out);
        let (generated, generated_ids, generated_logprobs) = echo.generated(out);
        let mut text = String::new();
        let first = !started_choice[idx];
        let mut logprobs = want_logprobs.then(CompletionLogprobs::default);
        if first {
            started_choice[idx] = true;
            text.push_str(&echo.texts[idx / n]);
            offsets[idx] = text.chars().count();
            if let (true, Some(lp), Some(entries)) = (echo_logprobs, logprobs.as_mut(), &out.prompt_logprobs) {
                offsets[idx] = 0;
                extend_echo_logprobs(&names, lp, &prompt_ids[idx / n], entries, top, &mut offsets[idx]);
            }
        }
        text.push_str(generated);
        if text.is_empty() && out.finish_reason.is_none() && generated_logprobs.is_empty() && generated_ids.is_empty() {
            return None;
        }
        if let Some(lp) = logprobs.as_mut() {
            extend_completion_logprobs(&names, lp, generated_logprobs, usize::MAX, &mut offsets[idx]);
        }
        let choice = CompletionChoice {
            index: idx,
            text,
            logprobs,
            finish_reason: finish_reason(out),
            stop_reason: stop_reason(out),
            prompt_token_ids: (token_ids && first).then(|| prompt_ids[idx / n].clone()),
            token_ids: token_ids.then(|| generated_ids.to_vec()),
            prompt_logprobs: None,
        };
        Some(sse_event(&chunk(vec![choice], continuous.then_some(usage))))
    };
    let user = req.sampling.user.clone();
    tokio::spawn(stream(run, tx, Vec::new(), render, usage_chunk, user).instrument(tracing::Span::current()));
    sse_response(rx)
}

/// A completion answered in one JSON body once every choice has finished.
async fn collect_completion(
    run: Submission,
    meta: ResponseMeta,
    req: &CompletionRequest,
    tok: Arc<Tokenizer>,
    echo: Echo,
) -> Result<CompletionResponse, ApiError> {
    let ResponseMeta { id, model, created } = meta;
    let (want_logprobs, n) = (req.logprobs.is_some(), run.n);
    let echo_logprobs = req.echo && want_logprobs;
    let top = req.logprobs.unwrap_or(0) as usize;
    let token_ids = req.sampling.return_token_ids.unwrap_or(false);
    let names = TokenNames::new(&tok, &req.sampling);
    let prompt_ids = run.prompt_ids.clone();
    let mut choices: Vec<CompletionChoice> = (0..run.num_choices())
        .map(|idx| CompletionChoice {
            index: idx,
            text: echo.texts[idx / n].clone(),
            logprobs: want_logprobs.then(CompletionLogprobs::default),
            finish_reason: None,
            stop_reason: None,
            prompt_token_ids: token_ids.then(|| run.prompt_ids[idx / n].clone()),
            token_ids: token_ids.then(Vec::new),
            prompt_logprobs: None,
        })
        .collect();
    let mut offsets: Vec<usize> = choices.iter().map(|c| c.text.chars().count()).collect();
    let usage = collect(run, req.sampling.user.as_deref(), |idx, out| {
        let choice = &mut choices[idx];
        let (generated, generated_ids, generated_logprobs) = echo.generated(out);
        if let Some(entries) = &out.prompt_logprobs {
            if let (true, Some(lp)) = (echo_logprobs, choice.logprobs.as_mut()) {
                offsets[idx] = 0;
                extend_echo_logprobs(&names, lp, &prompt_ids[idx / n], entries, top, &mut offsets[idx]);
            }
            choice.prompt_logprobs = echo.prompt_top.map(|k| prompt_logprobs_json(&names, entries, k));
        }
        choice.text.push_str(generated);
        if let Some(ids) = choice.token_ids.as_mut() {
            ids.extend(generated_ids);
        }
        if let Some(lp) = choice.logprobs.as_mut() {
            extend_completion_logprobs(&names, lp, generated_logprobs, usize::MAX, &mut offsets[idx]);
        }
        if out.finished() {
            choice.finish_reason = finish_reason(out);
            choice.stop_reason = stop_reason(out);
        }
    })
    .await?;
    Ok(CompletionResponse { id, object: "text_completion", created, model, choices, usage: Some(usage) })
}

/// Renders chat messages with the model's template; returns the prompt text.
fn render_chat(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: Option<&Value>,
    kwargs: Option<&serde_json::Map<String, Value>>,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let template = tok.chat_template().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions instead", Some("messages"))
    })?;
    if continue_final_message && add_generation_prompt {
        return Err(ApiError::bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            Some("continue_final_message"),
        ));
    }
    let values: Vec<Value> = messages.iter().map(ChatMessage::to_template_value).collect();
    let mut extra = kwargs.cloned().unwrap_or_default();
    if let Some(tools) = tools {
        extra.insert("tools".into(), tools.clone());
    }
    let mut text = template.render(&values, add_generation_prompt, &extra)?;
    if continue_final_message {
        // Leave the last message open: cut whatever the template wrote after its content.
        let last = messages.last().and_then(|m| m.content.0.as_deref()).unwrap_or("");
        match text.rfind(last) {
            Some(at) if !last.is_empty() => text.truncate(at + last.len()),
            _ => {
                return Err(ApiError::bad_request(
                    "continue_final_message needs a final message with content",
                    Some("continue_final_message"),
                ));
            }
        }
    }
    Ok(text)
}

pub async fn chat(
    state: Arc<AppState>,
    mut req: ChatRequest,
    request_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let loaded = state.ready()?;
    let model = state.check_model(req.model.as_deref())?;
    force_usage(&state, &mut req.stream_options);
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::bad_request("top_logprobs needs logprobs set to true", Some("top_logprobs")));
    }
    no_streamed_prompt_logprobs(req.stream, &req.sampling)?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let mut params = sampling_params(&state, loaded, Endpoint::Chat, &req.sampling, max_tokens, logprobs)?;
    let (mode, tool_output) = tools::plan(
        state.config.tools,
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        json_options(&req.sampling),
    )?;
    if let Some(spec) = tool_output {
        if params.structured_output.is_some() {
            return Err(ApiError::bad_request(
                "tool_choice \"required\" or a named function holds the output to a tool call; it cannot be \
                 combined with response_format or structured_outputs",
                Some("tool_choice"),
            ));
        }
        params.structured_output = Some(spec);
    }
    if matches!(mode, ToolMode::Auto(ToolParser::Mistral | ToolParser::Hermes)) {
        // Mistral marks calls with a special token, as some Hermes checkpoints mark
        // `<tool_call>`: the text must keep them for the parser (as vLLM's parsers ask).
        params.skip_special_tokens = false;
    }
    let tok = loaded.tokenizer.clone();
    let context = PromptContext::of(loaded, &req.sampling);
    let work = (tok.clone(), req.messages.clone(), req.tools.clone(), req.chat_template_kwargs.clone());
    let (add_generation_prompt, continue_final) =
        (req.add_generation_prompt.unwrap_or(true), req.continue_final_message);
    let prompt = off_runtime(&state, move || {
        let (tok, messages, tools, kwargs) = work;
        let text =
            render_chat(&tok, &messages, add_generation_prompt, continue_final, tools.as_ref(), kwargs.as_ref())?;
        context.encode(&tok, &text, false, "messages")
    })
    .await??;
    let mut prompts = vec![prompt];
    truncate_prompts(&mut prompts, req.sampling.truncate_prompt_tokens, loaded.model.max_model_len)?;
    let prompt_top = params.prompt_logprobs;
    let run = Submission::start(&state, prompts, params).await?;
    let guard = InFlight::new(&state);
    let meta = ResponseMeta { id: format!("chatcmpl-{request_id}"), model, created: unix_now() };
    if req.stream {
        return Ok(with_guard(stream_chat(run, meta, &req, tok, logprobs, mode), guard));
    }
    let response = collect_chat(run, meta, &req, tok, logprobs, prompt_top, &mode).await?;
    Ok(with_guard(json_response(StatusCode::OK, &response), guard))
}

/// A chat completion answered as server-sent events. With tools, text that may be a tool call is
/// held back until its choice ends, then sent as `delta.tool_calls` (or as text if it is none).
fn stream_chat(
    run: Submission,
    meta: ResponseMeta,
    req: &ChatRequest,
    tok: Arc<Tokenizer>,
    logprobs: Option<u32>,
    mode: ToolMode,
) -> Response<ResponseBody> {
    let ResponseMeta { id, model, created } = meta;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let continuous = req.stream_options.as_ref().is_some_and(|o| o.continuous_usage_stats);
    let token_ids = req.sampling.return_token_ids.unwrap_or(false);
    let names = TokenNames::new(&tok, &req.sampling);
    let mut running = RunningUsage::new(&run);
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices,
        usage,
        prompt_token_ids: None,
    };
    // Every choice opens with the assistant role.
    let usage_field = move |u: Option<Usage>| include_usage.then_some(u);
    let opening = (0..run.num_choices())
        .map(|index| {
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..ChatDelta::default() };
            let first = ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
                token_ids: None,
            };
            let mut opening = chunk(vec![first], usage_field(None));
            if token_ids && index == 0 {
                opening.prompt_token_ids = Some(run.prompt_ids[0].clone());
            }
            sse_event(&opening)
        })
        .collect();
    let usage_chunk = {
        let chunk = chunk.clone();
        move |usage| include_usage.then(|| sse_event(&chunk(vec![], Some(Some(usage)))))
    };
    let mut calls =
        ToolStream { mode, held: vec![String::new(); run.num_choices()], sent: vec![false; run.num_choices()] };
    let render = move |index: usize, out: &RequestOutput| {
        let usage = running.add(index, out);
        let (content, tool_calls, finish) = calls.push(index, out);
        let new_ids = token_ids && !out.token_ids.is_empty();
        if content.is_empty() && tool_calls.is_empty() && finish.is_none() && out.logprobs.is_empty() && !new_ids {
            return None;
        }
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta { role: None, content: Some(content), tool_calls },
            logprobs: logprobs.map(|_| chat_logprobs(&names, &out.logprobs)),
            finish_reason: finish,
            stop_reason: stop_reason(out),
            token_ids: token_ids.then(|| out.token_ids.clone()),
        };
        let usage = if continuous { usage_field(Some(usage)) } else { usage_field(None) };
        Some(sse_event(&chunk(vec![choice], usage)))
    };
    let user = req.sampling.user.clone();
    tokio::spawn(stream(run, tx, opening, render, usage_chunk, user).instrument(tracing::Span::current()));
    sse_response(rx)
}

/// The streamed choices of a chat with tools: what each holds back while it may be a call.
struct ToolStream {
    mode: ToolMode,
    held: Vec<String>,
    /// Whether the choice has sent text (a Llama 3 call is a whole output, so not after that).
    sent: Vec<bool>,
}

impl ToolStream {
    /// An output's text to send now, the calls to send, and the finish reason.
    fn push(&mut self, index: usize, out: &RequestOutput) -> (String, Vec<ToolCallOut>, Option<&'static str>) {
        if self.mode == ToolMode::None {
            return (out.text.clone(), Vec::new(), finish_reason(out));
        }
        let held = &mut self.held[index];
        held.push_str(&out.text);
        if !out.finished() {
            let keep_from = match self.mode {
                ToolMode::Auto(ToolParser::Llama3Json) if self.sent[index] => None,
                ToolMode::Auto(parser) => tools::call_start(parser, held),
                _ => Some(0),
            };
            let send: String = held.drain(..keep_from.unwrap_or(held.len())).collect();
            self.sent[index] |= !send.is_empty();
            return (send, Vec::new(), None);
        }
        let text = std::mem::take(held);
        let (content, calls) = if out.finish_reason == Some(FinishReason::Stop) {
            tools::extract(&self.mode, &text)
        } else {
            (Some(text), Vec::new())
        };
        if calls.is_empty() {
            return (content.unwrap_or_default(), Vec::new(), finish_reason(out));
        }
        (content.unwrap_or_default(), tool_calls_out(calls, true), Some("tool_calls"))
    }
}

fn tool_calls_out(calls: Vec<ToolCall>, indexed: bool) -> Vec<ToolCallOut> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCallOut {
            index: indexed.then_some(i),
            id: c.id,
            kind: "function",
            function: FunctionCallOut { name: c.name, arguments: c.arguments },
        })
        .collect()
}

/// A chat completion answered in one JSON body once every choice has finished.
async fn collect_chat(
    run: Submission,
    meta: ResponseMeta,
    req: &ChatRequest,
    tok: Arc<Tokenizer>,
    logprobs: Option<u32>,
    prompt_top: Option<usize>,
    mode: &ToolMode,
) -> Result<ChatResponse, ApiError> {
    let ResponseMeta { id, model, created } = meta;
    let token_ids = req.sampling.return_token_ids.unwrap_or(false);
    let names = TokenNames::new(&tok, &req.sampling);
    let prompt_token_ids = token_ids.then(|| run.prompt_ids[0].clone());
    // Every choice computed them; they are the same, and the response has one field.
    let mut prompt_logprobs = None;
    let mut texts = vec![String::new(); run.num_choices()];
    let mut choices: Vec<ChatChoice> = (0..run.num_choices())
        .map(|index| ChatChoice {
            index,
            message: ChatMessageOut { role: "assistant", content: None, refusal: None, tool_calls: Vec::new() },
            logprobs: logprobs.map(|_| ChatLogprobs::default()),
            finish_reason: None,
            stop_reason: None,
            token_ids: token_ids.then(Vec::new),
        })
        .collect();
    let usage = collect(run, req.sampling.user.as_deref(), |index, out| {
        let choice = &mut choices[index];
        if let (0, Some(top), Some(entries)) = (index, prompt_top, &out.prompt_logprobs) {
            prompt_logprobs = Some(prompt_logprobs_json(&names, entries, top));
        }
        texts[index].push_str(&out.text);
        if let Some(ids) = choice.token_ids.as_mut() {
            ids.extend(&out.token_ids);
        }
        if let Some(lp) = choice.logprobs.as_mut() {
            lp.content.extend(chat_logprobs(&names, &out.logprobs).content);
        }
        if out.finished() {
            choice.finish_reason = finish_reason(out);
            choice.stop_reason = stop_reason(out);
        }
    })
    .await?;
    for (choice, text) in choices.iter_mut().zip(texts) {
        let (content, calls) =
            if choice.finish_reason == Some("stop") { tools::extract(mode, &text) } else { (Some(text), Vec::new()) };
        if !calls.is_empty() {
            choice.finish_reason = Some("tool_calls");
        }
        choice.message.content = content;
        choice.message.tool_calls = tool_calls_out(calls, false);
    }
    Ok(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage,
        prompt_token_ids,
        prompt_logprobs,
    })
}

/// vLLM's `/tokenize`. A text with more tokens than the model's context is refused (found without
/// tokenizing all of it): no request could use it.
pub async fn tokenize(state: &Arc<AppState>, req: TokenizeRequest) -> Result<Response<ResponseBody>, ApiError> {
    let loaded = state.ready()?;
    state.check_model(req.model.as_deref())?;
    let context = PromptContext { max_model_len: loaded.model.max_model_len, truncating: false };
    let tok = loaded.tokenizer.clone();
    let (req, tokens) = off_runtime(state, move || {
        let tokens = match (&req.prompt, &req.messages) {
            (Some(prompt), None) => context.encode(&tok, prompt, req.add_special_tokens.unwrap_or(true), "prompt")?,
            (None, Some(messages)) => {
                let text = render_chat(
                    &tok,
                    messages,
                    req.add_generation_prompt.unwrap_or(true),
                    req.continue_final_message,
                    req.tools.as_ref(),
                    req.chat_template_kwargs.as_ref(),
                )?;
                context.encode(&tok, &text, req.add_special_tokens.unwrap_or(false), "messages")?
            }
            _ => return Err(ApiError::bad_request("give exactly one of prompt or messages", Some("prompt"))),
        };
        Ok((req, tokens))
    })
    .await??;
    let tok = &loaded.tokenizer;
    let token_strs =
        req.return_token_strs.then(|| tokens.iter().map(|&t| tok.id_to_token(t).unwrap_or_default()).collect());
    let response =
        TokenizeResponse { count: tokens.len(), max_model_len: loaded.model.max_model_len, tokens, token_strs };
    Ok(json_response(StatusCode::OK, &response))
}

pub fn detokenize(state: &AppState, req: DetokenizeRequest) -> Result<Response<ResponseBody>, ApiError> {
    let loaded = state.ready()?;
    state.check_model(req.model.as_deref())?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= loaded.limits.vocab_size) {
        return Err(ApiError::bad_request(
            format!("token id {bad} is outside the vocabulary of {}", loaded.limits.vocab_size),
            Some("tokens"),
        ));
    }
    Ok(json_response(StatusCode::OK, &DetokenizeResponse { prompt: loaded.tokenizer.decode(&req.tokens, false) }))
}
