//! Model sync: copy a model from an object store (S3, GCS, Azure Blob, HTTPS) into a local folder,
//! as `pagoda sync` and before `pagoda serve --model s3://...`.
//!
//! A sync lists the prefix, keeps the model's files, and downloads what is missing or changed in
//! ranged parts, several files and several parts of each at once. Parts land in a partial file
//! whose part map is saved as parts finish, so an interrupted sync resumes with only the missing
//! bytes. A finished file is checked (size; MD5 where the ETag is one), hashed, synced to disk and
//! renamed into place, and recorded in the manifest; the completion marker is written last. A lock
//! keeps two syncs of one folder from interleaving. Nothing is ever half-written at a model path.

pub mod hub;
mod manifest;
mod source;
pub mod versions;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use self::manifest::ContentDigest;
use self::manifest::{Completion, FileRecord, Lock, Manifest, PartMap, StatePaths};
pub use self::source::{Listing, RemoteFile, Scheme, Source, StoreOptions};

/// Files a model needs, kept unless `--exclude`d; `--include` adds more.
pub const DEFAULT_INCLUDE: [&str; 6] = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.model", "*.txt"];
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
pub const DEFAULT_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("unsupported model URI scheme '{scheme}' in {uri}: use s3://, gs://, az://, azure:// or https://")]
    UnknownScheme { uri: String, scheme: String },
    #[error("invalid model URI {uri}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("refusing plain http:// for {uri}: pass --allow-http to allow unencrypted downloads")]
    PlainHttp { uri: String },
    #[error("cannot read {uri} (credentials tried: {credentials}): {}{source}", store_hint(source))]
    Store { uri: String, credentials: String, source: Box<object_store::Error> },
    #[error("{uri} holds no files: check the bucket and the prefix")]
    Empty { uri: String },
    #[error("{uri} is not a model folder: it has no config.json")]
    NoConfig { uri: String },
    #[error("{uri} has no weights: no *.safetensors file")]
    NoWeights { uri: String },
    #[error("{name} changed during the download ({detail}); run the sync again")]
    Changed { name: String, detail: String },
    #[error("{repo}: {message}")]
    Hub { repo: String, message: String },
    #[error("{name}: the downloaded content hashes to {got}, the source says {expected}; it was discarded")]
    Corrupt { name: String, expected: String, got: String },
    #[error("{name}: received {got} bytes where {expected} were expected")]
    Truncated { name: String, expected: u64, got: u64 },
    #[error("{uri} lists '{name}', which cannot be a file in the model folder: {reason}")]
    BadName { uri: String, name: String, reason: String },
    #[error("{path} is a symbolic link, and a sync never writes through one: remove it, or sync into its target")]
    Symlink { path: PathBuf },
    #[error("downloading {name} failed: {source}")]
    Download { name: String, source: Box<object_store::Error> },
    #[error("not enough disk space in {dest}: the sync needs {needed} more bytes and {available} are free")]
    DiskFull { dest: PathBuf, needed: u64, available: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid pattern '{pattern}': {reason}")]
    Pattern { pattern: String, reason: String },
}

/// A plain-words reading of the store errors people meet most, put before the store's own text.
fn store_hint(e: &object_store::Error) -> &'static str {
    let text = e.to_string();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["NoSuchBucket", "ContainerNotFound", "bucket does not exist"]) {
        "the bucket or container does not exist: "
    } else if has(&[
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AuthenticationFailed",
        "AuthorizationFailure",
        "403 Forbidden",
        "401 Unauthorized",
    ]) {
        "access denied, the credentials were refused: "
    } else if has(&["Connection refused", "dns error", "timed out"]) {
        "the store cannot be reached: "
    } else {
        ""
    }
}

impl SyncError {
    fn io(path: &Path, source: std::io::Error) -> SyncError {
        SyncError::Io { path: path.to_path_buf(), source }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    Log,
    Off,
}

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Parts downloading at once, across all files.
    pub concurrency: usize,
    pub part_size: u64,
    /// Hash every local file, even those whose size and time say they are unchanged.
    pub verify: bool,
    pub progress: ProgressMode,
    pub store: StoreOptions,
}

