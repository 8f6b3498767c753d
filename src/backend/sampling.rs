//! How a row of logits becomes a token, defined once on the host. The engine's sampler turns a
//! request's parameters into a [`RowSampling`]; `Backend::sample_rows` applies it where the logits
//! are: the CPU backend by calling [`sample_row`], the CUDA backend with the kernels of
//! `kernels/sampling.cu`, which compute the same thing and are tested against this file
//! (`selftest::ops`). Only the token ids (and the logprobs asked for) leave the device.

/// A change to one token's logit before the pick, in vLLM's order: `add` (the `min_tokens` mask as
/// -inf, plus any logit bias), then the repetition penalty (a positive logit divided by it, a
/// negative one multiplied), then `subtract` (frequency penalty × count + presence penalty).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitEdit {
    pub token: u32,
    pub add: f32,
    /// 1 when there is no repetition penalty for this token.
    pub repetition: f32,
    pub subtract: f32,
}

impl LogitEdit {
    pub fn apply(&self, logit: f32) -> f32 {
        let mut x = logit + self.add;
        if self.repetition != 1.0 {
            x = if x > 0.0 { x / self.repetition } else { x * self.repetition };
        }
        x - self.subtract
    }
}

/// A random pick: [`draw`]'s parameters and the uniform number in [0, 1) it uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    pub min_p: f32,
    /// 0: no top-k.
    pub top_k: u32,
    /// 1: no top-p.
    pub top_p: f32,
    pub uniform: f32,
}

/// Everything that decides one row's token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowSampling {
    /// At most one per token, applied before the pick (after the logprobs, which describe the
    /// model's own distribution, as vLLM's default).
    pub edits: Vec<LogitEdit>,
    /// `None`: greedy, the first index of the largest logit (NaN counting as -inf).
    pub draw: Option<Draw>,
    /// Logprobs of the raw logits: the chosen token's, and this many of the most likely tokens'.
    pub logprobs: Option<u32>,
    /// The tokens a structured output allows, as a bitmask over the vocabulary (bit `t % 32` of
    /// word `t / 32`); the others are set to -inf after the edits.
    pub allowed: Option<Vec<u32>>,
    /// The row's token is this one, not a pick: a prompt position whose logprobs are asked for
    /// (its next prompt token). The edits, the mask and the draw are then not used.
    pub forced: Option<u32>,
}

impl RowSampling {
    pub fn greedy() -> RowSampling {
        RowSampling::default()
    }

    pub fn draw(draw: Draw) -> RowSampling {
        RowSampling { draw: Some(draw), ..RowSampling::default() }
    }

    /// The logprobs of `token` at this row, with the `top` most likely tokens': no pick.
    pub fn forced(token: u32, top: u32) -> RowSampling {
        RowSampling { forced: Some(token), logprobs: Some(top), ..RowSampling::default() }
    }
}

/// One row's pick.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledRow {
    pub token: u32,
    pub logprobs: Option<RowLogprobs>,
}

/// The chosen token's log-probability and rank, and the most likely tokens with theirs, most
/// likely first (ties by lower index).
#[derive(Clone, Debug, PartialEq)]
pub struct RowLogprobs {
    pub logprob: f32,
    /// vLLM's rank: how many tokens are at least as likely as the chosen one (itself included),
    /// so the most likely token has rank 1.
    pub rank: u32,
    pub top: Vec<(u32, f32)>,
}

/// Picks `row`'s token by `rule`, as every backend must. `row` is used up (the edits change it).
pub fn sample_row(row: &mut [f32], rule: &RowSampling) -> SampledRow {
    if rule.forced.is_some() || !edits_logits(rule) {
        return sample_row_from(row, rule);
    }
    let raw = rule.logprobs.map(|_| row.to_vec());
    for edit in &rule.edits {
        if let Some(l) = row.get_mut(edit.token as usize) {
            *l = edit.apply(*l);
        }
    }
    if let Some(mask) = &rule.allowed {
        apply_mask(row, mask);
    }
    let token = pick(row, rule);
    let logprobs = raw.map(|raw| row_logprobs(&raw, token, rule.logprobs.unwrap_or(0) as usize));
    SampledRow { token, logprobs }
}

/// [`sample_row`] of a row that stays as it is: copied only where the rule edits or masks logits
/// (a greedy or plain draw reads the row where it lies).
pub fn sample_row_from(row: &[f32], rule: &RowSampling) -> SampledRow {
    if let Some(token) = rule.forced {
        let logprobs = row_logprobs(row, token, rule.logprobs.unwrap_or(0) as usize);
        return SampledRow { token, logprobs: rule.logprobs.is_some().then_some(logprobs) };
    }
    if edits_logits(rule) {
        return sample_row(&mut row.to_vec(), rule);
    }
    let token = pick(row, rule);
    let logprobs = rule.logprobs.map(|n| row_logprobs(row, token, n as usize));
    SampledRow { token, logprobs }
}

/// Whether the rule changes logits before picking (logit edits or an allowed set).
fn edits_logits(rule: &RowSampling) -> bool {
    !rule.edits.is_empty() || rule.allowed.is_some()
}

