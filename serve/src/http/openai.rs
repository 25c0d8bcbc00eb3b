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
use llama_tools::{OutputEvent, ToolCallParser};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_stream::StreamExt;

use super::generate::{self, check_max_tokens, check_seed, check_stops, generation_failed, Answer, GenRequest, Input, Output, Sampling};
use super::structured::ConstraintFields;
use super::{blocking_or_busy, clip, json_response, now_secs, ApiError, AppState, Body};
use crate::engine::{Finish, Handle, RequestStats};
use crate::registry::{KeepAlive, ModelStatus};

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
    /// Speculative decoding for this request (this server's extension).
    speculative: Option<generate::SpecField>,
    #[serde(flatten)]
    constraint: ConstraintFields,
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
            KeepAliveField::Text(t) => go_duration_secs(t),
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

/// A duration as Go writes and parses them (what Ollama's clients send): an optional sign,
/// then one or more number-and-unit pairs (`5m`, `1h30m`, `5m0s`, `1.5h`, `300ms`; units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), in seconds. A bare number is seconds, as a JSON
/// number is. At most 64 bytes: no duration needs more.
fn go_duration_secs(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() || t.len() > 64 {
        return None;
    }
    let (sign, mut rest) = match t.as_bytes()[0] {
        b'-' => (-1.0, &t[1..]),
        b'+' => (1.0, &t[1..]),
        _ => (1.0, t),
    };
    if let Ok(n) = rest.parse::<f64>() {
        return Some(sign * n);
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).filter(|&i| i > 0)?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Some(sign * total)
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

/// The request in no dialect: everything but the prompt is checked here, before a model
/// is loaded for it.
fn translate(mut req: CompletionRequest, chat: bool) -> Result<(GenRequest, bool, bool), ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
    }
    let max_tokens = check_max_tokens(req.max_completion_tokens.or(req.max_tokens), "max_tokens")?;
    let seed = check_seed(req.seed)?;
    let stop = match req.stop.take() {
        None => None,
        Some(Stop::One(s)) => Some(vec![s]),
        Some(Stop::Many(v)) => Some(v),
    };
    let stop = stop.map(|s| check_stops(s, "stop")).transpose()?;
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveField::parse).transpose()?;
    let input = if chat {
        Input::Chat(messages(&mut req)?)
    } else {
        Input::Prompt(req.prompt.take().ok_or_else(|| ApiError::bad_request("'prompt' is required", Some("prompt")))?)
    };
    let sampling = Sampling {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        repeat_penalty: req.repeat_penalty,
        repeat_last_n: None,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
    };
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let gen = GenRequest {
        model: req.model.take(),
        input,
        sampling,
        max_tokens,
        seed,
        stop,
        keep_alive,
        constraint: std::mem::take(&mut req.constraint),
        spec: req.speculative.take(),
    };
    Ok((gen, req.stream, include_usage))
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

pub(super) async fn completions(state: Arc<AppState>, req: CompletionRequest, chat: bool) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let (gen, stream, include_usage) = translate(req, chat)?;
    let started = generate::start(&state, gen).await?;
    let id = generate::answer_id(if chat { "chatcmpl-" } else { "cmpl-" });
    let model = started.model.clone();
    if stream {
        return Ok(stream_response(started.handle, started.parser, started.lease, id, model, chat, include_usage));
    }
    let Answer { message, stats } = generate::collect(started).await?;
    let usage = Some(Usage::of(&stats));
    Ok(if chat {
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
        let text = message.content.unwrap_or_default();
        let choice = TextChoice { index: 0, text, logprobs: None, finish_reason: Some(finish_reason(&stats, false)) };
        json_response(StatusCode::OK, &Completion { id, object: "text_completion", created: now_secs(), model, choices: vec![choice], usage })
    })
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
/// never a chunk that claims it stopped normally; so does a stream whose engine stopped.
///
/// A chat answer goes through the request's parser: content, reasoning and tool calls
/// stream as their own deltas, and text that may start a call's marker is held until it is
/// known.
fn stream_response(
    handle: Handle,
    parser: Option<ToolCallParser>,
    lease: impl Send + Sync + 'static,
    id: String,
    model: String,
    chat: bool,
    include_usage: bool,
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
    let events = generate::outputs(handle, parser, lease).filter_map(move |batch| {
        let mut out = Vec::new();
        for o in batch {
            match o {
                Output::Event(ev) => out.extend_from_slice(&chunk(Delta::of(ev), None)),
                Output::Done { stats, called } => {
                    // The last chunk (or the error), the usage and the terminator.
                    out.extend_from_slice(&match stats.finish {
                        Finish::Error => sse(&generation_failed(&stats).body()),
                        Finish::Cancelled | Finish::Timeout => sse(&ApiError::cancelled().body()),
                        Finish::Stop | Finish::Length => chunk(Delta::default(), Some(finish_reason(&stats, called))),
                    });
                    if include_usage {
                        let usage: Completion<ChunkChoice> =
                            Completion { id: "usage".into(), object, created, model: String::new(), choices: Vec::new(), usage: Some(Usage::of(&stats)) };
                        out.extend_from_slice(&sse(&usage));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                }
                Output::Lost => {
                    out.extend_from_slice(&sse(&generate::engine_lost().body()));
                    out.extend_from_slice(b"data: [DONE]\n\n");
                }
            }
        }
        // Text held back (a possible marker) sends nothing yet.
        (!out.is_empty()).then(|| Bytes::from(out))
    });
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

    use super::*;
    use crate::http::generate::testing::{body, engine, submit};

    /// The whole SSE body of a request the fake backend fails (it returns too few tokens).
    fn failed_stream(chat: bool) -> String {
        let (engine, fake) = engine("hi", 16);
        fake.short_samples.store(1, Ordering::SeqCst);
        let h = submit(&engine, Some(4));
        body(stream_response(h, None, (), "id-1".into(), "m".into(), chat, true))
    }

    #[test]
    fn keep_alive_takes_go_durations() {
        for (t, secs) in [("5m", 300.0), ("5m0s", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("300ms", 0.3), ("90", 90.0), ("0", 0.0), (" 2s ", 2.0), ("1m1.5s", 61.5)] {
            assert_eq!(go_duration_secs(t), Some(secs), "{t}");
        }
        assert_eq!(go_duration_secs("-1m"), Some(-60.0));
        for t in ["", "m", "5", "5x", "5mm", "h5", "1.2.3s", "--1s", &"9".repeat(65)] {
            if t == "5" {
                continue;
            }
            assert_eq!(go_duration_secs(t), None, "{t}");
        }
        assert_eq!(KeepAliveField::Text("-5m".into()).parse().unwrap(), KeepAlive::Never);
        assert_eq!(KeepAliveField::Text("1h30m".into()).parse().unwrap(), KeepAlive::After(std::time::Duration::from_secs(5400)));
        assert!(KeepAliveField::Text("2000h0m0s".into()).parse().is_ok());
        assert!(KeepAliveField::Text("9000h".into()).parse().is_err());
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
        let h = submit(&engine, None);
        let resp = stream_response(h, None, (), "id-1".into(), "m".into(), true, false);
        drop(engine);
        let text = body(resp);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(text.contains("\"error\""), "{text}");
        assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
    }
}
