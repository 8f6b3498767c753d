//! The real `pagoda serve` process on 127.0.0.1:0, driven over HTTP: endpoints, request fields,
//! the error table, authentication, CORS and request ids.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::http::{EventStream, get, post, request};

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
    /// The thread reading the server's log; it ends when the process closes its stderr.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `pagoda serve` with `args` and waits until it listens (not until it is ready).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn_under(&[], args, env)
    }

    /// [`Server::spawn`] run by `wrapper` (a command and its arguments, such as `prlimit`).
    pub fn spawn_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = match wrapper.split_first() {
            None => Command::new(env!("CARGO_BIN_EXE_pagoda")),
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(env!("CARGO_BIN_EXE_pagoda"));
                cmd
            }
        };
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"]).args(args);
        cmd.env_remove("PAGODA_API_KEY").env("PAGODA_LOG", "info").env("PAGODA_DMI_DIR", "/nonexistent");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let thread_log = log.clone();
        let log_reader = std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("listening on http://127.0.0.1:") {
                    let rest = &line[at + "listening on http://127.0.0.1:".len()..];
                    let port: u16 =
                        rest.chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap();
                    if let Some(tx) = port_tx.take() {
                        let _ = tx.send(port);
                    }
                }
                let mut log = thread_log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the server did not start listening:\n{}", log.lock().unwrap()));
        Server { child, port, log, log_reader: Some(log_reader) }
    }

    /// Waits for the process to exit and for its log to be read to the end (the reader thread
    /// may still hold the last lines when `wait` returns).
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.log_reader.take() {
            reader.join().unwrap();
        }
        status
    }

    /// Starts a server and waits until `/ready` says 200.
    pub fn start(args: &[&str]) -> Server {
        let server = Server::spawn(args, &[]);
        server.wait_ready();
        server
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(self.port, "/ready").status != 200 {
            assert!(Instant::now() < deadline, "not ready in time:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The value of a metric line (exact name with labels) in `/metrics`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = get(self.port, "/metrics").text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process by its pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tiny_llama_server(extra: &[&str]) -> Server {
    let model = fixture("tiny-llama");
    let mut args = vec!["--model", model.to_str().unwrap(), "--num-gpu-blocks-override", "512"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Our engine's greedy continuation of `prompt` (checked against transformers elsewhere).
fn engine_greedy(prompt: &[u32], max_tokens: usize) -> pagoda::engine::RequestOutput {
    let mut engine = engine("tiny-llama", |_| {});
    run(&mut engine, vec![request_for(prompt, max_tokens)]).remove(0)
}

fn request_for(prompt: &[u32], max_tokens: usize) -> pagoda::engine::EngineRequest {
    crate::common::request("x", prompt.to_vec(), greedy(max_tokens))
}

fn assert_error(resp: &crate::http::HttpResponse, status: u16, kind: &str, message_part: &str) {
    assert_eq!(resp.status, status, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"]["code"], status, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(message_part), "message {message:?} lacks {message_part:?}");
}

#[test]
fn completions_match_the_engines_greedy_text_and_the_reference_logprobs() {
    let server = tiny_llama_server(&[]);
    let reference = reference("tiny-llama");
    for p in &reference.prompts {
        let expected = engine_greedy(&p.prompt_ids, 24);
        let body = json!({"model": fixture("tiny-llama"), "prompt": p.text, "max_tokens": 24, "temperature": 0,
                          "ignore_eos": true, "logprobs": 5});
        let resp = post(server.port, "/v1/completions", &body);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v = resp.json();
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], expected.text.as_str());
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": p.prompt_ids.len(), "completion_tokens": 24, "total_tokens": p.prompt_ids.len() + 24})
        );
        // The first token's logprobs are the reference's first step.
        let first = choice["logprobs"]["token_logprobs"][0].as_f64().unwrap() as f32;
        assert!((first - p.steps[0].top5[0].1).abs() < 1e-3);
        let top: &serde_json::Map<String, Value> = choice["logprobs"]["top_logprobs"][0].as_object().unwrap();
        assert_eq!(top.len(), 5);
        // Token-id prompts give the same completion as the text.
        let by_ids = post(
            server.port,
            "/v1/completions",
            &json!({"prompt": p.prompt_ids, "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        );
        assert_eq!(by_ids.json()["choices"][0]["text"], expected.text.as_str());
    }
}

#[test]
fn chat_applies_the_template_and_matches_the_engine() {
    let server = tiny_llama_server(&[]);
    for chat in reference("tiny-llama").chats {
        let expected = engine_greedy(&chat.ids, 12);
        let body = json!({"messages": chat.messages, "max_completion_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
        let v = post(server.port, "/v1/chat/completions", &body).json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], expected.text.as_str());
        assert_eq!(v["usage"]["prompt_tokens"], chat.ids.len());
        let lp = &v["choices"][0]["logprobs"]["content"];
        assert_eq!(lp.as_array().unwrap().len(), 12);
        assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
        // /tokenize renders the same template.
        let t = post(server.port, "/tokenize", &json!({"messages": chat.messages})).json();
        assert_eq!(t["tokens"], json!(chat.ids));
    }
}

#[test]
fn streamed_chunks_concatenate_to_the_whole_response() {
    let server = tiny_llama_server(&[]);
    let reference = reference("tiny-llama");
    let prompt = &reference.prompts[3].text;
    // Completions, two prompts and n = 2 (seeded sampling), streamed and not.
    let body =
        json!({"prompt": [prompt, "a"], "max_tokens": 20, "n": 2, "seed": 5, "temperature": 0.8, "ignore_eos": true});
    let whole = post(server.port, "/v1/completions", &body).json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let stream = EventStream::open(server.port, "/v1/completions", &streamed);
    assert_eq!(stream.status, 200);
    assert!(stream.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "text/event-stream"));
    let events = stream.collect();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut texts = vec![String::new(); 4];
    let mut finishes = vec![Value::Null; 4];
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if v["choices"].as_array().unwrap().is_empty() {
            usage = v["usage"].clone();
            continue;
        }
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        texts[i].push_str(c["text"].as_str().unwrap());
        if !c["finish_reason"].is_null() {
            finishes[i] = c["finish_reason"].clone();
        }
    }
    for i in 0..4 {
        assert_eq!(texts[i], whole["choices"][i]["text"].as_str().unwrap(), "choice {i}");
        assert_eq!(finishes[i], "length");
    }
    assert_eq!(usage, whole["usage"]);
    assert_ne!(whole["choices"][0]["text"], whole["choices"][1]["text"], "n = 2 samples twice");

    // Chat: role first, then content deltas that add up, then usage and [DONE].
    let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let whole = post(server.port, "/v1/chat/completions", &body).json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = EventStream::open(server.port, "/v1/chat/completions", &streamed).collect();
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

#[test]
fn stop_strings_echo_and_vllm_fields_work_over_http() {
    let server = tiny_llama_server(&[]);
    let reference = reference("tiny-llama");
    let p = &reference.prompts[0];
    let free = engine_greedy(&p.prompt_ids, 24);
    let word = free.text.split(|c: char| !c.is_ascii_alphabetic()).find(|w| w.len() >= 3).unwrap();
    let stop = &word[..3];
    let at = free.text.find(stop).unwrap();
    let body =
        json!({"prompt": p.text, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stop": stop, "echo": true});
    let v = post(server.port, "/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], format!("{}{}", p.text, &free.text[..at]));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop);
    // Streamed, the stop string never appears, even in part across chunks.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["echo"] = json!(false);
    let events = EventStream::open(server.port, "/v1/completions", &streamed).collect();
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, free.text[..at]);
    // stop_token_ids, min_tokens and a max_tokens exactly at the context limit.
    let token = free.token_ids[3];
    let v = post(server.port, "/v1/completions", &json!({"prompt": p.prompt_ids, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stop_token_ids": [token]})).json();
    assert_eq!(v["choices"][0]["stop_reason"], token);
    let room = 512 - p.prompt_ids.len();
    let v = post(
        server.port,
        "/v1/completions",
        &json!({"prompt": p.prompt_ids, "max_tokens": room, "temperature": 0, "ignore_eos": true}),
    )
    .json();
    assert_eq!(v["usage"]["completion_tokens"], room);
}

#[test]
fn default_max_tokens_fit_the_context_while_explicit_ones_are_checked() {
    // generation_config.json recommends more new tokens than the 512-token context holds.
    let dir = copy_fixture("tiny-llama", "server-gen-defaults");
    let gen_path = dir.join("generation_config.json");
    let mut generation: Value = serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    generation["max_new_tokens"] = json!(1000);
    std::fs::write(&gen_path, generation.to_string()).unwrap();
    let server = Server::start(&["--model", dir.to_str().unwrap(), "--num-gpu-blocks-override", "64"]);
    let messages = json!([{"role": "user", "content": "Hello there"}]);
    let body = json!({"messages": messages, "temperature": 0, "ignore_eos": true});
    let v = post(server.port, "/v1/chat/completions", &body).json();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), 512 - prompt, "the default is cut to the room left");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let body = json!({"messages": messages, "max_tokens": 1000});
    let resp = post(server.port, "/v1/chat/completions", &body);
    assert_error(&resp, 400, "BadRequestError", "maximum context length is 512 tokens");
}

#[test]
fn every_error_status_has_an_openai_shaped_body() {
    let model = fixture("tiny-llama");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        "tiny",
        "--api-key",
        "sekrit",
        "--max-request-body-bytes",
        "2000",
        "--num-gpu-blocks-override",
        "64",
    ]);
    let port = server.port;
    let auth = [("Authorization", "Bearer sekrit")];
    let post_auth = |path: &str, body: &str| request(port, "POST", path, &auth, body.as_bytes());

    // 401: no key, a wrong key; the right key passes; probes need none.
    assert_error(&post(port, "/v1/completions", &json!({"prompt": "a"})), 401, "AuthenticationError", "API key");
    let wrong = request(port, "POST", "/v1/completions", &[("Authorization", "Bearer sekriT")], b"{\"prompt\": \"a\"}");
    assert_error(&wrong, 401, "AuthenticationError", "API key");
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    assert_eq!(post_auth("/v1/completions", r#"{"prompt": "a", "max_tokens": 1}"#).status, 200);
    assert_eq!(get(port, "/health").status, 200);
    assert_eq!(get(port, "/metrics").status, 200);

    // 400: malformed JSON, wrong types, values out of range, context too long, bad token ids.
    let cases: Vec<(&str, &str, Option<&str>)> = vec![
        (r#"{"prompt": "a""#, "not valid JSON", None),
        (r#"{"prompt": "a", "temperature": "hot"}"#, "invalid value for 'temperature'", Some("temperature")),
        (r#"{"prompt": "a", "max_tokens": -3}"#, "invalid value for 'max_tokens'", Some("max_tokens")),
        (r#"{"prompt": {"x": 1}}"#, "invalid value for 'prompt'", Some("prompt")),
        (r#"{"prompt": "a", "top_p": 1.5}"#, "top_p must be in (0, 1], got 1.5", Some("top_p")),
        (r#"{"prompt": "a", "n": 0}"#, "n must be between 1 and 128", Some("n")),
        (r#"{"prompt": "a", "logprobs": 21}"#, "at most 20 logprobs", Some("logprobs")),
        (r#"{"prompt": "a", "logit_bias": {"x": 1}}"#, "logit_bias keys must be token ids", Some("logit_bias")),
        (
            r#"{"prompt": "a", "max_tokens": 600}"#,
            "maximum context length is 512 tokens, but 602 were requested (2 in the prompt, 600 for the completion)",
            Some("max_tokens"),
        ),
        (
            r#"{"prompt": [1, 2, 5000]}"#,
            "token id 5000 in the prompt is outside the vocabulary of 1024",
            Some("prompt"),
        ),
        (r#"{"prompt": "a", "temperature": -1}"#, "temperature must be at least 0", Some("temperature")),
    ];
    for (body, message, param) in cases {
        let resp = post_auth("/v1/completions", body);
        assert_error(&resp, 400, "BadRequestError", message);
        assert_eq!(resp.json()["error"]["param"], json!(param), "{body}");
    }
    let resp = post_auth("/v1/chat/completions", r#"{"messages": []}"#);
    assert_error(&resp, 400, "BadRequestError", "messages must not be empty");
    let resp = post_auth("/detokenize", r#"{"tokens": [1, 99999]}"#);
    assert_error(&resp, 400, "BadRequestError", "token id 99999 is outside the vocabulary");

    // 404: an unknown model or route; 405: a known route with the wrong method.
    assert_error(
        &post_auth("/v1/completions", r#"{"model": "gpt-4", "prompt": "a"}"#),
        404,
        "NotFoundError",
        "the model 'gpt-4' does not exist",
    );
    assert_error(&get(port, "/v1/nothing"), 404, "NotFoundError", "route GET /v1/nothing not found");
    assert_eq!(post_auth("/v1/completions", r#"{"model": "tiny", "prompt": "a", "max_tokens": 1}"#).status, 200);
    let resp = request(port, "GET", "/v1/completions", &auth, b"");
    assert_error(&resp, 405, "MethodNotAllowedError", "accepts POST");
    assert_eq!(resp.header("allow"), Some("POST"));

    // 413: a body over the limit, declared or not.
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(3000));
    assert_error(
        &post_auth("/v1/completions", &big),
        413,
        "PayloadTooLargeError",
        "larger than the limit of 2000 bytes",
    );
    // Exactly at the limit is accepted (JSON whitespace pads it).
    let mut at_limit = r#"{"prompt": "a", "max_tokens": 1}"#.to_string();
    at_limit.push_str(&" ".repeat(2000 - at_limit.len()));
    assert_eq!(post_auth("/v1/completions", &at_limit).status, 200);
}

#[test]
fn a_full_queue_gets_429_with_retry_after() {
    // One running sequence and one waiting fill the queue; the demo model is slow enough that
    // both are still there when the third request arrives.
    let server = Server::start(&["--max-num-seqs", "1", "--max-queue", "1"]);
    let long = json!({"prompt": "a", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut first = EventStream::open(server.port, "/v1/completions", &long);
    assert!(first.next_event().is_some());
    let _second = EventStream::open(server.port, "/v1/completions", &long);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("vllm:num_requests_waiting{model_name=\"pagoda-demo-random-weights\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never waited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let resp = post(server.port, "/v1/completions", &json!({"prompt": "a", "max_tokens": 1}));
    assert_error(&resp, 429, "RateLimitError", "queue is full");
    assert_eq!(resp.header("retry-after"), Some("1"));
    // A request that could never fit is a client error, not a retry.
    let resp = post(server.port, "/v1/completions", &json!({"prompt": "a", "max_tokens": 1, "n": 2}));
    assert_error(&resp, 400, "BadRequestError", "more than the queue holds");
}

#[test]
fn loading_answers_503_and_ready_follows_the_model() {
    // The tokenizer is a named pipe: loading blocks on it until the test writes it.
    let dir = copy_fixture("tiny-llama", "server-slow-load");
    let tokenizer = std::fs::read(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let fifo = std::ffi::CString::new(dir.join("tokenizer.json").to_str().unwrap()).unwrap();
    // SAFETY: creating a FIFO at a path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let server = Server::spawn(&["--model", dir.to_str().unwrap()], &[]);
    assert_eq!(get(server.port, "/health").status, 200, "alive while loading");
    let ready = get(server.port, "/ready");
    assert_eq!((ready.status, ready.json()["status"].clone()), (503, json!("loading")));
    let resp = post(server.port, "/v1/completions", &json!({"prompt": "a"}));
    assert_error(&resp, 503, "ServiceUnavailableError", "still loading");
    assert_eq!(get(server.port, "/version").json()["backend"], Value::Null);
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    server.wait_ready();
    assert_eq!(post(server.port, "/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).status, 200);
    assert_eq!(get(server.port, "/version").json()["backend"], "cpu");
}

#[test]
fn info_endpoints_and_request_ids() {
    let server = Server::start(&["--served-model-name", "demo"]);
    let models = get(server.port, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "demo");
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    let v = get(server.port, "/version").json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["model"], "demo");
    assert_eq!(v["cloud"]["provider"], "none");
    assert!(v["git_commit"].as_str().unwrap().len() >= 7);
    let t = post(server.port, "/tokenize", &json!({"prompt": "Hello", "return_token_strs": true})).json();
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    assert_eq!(t["token_strs"][0], "<|begin_of_text|>");
    let d = post(server.port, "/detokenize", &json!({"tokens": t["tokens"]})).json();
    assert_eq!(d["prompt"], "<|begin_of_text|>Hello");

    let resp = request(
        server.port,
        "POST",
        "/v1/completions",
        &[("x-request-id", "trace-me-42")],
        br#"{"prompt": "a", "max_tokens": 1}"#,
    );
    assert_eq!(resp.header("x-request-id"), Some("trace-me-42"));
    assert_eq!(resp.json()["id"], "cmpl-trace-me-42");
    let generated = get(server.port, "/version");
    assert_eq!(generated.header("x-request-id").unwrap().len(), 32);
    // A client's request id may repeat (retries, proxies): concurrent requests with one id both work.
    let port = server.port;
    let same_id: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let body = br#"{"prompt": "a", "max_tokens": 20, "ignore_eos": true}"#;
                request(port, "POST", "/v1/completions", &[("x-request-id", "dup-1")], body)
            })
        })
        .collect();
    for handle in same_id {
        let resp = handle.join().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["choices"][0]["finish_reason"], "length");
        assert_eq!(resp.json()["usage"]["completion_tokens"], 20);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.log().contains("trace-me-42"), "the request id is in the logs");
}

#[test]
fn cors_is_off_by_default_and_follows_allowed_origins() {
    let server = Server::start(&[]);
    let resp = request(server.port, "GET", "/v1/models", &[("Origin", "http://a.example")], b"");
    assert_eq!(resp.header("access-control-allow-origin"), None);
    let preflight = request(server.port, "OPTIONS", "/v1/completions", &[("Origin", "http://a.example")], b"");
    assert_eq!(preflight.status, 405);
    assert_eq!(preflight.header("access-control-allow-origin"), None);
    drop(server);

    let server = Server::start(&["--allowed-origins", "http://a.example,http://b.example"]);
    let preflight = request(
        server.port,
        "OPTIONS",
        "/v1/chat/completions",
        &[("Origin", "http://b.example"), ("Access-Control-Request-Method", "POST")],
        b"",
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("http://b.example"));
    assert_eq!(preflight.header("access-control-allow-methods"), Some("*"));
    let resp = request(server.port, "GET", "/v1/models", &[("Origin", "http://a.example")], b"");
    assert_eq!(resp.header("access-control-allow-origin"), Some("http://a.example"));
    let resp = request(server.port, "GET", "/v1/models", &[("Origin", "http://evil.example")], b"");
    assert_eq!(resp.header("access-control-allow-origin"), None);
}

#[test]
fn settings_come_from_pagoda_environment_variables_and_logs_can_be_json() {
    let key_file = scratch_dir("server-keyfile").join("keys");
    std::fs::write(&key_file, "\nfrom-file\n").unwrap();
    let server = Server::spawn(
        &["--log-format", "json"],
        &[
            ("PAGODA_API_KEY", "from-env"),
            ("PAGODA_API_KEY_FILE", key_file.to_str().unwrap()),
            ("PAGODA_SERVED_MODEL_NAME", "env-name"),
        ],
    );
    server.wait_ready();
    for key in ["from-env", "from-file"] {
        let resp = request(server.port, "GET", "/v1/models", &[("Authorization", &format!("Bearer {key}"))], b"");
        assert_eq!(resp.json()["data"][0]["id"], "env-name");
    }
    assert_eq!(get(server.port, "/v1/models").status, 401);
    let log = server.log();
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    let parsed: Value = serde_json::from_str(line).expect("log lines are JSON");
    assert_eq!(parsed["level"], "INFO");
}

/// An empty key never turns authentication off: it stops the server at start with one line.
#[test]
fn empty_api_keys_are_refused_at_start() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        (&["--api-key", ""], &[]),
        (&["--api-key", " "], &[]),
        (&["--api-key", " , "], &[]),
        (&["--api-key", "good,"], &[]),
        (&[], &[("PAGODA_API_KEY", "")]),
    ];
    for (args, env) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"]).args(args).env_remove("PAGODA_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("holds an empty key"), "{args:?} {env:?}: {stderr}");
    }
}

/// The `Bearer` scheme is matched case-insensitively (RFC 9110), the key exactly.
#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let server = tiny_llama_server(&["--api-key", "k3y"]);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = request(server.port, "GET", "/v1/models", &[("Authorization", &format!("{scheme} k3y"))], b"");
        assert_eq!(resp.status, 200, "{scheme}");
    }
    for wrong in ["Bearer K3Y", "Basic k3y", "Bearerk3y", "k3y"] {
        let resp = request(server.port, "GET", "/v1/models", &[("Authorization", wrong)], b"");
        assert_eq!(resp.status, 401, "{wrong}");
    }
}

/// `/version` answers anyone, but names the model (by default its path) only with the key.
#[test]
fn version_names_the_model_only_to_a_caller_with_the_key() {
    let server = tiny_llama_server(&["--api-key", "k3y"]);
    let open = get(server.port, "/version").json();
    assert_eq!(open["version"], env!("CARGO_PKG_VERSION"));
    assert!(open.get("model").is_none(), "{open}");
    assert!(!open.to_string().contains("tiny-llama"), "the model's path leaked: {open}");
    let keyed = request(server.port, "GET", "/version", &[("Authorization", "Bearer k3y")], b"").json();
    assert!(keyed["model"].as_str().unwrap().ends_with("tiny-llama"), "{keyed}");
}

#[test]
fn serve_help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--api-key",
        "--api-key-file",
        "--max-queue",
        "--shutdown-timeout",
        "--allowed-origins",
        "--enable-prefix-caching",
        "--dtype",
        "--kv-cache-memory-bytes",
        "--num-gpu-blocks-override",
        "--log-format",
        "--max-request-body-bytes",
        "--generation-config",
        "--tensor-parallel-size",
        "--seed",
        "--max-logprobs",
        "--chat-template",
        "--trust-remote-code",
        "--enable-log-requests",
        "--enable-force-include-usage",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "--enable-tokenizer-info-endpoint",
        "[MODEL]",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    assert!(help.contains("[env: PAGODA_MAX_MODEL_LEN="), "flags name their environment variables");
}
