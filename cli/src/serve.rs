//! `llama serve`: bind first, load the model on a thread while /health already answers,
//! then serve the OpenAI-compatible API (llama_serve::http) until Ctrl-C or SIGTERM.
//! Every value it reads was resolved and checked in `opts.rs` (the API key is never empty,
//! the header timeout is bounded).

use std::time::Duration;

use llama_host::ContextSize;

use crate::args;
use crate::error::print_error;
use crate::load::{load_model, select_backend};
use crate::opts::{Global, ServeOpts};
use crate::CliError;

pub fn run(g: &Global, o: &ServeOpts) -> Result<(), CliError> {
    use llama_serve::http::{AppState, ServerConfig};
    let (a, path) = (&o.args, o.load.path.clone());
    // Every engine size is checked before anything binds or loads (--queue 2^62, say).
    engine_config(o).validate()?;
    let api_key = o.api_key.clone();
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "llama".into());
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
        let state = std::sync::Arc::new(AppState::new(ServerConfig {
            model_name: name,
            api_key,
            max_body_bytes: a.max_body,
            header_timeout: o.header_timeout,
            body_timeout: Duration::from_secs(a.body_timeout),
            write_timeout: Duration::from_secs(a.stall_timeout),
            drain_timeout: Duration::from_secs(a.drain_timeout),
            loopback_hosts_only: loopback,
            cors_origins: a.cors_origins.clone(),
            ..ServerConfig::default()
        }));
        if let Some(b) = bound {
            eprintln!("llama: listening on http://{b} (model '{}'; /health answers 503 until it is loaded)", state.config.model_name);
        }
        // Load on a plain thread while the server already answers /health.
        // The loader returns the error that must end the server (default --on-load-error
        // exit) and signals the shutdown future, so the server stops and the error is returned.
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        let loader = {
            let (g, o, state) = (g.clone(), o.clone(), state.clone());
            // A panic while loading is a failure like any other: caught here, it ends the
            // server (or is served as the failure), never a server stuck at "loading".
            std::thread::spawn(move || match catch_panic(|| start_engine(&g, &o)) {
                Ok((ready, backend)) => {
                    eprintln!("llama: serving {backend}: ready");
                    state.set_ready(ready);
                    Ok(())
                }
                Err(e) if o.args.on_load_error == args::OnLoadError::Serve => {
                    print_error(&e);
                    eprintln!("llama: the model failed to load; serving /health 503 until stopped (--on-load-error serve)");
                    state.set_failed(public_reason(&e));
                    Ok(())
                }
                Err(e) => {
                    let _ = failed_tx.send(());
                    Err(e)
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
        // A stop during loading waits for the load to finish: llama.cpp's load cannot be
        // interrupted, and exiting under it would tear its memory down mid-use.
        match loader.join() {
            Ok(result) => result,
            Err(_) => Err(CliError::LoaderPanicked { message: "the loader thread ended without a result".into() }),
        }
    })?;
    eprintln!("llama: server stopped");
    Ok(())
}

/// `f`'s result, or its panic as an error (with the panic's message).
fn catch_panic<T>(f: impl FnOnce() -> Result<T, CliError>) -> Result<T, CliError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let message = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(CliError::LoaderPanicked { message })
    })
}

/// The engine's sizes and limits, from the flags.
fn engine_config(o: &ServeOpts) -> llama_serve::engine::EngineConfig {
    let a = &o.args;
    llama_serve::engine::EngineConfig {
        slots: a.parallel,
        queue: a.queue,
        size: ContextSize { n_ctx: a.ctx_size, n_batch: a.batch_size, n_ubatch: a.ubatch_size, n_threads: o.threads, n_threads_batch: o.threads },
        max_new_tokens: a.max_tokens,
        max_prompt_bytes: a.max_prompt_bytes.map(|b| b as usize),
        stall_timeout: Duration::from_secs(a.stall_timeout),
        cache: o.load.cache,
        ..llama_serve::engine::EngineConfig::default()
    }
}

/// Selects the backend, loads the model and starts its engine.
fn start_engine(g: &Global, o: &ServeOpts) -> Result<(llama_serve::http::Ready, String), CliError> {
    use llama_serve::engine::Engine;
    let a = &o.args;
    let backend = select_backend(g, &o.load)?;
    let model = std::sync::Arc::new(load_model(&backend, &o.load, a.ctx_size)?);
    // A template that does not compile is said once, not dropped without a word.
    let template = match llama_host::chat::ChatTemplate::for_model_or_builtin(&model) {
        Ok((t, None)) => Some(t),
        Ok((t, Some(e))) => {
            tracing::warn!("{e}; using the {} template", t.source);
            Some(t)
        }
        Err(e) => {
            tracing::warn!("{e}; /v1/chat/completions is unavailable");
            None
        }
    };
    let engine = Engine::start(model, engine_config(o))?;
    Ok((llama_serve::http::Ready { engine: std::sync::Arc::new(engine), template }, backend.name().to_string()))
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
        CliError::Load(_) => "the model file cannot be read".into(),
        CliError::Select(_) => "no usable backend".into(),
        _ => "the engine could not start".into(),
    }
}
