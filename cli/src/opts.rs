//! Option resolution: the parsed flags (`args.rs`), the environment and the config file
//! (`config.rs`) resolved once, in one place, into [`Options`], the value every command
//! reads. Commands never look at clap's matches, the config or `std::env` themselves, so
//! precedence (flag > environment > config > built-in default) lives here alone.
//! Resolution checks values but never touches a backend or loads a model.

use std::path::PathBuf;
use std::time::Duration;

use llama_host::spec::{SpecMode, SpecParams};
use llama_host::{BackendChoice, ContextSize, DiscoveryOptions, GenerateOptions, KvCacheParams, SamplingParams, SessionParams};

use crate::args::{self, BackendsAction, CacheArgs, Cli, Command, ContextArgs, LogFormat, ModelArgs, SamplingArgs};
use llama_host::offload::OffloadRequest;
use crate::config::{self, Config};
use crate::models;
use crate::CliError;

/// Everything a command needs, resolved.
pub struct Options {
    pub global: Global,
    pub config: Config,
    pub command: CommandOpts,
    /// `LLAMA_TRACE_FILE` (where spans go in Chrome's trace format), created here so a
    /// bad path is an error naming the variable; handed to the logging set-up.
    pub trace: Option<std::fs::File>,
}

/// Settings every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    pub verbose: u8,
    pub log_format: LogFormat,
    pub backend_dirs: Vec<PathBuf>,
    /// How long a backend's probe may take in its child process (`LLAMA_PROBE_TIMEOUT`).
    pub probe_timeout: Duration,
}

impl Global {
    /// Where to look for backends. Each candidate is probed in a child process (this
    /// binary, re-executed), so a plugin that crashes or hangs is reported instead of
    /// taking us down.
    pub fn discovery(&self) -> DiscoveryOptions {
        DiscoveryOptions {
            backend_dirs: self.backend_dirs.clone(),
            isolation: llama_host::probe::Isolation::current_exe(self.probe_timeout),
            ..DiscoveryOptions::from_env()
        }
    }
}

/// Which model, on which backend, offloaded how.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    pub path: PathBuf,
    pub backend: BackendChoice,
    /// The offload flags (`--gpu-layers`, `--device`, `--split-mode`, `--main-gpu`), for the
    /// host's offload decision (`llama_host::offload`).
    pub offload: OffloadRequest,
    /// The KV cache types (`--cache-type-k`, `--cache-type-v`, `--flash-attn`), checked:
    /// what the contexts are made with and what the offload estimate reserves.
    pub cache: KvCacheParams,
}

/// A session's sizes and the generation options.
#[derive(Debug, Clone)]
pub struct Generation {
    pub session: SessionParams,
    pub generate: GenerateOptions,
    /// `--draft-model`: loaded beside the model for `--spec draft`.
    pub draft_model: Option<std::path::PathBuf>,
}

pub enum CommandOpts {
    Run(RunOpts),
    Chat(ChatOpts),
    List(ListOpts),
    Backends(BackendsOpts),
    Bench(BenchOpts),
    Embed(EmbedOpts),
    Serve(ServeOpts),
    Ps(PsOpts),
    RpcServer(RpcServerOpts),
}

pub struct RunOpts {
    pub load: LoadOpts,
    pub gen: Generation,
    /// `-p`, or the text of `-f FILE`.
    pub prompt: String,
    pub chat: bool,
    pub system: Option<String>,
    /// `--chat-template` (with `--chat`): a built-in name or a file.
    pub chat_template: Option<String>,
    pub no_stats: bool,
}

pub struct ChatOpts {
    pub load: LoadOpts,
    pub gen: Generation,
    pub system: Option<String>,
    /// `--chat-template`: a built-in name or a file.
    pub chat_template: Option<String>,
    pub no_stats: bool,
}

pub struct ListOpts {
    pub json: bool,
}

pub struct PsOpts {
    pub url: crate::http_client::Url,
    /// `--api-key` or `LLAMA_API_KEY`; never empty, never holding a control character.
    pub api_key: Option<String>,
    pub json: bool,
}

pub struct BackendsOpts {
    pub json: bool,
    /// `-m MODEL`, resolved to a path.
    pub model: Option<PathBuf>,
    pub ctx_size: u32,
    /// The cache types the `-m` estimate reserves KV cache for.
    pub cache: KvCacheParams,
    pub action: Option<BackendsAction>,
    /// `--rpc`: RPC servers whose devices to list too.
    pub rpc: Vec<String>,
    pub rpc_timeout: Duration,
}

