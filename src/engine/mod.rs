//! The engine: requests in, tokens and text out, one step at a time.
//!
//! [`Engine`] owns the scheduler (and through it the KV-cache bookkeeping), the model executor and
//! each sequence's sampling state. A step asks the scheduler what to run, lays the tokens out as
//! one batch, runs the model, samples a token for every sequence that reached the end of its known
//! tokens, and checks stop conditions. It knows nothing of HTTP; one thread drives it and everyone
//! else talks to that thread through [`driver::EngineHandle`].

pub mod driver;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stop;
pub mod structured;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

pub use self::request::{
    EngineRequest, FinishReason, MaxTokens, RequestError, RequestId, RequestLimits, RequestOutput, SamplingParams,
    SeqTimings, StopReason, TokenLogprobs, ValidRequest,
};
use self::sampler::SamplingContext;
use self::scheduler::{Scheduler, SchedulerConfig};
use self::stop::StopStrings;
use self::structured::{Grammar, Grammars};
use crate::kv_cache::{KvCacheManager, PrefixCacheStats, Reuse, SeqId};
use crate::model::Executor;
pub use crate::model::config::GenerationDefaults;
use crate::model::{BackendError, BatchLayout, RowSampling, SeqLayout, cache_slot};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// Engine limits; the KV-cache geometry comes from the executor.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Longest sequence, prompt and output together.
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    /// Requests without a seed of their own draw one from a generator seeded with this, in the
    /// order they reach the engine (`--seed`); without it, from the OS.
    pub seed: Option<u64>,
    /// Most top logprobs a request may ask for.
    pub max_logprobs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model execution failed: {0}")]
    Execution(#[from] BackendError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// Counters and gauges for metrics and logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_cache_usage: f64,
    pub prefix_cache: PrefixCacheStats,
    pub num_preemptions: u64,
    /// Steps run so far, and the tokens the last one computed (prompt tokens not found in the
    /// prefix cache, and one per decoding sequence).
    pub num_steps: u64,
    pub last_step_tokens: usize,
    /// KV-cache blocks ever written (on the CPU, the cache's memory in use by the process).
    pub kv_blocks_touched: usize,
}

