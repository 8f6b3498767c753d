//! The model against transformers: logits at every position, greedy choices, logprobs, chat
//! rendering and tokenization, for both fixture models.
//!
//! The fixtures' `greedy_ids` are the argmax of their own `reference_logits` (see the fixtures'
//! README), so greedy output is compared with them exactly wherever the margin allows.

use pagoda::backend::cpu::CpuBackend;
use pagoda::engine::SamplingParams;
use pagoda::model::{ModelFiles, ModelRunner};
use pagoda::tokenizer::IncrementalDetokenizer;
use pagoda::weights::WeightStore;

use crate::common::*;

const LOGITS_TOLERANCE: f32 = 1e-3;
const MARGIN: f32 = 1e-3;

fn reference_logits(model: &str, prompt_idx: usize, num_rows: usize) -> Vec<f32> {
    let store = WeightStore::open_file(&fixture(model).join("reference_logits.safetensors")).unwrap();
    store.tensor(&format!("prompt{prompt_idx}"), &[num_rows, 1024]).unwrap().to_f32_vec()
}

/// Runs `tokens` through a fresh runner in chunks of `chunk` tokens, its blocks laid out in
/// reverse order (so paging is really exercised), and returns the logits of every position.
fn logits_by_chunks(files: &ModelFiles, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let block_size = 4;
    let num_blocks = tokens.len().div_ceil(block_size);
    let mut runner = ModelRunner::new(CpuBackend::new(), files, 512, num_blocks, block_size).unwrap();
    pagoda::selftest::fixtures::chunked_logits(&mut runner, tokens, chunk).unwrap()
}

#[test]
fn logits_match_transformers_at_every_position_in_one_pass_and_in_chunks() {
    for model in MODELS {
        let files = ModelFiles::load(&fixture(model)).unwrap();
        for (idx, p) in reference(model).prompts.iter().enumerate() {
            let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
            let expected = reference_logits(model, idx, tokens.len());
            for chunk in [tokens.len(), 7, 1] {
                let ours = logits_by_chunks(&files, &tokens, chunk);
                assert_eq!(ours.len(), expected.len());
                let (worst, at) = ours
                    .iter()
                    .zip(&expected)
                    .enumerate()
                    .map(|(i, (a, b))| ((a - b).abs(), i))
                    .fold((0f32, 0), |acc, x| if x.0 > acc.0 { x } else { acc });
                assert!(
                    worst <= LOGITS_TOLERANCE,
                    "{model} prompt {idx} chunk {chunk}: |logit difference| {worst} at position {}, token {}",
                    at / 1024,
                    at % 1024
                );
            }
        }
    }
}

#[test]
fn prompts_tokenize_and_decode_like_transformers() {
    for model in MODELS {
        let files = ModelFiles::load(&fixture(model)).unwrap();
        let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (p, raw) in reference(model).prompts.iter().zip(raw["prompts"].as_array().unwrap()) {
            assert_eq!(files.tokenizer.encode(&p.text, true).unwrap(), p.prompt_ids, "{model}: {:?}", p.text);
            let greedy_text = raw["greedy_text"].as_str().unwrap();
            assert_eq!(files.tokenizer.decode(&p.greedy_ids, true), greedy_text);
        }
    }
}

#[test]
fn chat_templates_render_and_tokenize_exactly() {
    for model in MODELS {
        let files = ModelFiles::load(&fixture(model)).unwrap();
        let template = files.tokenizer.chat_template().expect("the fixtures have chat templates");
        for chat in reference(model).chats {
            let rendered = template.render(&chat.messages, true, &serde_json::Map::new()).unwrap();
            assert_eq!(rendered, chat.rendered, "{model}");
            assert_eq!(files.tokenizer.encode(&rendered, false).unwrap(), chat.ids, "{model}");
        }
    }
}

