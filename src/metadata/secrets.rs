//! The API key from the cloud's own secret store, read at boot with the instance's identity: AWS
//! Secrets Manager or SSM Parameter Store (SigV4 with the instance role's credentials from IMDS),
//! GCP Secret Manager (the service account's token from the metadata server), Azure Key Vault (the
//! managed identity's token from IMDS). `pagoda metadata` writes what it reads to the key file the
//! server is given; the key itself never appears in the launch environment or a log.

use base64::Engine as _;
use object_store::aws::{AwsAuthorizer, AwsCredential};

use super::{MetadataError, Provider, Session, error_detail};

/// A secret named in the launch configuration (`api_key_secret`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    /// `arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME`, or `secretsmanager:NAME` in the
    /// instance's own region.
    AwsSecretsManager { region: Option<String>, id: String },
    /// `arn:aws:ssm:REGION:ACCOUNT:parameter/NAME`, or `ssm:NAME` (for example `ssm:/pagoda/api-key`)
    /// in the instance's own region; SecureString parameters are decrypted.
    AwsParameter { region: Option<String>, name: String },
    /// `projects/PROJECT/secrets/NAME[/versions/VERSION]` (the latest version by default).
    GcpSecret { resource: String },
    /// `https://VAULT.vault.azure.net/secrets/NAME[/VERSION]` (any Azure cloud's Key Vault domain).
    AzureKeyVault { url: url::Url },
}

/// Characters an identifier may hold; anything else (spaces, quotes, control characters) is refused.
fn plain(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "/_+=.@-:".contains(c))
}

impl SecretRef {
    pub fn parse(text: &str) -> Result<SecretRef, String> {
        let bad = |why: &str| {
            Err(format!(
                "api_key_secret '{text}' {why}; expected an AWS Secrets Manager or SSM parameter ARN, \
                 secretsmanager:NAME, ssm:NAME, projects/PROJECT/secrets/NAME[/versions/VERSION] (GCP), or \
                 https://VAULT.vault.azure.net/secrets/NAME[/VERSION]"
            ))
        };
        if let Some(rest) = text.strip_prefix("arn:") {
            // arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return bad("is not a complete ARN");
            };
            let region_ok =
                !region.is_empty() && region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !partition.starts_with("aws") || !region_ok || account.is_empty() || !plain(resource) {
                return bad("is not a valid ARN");
            }
            let region = Some(region.to_string());
            return match (service, resource) {
                ("secretsmanager", r) if r.starts_with("secret:") && r.len() > 7 => {
                    Ok(SecretRef::AwsSecretsManager { region, id: text.to_string() })
                }
                ("ssm", r) if r.starts_with("parameter/") && r.len() > 10 => {
                    Ok(SecretRef::AwsParameter { region, name: text.to_string() })
                }
                _ => bad("names neither a Secrets Manager secret nor an SSM parameter"),
            };
        }
        if let Some(id) = text.strip_prefix("secretsmanager:") {
            return if plain(id) {
                Ok(SecretRef::AwsSecretsManager { region: None, id: id.into() })
            } else {
                bad("has no valid name")
            };
        }
        if let Some(name) = text.strip_prefix("ssm:") {
            return if plain(name) {
                Ok(SecretRef::AwsParameter { region: None, name: name.into() })
            } else {
                bad("has no valid name")
            };
        }
        if text.starts_with("projects/") {
            let segment_ok =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            let parts: Vec<&str> = text.split('/').collect();
            return match parts[..] {
                ["projects", project, "secrets", name] if segment_ok(project) && segment_ok(name) => {
                    Ok(SecretRef::GcpSecret { resource: format!("{text}/versions/latest") })
                }
                ["projects", project, "secrets", name, "versions", version]
                    if segment_ok(project) && segment_ok(name) && segment_ok(version) =>
                {
                    Ok(SecretRef::GcpSecret { resource: text.to_string() })
                }
                _ => bad("is not a Secret Manager name"),
            };
        }
        if text.starts_with("https://") {
            let Ok(url) = url::Url::parse(text) else { return bad("is not a valid URL") };
            let host = url.host_str().unwrap_or("");
            let in_vault =
                host.split_once('.').is_some_and(|(vault, domain)| !vault.is_empty() && domain.starts_with("vault."));
            let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
            let path_ok = matches!(segments[..], ["secrets", name] | ["secrets", name, _] if !name.is_empty())
                && segments.iter().all(|s| plain(s));
            if !in_vault || !path_ok || url.query().is_some() || url.port().is_some() {
                return bad("is not a Key Vault secret URL");
            }
            return Ok(SecretRef::AzureKeyVault { url });
        }
        bad("is not a secret this image can read")
    }

    /// The cloud whose identity can read it.
    pub fn provider(&self) -> Provider {
        match self {
            SecretRef::AwsSecretsManager { .. } | SecretRef::AwsParameter { .. } => Provider::Aws,
            SecretRef::GcpSecret { .. } => Provider::Gcp,
            SecretRef::AzureKeyVault { .. } => Provider::Azure,
        }
    }

    /// The store, in words.
    pub fn store(&self) -> &'static str {
        match self {
            SecretRef::AwsSecretsManager { .. } => "AWS Secrets Manager",
            SecretRef::AwsParameter { .. } => "AWS SSM Parameter Store",
            SecretRef::GcpSecret { .. } => "GCP Secret Manager",
            SecretRef::AzureKeyVault { .. } => "Azure Key Vault",
        }
    }

    fn describe(&self) -> String {
        match self {
            SecretRef::AwsSecretsManager { id, .. } => id.clone(),
            SecretRef::AwsParameter { name, .. } => name.clone(),
            SecretRef::GcpSecret { resource } => resource.clone(),
            SecretRef::AzureKeyVault { url } => url.to_string(),
        }
    }
}

