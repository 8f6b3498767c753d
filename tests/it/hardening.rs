//! Defects found by attacking the server (issue 15): oversized prompts, slow clients and the
//! connection limit, queue admission, the KV cache's memory, and the small ones.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagoda::model::ModelFiles;
use serde_json::json;

use crate::common::*;
use crate::http::{self, get, post};
use crate::server::{Server, tiny_llama_server};

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn a_prompt_too_long_for_the_context_is_refused_without_tokenizing_all_of_it() {
    let files = ModelFiles::load(&fixture("tiny-llama")).unwrap();
    let tok = &files.tokenizer;
    let text = "The licensor grants you a license to use this work. ".repeat(200);
    let all = tok.encode(&text, true).unwrap();
    // Within the limit: exactly what a plain tokenization gives.
    assert_eq!(tok.encode_within(&text, true, all.len()).unwrap(), Ok(all.clone()));
    // Past it, from a prefix: at least the limit, never more than the whole.
    for limit in [1, 10, 100, all.len() - 1] {
        let at_least = tok.encode_within(&text, true, limit).unwrap().unwrap_err();
        assert!(at_least > limit && at_least <= all.len(), "limit {limit}: {at_least} of {}", all.len());
    }
    // A text without spaces is tokenized whole, and still counted right.
    let dense = "x".repeat(5000);
    let n = tok.encode(&dense, true).unwrap().len();
    assert_eq!(tok.encode_within(&dense, true, 10).unwrap(), Err(n));

    // Over HTTP: 15 MB to /tokenize and to completions, against a 512-token context.
    let server = tiny_llama_server(&["--max-model-len", "512"]);
    let pid = server.child.id();
    let huge = "All work and no play makes Jack a dull boy. ".repeat(350_000);
    assert!(huge.len() > 15_000_000);
    let before = rss(pid);
    for (path, body) in [
        ("/tokenize", json!({"prompt": huge})),
        ("/v1/completions", json!({"prompt": huge, "max_tokens": 1})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": huge}], "max_tokens": 1})),
    ] {
        let resp = post(server.port, path, &body);
        assert_eq!(resp.status, 400, "{path}: {}", resp.text());
        assert!(resp.text().contains("maximum context length of 512"), "{path}: {}", resp.text());
    }
    // Connections close and their buffers go a moment after the responses.
    let after = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            rss(pid)
        })
        .min()
        .unwrap();
    println!("server RSS {} MiB before three 15 MB prompts, {} MiB after", before >> 20, after >> 20);
    // The bodies (15 MB each, parsed and rendered) are freed again, though the allocator keeps
    // some tens of MiB in its arenas; tokenizing them whole took gigabytes, 1.4 GB of it kept.
    let grown = after.saturating_sub(before);
    assert!(grown < 160 << 20, "the server kept {} MiB", grown >> 20);
}

#[test]
fn health_answers_while_a_large_prompt_is_tokenized() {
    let server = tiny_llama_server(&["--max-model-len", "512"]);
    // A prompt to be truncated is tokenized whole: seconds of work for the tokenizer.
    let huge = "All work and no play makes Jack a dull boy. ".repeat(100_000);
    let port = server.port;
    let work = std::thread::spawn(move || {
        post(port, "/v1/completions", &json!({"prompt": huge, "max_tokens": 1, "truncate_prompt_tokens": 8}))
    });
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut polls = 0;
    while !work.is_finished() {
        let asked = Instant::now();
        for path in ["/health", "/ready", "/metrics"] {
            assert_eq!(get(port, path).status, 200, "{path}");
        }
        slowest = slowest.max(asked.elapsed());
        polls += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = work.join().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["usage"]["prompt_tokens"], 8);
    println!("tokenizing took {:?}; {polls} polls, the slowest {slowest:?}", started.elapsed());
    // Generous: on two busy cores a poll waits for a scheduler slice, never for the tokenizer.
    assert!(slowest < Duration::from_secs(1), "/health, /ready and /metrics took {slowest:?}");
}

/// A connection that has sent `sent` and waits.
fn open_connection(port: u16, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(sent).unwrap();
    stream
}

