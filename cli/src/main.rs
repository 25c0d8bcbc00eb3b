//! The `llama` command. Thin over llama-host: parse arguments and the config file, set up
//! logging and Ctrl-C, call the library, print results, map errors to exit codes.

mod args;
mod chat;
mod config;
mod models;
mod progress;
mod signals;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use llama_host::bench::{self, BenchParams, BenchResult};
use llama_host::chat::{ChatTemplate, Conversation};
use llama_host::{
    BackendChoice, Backends, DiscoveryOptions, FinishReason, GenerateOptions, GenerationStats, LoadedBackend, LogitBias,
    Model, ModelParams, SamplingParams, SessionParams,
};

use args::{BackendsAction, BackendsArgs, BenchArgs, Cli, Command, ContextArgs, LogFormat, ModelArgs, RunArgs, SamplingArgs};
use config::Config;
use signals::Interrupts;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no model given: pass a model (name or -m FILE), set LLAMA_MODEL or default-model in the config; the default model is not installed at {path} (scripts/fetch-model installs it)")]
    NoModel { path: String },
    #[error("unknown model '{name}': not a file, not a name in the config's [models], not in the models directory {dirs}")]
    UnknownModel { name: String, dirs: String },
    #[error("invalid {field}: {reason}")]
    InvalidArg { field: &'static str, reason: String },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Select(#[from] llama_host::SelectError),
    #[error(transparent)]
    Load(#[from] llama_host::LoadError),
    #[error(transparent)]
    ModelName(#[from] llama_host::ModelNameError),
    #[error(transparent)]
    Session(#[from] llama_host::SessionError),
    #[error(transparent)]
    Generate(#[from] llama_host::GenerateError),
    #[error(transparent)]
    Chat(#[from] llama_host::chat::ChatError),
    #[error(transparent)]
    Install(#[from] llama_host::InstallError),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error("cannot read {path}")]
    ReadFile { path: String, #[source] source: std::io::Error },
    /// Ctrl-C: not an error to print, exit 130 like a shell.
    #[error("interrupted")]
    Interrupted,
}

impl CliError {
    /// Exit codes: 2 bad arguments/config, 3 model file refused, 4 no usable backend,
    /// 130 interrupted, 1 anything else. Documented in README.md.
    fn exit_code(&self) -> u8 {
        use llama_host::{GenerateError, SessionError};
        match self {
            CliError::InvalidArg { .. }
            | CliError::Config(_)
            | CliError::Session(SessionError::InvalidParam { .. })
            | CliError::Load(llama_host::LoadError::InvalidParam { .. })
            | CliError::Generate(GenerateError::InvalidParam { .. } | GenerateError::PromptTooLong { .. } | GenerateError::EmptyPrompt) => 2,
            CliError::NoModel { .. } | CliError::UnknownModel { .. } | CliError::Load(_) | CliError::ModelName(_) => 3,
            CliError::Select(_) | CliError::Install(_) => 4,
            CliError::Interrupted => 130,
            _ => 1,
        }
    }
}

/// Logging to stderr (text or JSON), plus the profiling hook: with `LLAMA_TRACE_FILE` set,
/// every span is also written to that file in Chrome's trace format. The returned guard
/// flushes it when dropped.
fn init_logging(cli: &Cli) -> Option<tracing_chrome::FlushGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    // llama.cpp's own log (target llama_cpp) is off unless asked for: load errors reach
    // the user through typed errors, not through its log.
    let default = match cli.verbose {
        0 => "warn,llama_cpp=off",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("LLAMA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = match cli.log_format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.with_target(cli.verbose > 0).boxed(),
    };
    let (chrome, guard) = match std::env::var_os("LLAMA_TRACE_FILE").filter(|f| !f.is_empty()) {
        Some(file) => {
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new().file(file).include_args(true).build();
            // Spans and the runtime's own events; llama.cpp's log lines would drown them.
            (Some(layer.with_filter(EnvFilter::new("debug,llama_cpp=off"))), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(chrome).init();
    guard
}

/// Where to look for backends. Each candidate is probed in a child process (this binary,
/// re-executed), so a plugin that crashes or hangs is reported instead of taking us down.
fn discovery(cli: &Cli) -> DiscoveryOptions {
    DiscoveryOptions {
        backend_dirs: cli.backend_dirs.clone(),
        isolation: llama_host::probe::Isolation::current_exe(probe_timeout()),
        ..DiscoveryOptions::from_env()
    }
}

/// How long a backend's probe may take in its child process: 10 s, or
/// `LLAMA_PROBE_TIMEOUT` seconds.
fn probe_timeout() -> std::time::Duration {
    let secs = std::env::var("LLAMA_PROBE_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0).unwrap_or(10.0);
    std::time::Duration::from_secs_f64(secs)
}

/// Discovers backends, prints the report with -v, and selects.
pub(crate) fn select_backend(cli: &Cli, m: &ModelArgs) -> Result<LoadedBackend, CliError> {
    let mut backends = Backends::discover(&discovery(cli));
    let choice: BackendChoice = m.backend.parse().unwrap_or(BackendChoice::Auto);
    let selected = backends.select(choice.clone());
    if cli.verbose > 0 {
        eprint!("{}", backends.report());
    }
    let selected = selected?;
    // GPU offload asked for, but the backend in use is the CPU: say why, once, and go on.
    // (A GPU backend named with --backend that cannot run is already an error above.)
    let flags = m.gpu_flags();
    if !flags.is_empty() && selected.info().accelerator == llama_host::Accelerator::Cpu && choice == BackendChoice::Auto {
        let why: Vec<String> = backends
            .report()
            .candidates
            .iter()
            .filter(|c| c.is_gpu())
            .map(|c| format!("{}: {}", c.name, c.reason))
            .collect();
        let verb = if flags.len() == 1 { "asks" } else { "ask" };
        tracing::warn!("{} {verb} for GPU offload, but no GPU backend is usable here ({}); running on the CPU", flags.join(", "), why.join("; "));
    }
    Ok(selected)
}

/// Model parameters from the command line, resolved for the backend in use.
fn model_params(backend: &LoadedBackend, m: &ModelArgs, path: &Path, n_ctx: u32) -> ModelParams {
    let gpu = backend.info().accelerator != llama_host::Accelerator::Cpu;
    let mut params = m.model_params(gpu, matches!(m.backend.parse(), Ok(BackendChoice::Auto)));
    if gpu && m.gpu_layers == args::GpuLayers::Auto {
        if let Some(n) = auto_gpu_layers(backend, m, path, n_ctx) {
            params.n_gpu_layers = n;
        }
    }
    params
}

/// `--gpu-layers auto` on a GPU backend: every layer if the model fits the offload devices'
/// free memory right now, else as many as the estimate says fit (a load that asks for more
/// than fits fails outright). `None` (all layers) when there is nothing to estimate with.
fn auto_gpu_layers(backend: &LoadedBackend, m: &ModelArgs, path: &Path, n_ctx: u32) -> Option<i32> {
    let now = backend.devices_now();
    let mut devices: Vec<&llama_host::DeviceInfo> = match &m.device {
        // In the user's order: llama.cpp takes the devices (and --main-gpu's index) that way.
        Some(args::Devices::Named(names)) => names.iter().filter_map(|n| now.iter().find(|d| d.name.eq_ignore_ascii_case(n))).collect(),
        Some(args::Devices::None) => return None,
        None => now.iter().collect(),
    };
    if m.split_mode == args::SplitModeArg::None {
        devices = devices.get(m.main_gpu as usize).into_iter().copied().collect();
    }
    let footprint = llama_host::fit::ModelFootprint::of(&llama_host::gguf::read(path).ok()?, n_ctx).ok()?;
    let (layers, fit) = llama_host::fit::auto_gpu_layers(&footprint, &devices)?;
    use llama_host::report::gib;
    if layers >= 0 {
        tracing::warn!(
            "the model needs about {:.1} GiB of GPU memory and {:.1} GiB is free (less a margin): offloading {layers} of {} layers, the rest runs on the CPU (--gpu-layers N overrides)",
            gib(fit.needed_bytes),
            gib(fit.available_bytes),
            fit.all
        );
    } else {
        tracing::info!(needed_gib = gib(fit.needed_bytes), available_gib = gib(fit.available_bytes), "every layer fits on the GPU");
    }
    Some(layers)
}

fn threads(field: &'static str, t: Option<i32>) -> Result<i32, CliError> {
    match t {
        None => Ok(llama_host::default_threads()),
        Some(t) if t >= 1 => Ok(t),
        Some(t) => Err(CliError::InvalidArg { field, reason: format!("{t} is below 1") }),
    }
}

pub(crate) fn session_params(c: &ContextArgs) -> Result<SessionParams, CliError> {
    let t = threads("threads", c.threads)?;
    Ok(SessionParams {
        n_ctx: c.ctx_size,
        n_batch: c.batch_size,
        n_ubatch: c.ubatch_size,
        n_threads: t,
        n_threads_batch: threads("threads-batch", c.threads_batch.or(Some(t)))?,
        cache_tokens: c.cache_tokens.unwrap_or(u32::MAX),
    })
}

/// llama.cpp's `--logit-bias` syntax: `TOKEN(+|-)BIAS`, BIAS a number or `inf`.
fn parse_logit_bias(s: &str) -> Result<LogitBias, CliError> {
    let bad = || CliError::InvalidArg { field: "logit-bias", reason: format!("'{s}' is not TOKEN(+|-)BIAS, e.g. 15043+1 or 15043-inf") };
    let split = s.char_indices().skip(1).find(|(_, c)| *c == '+' || *c == '-').map(|(i, _)| i).ok_or_else(bad)?;
    let token: i32 = s[..split].parse().map_err(|_| bad())?;
    let bias: f32 = s[split..].parse().map_err(|_| bad())?;
    Ok(LogitBias { token, bias })
}

pub(crate) fn generate_options(s: &SamplingArgs, add_special: bool) -> Result<GenerateOptions, CliError> {
    let seed = match s.seed {
        -1 => SamplingParams::default().seed,
        v => u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| CliError::InvalidArg { field: "seed", reason: format!("{v} is outside 0..4294967294 (or -1 for random)") })?,
    };
    let sampling = SamplingParams {
        temperature: s.temp,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed,
        logit_bias: s.logit_bias.iter().map(|b| parse_logit_bias(b)).collect::<Result<Vec<_>, _>>()?.into(),
    };
    // Checked here too, so a bad value fails before the model loads and names the flag.
    sampling.validate().map_err(|e| CliError::InvalidArg { field: flag_name(e.field), reason: e.reason })?;
    Ok(GenerateOptions { max_tokens: u32::try_from(s.n_predict).ok(), sampling, add_special, stop: s.stop.clone() })
}

/// The command-line flag for a sampling field.
fn flag_name(field: &str) -> &'static str {
    match field {
        "temperature" => "--temp",
        "top_k" => "--top-k",
        "top_p" => "--top-p",
        "min_p" => "--min-p",
        "repeat_penalty" => "--repeat-penalty",
        "repeat_last_n" => "--repeat-last-n",
        "frequency_penalty" => "--frequency-penalty",
        "presence_penalty" => "--presence-penalty",
        "logit_bias" => "--logit-bias",
        _ => "sampling parameter",
    }
}

/// Loads the model with a progress bar on a terminal.
/// `n_ctx` is the context the `--gpu-layers auto` estimate reserves KV cache for.
pub(crate) fn load_model(backend: &LoadedBackend, path: &Path, m: &ModelArgs, n_ctx: u32) -> Result<Model, CliError> {
    load_with_params(backend, path, &model_params(backend, m, path, n_ctx))
}

fn load_with_params(backend: &LoadedBackend, path: &Path, params: &ModelParams) -> Result<Model, CliError> {
    let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::debug!(n_gpu_layers = params.n_gpu_layers, split_mode = params.split_mode.as_str(), main_gpu = params.main_gpu, "model parameters");
    Ok(match progress::bar(label) {
        Some(bar) => Model::load_with_progress(backend, path, params, bar)?,
        None => Model::load(backend, path, params)?,
    })
}

pub(crate) fn stats_line(stats: &GenerationStats, backend: &str) -> String {
    format!(
        "llama: prompt {} tokens ({} cached, {} decoded), {:.2} tokens/s | generated {} tokens, {:.2} tokens/s | finish {} | backend {}",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.decoded_prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s(),
        match stats.finish {
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Cancelled) | None => "cancelled",
        },
        backend
    )
}

/// Streams a generation to stdout. A closed stdout ends it quietly.
pub(crate) fn stream_to_stdout(stream: &mut llama_host::Stream<'_, '_>, out: &mut impl Write) -> Result<String, CliError> {
    let mut text = String::new();
    for piece in stream.by_ref() {
        let piece = piece?;
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            stream.stop();
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(CliError::Output(e));
        }
        text.push_str(&piece);
    }
    Ok(text)
}

fn run(cli: &Cli, a: &RunArgs, cfg: &Config, ints: &Interrupts) -> Result<(), CliError> {
    let path = models::resolve(&a.model, cfg)?;
    let opts = generate_options(&a.sampling, !a.chat)?;
    let params = session_params(&a.ctx)?;
    params.validate()?;
    let backend = select_backend(cli, &a.model)?;
    let model = load_model(&backend, &path, &a.model, params.n_ctx)?;
    let mut session = model.session(&params)?;
    let prompt = if a.chat {
        let mut conv = Conversation::new(a.system.as_deref());
        conv.push("user", a.prompt.as_str());
        ChatTemplate::for_model(&model)?.render(&conv.messages, true)?
    } else {
        a.prompt.clone()
    };
    let mut stream = session.stream(&prompt, &opts)?;
    ints.watch(stream.canceller());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = stream_to_stdout(&mut stream, &mut out);
    let interrupted = ints.clear();
    result?;
    let _ = writeln!(out);
    if !a.no_stats {
        eprintln!("{}", stats_line(stream.stats(), backend.name()));
    }
    if interrupted {
        return Err(CliError::Interrupted);
    }
    Ok(())
}

fn backends_cmd(cli: &Cli, a: &BackendsArgs, cfg: &Config) -> Result<(), CliError> {
    if let Some(BackendsAction::Install { file, dir }) = &a.action {
        let dir = match dir {
            Some(d) => d.clone(),
            None => llama_host::user_backends_dir().ok_or(llama_host::InstallError::NoUserDir)?,
        };
        let (dest, [name, version, build]) = llama_host::install_backend(file, &dir, discovery(cli).isolation.as_ref())?;
        println!("installed {name} backend {version} ({build}) to {}", dest.display());
        return Ok(());
    }
    let mut backends = Backends::discover(&discovery(cli));
    // Selecting initialises the winner, so the report shows what `llama run` would use.
    let selected = backends.select(BackendChoice::Auto);
    let model = match &a.model {
        Some(name) => Some(model_fit(&models::resolve_name(name, cfg)?, a.ctx_size, backends.report())?),
        None => None,
    };
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a llama_host::SelectionReport,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: Option<ModelFit>,
        }
        println!("{}", serde_json::to_string_pretty(&Out { report: backends.report(), model }).expect("the report serializes"));
    } else {
        print!("{}", backends.report());
        if let Some(m) = model {
            print!("{m}");
        }
    }
    // Nothing usable: the report above says why; the exit code says so to scripts (4).
    selected?;
    Ok(())
}

/// `llama backends -m MODEL`: the model's memory needs and the layers each GPU backend could take.
#[derive(serde::Serialize)]
struct ModelFit {
    path: std::path::PathBuf,
    footprint: llama_host::fit::ModelFootprint,
    gpus: Vec<llama_host::fit::BackendFit>,
}

fn model_fit(path: &Path, n_ctx: u32, report: &llama_host::SelectionReport) -> Result<ModelFit, CliError> {
    let file = llama_host::gguf::read(path).map_err(|e| CliError::Load(llama_host::LoadError::Invalid(e)))?;
    let footprint = llama_host::fit::ModelFootprint::of(&file, n_ctx).map_err(|e| CliError::InvalidArg { field: "model", reason: e.to_string() })?;
    let gpus = llama_host::fit::for_report(report, &footprint);
    Ok(ModelFit { path: path.to_path_buf(), footprint, gpus })
}

impl std::fmt::Display for ModelFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use llama_host::report::gib;
        let m = &self.footprint;
        let all = m.n_layer + 1;
        writeln!(f, "model {}:", self.path.display())?;
        writeln!(
            f,
            "  {} layers + output head: {:.2} GiB on a GPU with every layer offloaded (weights {:.2} GiB, KV cache {:.2} GiB at {} tokens, an upper bound); {:.2} GiB of embeddings stay in host memory",
            m.n_layer,
            gib(m.offloaded_bytes(all)),
            gib(m.offloaded_bytes(all).saturating_sub(u64::from(m.n_layer).saturating_mul(m.kv_bytes_per_layer))),
            gib(u64::from(m.n_layer).saturating_mul(m.kv_bytes_per_layer)),
            m.n_ctx,
            gib(m.host_bytes)
        )?;
        if self.gpus.is_empty() {
            writeln!(f, "  no GPU device found: every layer runs on the CPU")?;
        }
        for g in &self.gpus {
            let memory = if g.from_free_memory { "free" } else { "total (the driver's figure; the plugin reports free)" };
            let flag = if g.fit.layers == g.fit.all { "all".to_string() } else { g.fit.layers.to_string() };
            writeln!(
                f,
                "  {} ({}): {} of {} layers fit (--gpu-layers {flag}); {:.2} GiB available = {memory} memory of {} device(s) less a {:.0} GiB margin each",
                g.backend,
                g.verdict,
                g.fit.layers,
                g.fit.all,
                gib(g.fit.available_bytes),
                g.devices,
                gib(llama_host::fit::GPU_MARGIN)
            )?;
        }
        Ok(())
    }
}

fn bench_cmd(cli: &Cli, a: &BenchArgs, cfg: &Config) -> Result<(), CliError> {
    let path = models::resolve(&a.model, cfg)?;
    let backend = select_backend(cli, &a.model)?;
    // The context the auto GPU-layer estimate reserves KV cache for. The parameters are
    // resolved once: the batch-invariant model below must get the same offload as this one
    // (a second estimate would see the GPU memory this one took).
    let n_ctx = a.n_prompt.saturating_add(a.n_gen).max(4096);
    let params = model_params(&backend, &a.model, &path, n_ctx);
    let model = load_with_params(&backend, &path, &params)?;
    let p = BenchParams {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        reps: a.reps,
        n_threads: threads("threads", a.threads)?,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
    };
    let r = bench::run(&model, &p)?;
    let model = if a.batch_invariant {
        // Batch-invariant engines need the weights in their plain layout.
        Model::load(&backend, &path, &ModelParams { repack: false, ..params })?
    } else {
        model
    };
    let model = std::sync::Arc::new(model);
    let cp = bench::ConcurrentParams {
        streams: a.concurrency.iter().copied().filter(|&n| n > 0).collect(),
        n_gen: a.concurrent_tokens,
        n_threads: p.n_threads,
        n_batch: p.n_batch,
        n_ubatch: p.n_ubatch,
        batch_invariant: a.batch_invariant,
    };
    let concurrent = bench::concurrent(&model, &cp)?;
    let prefix = if a.no_prefix_test { None } else { Some(bench::prefix_reuse(&model, &cp, 1000)?) };
    if a.json {
        println!("{}", bench_json(&model, &backend, &p, &r, &concurrent, prefix.as_ref(), a.batch_invariant));
    } else {
        println!("| model | size | backend | threads | test | t/s |");
        println!("| --- | ---: | --- | ---: | ---: | ---: |");
        let size = format!("{:.2} MiB", model.info().size_bytes as f64 / (1u64 << 20) as f64);
        for (name, t) in [("pp", &r.pp), ("tg", &r.tg)] {
            if let Some(t) = t {
                println!(
                    "| {} | {size} | {} | {} | {name}{} | {:.2} ± {:.2} |",
                    model.info().description,
                    backend.name(),
                    p.n_threads,
                    t.tokens,
                    t.tokens_per_s,
                    t.stddev
                );
            }
        }
        if !concurrent.is_empty() {
            println!();
            println!("| streams | aggregate t/s (batched) | t/s one at a time | batched / one at a time | vs 1 stream |");
            println!("| ---: | ---: | ---: | ---: | ---: |");
            let base = concurrent[0].tokens_per_s;
            for c in &concurrent {
                println!(
                    "| {} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
                    c.streams,
                    c.tokens_per_s,
                    c.sequential_tokens_per_s,
                    c.tokens_per_s / c.sequential_tokens_per_s,
                    c.tokens_per_s / base
                );
            }
        }
        if let Some(pr) = &prefix {
            println!();
            println!(
                "time to first token, {}-token prompt sharing {} tokens with the previous one: {:.1} ms with prefix reuse, {:.1} ms without ({:.3}x)",
                pr.prompt_tokens,
                pr.cached_tokens,
                pr.ttft_with_reuse_ms,
                pr.ttft_without_reuse_ms,
                pr.ttft_with_reuse_ms / pr.ttft_without_reuse_ms
            );
        }
    }
    Ok(())
}

fn bench_json(
    model: &Model,
    backend: &LoadedBackend,
    p: &BenchParams,
    r: &BenchResult,
    concurrent: &[bench::ConcurrentResult],
    prefix: Option<&bench::PrefixReuse>,
    concurrent_invariant: bool,
) -> String {
    let v = serde_json::json!({
        "model": model.path(),
        "model_description": model.info().description.as_str(),
        "backend": backend.name(),
        "threads": p.n_threads,
        "n_prompt": p.n_prompt,
        "n_gen": p.n_gen,
        "n_batch": p.n_batch,
        "n_ubatch": p.n_ubatch,
        "repetitions": p.reps,
        "pp_tokens_per_s": r.pp.as_ref().map(|t| t.tokens_per_s),
        "pp_stddev": r.pp.as_ref().map(|t| t.stddev),
        "tg_tokens_per_s": r.tg.as_ref().map(|t| t.tokens_per_s),
        "tg_stddev": r.tg.as_ref().map(|t| t.stddev),
        "pp": r.pp,
        "tg": r.tg,
        "concurrent": concurrent,
        "batch_invariant": concurrent_invariant,
        "prefix_reuse": prefix,
    });
    serde_json::to_string_pretty(&v).expect("bench results serialize")
}

fn serve_cmd(cli: &Cli, a: &args::ServeArgs, cfg: &Config) -> Result<(), CliError> {
    use llama_host::server::{AppState, ServerConfig};
    let path = models::resolve(&a.model, cfg)?;
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|source| CliError::ReadFile { path: f.display().to_string(), source })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let threads = threads("threads", a.threads)?;
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
        let bound = llama_host::server::bound(&listener);
        let loopback = bound.is_some_and(|b| b.ip().is_loopback());
        if !loopback && api_key.is_none() {
            tracing::warn!("listening on {addr} without an API key: anyone who can reach it can use it");
        }
        let state = std::sync::Arc::new(AppState::new(ServerConfig {
            model_name: name,
            api_key,
            max_body_bytes: a.max_body,
            header_timeout: std::time::Duration::from_secs(a.header_timeout.max(1)),
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
            let (cli, a, state) = (cli.clone(), a.clone(), state.clone());
            std::thread::spawn(move || match start_engine(&cli, &a, &path, threads) {
                Ok((ready, backend)) => {
                    eprintln!("llama: serving {backend}: ready");
                    state.set_ready(ready);
                    Ok(())
                }
                Err(e) if a.on_load_error == args::OnLoadError::Serve => {
                    print_error(&e);
                    eprintln!("llama: the model failed to load; serving /health 503 until stopped (--on-load-error serve)");
                    state.set_failed(public_reason(&e, &path));
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
        llama_host::server::serve(listener, state, shutdown).await.map_err(CliError::Output)?;
        // A stop during loading waits for the load to finish: llama.cpp's load cannot be
        // interrupted, and exiting under it would tear its memory down mid-use.
        match loader.join() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    })?;
    eprintln!("llama: server stopped");
    Ok(())
}

/// Selects the backend, loads the model and starts its engine.
fn start_engine(cli: &Cli, a: &args::ServeArgs, path: &Path, threads: i32) -> Result<(llama_host::server::Ready, String), CliError> {
    use llama_host::engine::{Engine, EngineConfig};
    let backend = select_backend(cli, &a.model)?;
    let model = std::sync::Arc::new(load_model(&backend, path, &a.model, a.ctx_size)?);
    let template = llama_host::chat::ChatTemplate::for_model(&model).ok();
    let engine = Engine::start(
        model,
        EngineConfig {
            slots: a.parallel.max(1),
            queue: a.queue,
            n_ctx: a.ctx_size,
            n_batch: a.batch_size,
            n_ubatch: a.ubatch_size,
            n_threads: threads,
            n_threads_batch: threads,
            max_new_tokens: a.max_tokens,
            ..EngineConfig::default()
        },
    )?;
    Ok((llama_host::server::Ready { engine: std::sync::Arc::new(engine), template }, backend.name().to_string()))
}

/// What a load failure may tell HTTP clients: what was wrong with the file, never where it
/// is or whether some path exists.
fn public_reason(e: &CliError, path: &Path) -> String {
    use llama_host::LoadError;
    match e {
        CliError::Load(LoadError::Invalid(g)) => g.reason(),
        CliError::Load(LoadError::Rejected { source, .. }) => {
            let msg = source.to_string();
            let p = path.display().to_string();
            if p.is_empty() { msg } else { msg.replace(&p, "<model>") }
        }
        CliError::Load(_) => "the model file cannot be read".into(),
        CliError::Select(_) => "no usable backend".into(),
        _ => "the engine could not start".into(),
    }
}

/// The error and each cause not already part of its message.
pub(crate) fn print_error(e: &CliError) {
    let top = e.to_string();
    eprintln!("error: {top}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let msg = s.to_string();
        if !top.contains(&msg) {
            eprintln!("  caused by: {msg}");
        }
        source = s.source();
    }
}

fn dispatch(cli: &Cli, matches: &clap::ArgMatches) -> Result<(), CliError> {
    let cfg = config::load(config::locate(cli.config.as_deref()).as_deref())?;
    let sub = matches.subcommand().map(|(_, m)| m).expect("a subcommand is required");
    // `serve` handles SIGINT/SIGTERM itself (graceful shutdown).
    let ints = if matches!(cli.command, Command::Serve(_)) { Interrupts::default() } else { Interrupts::install() };
    match &cli.command {
        Command::Run(a) => {
            let mut a = a.clone();
            cfg.apply(sub, &mut a.model, &mut a.ctx, &mut a.sampling);
            cfg.text_default(sub, "system", &mut a.system);
            run(cli, &a, &cfg, &ints)
        }
        Command::Chat(a) => {
            let mut a = a.clone();
            cfg.apply(sub, &mut a.model, &mut a.ctx, &mut a.sampling);
            cfg.text_default(sub, "system", &mut a.system);
            cfg.text_default(sub, "chat_template", &mut a.chat_template);
            chat::run(cli, &a, &cfg, &ints)
        }
        Command::List(a) => models::list(a, &cfg),
        Command::Backends(a) => backends_cmd(cli, a, &cfg),
        Command::Bench(a) => {
            let mut a = a.clone();
            cfg.apply_model(sub, &mut a.model);
            bench_cmd(cli, &a, &cfg)
        }
        Command::Serve(a) => {
            let mut a = a.clone();
            cfg.apply_model(sub, &mut a.model);
            serve_cmd(cli, &a, &cfg)
        }
    }
}

fn main() -> ExitCode {
    // The child side of crash-isolated backend probing (see llama_host::probe): not a user
    // command, so it is handled before argument parsing and never listed in --help.
    let mut raw = std::env::args_os().skip(1);
    if raw.next().is_some_and(|a| a == llama_host::probe::PROBE_SUBCOMMAND) {
        let Some(path) = raw.next() else { return ExitCode::from(2) };
        return match llama_host::probe::child_main(std::path::Path::new(&path)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    let matches = Cli::command().get_matches_from(args::normalize_args(std::env::args_os()));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let trace_guard = init_logging(&cli);
    let code = match dispatch(&cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Interrupted) => ExitCode::from(130),
        Err(e) => {
            print_error(&e);
            ExitCode::from(e.exit_code())
        }
    };
    drop(trace_guard);
    code
}
