//! `pagoda selftest`: the CUDA backend on this machine's GPU against the CPU backend (every
//! operation in every dtype), optionally against the reference fixtures, and benchmarks. Exits 1
//! if any check fails.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::DeviceArg;
use crate::selftest::{self, bench};

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// The device to check.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    pub device: DeviceArg,

    /// Folder holding the reference fixtures (tiny-llama, tiny-llama-bf16): adds the model-level
    /// checks (logits against transformers, greedy tokens, batching invariance).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,

    /// Also run the benchmarks (copy bandwidth, decode attention, decode of a Llama-3-8B-shaped
    /// model with dummy weights).
    #[arg(long)]
    pub bench: bool,

    /// Benchmarks on tiny shapes (to exercise them, not to measure).
    #[arg(long, requires = "bench")]
    pub quick: bool,

    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    let opts = selftest::Options {
        device: args.device.kind(),
        fixtures: args.fixtures,
        bench: args.bench.then(|| if args.quick { bench::Plan::quick() } else { bench::Plan::full() }),
    };
    let rows = selftest::run(&opts).map_err(anyhow::Error::msg)?;
    print!("{}", selftest::render(&rows));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&selftest::to_json(&rows))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if rows.iter().any(|r| r.pass == Some(false)) {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}
