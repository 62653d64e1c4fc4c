//! `minnow serve`: an OpenAI-compatible HTTP server over the engine's
//! continuous-batching [`Scheduler`].
//!
//! This crate is only the HTTP half. It turns requests into token ids and
//! `GenRequest`s, hands them to the scheduler, and turns the scheduler's
//! `GenEvent`s back into OpenAI's JSON and server-sent-event shapes. It
//! knows nothing of kernels or batching: the scheduler owns the model, the
//! KV caches, the prefix cache and the compute threads.
//!
//! # Endpoints
//! - `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE,
//!   ending with `data: [DONE]`) and not; see [`params`] for every accepted
//!   parameter, its range and its default.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text, see
//!   [`metrics`]).
//! - `POST /tokenize` `{content|prompt, add_special?, parse_special?}` →
//!   `{tokens}`; `POST /detokenize` `{tokens}` → `{content}`.
//! - `GET /`: a small chat page (static HTML + JS, embedded in the binary).
//!
//! # Failure
//! Every error is an OpenAI-style body (see [`error`]): 400 for bad JSON,
//! wrong types and out-of-range values (naming the parameter), for a prompt
//! plus `max_tokens` beyond the context (giving both numbers) and for HTTP
//! that does not parse (see [`conn`]); 401 without the right
//! `Authorization: Bearer` key when one is set (everything but `/` and
//! `/health`); 404 `model_not_found` for a `model` this server does not
//! serve; 413 past the body limit; 429 with `Retry-After` when the
//! scheduler's queue is full; 503 while shutting down. A client that goes
//! away (mid-stream or while waiting) drops its event receiver, so the
//! scheduler's sink returns `false` and the slot is freed; the request is
//! also cancelled explicitly when its response is dropped. Connections are
//! bounded in number and in how long they may idle or dawdle ([`conn`]).
//!
//! # Shutdown
//! When the [`Stop`] watched by [`serve`] turns [`Stop::Graceful`] the
//! listener closes, open connections get 503 for new generations and close
//! after their response, and in-flight requests run on for
//! [`ServeOptions::shutdown_grace`]. Whatever is still running then (or at
//! once, on [`Stop::Now`]) ends with an error the client sees: a stream gets
//! an OpenAI-style error event and no `[DONE]`, a plain request a 503.

pub mod conn;
pub mod error;
mod handlers;
pub mod metrics;
pub mod params;
mod render;
mod sse;
pub mod store;

pub use conn::{Limits, Stop};
pub use store::StoreConfig;

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use minnow_engine::loader::LoadedModel;
use minnow_engine::scheduler::{Scheduler, SchedulerConfig, Speculation};
use minnow_kernels::pool::ThreadPool;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Request bodies larger than this are refused with 413. Chat histories of a
/// 4096-token context are tens of kilobytes; 4 MiB leaves room for long
/// documents while bounding what one client can make the server buffer.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// HTTP-side settings (the scheduler has its own [`SchedulerConfig`]).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The id `/v1/models` lists and responses echo in `model`.
    pub model_id: String,
    /// Other names a request's `model` may give for the same model
    /// (`--alias`); any name that is neither is a 404.
    pub aliases: Vec<String>,
    /// When set, every endpoint except `/` and `/health` needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Machine price in USD per hour, for the cost estimate in `/metrics`.
    pub price_per_hour: f64,
    pub max_body_bytes: usize,
    /// How long in-flight requests may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// Connection count and timeouts.
    pub limits: Limits,
    /// Print one line per request to stderr.
    pub log_requests: bool,
    /// LoRA adapters (`--lora NAME=PATH`): a request whose `model` is an
    /// adapter's name runs with it; the base id or an alias runs without.
    pub adapters: Vec<Arc<minnow_engine::lora::LoraAdapter>>,
    /// `--store DIR`: stored completions (see [`store`]).
    pub store: Option<StoreConfig>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model_id: "minnow".to_string(),
            aliases: Vec::new(),
            api_key: None,
            price_per_hour: 0.0,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
            log_requests: true,
            adapters: Vec::new(),
            store: None,
        }
    }
}

/// Everything a request handler needs; shared by all connections.
pub struct AppState {
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) opts: ServeOptions,
    pub(crate) metrics: metrics::Metrics,
    next_request: AtomicU64,
    shutting_down: AtomicBool,
    /// Unix time the server started (`created` of the model object).
    pub(crate) started_unix: u64,
    /// Distinguishes response ids across restarts (ids count from 1).
    pub(crate) id_prefix: String,
    /// The model's vocabulary fingerprint (`Tokenizer::fingerprint`), stored
    /// with recorded log-probabilities; empty without `--store-logprobs`.
    pub(crate) vocab: String,
}

