//! Hugging Face Hub models (`--model org/name`, `pagoda sync hf://…`) against a local fake Hub
//! (`tests/python/fake_hub.py`: the Hub's API, redirects to a CDN host, ranges and headers), and
//! the cache shared with the real `huggingface_hub` Python package.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::http::{get, post};
use crate::server::Server;
use crate::sync::{big_model_dir, done_parts};

const REPO: &str = "test-org/tiny-llama";

struct FakeHub {
    child: Child,
    port: u16,
    commit: String,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let candidate = std::env::var_os("PAGODA_TEST_PYTHON").map(PathBuf::from).unwrap_or(venv);
    if candidate.is_file() {
        return Some(candidate);
    }
    tool_missing(&format!("the Hub tests need Python at {} (./test.sh makes it)", candidate.display()));
    None
}

impl FakeHub {
    fn start(repo: &str, dir: &Path, extra: &[&str]) -> Option<FakeHub> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/fake_hub.py");
        let mut child = Command::new(python()?)
            .arg(script)
            .args(["--repo", repo, "--dir", dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let commit = lines.next().unwrap().unwrap().trim().to_string();
        Some(FakeHub { child, port, commit })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Value> {
        get(self.port, "/_log").json().as_array().unwrap().clone()
    }

    /// Requests that fetched file content (resolve and CDN), from the `from`th request on.
    fn content_requests(&self, from: usize) -> Vec<Value> {
        self.requests()
            .into_iter()
            .skip(from)
            .filter(|r| {
                let p = r["path"].as_str().unwrap();
                r["method"] == "GET" && (p.contains("/resolve/") || p.starts_with("/cdn/"))
            })
            .collect()
    }
}

/// `pagoda` with a clean environment plus `env`.
fn pagoda(args: &[&str], env: &[(&str, &str)]) -> Output {
    pagoda_cmd(args, env).output().unwrap()
}

fn pagoda_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("PAGODA_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn sync_json(args: &[impl AsRef<str>], env: &[(&str, &str)]) -> Value {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = pagoda(&args, env);
    assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sync_error(args: &[impl AsRef<str>], env: &[(&str, &str)]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = pagoda(&args, env);
    assert_eq!(out.status.code(), Some(1), "should fail: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.lines().last().unwrap_or_default().to_string()
}

fn snapshot(cache: &Path, repo: &str, commit: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(commit)
}

#[test]
fn serve_org_name_fills_the_hub_cache_and_a_restart_downloads_nothing() {
    let src = copy_fixture("tiny-llama", "hub-serve-src");
    let Some(hub) = FakeHub::start(REPO, &src, &[]) else { return };
    let cache = scratch_dir("hub-serve-cache");
    let endpoint = hub.endpoint();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_TOKEN", "")];
    let server = Server::spawn(&["--model", REPO, "--num-gpu-blocks-override", "256"], &env);
    server.wait_ready();
    assert_eq!(get(server.port, "/v1/models").json()["data"][0]["id"], REPO);
    let reference = reference("tiny-llama");
    let body =
        json!({"prompt": reference.prompts[0].prompt_ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let served = post(server.port, "/v1/completions", &body).json();
    let mut engine = engine("tiny-llama", |_| {});
    let expected = run(&mut engine, vec![request("x", reference.prompts[0].prompt_ids.clone(), greedy(8))]).remove(0);
    assert_eq!(served["choices"][0]["text"], expected.text.as_str());
    drop(server);

    // huggingface_hub's layout: refs/main names the commit; the snapshot links into blobs/.
    let repo_dir = cache.join("models--test-org--tiny-llama");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), hub.commit);
    let snap = snapshot(&cache, REPO, &hub.commit);
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let link = std::fs::read_link(snap.join(name)).unwrap();
        assert!(link.starts_with("../../blobs/"), "{name} links to {}", link.display());
        assert_eq!(std::fs::read(snap.join(name)).unwrap(), std::fs::read(src.join(name)).unwrap());
    }
    let weights_blob = std::fs::read_link(snap.join("model.safetensors")).unwrap();
    assert_eq!(weights_blob.file_name().unwrap().len(), 64, "an LFS file's blob is named by its SHA-256");
    // The weights came through the CDN redirect, in ranges.
    let fetched = hub.content_requests(0);
    assert!(fetched.iter().any(|r| r["path"].as_str().unwrap().starts_with("/cdn/") && !r["range"].is_null()));

    // A second start asks the Hub which commit `main` is, and downloads nothing.
    let before = hub.requests().len();
    let server = Server::spawn(&["--model", REPO, "--num-gpu-blocks-override", "256"], &env);
    server.wait_ready();
    drop(server);
    assert_eq!(hub.content_requests(before), Vec::<Value>::new(), "the second start downloaded files");

    // Offline (HF_HUB_OFFLINE=1), or with the Hub gone, the cached snapshot is served.
    drop(hub);
    let offline = [env[0], env[1], ("HF_HUB_OFFLINE", "1")];
    let server = Server::spawn(&["--model", REPO, "--num-gpu-blocks-override", "256"], &offline);
    server.wait_ready();
    drop(server);
    let server = Server::spawn(&["--model", &format!("hf://{REPO}"), "--num-gpu-blocks-override", "256"], &env);
    server.wait_ready();
    assert!(server.log().contains("cannot be reached"), "{}", server.log());
}

#[test]
fn an_interrupted_hub_download_resumes_with_only_the_missing_bytes() {
    let src = big_model_dir("hub-resume-src", 24);
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    let Some(hub) = FakeHub::start("test-org/big", &src, &["--throttle", "0.05"]) else { return };
    let cache = scratch_dir("hub-resume-cache");
    let endpoint = hub.endpoint();
    let env = [("HF_ENDPOINT", endpoint.as_str())];
    let args = ["sync", "hf://test-org/big", cache.to_str().unwrap(), "--progress", "off", "--json"];
    let slow = [&args[..], &["--sync-part-size", "1MiB", "--sync-concurrency", "1"]].concat();
    let mut child = pagoda_cmd(&slow, &env).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let repo_dir = cache.join("models--test-org--big");
    let sha = format!("{:x}", sha2_digest(&weights));
    let parts = repo_dir.join(format!(".pagoda-sync/partial/blobs%2F{sha}.parts.json"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while done_parts(&parts) < 4 {
        assert!(Instant::now() < deadline, "no progress to interrupt");
        assert!(child.try_wait().unwrap().is_none(), "the sync finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = done_parts(&parts) as u64;
    assert!(done < 24, "interrupted halfway");
    assert!(!repo_dir.join("blobs").join(&sha).exists(), "no half-written blob");

    let summary = sync_json(&[&args[..], &["--sync-part-size", "1MiB"]].concat(), &env);
    let missing = (24 - done) << 20;
    let downloaded = summary["downloaded_bytes"].as_u64().unwrap();
    assert!(downloaded >= missing && downloaded < missing + (1 << 20), "downloaded {downloaded}, missing {missing}");
    let snap = snapshot(&cache, "test-org/big", &hub.commit);
    assert_eq!(summary["dest"], snap.to_str().unwrap());
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), weights);
    let again = sync_json(&args, &env);
    assert_eq!((again["downloaded_files"].clone(), again["downloaded_bytes"].clone()), (json!(0), json!(0)));
}

fn sha2_digest(bytes: &[u8]) -> impl std::fmt::LowerHex {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
}

#[test]
fn gated_private_and_missing_models_get_one_clear_error_each() {
    let src = copy_fixture("tiny-llama", "hub-gated-src");
    let Some(hub) = FakeHub::start(REPO, &src, &["--token", "hf_secret"]) else { return };
    let cache = scratch_dir("hub-gated-cache");
    let endpoint = hub.endpoint();
    let env = [("HF_ENDPOINT", endpoint.as_str())];
    let dest = cache.to_str().unwrap().to_string();
    let sync = |uri: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["sync", uri, &dest, "--progress", "off", "--json"].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let uri = format!("hf://{REPO}");
    let err = sync_error(&sync(&uri, &[]), &env);
    assert!(err.contains("401 Unauthorized: the model is gated or private") && err.contains("set HF_TOKEN"), "{err}");
    let err = sync_error(&sync(&uri, &["--hf-token", "hf_noaccess"]), &env);
    assert!(err.contains("403 Forbidden") && err.contains("accept its terms"), "{err}");
    let err = sync_error(&sync(&uri, &["--hf-token", "hf_mistyped"]), &env);
    assert!(err.contains("401 Unauthorized: the token given was refused"), "{err}");
    let err = sync_error(&sync("hf://test-org/typo", &[]), &env);
    assert!(err.contains("401 Unauthorized: no such model") && err.contains("or it is private or gated"), "{err}");
    let err = sync_error(&sync(&format!("{uri}@no-such-branch"), &["--hf-token", "hf_secret"]), &env);
    assert!(err.ends_with("test-org/tiny-llama@no-such-branch: revision 'no-such-branch' does not exist (no such branch, tag or commit)"), "{err}");
    let err = sync_error(&sync("hf://test-org/other", &["--hf-token", "hf_secret"]), &env);
    assert!(err.contains("404 Not Found: no such model"), "{err}");
    assert!(std::fs::read_dir(&cache).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("other")));

    // With the token (from HF_TOKEN here) it works, and the token never leaves for the CDN host.
    let with_token = [env[0], ("HF_TOKEN", "hf_secret")];
    let summary = sync_json(&sync(&uri, &[]), &with_token);
    assert_eq!(summary["commit"], hub.commit.as_str());
    for r in hub.content_requests(0) {
        let to_cdn = r["path"].as_str().unwrap().starts_with("/cdn/");
        assert_eq!(r["auth"].is_null(), to_cdn, "{r}");
    }
    // --revision pins a commit; a revision in the URI and another in --revision conflict.
    let pinned = sync_json(&sync(&uri, &["--revision", &hub.commit]), &with_token);
    assert_eq!(pinned["downloaded_bytes"], 0);
    let err = sync_error(&sync(&format!("{uri}@main"), &["--revision", "v2"]), &with_token);
    assert!(err.contains("the URI names revision 'main' and --revision 'v2'"), "{err}");
    let err = sync_error(&["sync", "s3://bucket/model", "--revision", "main"], &with_token);
    assert!(err.contains("--revision applies to Hugging Face Hub models"), "{err}");
}

#[test]
fn content_that_does_not_match_the_hubs_hash_is_refused() {
    let src = copy_fixture("tiny-llama", "hub-corrupt-src");
    let Some(hub) = FakeHub::start(REPO, &src, &["--corrupt"]) else { return };
    let cache = scratch_dir("hub-corrupt-cache");
    let endpoint = hub.endpoint();
    let err = sync_error(
        &["sync", &format!("hf://{REPO}"), cache.to_str().unwrap(), "--progress", "off"],
        &[("HF_ENDPOINT", endpoint.as_str())],
    );
    assert!(err.contains("the downloaded content hashes to") && err.contains("it was discarded"), "{err}");
    let blobs = cache.join("models--test-org--tiny-llama/blobs");
    let weights_sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(src.join("model.safetensors")).unwrap()))
    };
    assert!(!blobs.join(weights_sha).exists(), "a corrupt blob was kept");
}

/// The real `huggingface_hub` reads what we downloaded, and we use what it downloaded.
#[test]
fn the_cache_is_shared_with_huggingface_hub() {
    let Some(python) = python() else { return };
    if !Command::new(&python).args(["-c", "import huggingface_hub"]).status().unwrap().success() {
        return tool_missing("the cache test needs huggingface_hub in the test Python (tests/python/requirements.txt)");
    }
    let src = copy_fixture("tiny-llama", "hub-interop-src");
    let Some(hub) = FakeHub::start(REPO, &src, &[]) else { return };
    let endpoint = hub.endpoint();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/hub_interop.py");
    let interop = |mode: &str, cache: &Path| {
        let out = Command::new(&python)
            .arg(&script)
            .args([mode, cache.to_str().unwrap(), REPO])
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    };
    let ours = scratch_dir("hub-interop-ours");
    let env = [("HF_ENDPOINT", endpoint.as_str())];
    sync_json(&["sync", &format!("hf://{REPO}"), ours.to_str().unwrap(), "--progress", "off", "--json"], &env);
    assert_eq!(interop("read", &ours), snapshot(&ours, REPO, &hub.commit));

    let theirs = scratch_dir("hub-interop-theirs");
    assert_eq!(interop("download", &theirs), snapshot(&theirs, REPO, &hub.commit));
    let before = hub.requests().len();
    let summary =
        sync_json(&["sync", &format!("hf://{REPO}"), theirs.to_str().unwrap(), "--progress", "off", "--json"], &env);
    assert_eq!(summary["downloaded_bytes"], 0, "{summary}");
    assert_eq!(hub.content_requests(before), Vec::<Value>::new());
}
