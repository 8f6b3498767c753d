//! Models from the Hugging Face Hub: `--model org/name`, `hf://org/name[@revision]`.
//!
//! The Hub's HTTP API names a revision's commit and files (`/api/models/{id}/revision/{rev}`,
//! with each file's size and content id), and serves each file at
//! `/{id}/resolve/{commit}/{file}` (large files by a redirect to a CDN), with ranges. Files land
//! in `huggingface_hub`'s cache layout, so a cache that `huggingface-cli download` or Python
//! filled is used as is and ours serves them too:
//!
//! ```text
//! HF_HUB_CACHE/models--org--name/blobs/<content id>           the bytes, once per content
//!                                /snapshots/<commit>/<file>   → ../../blobs/<content id>
//!                                /refs/<revision>             the commit a branch or tag named
//! ```
//!
//! Blobs download through the object-store sync's machinery (ranged parts in parallel, resumable
//! part maps, a lock, atomic placement) and are checked against their content id: SHA-256 for
//! LFS files, git's blob SHA-1 for the rest. The `hf-hub` crate was evaluated: it has the cache
//! layout but its own single-stream downloader, without resumable parts, content checks or our
//! error messages, so it is not used; the layout is small and written here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::manifest::ContentDigest;
use super::{RemoteFile, Source, Stale, SyncError, SyncOptions, SyncSummary, file_filter};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_REVISION: &str = "main";

/// A model on the Hub: its repository id and the revision asked for (a branch, tag or commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubModel {
    /// `hf://org/name[@revision]`; `None` when `uri` is not an `hf://` URI.
    pub fn from_uri(uri: &str) -> Option<Result<HubModel, SyncError>> {
        let rest = uri.strip_prefix("hf://")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (rest, None),
        };
        Some(
            HubModel::new(repo.trim_end_matches('/'), revision)
                .map_err(|reason| SyncError::InvalidUri { uri: uri.to_string(), reason }),
        )
    }

    /// A checked repository id and revision.
    pub fn new(repo: &str, revision: Option<String>) -> Result<HubModel, String> {
        Self::check_repo_id(repo)?;
        if let Some(rev) = &revision {
            Self::check_revision(rev)?;
        }
        Ok(HubModel { repo: repo.to_string(), revision })
    }

    /// A revision names a file under `refs/` in the cache, so it must stay there: no empty, `.` or
    /// `..` parts, no leading `/`, no backslash or control character.
    fn check_revision(rev: &str) -> Result<(), String> {
        let ok = !rev.is_empty()
            && rev.len() <= 256
            && !rev.starts_with('/')
            && !rev.chars().any(|c| c == '\\' || c.is_control())
            && rev.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if ok { Ok(()) } else { Err(format!("'{rev}' is not a revision (a branch, tag or commit)")) }
    }

    /// Whether a `--model` value that is not a local path reads as a Hub id (`org/name`).
    pub fn looks_like_id(model: &str) -> bool {
        Self::check_repo_id(model).is_ok()
    }

    /// The Hub's rule for repository ids, with the namespace required: `org/name`, each part
    /// letters, digits, `-`, `_` and `.`, not starting or ending with `-` or `.`, no `--` or `..`.
    fn check_repo_id(id: &str) -> Result<(), String> {
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() != 2 {
            return Err(format!("'{id}' is not a Hub model id: expected org/name"));
        }
        for part in parts {
            let ok = !part.is_empty()
                && part.len() <= 96
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
                && !part.contains("--")
                && !part.contains("..");
            if !ok {
                return Err(format!("'{id}' is not a Hub model id: '{part}' has characters the Hub does not allow"));
            }
        }
        Ok(())
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    fn display(&self) -> String {
        match &self.revision {
            Some(rev) => format!("{}@{rev}", self.repo),
            None => self.repo.clone(),
        }
    }
}

/// Where the Hub is and who we are to it, from the variables `huggingface_hub` reads.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// `HF_ENDPOINT`: a mirror or a self-hosted hub.
    pub endpoint: String,
    /// `--hf-token`, else `HF_TOKEN`, else the token `huggingface-cli login` saved.
    pub token: Option<String>,
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: only the cache is read.
    pub offline: bool,
    /// Allow a plain `http://` endpoint that is not on this machine.
    pub allow_http: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl HubOptions {
    pub fn from_env(token: Option<String>, allow_http: bool) -> HubOptions {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from("/var/cache"));
            cache.join("huggingface")
        });
        let token = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| env("HF_TOKEN"))
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
            });
        HubOptions {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache_dir: env("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub")),
            offline: env("HF_HUB_OFFLINE")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")),
            allow_http,
        }
    }
}

