//! The machine's memory read bandwidth, the ceiling decode-shaped products are held to, shared by
//! the benchmarks.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second all threads together read from a buffer far larger than the caches, at best.
///
/// Each thread reads its part as four interleaved streams: one sequential stream per core leaves
/// memory idle between the hardware prefetcher's requests (on a 2-vCPU Zen 3 VM it read ~20 GB/s,
/// while the matmul's decode kernel, which reads four panels at once, streamed ~26), and a
/// ceiling must not sit below what a kernel reaches.
pub fn read_bandwidth() -> f64 {
    const STREAMS: usize = 4;
    let data = vec![1u64; 256 << 20 >> 3];
    let mut best = 0f64;
    for _ in 0..6 {
        let start = Instant::now();
        let sum: u64 = data
            .par_chunks(1 << 20)
            .map(|chunk| {
                let part = chunk.len() / STREAMS;
                let mut lanes = [0u64; 8];
                for i in (0..part).step_by(8) {
                    for s in 0..STREAMS {
                        for (lane, &v) in lanes.iter_mut().zip(&chunk[s * part + i..][..8]) {
                            *lane = lane.wrapping_add(v);
                        }
                    }
                }
                lanes.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .sum();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(sum, data.len() as u64);
        best = best.max((data.len() * 8) as f64 / secs);
    }
    best
}
