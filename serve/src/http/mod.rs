//! `llama serve`'s HTTP layer on hyper, shared by every API dialect: connections and their
//! bounds, the routing table, the checks no dialect can bypass (Host, Origin, API key), and
//! the error shape. One module per dialect translates its requests into engine requests and
//! back: `openai.rs` (and `embeddings.rs`), `ollama.rs`, `anthropic.rs`; the pipeline they
//! share (checks, the model's lease, admission, rendering, submission, the answer's events)
//! is `generate.rs`, and every error is answered in the shape of the route's dialect.
//!
//! Bounded everywhere: connections, header read time, body size and body read time, prompt
//! bytes (checked before tokenizing), and the blocking work (template rendering and
//! tokenizing run on a bounded set of blocking threads, never on the async workers, and
//! only after the request was admitted). An engine that is full answers 503 with
//! Retry-After. A client that disconnects cancels its request.
//!
//! The server serves the models of a [`Registry`]: a request names its model, which is
//! loaded on demand (and evicted when idle and room is needed). The server listens before
//! its default model is preloaded: /health answers 503 `loading` until then, and, when
//! that load failed and the server was told to stay up, 503 with the reason (never a path). On a loopback bind a request whose Host header is not a
//! loopback name is refused (DNS rebinding), and a request from a web page on another
//! origin is refused unless that origin is allowed (browsers send `Origin` on cross-origin
//! requests; curl and SDKs send none).

mod admin;
mod anthropic;
mod embeddings;
mod generate;
mod ollama;
mod openai;
mod structured;
mod webui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, AUTHORIZATION,
    CONNECTION, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER, VARY,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use llama_host::chat::ChatTemplate;
use llama_host::GenerateOptions;
use serde::Serialize;

use crate::engine::{Engine, SubmitError};
use crate::registry::{AcquireError, Registry};

type Body = BoxBody<Bytes, Infallible>;

/// How the server listens and what it allows.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer KEY` on every route but /health. Never empty.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// A client must finish sending its request headers within this time.
    pub header_timeout: Duration,
    /// ... and its request body within this time after them.
    pub body_timeout: Duration,
    /// A response that makes no progress for this long (a client that stopped reading)
    /// ends its connection, so no client keeps a connection slot by not reading.
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// How long shutdown waits for open requests before cancelling them.
    pub drain_timeout: Duration,
    /// Refuse requests whose Host header is not a loopback name or address (set on a
    /// loopback bind: a web page that rebinds its own DNS name to 127.0.0.1 then gets 403).
    pub loopback_hosts_only: bool,
    /// Origins allowed cross-origin access (`*` for any). Empty: only same-origin pages.
    pub cors_origins: Vec<String>,
    /// Template renderings and tokenizations running at once (each on a blocking thread).
    pub blocking_tasks: usize,
    /// Whether a reasoning block (`<think>…</think>`) goes to `reasoning_content` (auto) or
    /// stays in the content (none); a request's `reasoning_format` replaces it.
    pub reasoning_format: llama_tools::ReasoningFormat,
    /// Serve the chat page at `/` (`--no-webui` turns it off).
    pub webui: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
            drain_timeout: Duration::from_secs(10),
            loopback_hosts_only: true,
            cors_origins: Vec::new(),
            blocking_tasks: 2,
            reasoning_format: llama_tools::ReasoningFormat::Auto,
            webui: true,
        }
    }
}

/// What the request handlers share. The server starts before its default model is
/// preloaded: until [`AppState::set_ready`] the model routes answer 503.
pub struct AppState {
    pub config: ServerConfig,
    pub registry: Arc<Registry>,
    ready: OnceLock<()>,
    failed: OnceLock<String>,
    /// Permits for blocking work (rendering, tokenizing): a bound on threads and CPU that
    /// no number of requests can raise.
    blocking: Arc<tokio::sync::Semaphore>,
}

/// A loaded model's engine, its chat template when it has one, and the generation
/// defaults of its settings (what a request leaves out).
pub struct Ready {
    pub engine: Arc<Engine>,
    pub template: Option<ChatTemplate>,
    pub defaults: GenerateOptions,
}

