//! Mistral, Qwen2 and Llama 3.1 features that the fixtures do not cover (biases, tied embeddings,
//! sliding windows, explicit head_dim, llama3 rope scaling, f16 weights), checked against a plain
//! f64 transcription of the transformers forward pass written here. The transcription is itself
//! checked against transformers' own logits on the fixture first.

use std::path::Path;

use pagoda::backend::cpu::CpuBackend;
use pagoda::backend::{BatchLayout, SeqLayout};
use pagoda::model::{Executor, ModelFiles, ModelRunner};
use pagoda::weights::{DType, WeightStore, serialize};
use serde_json::{Value, json};

use crate::common::*;

/// transformers' Llama/Mistral/Qwen2 forward in f64, straight from the config and the weights.
fn naive_logits(dir: &Path, tokens: &[u32]) -> Vec<f64> {
    let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let w = |name: &str| -> Vec<f64> {
        store.tensor_any_shape(name).unwrap().to_f32_vec().into_iter().map(f64::from).collect()
    };
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    let (hidden, layers, heads, vocab) =
        (get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads"), get("vocab_size"));
    let kv_heads = c["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize);
    let head_dim = c["head_dim"].as_u64().map_or(hidden / heads, |v| v as usize);
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let arch = c["architectures"][0].as_str().unwrap();
    let has_qkv_bias = arch == "Qwen2ForCausalLM" || c["attention_bias"].as_bool() == Some(true);
    let has_o_bias = arch == "LlamaForCausalLM" && c["attention_bias"].as_bool() == Some(true);
    let window = if arch == "MistralForCausalLM" { c["sliding_window"].as_u64().map(|v| v as usize) } else { None };
    let rope = if c["rope_parameters"].is_object() { c["rope_parameters"].clone() } else { c["rope_scaling"].clone() };
    let theta = c["rope_theta"].as_f64().or(rope["rope_theta"].as_f64()).unwrap_or(10000.0);
    let inv_freq: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            if rope["rope_type"] != "llama3" {
                return f;
            }
            let (factor, low, high) = (
                rope["factor"].as_f64().unwrap(),
                rope["low_freq_factor"].as_f64().unwrap(),
                rope["high_freq_factor"].as_f64().unwrap(),
            );
            let old = rope["original_max_position_embeddings"].as_f64().unwrap();
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < old / high {
                f
            } else if wavelen > old / low {
                f / factor
            } else {
                let s = (old / wavelen - low) / (high - low);
                (1.0 - s) * f / factor + s * f
            }
        })
        .collect();

    let t = tokens.len();
    let matmul = |x: &[f64], rows: usize, wt: &[f64], out: usize, inp: usize| -> Vec<f64> {
        let mut y = vec![0.0; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp).map(|i| x[r * inp + i] * wt[o * inp + i]).sum();
            }
        }
        y
    };
    let add_bias = |y: &mut [f64], b: &[f64]| {
        y.chunks_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b))
    };
    let norm = |x: &[f64], g: &[f64]| -> Vec<f64> {
        x.chunks(g.len())
            .flat_map(|row| {
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
                row.iter().zip(g).map(move |(v, g)| v * inv * g).collect::<Vec<_>>()
            })
            .collect()
    };
    let rotate = |x: &mut [f64], n_heads: usize| {
        for (pos, row) in x.chunks_mut(n_heads * head_dim).enumerate() {
            for h in row.chunks_mut(head_dim) {
                for i in 0..head_dim / 2 {
                    let (cos, sin) = ((pos as f64 * inv_freq[i]).cos(), (pos as f64 * inv_freq[i]).sin());
                    let (a, b) = (h[i], h[i + head_dim / 2]);
                    h[i] = a * cos - b * sin;
                    h[i + head_dim / 2] = b * cos + a * sin;
                }
            }
        }
    };

    let embed = w("model.embed_tokens.weight");
    let mut x: Vec<f64> =
        tokens.iter().flat_map(|&id| embed[id as usize * hidden..(id as usize + 1) * hidden].to_vec()).collect();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let h = norm(&x, &w(&format!("{p}.input_layernorm.weight")));
        let proj = |name: &str, out: usize, bias: bool| {
            let mut y = matmul(&h, t, &w(&format!("{p}.self_attn.{name}.weight")), out, hidden);
            if bias {
                add_bias(&mut y, &w(&format!("{p}.self_attn.{name}.bias")));
            }
            y
        };
        let mut q = proj("q_proj", heads * head_dim, has_qkv_bias);
        let mut k = proj("k_proj", kv_heads * head_dim, has_qkv_bias);
        let v = proj("v_proj", kv_heads * head_dim, has_qkv_bias);
        rotate(&mut q, heads);
        rotate(&mut k, kv_heads);
        let mut attn = vec![0.0; t * heads * head_dim];
        for i in 0..t {
            for hd in 0..heads {
                let kvh = hd / (heads / kv_heads);
                let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let qv = &q[(i * heads + hd) * head_dim..][..head_dim];
                let scores: Vec<f64> = (first..=i)
                    .map(|j| {
                        let kv = &k[(j * kv_heads + kvh) * head_dim..][..head_dim];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, j) in scores.iter().zip(first..=i) {
                    let vv = &v[(j * kv_heads + kvh) * head_dim..][..head_dim];
                    for d in 0..head_dim {
                        attn[(i * heads + hd) * head_dim + d] += (s - max).exp() / sum * vv[d];
                    }
                }
            }
        }
        let mut o = matmul(&attn, t, &w(&format!("{p}.self_attn.o_proj.weight")), hidden, heads * head_dim);
        if has_o_bias {
            add_bias(&mut o, &w(&format!("{p}.self_attn.o_proj.bias")));
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = norm(&x, &w(&format!("{p}.post_attention_layernorm.weight")));
        let inter = get("intermediate_size");
        let g = matmul(&h, t, &w(&format!("{p}.mlp.gate_proj.weight")), inter, hidden);
        let u = matmul(&h, t, &w(&format!("{p}.mlp.up_proj.weight")), inter, hidden);
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let d = matmul(&a, t, &w(&format!("{p}.mlp.down_proj.weight")), hidden, inter);
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    let h = norm(&x, &w("model.norm.weight"));
    let head = if c["tie_word_embeddings"].as_bool() == Some(true) { embed } else { w("lm_head.weight") };
    matmul(&h, t, &head, vocab, hidden)
}

/// Our logits for every position, computed in chunks of 5 through blocks of 4 in reverse order.
fn our_logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    let files = ModelFiles::load(dir).unwrap();
    let num_blocks = tokens.len().div_ceil(4);
    let mut runner = ModelRunner::new(CpuBackend::new(), &files, 128, num_blocks, 4).unwrap();
    let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut all = Vec::new();
    for start in (0..tokens.len()).step_by(5) {
        let end = (start + 5).min(tokens.len());
        let layout = BatchLayout {
            token_ids: tokens[start..end].to_vec(),
            positions: (start as u32..end as u32).collect(),
            slot_mapping: (start..end).map(|p| table[p / 4] * 4 + (p % 4) as u32).collect(),
            seqs: vec![SeqLayout {
                query_start: 0,
                query_len: end - start,
                context_len: end,
                block_table: table.clone(),
            }],
        };
        all.extend(runner.execute(&layout, &(0..(end - start) as u32).collect::<Vec<_>>()).unwrap());
    }
    all
}

