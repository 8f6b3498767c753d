//! What structured outputs cost per token on a real model: the grammar's token mask before each
//! pick and its advance after it, walking a valid JSON document token by token; then the engine's
//! decode time per token on the CPU with and without a JSON schema, greedy, same prompt.
//!
//! Run: `cargo bench --bench structured -- MODEL` (a folder or a `.gguf`; CI fetches SmolLM2-135M
//! to `.ci/cache/smollm2/`). Prints a Markdown table for BENCHMARKS.md.

use std::sync::Arc;
use std::time::Instant;

use pagoda::engine::structured::{Grammars, JsonOptions, StructuredOutput};
use pagoda::engine::{EngineRequest, MaxTokens, RequestId, SamplingParams};
use pagoda::launch::{DeviceKind, EngineOptions, load_engine};
use pagoda::model::ModelFiles;
use serde_json::json;

fn main() {
    let Some(model) = std::env::args().skip(1).find(|a| !a.starts_with("--")) else {
        eprintln!("usage: cargo bench --bench structured -- MODEL");
        std::process::exit(2);
    };
    let files = ModelFiles::load(std::path::Path::new(&model)).expect("model loads");
    let vocab = files.config.vocab_size;
    let eos = files.config.eos_token_ids.clone();
    let tokenizer = Arc::new(files.tokenizer);
    let start = Instant::now();
    let grammars = Grammars::new(tokenizer.clone(), vocab, eos);
    // The first compile builds the vocabulary's token trie.
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,3}$"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "age", "email", "tags", "address"],
    });
    let spec = StructuredOutput::Json { schema: schema.clone(), options: JsonOptions::default() };
    grammars.compile(&spec).expect("schema compiles");
    let first_use = start.elapsed();
    let start = Instant::now();
    let runs = 20;
    for _ in 0..runs {
        grammars.compile(&spec).expect("schema compiles");
    }
    let compile = start.elapsed() / runs;

    let document = r#"{"name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@example.org", "tags": ["mathematician", "writer", "analyst"], "address": {"city": "London", "zip": "W1 4AB"}}"#;
    let tokens = tokenizer.encode(document, false).expect("document tokenizes");
    let mut masks = Vec::new();
    let mut advances = Vec::new();
    for _ in 0..runs {
        let mut grammar = grammars.compile(&spec).expect("schema compiles");
        for &t in &tokens {
            let start = Instant::now();
            let mask = grammar.mask().expect("mask");
            masks.push(start.elapsed().as_secs_f64());
            assert!(mask[t as usize / 32] >> (t % 32) & 1 == 1, "the document's token {t} is allowed");
            let start = Instant::now();
            grammar.advance(t).expect("advance");
            advances.push(start.elapsed().as_secs_f64());
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (mean * 1e6, v[v.len() / 2] * 1e6, v[v.len() * 99 / 100] * 1e6)
    };
    let (mask_mean, mask_p50, mask_p99) = stats(&mut masks);
    let (adv_mean, adv_p50, adv_p99) = stats(&mut advances);
    println!("model: {model}, vocabulary {vocab}, document {} tokens, {runs} runs", tokens.len());
    println!();
    println!("| what | mean | median | p99 |");
    println!("|---|---|---|---|");
    println!("| token mask, per token | {mask_mean:.0} µs | {mask_p50:.0} µs | {mask_p99:.0} µs |");
    println!("| advance, per token | {adv_mean:.1} µs | {adv_p50:.1} µs | {adv_p99:.1} µs |");
    println!("| compile the schema | {:.2} ms | | |", compile.as_secs_f64() * 1e3);
    println!("| first use (token trie + compile) | {:.0} ms | | |", first_use.as_secs_f64() * 1e3);

    // The engine, one sequence, greedy: decode time per token with and without the schema.
    let opts = EngineOptions {
        model: Some(model.clone().into()),
        device: DeviceKind::Cpu,
        num_gpu_blocks_override: Some(64),
        ..EngineOptions::default()
    };
    let mut engine = load_engine(&opts).expect("engine loads").engine;
    let prompt = tokenizer.encode("Here is a person described in JSON:", false).expect("prompt tokenizes");
    let mut per_token = |structured_output: Option<StructuredOutput>, id: &str| {
        let params = SamplingParams {
            max_tokens: MaxTokens::Exact(48),
            ignore_eos: structured_output.is_none(),
            structured_output,
            ..SamplingParams::greedy()
        };
        let request = EngineRequest {
            id: RequestId(id.into()),
            prompt_token_ids: prompt.clone(),
            params,
            arrival: Instant::now(),
        };
        engine.add_request(request.validate(&engine.limits()).expect("valid")).expect("added");
        let out = engine.run_to_completion().expect("runs").remove(0);
        let t = out.timings;
        let decode = t.last_token.unwrap() - t.first_token.unwrap();
        (decode.as_secs_f64() / (out.num_output_tokens - 1) as f64, out.num_output_tokens)
    };
    per_token(None, "warm-up");
    let (plain, plain_n) = per_token(None, "plain");
    let spec = StructuredOutput::Json { schema, options: JsonOptions::default() };
    let (constrained, constrained_n) = per_token(Some(spec), "json");
    println!();
    println!("| engine decode, 1 sequence, greedy, CPU | per token | tokens |");
    println!("|---|---|---|");
    println!("| no constraint | {:.2} ms | {plain_n} |", plain * 1e3);
    println!("| JSON schema | {:.2} ms | {constrained_n} |", constrained * 1e3);
    println!("| ratio | {:.3} | |", constrained / plain);
}
