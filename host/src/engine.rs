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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::std_types::RSlice;
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};
use flume::TrySendError;
use llama_plugin_api::{BatchToken, ContextBox, ContextParams, SampleRequest};

use crate::metrics::{Metrics, Outcome};
use crate::text::TextOutput;
use crate::{GenerateOptions, Model};

/// Sizes and limits of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together (parallel requests).
    pub slots: u32,
    /// Requests that may wait for a slot; more are refused with `Overloaded`.
    pub queue: usize,
    /// KV cache size in tokens, split evenly between the slots.
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    /// Longest prompt accepted (tokens); also bounded by a slot's share of the context.
    pub max_prompt_tokens: Option<u32>,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        let t = crate::default_threads();
        EngineConfig {
            slots: 4,
            queue: 16,
            n_ctx: 8192,
            n_batch: 2048,
            n_ubatch: 512,
            n_threads: t,
            n_threads_batch: t,
            max_prompt_tokens: None,
            max_new_tokens: None,
            stream_capacity: 16,
            prefix_cache: true,
            batch_invariant: false,
        }
    }
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
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error("the engine has stopped")]
    Stopped,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
    Timeout,
    Error,
}

/// Counts and timings of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestStats {
    pub id: u64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub queue_wait: Duration,
    /// From submission to the first token.
    pub time_to_first_token: Option<Duration>,
    pub total: Duration,
    pub finish: Finish,
    /// For `Finish::Error`: what went wrong.
    pub error: Option<String>,
}

/// What a request's handle yields.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    Done(RequestStats),
}

/// A submitted request: iterate it for text, then its `Done`. Dropping it cancels.
pub struct Handle {
    id: u64,
    rx: flume::Receiver<Event>,
    cancel: CancelOnDrop,
}

/// Sets a request's cancel flag when dropped: whoever holds the receiving end of a request
/// holds this too, so a consumer that goes away always cancels (a finished request ignores it).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A request's events as an async stream (see [`Handle::into_stream`]); dropping it cancels.
pub struct EventStream {
    events: flume::r#async::RecvStream<'static, Event>,
    _cancel: CancelOnDrop,
}

impl tokio_stream::Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        std::pin::Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Handle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancels the request (also from another thread, via [`Handle::canceller`]).
    pub fn cancel(&self) {
        self.cancel.0.store(true, Ordering::SeqCst);
    }

    pub fn canceller(&self) -> Arc<AtomicBool> {
        self.cancel.0.clone()
    }

    /// The events as an async stream, for a consumer on an async runtime (the HTTP server):
    /// the engine thread wakes the consumer's task directly, no thread waits in between.
    pub fn into_stream(self) -> EventStream {
        EventStream { events: self.rx.into_stream(), _cancel: self.cancel }
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event, awaited on an async runtime (the HTTP server's): no thread waits.
    /// `None` once the request has ended and its events are read.
    pub async fn recv(&self) -> Option<Event> {
        self.rx.recv_async().await.ok()
    }

    /// Reads to the end, asynchronously: all text and the final stats.
    pub async fn collect_async(self) -> (String, RequestStats) {
        let mut text = String::new();
        while let Some(ev) = self.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(s) => return (text, s),
            }
        }
        (text, self.engine_gone())
    }

    /// Reads to the end: all text and the final stats.
    pub fn collect(self) -> (String, RequestStats) {
        let mut text = String::new();
        for ev in self.rx.iter() {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(s) => return (text, s),
            }
        }
        let stats = self.engine_gone();
        (text, stats)
    }

    /// The stats of a request whose engine thread went away without a `Done`.
    fn engine_gone(&self) -> RequestStats {
        RequestStats {
            id: self.id,
            prompt_tokens: 0,
            cached_tokens: 0,
            generated_tokens: 0,
            queue_wait: Duration::ZERO,
            time_to_first_token: None,
            total: Duration::ZERO,
            finish: Finish::Error,
            error: Some("the engine stopped".into()),
        }
    }
}

impl Iterator for Handle {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.rx.recv().ok()
    }
}

