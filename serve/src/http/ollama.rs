//! Ollama's API (`/api/*`): the catalogue (`tags`, `show`, `ps`, `version`), generation
//! (`generate`, `chat`) through the shared pipeline of `generate.rs`, and embeddings
//! (`embed`, the legacy `embeddings`) through the engine's embed path of `embeddings.rs`.
//! The routes that need a model registry (`pull`, `push`, `create`, `copy`, `delete`)
//! answer 501: this server serves GGUF files it was given, it does not download or build them.
//!
//! Requests are read as JSON objects and taken apart field by field, so a field of the
//! wrong type is a 400 that names it (`options.temperature`, `messages`), as the rest of the
//! server does. Fields that ask for something this server cannot do (images, `suffix`, a
//! per-request `template`, a `context` from an older answer) are refused by name, never
//! silently dropped; fields that only tune how Ollama itself loads a model (`num_gpu`,
//! `num_thread`, …) are ignored, since here the model's settings are the server's.
//!
//! Streaming is Ollama's: newline-delimited JSON objects, the last with `done: true` and the
//! statistics. A generation that fails mid-stream ends with an `{"error": …}` line, never
//! with a `done: true` line that would pass it off as complete.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use llama_host::chat::{Message, ToolCall};
use llama_tools::{OutputEvent, ParsedMessage, ToolCallParser};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio_stream::StreamExt;

use super::embeddings::{self, Embedded};
use super::generate::{self, check_max_tokens, check_seed, check_stops, generation_failed, Answer, GenRequest, Input, Output, Sampling};
use super::openai::KeepAliveField;
use super::structured::{schema_field_named, ConstraintFields, ResponseFormat};
use super::{clip, json_response, read_json, ApiError, AppState, Body};
use crate::engine::{EmbedInput, Finish, Handle, RequestStats, MAX_EMBED_INPUTS};
use crate::registry::{KeepAlive, ModelFacts, ModelStatus};

/// The Ollama API level this server speaks (what `/api/version` answers): clients check it
/// against the features they use, and these routes and fields are those of Ollama 0.12.
const OLLAMA_API_VERSION: &str = "0.12.0";

/// Ollama's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Version,
    Tags,
    Show,
    Ps,
    Generate,
    Chat,
    Embed,
    /// The legacy single-input `/api/embeddings`.
    Embeddings,
    /// A route that needs a model registry (pull, push, create, copy, delete): 501.
    Registry(&'static str),
}

pub(super) async fn dispatch(state: Arc<AppState>, route: Route, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Version => Ok(json_response(StatusCode::OK, &json!({ "version": OLLAMA_API_VERSION }))),
        Route::Tags => Ok(tags(&state)),
        Route::Ps => Ok(ps(&state)),
        Route::Show => show(&state, Fields(read_json(&state, req).await?)),
        Route::Generate => generate(state.clone(), Fields(read_json(&state, req).await?)).await,
        Route::Chat => chat(state.clone(), Fields(read_json(&state, req).await?)).await,
        Route::Embed => embed(state.clone(), Fields(read_json(&state, req).await?)).await,
        Route::Embeddings => legacy_embeddings(state.clone(), Fields(read_json(&state, req).await?)).await,
        // The body is not read: the connection closes after the answer.
        Route::Registry(what) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "invalid_request_error",
            format!(
                "/api/{what} is not supported: this server serves GGUF files from its catalogue and has no model registry; \
                 put the file in a models directory (--models-dir), or name it with -m NAME=FILE or a config entry, instead"
            ),
        )
        .closing()),
    }
}

/// A request body, taken apart field by field: each field is read as its type, and a field
/// of the wrong type is a 400 naming it.
struct Fields(Map<String, Value>);

impl Fields {
    /// Field `name` (absent and `null` are `None`).
    fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => typed(name, v).map(Some),
        }
    }
}

/// `v` as a `T`, or a 400 naming `field`.
fn typed<T: DeserializeOwned>(field: &str, v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid {field}: {}", clip(&e.to_string(), 200)), Some(field)))
}

/// A field this server cannot honour, refused by name with what to do instead.
fn refuse(field: &str, what_instead: &str) -> ApiError {
    ApiError::bad_request(format!("'{field}' is not supported by this server: {what_instead}"), Some(field))
}

const NO_IMAGES: &str = "it serves text models only; send text";

// ---------------------------------------------------------------------------------------
// Times and sizes as Ollama writes them.

