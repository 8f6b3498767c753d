//! Model URIs: `s3://`, `gs://`, `az://` (also `azure://` and `https://ACCOUNT.blob.core.windows.net/...`)
//! and `https://` base URLs, each turned into an `object_store` client built from the environment
//! the way that cloud's users expect (instance roles, IRSA, workload identity, managed identity).

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig};

use super::SyncError;
use super::manifest::ContentDigest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Gcs,
    Azure,
    Http,
    /// The Hugging Face Hub's file endpoint (`/{repo}/resolve/{commit}`).
    Hub,
}

/// Settings that are not in the URI.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// A custom endpoint (S3-compatible stores, emulators); also `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Allow plain `http://` endpoints and URLs.
    pub allow_http: bool,
}

/// One object under the model's prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path relative to the prefix, `/`-separated.
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified: String,
    /// What the content must hash to, where the source says.
    pub digest: Option<ContentDigest>,
    location: StorePath,
}

impl RemoteFile {
    /// A file fetched from `location` (relative to the source) and written at `name`.
    pub fn at_location(name: String, location: &str, size: u64, digest: Option<ContentDigest>) -> RemoteFile {
        RemoteFile {
            name,
            size,
            e_tag: None,
            last_modified: String::new(),
            digest,
            location: StorePath::from(location),
        }
    }
}

/// What a listing found under the prefix.
#[derive(Debug)]
pub struct Listing {
    pub files: Vec<RemoteFile>,
    /// Names (relative to the prefix) of keys the store client cannot make a path of, and so
    /// cannot fetch: an empty, `.` or `..` part, a control character. They are only an error for a
    /// sync that would keep them.
    pub unreadable: Vec<String>,
}

pub struct Source {
    pub uri: String,
    pub scheme: Scheme,
    store: Arc<dyn ObjectStore>,
    /// The same client as `store`, listing page by page (S3, GCS and Azure); `None` for HTTP.
    lister: Option<Arc<dyn PaginatedListStore>>,
    prefix: StorePath,
    /// Which credentials the client will try, for error messages.
    pub credentials: String,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The credential source each cloud's client will use, read from the same variables it reads.
fn credential_hint(scheme: Scheme) -> String {
    let hint = match scheme {
        Scheme::S3 if env_set("AWS_SKIP_SIGNATURE") => "none (AWS_SKIP_SIGNATURE: anonymous requests)",
        Scheme::S3 if env_set("AWS_ACCESS_KEY_ID") => "static keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
        Scheme::S3 if env_set("AWS_WEB_IDENTITY_TOKEN_FILE") => {
            "web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN: IRSA)"
        }
        Scheme::S3 if env_set("AWS_CONTAINER_CREDENTIALS_FULL_URI") => {
            "EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI)"
        }
        Scheme::S3 if env_set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") => "the ECS task role",
        Scheme::S3 => "the EC2 instance role from instance metadata (no AWS_ACCESS_KEY_ID, no web identity token)",
        Scheme::Gcs if env_set("GOOGLE_BEARER_TOKEN") => "a static bearer token (GOOGLE_BEARER_TOKEN)",
        Scheme::Gcs if env_set("GOOGLE_SERVICE_ACCOUNT") || env_set("GOOGLE_SERVICE_ACCOUNT_PATH") => {
            "the service-account file in GOOGLE_SERVICE_ACCOUNT"
        }
        Scheme::Gcs if env_set("GOOGLE_SERVICE_ACCOUNT_KEY") => "the service-account key in GOOGLE_SERVICE_ACCOUNT_KEY",
        Scheme::Gcs if env_set("GOOGLE_APPLICATION_CREDENTIALS") => {
            "the credentials file in GOOGLE_APPLICATION_CREDENTIALS"
        }
        Scheme::Gcs => "the GCE metadata server (workload identity; no credentials file set)",
        Scheme::Azure if env_set("AZURE_STORAGE_USE_EMULATOR") => {
            "the storage emulator's account (AZURE_STORAGE_USE_EMULATOR)"
        }
        Scheme::Azure if env_set("AZURE_STORAGE_ACCOUNT_KEY") || env_set("AZURE_STORAGE_ACCESS_KEY") => {
            "the account key in AZURE_STORAGE_ACCOUNT_KEY"
        }
        Scheme::Azure if env_set("AZURE_STORAGE_SAS_KEY") || env_set("AZURE_STORAGE_SAS_TOKEN") => {
            "a SAS token (AZURE_STORAGE_SAS_KEY)"
        }
        Scheme::Azure if env_set("AZURE_FEDERATED_TOKEN_FILE") => "workload identity (AZURE_FEDERATED_TOKEN_FILE)",
        Scheme::Azure if env_set("AZURE_CLIENT_SECRET") => "a service principal secret (AZURE_CLIENT_SECRET)",
        Scheme::Azure => "managed identity from instance metadata (no key, SAS or federated token set)",
        Scheme::Http => "none (anonymous HTTP)",
        Scheme::Hub => "a Hugging Face token, if one was given",
    };
    hint.to_string()
}

fn client_options(allow_http: bool) -> ClientOptions {
    // The default 30 s limit covers a whole request with its body, which a 16 MiB part on a slow
    // link can exceed; a stalled connection is still caught by the connect timeout and retries.
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(Duration::from_secs(600))
        .with_connect_timeout(Duration::from_secs(10))
}

fn retry_config() -> RetryConfig {
    RetryConfig { max_retries: 5, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() }
}

fn s3_store(bucket: String, opts: &StoreOptions, allow_http: bool) -> object_store::Result<AmazonS3> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client_options(allow_http))
        .with_retry(retry_config());
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_endpoint(endpoint);
    }
    b.build()
}

