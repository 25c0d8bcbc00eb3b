//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): the request's
//! system prompt, turns and content blocks translated into the template's messages, its
//! tools and `tool_choice` into the OpenAI terms the shared constraint reads, and the
//! answer back as content blocks (`thinking`, `text`, `tool_use`), whole or as Anthropic's
//! server-sent events. Everything else (admission, limits, the model's lease, rendering,
//! grammars, tool-call parsing) is the pipeline every dialect shares (`generate.rs`).
//!
//! What is supported, ignored or refused, field by field, is in docs/API.md; the rules in
//! short: a field that would change the answer and cannot be honoured is refused (400), one
//! that only labels, bills or caches is ignored.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use llama_host::chat::{Message, ToolCall};
use llama_tools::{OutputEvent, ParsedMessage, ToolCallParser};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::StreamExt;

use super::generate::{self, check_stops, generation_failed, Answer, GenRequest, Input, Output, Sampling};
use super::structured::{schema_field_named, Constraint, ConstraintFields};
use super::{blocking, blocking_or_busy, clip, json_response, ApiError, AppState, Body};
use crate::engine::{Finish, Handle, RequestStats};

/// Most turns a conversation may have, and most content blocks in one turn (or in a
/// system prompt, or a tool result): the body's size bounds them too, but a client that
/// raised `--max-body` should not get an unbounded loop of tiny blocks.
const MAX_MESSAGES: usize = 10_000;
const MAX_BLOCKS: usize = 1_000;

/// A Messages request. Fields not named here (`metadata`, `service_tier`, `thinking`,
/// `container`, `mcp_servers`, …) are ignored; see docs/API.md for each.
#[derive(Deserialize)]
pub(super) struct MessagesRequest {
    /// Anthropic requires it; absent here means the server's default model.
    #[serde(default)]
    model: Option<String>,
    /// Required (checked by hand so the error says so in Anthropic's words).
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    system: Option<System>,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    stream: Option<bool>,
    /// `format` (a JSON Schema the answer must match) is honoured; `effort` is ignored.
    #[serde(default)]
    output_config: Option<OutputConfig>,
}

#[derive(Deserialize)]
struct OutputConfig {
    #[serde(default)]
    format: Option<OutputFormat>,
}

/// Structured output: the only kind Anthropic has is a JSON Schema.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutputFormat {
    JsonSchema { schema: Value },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

/// The request's conversation, tools and choice in the shared pipeline's terms: what both
/// routes render, so count_tokens counts the prompt /v1/messages would get.
struct Conversation {
    messages: Vec<Message>,
    constraint: ConstraintFields,
}

fn field_error(path: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{path}: {what}"), Some(path))
}

/// The text of a list of blocks that may only hold `text` (a system prompt, a tool
/// result's content); `path` names the list in errors.
fn text_blocks(blocks: &[Value], path: &str) -> Result<String, ApiError> {
    if blocks.len() > MAX_BLOCKS {
        return Err(field_error(path, format_args!("at most {MAX_BLOCKS} blocks")));
    }
    let mut texts = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let at = format!("{path}.{i}");
        match block_type(b, &at)? {
            "text" => texts.push(text_of(b, &at)?),
            kind @ ("image" | "document") => return Err(field_error(&at, format_args!("{kind} blocks are not supported"))),
            other => return Err(field_error(&at, format_args!("'{}' blocks are not supported here; only text", clip(other, 40)))),
        }
    }
    Ok(texts.join("\n"))
}

fn block_type<'a>(b: &'a Value, at: &str) -> Result<&'a str, ApiError> {
    b.get("type").and_then(Value::as_str).ok_or_else(|| field_error(at, "a content block must be an object with a string 'type'"))
}

fn text_of(b: &Value, at: &str) -> Result<String, ApiError> {
    b.get("text").and_then(Value::as_str).map(str::to_string).ok_or_else(|| field_error(&format!("{at}.text"), "Field required (a string)"))
}

fn str_field<'a>(b: &'a Value, name: &str, at: &str) -> Result<&'a str, ApiError> {
    b.get(name).and_then(Value::as_str).ok_or_else(|| field_error(&format!("{at}.{name}"), "Field required (a string)"))
}

