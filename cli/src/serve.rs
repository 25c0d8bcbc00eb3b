//! `llama serve`: bind first, then serve the catalogue's models (`catalogue.rs`) through a
//! registry that loads them on demand (`llama_serve::registry`), preloading the default
//! one on a thread while /health already answers, until Ctrl-C or SIGTERM.
//! Every value it reads was resolved and checked in `opts.rs` (the API key is never empty,
//! the header timeout is bounded); every model's settings are checked here before binding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_host::{ContextSize, GenerateOptions, LoadedBackend, ModelFile, ModelParams, SamplingParams};
use llama_serve::http::Ready;
use llama_serve::metrics::Metrics;
use llama_serve::registry::{KeepAlive, LoadFailure, Loader, MemoryNeed, ModelFacts, ModelSpec, Registry, RegistryConfig};

use crate::args;
use crate::catalogue::ServedModel;
use crate::error::print_error;
use crate::load::{load_with_params, prepare, select_backend};
use crate::opts::{Global, LoadOpts, ServeOpts};
use crate::CliError;

pub fn run(g: &Global, o: &ServeOpts) -> Result<(), CliError> {
    use llama_serve::http::{AppState, ServerConfig};
    let a = &o.args;
    // Every model's sizes and defaults are checked before anything binds or loads
    // (--queue 2^62, a `[models.x]` with top-p 7, say).
    let mut specs = Vec::new();
    for m in &o.catalogue.models {
        engine_config(o, m).validate()?;
        generation_defaults(o, m)?;
        cache_params(o, m).validate().map_err(|e| bad_setting(m, "cache-type-v", e.to_string()))?;
        let keep_alive = m.settings.keep_alive.map(|s| if s < 0 { KeepAlive::Never } else { KeepAlive::After(Duration::from_secs(s as u64)) });
        specs.push(ModelSpec { name: m.name.clone(), facts: facts(&m.path), admission: admission(o, m), keep_alive });
    }
    let loader = ServeLoader::new(g.clone(), o.clone());
    let registry = Registry::new(specs, o.catalogue.preload.as_deref(), Box::new(loader.clone()), registry_config(o));
    let api_key = o.api_key.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.http_threads as usize)
        .enable_all()
        .build()
        .map_err(CliError::Output)?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| CliError::InvalidArg { field: "host/port", reason: format!("cannot bind {addr}: {e}") })?;
        let bound = llama_serve::http::bound(&listener);
        let loopback = bound.is_some_and(|b| b.ip().is_loopback());
        if !loopback && api_key.is_none() {
            tracing::warn!("listening on {addr} without an API key: anyone who can reach it can use it");
        }
        let state = Arc::new(AppState::new(
            ServerConfig {
                api_key,
                max_body_bytes: a.max_body,
                header_timeout: o.header_timeout,
                body_timeout: Duration::from_secs(a.body_timeout),
                write_timeout: Duration::from_secs(a.stall_timeout),
                drain_timeout: Duration::from_secs(a.drain_timeout),
                loopback_hosts_only: loopback,
                cors_origins: a.cors_origins.clone(),
                reasoning_format: a.reasoning_format,
                webui: !a.no_webui,
                ..ServerConfig::default()
            },
            registry.clone(),
        ));
        if let Some(b) = bound {
            let names: Vec<&str> = o.catalogue.models.iter().map(|m| m.name.as_str()).collect();
            let shown = if names.len() > 8 { format!("{}, ... ({} models)", names[..8].join(", "), names.len()) } else { names.join(", ") };
            match &o.catalogue.preload {
                Some(p) => eprintln!("llama: listening on http://{b} (models: {shown}; /health answers 503 until '{p}' is loaded)"),
                None => eprintln!("llama: listening on http://{b} (models: {shown}; each is loaded on its first request)"),
            }
            if !a.no_webui {
                eprintln!("llama: chat page at http://{b}/");
            }
        }
        // Preload on a plain thread while the server already answers /health. The thread
        // returns the error that must end the server (default --on-load-error exit) and
        // signals the shutdown future, so the server stops and the error is returned.
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        let preloader = {
            let (o, state, registry, loader) = (o.clone(), state.clone(), registry.clone(), loader.clone());
            std::thread::spawn(move || -> Result<(), CliError> {
                // The backend is chosen now, not at the first request: a machine with no
                // usable backend is told at start, and what the server holds before any
                // model is loaded includes it (so an unloaded model's memory can be told).
                let selected = loader.with_backend(|_| Ok(())).map_err(|e| (public_reason(&e), e));
                let preload = o.catalogue.preload.clone();
                let outcome = selected.and_then(|()| match &preload {
                    None => Ok(()),
                    Some(name) => match registry.acquire_blocking(Some(name)) {
                        Ok(lease) => {
                            drop(lease);
                            Ok(())
                        }
                        // The loader kept the full error (with paths) for this message and
                        // the exit code; clients only ever see the public reason.
                        Err(e) => Err((e.to_string().trim_start_matches("the model failed to load: ").to_string(), loader.take_failure(name).unwrap_or(CliError::Registry(e)))),
                    },
                });
                match outcome {
                    Ok(()) => {
                        match &preload {
                            Some(name) => eprintln!("llama: serving '{name}' on {}: ready", loader.backend_name()),
                            None => eprintln!("llama: serving on {}: ready (models load on their first request)", loader.backend_name()),
                        }
                        state.set_ready();
                        Ok(())
                    }
                    Err((reason, full)) if o.args.on_load_error == args::OnLoadError::Serve => {
                        print_error(&full);
                        eprintln!("llama: the model failed to load; serving /health 503 until stopped (--on-load-error serve)");
                        state.set_failed(reason);
                        Ok(())
                    }
                    Err((_, full)) => {
                        let _ = failed_tx.send(());
                        Err(full)
                    }
                }
            })
        };
        let shutdown = async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                Ok(()) = failed_rx => {}
            }
        };
        llama_serve::http::serve(listener, state, shutdown).await.map_err(CliError::Output)?;
        // `serve` stopped the registry, which waited for any load under way (llama.cpp's
        // load cannot be interrupted, and exiting under it would tear its memory down).
        match preloader.join() {
            Ok(result) => result,
            Err(_) => Err(CliError::LoaderPanicked { message: "the preload thread ended without a result".into() }),
        }
    })?;
    eprintln!("llama: server stopped");
    Ok(())
}

