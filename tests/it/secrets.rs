//! `pagoda metadata` reading the API key from the cloud's secret store with the instance's identity,
//! against fake metadata services and fake stores: AWS Secrets Manager and SSM Parameter Store (the
//! SigV4 signature is checked here as AWS checks it, with the credentials the fake IMDS handed
//! out), GCP Secret Manager and Azure Key Vault (bearer tokens from the metadata service). The key
//! reaches a real server; a secret that cannot be read stops the launch and changes no file.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{fixture, scratch_dir};
use crate::http::request;
use crate::metadata::{Seen, fake_server, metadata};
use crate::server::Server;

const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
const ACCESS_KEY: &str = "ASIAPAGODAFAKE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPAGODAKEY";
const SESSION_TOKEN: &str = "FwoGZXIvYXdzEPAGODA//session";
const SECRET_ARN: &str = "arn:aws:secretsmanager:us-east-2:123456789012:secret:pagoda/api-key-AbCdEf";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104), the test's own, to check signatures independently of the product's.
fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(data).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().to_vec()
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

#[test]
fn the_test_s_signing_key_derivation_matches_aws_s_published_example() {
    // AWS's SigV4 documentation derives this key for IAM in us-east-1 on 2012-02-15.
    let key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam");
    assert_eq!(hex(&key), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
}

/// Checks `r`'s SigV4 signature as AWS does: the canonical request rebuilt from what arrived, signed
/// with the secret key the fake IMDS handed out, for `region` and `service`.
fn sigv4_check(r: &Seen, region: &str, service: &str) -> Result<(), String> {
    let auth = r.header("authorization").ok_or("no Authorization header")?;
    let fields = auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or("not AWS4-HMAC-SHA256")?;
    let field = |name: &str| {
        fields.split(", ").find_map(|f| f.strip_prefix(name)).ok_or(format!("no {name} in the Authorization header"))
    };
    let (credential, signed, signature) = (field("Credential=")?, field("SignedHeaders=")?, field("Signature=")?);
    let amz_date = r.header("x-amz-date").ok_or("no x-amz-date")?;
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    if credential != format!("{ACCESS_KEY}/{scope}") {
        return Err(format!("credential {credential} is not {ACCESS_KEY}/{scope}"));
    }
    let names: Vec<&str> = signed.split(';').collect();
    for needed in ["host", "x-amz-date", "x-amz-security-token", "x-amz-target", "content-type"] {
        if !names.contains(&needed) {
            return Err(format!("{needed} is not signed ({signed})"));
        }
    }
    let mut canonical_headers = String::new();
    for name in &names {
        canonical_headers.push_str(&format!("{name}:{}\n", r.header(name).ok_or(format!("no {name}"))?.trim()));
    }
    let canonical = format!(
        "{}\n{}\n\n{canonical_headers}\n{signed}\n{}",
        r.method,
        r.path,
        hex(&Sha256::digest(r.body.as_bytes()))
    );
    let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
    let expected = hex(&hmac(&signing_key(SECRET_KEY, date, region, service), to_sign.as_bytes()));
    if signature != expected {
        return Err(format!("the signature {signature} does not match {expected}"));
    }
    if r.header("x-amz-security-token") != Some(SESSION_TOKEN) {
        return Err("the role's session token was not sent".into());
    }
    Ok(())
}

/// An EC2 instance's IMDSv2 (with an instance role, in us-east-2) giving `user_data`; requests to
/// `/` are the secret store's, answered by `store`.
fn aws_instance(r: &Seen, user_data: &str, store: fn(&Seen) -> (u16, String)) -> (u16, String) {
    if r.method == "PUT" && r.path == "/latest/api/token" {
        return (200, "imds-token".into());
    }
    if r.method == "POST" && r.path == "/" {
        return store(r);
    }
    if r.header("X-aws-ec2-metadata-token") != Some("imds-token") {
        return (401, String::new());
    }
    match r.path.as_str() {
        "/latest/user-data" => (200, user_data.into()),
        ROLES => (200, "pagoda-role".into()),
        "/latest/meta-data/iam/security-credentials/pagoda-role" => (
            200,
            json!({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": ACCESS_KEY, "SecretAccessKey": SECRET_KEY,
                   "Token": SESSION_TOKEN, "Expiration": "2026-12-01T06:00:00Z"})
            .to_string(),
        ),
        "/latest/meta-data/placement/region" => (200, "us-east-2".into()),
        _ => (404, String::new()),
    }
}

/// An AWS JSON-protocol error answer.
fn aws_error(status: u16, kind: &str, message: &str) -> (u16, String) {
    (status, json!({"__type": kind, "message": message}).to_string())
}

/// The store's side of a signed JSON call: the signature, the target and the content type.
fn aws_request(r: &Seen, service: &str, target: &str) -> Result<Value, (u16, String)> {
    sigv4_check(r, "us-east-2", service).map_err(|e| aws_error(403, "InvalidSignatureException", &e))?;
    if r.header("x-amz-target") != Some(target) || r.header("content-type") != Some("application/x-amz-json-1.1") {
        return Err(aws_error(400, "UnknownOperationException", "wrong target or content type"));
    }
    serde_json::from_str(&r.body).map_err(|_| aws_error(400, "SerializationException", "not JSON"))
}

fn secrets_manager(r: &Seen) -> (u16, String) {
    match aws_request(r, "secretsmanager", "secretsmanager.GetSecretValue") {
        Err(answer) => answer,
        Ok(body) if body["SecretId"] == SECRET_ARN => (
            200,
            json!({"ARN": SECRET_ARN, "Name": "pagoda/api-key", "SecretString": "key-one\nkey-two\n"}).to_string(),
        ),
        Ok(_) => aws_error(400, "ResourceNotFoundException", "Secrets Manager can't find the specified secret."),
    }
}

/// Runs `pagoda metadata` for `provider` against the fake at `port` (also the secret store),
/// writing the launch file and the key file in `dir`.
fn launch(provider: &str, port: u16, dir: &Path) -> Output {
    let key = dir.join("api-key");
    let endpoint = format!("http://127.0.0.1:{port}");
    metadata(
        provider,
        port,
        &dir.join("launch.env"),
        &["--api-key-output", key.to_str().unwrap(), "--secrets-endpoint", &endpoint],
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The key file holds `key`, readable by its owner only, and the launch file names it (and the
/// secret) without holding the key.
fn assert_key_written(dir: &Path, key: &str, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    let key_file = dir.join("api-key");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key);
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let launch = std::fs::read_to_string(dir.join("launch.env")).unwrap();
    assert!(launch.lines().any(|l| l == format!("PAGODA_API_KEY_FILE=\"{}\"", key_file.display())), "{launch}");
    assert!(launch.lines().any(|l| l == format!("PAGODA_API_KEY_SECRET=\"{secret}\"")), "{launch}");
    for line in key.lines() {
        assert!(!launch.contains(line), "the key leaked into the launch file:\n{launch}");
    }
}

#[test]
fn an_aws_secrets_manager_key_reaches_the_server() {
    let port = fake_server(Some(|r| {
        aws_instance(r, &format!(r#"{{"pagoda": {{"api_key_secret": "{SECRET_ARN}"}}}}"#), secrets_manager)
    }));
    let dir = scratch_dir("secrets-aws");
    let out = launch("aws", port, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_key_written(&dir, "key-one\nkey-two\n", SECRET_ARN);

    // The server the appliance starts with that launch file takes exactly those keys.
    let key_file = dir.join("api-key");
    let model = fixture("tiny-llama");
    let server = Server::spawn(
        &["--model", model.to_str().unwrap(), "--num-gpu-blocks-override", "64"],
        &[("PAGODA_API_KEY_FILE", key_file.to_str().unwrap())],
    );
    server.wait_ready();
    let models = |auth: &[(&str, &str)]| request(server.port, "GET", "/v1/models", auth, b"").status;
    assert_eq!(models(&[]), 401);
    assert_eq!(models(&[("Authorization", "Bearer key-two")]), 200);
    assert_eq!(models(&[("Authorization", "Bearer key-one")]), 200);
    assert_eq!(models(&[("Authorization", "Bearer key-three")]), 401);

    // `pagoda info` says where the key came from.
    let info = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["info", "--json", "--launch-env", dir.join("launch.env").to_str().unwrap()])
        .env_remove("PAGODA_API_KEY")
        .env_remove("PAGODA_API_KEY_FILE")
        .env("PAGODA_DMI_DIR", "/nonexistent")
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let source = info["api_key"]["source"].as_str().unwrap();
    assert!(source.starts_with(&format!("the secret {SECRET_ARN}, read into {}", key_file.display())), "{source}");
}

#[test]
fn an_ssm_parameter_is_read_in_the_instance_s_region_and_decrypted() {
    let port =
        fake_server(Some(|r| {
            aws_instance(r, "PAGODA_MODEL=s3://models/m\nPAGODA_API_KEY_SECRET=ssm:/pagoda/api-key\n", |r| {
                match aws_request(r, "ssm", "AmazonSSM.GetParameter") {
                    Err(answer) => answer,
                    Ok(body) if body == json!({"Name": "/pagoda/api-key", "WithDecryption": true}) => (
                        200,
                        json!({"Parameter": {"Name": "/pagoda/api-key", "Type": "SecureString", "Value": "ssm-key"}})
                            .to_string(),
                    ),
                    Ok(body) => aws_error(400, "ParameterNotFound", &format!("unexpected request {body}")),
                }
            })
        }));
    let dir = scratch_dir("secrets-ssm");
    let out = launch("aws", port, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_key_written(&dir, "ssm-key", "ssm:/pagoda/api-key");
    assert!(std::fs::read_to_string(dir.join("launch.env")).unwrap().contains("PAGODA_MODEL=\"s3://models/m\""));
}

#[test]
fn a_gcp_secret_is_read_with_the_service_account_s_token() {
    let port = fake_server(Some(|r| {
        let google = r.header("Metadata-Flavor") == Some("Google");
        let bearer = r.header("Authorization") == Some("Bearer ya29.pagoda-fake");
        match r.path.as_str() {
            "/computeMetadata/v1/instance/attributes/pagoda-config" if google => {
                (200, r#"{"api_key_secret": "projects/pagoda-prod/secrets/api-key"}"#.into())
            }
            "/computeMetadata/v1/instance/service-accounts/default/token" if google => (
                200,
                json!({"access_token": "ya29.pagoda-fake", "expires_in": 3599, "token_type": "Bearer"}).to_string(),
            ),
            "/v1/projects/pagoda-prod/secrets/api-key/versions/latest:access" if bearer => (
                200,
                json!({"name": "projects/123/secrets/api-key/versions/3", "payload": {"data": b64("gcp-key\n")}})
                    .to_string(),
            ),
            p if p.starts_with("/v1/") => (
                403,
                json!({"error": {"code": 403, "message": "Permission denied", "status": "PERMISSION_DENIED"}})
                    .to_string(),
            ),
            _ => (404, String::new()),
        }
    }));
    let dir = scratch_dir("secrets-gcp");
    let out = launch("gcp", port, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_key_written(&dir, "gcp-key\n", "projects/pagoda-prod/secrets/api-key");
}

#[test]
fn an_azure_key_vault_secret_is_read_with_the_managed_identity() {
    let port = fake_server(Some(|r| {
        let imds = r.header("Metadata") == Some("true");
        match r.path.as_str() {
            p if p.starts_with("/metadata/instance/compute/userData") && imds => {
                (200, b64(r#"{"pagoda": {"api_key_secret": "https://pagoda-kv.vault.azure.net/secrets/api-key"}}"#))
            }
            // The token's audience is the public cloud's Key Vault.
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net" if imds => {
                (200, json!({"access_token": "eyJ0eXAi.pagoda", "token_type": "Bearer"}).to_string())
            }
            "/secrets/api-key?api-version=7.4" if r.header("Authorization") == Some("Bearer eyJ0eXAi.pagoda") => (
                200,
                json!({"value": "azure-key", "id": "https://pagoda-kv.vault.azure.net/secrets/api-key/abc"})
                    .to_string(),
            ),
            _ => (400, json!({"error": {"code": "BadParameter", "message": "unexpected request"}}).to_string()),
        }
    }));
    let dir = scratch_dir("secrets-azure");
    let out = launch("azure", port, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_key_written(&dir, "azure-key", "https://pagoda-kv.vault.azure.net/secrets/api-key");
}

#[test]
fn a_user_assigned_identity_and_a_secret_version_are_named_on_azure() {
    let port = fake_server(Some(|r| {
        let imds = r.header("Metadata") == Some("true");
        let config = r#"{"api_key_secret": "https://pagoda-kv.vault.azure.net/secrets/api-key/0123abcd",
                         "env": {"AZURE_CLIENT_ID": "1111-2222"}}"#;
        match r.path.as_str() {
            p if p.starts_with("/metadata/instance/compute/userData") && imds => (200, b64(config)),
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=1111-2222"
                if imds =>
            {
                (200, json!({"access_token": "eyJ.user-assigned", "token_type": "Bearer"}).to_string())
            }
            // What IMDS answers a VM with several user-assigned identities when none is named.
            p if p.starts_with("/metadata/identity/oauth2/token") => (
                400,
                json!({"error": "invalid_request", "error_description": "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request"}).to_string(),
            ),
            "/secrets/api-key/0123abcd?api-version=7.4" if r.header("Authorization") == Some("Bearer eyJ.user-assigned") => {
                (200, json!({"value": "versioned-key"}).to_string())
            }
            _ => (404, json!({"error": {"code": "SecretNotFound", "message": "no such secret"}}).to_string()),
        }
    }));
    let dir = scratch_dir("secrets-azure-uami");
    let out = launch("azure", port, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_key_written(&dir, "versioned-key", "https://pagoda-kv.vault.azure.net/secrets/api-key/0123abcd");
}

/// Runs a launch that must fail: its error line, with the previous launch file untouched and no
/// key file written.
fn failed_launch(provider: &str, port: u16, name: &str) -> String {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("launch.env"), "PAGODA_MODEL=\"/models/previous\"\n").unwrap();
    let out = launch(provider, port, &dir);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(dir.join("launch.env")).unwrap(), "PAGODA_MODEL=\"/models/previous\"\n");
    assert!(!dir.join("api-key").exists());
    stderr(&out)
}

#[test]
fn a_secret_that_cannot_be_read_stops_the_launch_and_changes_no_file() {
    // The role may not read the secret.
    let denied = fake_server(Some(|r| {
        aws_instance(r, &format!(r#"{{"api_key_secret": "{SECRET_ARN}"}}"#), |_| {
            aws_error(
                400,
                "AccessDeniedException",
                "User: arn:aws:sts::123456789012:assumed-role/pagoda-role/i-0abc is not authorized to perform: \
                 secretsmanager:GetSecretValue",
            )
        })
    }));
    let err = failed_launch("aws", denied, "secrets-denied");
    assert!(
        err.starts_with(&format!("error: cannot read the API key secret {SECRET_ARN} from AWS Secrets Manager: 400 Bad Request: AccessDeniedException: User: ")),
        "{err}"
    );
    assert!(err.contains("(the instance role pagoda-role needs secretsmanager read access to it)"), "{err}");

    // No instance role at all.
    let no_role = fake_server(Some(|r| {
        if r.path == ROLES {
            return (404, String::new());
        }
        aws_instance(r, &format!(r#"{{"api_key_secret": "{SECRET_ARN}"}}"#), secrets_manager)
    }));
    let err = failed_launch("aws", no_role, "secrets-no-role");
    assert!(err.contains("no IAM role is attached to this instance"), "{err}");

    // A secret whose value is blank.
    let blank = fake_server(Some(|r| {
        aws_instance(r, r#"{"api_key_secret": "secretsmanager:pagoda/key"}"#, |_| {
            (200, json!({"Name": "pagoda/key", "SecretString": " \n\n"}).to_string())
        })
    }));
    let err = failed_launch("aws", blank, "secrets-blank");
    assert!(err.contains("pagoda/key from AWS Secrets Manager: its value holds no API key"), "{err}");

    // A secret in another cloud's store.
    let elsewhere =
        fake_server(Some(|r| aws_instance(r, r#"{"api_key_secret": "projects/p/secrets/k"}"#, secrets_manager)));
    let err = failed_launch("aws", elsewhere, "secrets-elsewhere");
    assert!(err.contains("names a secret in GCP Secret Manager but this instance is on AWS"), "{err}");

    // An Azure VM with no managed identity.
    let no_identity = fake_server(Some(|r| {
        if r.path.starts_with("/metadata/instance/compute/userData") {
            return (200, b64(r#"{"api_key_secret": "https://kv.vault.azure.net/secrets/k"}"#));
        }
        (400, json!({"error": "invalid_request", "error_description": "Identity not found"}).to_string())
    }));
    let err = failed_launch("azure", no_identity, "secrets-no-identity");
    assert!(err.contains("no managed identity is assigned to this VM"), "{err}");

    // A GCP service account without access (or without the cloud-platform scope).
    let forbidden = fake_server(Some(|r| {
        match r.path.as_str() {
        "/computeMetadata/v1/instance/attributes/pagoda-config" => {
            (200, r#"{"api_key_secret": "projects/p/secrets/k/versions/2"}"#.into())
        }
        "/computeMetadata/v1/instance/service-accounts/default/token" => {
            (200, json!({"access_token": "ya29.x", "token_type": "Bearer"}).to_string())
        }
        p if p.starts_with("/v1/") => (
            403,
            json!({"error": {"code": 403, "message": "Permission 'secretmanager.versions.access' denied", "status": "PERMISSION_DENIED"}})
                .to_string(),
        ),
        _ => (404, String::new()),
    }
    }));
    let err = failed_launch("gcp", forbidden, "secrets-gcp-forbidden");
    assert!(
        err.contains("projects/p/secrets/k/versions/2 from GCP Secret Manager: 403 Forbidden: Permission 'secretmanager.versions.access' denied"),
        "{err}"
    );

    // A secret name no store has the form of, and a key named twice: refused before any request.
    let malformed = fake_server(Some(|r| aws_instance(r, r#"{"api_key_secret": "vault:k"}"#, secrets_manager)));
    let err = failed_launch("aws", malformed, "secrets-malformed");
    assert!(err.contains("api_key_secret 'vault:k' is not a secret this image can read"), "{err}");
    let twice = fake_server(Some(|r| {
        aws_instance(r, r#"{"api_key_secret": "ssm:/k", "api_key_file": "/run/keys/k"}"#, secrets_manager)
    }));
    let err = failed_launch("aws", twice, "secrets-twice");
    assert!(err.contains("api_key_file and api_key_secret are both set"), "{err}");
}
