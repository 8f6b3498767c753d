//! The OpenAI-compatible HTTP server: hyper on tokio over an [`EngineHandle`].
//!
//! The server starts listening before the model has loaded (so `/health` and `/ready` answer
//! while it loads), then hands requests to the engine thread and streams its outputs back. It
//! knows nothing of blocks or tensors: only token ids, sampling parameters and outputs cross into
//! the engine. Draining on SIGTERM/SIGINT: `/ready` and new requests answer 503, in-flight
//! requests finish (up to `--shutdown-timeout`), then the process exits.

mod error;
mod generate;
pub mod openai;
mod parse_errors;
pub mod tools;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tracing::Instrument;

pub use self::error::ApiError;
use self::openai::{ModelCard, ModelList};
use crate::engine::driver::{EngineHandle, EngineStatus};
use crate::engine::{GenerationDefaults, RequestLimits};
use crate::telemetry::{CloudInfo, GIT_COMMIT, Telemetry, VERSION};
use crate::tokenizer::Tokenizer;

/// Server options, resolved from the command line.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Keys accepted as `Authorization: Bearer <key>`; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Most sequences that may wait for the engine before new requests get 429.
    pub max_queue: usize,
    pub shutdown_timeout: Duration,
    /// CORS: origins allowed (`*` for any); empty turns CORS off.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub max_request_body_bytes: usize,
    /// Most connections open at once; one beyond gets 503 and is closed.
    pub max_connections: usize,
    /// Time a client gets to send a request's headers, and again its body.
    pub request_read_timeout: Duration,
    /// `/health` turns 503 when the engine loop has not turned for this long.
    pub engine_stall_timeout: Duration,
    /// Use the model's `generation_config.json` sampling values as request defaults.
    pub use_generation_config: bool,
    /// A log line per request (method, path, status, time).
    pub log_requests: bool,
    /// Also a line per generation request with its prompt sizes and sampling parameters
    /// (`--enable-log-requests`).
    pub log_request_params: bool,
    /// Every streamed response ends with a usage chunk, asked for or not
    /// (`--enable-force-include-usage`).
    pub force_include_usage: bool,
    /// How chat requests' tool calls are read (`--enable-auto-tool-choice`, `--tool-call-parser`).
    pub tools: tools::ToolConfig,
    /// Serve `/tokenizer_info`.
    pub enable_tokenizer_info: bool,
}

/// Where the server is in its life; kept in an atomic as its `u8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Loading = 0,
    Ready = 1,
    Draining = 2,
}

impl Phase {
    fn of(value: u8) -> Phase {
        match value {
            1 => Phase::Ready,
            2 => Phase::Draining,
            _ => Phase::Loading,
        }
    }
}

/// What the API shows of the model it serves.
pub struct ServedModel {
    /// Where it came from (the folder, file or URI), as `/v1/models` reports it (`root`).
    pub origin: String,
    pub max_model_len: usize,
    /// The backend it runs on ("cpu", "cuda").
    pub backend: &'static str,
}

/// What the server holds once the model has loaded.
pub struct LoadedModel {
    pub engine: EngineHandle,
    pub model: ServedModel,
    pub tokenizer: Arc<Tokenizer>,
    /// What requests are checked against (the engine's [`RequestLimits`]).
    pub limits: RequestLimits,
    /// The model's sampling defaults (its `generation_config.json`).
    pub defaults: GenerationDefaults,
}

pub struct AppState {
    config: ServerConfig,
    phase: AtomicU8,
    loaded: OnceLock<LoadedModel>,
    telemetry: Arc<Telemetry>,
    /// The names the model answers to; the first is reported.
    served_model_names: Vec<String>,
    cloud: CloudInfo,
    /// Generation requests being answered (a streaming one until its last byte).
    in_flight: AtomicUsize,
    created: u64,
    /// Permits for a request's CPU-heavy work off the async threads ([`off_runtime`]).
    cpu_work: tokio::sync::Semaphore,
}

