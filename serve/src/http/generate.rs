//! The generation pipeline every dialect shares. A dialect (OpenAI, Ollama, Anthropic)
//! translates its request into a [`GenRequest`], calls [`start`], and renders what comes
//! back, whole ([`collect`]) or streamed ([`outputs`]), in its own shape. Admission, limits,
//! the model's lease, template rendering, tokenizing, grammars and tool-call parsing are
//! here once, so no dialect can skip a check the others make.
//!
//! The order is the one every route keeps: everything checkable without the model first
//! (the constraint's schemas on a blocking thread), then the model's lease (loading it on
//! demand), then admission by its engine (503 at once when full), then rendering and
//! tokenizing on a blocking thread, then submission.

use llama_host::spec::{SpecMode, SpecParams};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_host::chat::{ChatTemplate, Message};
use llama_host::{GenerateOptions, SamplingParams};
use llama_tools::{OutputEvent, ParsedMessage, ToolCallParser};
use tokio_stream::{Stream, StreamExt};

use super::structured::{Constraint, ConstraintFields};
use super::{blocking, clip, ApiError, AppState};
use crate::engine::{Event, Finish, Handle, Request, RequestStats};
use crate::registry::{KeepAlive, Lease};

/// An id for an answer (`chatcmpl-…`, `msg_…`): unique across the server's models and
/// runs, which the engines' own request numbers (per model, from 1 at each start) are not.
/// A random prefix drawn once per process (from the standard library's randomly keyed
/// hasher: no extra crate for 64 random bits), then a counter.
pub(super) fn answer_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;
    static RUN: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let run = *RUN.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.write_u32(std::process::id());
        h.finish()
    });
    format!("{prefix}{run:016x}{:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Most stop strings a request may give, and their longest length in bytes.
pub(super) const MAX_STOPS: usize = 16;
pub(super) const MAX_STOP_BYTES: usize = 1024;

/// What the model is given.
pub(super) enum Input {
    /// Text as is (OpenAI's /v1/completions, Ollama's `raw`): the model's special tokens
    /// (BOS) are added.
    Prompt(String),
    /// A conversation, rendered by the model's chat template.
    Chat(Vec<Message>),
    /// Ollama's `generate`: a system and a user turn through the chat template when the
    /// model has one, else the text as is (the system text, a blank line, the prompt).
    /// Decided here, where the model is known, under the request's one lease.
    Templated { system: Option<String>, prompt: String },
}

impl Input {
    /// Text as is, with a system text first when there is one (then a blank line).
    pub(super) fn text(system: Option<String>, prompt: String) -> Input {
        Input::Prompt(match system {
            Some(s) => format!("{s}\n\n{prompt}"),
            None => prompt,
        })
    }
}

/// Sampling settings a request may set; what it leaves out comes from the model's defaults.
#[derive(Default)]
pub(super) struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

/// A generation request in no dialect.
pub(super) struct GenRequest {
    /// `None`: the server's default model.
    pub model: Option<String>,
    pub input: Input,
    pub sampling: Sampling,
    pub max_tokens: Option<u32>,
    pub seed: Option<u32>,
    pub stop: Option<Vec<String>>,
    pub keep_alive: Option<KeepAlive>,
    /// Structured output and tools, in OpenAI's terms (the other dialects translate theirs).
    pub constraint: ConstraintFields,
    /// Speculative decoding over the model's default (this server's extension).
    pub spec: Option<SpecField>,
}

/// A request's `speculative` object: `mode` (`ngram`, `draft` or `none`) and the sizes
/// under llama-server's names (`n_max`, `n_min`, `p_min`), plus `ngram_n`. What it leaves
/// out comes from the model's settings, else the mode's defaults. Unknown keys are refused:
/// a misspelt size would otherwise be silently ignored.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SpecField {
    mode: Option<String>,
    n_max: Option<u32>,
    n_min: Option<u32>,
    p_min: Option<f32>,
    ngram_n: Option<u32>,
}

