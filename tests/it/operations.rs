//! Operating the server: client disconnects, draining on SIGTERM, many clients at once, the
//! metrics under load (checked by promtool), and the official `openai` Python client.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::http::{EventStream, get, post, send_only};
use crate::server::{Server, tiny_llama_server};

const DEMO: &str = "{model_name=\"pagoda-demo-random-weights\"}";

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "Tell me a story", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut stream = EventStream::open(server.port, "/v1/completions", &body);
    for _ in 0..3 {
        assert!(stream.next_event().is_some());
    }
    assert!(server.metric(&format!("vllm:kv_cache_usage_perc{DEMO}")) > 0.0);
    assert_eq!(server.metric(&format!("vllm:num_requests_running{DEMO}")), 1.0);
    drop(stream);
    wait_for("the KV cache to empty", Duration::from_secs(10), || {
        server.metric(&format!("vllm:kv_cache_usage_perc{DEMO}")) == 0.0
    });
    assert_eq!(server.metric(&format!("vllm:num_requests_running{DEMO}")), 0.0);
    let aborted = server
        .metric("vllm:request_success_total{model_name=\"pagoda-demo-random-weights\",finished_reason=\"abort\"}");
    assert_eq!(aborted, 1.0);
    let generated = server.metric(&format!("vllm:generation_tokens_total{DEMO}"));
    assert!(generated < 4000.0, "generation stopped early ({generated} tokens)");

    // The same for a client that waits for a whole (non-streamed) response and leaves.
    let connection =
        send_only(server.port, "/v1/completions", &json!({"prompt": "More", "max_tokens": 4000, "ignore_eos": true}));
    wait_for("the request to run", Duration::from_secs(10), || {
        server.metric(&format!("vllm:num_requests_running{DEMO}")) == 1.0
    });
    drop(connection);
    wait_for("the KV cache to empty again", Duration::from_secs(10), || {
        server.metric(&format!("vllm:kv_cache_usage_perc{DEMO}")) == 0.0
    });
    let aborted = server
        .metric("vllm:request_success_total{model_name=\"pagoda-demo-random-weights\",finished_reason=\"abort\"}");
    assert_eq!(aborted, 2.0);
}