pub struct RpcServerOpts {
    /// `host:port`.
    pub endpoint: String,
    /// Whether the address is loopback (no warning).
    pub loopback: bool,
    pub threads: i32,
    pub cache: Option<PathBuf>,
    pub backend: BackendChoice,
}

pub struct EmbedOpts {
    pub load: LoadOpts,
    /// The inputs: the -p texts, then the file's lines.
    pub inputs: Vec<String>,
    /// Where each input came from, for errors (`-p 2`, `FILE line 7`).
    pub origins: Vec<String>,
    pub params: llama_host::EmbedParams,
    pub normalize: llama_host::Normalize,
    pub json: bool,
    pub no_stats: bool,
}

pub struct BenchOpts {
    pub load: LoadOpts,
    pub args: args::BenchArgs,
    pub threads: i32,
    /// `--spec`: the speculation benchmark instead of the pp/tg tests.
    pub spec: Option<SpecParams>,
    /// `--draft-model`, resolved.
    pub draft_model: Option<PathBuf>,
}

#[derive(Clone)]
pub struct ServeOpts {
    /// The models served, and the one preloaded.
    pub catalogue: crate::catalogue::Catalogue,
    pub backend: BackendChoice,
    /// The offload flags, for every model without its own `gpu-layers`.
    pub offload: OffloadRequest,
    /// The KV cache types, for every model without its own.
    pub cache: KvCacheParams,
    pub args: args::ServeArgs,
    pub threads: i32,
    /// `--draft-model`, resolved.
    pub draft_model: Option<PathBuf>,
    /// The API key, from `--api-key`, `LLAMA_API_KEY` or `--api-key-file`; never empty.
    pub api_key: Option<String>,
    pub header_timeout: Duration,
}