/// Each step of each prompt as its own request, teacher-forced on the reference prefix: the greedy
/// token is the reference argmax wherever the margin allows, and logprobs and top-5 agree.
#[test]
fn greedy_choices_logprobs_and_top5_match_every_reference_step() {
    for model in MODELS {
        let mut engine = engine(model, |_| {});
        let reference = reference(model);
        let mut requests = Vec::new();
        for (p_idx, p) in reference.prompts.iter().enumerate() {
            for step in 0..p.steps.len() {
                let prompt: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids[..step]).copied().collect();
                let params = SamplingParams { logprobs: Some(5), ..greedy(1) };
                requests.push(request(&format!("{p_idx:02}-{step:02}"), prompt, params));
            }
        }
        let done = run(&mut engine, requests);
        let mut checked = 0;
        for c in done {
            let (p_idx, step) = c.request_id.0.split_once('-').unwrap();
            let p = &reference.prompts[p_idx.parse::<usize>().unwrap()];
            let s = &p.steps[step.parse::<usize>().unwrap()];
            let ours = &c.logprobs[0];
            let context = format!("{model} prompt {p_idx} step {step}");
            if s.margin > MARGIN {
                assert_eq!(c.token_ids[0], s.top5[0].0, "{context}: greedy token");
                checked += 1;
            }
            assert!(
                (ours.logprob - s.top5[0].1).abs() < LOGITS_TOLERANCE,
                "{context}: {} vs {}",
                ours.logprob,
                s.top5[0].1
            );
            assert_eq!(ours.top.len(), 5);
            for (k, ((id, lp), (ref_id, ref_lp))) in ours.top.iter().zip(&s.top5).enumerate() {
                assert!((lp - ref_lp).abs() < LOGITS_TOLERANCE, "{context}: top-{k} logprob {lp} vs {ref_lp}");
                // Ids must agree unless the reference itself has a near tie at this rank.
                let near_tie = s.top5.iter().enumerate().any(|(j, t)| j != k && (t.1 - ref_lp).abs() < MARGIN);
                assert!(near_tie || id == ref_id, "{context}: top-{k} token {id} vs {ref_id}");
            }
            // The reference step's own token (the fixture's `greedy_ids`) is ranked where its
            // logprob says, if it is among our top 5.
            if let Some((_, lp)) = ours.top.iter().find(|(id, _)| *id == s.token) {
                assert!((lp - s.logprob).abs() < LOGITS_TOLERANCE, "{context}");
            }
        }
        assert!(checked >= 100, "{model}: only {checked} steps had a usable margin");
    }
}

#[test]
fn free_running_greedy_follows_greedy_ids_while_they_are_the_argmax() {
    for model in MODELS {
        let mut engine = engine(model, |_| {});
        let reference = reference(model);
        let requests = reference
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(&format!("{i}"), p.prompt_ids.clone(), greedy(24)))
            .collect();
        let done = run(&mut engine, requests);
        let mut compared = 0;
        for (c, p) in done.iter().zip(&reference.prompts) {
            assert_eq!(c.token_ids.len(), 24);
            for (step, s) in p.steps.iter().enumerate() {
                let follows_argmax = p.greedy_ids[step] == s.top5[0].0;
                if !follows_argmax || s.margin <= MARGIN {
                    break;
                }
                assert_eq!(c.token_ids[step], p.greedy_ids[step], "{model} prompt {}: step {step}", c.request_id);
                compared += 1;
            }
        }
        assert!(compared > 0, "{model}: greedy_ids never followed the argmax");
    }
}

#[test]
fn detokenization_never_emits_half_a_character() {
    let files = ModelFiles::load(&fixture("tiny-llama")).unwrap();
    let tok = &files.tokenizer;
    // Emoji and accented letters span several byte-level tokens.
    let text = "Ünïcödé — “quotes” and emoji 🚀🚀 in the middle, 中文字符";
    let ids = tok.encode(text, false).unwrap();
    let mut detok = IncrementalDetokenizer::new(&[0], true);
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = detok.push(tok, id);
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} carries a replacement character");
        pieces.push(piece);
    }
    pieces.push(detok.flush(tok));
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().any(|p| p.is_empty()), "some tokens are partial characters and must wait");
}

/// The log-softmax of `row` at `token`, and how many entries are within `tol` of at least it
/// (the bounds of its rank).
fn reference_logprob(row: &[f32], token: u32, tol: f32) -> (f32, std::ops::RangeInclusive<u32>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let t = row[token as usize];
    let rank = |at_least: f32| row.iter().filter(|&&x| x >= at_least).count() as u32;
    (t - lse, rank(t + tol)..=rank(t - tol))
}