/// The token the rule's draw (or greedy argmax) picks from final logits.
fn pick(row: &[f32], rule: &RowSampling) -> u32 {
    match &rule.draw {
        None => argmax(row),
        Some(d) => draw(row, d),
    }
}

/// Sets every logit whose bit in `mask` is clear (or past its end) to -inf.
pub fn apply_mask(row: &mut [f32], mask: &[u32]) {
    for (t, l) in row.iter_mut().enumerate() {
        if mask.get(t / 32).is_none_or(|w| w >> (t % 32) & 1 == 0) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// A token drawn from `softmax(logits / temperature)`, keeping only the tokens whose probability
/// is at least `min_p` times the most likely one's, then the `top_k` most likely (ties by lower
/// index), then the fewest most likely whose mass reaches `top_p` of what is left. The kept tokens
/// are walked in index order until `uniform` × their mass is used up. (The device sums the mass in
/// another order, so a draw within rounding of a boundary may land on its neighbour.)
pub fn draw(logits: &[f32], d: &Draw) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / d.temperature;
    let mut probs: Vec<f32> = logits
        .iter()
        .map(|&l| {
            // The most likely token has probability ∝ exp(0) = 1 here; NaN counts as 0.
            let p = (l / d.temperature - max).exp();
            if p >= d.min_p { p } else { 0.0 }
        })
        .collect();
    let n = probs.len();
    let k = if d.top_k > 0 { (d.top_k as usize).min(n) } else { n };
    if k < n || d.top_p < 1.0 {
        let order = top_k_indices(&probs, k);
        let mut keep = order.len();
        if d.top_p < 1.0 {
            let total: f32 = order.iter().map(|&i| probs[i as usize]).sum();
            let target = d.top_p * total;
            let mut cumulative = 0.0;
            keep = order
                .iter()
                .position(|&i| {
                    cumulative += probs[i as usize];
                    cumulative >= target
                })
                .map_or(order.len(), |p| p + 1);
        }
        let mut kept = vec![false; n];
        for &i in &order[..keep] {
            kept[i as usize] = true;
        }
        for (p, kept) in probs.iter_mut().zip(kept) {
            if !kept {
                *p = 0.0;
            }
        }
    }
    let total: f32 = probs.iter().sum();
    let mut target = d.uniform * total;
    for (i, &p) in probs.iter().enumerate() {
        if target < p {
            return i as u32;
        }
        target -= p;
    }
    // Rounding left a sliver at the end: take the last token with any probability.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

/// The log-softmax of `logits` at `token` and its rank, and the `k` most likely tokens with theirs.
pub fn row_logprobs(logits: &[f32], token: u32, k: usize) -> RowLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum_exp = max + sum.ln() as f32;
    let top = top_k_indices(logits, k).into_iter().map(|i| (i, logits[i as usize] - log_sum_exp)).collect();
    let chosen = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let rank = logits.iter().filter(|&&l| l >= chosen).count() as u32;
    RowLogprobs { logprob: chosen - log_sum_exp, rank, top }
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

/// The first index of the largest value, NaN counting as -inf.
pub fn argmax(values: &[f32]) -> u32 {
    // The maximum in eight lanes (a comparison with NaN is false, so NaN never wins), which
    // vectorises; then the first value equal to it. With no value above -inf, token 0.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    values.iter().position(|&v| v == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw_with(logits: &[f32], top_k: u32, top_p: f32, uniform: f32) -> u32 {
        draw(logits, &Draw { temperature: 1.0, min_p: 0.0, top_k, top_p, uniform })
    }

    #[test]
    fn edits_apply_in_vllms_order() {
        let edit = LogitEdit { token: 0, add: 1.0, repetition: 2.0, subtract: 0.5 };
        assert_eq!(edit.apply(3.0), 1.5);
        assert_eq!(edit.apply(-3.0), -4.5);
        let mask = LogitEdit { token: 0, add: f32::NEG_INFINITY, repetition: 1.3, subtract: 0.2 };
        assert_eq!(mask.apply(7.0), f32::NEG_INFINITY);
    }

    #[test]
    fn a_mask_leaves_only_its_tokens_to_pick_and_the_logprobs_raw() {
        // Tokens 2 and 33 allowed, of 40.
        let mask = vec![1 << 2, 1 << 1];
        let logits: Vec<f32> = (0..40).map(|t| if t == 7 { 9.0 } else { t as f32 * 0.01 }).collect();
        let greedy = RowSampling { allowed: Some(mask.clone()), logprobs: Some(1), ..RowSampling::greedy() };
        let picked = sample_row(&mut logits.clone(), &greedy);
        assert_eq!(picked.token, 33);
        // The logprobs describe the model's distribution, where token 7 is the likeliest.
        assert_eq!(picked.logprobs.unwrap().top[0].0, 7);
        for u in [0.0, 0.3, 0.5, 0.99] {
            let d = Draw { temperature: 1.0, min_p: 0.0, top_k: 0, top_p: 1.0, uniform: u };
            let token =
                sample_row(&mut logits.clone(), &RowSampling { allowed: Some(mask.clone()), ..RowSampling::draw(d) })
                    .token;
            assert!(token == 2 || token == 33, "drew {token}");
        }
        // Past the end of a short mask nothing is allowed.
        let mut row = logits.clone();
        apply_mask(&mut row, &[u32::MAX]);
        assert!(row[..32].iter().all(|l| l.is_finite()) && row[32..].iter().all(|&l| l == f32::NEG_INFINITY));
    }

    #[test]
    fn the_kept_tokens_are_walked_in_index_order() {
        // Probabilities 0.15, 0.5, 0.05, 0.3: top-2 keeps 1 and 3, walked as 1 then 3.
        let logits: Vec<f32> = [0.15f32, 0.5, 0.05, 0.3].iter().map(|p| p.ln()).collect();
        assert_eq!(draw_with(&logits, 2, 1.0, 0.0), 1);
        assert_eq!(draw_with(&logits, 2, 1.0, 0.6), 1);
        assert_eq!(draw_with(&logits, 2, 1.0, 0.65), 3);
        // top-p 0.8 keeps 0.5 + 0.3; 0.81 also needs 0.15.
        assert_eq!(draw_with(&logits, 0, 0.8, 0.99), 3);
        assert_eq!(draw_with(&logits, 0, 0.81, 0.0), 0);
        // Without a cut, the walk starts at index 0.
        assert_eq!(draw_with(&logits, 0, 1.0, 0.1), 0);
    }

    #[test]
    fn top_k_ties_keep_the_lower_indices() {
        let logits = [0.0, 1.0, 1.0, 1.0, 0.0];
        let seen: Vec<u32> = (0..20).map(|i| draw_with(&logits, 2, 1.0, i as f32 / 20.0)).collect();
        assert!(seen.contains(&1) && seen.contains(&2) && !seen.contains(&3), "{seen:?}");
    }

    #[test]
    fn logprobs_describe_the_raw_logits_and_the_edits_the_pick() {
        let mut row = vec![1.0, 3.0, 2.0];
        let rule = RowSampling {
            edits: vec![LogitEdit { token: 0, add: 5.0, repetition: 1.0, subtract: 0.0 }],
            draw: None,
            logprobs: Some(2),
            allowed: None,
            forced: None,
        };
        let picked = sample_row(&mut row, &rule);
        assert_eq!(picked.token, 0);
        let lp = picked.logprobs.unwrap();
        let lse = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln() as f32;
        assert!((lp.logprob - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        // Token 0 is the least likely of the raw logits.
        assert_eq!(lp.rank, 3);
    }

    #[test]
    fn a_forced_row_reports_its_token_whatever_the_rules_say() {
        let logits = vec![1.0, 3.0, 2.0, 3.0];
        let rule = RowSampling {
            edits: vec![LogitEdit { token: 2, add: f32::NEG_INFINITY, repetition: 1.0, subtract: 0.0 }],
            allowed: Some(vec![0b1]),
            ..RowSampling::forced(2, 1)
        };
        let picked = sample_row(&mut logits.clone(), &rule);
        assert_eq!(picked.token, 2);
        let lp = picked.logprobs.unwrap();
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln() as f32;
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-6);
        assert_eq!((lp.rank, lp.top.len(), lp.top[0].0), (3, 1, 1));
        // Ties share the worse rank, as vLLM counts them.
        assert_eq!(sample_row(&mut logits.clone(), &RowSampling::forced(1, 0)).logprobs.unwrap().rank, 2);
        // An id past the vocabulary has no probability.
        let far = sample_row(&mut logits.clone(), &RowSampling::forced(9, 0)).logprobs.unwrap();
        assert_eq!((far.logprob, far.rank), (f32::NEG_INFINITY, 4));
    }

    #[test]
    fn rows_with_no_probability_left_pick_token_zero() {
        let logits = [f32::NEG_INFINITY; 3];
        assert_eq!(draw_with(&logits, 2, 0.5, 0.5), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// The vectorised argmax against its definition: the first index of the largest value, NaN
    /// counting as -inf, on rows of every length around the eight lanes and with ties, NaNs,
    /// infinities and signed zeros anywhere.
    #[test]
    fn argmax_is_the_first_largest_value() {
        let plain = |values: &[f32]| {
            let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
            let mut best = 0;
            for (i, &v) in values.iter().enumerate() {
                if key(v) > key(values[best]) {
                    best = i;
                }
            }
            best as u32
        };
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 1.0, -1.0, 3.5];
        let mut state = 12345u64;
        for len in 1..40 {
            for _ in 0..200 {
                let row: Vec<f32> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        specials[(state >> 33) as usize % specials.len()]
                    })
                    .collect();
                assert_eq!(argmax(&row), plain(&row), "{row:?}");
            }
        }
    }

    #[test]
    fn top_k_indices_orders_ties_by_index() {
        assert_eq!(top_k_indices(&[1.0, 5.0, 5.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0], 5), vec![0]);
    }
}
