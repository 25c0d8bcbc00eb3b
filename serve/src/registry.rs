//! The models a server knows (its catalogue) and which of them are loaded: load on demand,
//! one load per model however many requests ask for it, eviction of idle models (least
//! recently used first) when `models_max` or memory says so, unloading after idle time, and
//! leases that keep a model loaded while requests use it.
//!
//! What loading means (which backend, which settings, building the engine) is the
//! [`Loader`]'s business: the registry only decides when, and keeps count.
//!
//! Threads: requests wait asynchronously (`acquire`); each load runs on its own thread,
//! one load at a time (loads are disk- and CPU-bound; two at once only slow each other and
//! make the memory check racy); one reaper thread unloads idle models. Unloading (stopping
//! an engine, freeing a model) never runs on an async worker.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::http::Ready;
use crate::metrics::{Histogram, Metrics};

/// What the catalogue says of a model without loading it (from its GGUF header).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelFacts {
    pub size_bytes: Option<u64>,
    pub arch: Option<String>,
    pub quantization: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// The context the model was trained for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// The file's modification time, in seconds since 1970.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified: Option<u64>,
    /// The file's chat template (Ollama's `/api/show` returns it); not in /v1/models.
    #[serde(skip)]
    pub chat_template: Option<String>,
    /// The file names a pooling type: an embedding model.
    #[serde(skip)]
    pub embedding_model: bool,
}

/// One model the server may load.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// What clients put in `model`.
    pub name: String,
    pub facts: ModelFacts,
    /// Requests that may wait for this model's load: its engine's admission bound
    /// (`parallel + queue`), so waiting for a load counts like waiting for a slot.
    pub admission: usize,
    /// Its own keep-alive (a request's `keep_alive` replaces it); `None`: `idle_unload`.
    pub keep_alive: Option<KeepAlive>,
}

/// Memory a load will hold: host memory (CPU layers, embeddings, KV cache of CPU layers,
/// compute buffers) and GPU memory (offloaded layers and their KV cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryNeed {
    pub host_bytes: u64,
    pub device_bytes: u64,
}

impl MemoryNeed {
    fn total(&self) -> u64 {
        self.host_bytes.saturating_add(self.device_bytes)
    }
}

/// A load that failed: what clients may be told (never a path), and the full error for
/// the log and for the caller that preloads (the CLI prints it and picks its exit code).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{public}")]
pub struct LoadFailure {
    pub public: String,
    pub source: Arc<dyn std::error::Error + Send + Sync>,
    /// A device the model needs cannot be reached (an RPC server): a condition that may
    /// pass, answered 503, rather than a model that cannot load.
    pub unavailable: bool,
}

/// Loads models for the registry. Blocking; called on the registry's load thread.
pub trait Loader: Send + Sync + 'static {
    /// What loading `name` would hold. Reads (and validates) the file's header, so a file
    /// that is not a model fails here, before anything is evicted for it.
    fn estimate(&self, name: &str) -> Result<MemoryNeed, LoadFailure>;
    /// Loads `name` and starts its engine, which records into `metrics` (kept across loads,
    /// so counters do not reset when a model is reloaded).
    fn load(&self, name: &str, metrics: Arc<Metrics>) -> Result<Ready, LoadFailure>;
    /// Free memory of the backend's devices, for loads that offload layers.
    fn device_free(&self) -> Option<u64> {
        None
    }
}

/// How many models stay loaded and when they go.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Most models loaded at once (at least 1).
    pub models_max: usize,
    /// Unload a model idle this long; `None`: never (unless evicted).
    pub idle_unload: Option<Duration>,
    /// Host memory left free whatever is loaded.
    pub memory_reserve: u64,
    /// Most memory the loaded models may hold together (their estimates).
    pub memory_budget: Option<u64>,
    /// How long a load waits for a busy model to become idle so it can be evicted.
    pub load_wait: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { models_max: 4, idle_unload: None, memory_reserve: 1 << 30, memory_budget: None, load_wait: Duration::from_secs(30) }
    }
}

