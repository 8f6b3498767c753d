//! Continuous batching, chunked prefill, preemption and prefix caching must not change what a
//! request produces.

use pagoda::engine::{FinishReason, MaxTokens, SamplingParams};

use crate::common::*;

/// 32 prompts of 1 to 94 tokens, cut from the fixture prompts' token streams.
fn varied_prompts() -> Vec<Vec<u32>> {
    let reference = reference("tiny-llama");
    let stream: Vec<u32> =
        reference.prompts.iter().flat_map(|p| p.prompt_ids[1..].to_vec()).cycle().take(4000).collect();
    (0..32)
        .map(|i| {
            let len = 1 + (i * 37) % 94;
            let start = (i * 53) % 1000;
            let mut p = vec![0];
            p.extend_from_slice(&stream[start..start + len - 1]);
            p
        })
        .collect()
}

#[test]
fn greedy_tokens_do_not_depend_on_batching_chunking_or_preemption() {
    let prompts = varied_prompts();
    let max_tokens = |i: usize| 8 + (i * 5) % 17;

    // Each request alone, in an engine with plenty of room.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut engine = engine("tiny-llama", |o| o.max_model_len = Some(128));
        alone.push(run(&mut engine, vec![request("a", p.clone(), greedy(max_tokens(i)))]).remove(0).token_ids);
    }

    // All together: a 64-token step budget chunks the longer prompts, and 24 blocks of 16 tokens
    // (384 slots for ~2,500 tokens of sequences) force preemptions.
    let mut engine = engine("tiny-llama", |o| {
        o.max_model_len = Some(128);
        o.num_gpu_blocks_override = Some(24);
        o.max_num_batched_tokens = 64;
    });
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(&format!("{i:02}"), p.clone(), greedy(max_tokens(i))))
        .collect();
    let together = run(&mut engine, requests);
    let stats = engine.stats();
    assert!(stats.num_preemptions > 0, "the pool was meant to force preemption");
    let per_request: usize = together.iter().map(|c| c.num_preemptions).sum();
    assert_eq!(per_request as u64, stats.num_preemptions, "each preemption is counted on its sequence");
    assert_eq!(stats.kv_cache_usage, 0.0, "every block returns to the pool");
    assert_eq!((stats.num_running, stats.num_waiting), (0, 0));
    for (i, c) in together.iter().enumerate() {
        assert_eq!(c.token_ids, alone[i], "request {i} (prompt of {} tokens) changed when batched", prompts[i].len());
        assert_eq!(c.finish_reason, Some(FinishReason::Length));
    }
}

#[test]
fn a_shared_prefix_is_served_from_the_cache_with_the_same_output() {
    let reference = reference("tiny-llama");
    let base: Vec<u32> = reference.prompts.iter().flat_map(|p| p.prompt_ids.clone()).cycle().take(100).collect();
    let mut second = base[..96].to_vec();
    second.extend([17, 18, 19]);

    let mut cached = engine("tiny-llama", |_| {});
    run(&mut cached, vec![request("first", base.clone(), greedy(4))]);
    let hits_before = cached.stats().prefix_cache.hits;
    let with_cache = run(&mut cached, vec![request("second", second.clone(), greedy(12))]).remove(0);
    let hits = cached.stats().prefix_cache.hits - hits_before;
    assert_eq!(hits, 96, "the 6 full blocks of the shared prefix are reused");
    assert_eq!(with_cache.num_cached_tokens, 96);

    let mut uncached = engine("tiny-llama", |o| o.enable_prefix_caching = false);
    let without = run(&mut uncached, vec![request("second", second, greedy(12))]).remove(0);
    assert_eq!(uncached.stats().prefix_cache.hits, 0);
    assert_eq!(with_cache.token_ids, without.token_ids);
}

#[test]
fn seeded_sampling_repeats_whatever_it_is_batched_with() {
    let prompts = varied_prompts();
    let params = |seed| SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(seed),
        max_tokens: MaxTokens::Exact(12),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut engine_a = engine("tiny-llama", |_| {});
    let alone = run(&mut engine_a, vec![request("x", prompts[5].clone(), params(42))]).remove(0);
    let mut engine_b = engine("tiny-llama", |o| o.num_gpu_blocks_override = Some(40));
    let mut requests: Vec<_> =
        prompts.iter().enumerate().map(|(i, p)| request(&format!("{i:02}"), p.clone(), params(i as u64))).collect();
    requests.push(request("x", prompts[5].clone(), params(42)));
    let together = run(&mut engine_b, requests);
    let x = together.iter().find(|c| c.request_id.0 == "x").unwrap();
    assert_eq!(x.token_ids, alone.token_ids);
    let other_seed = together.iter().find(|c| c.request_id.0 == "05").unwrap();
    assert_ne!(other_seed.token_ids, alone.token_ids, "a different seed samples differently");
}

