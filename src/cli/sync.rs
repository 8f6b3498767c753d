//! `pagoda sync SRC DEST`: copy a model from an object store into a local folder, or from the
//! Hugging Face Hub into its cache. Also the
//! store flags `serve` shares for `--model s3://...`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use clap::{Args, ValueEnum};

use super::parse_bytes;
use crate::storage::hub::{self, HubOptions};
use crate::storage::{self, ModelSource, ProgressMode, StoreOptions, SyncOptions};

/// How model files are fetched from an object store.
#[derive(Clone, Debug, Args)]
pub struct StoreArgs {
    /// Endpoint of an S3-compatible store (MinIO, Ceph, R2) or an emulator; AWS_ENDPOINT_URL works too.
    #[arg(long, env = "PAGODA_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Allow plain http:// endpoints and URLs.
    #[arg(long, env = "PAGODA_ALLOW_HTTP")]
    pub allow_http: bool,

    /// Also sync files matching this glob (repeat or comma-separate). By default: *.safetensors,
    /// *.json, tokenizer*, *.jinja, *.model, *.txt.
    #[arg(long, env = "PAGODA_INCLUDE", value_delimiter = ',')]
    pub include: Vec<String>,

    /// Skip files matching this glob (repeat or comma-separate).
    #[arg(long, env = "PAGODA_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<String>,

    /// Ranged parts downloading at once, across all files.
    #[arg(long, env = "PAGODA_SYNC_CONCURRENCY", default_value_t = storage::DEFAULT_CONCURRENCY as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sync_concurrency: u16,

    /// Size of each ranged part (e.g. 16MiB).
    #[arg(long, env = "PAGODA_SYNC_PART_SIZE", default_value = "16MiB", value_parser = parse_bytes)]
    pub sync_part_size: usize,

    /// Hash every local file instead of trusting unchanged sizes and times.
    #[arg(long, env = "PAGODA_SYNC_VERIFY")]
    pub verify: bool,

    /// The branch, tag or commit of a Hugging Face Hub model (default: main).
    #[arg(long, env = "PAGODA_REVISION")]
    pub revision: Option<String>,

    /// Hugging Face token for gated and private models (default: HF_TOKEN, then the token
    /// `huggingface-cli login` saved).
    #[arg(long)]
    pub hf_token: Option<String>,

    /// Progress: a bar on a terminal and log lines otherwise (auto), log lines, or nothing.
    #[arg(long, env = "PAGODA_PROGRESS", value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    Auto,
    Log,
    Off,
}

impl StoreArgs {
    pub fn to_options(&self) -> anyhow::Result<SyncOptions> {
        anyhow::ensure!(self.sync_part_size >= 1 << 20, "--sync-part-size must be at least 1MiB");
        Ok(SyncOptions {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            concurrency: self.sync_concurrency as usize,
            part_size: self.sync_part_size as u64,
            verify: self.verify,
            progress: match self.progress {
                Progress::Auto => ProgressMode::Auto,
                Progress::Log => ProgressMode::Log,
                Progress::Off => ProgressMode::Off,
            },
            store: StoreOptions { endpoint: self.endpoint.clone(), allow_http: self.allow_http },
        })
    }