/// How long a model stays loaded once idle (Ollama's `keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Never,
    After(Duration),
}

/// Why a request got no model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("the model '{0}' does not exist")]
    UnknownModel(String),
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    /// A device the model lives on (an RPC server) is unreachable or was lost.
    #[error("a device of the model is unavailable: {0}")]
    DeviceUnavailable(String),
    #[error("not enough memory for the model: it needs {needed} bytes, {available} are available{}", budget.map(|b| format!(" (budget {b})")).unwrap_or_default())]
    InsufficientMemory { needed: u64, available: u64, budget: Option<u64> },
    #[error("no room to load the model: every loaded model is busy; retry later")]
    NoRoom,
    #[error("too many requests are waiting for this model; retry later")]
    Busy,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why a model was unloaded (the `reason` label and the log's word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnloadReason {
    Lru,
    Idle,
    Memory,
    Admin,
    KeepAlive,
    /// A remote device it lived on went away.
    DeviceLost,
}

impl UnloadReason {
    const ALL: [UnloadReason; 6] =
        [UnloadReason::Lru, UnloadReason::Idle, UnloadReason::Memory, UnloadReason::Admin, UnloadReason::KeepAlive, UnloadReason::DeviceLost];
    pub fn as_str(self) -> &'static str {
        match self {
            UnloadReason::Lru => "lru",
            UnloadReason::Idle => "idle",
            UnloadReason::Memory => "memory",
            UnloadReason::Admin => "admin",
            UnloadReason::KeepAlive => "keep_alive",
            UnloadReason::DeviceLost => "device_lost",
        }
    }
}

/// Load outcomes, the `outcome` label.
const LOAD_OUTCOMES: [&str; 3] = ["ok", "failed", "insufficient_memory"];

enum Status {
    Unloaded,
    Loading,
    Loaded(Arc<Ready>),
}

/// One catalogue entry and its state.
struct Slot {
    status: Status,
    /// Requests using the loaded model now.
    leases: usize,
    /// Requests waiting for its load.
    waiting: usize,
    last_used: Instant,
    /// Set by a request's `keep_alive` (or an admin unload): overrides `idle_unload`.
    keep_alive: Option<KeepAlive>,
    /// Unload as soon as idle (admin unload of a busy model).
    unload_when_idle: Option<UnloadReason>,
    /// What the loaded (or loading) model holds, by its estimate.
    held: MemoryNeed,
    /// Counts load attempts, so a waiter knows whether a failure is the one it waited for.
    attempt: u64,
    failure: Option<(u64, AcquireError)>,
    /// The last load failure's public reason, for the listing (`failed`).
    failed_reason: Option<String>,
    metrics: Arc<Metrics>,
    loads: [u64; 3],
    unloads: [u64; 6],
    load_seconds: Histogram,
}

impl Slot {
    /// No request uses the model and none is about to: a request that waited for its load
    /// takes its lease when it next wakes, and unloading the model under it then would only
    /// start the load again (a keep-alive of 0 did exactly that).
    fn idle(&self) -> bool {
        self.leases == 0 && self.waiting == 0
    }

    /// How long the model stays loaded once idle, and the reason its unload will carry: an
    /// admin unload of a busy model at once, else its keep-alive, else `idle_unload`.
    fn keep(&self, idle_unload: Option<Duration>) -> (KeepAlive, UnloadReason) {
        match (self.unload_when_idle, self.keep_alive) {
            (Some(reason), _) => (KeepAlive::After(Duration::ZERO), reason),
            (None, Some(k)) => (k, UnloadReason::KeepAlive),
            (None, None) => (idle_unload.map_or(KeepAlive::Never, KeepAlive::After), UnloadReason::Idle),
        }
    }
}

