//! A request field is implemented or refused, never accepted and ignored (issue 13): every field
//! of OpenAI's API and vLLM's that Pagoda does not implement yet is a 400 naming it, unless its
//! value asks for the default behaviour.

use serde_json::{Value, json};

use crate::http::post;
use crate::server::tiny_llama_server;
use pagoda::api::openai::UNSUPPORTED_FIELDS;

fn body(chat: bool, field: &str, value: Value) -> Value {
    let mut body = if chat {
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    } else {
        json!({"prompt": "Hi", "max_tokens": 2})
    };
    body[field] = value;
    body
}

#[test]
fn every_unimplemented_field_is_refused_unless_it_asks_for_the_default() {
    let server = tiny_llama_server(&[]);
    for f in UNSUPPORTED_FIELDS {
        for (chat, path) in [(false, "/v1/completions"), (true, "/v1/chat/completions")] {
            if f.chat_only && !chat {
                continue;
            }
            let resp = post(server.port, path, &body(chat, f.name, json!({"some": "value"})));
            assert_eq!(resp.status, 400, "{path} {}: {}", f.name, resp.text());
            assert_eq!(resp.json()["error"]["param"], f.name, "{path}: {}", resp.text());
            assert!(resp.json()["error"]["message"].as_str().unwrap().contains("not supported"), "{}", resp.text());
            for neutral in (f.neutral)() {
                let resp = post(server.port, path, &body(chat, f.name, neutral.clone()));
                assert_eq!(resp.status, 200, "{path} {} = {neutral}: {}", f.name, resp.text());
            }
        }
    }
    // The functions API that tools replaced says so.
    let resp = post(server.port, "/v1/chat/completions", &body(true, "functions", json!([{"name": "f"}])));
    assert!(resp.json()["error"]["message"].as_str().unwrap().contains("use tools and tool_choice"), "{}", resp.text());
}

#[test]
fn stream_options_need_stream_and_continuous_usage_needs_usage() {
    let server = tiny_llama_server(&[]);
    for chat in [false, true] {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let resp = post(server.port, path, &body(chat, "stream_options", json!({"include_usage": true})));
        assert_eq!(resp.status, 400, "{}", resp.text());
        assert_eq!(resp.json()["error"]["param"], "stream_options");
        let mut continuous = body(chat, "stream_options", json!({"continuous_usage_stats": true}));
        continuous["stream"] = json!(true);
        let resp = post(server.port, path, &continuous);
        assert_eq!(resp.status, 400, "{}", resp.text());
        assert_eq!(resp.json()["error"]["param"], "stream_options.continuous_usage_stats");
        // `stream_options: null` without a stream is no option at all.
        assert_eq!(post(server.port, path, &body(chat, "stream_options", Value::Null)).status, 200);
    }
}
