//! Choosing the next token from a row of logits, in vLLM's order: logprobs from the raw logits;
//! then the `min_tokens` mask, `logit_bias`, and repetition/frequency/presence penalties; then
//! either the argmax (temperature 0) or temperature, min-p, top-k, top-p and a draw from the
//! sequence's own random generator.

use std::collections::HashMap;

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use super::request::{SamplingParams, TokenLogprobs};
use crate::backend::{RowSampling, draw_by_index};

/// Temperatures below this are greedy, as in vLLM.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// What the sampler needs to know about the sequence besides its logits.
pub struct SamplingContext<'a> {
    pub prompt_ids: &'a [u32],
    pub output_ids: &'a [u32],
    /// Tokens that end generation (EOS unless ignored, and stop token ids): masked until
    /// `min_tokens` tokens have been generated.
    pub stop_token_ids: &'a [u32],
}

/// Picks the next token from `logits` (which it modifies) and, if asked, its logprobs.
pub fn sample(
    logits: &mut [f32],
    params: &SamplingParams,
    ctx: &SamplingContext,
    rng: &mut ChaCha8Rng,
) -> (u32, Option<TokenLogprobs>) {
    // Logprobs describe the model's own distribution, before any processing (vLLM's default).
    let raw = params.logprobs.map(|_| logits.to_vec());
    apply_processors(logits, params, ctx);
    let token = if params.temperature < GREEDY_TEMPERATURE { argmax(logits) } else { draw(logits, params, rng) };
    let logprobs = raw.map(|raw| token_logprobs(&raw, token, params.logprobs.unwrap_or(0)));
    (token, logprobs)
}

/// How the row can be sampled where its logits are (`Backend::sample_rows`), giving what
/// [`sample`] gives: greedy, or a draw after temperature and min-p (with the uniform number taken
/// from `rng` now, as [`sample`] would take it), when no logprobs are asked for, no processor
/// changes a logit this step and no top-k/top-p applies. `None`: the host sampler is needed.
pub fn device_rule(params: &SamplingParams, ctx: &SamplingContext, rng: &mut ChaCha8Rng) -> Option<RowSampling> {
    let masks_stops = ctx.output_ids.len() < params.min_tokens && !ctx.stop_token_ids.is_empty();
    let untouched = params.logprobs.is_none()
        && params.logit_bias.is_empty()
        && params.repetition_penalty == 1.0
        && params.frequency_penalty == 0.0
        && params.presence_penalty == 0.0
        && !masks_stops;
    if !untouched {
        return None;
    }
    if params.temperature < GREEDY_TEMPERATURE {
        return Some(RowSampling::Greedy);
    }
    if params.top_k > 0 || params.top_p < 1.0 {
        return None;
    }
    Some(RowSampling::Draw { temperature: params.temperature, min_p: params.min_p, uniform: uniform(rng) })
}

/// The log-softmax of `logits` at `token`, and the `k` most likely tokens with theirs.
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum_exp = max + sum.ln() as f32;
    let top = top_k_indices(logits, k).into_iter().map(|i| (i, logits[i as usize] - log_sum_exp)).collect();
    TokenLogprobs { token_id: token, logprob: logits[token as usize] - log_sum_exp, top }
}

/// Indices of the `k` largest values, largest first, ties broken by lower index.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// The first index of the largest value, NaN counting as -inf (as `Backend::argmax_rows` does).
pub fn argmax(values: &[f32]) -> u32 {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if key(v) > key(values[best]) {
            best = i;
        }
    }
    best as u32
}

