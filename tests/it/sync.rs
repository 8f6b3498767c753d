//! `pagoda sync` and `pagoda serve --model s3://...` against real local servers started here:
//! moto for S3 (and, through its S3 routing, the GCS client), Azurite for Azure Blob, and rclone
//! for HTTP. A test whose server is not installed says so and does not run (`./test.sh` installs
//! them all).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use serde_json::{Value, json};

use crate::common::*;
use crate::http::{get, post};
use crate::server::Server;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn spawn(program: &Path, args: &[&str]) -> Proc {
    Proc(Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// A moto S3 server with one bucket.
struct Moto {
    _proc: Proc,
    port: u16,
}

const BUCKET: &str = "models";

impl Moto {
    fn start() -> Option<Moto> {
        let bin = repo_path(".venv/bin/moto_server");
        if !bin.is_file() {
            tool_missing(&format!("{} is missing (./test.sh installs moto)", bin.display()));
            return None;
        }
        let port = free_port();
        let proc = spawn(&bin, &["-H", "127.0.0.1", "-p", &port.to_string()]);
        wait_port(port, "moto");
        let moto = Moto { _proc: proc, port };
        let resp = crate::http::request(port, "PUT", &format!("/{BUCKET}"), &[], b"");
        assert_eq!(resp.status, 200, "creating the bucket: {}", resp.text());
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What `pagoda` needs in its environment to reach this server.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec()
    }

    fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        let client = self.client();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(client.put(&object_store::path::Path::from(key), bytes.into())).unwrap();
    }

    /// Puts `bytes` at the key `url_path` names, sent as it is and unsigned (moto does not check):
    /// keys the object_store client would change (a final `/`; an empty, `.` or `..` part) reach
    /// the store unchanged. Percent escapes in `url_path` are decoded by moto.
    fn put_raw(&self, url_path: &str, bytes: &[u8]) {
        let resp = crate::http::request(self.port, "PUT", &format!("/{BUCKET}/{url_path}"), &[], bytes);
        assert_eq!(resp.status, 200, "putting {url_path}: {}", resp.text());
    }

    /// Uploads the files of `dir` under `prefix`.
    fn upload_dir(&self, dir: &Path, prefix: &str) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_str().unwrap();
                self.put(&format!("{prefix}/{name}"), std::fs::read(&path).unwrap());
            }
        }
    }
}

/// The tiny-llama fixture's model files (without the reference outputs).
fn model_dir() -> PathBuf {
    copy_fixture("tiny-llama", "sync-model-src")
}