impl AppState {
    pub fn new(config: ServerConfig, registry: Arc<Registry>) -> AppState {
        let blocking = Arc::new(tokio::sync::Semaphore::new(config.blocking_tasks.max(1)));
        AppState { config, registry, ready: OnceLock::new(), failed: OnceLock::new(), blocking }
    }

    /// The preload finished (or there was none): the model routes open.
    pub fn set_ready(&self) {
        let _ = self.ready.set(());
    }

    /// Loading failed: /health and the model routes answer 503 with `reason`, which must
    /// not name a filesystem path.
    pub fn set_failed(&self, reason: String) {
        let _ = self.failed.set(reason);
    }

    /// Stops every engine: every queued, running or paused request is cancelled (its
    /// stream ends), new ones get 503, and a load under way is waited for. Blocking.
    pub fn shutdown(&self) {
        self.registry.shutdown();
    }

    /// Ok once the preload is done, else the 503 that says why the server is not serving.
    fn serving(&self) -> Result<(), ApiError> {
        if let Some(reason) = self.failed.get() {
            return Err(ApiError::unavailable(format!("the model failed to load: {reason}"), "model_load_failed"));
        }
        if self.ready.get().is_none() {
            return Err(ApiError::unavailable("loading model", "loading"));
        }
        Ok(())
    }
}

/// How long, after the drain deadline cancelled what was left, connections get to write
/// their last frame (the error that says the answer was cut short).
const FINAL_WRITE_GRACE: Duration = Duration::from_millis(500);

/// Serves until `shutdown` completes; then stops accepting, gives open requests
/// `drain_timeout` to finish, cancels what is left (paused streams included) and returns.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, say: retrying at once would only spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Past the connection bound the connection is closed at once.
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection refused: too many open connections");
                    continue;
                };
                let st = state.clone();
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(state.config.header_timeout)
                    .serve_connection(TokioIo::new(WriteDeadline::new(stream, state.config.write_timeout)), service_fn(move |req| handle(st.clone(), req)));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    // New connections are refused from now on, not left waiting until exit.
    drop(listener);
    tracing::info!("shutting down: no new connections, draining open ones");
    let drain = graceful.shutdown();
    tokio::pin!(drain);
    let drained = tokio::select! {
        _ = &mut drain => true,
        _ = tokio::time::sleep(state.config.drain_timeout) => false,
    };
    if !drained {
        tracing::warn!("drain deadline passed: cancelling the requests still open");
    }
    // Whatever is still running or paused ends now; the engine threads stop.
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.shutdown()).await;
    if !drained {
        // Each cancelled request's stream now ends with its dialect's error (an SSE error
        // event, an Ollama error line): give the connections a moment to write it, so a
        // client sees why its answer stopped rather than a cut-off body.
        if tokio::time::timeout(FINAL_WRITE_GRACE, drain).await.is_err() {
            tracing::debug!("some connections did not finish writing their last frame");
        }
    }
    Ok(())
}