/// A revision of a model in the cache.
#[derive(Debug)]
pub struct HubSnapshot {
    /// `…/models--org--name/snapshots/<commit>`: a model folder.
    pub dir: PathBuf,
    pub commit: String,
    pub summary: SyncSummary,
}

/// The folder of `repo` in the cache.
pub fn repo_dir(cache_dir: &Path, repo: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The snapshot of `model` already in the cache, if it holds a model: a config and weights.
pub fn cached_snapshot(model: &HubModel, cache_dir: &Path) -> Option<(PathBuf, String)> {
    let repo = repo_dir(cache_dir, &model.repo);
    let revision = model.revision();
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo.join("refs").join(revision)).ok()?.trim().to_string()
    };
    if !is_commit_hash(&commit) {
        return None;
    }
    let dir = repo.join("snapshots").join(&commit);
    let has = |name: &str| dir.join(name).is_file();
    let weights = has(crate::weights::SINGLE_FILE) || has(crate::weights::INDEX_FILE);
    (has("config.json") && weights).then_some((dir, commit))
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Makes `model` a complete snapshot in the cache and returns it: nothing is downloaded for files
/// whose blobs are there. Offline, or when the Hub cannot be reached, the cached snapshot of the
/// revision is used if there is one.
pub async fn ensure(model: &HubModel, hub: &HubOptions, opts: &SyncOptions) -> Result<HubSnapshot, SyncError> {
    let started = Instant::now();
    let cached = |why: &str| -> Result<HubSnapshot, SyncError> {
        match cached_snapshot(model, &hub.cache_dir) {
            Some((dir, commit)) => {
                tracing::info!(model = %model.display(), %commit, dir = %dir.display(), "{why}; using the cached snapshot");
                Ok(HubSnapshot { dir, commit, summary: SyncSummary::default() })
            }
            None => Err(SyncError::Hub {
                repo: model.display(),
                message: format!("{why}, and the cache {} does not hold this revision", hub.cache_dir.display()),
            }),
        }
    };
    if hub.offline {
        return cached("HF_HUB_OFFLINE is set");
    }
    let info = match revision_info(model, hub).await {
        Ok(info) => info,
        Err(HubFailure::Unreachable(e)) => {
            return cached(&format!("the Hub at {} cannot be reached ({e})", hub.endpoint));
        }
        Err(HubFailure::Refused(e)) => return Err(e),
    };
    let commit = info.sha.to_ascii_lowercase();
    if !is_commit_hash(&commit) {
        return Err(hub_error(model, format!("the Hub named commit '{}', which is not a commit hash", info.sha)));
    }
    let keep = file_filter(opts)?;
    let mut files = Vec::new();
    for s in info.siblings.iter().filter(|s| keep(&s.rfilename)) {
        if let Some(reason) = super::name_problem(&s.rfilename) {
            return Err(SyncError::BadName { uri: model.display(), name: s.rfilename.clone(), reason });
        }
        let (digest, size) = match (&s.lfs, &s.blob_id, s.size) {
            (Some(lfs), _, _) => (ContentDigest::Sha256(lfs.sha256.to_ascii_lowercase()), lfs.size),
            (None, Some(blob), Some(size)) => (ContentDigest::GitBlobSha1(blob.to_ascii_lowercase()), size),
            _ => return Err(hub_error(model, format!("the Hub gave no size or content id for {}", s.rfilename))),
        };
        if !digest.hex().bytes().all(|b| b.is_ascii_hexdigit()) || digest.hex().len() < 40 {
            return Err(hub_error(model, format!("{}: content id '{}' is not a hash", s.rfilename, digest.hex())));
        }
        files.push((s.rfilename.clone(), digest, size));
    }
    super::check_model_files(&format!("hf://{}", model.display()), files.iter().map(|(n, _, _)| n.as_str()))?;

    let repo = repo_dir(&hub.cache_dir, &model.repo);
    // A blob already there with the right size is complete (huggingface_hub, like us, only ever
    // renames finished blobs into place); `--verify` hashes it too.
    let mut needed: Vec<RemoteFile> = Vec::new();
    for (name, digest, size) in &files {
        let blob = format!("blobs/{}", digest.hex());
        let present = std::fs::metadata(repo.join(&blob)).is_ok_and(|m| m.len() == *size)
            && (!opts.verify
                || super::manifest::hash_file_with(&repo.join(&blob), false, Some(digest))
                    .is_ok_and(|(_, _, d)| d.as_deref() == Some(digest.hex())));
        if !present && !needed.iter().any(|f| f.name == blob) {
            needed.push(RemoteFile::at_location(blob, name, *size, Some(digest.clone())));
        }
    }
    let summary = if needed.is_empty() {
        tracing::info!(model = %model.display(), %commit, files = files.len(), "every file is in the cache; nothing downloaded");
        SyncSummary { num_files: files.len(), num_bytes: files.iter().map(|f| f.2).sum(), ..Default::default() }
    } else {
        let base = format!("{}/{}/resolve/{commit}", hub.endpoint, model.repo);
        let source = Source::hub(&base, hub.token.as_deref(), hub.allow_http)?;
        let id = format!("hf://{}@{commit}", model.repo);
        super::transfer(source, &id, &repo, needed, opts, Stale::Keep, started).await?
    };
    // Links and refs are written under the folder's lock, so syncs of a shared cache take turns.
    let lock_path = super::manifest::StatePaths::new(&repo).lock();
    std::fs::create_dir_all(lock_path.parent().expect("the lock is in a folder"))
        .map_err(|e| SyncError::io(&lock_path, e))?;
    let _lock = tokio::task::spawn_blocking(move || super::manifest::Lock::acquire(&lock_path))
        .await
        .expect("the lock task does not panic")?;
    let dir = repo.join("snapshots").join(&commit);
    for (name, digest, _) in &files {
        link_snapshot_file(&dir, name, &format!("blobs/{}", digest.hex()))?;
    }
    if model.revision() != commit {
        let refs = repo.join("refs");
        write_atomically(&refs.join(model.revision()), commit.as_bytes())?;
    }
    Ok(HubSnapshot { dir, commit, summary })
}

