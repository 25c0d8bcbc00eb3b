//! The OpenAI dialect (plus llama-server's /tokenize and /detokenize): typed request and
//! response structs, and their translation into engine requests and back.
//!
//! A completion is admitted by the engine first (503 at once when full), then its prompt is
//! rendered and tokenized on a blocking thread, then its events are awaited here (streamed
//! as server-sent events, or collected).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use llama_host::chat::{Message, ToolCall};
use llama_host::{GenerateOptions, SamplingParams};
use llama_tools::{OutputEvent, ParsedMessage, ToolCallParser};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_stream::StreamExt;

use super::structured::{Constraint, Fields, ResponseFormat};
use super::{blocking, blocking_or_busy, clip, json_response, now_secs, ApiError, AppState, Body};
use crate::engine::{Event, Finish, Handle, Request, RequestStats};
use crate::registry::{KeepAlive, ModelStatus};

/// Most stop strings a request may give, and their longest length in bytes.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 1024;

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
    /// `null` (or absent) on an assistant turn that only calls tools.
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls, as this API returned them.
    #[serde(default)]
    tool_calls: Option<Vec<IncomingToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct IncomingToolCall {
    #[serde(default)]
    id: Option<String>,
    function: IncomingFunction,
}

#[derive(Deserialize)]
struct IncomingFunction {
    name: String,
    /// A JSON string (OpenAI's); an object is taken too.
    arguments: Value,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of both completion requests (OpenAI's, plus llama.cpp's extras).
#[derive(Deserialize)]
pub(super) struct CompletionRequest {
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
    /// How long the model stays loaded once idle (Ollama's field): seconds, or a duration
    /// such as `"5m"`; 0 unloads it once idle, -1 never.
    keep_alive: Option<KeepAliveField>,
    #[serde(flatten)]
    constraint: ConstraintFields,
}

/// Structured output: OpenAI's `response_format`, llama-server's `grammar` (GBNF) and
/// `json_schema`; tool calls: `tools`, `tool_choice`, `parallel_tool_calls`; llama-server's
/// per-request `reasoning_format` (`none`, `auto`, `deepseek`). Taken out of the request
/// whole for the blocking thread that builds the constraint.
#[derive(Deserialize, Default)]
struct ConstraintFields {
    response_format: Option<ResponseFormat>,
    grammar: Option<String>,
    json_schema: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    reasoning_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum KeepAliveField {
    Seconds(f64),
    Text(String),
}

/// The longest keep-alive a request may set (beyond it: -1, never).
const MAX_KEEP_ALIVE_S: f64 = 365.0 * 86_400.0;

impl KeepAliveField {
    pub(super) fn parse(&self) -> Result<KeepAlive, ApiError> {
        let secs = match self {
            KeepAliveField::Seconds(s) => Some(*s),
            KeepAliveField::Text(t) => {
                let t = t.trim();
                let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map_or((t, "s"), |i| t.split_at(i));
                let scale = match unit {
                    "ms" => Some(0.001),
                    "s" => Some(1.0),
                    "m" => Some(60.0),
                    "h" => Some(3600.0),
                    _ => None,
                };
                num.trim().parse::<f64>().ok().zip(scale).map(|(n, k)| n * k)
            }
        };
        match secs {
            Some(s) if s < 0.0 && s.is_finite() => Ok(KeepAlive::Never),
            Some(s) if (0.0..=MAX_KEEP_ALIVE_S).contains(&s) => Ok(KeepAlive::After(std::time::Duration::from_secs_f64(s))),
            _ => Err(ApiError::bad_request(
                format!("keep_alive must be seconds (-1 for never, at most {MAX_KEEP_ALIVE_S}) or a duration such as \"5m\""),
                Some("keep_alive"),
            )),
        }
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    fn of(s: &RequestStats) -> Usage {
        Usage { prompt_tokens: s.prompt_tokens, completion_tokens: s.generated_tokens, total_tokens: s.prompt_tokens + s.generated_tokens }
    }
}

/// A completion (`text_completion`) or chat completion (`chat.completion`), whole or as
/// one streamed chunk; `C` is the dialect's choice type.
#[derive(Serialize)]
struct Completion<C> {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct TextChoice {
    index: u32,
    text: String,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    /// `null` when the answer is only tool calls, as OpenAI sends it.
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutgoingToolCall>,
}

#[derive(Serialize)]
struct OutgoingToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutgoingFunction,
}

#[derive(Serialize)]
struct OutgoingFunction {
    name: String,
    /// The arguments as a JSON string.
    arguments: String,
}

/// A streamed piece of a tool call: the first names it (index, id, type, name), the rest
/// carry argument fragments, as OpenAI streams them.
#[derive(Serialize)]
struct DeltaToolCall {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: DeltaFunction,
}

#[derive(Serialize)]
struct DeltaFunction {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    arguments: String,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<DeltaToolCall>>,
}

impl Delta {
    fn of(ev: OutputEvent) -> Delta {
        match ev {
            OutputEvent::Content(t) => Delta { content: Some(t), ..Delta::default() },
            OutputEvent::Reasoning(t) => Delta { reasoning_content: Some(t), ..Delta::default() },
            OutputEvent::ToolCallBegin { index, id, name } => Delta {
                tool_calls: Some(vec![DeltaToolCall { index, id: Some(id), kind: Some("function"), function: DeltaFunction { name: Some(name), arguments: String::new() } }]),
                ..Delta::default()
            },
            OutputEvent::ToolCallArgs { index, fragment } => Delta {
                tool_calls: Some(vec![DeltaToolCall { index, id: None, kind: None, function: DeltaFunction { name: None, arguments: fragment } }]),
                ..Delta::default()
            },
        }
    }
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelEntry>,
}

/// A model as OpenAI lists it, plus its state in this server (see [`ModelStatus`]).
#[derive(Serialize)]
struct ModelEntry {
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    #[serde(flatten)]
    status: ModelStatus,
}

#[derive(Deserialize)]
pub(super) struct TokenizeRequest {
    model: Option<String>,
    content: String,
    #[serde(default)]
    add_special: bool,
}

#[derive(Serialize)]
struct TokenizeResponse {
    tokens: Vec<i32>,
}

#[derive(Deserialize)]
pub(super) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

#[derive(Serialize)]
struct DetokenizeResponse {
    content: String,
}

pub(super) fn models(state: &AppState) -> Response<Body> {
    let data = state.registry.list().into_iter().map(|status| ModelEntry { object: "model", created: 0, owned_by: "llama", status }).collect();
    json_response(StatusCode::OK, &ModelList { object: "list", data })
}

/// What a request asks for, checked before any model is loaded for it: everything but
/// the prompt. The model's own defaults fill what it leaves out ([`Checked::options`]).
struct Checked {
    max_tokens: Option<u32>,
    seed: Option<u32>,
    stop: Option<Vec<String>>,
    stream: bool,
    include_usage: bool,
    keep_alive: Option<KeepAlive>,
}

fn check(req: &CompletionRequest) -> Result<Checked, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        None => None,
        Some(n) if (0..=u32::MAX as i64).contains(&n) => Some(n as u32),
        Some(n) => return Err(ApiError::bad_request(format!("max_tokens must be >= 0, got {n}"), Some("max_tokens"))),
    };
    let seed = match req.seed {
        None | Some(-1) => None,
        Some(s) if (0..u32::MAX as i64).contains(&s) => Some(s as u32),
        Some(s) => return Err(ApiError::bad_request(format!("seed {s} is out of range"), Some("seed"))),
    };
    let stop = match &req.stop {
        None => None,
        Some(Stop::One(s)) => Some(vec![s.clone()]),
        Some(Stop::Many(v)) => Some(v.clone()),
    };
    if stop.as_ref().is_some_and(|stop| stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES)) {
        return Err(ApiError::bad_request(format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes each"), Some("stop")));
    }
    Ok(Checked {
        max_tokens,
        seed,
        stop,
        stream: req.stream,
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        keep_alive: req.keep_alive.as_ref().map(KeepAliveField::parse).transpose()?,
    })
}

impl Checked {
    /// The generation options: the request's values, else the model's defaults.
    fn options(&self, req: &CompletionRequest, d: &GenerateOptions, chat: bool) -> GenerateOptions {
        let ds = &d.sampling;
        let sampling = SamplingParams {
            temperature: req.temperature.unwrap_or(ds.temperature),
            top_p: req.top_p.unwrap_or(ds.top_p),
            top_k: req.top_k.unwrap_or(ds.top_k),
            min_p: req.min_p.unwrap_or(ds.min_p),
            repeat_penalty: req.repeat_penalty.unwrap_or(ds.repeat_penalty),
            presence_penalty: req.presence_penalty.unwrap_or(ds.presence_penalty),
            frequency_penalty: req.frequency_penalty.unwrap_or(ds.frequency_penalty),
            seed: self.seed.unwrap_or(ds.seed),
            ..ds.clone()
        };
        GenerateOptions { max_tokens: self.max_tokens.or(d.max_tokens), sampling, add_special: !chat, stop: self.stop.clone().unwrap_or_else(|| d.stop.clone()) }
    }
}

/// The conversation as the template's messages.
fn messages(req: &mut CompletionRequest) -> Result<Vec<Message>, ApiError> {
    let Some(messages) = req.messages.take() else { return Err(ApiError::bad_request("'messages' is required", Some("messages"))) };
    Ok(messages
        .into_iter()
        .map(|m| Message {
            role: m.role,
            content: match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(p)) => p.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join(""),
                None => String::new(),
            },
            tool_calls: m.tool_calls.map(|calls| {
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let arguments = match c.function.arguments {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        ToolCall::new(c.id.unwrap_or_else(|| format!("call_{i}")), c.function.name, arguments)
                    })
                    .collect()
            }),
            tool_call_id: m.tool_call_id,
            name: m.name,
        })
        .collect())
}

