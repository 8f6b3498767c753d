//! `pagoda bench serve`: a load generator for any OpenAI-compatible server (Pagoda, vLLM,
//! llama.cpp's `llama-server`, …), reporting what vLLM's `vllm bench serve` reports.
//!
//! Requests stream; token counts come only from the server's `usage` (asked for with
//! `stream_options.include_usage`), never from counting chunks, and a response without one fails.
//! Prompts are text: random common words after a random tag of their own, so no
//! prefix cache helps, within a run or across runs. Their lengths in tokens are approximate (a
//! word is about one token); the report uses the server's counts.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng, TryRngCore};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load an OpenAI-compatible server with streaming requests and report throughput and
    /// latency (TTFT, TPOT, ITL, end to end), as vLLM's `bench serve` does.
    Serve(ServeBenchArgs),
}

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,

    /// The API path: /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,

    /// The model name to send (default: the first model `/v1/models` lists).
    #[arg(long)]
    pub model: Option<String>,

    /// Bearer token, if the server wants one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Requests to send.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub num_prompts: u32,

    /// Requests per second, arriving as a Poisson process; `inf` sends them all at once (within
    /// --max-concurrency).
    #[arg(long, default_value = "inf", value_parser = parse_rate)]
    pub request_rate: f64,

    /// Most requests in flight at once (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,

    /// `random`: lengths around --random-input-len / --random-output-len; `chat`: a built-in
    /// chat-like mix (log-normal lengths: prompts of median 256 tokens within 16..4096, outputs of
    /// median 128 within 8..1024).
    #[arg(long, value_enum, default_value_t = Dataset::Random)]
    pub dataset_name: Dataset,

    /// Prompt length in tokens (approximate: the server's count is reported).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub random_input_len: u32,

    /// Output length in tokens (`max_tokens`; exact with --ignore-eos).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub random_output_len: u32,

    /// Lengths are drawn uniformly within ± this share of the lengths above (0: fixed).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    pub random_range_ratio: f64,

    /// Seeds the lengths, the words and the arrival times (the unique prefixes stay unique).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Ask the server to ignore end-of-sequence tokens, so every request generates its
    /// `max_tokens` (vLLM's and llama.cpp's `ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataset {
    Random,
    Chat,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    if s == "inf" {
        return Ok(f64::INFINITY);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("'{s}' is not a request rate (a number of requests per second above 0, or inf)")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!("'{s}' is not a range ratio (a number in [0, 1))")),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchCommand::Serve(args) = args.command;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(serve(&args))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json())? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(report.completed > 0, "no request succeeded: {}", report.errors.join("; "));
    Ok(())
}

/// One request to send.
struct Planned {
    prompt: String,
    max_tokens: u32,
    /// When to send it, from the start of the run.
    at: Duration,
}

/// What one request measured.
#[derive(Default)]
struct Measured {
    ttft: Option<f64>,
    e2e: f64,
    /// Gaps between successive chunks that carried output, in seconds.
    itl: Vec<f64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    error: Option<String>,
}

const WORDS: [&str; 48] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
];

fn plan(args: &ServeBenchArgs) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    // Each prompt opens with its own random tag, from the OS rather than the seed: no two prompts
    // share a first KV block, in this run or in another with the same seed.
    let mut os = [0u8; 8];
    rand_core::OsRng.try_fill_bytes(&mut os).ok();
    let mut tags = ChaCha8Rng::seed_from_u64(u64::from_le_bytes(os));
    let ranged = |len: u32, u: f64| -> u32 {
        let r = args.random_range_ratio;
        let lo = (len as f64 * (1.0 - r)).round().max(1.0);
        let hi = (len as f64 * (1.0 + r)).round().max(lo);
        (lo + (hi - lo) * u).round() as u32
    };
    let log_normal = |median: f64, sigma: f64, lo: f64, hi: f64, u1: f64, u2: f64| -> u32 {
        // Box–Muller.
        let z = (-2.0 * u1.max(1e-12).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (median * (sigma * z).exp()).clamp(lo, hi).round() as u32
    };
    let mut at = 0.0;
    (0..args.num_prompts)
        .map(|_| {
            let (input, output) = match args.dataset_name {
                Dataset::Random => (ranged(args.random_input_len, unit()), ranged(args.random_output_len, unit())),
                Dataset::Chat => (
                    log_normal(256.0, 1.0, 16.0, 4096.0, unit(), unit()),
                    log_normal(128.0, 0.8, 8.0, 1024.0, unit(), unit()),
                ),
            };
            // The prefix is about 8 tokens; each word about one.
            let mut prompt = format!("{:012x}: ", tags.next_u64() >> 16);
            for _ in 0..input.saturating_sub(8).max(1) {
                prompt.push_str(WORDS[(unit() * WORDS.len() as f64) as usize % WORDS.len()]);
                prompt.push(' ');
            }
            let planned = Planned { prompt, max_tokens: output, at: Duration::from_secs_f64(at) };
            if args.request_rate.is_finite() {
                at += -(1.0 - unit()).ln() / args.request_rate;
            }
            planned
        })
        .collect()
}

