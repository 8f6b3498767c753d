//! Versioned model folders, for a cache that running servers share (a ReadWriteMany volume, or a
//! machine's state directory synced again while its server runs): `pagoda sync --versioned`.
//!
//! ```text
//! DEST/current                 a file naming the version a server started now loads
//! DEST/versions/<id>/          one complete copy of the model, never changed once it has this name
//! DEST/versions/<id>/.pagoda-sync/in-use   servers that loaded <id> hold a shared lock on it
//! DEST/versions/.tmp-<id>/     a version being built (an interrupted build resumes)
//! DEST/.trash/                 versions on their way out
//! DEST/.pagoda-sync/lock       one sync of DEST at a time
//! ```
//!
//! A version's id hashes the store's listing of the files kept (names, sizes, ETags, modification
//! times), so a changed model in the store becomes a new folder and the files servers have mapped
//! are never rewritten. A version is built under a temporary name, starting as hard links to the
//! files the current version (or a folder synced before `--versioned`) recorded, so only what
//! changed is downloaded; a rename gives it its name once complete, and only then does `current`
//! (a file, replaced by a rename: no symbolic links, which some network filesystems lack) name it.
//! Versions are removed only while their in-use lock can be taken exclusively, that is, while no
//! server holds them: the completion marker first, so that a server which read the old `current`
//! just before finds it gone and reads again, then a rename into `.trash`, emptied once no file in
//! it is open (network filesystems keep an open file's name until it is closed).
//!
//! The locks are `flock`s: on NFS they must reach the server (NFSv4, or NFSv3 with its lock
//! manager; not `nolock` or `local_lock`), or a node cannot see another node's servers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::manifest::{self, Completion, Lock, Manifest, STATE_DIR, StatePaths};
use super::{RemoteFile, Stale, SyncError, SyncOptions, SyncSummary};

pub const CURRENT: &str = "current";
pub const VERSIONS: &str = "versions";
const IN_USE: &str = "in-use";
const TRASH: &str = ".trash";
const BUILDING: &str = ".tmp-";

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

/// Whether `name` is a model folder as the Helm chart names one, or a version id: 16 lowercase
/// hex digits.
pub fn is_model_folder_name(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |e| SyncError::io(path, e)
}

/// Syncs `uri` into a new or existing version under `dest`, makes `dest/current` name it, and
/// removes the versions no server holds.
pub async fn sync_versioned(uri: &str, dest: &Path, opts: &SyncOptions) -> Result<VersionedSync, SyncError> {
    let started = Instant::now();
    let versions = dest.join(VERSIONS);
    let state = dest.join(STATE_DIR);
    for path in [dest, &versions, &state, &dest.join(TRASH)] {
        super::refuse_link(path)?;
    }
    std::fs::create_dir_all(&versions).map_err(io(&versions))?;
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    let lock_path = state.join("lock");
    let _lock =
        tokio::task::spawn_blocking(move || Lock::acquire(&lock_path)).await.expect("the lock task does not panic")?;
    empty_trash(dest);

    let (source, files) = super::list_model(uri, opts).await?;
    let version = version_id(&files);
    let dir = versions.join(&version);
    super::refuse_link(&dir)?;
    let summary = if super::is_complete(uri, &dir) {
        tracing::info!(version, "this version is complete already; nothing downloaded");
        SyncSummary {
            num_files: files.len(),
            num_bytes: files.iter().map(|f| f.size).sum(),
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        }
    } else {
        let build = versions.join(format!("{BUILDING}{version}"));
        super::refuse_link(&build)?;
        if !build.exists() {
            seed(dest, &build, uri);
        }
        let summary = super::transfer(source, uri, &build, files, opts, Stale::Remove, started).await?;
        // Servers open it read-only (their mount may be), so it exists before the version does.
        let in_use = build.join(STATE_DIR).join(IN_USE);
        File::create(&in_use).map_err(io(&in_use))?;
        if dir.exists() {
            // Not complete, so no server loaded it: a leftover, out of the way first.
            to_trash(dest, &dir)?;
        }
        std::fs::rename(&build, &dir).map_err(io(&dir))?;
        sync_dir(&versions);
        summary
    };
    write_current(dest, &version)?;
    tracing::info!(version, dir = %dir.display(), "current version");
    let (removed, in_use) = remove_unused_versions(dest, &[&version])?;
    empty_trash(dest);
    Ok(VersionedSync { summary, version, dir, removed, in_use })
}

