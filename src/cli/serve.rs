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
use crate::launch::{load_engine, served_model_name};
use crate::storage::{self, ModelSource};
use crate::telemetry::{Telemetry, cloud};

#[derive(Debug, Args)]
pub struct ServeArgs {
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

    /// Seconds without a turn of the engine loop after which /health reports 503.
    #[arg(long, env = "PAGODA_ENGINE_STALL_TIMEOUT", default_value_t = 300)]
    pub engine_stall_timeout: u64,

    /// Where request sampling defaults come from: 'auto' uses the model's generation_config.json,
    /// 'vllm' uses vLLM's neutral defaults.
    #[arg(long, env = "PAGODA_GENERATION_CONFIG", value_enum, default_value_t = GenerationConfig::Auto)]
    pub generation_config: GenerationConfig,

    /// Do not log a line per request.
    #[arg(long, env = "PAGODA_DISABLE_LOG_REQUESTS")]
    pub disable_log_requests: bool,

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

fn api_keys(args: &ServeArgs) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = args.api_key.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
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
    let mut opts = args.engine.to_options();
    // A URI or a Hub id is fetched (in the background, like loading) and served under its own name.
    let source = match opts.model.as_ref() {
        Some(model) => {
            let model = model.to_str().context("--model is not valid UTF-8")?;
            Some(ModelSource::parse(model, args.store.revision.as_deref())?)
        }
        None => {
            anyhow::ensure!(args.store.revision.is_none(), "--revision needs a Hugging Face Hub --model");
            None
        }
    };
    let remote = match source {
        Some(ModelSource::Local(_)) | None => None,
        Some(remote) => {
            let name = opts.model.as_ref().map(|m| m.display().to_string()).unwrap_or_default();
            opts.served_model_name.get_or_insert(name);
            Some(remote)
        }
    };
    let sync_opts = args.store.to_options()?;
    let hub_opts = args.store.hub_options(args.download_dir.as_deref());
    let download_dir = args.download_dir.clone().unwrap_or_else(storage::default_download_dir);
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_keys: api_keys(&args)?,
        max_queue: args.max_queue as usize,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        allowed_origins: args.allowed_origins.clone().map(|l| l.0).unwrap_or_default(),
        allowed_methods: args.allowed_methods.0.clone(),
        allowed_headers: args.allowed_headers.0.clone(),
        max_request_body_bytes: args.max_request_body_bytes,
        engine_stall_timeout: Duration::from_secs(args.engine_stall_timeout),
        use_generation_config: args.generation_config == GenerationConfig::Auto,
        log_requests: !args.disable_log_requests,
    };
    let addr = bind_address(&config).map_err(anyhow::Error::msg)?;
    let cloud = cloud::detect(&args.dmi_dir);
    let served = served_model_name(&opts);
    let telemetry = Arc::new(Telemetry::new(&served, opts.max_model_len.unwrap_or(1 << 20), &cloud));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("http").build()?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(address = %local, model = %served, "listening on http://{local}");
        let state = Arc::new(AppState::new(config, telemetry.clone(), served, cloud));

        // Signals: the first drains, the second aborts what is left.
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

        // Load in the background; a failure ends the server with the error.
        let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        {
            let state = state.clone();
            let load_error = load_error.clone();
            tokio::spawn(async move {
                let mut opts = opts;
                if let Some(remote) = remote {
                    let fetched = match &remote {
                        ModelSource::Store(uri) => storage::ensure_local(uri, &download_dir, &sync_opts).await,
                        ModelSource::Hub(model) => {
                            storage::hub::ensure(model, &hub_opts, &sync_opts).await.map(|snapshot| snapshot.dir)
                        }
                        ModelSource::Local(dir) => Ok(dir.clone()),
                    };
                    match fetched {
                        Ok(dir) => opts.model = Some(dir),
                        Err(e) => {
                            let what = opts.served_model_name.clone().unwrap_or_default();
                            *load_error.lock().expect("not poisoned") =
                                Some(anyhow::Error::new(e).context(format!("syncing {what}")));
                            let _ = failed_tx.send(());
                            return;
                        }
                    }
                }
                let loaded = tokio::task::spawn_blocking(move || load_engine(&opts)).await;
                match loaded {
                    Ok(Ok(loaded)) => {
                        let tokenizer = loaded.engine.tokenizer().clone();
                        let vocab_size = loaded.engine.vocab_size();
                        let info = loaded.info;
                        let (engine, _thread) =
                            EngineHandle::spawn(loaded.engine, Some(Box::new(telemetry.engine_metrics())));
                        let model = ServedModel {
                            origin: info.origin,
                            max_model_len: info.max_model_len,
                            backend: info.backend,
                        };
                        let defaults = info.generation_defaults;
                        state.set_loaded(LoadedModel { engine, model, tokenizer, vocab_size, defaults });
                        tracing::info!("ready");
                    }
                    Ok(Err(e)) => {
                        *load_error.lock().expect("not poisoned") = Some(e.into());
                        let _ = failed_tx.send(());
                    }
                    Err(e) => {
                        *load_error.lock().expect("not poisoned") =
                            Some(anyhow::anyhow!("model loading panicked: {e}"));
                        let _ = failed_tx.send(());
                    }
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