impl Default for SyncOptions {
    fn default() -> SyncOptions {
        SyncOptions {
            include: Vec::new(),
            exclude: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            part_size: DEFAULT_PART_SIZE,
            verify: false,
            progress: ProgressMode::Auto,
            store: StoreOptions::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncSummary {
    pub num_files: usize,
    pub num_downloaded: usize,
    pub num_bytes: u64,
    /// Bytes fetched from the store by this run (parts resumed from a partial file excluded).
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

impl SyncSummary {
    pub fn throughput_mb_s(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes_downloaded as f64 / self.seconds / 1e6 } else { 0.0 }
    }
}

fn file_filter(opts: &SyncOptions) -> Result<impl Fn(&str) -> bool + use<>, SyncError> {
    let build = |patterns: &mut dyn Iterator<Item = &str>| -> Result<globset::GlobSet, SyncError> {
        let mut set = globset::GlobSetBuilder::new();
        for p in patterns {
            let glob = globset::Glob::new(p)
                .map_err(|e| SyncError::Pattern { pattern: p.to_string(), reason: e.to_string() })?;
            set.add(glob);
        }
        set.build().map_err(|e| SyncError::Pattern { pattern: String::new(), reason: e.to_string() })
    };
    let include = build(&mut DEFAULT_INCLUDE.iter().copied().chain(opts.include.iter().map(String::as_str)))?;
    let exclude = build(&mut opts.exclude.iter().map(String::as_str))?;
    Ok(move |name: &str| {
        let file_name = name.rsplit('/').next().unwrap_or(name);
        // The state folder of a sync that was uploaded along with a model is never copied.
        !name.split('/').any(|c| c == manifest::STATE_DIR)
            && (include.is_match(name) || include.is_match(file_name))
            && !(exclude.is_match(name) || exclude.is_match(file_name))
    })
}

/// The most bytes a file or folder name can have (NAME_MAX on Linux's filesystems).
const MAX_NAME_BYTES: usize = 255;

/// Why a listed name cannot be written as a file inside the model folder, or `None` when it can:
/// a relative path of non-empty parts, none `.` or `..` nor longer than a file name can be, with
/// no backslash (a separator elsewhere) and no control character.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the name is empty".into());
    }
    if name.starts_with('/') {
        return Some("it starts with '/' (an absolute path, or an empty folder name)".into());
    }
    if name.contains('\\') {
        return Some("it holds a backslash".into());
    }
    if name.bytes().any(|b| b.is_ascii_control()) {
        return Some("it holds a control character".into());
    }
    name.split('/').find_map(|part| match part {
        "" => Some("it has an empty folder name ('//')".to_string()),
        "." | ".." => Some(format!("it has a '{part}' part, and names must stay inside the model folder")),
        _ if part.len() > MAX_NAME_BYTES => Some(format!(
            "a part of it is {} bytes long, and a file or folder name can have at most {MAX_NAME_BYTES}",
            part.len()
        )),
        _ => None,
    })
}

/// Refuses `path` if it is a symbolic link (`symlink_metadata` looks at the link itself), so
/// nothing is written through it to somewhere outside the destination.
fn refuse_link(path: &Path) -> Result<(), SyncError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(SyncError::Symlink { path: path.to_path_buf() }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SyncError::io(path, e)),
    }
}

/// Refuses a symbolic link among the folders between `dest` and the file `name`, which would put
/// the file outside. The file's own path may be a link: the rename that places the file replaces
/// the link itself (rename never follows its target's last part), so a link there is replaced,
/// never written through. A folder that does not exist yet is made by the sync, as a folder.
fn refuse_linked_folders(dest: &Path, name: &str) -> Result<(), SyncError> {
    let mut path = dest.to_path_buf();
    for part in name.rsplit_once('/').map_or("", |(folders, _)| folders).split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        refuse_link(&path)?;
    }
    Ok(())
}