/// What the catalogue shows of a model without loading it. A file that cannot be read is
/// still listed (its load will say why).
fn facts(path: &std::path::Path) -> ModelFacts {
    let f = crate::models::file_facts(path);
    ModelFacts {
        size_bytes: f.size_bytes,
        arch: f.architecture,
        quantization: f.quantization,
        parameters: f.parameters,
        context_length: f.context_length,
        modified: f.modified,
        chat_template: f.chat_template,
        embedding_model: f.pooling,
    }
}

fn registry_config(o: &ServeOpts) -> RegistryConfig {
    let a = &o.args;
    RegistryConfig {
        models_max: a.models_max as usize,
        idle_unload: (a.idle_unload > 0).then(|| Duration::from_secs(a.idle_unload)),
        memory_reserve: a.memory_reserve,
        memory_budget: a.memory_budget,
        load_wait: Duration::from_secs(a.load_wait),
    }
}

/// Requests that may wait for a model: its engine's `parallel + queue`.
fn admission(o: &ServeOpts, m: &ServedModel) -> usize {
    let c = engine_config(o, m);
    (c.slots as usize).saturating_add(c.queue)
}

/// A model's engine sizes and limits: its `[models.NAME]` settings, else the flags.
fn engine_config(o: &ServeOpts, m: &ServedModel) -> llama_serve::engine::EngineConfig {
    let (a, s) = (&o.args, &m.settings);
    llama_serve::engine::EngineConfig {
        slots: s.parallel.unwrap_or(a.parallel),
        queue: s.queue.unwrap_or(a.queue),
        size: ContextSize {
            n_ctx: s.ctx_size.unwrap_or(a.ctx_size),
            n_batch: a.batch_size,
            n_ubatch: a.ubatch_size,
            n_threads: o.threads,
            n_threads_batch: o.threads,
        },
        max_new_tokens: a.max_tokens,
        max_prompt_bytes: a.max_prompt_bytes.map(|b| b as usize),
        stall_timeout: Duration::from_secs(a.stall_timeout),
        cache: cache_params(o, m),
        pooling: s.pooling.or(a.pooling),
        ..llama_serve::engine::EngineConfig::default()
    }
}

