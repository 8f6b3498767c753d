//! Habits that keep the code base as ARCHITECTURE.md describes it, checked on the sources: every
//! file opens with a `//!` header, every module is named in the code map, and the layers depend on
//! each other only in the stated direction.

use std::path::{Path, PathBuf};

fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out
}

/// `src/weights/gguf.rs` → `weights/gguf.rs`.
fn relative(path: &Path) -> String {
    path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).unwrap().to_string_lossy().replace('\\', "/")
}

#[test]
fn every_source_file_opens_with_a_module_header() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            !text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.starts_with("//!"))
        })
        .map(|p| relative(&p))
        .collect();
    assert!(missing.is_empty(), "files without a `//!` header saying what they are: {missing:?}");
}

/// A module is named in ARCHITECTURE.md when its path (`model/config.rs`), its file name
/// (`gguf.rs`, in its folder's entry) or, for a folder's `mod.rs`, the folder (`weights/`) appears
/// there in backticks. Test-only modules (`tests.rs`) and the crate roots are exempt.
#[test]
fn every_module_is_on_the_code_map() {
    let map = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let named = |s: &str| map.contains(&format!("`{s}")) || map.contains(&format!("{s}`"));
    let mut missing = Vec::new();
    for path in sources() {
        let rel = relative(&path);
        if ["lib.rs", "main.rs"].contains(&rel.as_str()) || rel.ends_with("/tests.rs") {
            continue;
        }
        let file = rel.rsplit('/').next().unwrap();
        let (folder, stem) = match rel.rsplit_once('/') {
            Some((folder, _)) => (Some(folder), file),
            None => (None, file),
        };
        let ok = named(&rel)
            || folder.is_some_and(|f| named(&format!("{}::{}", f.replace('/', "::"), stem.trim_end_matches(".rs"))))
            || (stem == "mod.rs" && folder.is_some_and(|f| named(&format!("{f}/"))))
            || (folder.is_some() && named(stem))
            || (folder.is_none() && named(stem.trim_end_matches(".rs")));
        if !ok {
            missing.push(rel);
        }
    }
    assert!(missing.is_empty(), "modules ARCHITECTURE.md's code map does not name: {missing:?}");
}

/// The dependency rules of ARCHITECTURE.md's invariants: for each layer, the layers its product
/// code must not name (`crate::x`). Tests inside a layer (`tests.rs`, `#[cfg(test)]` modules) may
/// build what they need from any layer.
#[test]
fn layers_depend_only_downwards() {
    let rules: &[(&str, &[&str])] = &[
        ("engine/", &["backend", "api", "cli", "launch", "telemetry", "storage", "weights", "metadata"]),
        ("api/", &["launch", "model", "backend", "kv_cache", "weights", "storage", "cli", "metadata"]),
        ("kv_cache/", &["engine", "model", "backend", "api", "cli", "launch", "weights", "tokenizer", "storage"]),
        ("model/", &["engine", "api", "cli", "launch", "telemetry", "storage", "kv_cache"]),
        ("backend/", &["engine", "api", "cli", "launch", "telemetry", "storage", "model", "kv_cache", "tokenizer"]),
        ("weights/", &["engine", "api", "cli", "launch", "model", "backend", "tokenizer", "storage"]),
        ("tokenizer/", &["engine", "api", "cli", "launch", "model", "backend", "weights", "storage"]),
        ("storage/", &["engine", "api", "cli", "launch", "model", "backend", "kv_cache", "tokenizer"]),
    ];
    let mut broken = Vec::new();
    for path in sources() {
        let rel = relative(&path);
        if rel.ends_with("/tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let product = text.split("#[cfg(test)]").next().unwrap_or("");
        for (layer, forbidden) in rules {
            if !rel.starts_with(layer) {
                continue;
            }
            for name in *forbidden {
                for (n, line) in product.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if code.contains(&format!("crate::{name}::")) || code.contains(&format!("crate::{name};")) {
                        broken.push(format!("{rel}:{}: names crate::{name}", n + 1));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "dependencies against the stated direction:\n{}", broken.join("\n"));
}