/// Free bytes on the filesystem holding `path`.
fn available_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a writable statvfs.
    (unsafe { libc::statvfs(c.as_ptr(), &mut stat) } == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Whether the local copy of `file` is the one the manifest recorded, hashing it only when its
/// size and time no longer vouch for it (or when asked to).
fn up_to_date(dest: &Path, file: &RemoteFile, record: Option<&FileRecord>, verify: bool) -> bool {
    let Some(record) = record else { return false };
    if record.size != file.size || record.e_tag != file.e_tag || record.last_modified != file.last_modified {
        return false;
    }
    let path = dest.join(&file.name);
    // The link itself, not what it points to: a link at a model path is never up to date, so the
    // sync replaces it with the file.
    let Ok(meta) = std::fs::symlink_metadata(&path) else { return false };
    if !meta.is_file() || meta.len() != file.size {
        return false;
    }
    if !verify && manifest::mtime_ns(&meta) == record.mtime_ns {
        return true;
    }
    match manifest::hash_file(&path, false) {
        Ok((hash, _)) if hash == record.xxh3 => true,
        _ => {
            tracing::warn!(file = %file.name, "local file does not match what was synced; fetching it again");
            false
        }
    }
}

/// A file being downloaded: its partial file, its part map, and how many parts are left.
struct Transfer {
    file: RemoteFile,
    partial: PathBuf,
    parts_path: PathBuf,
    handle: std::fs::File,
    parts: std::sync::Mutex<PartMap>,
    /// Parts written but not yet recorded in the saved part map.
    unsaved: std::sync::Mutex<Vec<u64>>,
    remaining: AtomicU64,
}

/// Opens (or resumes) the partial file of `file`; returns it with the parts still to fetch.
fn start_transfer(state: &StatePaths, file: &RemoteFile, part_size: u64) -> Result<(Transfer, Vec<u64>), SyncError> {
    let (partial, parts_path) = state.partial(&file.name);
    let num_parts = file.size.div_ceil(part_size).max(1);
    let fresh = PartMap {
        size: file.size,
        e_tag: file.e_tag.clone(),
        last_modified: file.last_modified.clone(),
        part_size,
        done: vec![false; num_parts as usize],
    };
    let resumed: Option<PartMap> = manifest::read_json(&parts_path).filter(|m: &PartMap| {
        m.size == fresh.size
            && m.e_tag == fresh.e_tag
            && m.last_modified == fresh.last_modified
            && m.part_size == part_size
            && m.done.len() == fresh.done.len()
            && std::fs::symlink_metadata(&partial).is_ok_and(|meta| meta.is_file() && meta.len() == file.size)
    });
    let map = match resumed {
        Some(map) => map,
        None => {
            // Whatever is there (a stale partial file, or a link) goes, and the file is made anew,
            // so nothing is written through a link.
            if let Err(e) = std::fs::remove_file(&partial)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(SyncError::io(&partial, e));
            }
            let f = std::fs::File::create_new(&partial).map_err(|e| SyncError::io(&partial, e))?;
            f.set_len(file.size).map_err(|e| SyncError::io(&partial, e))?;
            manifest::write_json(&parts_path, &fresh)?;
            fresh
        }
    };
    let todo: Vec<u64> = (0..num_parts).filter(|&i| !map.done[i as usize]).collect();
    let handle =
        std::fs::OpenOptions::new().write(true).read(true).open(&partial).map_err(|e| SyncError::io(&partial, e))?;
    let transfer = Transfer {
        file: file.clone(),
        partial,
        parts_path,
        handle,
        parts: std::sync::Mutex::new(map),
        unsaved: std::sync::Mutex::new(Vec::new()),
        remaining: AtomicU64::new(todo.len() as u64),
    };
    Ok((transfer, todo))
}

/// Fetches one part into its place in the partial file and records it as done.
async fn fetch_part(
    source: &Source,
    t: &Transfer,
    part: u64,
    part_size: u64,
    fetched: &AtomicU64,
) -> Result<(), SyncError> {
    let start = part * part_size;
    let end = (start + part_size).min(t.file.size);
    let mut offset = start;
    if end > start {
        let mut stream = source.get_range(&t.file, start..end).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| SyncError::Download { name: t.file.name.clone(), source: Box::new(e) })?;
            if offset + chunk.len() as u64 > end {
                return Err(SyncError::Truncated {
                    name: t.file.name.clone(),
                    expected: end - start,
                    got: offset + chunk.len() as u64 - start,
                });
            }
            t.handle.write_all_at(&chunk, offset).map_err(|e| SyncError::io(&t.partial, e))?;
            offset += chunk.len() as u64;
            fetched.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
    if offset != end {
        return Err(SyncError::Truncated { name: t.file.name.clone(), expected: end - start, got: offset - start });
    }
    let checkpoint_due = {
        let mut unsaved = t.unsaved.lock().expect("not poisoned");
        unsaved.push(part);
        unsaved.len() >= CHECKPOINT_PARTS
    };
    if checkpoint_due { checkpoint(t) } else { Ok(()) }
}

/// Parts finished between two saves of a part map. Each save syncs the partial file to disk
/// first (the map must never claim bytes a crash could lose), so saving after every part would
/// serialise the download on fsync; an interrupted sync re-fetches at most this many parts.
const CHECKPOINT_PARTS: usize = 8;