/// A connection whose writes must make progress: hyper has no write timeout, and a client
/// that stops reading (a streamed answer, or pipelined requests it never reads the answers
/// to) would otherwise hold its connection and its place among `max_connections` for ever.
/// A write that stays pending for `limit` fails with `TimedOut`, which ends the connection
/// (and, through the dropped body, cancels its request).
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write or flush is pending; disarmed by any progress.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline { inner, limit, timer: None }
    }

    /// A pending write: pending until the deadline, then the error.
    fn pending<T>(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>> {
        let limit = self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(timer.as_mut(), cx) {
            std::task::Poll::Ready(()) => {
                tracing::debug!("a client took nothing of its answer for {limit:?}: closing its connection");
                std::task::Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => this.pending(cx),
            ready => {
                this.timer = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            std::task::Poll::Pending => this.pending(cx),
            ready => {
                this.timer = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The address to print: what the listener really bound (port 0 picks a free port).
pub fn bound(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// The API a route belongs to: its errors (the routing's and the checks' included) are
/// answered in that API's shape, so each client can read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Ollama,
    Anthropic,
}

impl Dialect {
    fn of_path(path: &str) -> Dialect {
        if path == "/api" || path.starts_with("/api/") {
            Dialect::Ollama
        } else if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// Every route, its method and its handler, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Metrics,
    Models,
    Completions,
    ChatCompletions,
    Embeddings,
    Tokenize,
    Detokenize,
    LoadModel,
    UnloadModel,
    Ollama(ollama::Route),
    Messages,
    CountTokens,
    /// A file of the chat page (`webui.rs`).
    Page,
}

const ROUTES: &[(&str, &str, Route)] = &[
    ("GET", "/health", Route::Health),
    ("GET", "/metrics", Route::Metrics),
    ("GET", "/v1/models", Route::Models),
    ("POST", "/v1/completions", Route::Completions),
    ("POST", "/v1/chat/completions", Route::ChatCompletions),
    ("POST", "/v1/embeddings", Route::Embeddings),
    ("POST", "/tokenize", Route::Tokenize),
    ("POST", "/detokenize", Route::Detokenize),
    ("POST", "/models/load", Route::LoadModel),
    ("POST", "/models/unload", Route::UnloadModel),
    ("GET", "/api/version", Route::Ollama(ollama::Route::Version)),
    ("HEAD", "/api/version", Route::Ollama(ollama::Route::Version)),
    ("GET", "/api/tags", Route::Ollama(ollama::Route::Tags)),
    ("HEAD", "/api/tags", Route::Ollama(ollama::Route::Tags)),
    ("POST", "/api/show", Route::Ollama(ollama::Route::Show)),
    ("GET", "/api/ps", Route::Ollama(ollama::Route::Ps)),
    ("POST", "/api/generate", Route::Ollama(ollama::Route::Generate)),
    ("POST", "/api/chat", Route::Ollama(ollama::Route::Chat)),
    ("POST", "/api/embed", Route::Ollama(ollama::Route::Embed)),
    ("POST", "/api/embeddings", Route::Ollama(ollama::Route::Embeddings)),
    ("POST", "/api/pull", Route::Ollama(ollama::Route::Registry("pull"))),
    ("POST", "/api/push", Route::Ollama(ollama::Route::Registry("push"))),
    ("POST", "/api/create", Route::Ollama(ollama::Route::Registry("create"))),
    ("POST", "/api/copy", Route::Ollama(ollama::Route::Registry("copy"))),
    ("DELETE", "/api/delete", Route::Ollama(ollama::Route::Registry("delete"))),
    ("POST", "/v1/messages", Route::Messages),
    ("POST", "/v1/messages/count_tokens", Route::CountTokens),
    ("GET", "/", Route::Page),
    ("HEAD", "/", Route::Page),
    ("GET", "/webui/app.js", Route::Page),
    ("HEAD", "/webui/app.js", Route::Page),
    ("GET", "/webui/app.css", Route::Page),
    ("HEAD", "/webui/app.css", Route::Page),
    ("GET", "/webui/icon.svg", Route::Page),
    ("HEAD", "/webui/icon.svg", Route::Page),
];

/// The route for a method and path: 404 for an unknown path, 405 for a known path with
/// another method.
fn route_of(method: &Method, path: &str) -> Result<Route, ApiError> {
    let mut known = false;
    for (m, p, r) in ROUTES {
        if *p == path {
            known = true;
            if method.as_str() == *m {
                return Ok(*r);
            }
        }
    }
    Err(if known {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed")
    } else {
        // The path is the client's own text: keep what is echoed short.
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route {}", clip(path, 64)))
    })
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut resp = checked(state, req).await;
    // No response is ever to be read as another type than it says (a JSON error echoing
    // client text taken for HTML, say).
    resp.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(resp)
}

/// The Host and Origin checks, the CORS preflight, then the route.
async fn checked(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let dialect = Dialect::of_path(req.uri().path());
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    if state.config.loopback_hosts_only && !is_loopback_host(&host) {
        return ApiError::forbidden("this server only answers requests addressed to localhost", "host_not_allowed").into_response_in(dialect);
    }
    let origin = match check_origin(&state.config, &req, &host) {
        Ok(o) => o,
        Err(e) => return e.into_response_in(dialect),
    };
    if req.method() == Method::OPTIONS {
        // A CORS preflight: answered only for allowed origins.
        let Some(origin) = origin else {
            return ApiError::forbidden("cross-origin requests are not allowed", "cors_not_allowed").into_response_in(dialect);
        };
        let mut r = full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
        let h = r.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, DELETE, OPTIONS"));
        // The headers the page's client asks to send (SDKs add their own, such as
        // `x-stainless-*` and `anthropic-dangerous-direct-browser-access`): any is fine for
        // an allowed origin, since the key check does not depend on them.
        let asked = req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.unwrap_or(HeaderValue::from_static("authorization, content-type, x-api-key, anthropic-version, anthropic-beta")));
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        h.insert(VARY, HeaderValue::from_static("origin, access-control-request-headers"));
        return r;
    }
    let mut resp = match dispatch(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response_in(dialect),
    };
    if let Some(origin) = origin {
        resp.headers_mut().insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        resp.headers_mut().insert(VARY, HeaderValue::from_static("origin"));
    }
    resp
}

async fn dispatch(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let route = route_of(req.method(), req.uri().path())?;
    if route == Route::Health {
        state.serving()?;
        if !state.registry.engines_running() {
            return Err(ApiError::unavailable("the engine has stopped", "engine_stopped"));
        }
        // Ready, or busy: every loaded model's slots taken (a new request would queue). Both
        // are 200, so a plain health check keeps a busy replica in its pool; a balancer that
        // wants busy replicas out asks with llama-server's `?fail_on_no_slot=1`.
        let capacity = state.registry.capacity();
        let busy = capacity.models_loaded > 0 && capacity.slots_idle == 0;
        if busy && req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "fail_on_no_slot=1" || kv == "fail_on_no_slot=true")) {
            return Err(ApiError::unavailable("every slot is busy", "no_slot_available"));
        }
        return Ok(json_response(StatusCode::OK, &Health { status: if busy { "busy" } else { "ok" }, capacity }));
    }
    if route == Route::Page {
        // Without the key: the page holds no secret and must load to ask for the key.
        if !state.config.webui {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "the chat page is turned off (--no-webui)"));
        }
        return Ok(webui::serve(req.uri().path(), req.headers()));
    }
    check_key(&state.config, &req)?;
    match route {
        Route::Health | Route::Page => unreachable!("answered above"),
        Route::Models => Ok(openai::models(&state)),
        Route::Metrics => Ok(full(StatusCode::OK, "text/plain; version=0.0.4", state.registry.render_prometheus())),
        Route::LoadModel => admin::load(state.clone(), read_json(&state, req).await?).await,
        Route::UnloadModel => admin::unload(state.clone(), read_json(&state, req).await?).await,
        Route::Completions => openai::completions(state.clone(), read_json(&state, req).await?, false).await,
        Route::ChatCompletions => openai::completions(state.clone(), read_json(&state, req).await?, true).await,
        Route::Embeddings => embeddings::embeddings(state.clone(), read_json(&state, req).await?).await,
        Route::Tokenize => openai::tokenize(state.clone(), read_json(&state, req).await?).await,
        Route::Detokenize => openai::detokenize(state.clone(), read_json(&state, req).await?).await,
        Route::Ollama(route) => ollama::dispatch(state, route, req).await,
        Route::Messages => anthropic::messages(state.clone(), read_json(&state, req).await?).await,
        Route::CountTokens => anthropic::count_tokens(state.clone(), read_json(&state, req).await?).await,
    }
}

/// Runs `work` on a blocking thread, at most `blocking_tasks` at once: template rendering
/// and tokenizing cost time that grows with the input, and must never hold an async worker
/// (which would stall every other connection, /health included).
async fn blocking<T: Send + 'static>(state: &AppState, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    let permit = state.blocking.clone().acquire_owned().await.map_err(|_| ApiError::shutting_down())?;
    run_blocking(permit, work).await
}

/// Like [`blocking`] for work that has no admission of its own (/tokenize, /detokenize):
/// when every blocking permit is taken it answers 503 at once rather than queueing in front
/// of admitted completions.
async fn blocking_or_busy<T: Send + 'static>(state: &AppState, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    let permit = state.blocking.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    run_blocking(permit, work).await
}

