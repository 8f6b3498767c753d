//! CPU engine throughput on a random-weight Llama with real shapes, against this machine's own
//! ceilings measured in the same run: memory bandwidth for decode (which must stream every weight
//! once per step) and the matmul library's peak for prefill (which is compute-bound).
//!
//! Run: `cargo bench --bench engine` (add `-- --quick` for a smaller model). Prints a Markdown
//! table for BENCHMARKS.md.

use std::sync::Arc;
use std::time::Instant;

#[path = "common/bandwidth.rs"]
mod bandwidth;

use pagoda::backend::cpu::CpuBackend;
use pagoda::engine::{Engine, EngineConfig, EngineRequest, MaxTokens, RequestId, SamplingParams};
use pagoda::model::demo::DemoSpec;
use pagoda::model::{ModelFiles, ModelRunner};
use pagoda::weights::DType;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let spec = DemoSpec {
        hidden_size: if quick { 512 } else { 1024 },
        intermediate_size: if quick { 1408 } else { 2816 },
        num_hidden_layers: if quick { 4 } else { 8 },
        num_attention_heads: 16,
        num_key_value_heads: 8,
        head_dim: if quick { 32 } else { 64 },
        vocab_size: 32000,
        max_position_embeddings: 4096,
        dtype: DType::BF16,
        seed: 1,
    };
    let files = ModelFiles::demo(&spec).expect("random model builds");
    let weight_bytes = files.weights.num_bytes();
    let params = weight_bytes / 2;
    // Per-token matmul work: every weight but the embedding table is used once per token.
    let flops_per_token = 2.0 * (params - spec.vocab_size * spec.hidden_size) as f64;
    let threads = rayon::current_num_threads();
    println!(
        "model: {} layers, hidden {}, {} heads / {} KV heads, vocab {}, {:.1} M parameters in bf16 ({:.0} MB); {threads} threads",
        spec.num_hidden_layers,
        spec.hidden_size,
        spec.num_attention_heads,
        spec.num_key_value_heads,
        spec.vocab_size,
        params as f64 / 1e6,
        weight_bytes as f64 / 1e6
    );

    let bandwidth = bandwidth::read_bandwidth();
    let peak_flops = measure_sgemm_peak();
    println!("ceilings: memory read {:.1} GB/s, sgemm {:.1} GFLOP/s", bandwidth / 1e9, peak_flops / 1e9);

    let mut engine = build_engine(&files);
    let prompt =
        |i: usize, len: usize| -> Vec<u32> { (0..len).map(|t| ((t * 7 + i * 131) % 1000) as u32 + 5).collect() };

    // Prefill: four 512-token prompts in one 2048-token step.
    let start = Instant::now();
    for i in 0..4 {
        add(&mut engine, i, prompt(i, 512), 1);
    }
    engine.run_to_completion().unwrap();
    let prefill_tps = 2048.0 / start.elapsed().as_secs_f64();

    // Single-stream decode: time between the first and the last token.
    add(&mut engine, 100, prompt(100, 32), 129);
    let mut first = None;
    let mut last = None;
    while engine.has_unfinished() {
        for out in engine.step().unwrap() {
            first = first.or(out.timings.first_token);
            last = out.timings.last_token;
        }
    }
    let single_tps = 128.0 / (last.unwrap() - first.unwrap()).as_secs_f64();

    // Batched decode: 32 sequences; the first step prefills all of them, the rest decode.
    let batch = 32;
    for i in 0..batch {
        add(&mut engine, 200 + i, prompt(200 + i, 32), 65);
    }
    engine.step().unwrap();
    let start = Instant::now();
    let mut tokens = 0;
    while engine.has_unfinished() {
        tokens += engine.step().unwrap().len();
    }
    let batched_tps = tokens as f64 / start.elapsed().as_secs_f64();

    // Decode streams every weight once per step (bf16, 2 bytes each); that is the floor.
    let single_floor_tps = bandwidth / weight_bytes as f64;
    let prefill_ceiling_tps = peak_flops / flops_per_token;
    let batched_ceiling_tps = (batch as f64 * single_floor_tps).min(prefill_ceiling_tps);
    println!();
    println!("| measure | tokens/s | ceiling tokens/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| prefill (4 × 512 tokens, one step) | {prefill_tps:.0} | {prefill_ceiling_tps:.0} (sgemm peak) | {:.2} |",
        prefill_tps / prefill_ceiling_tps
    );
    println!(
        "| decode, 1 sequence | {single_tps:.1} | {single_floor_tps:.1} (weights at read bandwidth) | {:.2} |",
        single_tps / single_floor_tps
    );
    println!(
        "| decode, {batch} sequences | {batched_tps:.0} | {batched_ceiling_tps:.0} (min of bandwidth × {batch}, sgemm peak) | {:.2} |",
        batched_tps / batched_ceiling_tps
    );
}

fn build_engine(files: &ModelFiles) -> Engine {
    let runner = ModelRunner::new(CpuBackend::new(), files, 2048, 1024, 16).unwrap();
    let config = EngineConfig {
        max_model_len: 2048,
        max_num_seqs: 64,
        max_num_batched_tokens: 2048,
        enable_prefix_caching: false,
        enable_chunked_prefill: true,
        seed: None,
        max_logprobs: 20,
    };
    let tokenizer = Arc::new(ModelFiles::demo(&DemoSpec::demo()).unwrap().tokenizer);
    Engine::new(config, Box::new(runner), tokenizer, vec![]).unwrap()
}

fn add(engine: &mut Engine, id: usize, prompt: Vec<u32>, max_tokens: usize) {
    let params =
        SamplingParams { max_tokens: MaxTokens::Exact(max_tokens), ignore_eos: true, ..SamplingParams::greedy() };
    let request =
        EngineRequest { id: RequestId(id.to_string()), prompt_token_ids: prompt, params, arrival: Instant::now() };
    let request = request.validate(&engine.limits()).unwrap();
    engine.add_request(request).unwrap();
}

/// FLOP/s of a large f32 matmul through the CPU backend's own linear layer.
fn measure_sgemm_peak() -> f64 {
    use pagoda::backend::Backend;
    let n = 1024;
    let backend = CpuBackend::new();
    let w = backend.weight_from_f32(vec![0.5; n * n], [n, n]).unwrap();
    let x = pagoda::backend::cpu::CpuTensor { data: vec![0.25; 2048 * n], rows: 2048, cols: n };
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let y = backend.linear(&x, &w, None).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(y.data.len(), 2048 * n);
        best = best.max(2.0 * 2048.0 * (n * n) as f64 / secs);
    }
    best
}