impl SpecField {
    /// The speculation of a request to a model speculating with `default` (`None`: off).
    fn resolve(&self, default: Option<SpecParams>) -> Result<Option<SpecParams>, ApiError> {
        let field = "speculative";
        let base = match self.mode.as_deref() {
            Some("none") => return Ok(None),
            Some(m) => {
                let mode: SpecMode = m.parse().map_err(|e: String| ApiError::bad_request(e, Some("speculative.mode")))?;
                default.filter(|d| d.mode == mode).unwrap_or_else(|| SpecParams::new(mode))
            }
            None => default.ok_or_else(|| {
                ApiError::bad_request("this model does not speculate by default: give speculative.mode (ngram or draft)", Some("speculative.mode"))
            })?,
        };
        // The model's `draft-max` bounds what a request may ask for: an operator sets it to
        // bound a step's cost.
        let most = default.map_or(llama_host::spec::MAX_DRAFT, |d| d.draft_max);
        let p = SpecParams {
            // Checked as given, then bounded by the model's own `draft-max` below.
            draft_max: self.n_max.unwrap_or(base.draft_max),
            draft_min: self.n_min.unwrap_or(base.draft_min),
            p_min: self.p_min.unwrap_or(base.p_min),
            ngram_n: self.ngram_n.unwrap_or(base.ngram_n),
            ..base
        };
        p.validate().map_err(|e| {
            let (name, reason) = match e {
                llama_host::GenerateError::InvalidParam { field: f, reason } => {
                    // The flag's name as this field names it.
                    let name = match f.as_str() {
                        "draft-max" => "n_max",
                        "draft-min" => "n_min",
                        "draft-p-min" => "p_min",
                        "spec-ngram-n" => "ngram_n",
                        _ => "mode",
                    };
                    (name, reason)
                }
                other => ("mode", other.to_string()),
            };
            let param = format!("{field}.{name}");
            ApiError::bad_request(format!("{param}: {reason}"), Some(&param))
        })?;
        let draft_max = p.draft_max.min(most);
        Ok(Some(SpecParams { draft_max, draft_min: p.draft_min.min(draft_max), ..p }))
    }
}

/// A submitted generation.
pub(super) struct Started {
    pub handle: Handle,
    /// Reads the answer as content, reasoning and tool calls (chat input only).
    pub parser: Option<ToolCallParser>,
    /// Keeps the model loaded until the answer is sent.
    pub lease: Lease,
    /// The model's name, as the request should be answered with it.
    pub model: String,
    /// How long the request waited for its model to be loaded (Ollama's `load_duration`).
    pub load: Duration,
}

/// The stop strings, bounded in count and length.
pub(super) fn check_stops(stop: Vec<String>, field: &str) -> Result<Vec<String>, ApiError> {
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_request(format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes each"), Some(field)));
    }
    Ok(stop)
}

/// A seed as the APIs send it: -1 (or nothing) for a random one.
pub(super) fn check_seed(seed: Option<i64>) -> Result<Option<u32>, ApiError> {
    match seed {
        None | Some(-1) => Ok(None),
        Some(s) if (0..u32::MAX as i64).contains(&s) => Ok(Some(s as u32)),
        Some(s) => Err(ApiError::bad_request(format!("seed {s} is out of range"), Some("seed"))),
    }
}

/// A token limit as the APIs send it: at least 0.
pub(super) fn check_max_tokens(n: Option<i64>, field: &str) -> Result<Option<u32>, ApiError> {
    match n {
        None => Ok(None),
        Some(n) if (0..=u32::MAX as i64).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(ApiError::bad_request(format!("{field} must be between 0 and {}, got {n}", u32::MAX), Some(field))),
    }
}

impl GenRequest {
    /// The generation options: the request's values, else the model's defaults.
    fn options(&self, d: &GenerateOptions) -> Result<GenerateOptions, ApiError> {
        let (s, ds) = (&self.sampling, &d.sampling);
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(ds.temperature),
            top_p: s.top_p.unwrap_or(ds.top_p),
            top_k: s.top_k.unwrap_or(ds.top_k),
            min_p: s.min_p.unwrap_or(ds.min_p),
            repeat_penalty: s.repeat_penalty.unwrap_or(ds.repeat_penalty),
            repeat_last_n: s.repeat_last_n.unwrap_or(ds.repeat_last_n),
            presence_penalty: s.presence_penalty.unwrap_or(ds.presence_penalty),
            frequency_penalty: s.frequency_penalty.unwrap_or(ds.frequency_penalty),
            seed: self.seed.unwrap_or(ds.seed),
            ..ds.clone()
        };
        let spec = match &self.spec {
            Some(f) => f.resolve(d.spec)?,
            None => d.spec,
        };
        Ok(GenerateOptions {
            max_tokens: self.max_tokens.or(d.max_tokens),
            sampling,
            add_special: matches!(self.input, Input::Prompt(_)),
            stop: self.stop.clone().unwrap_or_else(|| d.stop.clone()),
            spec,
        })
    }
}

