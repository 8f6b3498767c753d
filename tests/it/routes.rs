//! Routes and response shapes vLLM's clients expect (issue 13, section 5): `/v1/models/{id}`,
//! `refusal: null`, completion chunks without `usage` unless asked, `/tokenizer_info`,
//! SageMaker's `/invocations` and `/ping`, and a clean connection after an early error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::http::{EventStream, get, post, request};
use crate::server::tiny_llama_server;

#[test]
fn model_cards_refusals_and_usage_in_completion_chunks() {
    let server = tiny_llama_server(&["--served-model-name", "org/tiny", "alias"]);
    let card = get(server.port, "/v1/models/org%2Ftiny").json();
    assert_eq!((card["id"].clone(), card["object"].clone()), (json!("org/tiny"), json!("model")), "{card}");
    assert_eq!(get(server.port, "/v1/models/alias").json()["id"], "alias");
    assert_eq!(get(server.port, "/v1/models/other").status, 404);

    let chat = post(
        server.port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    )
    .json();
    let message = &chat["choices"][0]["message"];
    assert!(message.as_object().unwrap().contains_key("refusal") && message["refusal"].is_null(), "{message}");

    let body = json!({"prompt": "Hi", "max_tokens": 3, "ignore_eos": true, "stream": true});
    let events = EventStream::open(server.port, "/v1/completions", &body).collect();
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert!(!chunk.as_object().unwrap().contains_key("usage"), "usage not asked for: {e}");
    }
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let events = EventStream::open(server.port, "/v1/completions", &asked).collect();
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c["usage"].is_null() && c.as_object().unwrap().contains_key("usage")));
    assert_eq!(last["usage"]["completion_tokens"], 3);
}

#[test]
fn tokenizer_info_is_served_only_when_enabled() {
    let off = tiny_llama_server(&[]);
    let resp = get(off.port, "/tokenizer_info");
    assert_eq!(resp.status, 404);
    assert!(resp.text().contains("--enable-tokenizer-info-endpoint"), "{}", resp.text());
    let on = tiny_llama_server(&["--enable-tokenizer-info-endpoint", "--chat-template", "{{ messages }}"]);
    let info = get(on.port, "/tokenizer_info").json();
    assert!(info["tokenizer_class"].is_string(), "{info}");
    assert_eq!(info["chat_template"], "{{ messages }}");
}

#[test]
fn sagemaker_invocations_route_by_body_and_ping_says_ready() {
    let server = tiny_llama_server(&[]);
    let chat =
        post(server.port, "/invocations", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}));
    assert_eq!(chat.json()["object"], "chat.completion", "{}", chat.text());
    let completion = post(server.port, "/invocations", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(completion.json()["object"], "text_completion", "{}", completion.text());
    let neither = post(server.port, "/invocations", &json!({"input": "Hi"}));
    assert_eq!(neither.status, 400);
    assert!(neither.text().contains("messages") && neither.text().contains("prompt"), "{}", neither.text());
    for method in ["GET", "POST"] {
        let ping = request(server.port, method, "/ping", &[], b"");
        assert_eq!((ping.status, ping.body.len()), (200, 0), "{method} /ping");
    }
}

#[test]
fn an_early_error_with_an_unread_body_closes_the_connection() {
    let server = tiny_llama_server(&["--api-key", "right"]);
    let cases: [(&str, &str, &str); 3] = [
        ("POST", "/v1/completions", "Authorization: Bearer wrong\r\n"),
        ("POST", "/no/such/route", ""),
        ("PUT", "/v1/completions", "Authorization: Bearer right\r\n"),
    ];
    for (method, path, auth) in cases {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = r#"{"prompt": "Hi", "max_tokens": 2}"#;
        // The first request's body, then a second request on the same connection.
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
             GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            body.len()
        );
        stream.write_all(raw.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let head = answer.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.contains("connection: close"), "{method} {path}: {answer}");
        assert!(!answer.contains("HTTP/1.1 400"), "the body was never read as a request: {answer}");
    }
    // A fresh connection is served.
    assert_eq!(get(server.port, "/health").status, 200);
}