/// The turns as the template's messages. A user turn's `tool_result` blocks become `tool`
/// messages (named after the call they answer, when an earlier turn made it); its text
/// around them stays user text, in order. An assistant turn's `tool_use` blocks become its
/// calls; its `thinking` blocks are dropped (as Anthropic drops earlier turns' thinking
/// from the context).
fn translate_messages(system: Option<System>, turns: Vec<InMessage>) -> Result<Vec<Message>, ApiError> {
    if turns.is_empty() {
        return Err(field_error("messages", "at least one message is required"));
    }
    if turns.len() > MAX_MESSAGES {
        return Err(field_error("messages", format_args!("at most {MAX_MESSAGES} messages")));
    }
    let mut out = Vec::with_capacity(turns.len() + 1);
    match system {
        None => {}
        Some(System::Text(t)) => out.push(Message::new("system", t)),
        Some(System::Blocks(b)) => out.push(Message::new("system", text_blocks(&b, "system")?)),
    }
    // The names of the calls made so far, for the results that answer them.
    let mut call_names: HashMap<String, String> = HashMap::new();
    let last = turns.len() - 1;
    for (i, turn) in turns.into_iter().enumerate() {
        let at = format!("messages.{i}");
        let assistant = match turn.role.as_str() {
            "user" => false,
            "assistant" => true,
            other => return Err(field_error(&format!("{at}.role"), format_args!("must be \"user\" or \"assistant\", not '{}'", clip(other, 40)))),
        };
        if assistant && i == last {
            // Anthropic continues a final assistant turn (a prefill); the templates here
            // can only open a new turn, which would answer something else.
            return Err(field_error(&format!("{at}.role"), "a final assistant turn (prefill) is not supported: the last message must be the user's"));
        }
        let blocks = match turn.content {
            Value::String(t) => {
                out.push(Message::new(&turn.role, t));
                continue;
            }
            Value::Array(blocks) => blocks,
            _ => return Err(field_error(&format!("{at}.content"), "must be a string or a list of content blocks")),
        };
        if blocks.len() > MAX_BLOCKS {
            return Err(field_error(&format!("{at}.content"), format_args!("at most {MAX_BLOCKS} blocks")));
        }
        let mut text: Vec<String> = Vec::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{at}.content.{j}");
            match block_type(b, &at)? {
                "text" => text.push(text_of(b, &at)?),
                "tool_use" if assistant => {
                    let id = str_field(b, "id", &at)?.to_string();
                    let name = str_field(b, "name", &at)?.to_string();
                    let input = match b.get("input") {
                        Some(v @ Value::Object(_)) => v.to_string(),
                        _ => return Err(field_error(&format!("{at}.input"), "Field required (an object)")),
                    };
                    call_names.insert(id.clone(), name.clone());
                    calls.push(ToolCall::new(id, name, input));
                }
                "tool_result" if !assistant => {
                    let id = str_field(b, "tool_use_id", &at)?.to_string();
                    let mut content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(parts)) => text_blocks(parts, &format!("{at}.content"))?,
                        Some(_) => return Err(field_error(&format!("{at}.content"), "must be a string or a list of text blocks")),
                    };
                    // Templates have no notion of a failed call: the model reads it in the text.
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        content = format!("Error: {content}");
                    }
                    // Text before the result stays before it.
                    if !text.is_empty() {
                        out.push(Message::new("user", text.join("\n")));
                        text.clear();
                    }
                    out.push(Message { role: "tool".into(), content, tool_call_id: Some(id.clone()), name: call_names.get(&id).cloned(), ..Message::default() });
                }
                "tool_use" | "tool_result" => {
                    let kind = if assistant { "tool_result blocks belong in user turns" } else { "tool_use blocks belong in assistant turns" };
                    return Err(field_error(&at, kind));
                }
                // An earlier turn's reasoning: not shown to the model again.
                "thinking" | "redacted_thinking" if assistant => {}
                kind @ ("image" | "document") => return Err(field_error(&at, format_args!("{kind} blocks are not supported"))),
                other => return Err(field_error(&at, format_args!("'{}' blocks are not supported", clip(other, 40)))),
            }
        }
        if assistant {
            out.push(Message { role: "assistant".into(), content: text.join("\n"), tool_calls: (!calls.is_empty()).then_some(calls), ..Message::default() });
        } else if !text.is_empty() || !out.last().is_some_and(|m| m.role == "tool") {
            // A user turn of only results needs no empty user message after them.
            out.push(Message::new("user", text.join("\n")));
        }
    }
    Ok(merge_turns(out))
}

/// Consecutive turns of one role (`user` after `user`, `assistant` after `assistant`) as
/// one turn, as Anthropic's API merges them: their texts joined by a newline, their calls
/// in order. Templates that require the roles to alternate would refuse them otherwise.
/// `system` and `tool` messages are never merged.
fn merge_turns(msgs: Vec<Message>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(msgs.len());
    for m in msgs {
        match out.last_mut() {
            Some(prev) if prev.role == m.role && matches!(m.role.as_str(), "user" | "assistant") => {
                if !m.content.is_empty() {
                    if !prev.content.is_empty() {
                        prev.content.push('\n');
                    }
                    prev.content.push_str(&m.content);
                }
                if let Some(calls) = m.tool_calls {
                    prev.tool_calls.get_or_insert_with(Vec::new).extend(calls);
                }
            }
            _ => out.push(m),
        }
    }
    out
}