#[test]
fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let mut server = Server::start(&["--shutdown-timeout", "60"]);
    let port = server.port;
    // Long enough that the streams are still running while the test checks the 503s.
    let body = json!({"prompt": "Once", "max_tokens": 1000, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut streams: Vec<EventStream> = (0..4).map(|_| EventStream::open(port, "/v1/completions", &body)).collect();
    for s in &mut streams {
        assert!(s.next_event().is_some());
    }
    server.signal(libc::SIGTERM);
    wait_for("/ready to turn 503", Duration::from_secs(5), || get(port, "/ready").status == 503);
    assert_eq!(get(port, "/ready").json()["status"], "draining");
    let refused = post(port, "/v1/completions", &json!({"prompt": "late", "max_tokens": 1}));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"]["message"], "the server is shutting down");
    assert_eq!(get(port, "/health").status, 200, "still alive while draining");
    // Every in-flight stream runs to its end.
    for s in streams {
        let events = s.collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 1000, "a drained stream was cut short");
        let last: Value = serde_json::from_str(&events[events.len() - 3]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
    }
    let status = server.exit_status();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(server.log().contains("server stopped"));
}

#[test]
fn sigint_with_a_short_timeout_aborts_what_is_left_and_exits_cleanly() {
    let mut server = Server::start(&["--shutdown-timeout", "0"]);
    let body = json!({"prompt": "Once", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut stream = EventStream::open(server.port, "/v1/completions", &body);
    assert!(stream.next_event().is_some());
    server.signal(libc::SIGINT);
    let events = stream.collect();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "abort");
    assert_eq!(server.exit_status().code(), Some(0));
}

#[test]
fn sixty_four_clients_at_once_all_get_their_own_answer() {
    let server = tiny_llama_server(&["--max-num-seqs", "16", "--max-num-batched-tokens", "256"]);
    let reference = reference("tiny-llama");
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            let p = &reference.prompts[i % 5].prompt_ids;
            let mut ids = p.clone();
            ids.push(100 + i as u32);
            ids
        })
        .collect();
    let expected: Vec<String> = {
        let mut engine = engine("tiny-llama", |_| {});
        let requests =
            prompts.iter().enumerate().map(|(i, p)| request(&format!("{i:02}"), p.clone(), greedy(10))).collect();
        run(&mut engine, requests).into_iter().map(|c| c.text).collect()
    };
    let port = server.port;
    let handles: Vec<_> = prompts
        .into_iter()
        .map(|p| {
            std::thread::spawn(move || {
                let body = json!({"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
                let resp = post(port, "/v1/completions", &body);
                assert_eq!(resp.status, 200, "{}", resp.text());
                resp.json()["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let answers: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(answers, expected);
    let model = fixture("tiny-llama").display().to_string();
    let ok = server.metric(&format!("vllm:request_success_total{{model_name=\"{model}\",finished_reason=\"length\"}}"));
    assert_eq!(ok, 64.0, "none lost");
}

/// Whether a tool is on PATH; tests that need an absent tool say so and do not run.
fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

#[test]
fn metrics_pass_promtool_and_move_with_traffic() {
    let server = tiny_llama_server(&[]);
    let model = fixture("tiny-llama").display().to_string();
    let label = format!("{{model_name=\"{model}\"}}");
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"] {
        assert_eq!(server.metric(&format!("{name}{label}")), 0.0);
    }
    // Three requests sharing a 32-token prefix: the prefix cache is queried and hit.
    let prefix: Vec<u32> = (0..32).map(|i| 50 + i).collect();
    for i in 0..3u32 {
        let mut prompt = prefix.clone();
        prompt.push(900 + i);
        let resp = post(
            server.port,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
        );
        assert_eq!(resp.status, 200);
    }
    let m = |name: &str| server.metric(&format!("{name}{label}"));
    assert_eq!(m("vllm:generation_tokens_total"), 15.0);
    assert_eq!(m("vllm:prompt_tokens_total"), 3.0 * 33.0);
    assert_eq!(m("vllm:prefix_cache_queries_total"), 3.0 * 33.0);
    assert_eq!(m("vllm:prefix_cache_hits_total"), 2.0 * 32.0);
    assert_eq!(
        server.metric(&format!("vllm:request_success_total{{model_name=\"{model}\",finished_reason=\"length\"}}")),
        3.0
    );
    assert_eq!(m("vllm:time_to_first_token_seconds_count"), 3.0);
    assert_eq!(m("vllm:inter_token_latency_seconds_count"), 12.0);
    assert_eq!(m("vllm:e2e_request_latency_seconds_count"), 3.0);
    assert_eq!(m("vllm:request_generation_tokens_sum"), 15.0);
    // The metrics of vLLM's dashboards: per request, per step, and the cache's configuration.
    assert_eq!((m("vllm:request_params_n_count"), m("vllm:request_params_n_sum")), (3.0, 3.0));
    assert_eq!(m("vllm:request_params_max_tokens_sum"), 15.0);
    assert_eq!(m("vllm:request_max_num_generation_tokens_sum"), 15.0);
    assert_eq!(m("vllm:request_time_per_output_token_seconds_count"), 3.0);
    assert_eq!(m("vllm:request_inference_time_seconds_count"), 3.0);
    assert_eq!((m("vllm:request_num_preemptions_count"), m("vllm:request_num_preemptions_sum")), (3.0, 0.0));
    // Each request: a prefill step (33 prompt tokens, 32 of them cached for the last two) and
    // four one-token decode steps.
    assert_eq!(m("vllm:iteration_tokens_total_count"), 15.0);
    assert_eq!(m("vllm:iteration_tokens_total_sum"), (33 + 1 + 1 + 3 * 4) as f64);
    let text = get(server.port, "/metrics").text();
    for bucket in [
        format!("vllm:request_params_n_bucket{{model_name=\"{model}\",le=\"20\"}} 3"),
        format!("vllm:iteration_tokens_total_bucket{{model_name=\"{model}\",le=\"16384\"}} 15"),
        format!("vllm:request_num_preemptions_bucket{{model_name=\"{model}\",le=\"1\"}} 3"),
    ] {
        assert!(text.contains(&bucket), "/metrics lacks {bucket}");
    }
    let cache = text.lines().find(|l| l.starts_with("vllm:cache_config_info{")).expect("vllm:cache_config_info");
    assert!(
        cache.contains("num_gpu_blocks=\"512\"") && cache.contains("block_size=\"16\"") && cache.ends_with(" 1"),
        "{cache}"
    );
    for name in [
        "vllm:num_preemptions_total",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:request_prefill_time_seconds_sum",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_prompt_tokens_bucket",
        "pagoda_build_info{",
        "pagoda_cloud_info{provider=\"none\",instance_type=\"none\"} 1",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }

    // GPU series exist exactly where NVML reports a GPU (none on a machine without the driver).
    let nvml = pagoda::telemetry::gpu::GpuMetrics::load();
    let gpus = nvml.sample().len();
    assert_eq!(text.contains("pagoda_gpu_"), gpus > 0, "{gpus} GPUs reported by NVML");
    if gpus == 0 {
        println!("no GPU series to see: NVML is not available here (available: {})", nvml.available());
    }
    // promtool checks a full GPU reading's exposition too, whether or not this machine has one.
    let reading = pagoda::telemetry::gpu::GpuSample {
        index: 0,
        uuid: "GPU-5f0e".into(),
        name: "NVIDIA H200".into(),
        utilization_percent: Some(40),
        memory_used_bytes: Some(1 << 30),
        memory_total_bytes: Some(2 << 30),
        temperature_celsius: Some(50),
        power_draw_milliwatts: Some(300_000),
        power_limit_milliwatts: Some(700_000),
        sm_clock_mhz: Some(1980),
        throttle_reasons: Some(vec![("gpu_idle", true)]),
    };
    let text = text + &pagoda::telemetry::gpu::render(&[reading]);

    let Some(promtool) = tool("promtool") else {
        tool_missing("promtool is not installed (Debian package 'prometheus'; ./test.sh installs it)");
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // promtool exits 1 when it cannot parse the exposition and 3 when it only has lint remarks.
    // vLLM's names contain ':' (which Prometheus reserves for recording rules), so that remark is
    // expected for every vllm:* family and for nothing else; any other remark fails the test.
    assert!(out.status.success() || out.status.code() == Some(3), "promtool could not parse /metrics: {report}");
    // vLLM names its per-step token histogram `vllm:iteration_tokens_total`, which promtool
    // remarks on too; the name is kept so that vLLM's dashboards find it.
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let vllms_own = line == "vllm:iteration_tokens_total non-counter metrics should not have \"_total\" suffix";
        assert!(
            vllms_own || (line.starts_with("vllm:") && line.ends_with("metric names should not contain ':'")),
            "promtool remark other than vLLM's names: {line}"
        );
    }
}

#[test]
fn the_cloud_is_detected_from_dmi() {
    let dmi = scratch_dir("dmi-aws");
    std::fs::write(dmi.join("sys_vendor"), "Amazon EC2\n").unwrap();
    std::fs::write(dmi.join("product_name"), "g6e.xlarge\n").unwrap();
    let server = Server::spawn(&[], &[("PAGODA_DMI_DIR", dmi.to_str().unwrap())]);
    server.wait_ready();
    let text = get(server.port, "/metrics").text();
    assert!(text.contains("pagoda_cloud_info{provider=\"aws\",instance_type=\"g6e.xlarge\"} 1"), "{text}");
    assert_eq!(get(server.port, "/version").json()["cloud"]["instance_type"], "g6e.xlarge");
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["info", "--json", "--dmi-dir", dmi.to_str().unwrap()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["cloud"]["provider"], "aws");
    assert_eq!(info["cloud"]["instance_type"], "g6e.xlarge");
}

/// `pagoda info` says what `serve --device auto` would pick and why, the driver and its GPUs
/// where NVML is present, and where each CUDA library was found.
#[test]
fn info_names_the_device_auto_would_pick_and_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda")).args(["info", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["backends"], json!(["cpu", "cuda"]));
    let auto = &info["auto_device"];
    let reason = auto["reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{info}");
    let nvml = pagoda::telemetry::gpu::GpuMetrics::load().driver_report();
    match (&nvml, auto["device"].as_str().unwrap()) {
        (Some(report), device) => {
            // A machine with the driver: its versions and GPUs are reported.
            assert_eq!(info["driver"]["version"], report.driver_version.as_str());
            assert_eq!(info["gpus"].as_array().unwrap().len(), report.gpus.len());
            println!("driver {} with {} GPUs; auto picks {device}", report.driver_version, report.gpus.len());
        }
        (None, device) => {
            println!("no NVIDIA driver here: only the driverless answer is checked");
            assert_eq!(device, "cpu", "{info}");
            assert!(reason.contains("libcuda.so.1") || reason.contains("no GPU"), "{reason}");
            assert!(info["driver"].is_null() && info["gpus"] == json!([]), "{info}");
        }
    }
    for lib in ["libcuda.so.1", "libcublas.so", "libnvrtc.so", "libnvidia-ml.so.1"] {
        assert!(info["cuda_libraries"].get(lib).is_some(), "{lib} missing from {info}");
    }
    let text = Command::new(env!("CARGO_BIN_EXE_pagoda")).args(["info"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("serve --device auto would use: "), "{text}");
    assert!(text.contains("NVIDIA driver: "), "{text}");
}

/// `pagoda info` says loudly when no API key is configured, and where one comes from when it is:
/// the environment, or the appliance's launch file.
#[test]
fn info_says_whether_an_api_key_is_configured() {
    let dir = scratch_dir("info-api-key");
    let launch = dir.join("launch.env");
    let info = |env: &[(&str, &str)]| -> (Value, String) {
        let run = |json: bool| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
            cmd.args(["info", "--launch-env", launch.to_str().unwrap()]).args(json.then_some("--json"));
            cmd.env_remove("PAGODA_API_KEY").env_remove("PAGODA_API_KEY_FILE").envs(env.iter().copied());
            String::from_utf8(cmd.output().unwrap().stdout).unwrap()
        };
        (serde_json::from_str(&run(true)).unwrap(), run(false))
    };
    let (json, text) = info(&[]);
    assert_eq!(json["api_key"], json!({"configured": false, "source": null}));
    assert!(text.contains("API key: NONE configured"), "{text}");
    std::fs::write(&launch, "PAGODA_MODEL=s3://m/x\nPAGODA_API_KEY_FILE='/run/secrets/key'\n").unwrap();
    let (json, text) = info(&[]);
    assert_eq!(json["api_key"]["source"], format!("PAGODA_API_KEY_FILE in {}", launch.display()));
    assert!(text.contains("API key: configured (PAGODA_API_KEY_FILE in "), "{text}");
    std::fs::write(&launch, "PAGODA_API_KEY_FILE=\n").unwrap();
    assert_eq!(info(&[]).0["api_key"]["configured"], false, "an empty value names no key");
    assert_eq!(info(&[("PAGODA_API_KEY", "k")]).0["api_key"]["source"], "PAGODA_API_KEY");
    assert_eq!(info(&[("PAGODA_API_KEY_FILE", "/k")]).0["api_key"]["source"], "PAGODA_API_KEY_FILE=/k");
}

/// The Python interpreter with the `openai` package: `PAGODA_TEST_PYTHON`, else `.venv/bin/python`.
pub fn python_with_openai() -> Result<PathBuf, String> {
    let candidate = std::env::var_os("PAGODA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    if !candidate.is_file() {
        return Err(format!("{} does not exist (./test.sh creates it)", candidate.display()));
    }
    let ok = Command::new(&candidate).args(["-c", "import openai"]).status().map(|s| s.success()).unwrap_or(false);
    if ok { Ok(candidate) } else { Err(format!("{} cannot import openai", candidate.display())) }
}

#[test]
fn the_official_openai_python_client_works_against_the_server() {
    let python = match python_with_openai() {
        Ok(p) => p,
        Err(why) => {
            tool_missing(&format!("the openai client test needs Python with openai: {why}"));
            return;
        }
    };
    let server = tiny_llama_server(&["--api-key", "test-key", "--served-model-name", "tiny"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(python).arg(script).arg(format!("http://127.0.0.1:{}/v1", server.port)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}

/// A server reachable from other machines with no API key says so loudly at start (an appliance
/// whose launch configuration named none); on loopback, or with a key, it does not.
#[test]
fn an_open_api_on_a_public_address_is_announced_loudly() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("PAGODA_API_KEY")
        .env_remove("PAGODA_API_KEY_FILE")
        .env("PAGODA_DMI_DIR", "/nonexistent")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("NO API KEY") {
                let _ = tx.send(line);
            }
        }
    });
    let warning = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("no warning about the open API");
    assert!(
        warning.contains("WARN") && warning.contains("0.0.0.0:") && warning.contains("--api-key-file"),
        "{warning}"
    );
    for args in [&[][..], &["--api-key", "k3y"][..]] {
        let server = Server::start(args);
        assert!(!server.log().contains("NO API KEY"), "{}", server.log());
    }
}
