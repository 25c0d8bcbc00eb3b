//! The `llama` command. Thin over llama-host: parse arguments, set up logging, call the
//! library, print results, map errors to exit codes.

mod args;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llama_host::bench::{self, BenchParams, BenchResult};
use llama_host::{
    BackendChoice, Backends, DiscoveryOptions, GenerateOptions, LoadedBackend, Model, ModelParams, SamplingParams,
    SessionParams,
};

use args::{BackendsAction, BackendsArgs, BenchArgs, Cli, Command, LogFormat, ModelArgs, RunArgs};

/// File name of the default model installed by scripts/fetch-model.
const DEFAULT_MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("no model given: pass -m FILE or set LLAMA_MODEL; the default model is not installed at {path} (scripts/fetch-model installs it)")]
    NoModel { path: String },
    #[error("invalid {field}: {reason}")]
    InvalidArg { field: &'static str, reason: String },
    #[error(transparent)]
    Select(#[from] llama_host::SelectError),
    #[error(transparent)]
    Load(#[from] llama_host::LoadError),
    #[error(transparent)]
    Session(#[from] llama_host::SessionError),
    #[error(transparent)]
    Generate(#[from] llama_host::GenerateError),
    #[error(transparent)]
    Install(#[from] llama_host::InstallError),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

impl CliError {
    /// Exit codes: 2 bad arguments, 3 model file refused, 4 no usable backend,
    /// 1 anything else. Documented in README.md.
    fn exit_code(&self) -> u8 {
        use llama_host::{GenerateError, SessionError};
        match self {
            CliError::InvalidArg { .. }
            | CliError::Session(SessionError::InvalidParam { .. })
            | CliError::Generate(GenerateError::InvalidParam { .. } | GenerateError::PromptTooLong { .. } | GenerateError::EmptyPrompt) => 2,
            CliError::NoModel { .. } | CliError::Load(_) => 3,
            CliError::Select(_) | CliError::Install(_) => 4,
            _ => 1,
        }
    }
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // llama.cpp's own log (target llama_cpp) is off unless asked for: load errors reach
    // the user through typed errors, not through its log.
    let default = match cli.verbose {
        0 => "warn,llama_cpp=off",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("LLAMA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(cli.verbose > 0).init(),
    }
}

fn discovery(cli: &Cli) -> DiscoveryOptions {
    DiscoveryOptions { backend_dirs: cli.backend_dirs.clone(), ..DiscoveryOptions::from_env() }
}

fn model_path(m: &ModelArgs) -> Result<PathBuf, CliError> {
    if let Some(p) = &m.model {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("LLAMA_MODEL").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let default = llama_host::default_models_dir().map(|d| d.join(DEFAULT_MODEL));
    match default {
        Some(p) if p.is_file() => Ok(p),
        other => Err(CliError::NoModel {
            path: other.map(|p| p.display().to_string()).unwrap_or_else(|| "(no home directory)".into()),
        }),
    }
}

/// Discovers backends, prints the report with -v, and selects.
fn select_backend(cli: &Cli, m: &ModelArgs) -> Result<LoadedBackend, CliError> {
    let mut backends = Backends::discover(&discovery(cli));
    let choice: BackendChoice = m.backend.parse().unwrap_or(BackendChoice::Auto);
    let selected = backends.select(choice);
    if cli.verbose > 0 {
        eprint!("{}", backends.report());
    }
    Ok(selected?)
}

fn threads(t: Option<i32>) -> Result<i32, CliError> {
    match t {
        None => Ok(std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)),
        Some(t) if t >= 1 => Ok(t),
        Some(t) => Err(CliError::InvalidArg { field: "threads", reason: format!("{t} is below 1") }),
    }
}

fn run(cli: &Cli, a: &RunArgs) -> Result<(), CliError> {
    let path = model_path(&a.model)?;
    let backend = select_backend(cli, &a.model)?;
    let model = Model::load(&backend, &path, &ModelParams::default())?;
    let t = threads(a.threads)?;
    let session_params = SessionParams {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
        n_threads: t,
        n_threads_batch: threads(a.threads_batch.or(Some(t)))?,
    };
    let mut session = model.session(&session_params)?;
    let seed = match a.seed {
        None | Some(-1) => llama_host::SamplingParams::default().seed,
        Some(s) => u32::try_from(s)
            .ok()
            .filter(|&s| s != u32::MAX)
            .ok_or_else(|| CliError::InvalidArg { field: "seed", reason: format!("{s} is outside 0..4294967294 (or -1 for random)") })?,
    };
    let opts = GenerateOptions {
        max_tokens: u32::try_from(a.n_predict).ok(),
        sampling: SamplingParams { temperature: a.temp, seed, ..SamplingParams::default() },
        add_special: true,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let stats = session.generate(&a.prompt, &opts, |text| match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            write_error = Some(e);
            ControlFlow::Break(())
        }
    })?;
    match write_error {
        // A closed pipe (`llama run ... | head`) is the reader's choice, not an error.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Some(e) => return Err(CliError::Output(e)),
        None => {}
    }
    let _ = writeln!(out);
    if !a.no_stats {
        eprintln!(
            "llama: prompt {} tokens, {:.2} tokens/s | generated {} tokens, {:.2} tokens/s | finish {:?} | backend {}",
            stats.prompt_tokens,
            stats.prompt_tokens_per_s(),
            stats.generated_tokens,
            stats.generation_tokens_per_s(),
            stats.finish,
            backend.name()
        );
    }
    Ok(())
}

fn backends_cmd(cli: &Cli, a: &BackendsArgs) -> Result<(), CliError> {
    if let Some(BackendsAction::Install { file, dir }) = &a.action {
        let dir = match dir {
            Some(d) => d.clone(),
            None => llama_host::user_backends_dir().ok_or(llama_host::InstallError::NoUserDir)?,
        };
        let (dest, info) = llama_host::install_backend(file, &dir)?;
        println!("installed {} backend {} ({}) to {}", info.name, info.version, info.llama_build, dest.display());
        return Ok(());
    }
    let mut backends = Backends::discover(&discovery(cli));
    // Selecting initialises the winner, so the report shows what `llama run` would use.
    let _ = backends.select(BackendChoice::Auto);
    if a.json {
        println!("{}", serde_json::to_string_pretty(backends.report()).expect("the report serializes"));
    } else {
        print!("{}", backends.report());
    }
    Ok(())
}

fn bench_cmd(cli: &Cli, a: &BenchArgs) -> Result<(), CliError> {
    let path = model_path(&a.model)?;
    let backend = select_backend(cli, &a.model)?;
    let model = Model::load(&backend, &path, &ModelParams::default())?;
    let p = BenchParams {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        reps: a.reps,
        n_threads: threads(a.threads)?,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
    };
    let r = bench::run(&model, &p)?;
    if a.json {
        println!("{}", bench_json(&model, &backend, &p, &r));
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
    }
    Ok(())
}

fn bench_json(model: &Model, backend: &LoadedBackend, p: &BenchParams, r: &BenchResult) -> String {
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
    });
    serde_json::to_string_pretty(&v).expect("bench results serialize")
}

/// The error and each cause not already part of its message.
fn print_error(e: &CliError) {
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

fn main() -> ExitCode {
    let cli = Cli::parse_from(args::normalize_args(std::env::args_os()));
    init_logging(&cli);
    let result = match &cli.command {
        Command::Run(a) => run(&cli, a),
        Command::Backends(a) => backends_cmd(&cli, a),
        Command::Bench(a) => bench_cmd(&cli, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::from(e.exit_code())
        }
    }
}