pub(super) async fn completions(state: Arc<AppState>, mut req: CompletionRequest, chat: bool) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    // Everything that can be checked without the model is, before a model is loaded for it.
    let checked = check(&req)?;
    // The constraint (a JSON Schema's conversion, the tools' schemas) is CPU work a client
    // controls: on a blocking thread, never on the threads that answer HTTP.
    let fields = std::mem::take(&mut req.constraint);
    let reasoning = state.config.reasoning_format;
    let constraint = blocking(&state, move || Constraint::of(fields.borrowed(), chat, reasoning)).await??;
    let model_name = req.model.take();
    let input = if chat { Err(messages(&mut req)?) } else { Ok(req.prompt.take().ok_or_else(|| ApiError::bad_request("'prompt' is required", Some("prompt")))?) };
    // The model stays loaded while the lease lives: to the end of the answer or stream.
    let lease = state.registry.acquire(model_name.as_deref(), checked.keep_alive).await?;
    let ready = lease.ready.clone();
    if chat && ready.template.is_none() {
        return Err(ApiError::bad_request("this model has no chat template", Some("messages")));
    }
    let mut opts = checked.options(&req, &ready.defaults, chat);
    let Checked { stream, include_usage, .. } = checked;
    // Admission before any work: a full engine answers 503 at once.
    let reservation = ready.engine.reserve()?;
    let model = lease.name().to_string();
    let (handle, parser) = blocking(&state, move || -> Result<(Handle, Option<ToolCallParser>), ApiError> {
        let template = if chat { ready.template.as_ref() } else { None };
        let prompt = match input {
            Ok(prompt) => prompt,
            Err(msgs) => {
                let template = template.expect("checked above");
                template
                    .render_with(&msgs, true, constraint.template_tools(), None)
                    .map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("messages")))?
            }
        };
        let plan = constraint.plan(ready.engine.model(), template, &prompt)?;
        if let Some(format) = plan.format {
            tracing::info!(model = %model, format = format.name(), lazy = plan.grammar.as_ref().is_some_and(|g| g.lazy), "tool-call format");
        }
        opts.sampling.grammar = plan.grammar;
        Ok((reservation.submit(Request { prompt, opts, deadline: None })?, plan.parser))
    })
    .await??;
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, handle.id());
    let model = lease.name().to_string();
    if stream {
        return Ok(stream_response(handle, id, model, chat, include_usage, parser, lease));
    }
    // If the client goes away, hyper drops this future and with it the handle, which
    // cancels the request.
    let (text, stats) = handle.collect_async().await;
    match stats.finish {
        Finish::Error => return Err(generation_failed(&stats)),
        // Cut short by the server (shutdown): not an answer to pass off as complete.
        Finish::Cancelled | Finish::Timeout => return Err(ApiError::cancelled()),
        Finish::Stop | Finish::Length => {}
    }
    let usage = Some(Usage::of(&stats));
    Ok(if chat {
        let message = match parser {
            Some(mut p) => {
                p.push(&text);
                answer(p)
            }
            None => ParsedMessage { content: Some(text), ..ParsedMessage::default() },
        };
        let finish_reason = Some(finish_reason(&stats, !message.tool_calls.is_empty()));
        let message = AssistantMessage {
            role: "assistant",
            content: message.content.or_else(|| message.tool_calls.is_empty().then(String::new)),
            reasoning_content: message.reasoning_content,
            tool_calls: message
                .tool_calls
                .into_iter()
                .map(|c| OutgoingToolCall { id: c.id, kind: "function", function: OutgoingFunction { name: c.name, arguments: c.arguments } })
                .collect(),
        };
        let choice = ChatChoice { index: 0, message, finish_reason };
        json_response(StatusCode::OK, &Completion { id, object: "chat.completion", created: now_secs(), model, choices: vec![choice], usage })
    } else {
        let choice = TextChoice { index: 0, text, logprobs: None, finish_reason: Some(finish_reason(&stats, false)) };
        json_response(StatusCode::OK, &Completion { id, object: "text_completion", created: now_secs(), model, choices: vec![choice], usage })
    })
}