/// `snapshots/<commit>/<name>` → the blob, as a relative link (the layout `huggingface_hub` writes).
fn link_snapshot_file(snapshot: &Path, name: &str, blob: &str) -> Result<(), SyncError> {
    let link = snapshot.join(name);
    let parent = link.parent().expect("a file in the snapshot has a parent");
    std::fs::create_dir_all(parent).map_err(|e| SyncError::io(parent, e))?;
    let depth = 2 + name.matches('/').count();
    let target = format!("{}{blob}", "../".repeat(depth));
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(&target)) {
        return Ok(());
    }
    let temp =
        parent.join(format!(".{}.{}.pagoda-link", link.file_name().unwrap_or_default().to_string_lossy(), unique()));
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(&target, &temp).map_err(|e| SyncError::io(&temp, e))?;
    std::fs::rename(&temp, &link).map_err(|e| SyncError::io(&link, e))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SyncError> {
    let parent = path.parent().expect("a ref has a parent");
    std::fs::create_dir_all(parent).map_err(|e| SyncError::io(parent, e))?;
    let temp =
        parent.join(format!(".{}.{}.pagoda-tmp", path.file_name().unwrap_or_default().to_string_lossy(), unique()));
    std::fs::write(&temp, bytes).map_err(|e| SyncError::io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| SyncError::io(path, e))
}

