//! Versioned model folders, for a cache that running servers share (a ReadWriteMany volume, or a
//! machine's state directory synced again while its server runs): `pagoda sync --versioned`.
//!
//! ```text
//! DEST/current -> versions/<id>          the version a server started now loads
//! DEST/versions/<id>/...                 one complete copy of the model, never changed once complete
//! DEST/versions/<id>/.pagoda-sync/in-use a server that loaded <id> holds a shared lock on it
//! DEST/.pagoda-sync/lock                 one versioned sync of DEST at a time
//! ```
//!
//! A version's id hashes the store's listing of the files kept (names, sizes, ETags, modification
//! times), so a changed model in the store becomes a new folder and the files servers have mapped
//! are never rewritten. A new version starts as hard links to the files of the current one that
//! the manifest records, so only what changed is downloaded (a rename puts each new file in
//! place, leaving the linked inode as it was). The `current` link is replaced by a rename once the
//! version is complete. Then every other version whose in-use lock can be taken exclusively (no
//! server holds it) is removed: its completion marker first, so a server that resolved `current`
//! to it just before finds it gone and resolves again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::manifest::{self, Completion, Lock, Manifest, STATE_DIR, StatePaths};
use super::{RemoteFile, Stale, SyncError, SyncOptions, SyncSummary};

pub const CURRENT: &str = "current";
pub const VERSIONS: &str = "versions";
const IN_USE: &str = "in-use";

/// What a versioned sync did.
#[derive(Debug)]
pub struct VersionedSync {
    pub summary: SyncSummary,
    /// The version `current` now names.
    pub version: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Versions removed because no server held them.
    pub removed: Vec<String>,
    /// Versions kept because a running server holds them.
    pub in_use: Vec<String>,
}

/// The id of the version a listing describes: 16 hex digits of SHA-256 over every kept file's
/// name, size, ETag and modification time, in name order.
pub fn version_id(files: &[RemoteFile]) -> String {
    use sha2::Digest;
    let mut sorted: Vec<&RemoteFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hash = sha2::Sha256::new();
    for f in sorted {
        let line = serde_json::json!([f.name, f.size, f.e_tag, f.last_modified]).to_string();
        hash.update(line.as_bytes());
        hash.update(b"\n");
    }
    hash.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |e| SyncError::io(path, e)
}

/// Syncs `uri` into a new or existing version under `dest`, points `dest/current` at it, and
/// removes the versions no server holds.
pub async fn sync_versioned(uri: &str, dest: &Path, opts: &SyncOptions) -> Result<VersionedSync, SyncError> {
    let started = Instant::now();
    let versions = dest.join(VERSIONS);
    let state = dest.join(STATE_DIR);
    for path in [dest, &versions, &state] {
        super::refuse_link(path)?;
    }
    std::fs::create_dir_all(&versions).map_err(io(&versions))?;
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    let lock_path = state.join("lock");
    let _lock =
        tokio::task::spawn_blocking(move || Lock::acquire(&lock_path)).await.expect("the lock task does not panic")?;

    let (source, files) = super::list_model(uri, opts).await?;
    let version = version_id(&files);
    let dir = versions.join(&version);
    super::refuse_link(&dir)?;
    if !dir.exists() {
        seed_from_current(dest, &dir, uri);
    }
    let summary = super::transfer(source, uri, &dir, files, opts, Stale::Remove, started).await?;
    point_current(dest, &version)?;
    tracing::info!(version, dir = %dir.display(), "current version");
    let (removed, in_use) = remove_unused_versions(dest, Some(&version))?;
    Ok(VersionedSync { summary, version, dir, removed, in_use })
}

/// The version `dest/current` names, if it is a link into `versions/`.
fn current_version(dest: &Path) -> Option<String> {
    let target = std::fs::read_link(dest.join(CURRENT)).ok()?;
    let mut parts = target.components();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if a.as_os_str() == VERSIONS => b.as_os_str().to_str().map(str::to_string),
        _ => None,
    }
}

/// Starts `dir` as hard links to the files the current complete version recorded, with its
/// manifest, so the transfer downloads only what changed. Best effort: anything that cannot be
/// linked (another filesystem, no hard links) is downloaded instead.
fn seed_from_current(dest: &Path, dir: &Path, uri: &str) {
    let Some(current) = current_version(dest) else { return };
    let from = dest.join(VERSIONS).join(&current);
    if !super::is_complete(uri, &from) {
        return;
    }
    let Some(mut manifest) = manifest::read_json::<Manifest>(&StatePaths::new(&from).manifest()) else { return };
    let state = StatePaths::new(dir);
    if std::fs::create_dir_all(&state.dir).is_err() {
        return;
    }
    manifest.files.retain(|name, _| {
        let target = dir.join(name);
        super::refuse_linked_folders(&from, name).is_ok()
            && target.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok())
            && std::fs::hard_link(from.join(name), &target).is_ok()
    });
    let linked = manifest.files.len();
    if manifest::write_json(&state.manifest(), &manifest).is_ok() {
        tracing::info!(from = current, files = linked, "new version starts from the current one's files");
    }
}