/// Reads `secret` with the identity the metadata service of `session` gives this instance.
/// `store_endpoint` replaces the store's own base URL (tests; private endpoints). The value is
/// checked to hold at least one key, one per line.
/// `azure_client_id` picks one of several user-assigned managed identities (`AZURE_CLIENT_ID` in
/// the launch configuration's `env`, as Azure's SDKs read it).
pub(crate) async fn fetch_secret(
    session: &mut Session<'_>,
    secret: &SecretRef,
    store_endpoint: Option<&str>,
    azure_client_id: Option<&str>,
) -> Result<String, MetadataError> {
    if secret.provider() != session.provider() {
        return Err(MetadataError::Invalid(format!(
            "api_key_secret names a secret in {} but this instance is on {}; only the instance's own cloud \
             identity can read it",
            secret.store(),
            session.provider().name()
        )));
    }
    let failed = |message: String| MetadataError::Secret { store: secret.store(), secret: secret.describe(), message };
    let value = match secret {
        SecretRef::AwsSecretsManager { region, id } => {
            let body = serde_json::json!({"SecretId": id});
            let answer = aws_call(
                session,
                region.as_deref(),
                "secretsmanager",
                "secretsmanager.GetSecretValue",
                body,
                store_endpoint,
            )
            .await?
            .map_err(failed)?;
            match (answer["SecretString"].as_str(), answer["SecretBinary"].as_str()) {
                (Some(text), _) => text.to_string(),
                (None, Some(binary)) => decode_text(binary).map_err(failed)?,
                _ => return Err(failed("the answer holds neither SecretString nor SecretBinary".into())),
            }
        }
        SecretRef::AwsParameter { region, name } => {
            let body = serde_json::json!({"Name": name, "WithDecryption": true});
            let answer = aws_call(session, region.as_deref(), "ssm", "AmazonSSM.GetParameter", body, store_endpoint)
                .await?
                .map_err(failed)?;
            answer["Parameter"]["Value"]
                .as_str()
                .ok_or_else(|| failed("the answer holds no Parameter.Value".into()))?
                .to_string()
        }
        SecretRef::GcpSecret { resource } => {
            let token = bearer_token(
                session,
                "/computeMetadata/v1/instance/service-accounts/default/token",
                "no service account is attached to this instance; attach one with roles/secretmanager.secretAccessor",
            )
            .await?;
            let base = store_endpoint.unwrap_or("https://secretmanager.googleapis.com");
            let url = format!("{}/v1/{resource}:access", base.trim_end_matches('/'));
            let answer = store_get(session, &url, &token).await.map_err(failed)?;
            let data =
                answer["payload"]["data"].as_str().ok_or_else(|| failed("the answer holds no payload.data".into()))?;
            decode_text(data).map_err(failed)?
        }
        SecretRef::AzureKeyVault { url } => {
            // The token's audience is the vault's cloud: https://vault.azure.net for the public one.
            let domain = url.host_str().and_then(|h| h.split_once('.')).map(|(_, d)| d).unwrap_or_default();
            let resource: String =
                url::form_urlencoded::byte_serialize(format!("https://{domain}").as_bytes()).collect();
            let client_id: String = azure_client_id
                .map(|id| {
                    format!("&client_id={}", url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>())
                })
                .unwrap_or_default();
            let token = bearer_token(
                session,
                &format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}{client_id}"),
                "no managed identity is assigned to this VM; assign one with the Key Vault Secrets User role",
            )
            .await?;
            let base = store_endpoint
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| format!("https://{}", url.host_str().unwrap_or_default()));
            let answer =
                store_get(session, &format!("{base}{}?api-version=7.4", url.path()), &token).await.map_err(failed)?;
            answer["value"].as_str().ok_or_else(|| failed("the answer holds no value".into()))?.to_string()
        }
    };
    if value.contains('\0') || value.lines().all(|l| l.trim().is_empty()) {
        return Err(failed("its value holds no API key (expected one key per line)".into()));
    }
    Ok(value)
}