struct Inner {
    slots: Vec<Slot>,
    shutting_down: bool,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The catalogue and its loaded models. Shared (`Arc`) by the HTTP handlers, the load
/// threads and the reaper.
pub struct Registry {
    specs: Vec<ModelSpec>,
    names: HashMap<String, usize>,
    default: Option<usize>,
    inner: Mutex<Inner>,
    /// Every state change (a load ends, a lease ends, a model unloads): load threads
    /// waiting for room and the reaper wait on this...
    changed: Condvar,
    /// ... and async requests on this.
    notify: tokio::sync::Notify,
    loader: Box<dyn Loader>,
    config: RegistryConfig,
    /// One load at a time.
    load_gate: Mutex<()>,
}

/// A request's hold on a loaded model: while any lease is alive the model is not
/// unloaded. Dropping it records the model's last use.
pub struct Lease {
    registry: Arc<Registry>,
    index: usize,
    pub ready: Arc<Ready>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.registry.lock();
        let s = &mut g.slots[self.index];
        s.leases -= 1;
        s.last_used = Instant::now();
        drop(g);
        self.registry.changed();
    }
}

impl Lease {
    pub fn name(&self) -> &str {
        &self.registry.specs[self.index].name
    }
}

/// The loaded models' slots and queues, summed (`Registry::capacity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub models_loaded: usize,
    pub slots_total: usize,
    pub slots_idle: usize,
    pub queue_depth: usize,
}

/// One model as `GET /v1/models` and `llama ps` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// The model's name (OpenAI's `id`).
    #[serde(rename = "id")]
    pub name: String,
    /// `loaded`, `loading`, `unloaded` or `failed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub facts: ModelFacts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_busy: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_total: Option<u32>,
    /// Seconds since the last request ended; `None` while loaded and busy.
    #[serde(skip_serializing_if = "not_loaded")]
    pub idle_seconds: Option<Option<f64>>,
    /// Seconds until an idle unload; `None` when it will not be unloaded for idleness.
    #[serde(skip_serializing_if = "not_loaded")]
    pub unload_in_seconds: Option<Option<f64>>,
}

fn not_loaded(v: &Option<Option<f64>>) -> bool {
    v.is_none()
}

