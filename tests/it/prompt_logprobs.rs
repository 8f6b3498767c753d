//! Logprobs of the prompt (issue 13, section 3): vLLM's `prompt_logprobs` on both endpoints, and
//! `echo` with `logprobs` on completions, as evaluation harnesses ask for them
//! (lm-evaluation-harness's loglikelihood: `echo`, `logprobs: 1`, `max_tokens: 0`), checked
//! against transformers' logprobs of the fixtures' teacher-forced tokens.

use serde_json::{Value, json};

use crate::common::reference;
use crate::http::{EventStream, post};
use crate::server::tiny_llama_server;

const TOLERANCE: f64 = 2e-3;

/// A fixture prompt followed by its greedy continuation, and transformers' logprob of each of
/// those greedy tokens (`logprobs[j]` is token `prompt_len + j`'s).
fn teacher_forced(idx: usize) -> (Vec<u32>, usize, Vec<f64>) {
    let r = reference("tiny-llama");
    let p = &r.prompts[idx];
    let ids = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
    (ids, p.prompt_ids.len(), p.steps.iter().map(|s| s.logprob as f64).collect())
}

fn ok(port: u16, path: &str, body: &Value) -> Value {
    let resp = post(port, path, body);
    assert_eq!(resp.status, 200, "{body}: {}", resp.text());
    resp.json()
}

#[test]
fn echo_with_logprobs_gives_the_prompts_loglikelihood_as_transformers_computes_it() {
    let server = tiny_llama_server(&[]);
    let (ids, prompt_len, expected) = teacher_forced(3);
    // lm-evaluation-harness's loglikelihood request: the prompt alone, greedy, one top logprob.
    let body = json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0});
    let out = ok(server.port, "/v1/completions", &body);
    let choice = &out["choices"][0];
    let text = post(server.port, "/detokenize", &json!({"tokens": ids})).json()["prompt"].clone();
    assert_eq!(choice["text"], text, "the prompt alone, nothing generated");
    let lp = &choice["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!((token_logprobs.len(), top.len(), tokens.len()), (ids.len(), ids.len(), ids.len()));
    assert!(token_logprobs[0].is_null() && top[0].is_null(), "nothing predicts the first token");
    for (j, want) in expected.iter().enumerate() {
        let k = prompt_len + j;
        let got = token_logprobs[k].as_f64().unwrap();
        assert!((got - want).abs() < TOLERANCE, "token {k}: logprob {got}, transformers {want}");
        // Each greedy token is the most likely one: lm-evaluation-harness's `is_greedy`.
        let best = top[k].as_object().unwrap();
        assert_eq!(best.len(), 1);
        assert_eq!(best.keys().next().unwrap(), tokens[k].as_str().unwrap(), "token {k}");
    }
    // Offsets run over the tokens' texts.
    let offsets: Vec<u64> = serde_json::from_value(lp["text_offset"].clone()).unwrap();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0, "{offsets:?}");
    // The token generated (as vLLM, one is) is computed and counted, not returned.
    assert_eq!(out["usage"]["completion_tokens"], 1);
    assert_eq!(out["usage"]["prompt_tokens"], ids.len());

    // With generation, the echoed prompt's logprobs come first, then the generated tokens'.
    let body = json!({"prompt": &ids[..prompt_len], "max_tokens": 4, "echo": true, "logprobs": 2, "temperature": 0,
                      "ignore_eos": true});
    let out = ok(server.port, "/v1/completions", &body);
    let lp = &out["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), prompt_len + 4);
    for (j, want) in expected[..4].iter().enumerate() {
        let got = token_logprobs[prompt_len + j].as_f64().unwrap();
        assert!((got - want).abs() < TOLERANCE, "generated token {j}: {got} vs {want}");
    }
    assert!(lp["top_logprobs"][1].as_object().unwrap().len() <= 2);

    // Streamed: the choice's first chunk echoes the prompt with its logprobs.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = EventStream::open(server.port, "/v1/completions", &streamed).collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    let first_lp = &first["choices"][0]["logprobs"];
    assert!(first_lp["token_logprobs"][0].is_null());
    assert_eq!(first_lp["tokens"].as_array().unwrap().len(), prompt_len + 1, "the prompt and the first token");
    assert_eq!(first_lp["token_logprobs"][prompt_len], token_logprobs[prompt_len]);
}

