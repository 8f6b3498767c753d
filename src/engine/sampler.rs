//! The sampling rule of one sequence's next token, in vLLM's order: logprobs from the raw
//! logits; then the `min_tokens` mask, `logit_bias`, and repetition/frequency/presence penalties;
//! then either the argmax (temperature 0) or temperature, min-p, top-k, top-p and a draw with a
//! number from the sequence's own random generator. The rule is applied where the logits are
//! (`Backend::sample_rows`, defined by `backend::sampling::sample_row`).

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use super::request::{SamplingParams, TokenLogprobs};
use crate::model::{Draw, LogitEdit, RowSampling, SampledRow};

/// Temperatures below this are greedy, as in vLLM.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// What the sampler needs to know about the sequence besides its logits.
pub struct SamplingContext<'a> {
    pub prompt_ids: &'a [u32],
    pub output_ids: &'a [u32],
    /// Tokens that end generation (EOS unless ignored, and stop token ids): masked until
    /// `min_tokens` tokens have been generated.
    pub stop_token_ids: &'a [u32],
    /// The width of the logits (for the `allowed_token_ids` mask).
    pub vocab_size: usize,
}

/// The rule that picks this step's token for a sequence. A draw takes its uniform number from
/// `rng` now; a greedy pick takes none.
pub fn row_rule(params: &SamplingParams, ctx: &SamplingContext, rng: &mut ChaCha8Rng) -> RowSampling {
    let draw = (params.temperature >= GREEDY_TEMPERATURE).then(|| Draw {
        temperature: params.temperature,
        min_p: params.min_p,
        top_k: params.top_k as u32,
        top_p: params.top_p,
        uniform: uniform(rng),
    });
    let allowed = (!params.allowed_token_ids.is_empty()).then(|| {
        let mut mask = vec![0u32; ctx.vocab_size.div_ceil(32)];
        for &t in &params.allowed_token_ids {
            if let Some(w) = mask.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
        mask
    });
    RowSampling { edits: edits(params, ctx), draw, logprobs: params.logprobs.map(|k| k as u32), allowed, forced: None }
}

/// A backend's pick as the engine reports it.
pub fn token_and_logprobs(row: SampledRow) -> (u32, Option<TokenLogprobs>) {
    let logprobs =
        row.logprobs.map(|l| TokenLogprobs { token_id: row.token, logprob: l.logprob, rank: l.rank, top: l.top });
    (row.token, logprobs)
}

/// The logit processors as one edit per token they touch, in token order.
fn edits(params: &SamplingParams, ctx: &SamplingContext) -> Vec<LogitEdit> {
    fn at(edits: &mut BTreeMap<u32, LogitEdit>, token: u32) -> &mut LogitEdit {
        edits.entry(token).or_insert(LogitEdit { token, add: 0.0, repetition: 1.0, subtract: 0.0 })
    }
    let mut edits = BTreeMap::new();
    if ctx.output_ids.len() < params.min_tokens {
        for &t in ctx.stop_token_ids {
            at(&mut edits, t).add = f32::NEG_INFINITY;
        }
    }
    for &(t, bias) in &params.logit_bias {
        at(&mut edits, t).add += bias;
    }
    for word in &params.bad_words {
        if let Some((&last, prefix)) = word.split_last()
            && ctx.output_ids.ends_with(prefix)
        {
            at(&mut edits, last).add = f32::NEG_INFINITY;
        }
    }
    if params.repetition_penalty != 1.0 {
        for &t in ctx.prompt_ids.iter().chain(ctx.output_ids) {
            at(&mut edits, t).repetition = params.repetition_penalty;
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for &t in ctx.output_ids {
            *counts.entry(t).or_default() += 1;
        }
        for (t, count) in counts {
            at(&mut edits, t).subtract = params.frequency_penalty * count as f32 + params.presence_penalty;
        }
    }
    edits.into_values().collect()
}

/// Uniform in [0, 1) with 24 bits, the precision of an f32.
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;
    use crate::model::sample_row;

    /// The next token from `logits` (which it modifies) and, if asked, its logprobs, picked on the
    /// host as a backend picks it.
    fn sample(
        logits: &mut [f32],
        params: &SamplingParams,
        ctx: &SamplingContext,
        rng: &mut ChaCha8Rng,
    ) -> (u32, Option<TokenLogprobs>) {
        token_and_logprobs(sample_row(logits, &row_rule(params, ctx, rng)))
    }

    fn ctx<'a>(prompt: &'a [u32], output: &'a [u32]) -> SamplingContext<'a> {
        SamplingContext { prompt_ids: prompt, output_ids: output, stop_token_ids: &[], vocab_size: 64 }
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
        let c = SamplingContext { prompt_ids: &[], output_ids: &[5], stop_token_ids: &stops, vocab_size: 2 };
        assert_eq!(sample(&mut [9.0, 1.0], &params, &c, &mut rng(0)).0, 1);
        let c = SamplingContext { prompt_ids: &[], output_ids: &[5, 5], stop_token_ids: &stops, vocab_size: 2 };
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
    fn rules_carry_the_processors_as_one_edit_per_token() {
        let stops = [0u32, 9];
        let c =
            SamplingContext { prompt_ids: &[4, 7, 4], output_ids: &[7, 5, 7], stop_token_ids: &stops, vocab_size: 16 };
        let params = SamplingParams {
            min_tokens: 5,
            logit_bias: vec![(9, 2.0), (5, -1.0)],
            repetition_penalty: 1.5,
            frequency_penalty: 0.25,
            presence_penalty: 0.5,
            logprobs: Some(3),
            ..SamplingParams::greedy()
        };
        let rule = row_rule(&params, &c, &mut rng(1));
        let edit = |token, add, repetition, subtract| LogitEdit { token, add, repetition, subtract };
        assert_eq!(
            rule.edits,
            vec![
                edit(0, f32::NEG_INFINITY, 1.0, 0.0),
                edit(4, 0.0, 1.5, 0.0),
                edit(5, -1.0, 1.5, 0.75),
                edit(7, 0.0, 1.5, 1.0),
                edit(9, f32::NEG_INFINITY, 1.0, 0.0),
            ]
        );
        assert_eq!((rule.draw, rule.logprobs), (None, Some(3)));
        // Past min_tokens, the stops are no longer masked; with no processor, no edit.
        let done = SamplingContext { output_ids: &[1; 5], ..c };
        assert!(
            row_rule(&SamplingParams { min_tokens: 5, ..SamplingParams::greedy() }, &done, &mut rng(1))
                .edits
                .is_empty()
        );
    }

    #[test]
    fn bad_words_mask_their_last_token_after_their_prefix_and_allowed_ids_mask_the_rest() {
        let params = SamplingParams { bad_words: vec![vec![3], vec![5, 6, 7]], ..SamplingParams::greedy() };
        let banned = |output: &[u32]| {
            let c = SamplingContext { prompt_ids: &[], output_ids: output, stop_token_ids: &[], vocab_size: 8 };
            row_rule(&params, &c, &mut rng(0)).edits.iter().map(|e| e.token).collect::<Vec<_>>()
        };
        assert_eq!(banned(&[1, 5]), vec![3]);
        assert_eq!(banned(&[5, 6]), vec![3, 7]);
        assert_eq!(banned(&[5, 6, 1]), vec![3]);
        let params = SamplingParams { allowed_token_ids: vec![2, 40], ..SamplingParams::greedy() };
        let c = SamplingContext { prompt_ids: &[], output_ids: &[], stop_token_ids: &[], vocab_size: 41 };
        assert_eq!(row_rule(&params, &c, &mut rng(0)).allowed, Some(vec![1 << 2, 1 << 8]));
        let mut logits: Vec<f32> = (0..41).map(|t| t as f32 * -0.1).collect();
        logits[9] = 50.0;
        assert_eq!(sample(&mut logits, &params, &c, &mut rng(0)).0, 2);
    }

    #[test]
    fn a_draw_takes_one_number_from_the_generator_and_greedy_none() {
        let c = ctx(&[], &[]);
        let params = SamplingParams { temperature: 0.7, min_p: 0.1, top_k: 5, top_p: 0.9, ..SamplingParams::default() };
        let mut r = rng(1);
        let rule = row_rule(&params, &c, &mut r);
        let expected = Draw { temperature: 0.7, min_p: 0.1, top_k: 5, top_p: 0.9, uniform: uniform(&mut rng(1)) };
        assert_eq!(rule.draw, Some(expected));
        assert_eq!(uniform(&mut r), {
            let mut again = rng(1);
            uniform(&mut again);
            uniform(&mut again)
        });
        let mut r = rng(1);
        assert_eq!(row_rule(&SamplingParams::greedy(), &c, &mut r).draw, None);
        assert_eq!(uniform(&mut r), uniform(&mut rng(1)));
    }
}
