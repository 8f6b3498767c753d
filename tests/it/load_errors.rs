//! Broken model folders fail at load with one message naming the file and the problem.

use std::path::Path;

use pagoda::launch::{EngineOptions, load_engine};
use pagoda::weights::{WeightStore, serialize};

use crate::common::*;

fn load_error(dir: &Path) -> String {
    let opts =
        EngineOptions { model: Some(dir.to_path_buf()), num_gpu_blocks_override: Some(64), ..EngineOptions::default() };
    match load_engine(&opts) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

/// Rewrites the weights with `edit` applied to the list of (name, dtype, shape, bytes).
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, pagoda::weights::DType, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let store = WeightStore::open_file(&path).unwrap();
    let mut tensors: Vec<_> = store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.tensor_any_shape(n).unwrap();
            (n.to_string(), t.dtype, t.shape.clone(), t.bytes().to_vec())
        })
        .collect();
    drop(store);
    edit(&mut tensors);
    std::fs::write(path, serialize(&tensors)).unwrap();
}

#[test]
fn unsupported_architecture() {
    let dir = copy_fixture("tiny-llama", "err-arch");
    edit_config(&dir, |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    let err = load_error(&dir);
    assert_eq!(
        err,
        format!(
            "{}: architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            dir.join("config.json").display()
        )
    );
}

#[test]
fn bad_config_values_and_syntax() {
    let dir = copy_fixture("tiny-llama", "err-config");
    std::fs::write(dir.join("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"],").unwrap();
    assert!(load_error(&dir).starts_with(&format!("{}: not valid JSON: ", dir.join("config.json").display())));
    std::fs::copy(fixture("tiny-llama").join("config.json"), dir.join("config.json")).unwrap();
    edit_config(&dir, |c| c["num_key_value_heads"] = serde_json::json!(3));
    assert_eq!(
        load_error(&dir),
        format!(
            "{}: num_attention_heads 4 is not a multiple of num_key_value_heads 3",
            dir.join("config.json").display()
        )
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_error(&dir).ends_with("config.json: not found: a Hugging Face model folder needs a config.json"));
}

#[test]
fn missing_weights() {
    let dir = copy_fixture("tiny-llama", "err-noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_eq!(
        load_error(&dir),
        format!("no weights found in {}: expected model.safetensors or model.safetensors.index.json", dir.display())
    );
}

#[test]
fn a_weights_path_that_is_no_file_says_what_it_is() {
    let dir = copy_fixture("tiny-llama", "err-weights-not-a-file");
    let path = dir.join("model.safetensors");
    std::fs::remove_file(&path).unwrap();
    let expect = |what: &str| assert_eq!(load_error(&dir), format!("{}: {what}, not a weights file", path.display()));
    std::os::unix::fs::symlink(dir.join("gone.safetensors"), &path).unwrap();
    expect(&format!("a symbolic link to '{}', which does not exist", dir.join("gone.safetensors").display()));
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/dev/null", &path).unwrap();
    expect("a symbolic link to a device");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    expect("a folder");
}

#[test]
fn truncated_weight_file() {
    let dir = copy_fixture("tiny-llama", "err-truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_error(&dir);
    assert!(err.starts_with(&format!("{}: truncated: tensor '", path.display())), "{err}");
    assert!(
        err.ends_with(&format!("but the file holds only {} bytes of data", bytes.len() - 1000 - header_len(&bytes))),
        "{err}"
    );
}

fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn tensor_with_the_wrong_shape() {
    let dir = copy_fixture("tiny-llama", "err-shape");
    edit_config(&dir, |c| c["intermediate_size"] = serde_json::json!(100));
    let err = load_error(&dir);
    assert_eq!(
        err,
        format!(
            "{}: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [172, 64], expected [100, 64]",
            dir.join("model.safetensors").display()
        )
    );
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("tiny-llama", "err-missing-tensor");
    edit_weights(&dir, |t| t.retain(|(n, ..)| n != "model.norm.weight"));
    assert_eq!(
        load_error(&dir),
        format!("{}: tensor 'model.norm.weight' is missing", dir.join("model.safetensors").display())
    );
}

#[test]
fn sharded_checkpoint_loads_and_a_missing_shard_is_named() {
    let dir = copy_fixture("tiny-llama", "sharded");
    let store = WeightStore::open_file(&dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = store.names().into_iter().map(String::from).collect();
    let (first, second): (Vec<_>, Vec<_>) = names.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: Vec<_> = part
            .iter()
            .map(|(_, n)| {
                let t = store.tensor_any_shape(n).unwrap();
                weight_map.insert(n.to_string(), serde_json::json!(shard));
                (n.to_string(), t.dtype, t.shape.clone(), t.bytes().to_vec())
            })
            .collect();
        std::fs::write(dir.join(shard), serialize(&tensors)).unwrap();
    }
    drop(store);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"weight_map": weight_map}).to_string())
        .unwrap();

    // The sharded copy generates exactly what the original does.
    let reference = reference("tiny-llama");
    let prompt = reference.prompts[0].prompt_ids.clone();
    let opts = |m| EngineOptions { model: Some(m), num_gpu_blocks_override: Some(64), ..EngineOptions::default() };
    let mut sharded = load_engine(&opts(dir.clone())).unwrap().engine;
    let mut original = load_engine(&opts(fixture("tiny-llama"))).unwrap().engine;
    let a = run(&mut sharded, vec![request("a", prompt.clone(), greedy(8))]);
    let b = run(&mut original, vec![request("a", prompt, greedy(8))]);
    assert_eq!(a[0].token_ids, b[0].token_ids);

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(
        load_error(&dir),
        format!(
            "{}: shard 'model-00002-of-00002.safetensors' listed in weight_map does not exist",
            dir.join("model.safetensors.index.json").display()
        )
    );
}

#[test]
fn missing_tokenizer() {
    let dir = copy_fixture("tiny-llama", "err-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        load_error(&dir),
        format!(
            "{}: not found: the model needs a fast tokenizer (tokenizer.json)",
            dir.join("tokenizer.json").display()
        )
    );
}

#[test]
fn a_folder_that_does_not_exist() {
    let dir = scratch_dir("err-none").join("nothing-here");
    assert_eq!(load_error(&dir), format!("model folder {} does not exist", dir.display()));
}

#[test]
fn unsupported_dtype_in_the_weights() {
    let dir = copy_fixture("tiny-llama", "err-dtype");
    let path = dir.join("model.safetensors");
    let header = br#"{"model.norm.weight":{"dtype":"F64","shape":[64],"data_offsets":[0,512]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 512]);
    std::fs::write(&path, file).unwrap();
    assert_eq!(
        load_error(&dir),
        format!(
            "{}: tensor 'model.norm.weight': dtype F64 is not supported (expected F32, F16 or BF16)",
            path.display()
        )
    );
}