/// `work` on a blocking thread, holding `permit` until it is done.
async fn run_blocking<T: Send + 'static>(permit: tokio::sync::OwnedSemaphorePermit, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the request's work failed"))
}

/// The body as JSON of type `T`: at most `max_body_bytes`, received within `body_timeout`.
async fn read_json<T: serde::de::DeserializeOwned>(state: &AppState, req: Request<Incoming>) -> Result<T, ApiError> {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.body_timeout;
    let bytes = match tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {} s", timeout.as_secs_f64()),
            )
            .closing())
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("request body over {limit} bytes")).closing())
        }
        Ok(Err(_)) => return Err(ApiError::bad_request("could not read the request body", None)),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde_json's own words ("recursion limit exceeded") do not say which limit.
        let why = e.to_string();
        let why = if why.starts_with("recursion limit exceeded") { format!("the JSON is nested deeper than 128 levels ({why})") } else { why };
        ApiError::bad_request(format!("invalid request: {}", clip(&why, 200)), None)
    })
}

/// The API key, as `Authorization: Bearer KEY` (OpenAI, Ollama) or `x-api-key: KEY`
/// (Anthropic), on every route of every dialect.
fn check_key(config: &ServerConfig, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &config.api_key else { return Ok(()) };
    // The scheme's name is case-insensitive (RFC 9110), the key is not.
    let bearer = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| &v[7..]));
    let given = bearer.or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok())).unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid or missing API key").code("invalid_api_key"))
    }
}

