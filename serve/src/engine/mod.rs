//! The engine: one thread per loaded model serving many concurrent requests on one
//! llama.cpp context with several sequences (slots).
//!
//! Requests arrive over a bounded channel; admission is bounded (`slots + queue`): past
//! it, `submit` fails at once with [`SubmitError::Overloaded`]. Each step the engine builds
//! one batch from the next token of every running sequence plus chunks of waiting prompts
//! (continuous batching, see [`plan_batch`]), decodes once, samples per sequence, and hands
//! text to each request over its own bounded channel. A request whose consumer is not
//! reading is paused (left out of batches), never buffered without bound. A request that is
//! cancelled (handle dropped or `cancel`), or past its deadline, frees its slot and KV cells
//! at the next step, also while still queued (then it never runs). A finished request leaves
//! its tokens in its slot: a later request with a shared prefix, given that slot, decodes
//! only the rest.


mod compute;
mod embed;
mod handle;
mod plan;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use llama_host::{ContextParams, ContextSize, GenerateOptions, KvCacheParams, Model};

pub use embed::{EmbedFailure, EmbedHandle, EmbedInput, EmbedOutput, EmbedRequest, MAX_EMBED_INPUTS, MAX_EMBED_TOKENS};
pub use handle::{Event, EventStream, Finish, Handle, RequestStats};
pub use plan::{plan_batch, plan_invariant, Part, SlotState};
pub use worker::KvUsage;

use crate::metrics::{Metrics, Outcome};
use handle::CancelOnDrop;
use worker::{Job, Msg, Worker};

/// Sizes and limits of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together (parallel requests).
    pub slots: u32,
    /// Requests that may wait for a slot; more are refused with `Overloaded`.
    pub queue: usize,
    /// The context: `n_ctx` is the KV cache size in tokens, split evenly between the slots.
    pub size: ContextSize,
    /// Longest prompt accepted (tokens); also bounded by a slot's share of the context.
    pub max_prompt_tokens: Option<u32>,
    /// Longest prompt accepted in bytes, checked before tokenizing (see
    /// [`Engine::max_prompt_bytes`] for the default).
    pub max_prompt_bytes: Option<usize>,
    /// A request whose consumer takes no text for this long (its sequence paused on a full
    /// channel) is cancelled and its slot freed.
    pub stall_timeout: Duration,
    /// Most new tokens any request may ask for.
    pub max_new_tokens: Option<u32>,
    /// Text pieces buffered per request before its sequence pauses.
    pub stream_capacity: usize,
    /// Reuse a finished request's KV cells for a later prompt with the same prefix.
    pub prefix_cache: bool,
    /// Batch-invariant mode: a request's tokens are computed with the same kernels
    /// whatever else is in the batch, so greedy output does not depend on concurrency.
    /// Costs some throughput; needs a model loaded with `ModelParams::repack` off.
    /// See docs/ARCHITECTURE.md ("Batch shape and exact outputs").
    pub batch_invariant: bool,
    /// The KV cache's element types and flash attention (a quantized cache holds more
    /// tokens in the same memory).
    pub cache: KvCacheParams,
    /// Pooling of embedding requests (`--pooling`); `None`: what the model file declares.
    pub pooling: Option<llama_host::Pooling>,
    /// Inputs one embedding batch decodes together. Its tokens are `size.n_ubatch`, which
    /// is also the longest input (llama.cpp pools per micro-batch, as llama-server).
    pub embed_seqs: u32,
    /// A draft model for requests speculating with `SpecMode::Draft` (same vocabulary as
    /// the model: checked at start).
    pub draft: Option<DraftModel>,
}

/// A draft model shared with an engine (`EngineConfig::draft`).
#[derive(Clone)]
pub struct DraftModel(pub Arc<Model>);

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DraftModel({})", self.0.path().display())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 4,
            queue: 16,
            size: ContextSize { n_ctx: 8192, ..ContextSize::default() },
            max_prompt_tokens: None,
            max_prompt_bytes: None,
            stall_timeout: Duration::from_secs(30),
            max_new_tokens: None,
            stream_capacity: 16,
            prefix_cache: true,
            batch_invariant: false,
            cache: KvCacheParams::default(),
            pooling: None,
            embed_seqs: 64,
            draft: None,
        }
    }
}

/// Most slots an engine runs: far beyond what one context decodes usefully, and small
/// enough that every count derived from it stays small.
pub const MAX_SLOTS: u32 = 256;
/// Most requests that may wait for a slot.
pub const MAX_QUEUE: usize = 65_536;

