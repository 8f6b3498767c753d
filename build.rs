//! Build-time work, all of it optional so that a plain `cargo build` needs nothing but Rust:
//! - records the git commit the binary is built from, for `/version`, `pagoda_build_info` and
//!   `pagoda info` (builds outside a git checkout, such as Nix, pass `PAGODA_GIT_COMMIT`);
//! - flattens `kernels/*.cu` into one source text the binary embeds and compiles with NVRTC at
//!   start when no precompiled kernels are embedded;
//! - when nvcc is present (`PAGODA_NVCC`, else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc` or
//!   `nvcc` on `PATH`) compiles the kernels into a fatbin the binary embeds, for the capabilities
//!   in `PAGODA_CUDA_GENCODE` (nvcc `-gencode` flags, as the Nix package sets them) or
//!   sm_80/86/89/90 + compute_90 PTX; `PAGODA_NVCC=none` skips it (NVRTC at start instead);
//! - with the `cuda-emu` feature, compiles the kernels for the CPU with `kernels/cuda_emu.h`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// Kernel sources in the order they are flattened: the shared header first.
const KERNEL_HEADER: &str = "common.cuh";
const DEFAULT_GENCODE: &str = "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
     -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90";

fn main() {
    record_git_commit();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels)
        .expect("kernels/ is part of the source tree")
        .map(|e| e.expect("kernels/ is readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    write_flattened_source(kernels, &sources, &out_dir.join("kernels.cu"));
    compile_fatbin(kernels, &sources, &out_dir.join("kernels.fatbin"));
    if env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        compile_emulated(kernels, &sources, &out_dir);
    }
}

fn record_git_commit() {
    println!("cargo:rerun-if-env-changed=PAGODA_GIT_COMMIT");
    let commit = env::var("PAGODA_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    if Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
    }
    println!("cargo:rustc-env=PAGODA_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".to_string()));
}

/// One translation unit for NVRTC, which cannot open our headers: the shared header once, then
/// every `.cu` file with its `#include "common.cuh"` line dropped.
fn write_flattened_source(kernels: &Path, sources: &[PathBuf], dest: &Path) {
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let mut text = read(&kernels.join(KERNEL_HEADER)).replace("#pragma once", "");
    for path in sources {
        text.push_str(&format!("\n// ---- {}\n", path.display()));
        for line in read(path).lines() {
            if line.trim() != format!("#include \"{KERNEL_HEADER}\"") {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    fs::write(dest, text).expect("OUT_DIR is writable");
}

/// The fatbin, or an empty file when no nvcc was asked for (the binary then uses NVRTC).
fn compile_fatbin(kernels: &Path, sources: &[PathBuf], dest: &Path) {
    for var in ["PAGODA_CUDA_GENCODE", "PAGODA_NVCC", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let gencode = env::var("PAGODA_CUDA_GENCODE").ok().filter(|g| !g.trim().is_empty());
    let nvcc = match env::var("PAGODA_NVCC").ok().filter(|n| !n.is_empty()) {
        Some(n) if n == "none" => None,
        Some(n) => Some(n),
        // Asked for by the gencode flags: nvcc from PATH, or a clear failure below.
        None if gencode.is_some() => Some(find_nvcc().unwrap_or_else(|| "nvcc".to_string())),
        None => find_nvcc(),
    };
    let Some(nvcc) = nvcc else {
        fs::write(dest, b"").expect("OUT_DIR is writable");
        return;
    };
    let gencode = gencode.unwrap_or_else(|| DEFAULT_GENCODE.to_string());
    // nvcc takes one input with -fatbin: a unit that includes every source.
    let unit = dest.with_extension("unit.cu");
    let mut text = String::new();
    for path in sources {
        text.push_str(&format!("#include \"{}\"\n", fs::canonicalize(path).expect("kernel path").display()));
    }
    fs::write(&unit, text).expect("OUT_DIR is writable");
    let status = Command::new(&nvcc)
        .args(["-fatbin", "-O3", "-std=c++17", "--use_fast_math"])
        .args(gencode.split_whitespace())
        .arg("-I")
        .arg(kernels)
        .arg(&unit)
        .arg("-o")
        .arg(dest)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (PAGODA_NVCC=none skips the precompiled kernels): {e}"));
    assert!(status.success(), "{nvcc} failed to compile kernels/*.cu");
}

/// An nvcc that runs: under `$CUDA_HOME` or `$CUDA_PATH`, or on `PATH`.
fn find_nvcc() -> Option<String> {
    let mut candidates: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(env::var_os).map(|d| PathBuf::from(d).join("bin/nvcc")).collect();
    candidates.push(PathBuf::from("nvcc"));
    candidates
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(|c| c.display().to_string())
}

/// The kernels as C++ for the CPU (cuda_emu.h force-included), plus the generated entry point
/// `cuda_emu_launch` that launches a registered kernel by name.
fn compile_emulated(kernels: &Path, sources: &[PathBuf], out_dir: &Path) {
    println!("cargo:rerun-if-env-changed=CUDA_INCLUDE_DIR");
    let include = env::var_os("CUDA_INCLUDE_DIR").map(PathBuf::from).or_else(find_wheel_headers).unwrap_or_else(|| {
        panic!(
            "the cuda-emu feature needs the CUDA headers (cuda_bf16.h): set CUDA_INCLUDE_DIR to the include/ folder \
             of the nvidia-cuda-runtime, -crt and -cccl wheels (./test.sh installs them into .venv)"
        )
    });
    let unit = out_dir.join("emulated_kernels.cpp");
    let mut text = String::new();
    for path in sources {
        text.push_str(&format!("#include \"{}\"\n", fs::canonicalize(path).expect("kernel path").display()));
    }
    text.push_str("CUDA_EMU_DEFINE_LAUNCH()\n");
    fs::write(&unit, text).expect("OUT_DIR is writable");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file(&unit)
        .include(&include)
        .include(kernels)
        .flag("-include")
        .flag(kernels.join("cuda_emu.h").to_str().expect("UTF-8 path"))
        .flag("-fno-strict-aliasing")
        .opt_level(2)
        .warnings(false)
        .compile("pagoda_emulated_kernels");
}

/// The headers of the CUDA wheels in the repository's `.venv`, where ./test.sh installs them.
fn find_wheel_headers() -> Option<PathBuf> {
    let lib = Path::new(".venv/lib");
    fs::read_dir(lib).ok()?.filter_map(Result::ok).find_map(|entry| {
        let include = entry.path().join("site-packages/nvidia/cu13/include");
        include.join("cuda_bf16.h").is_file().then(|| fs::canonicalize(include).ok()).flatten()
    })
}