/// Makes the parts finished since the last save durable and records them in the part map.
fn checkpoint(t: &Transfer) -> Result<(), SyncError> {
    let parts = std::mem::take(&mut *t.unsaved.lock().expect("not poisoned"));
    if parts.is_empty() {
        return Ok(());
    }
    t.handle.sync_data().map_err(|e| SyncError::io(&t.partial, e))?;
    // Written under the lock: one writer of the map at a time.
    let mut map = t.parts.lock().expect("not poisoned");
    for part in parts {
        map.done[part as usize] = true;
    }
    manifest::write_json(&t.parts_path, &*map)
}

/// Checks a completed partial file and moves it into place; returns its manifest record.
fn finish_transfer(dest: &Path, t: &Transfer) -> Result<FileRecord, SyncError> {
    let size = std::fs::metadata(&t.partial).map_err(|e| SyncError::io(&t.partial, e))?.len();
    if size != t.file.size {
        return Err(SyncError::Truncated { name: t.file.name.clone(), expected: t.file.size, got: size });
    }
    // S3 gives the MD5 of objects uploaded in one part as their ETag; check it where it is one.
    let md5_etag = t
        .file
        .e_tag
        .as_deref()
        .map(|e| e.trim_matches('"').to_ascii_lowercase())
        .filter(|e| e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()));
    let (xxh3, md5, digest) = manifest::hash_file_with(&t.partial, md5_etag.is_some(), t.file.digest.as_ref())?;
    if let (Some(expected), Some(digest)) = (&t.file.digest, digest)
        && digest != expected.hex()
    {
        // Nothing of it is kept: the next run fetches the file again from the start.
        let _ = std::fs::remove_file(&t.partial);
        let _ = std::fs::remove_file(&t.parts_path);
        return Err(SyncError::Corrupt {
            name: t.file.name.clone(),
            expected: expected.hex().to_string(),
            got: digest,
        });
    }
    // Not every 32-hex ETag is an MD5 (SSE-KMS and SSE-C objects, some S3-compatible stores), so a
    // mismatch is reported, not fatal: the size was checked and every part was read pinned to the
    // listed ETag, so the bytes are the object's.
    if let (Some(etag), Some(md5)) = (md5_etag, md5)
        && md5 != etag
    {
        tracing::warn!(file = %t.file.name, %etag, %md5, "the ETag is not the content's MD5 (server-side encryption?); keeping the file");
    }
    t.handle.sync_all().map_err(|e| SyncError::io(&t.partial, e))?;
    let target = dest.join(&t.file.name);
    refuse_linked_folders(dest, &t.file.name)?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| SyncError::io(parent, e))?;
    }
    std::fs::rename(&t.partial, &target).map_err(|e| SyncError::io(&target, e))?;
    let _ = std::fs::remove_file(&t.parts_path);
    let meta = std::fs::metadata(&target).map_err(|e| SyncError::io(&target, e))?;
    Ok(FileRecord {
        size: t.file.size,
        e_tag: t.file.e_tag.clone(),
        last_modified: t.file.last_modified.clone(),
        mtime_ns: manifest::mtime_ns(&meta),
        xxh3,
    })
}

/// Reports progress while a sync runs: a bar on a terminal, a log line every few seconds
/// otherwise.
fn spawn_progress(mode: ProgressMode, total: u64, fetched: Arc<AtomicU64>) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    let bar = match mode {
        ProgressMode::Off => return None,
        ProgressMode::Auto if std::io::stderr().is_terminal() => {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("the template is valid"),
            );
            Some(bar)
        }
        _ => None,
    };
    Some(tokio::spawn(async move {
        let started = Instant::now();
        let mut last_log = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let done = fetched.load(Ordering::Relaxed);
            match &bar {
                Some(bar) => bar.set_position(done),
                None if last_log.elapsed() >= Duration::from_secs(5) => {
                    last_log = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64() / 1e6;
                    tracing::info!(bytes = done, total, mb_per_s = format!("{rate:.1}"), "sync progress");
                }
                None => {}
            }
        }
    }))
}

/// Syncs `uri` into `dest`. Safe to run again, or next to another sync of the same folder.
pub async fn sync(uri: &str, dest: &Path, opts: &SyncOptions) -> Result<SyncSummary, SyncError> {
    let started = Instant::now();
    let (source, files) = list_model(uri, opts).await?;
    transfer(source, uri, dest, files, opts, Stale::Remove, started).await
}

