//! The block pool: every KV-cache block, its reference count, the LRU queue of free blocks, and
//! the map from block hash to cached block used for prefix caching.
//!
//! A free block may still hold a cached prefix: it stays findable by its hash until it is handed
//! out again. Blocks are handed out from the front of the free queue and returned to its back, so
//! the cached blocks that were released longest ago are the first to be overwritten.

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
    /// A queue holding every block, in id order.
    fn full(num_blocks: usize) -> FreeBlockQueue {
        let n = num_blocks as u32;
        FreeBlockQueue {
            prev: (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect(),
            next: (0..n).map(|i| if i + 1 == n { NONE } else { i + 1 }).collect(),
            in_queue: vec![true; num_blocks],
            head: if n == 0 { NONE } else { 0 },
            tail: if n == 0 { NONE } else { n - 1 },
            len: num_blocks,
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

pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    free: FreeBlockQueue,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> BlockPool {
        BlockPool {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            free: FreeBlockQueue::full(num_blocks),
            cached: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks not used by any sequence, including those still holding a cached prefix.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    pub fn ref_cnt(&self, block: BlockId) -> u32 {
        self.ref_cnt[block.idx()]
    }

    /// Takes `n` blocks from the front of the free queue, evicting any cached prefix they hold.
    /// The caller has checked that `n` blocks are free.
    pub fn take(&mut self, n: usize) -> Vec<BlockId> {
        assert!(n <= self.free.len, "take({n}) with {} free blocks", self.free.len);
        (0..n)
            .map(|_| {
                let id = self.free.pop_front().expect("counted above");
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

    /// Adds a reference to cached blocks found by a prefix hit, taking free ones out of the queue.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if self.ref_cnt[b.idx()] == 0 {
                self.free.remove(b.0);
            }
            self.ref_cnt[b.idx()] += 1;
        }
    }

    /// Drops one reference from each block, in order; blocks no longer used join the back of the
    /// free queue in that order (so pass a sequence's blocks tail first: its prefix, the part most
    /// likely to be shared, is then evicted last).
    pub fn release(&mut self, blocks: impl Iterator<Item = BlockId>) {
        for b in blocks {
            let rc = &mut self.ref_cnt[b.idx()];
            assert!(*rc > 0, "block {} released more often than taken", b.0);
            *rc -= 1;
            if *rc == 0 {
                self.free.push_back(b.0);
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
    fn freed_blocks_are_reused_least_recently_freed_first() {
        let mut pool = BlockPool::new(4);
        let a = pool.take(4);
        assert_eq!(pool.num_free_blocks(), 0);
        pool.release([a[2], a[0]].into_iter());
        pool.release([a[3], a[1]].into_iter());
        assert_eq!(pool.take(4), vec![a[2], a[0], a[3], a[1]]);
    }

    #[test]
    fn a_cached_free_block_can_be_revived_until_it_is_reused() {
        let mut pool = BlockPool::new(3);
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