fn gcs_store(bucket: String, opts: &StoreOptions, allow_http: bool) -> object_store::Result<GoogleCloudStorage> {
    let mut b = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client_options(allow_http))
        .with_retry(retry_config());
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_config(GoogleConfigKey::BaseUrl, endpoint);
    }
    b.build()
}

/// An Azure Blob container; `account` when the URL names it (else from the environment).
fn azure_store(
    account: Option<String>,
    container: String,
    opts: &StoreOptions,
    allow_http: bool,
) -> object_store::Result<MicrosoftAzure> {
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_client_options(client_options(allow_http))
        .with_retry(retry_config());
    if let Some(account) = account {
        b = b.with_account(account);
    }
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_config(AzureConfigKey::Endpoint, endpoint);
    }
    b.build()
}

/// A cloud store's client, as the store that fetches and the lister that pages.
type Clients = (Arc<dyn ObjectStore>, Option<Arc<dyn PaginatedListStore>>);

fn clients<T: ObjectStore + PaginatedListStore>(store: T) -> Clients {
    let store = Arc::new(store);
    let lister: Arc<dyn PaginatedListStore> = store.clone();
    let store: Arc<dyn ObjectStore> = store;
    (store, Some(lister))
}

/// The most keys S3 and GCS return on one page (Azure returns up to 5,000).
const MAX_PAGE_KEYS: usize = 1000;

/// The raw key in an error the client gives for a listed key it cannot make a path of.
fn unparseable_key(e: &object_store::Error) -> Option<&str> {
    use object_store::path::Error as PathError;
    match e {
        object_store::Error::InvalidPath {
            source: PathError::EmptySegment { path } | PathError::BadSegment { path, .. },
        } => Some(path.as_str()),
        _ => None,
    }
}

/// Every object under `prefix`, page by page, and the raw keys the client cannot make a path of.
/// Such a key fails its whole page, good keys included, so the listing goes on from where the
/// last good page ended with pages half as long, down to one key: the bad key alone on its page is
/// noted and the listing goes on after it (keys come in order, and `offset` is where it starts
/// again, S3's `start-after`). Each good page doubles the page length again, so a lone bad key
/// costs about twenty requests and a run of them about two each.
async fn list_pages(
    lister: &dyn PaginatedListStore,
    prefix: Option<&str>,
) -> object_store::Result<(Vec<ObjectMeta>, Vec<String>)> {
    let (mut objects, mut unparseable) = (Vec::new(), Vec::<String>::new());
    let mut opts = PaginatedListOptions::default();
    loop {
        match lister.list_paginated(prefix, opts.clone()).await {
            Ok(page) => {
                objects.extend(page.result.objects);
                let Some(token) = page.page_token else { return Ok((objects, unparseable)) };
                opts.page_token = Some(token);
                opts.offset = None;
                opts.max_keys = opts.max_keys.map(|n| n * 2).filter(|&n| n < MAX_PAGE_KEYS);
            }
            Err(e) => {
                let Some(key) = unparseable_key(&e) else { return Err(e) };
                match opts.max_keys {
                    Some(1) => {
                        // A store that ignores where the listing starts (Azurite) would list the
                        // same key again: stop rather than loop.
                        if unparseable.iter().any(|k| k.as_str() == key) {
                            return Err(e);
                        }
                        unparseable.push(key.to_string());
                        opts.offset = Some(key.to_string());
                        opts.page_token = None;
                    }
                    n => opts.max_keys = Some(n.map_or(MAX_PAGE_KEYS / 2, |n| n / 2).max(1)),
                }
            }
        }
    }
}

