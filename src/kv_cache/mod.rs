//! KV-cache bookkeeping in the design of vLLM v1: fixed-size blocks in a [`BlockPool`], a block
//! table per sequence, and prefix caching by a hash chained over full blocks.
//!
//! This module is plain data: it never touches device memory and does no I/O. It decides which
//! physical block each token of each sequence lives in; the backend's cache holds the numbers.
//! Running out of blocks is an answer (`allocate_slots` returns `false`), not an error: the
//! scheduler reacts by preempting.

mod block_pool;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

pub use block_pool::{BlockPool, Reuse};

/// Identifies one sequence (one of the `n` completions of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Index of a physical block in the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    fn idx(self) -> usize {
        self.0 as usize
    }
}

/// Identifies the contents of a full block *and everything before it*: the hash of the parent
/// block's hash and this block's tokens. Equal hashes mean equal prefixes, so equal KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Prefix-cache counters, in tokens, as vLLM reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens looked up (each new or resumed sequence's whole token count).
    pub queries: u64,
    /// Of those, tokens found already computed in the cache.
    pub hits: u64,
}

/// The result of a prefix lookup, to be passed to [`KvCacheManager::allocate_slots`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    pub blocks: Vec<BlockId>,
    pub num_tokens: usize,
}

#[derive(Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Leading blocks already registered in the prefix cache.
    num_cached_blocks: usize,
    /// Hashes of the sequence's full blocks, extended as tokens are added.
    hashes: Vec<BlockHash>,
}