/// Base64 (GCP's payload, Secrets Manager's SecretBinary) holding UTF-8 text.
fn decode_text(data: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("the value is not valid base64: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "the value is not UTF-8 text".to_string())
}

/// An OAuth access token from the metadata service (GCE's service account, Azure's managed
/// identity): both answer `{"access_token": ...}`.
async fn bearer_token(session: &mut Session<'_>, path: &str, missing: &str) -> Result<String, MetadataError> {
    let answer = session.get_required(path, "the identity token request", missing).await.map_err(|e| match e {
        // Azure answers 400 "Identity not found" where GCE answers 404.
        MetadataError::Service { message, .. } if message.contains("Identity not found") => {
            MetadataError::Invalid(format!("the identity token request failed: {missing}"))
        }
        e => e,
    })?;
    let json: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| MetadataError::Invalid(format!("the identity token answer is not JSON: {e}")))?;
    json["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| MetadataError::Invalid("the identity token answer holds no access_token".into()))
}

/// A GET with a bearer token to a secret store, its JSON answer; an error answer becomes its message.
async fn store_get(session: &Session<'_>, url: &str, token: &str) -> Result<serde_json::Value, String> {
    let resp = session.client().get(url).bearer_auth(token).send().await.map_err(|e| e.to_string())?;
    json_answer(resp).await
}

/// A store's JSON answer, or the error it gave: AWS's `__type`/`message`, GCP's and Azure's
/// `error.message`, or the status and the body's start.
async fn json_answer(resp: reqwest::Response) -> Result<serde_json::Value, String> {
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    if status.is_success() {
        return json.ok_or_else(|| format!("the answer is not JSON{}", error_detail(&body)));
    }
    let field = |v: &serde_json::Value, names: &[&str]| names.iter().find_map(|n| v[*n].as_str().map(str::to_string));
    let reason = json.as_ref().and_then(|j| {
        let kind = field(j, &["__type"]).map(|t| t.rsplit('#').next().unwrap_or(&t).to_string());
        let message = field(j, &["message", "Message"]).or_else(|| field(&j["error"], &["message"]));
        match (kind, message) {
            (Some(k), Some(m)) => Some(format!("{k}: {m}")),
            (k, m) => k.or(m),
        }
    });
    Err(match reason {
        Some(reason) => format!("{status}: {reason}"),
        None => format!("{status}{}", error_detail(&body)),
    })
}

/// A signed JSON call to an AWS service with the instance role's credentials. The outer error is
/// the metadata service's; the inner one the service's own answer.
async fn aws_call(
    session: &mut Session<'_>,
    region: Option<&str>,
    service: &str,
    target: &str,
    body: serde_json::Value,
    store_endpoint: Option<&str>,
) -> Result<Result<serde_json::Value, String>, MetadataError> {
    let (credential, role) = aws_role_credentials(session).await?;
    let region = match region {
        Some(r) => r.to_string(),
        None => session
            .get_required("/latest/meta-data/placement/region", "the region request", "IMDS gives no region")
            .await?
            .trim()
            .to_string(),
    };
    let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    let endpoint = match store_endpoint {
        Some(e) => e.trim_end_matches('/').to_string(),
        None => format!("https://{service}.{region}.{domain}"),
    };
    let payload = serde_json::to_vec(&body).expect("a JSON value serializes");
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("{endpoint}/"))
        .header(http::header::CONTENT_TYPE, "application/x-amz-json-1.1")
        .header("x-amz-target", target)
        .body(object_store::client::HttpRequestBody::from(payload.clone()))
        .map_err(|e| MetadataError::Invalid(format!("the {service} endpoint {endpoint} is not a valid URL: {e}")))?;
    AwsAuthorizer::new(&credential, service, &region)
        .try_authorize(&mut request, None)
        .map_err(|e| MetadataError::Invalid(format!("cannot sign the {service} request: {e}")))?;
    let sent =
        session.client().post(format!("{endpoint}/")).headers(request.headers().clone()).body(payload).send().await;
    Ok(match sent {
        Ok(resp) => json_answer(resp).await.map_err(|e| {
            if e.contains("AccessDenied") {
                format!("{e} (the instance role {role} needs {service} read access to it)")
            } else {
                e
            }
        }),
        Err(e) => Err(e.to_string()),
    })
}