/// The Origin rule. No Origin (curl, SDKs): fine. An Origin on the allow-list: fine, and
/// echoed for CORS. The server's own origin (a page it serves, same host and port): fine.
/// Any other Origin (`null` included) is a page elsewhere making the browser talk to us:
/// refused, whatever the content type, since a "simple" cross-origin POST needs no preflight.
fn check_origin(config: &ServerConfig, req: &Request<Incoming>, host: &str) -> Result<Option<HeaderValue>, ApiError> {
    let Some(origin) = req.headers().get(ORIGIN) else { return Ok(None) };
    let o = origin.to_str().unwrap_or("");
    if config.cors_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)) {
        return Ok(Some(origin.clone()));
    }
    if is_same_origin(o, host) {
        return Ok(None);
    }
    Err(ApiError::forbidden("requests from other web origins are not allowed (see --cors-origin)", "origin_not_allowed"))
}

/// `origin` is `http(s)://` followed by exactly the Host the request was sent to.
fn is_same_origin(origin: &str, host: &str) -> bool {
    let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    !host.is_empty() && rest.is_some_and(|r| r.eq_ignore_ascii_case(host))
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// A Host header that names this machine: `localhost` (or a name under it), a loopback
/// address, with or without a port. Anything else on a loopback bind is a browser that was
/// pointed at us through someone's DNS name.
fn is_loopback_host(host: &str) -> bool {
    let name = if host.parse::<std::net::IpAddr>().is_ok() {
        host
    } else if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// At most `max` bytes of `s` (on a character boundary), with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response<Body> {
    full(status, "application/json", serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec()))
}

/// An error, answered in the shape of the route's dialect ([`ApiError::into_response_in`]):
/// OpenAI's error object, Ollama's `{"error": "…"}`, Anthropic's `{"type": "error", …}`.
/// Messages never carry paths or internals, and quote client text only clipped.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: bool,
    close: bool,
}