impl Registry {
    /// A registry over `specs` (names must be unique: later duplicates are dropped with a
    /// warning). `default` is the model a request without `model` gets. Starts the reaper.
    pub fn new(specs: Vec<ModelSpec>, default: Option<&str>, loader: Box<dyn Loader>, mut config: RegistryConfig) -> Arc<Registry> {
        config.models_max = config.models_max.max(1);
        limit_heap_arenas();
        let mut names = HashMap::new();
        let (mut slots, mut kept) = (Vec::new(), Vec::new());
        for spec in specs {
            if names.contains_key(&spec.name) {
                tracing::warn!(model = %spec.name, "a second model with this name is ignored");
                continue;
            }
            names.insert(spec.name.clone(), slots.len());
            let keep_alive = spec.keep_alive;
            kept.push(spec);
            slots.push(Slot {
                status: Status::Unloaded,
                leases: 0,
                waiting: 0,
                last_used: Instant::now(),
                keep_alive,
                unload_when_idle: None,
                held: MemoryNeed::default(),
                attempt: 0,
                failure: None,
                failed_reason: None,
                metrics: Arc::new(Metrics::default()),
                loads: [0; 3],
                unloads: [0; 6],
                load_seconds: Histogram::new(crate::metrics::LOAD_BOUNDS),
            });
        }
        let default = default.and_then(|d| names.get(d).copied()).or(if slots.is_empty() { None } else { Some(0) });
        let registry = Arc::new(Registry {
            specs: kept,
            names,
            default,
            inner: Mutex::new(Inner { slots, shutting_down: false, threads: Vec::new() }),
            changed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            loader,
            config,
            load_gate: Mutex::new(()),
        });
        let reaper = registry.clone();
        match std::thread::Builder::new().name("llama-reaper".into()).spawn(move || reaper.reap()) {
            Ok(t) => registry.lock().threads.push(t),
            Err(e) => tracing::error!("cannot start the idle-unload thread ({e}): models are only unloaded by eviction"),
        }
        registry
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counts that are still consistent enough to
        // serve (every update is a single assignment): go on rather than poison every request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// The name a request without `model` gets.
    pub fn default_name(&self) -> Option<String> {
        self.default.map(|i| self.specs[i].name.clone())
    }

    fn index(&self, name: Option<&str>) -> Result<usize, AcquireError> {
        match name {
            Some(n) => self.names.get(n).copied().ok_or_else(|| AcquireError::UnknownModel(n.to_string())),
            None => self.default.ok_or_else(|| AcquireError::UnknownModel(String::new())),
        }
    }

    /// Whether `name` is in the catalogue.
    pub fn knows(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The loaded model `name` (the default model for `None`), loading it first if needed.
    /// Waits for a load already under way rather than starting a second one.
    /// An empty name is no name (clients send `"model": ""` for "the default").
    pub async fn acquire(self: &Arc<Self>, name: Option<&str>, keep_alive: Option<KeepAlive>) -> Result<Lease, AcquireError> {
        let index = self.index(name.filter(|n| !n.is_empty()))?;
        let mut waiting: Option<Waiting> = None;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the state is read, so a change in between is not missed.
            notified.as_mut().enable();
            match self.poll_acquire(index, keep_alive, &mut waiting)? {
                Some(lease) => return Ok(lease),
                None => notified.await,
            }
        }
    }

    /// Like [`Registry::acquire`], blocking (a thread that preloads).
    pub fn acquire_blocking(self: &Arc<Self>, name: Option<&str>) -> Result<Lease, AcquireError> {
        let index = self.index(name)?;
        let mut waiting: Option<Waiting> = None;
        loop {
            if let Some(lease) = self.poll_acquire(index, None, &mut waiting)? {
                return Ok(lease);
            }
            let g = self.lock();
            if matches!(g.slots[index].status, Status::Loading) {
                // Timed, since the condvar is also what async changes notify.
                let _ = self.changed.wait_timeout(g, Duration::from_millis(200));
            }
        }
    }

    /// One look at the model: a lease when loaded, a load started (or joined) otherwise, or
    /// the failure of the load this request waited for.
    fn poll_acquire(self: &Arc<Self>, index: usize, keep_alive: Option<KeepAlive>, waiting: &mut Option<Waiting>) -> Result<Option<Lease>, AcquireError> {
        let mut g = self.lock();
        if g.shutting_down {
            return Err(AcquireError::ShuttingDown);
        }
        // A model that lost a remote device cannot compute: unloaded now when nothing uses
        // it (and loaded again below, for this request), else refused (503) until its
        // running requests, which fail at their next step, have ended.
        if let Status::Loaded(ready) = &g.slots[index].status {
            if let Some(e) = ready.engine.model().lost() {
                if g.slots[index].idle() {
                    tracing::warn!(model = %self.specs[index].name, error = %e, "the model lost a remote device; loading it again");
                    // Freed on a thread of its own (this may be an async worker, and freeing
                    // a model blocks); the load below waits for the servers it frees.
                    let old = self.take_loaded(&mut g, index, UnloadReason::DeviceLost);
                    let _ = std::thread::Builder::new().name("llama-release".into()).spawn(move || release(old));
                } else {
                    g.slots[index].unload_when_idle = Some(UnloadReason::DeviceLost);
                    tracing::warn!(model = %self.specs[index].name, error = %e, "the model lost a remote device; it loads again once its running requests have ended");
                    // The server's address stays in the log (it is the operator's network).
                    return Err(AcquireError::DeviceUnavailable("an RPC server the model is placed on was lost; the model loads again once its running requests have ended".into()));
                }
            }
        }
        let s = &mut g.slots[index];
        if keep_alive.is_some() {
            s.keep_alive = keep_alive;
        }
        match &s.status {
            Status::Loaded(ready) => {
                s.leases += 1;
                s.last_used = Instant::now();
                let ready = ready.clone();
                drop(g);
                return Ok(Some(Lease { registry: self.clone(), index, ready }));
            }
            Status::Loading => {}
            Status::Unloaded => {
                if let (Some(w), Some((attempt, e))) = (waiting.as_ref(), &s.failure) {
                    if w.attempt == *attempt {
                        return Err(e.clone());
                    }
                }
                s.attempt += 1;
                s.status = Status::Loading;
                s.failure = None;
                let attempt = s.attempt;
                let registry = self.clone();
                // Finished threads are let go (a handle dropped detaches its thread).
                g.threads.retain(|t| !t.is_finished());
                match std::thread::Builder::new().name("llama-load".into()).spawn(move || registry.load(index, attempt)) {
                    Ok(t) => g.threads.push(t),
                    Err(e) => {
                        g.slots[index].status = Status::Unloaded;
                        return Err(AcquireError::LoadFailed(format!("cannot start a load thread: {e}")));
                    }
                }
            }
        }
        let s = &mut g.slots[index];
        match waiting {
            Some(w) => w.attempt = s.attempt,
            None => {
                // Waiting for a load takes one of the model's admission places.
                if s.waiting >= self.specs[index].admission.max(1) {
                    return Err(AcquireError::Busy);
                }
                s.waiting += 1;
                *waiting = Some(Waiting { registry: self.clone(), index, attempt: s.attempt });
            }
        }
        Ok(None)
    }

    /// The load thread: make room, load, publish the outcome.
    fn load(self: Arc<Self>, index: usize, attempt: u64) {
        let _gate = self.load_gate.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.specs[index].name.clone();
        let started = Instant::now();
        let failed = |e: LoadFailure| {
            let public = e.public.clone();
            (if e.unavailable { AcquireError::DeviceUnavailable(public) } else { AcquireError::LoadFailed(public) }, Some(e))
        };
        // A panic in the loader is a failed load, never a model stuck at "loading" with its
        // requests waiting for ever.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let need = self.loader.estimate(&name).map_err(failed)?;
            self.make_room(index, need).map_err(|e| (e, None))?;
            let metrics = self.lock().slots[index].metrics.clone();
            self.loader.load(&name, metrics).map_err(failed)
        }))
        .unwrap_or_else(|_| Err(failed(LoadFailure { public: "the loader panicked".into(), source: Arc::new(std::io::Error::other("the loader panicked")), unavailable: false })));
        let seconds = started.elapsed().as_secs_f64();
        let mut g = self.lock();
        let shutting_down = g.shutting_down;
        let s = &mut g.slots[index];
        let mut dropped = None;
        match outcome {
            Ok(ready) if !shutting_down => {
                tracing::info!(model = %name, seconds, "model loaded");
                s.status = Status::Loaded(Arc::new(ready));
                s.last_used = Instant::now();
                s.failed_reason = None;
                s.loads[0] += 1;
                s.load_seconds.observe(seconds);
            }
            Ok(ready) => {
                // Stopped while loading: the model is not started, only freed.
                s.status = Status::Unloaded;
                s.held = MemoryNeed::default();
                dropped = Some(ready);
            }
            Err((e, full)) => {
                match &full {
                    Some(f) => tracing::error!(model = %name, error = %f.source, "model load failed"),
                    None => tracing::warn!(model = %name, "{e}"),
                }
                s.status = Status::Unloaded;
                s.held = MemoryNeed::default();
                let (slot, reason) = match &e {
                    AcquireError::InsufficientMemory { .. } => (2, None),
                    AcquireError::LoadFailed(r) | AcquireError::DeviceUnavailable(r) => (1, Some(r.clone())),
                    _ => (1, None),
                };
                s.loads[slot] += 1;
                if reason.is_some() {
                    s.failed_reason = reason;
                }
                s.failure = Some((attempt, e));
            }
        }
        drop(g);
        self.changed();
        if let Some(ready) = dropped {
            ready.engine.shutdown();
            drop(ready);
        }
    }

    /// Evicts idle models (least recently used first) until `need` fits `models_max`, the
    /// budget and the memory available, waiting up to `load_wait` for a busy model to go
    /// idle. On success the slot holds `need`.
    fn make_room(&self, index: usize, need: MemoryNeed) -> Result<(), AcquireError> {
        let deadline = Instant::now() + self.config.load_wait;
        let reserve = self.config.memory_reserve;
        let mut g = self.lock();
        loop {
            if g.shutting_down {
                return Err(AcquireError::ShuttingDown);
            }
            // Loaded models only: a model whose load waits behind this one holds nothing yet.
            let others: Vec<usize> = (0..g.slots.len()).filter(|&i| i != index && matches!(g.slots[i].status, Status::Loaded(_))).collect();
            let held: u64 = others.iter().map(|&i| g.slots[i].held.total()).sum();
            let held_host: u64 = others.iter().map(|&i| g.slots[i].held.host_bytes).sum();
            let held_device: u64 = others.iter().map(|&i| g.slots[i].held.device_bytes).sum();
            let host_free = mem_available().map(|a| a.saturating_sub(reserve));
            let device_free = if need.device_bytes > 0 { self.loader.device_free().map(|a| a.saturating_sub(reserve)) } else { None };
            // What could never fit, even with every other model gone.
            let budget_short = self.config.memory_budget.is_some_and(|b| need.total() > b);
            let host_short = host_free.is_some_and(|f| need.host_bytes > f.saturating_add(held_host));
            let device_short = device_free.is_some_and(|f| need.device_bytes > f.saturating_add(held_device));
            if budget_short || host_short || device_short {
                let available = if budget_short {
                    self.config.memory_budget.unwrap_or(0)
                } else if host_short {
                    host_free.unwrap_or(0).saturating_add(held_host)
                } else {
                    device_free.unwrap_or(0).saturating_add(held_device)
                };
                return Err(AcquireError::InsufficientMemory { needed: need.total(), available, budget: self.config.memory_budget });
            }
            let over_count = others.len() >= self.config.models_max;
            let over_memory = self.config.memory_budget.is_some_and(|b| held.saturating_add(need.total()) > b)
                || host_free.is_some_and(|f| need.host_bytes > f)
                || device_free.is_some_and(|f| need.device_bytes > f);
            if !over_count && !over_memory {
                g.slots[index].held = need;
                return Ok(());
            }
            let reason = if over_count { UnloadReason::Lru } else { UnloadReason::Memory };
            let victim = others
                .iter()
                .copied()
                .filter(|&i| g.slots[i].idle())
                .min_by_key(|&i| g.slots[i].last_used);
            if let Some(v) = victim {
                let ready = self.take_loaded(&mut g, v, reason);
                drop(g);
                release(ready);
                g = self.lock();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AcquireError::NoRoom);
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Marks slot `i` unloaded and counts why; the caller drops the returned model outside
    /// the lock (see [`release`]).
    fn take_loaded(&self, g: &mut Inner, i: usize, reason: UnloadReason) -> Option<Arc<Ready>> {
        let s = &mut g.slots[i];
        let Status::Loaded(ready) = std::mem::replace(&mut s.status, Status::Unloaded) else { return None };
        s.held = MemoryNeed::default();
        s.unload_when_idle = None;
        s.unloads[UnloadReason::ALL.iter().position(|r| *r == reason).unwrap_or(0)] += 1;
        tracing::info!(model = %self.specs[i].name, reason = reason.as_str(), "model unloaded");
        Some(ready)
    }

    /// Unloads `name` now when idle, or as soon as its requests end. `Ok(true)`: unloaded
    /// now (or was not loaded).
    pub fn unload(&self, name: &str) -> Result<bool, AcquireError> {
        let i = self.index(Some(name))?;
        let mut g = self.lock();
        let s = &mut g.slots[i];
        match s.status {
            Status::Loaded(_) if s.idle() => {
                let ready = self.take_loaded(&mut g, i, UnloadReason::Admin);
                drop(g);
                release(ready);
                self.changed();
                Ok(true)
            }
            Status::Loaded(_) | Status::Loading => {
                s.unload_when_idle = Some(UnloadReason::Admin);
                drop(g);
                self.changed();
                Ok(false)
            }
            Status::Unloaded => Ok(true),
        }
    }

    /// The reaper: unloads models idle past their keep-alive, until shutdown.
    fn reap(self: Arc<Self>) {
        let mut g = self.lock();
        loop {
            if g.shutting_down {
                return;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            for (i, s) in g.slots.iter().enumerate() {
                if !s.idle() || !matches!(s.status, Status::Loaded(_)) {
                    continue;
                }
                if let (KeepAlive::After(d), reason) = s.keep(self.config.idle_unload) {
                    if now.duration_since(s.last_used) >= d {
                        due.push((i, reason));
                    }
                }
            }
            if !due.is_empty() {
                let taken: Vec<_> = due.into_iter().map(|(i, r)| self.take_loaded(&mut g, i, r)).collect();
                drop(g);
                for ready in taken {
                    release(ready);
                }
                self.changed();
                g = self.lock();
                continue;
            }
            g = self.changed.wait_timeout(g, Duration::from_millis(250)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The loaded models' slots and queues, summed: what a slot-aware balancer needs.
    pub fn capacity(&self) -> Capacity {
        let g = self.lock();
        let mut c = Capacity::default();
        for s in &g.slots {
            if let Status::Loaded(r) = &s.status {
                let (total, busy) = slots(r);
                c.models_loaded += 1;
                c.slots_total += total;
                c.slots_idle += total - busy;
                c.queue_depth += s.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed).max(0) as usize;
            }
        }
        c
    }

    /// Every model and its state.
    pub fn list(&self) -> Vec<ModelStatus> {
        let g = self.lock();
        let now = Instant::now();
        g.slots
            .iter()
            .zip(&self.specs)
            .map(|(s, spec)| {
                let mut m = ModelStatus {
                    name: spec.name.clone(),
                    status: "unloaded",
                    reason: None,
                    facts: spec.facts.clone(),
                    memory_bytes: None,
                    ctx_size: None,
                    slots_busy: None,
                    slots_total: None,
                    idle_seconds: None,
                    unload_in_seconds: None,
                };
                match &s.status {
                    Status::Loaded(r) => {
                        m.status = "loaded";
                        m.memory_bytes = Some(s.held.total());
                        m.ctx_size = Some(r.engine.config().size.n_ctx);
                        m.slots_busy = Some(slots(r).1);
                        m.slots_total = Some(r.engine.config().slots);
                        let idle = s.idle().then(|| now.duration_since(s.last_used));
                        m.idle_seconds = Some(idle.map(|d| d.as_secs_f64()));
                        m.unload_in_seconds = Some(match (s.keep(self.config.idle_unload).0, idle) {
                            (KeepAlive::After(d), Some(idle)) => Some(d.saturating_sub(idle).as_secs_f64()),
                            _ => None,
                        });
                    }
                    Status::Loading => {
                        m.status = "loading";
                        m.memory_bytes = Some(s.held.total());
                    }
                    Status::Unloaded => {
                        if let Some(r) = &s.failed_reason {
                            m.status = "failed";
                            m.reason = Some(r.clone());
                        }
                    }
                }
                m
            })
            .collect()
    }

    /// Whether every loaded model's engine is running (a dead engine thread makes /health fail).
    pub fn engines_running(&self) -> bool {
        self.lock().slots.iter().all(|s| match &s.status {
            Status::Loaded(r) => r.engine.is_running(),
            _ => true,
        })
    }

    /// Every metric, in Prometheus' text format: the engines' own with a `model` label, and
    /// the registry's.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let g = self.lock();
        let models: Vec<(&str, &Metrics)> = g.slots.iter().zip(&self.specs).map(|(s, p)| (p.name.as_str(), &*s.metrics)).collect();
        let mut out = Metrics::render_models(&models);
        // Free and total slots per model (0 while not loaded), next to llama_queue_depth: a
        // slot-aware balancer sends the next request where a slot is free.
        let _ = writeln!(out, "# HELP llama_slots_total Slots (requests decoded at once) of the loaded model.\n# TYPE llama_slots_total gauge");
        for (s, p) in g.slots.iter().zip(&self.specs) {
            let total = if let Status::Loaded(r) = &s.status { slots(r).0 } else { 0 };
            let _ = writeln!(out, "llama_slots_total{{model=\"{}\"}} {total}", crate::metrics::escape(&p.name));
        }
        let _ = writeln!(out, "# HELP llama_slots_idle Slots free for a new request now.\n# TYPE llama_slots_idle gauge");
        for (s, p) in g.slots.iter().zip(&self.specs) {
            let idle = if let Status::Loaded(r) = &s.status {
                let (total, busy) = slots(r);
                total - busy
            } else {
                0
            };
            let _ = writeln!(out, "llama_slots_idle{{model=\"{}\"}} {idle}", crate::metrics::escape(&p.name));
        }
        let loaded = g.slots.iter().filter(|s| matches!(s.status, Status::Loaded(_))).count();
        let _ = writeln!(out, "# HELP llama_models_loaded Models loaded now.\n# TYPE llama_models_loaded gauge\nllama_models_loaded {loaded}");
        let _ = writeln!(out, "# HELP llama_model_loads_total Model loads by outcome.\n# TYPE llama_model_loads_total counter");
        for (s, p) in g.slots.iter().zip(&self.specs) {
            for (o, n) in LOAD_OUTCOMES.iter().zip(s.loads) {
                let _ = writeln!(out, "llama_model_loads_total{{model=\"{}\",outcome=\"{o}\"}} {n}", crate::metrics::escape(&p.name));
            }
        }
        let _ = writeln!(out, "# HELP llama_model_unloads_total Model unloads by reason.\n# TYPE llama_model_unloads_total counter");
        for (s, p) in g.slots.iter().zip(&self.specs) {
            for (r, n) in UnloadReason::ALL.iter().zip(s.unloads) {
                let _ = writeln!(out, "llama_model_unloads_total{{model=\"{}\",reason=\"{}\"}} {n}", crate::metrics::escape(&p.name), r.as_str());
            }
        }
        let hists: Vec<(&str, &Histogram)> = g.slots.iter().zip(&self.specs).map(|(s, p)| (p.name.as_str(), &s.load_seconds)).collect();
        Histogram::render_models(&mut out, "llama_model_load_seconds", "Time a model load took.", &hists);
        out
    }

    /// Stops every engine (their requests end, cancelled), refuses new requests and loads,
    /// and waits for a load under way to finish (llama.cpp's load cannot be interrupted,
    /// and exiting under it would tear its memory down mid-use). Blocking.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.shutting_down = true;
        let loaded: Vec<Arc<Ready>> =
            g.slots.iter_mut().filter_map(|s| if let Status::Loaded(r) = &s.status { Some(r.clone()) } else { None }).collect();
        let threads = std::mem::take(&mut g.threads);
        drop(g);
        self.changed();
        for r in &loaded {
            r.engine.shutdown();
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A request's place among those waiting for a load; given back when it stops waiting.
struct Waiting {
    registry: Arc<Registry>,
    index: usize,
    attempt: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.registry.lock().slots[self.index].waiting -= 1;
    }
}

/// Drops an unloaded model: stops its engine (joining its thread) and frees the model once
/// no request holds it, then gives freed heap back to the system, so an unloaded model
/// costs no resident memory.
/// A loaded model's slots: how many, and how many hold a request now (in flight counts
/// queued requests too, so it is capped at the slot count).
fn slots(r: &Ready) -> (usize, usize) {
    let total = r.engine.config().slots as usize;
    (total, r.engine.in_flight().min(total))
}

fn release(ready: Option<Arc<Ready>>) {
    let Some(ready) = ready else { return };
    ready.engine.shutdown();
    drop(ready);
    trim_heap();
}

/// At most two malloc arenas. glibc gives threads arenas of their own as they contend; a
/// model's many small allocations (its vocabulary) land in the arena of the thread that
/// loaded it, and what stays alive beside them after an unload (a few pages per arena)
/// keeps those arenas resident. With two, an unloaded model gives back all but a few MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_heap_arenas() {
    // SAFETY: mallopt only changes an allocator setting; M_ARENA_MAX takes any count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_heap_arenas() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only returns free heap pages to the system; it takes no pointers
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// `MemAvailable` from /proc/meminfo: what the kernel says can be allocated without
/// swapping. `None` where there is no such file.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests;
