//! Launch-time configuration of the cloud images: `pagoda metadata` reads the instance's user data
//! from the cloud's metadata service (AWS IMDSv2, the GCE metadata server, Azure IMDS) and writes an
//! environment file the `pagoda` service reads, so one generic image serves any model.
//!
//! The user data is JSON (at the top level or under a `"pagoda"` key) or `PAGODA_*=value` lines;
//! other user data (a `#cloud-config`, a script) is left to other tools.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

pub mod secrets;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Aws,
    Gcp,
    Azure,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Aws => "AWS instance metadata (IMDSv2)",
            Provider::Gcp => "the GCE metadata server",
            Provider::Azure => "Azure IMDS",
        }
    }

    /// Where the metadata service listens by default.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Provider::Aws | Provider::Azure => "http://169.254.169.254",
            Provider::Gcp => "http://metadata.google.internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{service} at {endpoint} did not answer within {timeout:?}; is this instance on that cloud?")]
    Timeout { service: &'static str, endpoint: String, timeout: Duration },
    #[error("{service} at {endpoint} failed: {message}")]
    Service { service: &'static str, endpoint: String, message: String },
    #[error("cannot read the API key secret {secret} from {store}: {message}")]
    Secret { store: &'static str, secret: String, message: String },
    #[error("the user data is not valid Pagoda configuration: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// What the user data may set.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// The model: a local folder, a Hugging Face Hub id (`org/name`), or an s3://, gs://, az://,
    /// https:// or hf:// URI.
    pub model: Option<String>,
    pub served_model_name: Option<String>,
    /// A file on the instance holding the API key (put there by a secrets agent); keys never
    /// travel in user data, which anyone on the instance can read.
    pub api_key_file: Option<String>,
    /// The API key(s) in the cloud's secret store, read at boot with the instance's identity and
    /// written to a key file only the server can read (`secrets::SecretRef` lists the forms).
    pub api_key_secret: Option<String>,
    /// Extra `pagoda serve` arguments.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Extra environment variables for the service (AWS_REGION, HF_HOME, ...).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One conversation with a cloud's metadata service: its HTTP client, how its failures read, and
/// (AWS) the IMDSv2 session token, fetched once.
pub(crate) struct Session<'a> {
    provider: Provider,
    endpoint: &'a str,
    timeout: Duration,
    client: reqwest::Client,
    aws_token: Option<String>,
}

impl<'a> Session<'a> {
    pub(crate) fn new(provider: Provider, endpoint: &'a str, timeout: Duration) -> Result<Self, MetadataError> {
        let client =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).no_proxy().build().map_err(|e| {
                MetadataError::Service {
                    service: provider.name(),
                    endpoint: endpoint.to_string(),
                    message: e.to_string(),
                }
            })?;
        Ok(Session { provider, endpoint, timeout, client, aws_token: None })
    }

    pub(crate) fn provider(&self) -> Provider {
        self.provider
    }

    /// The HTTP client, for the cloud's other services (its secret store).
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.trim_end_matches('/'))
    }

    fn fail(&self, e: reqwest::Error) -> MetadataError {
        if e.is_timeout() || e.is_connect() {
            MetadataError::Timeout {
                service: self.provider.name(),
                endpoint: self.endpoint.to_string(),
                timeout: self.timeout,
            }
        } else {
            self.error(e.to_string())
        }
    }

    fn error(&self, message: String) -> MetadataError {
        MetadataError::Service { service: self.provider.name(), endpoint: self.endpoint.to_string(), message }
    }

    /// A GET of `path` with the provider's headers: the body, `None` on a 404, an error on any
    /// other failure. `what` names the request in errors.
    pub(crate) async fn get(&mut self, path: &str, what: &str) -> Result<Option<String>, MetadataError> {
        let request = self.client.get(self.url(path));
        let request = match self.provider {
            Provider::Aws => request.header("X-aws-ec2-metadata-token", self.aws_token().await?),
            Provider::Gcp => request.header("Metadata-Flavor", "Google"),
            Provider::Azure => request.header("Metadata", "true"),
        };
        let resp = request.send().await.map_err(|e| self.fail(e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.fail(e))?;
        match status {
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(body)),
            s => Err(self.error(format!("{what} answered {s}{}", error_detail(&body)))),
        }
    }

    /// Like `get`, where a 404 is an error too: `missing` says what its absence means.
    pub(crate) async fn get_required(
        &mut self,
        path: &str,
        what: &str,
        missing: &str,
    ) -> Result<String, MetadataError> {
        self.get(path, what).await?.ok_or_else(|| self.error(format!("{what} answered 404 Not Found: {missing}")))
    }

    /// IMDSv2's session token.
    async fn aws_token(&mut self) -> Result<String, MetadataError> {
        if let Some(token) = &self.aws_token {
            return Ok(token.clone());
        }
        let resp = self
            .client
            .put(self.url("/latest/api/token"))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
            .send()
            .await
            .map_err(|e| self.fail(e))?;
        if !resp.status().is_success() {
            return Err(self.error(format!("the token request answered {}", resp.status())));
        }
        let token = resp.text().await.map_err(|e| self.fail(e))?.trim().to_string();
        self.aws_token = Some(token.clone());
        Ok(token)
    }
}

