//! What a sync leaves beside the model, in `DEST/.pagoda-sync/`: the manifest of synced files, the
//! completion marker, the lock, and the partial downloads with their part maps.
//!
//! These are on-disk formats, so (with the API types) they are the only types that derive
//! `Serialize`. Every file here is written to a temporary name and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SyncError;

pub const STATE_DIR: &str = ".pagoda-sync";

/// The longest flattened name a partial file is named by; a longer one is named by its hash. With
/// the endings and `write_json`'s temporary one it stays far below the 255 bytes a file name can
/// have.
const MAX_FLAT_NAME: usize = 100;

/// What was synced: one record per file, from the store's listing and our own hash.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub source: String,
    pub files: BTreeMap<String, FileRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified: String,
    /// The local file's modification time when it was verified, in nanoseconds since the epoch:
    /// unchanged means the content need not be hashed again.
    pub mtime_ns: i128,
    /// XXH3-128 of the content, hex.
    pub xxh3: String,
}

/// Which parts of a partial download are done, so an interrupted sync resumes where it stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartMap {
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified: String,
    pub part_size: u64,
    pub done: Vec<bool>,
}

/// The completion marker, written last.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub source: String,
    pub num_files: usize,
    pub num_bytes: u64,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::io(path, source)
}

/// The state folder's paths for a destination.
pub struct StatePaths {
    pub dir: PathBuf,
}

impl StatePaths {
    pub fn new(dest: &Path) -> StatePaths {
        StatePaths { dir: dest.join(STATE_DIR) }
    }

    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    pub fn complete(&self) -> PathBuf {
        self.dir.join("complete")
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    pub fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    /// The partial file for `name` and its part map. A short name is flattened into one file name
    /// (`%` and `/` escaped), so it reads as the file it becomes; a longer one (a long file name,
    /// deep folders) is named by its hash, as one file name cannot hold it. A hashed name holds
    /// `%x`, which no flattened one does (they have `%` only in `%25` and `%2F`), and the two
    /// endings differ, so no two names share a file.
    pub fn partial(&self, name: &str) -> (PathBuf, PathBuf) {
        let flat = name.replace('%', "%25").replace('/', "%2F");
        let stem = if flat.len() <= MAX_FLAT_NAME {
            flat
        } else {
            format!("%xxh3-{:032x}", xxhash_rust::xxh3::xxh3_128(name.as_bytes()))
        };
        let dir = self.partial_dir();
        (dir.join(format!("{stem}.partial")), dir.join(format!("{stem}.parts.json")))
    }

    /// Empties the partial folder. Called under the lock once every file of a sync is in place, so
    /// what is left belongs to no download: an older version of a file, a file the source no
    /// longer has, or what a failed run started.
    pub fn remove_partials(&self) {
        let dir = self.partial_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for path in entries.flatten().map(|entry| entry.path()) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %e, "cannot remove a leftover partial download");
            }
        }
    }
}

/// Reads a JSON state file; a missing or unreadable one is treated as absent (it is only a cache
/// of work already done, and everything it claims is checked again).
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes JSON to a temporary name, syncs it, and renames it over `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SyncError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    {
        use std::io::Write;
        let mut f = File::create(&tmp).map_err(io_error(&tmp))?;
        f.write_all(&bytes).map_err(io_error(&tmp))?;
        f.sync_all().map_err(io_error(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i128)
}

/// Content hashes of a file from one read: XXH3-128 (our record) and, when asked, MD5 (S3's ETag
/// for objects uploaded in one part), both hex.
pub fn hash_file(path: &Path, with_md5: bool) -> Result<(String, Option<String>), SyncError> {
    let (xxh3, md5, _) = hash_file_with(path, with_md5, None)?;
    Ok((xxh3, md5))
}

/// [`hash_file`], also computing `digest`'s kind of hash (lowercase hex) in the same pass.
pub fn hash_file_with(
    path: &Path,
    with_md5: bool,
    digest: Option<&ContentDigest>,
) -> Result<(String, Option<String>, Option<String>), SyncError> {
    use sha2::Digest;
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut xxh3 = xxhash_rust::xxh3::Xxh3::new();
    let mut md5 = with_md5.then(md5::Md5::new);
    let mut sha256 = matches!(digest, Some(ContentDigest::Sha256(_))).then(sha2::Sha256::new);
    let mut sha1 = matches!(digest, Some(ContentDigest::GitBlobSha1(_))).then(sha1::Sha1::new);
    if let Some(sha1) = sha1.as_mut() {
        // A git blob's id hashes a header with the size before the content.
        let len = file.metadata().map_err(io_error(path))?.len();
        sha1.update(format!("blob {len}\0").as_bytes());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        xxh3.update(&buf[..n]);
        if let Some(md5) = md5.as_mut() {
            md5.update(&buf[..n]);
        }
        if let Some(h) = sha256.as_mut() {
            h.update(&buf[..n]);
        }
        if let Some(h) = sha1.as_mut() {
            h.update(&buf[..n]);
        }
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let md5 = md5.map(|m| hex(&m.finalize()));
    let digest = match (sha256, sha1) {
        (Some(h), _) => Some(hex(&h.finalize())),
        (_, Some(h)) => Some(hex(&h.finalize())),
        _ => None,
    };
    Ok((format!("{:032x}", xxh3.digest128()), md5, digest))
}

/// A digest the source publishes for a file's content, checked once the file is downloaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentDigest {
    /// SHA-256 of the content (the Hugging Face Hub's id of an LFS file).
    Sha256(String),
    /// Git's blob id: SHA-1 of `blob <size>\0` and the content (the Hub's id of a small file).
    GitBlobSha1(String),
}

impl ContentDigest {
    pub fn hex(&self) -> &str {
        match self {
            ContentDigest::Sha256(h) | ContentDigest::GitBlobSha1(h) => h,
        }
    }
}

/// Holds the destination's lock until dropped.
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock, waiting (and saying so) while another sync holds it.
    pub fn acquire(path: &Path) -> Result<Lock, SyncError> {
        if let Some(lock) = Lock::try_acquire(path)? {
            return Ok(lock);
        }
        tracing::info!(lock = %path.display(), "another sync of this folder is running; waiting for it");
        let file = Lock::open(path)?;
        file.lock().map_err(io_error(path))?;
        Ok(Lock { _file: file })
    }

    /// Takes the lock if no one holds it; `None` when someone does.
    pub fn try_acquire(path: &Path) -> Result<Option<Lock>, SyncError> {
        let file = Lock::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(SyncError::io(path, e)),
        }
    }

    fn open(path: &Path) -> Result<File, SyncError> {
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_error(path))
    }
}
