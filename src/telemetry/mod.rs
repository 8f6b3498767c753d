//! Prometheus metrics under vLLM's names (so its dashboards and autoscaling recipes work
//! unchanged), Pagoda's own `pagoda_*` info metrics, the GPUs' `pagoda_gpu_*` from NVML
//! ([`gpu`]), and cloud detection.
//!
//! Each server owns its recorder (no global state), registers every metric once, and updates the
//! handles directly: engine gauges, counters and latency histograms from the engine thread
//! through [`EngineMetrics`], which is an `EngineObserver`.

pub mod cloud;
pub mod gpu;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::engine::driver::EngineObserver;
use crate::engine::{EngineStats, FinishReason, RequestId, RequestOutput, ValidRequest};

pub use cloud::CloudInfo;

/// The version and the commit the binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("PAGODA_GIT_COMMIT");

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
/// Tokens one engine step computes (vLLM's fixed list).
const ITERATION_TOKEN_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const PARAMS_N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const PREEMPTION_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0];
const LATENCY_HISTOGRAMS: [(&str, &str); 5] = [
    ("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Time a request spent waiting before it was first scheduled, in seconds."),
    ("vllm:request_prefill_time_seconds", "Time from first scheduling to the first token, in seconds."),
    ("vllm:request_decode_time_seconds", "Time from the first to the last token, in seconds."),
    ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
];

/// 1, 2, 5, 10, 20, 50, ... up to `max`.
fn one_two_five_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exponent = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            let v = m * exponent;
            if v > max as f64 {
                return out;
            }
            out.push(v);
        }
        exponent *= 10.0;
    }
}

pub struct Telemetry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    model_name: String,
    gpus: gpu::GpuExporter,
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