/// What an error body adds to a status line: its first 300 characters, if any.
pub(crate) fn error_detail(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() { String::new() } else { format!(": {}", body.chars().take(300).collect::<String>()) }
}

/// Fetches the user data from `provider`'s metadata service at `endpoint`. `None` when the
/// instance has none.
pub async fn fetch_user_data(
    provider: Provider,
    endpoint: &str,
    timeout: Duration,
) -> Result<Option<String>, MetadataError> {
    let mut session = Session::new(provider, endpoint, timeout)?;
    match provider {
        Provider::Aws => session.get("/latest/user-data", "the user-data request").await,
        Provider::Gcp => {
            // A dedicated `pagoda-config` attribute first, then the generic `user-data` one.
            for attribute in ["pagoda-config", "user-data"] {
                let path = format!("/computeMetadata/v1/instance/attributes/{attribute}");
                if let Some(text) = session.get(&path, &format!("the {attribute} request")).await? {
                    return Ok(Some(text));
                }
            }
            Ok(None)
        }
        Provider::Azure => {
            let path = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text";
            let Some(text) = session.get(path, "the userData request").await? else {
                return Ok(None);
            };
            if text.trim().is_empty() {
                return Ok(None);
            }
            // Azure hands user data back base64-encoded.
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| MetadataError::Invalid(format!("Azure userData is not base64: {e}")))?;
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| MetadataError::Invalid("Azure userData is not UTF-8 text".into()))
        }
    }
}

/// Reads the API key secret `secret` names with this instance's identity, asking `provider`'s
/// metadata service at `endpoint` for it; `store_endpoint` replaces the secret store's own URL.
pub async fn fetch_api_key(
    provider: Provider,
    endpoint: &str,
    timeout: Duration,
    secret: &secrets::SecretRef,
    store_endpoint: Option<&str>,
    azure_client_id: Option<&str>,
) -> Result<String, MetadataError> {
    let mut session = Session::new(provider, endpoint, timeout)?;
    secrets::fetch_secret(&mut session, secret, store_endpoint, azure_client_id).await
}

/// Reads Pagoda's configuration from user data; `None` when the user data is for something else
/// (a `#cloud-config`, a script) or empty.
pub fn parse_user_data(text: &str) -> Result<Option<LaunchConfig>, MetadataError> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with("#cloud-config") || trimmed.starts_with("#!") {
        return Ok(None);
    }
    let config = if trimmed.starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| MetadataError::Invalid(format!("not valid JSON: {e}")))?;
        let section = match value.get("pagoda") {
            Some(section) => section.clone(),
            None => value,
        };
        serde_json::from_value::<LaunchConfig>(section).map_err(|e| MetadataError::Invalid(e.to_string()))?
    } else {
        parse_env_lines(trimmed)?
    };
    validate(&config)?;
    Ok(Some(config))
}