/// Splits `scheme://bucket/prefix` into bucket and prefix.
fn bucket_and_prefix(url: &url::Url) -> Result<(String, String), String> {
    let bucket = url.host_str().filter(|h| !h.is_empty()).ok_or("no bucket or container name")?.to_string();
    Ok((bucket, url.path().trim_matches('/').to_string()))
}

impl Source {
    pub fn parse(uri: &str, opts: &StoreOptions) -> Result<Source, SyncError> {
        let invalid = |reason: &str| SyncError::InvalidUri { uri: uri.to_string(), reason: reason.to_string() };
        let url = url::Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        let store_err = |scheme, e: object_store::Error| SyncError::Store {
            uri: uri.to_string(),
            credentials: credential_hint(scheme),
            source: Box::new(e),
        };
        let allow_http = opts.allow_http || env_set("AWS_ALLOW_HTTP");
        let (scheme, (store, lister), prefix): (Scheme, Clients, String) = match url.scheme() {
            "s3" | "s3a" => {
                let (bucket, prefix) = bucket_and_prefix(&url).map_err(|r| invalid(&r))?;
                let store = s3_store(bucket, opts, allow_http).map_err(|e| store_err(Scheme::S3, e))?;
                (Scheme::S3, clients(store), prefix)
            }
            "gs" => {
                let (bucket, prefix) = bucket_and_prefix(&url).map_err(|r| invalid(&r))?;
                let store = gcs_store(bucket, opts, allow_http).map_err(|e| store_err(Scheme::Gcs, e))?;
                (Scheme::Gcs, clients(store), prefix)
            }
            "az" | "azure" => {
                let (container, prefix) = bucket_and_prefix(&url).map_err(|r| invalid(&r))?;
                let store = azure_store(None, container, opts, allow_http).map_err(|e| store_err(Scheme::Azure, e))?;
                (Scheme::Azure, clients(store), prefix)
            }
            "https" | "http" if url.host_str().is_some_and(|h| h.ends_with(".blob.core.windows.net")) => {
                // https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX
                let mut segments = url.path().trim_matches('/').splitn(2, '/');
                let container =
                    segments.next().filter(|c| !c.is_empty()).ok_or_else(|| invalid("no container in the path"))?;
                let prefix = segments.next().unwrap_or("").trim_matches('/').to_string();
                let account = url.host_str().and_then(|h| h.split('.').next()).unwrap_or_default().to_string();
                let no_endpoint = StoreOptions { endpoint: None, ..opts.clone() };
                let store = azure_store(Some(account), container.to_string(), &no_endpoint, allow_http)
                    .map_err(|e| store_err(Scheme::Azure, e))?;
                (Scheme::Azure, clients(store), prefix)
            }
            "https" | "http" => {
                if url.scheme() == "http" && !opts.allow_http {
                    return Err(SyncError::PlainHttp { uri: uri.to_string() });
                }
                if opts.endpoint.is_some() {
                    return Err(invalid(
                        "--endpoint applies to s3://, gs:// and az:// sources; an https:// URI is its own endpoint",
                    ));
                }
                // The store is rooted at the server; the URL's path is the prefix, as listings
                // (WebDAV) name objects from the root.
                let mut origin = url.clone();
                origin.set_path("/");
                origin.set_query(None);
                let prefix = url.path().trim_matches('/').to_string();
                let b = HttpBuilder::new()
                    .with_url(origin.as_str())
                    .with_client_options(client_options(allow_http))
                    .with_retry(retry_config());
                let store: Arc<dyn ObjectStore> = Arc::new(b.build().map_err(|e| store_err(Scheme::Http, e))?);
                (Scheme::Http, (store, None), prefix)
            }
            other => {
                return Err(SyncError::UnknownScheme { uri: uri.to_string(), scheme: other.to_string() });
            }
        };
        let prefix = StorePath::parse(&prefix).map_err(|e| invalid(&e.to_string()))?;
        Ok(Source { uri: uri.to_string(), scheme, store, lister, prefix, credentials: credential_hint(scheme) })
    }