/// A model's KV cache types: its settings', else the flags'; checked at start.
fn cache_params(o: &ServeOpts, m: &ServedModel) -> llama_host::KvCacheParams {
    let (c, s) = (o.cache, &m.settings);
    llama_host::KvCacheParams { type_k: s.cache_type_k.unwrap_or(c.type_k), type_v: s.cache_type_v.unwrap_or(c.type_v), flash_attn: s.flash_attn.unwrap_or(c.flash_attn) }
}

/// What a request to this model leaves out: its settings' sampling values, stop strings
/// and token limit, else the built-in defaults.
fn generation_defaults(o: &ServeOpts, m: &ServedModel) -> Result<GenerateOptions, CliError> {
    let (s, d) = (&m.settings, SamplingParams::default());
    let seed = match s.seed {
        None => d.seed,
        Some(v) => crate::opts::seed(v).ok_or_else(|| bad_setting(m, "seed", format!("{v} is out of range")))?,
    };
    let sampling = SamplingParams {
        temperature: s.temp.unwrap_or(d.temperature),
        top_k: s.top_k.unwrap_or(d.top_k),
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        repeat_penalty: s.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: s.repeat_last_n.unwrap_or(d.repeat_last_n),
        presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed,
        ..d
    };
    sampling.validate().map_err(|e| bad_setting(m, e.field, e.reason))?;
    let stop = s.stop.clone().unwrap_or_default();
    let spec = crate::opts::spec_options(&spec_args(o, m)).map_err(|e| bad_setting(m, "spec", e.to_string()))?;
    Ok(GenerateOptions { max_tokens: s.n_predict.and_then(|n| u32::try_from(n).ok()), sampling, add_special: true, stop, spec })
}

/// A model's speculation: its settings' values over the command line's.
fn spec_args(o: &ServeOpts, m: &ServedModel) -> crate::args::SpecArgs {
    let (a, s) = (&o.args.spec, &m.settings);
    crate::args::SpecArgs {
        spec: s.spec.clone().or_else(|| a.spec.clone()),
        draft_model: s.draft_model.clone().or_else(|| o.draft_model.clone()),
        draft_max: s.draft_max.or(a.draft_max),
        draft_min: s.draft_min.or(a.draft_min),
        draft_p_min: s.draft_p_min.or(a.draft_p_min),
        spec_ngram_n: s.spec_ngram_n.or(a.spec_ngram_n),
    }
}

fn bad_setting(m: &ServedModel, key: &str, reason: String) -> CliError {
    CliError::InvalidArg { field: "config", reason: format!("[models.{}] {key}: {reason}", m.name) }
}

/// Loads the catalogue's models for the registry: selects the backend once (at the first
/// load), opens and validates each file once per load (the estimate's file is the one
/// loaded), and keeps the full error of a failed load for the log and the preload's exit.
#[derive(Clone)]
struct ServeLoader(Arc<LoaderInner>);

struct LoaderInner {
    g: Global,
    o: ServeOpts,
    models: HashMap<String, ServedModel>,
    backend: Mutex<Option<LoadedBackend>>,
    /// The file `estimate` opened and its parameters, for the `load` that follows it (the
    /// registry runs one load at a time: estimate, make room, load).
    prepared: Mutex<Option<(String, ModelFile, ModelParams)>>,
    failures: Mutex<HashMap<String, CliError>>,
}

impl ServeLoader {
    fn new(g: Global, o: ServeOpts) -> ServeLoader {
        let models = o.catalogue.models.iter().map(|m| (m.name.clone(), m.clone())).collect();
        ServeLoader(Arc::new(LoaderInner {
            g,
            o,
            models,
            backend: Mutex::new(None),
            prepared: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
        }))
    }