/// `PAGODA_MODEL=...` style lines (comments and blank lines allowed): user data, and the launch
/// environment file `render_env_file` writes (`pagoda info` reads it back).
pub fn parse_env_lines(text: &str) -> Result<LaunchConfig, MetadataError> {
    let mut config = LaunchConfig::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| MetadataError::Invalid(format!("line {}: expected KEY=value or JSON", n + 1)))?;
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "PAGODA_MODEL" => config.model = Some(value),
            "PAGODA_SERVED_MODEL_NAME" => config.served_model_name = Some(value),
            "PAGODA_API_KEY_FILE" => config.api_key_file = Some(value),
            "PAGODA_API_KEY_SECRET" => config.api_key_secret = Some(value),
            "PAGODA_EXTRA_ARGS" => config.extra_args = value.split_whitespace().map(str::to_string).collect(),
            other => {
                config.env.insert(other.to_string(), value);
            }
        }
    }
    Ok(config)
}

/// Variables `render_env_file` writes from the configuration's own fields: `env` may not set them
/// too (the later line would silently win).
const RESERVED_ENV: [(&str, &str); 5] = [
    ("PAGODA_MODEL", "model"),
    ("PAGODA_SERVED_MODEL_NAME", "served_model_name"),
    ("PAGODA_API_KEY_FILE", "api_key_file"),
    ("PAGODA_API_KEY_SECRET", "api_key_secret"),
    ("PAGODA_EXTRA_ARGS", "extra_args"),
];

fn validate(config: &LaunchConfig) -> Result<(), MetadataError> {
    let bad = |m: String| Err(MetadataError::Invalid(m));
    let model_ok = |m: &str| m.contains("://") || m.starts_with('/') || crate::storage::hub::HubModel::looks_like_id(m);
    if let Some(model) = config.model.as_ref().filter(|m| !model_ok(m)) {
        return bad(format!(
            "model '{model}' must be an absolute path, a Hugging Face Hub id (org/name), or an s3://, gs://, az://, \
             https:// or hf:// URI"
        ));
    }
    if let Some(file) = config.api_key_file.as_ref().filter(|f| !f.starts_with('/')) {
        return bad(format!("api_key_file '{file}' must be an absolute path"));
    }
    if let Some(secret) = &config.api_key_secret {
        secrets::SecretRef::parse(secret).map_err(MetadataError::Invalid)?;
        if config.api_key_file.is_some() {
            return bad("api_key_file and api_key_secret are both set; name the key one way".into());
        }
    }
    if let Some(arg) = config.extra_args.iter().find(|a| a.is_empty() || a.chars().any(char::is_whitespace)) {
        return bad(format!("extra_args entry {arg:?} must be one word (no spaces)"));
    }
    for key in config.env.keys() {
        if key == "PAGODA_API_KEY" {
            return bad(
                "env sets PAGODA_API_KEY, but user data is readable by anyone on the instance: name a secret with \
                 api_key_secret (or a file with api_key_file) instead"
                    .into(),
            );
        }
        if let Some(field) = RESERVED_ENV.iter().find(|(name, _)| name == key).map(|(_, field)| field) {
            return bad(format!("env sets {key}, which the launch configuration sets itself: use {field}"));
        }
        let valid = key.chars().next().is_some_and(|c| c.is_ascii_uppercase() || c == '_')
            && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return bad(format!("env key '{key}' must be an upper-case variable name"));
        }
    }
    let all_values =
        config.model.iter().chain(&config.served_model_name).chain(&config.api_key_file).chain(&config.api_key_secret);
    let all_values = all_values.chain(config.env.values());
    if let Some(v) = all_values.into_iter().find(|v| v.contains('\n') || v.contains('\0')) {
        return bad(format!("value {v:?} contains a line break"));
    }
    Ok(())
}

