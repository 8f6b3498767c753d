//! vLLM's command line starts Pagoda (issue 13, section 4): `pagoda serve MODEL` with the flags
//! vLLM users pass most, each doing what vLLM's does, a repeated flag taking its last value.

use std::process::Command;

use serde_json::{Value, json};

use crate::common::fixture;
use crate::http::{EventStream, get, post};
use crate::server::Server;

#[test]
fn a_vllm_command_line_serves_with_every_flag_in_effect() {
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let server = Server::start(&[
        model,
        "--num-gpu-blocks-override",
        "256",
        "--served-model-name",
        "first",
        "second",
        "--max-num-seqs",
        "4",
        "--max-num-seqs",
        "8",
        "--trust-remote-code",
        "--enforce-eager",
        "--tensor-parallel-size",
        "1",
        "--max-logprobs",
        "2",
        "--enable-force-include-usage",
        "--enable-log-requests",
        "--chat-template",
        "{% for m in messages %}<{{ m['content'] }}>{% endfor %}",
    ]);
    let ids: Vec<Value> =
        get(server.port, "/v1/models").json()["data"].as_array().unwrap().iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids, vec![json!("first"), json!("second")]);
    // Either name reaches the model, and the response says the one used.
    let body = |model: &str| json!({"model": model, "prompt": "Hi", "max_tokens": 3, "ignore_eos": true});
    assert_eq!(post(server.port, "/v1/completions", &body("second")).json()["model"], "second");
    assert_eq!(post(server.port, "/v1/completions", &body("first")).json()["model"], "first");
    assert_eq!(post(server.port, "/v1/completions", &body("third")).status, 404);
    // --max-logprobs: at the limit accepted, one over refused with the flag named.
    let logprobs = |k: u32| json!({"prompt": "Hi", "max_tokens": 2, "logprobs": k});
    assert_eq!(post(server.port, "/v1/completions", &logprobs(2)).status, 200);
    let over = post(server.port, "/v1/completions", &logprobs(3));
    assert_eq!(over.status, 400);
    assert!(over.text().contains("--max-logprobs"), "{}", over.text());
    // --enable-force-include-usage: a stream that did not ask still ends with its usage.
    let events = EventStream::open(
        server.port,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 3, "ignore_eos": true, "stream": true}),
    )
    .collect();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 3, "{events:?}");
    // --chat-template given inline replaces the model's.
    let rendered = post(server.port, "/tokenize", &json!({"messages": [{"role": "user", "content": "Hi"}]})).json();
    let expected = post(server.port, "/tokenize", &json!({"prompt": "<Hi>", "add_special_tokens": false})).json();
    assert_eq!(rendered["tokens"], expected["tokens"]);
    // --enable-log-requests logs each request's parameters.
    assert!(server.log().contains("received request"), "{}", server.log());
}

#[test]
fn a_seeded_server_replays_unseeded_requests_and_their_draws_still_differ() {
    let model = fixture("tiny-llama");
    let texts = |seed: &str| {
        let server = Server::start(&[model.to_str().unwrap(), "--num-gpu-blocks-override", "256", "--seed", seed]);
        let body = json!({"prompt": "Once", "max_tokens": 16, "temperature": 1.0, "ignore_eos": true});
        (0..2)
            .map(|_| post(server.port, "/v1/completions", &body).json()["choices"][0]["text"].clone())
            .collect::<Vec<_>>()
    };
    let a = texts("7");
    assert_eq!(a, texts("7"), "the same requests in the same order draw the same");
    assert_ne!(a[0], a[1], "each unseeded request still draws its own numbers");
    assert_ne!(a, texts("8"));
}

#[test]
fn parallelism_over_one_gpu_and_a_model_given_twice_are_refused_at_start() {
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    for flags in [["-tp", "2"], ["--pipeline-parallel-size", "2"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["generate", "--model", model, "--prompt", "x"])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("Pagoda runs a model on one GPU"), "{flags:?}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda")).args(["serve", model, "--model", model]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["generate", "--prompt", "x", "--chat-template", "/no/such/template.jinja"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file, and not a template"), "{out:?}");
}