/// The version `dest/current` names, if it is a file holding a version id.
fn current_version(dest: &Path) -> Option<String> {
    let path = dest.join(CURRENT);
    if !std::fs::symlink_metadata(&path).ok()?.is_file() {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    is_model_folder_name(id).then(|| id.to_string())
}

/// Starts the build folder `build` as hard links to the files the current complete version
/// recorded (or, the first time, those of a complete sync made into `dest` itself before
/// `--versioned`), with their manifest, so the transfer downloads only what changed. Best effort:
/// anything that cannot be linked (another filesystem, no hard links) is downloaded instead.
fn seed(dest: &Path, build: &Path, uri: &str) {
    let from = match current_version(dest) {
        Some(current) => dest.join(VERSIONS).join(current),
        None => dest.to_path_buf(),
    };
    if !super::is_complete(uri, &from) {
        return;
    }
    let Some(mut manifest) = manifest::read_json::<Manifest>(&StatePaths::new(&from).manifest()) else { return };
    let state = StatePaths::new(build);
    if std::fs::create_dir_all(&state.dir).is_err() {
        return;
    }
    manifest.files.retain(|name, _| {
        let target = build.join(name);
        super::refuse_linked_folders(&from, name).is_ok()
            && target.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok())
            && std::fs::hard_link(from.join(name), &target).is_ok()
    });
    let linked = manifest.files.len();
    if manifest::write_json(&state.manifest(), &manifest).is_ok() {
        tracing::info!(from = %from.display(), files = linked, "the new version starts from these files");
    }
}

/// Makes `dest/current` name `version`: a new file renamed over the old one.
fn write_current(dest: &Path, version: &str) -> Result<(), SyncError> {
    let path = dest.join(CURRENT);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        return Err(SyncError::io(&path, std::io::Error::other("is not a file; a versioned sync owns this name")));
    }
    let tmp = dest.join(format!(".{CURRENT}.tmp-{}", std::process::id()));
    {
        use std::io::Write;
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(format!("{version}\n").as_bytes()).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dest);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Moves `path` (a version, or another model's folder) into `dest/.trash` under a unique name.
fn to_trash(dest: &Path, path: &Path) -> Result<(), SyncError> {
    let trash = dest.join(TRASH);
    std::fs::create_dir_all(&trash).map_err(io(&trash))?;
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let target = trash.join(format!("{name}-{}-{nanos}", std::process::id()));
    std::fs::rename(path, &target).map_err(io(path))
}

/// Deletes what `.trash` holds. Best effort: a file still open somewhere (a network filesystem
/// keeps it under a temporary name until it is closed) leaves its folder for the next sync.
fn empty_trash(dest: &Path) {
    let trash = dest.join(TRASH);
    let Ok(entries) = std::fs::read_dir(&trash) else { return };
    for path in entries.flatten().map(|e| e.path()) {
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::info!(path = %path.display(), %e, "left for the next sync: something in it is still open");
        }
    }
}

/// Takes `version`'s in-use lock exclusively: `None` while a server holds it.
fn lock_unused(version: &Path) -> Result<Option<Lock>, SyncError> {
    let state = version.join(STATE_DIR);
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    // Opened for writing: on NFS an exclusive flock is a write lock, which needs a writable file.
    Lock::try_acquire(&state.join(IN_USE))
}

/// Removes `version` (a folder under `dest/versions`) if no server holds it: `true` when removed.
fn remove_if_unused(dest: &Path, version: &Path) -> Result<bool, SyncError> {
    let Some(lock) = lock_unused(version)? else { return Ok(false) };
    // The marker first: a server that read `current` just before sees the version incomplete
    // once it holds the lock, and reads `current` again.
    let marker = StatePaths::new(version).complete();
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SyncError::io(&marker, e)),
    }
    to_trash(dest, version)?;
    drop(lock);
    Ok(true)
}