#[derive(Serialize)]
struct Health {
    /// `ok` or `busy`; loading and failed are 503s.
    status: &'static str,
    #[serde(flatten)]
    capacity: crate::registry::Capacity,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, retry_after: false, close: false }
    }
    fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError { param: param.map(str::to_string), ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }
    fn forbidden(message: &str, code: &'static str) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", message).code(code)
    }
    fn unavailable(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError { retry_after: true, ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", message).code(code) }
    }
    /// 503 + Retry-After: no room now.
    fn overloaded() -> ApiError {
        ApiError { retry_after: true, ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", "the server is busy; retry later").code("overloaded") }
    }
    fn shutting_down() -> ApiError {
        ApiError::unavailable("the server is shutting down", "shutting_down")
    }
    /// A request the server cut short (shutdown): never passed off as a complete answer.
    fn cancelled() -> ApiError {
        ApiError::unavailable("the request was cancelled: the server is shutting down", "cancelled")
    }
    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
    /// The connection is closed after this answer (its request body was not read).
    fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }

    /// The error object clients see (also as an SSE event).
    fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorObject { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } }
    }

    /// Ollama's error object: `{"error": "…"}` (also a streamed line).
    fn ollama_body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message })
    }

    /// Anthropic's error object (also the data of a streamed `error` event); its error
    /// type follows the status, as Anthropic's API documents them.
    fn anthropic_body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 if self.kind == "server_overloaded" => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        serde_json::json!({ "type": "error", "error": { "type": kind, "message": self.message } })
    }

    fn into_response_in(self, dialect: Dialect) -> Response<Body> {
        let mut r = match dialect {
            Dialect::OpenAi => json_response(self.status, &self.body()),
            Dialect::Ollama => json_response(self.status, &self.ollama_body()),
            Dialect::Anthropic => json_response(self.status, &self.anthropic_body()),
        };
        if self.retry_after {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.close {
            r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Overloaded { .. } => ApiError::overloaded(),
            SubmitError::PromptTooLong { tokens, limit } => ApiError {
                param: Some("messages".into()),
                ..ApiError::bad_request(format!("the prompt has {tokens} tokens; the limit is {limit}"), None).code("context_length_exceeded")
            },
            SubmitError::PromptTooLarge { bytes, limit } => ApiError {
                param: Some("prompt".into()),
                ..ApiError::bad_request(format!("the prompt is {bytes} bytes; the limit is {limit}"), None).code("prompt_too_large")
            },
            SubmitError::EmptyPrompt => ApiError::bad_request("the prompt is empty", Some("prompt")),
            SubmitError::InvalidParam { field, reason } => ApiError::bad_request(format!("invalid {field}: {}", clip(&reason, 200)), Some(&field)),
            SubmitError::Stopped => ApiError::shutting_down(),
            SubmitError::CannotEmbed { .. } => ApiError::bad_request(clip(&e.to_string(), 300), Some("model")).code("embeddings_unsupported"),
            SubmitError::InputTooLong { .. } | SubmitError::TooManyTokens { .. } => {
                ApiError::bad_request(e.to_string(), Some("input")).code("context_length_exceeded")
            }
            SubmitError::NoInput
            | SubmitError::TooManyInputs { .. }
            | SubmitError::EmptyInput { .. }
            | SubmitError::InputTooLarge { .. }
            | SubmitError::InvalidToken { .. } => ApiError::bad_request(e.to_string(), Some("input")),
        }
    }
}