fn apply_processors(logits: &mut [f32], params: &SamplingParams, ctx: &SamplingContext) {
    if ctx.output_ids.len() < params.min_tokens {
        for &t in ctx.stop_token_ids {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    if params.repetition_penalty != 1.0 {
        let p = params.repetition_penalty;
        let mut seen = std::collections::HashSet::new();
        for &t in ctx.prompt_ids.iter().chain(ctx.output_ids) {
            if seen.insert(t)
                && let Some(l) = logits.get_mut(t as usize)
            {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in ctx.output_ids {
            *counts.entry(t).or_default() += 1;
        }
        for (t, count) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.frequency_penalty * count as f32 + params.presence_penalty;
            }
        }
    }
}

/// A random draw after temperature, min-p, top-k and top-p.
fn draw(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    if params.top_k == 0 && params.top_p >= 1.0 {
        // The walk in index order, as the device does it (`device_rule`).
        return draw_by_index(logits, params.temperature, params.min_p, uniform(rng));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / params.temperature;
    let mut probs: Vec<f32> = logits.iter().map(|&l| (l / params.temperature - max).exp()).collect();
    if params.min_p > 0.0 {
        // The most likely token has probability ∝ exp(0) = 1 here; drop those below min_p of it.
        for p in probs.iter_mut() {
            if *p < params.min_p {
                *p = 0.0;
            }
        }
    }
    // Candidates in the order the draw walks them: by probability, cut by top-k and top-p.
    let k = if params.top_k > 0 { params.top_k } else { probs.len() };
    let mut candidates = top_k_indices(&probs, k);
    if params.top_p < 1.0 {
        let total: f32 = candidates.iter().map(|&i| probs[i as usize]).sum();
        let mut cumulative = 0.0;
        let keep = candidates
            .iter()
            .position(|&i| {
                cumulative += probs[i as usize];
                cumulative >= params.top_p * total
            })
            .map_or(candidates.len(), |p| p + 1);
        candidates.truncate(keep);
    }
    let total: f32 = candidates.iter().map(|&i| probs[i as usize]).sum();
    let mut target = uniform(rng) * total;
    for &i in &candidates {
        let p = probs[i as usize];
        if target < p {
            return i;
        }
        target -= p;
    }
    // Rounding left a sliver at the end: take the last token with any probability.
    candidates.iter().rev().copied().find(|&i| probs[i as usize] > 0.0).unwrap_or(candidates[0])
}

/// Uniform in [0, 1) with 24 bits, the precision of an f32.
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;

    fn ctx<'a>(prompt: &'a [u32], output: &'a [u32]) -> SamplingContext<'a> {
        SamplingContext { prompt_ids: prompt, output_ids: output, stop_token_ids: &[] }
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_raw_logprobs() {
        let mut logits = vec![1.0, 3.0, 3.0, -1.0];
        let params = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() };
        let (token, lp) = sample(&mut logits, &params, &ctx(&[], &[]), &mut rng(0));
        assert_eq!(token, 1);
        let lp = lp.unwrap();
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + (-1f64).exp()).ln() as f32;
        assert!((lp.logprob - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn penalties_and_bias_change_the_argmax() {
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut [1.0, 1.5, 0.0], &params, &ctx(&[1], &[]), &mut rng(0)).0, 0);
        let params = SamplingParams { frequency_penalty: 0.4, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut [1.0, 1.5, 0.0], &params, &ctx(&[], &[1, 1]), &mut rng(0)).0, 0);
        let params = SamplingParams { presence_penalty: 0.6, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut [1.0, 1.5, 0.0], &params, &ctx(&[], &[1]), &mut rng(0)).0, 0);
        let params = SamplingParams { logit_bias: vec![(2, 5.0)], ..SamplingParams::greedy() };
        assert_eq!(sample(&mut [1.0, 1.5, 0.0], &params, &ctx(&[], &[]), &mut rng(0)).0, 2);
    }

    #[test]
    fn min_tokens_masks_stop_tokens_until_reached() {
        let params = SamplingParams { min_tokens: 2, ..SamplingParams::greedy() };
        let stops = [0u32];
        let c = SamplingContext { prompt_ids: &[], output_ids: &[5], stop_token_ids: &stops };
        assert_eq!(sample(&mut [9.0, 1.0], &params, &c, &mut rng(0)).0, 1);
        let c = SamplingContext { prompt_ids: &[], output_ids: &[5, 5], stop_token_ids: &stops };
        assert_eq!(sample(&mut [9.0, 1.0], &params, &c, &mut rng(0)).0, 0);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let logits = vec![0.0, (3f32).ln(), f32::NEG_INFINITY];
        let params = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        let draws = |seed| {
            let mut r = rng(seed);
            (0..4000).map(|_| sample(&mut logits.clone(), &params, &ctx(&[], &[]), &mut r).0).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        let ones = a.iter().filter(|&&t| t == 1).count() as f32 / a.len() as f32;
        assert!((ones - 0.75).abs() < 0.03, "token 1 drawn {ones} of the time, expected 0.75");
        assert!(!a.contains(&2));
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        // Probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let seen = |params: SamplingParams| {
            let mut r = rng(1);
            let mut seen: Vec<u32> =
                (0..2000).map(|_| sample(&mut logits.clone(), &params, &ctx(&[], &[]), &mut r).0).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        assert_eq!(seen(SamplingParams { top_k: 2, ..SamplingParams::default() }), vec![0, 1]);
        assert_eq!(seen(SamplingParams { top_p: 0.8, ..SamplingParams::default() }), vec![0, 1]);
        assert_eq!(seen(SamplingParams { top_p: 0.81, ..SamplingParams::default() }), vec![0, 1, 2]);
        assert_eq!(seen(SamplingParams { min_p: 0.35, ..SamplingParams::default() }), vec![0, 1]);
        assert_eq!(seen(SamplingParams::default()), vec![0, 1, 2, 3]);
        // A low temperature sharpens towards the argmax.
        assert_eq!(seen(SamplingParams { temperature: 0.05, ..SamplingParams::default() }), vec![0]);
    }

    #[test]
    fn rows_go_to_the_device_only_when_it_gives_what_the_host_gives() {
        let stops = [0u32];
        let c = SamplingContext { prompt_ids: &[], output_ids: &[5], stop_token_ids: &stops };
        let rule = |params: &SamplingParams, c: &SamplingContext| device_rule(params, c, &mut rng(1));
        assert_eq!(rule(&SamplingParams::greedy(), &c), Some(RowSampling::Greedy));
        let temperature = SamplingParams { temperature: 0.7, min_p: 0.1, ..SamplingParams::default() };
        let expected_uniform = uniform(&mut rng(1));
        assert_eq!(
            rule(&temperature, &c),
            Some(RowSampling::Draw { temperature: 0.7, min_p: 0.1, uniform: expected_uniform })
        );
        for params in [
            SamplingParams { top_k: 5, ..SamplingParams::default() },
            SamplingParams { top_p: 0.9, ..SamplingParams::default() },
            SamplingParams { logprobs: Some(0), ..SamplingParams::greedy() },
            SamplingParams { logit_bias: vec![(1, 1.0)], ..SamplingParams::greedy() },
            SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() },
            SamplingParams { frequency_penalty: 0.1, ..SamplingParams::greedy() },
            SamplingParams { presence_penalty: 0.1, ..SamplingParams::greedy() },
            SamplingParams { min_tokens: 2, ..SamplingParams::greedy() },
        ] {
            assert_eq!(rule(&params, &c), None, "{params:?}");
        }
        // min_tokens reached, or nothing to mask: on the device again.
        assert!(rule(&SamplingParams { min_tokens: 1, ..SamplingParams::greedy() }, &c).is_some());
        let no_stops = SamplingContext { prompt_ids: &[], output_ids: &[], stop_token_ids: &[] };
        assert!(rule(&SamplingParams { min_tokens: 3, ..SamplingParams::greedy() }, &no_stops).is_some());
    }

    /// The device's rule draws what `sample` draws from the same generator.
    #[test]
    fn a_device_rule_draws_what_the_host_sampler_draws() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let params = SamplingParams { temperature: 0.8, min_p: 0.05, ..SamplingParams::default() };
        let (mut host_rng, mut device_rng) = (rng(9), rng(9));
        for _ in 0..200 {
            let (host, _) = sample(&mut logits.clone(), &params, &ctx(&[], &[]), &mut host_rng);
            let Some(RowSampling::Draw { temperature, min_p, uniform }) =
                device_rule(&params, &ctx(&[], &[]), &mut device_rng)
            else {
                panic!("a temperature draw goes to the device")
            };
            assert_eq!(draw_by_index(&logits, temperature, min_p, uniform), host);
        }
    }

    #[test]
    fn top_k_indices_orders_ties_by_index() {
        assert_eq!(top_k_indices(&[1.0, 5.0, 5.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0], 5), vec![0]);
    }
}