/// Anthropic's tools (`{name, description, input_schema}`) as OpenAI's functions. Server
/// tools (web search, code execution, …: a `type` other than `custom`) run on Anthropic's
/// side and cannot run here: refused.
fn translate_tools(tools: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if tools.len() > llama_tools::MAX_TOOLS {
        return Err(field_error("tools", format_args!("at most {} tools", llama_tools::MAX_TOOLS)));
    }
    tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("tools.{i}");
            if !t.is_object() {
                return Err(field_error(&at, "a tool must be an object"));
            }
            match t.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(k)) if k == "custom" => {}
                Some(k) => return Err(field_error(&format!("{at}.type"), format_args!("server tools ({}) are not supported; give custom tools with an input_schema", clip(&k.to_string(), 40)))),
            }
            let name = str_field(&t, "name", &at)?;
            let schema = match t.get("input_schema") {
                Some(s @ Value::Object(_)) => s.clone(),
                _ => return Err(field_error(&format!("{at}.input_schema"), "Field required (a JSON Schema object)")),
            };
            let mut function = Map::new();
            function.insert("name".into(), name.into());
            match t.get("description") {
                None | Some(Value::Null) => {}
                Some(Value::String(d)) => {
                    function.insert("description".into(), d.as_str().into());
                }
                Some(_) => return Err(field_error(&format!("{at}.description"), "must be a string")),
            }
            function.insert("parameters".into(), schema);
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

/// Anthropic's `tool_choice` as OpenAI's, and whether parallel calls are allowed.
fn translate_tool_choice(choice: &Value) -> Result<(Value, Option<bool>), ApiError> {
    let kind = choice.get("type").and_then(Value::as_str).ok_or_else(|| field_error("tool_choice.type", "Field required (\"auto\", \"any\", \"tool\" or \"none\")"))?;
    let openai = match kind {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => json!({"type": "function", "function": {"name": str_field(choice, "name", "tool_choice")?}}),
        other => return Err(field_error("tool_choice.type", format_args!("must be \"auto\", \"any\", \"tool\" or \"none\", not '{}'", clip(other, 40)))),
    };
    // Absent: the server's default (one call per answer, see structured.rs).
    let parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(off)) => Some(!off),
        Some(_) => return Err(field_error("tool_choice.disable_parallel_tool_use", "must be a boolean")),
    };
    Ok((openai, parallel))
}

fn conversation(system: Option<System>, messages: Option<Vec<InMessage>>, tools: Option<Vec<Value>>, tool_choice: Option<Value>) -> Result<Conversation, ApiError> {
    let messages = translate_messages(system, messages.ok_or_else(|| field_error("messages", "Field required"))?)?;
    let tools = tools.map(translate_tools).transpose()?;
    let (tool_choice, parallel) = match tool_choice.filter(|c| !c.is_null()) {
        Some(c) => {
            let (c, p) = translate_tool_choice(&c)?;
            (Some(c), p)
        }
        None => (None, None),
    };
    let constraint = ConstraintFields { tools, tool_choice, parallel_tool_calls: parallel, ..ConstraintFields::default() };
    Ok(Conversation { messages, constraint })
}

/// The request in no dialect, checked before a model is loaded for it; also the stop
/// sequences it asked for (only those are reported as `stop_sequence`).
fn translate(req: MessagesRequest) -> Result<(GenRequest, Vec<String>, bool), ApiError> {
    let max_tokens = match req.max_tokens {
        None => return Err(field_error("max_tokens", "Field required")),
        Some(n) if n < 1 => return Err(field_error("max_tokens", format_args!("must be at least 1, got {n}"))),
        Some(n) => u32::try_from(n).map_err(|_| field_error("max_tokens", format_args!("must be at most {}", u32::MAX)))?,
    };
    let stops = check_stops(req.stop_sequences.unwrap_or_default(), "stop_sequences")?;
    if stops.iter().any(String::is_empty) {
        return Err(field_error("stop_sequences", "a stop sequence must not be empty"));
    }
    let mut conv = conversation(req.system, req.messages, req.tools, req.tool_choice)?;
    if let Some(OutputFormat::JsonSchema { schema }) = req.output_config.and_then(|c| c.format) {
        if conv.constraint.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(field_error("output_config.format", "cannot be used together with tools here: give one"));
        }
        conv.constraint.json_schema = Some(schema);
    }
    let sampling = Sampling { temperature: req.temperature, top_p: req.top_p, top_k: req.top_k, ..Sampling::default() };
    let gen = GenRequest {
        model: req.model,
        input: Input::Chat(conv.messages),
        sampling,
        max_tokens: Some(max_tokens),
        seed: None,
        // None keeps the model's own stop strings; given ones replace them, as on the
        // other dialects.
        stop: (!stops.is_empty()).then(|| stops.clone()),
        keep_alive: None,
        constraint: conv.constraint,
        spec: None,
    };
    Ok((gen, stops, req.stream.unwrap_or(false)))
}

/// The pipeline's errors in Anthropic's words: the schema of `output_config.format` is
/// called that, not by the OpenAI field it was passed on as; every other error as it is.
fn anthropic_words(e: ApiError) -> ApiError {
    schema_field_named(e, "output_config.format")
}

/// Why the answer ended, and the stop sequence that ended it (only one the request gave:
/// the model's own stop strings are its end of turn).
fn stop_reason(stats: &RequestStats, called: bool, stops: &[String]) -> (&'static str, Option<String>) {
    match stats.finish {
        Finish::Length => ("max_tokens", None),
        _ if called => ("tool_use", None),
        _ => match stats.stop_sequence.as_ref().filter(|s| stops.contains(s)) {
            Some(s) => ("stop_sequence", Some(s.clone())),
            None => ("end_turn", None),
        },
    }
}

