//! The block pool: every KV-cache block, its reference count, the free blocks, and the map from
//! block hash to cached block used for prefix caching.
//!
//! A free block is one of three kinds, and they are handed out in this order:
//! 1. a block that held no cached prefix, most recently freed first (its memory is the warmest);
//! 2. a block still holding a cached prefix, findable by its hash until it is handed out again:
//!    these form an LRU queue (returned to its back, taken from its front), so the cached blocks
//!    released longest ago are the first overwritten;
//! 3. a block never used, in id order.
//!
//! With [`Reuse::TouchedFirst`] (memory committed when first written, as the CPU's), 2 comes
//! before 3: the cache touches only as many blocks as were ever in use at once, and keeps cached
//! prefixes in them. With [`Reuse::UntouchedFirst`] (a GPU's memory, all committed up front), 3
//! comes before 2, so cached prefixes live as long as there is room.

use std::collections::HashMap;

use super::{BlockHash, BlockId};

const NONE: u32 = u32::MAX;

/// A doubly linked list of free blocks threaded through two arrays, so that taking a cached block
/// out of the middle (a prefix hit on a free block) costs O(1).
struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    in_queue: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// An empty queue for blocks `0..num_blocks`.
    fn empty(num_blocks: usize) -> FreeBlockQueue {
        FreeBlockQueue {
            prev: vec![NONE; num_blocks],
            next: vec![NONE; num_blocks],
            in_queue: vec![false; num_blocks],
            head: NONE,
            tail: NONE,
            len: 0,
        }
    }

    fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NONE {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    fn remove(&mut self, id: u32) {
        debug_assert!(self.in_queue[id as usize]);
        let (p, n) = (self.prev[id as usize], self.next[id as usize]);
        if p == NONE {
            self.head = n
        } else {
            self.next[p as usize] = n
        }
        if n == NONE {
            self.tail = p
        } else {
            self.prev[n as usize] = p
        }
        self.prev[id as usize] = NONE;
        self.next[id as usize] = NONE;
        self.in_queue[id as usize] = false;
        self.len -= 1;
    }

    fn push_back(&mut self, id: u32) {
        debug_assert!(!self.in_queue[id as usize]);
        self.prev[id as usize] = self.tail;
        self.next[id as usize] = NONE;
        if self.tail == NONE {
            self.head = id
        } else {
            self.next[self.tail as usize] = id
        }
        self.tail = id;
        self.in_queue[id as usize] = true;
        self.len += 1;
    }
}

/// Which free blocks are handed out before the others (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Blocks already written (uncached, then cached) before blocks never used.
    TouchedFirst,
    /// Blocks never used before cached ones.
    UntouchedFirst,
}

pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Free blocks released holding a cached prefix (or that did when released), LRU first.
    free: FreeBlockQueue,
    /// Free blocks released without a cached prefix, the most recent last.
    reusable: Vec<u32>,
    /// Blocks `never_used..` have never been handed out.
    never_used: u32,
    reuse: Reuse,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, reuse: Reuse) -> BlockPool {
        BlockPool {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            free: FreeBlockQueue::empty(num_blocks),
            reusable: Vec::new(),
            never_used: 0,
            reuse,
            cached: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks not used by any sequence, including those still holding a cached prefix.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len + self.reusable.len() + (self.num_blocks() - self.never_used as usize)
    }

    /// Blocks ever handed out: what the cache's memory holds written.
    pub fn num_touched_blocks(&self) -> usize {
        self.never_used as usize
    }

    pub fn ref_cnt(&self, block: BlockId) -> u32 {
        self.ref_cnt[block.idx()]
    }

    /// Takes `n` free blocks in the pool's order, evicting any cached prefix they hold. The
    /// caller has checked that `n` blocks are free.
    pub fn take(&mut self, n: usize) -> Vec<BlockId> {
        let free = self.num_free_blocks();
        assert!(n <= free, "take({n}) with {free} free blocks");
        (0..n)
            .map(|_| {
                let id = self.next_free().expect("counted above");
                let block = BlockId(id);
                if let Some(h) = self.hash[block.idx()].take()
                    && self.cached.get(&h) == Some(&block)
                {
                    self.cached.remove(&h);
                }
                self.ref_cnt[block.idx()] = 1;
                block
            })
            .collect()
    }

    /// The next free block in the pool's order (see the module's documentation).
    fn next_free(&mut self) -> Option<u32> {
        if let Some(id) = self.reusable.pop() {
            return Some(id);
        }
        match self.reuse {
            Reuse::TouchedFirst => self.free.pop_front().or_else(|| self.take_never_used()),
            Reuse::UntouchedFirst => self.take_never_used().or_else(|| self.free.pop_front()),
        }
    }

    fn take_never_used(&mut self) -> Option<u32> {
        (self.never_used < self.num_blocks() as u32).then(|| {
            self.never_used += 1;
            self.never_used - 1
        })
    }

    /// Adds a reference to cached blocks found by a prefix hit, taking free ones out of the queue.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if self.ref_cnt[b.idx()] == 0 {
                self.free.remove(b.0);
            }
            self.ref_cnt[b.idx()] += 1;
        }
    }

    /// Drops one reference from each block, in order; blocks no longer used become free in that
    /// order: a cached one at the back of the LRU queue (so pass a sequence's blocks tail first:
    /// its prefix, the part most likely to be shared, is then evicted last), an uncached one on
    /// top of the blocks reused first.
    pub fn release(&mut self, blocks: impl Iterator<Item = BlockId>) {
        for b in blocks {
            let rc = &mut self.ref_cnt[b.idx()];
            assert!(*rc > 0, "block {} released more often than taken", b.0);
            *rc -= 1;
            if *rc == 0 {
                if self.hash[b.idx()].is_some() {
                    self.free.push_back(b.0);
                } else {
                    self.reusable.push(b.0);
                }
            }
        }
    }

    /// Records that `block` holds the full block with hash `hash`. If another block already holds
    /// the same contents, the first stays the one found.
    pub fn cache(&mut self, block: BlockId, hash: BlockHash) {
        if self.hash[block.idx()].is_some() {
            return;
        }
        self.hash[block.idx()] = Some(hash);
        self.cached.entry(hash).or_insert(block);
    }

    /// Drops every cached-prefix registration (the blocks' contents are no longer trusted).
    pub fn forget_cached(&mut self) {
        self.cached.clear();
        self.hash.iter_mut().for_each(|h| *h = None);
    }

    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_free_blocks_are_reused_least_recently_freed_first() {
        for reuse in [Reuse::TouchedFirst, Reuse::UntouchedFirst] {
            let mut pool = BlockPool::new(4, reuse);
            let a = pool.take(4);
            assert_eq!(pool.num_free_blocks(), 0);
            for (i, &b) in a.iter().enumerate() {
                pool.cache(b, BlockHash(i as u64));
            }
            pool.release([a[2], a[0]].into_iter());
            pool.release([a[3], a[1]].into_iter());
            assert_eq!(pool.take(4), vec![a[2], a[0], a[3], a[1]]);
        }
    }

    #[test]
    fn uncached_blocks_are_reused_most_recent_first_and_the_policy_orders_the_rest() {
        for (reuse, expected) in [(Reuse::TouchedFirst, [3, 2, 0, 1, 6]), (Reuse::UntouchedFirst, [3, 2, 6, 7, 0])] {
            let mut pool = BlockPool::new(8, reuse);
            let a = pool.take(6);
            assert_eq!(a.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
            assert_eq!(pool.num_touched_blocks(), 6);
            pool.cache(a[0], BlockHash(10));
            pool.cache(a[1], BlockHash(11));
            // Blocks 0 and 1 keep cached prefixes; 2 and 3 are plain, 3 freed last.
            pool.release([a[0], a[1], a[2], a[3]].into_iter());
            assert_eq!(pool.take(1), vec![BlockId(3)]);
            pool.release(std::iter::once(BlockId(3)));
            let got: Vec<u32> = pool.take(5).iter().map(|b| b.0).collect();
            assert_eq!(got, expected, "{reuse:?}");
            assert_eq!(pool.num_free_blocks(), 1);
        }
        // With touched blocks first, a workload that never holds more than two blocks at once
        // touches two, however many it allocates, with or without cached prefixes.
        let mut pool = BlockPool::new(100, Reuse::TouchedFirst);
        for i in 0..1000 {
            let b = pool.take(2);
            pool.cache(b[0], BlockHash(i));
            pool.release(b.into_iter().rev());
        }
        assert_eq!(pool.num_touched_blocks(), 2);
    }

    #[test]
    fn a_cached_free_block_can_be_revived_until_it_is_reused() {
        let mut pool = BlockPool::new(3, Reuse::UntouchedFirst);
        let blocks = pool.take(2);
        pool.cache(blocks[0], BlockHash(7));
        pool.release(blocks.iter().rev().copied());
        assert_eq!(pool.num_free_blocks(), 3);
        // Revived from the middle of the free queue.
        let hit = pool.lookup(BlockHash(7)).unwrap();
        pool.touch(&[hit]);
        assert_eq!(pool.num_free_blocks(), 2);
        assert_eq!(pool.ref_cnt(hit), 1);
        pool.release(std::iter::once(hit));
        // Taking every block evicts it.
        pool.take(3);
        assert_eq!(pool.lookup(BlockHash(7)), None);
        assert_eq!(pool.num_cached_blocks(), 0);
    }
}