impl AppState {
    pub fn new(
        config: ServerConfig,
        telemetry: Arc<Telemetry>,
        served_model_names: Vec<String>,
        cloud: CloudInfo,
    ) -> AppState {
        assert!(!served_model_names.is_empty(), "a model has a name");
        AppState {
            config,
            phase: AtomicU8::new(Phase::Loading as u8),
            loaded: OnceLock::new(),
            telemetry,
            served_model_names,
            cloud,
            in_flight: AtomicUsize::new(0),
            created: unix_now(),
            // Half the cores: the engine keeps the rest (and on a GPU, the CPU is idle anyway).
            cpu_work: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            ),
        }
    }

    /// Marks the model loaded: the server starts taking requests.
    pub fn set_loaded(&self, loaded: LoadedModel) {
        if self.loaded.set(loaded).is_ok() {
            let (loading, ready) = (Phase::Loading as u8, Phase::Ready as u8);
            let _ = self.phase.compare_exchange(loading, ready, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    pub fn start_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::SeqCst);
    }

    fn phase(&self) -> Phase {
        Phase::of(self.phase.load(Ordering::SeqCst))
    }

    pub fn is_draining(&self) -> bool {
        self.phase() == Phase::Draining
    }

    pub fn engine_status(&self) -> Option<&Arc<EngineStatus>> {
        self.loaded.get().map(|l| l.engine.status())
    }

    /// Requests still being answered.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The loaded model, or 503 while loading and draining.
    fn ready(&self) -> Result<&LoadedModel, ApiError> {
        match self.phase() {
            Phase::Ready => Ok(self.loaded.get().expect("ready implies loaded")),
            Phase::Draining => Err(ApiError::Unavailable("the server is shutting down".into())),
            Phase::Loading => Err(ApiError::Unavailable("the model is still loading".into())),
        }
    }

    /// The name a response reports: the one the request used (one of the served names), else the
    /// first.
    fn check_model(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match requested {
            Some(name) if !self.served_model_names.iter().any(|n| n == name) => Err(ApiError::NotFound(format!(
                "the model '{name}' does not exist; this server serves '{}'",
                self.served_model_names.join("', '")
            ))),
            Some(name) => Ok(name.to_string()),
            None => Ok(self.served_model_name().to_string()),
        }
    }

    fn served_model_name(&self) -> &str {
        &self.served_model_names[0]
    }
}

/// Runs a request's CPU-heavy work (chat rendering, tokenization, structured-output compilation)
/// on tokio's blocking threads, a few at a time, so that the async threads stay free: `/health`,
/// `/ready`, `/metrics` and streams answer while a large prompt is tokenized.
async fn off_runtime<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = state.cpu_work.acquire().await.map_err(|_| ApiError::Unavailable("the server is stopping".into()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(format!("the request's work failed: {e}")))
}

/// Counts a generation request as in flight until dropped.
struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: &Arc<AppState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// Ties `guard` to the response's body: the request counts as in flight until hyper has taken the
/// body's last byte and dropped it, so a drain waits for responses still being written.
fn with_guard(response: Response<ResponseBody>, guard: InFlight) -> Response<ResponseBody> {
    response.map(|inner| {
        inner
            .map_frame(move |frame| {
                let _held_until_the_body_is_dropped = &guard;
                frame
            })
            .boxed()
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).expect("API types serialize");
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(err: &ApiError) -> Response<ResponseBody> {
    let (status, _) = err.status_and_type();
    let mut response = json_response(status, &err.body());
    match err {
        ApiError::QueueFull { retry_after_secs } => {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        ApiError::Unauthorized => {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        ApiError::MethodNotAllowed { allowed } => {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        _ => {}
    }
    response
}

fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<ResponseBody> {
    // A body fed chunk by chunk from the channel (server-sent events).
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(http_body_util::StreamBody::new(chunks).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Reads the whole body as JSON, refusing more than the configured limit with 413.
async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let limit = state.config.max_request_body_bytes;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let timeout = state.config.request_read_timeout;
    let bytes = match tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => return Err(ApiError::RequestTimeout { seconds: timeout.as_secs() }),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::PayloadTooLarge { limit }),
        Ok(Err(e)) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"), None)),
    };
    // A large body is parsed off the async threads.
    let value = if bytes.len() > LARGE_BODY_BYTES {
        off_runtime(state, move || parse_json(&bytes)).await??
    } else {
        parse_json(&bytes)?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object", None));
    }
    Ok(value)
}

/// Bodies parsed off the async threads.
const LARGE_BODY_BYTES: usize = 1 << 20;

/// The body as JSON. A lone UTF-16 surrogate escape (`"\ud800"`), which Python's JSON (and so
/// vLLM) accepts, becomes U+FFFD instead of failing the request.
fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None);
    serde_json::from_slice(bytes).or_else(|e| match replace_lone_surrogates(bytes) {
        Some(repaired) => serde_json::from_slice(&repaired).map_err(invalid),
        None => Err(invalid(e)),
    })
}

/// `bytes` with every `\uXXXX` escape of a UTF-16 surrogate that is not half of a pair replaced by
/// `\ufffd`, or `None` if there is none. In valid JSON a backslash only occurs in strings, as an
/// escape, so walking the escapes needs no other parsing.
fn replace_lone_surrogates(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut replaced = false;
    let escape_at = |i: usize| -> Option<u16> {
        let hex = bytes.get(i..i + 6)?.strip_prefix(b"\\u")?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match escape_at(i) {
            Some(0xD800..=0xDBFF) if escape_at(i + 6).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) => {
                out.extend_from_slice(&bytes[i..i + 12]);
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(b"\\ufffd");
                replaced = true;
                i += 6;
            }
            // Any other escape, kept whole (so that `\\` never starts one).
            _ => {
                out.extend_from_slice(&bytes[i..(i + 2).min(bytes.len())]);
                i += 2;
            }
        }
    }
    replaced.then_some(out)
}

/// Deserializes a request type, naming the field at fault.
fn parse<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("invalid value for '{p}': {}", e.inner()),
            None => format!("invalid request: {}", e.inner()),
        };
        ApiError::BadRequest { message, param }
    })
}