/// Per-sequence state the engine keeps beside the scheduler's tokens.
struct SeqRuntime {
    request_id: RequestId,
    index: usize,
    params: Arc<SamplingParams>,
    /// EOS (unless ignored) and the request's stop token ids, masked before `min_tokens`.
    stop_token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    max_tokens: usize,
    rng: ChaCha8Rng,
    detokenizer: IncrementalDetokenizer,
    stop_strings: StopStrings,
    num_cached_tokens: usize,
    num_preemptions: usize,
    timings: SeqTimings,
    /// A structured output's place in its grammar.
    grammar: Option<Grammar>,
    /// With `prompt_logprobs`, until the first token's output carries them: those of the prompt
    /// positions computed so far (entry `p` is for prompt token `p + 1`, predicted at position
    /// `p`), so that a prefill recomputed after a preemption does not repeat them.
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

pub struct Engine {
    config: EngineConfig,
    scheduler: Scheduler,
    executor: Box<dyn Executor>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    vocab_size: usize,
    grammars: Arc<Grammars>,
    /// Seeds for requests without their own (`EngineConfig::seed`).
    seeds: Option<ChaCha8Rng>,
    seqs: HashMap<SeqId, SeqRuntime>,
    requests: HashMap<RequestId, Vec<SeqId>>,
    next_seq: u64,
    num_steps: u64,
    last_step_tokens: usize,
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        executor: Box<dyn Executor>,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
    ) -> Result<Engine, EngineError> {
        let shape = executor.kv_cache_shape();
        let capacity = shape.num_blocks * shape.block_size;
        if capacity < config.max_model_len {
            return Err(EngineError::Config(format!(
                "the KV cache holds {capacity} tokens ({} blocks of {}), fewer than max_model_len {}: \
                 give it more memory or lower --max-model-len",
                shape.num_blocks, shape.block_size, config.max_model_len
            )));
        }
        if config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 || config.max_model_len == 0 {
            return Err(EngineError::Config(
                "max_num_seqs, max_num_batched_tokens and max_model_len must be positive".into(),
            ));
        }
        if !config.enable_chunked_prefill && config.max_num_batched_tokens < config.max_model_len {
            return Err(EngineError::Config(format!(
                "without chunked prefill max_num_batched_tokens ({}) must be at least max_model_len ({})",
                config.max_num_batched_tokens, config.max_model_len
            )));
        }
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
                enable_chunked_prefill: config.enable_chunked_prefill,
            },
            KvCacheManager::new(shape.num_blocks, shape.block_size, config.enable_prefix_caching).with_reuse(
                // Host memory grows with the blocks ever written: reuse those first. A GPU's is
                // all committed: keep cached prefixes while there is room.
                if executor.kv_cache_commits_on_write() { Reuse::TouchedFirst } else { Reuse::UntouchedFirst },
            ),
        );
        let vocab_size = executor.vocab_size();
        let grammars = Arc::new(Grammars::new(tokenizer.clone(), vocab_size, eos_token_ids.clone()));
        Ok(Engine {
            config,
            scheduler,
            executor,
            tokenizer,
            eos_token_ids,
            vocab_size,
            grammars,
            seeds: config.seed.map(ChaCha8Rng::seed_from_u64),
            seqs: HashMap::new(),
            requests: HashMap::new(),
            next_seq: 0,
            num_steps: 0,
            last_step_tokens: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// What this engine's model allows a request (for [`EngineRequest::validate`]).
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            vocab_size: self.vocab_size,
            max_model_len: self.config.max_model_len,
            max_logprobs: self.config.max_logprobs,
            grammars: Some(self.grammars.clone()),
        }
    }

    /// Queues a checked request: `params.n` sequences of the same prompt. Only a request id
    /// already running is refused.
    pub fn add_request(&mut self, request: ValidRequest) -> Result<(), RequestError> {
        let (request, max_tokens, grammar) = request.into_parts();
        if self.requests.contains_key(&request.id) {
            return Err(RequestError::DuplicateId(request.id));
        }
        let params = Arc::new(request.params);
        let seed = params.seed.or_else(|| self.seeds.as_mut().map(|s| s.next_u64()));
        let mut ids = Vec::with_capacity(params.n);
        for index in 0..params.n {
            let seq = SeqId(self.next_seq);
            self.next_seq += 1;
            let rng = match seed {
                Some(seed) => ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64)),
                None => ChaCha8Rng::from_os_rng(),
            };
            self.seqs.insert(
                seq,
                SeqRuntime {
                    request_id: request.id.clone(),
                    index,
                    params: params.clone(),
                    stop_token_ids: stop_tokens(&params, &self.eos_token_ids).collect(),
                    num_prompt_tokens: request.prompt_token_ids.len(),
                    max_tokens,
                    rng,
                    detokenizer: IncrementalDetokenizer::new(&request.prompt_token_ids, params.skip_special_tokens),
                    stop_strings: StopStrings::new(params.stop.clone(), params.include_stop_str_in_output),
                    num_cached_tokens: 0,
                    num_preemptions: 0,
                    timings: SeqTimings {
                        arrival: request.arrival,
                        first_scheduled: None,
                        first_token: None,
                        last_token: None,
                    },
                    grammar: grammar.clone(),
                    prompt_logprobs: params
                        .prompt_logprobs
                        .map(|_| Vec::with_capacity(request.prompt_token_ids.len() - 1)),
                },
            );
            // Every prompt position's logits are needed: a prefix-cache hit would skip some.
            if params.prompt_logprobs.is_some() {
                self.scheduler.add_without_prefix_cache(seq, request.prompt_token_ids.clone());
            } else {
                self.scheduler.add(seq, request.prompt_token_ids.clone());
            }
            ids.push(seq);
        }
        self.requests.insert(request.id, ids);
        Ok(())
    }

    /// Cancels a request; returns an `Abort` output for each of its unfinished sequences.
    pub fn abort_request(&mut self, id: &RequestId) -> Vec<RequestOutput> {
        let Some(seqs) = self.requests.remove(id) else { return Vec::new() };
        seqs.into_iter()
            .filter_map(|seq| {
                let runtime = self.seqs.remove(&seq)?;
                let num_output_tokens = self.scheduler.tokens(seq).len() - runtime.num_prompt_tokens;
                self.scheduler.finish(seq);
                Some(aborted(&runtime, num_output_tokens))
            })
            .collect()
    }

    /// Ends one sequence that cannot go on (its grammar failed), with `error` on its output.
    fn fail(&mut self, seq: SeqId, error: String) -> RequestOutput {
        let num_tokens = self.scheduler.tokens(seq).len();
        let runtime = self.seqs.get(&seq).expect("sequence is live");
        let mut output = aborted(runtime, num_tokens - runtime.num_prompt_tokens);
        output.error = Some(error);
        self.finish(seq);
        output
    }

    /// Cancels everything (shutdown, or after a failed step).
    pub fn abort_all(&mut self) -> Vec<RequestOutput> {
        let ids: Vec<RequestId> = self.requests.keys().cloned().collect();
        ids.iter().flat_map(|id| self.abort_request(id)).collect()
    }

    /// After a failed step: cancels everything, each output carrying `error`, and forgets cached
    /// prefixes, since blocks of that step were registered before their KV was written.
    pub fn recover_from_failed_step(&mut self, error: &str) -> Vec<RequestOutput> {
        let mut outputs = self.abort_all();
        for out in &mut outputs {
            out.error = Some(error.to_string());
        }
        self.scheduler.reset_prefix_cache();
        outputs
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Sequences added and not yet scheduled once (the queue a server limits).
    pub fn num_unstarted(&self) -> usize {
        self.seqs.values().filter(|r| r.timings.first_scheduled.is_none()).count()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: self.scheduler.kv_cache_usage(),
            prefix_cache: self.scheduler.prefix_cache_stats(),
            num_preemptions: self.scheduler.num_preemptions(),
            num_steps: self.num_steps,
            last_step_tokens: self.last_step_tokens,
            kv_blocks_touched: self.scheduler.num_touched_blocks(),
        }
    }

    /// Runs one step. Returns one output per sequence that produced a token or finished.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let plan = self.scheduler.schedule();
        for seq in &plan.preempted {
            if let Some(runtime) = self.seqs.get_mut(seq) {
                runtime.num_preemptions += 1;
            }
        }
        if plan.scheduled.is_empty() {
            return Ok(Vec::new());
        }
        let now = Instant::now();
        let block_size = self.scheduler.block_size();
        let mut layout = BatchLayout::default();
        let mut logits_rows = Vec::new();
        let mut sampled = Vec::new();
        // Every row is sampled where its logits are, by the rule its parameters give.
        let mut rules = Vec::new();
        // Prompt positions whose logprobs are asked for: their rows follow the sampled ones.
        let mut prompt_rows: Vec<(u32, RowSampling)> = Vec::new();
        let mut prompt_seqs = Vec::new();
        for s in &plan.scheduled {
            let runtime = self.seqs.get_mut(&s.seq).expect("scheduled sequences have runtime state");
            if runtime.timings.first_scheduled.is_none() {
                runtime.timings.first_scheduled = Some(now);
                runtime.num_cached_tokens = s.num_cached_tokens;
            }
            let block_table: Vec<u32> = self.scheduler.block_table(s.seq).iter().map(|b| b.0).collect();
            let query_start = layout.token_ids.len();
            let range = s.num_computed_tokens..s.num_computed_tokens + s.num_new_tokens;
            layout.token_ids.extend_from_slice(&self.scheduler.tokens(s.seq)[range.clone()]);
            for pos in range {
                layout.positions.push(pos as u32);
                layout.slot_mapping.push(cache_slot(&block_table, pos, block_size));
            }
            layout.seqs.push(SeqLayout {
                query_start,
                query_len: s.num_new_tokens,
                context_len: s.num_computed_tokens + s.num_new_tokens,
                block_table,
            });
            if let (Some(done), Some(top)) = (&runtime.prompt_logprobs, runtime.params.prompt_logprobs) {
                // Position `p`'s logits give prompt token `p + 1`'s logprob; the last prompt
                // position's give the first sampled token instead.
                let tokens = self.scheduler.tokens(s.seq);
                let first = s.num_computed_tokens.max(done.len());
                let end = (s.num_computed_tokens + s.num_new_tokens).min(runtime.num_prompt_tokens - 1);
                debug_assert!(s.num_computed_tokens <= done.len(), "prompt positions are computed in order");
                for pos in first..end {
                    let row = (query_start + pos - s.num_computed_tokens) as u32;
                    prompt_rows.push((row, RowSampling::forced(tokens[pos + 1], top as u32)));
                    prompt_seqs.push(s.seq);
                }
            }
            if self.scheduler.needs_sample(s) {
                logits_rows.push((query_start + s.num_new_tokens - 1) as u32);
                sampled.push(s.seq);
                let tokens = self.scheduler.tokens(s.seq);
                rules.push(sampler::row_rule(
                    &runtime.params,
                    &SamplingContext {
                        prompt_ids: &tokens[..runtime.num_prompt_tokens],
                        output_ids: &tokens[runtime.num_prompt_tokens..],
                        stop_token_ids: &runtime.stop_token_ids,
                        vocab_size: self.vocab_size,
                    },
                    &mut runtime.rng,
                ));
            }
        }
        let mut grammar_errors = self.apply_grammar_masks(&sampled, &mut rules);
        for (row, rule) in prompt_rows {
            logits_rows.push(row);
            rules.push(rule);
        }
        self.num_steps += 1;
        self.last_step_tokens = layout.token_ids.len();
        let mut picked = self.executor.execute_step(&layout, &logits_rows, &rules)?;
        if picked.len() != rules.len() {
            return Err(
                BackendError::Batch("the executor returned another number of rows than were sampled".into()).into()
            );
        }
        self.scheduler.complete_step(&plan);
        for (seq, row) in prompt_seqs.into_iter().zip(picked.split_off(sampled.len())) {
            let runtime = self.seqs.get_mut(&seq).expect("scheduled sequences have runtime state");
            if let (Some(done), (_, Some(logprobs))) = (&mut runtime.prompt_logprobs, sampler::token_and_logprobs(row))
            {
                done.push(logprobs);
            }
        }

        let now = Instant::now();
        let mut outputs = Vec::with_capacity(sampled.len());
        for (seq, row) in sampled.into_iter().zip(picked) {
            if let Some(error) = grammar_errors.remove(&seq) {
                outputs.push(self.fail(seq, error));
                continue;
            }
            let runtime = self.seqs.get_mut(&seq).expect("sampled sequences have runtime state");
            let (token, logprobs) = sampler::token_and_logprobs(row);
            self.scheduler.append_token(seq, token);
            runtime.timings.first_token.get_or_insert(now);
            runtime.timings.last_token = Some(now);
            let output = self.process_token(seq, token, logprobs);
            if output.finished() {
                self.finish(seq);
            } else if let Some(grammar) = &mut self.seqs.get_mut(&seq).expect("sequence is live").grammar
                && let Err(e) = grammar.advance(token)
            {
                // The token was sent; the error ends the sequence after it.
                outputs.push(output);
                outputs.push(self.fail(seq, e));
                continue;
            }
            outputs.push(output);
        }
        Ok(outputs)
    }

    /// Puts each structured output's token mask on its row's rule, computing the masks of the
    /// step's sequences in parallel. Returns the sequences whose grammar failed: their pick is
    /// dropped and they end with the error.
    fn apply_grammar_masks(&mut self, sampled: &[SeqId], rules: &mut [RowSampling]) -> HashMap<SeqId, String> {
        let row_of: HashMap<SeqId, usize> = sampled.iter().enumerate().map(|(row, &seq)| (seq, row)).collect();
        let mut work: Vec<(usize, &mut Grammar)> = self
            .seqs
            .iter_mut()
            .filter_map(|(seq, runtime)| Some((*row_of.get(seq)?, runtime.grammar.as_mut()?)))
            .collect();
        if work.is_empty() {
            return HashMap::new();
        }
        let masks: Vec<(usize, Result<Vec<u32>, String>)> =
            work.par_iter_mut().map(|(row, grammar)| (*row, grammar.mask())).collect();
        let mut errors = HashMap::new();
        for (row, mask) in masks {
            match mask {
                // With allowed_token_ids too, a token must pass both; if none does, the sequence
                // ends with that said rather than with a token neither allows.
                Ok(mask) => match &mut rules[row].allowed {
                    Some(allowed) => {
                        allowed.iter_mut().zip(&mask).for_each(|(a, m)| *a &= m);
                        if allowed.iter().all(|&w| w == 0) {
                            errors.insert(
                                sampled[row],
                                "allowed_token_ids and the structured output leave no token to generate".to_string(),
                            );
                        }
                    }
                    None => rules[row].allowed = Some(mask),
                },
                Err(e) => {
                    errors.insert(sampled[row], e);
                }
            }
        }
        errors
    }

    /// Detokenizes a new token and applies the stop conditions, in vLLM's order: nothing stops
    /// before `min_tokens`; then EOS, stop token ids, stop strings, and the length limits.
    fn process_token(&mut self, seq: SeqId, token: u32, logprobs: Option<TokenLogprobs>) -> RequestOutput {
        let num_tokens = self.scheduler.tokens(seq).len();
        let runtime = self.seqs.get_mut(&seq).expect("sequence is live");
        let params = &runtime.params;
        let num_output_tokens = num_tokens - runtime.num_prompt_tokens;
        let check_stops = num_output_tokens >= params.min_tokens;
        let is_eos = !params.ignore_eos && self.eos_token_ids.contains(&token);
        let is_stop_token = params.stop_token_ids.contains(&token);

        let mut text = String::new();
        let (mut finish_reason, mut stop_reason) = (None, None);
        if check_stops && (is_eos || is_stop_token) {
            // The stop token's own text is not part of the output.
            finish_reason = Some(FinishReason::Stop);
            stop_reason = if is_eos { None } else { Some(StopReason::Token(token)) };
        } else {
            let check = runtime.stop_strings.push(&runtime.detokenizer.push(&self.tokenizer, token), check_stops);
            text = check.released;
            if let Some(stop) = check.matched {
                finish_reason = Some(FinishReason::Stop);
                stop_reason = Some(StopReason::Text(stop));
            } else if num_output_tokens >= runtime.max_tokens || num_tokens >= self.config.max_model_len {
                finish_reason = Some(FinishReason::Length);
            }
        }
        if finish_reason.is_some() && !matches!(stop_reason, Some(StopReason::Text(_))) {
            // Release what was held back: an incomplete character, a possible stop-string start.
            let check = runtime.stop_strings.push(&runtime.detokenizer.flush(&self.tokenizer), check_stops);
            text.push_str(&check.released);
            match check.matched {
                Some(stop) => {
                    finish_reason = Some(FinishReason::Stop);
                    stop_reason = Some(StopReason::Text(stop));
                }
                None => text.push_str(&runtime.stop_strings.flush()),
            }
        }
        RequestOutput {
            token_ids: vec![token],
            text,
            logprobs: logprobs.into_iter().collect(),
            prompt_logprobs: runtime.prompt_logprobs.take(),
            finish_reason,
            stop_reason,
            ..sequence_output(runtime, num_output_tokens)
        }
    }

    fn finish(&mut self, seq: SeqId) {
        self.scheduler.finish(seq);
        if let Some(runtime) = self.seqs.remove(&seq)
            && let Some(siblings) = self.requests.get_mut(&runtime.request_id)
        {
            siblings.retain(|&s| s != seq);
            if siblings.is_empty() {
                self.requests.remove(&runtime.request_id);
            }
        }
    }

    /// Steps until every queued request has finished, gathering each sequence's whole output.
    /// For tools and tests; the server streams step outputs instead.
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let mut done: HashMap<(RequestId, usize), RequestOutput> = HashMap::new();
        while self.has_unfinished() {
            for out in self.step()? {
                RequestOutput::gather(&mut done, out);
            }
        }
        let mut list: Vec<RequestOutput> = done.into_values().collect();
        list.sort_by(|a, b| (&a.request_id, a.index).cmp(&(&b.request_id, b.index)));
        Ok(list)
    }
}

/// What a sequence's output says of the sequence itself, with no new token and no finish.
fn sequence_output(runtime: &SeqRuntime, num_output_tokens: usize) -> RequestOutput {
    RequestOutput {
        request_id: runtime.request_id.clone(),
        index: runtime.index,
        token_ids: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        prompt_logprobs: None,
        finish_reason: None,
        stop_reason: None,
        num_prompt_tokens: runtime.num_prompt_tokens,
        num_output_tokens,
        num_cached_tokens: runtime.num_cached_tokens,
        num_preemptions: runtime.num_preemptions,
        timings: runtime.timings,
        error: None,
    }
}

/// The output that ends a cancelled sequence: no new token.
fn aborted(runtime: &SeqRuntime, num_output_tokens: usize) -> RequestOutput {
    RequestOutput { finish_reason: Some(FinishReason::Abort), ..sequence_output(runtime, num_output_tokens) }
}

/// The tokens that end a sequence: EOS (unless ignored) and the request's stop token ids.
fn stop_tokens<'a>(params: &'a SamplingParams, eos: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    let eos: &[u32] = if params.ignore_eos { &[] } else { eos };
    eos.iter().chain(&params.stop_token_ids).copied()
}
