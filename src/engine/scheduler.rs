//! The scheduler: each step, which sequences run and how many of their tokens are computed.
//!
//! As in vLLM v1 there is no prefill phase and no decode phase: a sequence simply has tokens whose
//! KV is not computed yet (`num_tokens - num_computed_tokens`), and each step spends a token budget
//! on them. Running sequences go first, in arrival order (a decode needs one token; an unfinished
//! prefill takes what the budget allows: chunked prefill). When a running sequence cannot get a
//! block, the most recently admitted running sequence is preempted: its blocks are freed and it
//! returns to the front of the waiting queue, to be recomputed later. Waiting sequences are then
//! admitted, in order, while the budget, `max_num_seqs` and free blocks last.
//!
//! Plain data: no I/O, no clocks, no randomness, so every decision is reproducible in a test.

use std::collections::{HashMap, VecDeque};

use crate::kv_cache::{BlockId, ComputedBlocks, KvCacheManager, PrefixCacheStats, SeqId};

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step, shared by decodes and prefill chunks.
    pub max_num_batched_tokens: usize,
    /// Split prompts longer than the remaining budget across steps. Without it a prompt is admitted
    /// only when it fits the step whole.
    pub enable_chunked_prefill: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Waiting,
    Running,
}

struct SeqState {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    num_computed_tokens: usize,
    status: Status,
    /// Whether an admission may start from a prefix-cache hit (not when every prompt position
    /// must be computed, for its logprobs).
    read_prefix_cache: bool,
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    /// Tokens already in the KV cache before this step (including prefix-cache hits).
    pub num_computed_tokens: usize,
    /// Tokens this step computes.
    pub num_new_tokens: usize,
    /// Tokens of the sequence found in the prefix cache when it was admitted by this step.
    pub num_cached_tokens: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences preempted by this step, in the order they were preempted.
    pub preempted: Vec<SeqId>,
    pub num_batched_tokens: usize,
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, kv: KvCacheManager) -> Scheduler {
        assert!(config.max_num_seqs > 0 && config.max_num_batched_tokens > 0);
        Scheduler {
            config,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence with its prompt.
    pub fn add(&mut self, seq: SeqId, prompt: Vec<u32>) {
        self.add_seq(seq, prompt, true);
    }

    /// Queues a new sequence whose every prompt position is computed, whatever the prefix cache
    /// holds (its blocks are still registered for others).
    pub fn add_without_prefix_cache(&mut self, seq: SeqId, prompt: Vec<u32>) {
        self.add_seq(seq, prompt, false);
    }

    fn add_seq(&mut self, seq: SeqId, prompt: Vec<u32>, read_prefix_cache: bool) {
        assert!(!prompt.is_empty(), "a sequence needs at least one token");
        let state = SeqState { tokens: prompt, num_computed_tokens: 0, status: Status::Waiting, read_prefix_cache };
        let previous = self.seqs.insert(seq, state);
        assert!(previous.is_none(), "sequence {seq:?} added twice");
        self.waiting.push_back(seq);
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;

        // Running sequences, oldest first.
        let mut idx = 0;
        while idx < self.running.len() && budget > 0 {
            let seq = self.running[idx];
            let state = &self.seqs[&seq];
            let num_computed = state.num_computed_tokens;
            let num_new = (state.tokens.len() - num_computed).min(budget);
            if num_new == 0 {
                idx += 1;
                continue;
            }
            loop {
                let tokens = &self.seqs[&seq].tokens;
                if self.kv.allocate_slots(seq, tokens, num_computed, num_new, &ComputedBlocks::default()) {
                    out.scheduled.push(ScheduledSeq {
                        seq,
                        num_computed_tokens: num_computed,
                        num_new_tokens: num_new,
                        num_cached_tokens: 0,
                    });
                    budget -= num_new;
                    idx += 1;
                    break;
                }
                // Out of blocks: the newest running sequence gives its blocks back.
                let victim = self.running.pop().expect("the sequence being scheduled is running");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == seq {
                    break;
                }
            }
        }

        // Waiting sequences, unless this step already had to preempt (the cache is full).
        if out.preempted.is_empty() {
            while let Some(&seq) = self.waiting.front() {
                if budget == 0 || self.running.len() >= self.config.max_num_seqs {
                    break;
                }
                let state = &self.seqs[&seq];
                let tokens = &state.tokens;
                let computed = if state.read_prefix_cache {
                    self.kv.get_computed_blocks(seq, tokens)
                } else {
                    ComputedBlocks::default()
                };
                let remaining = tokens.len() - computed.num_tokens;
                if !self.config.enable_chunked_prefill && remaining > budget {
                    break;
                }
                let num_new = remaining.min(budget);
                if !self.kv.allocate_slots(seq, tokens, 0, num_new, &computed) {
                    break;
                }
                self.waiting.pop_front();
                self.running.push(seq);
                let state = self.seqs.get_mut(&seq).expect("waiting sequences are known");
                state.status = Status::Running;
                state.num_computed_tokens = computed.num_tokens;
                out.scheduled.push(ScheduledSeq {
                    seq,
                    num_computed_tokens: computed.num_tokens,
                    num_new_tokens: num_new,
                    num_cached_tokens: computed.num_tokens,
                });
                budget -= num_new;
            }
        }
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        out
    }

    fn preempt(&mut self, seq: SeqId) {
        self.kv.free(seq);
        let state = self.seqs.get_mut(&seq).expect("running sequences are known");
        state.num_computed_tokens = 0;
        state.status = Status::Waiting;
        self.waiting.push_front(seq);
        self.num_preemptions += 1;
    }

    /// Records that the step `out` ran: its tokens' KV is now in the cache.
    pub fn complete_step(&mut self, out: &SchedulerOutput) {
        for s in &out.scheduled {
            if let Some(state) = self.seqs.get_mut(&s.seq) {
                state.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens;
            }
        }
    }

    /// Whether this step reaches the end of the sequence's known tokens, so that its logits give
    /// the next token (true for decodes and for the last chunk of a prefill).
    pub fn needs_sample(&self, s: &ScheduledSeq) -> bool {
        self.seqs.get(&s.seq).is_some_and(|state| s.num_computed_tokens + s.num_new_tokens == state.tokens.len())
    }

    pub fn append_token(&mut self, seq: SeqId, token: u32) {
        if let Some(state) = self.seqs.get_mut(&seq) {
            state.tokens.push(token);
        }
    }

    /// Removes a finished or aborted sequence and frees its blocks.
    pub fn finish(&mut self, seq: SeqId) {
        let Some(state) = self.seqs.remove(&seq) else { return };
        match state.status {
            Status::Running => self.running.retain(|&s| s != seq),
            Status::Waiting => self.waiting.retain(|&s| s != seq),
        }
        self.kv.free(seq);
    }

    pub fn tokens(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice()).unwrap_or(&[])
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.kv.block_table(seq)
    }

    pub fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn kv_cache_usage(&self) -> f64 {
        self.kv.usage()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    pub fn num_touched_blocks(&self) -> usize {
        self.kv.num_touched_blocks()
    }

    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    /// See [`KvCacheManager::reset_prefix_cache`]; call with no sequence holding blocks.
    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.stats()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(num_blocks: usize, block_size: usize, max_num_seqs: usize, budget: usize) -> Scheduler {
        let config = SchedulerConfig { max_num_seqs, max_num_batched_tokens: budget, enable_chunked_prefill: true };
        Scheduler::new(config, KvCacheManager::new(num_blocks, block_size, true))
    }

    /// `(seq, num_computed_tokens, num_new_tokens)` of a step, to compare compactly.
    fn summary(out: &SchedulerOutput) -> Vec<(u64, usize, usize)> {
        out.scheduled.iter().map(|s| (s.seq.0, s.num_computed_tokens, s.num_new_tokens)).collect()
    }

    /// Completes a step as the engine would: sequences that reach their end get token 9, and
    /// those with `target` generated tokens finish. Returns the finished ones.
    fn run_step(
        s: &mut Scheduler,
        out: &SchedulerOutput,
        prompt_lens: &HashMap<u64, usize>,
        target: usize,
    ) -> Vec<u64> {
        let sampled: Vec<SeqId> = out.scheduled.iter().filter(|x| s.needs_sample(x)).map(|x| x.seq).collect();
        s.complete_step(out);
        let mut finished = Vec::new();
        for seq in sampled {
            s.append_token(seq, 9);
            if s.tokens(seq).len() - prompt_lens[&seq.0] == target {
                s.finish(seq);
                finished.push(seq.0);
            }
        }
        finished
    }

    #[test]
    fn long_prompts_are_chunked_by_the_token_budget() {
        let mut s = scheduler(64, 4, 8, 10);
        s.add(SeqId(1), vec![1; 23]);
        s.add(SeqId(2), vec![2; 5]);
        let lens = HashMap::from([(1, 23), (2, 5)]);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 0, 10)]);
        run_step(&mut s, &out, &lens, 100);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 10, 10)]);
        run_step(&mut s, &out, &lens, 100);
        // The last 3 tokens of seq 1 and the whole of seq 2 share a step.
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 20, 3), (2, 0, 5)]);
        assert!(out.scheduled.iter().all(|x| s.needs_sample(x)));
        run_step(&mut s, &out, &lens, 100);
        // Then both decode one token per step.
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 23, 1), (2, 5, 1)]);
        assert_eq!(out.num_batched_tokens, 2);
    }

    #[test]
    fn admission_stops_at_max_num_seqs_and_without_chunking_at_the_budget() {
        let mut s = scheduler(64, 4, 2, 100);
        for i in 0..3 {
            s.add(SeqId(i), vec![1; 4]);
        }
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 0, 4), (1, 0, 4)]);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));

        let config = SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 10, enable_chunked_prefill: false };
        let mut s = Scheduler::new(config, KvCacheManager::new(64, 4, true));
        s.add(SeqId(0), vec![1; 6]);
        s.add(SeqId(1), vec![2; 6]);
        assert_eq!(summary(&s.schedule()), vec![(0, 0, 6)], "the second prompt waits for a step it fits in whole");
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 6 blocks of 4 tokens; three sequences of 7 prompt tokens take 2 blocks each.
        let mut s = scheduler(6, 4, 8, 100);
        let lens: HashMap<u64, usize> = (0..3).map(|i| (i, 7)).collect();
        for i in 0..3 {
            s.add(SeqId(i), vec![i as u32 + 1; 7]);
        }
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 0, 7), (1, 0, 7), (2, 0, 7)]);
        assert_eq!(s.num_free_blocks(), 0);
        run_step(&mut s, &out, &lens, 4);
        // Each now has 8 tokens, 7 computed: the decode fits in the second block.
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 7, 1), (1, 7, 1), (2, 7, 1)]);
        run_step(&mut s, &out, &lens, 4);
        // The next decode needs a third block for each: seq 2, the newest, is preempted, which
        // frees enough for seqs 0 and 1.
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 8, 1), (1, 8, 1)]);
        assert_eq!(out.preempted, vec![SeqId(2)]);
        assert_eq!((s.num_preemptions(), s.num_waiting()), (1, 1));

        // Run to completion: every sequence finishes and every block comes back.
        let mut finished = run_step(&mut s, &out, &lens, 4);
        for _ in 0..50 {
            if !s.has_unfinished() {
                break;
            }
            let out = s.schedule();
            finished.extend(run_step(&mut s, &out, &lens, 4));
        }
        finished.sort();
        assert_eq!(finished, vec![0, 1, 2]);
        assert_eq!(s.num_free_blocks(), 6);
        assert_eq!(s.kv_cache_usage(), 0.0);
    }

    #[test]
    fn a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest() {
        let mut s = scheduler(5, 4, 8, 100);
        let lens = HashMap::from([(0, 8), (1, 8)]);
        s.add(SeqId(0), vec![1; 8]);
        s.add(SeqId(1), vec![2; 8]);
        let out = s.schedule();
        run_step(&mut s, &out, &lens, 100);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 8, 1)]);
        assert_eq!(out.preempted, vec![SeqId(1)]);
        // No admission in a step that preempted.
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    }

    #[test]
    fn a_resumed_sequence_reuses_its_cached_prefix() {
        let mut s = scheduler(3, 4, 8, 100);
        let lens = HashMap::from([(0, 8), (1, 3)]);
        s.add(SeqId(0), vec![5; 8]);
        let out = s.schedule();
        run_step(&mut s, &out, &lens, 100);
        s.add(SeqId(1), vec![6; 3]);
        // Seq 0 decodes into a new block (its 9th token), seq 1 takes... nothing left: waits.
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(0, 8, 1)]);
        run_step(&mut s, &out, &lens, 100);
        s.finish(SeqId(0));
        // A new sequence with seq 0's first 8 tokens hits its two full blocks.
        s.add(SeqId(2), vec![5; 9]);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 0, 3)]);
        assert_eq!(s.num_waiting(), 1);
        s.finish(SeqId(1));
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(2, 8, 1)]);
        assert_eq!(out.scheduled[0].num_cached_tokens, 8);
        assert!(s.prefix_cache_stats().hits >= 8);
    }

    #[test]
    fn a_sequence_added_without_the_prefix_cache_computes_its_whole_prompt() {
        let mut s = scheduler(8, 4, 8, 100);
        let lens = HashMap::from([(0, 9), (1, 9), (2, 9)]);
        s.add(SeqId(0), vec![5; 9]);
        let out = s.schedule();
        run_step(&mut s, &out, &lens, 100);
        s.finish(SeqId(0));
        s.add_without_prefix_cache(SeqId(1), vec![5; 9]);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 0, 9)]);
        assert_eq!(out.scheduled[0].num_cached_tokens, 0);
        // Its blocks are registered all the same: the next one hits them.
        run_step(&mut s, &out, &lens, 100);
        s.add(SeqId(2), vec![5; 9]);
        let out = s.schedule();
        assert_eq!(summary(&out), vec![(1, 9, 1), (2, 8, 1)]);
    }

    #[test]
    fn finishing_a_waiting_sequence_removes_it() {
        let mut s = scheduler(4, 4, 1, 100);
        s.add(SeqId(0), vec![1; 4]);
        s.add(SeqId(1), vec![1; 4]);
        s.schedule();
        s.finish(SeqId(1));
        s.finish(SeqId(0));
        assert!(!s.has_unfinished());
        assert_eq!((s.num_running(), s.num_waiting(), s.num_free_blocks()), (0, 0, 4));
    }
}