/// A generation request: its own fields, then the shared sampling fields from the same object.
trait WithSampling: serde::de::DeserializeOwned {
    /// Chat completions (whose unsupported fields differ a little from completions').
    const CHAT: bool;
    fn sampling_mut(&mut self) -> &mut openai::SamplingFields;
}

impl WithSampling for openai::CompletionRequest {
    const CHAT: bool = false;
    fn sampling_mut(&mut self) -> &mut openai::SamplingFields {
        &mut self.sampling
    }
}

impl WithSampling for openai::ChatRequest {
    const CHAT: bool = true;
    fn sampling_mut(&mut self) -> &mut openai::SamplingFields {
        &mut self.sampling
    }
}

async fn read_request<T: WithSampling>(state: &AppState, req: Request<Incoming>) -> Result<T, ApiError> {
    parse_request(read_body(state, req).await?)
}

fn parse_request<T: WithSampling>(value: serde_json::Value) -> Result<T, ApiError> {
    if let Some((field, message)) = openai::unsupported_field(&value, T::CHAT) {
        return Err(ApiError::bad_request(message, Some(field)));
    }
    let mut parsed: T = parse(&value)?;
    *parsed.sampling_mut() = parse(&value)?;
    Ok(parsed)
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    if state.config.api_keys.is_empty() {
        return true;
    }
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key)
    else {
        return false;
    };
    // Every key is compared, in constant time for equal lengths, so timing reveals nothing about
    // which key or how much of it matched.
    state
        .config
        .api_keys
        .iter()
        .fold(false, |found, key| found | bool::from(key.as_bytes().ct_eq(presented.trim().as_bytes())))
}

