//! `pagoda metadata` against fake metadata servers for AWS (IMDSv2), GCE and Azure: the user data
//! becomes the service's environment file; missing, foreign or malformed user data and a service
//! that never answers are each handled as the service needs.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::scratch_dir;

/// A request as the fake server saw it.
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// How a fake server answers a request: status and body.
pub type Answer = fn(&Seen) -> (u16, String);

/// Serves `answer(request)` on a free port until the test ends; with `None` it accepts
/// connections and never answers.
pub fn fake_server(answer: Option<Answer>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(answer) = answer else {
                held.push(stream);
                continue;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let length = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            std::io::Read::read_exact(&mut reader, &mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            let (status, body) = answer(&Seen { method, path, headers, body });
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

pub fn metadata(provider: &str, port: u16, output: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["metadata", "--provider", provider, "--endpoint", &format!("http://127.0.0.1:{port}")])
        .args(["--output", output.to_str().unwrap()])
        .args(extra)
        .env("PAGODA_LOG", "warn")
        .output()
        .unwrap()
}

const CONFIG: &str = r#"{"pagoda": {"model": "s3://models/llama-3.1-8b", "served_model_name": "llama", "api_key_file": "/run/keys/pagoda", "extra_args": ["--max-model-len", "8192"], "env": {"AWS_REGION": "eu-west-1"}}}"#;

fn assert_config_written(output: &Path) {
    let text = std::fs::read_to_string(output).unwrap();
    for line in [
        "PAGODA_MODEL=\"s3://models/llama-3.1-8b\"",
        "PAGODA_SERVED_MODEL_NAME=\"llama\"",
        "PAGODA_API_KEY_FILE=\"/run/keys/pagoda\"",
        "PAGODA_EXTRA_ARGS=\"--max-model-len 8192\"",
        "AWS_REGION=\"eu-west-1\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(output).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn aws_imdsv2_needs_a_token_and_gives_the_user_data() {
    let port = fake_server(Some(|r| match (r.method.as_str(), r.path.as_str()) {
        ("PUT", "/latest/api/token") if r.header("X-aws-ec2-metadata-token-ttl-seconds").is_some() => {
            (200, "tok-123".into())
        }
        ("GET", "/latest/user-data") if r.header("X-aws-ec2-metadata-token") == Some("tok-123") => (200, CONFIG.into()),
        ("GET", "/latest/user-data") => (401, String::new()),
        _ => (404, String::new()),
    }));
    let output = scratch_dir("metadata-aws").join("launch.env");
    let out = metadata("aws", port, &output, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_config_written(&output);
}

#[test]
fn gce_uses_the_pagoda_attribute_with_the_metadata_flavor_header() {
    let port = fake_server(Some(|r| match r.path.as_str() {
        "/computeMetadata/v1/instance/attributes/pagoda-config" if r.header("Metadata-Flavor") == Some("Google") => {
            (200, CONFIG.into())
        }
        _ => (404, String::new()),
    }));
    let output = scratch_dir("metadata-gce").join("launch.env");
    assert!(metadata("gcp", port, &output, &[]).status.success());
    assert_config_written(&output);
}

#[test]
fn azure_user_data_comes_base64_encoded() {
    let port = fake_server(Some(|r| {
        use base64::Engine as _;
        match r.path.as_str() {
            p if p.starts_with("/metadata/instance/compute/userData") && r.header("Metadata") == Some("true") => {
                (200, base64::engine::general_purpose::STANDARD.encode(CONFIG))
            }
            _ => (400, String::new()),
        }
    }));
    let output = scratch_dir("metadata-azure").join("launch.env");
    assert!(metadata("azure", port, &output, &[]).status.success());
    assert_config_written(&output);
}

#[test]
fn no_or_foreign_user_data_keeps_the_built_in_configuration() {
    let none = fake_server(Some(|r| if r.method == "PUT" { (200, "t".into()) } else { (404, String::new()) }));
    let output = scratch_dir("metadata-none").join("launch.env");
    assert!(metadata("aws", none, &output, &[]).status.success());
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(!text.contains("PAGODA_MODEL") && text.contains("No Pagoda configuration"));

    let foreign = fake_server(Some(|r| {
        if r.method == "PUT" { (200, "t".into()) } else { (200, "#cloud-config\npackages: [htop]\n".into()) }
    }));
    assert!(metadata("aws", foreign, &output, &[]).status.success());
    assert!(!std::fs::read_to_string(&output).unwrap().contains("PAGODA_MODEL"));

    // No cloud at all: an empty configuration, not an error.
    let dmi = scratch_dir("metadata-dmi");
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["metadata", "--dmi-dir", dmi.to_str().unwrap(), "--output", output.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(std::fs::read_to_string(&output).unwrap().contains("no cloud"));
}

#[test]
fn malformed_user_data_fails_and_leaves_the_previous_file() {
    let port = fake_server(Some(|r| {
        if r.method == "PUT" { (200, "t".into()) } else { (200, r#"{"pagoda": {"modle": "s3://x/y"}}"#.into()) }
    }));
    let output = scratch_dir("metadata-bad").join("launch.env");
    std::fs::write(&output, "PAGODA_MODEL=\"/models/previous\"\n").unwrap();
    let out = metadata("aws", port, &output, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: the user data is not valid Pagoda configuration: unknown field `modle`"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "PAGODA_MODEL=\"/models/previous\"\n");
}

#[test]
fn a_metadata_service_that_never_answers_times_out() {
    let port = fake_server(None);
    let output = scratch_dir("metadata-timeout").join("launch.env");
    let started = Instant::now();
    let out = metadata("gcp", port, &output, &["--timeout", "1"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("the GCE metadata server at http://127.0.0.1:") && stderr.contains("did not answer within 1s"),
        "{stderr}"
    );
    assert!(!output.exists());
}