    /// The files of one commit on the Hub, `base` being `{endpoint}/{repo}/resolve/{commit}`. Files
    /// are named by commit, so they never change: no ETag is pinned (the CDN a large file
    /// redirects to has its own). The token goes only to the Hub: redirects to another host drop
    /// it.
    pub fn hub(base: &str, token: Option<&str>, allow_http: bool) -> Result<Source, SyncError> {
        let store_err = |e: object_store::Error| SyncError::Store {
            uri: base.to_string(),
            credentials: credential_hint(Scheme::Hub),
            source: Box::new(e),
        };
        let mut options = client_options(allow_http || base.starts_with("http://"));
        if let Some(token) = token {
            let mut headers = reqwest::header::HeaderMap::new();
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                SyncError::InvalidUri {
                    uri: base.to_string(),
                    reason: "the Hugging Face token has characters a header cannot hold".into(),
                }
            })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
            options = options.with_default_headers(headers);
        }
        let store = HttpBuilder::new()
            .with_url(base)
            .with_client_options(options)
            .with_retry(retry_config())
            .build()
            .map_err(store_err)?;
        Ok(Source {
            uri: base.to_string(),
            scheme: Scheme::Hub,
            store: Arc::new(store),
            lister: None,
            prefix: StorePath::default(),
            credentials: credential_hint(Scheme::Hub),
        })
    }

    fn store_error(&self, e: object_store::Error) -> SyncError {
        SyncError::Store { uri: self.uri.clone(), credentials: self.credentials.clone(), source: Box::new(e) }
    }

    /// Every object under the prefix, paging through listings of any length. An HTTP server that
    /// cannot list (no WebDAV) is asked for the files a Hugging Face model folder holds instead.
    /// Folder markers (keys ending in `/`, which S3 consoles create) are not files: they are left out.
    pub async fn list(&self) -> Result<Listing, SyncError> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = match &self.lister {
            Some(lister) => {
                // The lister takes the prefix as given, so it is made a folder, as `list` does.
                let folder = prefix.map(|p| format!("{}/", p.as_ref()));
                list_pages(lister.as_ref(), folder.as_deref()).await
            }
            None => self.store.list(prefix).try_collect::<Vec<ObjectMeta>>().await.map(|metas| (metas, Vec::new())),
        };
        let prefix_len = if self.prefix.as_ref().is_empty() { 0 } else { self.prefix.as_ref().len() + 1 };
        // Listed keys all start with the prefix and its `/`.
        let relative = |key: &str| key.get(prefix_len..).unwrap_or(key).to_string();
        let (metas, unparseable) = match listed {
            Ok(listed) => listed,
            Err(e) if self.scheme == Scheme::Http => {
                tracing::debug!(%e, "the HTTP server cannot list; probing for model files");
                return Ok(Listing { files: self.probe_http().await?, unreadable: Vec::new() });
            }
            // A key the client cannot parse is the listing's content, not a refusal: it gets
            // its own message, never the credentials'.
            Err(e) => match unparseable_key(&e) {
                Some(key) => {
                    return Err(SyncError::BadName {
                        uri: self.uri.clone(),
                        name: relative(key),
                        reason: "the store client cannot read it, and the store does not list past it".into(),
                    });
                }
                None => return Err(self.store_error(e)),
            },
        };
        let unreadable =
            unparseable.iter().filter(|key| !key.ends_with('/')).map(|key| relative(key.as_str())).collect();
        let mut files: Vec<RemoteFile> = metas
            .into_iter()
            .filter(|m| m.location.as_ref().len() > prefix_len)
            .map(|m| RemoteFile {
                name: m.location.as_ref()[prefix_len..].to_string(),
                size: m.size,
                e_tag: m.e_tag,
                last_modified: m.last_modified.to_rfc3339(),
                digest: None,
                location: m.location,
            })
            .collect();
        // The client strips a folder marker's final `/`, so a marker reads as an empty file named
        // like its folder. One with files under it cannot be a file beside them: it is dropped. (A
        // marker with nothing under it still reads as an empty file, kept only if the filters
        // keep its name.)
        let folders: std::collections::HashSet<String> =
            files.iter().flat_map(|f| f.name.match_indices('/').map(|(idx, _)| f.name[..idx].to_string())).collect();
        files.retain(|f| f.size > 0 || !folders.contains(&f.name));
        files.sort_by(|a, b| a.name.cmp(&b.name));
        tracing::debug!(uri = %self.uri, names = ?files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), "listed");
        Ok(Listing { files, unreadable })
    }

    /// Asks a plain HTTP server for the files of a model folder by name: the configs, the
    /// tokenizer, and the weights (the shards the index names, or the single file).
    async fn probe_http(&self) -> Result<Vec<RemoteFile>, SyncError> {
        let mut names: Vec<String> = [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "model.safetensors.index.json",
            "model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let mut files = Vec::new();
        let mut idx = 0;
        while idx < names.len() {
            let name = names[idx].clone();
            idx += 1;
            let location = self.location(&name);
            let meta = match self.store.head(&location).await {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(self.store_error(e)),
            };
            if name == "model.safetensors.index.json" {
                let result = self.store.get(&location).await.map_err(|e| self.store_error(e))?;
                let bytes = result.bytes().await.map_err(|e| self.store_error(e))?;
                let index: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| SyncError::InvalidUri {
                    uri: self.uri.clone(),
                    reason: format!("{name} is not JSON: {e}"),
                })?;
                let mut shards: Vec<String> = index["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                let new: Vec<String> = shards.into_iter().filter(|s| !names.contains(s)).collect();
                names.extend(new);
            }
            files.push(RemoteFile {
                name,
                size: meta.size,
                e_tag: meta.e_tag,
                last_modified: meta.last_modified.to_rfc3339(),
                digest: None,
                location,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// The store path of `name` under the prefix.
    fn location(&self, name: &str) -> StorePath {
        if self.prefix.as_ref().is_empty() {
            StorePath::from(name)
        } else {
            StorePath::from(format!("{}/{name}", self.prefix.as_ref()))
        }
    }

    /// The bytes `range` of `file`, refused if the object no longer has the ETag it was listed
    /// with (it changed during the sync).
    pub async fn get_range(
        &self,
        file: &RemoteFile,
        range: std::ops::Range<u64>,
    ) -> Result<futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>, SyncError> {
        let options = object_store::GetOptions {
            range: Some(range.into()),
            if_match: if self.scheme == Scheme::Hub { None } else { file.e_tag.clone() },
            ..Default::default()
        };
        match self.store.get_opts(&file.location, options).await {
            Ok(result) if result.meta.size != file.size => Err(SyncError::Changed {
                name: file.name.clone(),
                detail: format!("its size went from {} to {} bytes", file.size, result.meta.size),
            }),
            Ok(result) => Ok(result.into_stream()),
            Err(object_store::Error::Precondition { .. }) => Err(SyncError::Changed {
                name: file.name.clone(),
                detail: "its ETag no longer matches the listing".into(),
            }),
            Err(object_store::Error::NotFound { .. }) => {
                Err(SyncError::Changed { name: file.name.clone(), detail: "it was deleted".into() })
            }
            Err(e) => Err(SyncError::Download { name: file.name.clone(), source: Box::new(e) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<Source, String> {
        Source::parse(uri, &StoreOptions::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn recognises_every_scheme_and_refuses_others() {
        assert_eq!(parse("s3://bucket/models/llama").unwrap().scheme, Scheme::S3);
        assert_eq!(parse("gs://bucket/m").unwrap().scheme, Scheme::Gcs);
        assert_eq!(parse("https://example.com/models/llama").unwrap().scheme, Scheme::Http);
        assert_eq!(
            parse("ftp://host/x").err().unwrap(),
            "unsupported model URI scheme 'ftp' in ftp://host/x: use s3://, gs://, az://, azure:// or https://"
        );
        assert_eq!(
            parse("http://example.com/m").err().unwrap(),
            "refusing plain http:// for http://example.com/m: pass --allow-http to allow unencrypted downloads"
        );
        assert!(parse("s3:///nobucket").err().unwrap().contains("no bucket"));
        let with_endpoint = StoreOptions { endpoint: Some("http://127.0.0.1:9".into()), allow_http: true };
        let err = Source::parse("https://example.com/m", &with_endpoint).err().unwrap().to_string();
        assert!(
            err.ends_with("--endpoint applies to s3://, gs:// and az:// sources; an https:// URI is its own endpoint")
        );
    }
}