pub struct KvCacheManager {
    block_size: usize,
    enable_prefix_caching: bool,
    pool: BlockPool,
    /// Keyed per process so that nobody can craft colliding prompts.
    hasher: RandomState,
    seqs: HashMap<SeqId, SeqBlocks>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> KvCacheManager {
        assert!(block_size > 0, "block size must be positive");
        KvCacheManager {
            block_size,
            enable_prefix_caching,
            pool: BlockPool::new(num_blocks, Reuse::UntouchedFirst),
            hasher: RandomState::new(),
            seqs: HashMap::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    /// The same manager handing out blocks in `reuse`'s order (before any is used).
    pub fn with_reuse(mut self, reuse: Reuse) -> KvCacheManager {
        self.pool = BlockPool::new(self.pool.num_blocks(), reuse);
        self
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks ever handed out (with [`Reuse::TouchedFirst`], the memory the cache has written).
    pub fn num_touched_blocks(&self) -> usize {
        self.pool.num_touched_blocks()
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// Fraction of blocks in use by sequences (cached but free blocks count as free).
    pub fn usage(&self) -> f64 {
        match self.pool.num_blocks() {
            0 => 0.0,
            n => 1.0 - self.pool.num_free_blocks() as f64 / n as f64,
        }
    }

    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice()).unwrap_or(&[])
    }

    fn update_hashes(&mut self, seq: SeqId, tokens: &[u32]) {
        let bs = self.block_size;
        let entry = self.seqs.entry(seq).or_default();
        while (entry.hashes.len() + 1) * bs <= tokens.len() {
            let i = entry.hashes.len();
            let mut h = self.hasher.build_hasher();
            h.write_u64(entry.hashes.last().map_or(0, |p| p.0));
            for &t in &tokens[i * bs..(i + 1) * bs] {
                h.write_u32(t);
            }
            entry.hashes.push(BlockHash(h.finish()));
        }
    }

    /// Finds the longest cached prefix of `tokens` for a sequence that holds no blocks. At least
    /// one token is always left to compute, since the last token's logits are needed.
    pub fn get_computed_blocks(&mut self, seq: SeqId, tokens: &[u32]) -> ComputedBlocks {
        if !self.enable_prefix_caching || tokens.is_empty() {
            return ComputedBlocks::default();
        }
        self.update_hashes(seq, tokens);
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let hashes = &self.seqs[&seq].hashes;
        let blocks: Vec<BlockId> = hashes.iter().take(max_blocks).map_while(|&h| self.pool.lookup(h)).collect();
        let num_tokens = blocks.len() * self.block_size;
        ComputedBlocks { blocks, num_tokens }
    }

    /// Makes room for `num_new_tokens` more tokens of `seq` after its `num_computed_tokens`
    /// (those already in its blocks) and the prefix hit `computed`. Returns `false`, changing
    /// nothing, when too few blocks are free. `tokens` is all of the sequence's known tokens; full
    /// blocks among the ones this step computes are registered for prefix caching.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        num_computed_tokens: usize,
        num_new_tokens: usize,
        computed: &ComputedBlocks,
    ) -> bool {
        let bs = self.block_size;
        let total_tokens = num_computed_tokens + computed.num_tokens + num_new_tokens;
        debug_assert!(total_tokens <= tokens.len());
        let num_held = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        let num_required = total_tokens.div_ceil(bs);
        let num_new_blocks = num_required.saturating_sub(num_held + computed.blocks.len());
        // Reviving a cached block that sits in the free queue uses up a free block too.
        let num_revived = computed.blocks.iter().filter(|&&b| self.pool.ref_cnt(b) == 0).count();
        if num_new_blocks + num_revived > self.pool.num_free_blocks() {
            return false;
        }
        if self.enable_prefix_caching && num_held == 0 && num_computed_tokens == 0 {
            // An admission: count the lookup now that it took effect (a sequence that has to wait
            // is looked up again next step and must not count twice).
            self.stats.queries += tokens.len() as u64;
            self.stats.hits += computed.num_tokens as u64;
        }
        self.pool.touch(&computed.blocks);
        let new_blocks = self.pool.take(num_new_blocks);
        let entry = self.seqs.entry(seq).or_default();
        entry.blocks.extend_from_slice(&computed.blocks);
        entry.blocks.extend(new_blocks);
        if self.enable_prefix_caching {
            // The prefix hit's blocks are cached already; register the blocks this step fills.
            entry.num_cached_blocks = entry.num_cached_blocks.max(computed.blocks.len());
            self.update_hashes(seq, &tokens[..total_tokens]);
            let entry = self.seqs.get_mut(&seq).expect("inserted above");
            let num_full = total_tokens / bs;
            for i in entry.num_cached_blocks..num_full {
                self.pool.cache(entry.blocks[i], entry.hashes[i]);
            }
            entry.num_cached_blocks = entry.num_cached_blocks.max(num_full);
        }
        true
    }

    /// Forgets every cached prefix. Called after a failed step, whose blocks may have been
    /// registered before their KV was written; only valid when no sequence holds blocks.
    pub fn reset_prefix_cache(&mut self) {
        debug_assert!(self.seqs.values().all(|s| s.blocks.is_empty()));
        self.pool.forget_cached();
        self.seqs.clear();
    }

    /// Releases every block of `seq` (finished, aborted or preempted).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(entry) = self.seqs.remove(&seq) {
            self.pool.release(entry.blocks.into_iter().rev());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, offset: u32) -> Vec<u32> {
        (0..n as u32).map(|t| t + offset).collect()
    }