impl AppState {
    pub fn new(scheduler: Scheduler, opts: ServeOptions) -> Arc<AppState> {
        let started_unix = unix_now();
        // Not cryptographic: only keeps ids of two server runs apart.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let id_prefix = format!("{:08x}{:04x}", started_unix as u32 ^ nanos, std::process::id() & 0xffff);
        let vocab = match &opts.store {
            Some(s) if s.logprobs > 0 => scheduler.model().tokenizer.fingerprint(),
            _ => String::new(),
        };
        Arc::new(AppState {
            vocab,
            scheduler: Arc::new(scheduler),
            opts,
            metrics: metrics::Metrics::new(),
            next_request: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            started_unix,
            id_prefix,
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn options(&self) -> &ServeOptions {
        &self.opts
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        self.scheduler.model()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuse new generations from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether a request's `model` names this server's model: its id or an
    /// alias.
    pub fn serves(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// What a request's `model` names: `Some(None)` the base model (its id
    /// or an alias), `Some(Some(adapter))` one of the adapters, `None`
    /// nothing served here.
    pub fn resolve(&self, name: &str) -> Option<Option<Arc<minnow_engine::lora::LoraAdapter>>> {
        if name == self.opts.model_id || self.opts.aliases.iter().any(|a| a == name) {
            return Some(None);
        }
        self.opts.adapters.iter().find(|a| a.name == name).map(|a| Some(a.clone()))
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A JSON body with its content type (axum's `Json` needs serde derive
/// types; our bodies are built as `serde_json::Value`).
pub(crate) fn json_response(v: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The routes, with authentication and per-request logging.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions).get(store::list))
        .route("/v1/chat/completions/{id}", get(store::get).post(store::update).delete(store::delete))
        .route("/v1/chat/completions/{id}/messages", get(store::messages))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{id}", get(handlers::model_by_id))
        .route("/metrics", get(handlers::metrics))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(handlers::index))
        .route("/health", get(handlers::health))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

async fn not_found(req: Request<Body>) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request<Body>) -> ApiError {
    ApiError::method_not_allowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

/// Compares in time independent of where the first difference is, so the
/// key cannot be found byte by byte from response times.
fn same_key(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = (given.len() != expected.len()) as u8;
    for (i, &e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn require_key(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    if let Some(key) = &state.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            None => {
                return ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`").into_response()
            }
            Some(g) if !same_key(g.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("incorrect API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// What the log line of one request says; filled in by its handler and
/// printed when the last reference goes: after the response body has been
/// sent (so a stream's line has its token counts), or when the client left.
pub(crate) struct RequestLog {
    state: Arc<AppState>,
    pub id: u64,
    method: Method,
    path: String,
    start: Instant,
    pub data: Mutex<LogData>,
}

#[derive(Default)]
pub(crate) struct LogData {
    pub status: Option<u16>,
    pub prompt_tokens: Option<usize>,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_secs: Option<f64>,
    pub streaming: bool,
    /// The response body was sent to the end.
    pub body_done: bool,
    /// Why a generation ended early (error text), if it did.
    pub note: Option<String>,
}

impl RequestLog {
    pub fn update(&self, f: impl FnOnce(&mut LogData)) {
        f(&mut self.data.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let d = self.data.get_mut().unwrap_or_else(|e| e.into_inner());
        // 499 (nginx's "client closed request") when the client left before
        // the response head was sent.
        let status = d.status.unwrap_or(499);
        let endpoint = metrics::endpoint_label(&self.path);
        self.state.metrics.count_request(endpoint, status);
        if !self.state.opts.log_requests {
            return;
        }
        let mut line = format!(
            "minnow serve: req {} {} {} {} {:.3}s",
            self.id,
            self.method,
            self.path,
            status,
            self.start.elapsed().as_secs_f64()
        );
        if let Some(p) = d.prompt_tokens {
            line += &format!(" in={p} (cached {}) out={}", d.cached_tokens, d.completion_tokens);
        }
        if let Some(t) = d.ttft_secs {
            line += &format!(" ttft={t:.3}s");
        }
        if d.streaming {
            line += if d.body_done { " stream" } else { " stream cut short (client gone)" };
        } else if d.status.is_some() && !d.body_done {
            line += " (client gone)";
        }
        if let Some(n) = &d.note {
            line += &format!(" [{n}]");
        }
        eprintln!("{line}");
    }
}

async fn log_request(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    mut req: Request<Body>,
    next: Next,
) -> Response {
    let id = state.next_request.fetch_add(1, Ordering::Relaxed);
    let log = Arc::new(RequestLog {
        state: state.clone(),
        id,
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        start: Instant::now(),
        data: Mutex::new(LogData::default()),
    });
    req.extensions_mut().insert(log.clone());
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(state.clone());
    let resp = next.run(req).await;
    log.update(|d| d.status = Some(resp.status().as_u16()));
    let (parts, body) = resp.into_parts();
    if http_body::Body::is_end_stream(&body) {
        log.update(|d| d.body_done = true);
    }
    Response::from_parts(parts, Body::new(sse::LoggedBody::new(body, log)))
}

struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `state` on `listener` until `stop` leaves [`Stop::Run`], then
/// shuts down as the module doc says. Returns once every connection has
/// closed, or shortly after the requests left were cut short.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    stop: tokio::sync::watch::Receiver<Stop>,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let result = conn::serve_connections(listener, app, state.clone(), stop).await;
    // Everything accepted has finished or was cut short: stop the thread.
    let sched = state.scheduler.clone();
    let _ = tokio::task::spawn_blocking(move || sched.shutdown(false)).await;
    result
}

/// What `minnow serve` was asked for on its command line.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub host: String,
    pub port: u16,
    /// `None`: taken from `MINNOW_API_KEY` if set (empty means none).
    pub api_key: Option<String>,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Context (tokens) of each sequence.
    pub ctx: usize,
    /// Requests that may wait for a slot before new ones get 429.
    pub max_queue: usize,
    /// `--prefix-cache-mb`, in bytes; 0 turns the prefix cache off.
    pub prefix_cache_bytes: usize,
    pub price_per_hour: f64,
    /// The model as named on the command line (a path or a short name).
    pub model: String,
    /// `--draft`/`--lookup`: speculative decoding while one sequence decodes.
    pub speculation: Option<Speculation>,
    /// `--alias`: more names requests may use for the model.
    pub aliases: Vec<String>,
    /// `--lora`: adapters a request's `model` may pick.
    pub adapters: Vec<Arc<minnow_engine::lora::LoraAdapter>>,
    /// `--shutdown-grace`.
    pub shutdown_grace: Duration,
    /// `--max-connections`, `--header-timeout`, `--idle-timeout`.
    pub limits: Limits,
    /// `--store DIR`: keep stored completions there.
    pub store_dir: Option<std::path::PathBuf>,
    /// `--store-all`: record every chat request, not only `store: true` ones.
    pub store_all: bool,
    /// `--store-logprobs K`: with each record, the reply tokens' top-K log-probabilities.
    pub store_logprobs: usize,
    /// `--store-max-bytes`: the live records' bound.
    pub store_max_bytes: Option<u64>,
}

/// `minnow serve`: starts the scheduler on `model`, binds, serves until
/// SIGINT or SIGTERM.
pub fn run(model: LoadedModel, pool: ThreadPool, cfg: RunConfig) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    if cfg.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if !(cfg.price_per_hour.is_finite() && cfg.price_per_hour >= 0.0) {
        bail!("--price-per-hour must be a non-negative number");
    }
    if cfg.limits.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if cfg.limits.header_timeout.is_zero() || cfg.limits.idle_timeout.is_zero() {
        bail!("--header-timeout and --idle-timeout must be more than 0 seconds");
    }
    if cfg.store_dir.is_none() && (cfg.store_all || cfg.store_logprobs > 0 || cfg.store_max_bytes.is_some()) {
        bail!("--store-all, --store-logprobs and --store-max-bytes need --store DIR");
    }
    if cfg.store_logprobs > params::MAX_TOP_LOGPROBS {
        bail!("--store-logprobs must be at most {}", params::MAX_TOP_LOGPROBS);
    }
    // The store opens before the model serves, so a store in use or not
    // readable stops the server at once; its line is printed after the
    // address line (which tools wait for first).
    let (store, store_note) = match &cfg.store_dir {
        None => (None, None),
        Some(dir) => {
            let s = minnow_store::Store::open(dir, cfg.store_max_bytes)?;
            let note = format!(
                "minnow serve: storing completions in {} ({} stored, {} bytes{}{})",
                dir.display(),
                s.len(),
                s.live_bytes(),
                cfg.store_max_bytes.map_or(String::new(), |m| format!(" of at most {m}")),
                if s.torn_bytes > 0 {
                    format!("; dropped a torn last line of {} bytes", s.torn_bytes)
                } else {
                    String::new()
                }
            );
            let c = StoreConfig { store: Arc::new(Mutex::new(s)), all: cfg.store_all, logprobs: cfg.store_logprobs };
            (Some(c), Some(note))
        }
    };
    raise_open_files_limit(cfg.limits.max_connections);
    let api_key = cfg.api_key.clone().or_else(|| std::env::var("MINNOW_API_KEY").ok()).filter(|k| !k.is_empty());
    let model_id = model_id_of(&cfg.model);
    let threads = pool.n_threads();
    let sched_cfg = SchedulerConfig {
        max_parallel: cfg.parallel,
        ctx: cfg.ctx,
        max_queue: cfg.max_queue,
        prefix_cache_bytes: cfg.prefix_cache_bytes,
        speculation: cfg.speculation.clone(),
        ..Default::default()
    };
    let spec_note =
        cfg.speculation.as_ref().map_or(String::new(), |s| format!(", speculative decoding: {}", s.method()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The HTTP side is light; the compute threads are the scheduler's.
        .worker_threads(2)
        .thread_name("minnow-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        let addr = listener.local_addr()?;
        let cache_types = model.model.cache_types();
        let kv_note = if cache_types == Default::default() {
            String::new()
        } else {
            format!(", KV cache {} / {}", cache_types.k, cache_types.v)
        };
        let scheduler = Scheduler::start(Arc::new(model), pool, sched_cfg);
        let opts = ServeOptions {
            model_id: model_id.clone(),
            aliases: cfg.aliases.clone(),
            adapters: cfg.adapters.clone(),
            api_key: api_key.clone(),
            price_per_hour: cfg.price_per_hour,
            shutdown_grace: cfg.shutdown_grace,
            limits: cfg.limits,
            store,
            ..Default::default()
        };
        let state = AppState::new(scheduler, opts);
        eprintln!(
            "minnow serve: {model_id} on http://{addr}/ ({} parallel, context {}, queue {}, {threads} threads{kv_note}{}{spec_note})",
            cfg.parallel,
            cfg.ctx,
            cfg.max_queue,
            if api_key.is_some() { ", API key required" } else { "" }
        );
        if let Some(note) = store_note {
            eprintln!("{note}");
        }
        if !addr.ip().is_loopback() && api_key.is_none() {
            eprintln!("minnow serve: warning: listening beyond loopback without an API key");
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(Stop::Run);
        tokio::spawn(watch_signals(stop_tx, cfg.shutdown_grace));
        serve(listener, state, stop_rx).await.context("serving")?;
        eprintln!("minnow serve: stopped");
        Ok(())
    })
}

/// The id clients see: a file's stem, or the short name as given.
fn model_id_of(model: &str) -> String {
    let p = std::path::Path::new(model);
    if model.ends_with(".gguf") {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
            return stem.to_string();
        }
    }
    model.to_string()
}

/// SIGINT or SIGTERM: the first begins a graceful shutdown, the second
/// cuts it short.
async fn watch_signals(stop: tokio::sync::watch::Sender<Stop>, grace: Duration) {
    let mut signals = Signals::new();
    signals.next().await;
    eprintln!(
        "minnow serve: shutting down: no new requests; those in flight get {:.0} s (a second signal ends them now)",
        grace.as_secs_f64()
    );
    let _ = stop.send(Stop::Graceful);
    signals.next().await;
    eprintln!("minnow serve: second signal: ending now");
    let _ = stop.send(Stop::Now);
}

/// SIGINT (Ctrl-C) and, on Unix, SIGTERM.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        let term = async {
            match &mut self.term {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
    }
}

/// Each connection is a file descriptor: lifts the soft limit towards the
/// hard one when `--max-connections` (plus room for model files and
/// pipes) would not fit under it, and says so when it cannot.
// `rlim_t` is u64 on Linux but not on every Unix: the casts stay.
#[allow(clippy::unnecessary_cast)]
fn raise_open_files_limit(max_connections: usize) {
    #[cfg(unix)]
    {
        let want = max_connections as u64 + 64;
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur as u64 >= want {
            return;
        }
        let target = (want as libc::rlim_t).min(lim.rlim_max);
        let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one rlimit struct; raising the soft limit up to the hard one is always allowed.
        let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
        if !ok || (target as u64) < want {
            eprintln!(
                "minnow serve: warning: the open-files limit ({}) is below --max-connections {max_connections} + 64; \
                 raise it (ulimit -n) or lower --max-connections",
                if ok { target as u64 } else { lim.rlim_cur as u64 }
            );
        }
    }
    #[cfg(not(unix))]
    let _ = max_connections;
}