impl Options {
    /// Resolves the parsed command line against the environment and the config file.
    pub fn resolve(cli: &Cli, matches: &clap::ArgMatches) -> Result<Options, CliError> {
        let trace_file = std::env::var_os("LLAMA_TRACE_FILE").filter(|f| !f.is_empty()).map(PathBuf::from);
        let trace = match &trace_file {
            Some(p) => Some(std::fs::File::create(p).map_err(|e| CliError::InvalidEnv {
                var: "LLAMA_TRACE_FILE",
                value: p.display().to_string(),
                reason: format!("cannot create the trace file: {e}"),
            })?),
            None => None,
        };
        let global = Global {
            verbose: cli.verbose,
            log_format: cli.log_format,
            backend_dirs: cli.backend_dirs.clone(),
            probe_timeout: probe_timeout()?,
        };
        let cfg = config::load(config::locate(cli.config.as_deref()).as_deref())?;
        let sub = matches.subcommand().map(|(_, m)| m).expect("a subcommand is required");
        let command = match &cli.command {
            Command::Run(a) => {
                let mut a = a.clone();
                sampling_from_env(sub, &mut a.sampling)?;
                cfg.apply(sub, &mut a.model, &mut a.ctx, &mut a.sampling);
                cfg.text_default(sub, "system", &mut a.system);
                cfg.text_default(sub, "chat_template", &mut a.chat_template);
                let load = load_opts(&a.model, &a.ctx.cache, &cfg)?;
                let prompt = match (a.prompt, &a.file) {
                    (Some(p), _) => p,
                    (None, Some(f)) => std::fs::read_to_string(f).map_err(|source| CliError::ArgFile { flag: "--file", path: f.clone(), source })?,
                    (None, None) => unreachable!("clap requires -p or -f"),
                };
                let mut generate = generate_options(&a.sampling, !a.chat)?;
                generate.spec = spec_options(&a.spec)?;
                let session = session_params(&a.ctx, load.cache)?;
                session.validate()?;
                CommandOpts::Run(RunOpts {
                    load,
                    gen: Generation { session, generate, draft_model: draft_path(&a.spec, &cfg)? },
                    prompt,
                    chat: a.chat,
                    system: a.system,
                    chat_template: a.chat_template,
                    no_stats: a.no_stats,
                })
            }
            Command::Chat(a) => {
                let mut a = a.clone();
                sampling_from_env(sub, &mut a.sampling)?;
                cfg.apply(sub, &mut a.model, &mut a.ctx, &mut a.sampling);
                cfg.text_default(sub, "system", &mut a.system);
                cfg.text_default(sub, "chat_template", &mut a.chat_template);
                let load = load_opts(&a.model, &a.ctx.cache, &cfg)?;
                let mut generate = generate_options(&a.sampling, false)?;
                generate.spec = spec_options(&a.spec)?;
                let session = session_params(&a.ctx, load.cache)?;
                session.validate()?;
                CommandOpts::Chat(ChatOpts {
                    load,
                    gen: Generation { session, generate, draft_model: draft_path(&a.spec, &cfg)? },
                    system: a.system,
                    chat_template: a.chat_template,
                    no_stats: a.no_stats,
                })
            }
            Command::List(a) => CommandOpts::List(ListOpts { json: a.json }),
            Command::Backends(a) => {
                let mut cache = a.cache.clone();
                cfg.apply_cache(sub, &mut cache);
                CommandOpts::Backends(BackendsOpts {
                    json: a.json,
                    // Only the report needs no model; an install needs none either.
                    model: match (&a.action, &a.model) {
                        (None, Some(name)) => Some(models::resolve_name(name, &cfg)?),
                        _ => None,
                    },
                    ctx_size: a.ctx_size,
                    cache: kv_cache(&cache)?,
                    action: a.action.clone(),
                    rpc: a.rpc.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
                    rpc_timeout: a.rpc_timeout.0,
                })
            }
            Command::Bench(a) => {
                let mut a = a.clone();
                cfg.apply_model(sub, &mut a.model);
                cfg.apply_threads(sub, &mut a.threads);
                cfg.apply_cache(sub, &mut a.cache);
                let load = load_opts(&a.model, &a.cache, &cfg)?;
                let threads = threads("threads", a.threads)?;
                let spec = spec_options(&a.spec)?;
                let draft_model = draft_path(&a.spec, &cfg)?;
                CommandOpts::Bench(BenchOpts { load, args: a, threads, spec, draft_model })
            }
            Command::Embed(a) => CommandOpts::Embed(embed_opts(sub, a, &cfg)?),
            Command::Serve(a) => {
                let mut a = a.clone();
                cfg.apply_model(sub, &mut a.model);
                cfg.apply_threads(sub, &mut a.threads);
                cfg.apply_cache(sub, &mut a.cache);
                let cache = kv_cache(&a.cache)?;
                let catalogue = crate::catalogue::resolve(&a, &cfg)?;
                let backend = a.model.backend.parse().unwrap_or(BackendChoice::Auto);
                let offload = a.model.offload();
                let api_key = api_key(sub, &a)?;
                let threads = threads("threads", a.threads)?;
                let header_timeout = header_timeout(a.header_timeout)?;
                // Checked here so a bad flag fails before anything loads.
                spec_options(&a.spec)?;
                let draft_model = draft_path(&a.spec, &cfg)?;
                CommandOpts::Serve(ServeOpts { catalogue, backend, offload, cache, args: a, threads, draft_model, api_key, header_timeout })
            }
            Command::Ps(a) => CommandOpts::Ps(ps_opts(sub, a)?),
            Command::RpcServer(a) => {
                let threads = threads("threads", a.threads)?;
                let host = a.host.trim();
                if host.is_empty() || host.contains(char::is_whitespace) {
                    return Err(CliError::InvalidArg { field: "--host", reason: format!("'{}' is not a host name or address", a.host) });
                }
                // ggml splits HOST:PORT at the first colon: an IPv6 address cannot be given.
                if host.contains(':') {
                    return Err(CliError::InvalidArg { field: "--host", reason: format!("'{host}': IPv6 addresses are not supported by the RPC server; use an IPv4 address or a name") });
                }
                let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                let cache = match &a.cache {
                    Some(dir) => {
                        std::fs::create_dir_all(dir).map_err(|source| CliError::ArgFile { flag: "--cache", path: dir.clone(), source })?;
                        Some(dir.clone())
                    }
                    None => None,
                };
                CommandOpts::RpcServer(RpcServerOpts {
                    endpoint: format!("{host}:{}", a.port),
                    loopback,
                    threads,
                    cache,
                    backend: a.backend.parse().unwrap_or(BackendChoice::Auto),
                })
            }
        };
        Ok(Options { global, config: cfg, command, trace })
    }
}

/// Most inputs one `llama embed` takes (they are all held in memory with their vectors).
pub const MAX_EMBED_INPUTS: usize = 1_000_000;

