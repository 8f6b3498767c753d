//! `pagoda serve`: the OpenAI-compatible server. Listens at once, loads the model in the
//! background (`/ready` says 503 until it is loaded), serves, and drains on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use super::sync::StoreArgs;
use super::{EngineArgs, parse_bytes};
use crate::api::{AppState, LoadedModel, ServedModel, ServerConfig, bind_address, serve};
use crate::engine::driver::EngineHandle;
use crate::launch::{EngineOptions, load_engine, served_model_name};
use crate::storage::{self, ModelSource};
use crate::telemetry::{Telemetry, cloud};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model, as with --model (`pagoda serve MODEL`, as `vllm serve MODEL`).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Address to listen on.
    #[arg(long, env = "PAGODA_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "PAGODA_PORT", default_value_t = 8000)]
    pub port: u16,

    /// API key clients must send as 'Authorization: Bearer <key>'. Several keys: repeat the flag or
    /// separate them with commas. Without any key the API is open.
    #[arg(long, env = "PAGODA_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,

    /// File holding API keys, one per line (for secrets mounted as files).
    #[arg(long, env = "PAGODA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Most sequences that may wait for the engine; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "PAGODA_MAX_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted.
    #[arg(long, env = "PAGODA_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// CORS origins allowed ('*' for any), comma-separated or a JSON list. CORS is off without it.
    #[arg(long, env = "PAGODA_ALLOWED_ORIGINS", value_parser = parse_list)]
    pub allowed_origins: Option<ListArg>,

    /// CORS methods allowed.
    #[arg(long, env = "PAGODA_ALLOWED_METHODS", value_parser = parse_list, default_value = "*")]
    pub allowed_methods: ListArg,

    /// CORS request headers allowed.
    #[arg(long, env = "PAGODA_ALLOWED_HEADERS", value_parser = parse_list, default_value = "*")]
    pub allowed_headers: ListArg,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "PAGODA_MAX_REQUEST_BODY_BYTES", value_parser = parse_bytes, default_value = "16MiB")]
    pub max_request_body_bytes: usize,

    /// Most connections open at once; a connection beyond it gets 503 and is closed. Lowered to
    /// fit the open-files limit (whose soft value the server raises to the hard one).
    #[arg(long, env = "PAGODA_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client gets to send a request's headers, and again its whole body (then 408);
    /// a connection that sends nothing is closed after it.
    #[arg(long, env = "PAGODA_REQUEST_READ_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_read_timeout: u64,

    /// Seconds without a turn of the engine loop after which /health reports 503.
    #[arg(long, env = "PAGODA_ENGINE_STALL_TIMEOUT", default_value_t = 300)]
    pub engine_stall_timeout: u64,

    /// Where request sampling defaults come from: 'auto' uses the model's generation_config.json,
    /// 'vllm' uses vLLM's neutral defaults.
    #[arg(long, env = "PAGODA_GENERATION_CONFIG", value_enum, default_value_t = GenerationConfig::Auto)]
    pub generation_config: GenerationConfig,

    /// Do not log a line per request.
    #[arg(long, env = "PAGODA_DISABLE_LOG_REQUESTS", conflicts_with = "enable_log_requests")]
    pub disable_log_requests: bool,

    /// Also log each generation request's prompt sizes and sampling parameters (never its text).
    #[arg(long, env = "PAGODA_ENABLE_LOG_REQUESTS")]
    pub enable_log_requests: bool,

    /// End every streamed response with a usage chunk, as if each asked with
    /// stream_options.include_usage.
    #[arg(long, env = "PAGODA_ENABLE_FORCE_INCLUDE_USAGE")]
    pub enable_force_include_usage: bool,

    /// Let the model decide when to call tools (`tool_choice: auto`, the default with tools), its
    /// calls read by --tool-call-parser. Without it, requests with tools must say none, required
    /// or a function.
    #[arg(long, env = "PAGODA_ENABLE_AUTO_TOOL_CHOICE", requires = "tool_call_parser")]
    pub enable_auto_tool_choice: bool,

    /// Serve GET /tokenizer_info (the tokenizer's configuration and chat template), as vLLM's flag.
    #[arg(long, env = "PAGODA_ENABLE_TOKENIZER_INFO_ENDPOINT")]
    pub enable_tokenizer_info_endpoint: bool,

    /// The format the model writes tool calls in: llama3_json (Llama 3.x), hermes (Hermes, Qwen2.5
    /// and later), mistral.
    #[arg(long, env = "PAGODA_TOOL_CALL_PARSER", value_enum)]
    pub tool_call_parser: Option<crate::api::tools::ToolParser>,

    /// Folder with the DMI strings used to detect the cloud.
    #[arg(long, env = "PAGODA_DMI_DIR", default_value = cloud::DMI_DIR)]
    pub dmi_dir: PathBuf,

    /// Where models given as URIs are synced to (default: $XDG_CACHE_HOME/pagoda/models or
    /// ~/.cache/pagoda/models); a restart with the copy intact downloads nothing.
    #[arg(long, env = "PAGODA_DOWNLOAD_DIR")]
    pub download_dir: Option<PathBuf>,

    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenerationConfig {
    Auto,
    Vllm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListArg(pub Vec<String>);

/// `a,b` or a JSON list `["a", "b"]` (vLLM's form).
fn parse_list(s: &str) -> Result<ListArg, String> {
    let s = s.trim();
    if s.starts_with('[') {
        return serde_json::from_str::<Vec<String>>(s)
            .map(ListArg)
            .map_err(|e| format!("not a JSON list of strings: {e}"));
    }
    Ok(ListArg(s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()))
}

/// The warning a server reachable from other machines without any API key logs at start (an
/// appliance whose launch configuration named no key, say); none on loopback or with a key.
pub fn open_api_warning(keys: &[String], address: std::net::SocketAddr) -> Option<String> {
    (keys.is_empty() && !address.ip().is_loopback()).then(|| {
        format!(
            "NO API KEY: {address} accepts every request from anyone who can reach it; set --api-key-file \
             (PAGODA_API_KEY_FILE, or api_key_file in the instance's launch configuration) or listen on 127.0.0.1"
        )
    })
}

fn api_keys(args: &ServeArgs) -> anyhow::Result<Vec<String>> {
    // An empty key would leave the API open without a word: it is an error, as an empty
    // --api-key-file is. (clap drops an empty PAGODA_API_KEY, so the variable is read here too.)
    let empty_env = std::env::var("PAGODA_API_KEY").is_ok_and(|v| v.split(',').all(|k| k.trim().is_empty()));
    anyhow::ensure!(
        !empty_env && args.api_key.iter().all(|k| !k.trim().is_empty()),
        "--api-key (or PAGODA_API_KEY) holds an empty key; give real keys, or leave it unset to serve without \
         authentication"
    );
    let mut keys: Vec<String> = args.api_key.iter().map(|k| k.trim().to_string()).collect();
    if let Some(path) = &args.api_key_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
        let from_file: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        anyhow::ensure!(!from_file.is_empty(), "--api-key-file {} holds no key", path.display());
        keys.extend(from_file);
    }
    Ok(keys)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut opts = args.engine.to_options()?;
    if let Some(model) = &args.model_tag {
        opts.model = Some(model.clone());
    }
    let remote = remote_source(&args, &mut opts)?;
    let fetch = Fetch {
        sync_opts: args.store.to_options()?,
        hub_opts: args.store.hub_options(args.download_dir.as_deref()),
        download_dir: args.download_dir.clone().unwrap_or_else(storage::default_download_dir),
    };
    let config = server_config(&args)?;
    let addr = bind_address(&config).map_err(anyhow::Error::msg)?;
    let cloud = cloud::detect(&args.dmi_dir);
    let served = served_model_name(&opts);
    let telemetry = Arc::new(Telemetry::new(&served, opts.max_model_len.unwrap_or(1 << 20), &cloud));
    // Every --served-model-name is an alias; the first (or the default name) is reported.
    let mut names = vec![served.clone()];
    names.extend(args.engine.served_model_name.iter().skip(1).filter(|n| **n != served).cloned());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("http").build()?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(address = %local, model = %served, "listening on http://{local}");
        if let Some(warning) = open_api_warning(&config.api_keys, local) {
            tracing::warn!(address = %local, "{warning}");
        }
        let state = Arc::new(AppState::new(config, telemetry.clone(), names, cloud));
        let signals = watch_signals()?;
        // Load in the background; a failure ends the server with the error.
        let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        {
            let (state, load_error) = (state.clone(), load_error.clone());
            tokio::spawn(async move {
                if let Err(e) = load_in_background(state, telemetry, opts, remote, fetch).await {
                    *load_error.lock().expect("not poisoned") = Some(e);
                    let _ = failed_tx.send(());
                }
            });
        }
        let mut first = signals.clone();
        let shutdown = async move {
            let load_failed = tokio::select! {
                _ = first.wait_for(|n| *n >= 1) => false,
                sent = failed_rx => sent.is_ok(),
            };
            if !load_failed {
                // Loading succeeded (the sender was dropped unused) or a signal came: a signal
                // has been counted already or is awaited here.
                let _ = first.wait_for(|n| *n >= 1).await;
            }
        };
        let mut second = signals;
        let force = async move {
            let _ = second.wait_for(|n| *n >= 2).await;
        };
        serve(state, listener, shutdown, force).await;
        match load_error.lock().expect("not poisoned").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    // The loader may still be running if a signal came during loading; do not wait for it.
    runtime.shutdown_background();
    result
}