/// Adds the CORS headers a configured origin gets; does nothing when CORS is off.
fn apply_cors(state: &AppState, origin: Option<&HeaderValue>, headers: &mut HeaderMap, preflight: bool) {
    let origins = &state.config.allowed_origins;
    let Some(origin) = origin else { return };
    let allowed = if origins.iter().any(|o| o == "*") {
        HeaderValue::from_static("*")
    } else if origins.iter().any(|o| origin.as_bytes() == o.as_bytes()) {
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        origin.clone()
    } else {
        return;
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if preflight {
        let join = |v: &[String]| HeaderValue::from_str(&v.join(", ")).unwrap_or(HeaderValue::from_static("*"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, join(&state.config.allowed_methods));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, join(&state.config.allowed_headers));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
}

/// The routes, each with the methods it takes and whether it needs the API key.
enum Route {
    Health,
    Ready,
    Metrics,
    Version,
    Models,
    /// `/v1/models/{id}`.
    Model(String),
    Completions,
    ChatCompletions,
    Tokenize,
    Detokenize,
    /// SageMaker's contract: `POST /invocations` (a completion or a chat by its body) and
    /// `GET /ping` (ready to serve).
    Invocations,
    Ping,
    /// vLLM's `/tokenizer_info`, with `--enable-tokenizer-info-endpoint` (it shows the chat
    /// template).
    TokenizerInfo,
}

fn route(path: &str) -> Option<(Route, Method, bool)> {
    Some(match path {
        "/health" => (Route::Health, Method::GET, false),
        "/ready" => (Route::Ready, Method::GET, false),
        "/ping" => (Route::Ping, Method::GET, false),
        "/metrics" => (Route::Metrics, Method::GET, false),
        "/version" => (Route::Version, Method::GET, false),
        "/v1/models" => (Route::Models, Method::GET, true),
        "/v1/completions" => (Route::Completions, Method::POST, true),
        "/v1/chat/completions" => (Route::ChatCompletions, Method::POST, true),
        "/tokenize" => (Route::Tokenize, Method::POST, true),
        "/detokenize" => (Route::Detokenize, Method::POST, true),
        "/invocations" => (Route::Invocations, Method::POST, true),
        "/tokenizer_info" => (Route::TokenizerInfo, Method::GET, true),
        _ => match path.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => (Route::Model(percent_decode(id)), Method::GET, true),
            _ => return None,
        },
    })
}

/// A path segment with its `%XX` escapes decoded (model ids may hold `/`, sent as `%2F`).
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// The longest request target read, and the most header fields and bytes: beyond them a request
/// gets a 414 or 431 in the API's error shape. The HTTP parser's own limits are set far above, so
/// that only a request past those (or a malformed one) gets its bare answer.
const MAX_URI_BYTES: usize = 8 << 10;
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 64 << 10;
const PARSER_MAX_HEADERS: usize = 4 * MAX_HEADERS;
const PARSER_MAX_BUF: usize = 1 << 20;

/// Why a request's head is more than the server reads, if it is.
fn oversized_head<B>(req: &Request<B>) -> Option<ApiError> {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return Some(ApiError::UriTooLong { limit: MAX_URI_BYTES });
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return Some(ApiError::HeadersTooLarge { what: format!("{} fields, more than {MAX_HEADERS}", headers.len()) });
    }
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    (bytes > MAX_HEADER_BYTES)
        .then(|| ApiError::HeadersTooLarge { what: format!("{bytes} bytes, more than {MAX_HEADER_BYTES}") })
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>, request_id: String) -> Response<ResponseBody> {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let origin = req.headers().get(header::ORIGIN).cloned();
    let cors_on = !state.config.allowed_origins.is_empty();
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    let large_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > LARGE_BODY_BYTES);

    let mut response = if method == Method::OPTIONS && cors_on && origin.is_some() {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        apply_cors(&state, origin.as_ref(), r.headers_mut(), true);
        r
    } else {
        let result = if let Some(e) = oversized_head(&req) {
            Err(e)
        } else {
            match route(&path) {
                None => Err(ApiError::NotFound(format!("route {method} {path} not found"))),
                // SageMaker's /ping answers GET and POST alike.
                Some((Route::Ping, _, _)) if method == Method::POST => {
                    dispatch(&state, Route::Ping, req, &request_id).await
                }
                Some((_, expected, _))
                    if method != expected && !(method == Method::HEAD && expected == Method::GET) =>
                {
                    Err(ApiError::MethodNotAllowed { allowed: if expected == Method::GET { "GET" } else { "POST" } })
                }
                Some((_, _, true)) if !authorized(&state, req.headers()) => Err(ApiError::Unauthorized),
                Some((r, _, _)) => dispatch(&state, r, req, &request_id).await,
            }
        };
        // An error before the body was read (or read whole) leaves bytes of it on the connection,
        // which the next request would be read from: the connection closes after this response.
        let body_left = has_body
            && matches!(
                result,
                Err(ApiError::Unauthorized
                    | ApiError::NotFound(_)
                    | ApiError::MethodNotAllowed { .. }
                    | ApiError::PayloadTooLarge { .. }
                    | ApiError::RequestTimeout { .. }
                    | ApiError::UriTooLong { .. }
                    | ApiError::HeadersTooLarge { .. })
            );
        if large_body {
            // The body and what was made of it are freed by now: give the memory back.
            crate::tokenizer::release_free_memory();
        }
        let mut r = result.unwrap_or_else(|e| error_response(&e));
        if body_left {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        apply_cors(&state, origin.as_ref(), r.headers_mut(), false);
        r
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status().as_u16();
    if state.config.log_requests && !matches!(path.as_str(), "/health" | "/ready" | "/metrics") {
        tracing::info!(%method, %path, status, millis = started.elapsed().as_millis() as u64, "request");
    }
    response
}

async fn dispatch(
    state: &Arc<AppState>,
    route: Route,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    match route {
        Route::Health => Ok(health(state)),
        Route::Ready => Ok(ready(state)),
        Route::Metrics => {
            let mut r = Response::new(full(state.telemetry.render()));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            Ok(r)
        }
        Route::Version => Ok(version(state, authorized(state, req.headers()))),
        Route::Models => {
            let loaded = state.ready()?;
            let cards = state.served_model_names.iter().map(|name| model_card(state, loaded, name)).collect();
            Ok(json_response(StatusCode::OK, &ModelList { object: "list", data: cards }))
        }
        Route::Model(id) => {
            let loaded = state.ready()?;
            let name = state.check_model(Some(&id))?;
            Ok(json_response(StatusCode::OK, &model_card(state, loaded, &name)))
        }
        Route::Ping => Ok(ping(state)),
        Route::TokenizerInfo if !state.config.enable_tokenizer_info => Err(ApiError::NotFound(
            "route GET /tokenizer_info is off; the server enables it with --enable-tokenizer-info-endpoint".into(),
        )),
        Route::TokenizerInfo => Ok(json_response(StatusCode::OK, &state.ready()?.tokenizer.info())),
        Route::Invocations => {
            let body = read_body(state, req).await?;
            let is_chat = body.get("messages").is_some();
            if is_chat {
                generate::chat(state.clone(), parse_request(body)?, request_id).await
            } else if body.get("prompt").is_some() {
                generate::completions(state.clone(), parse_request(body)?, request_id).await
            } else {
                Err(ApiError::bad_request(
                    "an /invocations body needs messages (a chat completion) or prompt (a completion)",
                    None,
                ))
            }
        }
        Route::Completions => generate::completions(state.clone(), read_request(state, req).await?, request_id).await,
        Route::ChatCompletions => generate::chat(state.clone(), read_request(state, req).await?, request_id).await,
        Route::Tokenize => generate::tokenize(state, parse(&read_body(state, req).await?)?).await,
        Route::Detokenize => generate::detokenize(state, parse(&read_body(state, req).await?)?),
    }
}

fn health(state: &AppState) -> Response<ResponseBody> {
    let healthy = match state.engine_status() {
        Some(status) => status.is_healthy(state.config.engine_stall_timeout),
        // Still loading: the process is alive and working on it.
        None => true,
    };
    if healthy {
        json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
    } else {
        error_response(&ApiError::Unavailable("the engine loop is not making progress".into()))
    }
}

/// SageMaker's health check: 200 once the model serves and its engine loop turns, 503 before
/// (while loading) and after (draining), so that no traffic is routed to it too early.
fn ping(state: &AppState) -> Response<ResponseBody> {
    let healthy = state.engine_status().is_some_and(|s| s.is_healthy(state.config.engine_stall_timeout));
    match state.phase() {
        Phase::Ready if healthy => Response::new(full(Bytes::new())),
        Phase::Ready => error_response(&ApiError::Unavailable("the engine loop is not making progress".into())),
        Phase::Loading => error_response(&ApiError::Unavailable("the model is still loading".into())),
        Phase::Draining => error_response(&ApiError::Unavailable("the server is shutting down".into())),
    }
}

fn model_card(state: &AppState, loaded: &LoadedModel, name: &str) -> ModelCard {
    ModelCard {
        id: name.to_string(),
        object: "model",
        created: state.created,
        owned_by: "pagoda",
        root: loaded.model.origin.clone(),
        parent: None,
        max_model_len: loaded.model.max_model_len,
    }
}

fn ready(state: &AppState) -> Response<ResponseBody> {
    match state.phase() {
        Phase::Ready => json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Phase::Draining => json_response(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"status": "draining"})),
        Phase::Loading => json_response(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"status": "loading"})),
    }
}