impl EngineConfig {
    /// Checks every size, so nothing derived from them can overflow or allocate wildly.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |field: &'static str, reason: String| Err(StartError::InvalidConfig { field, reason });
        if !(1..=MAX_SLOTS).contains(&self.slots) {
            return bad("parallel", format!("{} is outside 1..={MAX_SLOTS}", self.slots));
        }
        if self.queue > MAX_QUEUE {
            return bad("queue", format!("{} is above {MAX_QUEUE}", self.queue));
        }
        if self.stream_capacity == 0 || self.stream_capacity > 4096 {
            return bad("stream capacity", format!("{} is outside 1..=4096", self.stream_capacity));
        }
        if self.size.n_ctx < self.slots + self.batch_invariant as u32 {
            return bad("ctx-size", format!("{} tokens cannot be shared by {} slots", self.size.n_ctx, self.slots));
        }
        if self.stall_timeout.is_zero() || self.stall_timeout > Duration::from_secs(86_400) {
            return bad("stall-timeout", format!("{:?} is outside 1 ms..=1 day", self.stall_timeout));
        }
        if self.batch_invariant && self.size.n_batch < 2 {
            // A step is the padding token plus at least one real token.
            return bad("batch-size", "batch-invariant mode needs a batch of at least 2".into());
        }
        if let Some(p @ (llama_host::Pooling::None | llama_host::Pooling::Rank)) = self.pooling {
            return bad("pooling", format!("{p} gives no single vector per input; use mean, cls or last"));
        }
        if !(1..=llama_host::embed::MAX_EMBED_SEQS).contains(&self.embed_seqs) {
            return bad("embedding batch", format!("{} inputs is outside 1..={}", self.embed_seqs, llama_host::embed::MAX_EMBED_SEQS));
        }
        self.size.validate()?;
        self.cache.validate().map_err(|e| StartError::InvalidConfig { field: e.field, reason: e.reason })?;
        Ok(())
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(transparent)]
    Session(#[from] llama_host::SessionError),
    #[error("cannot start the engine thread")]
    Thread(#[source] std::io::Error),
    /// The draft model cannot draft for this model (another vocabulary) or its context
    /// could not be made.
    #[error(transparent)]
    Draft(llama_host::GenerateError),
}

/// One request to the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub opts: GenerateOptions,
    /// Give up (outcome `Timeout`) if not finished by then, queued or running.
    pub deadline: Option<Instant>,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("overloaded: {waiting} requests in flight (limit {limit}); retry later")]
    Overloaded { waiting: usize, limit: usize },
    #[error("the prompt has {tokens} tokens; the limit is {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("the prompt is {bytes} bytes; the limit is {limit}")]
    PromptTooLarge { bytes: usize, limit: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error("the engine has stopped")]
    Stopped,
    /// The model cannot answer embedding requests as served (its pooling).
    #[error("this model cannot compute embeddings: {reason}")]
    CannotEmbed { reason: String },
    #[error("no input: give at least one")]
    NoInput,
    #[error("{count} inputs is over the limit of {limit}")]
    TooManyInputs { count: usize, limit: usize },
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
    #[error("input {index} is {bytes} bytes; the limit is {limit}")]
    InputTooLarge { index: usize, bytes: usize, limit: usize },
    #[error("input {index} has {tokens} tokens; the limit is {limit} (the server's --ubatch-size); inputs are never truncated")]
    InputTooLong { index: usize, tokens: usize, limit: usize },
    #[error("input {index}: token id {token} is not in the vocabulary")]
    InvalidToken { index: usize, token: i64 },
    #[error("the inputs have more than {limit} tokens together; split them over several requests")]
    TooManyTokens { limit: usize },
}


/// A running engine. Dropping it cancels what is still running and stops the thread.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the engine and its reservations share: enough to admit and submit a request.
struct Shared {
    tx: Sender<Msg>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    next_id: AtomicUsize,
    model: Arc<Model>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    /// Tokens each slot may hold.
    slot_ctx: u32,
    /// Set by `shutdown`: new requests are refused.
    stopped: AtomicBool,
    /// How embedding requests are pooled, or why they cannot be.
    embed: embed::EmbedSetup,
}