/// Where `--model` points when it is not on this machine (a store URI or a Hub id), which then
/// also names the model unless `--served-model-name` does.
fn remote_source(args: &ServeArgs, opts: &mut EngineOptions) -> anyhow::Result<Option<ModelSource>> {
    let Some(model) = opts.model.as_ref() else {
        anyhow::ensure!(args.store.revision.is_none(), "--revision needs a Hugging Face Hub --model");
        return Ok(None);
    };
    let model = model.to_str().context("--model is not valid UTF-8")?.to_string();
    match ModelSource::parse(&model, args.store.revision.as_deref())? {
        ModelSource::Local(_) => Ok(None),
        remote => {
            opts.served_model_name.get_or_insert(model);
            Ok(Some(remote))
        }
    }
}

fn server_config(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    Ok(ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_keys: api_keys(args)?,
        max_queue: args.max_queue as usize,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        allowed_origins: args.allowed_origins.clone().map(|l| l.0).unwrap_or_default(),
        allowed_methods: args.allowed_methods.0.clone(),
        allowed_headers: args.allowed_headers.0.clone(),
        max_request_body_bytes: args.max_request_body_bytes,
        max_connections: connection_limit(args.max_connections as usize),
        request_read_timeout: Duration::from_secs(args.request_read_timeout),
        engine_stall_timeout: Duration::from_secs(args.engine_stall_timeout),
        use_generation_config: args.generation_config == GenerationConfig::Auto,
        log_requests: !args.disable_log_requests,
        log_request_params: args.enable_log_requests,
        force_include_usage: args.enable_force_include_usage,
        tools: crate::api::tools::ToolConfig {
            auto_tool_choice: args.enable_auto_tool_choice,
            parser: args.tool_call_parser,
        },
        enable_tokenizer_info: args.enable_tokenizer_info_endpoint,
    })
}