fn embed_opts(sub: &clap::ArgMatches, a: &args::EmbedArgs, cfg: &Config) -> Result<EmbedOpts, CliError> {
    let mut a = a.clone();
    cfg.apply_model(sub, &mut a.model);
    cfg.apply_threads(sub, &mut a.threads);
    let cache = CacheArgs { cache_type_k: Default::default(), cache_type_v: Default::default(), flash_attn: Default::default() };
    let load = load_opts(&a.model, &cache, cfg)?;
    let normalize = llama_host::Normalize::new(a.embd_normalize).map_err(|e| CliError::InvalidArg { field: "--embd-normalize", reason: e.to_string() })?;
    let t = threads("threads", a.threads)?;
    let mut inputs = a.prompts.clone();
    let mut origins: Vec<String> = (1..=inputs.len()).map(|i| format!("-p number {i}")).collect();
    if let Some(path) = &a.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).map_err(|source| CliError::ArgFile { flag: "--file", path: path.clone(), source })?
        } else {
            std::fs::read_to_string(path).map_err(|source| CliError::ArgFile { flag: "--file", path: path.clone(), source })?
        };
        // A final line break ends the last line; it does not start another input.
        let body = text.strip_suffix('\n').unwrap_or(&text);
        for (n, line) in body.split('\n').enumerate().filter(|_| !text.is_empty()) {
            inputs.push(line.strip_suffix('\r').unwrap_or(line).to_string());
            origins.push(format!("{} line {}", path.display(), n + 1));
        }
    }
    if inputs.is_empty() {
        return Err(CliError::InvalidArg { field: "--file", reason: "no input: the file is empty".into() });
    }
    if inputs.len() > MAX_EMBED_INPUTS {
        return Err(CliError::InvalidArg { field: "--file", reason: format!("{} inputs is over the limit of {MAX_EMBED_INPUTS}", inputs.len()) });
    }
    if !(1..=llama_host::embed::MAX_EMBED_SEQS).contains(&a.parallel) {
        return Err(CliError::InvalidArg { field: "--parallel", reason: format!("{} is outside 1..={}", a.parallel, llama_host::embed::MAX_EMBED_SEQS) });
    }
    if a.ubatch_size == 0 {
        return Err(CliError::InvalidArg { field: "--ubatch-size", reason: "must be at least 1".into() });
    }
    let params = llama_host::EmbedParams { n_ctx: a.ubatch_size, n_threads: t, n_threads_batch: t, n_seq_max: a.parallel, pooling: a.pooling, flash_attn: a.flash_attn, may_skip_output: false };
    Ok(EmbedOpts { load, inputs, origins, params, normalize, json: a.json, no_stats: a.no_stats })
}

fn load_opts(m: &ModelArgs, cache: &CacheArgs, cfg: &Config) -> Result<LoadOpts, CliError> {
    // The cache types first: a bad combination fails before the model is even looked for.
    let cache = kv_cache(cache)?;
    Ok(LoadOpts { path: models::resolve(m, cfg)?, backend: m.backend.parse().unwrap_or(BackendChoice::Auto), offload: m.offload(), cache })
}

/// `--cache-type-k`, `--cache-type-v` and `--flash-attn` (after the environment and the
/// config filled them in), checked: a quantized V cache with `--flash-attn off` is an error
/// naming both flags, before any backend or model is touched.
pub fn kv_cache(c: &CacheArgs) -> Result<KvCacheParams, CliError> {
    let cache = KvCacheParams { type_k: c.cache_type_k, type_v: c.cache_type_v, flash_attn: c.flash_attn };
    cache.validate().map_err(|_| CliError::InvalidArg {
        field: "--cache-type-v",
        reason: format!(
            "{} needs --flash-attn on or auto, not off (llama.cpp stores a quantized V cache only with flash attention)",
            cache.type_v
        ),
    })?;
    Ok(cache)
}

/// The longest `LLAMA_PROBE_TIMEOUT`: far past any probe that is not hung.
pub const MAX_PROBE_TIMEOUT_S: f64 = 3600.0;