/// RFC 3339 in UTC with microseconds (`2026-12-01T23:51:43.123456Z`), as Ollama's
/// `created_at`, `modified_at` and `expires_at` are: clients parse them as datetimes.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", s / 3600, s / 60 % 60, s % 60, d.subsec_micros())
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`): no date crate for three numbers.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

/// A parameter count as Ollama's `parameter_size`: `268.1M`, `8B`, `1.5K`, `999`.
fn parameter_size(n: u64) -> String {
    for (unit, scale) in [("B", 1e9), ("M", 1e6), ("K", 1e3)] {
        let x = n as f64 / scale;
        if x >= 1.0 {
            return if x == x.floor() { format!("{x:.0}{unit}") } else { format!("{x:.1}{unit}") };
        }
    }
    n.to_string()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// The catalogue.

/// Ollama's `details` of a model.
#[derive(Serialize)]
struct Details {
    parent_model: &'static str,
    format: &'static str,
    family: String,
    families: Vec<String>,
    parameter_size: String,
    quantization_level: String,
}

impl Details {
    fn of(f: &ModelFacts) -> Details {
        let family = f.arch.clone().unwrap_or_default();
        Details {
            parent_model: "",
            format: "gguf",
            families: if family.is_empty() { Vec::new() } else { vec![family.clone()] },
            family,
            parameter_size: f.parameters.map(parameter_size).unwrap_or_default(),
            quantization_level: f.quantization.clone().unwrap_or_default(),
        }
    }
}

fn modified_at(f: &ModelFacts) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(f.modified.unwrap_or(0)))
}

#[derive(Serialize)]
struct TagsModel {
    name: String,
    model: String,
    modified_at: String,
    size: u64,
    /// Ollama's content digest: empty, since hashing a multi-gigabyte file to list it is
    /// not worth it and nothing here is addressed by digest.
    digest: &'static str,
    details: Details,
}

fn tags(state: &AppState) -> Response<Body> {
    let models: Vec<TagsModel> = state
        .registry
        .list()
        .into_iter()
        .map(|m| TagsModel {
            model: m.name.clone(),
            name: m.name,
            modified_at: modified_at(&m.facts),
            size: m.facts.size_bytes.unwrap_or(0),
            digest: "",
            details: Details::of(&m.facts),
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "models": models }))
}

#[derive(Serialize)]
struct PsModel {
    name: String,
    model: String,
    size: u64,
    /// Not measured per model: 0.
    size_vram: u64,
    digest: &'static str,
    details: Details,
    /// When the model unloads if it stays idle; absent when it will not (busy, or kept
    /// loaded for ever).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<u32>,
}

fn ps(state: &AppState) -> Response<Body> {
    let models: Vec<PsModel> = state
        .registry
        .list()
        .into_iter()
        .filter(|m| m.status == "loaded")
        .map(|m| PsModel {
            expires_at: expires_at(&m),
            model: m.name.clone(),
            size: m.memory_bytes.unwrap_or(0),
            size_vram: 0,
            digest: "",
            details: Details::of(&m.facts),
            context_length: m.ctx_size,
            name: m.name,
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "models": models }))
}

fn expires_at(m: &ModelStatus) -> Option<String> {
    let secs = m.unload_in_seconds.flatten()?;
    let at = SystemTime::now().checked_add(Duration::try_from_secs_f64(secs).ok()?)?;
    Some(rfc3339(at))
}

/// `/api/show`: what the catalogue knows of a model, without loading it.
fn show(state: &AppState, mut f: Fields) -> Result<Response<Body>, ApiError> {
    // `name` is the field's name before Ollama 0.3.
    let name: Option<String> = match f.take("model")? {
        Some(m) => Some(m),
        None => f.take("name")?,
    };
    let name = name.filter(|n| !n.is_empty()).ok_or_else(|| ApiError::bad_request("'model' is required", Some("model")))?;
    let Some(m) = state.registry.list().into_iter().find(|m| m.name == name) else {
        return Err(not_found(&name));
    };
    let facts = &m.facts;
    let mut info = Map::new();
    if let Some(arch) = &facts.arch {
        info.insert("general.architecture".into(), json!(arch));
        if let Some(n) = facts.context_length {
            info.insert(format!("{arch}.context_length"), json!(n));
        }
    }
    if let Some(n) = facts.parameters {
        info.insert("general.parameter_count".into(), json!(n));
    }
    // A model whose file has no template still chats (and calls tools) with the server's
    // built-in or configured one: every generating model can.
    let capabilities: Vec<&str> = if facts.embedding_model { vec!["embedding"] } else { vec!["completion", "tools"] };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "modelfile": format!("# {} is served from a GGUF file by llama serve; it has no Modelfile.\n", m.name),
            "parameters": "",
            // The file's own template: empty when the server uses a built-in or configured one.
            "template": facts.chat_template.clone().unwrap_or_default(),
            "details": Details::of(facts),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": modified_at(facts),
        }),
    ))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("model '{}' not found", clip(name, 64))).code("model_not_found")
}

/// The options the shared pipeline checks the range of, under their own names.
const SAMPLING_OPTIONS: &[&str] = &["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty"];

/// The pipeline's errors in Ollama's words: a model not in the catalogue is "not found"
/// (clients match on it to offer a pull), and the schema of `format` is called `format`,
/// not by the OpenAI field it was passed on as; every other error as it is.
fn ollama_words(mut e: ApiError, model: Option<&str>) -> ApiError {
    match model {
        Some(name) if e.code == Some("model_not_found") => not_found(name),
        _ => {
            if e.message.contains(" and tools cannot be used together") {
                e.message = "format and tools cannot be used together: give one".into();
            }
            e = schema_field_named(e, "format");
            // The shared range checks name a sampling value as OpenAI's field; here it is an option.
            if let Some(p) = e.param.clone().filter(|p| SAMPLING_OPTIONS.contains(&p.as_str())) {
                let option = format!("options.{p}");
                if let Some(at) = e.message.find(p.as_str()) {
                    e.message.replace_range(at..at + p.len(), &option);
                }
                e.param = Some(option);
            }
            e
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generation.

/// `options`, as far as they apply to one request.
#[derive(Default)]
struct Options {
    sampling: Sampling,
    max_tokens: Option<u32>,
    seed: Option<u32>,
    stop: Option<Vec<String>>,
}

/// Ollama's `options` in the pipeline's terms. Sampling options map one to one; `num_predict`
/// is the token limit (-1 none, -2 "fill the context", which the context bounds anyway);
/// `num_ctx` is type-checked and otherwise changes nothing, since the context is fixed
/// when the server loads the model (`-c`); everything else (load-time options such as
/// `num_gpu`, `num_thread`, `use_mmap`, sampling options llama.cpp's sampler here lacks
/// such as `mirostat`, and unknown keys) is ignored, as Ollama ignores unknown options.
fn options(map: Option<Map<String, Value>>) -> Result<Options, ApiError> {
    let mut o = Options::default();
    for (key, value) in map.unwrap_or_default() {
        if value.is_null() {
            continue;
        }
        let field = format!("options.{key}");
        let s = &mut o.sampling;
        match key.as_str() {
            "temperature" => s.temperature = Some(typed(&field, value)?),
            "top_k" => s.top_k = Some(int_option(&field, value)?),
            "top_p" => s.top_p = Some(typed(&field, value)?),
            "min_p" => s.min_p = Some(typed(&field, value)?),
            "repeat_penalty" => s.repeat_penalty = Some(typed(&field, value)?),
            "repeat_last_n" => s.repeat_last_n = Some(int_option(&field, value)?),
            "presence_penalty" => s.presence_penalty = Some(typed(&field, value)?),
            "frequency_penalty" => s.frequency_penalty = Some(typed(&field, value)?),
            "seed" => o.seed = check_seed(Some(int_option(&field, value)?)).map_err(|e| named(e, &field))?,
            "num_predict" => {
                o.max_tokens = match int_option::<i64>(&field, value)? {
                    -1 | -2 => None,
                    n => check_max_tokens(Some(n), &field)?,
                }
            }
            "stop" => {
                let stop = match value {
                    Value::String(s) => vec![s],
                    v => typed(&field, v)?,
                };
                o.stop = Some(check_stops(stop, &field).map_err(|e| named(e, &field))?);
            }
            "num_ctx" => {
                int_option::<u64>(&field, value)?;
            }
            _ => {}
        }
    }
    Ok(o)
}

/// An integer option: a JSON integer, or a float that is a whole number (`5.0`, which
/// Ollama accepts); any other float, or a value out of the type's range, is a 400 naming it.
fn int_option<T: DeserializeOwned>(field: &str, value: Value) -> Result<T, ApiError> {
    let value = match value.as_f64() {
        Some(x) if !value.is_i64() && !value.is_u64() => {
            if x.fract() != 0.0 || !x.is_finite() || x.abs() > 9.007_199_254_740_992e15 {
                return Err(ApiError::bad_request(format!("invalid {field}: {x} is not a whole number"), Some(field)));
            }
            json!(x as i64)
        }
        _ => value,
    };
    typed(field, value)
}

/// A shared check's 400, naming the option (Ollama's errors have no `param`).
fn named(e: ApiError, field: &str) -> ApiError {
    ApiError::bad_request(format!("invalid {field}: {}", e.message), Some(field))
}

/// `format`: `"json"` is any JSON object, an object is a JSON Schema, `""` is none.
fn format(value: Option<Value>) -> Result<ConstraintFields, ApiError> {
    let mut c = ConstraintFields::default();
    match value {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => c.response_format = Some(ResponseFormat::JsonObject { schema: None }),
        Some(schema @ Value::Object(_)) => c.json_schema = Some(schema),
        Some(other) => {
            return Err(ApiError::bad_request(format!("format must be \"json\" or a JSON Schema object, not {}", clip(&other.to_string(), 40)), Some("format")))
        }
    }
    Ok(c)
}

/// What `/api/generate` and `/api/chat` share: the model, `format`, `options`, `stream`
/// (true unless false), `keep_alive`, `think`.
struct Common {
    model: Option<String>,
    stream: bool,
    keep_alive: Option<KeepAlive>,
    options: Options,
    constraint: ConstraintFields,
}

impl Common {
    fn take(f: &mut Fields) -> Result<Common, ApiError> {
        let model = f.take::<String>("model")?.filter(|m| !m.is_empty());
        let stream = f.take("stream")?.unwrap_or(true);
        let keep_alive = f.take::<KeepAliveField>("keep_alive")?.as_ref().map(KeepAliveField::parse).transpose()?;
        let options = options(f.take("options")?)?;
        let constraint = format(f.take("format")?)?;
        // `think` is accepted: a model that reasons in its template's tags has its reasoning
        // in `thinking` whatever it says; true or false cannot make a model think or not.
        let _think: Option<Value> = f.take("think")?;
        if f.take::<bool>("logprobs")? == Some(true) {
            return Err(refuse("logprobs", "leave it out"));
        }
        Ok(Common { model, stream, keep_alive, options, constraint })
    }

    fn request(self, input: Input) -> GenRequest {
        let Options { sampling, max_tokens, seed, stop } = self.options;
        GenRequest { model: self.model, input, sampling, max_tokens, seed, stop, keep_alive: self.keep_alive, constraint: self.constraint, spec: None }
    }
}

/// The two shapes of answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Generate,
    Chat,
}

/// An empty prompt (or conversation) loads the model, or with `keep_alive: 0` unloads it,
/// as Ollama does: clients use it to preload a model and to free its memory.
async fn load_or_unload(state: &Arc<AppState>, model: Option<String>, keep_alive: Option<KeepAlive>, kind: Kind) -> Result<Response<Body>, ApiError> {
    let (name, reason) = if keep_alive == Some(KeepAlive::After(Duration::ZERO)) {
        let name = model.ok_or_else(|| ApiError::bad_request("'model' is required to unload a model", Some("model")))?;
        // A busy model unloads once its requests end; one not loaded stays unloaded.
        super::admin::unload_model(state, name.clone()).await.map_err(|e| ollama_words(e, Some(&name)))?;
        (name, "unload")
    } else {
        let lease = state.registry.acquire(model.as_deref(), keep_alive).await.map_err(|e| ollama_words(e.into(), model.as_deref()))?;
        (lease.name().to_string(), "load")
    };
    let mut v = json!({ "model": name, "created_at": now(), "done": true, "done_reason": reason });
    match kind {
        Kind::Generate => v["response"] = json!(""),
        Kind::Chat => v["message"] = json!({ "role": "assistant", "content": "" }),
    }
    Ok(json_response(StatusCode::OK, &v))
}

async fn generate(state: Arc<AppState>, mut f: Fields) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let prompt: String = f.take("prompt")?.unwrap_or_default();
    let system: Option<String> = f.take::<String>("system")?.filter(|s| !s.is_empty());
    let raw: bool = f.take("raw")?.unwrap_or(false);
    if f.take::<Vec<Value>>("images")?.is_some_and(|i| !i.is_empty()) {
        return Err(refuse("images", NO_IMAGES));
    }
    if f.take::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(refuse("suffix", "fill-in-the-middle is not offered; put the whole text in 'prompt'"));
    }
    if f.take::<String>("template")?.is_some_and(|s| !s.is_empty()) {
        return Err(refuse(
            "template",
            "the model's own chat template is used (set another one in the server's config); or render the prompt yourself and send it with 'raw': true",
        ));
    }
    if f.take::<Vec<Value>>("context")?.is_some_and(|c| !c.is_empty()) {
        return Err(refuse("context", "send the conversation with /api/chat, or the whole text in 'prompt'"));
    }
    let common = Common::take(&mut f)?;
    if prompt.is_empty() {
        return load_or_unload(&state, common.model, common.keep_alive, Kind::Generate).await;
    }
    let input = if raw { Input::text(system, prompt) } else { Input::Templated { system, prompt } };
    let stream = common.stream;
    let model = common.model.clone();
    let started = generate::start(&state, common.request(input)).await.map_err(|e| ollama_words(e, model.as_deref()))?;
    answer(started, stream, Kind::Generate).await
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    /// A `tool` turn: the tool whose result this is.
    #[serde(default)]
    tool_name: Option<String>,
    /// An earlier answer's reasoning: not given back to the model (templates drop it).
    #[serde(default, rename = "thinking")]
    _thinking: Option<Value>,
}

#[derive(Deserialize)]
struct InToolCall {
    function: InFunction,
}

#[derive(Deserialize)]
struct InFunction {
    name: String,
    /// Ollama sends an object; a JSON string is taken as is.
    #[serde(default)]
    arguments: Value,
}

/// The conversation as the template's messages.
fn messages(msgs: Vec<InMessage>) -> Result<Vec<Message>, ApiError> {
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if m.images.is_some_and(|im| !im.is_empty()) {
                return Err(refuse("images", &format!("message {i} has images; {NO_IMAGES}")));
            }
            let tool_calls = m.tool_calls.map(|calls| {
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let arguments = match c.function.arguments {
                            Value::String(s) => s,
                            Value::Null => "{}".to_string(),
                            other => other.to_string(),
                        };
                        ToolCall::new(format!("call_{i}_{j}"), c.function.name, arguments)
                    })
                    .collect()
            });
            Ok(Message { role: m.role, content: m.content.unwrap_or_default(), tool_calls, tool_call_id: None, name: m.tool_name })
        })
        .collect()
}

async fn chat(state: Arc<AppState>, mut f: Fields) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let msgs: Vec<InMessage> = f.take("messages")?.unwrap_or_default();
    let tools: Option<Vec<Value>> = f.take("tools")?;
    let mut common = Common::take(&mut f)?;
    if msgs.is_empty() {
        return load_or_unload(&state, common.model, common.keep_alive, Kind::Chat).await;
    }
    let msgs = messages(msgs)?;
    // Ollama's tools are OpenAI's; the model chooses whether to call (tool_choice auto).
    common.constraint.tools = tools.filter(|t| !t.is_empty());
    let stream = common.stream;
    let model = common.model.clone();
    let started = generate::start(&state, common.request(Input::Chat(msgs))).await.map_err(|e| ollama_words(e, model.as_deref()))?;
    answer(started, stream, Kind::Chat).await
}

/// The statistics of Ollama's last object, in nanoseconds: `load_duration` is the wait for
/// the model's load, `prompt_eval_duration` the prompt's processing (first token less the
/// queue wait), `eval_duration` the generation after the first token.
fn statistics(v: &mut Value, stats: &RequestStats, load: Duration) {
    let ttft = stats.time_to_first_token.unwrap_or(stats.total);
    v["done_reason"] = json!(if stats.finish == Finish::Length { "length" } else { "stop" });
    v["total_duration"] = json!(nanos(load + stats.total));
    v["load_duration"] = json!(nanos(load));
    v["prompt_eval_count"] = json!(stats.prompt_tokens);
    v["prompt_eval_duration"] = json!(nanos(ttft.saturating_sub(stats.queue_wait)));
    v["eval_count"] = json!(stats.generated_tokens);
    v["eval_duration"] = json!(nanos(stats.total.saturating_sub(ttft)));
}

/// A call as Ollama returns it: arguments as an object.
fn tool_call(name: &str, arguments: &str) -> Value {
    // Clients read `arguments` as a mapping: text that is not a JSON object (not JSON, or
    // JSON of another kind) is kept whole under `_raw` rather than lost, as on the
    // Anthropic dialect.
    json!({ "function": { "name": name, "arguments": super::anthropic::tool_input(arguments) } })
}

/// The answer, whole or streamed.
async fn answer(started: generate::Started, stream: bool, kind: Kind) -> Result<Response<Body>, ApiError> {
    let model = started.model.clone();
    let load = started.load;
    if stream {
        return Ok(stream_response(started.handle, started.parser, started.lease, model, load, kind));
    }
    let Answer { message, stats } = generate::collect(started).await?;
    let ParsedMessage { content, reasoning_content, tool_calls } = message;
    let mut v = json!({ "model": model, "created_at": now(), "done": true });
    match kind {
        Kind::Generate => {
            v["response"] = json!(content.unwrap_or_default());
            if let Some(r) = reasoning_content {
                v["thinking"] = json!(r);
            }
        }
        Kind::Chat => {
            let mut m = json!({ "role": "assistant", "content": content.unwrap_or_default() });
            if let Some(r) = reasoning_content {
                m["thinking"] = json!(r);
            }
            if !tool_calls.is_empty() {
                m["tool_calls"] = Value::Array(tool_calls.iter().map(|c| tool_call(&c.name, &c.arguments)).collect());
            }
            v["message"] = m;
        }
    }
    statistics(&mut v, &stats, load);
    Ok(json_response(StatusCode::OK, &v))
}

/// One NDJSON line.
fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Ollama's stream: a line per piece of the answer (`response`, or `message.content`;
/// reasoning as `thinking`), the calls (chat) on one line once the answer is complete, then
/// the last line with `done: true` and the statistics, or an `{"error": …}` line.
fn stream_response(
    handle: Handle,
    parser: Option<ToolCallParser>,
    lease: impl Send + Sync + 'static,
    model: String,
    load: Duration,
    kind: Kind,
) -> Response<Body> {
    let piece = move |content: &str, thinking: Option<&str>| -> Value {
        let mut v = json!({ "model": model, "created_at": now(), "done": false });
        match kind {
            Kind::Generate => {
                v["response"] = json!(content);
                if let Some(t) = thinking {
                    v["thinking"] = json!(t);
                }
            }
            Kind::Chat => {
                v["message"] = json!({ "role": "assistant", "content": content });
                if let Some(t) = thinking {
                    v["message"]["thinking"] = json!(t);
                }
            }
        }
        v
    };
    // The calls as they stream (name, argument text), reported whole at the end.
    let mut calls: Vec<(String, String)> = Vec::new();
    let events = generate::outputs(handle, parser, lease).filter_map(move |batch| {
        let mut out = Vec::new();
        for o in batch {
            match o {
                Output::Event(OutputEvent::Content(t)) if !t.is_empty() => out.extend(line(&piece(&t, None))),
                Output::Event(OutputEvent::Content(_)) => {}
                Output::Event(OutputEvent::Reasoning(t)) => out.extend(line(&piece("", Some(&t)))),
                Output::Event(OutputEvent::ToolCallBegin { index, name, .. }) => {
                    if index == calls.len() {
                        calls.push((name, String::new()));
                    }
                }
                Output::Event(OutputEvent::ToolCallArgs { index, fragment }) => {
                    if let Some(c) = calls.get_mut(index) {
                        c.1.push_str(&fragment);
                    }
                }
                Output::Done { stats, called } => match stats.finish {
                    Finish::Error => out.extend(line(&generation_failed(&stats).ollama_body())),
                    Finish::Cancelled | Finish::Timeout => out.extend(line(&ApiError::cancelled().ollama_body())),
                    Finish::Stop | Finish::Length => {
                        if called && kind == Kind::Chat {
                            let mut v = piece("", None);
                            v["message"]["tool_calls"] = Value::Array(calls.iter().map(|(n, a)| tool_call(n, a)).collect());
                            out.extend(line(&v));
                        }
                        let mut last = piece("", None);
                        last["done"] = json!(true);
                        statistics(&mut last, &stats, load);
                        out.extend(line(&last));
                    }
                },
                Output::Lost => out.extend(line(&generate::engine_lost().ollama_body())),
            }
        }
        // Text held back (a possible call's marker) sends nothing yet.
        (!out.is_empty()).then(|| Bytes::from(out))
    });
    let frames = events.map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

// ---------------------------------------------------------------------------------------
// Embeddings.

/// `input`: a string or an array of strings.
fn embed_inputs(input: Option<Value>) -> Result<Vec<EmbedInput>, ApiError> {
    let param = Some("input");
    match input {
        None | Some(Value::Null) => Err(ApiError::bad_request("'input' is required", param)),
        // Nothing to embed: no vectors (the model is still loaded, as Ollama does).
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![EmbedInput::Text(s)]),
        Some(Value::Array(items)) => {
            if items.len() > MAX_EMBED_INPUTS {
                return Err(ApiError::bad_request(format!("{} inputs is over the limit of {MAX_EMBED_INPUTS}", items.len()), param));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(EmbedInput::Text(s)),
                    other => Err(ApiError::bad_request(format!("input {i}: {} is not a string", clip(&other.to_string(), 40)), param)),
                })
                .collect()
        }
        Some(_) => Err(ApiError::bad_request("'input' must be a string or an array of strings", param)),
    }
}

/// The fields both embedding routes share: the model and `keep_alive`; `options` is
/// type-checked and ignored (none of it applies to an embedding).
fn embed_common(f: &mut Fields) -> Result<(Option<String>, Option<KeepAlive>), ApiError> {
    let model = f.take::<String>("model")?.filter(|m| !m.is_empty());
    let keep_alive = f.take::<KeepAliveField>("keep_alive")?.as_ref().map(KeepAliveField::parse).transpose()?;
    let _options: Option<Map<String, Value>> = f.take("options")?;
    Ok((model, keep_alive))
}

async fn embed(state: Arc<AppState>, mut f: Fields) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let (model, keep_alive) = embed_common(&mut f)?;
    let inputs = embed_inputs(f.take("input")?)?;
    // `truncate` (default true) is accepted; an input longer than the context is refused
    // with a 400 either way, never cut (see docs/API.md).
    let _truncate: Option<bool> = f.take("truncate")?;
    let dimensions: Option<u64> = f.take("dimensions")?;
    if dimensions == Some(0) {
        return Err(ApiError::bad_request("dimensions must be above 0", Some("dimensions")));
    }
    let started = Instant::now();
    if inputs.is_empty() {
        // `""` or `[]`: the model is loaded (clients use it to preload one) and no vectors
        // are answered, as Ollama does.
        let lease = state.registry.acquire(model.as_deref(), keep_alive).await.map_err(|e| ollama_words(e.into(), model.as_deref()))?;
        let load = started.elapsed();
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "model": lease.name(),
                "embeddings": [],
                "total_duration": nanos(started.elapsed()),
                "load_duration": nanos(load),
                "prompt_eval_count": 0,
            }),
        ));
    }
    // Euclidean (L2) normalisation, as Ollama's /api/embed.
    let Embedded { vectors, prompt_tokens, model, load } =
        embeddings::embed(&state, model.as_deref(), keep_alive, inputs, llama_host::Normalize::EUCLIDEAN, dimensions)
            .await
            .map_err(|e| ollama_words(e, model.as_deref()))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "model": model,
            "embeddings": vectors,
            "total_duration": nanos(started.elapsed()),
            "load_duration": nanos(load),
            "prompt_eval_count": prompt_tokens,
        }),
    ))
}

/// The legacy `/api/embeddings`: one `prompt`, one vector, not normalised (as Ollama's).
async fn legacy_embeddings(state: Arc<AppState>, mut f: Fields) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let (model, keep_alive) = embed_common(&mut f)?;
    let prompt: String = f.take("prompt")?.unwrap_or_default();
    if let Some(name) = model.as_deref().filter(|n| !state.registry.knows(n)) {
        return Err(not_found(name));
    }
    if prompt.is_empty() {
        // Ollama answers an empty prompt with an empty vector.
        return Ok(json_response(StatusCode::OK, &json!({ "embedding": [] })));
    }
    let out = embeddings::embed(&state, model.as_deref(), keep_alive, vec![EmbedInput::Text(prompt)], llama_host::Normalize::NONE, None)
        .await
        .map_err(|e| ollama_words(e, model.as_deref()))?;
    let vector = out.vectors.into_iter().next().unwrap_or_default();
    Ok(json_response(StatusCode::OK, &json!({ "embedding": vector })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::http::generate::testing::{body, engine, submit};

    /// The stream's lines, each parsed.
    fn lines(resp: Response<Body>) -> Vec<Value> {
        let text = body(resp);
        assert!(text.ends_with('\n'), "{text}");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }

    #[test]
    fn a_stream_is_pieces_then_one_done_line_with_statistics() {
        for kind in [Kind::Generate, Kind::Chat] {
            let (engine, _) = engine("hello there", 16);
            let all = lines(stream_response(submit(&engine, Some(64)), None, (), "m".into(), Duration::from_millis(3), kind));
            let (last, pieces) = all.split_last().unwrap();
            assert!(!pieces.is_empty() && pieces.iter().all(|p| p["done"] == false && p["model"] == "m"), "{all:?}");
            assert_eq!(last["done"], true);
            assert_eq!(last["load_duration"], 3_000_000);
            assert!(last["eval_count"].as_u64().unwrap() > 0 && last["prompt_eval_count"].as_u64().unwrap() > 0, "{last}");
            for k in ["total_duration", "prompt_eval_duration", "eval_duration"] {
                assert!(last[k].is_u64(), "{k}: {last}");
            }
            let text: String = match kind {
                Kind::Generate => pieces.iter().map(|p| p["response"].as_str().unwrap().to_string()).collect(),
                Kind::Chat => pieces.iter().map(|p| p["message"]["content"].as_str().unwrap().to_string()).collect(),
            };
            assert!(!text.is_empty(), "{all:?}");
        }
    }

    #[test]
    fn a_failed_generation_streams_an_error_line_not_a_done_line() {
        for kind in [Kind::Generate, Kind::Chat] {
            let (engine, fake) = engine("hi", 16);
            fake.short_samples.store(1, Ordering::SeqCst);
            let all = lines(stream_response(submit(&engine, Some(4)), None, (), "m".into(), Duration::ZERO, kind));
            let last = all.last().unwrap();
            assert!(last["error"].as_str().unwrap().contains("generation failed"), "{all:?}");
            assert!(all.iter().all(|l| l["done"] != true), "{all:?}");
        }
    }

    // A stream whose engine stopped before the request ended: an error line, never a
    // done line that clients would read as a complete answer.
    #[test]
    fn a_stream_cut_off_by_shutdown_ends_with_an_error_line() {
        let (engine, _) = engine("", 1);
        let h = submit(&engine, Some(64));
        let resp = stream_response(h, None, (), "m".into(), Duration::ZERO, Kind::Chat);
        drop(engine);
        let all = lines(resp);
        assert!(all.last().unwrap()["error"].is_string(), "{all:?}");
        assert!(all.iter().all(|l| l["done"] != true), "{all:?}");
    }

    fn at(secs: u64, micros: u32) -> String {
        rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(micros)))
    }

    #[test]
    fn times_are_rfc3339_utc_with_microseconds() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_709_164_799, 999_999), "2024-02-28T23:59:59.999999Z");
        assert_eq!(at(1_709_251_199, 0), "2024-02-29T23:59:59.000000Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
        assert_eq!(at(1_798_761_599, 0), "2026-12-31T23:59:59.000000Z");
        // A time before 1970 (a file's odd mtime) is the epoch, never a panic.
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000000Z");
        // Far future: still a date.
        assert!(at(u64::from(u32::MAX) * 100, 0).ends_with('Z'));
    }

    #[test]
    fn parameter_sizes_as_ollama_writes_them() {
        assert_eq!(parameter_size(268_100_000), "268.1M");
        assert_eq!(parameter_size(134_515_008), "134.5M");
        assert_eq!(parameter_size(8_000_000_000), "8B");
        assert_eq!(parameter_size(7_241_732_096), "7.2B");
        assert_eq!(parameter_size(1_500), "1.5K");
        assert_eq!(parameter_size(999), "999");
        assert_eq!(parameter_size(0), "0");
        assert_eq!(parameter_size(u64::MAX).chars().last(), Some('B'));
    }

    fn opts(v: Value) -> Result<Options, String> {
        let Value::Object(m) = v else { panic!("an object") };
        options(Some(m)).map_err(|e| e.message)
    }

    #[test]
    fn options_map_to_sampling_limits_and_stops() {
        let o = opts(json!({
            "temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "repeat_penalty": 1.1, "repeat_last_n": 32,
            "presence_penalty": 0.2, "frequency_penalty": 0.3, "seed": 42, "num_predict": 7, "stop": ["\n", "END"],
            "num_ctx": 8192, "num_gpu": 99, "num_thread": 4, "use_mmap": false, "mirostat": 2, "something_new": "x"
        }))
        .unwrap();
        let s = &o.sampling;
        assert_eq!((s.temperature, s.top_k, s.top_p, s.min_p), (Some(0.0), Some(5), Some(0.5), Some(0.1)));
        assert_eq!((s.repeat_penalty, s.repeat_last_n, s.presence_penalty, s.frequency_penalty), (Some(1.1), Some(32), Some(0.2), Some(0.3)));
        assert_eq!((o.seed, o.max_tokens), (Some(42), Some(7)));
        assert_eq!(o.stop, Some(vec!["\n".to_string(), "END".to_string()]));
        // -1 (no limit) and -2 (fill the context) are no limit; a single stop string is one stop.
        for n in [-1, -2] {
            assert_eq!(opts(json!({ "num_predict": n })).unwrap().max_tokens, None);
        }
        assert_eq!(opts(json!({ "stop": "x" })).unwrap().stop, Some(vec!["x".to_string()]));
        assert_eq!(opts(json!({ "seed": -1, "temperature": null })).unwrap().seed, None);
        assert!(options(None).unwrap().stop.is_none());
    }

    #[test]
    fn bad_options_name_the_option() {
        for (v, needle) in [
            (json!({ "temperature": "hot" }), "options.temperature"),
            (json!({ "top_k": 1.5 }), "options.top_k"),
            (json!({ "num_predict": -3 }), "options.num_predict"),
            (json!({ "num_ctx": "big" }), "options.num_ctx"),
            (json!({ "stop": [1] }), "options.stop"),
            (json!({ "stop": vec!["s"; 17] }), "invalid options.stop: at most 16 stop strings"),
            (json!({ "seed": 1u64 << 40 }), "invalid options.seed: seed 1099511627776 is out of range"),
        ] {
            let e = opts(v.clone()).err().unwrap_or_else(|| panic!("{v} was accepted"));
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn format_is_json_a_schema_or_nothing() {
        assert!(matches!(format(Some(json!("json"))).unwrap().response_format, Some(ResponseFormat::JsonObject { schema: None })));
        assert!(format(Some(json!({ "type": "object" }))).unwrap().json_schema.is_some());
        let none = format(Some(json!(""))).unwrap();
        assert!(none.response_format.is_none() && none.json_schema.is_none());
        assert!(format(Some(json!("yaml"))).err().unwrap().message.contains("format must be"));
        assert!(format(Some(json!(5))).is_err());
    }

    #[test]
    fn fields_of_the_wrong_type_are_named() {
        let Value::Object(m) = json!({ "messages": "hello", "stream": "yes" }) else { unreachable!() };
        let mut f = Fields(m);
        assert!(f.take::<Vec<InMessage>>("messages").err().unwrap().message.starts_with("invalid messages:"));
        assert!(f.take::<bool>("stream").err().unwrap().message.starts_with("invalid stream:"));
        assert!(f.take::<bool>("absent").unwrap().is_none());
    }

    #[test]
    fn message_images_are_refused_and_call_arguments_become_json_text() {
        let m: Vec<InMessage> = serde_json::from_value(json!([{ "role": "user", "content": "x", "images": ["aGk="] }])).unwrap();
        assert!(messages(m).err().unwrap().message.contains("'images'"));
        let m: Vec<InMessage> = serde_json::from_value(json!([
            { "role": "assistant", "content": "", "tool_calls": [{ "function": { "name": "f", "arguments": { "a": 1 } } }] },
            { "role": "tool", "content": "2", "tool_name": "f" }
        ]))
        .unwrap();
        let m = messages(m).unwrap();
        let call = &m[0].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.function.arguments, r#"{"a":1}"#);
        assert_eq!(m[1].name.as_deref(), Some("f"));
    }
    #[test]
    fn integer_options_may_be_whole_floats() {
        let o = opts(json!({ "top_k": 5.0, "repeat_last_n": -1.0, "seed": 42.0, "num_predict": 7.0, "num_ctx": 4096.0 })).unwrap();
        assert_eq!((o.sampling.top_k, o.sampling.repeat_last_n, o.seed, o.max_tokens), (Some(5), Some(-1), Some(42), Some(7)));
        assert_eq!(opts(json!({ "num_predict": -1.0 })).unwrap().max_tokens, None);
        for (k, v) in [("top_k", json!(5.5)), ("repeat_last_n", json!(0.1)), ("seed", json!(1e300)), ("num_predict", json!(2.5)), ("num_ctx", json!(-1.0)), ("top_k", json!(1e10))] {
            let e = opts(json!({ k: v })).err().unwrap_or_else(|| panic!("{k}: {v} was accepted"));
            assert!(e.contains(&format!("options.{k}")), "{k}: {e}");
        }
    }

    #[test]
    fn range_errors_of_the_shared_checks_name_the_option() {
        let e = ollama_words(ApiError::bad_request("invalid temperature: must be >= 0", Some("temperature")), None);
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("invalid options.temperature: must be >= 0", Some("options.temperature")));
        let e = ollama_words(ApiError::bad_request("repeat_last_n must be -1 (the whole context) or more", Some("repeat_last_n")), None);
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("options.repeat_last_n must be -1 (the whole context) or more", Some("options.repeat_last_n")));
        let e = ollama_words(ApiError::bad_request("invalid json_schema: x", Some("json_schema")), None);
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("invalid format: x", Some("format")));
        let e = ollama_words(ApiError::bad_request("invalid prompt: x", Some("prompt")), None);
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn call_arguments_are_always_an_object() {
        assert_eq!(tool_call("f", r#"{"a":1}"#), json!({ "function": { "name": "f", "arguments": { "a": 1 } } }));
        for text in ["[1, 2]", "\"x\"", "3", "null", "not json"] {
            assert_eq!(tool_call("f", text)["function"]["arguments"], json!({ "_raw": text }), "{text}");
        }
    }

    #[test]
    fn an_empty_embed_input_is_no_inputs() {
        assert!(embed_inputs(Some(json!(""))).unwrap().is_empty());
        assert!(embed_inputs(Some(json!([]))).unwrap().is_empty());
        assert_eq!(embed_inputs(Some(json!(["a", "b"]))).unwrap().len(), 2);
        assert!(embed_inputs(None).is_err());
        assert!(embed_inputs(Some(json!(3))).is_err());
    }
}