#[test]
fn prompt_logprobs_are_transformers_through_chunks_preemption_and_a_warm_prefix_cache() {
    for model in MODELS {
        let refs = reference(model);
        // Each prompt followed by its greedy continuation: the reference logits cover all of it.
        let prompts: Vec<Vec<u32>> =
            refs.prompts.iter().map(|p| p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect()).collect();
        // A 16-token step budget chunks every prompt, and 40 blocks of 4 tokens cannot hold the
        // ten sequences' 40 tokens of output each: preemptions recompute some prefills.
        let mut engine = engine(model, |o| {
            o.max_model_len = Some(128);
            o.block_size = 4;
            o.num_gpu_blocks_override = Some(40);
            o.max_num_batched_tokens = 16;
        });
        // The same prompts first, without prompt logprobs, so that the prefix cache holds them.
        let warm = prompts.iter().enumerate().map(|(i, p)| request(&format!("warm{i}"), p.clone(), greedy(1)));
        run(&mut engine, warm.collect());
        let params = SamplingParams { prompt_logprobs: Some(5), n: 2, ..greedy(40) };
        let asked = prompts.iter().enumerate().map(|(i, p)| request(&format!("p{i}"), p.clone(), params.clone()));
        let outputs = run(&mut engine, asked.collect());
        assert!(engine.stats().num_preemptions > 0, "{model}: the pool was meant to force preemption");
        for out in &outputs {
            let i: usize = out.request_id.0[1..].parse().unwrap();
            assert_eq!(out.num_cached_tokens, 0, "{model} prompt {i}: no position may come from the cache");
            let logprobs = out.prompt_logprobs.as_ref().expect("prompt logprobs are returned");
            assert_eq!(logprobs.len(), prompts[i].len() - 1, "{model} prompt {i}: one per token after the first");
            let expected = reference_logits(model, i, prompts[i].len());
            for (pos, lp) in logprobs.iter().enumerate() {
                let row = &expected[pos * 1024..(pos + 1) * 1024];
                let token = prompts[i][pos + 1];
                assert_eq!(lp.token_id, token);
                let (want, ranks) = reference_logprob(row, token, LOGITS_TOLERANCE);
                assert!(
                    (lp.logprob - want).abs() < 2.0 * LOGITS_TOLERANCE,
                    "{model} {i}@{pos}: {} vs {want}",
                    lp.logprob
                );
                assert!(ranks.contains(&lp.rank), "{model} {i}@{pos}: rank {} outside {ranks:?}", lp.rank);
                assert_eq!(lp.top.len(), 5);
                let mut sorted: Vec<f32> = row.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                for (&(id, logprob), &logit) in lp.top.iter().zip(&sorted) {
                    let (want, _) = reference_logprob(row, id, 0.0);
                    assert!((logprob - want).abs() < 2.0 * LOGITS_TOLERANCE, "{model} {i}@{pos}: top {id}");
                    assert!((row[id as usize] - logit).abs() < 2.0 * LOGITS_TOLERANCE, "{model} {i}@{pos}: top order");
                }
            }
        }
        // Both sequences of a request computed the same numbers, whatever they were batched with.
        for pair in outputs.chunks(2) {
            assert_eq!(pair[0].request_id, pair[1].request_id);
            assert_eq!(pair[0].prompt_logprobs, pair[1].prompt_logprobs);
        }
    }
}

#[test]
fn a_prompt_longer_than_a_steps_logits_rows_gets_the_same_prompt_logprobs_in_one_step_or_in_chunks() {
    // 300 prompt positions in one step: more rows than the model runner holds logits for at once
    // (`MAX_LOGITS_ROWS`), so they are computed and picked in slices.
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 1000).collect();
    assert!(prompt.len() > pagoda::model::MAX_LOGITS_ROWS);
    let params = SamplingParams { prompt_logprobs: Some(3), ..greedy(2) };
    let mut outputs = Vec::new();
    for budget in [512, 16] {
        let mut engine = engine("tiny-llama", |o| {
            o.max_model_len = Some(512);
            o.max_num_batched_tokens = budget;
        });
        outputs.push(run(&mut engine, vec![request("long", prompt.clone(), params.clone())]).remove(0));
    }
    let (whole, chunked) = (outputs[0].prompt_logprobs.as_ref().unwrap(), outputs[1].prompt_logprobs.as_ref().unwrap());
    assert_eq!(whole.len(), 299);
    assert_eq!(outputs[0].token_ids, outputs[1].token_ids);
    for (pos, (a, b)) in whole.iter().zip(chunked).enumerate() {
        assert_eq!((a.token_id, a.rank), (b.token_id, b.rank), "position {pos}");
        assert!((a.logprob - b.logprob).abs() < 1e-5, "position {pos}: {} vs {}", a.logprob, b.logprob);
        assert_eq!(a.top.iter().map(|t| t.0).collect::<Vec<_>>(), b.top.iter().map(|t| t.0).collect::<Vec<_>>());
    }
}
