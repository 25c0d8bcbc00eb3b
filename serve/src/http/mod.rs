//! `llama serve`: an OpenAI-compatible HTTP endpoint on hyper, over the engine.
//!
//! Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
//! GET /v1/models, GET /health, GET /metrics (Prometheus text), POST /tokenize,
//! POST /detokenize. Errors are OpenAI error objects. Bounded everywhere: body size,
//! header read time, connections; an engine queue that is full answers 503 with
//! Retry-After. A client that disconnects mid-stream cancels its request (the engine frees
//! its slot at the next step). The engine wakes each response's task directly (the event
//! channel has an async receiver), so no thread waits on the engine.
//!
//! The server listens before the model is loaded: /health answers 503 `loading` until the
//! engine is ready, and, when loading failed and the server was told to stay up, 503 with
//! the reason (never a path). On a loopback bind a request whose Host header is not a
//! loopback name is refused (DNS rebinding); cross-origin access (CORS) is off unless
//! origins are allowed explicitly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, AUTHORIZATION,
    CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER, VARY,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use llama_host::chat::{ChatTemplate, Message};
use llama_host::{GenerateOptions, SamplingParams};

use crate::engine::{Engine, Event, Finish, RequestStats, SubmitError};

type Body = BoxBody<Bytes, Infallible>;

/// How the server listens and what it allows.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients use in `model` (and /v1/models lists).
    pub model_name: String,
    /// Required as `Authorization: Bearer KEY` on every route but /health.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// A client must finish sending its request headers within this time.
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// How long shutdown waits for open streams.
    pub drain_timeout: Duration,
    /// Refuse requests whose Host header is not a loopback name or address (set on a
    /// loopback bind: a web page that rebinds its own DNS name to 127.0.0.1 then gets 403).
    pub loopback_hosts_only: bool,
    /// Origins allowed cross-origin access (`*` for any). Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_name: "llama".into(),
            api_key: None,
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            drain_timeout: Duration::from_secs(10),
            loopback_hosts_only: true,
            cors_origins: Vec::new(),
        }
    }
}

/// What the request handlers share. The server starts before the model is loaded: until
/// [`AppState::set_ready`] the model routes answer 503.
pub struct AppState {
    pub config: ServerConfig,
    ready: OnceLock<Ready>,
    failed: OnceLock<String>,
}

/// A loaded model's engine, and its chat template when it has one.
pub struct Ready {
    pub engine: Arc<Engine>,
    pub template: Option<ChatTemplate>,
}

impl AppState {
    pub fn new(config: ServerConfig) -> AppState {
        AppState { config, ready: OnceLock::new(), failed: OnceLock::new() }
    }

    /// Loading finished: the model routes open.
    pub fn set_ready(&self, ready: Ready) {
        let _ = self.ready.set(ready);
    }

    /// Loading failed: /health and the model routes answer 503 with `reason`, which must
    /// not name a filesystem path.
    pub fn set_failed(&self, reason: String) {
        let _ = self.failed.set(reason);
    }

    /// The engine, or the 503 that says why there is none.
    #[allow(clippy::result_large_err)] // built once per request, returned at once
    fn ready(&self) -> Result<&Ready, Response<Body>> {
        if let Some(r) = self.ready.get() {
            return Ok(r);
        }
        Err(match self.failed.get() {
            Some(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", format!("the model failed to load: {reason}"), None, Some("model_load_failed")),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", "loading model", None, Some("loading")),
        })
    }
}

/// Serves until `shutdown` completes, then stops accepting and gives open connections
/// `drain_timeout` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
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
                    .serve_connection(TokioIo::new(stream), service_fn(move |req| handle(st.clone(), req)));
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
    tracing::info!("shutting down: no new connections, draining open ones");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(state.config.drain_timeout) => tracing::warn!("drain deadline passed; closing"),
    }
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("text/plain")));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

/// An OpenAI error object. Messages never carry paths or internals.
fn error(status: StatusCode, kind: &str, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Response<Body> {
    json_response(status, &json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}}))
}

fn bad_request(message: impl Into<String>, param: Option<&str>) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message, param, None)
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