/// The files of the model at `uri` a sync keeps, checked (names, a config, weights) before
/// anything is downloaded.
async fn list_model(uri: &str, opts: &SyncOptions) -> Result<(Source, Vec<RemoteFile>), SyncError> {
    let source = Source::parse(uri, &opts.store)?;
    let keep = file_filter(opts)?;
    let Listing { files, unreadable } = source.list().await?;
    if files.is_empty() && unreadable.is_empty() {
        return Err(SyncError::Empty { uri: uri.to_string() });
    }
    // Only what the sync keeps must make a file name: the rest is never written, and a bucket may
    // hold anything beside a model. Checked before anything is downloaded.
    let bad_name = |name: &str, reason: String| SyncError::BadName { uri: uri.to_string(), name: name.into(), reason };
    if let Some(name) = unreadable.iter().find(|n| keep(n.as_str())) {
        let reason = name_problem(name).unwrap_or_else(|| "the store client cannot request it".into());
        return Err(bad_name(name, reason));
    }
    let files: Vec<RemoteFile> = files.into_iter().filter(|f| keep(&f.name)).collect();
    if let Some((file, reason)) = files.iter().find_map(|f| name_problem(&f.name).map(|r| (f, r))) {
        return Err(bad_name(&file.name, reason));
    }
    check_model_files(uri, files.iter().map(|f| f.name.as_str()))?;
    Ok((source, files))
}

/// A model must have a config and weights among the files kept.
fn check_model_files<'a>(uri: &str, mut names: impl Iterator<Item = &'a str> + Clone) -> Result<(), SyncError> {
    if !names.clone().any(|n| n == "config.json") {
        return Err(SyncError::NoConfig { uri: uri.to_string() });
    }
    if !names.any(|n| n.ends_with(".safetensors")) {
        return Err(SyncError::NoWeights { uri: uri.to_string() });
    }
    Ok(())
}

/// What a transfer does with files an earlier sync of the same source wrote that the source no
/// longer lists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stale {
    Remove,
    /// Keep them (content-addressed blobs that other revisions may still use).
    Keep,
}