/// A suffix no other writer uses for its temporary file.
fn unique() -> String {
    format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

fn hub_error(model: &HubModel, message: String) -> SyncError {
    SyncError::Hub { repo: model.display(), message }
}

enum HubFailure {
    /// No answer: the cache may stand in.
    Unreachable(String),
    /// An answer that says no.
    Refused(SyncError),
}

/// Asks the Hub which commit the revision is and which files it has.
async fn revision_info(model: &HubModel, hub: &HubOptions) -> Result<RevisionInfo, HubFailure> {
    let refused = |message: String| HubFailure::Refused(hub_error(model, message));
    let url = url::Url::parse(&hub.endpoint)
        .map_err(|e| refused(format!("HF_ENDPOINT {} is not a URL: {e}", hub.endpoint)))?;
    let loopback = url
        .host_str()
        .is_some_and(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
    if url.scheme() == "http" && !loopback && !hub.allow_http {
        return Err(refused(format!(
            "refusing plain http:// for HF_ENDPOINT {}: pass --allow-http to allow unencrypted downloads",
            hub.endpoint
        )));
    }
    // A branch name may hold '/', which the API wants encoded.
    let revision: String = url::form_urlencoded::byte_serialize(model.revision().as_bytes()).collect();
    let api = format!("{}/api/models/{}/revision/{revision}?blobs=true", hub.endpoint, model.repo);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .user_agent(concat!("pagoda/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HubFailure::Unreachable(e.to_string()))?;
    let mut request = client.get(&api);
    if let Some(token) = &hub.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| HubFailure::Unreachable(e.to_string()))?;
    let status = response.status();
    let code = response.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = response.bytes().await.map_err(|e| HubFailure::Unreachable(e.to_string()))?;
    let token_hint = if hub.token.is_some() {
        "the token given was refused or has no access to it"
    } else {
        "no token was given: set HF_TOKEN (or --hf-token) to a token with access"
    };
    match status.as_u16() {
        200 => serde_json::from_slice(&body)
            .map_err(|e| refused(format!("the Hub's revision info is not what was expected: {e}"))),
        401 if code == "RepoNotFound" => Err(refused(format!(
            "401 Unauthorized: no such model on {}, or it is private or gated and {token_hint}",
            hub.endpoint
        ))),
        401 if code == "GatedRepo" || hub.token.is_none() => Err(refused(format!(
            "401 Unauthorized: the model is gated or private, and {token_hint}; gated models also need their \
             terms accepted at {}/{}",
            hub.endpoint, model.repo
        ))),
        401 => Err(refused("401 Unauthorized: the token given was refused (expired or mistyped?)".into())),
        403 => Err(refused(format!(
            "403 Forbidden: the token has no access to this model; if it is gated, accept its terms at {}/{} \
             with the token's account (and give a fine-grained token read access to gated repositories)",
            hub.endpoint, model.repo
        ))),
        404 if code == "RevisionNotFound" => {
            Err(refused(format!("revision '{}' does not exist (no such branch, tag or commit)", model.revision())))
        }
        404 => Err(refused(format!(
            "404 Not Found: no such model on {}{}",
            hub.endpoint,
            if hub.token.is_none() { " (or it is private and no token was given: set HF_TOKEN)" } else { "" }
        ))),
        s if s >= 500 => Err(HubFailure::Unreachable(format!("the Hub answered {status}"))),
        _ => Err(refused(format!(
            "the Hub answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_uris_parse_as_the_hub_allows() {
        let m = HubModel::from_uri("hf://meta-llama/Llama-3.1-8B-Instruct@v1.0").unwrap().unwrap();
        assert_eq!((m.repo.as_str(), m.revision.as_deref()), ("meta-llama/Llama-3.1-8B-Instruct", Some("v1.0")));
        assert_eq!(HubModel::from_uri("hf://Qwen/Qwen2.5-0.5B").unwrap().unwrap().revision, None);
        assert!(HubModel::from_uri("s3://bucket/x").is_none());
        let m = HubModel::from_uri("hf://org/name@refs/pr/1").unwrap().unwrap();
        assert_eq!(m.revision.as_deref(), Some("refs/pr/1"));
        for bad in [
            "hf://justname",
            "hf://a/b/c",
            "hf://a/b@",
            "hf://-a/b",
            "hf://a/b..c",
            "hf://a/b c",
            // A revision names a file under refs/: it must not leave it.
            "hf://a/b@../../x",
            "hf://a/b@/etc/passwd",
            "hf://a/b@x//y",
            "hf://a/b@x\\y",
        ] {
            assert!(HubModel::from_uri(bad).unwrap().is_err(), "{bad}");
        }
        assert!(HubModel::looks_like_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        for not_id in ["./models/x", "/models/x", "models", "a/b/c", "../x"] {
            assert!(!HubModel::looks_like_id(not_id), "{not_id}");
        }
    }

    #[test]
    fn the_cache_layout_is_huggingface_hubs() {
        assert_eq!(repo_dir(Path::new("/c"), "org/name"), PathBuf::from("/c/models--org--name"));
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main") && !is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
    }
}