impl Engine {
    /// Creates the context and starts the engine thread.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<Engine, StartError> {
        Engine::start_with_metrics(model, config, Arc::new(Metrics::default()))
    }

    /// Like [`Engine::start`], recording into `metrics` (a model's metrics outlive its
    /// engine: a server that unloads and reloads it keeps counting).
    pub fn start_with_metrics(model: Arc<Model>, config: EngineConfig, metrics: Arc<Metrics>) -> Result<Engine, StartError> {
        config.validate()?;
        let slots = config.slots;
        // Batch-invariant mode keeps one more sequence for its padding token.
        let n_seq = slots + config.batch_invariant as u32;
        let params = ContextParams {
            size: config.size,
            n_seq_max: n_seq,
            // One micro-batch per step whichever slots are active (with split buffers
            // llama.cpp splits a batch by runs of consecutive sequence ids). The engine
            // keeps each slot within `n_ctx / slots`.
            kv_unified: true,
            cache: config.cache,
        };
        let ctx = model.new_context(&params)?;
        let drafter = match &config.draft {
            Some(d) => Some(llama_host::spec::Drafter::new(&model, &d.0, &params).map_err(StartError::Draft)?),
            None => None,
        };
        let slot_ctx = ctx.n_ctx() / n_seq;
        metrics.kv_capacity.store(i64::from(slot_ctx) * i64::from(slots), Ordering::Relaxed);
        // Both bounded by `validate`, so this cannot overflow.
        let limit = slots as usize + config.queue;
        let (tx, rx) = bounded(limit);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let t = config.size.n_threads;
        let embed_params = llama_host::EmbedParams { n_ctx: config.size.n_ubatch.min(llama_host::embed::max_embed_tokens(model.info().n_vocab)), n_threads: t, n_threads_batch: config.size.n_threads_batch, n_seq_max: config.embed_seqs, pooling: None, flash_attn: llama_host::FlashAttn::Off, may_skip_output: false };
        let embed = embed::EmbedSetup::new(&model, config.pooling, embed_params);
        let embeds = embed::EmbedQueue::new(model.clone(), embed.clone(), metrics.clone(), in_flight.clone());
        let worker = Worker::new(model.clone(), ctx, drafter, &config, rx, in_flight.clone(), metrics.clone(), slot_ctx, embeds);
        let thread = std::thread::Builder::new().name("llama-engine".into()).spawn(move || worker.run()).map_err(StartError::Thread)?;
        let shared = Shared { tx, in_flight, limit, next_id: AtomicUsize::new(1), model, config, metrics, slot_ctx, stopped: AtomicBool::new(false), embed };
        Ok(Engine { shared: Arc::new(shared), thread: Some(thread) })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// Tokens one request may hold (prompt + generated).
    pub fn slot_context(&self) -> u32 {
        self.shared.slot_ctx
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// KV usage as llama.cpp reports it, checked against the engine's own accounting.
    pub fn kv_usage(&self) -> Option<KvUsage> {
        let (tx, rx) = bounded(1);
        self.shared.tx.send(Msg::Inspect(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(30)).ok()
    }

    /// Admits a request, or refuses it at once. Tokenizes on the calling thread: an async
    /// caller runs this off its runtime's workers (see [`Engine::reserve`]).
    pub fn submit(&self, req: Request) -> Result<Handle, SubmitError> {
        self.reserve()?.submit(req)
    }

    /// Admission first: takes one of the `slots + queue` places, or refuses at once with
    /// `Overloaded`, before any work is spent on the request. The place is the
    /// [`Reservation`]'s until it is submitted (then the request's) or dropped.
    pub fn reserve(&self) -> Result<Reservation, SubmitError> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        // A counter, so the answer is immediate and exact.
        let admitted = self.shared.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.shared.limit).then_some(n + 1));
        if let Err(n) = admitted {
            self.shared.metrics.count(Outcome::Rejected);
            return Err(SubmitError::Overloaded { waiting: n, limit: self.shared.limit });
        }
        Ok(Reservation { engine: self.shared.clone(), armed: true })
    }

    /// The longest prompt accepted, in bytes: `max_prompt_bytes`, else 16 bytes per token a
    /// slot holds (at least 64 KiB). Checked before tokenizing, whose cost grows with the
    /// text (special-token text especially), not with the tokens it makes.
    pub fn max_prompt_bytes(&self) -> usize {
        self.shared.max_prompt_bytes()
    }

    /// Why this engine cannot answer embedding requests, if it cannot (its pooling).
    pub fn embed_refusal(&self) -> Option<&str> {
        self.shared.embed.pooling.as_ref().err().map(String::as_str)
    }

    /// Whether the engine takes requests: not shut down, and its thread alive (a thread
    /// that died would otherwise leave /health saying ok while every request fails).
    pub fn is_running(&self) -> bool {
        !self.shared.stopped.load(Ordering::SeqCst) && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the engine: cancels every queued, running and paused request (each gets its
    /// `Done`, `Cancelled`), refuses new ones, and ends the thread. Also done on drop.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let _ = self.shared.tx.send(Msg::Shutdown);
    }
}

