//! The `pagoda` binary end to end: `pagoda generate` on real models, and its errors.

use std::process::Command;

use crate::common::*;

fn pagoda(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda")).args(args).env("PAGODA_LOG", "warn").output().unwrap()
}

#[test]
fn generate_prints_the_engines_greedy_tokens_as_json_and_streams_the_same_text() {
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let reference = reference("tiny-llama");
    let prompt = &reference.prompts[1];
    let out = pagoda(&[
        "generate",
        "--model",
        model,
        "--prompt",
        &prompt.text,
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token_ids: Vec<u32> =
        line["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();

    let mut engine = engine("tiny-llama", |_| {});
    let expected = run(&mut engine, vec![request("x", prompt.prompt_ids.clone(), greedy(12))]).remove(0);
    assert_eq!(token_ids, expected.token_ids);
    assert_eq!(line["num_prompt_tokens"], prompt.prompt_ids.len());
    assert_eq!(line["finish_reason"], "length");

    let out = pagoda(&["generate", "--model", model, "--prompt", &prompt.text, "--max-tokens", "12", "--ignore-eos"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{}\n", expected.text));
}

#[test]
fn generate_runs_the_embedded_demo_model_with_a_chat_template() {
    let out = pagoda(&[
        "generate",
        "--chat",
        "--prompt",
        "Hello!",
        "--prompt",
        "Hi",
        "--n",
        "2",
        "--temperature",
        "0.8",
        "--seed",
        "1",
        "--max-tokens",
        "5",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for header in [
        "--- prompt 0 completion 0",
        "--- prompt 0 completion 1",
        "--- prompt 1 completion 0",
        "--- prompt 1 completion 1",
    ] {
        assert!(stdout.contains(header), "{stdout}");
    }
}

#[test]
fn the_exported_demo_model_generates_what_the_embedded_one_does() {
    let dir = scratch_dir("export-demo").join("demo");
    let out = pagoda(&["export-demo", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args = ["--prompt", "Hello there", "--max-tokens", "12", "--ignore-eos", "--output", "json"];
    let exported = pagoda(&[&["generate", "--model", dir.to_str().unwrap()][..], &args[..]].concat());
    let embedded = pagoda(&[&["generate"][..], &args[..]].concat());
    assert!(exported.status.success() && embedded.status.success());
    let ids =
        |o: &std::process::Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone();
    assert_eq!(ids(&exported), ids(&embedded));
}

#[test]
fn load_errors_are_one_line_without_a_panic() {
    let dir = scratch_dir("cli-empty");
    let out = pagoda(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "error: {}: not found: a Hugging Face model folder needs a config.json\n",
            dir.join("config.json").display()
        )
    );
}

#[test]
fn bad_sampling_values_are_refused_with_the_parameter_named() {
    let out = pagoda(&["generate", "--prompt", "x", "--top-p", "1.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), "error: prompt 0: top_p must be in (0, 1], got 1.5\n");
}

#[test]
fn num_threads_sizes_the_compute_pool_and_changes_no_token() {
    let model = fixture("tiny-llama");
    let reference = reference("tiny-llama");
    let prompt = &reference.prompts[1].text;
    let run = |threads: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt])
            .args(["--max-tokens", "16", "--ignore-eos", "--output", "json", "--num-threads", threads])
            .env("PAGODA_LOG", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Without the log's colour codes.
        let mut stderr = String::new();
        let mut in_escape = false;
        for c in String::from_utf8(out.stderr).unwrap().chars() {
            match c {
                '\x1b' => in_escape = true,
                'm' if in_escape => in_escape = false,
                c if !in_escape => stderr.push(c),
                _ => {}
            }
        }
        assert!(stderr.contains(&format!("threads={threads}")), "the log does not name {threads} threads: {stderr}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token_ids"].clone()
    };
    let one = run("1");
    assert_eq!(one, run("3"));
    assert_eq!(one.as_array().map(Vec::len), Some(16));

    let out = pagoda(&["generate", "--prompt", "x", "--num-threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--num-threads") && stderr.contains("0 is not in 1..=4096"), "{stderr}");
}