/// The environment file the service reads (systemd `EnvironmentFile=` syntax).
pub fn render_env_file(config: Option<&LaunchConfig>, source: &str) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = format!("# Written by `pagoda metadata` from {source}.\n");
    let Some(c) = config else {
        out.push_str("# No Pagoda configuration in the user data.\n");
        return out;
    };
    for (key, value) in [
        ("PAGODA_MODEL", &c.model),
        ("PAGODA_SERVED_MODEL_NAME", &c.served_model_name),
        ("PAGODA_API_KEY_FILE", &c.api_key_file),
        ("PAGODA_API_KEY_SECRET", &c.api_key_secret),
    ] {
        if let Some(v) = value {
            out.push_str(&format!("{key}={}\n", quote(v)));
        }
    }
    if !c.extra_args.is_empty() {
        out.push_str(&format!("PAGODA_EXTRA_ARGS={}\n", quote(&c.extra_args.join(" "))));
    }
    for (key, value) in &c.env {
        out.push_str(&format!("{key}={}\n", quote(value)));
    }
    out
}

/// Writes `contents` to `path` through a temporary file and a rename, readable by its owner only.
pub fn write_atomically(path: &Path, contents: &str) -> Result<(), MetadataError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| MetadataError::Io { path: path.display().to_string(), source: e };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_env_lines_give_the_same_configuration() {
        let json = r#"{"pagoda": {"model": "s3://b/m", "served_model_name": "m", "extra_args": ["--max-model-len", "8192"], "env": {"AWS_REGION": "eu-west-1"}}}"#;
        let lines = "# comment\nPAGODA_MODEL=s3://b/m\nPAGODA_SERVED_MODEL_NAME=\"m\"\nPAGODA_EXTRA_ARGS=--max-model-len 8192\nAWS_REGION=eu-west-1\n";
        assert_eq!(parse_user_data(json).unwrap(), parse_user_data(lines).unwrap());
        let rendered = render_env_file(parse_user_data(json).unwrap().as_ref(), "test");
        assert!(rendered.contains("PAGODA_MODEL=\"s3://b/m\"\n"));
        assert!(rendered.contains("PAGODA_EXTRA_ARGS=\"--max-model-len 8192\"\n"));
        assert!(rendered.contains("AWS_REGION=\"eu-west-1\"\n"));
    }

    #[test]
    fn other_user_data_is_left_alone_and_bad_values_are_refused() {
        assert_eq!(parse_user_data("#cloud-config\npackages: [htop]").unwrap(), None);
        assert_eq!(parse_user_data("  ").unwrap(), None);
        let err = |t: &str| parse_user_data(t).unwrap_err().to_string();
        assert!(err(r#"{"modle": "s3://b/m"}"#).contains("unknown field `modle`"));
        assert!(err("{not json").starts_with("the user data is not valid Pagoda configuration: not valid JSON"));
        assert!(
            err(r#"{"model": "models/relative/path"}"#).contains("must be an absolute path, a Hugging Face Hub id")
        );
        assert!(err(r#"{"model": "./model"}"#).contains("must be an absolute path"));
        // A Hub id (vLLM's usual way of naming a model) and an hf:// URI are launch configurations.
        for model in ["meta-llama/Llama-3.1-8B-Instruct", "hf://Qwen/Qwen2.5-0.5B-Instruct@main"] {
            let config = parse_user_data(&format!("PAGODA_MODEL={model}")).unwrap().unwrap();
            assert_eq!(config.model.as_deref(), Some(model));
        }
        assert!(err(r#"{"extra_args": ["--a b"]}"#).contains("must be one word"));
        assert!(err(r#"{"env": {"lower": "x"}}"#).contains("upper-case variable name"));
        // The key fields cannot be replaced through env, and a key itself never travels in user data.
        assert!(
            err(r#"{"api_key_secret": "ssm:/k", "env": {"PAGODA_API_KEY_FILE": "/tmp/k"}}"#)
                .contains("env sets PAGODA_API_KEY_FILE, which the launch configuration sets itself: use api_key_file")
        );
        assert!(err("PAGODA_API_KEY=k3y").contains("name a secret with api_key_secret"));
        assert!(err(r#"{"env": {"PAGODA_MODEL": "/m"}}"#).contains("use model"));
        assert!(err("just some words").contains("line 1: expected KEY=value or JSON"));
    }
}