async fn serve(args: &ServeBenchArgs) -> anyhow::Result<Report> {
    let base = args.base_url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(args.request_timeout))
        // A new connection per request, as vLLM's benchmark makes: a pooled one the server has just
        // closed for idling fails the request that reuses it (seen with llama-server).
        .pool_max_idle_per_host(0)
        .build()?;
    let auth = |r: reqwest::RequestBuilder| match &args.api_key {
        Some(key) => r.bearer_auth(key),
        None => r,
    };
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let url = format!("{base}/v1/models");
            let resp = auth(client.get(&url)).send().await.with_context(|| format!("GET {url}"))?;
            let status = resp.status();
            let body: Value = serde_json::from_slice(&resp.bytes().await?).with_context(|| format!("GET {url}"))?;
            body["data"][0]["id"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("GET {url} ({status}) named no model; pass --model (the answer was {body})"))?
        }
    };
    let chat = args.endpoint.contains("chat");
    let url = format!("{base}{}", args.endpoint);
    let planned = plan(args);
    let progress = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(planned.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(
        args.max_concurrency.map_or(tokio::sync::Semaphore::MAX_PERMITS, |c| c as usize),
    ));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(planned.len());
    for p in planned {
        tokio::time::sleep_until((start + p.at).into()).await;
        let permit = limit.clone().acquire_owned().await?;
        let mut body = json!({
            "model": model,
            "max_tokens": p.max_tokens,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if chat {
            body["messages"] = json!([{"role": "user", "content": p.prompt}]);
        } else {
            body["prompt"] = json!(p.prompt);
        }
        if args.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let request = auth(client.post(&url)).header("content-type", "application/json").body(body.to_string());
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let measured = one_request(request).await;
            drop(permit);
            progress.inc(1);
            measured
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await?);
    }
    let duration = start.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok(Report::new(args, &model, duration, results))
}

async fn one_request(request: reqwest::RequestBuilder) -> Measured {
    let start = Instant::now();
    let mut m = Measured::default();
    let result: anyhow::Result<()> = async {
        let mut resp = request.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            anyhow::bail!("HTTP {status}: {}", String::from_utf8_lossy(&body).chars().take(300).collect::<String>());
        }
        let mut buffer = Vec::<u8>::new();
        let mut last = None;
        let mut usage = None;
        let mut done = false;
        while let Some(chunk) = resp.chunk().await? {
            let now = start.elapsed().as_secs_f64();
            buffer.extend_from_slice(&chunk);
            // Server-sent events end with a blank line (LF or CRLF).
            while let Some((end, sep)) = event_end(&buffer) {
                let event: Vec<u8> = buffer.drain(..end + sep).collect();
                for line in String::from_utf8_lossy(&event[..end]).lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let value: Value =
                        serde_json::from_str(data).with_context(|| format!("a chunk is not JSON: {data}"))?;
                    if let Some(error) = value.get("error") {
                        anyhow::bail!("the stream reported an error: {error}");
                    }
                    let has_output = value["choices"].as_array().is_some_and(|choices| {
                        choices.iter().any(|c| {
                            let text = c["text"].as_str().or(c["delta"]["content"].as_str());
                            text.is_some_and(|t| !t.is_empty())
                        })
                    });
                    if has_output {
                        match last {
                            None => m.ttft = Some(now),
                            Some(previous) => m.itl.push(now - previous),
                        }
                        last = Some(now);
                    }
                    if value.get("usage").is_some_and(|u| !u.is_null()) {
                        usage = Some(value["usage"].clone());
                    }
                }
            }
        }
        let usage =
            usage.context("the response carried no usage (does the server honour stream_options.include_usage?)")?;
        anyhow::ensure!(done, "the stream ended without its final [DONE]");
        m.prompt_tokens = usage["prompt_tokens"].as_u64().context("usage without prompt_tokens")?;
        m.completion_tokens = usage["completion_tokens"].as_u64().context("usage without completion_tokens")?;
        Ok(())
    }
    .await;
    m.e2e = start.elapsed().as_secs_f64();
    if let Err(e) = result {
        m.error = Some(format!("{e:#}"));
    }
    m
}

/// Where the first event in `buffer` ends, and the length of its separator.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Mean, median, p90 and p99 of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    mean: f64,
    median: f64,
    p90: f64,
    p99: f64,
}

impl Stats {
    fn of(seconds: &[f64]) -> Stats {
        if seconds.is_empty() {
            return Stats::default();
        }
        let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            // Linear interpolation between the closest ranks (numpy's default).
            let rank = p / 100.0 * (v.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
        };
        Stats { mean: v.iter().sum::<f64>() / v.len() as f64, median: pct(50.0), p90: pct(90.0), p99: pct(99.0) }
    }
}

struct Report {
    endpoint: String,
    model: String,
    num_prompts: usize,
    request_rate: f64,
    max_concurrency: Option<u32>,
    completed: usize,
    failed: usize,
    duration: f64,
    total_input_tokens: u64,
    total_output_tokens: u64,
    ttft: Stats,
    tpot: Stats,
    itl: Stats,
    e2el: Stats,
    /// Distinct error messages, at most 5.
    errors: Vec<String>,
}

