//! `pagoda bench serve` against the real server: its counts are the server's own.

use std::process::{Command, Output};

use serde_json::Value;

use crate::common::*;
use crate::server::Server;

fn bench(port: u16, args: &[&str], env: &[(&str, &str)]) -> (Output, Option<Value>) {
    // A folder per server: tests run side by side, and a shared report file would be read by the
    // wrong one.
    let json = scratch_dir(&format!("bench-serve-{port}")).join("result.json");
    let _ = std::fs::remove_file(&json);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
    cmd.args(["bench", "serve", "--base-url", &format!("http://127.0.0.1:{port}"), "--json", json.to_str().unwrap()]);
    cmd.args(args).env_remove("OPENAI_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let value = std::fs::read(&json).ok().map(|b| serde_json::from_slice(&b).unwrap());
    (out, value)
}

const MODEL: &str = "pagoda-demo-random-weights";

#[test]
fn bench_serve_reports_the_servers_own_token_counts() {
    let server = Server::start(&["--api-key", "secret"]);
    let metric = |name: &str| server.metric(&format!("{name}{{model_name=\"{MODEL}\"}}"));
    let success =
        || server.metric(&format!("vllm:request_success_total{{model_name=\"{MODEL}\",finished_reason=\"length\"}}"));

    // Completions: Poisson arrivals, a concurrency limit, lengths within ±50%; the model's name
    // from /v1/models; the key from OPENAI_API_KEY.
    let (out, report) = bench(
        server.port,
        &[
            "--num-prompts",
            "12",
            "--request-rate",
            "40",
            "--max-concurrency",
            "3",
            "--random-input-len",
            "40",
            "--random-range-ratio",
            "0.5",
            "--random-output-len",
            "6",
            "--ignore-eos",
            "--seed",
            "3",
        ],
        &[("OPENAI_API_KEY", "secret")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let r = report.unwrap();
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(12), Some(0)), "{r}");
    assert_eq!(r["model_id"], MODEL);
    // Output lengths vary within 6 ± 50% too, each generated in full (--ignore-eos).
    assert!((36..=108).contains(&r["total_output_tokens"].as_u64().unwrap()), "{r}");
    assert_eq!(r["total_output_tokens"].as_f64(), Some(metric("vllm:generation_tokens_total")));
    assert_eq!(r["total_input_tokens"].as_f64(), Some(metric("vllm:prompt_tokens_total")));
    assert_eq!(success(), 12.0);
    for key in ["ttft", "tpot", "itl", "e2el"] {
        let [median, p90, p99] = ["median", "p90", "p99"].map(|p| r[format!("{p}_{key}_ms")].as_f64().unwrap());
        assert!(0.0 < median && median <= p90 && p90 <= p99, "{key}: {r}");
    }
    assert!(r["duration"].as_f64().unwrap() > 0.0 && r["request_throughput"].as_f64().unwrap() > 0.0);
    for line in ["Successful requests:", "Total generated tokens:", "Median TTFT (ms):", "P99 ITL (ms):"] {
        assert!(stdout.contains(line), "{stdout}");
    }

    // Chat, with the key as a flag: the counts move by exactly what the report says.
    let (before_in, before_out) = (metric("vllm:prompt_tokens_total"), metric("vllm:generation_tokens_total"));
    let (out, report) = bench(
        server.port,
        &[
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            MODEL,
            "--api-key",
            "secret",
            "--num-prompts",
            "5",
            "--random-input-len",
            "30",
            "--random-output-len",
            "4",
            "--ignore-eos",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r = report.unwrap();
    assert_eq!((r["completed"].as_u64(), r["total_output_tokens"].as_u64()), (Some(5), Some(20)));
    assert_eq!(r["total_input_tokens"].as_f64(), Some(metric("vllm:prompt_tokens_total") - before_in));
    assert_eq!(r["total_output_tokens"].as_f64(), Some(metric("vllm:generation_tokens_total") - before_out));
    assert_eq!(success(), 17.0);
}

#[test]
fn prompts_share_no_prefix_within_or_across_runs_with_the_same_seed() {
    let server = Server::start(&["--block-size", "4"]);
    let args = ["--num-prompts", "6", "--random-input-len", "64", "--random-output-len", "2", "--seed", "9"];
    for _ in 0..2 {
        let (out, report) = bench(server.port, &args, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(report.unwrap()["completed"], 6);
    }
    assert!(server.metric(&format!("vllm:prefix_cache_queries_total{{model_name=\"{MODEL}\"}}")) > 0.0);
    assert_eq!(server.metric(&format!("vllm:prefix_cache_hits_total{{model_name=\"{MODEL}\"}}")), 0.0);
}

#[test]
fn failed_requests_are_counted_and_explained_and_fail_the_run() {
    let server = Server::start(&["--api-key", "secret"]);
    // No key: every request is refused.
    let (out, report) = bench(server.port, &["--model", MODEL, "--num-prompts", "3", "--random-input-len", "8"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let r = report.unwrap();
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(0), Some(3)));
    let errors = r["errors"].to_string();
    assert!(errors.contains("401"), "{errors}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no request succeeded"));

    // No server: a clear error, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (out, _) = bench(port, &["--model", "m", "--num-prompts", "2"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed = stdout.lines().find(|l| l.starts_with("Failed requests:")).unwrap_or_default();
    assert!(failed.ends_with(" 2"), "{stdout}");
    assert!(stdout.contains("error: ") && stdout.contains(&port.to_string()), "{stdout}");

    // Bad values are refused before anything is sent.
    for bad in [["--request-rate", "0"], ["--random-range-ratio", "1"], ["--num-prompts", "0"]] {
        let (out, _) = bench(port, &bad, &[]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(bad[0]), "{bad:?}");
    }
}