/// How long a backend's probe may take in its child process: 10 s, or
/// `LLAMA_PROBE_TIMEOUT` seconds (a number above 0, at most an hour).
fn probe_timeout() -> Result<Duration, CliError> {
    let Some(value) = std::env::var_os("LLAMA_PROBE_TIMEOUT").filter(|v| !v.is_empty()) else { return Ok(Duration::from_secs(10)) };
    let value = value.to_string_lossy().into_owned();
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= MAX_PROBE_TIMEOUT_S)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| CliError::InvalidEnv {
            var: "LLAMA_PROBE_TIMEOUT",
            value,
            reason: format!("expected seconds, a number above 0 and at most {MAX_PROBE_TIMEOUT_S}"),
        })
}

/// The list-valued generation variables, `LLAMA_STOP` and `LLAMA_LOGIT_BIAS`, where the
/// flag was not given (clap's `env` cannot split a list without also splitting the flag's
/// values). The config fills what is still unset after this.
fn sampling_from_env(m: &clap::ArgMatches, s: &mut SamplingArgs) -> Result<(), CliError> {
    if let Some(stop) = env_list(m, "stop", "LLAMA_STOP")? {
        s.stop = stop;
    }
    if let Some(biases) = env_list(m, "logit_bias", "LLAMA_LOGIT_BIAS")? {
        for b in &biases {
            args::parse_logit_bias(b).map_err(|reason| CliError::InvalidEnv { var: "LLAMA_LOGIT_BIAS", value: b.clone(), reason })?;
        }
        s.logit_bias = biases;
    }
    Ok(())
}

/// A list from the environment variable `var` when flag `id` was not given on the command
/// line: a JSON array of strings when it starts with `[` (for entries with commas or
/// escapes, `["\n\n", "a,b"]`), else comma-separated entries.
fn env_list(m: &clap::ArgMatches, id: &str, var: &'static str) -> Result<Option<Vec<String>>, CliError> {
    if m.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
        return Ok(None);
    }
    let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else { return Ok(None) };
    let value = value.into_string().map_err(|v| CliError::InvalidEnv { var, value: v.to_string_lossy().into_owned(), reason: "not UTF-8".into() })?;
    Ok(Some(parse_list(&value).map_err(|reason| CliError::InvalidEnv { var, value: value.clone(), reason })?))
}

/// `a,b` or `["a", "b"]`.
fn parse_list(value: &str) -> Result<Vec<String>, String> {
    if value.trim_start().starts_with('[') {
        return serde_json::from_str::<Vec<String>>(value).map_err(|e| format!("not a JSON array of strings: {e}"));
    }
    Ok(value.split(',').map(str::to_string).collect())
}

/// The most seconds `--header-timeout` takes: an hour is already far past any client that
/// is still sending headers, and a bound keeps the server's deadline arithmetic in range.
pub const MAX_HEADER_TIMEOUT_S: u64 = 3600;

fn header_timeout(secs: u64) -> Result<Duration, CliError> {
    if !(1..=MAX_HEADER_TIMEOUT_S).contains(&secs) {
        return Err(CliError::InvalidArg {
            field: "--header-timeout",
            reason: format!("{secs} is outside 1..={MAX_HEADER_TIMEOUT_S} seconds"),
        });
    }
    Ok(Duration::from_secs(secs))
}

/// The API key: `--api-key` or `LLAMA_API_KEY`, else `--api-key-file`. An empty key is an
/// error naming where it came from, never "no authentication".
fn api_key(m: &clap::ArgMatches, a: &args::ServeArgs) -> Result<Option<String>, CliError> {
    if let Some(k) = &a.api_key {
        if k.trim().is_empty() {
            let from = match m.value_source("api_key") {
                Some(clap::parser::ValueSource::EnvVariable) => "LLAMA_API_KEY is set but empty",
                _ => "--api-key is empty",
            };
            return Err(CliError::InvalidArg { field: "api key", reason: format!("{from}: give a key, or leave it unset to serve without one") });
        }
        return Ok(Some(k.clone()));
    }
    let Some(f) = &a.api_key_file else { return Ok(None) };
    let text = std::fs::read_to_string(f).map_err(|source| CliError::ArgFile { flag: "--api-key-file", path: f.clone(), source })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(CliError::InvalidArg {
            field: "--api-key-file",
            reason: format!("{} holds no key (it is empty or only whitespace)", f.display()),
        });
    }
    Ok(Some(key.to_string()))
}