/// Everything the server sends until it closes the connection.
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slow_clients_time_out_and_connections_past_the_limit_get_503() {
    let server = tiny_llama_server(&["--max-connections", "4", "--request-read-timeout", "2"]);
    let port = server.port;
    // Four connections that send half a request's headers, byte by byte or not at all.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| open_connection(port, b"GET /health HTTP/1.1\r\n")).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A fifth is answered at once, in the API's error shape, and closed.
    let refused = http::request(port, "GET", "/health", &[], b"");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("connections"));
    // The slow ones are closed after the read timeout, and their places serve again.
    let started = Instant::now();
    for stream in &mut idle {
        read_until_closed(stream);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "idle connections were kept {:?}", started.elapsed());
    assert_eq!(get(port, "/health").status, 200);

    // A body that trickles in: 408 once the read timeout has passed, and the connection closes.
    let mut slow = open_connection(
        port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro",
    );
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(900));
        let _ = slow.write_all(b" ");
    }
    let answer = read_until_closed(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-read-timeout"), "{answer}");
    assert_eq!(get(port, "/health").status, 200);
}

#[test]
fn under_a_low_open_files_limit_connections_are_refused_before_descriptors_run_out() {
    if std::process::Command::new("prlimit").arg("--version").output().is_err() {
        tool_missing("the open-files test needs prlimit (util-linux)");
        return;
    }
    let model = fixture("tiny-llama");
    let args = ["--model", model.to_str().unwrap(), "--num-gpu-blocks-override", "64", "--request-read-timeout", "2"];
    let server = Server::spawn_under(&["prlimit", "--nofile=320:320", "--"], &args, &[]);
    server.wait_ready();
    // 320 files, 256 kept for the rest: 64 connections.
    assert!(server.log().contains("--max-connections lowered to fit the open-files limit"), "{}", server.log());
    let port = server.port;
    // 400 slow clients, more than the process could hold open: 64 are served (and time out), some
    // refused with a 503, the rest closed at once; each connection ends.
    let mut slow: Vec<TcpStream> = (0..400).map(|_| open_connection(port, b"GET /health HTTP/1.1\r\n")).collect();
    let answers: Vec<String> = slow.iter_mut().map(read_until_closed).collect();
    let refused = answers.iter().filter(|a| a.starts_with("HTTP/1.1 503")).count();
    assert!(refused > 0, "none of 400 refused with a 503");
    println!("{refused} of 400 refused with a 503");
    // Once the slow ones have timed out, the server serves; it never ran out of descriptors.
    assert_eq!(get(port, "/health").status, 200);
    assert!(!server.log().contains("Too many open files"), "{}", server.log());
}

#[test]
fn the_queue_never_holds_more_than_max_queue_whatever_the_spacing() {
    let server = tiny_llama_server(&["--max-num-seqs", "2", "--max-queue", "4"]);
    let port = server.port;
    for spacing in [0u64, 3, 15] {
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut most = (0f64, 0f64);
                while !done.load(Ordering::SeqCst) {
                    let text = get(port, "/metrics").text();
                    let value = |name: &str| -> f64 {
                        text.lines()
                            .find(|l| l.starts_with(name))
                            .and_then(|l| l.rsplit(' ').next())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0.0)
                    };
                    most.0 = most.0.max(value("vllm:num_requests_waiting"));
                    most.1 = most.1.max(value("vllm:num_requests_running"));
                }
                most
            })
        };
        let clients: Vec<_> = (0..16)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(spacing));
                std::thread::spawn(move || {
                    let body = json!({"prompt": format!("request {i}"), "max_tokens": 200, "ignore_eos": true});
                    let resp = post(port, "/v1/completions", &body);
                    if resp.status == 429 {
                        assert_eq!(resp.header("retry-after"), Some("1"));
                    }
                    resp.status
                })
            })
            .collect();
        let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        done.store(true, Ordering::SeqCst);
        let (waiting, running) = watcher.join().unwrap();
        let admitted = statuses.iter().filter(|&&s| s == 200).count();
        assert!(statuses.iter().all(|&s| s == 200 || s == 429), "spacing {spacing} ms: {statuses:?}");
        assert!(admitted >= 4, "spacing {spacing} ms: the queue's 4 places always fill: {statuses:?}");
        assert!(waiting <= 4.0, "spacing {spacing} ms: {waiting} sequences waited, more than --max-queue 4");
        assert!(running <= 2.0, "spacing {spacing} ms: {running} running");
        println!("spacing {spacing} ms: {admitted} admitted, at most {waiting} waiting");
    }
}

