//! The whole model through the CUDA backend's code with no GPU: the emulated device runs the real
//! kernels of `kernels/*.cu` (compiled for the CPU) and cuBLAS's GEMM semantics. The checks are
//! `pagoda selftest`'s own (`pagoda::selftest`), which a GPU machine runs for real; here they must
//! reproduce transformers' outputs and the CPU engine's batching invariance. Also: device choice
//! and `--load-format dummy` through the real binary.
//!
//! The emulation is built only with the `cuda-emu` feature (./test.sh turns it on); without it the
//! first test says so.

use std::process::Command;

use crate::common::*;

fn pagoda(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda")).args(args).env("PAGODA_LOG", "info").output().unwrap()
}

#[cfg(not(feature = "cuda-emu"))]
#[test]
fn cuda_backend_under_emulation() {
    tool_missing("the CUDA emulation is not built (cargo test --features cuda-emu, as ./test.sh runs)");
}

/// This machine has no NVIDIA driver: `auto` serves on the CPU and says why in one line, and
/// `--device cuda` is a clear error, never a panic.
#[test]
fn without_a_driver_auto_picks_the_cpu_and_cuda_is_refused() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        println!("did not run: this machine has an NVIDIA device (the GPU check covers it)");
        return;
    }
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let out = pagoda(&["generate", "--model", model, "--prompt", "Hi", "--max-tokens", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("device chosen: cpu, because") && log.contains("libcuda.so.1"), "{log}");

    let out = pagoda(&["generate", "--model", model, "--prompt", "Hi", "--device", "cuda"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda: no CUDA device") && !err.contains("panicked"), "{err}");
}

/// `--load-format dummy` reads no weight file: a folder with only the config and the tokenizer
/// loads and generates; without the flag the same folder is refused.
#[test]
fn dummy_weights_need_no_weight_file() {
    let dir = copy_fixture("tiny-llama", "dummy-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let model = dir.to_str().unwrap();
    let out = pagoda(&["generate", "--model", model, "--prompt", "Hi", "--max-tokens", "3", "--ignore-eos"]);
    assert_eq!(out.status.code(), Some(1), "no weights, no dummy flag: an error");
    let out = pagoda(&[
        "generate",
        "--model",
        model,
        "--load-format",
        "dummy",
        "--prompt",
        "Hi",
        "--max-tokens",
        "3",
        "--ignore-eos",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["token_ids"].as_array().unwrap().len(), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("the weights are random"));
}

#[cfg(feature = "cuda-emu")]
mod emulated {
    use pagoda::backend::cuda::device::DeviceHandle;
    use pagoda::launch::{DeviceKind, choose_device};
    use pagoda::selftest::{Row, fixtures};

    use super::pagoda;
    use crate::common::*;

    fn assert_all_pass(rows: &[Row]) {
        assert!(!rows.is_empty());
        for r in rows {
            assert_ne!(r.pass, Some(false), "{}: {}", r.name, r.value);
        }
    }

    fn device() -> DeviceHandle {
        choose_device(DeviceKind::EmulatedCuda).unwrap().unwrap()
    }

    /// Both fixtures in f32, f16 and bf16, each prompt in one pass and in chunks of 7 and 1, over
    /// blocks in reverse order with every unwritten cache slot NaN: logits within the dtype's
    /// tolerance of transformers' and the greedy tokens wherever the margin allows.
    #[test]
    fn fixtures_logits_and_greedy_choices_match_transformers() {
        let rows = fixtures::logits_rows(&device(), &fixtures_dir()).unwrap();
        assert_eq!(rows.len(), 2 * 3 * 2);
        assert_all_pass(&rows);
    }

    /// The CPU engine's batching test on the CUDA backend: requests alone and together (chunked,
    /// preempted) give the same greedy tokens, and the same as the CPU engine gives; seeded
    /// temperature sampling, drawn on the device, gives the CPU engine's tokens too.
    #[test]
    fn greedy_tokens_do_not_depend_on_batching_and_equal_the_cpu_engine() {
        let rows = fixtures::batching_rows(&fixtures_dir(), DeviceKind::EmulatedCuda).unwrap();
        assert_eq!(rows.len(), 3);
        assert_all_pass(&rows);
    }

    /// The GPU check's command on the emulated device: every operation in every dtype, and the
    /// benchmarks' code paths on tiny shapes, as a table and as JSON.
    #[test]
    fn selftest_passes_and_reports_every_row() {
        let json = scratch_dir("selftest").join("rows.json");
        let out =
            pagoda(&["selftest", "--device", "cuda-emulated", "--bench", "--quick", "--json", json.to_str().unwrap()]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(table.contains("attention head_dim 128 heads 8/2"), "{table}");
        assert!(table.lines().last().unwrap().ends_with(" passed, 0 failed"), "{table}");
        let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let rows = rows.as_array().unwrap();
        let measured = |prefix: &str| {
            rows.iter()
                .filter(|r| r["name"].as_str().unwrap().starts_with(prefix))
                .map(|r| r["number"].as_f64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(measured("decode attention bf16").len(), 2, "batches 1 and 2 at one context");
        assert!(measured("decode bf16 dummy weights").iter().all(|&t| t > 0.0));
        assert!(measured("device copy bandwidth")[0] > 0.0);
        // One eager step per batch size profiled: every operation kind, and their sum.
        for batch in [1, 2] {
            let prefix = format!("decode step profile, batch {batch}: ");
            let ops: Vec<(&str, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["name"].as_str()?.strip_prefix(&prefix)?, r["number"].as_f64()?)))
                .collect();
            let (total, kinds) = ops.split_first().unwrap();
            assert!(total.0.starts_with("all ") && total.0.ends_with(" operations, each waited for"), "{ops:?}");
            let sum: f64 = kinds.iter().map(|k| k.1).sum();
            assert!((sum - total.1).abs() <= 1e-6 * total.1, "{ops:?}");
            for kind in ["pagoda_paged_attention_h16_g2_bf16", "pagoda_add_rms_norm_bf16", "pagoda_argmax_f32"] {
                assert!(kinds.iter().any(|k| k.0 == kind && k.1 > 0.0), "{kind} missing: {ops:?}");
            }
            let gemm = format!("GEMM m 256 n {batch} k 64 (bfloat16 → float32)");
            assert!(kinds.iter().any(|k| k.0 == gemm), "the logits GEMM is missing: {ops:?}");
        }
    }

    /// A step picks each sampled row's token by its rule where the logits are, as the host rule
    /// says over the full logits, on the emulated CUDA device and on the CPU, and returns only the
    /// ids and the logprobs asked for.
    #[test]
    fn a_step_picks_each_row_by_its_rule_where_the_logits_are() {
        use pagoda::backend::cpu::CpuBackend;
        use pagoda::backend::cuda::CudaBackend;
        use pagoda::backend::sampling::sample_row;
        use pagoda::backend::{BatchLayout, Draw, LogitEdit, RowSampling, SeqLayout};
        use pagoda::model::{Executor, ModelFiles, ModelRunner};
        use pagoda::weights::DType;

        let files = ModelFiles::load(&fixture("tiny-llama")).unwrap();
        let mut layout = BatchLayout::default();
        for s in 0..3u32 {
            let len = 3 + s as usize;
            layout.seqs.push(SeqLayout {
                query_start: layout.token_ids.len(),
                query_len: len,
                context_len: len,
                block_table: vec![s],
            });
            for p in 0..len as u32 {
                layout.token_ids.push(10 + 7 * s + p);
                layout.positions.push(p);
                layout.slot_mapping.push(s * 16 + p);
            }
        }
        let rows = [2u32, 6, 11];
        let rules = [
            RowSampling { logprobs: Some(3), ..RowSampling::greedy() },
            RowSampling {
                edits: vec![LogitEdit { token: 17, add: 0.5, repetition: 1.2, subtract: 0.3 }],
                ..RowSampling::draw(Draw { temperature: 0.9, min_p: 0.0, top_k: 20, top_p: 0.8, uniform: 0.6 })
            },
            RowSampling::draw(Draw { temperature: 0.7, min_p: 0.05, top_k: 0, top_p: 1.0, uniform: 0.3 }),
        ];
        let runners: Vec<Box<dyn Executor>> = vec![
            Box::new(ModelRunner::new(CudaBackend::new(device(), DType::F32), &files, 64, 4, 16).unwrap()),
            Box::new(ModelRunner::new(CpuBackend::new(), &files, 64, 4, 16).unwrap()),
        ];
        for mut runner in runners {
            let all = runner.execute(&layout, &rows).unwrap();
            let step = runner.execute_step(&layout, &rows, &rules).unwrap();
            assert_eq!(step.len(), 3);
            for ((row, rule), picked) in all.chunks_exact(1024).zip(&rules).zip(&step) {
                let expected = sample_row(&mut row.to_vec(), rule);
                assert_eq!(picked.token, expected.token, "{}", runner.backend_name());
                match (&picked.logprobs, &expected.logprobs) {
                    (Some(a), Some(b)) => {
                        assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} {b:?}");
                        assert_eq!(
                            a.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                            b.top.iter().map(|t| t.0).collect::<Vec<_>>()
                        );
                    }
                    (a, b) => assert_eq!(a, b),
                }
            }
        }
    }

    /// The real server on the CUDA backend (emulated device): a step whose kernel fails answers its
    /// request with a 500 naming the failure, and the server goes on serving; the next request
    /// gets what the CPU server gives.
    #[test]
    fn a_failed_step_is_a_500_and_the_server_keeps_serving() {
        use crate::http::post;
        use crate::server::Server;

        let model = fixture("tiny-llama");
        let args = [
            "--model",
            model.to_str().unwrap(),
            "--num-gpu-blocks-override",
            "64",
            "--device",
            "cuda-emulated",
            "--dtype",
            "float32",
            // Launches are counted from the device's start: without graphs, load makes none.
            "--enforce-eager",
        ];
        let server = Server::spawn(&args, &[("PAGODA_EMULATED_FAIL_LAUNCH", "3")]);
        server.wait_ready();
        let body = serde_json::json!({"model": model.to_str().unwrap(), "prompt": "Hello there", "max_tokens": 6,
                                      "temperature": 0, "ignore_eos": true});
        let failed = post(server.port, "/v1/completions", &body);
        assert_eq!(failed.status, 500, "{}", failed.text());
        assert!(failed.text().contains("injected failure of launch 3"), "{}", failed.text());
        assert_eq!(failed.json()["error"]["type"], "InternalServerError");
        let ok = post(server.port, "/v1/completions", &body);
        assert_eq!(ok.status, 200, "{}", ok.text());

        let cpu = Server::start(&[&args[..4], &["--device", "cpu"]].concat());
        let expected = post(cpu.port, "/v1/completions", &body);
        assert_eq!(ok.json()["choices"][0]["text"], expected.json()["choices"][0]["text"]);
        assert!(server.log().contains("engine step failed"), "{}", server.log());

        // Streamed: the failure ends the stream with an error event, then [DONE].
        let server = Server::spawn(&args, &[("PAGODA_EMULATED_FAIL_LAUNCH", "3")]);
        server.wait_ready();
        let mut streamed = body.clone();
        streamed["stream"] = serde_json::json!(true);
        let events = crate::http::EventStream::open(server.port, "/v1/completions", &streamed).collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let error: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains("injected failure"), "{events:?}");
        assert_eq!(post(server.port, "/v1/completions", &body).status, 200);
    }

    /// The real server on the CUDA backend (emulated device, decode from graphs) answers a seeded
    /// request with every sampling parameter and logprobs as the CPU server does: the same text,
    /// and the same logprobs within rounding.
    #[test]
    fn seeded_sampling_and_logprobs_over_http_equal_the_cpu_servers() {
        use crate::http::post;
        use crate::server::Server;

        let model = fixture("tiny-llama");
        let args = ["--model", model.to_str().unwrap(), "--num-gpu-blocks-override", "64", "--dtype", "float32"];
        let cuda = Server::start(&[&args[..], &["--device", "cuda-emulated"]].concat());
        let cpu = Server::start(&[&args[..], &["--device", "cpu"]].concat());
        assert!(cuda.log().contains("decode steps run from CUDA graphs"), "{}", cuda.log());
        for (i, extra) in [
            serde_json::json!({"temperature": 0.9, "top_k": 20, "top_p": 0.9, "presence_penalty": 0.5}),
            serde_json::json!({"temperature": 1.2, "min_p": 0.05, "repetition_penalty": 1.3, "logit_bias": {"7": 4}}),
            serde_json::json!({"temperature": 0, "frequency_penalty": 0.7, "min_tokens": 5}),
        ]
        .into_iter()
        .enumerate()
        {
            let mut body = serde_json::json!({"model": model.to_str().unwrap(), "prompt": "Once upon a time",
                                              "max_tokens": 10, "seed": 11 + i, "logprobs": 3, "ignore_eos": true});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (a, b) = (post(cuda.port, "/v1/completions", &body), post(cpu.port, "/v1/completions", &body));
            assert_eq!((a.status, b.status), (200, 200), "{}\n{}", a.text(), b.text());
            let (a, b) = (&a.json()["choices"][0], &b.json()["choices"][0]);
            assert_eq!(a["text"], b["text"], "{extra}");
            let logprobs = |c: &serde_json::Value| -> Vec<f64> {
                c["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
            };
            let (la, lb) = (logprobs(a), logprobs(b));
            assert_eq!(la.len(), 10);
            assert!(la.iter().zip(&lb).all(|(x, y)| (x - y).abs() < 1e-3), "{la:?}\n{lb:?}");
            assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"]);
            let top = |c: &serde_json::Value| -> Vec<Vec<String>> {
                c["logprobs"]["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_object().unwrap().keys().cloned().collect())
                    .collect()
            };
            assert_eq!(top(a), top(b));
        }
        // Prompt logprobs (forced-token rows, their ranks) on the device equal the host's.
        let body = serde_json::json!({"model": model.to_str().unwrap(), "prompt": "Once upon a time there was",
                                      "max_tokens": 2, "prompt_logprobs": 4, "echo": true, "logprobs": 2,
                                      "temperature": 0});
        let (a, b) = (post(cuda.port, "/v1/completions", &body), post(cpu.port, "/v1/completions", &body));
        assert_eq!((a.status, b.status), (200, 200), "{}\n{}", a.text(), b.text());
        let (a, b) = (&a.json()["choices"][0], &b.json()["choices"][0]);
        let (pa, pb) = (a["prompt_logprobs"].as_array().unwrap(), b["prompt_logprobs"].as_array().unwrap());
        assert_eq!(pa.len(), pb.len());
        for (x, y) in pa.iter().zip(pb).skip(1) {
            let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            for (u, v) in x.values().zip(y.values()) {
                assert_eq!((&u["rank"], &u["decoded_token"]), (&v["rank"], &v["decoded_token"]));
                assert!((u["logprob"].as_f64().unwrap() - v["logprob"].as_f64().unwrap()).abs() < 1e-3, "{u} {v}");
            }
        }
        assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"]);
    }

    /// A model whose head size has no attention kernels is refused at load with what to do.
    #[test]
    fn a_head_size_without_kernels_is_refused_with_the_cpu_as_the_way_out() {
        let dir = copy_fixture("tiny-llama", "head-dim-24");
        let config = dir.join("config.json");
        let text = std::fs::read_to_string(&config).unwrap().replace("\"head_dim\": 16", "\"head_dim\": 24");
        std::fs::write(&config, text).unwrap();
        let model = dir.to_str().unwrap();
        let args = ["generate", "--model", model, "--load-format", "dummy", "--prompt", "Hi", "--max-tokens", "2"];
        let out = pagoda(&[&args[..], &["--device", "cuda-emulated"]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("this model has head_dim 24") && stderr.contains("--device cpu"), "{stderr}");
        let out = pagoda(&[&args[..], &["--device", "cpu"]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// README's first command, `pagoda serve` on the embedded demo model, also serves on a GPU
    /// (head_dim 32 has attention kernels): the same greedy text as the CPU server.
    #[test]
    fn the_embedded_demo_model_serves_on_the_cuda_backend() {
        use crate::http::post;
        use crate::server::Server;

        let args = ["--num-gpu-blocks-override", "64", "--dtype", "float32", "--enforce-eager"];
        let cuda = Server::start(&[&args[..], &["--device", "cuda-emulated"]].concat());
        let cpu = Server::start(&[&args[..], &["--device", "cpu"]].concat());
        let body = serde_json::json!({"model": "pagoda-demo-random-weights", "prompt": "Once upon a time",
                                      "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        let (a, b) = (post(cuda.port, "/v1/completions", &body), post(cpu.port, "/v1/completions", &body));
        assert_eq!((a.status, b.status), (200, 200), "{}\n{}\n{}", a.text(), b.text(), cuda.log());
        assert_eq!(a.json()["choices"][0]["text"], b.json()["choices"][0]["text"]);
        assert_eq!(a.json()["usage"]["completion_tokens"], 8);
    }

    /// Without an explicit size the KV cache gets what the weights and a profiling pass at the full
    /// token budget leave of `--gpu-memory-utilization` × the device's memory; a model that does
    /// not fit is one clear error naming the tensor.
    #[test]
    fn the_kv_cache_is_sized_from_device_memory_and_too_little_memory_is_one_error() {
        let model = fixture("tiny-llama");
        let generate = |memory: &str, utilization: &str| {
            std::process::Command::new(env!("CARGO_BIN_EXE_pagoda"))
                .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "Hi", "--max-tokens", "2"])
                .args(["--device", "cuda-emulated", "--dtype", "float32", "--max-num-batched-tokens", "64"])
                .args(["--gpu-memory-utilization", utilization])
                .env("PAGODA_LOG", "info")
                .env("PAGODA_EMULATED_MEMORY", memory)
                .output()
                .unwrap()
        };
        let blocks = |log: &str| -> usize {
            // The log may be coloured: drop the escape sequences first.
            let mut plain = String::new();
            let mut in_escape = false;
            for c in log.chars() {
                match (in_escape, c) {
                    (false, '\u{1b}') => in_escape = true,
                    (true, 'm') => in_escape = false,
                    (false, c) => plain.push(c),
                    _ => {}
                }
            }
            let log = plain.as_str();
            let at = log.find("num_blocks=").unwrap_or_else(|| panic!("{log}")) + "num_blocks=".len();
            log[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
        };
        // 32 MiB: the f32 weights take 0.85 MiB; a block (2 layers × K and V × 16 tokens × 2 KV
        // heads × 16 dims × 4 bytes) takes 8 KiB.
        let half = generate("33554432", "0.5");
        let log = String::from_utf8_lossy(&half.stderr);
        assert!(half.status.success(), "{log}");
        assert!(log.contains("KV cache sized from GPU memory"), "{log}");
        let full = generate("33554432", "0.9");
        let full_log = String::from_utf8_lossy(&full.stderr);
        assert!(full.status.success(), "{full_log}");
        let (at_half, at_full) = (blocks(&log), blocks(&full_log));
        // 0.4 × 32 MiB more memory is 1,638 more blocks of 8 KiB.
        assert_eq!(at_full - at_half, (0.4f64 * 32.0 * 1024.0 * 1024.0 / 8192.0) as usize, "{at_half} → {at_full}");

        // 512 KiB cannot hold the weights.
        let tiny = generate("524288", "0.9");
        assert_eq!(tiny.status.code(), Some(1));
        let err = String::from_utf8_lossy(&tiny.stderr);
        assert!(err.contains("does not fit on the GPU") && err.contains("weight '"), "{err}");
    }

    /// A CPU-only device choice cannot run the self test: one clear line.
    #[test]
    fn selftest_needs_a_cuda_device() {
        let out = pagoda(&["selftest", "--device", "cpu"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA device is available"));
    }
}