/// Downloads `files` from `source` into `dest` (each at `dest/name`), recording them under `id`
/// in the folder's manifest: the ranged, resumable, concurrent part of a sync.
async fn transfer(
    source: Source,
    id: &str,
    dest: &Path,
    files: Vec<RemoteFile>,
    opts: &SyncOptions,
    stale: Stale,
    started: Instant,
) -> Result<SyncSummary, SyncError> {
    let uri = id;
    let state = StatePaths::new(dest);
    // The destination, the state folder and the partial folder are refused, not replaced, when
    // they are links: they may be someone's data, and the sync would write through them.
    for path in [dest.to_path_buf(), state.dir.clone(), state.partial_dir()] {
        refuse_link(&path)?;
    }
    std::fs::create_dir_all(state.partial_dir()).map_err(|e| SyncError::io(&state.dir, e))?;
    let lock_path = state.lock();
    // Shared with the tasks that finish files, so the lock outlives any still running after an error.
    let lock = Arc::new(
        tokio::task::spawn_blocking(move || Lock::acquire(&lock_path)).await.expect("the lock task does not panic")?,
    );

    let mut manifest: Manifest = manifest::read_json(&state.manifest()).unwrap_or_default();
    if manifest.source != uri {
        manifest = Manifest { source: uri.to_string(), files: BTreeMap::new() };
    }
    let (dest_owned, verify) = (dest.to_path_buf(), opts.verify);
    let (fresh_files, records) = (files.clone(), manifest.files.clone());
    let needed: Vec<RemoteFile> = tokio::task::spawn_blocking(move || {
        fresh_files.into_iter().filter(|f| !up_to_date(&dest_owned, f, records.get(&f.name), verify)).collect()
    })
    .await
    .expect("the check does not panic");
    let num_bytes: u64 = files.iter().map(|f| f.size).sum();
    if needed.is_empty() {
        // Files the source no longer has may still be recorded: drop them, then mark complete.
        finish(dest, &state, &mut manifest, &files, stale)?;
        let summary = SyncSummary {
            num_files: files.len(),
            num_bytes,
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        tracing::info!(files = summary.num_files, bytes = num_bytes, "model already in sync; nothing downloaded");
        return Ok(summary);
    }
    // Refused before anything is downloaded (and checked again as each file is placed).
    for file in &needed {
        refuse_linked_folders(dest, &file.name)?;
    }
    // The folder is about to change: it is no longer a complete copy until the marker is back.
    let _ = std::fs::remove_file(state.complete());

    let part_size = opts.part_size.max(1);
    let Plan { transfers, tasks, to_fetch } = plan(&state, &needed, part_size)?;
    // Partial files are already allocated, so only the finished copies can need more room than is
    // free (their partial files are renamed, not copied): a plain check of what is left to fetch.
    if let Some(available) = available_bytes(dest).filter(|&a| to_fetch > a) {
        return Err(SyncError::DiskFull { dest: dest.to_path_buf(), needed: to_fetch, available });
    }
    tracing::info!(
        source = uri,
        dest = %dest.display(),
        files = needed.len(),
        bytes = to_fetch,
        resumed_bytes = needed.iter().map(|f| f.size).sum::<u64>() - to_fetch,
        "syncing"
    );

    let fetched = Arc::new(AtomicU64::new(0));
    let progress = spawn_progress(opts.progress, to_fetch, fetched.clone());
    let run =
        Parts { source: Arc::new(source), transfers: Arc::new(transfers), part_size, fetched: fetched.clone(), lock };
    let outcome = run.fetch_all(tasks, opts.concurrency, dest, &state, &mut manifest).await;
    if let Some(p) = progress {
        p.abort();
    }
    outcome?;
    finish(dest, &state, &mut manifest, &files, stale)?;
    let summary = SyncSummary {
        num_files: files.len(),
        num_downloaded: needed.len(),
        num_bytes,
        bytes_downloaded: fetched.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        files = summary.num_files,
        downloaded_files = summary.num_downloaded,
        downloaded_bytes = summary.bytes_downloaded,
        seconds = format!("{:.2}", summary.seconds),
        mb_per_s = format!("{:.1}", summary.throughput_mb_s()),
        "sync finished"
    );
    Ok(summary)
}

/// The files to download, each opened or resumed, and the parts still to fetch.
struct Plan {
    transfers: Vec<Transfer>,
    /// (index into `transfers`, part number).
    tasks: Vec<(usize, u64)>,
    /// Bytes the tasks fetch.
    to_fetch: u64,
}

fn plan(state: &StatePaths, needed: &[RemoteFile], part_size: u64) -> Result<Plan, SyncError> {
    let mut plan = Plan { transfers: Vec::new(), tasks: Vec::new(), to_fetch: 0 };
    for file in needed {
        let (transfer, todo) = start_transfer(state, file, part_size)?;
        for &part in &todo {
            plan.tasks.push((plan.transfers.len(), part));
            let start = part * part_size;
            plan.to_fetch += (start + part_size).min(file.size).saturating_sub(start);
        }
        plan.transfers.push(transfer);
    }
    Ok(plan)
}

/// The parts of a transfer, fetched concurrently; each file is finished (checked, hashed, placed
/// and recorded) as its last part lands.
struct Parts {
    source: Arc<Source>,
    transfers: Arc<Vec<Transfer>>,
    part_size: u64,
    fetched: Arc<AtomicU64>,
    /// Shared with the tasks that finish files, so it outlives any still running after an error.
    lock: Arc<Lock>,
}

impl Parts {
    async fn fetch_all(
        &self,
        tasks: Vec<(usize, u64)>,
        concurrency: usize,
        dest: &Path,
        state: &StatePaths,
        manifest: &mut Manifest,
    ) -> Result<(), SyncError> {
        let transfers = &self.transfers;
        let record_file = |manifest: &mut Manifest, idx: usize, record: FileRecord| -> Result<(), SyncError> {
            manifest.files.insert(transfers[idx].file.name.clone(), record);
            manifest::write_json(&state.manifest(), manifest)
        };
        // Files with nothing left to fetch (fully resumed) finish first.
        for idx in (0..transfers.len()).filter(|&i| transfers[i].remaining.load(Ordering::Relaxed) == 0) {
            record_file(manifest, idx, finish_transfer(dest, &transfers[idx])?)?;
        }
        let results = futures::stream::iter(tasks)
            .map(|(idx, part)| {
                let (source, transfers, fetched, dest) =
                    (self.source.clone(), self.transfers.clone(), self.fetched.clone(), dest.to_path_buf());
                let (lock, part_size) = (self.lock.clone(), self.part_size);
                async move {
                    fetch_part(&source, &transfers[idx], part, part_size, &fetched).await?;
                    if transfers[idx].remaining.fetch_sub(1, Ordering::SeqCst) > 1 {
                        return Ok(None);
                    }
                    // The file's last part: check, hash and place it off the async threads, so the
                    // other parts keep downloading meanwhile.
                    let record = tokio::task::spawn_blocking(move || {
                        let _lock = lock;
                        finish_transfer(&dest, &transfers[idx])
                    })
                    .await
                    .expect("finishing a file does not panic")?;
                    Ok::<_, SyncError>(Some((idx, record)))
                }
            })
            .buffer_unordered(concurrency.max(1));
        let mut results = std::pin::pin!(results);
        while let Some(result) = results.next().await {
            if let Some((idx, record)) = result? {
                record_file(manifest, idx, record)?;
            }
        }
        Ok(())
    }
}

/// Removes files an earlier sync of this source wrote that the source no longer has, saves the
/// manifest and writes the completion marker (last).
fn finish(
    dest: &Path,
    state: &StatePaths,
    manifest: &mut Manifest,
    files: &[RemoteFile],
    keep_stale: Stale,
) -> Result<(), SyncError> {
    let current: std::collections::HashSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
    let stale: Vec<String> = match keep_stale {
        Stale::Remove => manifest.files.keys().filter(|n| !current.contains(n.as_str())).cloned().collect(),
        Stale::Keep => Vec::new(),
    };
    if !stale.is_empty() {
        let _ = std::fs::remove_file(state.complete());
    }
    for name in stale {
        let path = dest.join(&name);
        // Removing through a linked folder would delete a file outside the destination.
        refuse_linked_folders(dest, &name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %name, "removed: no longer in the source"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SyncError::io(&path, e)),
        }
        manifest.files.remove(&name);
    }
    state.remove_partials();
    manifest::write_json(&state.manifest(), manifest)?;
    let completion = Completion {
        source: manifest.source.clone(),
        num_files: files.len(),
        num_bytes: files.iter().map(|f| f.size).sum(),
    };
    manifest::write_json(&state.complete(), &completion)
}

