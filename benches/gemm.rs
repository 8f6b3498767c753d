//! The CPU matmul kernels alone, per instruction set and weight dtype, against this machine's
//! ceilings measured in the same run: decode-shaped products (one row) against the time to read
//! the weights at the measured memory bandwidth, prefill-shaped ones in GFLOP/s.
//!
//! Run: `cargo bench --bench gemm` (threads: `RAYON_NUM_THREADS`, default all cores); add
//! `-- --step` for the decode step's row alone.

use std::time::Instant;

#[path = "common/bandwidth.rs"]
mod bandwidth;

use pagoda::backend::cpu::gemm::{Isa, PackedMatrix, matmul};
use pagoda::weights::DType;

fn main() {
    if std::env::args().any(|a| a == "--step") {
        step(16);
        return;
    }
    let bandwidth = bandwidth::read_bandwidth();
    println!("{} threads; memory read {:.1} GB/s", rayon::current_num_threads(), bandwidth / 1e9);
    // A Llama-3-8B-sized MLP projection for decode (far larger than the caches), and a
    // SmolLM2-sized one for prefill.
    let (n, k) = (14336, 4096);
    for dtype in [DType::BF16, DType::F32] {
        let bytes = vec![0x3cu8; n * k * dtype.size_in_bytes()];
        let w = PackedMatrix::from_stored(dtype, &bytes, n, k);
        let x = vec![0.5f32; k];
        for isa in Isa::available() {
            let mut out = vec![0f32; n];
            let secs = best_of(5, || matmul(isa, &x, 1, &[&w], &mut out, n));
            let floor = bytes.len() as f64 / bandwidth;
            println!(
                "decode  {dtype:>4} {:<9} [1 × {k}] · [{n} × {k}]ᵀ: {:7.2} ms, {:.2} of the bandwidth floor ({:.2} ms)",
                isa.name(),
                secs * 1e3,
                floor / secs,
                floor * 1e3
            );
        }
    }
    // Prefill-shaped (SmolLM2's MLP) with every instruction set; then, with the best one,
    // batch-shaped: 16 decoding sequences through the engine benchmark's larger MLP (whose
    // weights fit in a large last-level cache) and through its logits (which do not).
    blocked(512, 1536, 576, &Isa::available());
    for (m, n, k) in [(16, 5632, 1024), (16, 49152, 1024)] {
        blocked(m, n, k, &[Isa::detected()]);
    }
    step(16);
}

/// The matmuls of one decode step of the engine benchmark's larger model with SmolLM2's vocabulary
/// (the `MODEL=larger` race's): 8 layers of QKV, output, gate-and-up and down projections, then
/// the logits, each its own bf16 matrix (290 MB in all, so every step streams them from memory).
fn step(m: usize) {
    let (hidden, mlp, vocab) = (1024, 2816, 49152);
    let mut shapes = Vec::new();
    for _ in 0..8 {
        shapes.extend([(2048, hidden), (hidden, hidden), (2 * mlp, hidden), (hidden, mlp)]);
    }
    shapes.push((vocab, hidden));
    let matrices: Vec<PackedMatrix> =
        shapes.iter().map(|&(n, k)| PackedMatrix::from_stored(DType::BF16, &vec![0x3cu8; n * k * 2], n, k)).collect();
    let x = vec![0.5f32; m * mlp];
    let mut out = vec![0f32; m * vocab];
    let isa = Isa::detected();
    let secs = best_of(5, || {
        for w in &matrices {
            matmul(isa, &x, m, &[w], &mut out, w.rows());
        }
    });
    let flops: usize = shapes.iter().map(|&(n, k)| 2 * m * n * k).sum();
    println!(
        "step    bfloat16 {:<9} {m} rows through the race's larger model ({} matrices): {:7.2} ms, {:.1} GFLOP/s",
        isa.name(),
        matrices.len(),
        secs * 1e3,
        flops as f64 / secs / 1e9
    );
}

fn blocked(m: usize, n: usize, k: usize, isas: &[Isa]) {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let bytes = vec![0x3cu8; n * k * dtype.size_in_bytes()];
        let w = PackedMatrix::from_stored(dtype, &bytes, n, k);
        let x = vec![0.5f32; m * k];
        for &isa in isas {
            let mut out = vec![0f32; m * n];
            let secs = best_of(15, || matmul(isa, &x, m, &[&w], &mut out, n));
            println!(
                "blocked {dtype:>4} {:<9} [{m} × {k}] · [{n} × {k}]ᵀ: {:7.2} ms, {:.1} GFLOP/s",
                isa.name(),
                secs * 1e3,
                2.0 * (m * n * k) as f64 / secs / 1e9
            );
        }
    }
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