/// A parser's call id (`call_…`) as Anthropic's (`toolu_…`).
fn tool_use_id(id: &str) -> String {
    format!("toolu_{}", id.strip_prefix("call_").unwrap_or(id))
}

/// A call's arguments (JSON text) as `input`. The grammar makes them an object; text that
/// is not one (a model without the grammar) is never passed off as one: it is kept whole
/// under `_raw` rather than lost.
pub(super) fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            tracing::debug!("a tool call's arguments are not a JSON object; sent as _raw");
            json!({ "_raw": arguments })
        }
    }
}

/// The whole answer's content blocks: reasoning, text, calls.
fn content_blocks(m: ParsedMessage) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(r) = m.reasoning_content.filter(|r| !r.is_empty()) {
        out.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    if let Some(t) = m.content.filter(|t| !t.is_empty()) {
        out.push(json!({"type": "text", "text": t}));
    }
    for c in m.tool_calls {
        out.push(json!({"type": "tool_use", "id": tool_use_id(&c.id), "name": c.name, "input": tool_input(&c.arguments)}));
    }
    out
}

pub(super) async fn messages(state: Arc<AppState>, req: MessagesRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let (gen, stops, stream) = translate(req)?;
    let started = generate::start(&state, gen).await.map_err(anthropic_words)?;
    // Unique across models and runs (the engine's request numbers are per model).
    let id = generate::answer_id("msg_");
    let model = started.model.clone();
    if stream {
        let input_tokens = started.handle.prompt_tokens();
        let head = StreamState::start(&id, &model, input_tokens);
        return Ok(stream_response(started.handle, started.parser, started.lease, head, stops));
    }
    let Answer { message, stats } = generate::collect(started).await?;
    let called = !message.tool_calls.is_empty();
    let (reason, sequence) = stop_reason(&stats, called, &stops);
    let body = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(message),
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": stats.prompt_tokens, "output_tokens": stats.generated_tokens},
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// One server-sent event: its name and its data.
type Sse = (&'static str, Value);

fn sse_bytes(events: &[Sse]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in events {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(&serde_json::to_vec(data).unwrap_or_else(|_| b"{}".to_vec()));
        out.extend_from_slice(b"\n\n");
    }
    out
}

/// The block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
    /// A tool call, by its index among the answer's calls.
    Tool(usize),
}

/// Turns the answer's events into Anthropic's block events: one block at a time, with
/// consecutive indices; a change of kind (text after a call, a second call) closes the
/// open block and starts the next.
#[derive(Default)]
struct StreamState {
    open: Option<Open>,
    /// The index the next block gets.
    next: usize,
    /// Whether a `tool_use` block was opened in this stream.
    tool_opened: bool,
}

impl StreamState {
    /// The stream's head: `message_start` (empty content, the prompt's token count) and a
    /// `ping`, as Anthropic sends them.
    fn start(id: &str, model: &str, input_tokens: usize) -> Vec<Sse> {
        let message = json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        });
        vec![("message_start", json!({"type": "message_start", "message": message})), ("ping", json!({"type": "ping"}))]
    }

    fn close(&mut self, out: &mut Vec<Sse>) {
        if self.open.take().is_some() {
            out.push(("content_block_stop", json!({"type": "content_block_stop", "index": self.next - 1})));
        }
    }

    /// Opens a block of `kind` unless it is the one open; its index.
    fn ensure(&mut self, kind: Open, block: impl FnOnce() -> Value, out: &mut Vec<Sse>) -> usize {
        if self.open != Some(kind) {
            self.close(out);
            out.push(("content_block_start", json!({"type": "content_block_start", "index": self.next, "content_block": block()})));
            self.open = Some(kind);
            self.next += 1;
        }
        self.next - 1
    }

    fn event(&mut self, ev: OutputEvent, out: &mut Vec<Sse>) {
        let delta = |index: usize, delta: Value| ("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": delta}));
        match ev {
            OutputEvent::Content(t) if t.is_empty() => {}
            OutputEvent::Content(t) => {
                let i = self.ensure(Open::Text, || json!({"type": "text", "text": ""}), out);
                out.push(delta(i, json!({"type": "text_delta", "text": t})));
            }
            OutputEvent::Reasoning(t) if t.is_empty() => {}
            OutputEvent::Reasoning(t) => {
                let i = self.ensure(Open::Thinking, || json!({"type": "thinking", "thinking": "", "signature": ""}), out);
                out.push(delta(i, json!({"type": "thinking_delta", "thinking": t})));
            }
            OutputEvent::ToolCallBegin { index, id, name } => {
                // Always a new block, even for a call index seen before.
                self.close(out);
                self.tool_opened = true;
                self.ensure(Open::Tool(index), || json!({"type": "tool_use", "id": tool_use_id(&id), "name": name, "input": {}}), out);
            }
            OutputEvent::ToolCallArgs { fragment, .. } if fragment.is_empty() => {}
            OutputEvent::ToolCallArgs { index, fragment } => match self.open {
                Some(Open::Tool(open)) if open == index => out.push(delta(self.next - 1, json!({"type": "input_json_delta", "partial_json": fragment}))),
                // The parser streams a call's arguments right after its start; arguments
                // of a call whose block is closed have no block to go to.
                _ => tracing::debug!(index, "tool-call arguments outside their block; dropped"),
            },
        }
    }

    /// One batch of the pipeline's outputs as events. The batch that ends the answer
    /// without calls read whole (`called` false: one cut short by `max_tokens` mid-call)
    /// after a `tool_use` block was opened carries the parser's recovered text, which
    /// repeats the call's own text: it is dropped, as Anthropic sends the partial
    /// `tool_use` block and `max_tokens` without it.
    fn batch(&mut self, batch: Vec<Output>, stops: &[String]) -> Vec<Sse> {
        let mut out = Vec::new();
        let recovered = self.tool_opened && batch.iter().any(|o| matches!(o, Output::Done { called: false, .. }));
        for o in batch {
            match o {
                Output::Event(OutputEvent::Content(_)) if recovered => {}
                Output::Event(ev) => self.event(ev, &mut out),
                Output::Done { stats, called } => match stats.finish {
                    Finish::Error => out.push(("error", generation_failed(&stats).anthropic_body())),
                    Finish::Cancelled | Finish::Timeout => out.push(("error", ApiError::cancelled().anthropic_body())),
                    Finish::Stop | Finish::Length => self.finish(&stats, called, stops, &mut out),
                },
                Output::Lost => out.push(("error", generate::engine_lost().anthropic_body())),
            }
        }
        out
    }

    /// The end of a generation that finished: the open block's stop, `message_delta` with
    /// the stop reason and the output's token count, `message_stop`.
    fn finish(&mut self, stats: &RequestStats, called: bool, stops: &[String], out: &mut Vec<Sse>) {
        self.close(out);
        let (reason, sequence) = stop_reason(stats, called, stops);
        out.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": {"output_tokens": stats.generated_tokens}}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
    }
}