/// Checks, loads, admits, renders and submits `req`.
pub(super) async fn start(state: &Arc<AppState>, mut req: GenRequest) -> Result<Started, ApiError> {
    state.serving()?;
    // Sampling values are range-checked with the rest of the request at submission
    // (`SamplingParams::validate`), as on every route.
    let chat = !matches!(req.input, Input::Prompt(_));
    // The constraint (a JSON Schema's conversion, the tools' schemas) is CPU work a client
    // controls: on a blocking thread, never on the threads that answer HTTP.
    let fields = std::mem::take(&mut req.constraint);
    let reasoning = state.config.reasoning_format;
    let constraint = blocking(state, move || Constraint::of(fields.borrowed(), chat, reasoning)).await??;
    // The model stays loaded while the lease lives: to the end of the answer or stream.
    let asked = Instant::now();
    let lease = state.registry.acquire(req.model.as_deref(), req.keep_alive).await?;
    let load = asked.elapsed();
    let ready = lease.ready.clone();
    req.input = match req.input {
        Input::Templated { system, prompt } if ready.template.is_some() => {
            Input::Chat(system.into_iter().map(|s| Message::new("system", s)).chain([Message::new("user", prompt)]).collect())
        }
        Input::Templated { system, prompt } => Input::text(system, prompt),
        other => other,
    };
    let chat = matches!(req.input, Input::Chat(_));
    if chat && ready.template.is_none() {
        return Err(ApiError::bad_request("this model has no chat template", Some("messages")));
    }
    let mut opts = req.options(&ready.defaults)?;
    // Admission before any work: a full engine answers 503 at once.
    let reservation = ready.engine.reserve()?;
    let model = lease.name().to_string();
    let log_model = model.clone();
    let input = req.input;
    let (handle, parser) = blocking(state, move || -> Result<(Handle, Option<ToolCallParser>), ApiError> {
        let template = if chat { ready.template.as_ref() } else { None };
        let prompt = match input {
            Input::Prompt(prompt) => prompt,
            Input::Chat(msgs) => {
                let template = template.expect("checked above");
                render_chat(template, &msgs, &constraint)?
            }
            Input::Templated { .. } => unreachable!("resolved above"),
        };
        let plan = constraint.plan(ready.engine.model(), template, &prompt)?;
        if let Some(format) = plan.format {
            tracing::info!(model = %log_model, format = format.name(), lazy = plan.grammar.as_ref().is_some_and(|g| g.lazy), "tool-call format");
        }
        opts.sampling.grammar = plan.grammar;
        Ok((reservation.submit(Request { prompt, opts, deadline: None })?, plan.parser))
    })
    .await??;
    Ok(Started { handle, parser, lease, model, load })
}

/// A conversation's prompt as [`start`] renders it: the model's template, with the tools
/// the constraint gives it. Anthropic's count_tokens renders through here too, so its
/// count is the prompt the same request would get.
pub(super) fn render_chat(template: &ChatTemplate, msgs: &[Message], constraint: &Constraint) -> Result<String, ApiError> {
    template.render_with(msgs, true, constraint.template_tools(), None).map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("messages")))
}

/// A whole answer.
pub(super) struct Answer {
    /// Content, reasoning and tool calls (only content when the request had no parser).
    pub message: ParsedMessage,
    pub stats: RequestStats,
}