impl Shared {
    fn max_prompt_bytes(&self) -> usize {
        self.config.max_prompt_bytes.unwrap_or_else(|| (self.slot_ctx as usize).saturating_mul(16).max(64 << 10))
    }
}

/// An admitted place for one request (see [`Engine::reserve`]); dropping it unsubmitted
/// gives the place back. Owned, so it can move to a blocking thread.
pub struct Reservation {
    engine: Arc<Shared>,
    armed: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.engine.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Reservation {
    /// Checks and tokenizes the request and hands it to the engine thread. Blocking (it
    /// tokenizes): keep it off async workers.
    pub fn submit(mut self, req: Request) -> Result<Handle, SubmitError> {
        let e = self.engine.clone();
        let limit = e.max_prompt_bytes();
        if req.prompt.len() > limit {
            return Err(SubmitError::PromptTooLarge { bytes: req.prompt.len(), limit });
        }
        req.opts.sampling.validate().map_err(|err| SubmitError::InvalidParam { field: err.field.into(), reason: err.reason })?;
        if let Some(spec) = &req.opts.spec {
            spec.validate().map_err(|err| match err {
                llama_host::GenerateError::InvalidParam { field, reason } => SubmitError::InvalidParam { field, reason },
                other => SubmitError::InvalidParam { field: "speculative".into(), reason: other.to_string() },
            })?;
            if spec.mode == llama_host::spec::SpecMode::Draft && e.config.draft.is_none() {
                return Err(SubmitError::InvalidParam { field: "speculative.mode".into(), reason: "draft speculation needs a draft model, and this model is served without one (--draft-model)".into() });
            }
        }
        let tokens = e.model.tokenize(&req.prompt, req.opts.add_special).map_err(|err| SubmitError::InvalidParam { field: "prompt".into(), reason: err.to_string() })?;
        if tokens.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let limit = (e.slot_ctx as usize).min(e.config.max_prompt_tokens.map_or(usize::MAX, |m| m as usize));
        // A prompt must leave room for at least one generated token.
        if tokens.len() >= limit {
            return Err(SubmitError::PromptTooLong { tokens: tokens.len(), limit: limit.saturating_sub(1) });
        }
        let mut opts = req.opts;
        if let Some(cap) = e.config.max_new_tokens {
            opts.max_tokens = Some(opts.max_tokens.map_or(cap, |m| m.min(cap)));
        }
        let id = e.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (tx, rx) = flume::bounded(e.config.stream_capacity);
        let cancel = Arc::new(AtomicBool::new(false));
        let span = tracing::info_span!("request", id, prompt_tokens = tokens.len());
        span.in_scope(|| tracing::debug!("admitted"));
        let prompt_tokens = tokens.len();
        let job = Job { span, id, tokens, opts, deadline: req.deadline, submitted: Instant::now(), tx, cancel: cancel.clone() };
        e.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if e.tx.send(Msg::Job(Box::new(job))).is_err() {
            e.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        // The engine thread owns the place now and gives it back when the request ends.
        self.armed = false;
        Ok(Handle { id, prompt_tokens, rx, cancel: CancelOnDrop(cancel) })
    }
}

impl Reservation {
    /// Checks and tokenizes an embedding request and queues it. Blocking (it tokenizes):
    /// keep it off async workers. Every input error names the input's index.
    pub fn submit_embed(mut self, req: EmbedRequest) -> Result<EmbedHandle, SubmitError> {
        let e = self.engine.clone();
        let inputs = embed::prepare(&e.model, &e.embed, e.max_prompt_bytes(), &req)?;
        let id = e.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        let span = tracing::info_span!("embedding", id, inputs = inputs.len(), tokens);
        span.in_scope(|| tracing::debug!("admitted"));
        let (tx, rx) = flume::bounded(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = embed::EmbedJob {
            span,
            inputs,
            normalize: req.normalize,
            deadline: req.deadline,
            submitted: Instant::now(),
            tx,
            cancel: cancel.clone(),
            results: Vec::new(),
            started: None,
        };
        e.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if e.tx.send(Msg::Embed(Box::new(job))).is_err() {
            e.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        // The engine thread owns the place now and gives it back when the request ends.
        self.armed = false;
        Ok(EmbedHandle { rx, _cancel: CancelOnDrop(cancel) })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}


#[cfg(test)]
mod tests;