impl ConstraintFields {
    fn borrowed(&self) -> Fields<'_> {
        Fields {
            response_format: self.response_format.as_ref(),
            grammar: self.grammar.as_deref(),
            json_schema: self.json_schema.as_ref(),
            tools: self.tools.as_deref(),
            tool_choice: self.tool_choice.as_ref(),
            parallel_tool_calls: self.parallel_tool_calls,
            reasoning_format: self.reasoning_format.as_deref(),
        }
    }
}

/// The parsed answer; output the parser could not read as calls (a generation cut short
/// by `max_tokens` mid-call) is kept as content, never lost.
fn answer(p: ToolCallParser) -> ParsedMessage {
    match p.finish() {
        Ok(f) => f.message,
        Err(failure) => {
            tracing::debug!(problem = %failure.problem, "the answer's tool calls could not be read; kept as content");
            failure.recovered.message
        }
    }
}

/// A generation that failed after it was admitted: the reason, as a server error.
fn generation_failed(stats: &RequestStats) -> ApiError {
    let why = stats.error.as_deref().unwrap_or("unknown error");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("generation failed: {}", clip(why, 300))).code("generation_failed")
}

fn finish_reason(s: &RequestStats, tool_calls: bool) -> &'static str {
    match s.finish {
        Finish::Length => "length",
        Finish::Stop if tool_calls => "tool_calls",
        Finish::Stop | Finish::Cancelled | Finish::Timeout | Finish::Error => "stop",
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A generation
/// that fails mid-stream sends an `error` object (as llama-server does) before `[DONE]`,
/// never a chunk that claims it stopped normally.
///
/// The body is the request's event stream itself, mapped to SSE frames: the engine thread
/// wakes this connection's task directly. When the client goes away hyper drops the body,
/// and with it the event stream, which cancels the request (also while it is queued).
///
/// A chat answer goes through `parser` (when the request has one): content, reasoning and
/// tool calls stream as their own deltas, and text that may start a call's marker is held
/// until it is known.
///
/// `lease` keeps the model loaded until the stream ends (or the client goes away).
fn stream_response(
    handle: Handle,
    id: String,
    model: String,
    chat: bool,
    include_usage: bool,
    parser: Option<ToolCallParser>,
    lease: impl Send + Sync + 'static,
) -> Response<Body> {
    let created = now_secs();
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let sse = |v: &dyn erased::Json| -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&v.to_json());
        out.extend_from_slice(b"\n\n");
        out
    };
    let chunk = move |delta: Delta, finish: Option<&'static str>| -> Vec<u8> {
        if chat {
            let choice = ChunkChoice { index: 0, delta, finish_reason: finish };
            sse(&Completion { id: id.clone(), object, created, model: model.clone(), choices: vec![choice], usage: None })
        } else {
            let choice = TextChoice { index: 0, text: delta.content.unwrap_or_default(), logprobs: None, finish_reason: finish };
            sse(&Completion { id: id.clone(), object, created, model: model.clone(), choices: vec![choice], usage: None })
        }
    };
    let head = chat.then(|| Bytes::from(chunk(Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() }, None)));
    let mut parser = parser;
    let mut called = false;
    // Whether the request's end arrived; if its channel closes without one (the engine
    // stopped), the stream still ends with an error and `[DONE]`, never silently.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = done.clone();
    let events = handle.into_stream().filter_map(move |ev| match ev {
        Event::Text(t) => {
            let _holds = &lease;
            let Some(p) = parser.as_mut() else { return Some(Bytes::from(chunk(Delta { content: Some(t), ..Delta::default() }, None))) };
            let mut out = Vec::new();
            for ev in p.push(&t) {
                out.extend_from_slice(&chunk(Delta::of(ev), None));
            }
            // Text held back (a possible marker) sends nothing yet.
            (!out.is_empty()).then(|| Bytes::from(out))
        }
        Event::Done(stats) => {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            // What the parser still holds, the last chunk (or the error), the usage and the
            // terminator go out as one frame.
            let mut tail = Vec::new();
            if let Some(p) = parser.take() {
                let finished = match p.finish() {
                    Ok(f) => f,
                    Err(failure) => {
                        tracing::debug!(problem = %failure.problem, "the answer's tool calls could not be read; kept as content");
                        *failure.recovered
                    }
                };
                // As the unstreamed answer: `tool_calls` only when calls were read whole.
                called = !finished.message.tool_calls.is_empty();
                for ev in finished.events {
                    tail.extend_from_slice(&chunk(Delta::of(ev), None));
                }
            }
            tail.extend_from_slice(&match stats.finish {
                Finish::Error => sse(&generation_failed(&stats).body()),
                Finish::Cancelled | Finish::Timeout => sse(&ApiError::cancelled().body()),
                Finish::Stop | Finish::Length => chunk(Delta::default(), Some(finish_reason(&stats, called))),
            });
            if include_usage {
                let usage: Completion<ChunkChoice> =
                    Completion { id: "usage".into(), object, created, model: String::new(), choices: Vec::new(), usage: Some(Usage::of(&stats)) };
                tail.extend_from_slice(&sse(&usage));
            }
            tail.extend_from_slice(b"data: [DONE]\n\n");
            Some(Bytes::from(tail))
        }
    });
    let end = tokio_stream::iter(std::iter::from_fn(move || {
        // Runs only once the events are exhausted, and then once.
        if done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped before the request ended").code("generation_failed");
        let mut tail = sse(&e.body());
        tail.extend_from_slice(b"data: [DONE]\n\n");
        Some(Bytes::from(tail))
    }));
    let events = events.chain(end);
    let frames = tokio_stream::iter(head).chain(events).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// Serializing any of the chunk shapes through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
        }
    }
}