impl Report {
    fn new(args: &ServeBenchArgs, model: &str, duration: f64, results: Vec<Measured>) -> Report {
        let ok: Vec<&Measured> = results.iter().filter(|m| m.error.is_none()).collect();
        let mut errors: Vec<String> = Vec::new();
        for e in results.iter().filter_map(|m| m.error.clone()) {
            if errors.len() < 5 && !errors.contains(&e) {
                errors.push(e);
            }
        }
        let ttfts: Vec<f64> = ok.iter().filter_map(|m| m.ttft).collect();
        // Time per output token after the first, per request (vLLM's TPOT).
        let tpots: Vec<f64> = ok
            .iter()
            .filter(|m| m.completion_tokens > 1)
            .filter_map(|m| m.ttft.map(|t| (m.e2e - t) / (m.completion_tokens - 1) as f64))
            .collect();
        let itls: Vec<f64> = ok.iter().flat_map(|m| m.itl.iter().copied()).collect();
        let e2es: Vec<f64> = ok.iter().map(|m| m.e2e).collect();
        Report {
            endpoint: args.endpoint.clone(),
            model: model.to_string(),
            num_prompts: results.len(),
            request_rate: args.request_rate,
            max_concurrency: args.max_concurrency,
            completed: ok.len(),
            failed: results.len() - ok.len(),
            duration,
            total_input_tokens: ok.iter().map(|m| m.prompt_tokens).sum(),
            total_output_tokens: ok.iter().map(|m| m.completion_tokens).sum(),
            ttft: Stats::of(&ttfts),
            tpot: Stats::of(&tpots),
            itl: Stats::of(&itls),
            e2el: Stats::of(&e2es),
            errors,
        }
    }

    fn throughputs(&self) -> (f64, f64, f64) {
        let d = self.duration.max(1e-9);
        (
            self.completed as f64 / d,
            self.total_output_tokens as f64 / d,
            (self.total_input_tokens + self.total_output_tokens) as f64 / d,
        )
    }

    fn table(&self) -> String {
        let (requests, output, total) = self.throughputs();
        let mut t = String::new();
        let mut line = |label: &str, value: String| t.push_str(&format!("{label:<40} {value:>12}\n"));
        line("Successful requests:", self.completed.to_string());
        line("Failed requests:", self.failed.to_string());
        if let Some(c) = self.max_concurrency {
            line("Maximum request concurrency:", c.to_string());
        }
        line("Benchmark duration (s):", format!("{:.2}", self.duration));
        line("Total input tokens:", self.total_input_tokens.to_string());
        line("Total generated tokens:", self.total_output_tokens.to_string());
        line("Request throughput (req/s):", format!("{requests:.2}"));
        line("Output token throughput (tok/s):", format!("{output:.2}"));
        line("Total token throughput (tok/s):", format!("{total:.2}"));
        for (title, short, s) in [
            ("Time to First Token", "TTFT", self.ttft),
            ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot),
            ("Inter-token Latency", "ITL", self.itl),
            ("End-to-end Latency", "E2EL", self.e2el),
        ] {
            t.push_str(&format!("{:-^53}\n", title));
            for (name, v) in [("Mean", s.mean), ("Median", s.median), ("P90", s.p90), ("P99", s.p99)] {
                t.push_str(&format!("{:<40} {:>12.2}\n", format!("{name} {short} (ms):"), v));
            }
        }
        t.push_str(&"=".repeat(53));
        t.push('\n');
        for e in &self.errors {
            t.push_str(&format!("error: {e}\n"));
        }
        t
    }

    fn json(&self) -> Value {
        let (requests, output, total) = self.throughputs();
        let mut v = json!({
            "endpoint": self.endpoint,
            "model_id": self.model,
            "num_prompts": self.num_prompts,
            "request_rate": if self.request_rate.is_finite() { json!(self.request_rate) } else { json!("inf") },
            "max_concurrency": self.max_concurrency,
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": requests,
            "output_throughput": output,
            "total_token_throughput": total,
            "errors": self.errors,
        });
        for (key, s) in [("ttft", self.ttft), ("tpot", self.tpot), ("itl", self.itl), ("e2el", self.e2el)] {
            v[format!("mean_{key}_ms")] = json!(s.mean);
            v[format!("median_{key}_ms")] = json!(s.median);
            v[format!("p90_{key}_ms")] = json!(s.p90);
            v[format!("p99_{key}_ms")] = json!(s.p99);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let s = Stats::of(&[0.001, 0.002, 0.003, 0.004]);
        assert!((s.mean - 2.5).abs() < 1e-9 && (s.median - 2.5).abs() < 1e-9);
        assert!((s.p90 - 3.7).abs() < 1e-9 && (s.p99 - 3.97).abs() < 1e-9);
        let one = Stats::of(&[0.005]);
        assert!(one.p99 == 5.0 && one.median == 5.0);
    }

    #[test]
    fn events_split_on_blank_lines_of_either_kind() {
        assert_eq!(event_end(b"data: x\n\ndata: y"), Some((7, 2)));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some((7, 4)));
        assert_eq!(event_end(b"data: x\n"), None);
    }
}