    fn backend_name(&self) -> String {
        self.0.backend.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|b| b.name().to_string()).unwrap_or_default()
    }

    /// The full error of `name`'s last failed load.
    fn take_failure(&self, name: &str) -> Option<CliError> {
        self.0.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    fn model(&self, name: &str) -> Result<&ServedModel, CliError> {
        self.0.models.get(name).ok_or_else(|| CliError::InvalidArg { field: "model", reason: format!("'{name}' is not in the catalogue") })
    }

    fn load_opts(&self, m: &ServedModel) -> LoadOpts {
        let mut offload = self.0.o.offload.clone();
        if let Some(l) = m.settings.gpu_layers {
            offload.gpu_layers = l.into();
        }
        LoadOpts { path: m.path.clone(), backend: self.0.o.backend.clone(), offload, cache: cache_params(&self.0.o, m) }
    }

    /// The backend, selected at the first load and shared by every model after it.
    fn with_backend<T>(&self, f: impl FnOnce(&LoadedBackend) -> Result<T, CliError>) -> Result<T, CliError> {
        let mut b = self.0.backend.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_none() {
            // Selection reads only the backend choice and the offload flags (for its warning
            // when they ask for a GPU that is not usable): the command line's, not one model's.
            let o = &self.0.o;
            let l = LoadOpts { path: Default::default(), backend: o.backend.clone(), offload: o.offload.clone(), cache: o.cache };
            *b = Some(select_backend(&self.0.g, &l)?);
        }
        f(b.as_ref().expect("selected above"))
    }

    /// A failure as the registry reports it; the full error is logged and kept.
    fn fail(&self, name: &str, e: CliError) -> LoadFailure {
        let public = public_reason(&e);
        let source: Arc<dyn std::error::Error + Send + Sync> = Arc::new(std::io::Error::other(crate::error::describe(&e)));
        let unavailable = matches!(e, CliError::Load(llama_host::LoadError::Remote(_)));
        self.0.failures.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), e);
        LoadFailure { public, source, unavailable }
    }

    fn estimate_inner(&self, name: &str) -> Result<MemoryNeed, CliError> {
        let m = self.model(name)?.clone();
        let n_ctx = engine_config(&self.0.o, &m).size.n_ctx;
        let l = self.load_opts(&m);
        let (file, params, gpu) = self.with_backend(|b| {
            let (file, params) = prepare(b, &l, n_ctx)?;
            Ok((file, params, b.info().accelerator != llama_host::Accelerator::Cpu))
        })?;
        let need = memory_need(&file, &params, gpu, n_ctx, &l.cache);
        *self.0.prepared.lock().unwrap_or_else(|p| p.into_inner()) = Some((name.to_string(), file, params));
        Ok(need)
    }

    fn load_inner(&self, name: &str, metrics: Arc<Metrics>) -> Result<Ready, CliError> {
        let m = self.model(name)?.clone();
        let prepared = self.0.prepared.lock().unwrap_or_else(|p| p.into_inner()).take().filter(|(n, _, _)| n == name);
        let (file, params) = match prepared {
            Some((_, f, p)) => (f, p),
            None => {
                let n_ctx = engine_config(&self.0.o, &m).size.n_ctx;
                let l = self.load_opts(&m);
                self.with_backend(|b| prepare(b, &l, n_ctx))?
            }
        };
        let model = Arc::new(self.with_backend(|b| load_with_params(b, &file, &params))?);
        // A template that does not compile is said once, not dropped without a word.
        let template = match &m.settings.chat_template {
            Some(t) => Some(llama_host::chat::ChatTemplate::named(&model, t).map_err(|e| bad_setting(&m, "chat-template", e.to_string()))?),
            None => match llama_host::chat::ChatTemplate::for_model_or_builtin(&model) {
                Ok((t, None)) => Some(t),
                Ok((t, Some(e))) => {
                    tracing::warn!(model = %name, "{e}; using the {} template", t.source);
                    Some(t)
                }
                Err(e) => {
                    tracing::warn!(model = %name, "{e}; /v1/chat/completions is unavailable for it");
                    None
                }
            },
        };
        let defaults = generation_defaults(&self.0.o, &m)?;
        // The draft model, when this model drafts with one: its own `draft-model`, or the
        // flag's when it speculates with a draft model. Loaded as the model is.
        let wants = m.settings.draft_model.is_some() || defaults.spec.is_some_and(|s| s.mode == llama_host::spec::SpecMode::Draft);
        let draft = match spec_args(&self.0.o, &m).draft_model.filter(|_| wants) {
            Some(path) => {
                let l = LoadOpts { path, ..self.load_opts(&m) };
                let n_ctx = engine_config(&self.0.o, &m).size.n_ctx;
                Some(llama_serve::engine::DraftModel(Arc::new(self.with_backend(|b| crate::load::load_model(b, &l, n_ctx))?)))
            }
            None => None,
        };
        let config = llama_serve::engine::EngineConfig { draft, ..engine_config(&self.0.o, &m) };
        let engine = llama_serve::engine::Engine::start_with_metrics(model, config, metrics)?;
        Ok(Ready { engine: Arc::new(engine), template, defaults })
    }
}