/// The instance role's temporary credentials from IMDS, and the role's name.
async fn aws_role_credentials(session: &mut Session<'_>) -> Result<(AwsCredential, String), MetadataError> {
    const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
    let no_role = "no IAM role is attached to this instance; attach an instance profile whose role may read the secret";
    let roles = session.get_required(ROLES, "the IAM role request", no_role).await?;
    let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string) else {
        return Err(MetadataError::Invalid(format!("the IAM role request answered no role: {no_role}")));
    };
    let answer = session.get_required(&format!("{ROLES}{role}"), "the role credentials request", no_role).await?;
    let json: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| MetadataError::Invalid(format!("the role credentials answer is not JSON: {e}")))?;
    let field = |name: &str| json[name].as_str().filter(|v| !v.is_empty()).map(str::to_string);
    if json["Code"].as_str().is_some_and(|c| c != "Success") {
        return Err(MetadataError::Invalid(format!(
            "IMDS gave no credentials for the role {role}: {}",
            json["Message"].as_str().unwrap_or(json["Code"].as_str().unwrap_or_default())
        )));
    }
    match (field("AccessKeyId"), field("SecretAccessKey")) {
        (Some(key_id), Some(secret_key)) => Ok((AwsCredential { key_id, secret_key, token: field("Token") }, role)),
        _ => Err(MetadataError::Invalid(format!(
            "the credentials of the role {role} lack AccessKeyId or SecretAccessKey"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_s_names_parse_and_bad_ones_say_what_is_expected() {
        let ok = |t: &str| SecretRef::parse(t).unwrap();
        assert_eq!(
            ok("arn:aws:secretsmanager:eu-west-1:123456789012:secret:pagoda/api-key-AbCdEf"),
            SecretRef::AwsSecretsManager {
                region: Some("eu-west-1".into()),
                id: "arn:aws:secretsmanager:eu-west-1:123456789012:secret:pagoda/api-key-AbCdEf".into()
            }
        );
        assert_eq!(
            ok("secretsmanager:pagoda/api-key"),
            SecretRef::AwsSecretsManager { region: None, id: "pagoda/api-key".into() }
        );
        assert_eq!(ok("arn:aws-cn:ssm:cn-north-1:123456789012:parameter/pagoda/key").provider(), Provider::Aws);
        assert_eq!(ok("ssm:/pagoda/key"), SecretRef::AwsParameter { region: None, name: "/pagoda/key".into() });
        assert_eq!(
            ok("projects/my-proj/secrets/pagoda-key"),
            SecretRef::GcpSecret { resource: "projects/my-proj/secrets/pagoda-key/versions/latest".into() }
        );
        assert_eq!(
            ok("projects/123/secrets/k/versions/7"),
            SecretRef::GcpSecret { resource: "projects/123/secrets/k/versions/7".into() }
        );
        assert_eq!(ok("https://my-vault.vault.azure.net/secrets/pagoda-key").provider(), Provider::Azure);
        assert_eq!(ok("https://v.vault.usgovcloudapi.net/secrets/k/0123abcd").store(), "Azure Key Vault");
        for bad in [
            "arn:aws:secretsmanager:eu-west-1:123",
            "arn:aws:s3:eu-west-1:123:bucket/x",
            "arn:aws:secretsmanager:EU WEST:123:secret:x",
            "secretsmanager:",
            "ssm:a b",
            "projects/p/secrets/",
            "projects/p/secrets/k/versions",
            "https://example.com/secrets/k",
            "https://v.vault.azure.net/keys/k",
            "https://v.vault.azure.net/secrets/k?x=1",
            "vault:k",
            "",
        ] {
            let err = SecretRef::parse(bad).unwrap_err();
            assert!(
                err.contains(&format!("api_key_secret '{bad}'")) && err.contains("expected an AWS"),
                "{bad}: {err}"
            );
        }
    }
}
