//! `pagoda generate`: run prompts through the engine on this machine and print the completions.
//! For people trying a model and for tests that want the engine without HTTP.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::EngineArgs;
use crate::engine::{EngineRequest, MaxTokens, RequestId, RequestOutput, SamplingParams};
use crate::launch::load_engine;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// A prompt; repeat the flag to run several prompts as one batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,

    /// Treat each prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,

    /// Most tokens to generate per completion.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 (the default here) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,

    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,

    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,

    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,

    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Stop at this string (repeatable); it is not included in the output.
    #[arg(long)]
    pub stop: Vec<String>,

    /// Also report the logprobs of each token and this many alternatives (JSON output).
    #[arg(long)]
    pub logprobs: Option<usize>,

    /// Print plain text, or one JSON object per completion.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = load_engine(&args.engine.to_options()?)?;
    let mut engine = loaded.engine;
    let params = sampling_params(&args);
    for (idx, prompt) in args.prompt.iter().enumerate() {
        let ids = prompt_ids(engine.tokenizer(), prompt, args.chat)?;
        let request = EngineRequest {
            id: RequestId(format!("{idx:06}")),
            prompt_token_ids: ids,
            params: params.clone(),
            arrival: Instant::now(),
        };
        let request = request.validate(&engine.limits()).with_context(|| format!("prompt {idx}"))?;
        engine.add_request(request).with_context(|| format!("prompt {idx}"))?;
    }

    let start = Instant::now();
    let stream = args.output == OutputFormat::Text && args.prompt.len() == 1 && args.n == 1;
    let mut stdout = std::io::stdout().lock();
    let mut done: Vec<RequestOutput> = Vec::new();
    let mut partial: std::collections::HashMap<(RequestId, usize), RequestOutput> = Default::default();
    while engine.has_unfinished() {
        for out in engine.step()? {
            if stream {
                stdout.write_all(out.text.as_bytes())?;
                stdout.flush()?;
            }
            let key = (out.request_id.clone(), out.index);
            let finished = out.finished();
            RequestOutput::gather(&mut partial, out);
            if finished {
                done.extend(partial.remove(&key));
            }
        }
    }
    done.sort_by(|a, b| (&a.request_id, a.index).cmp(&(&b.request_id, b.index)));
    let num_tokens: usize = done.iter().map(|c| c.token_ids.len()).sum();
    tracing::info!(num_tokens, seconds = start.elapsed().as_secs_f64(), "generation finished");

    if stream {
        writeln!(stdout)?;
        return Ok(());
    }
    for output in &done {
        write_output(&mut stdout, args.output, output)?;
    }
    Ok(())
}

fn sampling_params(args: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        n: args.n,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        // --seed (an engine flag) seeds every prompt alike: the same seed and prompt give the same
        // output.
        seed: args.engine.seed,
        max_tokens: MaxTokens::Exact(args.max_tokens),
        ignore_eos: args.ignore_eos,
        stop: args.stop.clone(),
        logprobs: args.logprobs,
        ..SamplingParams::default()
    }
}

/// A prompt's token ids: as given, or (`--chat`) as the one user message of a chat.
fn prompt_ids(tokenizer: &Tokenizer, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
    if !chat {
        return Ok(tokenizer.encode(prompt, true)?);
    }
    let template = tokenizer
        .chat_template()
        .context("--chat: the model has no chat template (tokenizer_config.json or chat_template.jinja)")?;
    let messages = serde_json::json!([{"role": "user", "content": prompt}]);
    let text = template.render(&messages, true, &serde_json::Map::new())?;
    Ok(tokenizer.encode(&text, false)?)
}

/// One finished sequence, as text with a header line or as a JSON line.
fn write_output(out: &mut impl Write, format: OutputFormat, c: &RequestOutput) -> anyhow::Result<()> {
    let prompt_idx = c.request_id.0.parse::<usize>().unwrap_or(0);
    match format {
        OutputFormat::Text => {
            let reason = c.finish_reason.map_or("none", |r| r.as_str());
            writeln!(out, "--- prompt {prompt_idx} completion {} (finish_reason: {reason})", c.index)?;
            writeln!(out, "{}", c.text)?;
        }
        OutputFormat::Json => {
            let logprobs: Vec<serde_json::Value> = c
                .logprobs
                .iter()
                .map(|lp| serde_json::json!({"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}))
                .collect();
            let line = serde_json::json!({
                "prompt_index": prompt_idx,
                "index": c.index,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason.map(|r| r.as_str()),
                "num_prompt_tokens": c.num_prompt_tokens,
                "logprobs": if c.logprobs.is_empty() { serde_json::Value::Null } else { logprobs.into() },
            });
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