/// `/version` answers without the API key (build and platform facts for probes and support), but
/// names the model only to a caller with the key: a served name defaults to the model's path or
/// Hub id, which may be private.
fn version(state: &AppState, authorized: bool) -> Response<ResponseBody> {
    let loaded = state.loaded.get();
    let mut body = serde_json::json!({
        "version": VERSION,
        "git_commit": GIT_COMMIT,
        "backend": loaded.map(|l| l.model.backend),
        "cloud": {"provider": state.cloud.provider, "instance_type": state.cloud.instance_type},
    });
    if authorized {
        body["model"] = serde_json::Value::from(state.served_model_name());
    }
    json_response(StatusCode::OK, &body)
}

/// A request id from `x-request-id` if the client sent a usable one, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Serves until `shutdown` resolves, then drains: new requests get 503 while in-flight ones
/// finish, for at most `shutdown_timeout` (or until `force` resolves); then the engine aborts
/// whatever is left and this returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    force: impl std::future::Future<Output = ()>,
) {
    let accept = tokio::spawn(accept_loop(state.clone(), listener));
    shutdown.await;
    state.start_draining();
    let engine_busy = |state: &AppState| state.engine_status().map_or(0, |s| s.num_unfinished());
    tracing::info!(in_flight = state.num_in_flight(), "draining: new requests get 503 while in-flight ones finish");
    let deadline = tokio::time::sleep(state.config.shutdown_timeout);
    tokio::pin!(deadline, force);
    loop {
        if state.num_in_flight() == 0 && engine_busy(&state) == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = &mut deadline => {
                tracing::warn!(in_flight = state.num_in_flight(), "shutdown timeout reached: aborting in-flight requests");
                break;
            }
            _ = &mut force => {
                tracing::warn!(in_flight = state.num_in_flight(), "second signal: aborting in-flight requests");
                break;
            }
        }
    }
    if let Some(loaded) = state.loaded.get() {
        loaded.engine.shutdown();
    }
    // Aborted streams send their last chunk; give them a moment to reach the clients.
    let flush_deadline = Instant::now() + Duration::from_secs(1);
    while state.num_in_flight() > 0 && Instant::now() < flush_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    accept.abort();
    tracing::info!("server stopped");
}