#[test]
fn prompt_logprobs_come_in_vllms_format_on_both_endpoints_and_limits_hold() {
    let server = tiny_llama_server(&[]);
    let (ids, prompt_len, expected) = teacher_forced(1);
    let body = json!({"prompt": ids, "max_tokens": 2, "prompt_logprobs": 3, "n": 2, "temperature": 1, "seed": 4});
    let out = ok(server.port, "/v1/completions", &body);
    let choices = out["choices"].as_array().unwrap();
    let prompt_logprobs = choices[0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(choices[1]["prompt_logprobs"], choices[0]["prompt_logprobs"], "every choice has the prompt's");
    assert_eq!(prompt_logprobs.len(), ids.len());
    assert!(prompt_logprobs[0].is_null());
    for (k, position) in prompt_logprobs.iter().enumerate().skip(1) {
        let position = position.as_object().unwrap();
        // The prompt's own token first, then the three most likely (it may be one of them).
        let (first_id, first) = position.iter().next().unwrap();
        assert_eq!(first_id, &ids[k].to_string());
        assert!((3..=4).contains(&position.len()), "{position:?}");
        assert!(first["rank"].as_u64().unwrap() >= 1 && first["decoded_token"].is_string());
        let ranks: Vec<u64> = position.values().skip(1).map(|v| v["rank"].as_u64().unwrap()).collect();
        assert!(ranks.iter().all(|&r| (1..=3).contains(&r)), "{ranks:?}");
        if k >= prompt_len {
            let want = expected[k - prompt_len];
            let got = first["logprob"].as_f64().unwrap();
            assert!((got - want).abs() < TOLERANCE, "prompt token {k}: {got} vs {want}");
            // The greedy continuation's tokens are the most likely ones.
            assert_eq!(first["rank"], 1, "prompt token {k}");
        }
    }

    // Chat: one field for the response, over the rendered prompt.
    let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2, "prompt_logprobs": 0});
    let out = ok(server.port, "/v1/chat/completions", &chat);
    let prompt_logprobs = out["prompt_logprobs"].as_array().unwrap();
    assert_eq!(prompt_logprobs.len() as u64, out["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(prompt_logprobs.iter().skip(1).all(|p| p.as_object().unwrap().len() == 1));
    assert!(out["choices"][0].get("prompt_logprobs").is_none());

    // Limits: --max-logprobs (20) at the limit and past it, a negative count, -1 (the whole
    // vocabulary of 1,024, past the limit), and streaming, which vLLM does not offer either.
    let with = |extra: Value| {
        let mut b = json!({"prompt": "Hi there", "max_tokens": 1});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    assert_eq!(post(server.port, "/v1/completions", &with(json!({"prompt_logprobs": 20}))).status, 200);
    for (extra, words) in [
        (json!({"prompt_logprobs": 21}), "at most 20"),
        (json!({"prompt_logprobs": -2}), "-1 (the whole vocabulary) or at least 0"),
        (json!({"prompt_logprobs": -1}), "at most 20"),
        (json!({"prompt_logprobs": 1, "stream": true}), "not available when stream"),
        (json!({"prompt_logprobs": "1"}), "prompt_logprobs"),
    ] {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let mut b = with(extra.clone());
            if path.contains("chat") {
                b.as_object_mut().unwrap().remove("prompt");
                b["messages"] = json!([{"role": "user", "content": "Hi"}]);
            }
            let resp = post(server.port, path, &b);
            assert_eq!(resp.status, 400, "{path} {extra}: {}", resp.text());
            assert!(resp.text().contains(words), "{path} {extra}: {}", resp.text());
            assert_eq!(resp.json()["error"]["param"], "prompt_logprobs", "{extra}");
        }
    }
    // max_tokens 0 is only for echoing the prompt.
    let resp = post(server.port, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 0}));
    assert_eq!(resp.status, 400, "{}", resp.text());
}

#[test]
fn the_whole_vocabulary_is_available_when_max_logprobs_allows_it() {
    let server = tiny_llama_server(&["--max-logprobs", "1024"]);
    let out =
        ok(server.port, "/v1/completions", &json!({"prompt": "Hi there", "max_tokens": 1, "prompt_logprobs": -1}));
    let positions = out["choices"][0]["prompt_logprobs"].as_array().unwrap();
    let last = positions.last().unwrap().as_object().unwrap();
    assert_eq!(last.len(), 1024);
    let total: f64 = last.values().map(|v| v["logprob"].as_f64().unwrap().exp()).sum();
    assert!((total - 1.0).abs() < 1e-3, "the probabilities sum to {total}");
    // The prompt's token and the 1,023 others, each rank once (random weights have no ties).
    let mut ranks: Vec<u64> = last.values().map(|v| v["rank"].as_u64().unwrap()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (1..=1024).collect::<Vec<_>>());
}