/// Whether `dest` holds a complete sync of `uri` (its marker is there).
pub fn is_complete(uri: &str, dest: &Path) -> bool {
    manifest::read_json::<Completion>(&StatePaths::new(dest).complete()).is_some_and(|c| c.source == uri)
}

/// Where a `--model` value points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder or file on this machine.
    Local(PathBuf),
    /// An object store or HTTPS URI, synced under the download folder.
    Store(String),
    /// A Hugging Face Hub model, kept in the Hub's cache.
    Hub(hub::HubModel),
}

impl ModelSource {
    /// Reads `model` as vLLM does: an existing path is local; `hf://org/name[@rev]` or an `org/name`
    /// that is no path here is a Hub id; another `scheme://` is a store. `revision` (`--revision`)
    /// only applies to Hub models.
    pub fn parse(model: &str, revision: Option<&str>) -> Result<ModelSource, SyncError> {
        let revision = revision.map(str::trim).filter(|r| !r.is_empty());
        let not_hub = |what: &str| SyncError::InvalidUri {
            uri: model.to_string(),
            reason: format!("--revision applies to Hugging Face Hub models, and this is {what}"),
        };
        if let Some(parsed) = hub::HubModel::from_uri(model) {
            let mut parsed = parsed?;
            match (&parsed.revision, revision) {
                (Some(a), Some(b)) if a != b => {
                    return Err(SyncError::InvalidUri {
                        uri: model.to_string(),
                        reason: format!("the URI names revision '{a}' and --revision '{b}'"),
                    });
                }
                (None, Some(b)) => {
                    parsed = hub::HubModel::new(&parsed.repo, Some(b.to_string()))
                        .map_err(|reason| SyncError::InvalidUri { uri: model.to_string(), reason })?;
                }
                _ => {}
            }
            return Ok(ModelSource::Hub(parsed));
        }
        if is_remote(model) {
            return match revision {
                Some(_) => Err(not_hub("an object-store URI")),
                None => Ok(ModelSource::Store(model.to_string())),
            };
        }
        let path = Path::new(model);
        if !path.exists() && hub::HubModel::looks_like_id(model) {
            return hub::HubModel::new(model, revision.map(str::to_string))
                .map(ModelSource::Hub)
                .map_err(|reason| SyncError::InvalidUri { uri: model.to_string(), reason });
        }
        match revision {
            Some(_) => Err(not_hub("a local path")),
            None => Ok(ModelSource::Local(path.to_path_buf())),
        }
    }
}

/// Whether a `--model` value is an object-store URI rather than a local folder.
pub fn is_remote(model: &str) -> bool {
    model.contains("://")
}