/// Server-sent events in Anthropic's sequence. A generation that fails, is cut short, or
/// whose engine stops ends with an `error` event, never with `message_stop` (SDKs would
/// read that as a complete answer).
fn stream_response(handle: Handle, parser: Option<ToolCallParser>, lease: impl Send + Sync + 'static, head: Vec<Sse>, stops: Vec<String>) -> Response<Body> {
    let mut state = StreamState::default();
    let head = Bytes::from(sse_bytes(&head));
    let events = generate::outputs(handle, parser, lease).filter_map(move |batch| {
        let out = state.batch(batch, &stops);
        // Text held back (a possible tool-call marker) sends nothing yet.
        (!out.is_empty()).then(|| Bytes::from(sse_bytes(&out)))
    });
    let frames = tokio_stream::iter(Some(head)).chain(events).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// A count_tokens request: the prompt's fields of a Messages request (the others, if
/// sent, are ignored).
#[derive(Deserialize)]
pub(super) struct CountTokensRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    system: Option<System>,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

/// The prompt's token count: rendered exactly as /v1/messages renders it (same template,
/// same tools) and tokenized by the model.
pub(super) async fn count_tokens(state: Arc<AppState>, req: CountTokensRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let conv = conversation(req.system, req.messages, req.tools, req.tool_choice)?;
    // The tools' schemas are checked (and the template's tools chosen) as for a generation.
    let fields = conv.constraint;
    let reasoning = state.config.reasoning_format;
    let constraint = blocking(&state, move || Constraint::of(fields.borrowed(), true, reasoning)).await??;
    let lease = state.registry.acquire(req.model.as_deref(), None).await?;
    let ready = lease.ready.clone();
    if ready.template.is_none() {
        return Err(ApiError::bad_request("this model has no chat template", Some("messages")));
    }
    let messages = conv.messages;
    let count = blocking_or_busy(&state, move || -> Result<usize, ApiError> {
        let template = ready.template.as_ref().ok_or_else(|| ApiError::bad_request("this model has no chat template", Some("messages")))?;
        let prompt = generate::render_chat(template, &messages, &constraint)?;
        let limit = ready.engine.max_prompt_bytes();
        if prompt.len() > limit {
            return Err(ApiError::bad_request(format!("the prompt is {} bytes; the limit is {limit}", prompt.len()), Some("messages")).code("prompt_too_large"));
        }
        // As the engine tokenizes a chat prompt: the template wrote the special tokens.
        let tokens = ready.engine.model().tokenize(&prompt, false).map_err(|e| ApiError::bad_request(clip(&e.to_string(), 200), Some("messages")))?;
        Ok(tokens.len())
    })
    .await??;
    drop(lease);
    Ok(json_response(StatusCode::OK, &json!({ "input_tokens": count })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::http::generate::testing::{body, engine, submit};

    fn event_names(text: &str) -> Vec<&str> {
        text.lines().filter_map(|l| l.strip_prefix("event: ")).collect()
    }

    #[test]
    fn a_generation_that_fails_mid_stream_ends_with_an_error_event() {
        let (engine, fake) = engine("hi", 16);
        fake.short_samples.store(1, Ordering::SeqCst);
        let h = submit(&engine, Some(4));
        let text = body(stream_response(h, None, (), StreamState::start("msg_1", "m", 1), Vec::new()));
        let names = event_names(&text);
        assert_eq!(names.first(), Some(&"message_start"), "{text}");
        assert_eq!(names.last(), Some(&"error"), "{text}");
        assert!(!names.contains(&"message_stop") && !names.contains(&"message_delta"), "{text}");
        let data = text.rsplit("data: ").next().unwrap().trim();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "api_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("generation failed"), "{v}");
    }

    #[test]
    fn a_stream_cut_off_by_the_engine_stopping_ends_with_an_error_event() {
        let (engine, _) = engine("", 1);
        let h = submit(&engine, None);
        let resp = stream_response(h, None, (), StreamState::start("msg_1", "m", 1), Vec::new());
        drop(engine);
        let text = body(resp);
        let names = event_names(&text);
        assert_eq!(names.last(), Some(&"error"), "{text}");
        assert!(!names.contains(&"message_stop"), "{text}");
    }

    #[test]
    fn a_finished_stream_ends_with_message_delta_and_stop() {
        let (engine, _) = engine("hello", 16);
        let h = submit(&engine, Some(3));
        let text = body(stream_response(h, None, (), StreamState::start("msg_1", "m", 1), Vec::new()));
        let names = event_names(&text);
        assert_eq!(names[..3], ["message_start", "ping", "content_block_start"], "{text}");
        assert_eq!(names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"], "{text}");
        assert!(text.contains("\"stop_reason\":\"max_tokens\""), "{text}");
    }

    fn turns(v: Value) -> Vec<InMessage> {
        serde_json::from_value::<Vec<Value>>(v).unwrap().into_iter().map(|m| InMessage { role: m["role"].as_str().unwrap().into(), content: m["content"].clone() }).collect()
    }

    fn request(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn blocks_become_the_templates_messages() {
        let msgs = translate_messages(
            Some(System::Blocks(vec![json!({"type": "text", "text": "Be brief."}), json!({"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}})])),
            turns(json!([
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_9", "content": "boom", "is_error": true},
                    {"type": "text", "text": "And so?"}
                ]}
            ])),
        )
        .unwrap();
        let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool", "user"]);
        assert_eq!(msgs[0].content, "Be brief.\nBe kind.");
        assert_eq!(msgs[2].content, "Let me look.");
        let call = &msgs[2].tool_calls.as_ref().unwrap()[0];
        assert_eq!((call.id.as_str(), call.function.name.as_str()), ("toolu_1", "weather"));
        assert_eq!(serde_json::from_str::<Value>(&call.function.arguments).unwrap(), json!({"city": "Paris"}));
        assert_eq!((msgs[3].content.as_str(), msgs[3].tool_call_id.as_deref(), msgs[3].name.as_deref()), ("sunny", Some("toolu_1"), Some("weather")));
        // A result for a call no turn made: no name, but kept.
        assert_eq!((msgs[4].content.as_str(), msgs[4].name.as_deref()), ("Error: boom", None));
        assert_eq!(msgs[5].content, "And so?");
    }

    #[test]
    fn a_user_turn_of_only_results_adds_no_empty_user_message() {
        let msgs = translate_messages(
            None,
            turns(json!([
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a"}]}
            ])),
        )
        .unwrap();
        assert_eq!(msgs.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "tool"]);
        assert_eq!(msgs[2].content, "");
    }

    #[test]
    fn bad_blocks_are_refused_naming_their_place() {
        let cases = [
            (json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "source": {}}]}]), "messages.0.content.1: image blocks are not supported"),
            (json!([{"role": "user", "content": [{"type": "document"}]}]), "messages.0.content.0: document blocks are not supported"),
            (json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [{"type": "image"}]}]}]), "messages.0.content.0.content.0: image"),
            (json!([{"role": "user", "content": [{"type": "weird"}]}]), "'weird' blocks are not supported"),
            (json!([{"role": "user", "content": [{"text": "no type"}]}]), "messages.0.content.0: a content block"),
            (json!([{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text: Field required"),
            (json!([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]), "tool_use blocks belong in assistant turns"),
            (json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}, {"role": "user", "content": "b"}]), "tool_result blocks belong"),
            (json!([{"role": "system", "content": "a"}]), "messages.0.role"),
            (json!([{"role": "user", "content": 3}]), "messages.0.content: must be"),
            (json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "prefill"),
            (json!([]), "at least one"),
        ];
        for (m, needle) in cases {
            let e = translate_messages(None, turns(m.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{m}");
            assert!(e.message.contains(needle), "{m}: '{needle}' not in '{}'", e.message);
        }
        let many: Vec<Value> = (0..MAX_BLOCKS + 1).map(|_| json!({"type": "text", "text": "a"})).collect();
        let e = translate_messages(None, turns(json!([{"role": "user", "content": many}]))).unwrap_err();
        assert!(e.message.contains("at most"), "{}", e.message);
    }

    #[test]
    fn tools_and_tool_choice_become_openais() {
        let tools = translate_tools(vec![json!({"name": "weather", "description": "d", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}})]).unwrap();
        assert_eq!(tools, vec![json!({"type": "function", "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}}})]);
        assert!(translate_tools(vec![json!({"type": "web_search_20250305", "name": "web_search"})]).unwrap_err().message.contains("server tools"));
        assert!(translate_tools(vec![json!({"name": "f"})]).unwrap_err().message.contains("tools.0.input_schema"));
        assert!(translate_tools(vec![json!({"name": "f", "input_schema": {}}); llama_tools::MAX_TOOLS + 1]).is_err());
        assert_eq!(translate_tool_choice(&json!({"type": "auto"})).unwrap(), (json!("auto"), None));
        assert_eq!(translate_tool_choice(&json!({"type": "any", "disable_parallel_tool_use": true})).unwrap(), (json!("required"), Some(false)));
        assert_eq!(translate_tool_choice(&json!({"type": "none"})).unwrap(), (json!("none"), None));
        assert_eq!(
            translate_tool_choice(&json!({"type": "tool", "name": "f", "disable_parallel_tool_use": false})).unwrap(),
            (json!({"type": "function", "function": {"name": "f"}}), Some(true))
        );
        assert!(translate_tool_choice(&json!({"type": "tool"})).is_err());
        assert!(translate_tool_choice(&json!({"type": "sometimes"})).is_err());
        assert!(translate_tool_choice(&json!("auto")).is_err());
    }

    #[test]
    fn max_tokens_is_required_and_positive() {
        let base = json!({"messages": [{"role": "user", "content": "x"}]});
        let e = translate(request(base.clone())).err().unwrap();
        assert_eq!(e.message, "max_tokens: Field required");
        for bad in [0, -5] {
            let mut b = base.clone();
            b["max_tokens"] = json!(bad);
            assert!(translate(request(b)).err().unwrap().message.starts_with("max_tokens: must be at least 1"));
        }
        let mut b = base.clone();
        b["max_tokens"] = json!(7);
        b["stop_sequences"] = json!(["END"]);
        b["metadata"] = json!({"user_id": "u"});
        b["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
        let (gen, stops, stream) = translate(request(b)).unwrap();
        assert_eq!((gen.max_tokens, stops, stream), (Some(7), vec!["END".to_string()], false));
        let mut b = base;
        b["max_tokens"] = json!(7);
        b["stop_sequences"] = json!(vec!["x"; 17]);
        assert!(translate(request(b)).err().unwrap().message.contains("stop"));
    }

    fn stats(finish: Finish, stop: Option<&str>) -> RequestStats {
        RequestStats {
            id: 1,
            prompt_tokens: 10,
            cached_tokens: 0,
            generated_tokens: 5,
            queue_wait: Default::default(),
            time_to_first_token: None,
            total: Default::default(),
            finish,
            error: None,
            stop_sequence: stop.map(str::to_string),
            spec: Default::default(),
        }
    }

    #[test]
    fn stop_reasons() {
        let stops = vec!["END".to_string()];
        assert_eq!(stop_reason(&stats(Finish::Length, None), false, &stops), ("max_tokens", None));
        assert_eq!(stop_reason(&stats(Finish::Stop, None), true, &stops), ("tool_use", None));
        assert_eq!(stop_reason(&stats(Finish::Stop, Some("END")), false, &stops), ("stop_sequence", Some("END".into())));
        // The model's own stop string is its end of turn.
        assert_eq!(stop_reason(&stats(Finish::Stop, Some("<|im_end|>")), false, &stops), ("end_turn", None));
        assert_eq!(stop_reason(&stats(Finish::Stop, None), false, &stops), ("end_turn", None));
    }

    #[test]
    fn the_whole_answer_as_blocks() {
        let m = ParsedMessage {
            content: Some("Sure.".into()),
            reasoning_content: Some("think".into()),
            tool_calls: vec![
                llama_tools::ParsedToolCall { id: "call_abc".into(), name: "f".into(), arguments: "{\"a\":1}".into() },
                llama_tools::ParsedToolCall { id: "call_def".into(), name: "g".into(), arguments: "[1]".into() },
            ],
        };
        assert_eq!(
            content_blocks(m),
            vec![
                json!({"type": "thinking", "thinking": "think", "signature": ""}),
                json!({"type": "text", "text": "Sure."}),
                json!({"type": "tool_use", "id": "toolu_abc", "name": "f", "input": {"a": 1}}),
                json!({"type": "tool_use", "id": "toolu_def", "name": "g", "input": {"_raw": "[1]"}}),
            ]
        );
        assert!(content_blocks(ParsedMessage::default()).is_empty());
    }

    #[test]
    fn a_stream_of_text_then_a_call_then_text_gets_consecutive_blocks() {
        let mut s = StreamState::default();
        let mut out = StreamState::start("msg_1", "m", 12);
        for ev in [
            OutputEvent::Content("Hel".into()),
            OutputEvent::Content("lo".into()),
            OutputEvent::Content(String::new()),
            OutputEvent::ToolCallBegin { index: 0, id: "call_x".into(), name: "f".into() },
            OutputEvent::ToolCallArgs { index: 0, fragment: "{\"a\":".into() },
            OutputEvent::ToolCallArgs { index: 0, fragment: "1}".into() },
            OutputEvent::Content("after".into()),
        ] {
            s.event(ev, &mut out);
        }
        s.finish(&stats(Finish::Stop, None), true, &[], &mut out);
        let names: Vec<&str> = out.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (name, data) in &out {
            assert_eq!(data["type"], *name);
        }
        assert_eq!(out[0].1["message"]["usage"]["input_tokens"], 12);
        assert_eq!(out[0].1["message"]["content"], json!([]));
        assert_eq!(out[2].1, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
        assert_eq!(out[4].1["delta"], json!({"type": "text_delta", "text": "lo"}));
        assert_eq!(out[6].1["content_block"], json!({"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}));
        assert_eq!(out[7].1, json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}));
        assert_eq!(out[9].1["index"], 1);
        assert_eq!(out[10].1["index"], 2);
        assert_eq!(out[13].1["delta"], json!({"stop_reason": "tool_use", "stop_sequence": null}));
        assert_eq!(out[13].1["usage"], json!({"output_tokens": 5}));
        let text = String::from_utf8(sse_bytes(&out[..1])).unwrap();
        assert!(text.starts_with("event: message_start\ndata: {") && text.ends_with("}\n\n"), "{text}");
    }

    #[test]
    fn two_calls_and_reasoning_get_their_own_blocks() {
        let mut s = StreamState::default();
        let mut out = Vec::new();
        for ev in [
            OutputEvent::Reasoning("hm".into()),
            OutputEvent::ToolCallBegin { index: 0, id: "call_a".into(), name: "f".into() },
            OutputEvent::ToolCallArgs { index: 0, fragment: "{}".into() },
            OutputEvent::ToolCallBegin { index: 1, id: "call_b".into(), name: "g".into() },
            OutputEvent::ToolCallArgs { index: 1, fragment: "{}".into() },
        ] {
            s.event(ev, &mut out);
        }
        let starts: Vec<(Value, Value)> = out.iter().filter(|(n, _)| *n == "content_block_start").map(|(_, d)| (d["index"].clone(), d["content_block"]["type"].clone())).collect();
        assert_eq!(starts, [(json!(0), json!("thinking")), (json!(1), json!("tool_use")), (json!(2), json!("tool_use"))]);
        assert_eq!(out[1].1["delta"], json!({"type": "thinking_delta", "thinking": "hm"}));
        assert_eq!(out.last().unwrap().1["index"], 2);
    }
    #[test]
    fn a_call_cut_short_is_its_partial_block_and_max_tokens_without_its_text_again() {
        let mut s = StreamState::default();
        let ev = |e: OutputEvent| Output::Event(e);
        let mut out = s.batch(vec![ev(OutputEvent::Content("Let me see.".into()))], &[]);
        out.extend(s.batch(
            vec![ev(OutputEvent::ToolCallBegin { index: 0, id: "call_x".into(), name: "f".into() }), ev(OutputEvent::ToolCallArgs { index: 0, fragment: "{\"a\":".into() })],
            &[],
        ));
        // The parser's recovered text (the call's own text) comes with the end.
        out.extend(s.batch(vec![ev(OutputEvent::Content("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\":".into())), Output::Done { stats: stats(Finish::Length, None), called: false }], &[]));
        let names: Vec<&str> = out.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ],
            "{out:?}"
        );
        assert_eq!(out[3].1["content_block"]["type"], "tool_use");
        assert_eq!(out[6].1["delta"]["stop_reason"], "max_tokens");
        // Without a call opened, the end's text is the answer's own: kept.
        let mut s = StreamState::default();
        let out = s.batch(vec![ev(OutputEvent::Content("tail".into())), Output::Done { stats: stats(Finish::Length, None), called: false }], &[]);
        assert_eq!(out[1].1["delta"], json!({"type": "text_delta", "text": "tail"}));
    }
    #[test]
    fn consecutive_turns_of_one_role_are_merged() {
        let msgs = translate_messages(
            Some(System::Text("sys".into())),
            turns(json!([
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "there"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "and"}, {"type": "tool_use", "id": "b", "name": "g", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "1"}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "b", "content": "2"}]},
                {"role": "user", "content": "so?"},
                {"role": "user", "content": "well?"}
            ])),
        )
        .unwrap();
        let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool", "user"]);
        assert_eq!(msgs[1].content, "hi\nthere");
        assert_eq!(msgs[2].content, "and");
        let ids: Vec<&str> = msgs[2].tool_calls.as_ref().unwrap().iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!((msgs[3].content.as_str(), msgs[4].content.as_str()), ("1", "2"));
        assert_eq!(msgs[5].content, "so?\nwell?");
    }

    #[test]
    fn a_bad_output_format_schema_is_named_output_config_format() {
        let e = anthropic_words(ApiError::bad_request("invalid json_schema: not a schema", Some("json_schema")));
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("invalid output_config.format: not a schema", Some("output_config.format")));
        let e = anthropic_words(ApiError::bad_request("invalid temperature: x", Some("temperature")));
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }
}
