//! vLLM's request fields of issue 13, section 3 that are not prompt logprobs: `allowed_token_ids`,
//! `bad_words`, `truncate_prompt_tokens`, `return_token_ids`, `return_tokens_as_token_ids`,
//! `logprobs: 0` and `stream_options.continuous_usage_stats`.

use serde_json::{Value, json};

use crate::http::{EventStream, post};
use crate::server::tiny_llama_server;

fn completion(port: u16, body: Value) -> Value {
    let resp = post(port, "/v1/completions", &body);
    assert_eq!(resp.status, 200, "{body}: {}", resp.text());
    resp.json()
}

#[test]
fn allowed_token_ids_and_bad_words_hold_at_temperature_one() {
    let server = tiny_llama_server(&[]);
    let allowed = [7u32, 100, 300, 999];
    let out = completion(
        server.port,
        json!({"prompt": "Hi", "max_tokens": 24, "temperature": 1.0, "seed": 1, "n": 4, "ignore_eos": true,
               "allowed_token_ids": allowed, "return_token_ids": true}),
    );
    for choice in out["choices"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).unwrap();
        assert_eq!(ids.len(), 24);
        assert!(ids.iter().all(|t| allowed.contains(t)), "{ids:?}");
    }
    for (bad, words) in [(json!([]), "must not be empty"), (json!([5000]), "outside the vocabulary")] {
        let resp = post(server.port, "/v1/completions", &json!({"prompt": "Hi", "allowed_token_ids": bad}));
        assert_eq!(resp.status, 400);
        assert!(resp.text().contains(words), "{}", resp.text());
    }

    // Greedy picks some token first; once it is a bad word, it never appears.
    let greedy =
        json!({"prompt": "Hi", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let first: u32 =
        serde_json::from_value(completion(server.port, greedy.clone())["choices"][0]["token_ids"][0].clone()).unwrap();
    let word =
        post(server.port, "/detokenize", &json!({"tokens": [first]})).json()["prompt"].as_str().unwrap().to_string();
    let mut banned = greedy.clone();
    banned["bad_words"] = json!([word]);
    let ids: Vec<u32> =
        serde_json::from_value(completion(server.port, banned)["choices"][0]["token_ids"].clone()).unwrap();
    assert!(!ids.contains(&first), "bad word {word:?} (token {first}) generated: {ids:?}");
}

#[test]
fn prompts_are_truncated_and_token_ids_returned() {
    let server = tiny_llama_server(&[]);
    let prompt: Vec<u32> = (10..30).collect();
    let out = completion(
        server.port,
        json!({"prompt": prompt, "max_tokens": 3, "ignore_eos": true, "truncate_prompt_tokens": 5, "return_token_ids": true,
               "logprobs": 0, "return_tokens_as_token_ids": true}),
    );
    assert_eq!(out["usage"]["prompt_tokens"], 5);
    let choice = &out["choices"][0];
    assert_eq!(choice["prompt_token_ids"], json!([25, 26, 27, 28, 29]));
    let ids = choice["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    // logprobs 0: the sampled token's logprob only, named by its id.
    let tokens = choice["logprobs"]["tokens"].as_array().unwrap();
    let named: Vec<String> = ids.iter().map(|t| format!("token_id:{t}")).collect();
    assert_eq!(tokens.iter().map(|t| t.as_str().unwrap().to_string()).collect::<Vec<_>>(), named);
    assert_eq!(choice["logprobs"]["token_logprobs"].as_array().unwrap().len(), 3);
    // -1 keeps what the context holds; 0 and more than the context are refused.
    let all = completion(server.port, json!({"prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": -1}));
    assert_eq!(all["usage"]["prompt_tokens"], 20);
    for k in [0, -2, 513] {
        let resp = post(server.port, "/v1/completions", &json!({"prompt": prompt, "truncate_prompt_tokens": k}));
        assert_eq!(resp.status, 400, "truncate_prompt_tokens {k}");
        assert_eq!(resp.json()["error"]["param"], "truncate_prompt_tokens");
    }
    // Chat: the prompt's ids at the top, each choice's own.
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let chat = post(
        server.port,
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 2, "ignore_eos": true, "return_token_ids": true}),
    )
    .json();
    let rendered = post(server.port, "/tokenize", &json!({"messages": messages})).json();
    assert_eq!(chat["prompt_token_ids"], rendered["tokens"]);
    assert_eq!(chat["choices"][0]["token_ids"].as_array().unwrap().len(), 2);
}

#[test]
fn continuous_usage_counts_every_chunk() {
    let server = tiny_llama_server(&[]);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"max_tokens": 5, "ignore_eos": true, "stream": true, "return_token_ids": true,
                              "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        if path == "/v1/completions" {
            body["prompt"] = json!("Hi");
        } else {
            body["messages"] = json!([{"role": "user", "content": "Hi"}]);
        }
        let events = EventStream::open(server.port, path, &body).collect();
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let counts: Vec<u64> = chunks
            .iter()
            .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()) && !c["usage"].is_null())
            .map(|c| c["usage"]["completion_tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, vec![1, 2, 3, 4, 5], "{path}: {events:?}");
        let streamed: usize = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .map(|c| c["token_ids"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(streamed, 5, "{path}");
    }
    // With n = 2 each choice counts its own tokens, as vLLM reports them.
    let body = json!({"prompt": "Hi", "max_tokens": 4, "n": 2, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let mut last = [0u64; 2];
    for e in EventStream::open(server.port, "/v1/completions", &body).collect() {
        let Ok(chunk) = serde_json::from_str::<Value>(&e) else { continue };
        if let Some(choice) = chunk["choices"].as_array().and_then(|a| a.first()) {
            let i = choice["index"].as_u64().unwrap() as usize;
            let count = chunk["usage"]["completion_tokens"].as_u64().unwrap();
            assert_eq!(count, last[i] + 1, "choice {i}: {e}");
            last[i] = count;
        }
    }
    assert_eq!(last, [4, 4]);
}