/// Points `dest/current` at `versions/<version>`: a new link renamed over the old one.
fn point_current(dest: &Path, version: &str) -> Result<(), SyncError> {
    let link = dest.join(CURRENT);
    if std::fs::symlink_metadata(&link).is_ok_and(|m| !m.file_type().is_symlink()) {
        return Err(SyncError::io(
            &link,
            std::io::Error::other("exists and is not a link; a versioned sync owns this name"),
        ));
    }
    let tmp = dest.join(format!(".{CURRENT}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new(VERSIONS).join(version), &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &link).map_err(io(&link))?;
    if let Ok(d) = File::open(dest) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes every version under `dest` but `keep` that no server holds; returns the versions
/// removed and those kept because a server holds them. The caller holds `dest`'s sync lock.
pub fn remove_unused_versions(dest: &Path, keep: Option<&str>) -> Result<(Vec<String>, Vec<String>), SyncError> {
    let versions = dest.join(VERSIONS);
    let (mut removed, mut in_use) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(&versions) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((removed, in_use)),
        Err(e) => return Err(SyncError::io(&versions, e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(&versions))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        // Only folders a versioned sync made; a link is never followed.
        if Some(name.as_str()) == keep || !entry.file_type().map_err(io(&versions))?.is_dir() {
            continue;
        }
        let dir = entry.path();
        let state = dir.join(STATE_DIR);
        let lock = match std::fs::create_dir_all(&state).and_then(|()| open_in_use(&dir)) {
            Ok(file) => file,
            Err(e) => return Err(SyncError::io(&state, e)),
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(version = name, "kept: a running server holds it");
                in_use.push(name);
                continue;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(SyncError::io(&state.join(IN_USE), e)),
        }
        // The marker first: a server that resolved `current` to this version just before sees
        // it incomplete once it holds the lock, and resolves again.
        let marker = StatePaths::new(&dir).complete();
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SyncError::io(&marker, e)),
        }
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        tracing::info!(version = name, "removed: no server holds it");
        removed.push(name);
    }
    removed.sort();
    in_use.sort();
    Ok((removed, in_use))
}

/// Whether `name` is a model folder as the Helm chart names one: 16 lowercase hex digits (of the
/// SHA-256 of the model's URI).
pub fn is_model_folder_name(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// On a cache several servers share: removes the versions of the other model folders beside
/// `dest` (named as `is_model_folder_name` says) that no server holds and no sync is writing, and
/// a folder left with no version. A folder synced without `--versioned` is left alone: no server
/// says whether it reads it. Returns the folders removed whole.
pub fn remove_unused_models(dest: &Path) -> Result<Vec<String>, SyncError> {
    let Some(parent) = dest.parent() else { return Ok(Vec::new()) };
    let own = dest.file_name();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(parent).map_err(io(parent))? {
        let entry = entry.map_err(io(parent))?;
        let name = entry.file_name();
        let Some(text) = name.to_str().map(str::to_string) else { continue };
        if !is_model_folder_name(&text)
            || Some(name.as_os_str()) == own
            || !entry.file_type().map_err(io(parent))?.is_dir()
        {
            continue;
        }
        let folder = entry.path();
        if !folder.join(VERSIONS).is_dir() {
            tracing::info!(folder = %folder.display(), "kept: synced without --versioned, so no server says whether it reads it");
            continue;
        }
        let state = folder.join(STATE_DIR);
        std::fs::create_dir_all(&state).map_err(io(&state))?;
        let Some(_lock) = Lock::try_acquire(&state.join("lock"))? else {
            tracing::info!(folder = %folder.display(), "kept: a sync of it is running");
            continue;
        };
        let (_, in_use) = remove_unused_versions(&folder, None)?;
        if in_use.is_empty() {
            std::fs::remove_dir_all(&folder).map_err(io(&folder))?;
            tracing::info!(folder = %folder.display(), "removed another model: no server holds any version of it");
            removed.push(text);
        }
    }
    removed.sort();
    Ok(removed)
}

fn open_in_use(dir: &Path) -> std::io::Result<File> {
    let path = dir.join(STATE_DIR).join(IN_USE);
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
}

/// A server's hold on the model version it loaded: while it exists, no versioned sync removes
/// that version.
#[derive(Debug)]
pub struct InUse {
    _file: File,
}

/// The folder a server loads for `dir`, and its hold on it: for a versioned folder (it has a
/// `current` link and no `config.json` of its own) the complete version `current` names, held with
/// a shared lock; any other folder as it is, with no hold.
pub fn resolve_for_serving(dir: &Path) -> Result<(PathBuf, Option<InUse>), SyncError> {
    if !dir.join(CURRENT).exists() || dir.join("config.json").exists() {
        return Ok((dir.to_path_buf(), None));
    }
    // A sync may replace `current` and remove the version it named between our reading the link
    // and our taking the lock: then the version's marker is gone, and the link is read again.
    for _ in 0..5 {
        let version = std::fs::canonicalize(dir.join(CURRENT)).map_err(io(dir))?;
        let file = match open_in_use(&version) {
            Ok(file) => file,
            // Removed since the link was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SyncError::io(&version, e)),
        };
        file.lock_shared().map_err(io(&version))?;
        let complete = manifest::read_json::<Completion>(&StatePaths::new(&version).complete()).is_some();
        if complete {
            tracing::info!(version = %version.display(), "serving this version; syncs keep it while the server runs");
            return Ok((version, Some(InUse { _file: file })));
        }
    }
    Err(SyncError::io(
        &dir.join(CURRENT),
        std::io::Error::other("names no complete version (a sync is replacing it); try again"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64, e_tag: &str) -> RemoteFile {
        let mut file = RemoteFile::at_location(name.into(), name, size, None);
        file.e_tag = Some(e_tag.into());
        file
    }

    #[test]
    fn a_version_id_names_the_listing_whatever_its_order() {
        let a = [file("config.json", 10, "a"), file("model.safetensors", 99, "b")];
        let b = [file("model.safetensors", 99, "b"), file("config.json", 10, "a")];
        assert_eq!(version_id(&a), version_id(&b));
        assert_eq!(version_id(&a).len(), 16);
        let changed = [file("config.json", 10, "a"), file("model.safetensors", 99, "c")];
        assert_ne!(version_id(&a), version_id(&changed));
    }
}