/// Removes every version under `dest` but those in `keep` that no server holds, and abandoned
/// builds; returns the versions removed and those kept because a server holds them. The caller
/// holds `dest`'s sync lock.
pub fn remove_unused_versions(dest: &Path, keep: &[&str]) -> Result<(Vec<String>, Vec<String>), SyncError> {
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
        if keep.contains(&name.as_str()) || !entry.file_type().map_err(io(&versions))?.is_dir() {
            continue;
        }
        if name.starts_with(BUILDING) {
            // A build of another listing that never finished: no server ever loaded it.
            to_trash(dest, &entry.path())?;
            continue;
        }
        if !is_model_folder_name(&name) {
            continue;
        }
        if remove_if_unused(dest, &entry.path())? {
            tracing::info!(version = name, "removed: no server holds it");
            removed.push(name);
        } else {
            tracing::info!(version = name, "kept: a running server holds it");
            in_use.push(name);
        }
    }
    removed.sort();
    in_use.sort();
    Ok((removed, in_use))
}

/// On a cache several servers share: removes the versions of the other model folders beside
/// `dest` (named as `is_model_folder_name` says) that no server holds and no sync is writing. A
/// folder's current version goes too, and the folder with it, only once `current` has not changed
/// for `grace` (so a pod between its sync and its server's start keeps its model). A folder that
/// still holds files synced without `--versioned` is left alone: no server says whether it reads
/// them. Returns the folders removed whole.
pub fn remove_unused_models(dest: &Path, grace: Duration) -> Result<Vec<String>, SyncError> {
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
        if !folder.join(VERSIONS).is_dir() || folder.join("config.json").exists() {
            tracing::info!(folder = %folder.display(), "kept: it holds files synced without --versioned");
            continue;
        }
        let state = folder.join(STATE_DIR);
        std::fs::create_dir_all(&state).map_err(io(&state))?;
        let Some(lock) = Lock::try_acquire(&state.join("lock"))? else {
            tracing::info!(folder = %folder.display(), "kept: a sync of it is running");
            continue;
        };
        let current = current_version(&folder);
        let keep: Vec<&str> = current.iter().map(String::as_str).collect();
        remove_unused_versions(&folder, &keep)?;
        empty_trash(&folder);
        let age = std::fs::metadata(folder.join(CURRENT))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::MAX);
        if age < grace {
            continue;
        }
        let held = match &current {
            Some(id) => !remove_if_unused(&folder, &folder.join(VERSIONS).join(id))?,
            None => false,
        };
        if held {
            continue;
        }
        to_trash(dest, &folder)?;
        drop(lock);
        tracing::info!(folder = %folder.display(), "removed another model: no server holds it");
        removed.push(text);
    }
    empty_trash(dest);
    removed.sort();
    Ok(removed)
}

/// A server's hold on the model version it loaded: while it exists, no versioned sync removes
/// that version.
#[derive(Debug)]
pub struct InUse {
    _file: File,
}

/// The folder a server loads for `dir`, and its hold on it: for a versioned folder (its `current`
/// is a file) the complete version `current` names, held with a shared lock taken on a file
/// opened read-only (the server's mount may be); any other folder as it is, with no hold.
pub fn resolve_for_serving(dir: &Path) -> Result<(PathBuf, Option<InUse>), SyncError> {
    let current_path = dir.join(CURRENT);
    if !std::fs::symlink_metadata(&current_path).is_ok_and(|m| m.is_file()) || !dir.join(VERSIONS).is_dir() {
        return Ok((dir.to_path_buf(), None));
    }
    // A sync may replace `current` and remove the version it named between our reading it and
    // our taking the lock: the version's marker (or the version) is then gone, and we read again.
    let mut last = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let Some(id) = current_version(dir) else {
            return Err(SyncError::io(&current_path, std::io::Error::other("does not hold a version id")));
        };
        let version = dir.join(VERSIONS).join(&id);
        last = id;
        let path = version.join(STATE_DIR).join(IN_USE);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SyncError::io(&path, e)),
        };
        file.lock_shared().map_err(io(&path))?;
        if manifest::read_json::<Completion>(&StatePaths::new(&version).complete()).is_some() {
            tracing::info!(version = %version.display(), "serving this version; syncs keep it while the server runs");
            return Ok((version, Some(InUse { _file: file })));
        }
    }
    Err(SyncError::io(
        &current_path,
        std::io::Error::other(format!("names version {last}, which is not complete; run the sync again")),
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
        assert!(is_model_folder_name(&version_id(&a)));
        let changed = [file("config.json", 10, "a"), file("model.safetensors", 99, "c")];
        assert_ne!(version_id(&a), version_id(&changed));
    }
}