/// A model folder with a `weights_mib`-MiB weight file of pseudo-random bytes.
pub(crate) fn big_model_dir(name: &str, weights_mib: usize) -> PathBuf {
    let dir = copy_fixture("tiny-llama", name);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..weights_mib << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

/// Runs `pagoda` with a clean environment plus `env`.
fn pagoda(args: &[&str], env: &[(String, String)]) -> Output {
    pagoda_cmd(args, env).output().unwrap()
}

fn pagoda_cmd(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("PAGODA_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `pagoda sync ... --json`, which must succeed; returns its summary.
fn sync_ok(uri: &str, dest: &Path, extra: &[&str], env: &[(String, String)]) -> Value {
    let mut args = vec!["sync", uri, dest.to_str().unwrap(), "--json", "--progress", "off"];
    args.extend_from_slice(extra);
    let out = pagoda(&args, env);
    assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `pagoda sync` that must fail; returns its one-line error.
fn sync_err(uri: &str, dest: &Path, extra: &[&str], env: &[(String, String)]) -> String {
    let mut args = vec!["sync", uri, dest.to_str().unwrap(), "--progress", "off"];
    args.extend_from_slice(extra);
    let out = pagoda(&args, env);
    assert_eq!(out.status.code(), Some(1), "sync should fail: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.lines().last().unwrap_or_default().to_string()
}

/// Every model file of `src` is in `dest` with the same bytes.
fn assert_same_files(src: &Path, dest: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(dest.join(name)).unwrap(), "{name:?} differs");
    }
}

fn total_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[test]
fn s3_sync_is_byte_identical_idempotent_and_served() {
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    moto.upload_dir(&src, "tiny-llama");
    let uri = format!("s3://{BUCKET}/tiny-llama");
    let dest = scratch_dir("sync-s3").join("model");
    let first = sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!(first["downloaded_files"], 5);
    assert_eq!(first["downloaded_bytes"], total_bytes(&src));
    assert_same_files(&src, &dest);
    let second = sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!((second["downloaded_files"].clone(), second["downloaded_bytes"].clone()), (json!(0), json!(0)));

    // Without DEST, the sync lands where `serve --download-dir` looks (the appliance's sync unit
    // relies on this); without a model, or with a local folder, there is nothing to do.
    let downloads = scratch_dir("sync-s3-downloads");
    let mut env = moto.env();
    env.push(("PAGODA_MODEL".into(), uri.clone()));
    let out = pagoda(&["sync", "--download-dir", downloads.to_str().unwrap(), "--progress", "off"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_files(&src, &downloads.join("s3").join(BUCKET).join("tiny-llama"));
    for args in [&["sync"][..], &["sync", "/models/local"][..]] {
        let out = pagoda(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Serving the URI syncs into --download-dir and serves under the URI's name.
    let cache = scratch_dir("sync-s3-cache");
    let mut env: Vec<(String, String)> = moto.env();
    env.push(("PAGODA_DOWNLOAD_DIR".into(), cache.display().to_string()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::spawn(&["--model", &uri], &env_refs);
    server.wait_ready();
    let models = get(server.port, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], uri.as_str());
    let local = cache.join("s3").join(BUCKET).join("tiny-llama");
    assert_same_files(&src, &local);
    let reference = reference("tiny-llama");
    let body =
        json!({"prompt": reference.prompts[0].prompt_ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let served = post(server.port, "/v1/completions", &body).json();
    let mut engine = engine("tiny-llama", |_| {});
    let expected = run(&mut engine, vec![request("x", reference.prompts[0].prompt_ids.clone(), greedy(8))]).remove(0);
    assert_eq!(served["choices"][0]["text"], expected.text.as_str());
    drop(server);

    // A restart with the store gone serves the complete copy synced before.
    drop(moto);
    let server = Server::spawn(&["--model", &uri], &env_refs);
    server.wait_ready();
    assert!(server.log().contains("serving the copy synced earlier"), "{}", server.log());
}

/// Starts a slow sync of `uri` (1 MiB parts, one at a time) and returns it once the weights' part
/// map records `min_parts` finished parts, with the map's path.
fn sync_until_parts_done(moto: &Moto, uri: &str, dest: &Path, min_parts: usize) -> (Child, PathBuf) {
    let args = [
        "sync",
        uri,
        dest.to_str().unwrap(),
        "--progress",
        "off",
        "--sync-part-size",
        "1MiB",
        "--sync-concurrency",
        "1",
    ];
    let mut child = pagoda_cmd(&args, &moto.env()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let parts = dest.join(".pagoda-sync/partial/model.safetensors.parts.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if done_parts(&parts) >= min_parts {
            return (child, parts);
        }
        assert!(Instant::now() < deadline, "no progress to interrupt");
        assert!(child.try_wait().unwrap().is_none(), "the sync finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Parts a part map records as finished (0 when it is not there yet).
pub(crate) fn done_parts(parts: &Path) -> usize {
    std::fs::read(parts)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map_or(0, |v| v["done"].as_array().unwrap().iter().filter(|d| d.as_bool() == Some(true)).count())
}

#[test]
fn an_interrupted_sync_resumes_with_only_the_missing_bytes() {
    let Some(moto) = Moto::start() else { return };
    let src = big_model_dir("sync-resume-src", 64);
    moto.upload_dir(&src, "big");
    let uri = format!("s3://{BUCKET}/big");
    let dest = scratch_dir("sync-resume").join("model");
    let (mut child, parts) = sync_until_parts_done(&moto, &uri, &dest, 8);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dest.join("model.safetensors").exists(), "nothing half-written at the model path");
    let done_parts = done_parts(&parts) as u64;
    assert!(done_parts < 64, "the download was interrupted halfway");

    let summary = sync_ok(&uri, &dest, &["--sync-part-size", "1MiB"], &moto.env());
    let weights = 64u64 << 20;
    let small_files = total_bytes(&src) - weights;
    // The small files may or may not have finished before the kill; the weights resume.
    let downloaded = summary["downloaded_bytes"].as_u64().unwrap();
    let weights_fetched = weights - done_parts * (1 << 20);
    assert!(
        downloaded >= weights_fetched && downloaded <= weights_fetched + small_files,
        "downloaded {downloaded}, expected the missing {weights_fetched} weight bytes (plus at most {small_files})"
    );
    assert_same_files(&src, &dest);
    assert!(!parts.exists(), "the part map is gone once the file is in place");
}

#[test]
fn listings_longer_than_one_page_are_followed() {
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    moto.upload_dir(&src, "many");
    // S3 returns at most 1,000 keys a page.
    let client = moto.client();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let puts = (0..1100).map(|i| {
            let client = &client;
            async move {
                let key = object_store::path::Path::from(format!("many/extra/file-{i:04}.txt"));
                client.put(&key, format!("{i}").into_bytes().into()).await.unwrap();
            }
        });
        futures::future::join_all(puts).await;
    });
    let dest = scratch_dir("sync-many").join("model");
    let summary = sync_ok(&format!("s3://{BUCKET}/many"), &dest, &[], &moto.env());
    assert_eq!(summary["files"], 1105);
    assert_eq!(std::fs::read_to_string(dest.join("extra/file-1099.txt")).unwrap(), "1099");
    assert_same_files(&src, &dest);
}

#[test]
fn a_corrupted_local_file_is_fetched_again() {
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    moto.upload_dir(&src, "tiny-llama");
    let uri = format!("s3://{BUCKET}/tiny-llama");
    let dest = scratch_dir("sync-corrupt").join("model");
    sync_ok(&uri, &dest, &[], &moto.env());

    // Overwrite bytes in place: same size, new modification time.
    let weights = dest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[5000..5010].copy_from_slice(&[0xAA; 10]);
    std::fs::write(&weights, &bytes).unwrap();
    let summary = sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!(summary["downloaded_files"], 1);
    assert_same_files(&src, &dest);

    // Corruption that keeps the modification time passes the quick check; --verify hashes.
    let mtime = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::File::options().write(true).open(&weights).unwrap().set_modified(mtime).unwrap();
    assert_eq!(sync_ok(&uri, &dest, &[], &moto.env())["downloaded_files"], 0);
    assert_eq!(sync_ok(&uri, &dest, &["--verify"], &moto.env())["downloaded_files"], 1);
    assert_same_files(&src, &dest);
}

#[test]
fn concurrent_syncs_of_one_folder_do_not_interfere() {
    let Some(moto) = Moto::start() else { return };
    let src = big_model_dir("sync-concurrent-src", 24);
    moto.upload_dir(&src, "big");
    let uri = format!("s3://{BUCKET}/big");
    let dest = scratch_dir("sync-concurrent").join("model");
    let args = ["sync", &uri, dest.to_str().unwrap(), "--json", "--progress", "off", "--sync-part-size", "1MiB"];
    let children: Vec<Child> = (0..2)
        .map(|_| pagoda_cmd(&args, &moto.env()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    let mut downloaded = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        downloaded += summary["downloaded_bytes"].as_u64().unwrap();
    }
    assert_eq!(downloaded, total_bytes(&src), "one sync fetched everything, the other waited and fetched nothing");
    assert_same_files(&src, &dest);
}

#[test]
fn a_file_that_changes_during_the_download_fails_cleanly() {
    let Some(moto) = Moto::start() else { return };
    let src = big_model_dir("sync-change-src", 48);
    moto.upload_dir(&src, "big");
    let uri = format!("s3://{BUCKET}/big");
    let dest = scratch_dir("sync-change").join("model");
    let (child, _) = sync_until_parts_done(&moto, &uri, &dest, 4);
    moto.put("big/model.safetensors", vec![7u8; 3 << 20]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("error: model.safetensors changed during the download ("), "{stderr}");
    assert!(stderr.contains("run the sync again"), "{stderr}");
    assert!(!dest.join("model.safetensors").exists(), "nothing half-written at the model path");
    assert!(!dest.join(".pagoda-sync/complete").exists());
    // Run again, it fetches the new version.
    sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!(std::fs::read(dest.join("model.safetensors")).unwrap(), vec![7u8; 3 << 20]);
}

#[test]
fn bad_sources_and_credentials_get_clear_errors() {
    let dest = scratch_dir("sync-errors").join("model");
    let none: Vec<(String, String)> = Vec::new();
    assert_eq!(
        sync_err("ftp://host/model", &dest, &[], &none),
        "error: unsupported model URI scheme 'ftp' in ftp://host/model: use s3://, gs://, az://, azure:// or https://"
    );
    assert_eq!(
        sync_err("http://127.0.0.1:9/model", &dest, &[], &none),
        "error: refusing plain http:// for http://127.0.0.1:9/model: pass --allow-http to allow unencrypted downloads"
    );
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    let err = sync_err("s3://no-such-bucket/m", &dest, &[], &moto.env());
    assert!(
        err.starts_with("error: cannot read s3://no-such-bucket/m (credentials tried: static keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): the bucket or container does not exist: "),
        "{err}"
    );
    assert_eq!(
        sync_err(&format!("s3://{BUCKET}/empty"), &dest, &[], &moto.env()),
        format!("error: s3://{BUCKET}/empty holds no files: check the bucket and the prefix")
    );
    // No keys at all: the instance role is tried (its metadata endpoint is closed here).
    let no_keys: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .chain([("AWS_METADATA_ENDPOINT".to_string(), "http://127.0.0.1:9".to_string())])
        .collect();
    moto.upload_dir(&src, "tiny-llama");
    let err = sync_err(&format!("s3://{BUCKET}/tiny-llama"), &dest, &[], &no_keys);
    assert!(err.contains("credentials tried: the EC2 instance role from instance metadata"), "{err}");

    // A prefix that is not a model folder, and one without weights.
    moto.put("weights-only/model.safetensors", vec![0; 16]);
    assert_eq!(
        sync_err(&format!("s3://{BUCKET}/weights-only"), &dest, &[], &moto.env()),
        format!("error: s3://{BUCKET}/weights-only is not a model folder: it has no config.json")
    );
    moto.put("config-only/config.json", b"{}".to_vec());
    assert_eq!(
        sync_err(&format!("s3://{BUCKET}/config-only"), &dest, &[], &moto.env()),
        format!("error: s3://{BUCKET}/config-only has no weights: no *.safetensors file")
    );
    assert!(!dest.join("config.json").exists(), "a failed sync writes no model file");

    // serve with a bad URI fails at start with the same message.
    let out = pagoda(
        &["serve", "--host", "127.0.0.1", "--port", "0", "--model", &format!("s3://{BUCKET}/empty")],
        &moto.env(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.ends_with(&format!(
            "error: syncing s3://{BUCKET}/empty: s3://{BUCKET}/empty holds no files: check the bucket and the prefix\n"
        )),
        "{stderr}"
    );
}

#[test]
fn a_full_disk_is_refused_before_anything_is_written() {
    let Some(moto) = Moto::start() else { return };
    let mount = scratch_dir("sync-small-disk");
    let mounted =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", mount.to_str().unwrap()]).status();
    if !mounted.is_ok_and(|s| s.success()) {
        println!("did not run: cannot mount a small tmpfs here (needs root and mount rights)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let src = big_model_dir("sync-disk-src", 4);
    moto.upload_dir(&src, "big");
    let dest = mount.join("model");
    let err = sync_err(&format!("s3://{BUCKET}/big"), &dest, &[], &moto.env());
    assert!(err.starts_with(&format!("error: not enough disk space in {}: the sync needs ", dest.display())), "{err}");
    assert!(!dest.join("model.safetensors").exists());
}

#[test]
fn gcs_client_path_syncs_from_an_s3_compatible_server() {
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    moto.upload_dir(&src, "gcs-model");
    let env = vec![
        ("GOOGLE_BASE_URL".to_string(), moto.endpoint()),
        // moto routes requests carrying this credential string to its S3 backend.
        ("GOOGLE_BEARER_TOKEN".to_string(), "Credential=gcs/20260101/us-east-1/s3/aws4_request".to_string()),
    ];
    let dest = scratch_dir("sync-gcs").join("model");
    let summary = sync_ok(&format!("gs://{BUCKET}/gcs-model"), &dest, &["--allow-http"], &env);
    assert_eq!(summary["downloaded_files"], 5);
    assert_same_files(&src, &dest);
}

#[test]
fn azure_blob_syncs_from_azurite_and_a_wrong_key_is_named() {
    let azurite = repo_path(".ci/cache/node/node_modules/.bin/azurite-blob");
    let python = repo_path(".venv/bin/python");
    if !azurite.is_file() || !python.is_file() {
        tool_missing("Azurite or the Python SDK is missing (./test.sh installs them)");
        return;
    }
    let port = free_port();
    let data = scratch_dir("azurite-data");
    let _proc = spawn(
        &azurite,
        &[
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
            data.to_str().unwrap(),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
        ],
    );
    wait_port(port, "azurite");
    let endpoint = format!("http://127.0.0.1:{port}");
    let src = model_dir();
    let status = Command::new(&python)
        .arg(repo_path("tests/python/azurite_upload.py"))
        .args([&endpoint, "models", "tiny-llama", src.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let env = vec![
        ("AZURE_STORAGE_USE_EMULATOR".to_string(), "true".to_string()),
        ("AZURITE_BLOB_STORAGE_URL".to_string(), endpoint.clone()),
    ];
    for uri in ["az://models/tiny-llama", "azure://models/tiny-llama"] {
        let dest = scratch_dir("sync-azure").join("model");
        let summary = sync_ok(uri, &dest, &["--allow-http"], &env);
        assert_eq!(summary["downloaded_files"], 5, "{uri}");
        assert_same_files(&src, &dest);
    }
    let mut wrong = env.clone();
    wrong.push(("AZURE_STORAGE_ACCOUNT_KEY".to_string(), "d3JvbmcK".to_string()));
    let dest = scratch_dir("sync-azure-wrong").join("model");
    let err = sync_err("az://models/tiny-llama", &dest, &["--allow-http"], &wrong);
    assert!(err.contains("credentials tried: the storage emulator's account"), "{err}");
    assert!(err.contains("access denied, the credentials were refused"), "{err}");
}

#[test]
fn https_sources_sync_with_and_without_listing() {
    let rclone = std::env::var_os("PATH")
        .and_then(|p| p.to_str().map(|p| p.split(':').map(|d| PathBuf::from(d).join("rclone")).find(|p| p.is_file())))
        .flatten();
    let Some(rclone) = rclone else {
        tool_missing("rclone is not installed (./test.sh installs it)");
        return;
    };
    let root = scratch_dir("http-root");
    let src = model_dir();
    std::fs::create_dir_all(root.join("tiny-llama")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, root.join("tiny-llama").join(path.file_name().unwrap())).unwrap();
    }
    // WebDAV lists the folder; plain HTTP cannot, so the model's files are asked for by name.
    for mode in ["webdav", "http"] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let _proc = spawn(&rclone, &["serve", mode, root.to_str().unwrap(), "--addr", &addr, "--config", "/dev/null"]);
        wait_port(port, "rclone");
        let dest = scratch_dir(&format!("sync-http-{mode}")).join("model");
        let summary = sync_ok(&format!("http://{addr}/tiny-llama"), &dest, &["--allow-http"], &[]);
        assert_eq!(summary["downloaded_files"], 5, "{mode}");
        assert_same_files(&src, &dest);
        assert_eq!(sync_ok(&format!("http://{addr}/tiny-llama"), &dest, &["--allow-http"], &[])["downloaded_bytes"], 0);
    }
}

/// Issue 15: a partial file was named by its flattened key, so a 250-byte file name or six nested
/// 60-byte folders failed with "File name too long", and the partial files of a failed run stayed.
#[test]
fn long_file_names_and_deep_folders_sync_and_leave_no_partial_files() {
    let Some(moto) = Moto::start() else { return };
    let src = copy_fixture("tiny-llama", "sync-long-src");
    moto.upload_dir(&src, "long");
    let long_name = "n".repeat(245) + ".json";
    let deep_name = ("d".repeat(60) + "/").repeat(6) + "config.json";
    moto.put(&format!("long/{long_name}"), b"long".to_vec());
    moto.put(&format!("long/{deep_name}"), b"deep".to_vec());
    let uri = format!("s3://{BUCKET}/long");
    let dest = scratch_dir("sync-long").join("model");
    // What a failed run left in the partial folder goes once a sync has everything in place.
    let partial = dest.join(".pagoda-sync/partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("gone.safetensors"), b"half").unwrap();
    std::fs::write(partial.join("gone.safetensors.parts.json"), b"{}").unwrap();
    let summary = sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!(summary["downloaded_files"], 7);
    assert_same_files(&src, &dest);
    assert_eq!(std::fs::read(dest.join(&long_name)).unwrap(), b"long");
    assert_eq!(std::fs::read(dest.join(&deep_name)).unwrap(), b"deep");
    let left: Vec<_> = std::fs::read_dir(&partial).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "partial files left behind: {left:?}");
    assert_eq!(sync_ok(&uri, &dest, &[], &moto.env())["downloaded_files"], 0);
}

/// A name one byte longer than a file name can be fails, naming it, before anything is fetched.
#[test]
fn a_name_too_long_for_a_file_is_refused_before_downloading() {
    let Some(moto) = Moto::start() else { return };
    let src = copy_fixture("tiny-llama", "sync-too-long-src");
    moto.upload_dir(&src, "too-long");
    let too_long = "n".repeat(251) + ".json";
    moto.put(&format!("too-long/{too_long}"), b"x".to_vec());
    let dest = scratch_dir("sync-too-long").join("model");
    assert_eq!(
        sync_err(&format!("s3://{BUCKET}/too-long"), &dest, &[], &moto.env()),
        format!(
            "error: s3://{BUCKET}/too-long lists '{too_long}', which cannot be a file in the model folder: a part of \
             it is 256 bytes long, and a file or folder name can have at most 255"
        )
    );
    assert!(!dest.exists(), "nothing was written");
}

/// Issue 15: one key the object_store client cannot parse, anywhere under the prefix, failed the
/// whole listing with a message blaming the credentials, even when the sync would not keep it.
#[test]
fn a_key_that_cannot_be_a_file_name_only_fails_a_sync_that_keeps_it() {
    let Some(moto) = Moto::start() else { return };
    let src = copy_fixture("tiny-llama", "sync-odd-src");
    moto.upload_dir(&src, "odd");
    // Keys with a `..`, `.` or empty part (the client refuses each one's listing page) and one with
    // a backslash (no file name here), none of them a model file.
    for url_path in ["odd/../escape.md", "odd/./dot.bin", "odd/notes//readme.md", "odd/back%5Cslash.md"] {
        moto.put_raw(url_path, b"x");
    }
    let uri = format!("s3://{BUCKET}/odd");
    let dest = scratch_dir("sync-odd").join("model");
    let summary = sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!((summary["files"].clone(), summary["downloaded_files"].clone()), (json!(5), json!(5)));
    assert_same_files(&src, &dest);
    assert!(!dest.parent().unwrap().join("escape.md").exists());

    // Kept, the key is an error that names it and says why, and nothing is fetched.
    let dest = scratch_dir("sync-odd-kept").join("model");
    let err = sync_err(&uri, &dest, &["--include", "*.md"], &moto.env());
    assert_eq!(
        err,
        format!(
            "error: s3://{BUCKET}/odd lists '../escape.md', which cannot be a file in the model folder: it has a \
             '..' part, and names must stay inside the model folder"
        )
    );
    assert!(!err.contains("credentials"), "{err}");
    assert!(!dest.exists(), "nothing was written");
}

/// Issue 15: the zero-byte `subdir/` key the S3 console writes for a folder read as a file named
/// `subdir`, and the sync failed with "File exists" on the files inside it.
#[test]
fn s3_console_folder_markers_are_not_files() {
    let Some(moto) = Moto::start() else { return };
    let src = copy_fixture("tiny-llama", "sync-marker-src");
    moto.upload_dir(&src, "marker");
    moto.put_raw("marker/", b"");
    moto.put_raw("marker/subdir/", b"");
    moto.put("marker/subdir/file", b"inside".to_vec());
    let dest = scratch_dir("sync-marker").join("model");
    let summary = sync_ok(&format!("s3://{BUCKET}/marker"), &dest, &["--include", "*"], &moto.env());
    assert_eq!(summary["files"], 6);
    assert_same_files(&src, &dest);
    assert_eq!(std::fs::read(dest.join("subdir/file")).unwrap(), b"inside");
}

/// Issue 15: a sync followed links already in the destination, writing outside it.
#[test]
fn a_sync_never_writes_through_a_symlink_in_the_destination() {
    let Some(moto) = Moto::start() else { return };
    let src = copy_fixture("tiny-llama", "sync-links-src");
    moto.upload_dir(&src, "links");
    moto.put("links/extra/notes.txt", b"notes".to_vec());
    let uri = format!("s3://{BUCKET}/links");
    let outside = scratch_dir("sync-links-outside");
    let is_file = |path: &Path| std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());

    // A link where a model file goes is replaced by the file; what it pointed to is untouched.
    let dest = scratch_dir("sync-links").join("model");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(outside.join("config.json"), b"not the model's").unwrap();
    std::os::unix::fs::symlink(outside.join("config.json"), dest.join("config.json")).unwrap();
    sync_ok(&uri, &dest, &[], &moto.env());
    assert_eq!(std::fs::read(outside.join("config.json")).unwrap(), b"not the model's");
    assert!(is_file(&dest.join("config.json")));
    assert_same_files(&src, &dest);
    // Also when the link's target has the synced content: a link is never taken as the file.
    let same = outside.join("same-config.json");
    std::fs::copy(src.join("config.json"), &same).unwrap();
    std::fs::remove_file(dest.join("config.json")).unwrap();
    std::os::unix::fs::symlink(&same, dest.join("config.json")).unwrap();
    assert_eq!(sync_ok(&uri, &dest, &[], &moto.env())["downloaded_files"], 1);
    assert!(is_file(&dest.join("config.json")), "the link was replaced");
    assert_eq!(std::fs::read(&same).unwrap(), std::fs::read(src.join("config.json")).unwrap());

    // A folder on a file's way that is a link is refused: nothing lands where it points.
    let dest = scratch_dir("sync-links-folder").join("model");
    std::fs::create_dir_all(&dest).unwrap();
    let elsewhere = scratch_dir("sync-links-elsewhere");
    std::os::unix::fs::symlink(&elsewhere, dest.join("extra")).unwrap();
    assert_eq!(
        sync_err(&uri, &dest, &[], &moto.env()),
        format!(
            "error: {} is a symbolic link, and a sync never writes through one: remove it, or sync into its target",
            dest.join("extra").display()
        )
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing written through the link");

    // So are the state folder and the destination itself, before anything is written.
    let dest = scratch_dir("sync-links-state").join("model");
    std::fs::create_dir_all(&dest).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dest.join(".pagoda-sync")).unwrap();
    let err = sync_err(&uri, &dest, &[], &moto.env());
    assert!(err.starts_with(&format!("error: {} is a symbolic link", dest.join(".pagoda-sync").display())), "{err}");
    let linked = scratch_dir("sync-links-root").join("model");
    std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
    let err = sync_err(&uri, &linked, &[], &moto.env());
    assert!(err.starts_with(&format!("error: {} is a symbolic link", linked.display())), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing written through the links");
    assert!(!dest.join("config.json").exists());
}

/// `--remove-other-models` (what the chart passes for a cache no other pod reads): after a
/// successful sync, the other model folders beside DEST go; anything else there stays, and a
/// failed sync removes nothing.
#[test]
fn a_sync_can_remove_the_other_models_folders_beside_it() {
    let Some(moto) = Moto::start() else { return };
    moto.upload_dir(&model_dir(), "prune/model");
    let cache = scratch_dir("sync-prune");
    let old = cache.join("0123456789abcdef");
    std::fs::create_dir_all(old.join("sub")).unwrap();
    std::fs::write(old.join("sub/model.safetensors"), b"old weights").unwrap();
    let keep = ["not-a-model", "0123456789ABCDEF", "0123456789abcde"];
    for name in keep {
        std::fs::create_dir_all(cache.join(name)).unwrap();
    }
    std::fs::write(cache.join("fedcba9876543211"), b"a file, not a folder").unwrap();
    std::os::unix::fs::symlink(cache.join("not-a-model"), cache.join("aaaaaaaaaaaaaaaa")).unwrap();
    let dest = cache.join("fedcba9876543210");
    let uri = format!("s3://{BUCKET}/prune/model");

    // A failed sync (a prefix with nothing in it) removes nothing.
    let error = sync_err(&format!("s3://{BUCKET}/nothing-here"), &dest, &["--remove-other-models"], &moto.env());
    assert!(error.contains("holds no files"), "{error}");
    assert!(old.is_dir());

    let summary = sync_ok(&uri, &dest, &["--remove-other-models"], &moto.env());
    assert_eq!(summary["removed_other_models"], json!(["0123456789abcdef"]));
    assert!(!old.exists());
    assert_same_files(&model_dir(), &dest);
    for name in keep.iter().chain(&["fedcba9876543211", "aaaaaaaaaaaaaaaa"]) {
        assert!(cache.join(name).symlink_metadata().is_ok(), "{name} was removed");
    }
    // Again: nothing else to remove, the model stays.
    let summary = sync_ok(&uri, &dest, &["--remove-other-models"], &moto.env());
    assert_eq!(summary["removed_other_models"], json!([]));
    assert_eq!(summary["downloaded_files"], 0);
    // The flag needs DEST: there is nothing to compare with otherwise.
    let out = pagoda(&["sync", &uri, "--remove-other-models"], &moto.env());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `--versioned` (what the chart passes): a changed model in the store becomes a new version
/// folder beside the one a running server holds, which is never rewritten (its files keep their
/// bytes and inodes); unchanged files are hard links, not downloads; a complete version is never
/// touched again; a version is removed once no server holds it; a folder synced before
/// `--versioned` seeds the first version; `--remove-unused-models` removes the other models no
/// server holds once their grace is over; a server serves from a read-only mount of the cache.
#[test]
fn a_versioned_sync_never_rewrites_a_version_a_running_server_holds() {
    use std::os::unix::fs::MetadataExt;
    let Some(moto) = Moto::start() else { return };
    let src = model_dir();
    moto.upload_dir(&src, "versioned/model");
    let cache = scratch_dir("sync-versioned");
    let dest = cache.join("fedcba9876543210");
    let uri = format!("s3://{BUCKET}/versioned/model");
    let env: Vec<(&str, &str)> = moto.env().leak().iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let ino = |path: &Path| std::fs::metadata(path).unwrap().ino();
    let current = |dest: &Path| std::fs::read_to_string(dest.join("current")).unwrap().trim().to_string();

    let first = sync_ok(&uri, &dest, &["--versioned"], &moto.env());
    let v1 = first["version"].as_str().unwrap().to_string();
    assert_eq!((v1.len(), first["downloaded_files"].clone()), (16, json!(5)));
    let v1_dir = dest.join("versions").join(&v1);
    assert_eq!(first["dest"], v1_dir.to_str().unwrap());
    assert_eq!(current(&dest), v1);
    assert_same_files(&src, &v1_dir);
    let generation = v1_dir.join("generation_config.json");
    let (old_bytes, old_ino) = (std::fs::read(&generation).unwrap(), ino(&generation));

    // A server on DEST serves `current` and holds it.
    let server = Server::spawn(&["--model", dest.to_str().unwrap(), "--served-model-name", "m"], &env);
    server.wait_ready();
    assert!(server.log().contains(&format!("versions/{v1}")), "{}", server.log());

    // The store's model changes: a new version, with only the changed file downloaded.
    let mut changed = old_bytes.clone();
    changed.extend_from_slice(b"\n");
    moto.put("versioned/model/generation_config.json", changed.clone());
    let second = sync_ok(&uri, &dest, &["--versioned"], &moto.env());
    let v2 = second["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    assert_eq!(second["downloaded_files"], 1);
    assert_eq!((second["removed_versions"].clone(), second["versions_in_use"].clone()), (json!([]), json!([v1])));
    let v2_dir = dest.join("versions").join(&v2);
    assert_eq!(current(&dest), v2);
    assert_eq!(std::fs::read(v2_dir.join("generation_config.json")).unwrap(), changed);
    // The held version is exactly as it was; the new one shares its unchanged files.
    assert_eq!((std::fs::read(&generation).unwrap(), ino(&generation)), (old_bytes, old_ino));
    assert_same_files(&src, &v1_dir);
    assert_eq!(ino(&v1_dir.join("model.safetensors")), ino(&v2_dir.join("model.safetensors")));
    let body = json!({"model": "m", "prompt": "hello", "max_tokens": 4});
    assert_eq!(post(server.port, "/v1/completions", &body).status, 200);

    // Other models beside DEST: one a server holds, one no server holds, one synced without
    // --versioned (nothing says whether it is read).
    moto.upload_dir(&src, "versioned/other");
    let other_uri = format!("s3://{BUCKET}/versioned/other");
    let (held, unheld, plain) =
        (cache.join("00000000000000aa"), cache.join("00000000000000bb"), cache.join("00000000000000cc"));
    for folder in [&held, &unheld] {
        sync_ok(&other_uri, folder, &["--versioned"], &moto.env());
    }
    sync_ok(&other_uri, &plain, &[], &moto.env());
    let other_server = Server::spawn(&["--model", held.to_str().unwrap()], &env);
    other_server.wait_ready();

    // The first server stops: its version goes at the next sync. The complete current version is
    // not touched (marker and manifest as they were), and within its grace the unheld model stays.
    drop(server);
    let state = v2_dir.join(".pagoda-sync");
    let stamps =
        || ["complete", "manifest.json"].map(|f| std::fs::metadata(state.join(f)).unwrap().modified().unwrap());
    let before = stamps();
    let third = sync_ok(&uri, &dest, &["--versioned", "--remove-unused-models"], &moto.env());
    assert_eq!(third["downloaded_files"], 0);
    assert_eq!(third["removed_versions"], json!([v1]));
    assert_eq!(third["removed_other_models"], json!([]));
    assert_eq!(stamps(), before);
    assert!(!v1_dir.exists() && unheld.join("current").is_file());
    // Past its grace, the unheld model goes; the held one and the unversioned one stay.
    let fourth =
        sync_ok(&uri, &dest, &["--versioned", "--remove-unused-models", "--unused-model-grace", "0"], &moto.env());
    assert_eq!(fourth["removed_other_models"], json!(["00000000000000bb"]));
    assert!(!unheld.exists());
    let held_current = held.join("versions").join(current(&held));
    assert_same_files(&src, &held_current);
    assert!(plain.join("config.json").is_file());
    drop(other_server);
    assert!(!cache.join("fedcba9876543210/.trash").read_dir().is_ok_and(|mut d| d.next().is_some()));

    // A folder synced before --versioned: its files seed the first version (nothing downloaded)
    // and stay as they were for the servers that may still read them.
    let plain_config = (std::fs::read(plain.join("config.json")).unwrap(), ino(&plain.join("config.json")));
    let upgraded = sync_ok(&other_uri, &plain, &["--versioned"], &moto.env());
    assert_eq!(upgraded["downloaded_files"], 0);
    assert_eq!((std::fs::read(plain.join("config.json")).unwrap(), ino(&plain.join("config.json"))), plain_config);
    assert_same_files(&src, &plain.join("versions").join(current(&plain)));

    // A server reads the cache through a read-only mount (as the chart mounts it).
    let readonly = scratch_dir("sync-versioned-ro");
    match ReadOnlyMount::new(&cache, &readonly) {
        None => println!("did not run: the read-only part (a read-only bind mount needs mount privileges)"),
        Some(_mount) => {
            let server = Server::spawn(&["--model", readonly.join("fedcba9876543210").to_str().unwrap()], &env);
            server.wait_ready();
            assert!(server.log().contains(&format!("versions/{v2}")), "{}", server.log());
        }
    }

    // --remove-unused-models needs --versioned; a Hub cache is already versioned.
    let out = pagoda(&["sync", &uri, dest.to_str().unwrap(), "--remove-unused-models"], &moto.env());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = sync_err("hf://org/model", &dest, &["--versioned"], &[]);
    assert!(err.contains("--versioned applies to object-store models"), "{err}");
}

/// A read-only bind mount of `src` at `at`, unmounted when dropped; `None` where this process may
/// not mount.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(src: &Path, at: &Path) -> Option<ReadOnlyMount> {
        let mount = |args: &[&str]| Command::new("mount").args(args).output().is_ok_and(|o| o.status.success());
        if !mount(&["--bind", src.to_str()?, at.to_str()?]) {
            return None;
        }
        let guard = ReadOnlyMount(at.to_path_buf());
        mount(&["-o", "remount,bind,ro", at.to_str()?]).then_some(guard)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
