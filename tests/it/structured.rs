//! Structured outputs (issue 13, section 1) through the real server: the `openai` client's
//! outputs hold to their schema, regex, choice or grammar at temperature 1 for many seeds on the
//! random-weight fixture; every malformed or unsupported constraint is a 400 naming the field.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::tool_missing;
use crate::http::{EventStream, post};
use crate::server::tiny_llama_server;

#[test]
fn structured_outputs_hold_at_temperature_one_for_many_seeds_with_the_openai_client() {
    let python = match crate::operations::python_with_openai() {
        Ok(p) => p,
        Err(why) => return tool_missing(&format!("the structured outputs test needs Python with openai: {why}")),
    };
    let has_jsonschema =
        Command::new(&python).args(["-c", "import jsonschema"]).status().map(|s| s.success()).unwrap_or(false);
    if !has_jsonschema {
        return tool_missing("the structured outputs test needs the jsonschema package (./test.sh installs it)");
    }
    let server = tiny_llama_server(&["--served-model-name", "tiny"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/structured_outputs.py");
    let out = Command::new(python).arg(script).arg(format!("http://127.0.0.1:{}/v1", server.port)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "structured outputs failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(stdout.contains("all structured output checks passed"), "{stdout}");
}

#[test]
fn every_bad_constraint_is_a_400_that_names_its_field() {
    let server = tiny_llama_server(&[]);
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs", "invalid regex"),
        (json!({"structured_outputs": {"json": {"type": "nonsense"}}}), "structured_outputs", "nonsense"),
        (json!({"structured_outputs": {"json": "{not json"}}), "structured_outputs", "not a JSON schema"),
        (json!({"structured_outputs": {"grammar": "start: undefined_rule"}}), "structured_outputs", "undefined_rule"),
        (json!({"structured_outputs": {"grammar": "  "}}), "structured_outputs", "empty"),
        (json!({"structured_outputs": {"choice": []}}), "structured_outputs", "at least one"),
        (json!({"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs", "not supported"),
        (json!({"structured_outputs": {"regexp": "a"}}), "structured_outputs", "unknown field"),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
            "only one structured-output constraint",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
            "response_format, guided_regex",
        ),
        (json!({"response_format": {"type": "json_schema"}}), "response_format", "needs json_schema.schema"),
        (json!({"response_format": {"type": "yaml"}}), "response_format", "not supported"),
        (json!({"response_format": {"type": "json_object"}, "ignore_eos": true}), "ignore_eos", "ignore_eos"),
        (json!({"structured_outputs": {"json": schema}, "min_tokens": 3}), "min_tokens", "min_tokens"),
        (json!({"guided_json": schema, "guided_decoding_backend": "xgrammar"}), "guided_decoding_backend", "guidance"),
        // Token 0 (<unk>) can start no choice: the two constraints contradict each other.
        (
            json!({"structured_outputs": {"choice": ["yes"]}, "allowed_token_ids": [0]}),
            "allowed_token_ids",
            "none of allowed_token_ids",
        ),
    ];
    for (fields, param, words) in cases {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let mut body = if path == "/v1/completions" {
                json!({"prompt": "Hi", "max_tokens": 8})
            } else {
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
            };
            for (k, v) in fields.as_object().unwrap() {
                body[k] = v.clone();
            }
            let resp = post(server.port, path, &body);
            assert_eq!(resp.status, 400, "{path} {fields}: {}", resp.text());
            let error = &resp.json()["error"];
            // A field inside `structured_outputs` may be named by its path.
            assert!(error["param"].as_str().is_some_and(|p| p.starts_with(param)), "{path} {fields}: {error}");
            let message = error["message"].as_str().unwrap();
            assert!(message.contains(words), "{path} {fields}: {message:?} should say {words:?}");
        }
    }
    // A constraint at its size limit compiles; one byte over is refused.
    let limit = pagoda::engine::structured::MAX_GRAMMAR_BYTES;
    let at = post(
        server.port,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4, "structured_outputs": {"choice": ["a".repeat(limit)]}}),
    );
    assert_eq!(at.status, 200, "{}", at.text());
    let over = post(
        server.port,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4, "structured_outputs": {"choice": ["a".repeat(limit + 1)]}}),
    );
    assert_eq!(over.status, 400, "{}", over.text());
    assert!(over.json()["error"]["message"].as_str().unwrap().contains("at most"), "{}", over.text());
    // `text` is no constraint at all.
    let text = post(
        server.port,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4, "ignore_eos": true, "response_format": {"type": "text"}}),
    );
    assert_eq!(text.status, 200, "{}", text.text());
}

/// `n` sequences of one request each walk their own copy of the grammar, streamed, and a
/// sequence cut by `max_tokens` before its grammar ends says `length`.
#[test]
fn each_of_n_sequences_keeps_its_own_grammar_and_a_cut_output_says_length() {
    let server = tiny_llama_server(&[]);
    let body = json!({"prompt": "Go", "max_tokens": 30, "temperature": 1.0, "seed": 5, "n": 6, "stream": true,
        "structured_outputs": {"regex": "(ab|cd){2,4}!"}});
    let mut texts = vec![String::new(); 6];
    let mut finish = vec![Value::Null; 6];
    for event in EventStream::open(server.port, "/v1/completions", &body).collect() {
        if event == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        for choice in chunk["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish[i] = choice["finish_reason"].clone();
            }
        }
    }
    for (text, finish) in texts.iter().zip(&finish) {
        assert_eq!(finish, "stop", "{texts:?}");
        let body = text.strip_suffix('!').unwrap_or_else(|| panic!("{text:?} ends with !"));
        assert!(body.len() % 2 == 0 && (4..=8).contains(&body.len()), "{text:?}");
        assert!(body.as_bytes().chunks(2).all(|p| p == b"ab" || p == b"cd"), "{text:?}");
    }
    let cut = post(
        server.port,
        "/v1/completions",
        &json!({"prompt": "Go", "max_tokens": 2, "structured_outputs": {"regex": "x{20}"}}),
    );
    let choice = &cut.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{choice}");
    assert!(choice["text"].as_str().unwrap().chars().all(|c| c == 'x'), "{choice}");
}