#[test]
fn n_completions_share_the_prompt_and_differ_by_seed() {
    let prompt = reference("tiny-llama").prompts[1].prompt_ids.clone();
    let mut engine = engine("tiny-llama", |_| {});
    let params = SamplingParams {
        n: 4,
        temperature: 1.0,
        seed: Some(7),
        max_tokens: MaxTokens::Exact(10),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let done = run(&mut engine, vec![request("r", prompt.clone(), params.clone())]);
    assert_eq!(done.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let distinct: std::collections::HashSet<_> = done.iter().map(|c| c.token_ids.clone()).collect();
    assert!(distinct.len() > 1, "four sampled completions should not all agree");
    // Completion i of n with seed s is the single completion with seed s + i.
    let single = SamplingParams { n: 1, seed: Some(9), ..params };
    let third = run(&mut engine, vec![request("s", prompt, single)]).remove(0);
    assert_eq!(third.token_ids, done[2].token_ids);
}

#[test]
fn stop_conditions_end_generation_where_they_should() {
    let reference = reference("tiny-llama");
    let p = &reference.prompts[0];
    let mut engine = engine("tiny-llama", |_| {});
    let free = run(&mut engine, vec![request("free", p.prompt_ids.clone(), greedy(24))]).remove(0);
    let stop_token = free.token_ids[5];
    let first_at = free.token_ids.iter().position(|&t| t == stop_token).unwrap();

    // A stop token id ends the output at its first occurrence, and is the last token.
    let params = SamplingParams { stop_token_ids: vec![stop_token], ..greedy(24) };
    let c = run(&mut engine, vec![request("tok", p.prompt_ids.clone(), params)]).remove(0);
    assert_eq!(c.token_ids, free.token_ids[..=first_at]);
    assert_eq!(c.finish_reason, Some(FinishReason::Stop));
    assert_eq!(c.stop_reason, Some(pagoda::engine::StopReason::Token(stop_token)));

    // min_tokens holds it off.
    let params = SamplingParams { stop_token_ids: vec![stop_token], min_tokens: first_at + 2, ..greedy(24) };
    let c = run(&mut engine, vec![request("min", p.prompt_ids.clone(), params)]).remove(0);
    assert!(c.token_ids.len() > first_at + 1);

    // A stop string cuts the text before it; the text before is exactly the free text's prefix.
    let word = free.text.split(|c: char| !c.is_ascii_alphabetic()).find(|w| w.len() >= 3).expect("some ASCII word");
    let visible = word[..3].to_string();
    let at = free.text.find(&visible).unwrap();
    let params = SamplingParams { stop: vec![visible.clone()], ..greedy(24) };
    let c = run(&mut engine, vec![request("str", p.prompt_ids.clone(), params)]).remove(0);
    assert_eq!(c.text, free.text[..at]);
    assert_eq!(c.stop_reason, Some(pagoda::engine::StopReason::Text(visible.clone())));
    let params = SamplingParams { stop: vec![visible.clone()], include_stop_str_in_output: true, ..greedy(24) };
    let c = run(&mut engine, vec![request("inc", p.prompt_ids.clone(), params)]).remove(0);
    assert_eq!(c.text, free.text[..at + visible.len()]);

    // EOS ends generation unless ignored: make EOS (id 4) overwhelmingly likely.
    let params =
        SamplingParams { logit_bias: vec![(4, 100.0)], max_tokens: MaxTokens::Exact(5), ..SamplingParams::greedy() };
    let c = run(&mut engine, vec![request("eos", p.prompt_ids.clone(), params.clone())]).remove(0);
    assert_eq!(
        (c.token_ids.clone(), c.finish_reason, c.stop_reason.clone()),
        (vec![4], Some(FinishReason::Stop), None)
    );
    let c = run(&mut engine, vec![request("ign", p.prompt_ids.clone(), SamplingParams { ignore_eos: true, ..params })])
        .remove(0);
    assert_eq!((c.token_ids, c.finish_reason), (vec![4; 5], Some(FinishReason::Length)));
}

#[test]
fn requests_beyond_the_context_are_refused_at_the_limit() {
    let engine = engine("tiny-llama", |o| o.max_model_len = Some(64));
    let check = |prompt: &[u32], params: SamplingParams| {
        request("x", prompt.to_vec(), params).validate(&engine.limits()).map(|r| r.max_tokens())
    };
    let prompt = vec![5u32; 60];
    let params = |max| SamplingParams { max_tokens: MaxTokens::Exact(max), ..SamplingParams::greedy() };
    assert_eq!(check(&prompt, params(4)), Ok(4), "exactly at the limit is allowed");
    let err = check(&prompt, params(5)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "this model's maximum context length is 64 tokens, but 65 were requested (60 in the prompt, 5 for the completion)"
    );
    assert!(check(&[5u32; 64], SamplingParams { max_tokens: MaxTokens::Unlimited, ..params(1) }).is_err());
    assert_eq!(check(&[5u32; 63], SamplingParams { max_tokens: MaxTokens::Unlimited, ..params(1) }), Ok(1));
    // A default is fitted to the room the prompt leaves, down to one token, but not below.
    assert_eq!(check(&prompt, SamplingParams { max_tokens: MaxTokens::UpTo(16), ..params(1) }), Ok(4));
    assert_eq!(check(&[5u32; 63], SamplingParams { max_tokens: MaxTokens::UpTo(16), ..params(1) }), Ok(1));
    assert!(check(&[5u32; 64], SamplingParams { max_tokens: MaxTokens::UpTo(16), ..params(1) }).is_err());
    assert!(check(&[1024], params(1)).unwrap_err().to_string().contains("outside the vocabulary of 1024"));
    assert!(check(&[], params(1)).is_err());
}