impl Loader for ServeLoader {
    fn estimate(&self, name: &str) -> Result<MemoryNeed, LoadFailure> {
        self.estimate_inner(name).map_err(|e| self.fail(name, e))
    }

    fn load(&self, name: &str, metrics: Arc<Metrics>) -> Result<Ready, LoadFailure> {
        self.load_inner(name, metrics).map_err(|e| self.fail(name, e))
    }

    fn device_free(&self) -> Option<u64> {
        let b = self.0.backend.lock().unwrap_or_else(|p| p.into_inner());
        let devices = b.as_ref()?.devices_now();
        let free: u64 = devices.iter().map(|d| d.memory_free).sum();
        (free > 0).then_some(free)
    }
}

/// Bytes of compute buffers and runtime allowed for beside the weights and KV cache: a
/// fixed part and a share of the weights (an estimate that errs high: it decides evictions,
/// and falling short would risk an out-of-memory kill).
const COMPUTE_FIXED: u64 = 64 << 20;

/// What a load of `file` with `params` will hold: the weights (the whole file, mapped), the
/// KV cache for `n_ctx` tokens, and compute buffers; on a GPU backend the offloaded layers
/// and their KV cache are device memory, the rest host memory. With remote devices (`--rpc`)
/// the offloaded layers live on the servers: neither host nor local device memory (how they
/// split between remote and local GPUs is llama.cpp's, so none is counted on a local GPU).
fn memory_need(file: &ModelFile, params: &ModelParams, gpu: bool, n_ctx: u32, cache: &llama_host::KvCacheParams) -> MemoryNeed {
    let remote = !params.rpc.is_empty();
    let weights = std::fs::metadata(file.path()).map(|m| m.len()).unwrap_or(0);
    let footprint = file.footprint(n_ctx, cache).ok();
    let kv = footprint.as_ref().map_or(0, |f| f.kv_bytes_per_layer.saturating_mul(u64::from(f.n_layer)));
    let total = weights.saturating_add(kv).saturating_add(COMPUTE_FIXED).saturating_add(weights / 20);
    let offloaded = match (&footprint, gpu || remote) {
        (Some(f), true) => {
            let all = f.n_layer + 1;
            let n = if params.n_gpu_layers < 0 { all } else { (params.n_gpu_layers as u32).min(all) };
            f.offloaded_bytes(n)
        }
        _ => 0,
    };
    let device = if remote { 0 } else { offloaded };
    MemoryNeed { host_bytes: total.saturating_sub(offloaded), device_bytes: device }
}

/// What a load failure may tell HTTP clients: what was wrong with the file, never where it
/// is or whether some path exists.
fn public_reason(e: &CliError) -> String {
    use llama_host::LoadError;
    match e {
        CliError::Load(LoadError::Invalid(g)) => g.reason(),
        // llama.cpp's own words may name other files (split shards) or the machine: they stay
        // in the server's log; /health needs no key.
        CliError::Load(LoadError::Rejected { .. }) => "llama.cpp could not load the model (the server's log has its reason)".into(),
        // The servers' addresses are the operator's network, not the clients' business.
        CliError::Load(LoadError::Remote(llama_host::BackendError::Rpc { failure, .. })) => match failure {
            llama_host::RpcFailure::Unreachable => "an RPC server the model is placed on is unreachable (the server's log names it)".into(),
            llama_host::RpcFailure::Protocol => "an RPC server the model is placed on speaks another protocol (the server's log names it)".into(),
            llama_host::RpcFailure::Lost => "an RPC server the model is placed on was lost during the load (the server's log names it)".into(),
        },
        CliError::Load(_) => "the model file cannot be read".into(),
        CliError::Select(_) => "no usable backend".into(),
        _ => "the engine could not start".into(),
    }
}