fn assert_close(ours: &[f32], naive: &[f64], tolerance: f64, what: &str) {
    assert_eq!(ours.len(), naive.len());
    let worst = ours.iter().zip(naive).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(worst < tolerance, "{what}: worst |difference| {worst}");
}

/// Writes a model folder: `config`, the fixture tokenizer, and random weights for every tensor the
/// config implies, stored as `dtype`.
fn build_model(name: &str, config: Value, dtype: DType) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(file), dir.join(file)).unwrap();
    }
    let get = |k: &str| config[k].as_u64().unwrap() as usize;
    let (hidden, inter, heads, vocab) =
        (get("hidden_size"), get("intermediate_size"), get("num_attention_heads"), get("vocab_size"));
    let kv = config["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize);
    let hd = config["head_dim"].as_u64().map_or(hidden / heads, |v| v as usize);
    let arch = config["architectures"][0].as_str().unwrap();
    let qkv_bias = arch == "Qwen2ForCausalLM" || config["attention_bias"].as_bool() == Some(true);
    let o_bias = arch == "LlamaForCausalLM" && config["attention_bias"].as_bool() == Some(true);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..get("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        for (n, out, inp, bias) in [
            ("self_attn.q_proj", heads * hd, hidden, qkv_bias),
            ("self_attn.k_proj", kv * hd, hidden, qkv_bias),
            ("self_attn.v_proj", kv * hd, hidden, qkv_bias),
            ("self_attn.o_proj", hidden, heads * hd, o_bias),
            ("mlp.gate_proj", inter, hidden, false),
            ("mlp.up_proj", inter, hidden, false),
            ("mlp.down_proj", hidden, inter, false),
        ] {
            shapes.push((format!("{p}.{n}.weight"), vec![out, inp]));
            if bias {
                shapes.push((format!("{p}.{n}.bias"), vec![out]));
            }
        }
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    if config["tie_word_embeddings"].as_bool() != Some(true) {
        shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    let mut state = 0x1234_5678_9abc_def0u64 ^ name.len() as u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let tensors: Vec<_> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains("norm") {
                (0..n).map(|_| 1.0 + 0.2 * next()).collect()
            } else if shape.len() == 1 {
                (0..n).map(|_| 0.5 * next()).collect()
            } else {
                let bound = (3.0 / shape[1] as f32).sqrt() * if name.contains("embed") { 10.0 } else { 1.0 };
                (0..n).map(|_| bound * next()).collect()
            };
            let bytes: Vec<u8> = match dtype {
                DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            };
            (name, dtype, shape, bytes)
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), serialize(&tensors)).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 97 + 13) % 1024).collect()
}