impl From<AcquireError> for ApiError {
    fn from(e: AcquireError) -> ApiError {
        const MIB: f64 = (1u64 << 20) as f64;
        match e {
            AcquireError::UnknownModel(name) if name.is_empty() => ApiError::bad_request("no model was given and the server has no default model", Some("model")),
            AcquireError::UnknownModel(name) => ApiError {
                param: Some("model".into()),
                ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("the model '{}' does not exist", clip(&name, 64))).code("model_not_found")
            },
            AcquireError::LoadFailed(reason) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("the model failed to load: {}", clip(&reason, 300))).code("model_load_failed")
            }
            AcquireError::DeviceUnavailable(reason) => ApiError {
                retry_after: true,
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("a device of the model is unavailable: {}", clip(&reason, 300))).code("device_unavailable")
            },
            AcquireError::InsufficientMemory { needed, available, budget } => {
                let budget = budget.map(|b| format!(", budget {:.0} MiB", b as f64 / MIB)).unwrap_or_default();
                let message = format!(
                    "not enough memory to load the model: it needs about {:.0} MiB, {:.0} MiB is available{budget} (needed {needed} bytes, available {available} bytes)",
                    needed as f64 / MIB,
                    available as f64 / MIB
                );
                ApiError { retry_after: true, ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "insufficient_memory", message).code("insufficient_memory") }
            }
            AcquireError::NoRoom => ApiError {
                retry_after: true,
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", "no room to load the model: every loaded model is busy; retry later").code("no_room")
            },
            AcquireError::Busy => ApiError::overloaded(),
            AcquireError::ShuttingDown => ApiError::shutting_down(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_host_names() {
        for h in ["localhost", "localhost:8080", "LOCALHOST.", "app.localhost:1", "127.0.0.1", "127.0.0.1:8080", "127.5.6.7", "[::1]:8080", "[::1]", "::1"] {
            assert!(is_loopback_host(h), "{h} should pass");
        }
        for h in ["", "evil.example", "evil.example:8080", "localhost.evil.example", "10.0.0.1:80", "0.0.0.0", "[::]:80", "127.0.0.1.nip.io"] {
            assert!(!is_loopback_host(h), "{h} should be refused");
        }
    }

    #[test]
    fn api_keys_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret-longer"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn only_the_servers_own_origin_is_same_origin() {
        assert!(is_same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(is_same_origin("http://LOCALHOST:8080", "localhost:8080"));
        for (o, h) in [("http://evil.example", "127.0.0.1:8080"), ("null", "127.0.0.1:8080"), ("http://127.0.0.1:9999", "127.0.0.1:8080"), ("http://127.0.0.1:8080", ""), ("file://", "x")] {
            assert!(!is_same_origin(o, h), "{o} on {h}");
        }
    }

    #[test]
    fn the_dialect_is_the_paths() {
        assert_eq!(Dialect::of_path("/api/chat"), Dialect::Ollama);
        assert_eq!(Dialect::of_path("/api/nothing-here"), Dialect::Ollama);
        assert_eq!(Dialect::of_path("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/v1/messages/count_tokens"), Dialect::Anthropic);
        for p in ["/v1/chat/completions", "/v1/messagesX", "/apix", "/health", "/"] {
            assert_eq!(Dialect::of_path(p), Dialect::OpenAi, "{p}");
        }
    }

    #[test]
    fn errors_take_each_dialects_shape() {
        let e = ApiError::bad_request("no", Some("x"));
        assert_eq!(e.ollama_body(), serde_json::json!({"error": "no"}));
        assert_eq!(e.anthropic_body(), serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}));
        let kinds = [
            (ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "k"), "authentication_error"),
            (ApiError::forbidden("h", "host_not_allowed"), "permission_error"),
            (ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "m"), "not_found_error"),
            (ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "b"), "request_too_large"),
            (ApiError::overloaded(), "overloaded_error"),
            (ApiError::shutting_down(), "api_error"),
            (ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "g"), "api_error"),
        ];
        for (e, kind) in kinds {
            assert_eq!(e.anthropic_body()["error"]["type"], kind, "{}", e.message);
        }
    }

    #[test]
    fn the_routing_table_answers_404_and_405() {
        assert_eq!(route_of(&Method::GET, "/health").unwrap(), Route::Health);
        assert_eq!(route_of(&Method::POST, "/v1/chat/completions").unwrap(), Route::ChatCompletions);
        assert_eq!(route_of(&Method::GET, "/v1/chat/completions").unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
        let long = format!("/{}", "x".repeat(10_000));
        let e = route_of(&Method::GET, &long).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.len() < 100, "{}", e.message.len());
    }
}