/// File descriptors kept for what is not a connection: the listener, the runtime's, model files,
/// logs, and connections being refused (`api`'s `MAX_REFUSALS`).
const RESERVED_FILES: usize = 256;

/// `--max-connections`, once the open-files soft limit is raised to the hard one, lowered (with a
/// warning) to what that limit leaves, so that accepting never fails for want of descriptors.
fn connection_limit(asked: usize) -> usize {
    let files = raise_open_files_limit();
    let fits = files.saturating_sub(RESERVED_FILES).max(1);
    if asked > fits {
        tracing::warn!(
            max_connections = fits,
            asked,
            open_files_limit = files,
            "--max-connections lowered to fit the open-files limit; raise it (ulimit -n, LimitNOFILE) for more"
        );
        return fits;
    }
    asked
}

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
fn raise_open_files_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return usize::MAX;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Counts SIGTERM and SIGINT: the first drains, the second aborts what is left.
fn watch_signals() -> anyhow::Result<tokio::sync::watch::Receiver<u32>> {
    let (signals_tx, signals) = tokio::sync::watch::channel(0u32);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::info!(signal = name, "shutdown requested");
            signals_tx.send_modify(|n| *n += 1);
        }
    });
    Ok(signals)
}

/// How a remote model is fetched before loading.
struct Fetch {
    sync_opts: storage::SyncOptions,
    hub_opts: storage::hub::HubOptions,
    download_dir: PathBuf,
}