/// `llama ps`: the URL parsed (a bad one is a bad argument, before any connection) and the
/// API key checked like `serve`'s: an empty key is an error naming where it came from, and
/// a key with a control character could not be sent as a header.
fn ps_opts(m: &clap::ArgMatches, a: &args::PsArgs) -> Result<PsOpts, CliError> {
    let url = crate::http_client::Url::parse(a.url.trim()).map_err(|source| CliError::InvalidUrl { url: a.url.clone(), source })?;
    let from_env = m.value_source("api_key") == Some(clap::parser::ValueSource::EnvVariable);
    let api_key = match &a.api_key {
        Some(k) if k.trim().is_empty() => {
            let from = if from_env { "LLAMA_API_KEY is set but empty" } else { "--api-key is empty" };
            return Err(CliError::InvalidArg { field: "api key", reason: format!("{from}: give a key, or leave it unset") });
        }
        Some(k) if k.chars().any(char::is_control) => {
            let from = if from_env { "LLAMA_API_KEY" } else { "--api-key" };
            return Err(CliError::InvalidArg { field: "api key", reason: format!("{from} holds a control character (a line break?)") });
        }
        Some(k) => Some(k.clone()),
        None => None,
    };
    Ok(PsOpts { url, api_key, json: a.json })
}

pub fn threads(field: &'static str, t: Option<i32>) -> Result<i32, CliError> {
    match t {
        None => Ok(llama_host::default_threads()),
        Some(t) if t >= 1 => Ok(t),
        Some(t) => Err(CliError::InvalidArg { field, reason: format!("{t} is below 1") }),
    }
}

/// A session's sizes from the context flags, with the cache types `kv_cache` resolved.
pub fn session_params(c: &ContextArgs, cache: KvCacheParams) -> Result<SessionParams, CliError> {
    let t = threads("threads", c.threads)?;
    Ok(SessionParams {
        cache,
        size: ContextSize {
            n_ctx: c.ctx_size,
            n_batch: c.batch_size,
            n_ubatch: c.ubatch_size,
            n_threads: t,
            n_threads_batch: threads("threads-batch", c.threads_batch.or(Some(t)))?,
        },
        cache_tokens: c.cache_tokens.unwrap_or(u32::MAX),
    })
}

/// A seed as given (`-s`, the config): -1 is the default (random) seed; `None` when out
/// of range (u32::MAX is llama.cpp's "random" value, so it is not a seed one can ask for).
pub fn seed(v: i64) -> Option<u32> {
    match v {
        -1 => Some(SamplingParams::default().seed),
        v => u32::try_from(v).ok().filter(|&v| v != u32::MAX),
    }
}

/// `--spec` and its sizes: `None` without speculation. `--draft-model` alone means
/// `--spec draft`; `--spec draft` needs one.
pub fn spec_options(a: &args::SpecArgs) -> Result<Option<SpecParams>, CliError> {
    let bad = |field: &'static str, reason: String| CliError::InvalidArg { field, reason };
    let mode = match (a.spec.as_deref(), a.draft_model.is_some()) {
        (Some("none"), _) | (None, false) => return Ok(None),
        (None, true) => SpecMode::Draft,
        (Some(s), _) => s.parse::<SpecMode>().map_err(|reason| bad("spec", reason))?,
    };
    if mode == SpecMode::Draft && a.draft_model.is_none() {
        return Err(bad("spec", "draft speculation needs a draft model: --draft-model FILE".into()));
    }
    let d = SpecParams::new(mode);
    let p = SpecParams {
        mode,
        draft_max: a.draft_max.unwrap_or(d.draft_max),
        draft_min: a.draft_min.unwrap_or(d.draft_min),
        p_min: a.draft_p_min.unwrap_or(d.p_min),
        ngram_n: a.spec_ngram_n.unwrap_or(d.ngram_n),
    };
    p.validate().map_err(|e| match e {
        llama_host::GenerateError::InvalidParam { field, reason } => bad(spec_flag(&field), reason),
        other => bad("spec", other.to_string()),
    })?;
    Ok(Some(p))
}

/// `--draft-model`, resolved like `-m` (a path, a configured name or a file in a models
/// directory).
fn draft_path(a: &args::SpecArgs, cfg: &Config) -> Result<Option<PathBuf>, CliError> {
    a.draft_model.as_ref().map(|p| crate::models::resolve_name(&p.to_string_lossy(), cfg)).transpose()
}

/// The flag of a speculation field as `SpecParams::validate` names it.
fn spec_flag(field: &str) -> &'static str {
    match field {
        "draft-max" => "draft-max",
        "draft-min" => "draft-min",
        "draft-p-min" => "draft-p-min",
        "spec-ngram-n" => "spec-ngram-n",
        _ => "spec",
    }
}