    /// Where the Hub is and the token, from these flags and `huggingface_hub`'s variables; a
    /// `--download-dir` given explicitly is the Hub cache (as in vLLM).
    pub fn hub_options(&self, download_dir: Option<&std::path::Path>) -> HubOptions {
        let mut hub = HubOptions::from_env(self.hf_token.clone(), self.allow_http);
        if let Some(dir) = download_dir {
            hub.cache_dir = dir.to_path_buf();
        }
        hub
    }
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The model: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX (also azure:// and
    /// https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX), an https:// base URL, or a Hugging
    /// Face Hub model (hf://org/name[@revision], or org/name). A local folder, or none at all (the
    /// demo model), leaves nothing to sync.
    #[arg(env = "PAGODA_MODEL")]
    pub source: Option<String>,

    /// The local folder to sync into (created if needed). Without it, the folder under
    /// --download-dir that `pagoda serve --model SOURCE` uses. For a Hub model, the Hub cache to
    /// fill (default: HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub); the snapshot folder
    /// inside it is printed.
    pub dest: Option<PathBuf>,

    /// Where `serve` keeps synced models (default: $XDG_CACHE_HOME/pagoda/models or
    /// ~/.cache/pagoda/models); used when DEST is not given.
    #[arg(long, env = "PAGODA_DOWNLOAD_DIR")]
    pub download_dir: Option<PathBuf>,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,

    /// After a successful sync into DEST, delete the other model folders beside it: the folders
    /// named by 16 hex digits, as the Helm chart names a model URI's folder. Only for a cache no
    /// other server reads (the chart passes it for an emptyDir, a StatefulSet's own claim or a
    /// ReadWriteOnce claim), so that switching models does not fill the disk.
    #[arg(long, requires = "dest")]
    pub remove_other_models: bool,

    /// Keep DEST as versions of the model, for a cache running servers share: each version the
    /// store's listing describes syncs into DEST/versions/ID (starting from hard links to the
    /// current version's unchanged files), DEST/current then names it, and the versions no
    /// running server holds are removed. `pagoda serve --model DEST` serves `current` and holds
    /// it. Files a server has mapped are never rewritten.
    #[arg(long)]
    pub versioned: bool,

    /// With --versioned: also remove the versions of the other model folders beside DEST (16 hex
    /// digits, as the chart names them) that no running server holds and no sync is writing, and
    /// a folder left with none. For a cache several servers share (the chart passes it for a
    /// ReadWriteMany claim).
    #[arg(long, requires = "versioned", requires = "dest")]
    pub remove_unused_models: bool,

    /// With --remove-unused-models: another model's current version (and its folder) goes only
    /// once its `current` has not changed for this many seconds, so that a pod between its sync and
    /// its server's start keeps its model.
    #[arg(long, default_value_t = 86_400, requires = "remove_unused_models")]
    pub unused_model_grace: u64,
}

/// Deletes the folders beside `dest` named by 16 lowercase hex digits; returns their names.
fn remove_other_models(dest: &Path) -> anyhow::Result<Vec<String>> {
    let Some(parent) = dest.parent() else { return Ok(Vec::new()) };
    let own = dest.file_name();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(parent).with_context(|| format!("cannot list {}", parent.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        // A symbolic link is never followed or removed: only real folders a sync made.
        if !storage::versions::is_model_folder_name(text)
            || Some(name.as_os_str()) == own
            || !entry.file_type()?.is_dir()
        {
            continue;
        }
        std::fs::remove_dir_all(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        tracing::info!(folder = %entry.path().display(), "removed another model's folder");
        removed.push(text.to_string());
    }
    removed.sort();
    Ok(removed)
}

pub fn run(args: SyncArgs) -> anyhow::Result<()> {
    let opts = args.store.to_options()?;
    let Some(model) = args.source.as_deref().filter(|s| !s.is_empty()) else {
        tracing::info!("no model is configured (the demo model); nothing to sync");
        return Ok(());
    };
    let source = match ModelSource::parse(model, args.store.revision.as_deref())? {
        ModelSource::Local(_) => {
            tracing::info!(model, "the model is a local folder; nothing to sync");
            return Ok(());
        }
        ModelSource::Hub(hub_model) => {
            // DEST, when given, is the Hub cache to fill.
            anyhow::ensure!(
                !args.versioned,
                "--versioned applies to object-store models; a Hugging Face Hub cache already keeps each revision \
                 in a snapshot folder of its own"
            );
            let hub_opts = args.store.hub_options(args.dest.as_deref().or(args.download_dir.as_deref()));
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let snapshot = runtime.block_on(hub::ensure(&hub_model, &hub_opts, &opts))?;
            let removed = prune(&args)?;
            return report(&args, model, &snapshot.dir, &snapshot.summary, Some(&snapshot.commit), &removed, None);
        }
        ModelSource::Store(uri) => uri,
    };
    let dest = match &args.dest {
        Some(dest) => dest.clone(),
        None => storage::local_dir(&args.download_dir.clone().unwrap_or_else(storage::default_download_dir), &source),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.versioned {
        let synced = runtime.block_on(storage::versions::sync_versioned(&source, &dest, &opts))?;
        let mut removed = prune(&args)?;
        if args.remove_unused_models {
            let grace = std::time::Duration::from_secs(args.unused_model_grace);
            removed.extend(storage::versions::remove_unused_models(&dest, grace)?);
        }
        return report(&args, &source, &synced.dir, &synced.summary, None, &removed, Some(&synced));
    }
    let summary = runtime.block_on(storage::sync(&source, &dest, &opts))?;
    let removed = prune(&args)?;
    report(&args, &source, &dest, &summary, None, &removed, None)
}

/// `--remove-other-models`, once the sync has succeeded.
fn prune(args: &SyncArgs) -> anyhow::Result<Vec<String>> {
    match (&args.dest, args.remove_other_models) {
        (Some(dest), true) => remove_other_models(dest),
        _ => Ok(Vec::new()),
    }
}

fn report(
    args: &SyncArgs,
    source: &str,
    dest: &std::path::Path,
    summary: &storage::SyncSummary,
    commit: Option<&str>,
    removed: &[String],
    versioned: Option<&storage::versions::VersionedSync>,
) -> anyhow::Result<()> {
    if args.json {
        let mut value = serde_json::json!({
            "source": source,
            "dest": dest,
            "files": summary.num_files,
            "bytes": summary.num_bytes,
            "downloaded_files": summary.num_downloaded,
            "downloaded_bytes": summary.bytes_downloaded,
            "seconds": summary.seconds,
            "mb_per_s": summary.throughput_mb_s(),
        });
        if let Some(commit) = commit {
            value["commit"] = serde_json::json!(commit);
        }
        if args.remove_other_models || args.remove_unused_models {
            value["removed_other_models"] = serde_json::json!(removed);
        }
        if let Some(v) = versioned {
            value["version"] = serde_json::json!(v.version);
            value["removed_versions"] = serde_json::json!(v.removed);
            value["versions_in_use"] = serde_json::json!(v.in_use);
        }
        println!("{value}");
    } else {
        println!(
            "{} files ({} bytes) in {}: downloaded {} files, {} bytes in {:.2} s ({:.1} MB/s)",
            summary.num_files,
            summary.num_bytes,
            dest.display(),
            summary.num_downloaded,
            summary.bytes_downloaded,
            summary.seconds,
            summary.throughput_mb_s()
        );
    }
    Ok(())
}