/// Fetches the model if it is remote, loads it, starts the engine thread and marks the server
/// ready.
async fn load_in_background(
    state: Arc<AppState>,
    telemetry: Arc<Telemetry>,
    mut opts: EngineOptions,
    remote: Option<ModelSource>,
    fetch: Fetch,
) -> anyhow::Result<()> {
    if let Some(remote) = remote {
        let fetched = match &remote {
            ModelSource::Store(uri) => storage::ensure_local(uri, &fetch.download_dir, &fetch.sync_opts).await,
            ModelSource::Hub(model) => {
                storage::hub::ensure(model, &fetch.hub_opts, &fetch.sync_opts).await.map(|snapshot| snapshot.dir)
            }
            ModelSource::Local(dir) => Ok(dir.clone()),
        };
        let what = opts.served_model_name.clone().unwrap_or_default();
        opts.model = Some(fetched.with_context(|| format!("syncing {what}"))?);
    }
    if let Some(dir) = opts.model.as_ref().filter(|m| m.is_dir()) {
        // A versioned folder (`pagoda sync --versioned`): the version `current` names, held so
        // that no sync removes it while this server has its files mapped. The hold lasts as long
        // as the process: its file stays open.
        let dir = dir.clone();
        let (version, hold) = tokio::task::spawn_blocking(move || storage::versions::resolve_for_serving(&dir))
            .await
            .map_err(|e| anyhow::anyhow!("resolving the model version panicked: {e}"))??;
        std::mem::forget(hold);
        opts.model = Some(version);
    }
    let cache_options = opts.clone();
    let loaded = tokio::task::spawn_blocking(move || load_engine(&opts))
        .await
        .map_err(|e| anyhow::anyhow!("model loading panicked: {e}"))??;
    telemetry.set_cache_config(&cache_config(&cache_options, &loaded.info));
    let tokenizer = loaded.engine.tokenizer().clone();
    let limits = loaded.engine.limits();
    let info = loaded.info;
    let (engine, _thread) = EngineHandle::spawn(loaded.engine, Some(Box::new(telemetry.engine_metrics())));
    let model = ServedModel { origin: info.origin, max_model_len: info.max_model_len, backend: info.backend };
    let defaults = info.generation_defaults;
    state.set_loaded(LoadedModel { engine, model, tokenizer, limits, defaults });
    tracing::info!("ready");
    Ok(())
}

/// `vllm:cache_config_info`'s labels: vLLM's cache-config fields that mean something here, with
/// its spelling of values (`True`, `None`).
fn cache_config(opts: &EngineOptions, info: &crate::launch::ModelInfo) -> Vec<(&'static str, String)> {
    let py = |b: bool| if b { "True" } else { "False" }.to_string();
    let or_none = |v: Option<usize>| v.map_or("None".to_string(), |v| v.to_string());
    vec![
        ("block_size", info.block_size.to_string()),
        ("cache_dtype", "auto".into()),
        ("enable_prefix_caching", py(opts.enable_prefix_caching)),
        ("gpu_memory_utilization", opts.gpu_memory_utilization.to_string()),
        ("kv_cache_memory_bytes", or_none(opts.kv_cache_memory_bytes)),
        ("num_cpu_blocks", "None".into()),
        ("num_gpu_blocks", info.num_kv_blocks.to_string()),
        ("num_gpu_blocks_override", or_none(opts.num_gpu_blocks_override)),
        ("kv_cache_size_tokens", (info.num_kv_blocks * info.block_size).to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::open_api_warning;

    #[test]
    fn only_a_keyless_server_on_a_public_address_is_warned_about() {
        let open = |addr: &str| open_api_warning(&[], addr.parse().unwrap());
        assert!(open("0.0.0.0:8000").unwrap().contains("0.0.0.0:8000 accepts every request"));
        assert!(open("[::]:8000").is_some());
        assert!(open("10.0.0.5:8000").is_some());
        assert_eq!(open("127.0.0.1:8000"), None);
        assert_eq!(open("[::1]:8000"), None);
        assert_eq!(open_api_warning(&["k".into()], "0.0.0.0:8000".parse().unwrap()), None);
    }
}