impl Telemetry {
    pub fn new(model_name: &str, max_model_len: usize, cloud: &CloudInfo) -> Telemetry {
        let token_buckets = one_two_five_buckets(max_model_len.max(1));
        let mut builder = PrometheusBuilder::new().with_recommended_naming(true);
        let histograms: Vec<(&str, &[f64])> = vec![
            ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
            ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
            ("vllm:request_prompt_tokens", &token_buckets),
            ("vllm:request_generation_tokens", &token_buckets),
            ("vllm:request_time_per_output_token_seconds", ITL_BUCKETS),
            ("vllm:request_max_num_generation_tokens", &token_buckets),
            ("vllm:request_params_max_tokens", &token_buckets),
            ("vllm:request_params_n", PARAMS_N_BUCKETS),
            ("vllm:iteration_tokens_total", ITERATION_TOKEN_BUCKETS),
            ("vllm:request_num_preemptions", PREEMPTION_BUCKETS),
        ];
        for (name, buckets) in
            histograms.into_iter().chain(LATENCY_HISTOGRAMS.iter().map(|(n, _)| (*n, REQUEST_LATENCY_BUCKETS)))
        {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .expect("bucket lists are non-empty");
        }
        let recorder = Arc::new(builder.build_recorder());
        let handle = recorder.handle();
        let telemetry = Telemetry {
            recorder,
            handle,
            model_name: model_name.to_string(),
            gpus: gpu::GpuExporter::start(gpu::GpuMetrics::load()),
        };
        telemetry.describe();
        let info = |name: &'static str, labels: Vec<Label>| {
            telemetry.recorder.register_gauge(&Key::from_parts(name, labels), &metadata())
        };
        info("pagoda_build_info", vec![Label::new("version", VERSION), Label::new("git_commit", GIT_COMMIT)]).set(1.0);
        info(
            "pagoda_cloud_info",
            vec![Label::new("provider", cloud.provider), Label::new("instance_type", cloud.instance_type.clone())],
        )
        .set(1.0);
        telemetry
    }

    fn describe(&self) {
        let r = &self.recorder;
        let d = |name: &'static str| KeyName::from_const_str(name);
        let text = |s: &'static str| SharedString::const_str(s);
        r.describe_gauge(d("vllm:num_requests_running"), None, text("Number of requests running on the engine."));
        r.describe_gauge(d("vllm:num_requests_waiting"), None, text("Number of requests waiting to be scheduled."));
        r.describe_gauge(d("vllm:kv_cache_usage_perc"), None, text("KV-cache usage: 1 means every block is in use."));
        r.describe_counter(d("vllm:prefix_cache_queries"), None, text("Prompt tokens looked up in the prefix cache."));
        r.describe_counter(d("vllm:prefix_cache_hits"), None, text("Prompt tokens found in the prefix cache."));
        r.describe_counter(d("vllm:num_preemptions"), None, text("Cumulative number of preemptions."));
        r.describe_counter(d("vllm:prompt_tokens"), None, text("Number of prefill tokens processed."));
        r.describe_counter(d("vllm:generation_tokens"), None, text("Number of generation tokens processed."));
        r.describe_counter(d("vllm:request_success"), None, text("Count of finished requests by finish reason."));
        r.describe_histogram(
            d("vllm:time_to_first_token_seconds"),
            Some(Unit::Seconds),
            text("Time to first token in seconds."),
        );
        r.describe_histogram(
            d("vllm:inter_token_latency_seconds"),
            Some(Unit::Seconds),
            text("Time between tokens in seconds."),
        );
        for (name, help) in LATENCY_HISTOGRAMS {
            r.describe_histogram(d(name), Some(Unit::Seconds), text(help));
        }
        r.describe_histogram(d("vllm:request_prompt_tokens"), None, text("Prompt tokens per finished request."));
        r.describe_histogram(d("vllm:request_generation_tokens"), None, text("Generated tokens per finished request."));
        r.describe_histogram(
            d("vllm:request_time_per_output_token_seconds"),
            Some(Unit::Seconds),
            text("Histogram of time_per_output_token_seconds per request."),
        );
        r.describe_histogram(
            d("vllm:request_max_num_generation_tokens"),
            None,
            text("Histogram of maximum number of requested generation tokens."),
        );
        r.describe_histogram(d("vllm:request_params_n"), None, text("Histogram of the n request parameter."));
        r.describe_histogram(
            d("vllm:request_params_max_tokens"),
            None,
            text("Histogram of the max_tokens request parameter."),
        );
        r.describe_histogram(
            d("vllm:iteration_tokens_total"),
            None,
            text("Histogram of number of tokens per engine_step."),
        );
        r.describe_histogram(
            d("vllm:request_num_preemptions"),
            None,
            text("Histogram of the number of times a request was preempted."),
        );
        r.describe_gauge(d("vllm:cache_config_info"), None, text("Information of the LLMEngine CacheConfig"));
        r.describe_gauge(d("pagoda_build_info"), None, text("Pagoda's version and git commit."));
        r.describe_gauge(d("pagoda_cloud_info"), None, text("The cloud and instance type Pagoda detected from DMI."));
    }

    fn key(&self, name: &'static str, extra: Option<(&'static str, &'static str)>) -> Key {
        let mut labels = vec![Label::new("model_name", self.model_name.clone())];
        if let Some((k, v)) = extra {
            labels.push(Label::new(k, v));
        }
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str) -> Counter {
        self.recorder.register_counter(&self.key(name, None), &metadata())
    }

    fn gauge(&self, name: &'static str) -> Gauge {
        self.recorder.register_gauge(&self.key(name, None), &metadata())
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        self.recorder.register_histogram(&self.key(name, None), &metadata())
    }

    /// The observer that records engine metrics; give it to the engine thread.
    pub fn engine_metrics(&self) -> EngineMetrics {
        let success = |reason: &'static str| {
            self.recorder
                .register_counter(&self.key("vllm:request_success", Some(("finished_reason", reason))), &metadata())
        };
        let m = EngineMetrics {
            running: self.gauge("vllm:num_requests_running"),
            waiting: self.gauge("vllm:num_requests_waiting"),
            kv_usage: self.gauge("vllm:kv_cache_usage_perc"),
            prefix_queries: self.counter("vllm:prefix_cache_queries"),
            prefix_hits: self.counter("vllm:prefix_cache_hits"),
            preemptions: self.counter("vllm:num_preemptions"),
            prompt_tokens: self.counter("vllm:prompt_tokens"),
            generation_tokens: self.counter("vllm:generation_tokens"),
            success_stop: success("stop"),
            success_length: success("length"),
            success_abort: success("abort"),
            ttft: self.histogram("vllm:time_to_first_token_seconds"),
            itl: self.histogram("vllm:inter_token_latency_seconds"),
            e2e: self.histogram("vllm:e2e_request_latency_seconds"),
            queue: self.histogram("vllm:request_queue_time_seconds"),
            prefill: self.histogram("vllm:request_prefill_time_seconds"),
            decode: self.histogram("vllm:request_decode_time_seconds"),
            request_prompt_tokens: self.histogram("vllm:request_prompt_tokens"),
            request_generation_tokens: self.histogram("vllm:request_generation_tokens"),
            time_per_output_token: self.histogram("vllm:request_time_per_output_token_seconds"),
            inference_time: self.histogram("vllm:request_inference_time_seconds"),
            max_generation_tokens: self.histogram("vllm:request_max_num_generation_tokens"),
            params_n: self.histogram("vllm:request_params_n"),
            params_max_tokens: self.histogram("vllm:request_params_max_tokens"),
            iteration_tokens: self.histogram("vllm:iteration_tokens_total"),
            request_preemptions: self.histogram("vllm:request_num_preemptions"),
            last: EngineStats::default(),
            last_token: HashMap::new(),
            requests: HashMap::new(),
        };
        // Publish zeros right away so dashboards and autoscalers see the series before traffic.
        for c in [&m.prefix_queries, &m.prefix_hits, &m.preemptions, &m.prompt_tokens, &m.generation_tokens] {
            c.increment(0);
        }
        for c in [&m.success_stop, &m.success_length, &m.success_abort] {
            c.increment(0);
        }
        m.running.set(0.0);
        m.waiting.set(0.0);
        m.kv_usage.set(0.0);
        m
    }

    /// vLLM's `vllm:cache_config_info`: the KV cache's configuration as labels of a gauge at 1
    /// (labelled by `engine`, not by model, as vLLM's).
    pub fn set_cache_config(&self, config: &[(&'static str, String)]) {
        let mut labels: Vec<Label> = config.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
        labels.push(Label::new("engine", "0"));
        self.recorder.register_gauge(&Key::from_parts("vllm:cache_config_info", labels), &metadata()).set(1.0);
    }

    /// The Prometheus text exposition of every metric, the GPUs' last reading (if any) last.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        text.push_str(&self.gpus.render());
        text
    }
}

