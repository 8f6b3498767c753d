//! `pagoda selftest`: checks the CUDA backend on the device at hand against the CPU backend and,
//! given the reference fixtures, against transformers' outputs; optionally benchmarks it. On a
//! GPU this is what `scripts/gpu-check.sh` runs; the test suite runs the same code on the emulated
//! device. Results are rows of one table (and JSON for machines).

pub mod bench;
pub mod fixtures;
pub mod ops;
pub mod profile;

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::backend::cuda::device::DeviceHandle;
use crate::launch::{DeviceKind, choose_device};

/// One line of the report: a check (with its verdict) or a measurement (with its number).
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub name: String,
    pub value: String,
    pub pass: Option<bool>,
    pub number: Option<f64>,
}

impl Row {
    pub fn check(section: &'static str, name: String, value: String, pass: bool) -> Row {
        Row { section, name, value, pass: Some(pass), number: None }
    }

    pub fn measure(section: &'static str, name: String, value: String, number: f64) -> Row {
        Row { section, name, value, pass: None, number: Some(number) }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub device: DeviceKind,
    /// `../shared/fixtures`-style folder: the model-level checks run when given.
    pub fixtures: Option<PathBuf>,
    pub bench: Option<bench::Plan>,
}

/// Runs every check the options ask for. An error is a failure to run (no device, a missing
/// file), not a failed check.
pub fn run(opts: &Options) -> Result<Vec<Row>, String> {
    let handle: DeviceHandle = choose_device(opts.device)
        .map_err(|e| e.to_string())?
        .ok_or("selftest checks the CUDA backend: no CUDA device is available (see the log for why)")?;
    let tolerances = match opts.device {
        #[cfg(feature = "cuda-emu")]
        DeviceKind::EmulatedCuda => ops::Tolerances::EMULATED,
        _ => ops::Tolerances::GPU,
    };
    let mut rows =
        vec![Row::measure("device", handle.device().name(), String::new(), handle.device().num_sms() as f64)];
    let checks = ops::run_all(&handle, tolerances, &[&|| ()]).map_err(|e| e.to_string())?;
    for c in checks {
        rows.push(Row::check(
            "ops",
            format!("{} ({})", c.name, c.dtype),
            format!("{:.2e} (tolerance {:.0e})", c.error, c.tolerance),
            c.passed(),
        ));
    }
    if let Some(dir) = &opts.fixtures {
        rows.extend(fixtures::logits_rows(&handle, dir)?);
        rows.extend(fixtures::batching_rows(dir, opts.device)?);
    }
    if let Some(plan) = &opts.bench {
        rows.extend(bench::rows(&handle, plan)?);
    }
    Ok(rows)
}

/// The rows as an aligned text table.
pub fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(0).min(90);
    let mut out = String::new();
    for r in rows {
        let verdict = match r.pass {
            Some(true) => "ok  ",
            Some(false) => "FAIL",
            None => "    ",
        };
        out.push_str(&format!("{verdict} {:<8} {:<width$}  {}\n", r.section, r.name, r.value));
    }
    let checks = rows.iter().filter(|r| r.pass.is_some()).count();
    let failed = rows.iter().filter(|r| r.pass == Some(false)).count();
    out.push_str(&format!("{} passed, {failed} failed\n", checks - failed));
    out
}

pub fn to_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(
                |r| json!({"section": r.section, "name": r.name, "value": r.value, "pass": r.pass, "number": r.number}),
            )
            .collect(),
    )
}