/// Waits for the whole answer. A generation that failed, or that the server cut short
/// (shutdown), is an error: never passed off as a complete answer. If the client goes
/// away, hyper drops this future and with it the handle, which cancels the request.
pub(super) async fn collect(started: Started) -> Result<Answer, ApiError> {
    let Started { handle, parser, lease, .. } = started;
    let (text, stats) = handle.collect_async().await;
    drop(lease);
    match stats.finish {
        Finish::Error => return Err(generation_failed(&stats)),
        Finish::Cancelled | Finish::Timeout => return Err(ApiError::cancelled()),
        Finish::Stop | Finish::Length => {}
    }
    let message = match parser {
        Some(mut p) => {
            p.push(&text);
            answer(p)
        }
        None => ParsedMessage { content: Some(text), ..ParsedMessage::default() },
    };
    Ok(Answer { message, stats })
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
pub(super) fn generation_failed(stats: &RequestStats) -> ApiError {
    let why = stats.error.as_deref().unwrap_or("unknown error");
    ApiError::new(hyper::StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("generation failed: {}", clip(why, 300))).code("generation_failed")
}

/// The error for a stream whose engine stopped before the request's end.
pub(super) fn engine_lost() -> ApiError {
    ApiError::new(hyper::StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped before the request ended").code("generation_failed")
}

/// What a streamed answer yields, in no dialect.
pub(super) enum Output {
    /// A piece of the answer: content, reasoning, or a tool call's start or arguments.
    Event(OutputEvent),
    /// The end: `called` says whether tool calls were read whole (OpenAI's and Ollama's
    /// `tool_calls` finish, Anthropic's `tool_use`). Check `stats.finish` for errors.
    Done { stats: RequestStats, called: bool },
    /// The engine stopped without ending the request: the stream must end with an error,
    /// never silently (SDKs would read it as a complete answer).
    Lost,
}

/// The answer as it is generated, one batch of outputs per engine event, ending with
/// `Done` or `Lost`. Text held back by the parser (a possible tool-call marker) yields an
/// empty batch. The lease keeps the model loaded until the stream ends; when the client
/// goes away hyper drops the body, and with it this stream, which cancels the request
/// (also while it is queued).
pub(super) fn outputs(handle: Handle, parser: Option<ToolCallParser>, lease: impl Send + Sync + 'static) -> impl Stream<Item = Vec<Output>> + Send + 'static {
    let mut parser = parser;
    let done = Arc::new(AtomicBool::new(false));
    let seen = done.clone();
    let events = handle.into_stream().map(move |ev| {
        let _holds = &lease;
        match ev {
            Event::Text(t) => match parser.as_mut() {
                None => vec![Output::Event(OutputEvent::Content(t))],
                Some(p) => p.push(&t).into_iter().map(Output::Event).collect(),
            },
            Event::Done(stats) => {
                seen.store(true, Ordering::SeqCst);
                let mut out = Vec::new();
                let mut called = false;
                if let Some(p) = parser.take() {
                    let finished = match p.finish() {
                        Ok(f) => f,
                        Err(failure) => {
                            tracing::debug!(problem = %failure.problem, "the answer's tool calls could not be read; kept as content");
                            *failure.recovered
                        }
                    };
                    // As the unstreamed answer: calls only when read whole.
                    called = !finished.message.tool_calls.is_empty();
                    out.extend(finished.events.into_iter().map(Output::Event));
                }
                out.push(Output::Done { stats, called });
                out
            }
        }
    });
    let end = tokio_stream::iter(std::iter::from_fn(move || {
        // Runs only once the events are exhausted, and then once.
        (!done.swap(true, Ordering::SeqCst)).then(|| vec![Output::Lost])
    }));
    events.chain(end)
}

/// What the dialects' unit tests share: an engine over the fake backend, a submitted
/// request, and a response's whole body.
#[cfg(test)]
pub(super) mod testing {
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use hyper::Response;
    use llama_host::fake::{FakeBehaviour, FakeModel};
    use llama_host::{ContextSize, GenerateOptions};

    use crate::engine::{Engine, EngineConfig, Handle, Request};
    use crate::http::Body;

    /// One slot, no queue, the fake backend answering `reply`.
    pub fn engine(reply: &str, stream_capacity: usize) -> (Engine, Arc<FakeBehaviour>) {
        let (model, fake) = FakeModel::new(reply).into_model();
        let size = ContextSize { n_ctx: 512, n_batch: 64, n_ubatch: 64, n_threads: 1, n_threads_batch: 1 };
        (Engine::start(Arc::new(model), EngineConfig { slots: 1, queue: 0, size, stream_capacity, ..EngineConfig::default() }).unwrap(), fake)
    }

    pub fn submit(engine: &Engine, max_tokens: Option<u32>) -> Handle {
        engine.submit(Request { prompt: "x".into(), opts: GenerateOptions { max_tokens, ..GenerateOptions::default() }, deadline: None }).unwrap()
    }

    /// The whole body of a (streamed) response.
    pub fn body(resp: Response<Body>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        String::from_utf8_lossy(&rt.block_on(resp.into_body().collect()).unwrap().to_bytes()).into_owned()
    }
}