struct Job {
    /// `request{id}`: every log line about this request is inside it.
    span: tracing::Span,
    id: u64,
    tokens: Vec<i32>,
    opts: GenerateOptions,
    deadline: Option<Instant>,
    submitted: Instant,
    tx: flume::Sender<Event>,
    cancel: Arc<AtomicBool>,
}

enum Msg {
    Job(Box<Job>),
    /// Report KV usage as llama.cpp sees it and as the engine accounts for it.
    Inspect(Sender<KvUsage>),
    Shutdown,
}

/// KV cache usage, read on the engine thread between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    /// Positions llama.cpp holds, summed over the sequences.
    pub backend_tokens: usize,
    /// Tokens the engine's slots account for (prefix cache + running requests).
    pub accounted_tokens: usize,
    pub active: usize,
    pub waiting: usize,
}

/// A running engine. Dropping it stops the thread after the requests in flight end.
pub struct Engine {
    tx: Sender<Msg>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    next_id: AtomicUsize,
    model: Arc<Model>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Tokens each slot may hold.
    slot_ctx: u32,
}

impl Engine {
    /// Creates the context and starts the engine thread.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<Engine, crate::SessionError> {
        let slots = config.slots.max(1);
        let params = ContextParams {
            n_ctx: config.n_ctx,
            n_batch: config.n_batch,
            n_ubatch: config.n_ubatch,
            n_threads: config.n_threads,
            n_threads_batch: config.n_threads_batch,
            // Batch-invariant mode keeps one more sequence for its padding token.
            n_seq_max: slots + config.batch_invariant as u32,
            // One micro-batch per step whichever slots are active (with split buffers
            // llama.cpp splits a batch by runs of consecutive sequence ids). The engine
            // keeps each slot within `n_ctx / slots`.
            kv_unified: true,
        };
        let ctx = model.new_context(params)?;
        let slot_ctx = ctx.n_ctx() / (slots + config.batch_invariant as u32);
        let metrics = Arc::new(Metrics::default());
        metrics.kv_capacity.store((slot_ctx * slots) as i64, Ordering::Relaxed);
        let limit = slots as usize + config.queue;
        let (tx, rx) = bounded(limit.max(1));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model: model.clone(),
            ctx,
            slots: (0..slots).map(|i| Slot::new(i as i32)).collect(),
            waiting: VecDeque::new(),
            rx,
            in_flight: in_flight.clone(),
            metrics: metrics.clone(),
            n_batch: config.n_batch.min(config.n_ctx).max(1),
            slot_ctx,
            prefix_cache: config.prefix_cache,
            draining: Vec::new(),
            pad: config.batch_invariant.then(|| (slots as i32, model.info().bos.max(0))),
        };
        let thread = std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| crate::SessionError::InvalidParam { field: "engine thread".into(), reason: e.to_string() })?;
        Ok(Engine { tx, in_flight, limit, next_id: AtomicUsize::new(1), model, config, metrics, thread: Some(thread), slot_ctx })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens one request may hold (prompt + generated).
    pub fn slot_context(&self) -> u32 {
        self.slot_ctx
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// KV usage as llama.cpp reports it, checked against the engine's own accounting.
    pub fn kv_usage(&self) -> Option<KvUsage> {
        let (tx, rx) = bounded(1);
        self.tx.send(Msg::Inspect(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(30)).ok()
    }

    /// Admits a request, or refuses it at once.
    pub fn submit(&self, req: Request) -> Result<Handle, SubmitError> {
        req.opts.sampling.validate().map_err(|e| SubmitError::InvalidParam { field: e.field.into(), reason: e.reason })?;
        let tokens = self
            .model
            .tokenize(&req.prompt, req.opts.add_special)
            .map_err(|e| SubmitError::InvalidParam { field: "prompt".into(), reason: e.to_string() })?;
        if tokens.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let limit = (self.slot_ctx as usize).min(self.config.max_prompt_tokens.map_or(usize::MAX, |m| m as usize));
        // A prompt must leave room for at least one generated token.
        if tokens.len() >= limit {
            return Err(SubmitError::PromptTooLong { tokens: tokens.len(), limit: limit.saturating_sub(1) });
        }
        let mut opts = req.opts;
        if let Some(cap) = self.config.max_new_tokens {
            opts.max_tokens = Some(opts.max_tokens.map_or(cap, |m| m.min(cap)));
        }
        // Admission: a counter, so the answer is immediate and exact.
        let admitted = self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.limit).then_some(n + 1));
        if let Err(n) = admitted {
            self.metrics.count(Outcome::Rejected);
            return Err(SubmitError::Overloaded { waiting: n, limit: self.limit });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (tx, rx) = flume::bounded(self.config.stream_capacity.max(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let span = tracing::info_span!("request", id, prompt_tokens = tokens.len());
        span.in_scope(|| tracing::debug!("admitted"));
        let job = Job { span, id, tokens, opts, deadline: req.deadline, submitted: Instant::now(), tx, cancel: cancel.clone() };
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Job(Box::new(job))).is_err() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(Handle { id, rx, cancel: CancelOnDrop(cancel) })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the scheduler needs to know of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Idle,
    /// Prompt tokens still to decode.
    Prefill { remaining: usize },
    /// Generating; `ready` is false while its consumer has not taken the last text.
    Generate { ready: bool },
}

/// What one slot contributes to the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Its next generated token.
    Token,
    /// This many prompt tokens.
    Prompt(usize),
}

/// Plans one batch of at most `budget` tokens: the next token of every ready generating
/// slot first (they are latency-bound and cost one token each), then prompt chunks in
/// slot order `order` (oldest request first, so no request starves).
pub fn plan_batch(slots: &[SlotState], order: &[usize], budget: usize) -> Vec<(usize, Part)> {
    let mut plan = Vec::new();
    let mut left = budget;
    for (i, s) in slots.iter().enumerate() {
        if left > 0 && matches!(s, SlotState::Generate { ready: true }) {
            plan.push((i, Part::Token));
            left -= 1;
        }
    }
    for &i in order {
        if left == 0 {
            break;
        }
        if let Some(SlotState::Prefill { remaining }) = slots.get(i) {
            let n = (*remaining).min(left);
            if n > 0 {
                plan.push((i, Part::Prompt(n)));
                left -= n;
            }
        }
    }
    plan
}

struct Active {
    job: Job,
    /// Prompt tokens decoded so far (including reused ones).
    prompt_done: usize,
    cached: usize,
    generated: usize,
    last: Option<i32>,
    /// A text piece the consumer has not taken yet (its channel was full).
    pending: Option<Event>,
    text: TextOutput,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    order: u64,
}

struct Slot {
    seq: i32,
    /// Tokens this slot's sequence holds in the KV cache.
    cached: Vec<i32>,
    active: Option<Active>,
}

impl Slot {
    fn new(seq: i32) -> Slot {
        Slot { seq, cached: Vec::new(), active: None }
    }

    fn state(&self) -> SlotState {
        match &self.active {
            None => SlotState::Idle,
            Some(a) if a.prompt_done < a.job.tokens.len() => SlotState::Prefill { remaining: a.job.tokens.len() - a.prompt_done },
            Some(a) => SlotState::Generate { ready: a.pending.is_none() },
        }
    }
}

struct Worker {
    model: Arc<Model>,
    ctx: ContextBox,
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    rx: Receiver<Msg>,
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    n_batch: u32,
    slot_ctx: u32,
    prefix_cache: bool,
    /// Final events of finished requests whose consumer has not made room yet.
    draining: Vec<(flume::Sender<Event>, VecDeque<Event>)>,
    /// Batch-invariant mode: (padding sequence, padding token).
    pad: Option<(i32, i32)>,
}

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Worker {
    fn run(mut self) {
        let mut order_counter = 0u64;
        let mut shutting_down = false;
        loop {
            // 1. Take new requests; block only when there is nothing to do.
            let busy = self.slots.iter().any(|s| s.active.is_some()) || !self.waiting.is_empty();
            if !busy && shutting_down {
                return;
            }
            if !busy && !self.draining.is_empty() {
                // Only final events wait for slow consumers: poll for them and for new work.
                if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(5)) {
                    self.handle(m, &mut shutting_down);
                }
                self.flush_draining();
                continue;
            }
            let first = if busy {
                match self.rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        shutting_down = true;
                        None
                    }
                }
            } else {
                match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            };
            let mut msgs: Vec<Msg> = first.into_iter().collect();
            while let Ok(m) = self.rx.try_recv() {
                msgs.push(m);
            }
            for m in msgs {
                self.handle(m, &mut shutting_down);
            }

            // 2. Drop what was cancelled or timed out; deliver pending text.
            self.expire();

            // 3. Give free slots to waiting requests, oldest first.
            while let Some(free) = self.pick_slot() {
                let Some(job) = self.waiting.pop_front() else { break };
                order_counter += 1;
                self.assign(free, job, order_counter);
            }

            // 4. One batched decode step.
            let states: Vec<SlotState> = self.slots.iter().map(Slot::state).collect();
            let mut order: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].active.is_some()).collect();
            order.sort_by_key(|&i| self.slots[i].active.as_ref().map_or(0, |a| a.order));
            let plan = match self.pad {
                None => plan_batch(&states, &order, self.n_batch as usize),
                Some(_) => plan_invariant(&states, &order, self.n_batch as usize - 1),
            };
            if plan.is_empty() {
                if self.slots.iter().any(|s| s.active.is_some()) {
                    // Everyone is paused on a slow consumer: wait a little, or for a new request.
                    if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(2)) {
                        self.handle(m, &mut shutting_down);
                    }
                }
                continue;
            }
            self.step(&plan);
        }
    }

    /// The KV-tokens gauge: what the slots hold (prefix caches and running requests).
    fn publish_kv(&self) {
        let kv: usize = self.slots.iter().map(|s| s.cached.len()).sum();
        self.metrics.kv_tokens.store(kv as i64, Ordering::Relaxed);
    }

    fn handle(&mut self, m: Msg, shutting_down: &mut bool) {
        match m {
            Msg::Job(job) => self.waiting.push_back(*job),
            Msg::Shutdown => *shutting_down = true,
            Msg::Inspect(reply) => {
                let backend_tokens = self.slots.iter().map(|s| (self.ctx.seq_pos_max(s.seq) + 1).max(0) as usize).sum();
                let accounted_tokens = self.slots.iter().map(|s| s.cached.len()).sum();
                let active = self.slots.iter().filter(|s| s.active.is_some()).count();
                let _ = reply.try_send(KvUsage { backend_tokens, accounted_tokens, active, waiting: self.waiting.len() });
            }
        }
    }

    /// A free slot, preferring the one whose cache shares the longest prefix with the next
    /// waiting prompt.
    fn pick_slot(&self) -> Option<usize> {
        let next = self.waiting.front()?;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .max_by_key(|(i, s)| (if self.prefix_cache { common_prefix(&s.cached, &next.tokens) } else { 0 }, usize::MAX - i))
            .map(|(i, _)| i)
    }

    fn assign(&mut self, i: usize, job: Job, order: u64) {
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active_sequences.fetch_add(1, Ordering::Relaxed);
        let wait = job.submitted.elapsed();
        self.metrics.queue_wait.observe(wait.as_secs_f64());
        self.metrics.prompt_tokens.fetch_add(job.tokens.len() as u64, Ordering::Relaxed);
        let slot = &mut self.slots[i];
        let seq = slot.seq;
        // Reuse the shared prefix (at least one prompt token is decoded, for logits).
        let mut keep = if self.prefix_cache { common_prefix(&slot.cached, &job.tokens).min(job.tokens.len() - 1) } else { 0 };
        if !(self.ctx.seq_remove(seq, keep as i32, -1) && self.ctx.seq_can_continue(seq, keep as i32)) {
            self.ctx.seq_remove(seq, 0, -1);
            keep = 0;
        }
        slot.cached.truncate(keep);
        self.metrics.cached_prompt_tokens.fetch_add(keep as u64, Ordering::Relaxed);
        let sampler = self.ctx.set_seq_sampling(seq, job.opts.sampling.clone(), RSlice::from_slice(&job.tokens)).into_result();
        job.span.in_scope(|| tracing::info!(slot = i, queue_wait_ms = wait.as_secs_f64() * 1e3, cached = keep, "prefill"));
        let text = TextOutput::new(&job.opts.stop);
        slot.active = Some(Active {
            job,
            prompt_done: keep,
            cached: keep,
            generated: 0,
            last: None,
            pending: None,
            text,
            started: Instant::now(),
            first_token: None,
            last_token: None,
            order,
        });
        if let Err(e) = sampler {
            self.finish(i, Finish::Error, Some(e.to_string()));
        }
    }

    fn flush_draining(&mut self) {
        self.draining.retain_mut(|(tx, events)| {
            while let Some(ev) = events.pop_front() {
                match tx.try_send(ev) {
                    Ok(()) => {}
                    Err(TrySendError::Full(ev)) => {
                        events.push_front(ev);
                        return true;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            false
        });
    }

    /// Finishes cancelled, timed-out and disconnected requests; flushes pending text.
    fn expire(&mut self) {
        self.flush_draining();
        let now = Instant::now();
        let metrics = self.metrics.clone();
        let in_flight = self.in_flight.clone();
        self.waiting.retain(|job| {
            let timed_out = job.deadline.is_some_and(|d| now >= d);
            if job.cancel.load(Ordering::SeqCst) || timed_out {
                let finish = if timed_out { Finish::Timeout } else { Finish::Cancelled };
                // Accounting before the Done, as in `finish`.
                metrics.count(if timed_out { Outcome::Timeout } else { Outcome::Cancelled });
                metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = job.tx.try_send(Event::Done(RequestStats {
                    id: job.id,
                    prompt_tokens: job.tokens.len(),
                    cached_tokens: 0,
                    generated_tokens: 0,
                    queue_wait: job.submitted.elapsed(),
                    time_to_first_token: None,
                    total: job.submitted.elapsed(),
                    finish,
                    error: None,
                }));
                job.span.in_scope(|| tracing::info!(?finish, "ended while queued"));
                false
            } else {
                true
            }
        });
        for i in 0..self.slots.len() {
            let Some(a) = self.slots[i].active.as_mut() else { continue };
            if let Some(ev) = a.pending.take() {
                match a.job.tx.try_send(ev) {
                    Ok(()) => {}
                    Err(TrySendError::Full(ev)) => a.pending = Some(ev),
                    Err(TrySendError::Disconnected(_)) => a.job.cancel.store(true, Ordering::SeqCst),
                }
            }
            let timed_out = a.job.deadline.is_some_and(|d| now >= d);
            if timed_out {
                self.finish(i, Finish::Timeout, None);
            } else if a.job.cancel.load(Ordering::SeqCst) {
                self.finish(i, Finish::Cancelled, None);
            }
        }
    }

    fn step(&mut self, plan: &[(usize, Part)]) {
        let mut batch = Vec::new();
        let mut samples = Vec::new();
        for &(i, part) in plan {
            let slot = &self.slots[i];
            let a = slot.active.as_ref().expect("planned slots are active");
            match part {
                Part::Token => {
                    let pos = (a.job.tokens.len() + a.generated - 1) as i32;
                    batch.push(BatchToken { token: a.last.expect("a generating slot has a token"), pos, seq: slot.seq, logits: true });
                    samples.push(SampleRequest { seq: slot.seq, index: batch.len() as i32 - 1 });
                }
                Part::Prompt(n) => {
                    let start = a.prompt_done;
                    let end = start + n;
                    for (k, &t) in a.job.tokens[start..end].iter().enumerate() {
                        let last = end == a.job.tokens.len() && start + k + 1 == end;
                        batch.push(BatchToken { token: t, pos: (start + k) as i32, seq: slot.seq, logits: last });
                    }
                    if end == a.job.tokens.len() {
                        samples.push(SampleRequest { seq: slot.seq, index: batch.len() as i32 - 1 });
                    }
                }
            }
        }
        if let Some((seq, token)) = self.pad {
            // Last in the batch, so its KV cell is the newest and is freed right after.
            batch.push(BatchToken { token, pos: 0, seq, logits: true });
        }
        let t = Instant::now();
        let result = self.ctx.step(RSlice::from_slice(&batch), RSlice::from_slice(&samples)).into_result();
        if let Some((seq, _)) = self.pad {
            self.ctx.seq_remove(seq, 0, -1);
        }
        self.metrics.busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        let sampled = match result {
            Ok(s) => s,
            Err(e) => {
                // A failed step fails the requests in it; the others carry on.
                let msg = e.to_string();
                tracing::warn!(error = %msg, "decode step failed");
                for &(i, _) in plan {
                    self.finish(i, Finish::Error, Some(msg.clone()));
                }
                return;
            }
        };
        // Account for what landed in each slot's cache.
        for &(i, part) in plan {
            let slot = &mut self.slots[i];
            let a = slot.active.as_mut().expect("planned slots are active");
            match part {
                Part::Token => slot.cached.push(a.last.expect("token")),
                Part::Prompt(n) => {
                    slot.cached.extend_from_slice(&a.job.tokens[a.prompt_done..a.prompt_done + n]);
                    a.prompt_done += n;
                }
            }
        }
        let mut k = 0;
        for &(i, _) in plan {
            let wants_sample = {
                let a = self.slots[i].active.as_ref().expect("active");
                a.prompt_done == a.job.tokens.len()
            };
            if !wants_sample {
                continue;
            }
            let s = sampled[k];
            k += 1;
            self.accept(i, s);
        }
        self.publish_kv();
    }

    /// Handles one sampled token of slot `i`.
    fn accept(&mut self, i: usize, s: llama_plugin_api::Sampled) {
        let now = Instant::now();
        let slot_ctx = self.slot_ctx as usize;
        let a = self.slots[i].active.as_mut().expect("active");
        if a.first_token.is_none() {
            a.first_token = Some(now);
            let ttft = now.duration_since(a.job.submitted).as_secs_f64();
            self.metrics.time_to_first_token.observe(ttft);
            a.job.span.in_scope(|| tracing::debug!(ttft_ms = ttft * 1e3, "decode"));
        } else if let Some(prev) = a.last_token {
            self.metrics.inter_token_latency.observe(now.duration_since(prev).as_secs_f64());
        }
        a.last_token = Some(now);
        if s.is_eog {
            let rest = a.text.flush();
            self.emit(i, rest);
            self.finish(i, Finish::Stop, None);
            return;
        }
        a.generated += 1;
        a.last = Some(s.token);
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let bytes = self.model.token_bytes(s.token, false).unwrap_or_default();
        let (text, stopped) = a.text.push(&bytes);
        if stopped {
            self.emit(i, text);
            self.finish(i, Finish::Stop, None);
            return;
        }
        let at_limit = a.job.opts.max_tokens.is_some_and(|m| a.generated >= m as usize);
        let full = a.job.tokens.len() + a.generated >= slot_ctx;
        if at_limit || full {
            let tail = a.text.flush();
            self.emit(i, text + &tail);
            self.finish(i, Finish::Length, None);
            return;
        }
        self.emit(i, text);
    }

    /// Hands text to the consumer, or parks it (pausing the sequence) if it is not reading.
    fn emit(&mut self, i: usize, text: String) {
        if text.is_empty() {
            return;
        }
        let a = self.slots[i].active.as_mut().expect("active");
        match a.job.tx.try_send(Event::Text(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) => a.pending = Some(ev),
            Err(TrySendError::Disconnected(_)) => a.job.cancel.store(true, Ordering::SeqCst),
        }
    }

    /// Ends slot `i`'s request, frees the slot, and for cancelled, timed-out or failed
    /// requests also its KV cells.
    fn finish(&mut self, i: usize, finish: Finish, error: Option<String>) {
        let slot = &mut self.slots[i];
        let Some(mut a) = slot.active.take() else { return };
        if matches!(finish, Finish::Cancelled | Finish::Timeout | Finish::Error) || !self.prefix_cache {
            self.ctx.seq_remove(slot.seq, 0, -1);
            slot.cached.clear();
        }
        let stats = RequestStats {
            id: a.job.id,
            prompt_tokens: a.job.tokens.len(),
            cached_tokens: a.cached,
            generated_tokens: a.generated,
            queue_wait: a.started.duration_since(a.job.submitted),
            time_to_first_token: a.first_token.map(|t| t.duration_since(a.job.submitted)),
            total: a.job.submitted.elapsed(),
            finish,
            error,
        };
        a.job.span.in_scope(|| {
            tracing::info!(?finish, generated = stats.generated_tokens, total_ms = stats.total.as_secs_f64() * 1e3, "finished")
        });
        // Accounting first: a consumer that has read its Done may submit again at once and
        // must find the admission slot free.
        self.metrics.count(match finish {
            Finish::Stop => Outcome::Stop,
            Finish::Length => Outcome::Length,
            Finish::Cancelled => Outcome::Cancelled,
            Finish::Timeout => Outcome::Timeout,
            Finish::Error => Outcome::Error,
        });
        self.metrics.active_sequences.fetch_sub(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.publish_kv();
        // The final text and Done go out as the consumer makes room, without holding up
        // the others; a consumer that is gone is dropped.
        let mut rest: VecDeque<Event> = a.pending.take().into_iter().collect();
        rest.push_back(Event::Done(stats));
        self.draining.push((a.job.tx.clone(), rest));
        self.flush_draining();
    }
}

/// The batch-invariant plan: a step is either the next token of every ready generating
/// slot, or one prompt (its next `budget` tokens), never both. Every token is then computed
/// by the same kernels as when its request runs alone: the padding token keeps every
/// matrix product at two or more rows, and attention never switches to its tiled path
/// for a generation token because a prompt shares its batch.
pub fn plan_invariant(slots: &[SlotState], order: &[usize], budget: usize) -> Vec<(usize, Part)> {
    let tokens: Vec<(usize, Part)> =
        slots.iter().enumerate().filter(|(_, s)| matches!(s, SlotState::Generate { ready: true })).map(|(i, _)| (i, Part::Token)).take(budget).collect();
    if !tokens.is_empty() {
        return tokens;
    }
    order
        .iter()
        .find_map(|&i| match slots.get(i) {
            Some(SlotState::Prefill { remaining }) if budget > 0 => Some(vec![(i, Part::Prompt((*remaining).min(budget)))]),
            _ => None,
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_invariant_plan_never_mixes_prompts_and_generation() {
        let slots = [SlotState::Prefill { remaining: 100 }, SlotState::Generate { ready: true }, SlotState::Generate { ready: false }];
        assert_eq!(plan_invariant(&slots, &[0], 64), vec![(1, Part::Token)]);
        let slots = [SlotState::Prefill { remaining: 100 }, SlotState::Prefill { remaining: 3 }];
        assert_eq!(plan_invariant(&slots, &[1, 0], 64), vec![(1, Part::Prompt(3))]);
        assert_eq!(plan_invariant(&slots, &[0, 1], 64), vec![(0, Part::Prompt(64))]);
    }

    #[test]
    fn generating_slots_go_first_then_prompts_oldest_first() {
        let slots = [
            SlotState::Prefill { remaining: 100 },
            SlotState::Generate { ready: true },
            SlotState::Idle,
            SlotState::Prefill { remaining: 10 },
            SlotState::Generate { ready: true },
        ];
        let plan = plan_batch(&slots, &[3, 0], 64);
        assert_eq!(plan, vec![(1, Part::Token), (4, Part::Token), (3, Part::Prompt(10)), (0, Part::Prompt(52))]);
    }

    #[test]
    fn a_paused_slot_is_left_out() {
        let slots = [SlotState::Generate { ready: false }, SlotState::Generate { ready: true }];
        assert_eq!(plan_batch(&slots, &[], 8), vec![(1, Part::Token)]);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let slots = [SlotState::Generate { ready: true }, SlotState::Generate { ready: true }, SlotState::Prefill { remaining: 5 }];
        assert_eq!(plan_batch(&slots, &[2], 1), vec![(0, Part::Token)]);
        assert_eq!(plan_batch(&slots, &[2], 4), vec![(0, Part::Token), (1, Part::Token), (2, Part::Prompt(2))]);
        assert!(plan_batch(&slots, &[2], 0).is_empty());
    }

    #[test]
    fn an_idle_engine_plans_nothing() {
        assert!(plan_batch(&[SlotState::Idle, SlotState::Idle], &[], 512).is_empty());
    }
}