    #[test]
    fn allocation_rounds_up_to_blocks_and_refuses_when_full() {
        let mut kv = KvCacheManager::new(4, 16, true);
        let t = tokens(40, 0);
        assert!(kv.allocate_slots(SeqId(1), &t, 0, 40, &ComputedBlocks::default()));
        assert_eq!(kv.block_table(SeqId(1)).len(), 3);
        assert_eq!(kv.num_free_blocks(), 1);
        // 30 more tokens need 2 more blocks: refused, and nothing changes.
        let t2 = tokens(70, 0);
        assert!(!kv.allocate_slots(SeqId(1), &t2, 40, 30, &ComputedBlocks::default()));
        assert_eq!(kv.block_table(SeqId(1)).len(), 3);
        assert!(kv.allocate_slots(SeqId(1), &t2, 40, 24, &ComputedBlocks::default()));
        assert_eq!(kv.num_free_blocks(), 0);
        assert!((kv.usage() - 1.0).abs() < 1e-12);
        kv.free(SeqId(1));
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.usage(), 0.0);
    }

    #[test]
    fn a_shared_prefix_is_found_and_shared() {
        let mut kv = KvCacheManager::new(10, 4, true);
        let a = tokens(10, 100);
        assert_eq!(kv.get_computed_blocks(SeqId(1), &a), ComputedBlocks::default());
        assert!(kv.allocate_slots(SeqId(1), &a, 0, 10, &ComputedBlocks::default()));
        // Same first 8 tokens, different after.
        let mut b = tokens(8, 100);
        b.extend([7, 7, 7]);
        let hit = kv.get_computed_blocks(SeqId(2), &b);
        assert_eq!(hit.num_tokens, 8);
        assert_eq!(hit.blocks, kv.block_table(SeqId(1))[..2].to_vec());
        assert!(kv.allocate_slots(SeqId(2), &b, 0, 3, &hit));
        assert_eq!(kv.block_table(SeqId(2))[..2], kv.block_table(SeqId(1))[..2]);
        assert_eq!(kv.num_free_blocks(), 10 - 3 - 1);
        assert_eq!(kv.stats(), PrefixCacheStats { queries: 21, hits: 8 });
        kv.free(SeqId(1));
        kv.free(SeqId(2));
        assert_eq!(kv.num_free_blocks(), 10);
    }

    #[test]
    fn an_identical_prompt_leaves_its_last_token_to_compute() {
        let mut kv = KvCacheManager::new(8, 4, true);
        let a = tokens(8, 0);
        assert!(kv.allocate_slots(SeqId(1), &a, 0, 8, &ComputedBlocks::default()));
        kv.free(SeqId(1));
        let hit = kv.get_computed_blocks(SeqId(2), &a);
        assert_eq!(hit.num_tokens, 4, "the second block holds the last token, which must be recomputed");
        // The hit revives a free block: it counts against the free blocks.
        assert!(kv.allocate_slots(SeqId(2), &a, 0, 4, &hit));
        assert_eq!(kv.num_free_blocks(), 6);
    }

    #[test]
    fn different_earlier_blocks_change_later_hashes() {
        let mut kv = KvCacheManager::new(8, 2, true);
        let a = vec![1, 2, 3, 4, 5];
        let b = vec![9, 9, 3, 4, 5];
        assert!(kv.allocate_slots(SeqId(1), &a, 0, 5, &ComputedBlocks::default()));
        // b's second block has the same tokens as a's, but a different parent: no hit.
        assert_eq!(kv.get_computed_blocks(SeqId(2), &b).num_tokens, 0);
    }

    #[test]
    fn a_reset_forgets_every_cached_prefix() {
        let mut kv = KvCacheManager::new(8, 4, true);
        let a = tokens(9, 0);
        assert!(kv.allocate_slots(SeqId(1), &a, 0, 9, &ComputedBlocks::default()));
        kv.free(SeqId(1));
        assert_eq!(kv.get_computed_blocks(SeqId(2), &a).num_tokens, 8);
        kv.free(SeqId(2));
        kv.reset_prefix_cache();
        assert_eq!(kv.get_computed_blocks(SeqId(3), &a).num_tokens, 0);
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn disabled_caching_never_hits() {
        let mut kv = KvCacheManager::new(8, 2, false);
        let a = vec![1, 2, 3, 4, 5];
        assert!(kv.allocate_slots(SeqId(1), &a, 0, 5, &ComputedBlocks::default()));
        assert_eq!(kv.get_computed_blocks(SeqId(2), &a).num_tokens, 0);
        assert_eq!(kv.stats(), PrefixCacheStats::default());
    }
}