/// Engine metrics, updated after every step on the engine thread.
pub struct EngineMetrics {
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    prefix_queries: Counter,
    prefix_hits: Counter,
    preemptions: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    success_stop: Counter,
    success_length: Counter,
    success_abort: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    time_per_output_token: Histogram,
    inference_time: Histogram,
    max_generation_tokens: Histogram,
    params_n: Histogram,
    params_max_tokens: Histogram,
    iteration_tokens: Histogram,
    request_preemptions: Histogram,
    last: EngineStats,
    /// When each live sequence produced its previous token.
    last_token: HashMap<(RequestId, usize), Instant>,
    /// Each live request's `n` and `max_tokens`, its sequences still running, and the most tokens
    /// one of its finished sequences generated.
    requests: HashMap<RequestId, LiveRequest>,
}

struct LiveRequest {
    n: usize,
    max_tokens: usize,
    unfinished: usize,
    most_generated: usize,
}

impl EngineObserver for EngineMetrics {
    fn on_request(&mut self, request: &ValidRequest) {
        let n = request.params().n;
        let live = LiveRequest { n, max_tokens: request.max_tokens(), unfinished: n, most_generated: 0 };
        self.requests.insert(request.id().clone(), live);
    }

    fn on_step(&mut self, stats: &EngineStats, outputs: &[RequestOutput]) {
        if stats.num_steps > self.last.num_steps {
            self.iteration_tokens.record(stats.last_step_tokens as f64);
        }
        self.running.set(stats.num_running as f64);
        self.waiting.set(stats.num_waiting as f64);
        self.kv_usage.set(stats.kv_cache_usage);
        self.prefix_queries.increment(stats.prefix_cache.queries - self.last.prefix_cache.queries);
        self.prefix_hits.increment(stats.prefix_cache.hits - self.last.prefix_cache.hits);
        self.preemptions.increment(stats.num_preemptions - self.last.num_preemptions);
        self.last = *stats;

        let now = Instant::now();
        for out in outputs {
            let key = (out.request_id.clone(), out.index);
            let t = &out.timings;
            let num_new = out.token_ids.len();
            if num_new > 0 {
                self.generation_tokens.increment(num_new as u64);
                let token_time = t.last_token.unwrap_or(now);
                match self.last_token.insert(key.clone(), token_time) {
                    Some(previous) => self.itl.record(token_time.duration_since(previous).as_secs_f64()),
                    None => {
                        self.ttft.record(token_time.duration_since(t.arrival).as_secs_f64());
                        self.prompt_tokens.increment(out.num_prompt_tokens as u64);
                    }
                }
            }
            let Some(reason) = out.finish_reason else { continue };
            self.last_token.remove(&key);
            match reason {
                FinishReason::Stop => self.success_stop.increment(1),
                FinishReason::Length => self.success_length.increment(1),
                FinishReason::Abort => self.success_abort.increment(1),
            }
            let end = t.last_token.unwrap_or(now);
            self.e2e.record(end.duration_since(t.arrival).as_secs_f64());
            if let Some(scheduled) = t.first_scheduled {
                self.queue.record(scheduled.duration_since(t.arrival).as_secs_f64());
                if let Some(first) = t.first_token {
                    self.prefill.record(first.duration_since(scheduled).as_secs_f64());
                    self.decode.record(end.duration_since(first).as_secs_f64());
                }
            }
            self.request_prompt_tokens.record(out.num_prompt_tokens as f64);
            self.request_generation_tokens.record(out.num_output_tokens as f64);
            self.request_preemptions.record(out.num_preemptions as f64);
            if let (Some(first), Some(last)) = (t.first_token, t.last_token) {
                let per_token = match out.num_output_tokens {
                    0 | 1 => 0.0,
                    n => last.duration_since(first).as_secs_f64() / (n - 1) as f64,
                };
                self.time_per_output_token.record(per_token);
            }
            if let Some(scheduled) = t.first_scheduled {
                self.inference_time.record(end.duration_since(scheduled).as_secs_f64());
            }
            // A request's own metrics once its last sequence is done.
            if let Some(live) = self.requests.get_mut(&out.request_id) {
                live.unfinished = live.unfinished.saturating_sub(1);
                live.most_generated = live.most_generated.max(out.num_output_tokens);
                if live.unfinished == 0 {
                    let live = self.requests.remove(&out.request_id).expect("present");
                    self.max_generation_tokens.record(live.most_generated as f64);
                    self.params_n.record(live.n as f64);
                    self.params_max_tokens.record(live.max_tokens as f64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_go_one_two_five_up_to_the_limit() {
        assert_eq!(one_two_five_buckets(512), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
        assert_eq!(one_two_five_buckets(1), vec![1.0]);
    }

    #[test]
    fn renders_vllm_names_with_the_model_label() {
        let t = Telemetry::new("m", 100, &CloudInfo { provider: "aws", instance_type: "g5.xlarge".into() });
        let mut m = t.engine_metrics();
        m.on_step(&EngineStats { num_running: 3, ..EngineStats::default() }, &[]);
        let text = t.render();
        for needle in [
            "vllm:num_requests_running{model_name=\"m\"} 3",
            "vllm:prompt_tokens_total{model_name=\"m\"} 0",
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"abort\"} 0",
            "pagoda_cloud_info{provider=\"aws\",instance_type=\"g5.xlarge\"} 1",
            "# TYPE vllm:time_to_first_token_seconds histogram",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