/// The allowed origin to echo back, if the request's Origin is on the allow-list.
fn allowed_origin(config: &ServerConfig, req: &Request<Incoming>) -> Option<HeaderValue> {
    let origin = req.headers().get(ORIGIN)?;
    let o = origin.to_str().ok()?;
    config.cors_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)).then(|| origin.clone())
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if state.config.loopback_hosts_only {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !is_loopback_host(host) {
            return Ok(error(StatusCode::FORBIDDEN, "invalid_request_error", "this server only answers requests addressed to localhost", None, Some("host_not_allowed")));
        }
    }
    let origin = allowed_origin(&state.config, &req);
    if req.method() == Method::OPTIONS {
        // A CORS preflight: answered only for allowed origins.
        let Some(origin) = origin else {
            return Ok(error(StatusCode::FORBIDDEN, "invalid_request_error", "cross-origin requests are not allowed", None, Some("cors_not_allowed")));
        };
        let mut r = full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
        let h = r.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        h.insert(VARY, HeaderValue::from_static("origin"));
        return Ok(r);
    }
    let mut resp = route(state, req).await;
    if let Some(origin) = origin {
        resp.headers_mut().insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        resp.headers_mut().insert(VARY, HeaderValue::from_static("origin"));
    }
    Ok(resp)
}

async fn route(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        return match state.ready() {
            Ok(_) => json_response(StatusCode::OK, &json!({"status": "ok"})),
            Err(resp) => resp,
        };
    }
    if let Some(key) = &state.config.api_key {
        let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid or missing API key", None, Some("invalid_api_key"));
        }
    }
    let method = req.method().clone();
    let known = matches!(path.as_str(), "/v1/models" | "/metrics" | "/v1/completions" | "/v1/chat/completions" | "/tokenize" | "/detokenize");
    if !known {
        return error(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route {path}"), None, None);
    }
    let ready = match state.ready() {
        Ok(_) if path == "/v1/models" => None,
        Ok(r) => Some(r),
        Err(resp) => return resp,
    };
    match (method, path.as_str(), ready) {
        (Method::GET, "/v1/models", _) => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": 0, "owned_by": "llama"}]}),
        ),
        (Method::GET, "/metrics", Some(r)) => full(StatusCode::OK, "text/plain; version=0.0.4", r.engine.metrics().render_prometheus()),
        (Method::POST, "/v1/completions" | "/v1/chat/completions" | "/tokenize" | "/detokenize", Some(r)) => {
            let body = match read_json(&state, req).await {
                Ok(v) => v,
                Err(resp) => return resp,
            };
            match path.as_str() {
                "/v1/completions" => completion(&state, r, body, false).await,
                "/v1/chat/completions" => completion(&state, r, body, true).await,
                "/tokenize" => tokenize(r, body),
                _ => detokenize(r, body),
            }
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed", None, None),
    }
}

async fn read_json(state: &AppState, req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let limit = state.config.max_body_bytes;
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("request body over {limit} bytes"), None, None))
        }
        Err(_) => return Err(bad_request("could not read the request body", None)),
    };
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("malformed JSON: {e}"), None))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of both completion requests (OpenAI's, plus llama.cpp's extras).
#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

async fn completion(state: &AppState, ready: &Ready, body: Value, chat: bool) -> Response<Body> {
    let req: CompletionRequest = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("invalid request: {e}"), None),
    };
    if let Some(m) = &req.model {
        if m != &state.config.model_name {
            return error(StatusCode::NOT_FOUND, "invalid_request_error", format!("the model '{m}' does not exist"), Some("model"), Some("model_not_found"));
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return bad_request("only n = 1 is supported", Some("n"));
    }
    let prompt = if chat {
        let Some(messages) = req.messages else { return bad_request("'messages' is required", Some("messages")) };
        let Some(tmpl) = &ready.template else { return bad_request("this model has no chat template", Some("messages")) };
        let msgs: Vec<Message> = messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: match m.content {
                    Content::Text(t) => t,
                    Content::Parts(p) => p.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join(""),
                },
            })
            .collect();
        match tmpl.render(&msgs, true) {
            Ok(p) => p,
            Err(e) => return bad_request(e.to_string(), Some("messages")),
        }
    } else {
        match req.prompt {
            Some(p) => p,
            None => return bad_request("'prompt' is required", Some("prompt")),
        }
    };
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        None => None,
        Some(n) if n >= 0 && n <= u32::MAX as i64 => Some(n as u32),
        Some(n) => return bad_request(format!("max_tokens must be >= 0, got {n}"), Some("max_tokens")),
    };
    let d = SamplingParams::default();
    let seed = match req.seed {
        None | Some(-1) => d.seed,
        Some(s) if (0..u32::MAX as i64).contains(&s) => s as u32,
        Some(s) => return bad_request(format!("seed {s} is out of range"), Some("seed")),
    };
    let sampling = SamplingParams {
        temperature: req.temperature.unwrap_or(d.temperature),
        top_p: req.top_p.unwrap_or(d.top_p),
        top_k: req.top_k.unwrap_or(d.top_k),
        min_p: req.min_p.unwrap_or(d.min_p),
        repeat_penalty: req.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: req.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: req.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed,
        ..d
    };
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let opts = GenerateOptions { max_tokens, sampling, add_special: !chat, stop };
    let handle = match ready.engine.submit(crate::engine::Request { prompt, opts, deadline: None }) {
        Ok(h) => h,
        Err(e) => return submit_error(e),
    };
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, handle.id());
    let model = state.config.model_name.clone();
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return stream_response(handle, id, model, chat, include_usage);
    }
    // If the client goes away, hyper drops this future and with it the handle, which
    // cancels the request.
    let (text, stats) = handle.collect_async().await;
    if stats.finish == Finish::Error {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "generation failed", None, None);
    }
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(&stats)})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(&stats)})
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": now_secs(),
            "model": model,
            "choices": [choice],
            "usage": usage(&stats),
        }),
    )
}