/// The folder under `download_dir` a URI syncs to: `s3://bucket/a/b` → `download_dir/s3/bucket/a/b`.
pub fn local_dir(download_dir: &Path, uri: &str) -> PathBuf {
    let mut dir = download_dir.to_path_buf();
    let (scheme, rest) = uri.split_once("://").unwrap_or(("model", uri));
    dir.push(scheme);
    for part in rest.split(['/', '?', '#']).filter(|p| !p.is_empty() && *p != "." && *p != "..") {
        dir.push(part.replace(':', "_"));
    }
    dir
}

/// Where `serve` keeps synced models when `--download-dir` is not given.
pub fn default_download_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("pagoda/models");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/pagoda/models"),
        None => PathBuf::from("/var/cache/pagoda/models"),
    }
}

/// Syncs `uri` for serving. When the store cannot be reached but an earlier sync completed, the
/// cached copy is served (with a warning) so a restart does not depend on the store.
pub async fn ensure_local(uri: &str, download_dir: &Path, opts: &SyncOptions) -> Result<PathBuf, SyncError> {
    let dest = local_dir(download_dir, uri);
    match sync(uri, &dest, opts).await {
        Ok(_) => Ok(dest),
        Err(e @ SyncError::Store { .. }) if is_complete(uri, &dest) => {
            tracing::warn!(%e, dest = %dest.display(), "cannot reach the store; serving the copy synced earlier");
            Ok(dest)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_keeps_model_files_and_patterns_change_it() {
        let keep = file_filter(&SyncOptions::default()).unwrap();
        for name in [
            "model-00001-of-00002.safetensors",
            "config.json",
            "tokenizer.model",
            "chat_template.jinja",
            "merges.txt",
            "sub/config.json",
        ] {
            assert!(keep(name), "{name}");
        }
        for name in ["original/consolidated.00.pth", "README.md", ".gitattributes", ".pagoda-sync/manifest.json"] {
            assert!(!keep(name), "{name}");
        }
        let opts =
            SyncOptions { include: vec!["*.md".into()], exclude: vec!["*.txt".into()], ..SyncOptions::default() };
        let keep = file_filter(&opts).unwrap();
        assert!(keep("README.md") && !keep("merges.txt"));
        let bad = SyncOptions { include: vec!["[".into()], ..SyncOptions::default() };
        assert!(file_filter(&bad).err().unwrap().to_string().starts_with("invalid pattern '['"));
    }

    #[test]
    fn names_that_would_leave_the_folder_or_cannot_be_files_are_refused() {
        let longest = "n".repeat(MAX_NAME_BYTES);
        let deep = ("d".repeat(60) + "/").repeat(6) + "config.json";
        for ok in ["config.json", "sub/model.safetensors", "a.b/c..d", longest.as_str(), deep.as_str()] {
            assert_eq!(name_problem(ok), None, "{ok}");
        }
        let too_long = format!("sub/{longest}x/config.json");
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./x", "a\\b", "a\nb", "sub/", too_long.as_str()] {
            assert!(name_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(
            name_problem(&too_long).unwrap(),
            "a part of it is 256 bytes long, and a file or folder name can have at most 255"
        );
    }

    #[test]
    fn partial_names_are_short_and_distinct_whatever_the_name() {
        let state = StatePaths::new(Path::new("/m"));
        let (partial, parts) = state.partial("sub/model.safetensors");
        assert_eq!(partial, Path::new("/m/.pagoda-sync/partial/sub%2Fmodel.safetensors.partial"));
        assert_eq!(parts, Path::new("/m/.pagoda-sync/partial/sub%2Fmodel.safetensors.parts.json"));
        let long = ("d".repeat(60) + "/").repeat(6) + "config.json";
        let (partial, parts) = state.partial(&long);
        let file_name = |p: &Path| p.file_name().unwrap().len();
        assert!(file_name(partial.as_path()) < 64 && file_name(parts.as_path()) < 64, "{partial:?}");
        assert_ne!(state.partial(&(long.clone() + "x")).0, partial);
        // A part map is never another name's partial file.
        assert_ne!(state.partial("a.parts.json").0, state.partial("a").1);
    }

    #[test]
    fn uris_map_to_folders_under_the_download_dir() {
        let base = Path::new("/cache");
        assert_eq!(local_dir(base, "s3://bucket/models/llama/"), PathBuf::from("/cache/s3/bucket/models/llama"));
        assert_eq!(local_dir(base, "https://host:8080/a/../b"), PathBuf::from("/cache/https/host_8080/a/b"));
        assert!(is_remote("gs://b/m") && !is_remote("/models/llama"));
    }
}