pub(super) async fn tokenize(state: Arc<AppState>, req: TokenizeRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let lease = state.registry.acquire(req.model.as_deref(), None).await?;
    let engine = lease.ready.engine.clone();
    let limit = engine.max_prompt_bytes();
    if req.content.len() > limit {
        return Err(ApiError::bad_request(format!("the content is {} bytes; the limit is {limit}", req.content.len()), Some("content")).code("prompt_too_large"));
    }
    let tokens = blocking_or_busy(&state, move || engine.model().tokenize(&req.content, req.add_special)).await?;
    drop(lease);
    match tokens {
        Ok(tokens) => Ok(json_response(StatusCode::OK, &TokenizeResponse { tokens })),
        Err(e) => Err(ApiError::bad_request(clip(&e.to_string(), 200), Some("content"))),
    }
}

pub(super) async fn detokenize(state: Arc<AppState>, req: DetokenizeRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let lease = state.registry.acquire(req.model.as_deref(), None).await?;
    let engine = lease.ready.engine.clone();
    // As many tokens as one request may hold: the answer's size is bounded by it.
    let limit = engine.slot_context() as usize;
    if req.tokens.len() > limit {
        return Err(ApiError::bad_request(format!("{} tokens; the limit is {limit}", req.tokens.len()), Some("tokens")));
    }
    let bytes = blocking_or_busy(&state, move || -> Result<Vec<u8>, ApiError> {
        let mut bytes = Vec::new();
        for t in req.tokens {
            let Ok(id) = i32::try_from(t) else { return Err(ApiError::bad_request(format!("token {t} is not in the vocabulary"), Some("tokens"))) };
            match engine.model().token_bytes(id, false) {
                Ok(b) => bytes.extend(b),
                Err(_) => return Err(ApiError::bad_request(format!("token {id} is not in the vocabulary"), Some("tokens"))),
            }
        }
        Ok(bytes)
    })
    .await??;
    drop(lease);
    Ok(json_response(StatusCode::OK, &DetokenizeResponse { content: String::from_utf8_lossy(&bytes).into_owned() }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use llama_host::fake::{FakeBehaviour, FakeModel};
    use llama_host::ContextSize;

    use super::*;
    use crate::engine::{Engine, EngineConfig};

    fn engine(reply: &str, stream_capacity: usize) -> (Engine, Arc<FakeBehaviour>) {
        let (model, fake) = FakeModel::new(reply).into_model();
        let size = ContextSize { n_ctx: 512, n_batch: 64, n_ubatch: 64, n_threads: 1, n_threads_batch: 1 };
        (Engine::start(Arc::new(model), EngineConfig { slots: 1, queue: 0, size, stream_capacity, ..EngineConfig::default() }).unwrap(), fake)
    }

    fn submit(engine: &Engine, opts: GenerateOptions) -> Handle {
        engine.submit(Request { prompt: "x".into(), opts, deadline: None }).unwrap()
    }

    /// The whole body of a streamed response.
    fn body(resp: Response<Body>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        String::from_utf8_lossy(&rt.block_on(resp.into_body().collect()).unwrap().to_bytes()).into_owned()
    }

    /// The whole SSE body of a request the fake backend fails (it returns too few tokens).
    fn failed_stream(chat: bool) -> String {
        let (engine, fake) = engine("hi", 16);
        fake.short_samples.store(1, Ordering::SeqCst);
        let h = submit(&engine, GenerateOptions { max_tokens: Some(4), ..GenerateOptions::default() });
        body(stream_response(h, "id-1".into(), "m".into(), chat, true, None, ()))
    }

    #[test]
    fn a_failed_generation_streams_an_error_not_a_normal_stop() {
        for chat in [true, false] {
            let text = failed_stream(chat);
            let error = text.lines().find(|l| l.contains("\"error\"")).unwrap_or_else(|| panic!("no error event in {text}"));
            assert!(error.contains("generation failed") && error.contains("sampled tokens"), "{error}");
            assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
    }

    // Review finding: a stream whose request never got its end (the engine stopped) ended
    // with neither [DONE] nor an error, which SDKs read as a complete answer.
    #[test]
    fn a_stream_cut_off_by_shutdown_ends_with_an_error_and_done() {
        let (engine, _) = engine("", 1);
        let h = submit(&engine, GenerateOptions::default());
        let resp = stream_response(h, "id-1".into(), "m".into(), true, false, None, ());
        drop(engine);
        let text = body(resp);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(text.contains("\"error\""), "{text}");
        assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
    }
}