fn finish_reason(s: &RequestStats) -> &'static str {
    match s.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled | Finish::Timeout | Finish::Error => "stop",
    }
}

fn usage(s: &RequestStats) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens, "total_tokens": s.prompt_tokens + s.generated_tokens})
}

fn submit_error(e: SubmitError) -> Response<Body> {
    match e {
        SubmitError::Overloaded { .. } => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", "the server is busy; retry later", None, Some("overloaded"));
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        SubmitError::PromptTooLong { tokens, limit } => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the prompt has {tokens} tokens; the limit is {limit}"),
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        SubmitError::EmptyPrompt => bad_request("the prompt is empty", Some("prompt")),
        SubmitError::InvalidParam { field, reason } => bad_request(format!("invalid {field}: {reason}"), Some(&field)),
        SubmitError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down", None, None),
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
///
/// The body is the request's event stream itself, mapped to SSE frames: the engine thread
/// wakes this connection's task directly. When the client goes away hyper drops the body,
/// and with it the event stream, which cancels the request (also while it is queued).
fn stream_response(handle: crate::engine::Handle, id: String, model: String, chat: bool, include_usage: bool) -> Response<Body> {
    let created = now_secs();
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |delta: Value, finish: Value| -> Bytes {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "logprobs": null, "finish_reason": finish})
        };
        let obj = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        Bytes::from(format!("data: {obj}\n\n"))
    };
    let head = chat.then(|| chunk(json!({"role": "assistant", "content": ""}), Value::Null));
    let events = handle.into_stream().map(move |ev| match ev {
        Event::Text(t) => chunk(json!({"content": t}), Value::Null),
        Event::Done(stats) => {
            // The last chunk, the usage and the terminator go out as one frame.
            let mut tail = chunk(json!({}), json!(finish_reason(&stats))).to_vec();
            if include_usage {
                let u = json!({"id": "usage", "object": object, "choices": [], "usage": usage(&stats)});
                tail.extend_from_slice(format!("data: {u}\n\n").as_bytes());
            }
            tail.extend_from_slice(b"data: [DONE]\n\n");
            Bytes::from(tail)
        }
    });
    let frames = tokio_stream::iter(head).chain(events).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

fn tokenize(ready: &Ready, body: Value) -> Response<Body> {
    let Some(content) = body.get("content").and_then(Value::as_str) else { return bad_request("'content' (a string) is required", Some("content")) };
    let add_special = body.get("add_special").and_then(Value::as_bool).unwrap_or(false);
    match ready.engine.model().tokenize(content, add_special) {
        Ok(t) => json_response(StatusCode::OK, &json!({"tokens": t})),
        Err(e) => bad_request(e.to_string(), Some("content")),
    }
}

fn detokenize(ready: &Ready, body: Value) -> Response<Body> {
    let Some(tokens) = body.get("tokens").and_then(Value::as_array) else { return bad_request("'tokens' (an array of integers) is required", Some("tokens")) };
    let mut bytes = Vec::new();
    for t in tokens {
        let Some(id) = t.as_i64().and_then(|i| i32::try_from(i).ok()) else { return bad_request("tokens must be integers", Some("tokens")) };
        match ready.engine.model().token_bytes(id, false) {
            Ok(b) => bytes.extend(b),
            Err(_) => return bad_request(format!("token {id} is not in the vocabulary"), Some("tokens")),
        }
    }
    json_response(StatusCode::OK, &json!({"content": String::from_utf8_lossy(&bytes)}))
}

/// The address to print: what the listener really bound (port 0 picks a free port).
pub fn bound(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
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
}