async fn accept_loop(state: Arc<AppState>, listener: TcpListener) {
    let connections = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    // Connections being refused hold a descriptor for a moment each: a few at a time, and past
    // that a connection is closed at once, so refusing never runs the process out of descriptors.
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_connection(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _held_while_the_connection_lives = permit;
            let read_timeout = state.config.request_read_timeout;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let id = request_id(req.headers());
                let span = tracing::info_span!("request", request_id = %id, %peer);
                async move { Ok::<_, Infallible>(handle(state, req, id).await) }.instrument(span)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout)
                .max_headers(PARSER_MAX_HEADERS)
                .max_buf_size(PARSER_MAX_BUF)
                .serve_connection(hyper_util::rt::TokioIo::new(parse_errors::ErrorBodies::new(stream)), service);
            if let Err(e) = conn.await {
                tracing::debug!(%e, "connection ended with an error");
            }
        });
    }
}

/// Connections answered 503 at once; more beyond `--max-connections` are closed unanswered. Part
/// of the descriptors `--max-connections` leaves aside.
const MAX_REFUSALS: usize = 64;

/// Answers a connection beyond `--max-connections` with 503 and closes it, reading what the
/// client sent meanwhile (briefly) so that the answer is not lost to a reset.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let error = ApiError::Unavailable("the server has as many connections open as it takes; retry later".into());
    let body = serde_json::to_vec(&error.body()).expect("API types serialize");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(Duration::from_millis(500), write).await.is_ok() {
        let mut sink = [0u8; 4096];
        let drain = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
    }
}

/// The address the server will listen on.
pub fn bind_address(config: &ServerConfig) -> Result<SocketAddr, String> {
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("--host {host} is not an IP address"))?;
    Ok(SocketAddr::new(ip, config.port))
}