#[test]
fn the_cpu_kv_cache_touches_only_the_blocks_in_use_at_once() {
    // Prefix caching on (the default): every finished prompt leaves cached blocks behind.
    let mut engine = engine("tiny-llama", |o| {
        o.num_gpu_blocks_override = Some(4096);
        o.block_size = 16;
        o.max_num_seqs = 8;
    });
    let mut most_in_use = 0;
    for round in 0..50u32 {
        let requests = (0..8u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..40).map(|t| ((round * 8 + i) * 7 + t * 3) % 1000).collect();
                request(&format!("{round}-{i}"), prompt, greedy(4))
            })
            .collect();
        run(&mut engine, requests);
        most_in_use = most_in_use.max(8 * (44usize).div_ceil(16));
    }
    let touched = engine.stats().kv_blocks_touched;
    // 400 prompts of 3 blocks each passed through 4,096 blocks: only a round's worth were written.
    assert!(touched <= most_in_use, "{touched} blocks touched, at most {most_in_use} were in use at once");
    // The cached prefixes still serve, from those blocks.
    let again: Vec<u32> = (0..40).map(|t| ((49 * 8 + 7) * 7 + t * 3) % 1000).collect();
    let hit = run(&mut engine, vec![request("again", again, greedy(1))]).remove(0);
    assert_eq!(hit.num_cached_tokens, 32);
}

#[test]
fn small_defects_json_arrays_head_requests_and_lone_surrogates() {
    let server = tiny_llama_server(&[]);
    // A JSON array is not read as positional fields.
    for path in ["/detokenize", "/tokenize", "/v1/completions", "/v1/chat/completions"] {
        let resp = http::request(server.port, "POST", path, &[], br#"[null,[1,2,3]]"#);
        assert_eq!(resp.status, 400, "{path}: {}", resp.text());
        assert!(resp.text().contains("must be a JSON object"), "{path}: {}", resp.text());
    }
    // HEAD gets what GET gets, without the body.
    for path in ["/health", "/ready", "/version", "/metrics"] {
        let head = http::request(server.port, "HEAD", path, &[], b"");
        assert_eq!(head.status, 200, "{path}");
        assert!(head.body.is_empty(), "{path}");
    }
    // A lone surrogate becomes U+FFFD, as Python's JSON reads it; a pair is a character.
    let tokenize = |escaped: &str| {
        let body = format!(r#"{{"prompt": "{escaped}", "add_special_tokens": false}}"#);
        let resp = http::request(server.port, "POST", "/tokenize", &[], body.as_bytes());
        assert_eq!(resp.status, 200, "{escaped}: {}", resp.text());
        resp.json()["tokens"].clone()
    };
    let replacement = post(server.port, "/tokenize", &json!({"prompt": "a\u{fffd}b", "add_special_tokens": false}));
    assert_eq!(tokenize(r"a\ud800b"), replacement.json()["tokens"]);
    assert_eq!(tokenize(r"a\udc00b"), replacement.json()["tokens"]);
    let emoji = post(server.port, "/tokenize", &json!({"prompt": "a😀b", "add_special_tokens": false}));
    assert_eq!(tokenize(r"a\ud83d\ude00b"), emoji.json()["tokens"]);
    // An escaped backslash before "u" is not an escape.
    let literal = post(server.port, "/tokenize", &json!({"prompt": "\\ud800 \u{fffd}", "add_special_tokens": false}));
    assert_eq!(tokenize(r"\\ud800 \ud800"), literal.json()["tokens"]);
    let resp = http::request(server.port, "POST", "/v1/completions", &[], br#"{"prompt": "x\udfff", "max_tokens": 2}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    // A target or headers beyond what the server reads: 414 and 431 in the API's error shape.
    let long = format!("/health?{}", "a".repeat(9000));
    let resp = http::request(server.port, "GET", &long, &[], b"");
    assert_eq!(resp.status, 414);
    assert!(resp.json()["error"]["message"].as_str().unwrap().contains("longer than 8192 bytes"));
    let big = "b".repeat(70_000);
    let resp = http::request(server.port, "GET", "/health", &[("x-big", big.as_str())], b"");
    assert_eq!(resp.status, 431);
    assert_eq!(resp.json()["error"]["type"], "RequestHeaderFieldsTooLargeError");
    let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let resp = http::request(server.port, "GET", "/health", &many, b"");
    assert_eq!(resp.status, 431);
    assert!(resp.json()["error"]["message"].as_str().unwrap().contains("fields"));
    // What hyper's parser refuses itself (a malformed request, a head past its own limits) comes
    // in the same shape.
    let raw = |sent: &[u8]| {
        let mut stream = open_connection(server.port, sent);
        read_until_closed(&mut stream)
    };
    let huge_target = format!("GET /health?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let huge_header = format!("GET /health HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "b".repeat(1 << 21));
    for (sent, status) in [
        (b"GARBAGE\r\n\r\n".to_vec(), "400"),
        (b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), "400"),
        (huge_target.into_bytes(), "414"),
        (huge_header.into_bytes(), "431"),
    ] {
        let answer = raw(&sent);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(json["error"]["code"].to_string(), status, "{answer}");
    }
}