pub fn generate_options(s: &SamplingArgs, add_special: bool) -> Result<GenerateOptions, CliError> {
    let seed = seed(s.seed).ok_or_else(|| CliError::InvalidArg { field: "seed", reason: format!("{} is outside 0..4294967294 (or -1 for random)", s.seed) })?;
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
        logit_bias: s
            .logit_bias
            .iter()
            .map(|b| args::parse_logit_bias(b).map_err(|reason| CliError::InvalidArg { field: "logit-bias", reason }))
            .collect::<Result<Vec<_>, _>>()?,
        grammar: crate::constraint::grammar(s)?,
    };
    // Checked here too, so a bad value fails before the model loads and names the flag.
    sampling.validate().map_err(|e| CliError::InvalidArg { field: flag_name(e.field), reason: e.reason })?;
    Ok(GenerateOptions { max_tokens: u32::try_from(s.n_predict).ok(), sampling, add_special, stop: s.stop.clone(), spec: None })
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
        // From --grammar, --grammar-file, --json-schema, --json or the config.
        "grammar" => "grammar",
        _ => "sampling parameter",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_variables_split_on_commas_or_parse_as_json() {
        assert_eq!(parse_list("a,b").unwrap(), vec!["a", "b"]);
        assert_eq!(parse_list("one").unwrap(), vec!["one"]);
        assert_eq!(parse_list(r#"["\n\n", "a,b"]"#).unwrap(), vec!["\n\n", "a,b"]);
        assert!(parse_list("[1, 2]").unwrap_err().contains("JSON array of strings"));
    }

    /// `serve` and `bench` take `threads` from the config (and `LLAMA_THREADS`, through clap).
    #[test]
    fn serve_and_bench_take_threads_from_the_config() {
        use clap::{CommandFactory, FromArgMatches};
        let cfg = std::env::temp_dir().join(format!("llama-opts-test-{}.toml", std::process::id()));
        std::fs::write(&cfg, "[defaults]\nthreads = 1\n").unwrap();
        let threads = |argv: &[&str]| {
            let mut v = vec!["llama", "--config", cfg.to_str().unwrap()];
            v.extend_from_slice(argv);
            let m = Cli::command().get_matches_from(v);
            let cli = Cli::from_arg_matches(&m).unwrap();
            match Options::resolve(&cli, &m).ok().unwrap().command {
                CommandOpts::Serve(o) => o.threads,
                CommandOpts::Bench(o) => o.threads,
                _ => unreachable!(),
            }
        };
        assert_eq!(threads(&["serve", "-m", "x.gguf"]), 1);
        assert_eq!(threads(&["bench", "-m", "x.gguf"]), 1);
        assert_eq!(threads(&["serve", "-m", "x.gguf", "-t", "3"]), 3, "the flag beats the config");
        let _ = std::fs::remove_file(&cfg);
    }

    #[test]
    fn a_quantized_v_cache_without_flash_attention_is_a_bad_argument() {
        use llama_host::{CacheType as T, FlashAttn as F};
        let args = |type_k, type_v, flash_attn| CacheArgs { cache_type_k: type_k, cache_type_v: type_v, flash_attn };
        let ok = kv_cache(&args(T::Q8_0, T::Q8_0, F::On)).unwrap();
        assert_eq!((ok.type_k, ok.type_v, ok.flash_attn), (T::Q8_0, T::Q8_0, F::On));
        assert!(kv_cache(&args(T::F16, T::Q4_0, F::Auto)).is_ok(), "auto turns flash attention on for it");
        assert!(kv_cache(&args(T::Q4_0, T::F16, F::Off)).is_ok(), "a quantized K cache needs no flash attention");
        let e = kv_cache(&args(T::F16, T::Q4_0, F::Off)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("--cache-type-v") && e.contains("q4_0") && e.contains("--flash-attn"), "{e}");
    }

    #[test]
    fn header_timeout_is_bounded() {
        assert_eq!(header_timeout(10).unwrap(), Duration::from_secs(10));
        for bad in [0, MAX_HEADER_TIMEOUT_S + 1, u64::MAX] {
            let e = header_timeout(bad).unwrap_err().to_string();
            assert!(e.contains("--header-timeout") && e.contains(&bad.to_string()), "{e}");
        }
    }
}