#[test]
fn the_transcription_itself_matches_transformers_on_the_fixture() {
    let reference = reference("tiny-llama");
    let p = &reference.prompts[1];
    let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
    let store = WeightStore::open_file(&fixture("tiny-llama").join("reference_logits.safetensors")).unwrap();
    let expected = store.tensor("prompt1", &[tokens.len(), 1024]).unwrap().to_f32_vec();
    let naive = naive_logits(&fixture("tiny-llama"), &tokens);
    assert_close(&expected, &naive, 1e-3, "naive f64 forward vs transformers");
}

#[test]
fn qwen2_with_qkv_bias_tied_embeddings_and_one_kv_head() {
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true, "max_position_embeddings": 128,
        "use_sliding_window": false, "sliding_window": 16, "torch_dtype": "bfloat16", "eos_token_id": 4
    });
    let dir = build_model("arch-qwen2", config, DType::F32);
    let tokens = prompt(23);
    assert_close(&our_logits(&dir, &tokens), &naive_logits(&dir, &tokens), 1e-3, "qwen2");
}

#[test]
fn mistral_with_a_sliding_window_and_an_explicit_head_dim() {
    let config = json!({
        "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 6, "max_position_embeddings": 128
    });
    let dir = build_model("arch-mistral", config.clone(), DType::F32);
    let tokens = prompt(21);
    let ours = our_logits(&dir, &tokens);
    assert_close(&ours, &naive_logits(&dir, &tokens), 1e-3, "mistral");
    // The window matters: without it the last positions differ.
    let mut no_window = config;
    no_window["sliding_window"] = Value::Null;
    std::fs::write(dir.join("config.json"), no_window.to_string()).unwrap();
    let unwindowed = our_logits(&dir, &tokens);
    assert!(ours.iter().zip(&unwindowed).any(|(a, b)| (a - b).abs() > 1e-2));
}

#[test]
fn llama_31_rope_scaling_attention_bias_and_f16_weights_in_the_v5_layout() {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "rms_norm_eps": 1e-5,
        "attention_bias": true, "max_position_embeddings": 128, "dtype": "float16",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    });
    let dir = build_model("arch-llama31", config, DType::F16);
    let tokens = prompt(40);
    // Weights are f16 but both sides compute from the same f16 values.
    assert_close(&our_logits(&dir, &tokens), &naive_logits(&dir, &tokens), 1e-3, "llama 3.1");
}
