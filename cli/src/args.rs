//! Command-line arguments. Flag names follow llama.cpp's tools where they have one. Every
//! generation flag can also come from an environment variable (`LLAMA_TEMP`, ...) and from
//! the config file; precedence is flag > environment > config > built-in default
//! (see `config.rs`, which fills in the config values after parsing).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(name = "llama", version, about = "Run GGUF models on the best backend this machine has")]
pub struct Cli {
    /// More log output: -v shows the backend report and llama.cpp's log, -vv debug detail.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "LLAMA_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// A directory of backend plugins, searched before the standard places (repeatable).
    #[arg(long = "backend-dir", value_name = "DIR", global = true)]
    pub backend_dirs: Vec<PathBuf>,
    /// Config file (default: $LLAMA_CONFIG, else ~/.config/llama/config.toml if it exists).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Generate a continuation of a prompt, streamed to stdout.
    Run(RunArgs),
    /// Chat with a model: interactive on a terminal, one user turn per line otherwise.
    Chat(ChatArgs),
    /// Show the named models and the GGUF files in the models directory.
    List(ListArgs),
    /// Show which backends were found and which one is used.
    Backends(BackendsArgs),
    /// Measure prompt processing and generation speed (like llama-bench).
    Bench(BenchArgs),
    /// Print embedding vectors of texts (like llama-embedding).
    Embed(EmbedArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API.
    Serve(ServeArgs),
    /// Show the models a running `llama serve` has loaded.
    Ps(PsArgs),
    /// Serve this machine's compute device to other hosts' `--rpc` (ggml's RPC server).
    RpcServer(RpcServerArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RpcServerArgs {
    /// Address to listen on. The protocol has no authentication and no encryption:
    /// anything else than loopback belongs on a trusted network only.
    #[arg(long, default_value = "127.0.0.1", env = "LLAMA_RPC_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 50052, env = "LLAMA_RPC_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// CPU threads for the computations (a CPU device).
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<i32>,
    /// Keep tensors clients send in DIR, by hash, so loading the same model again sends
    /// hashes instead of weights.
    #[arg(long = "cache", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Backend whose devices to serve: auto, cpu, cuda or metal.
    #[arg(long, default_value = "auto", value_name = "NAME", env = "LLAMA_BACKEND")]
    pub backend: String,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Speculative decoding for every served model without its own `spec` setting;
    /// requests may change it with their `speculative` field.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Address to bind; anything but loopback without an API key gets a warning.
    #[arg(long, default_value = "127.0.0.1", env = "LLAMA_HOST")]
    pub host: String,
    /// Port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 8080, env = "LLAMA_PORT")]
    pub port: u16,
    /// Requests decoded together.
    #[arg(long, visible_alias = "np", default_value_t = 4)]
    pub parallel: u32,
    /// Requests that may wait beyond --parallel; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// API key required as `Authorization: Bearer KEY` (not on /health).
    #[arg(long, env = "LLAMA_API_KEY", hide_env_values = true, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// File holding the API key.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Total KV cache in tokens, shared by the --parallel slots.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 8192)]
    pub ctx_size: u32,
    /// Threads for decoding (default: the config's `threads`, else one per hardware thread).
    #[arg(short = 't', long = "threads", allow_hyphen_values = true, env = "LLAMA_THREADS")]
    pub threads: Option<i32>,
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Most new tokens any request may ask for.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Seconds a client has to send its request headers.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// When the model cannot be loaded: `exit` with the error (exit code 3), or `serve`:
    /// keep running and answer /health with 503 and the reason (for supervisors that would
    /// otherwise restart the server in a loop).
    #[arg(long, value_enum, default_value = "exit")]
    pub on_load_error: OnLoadError,
    /// Threads serving HTTP (tokio workers). Decoding runs on the engine's own thread and
    /// llama.cpp's pool; HTTP work is light, and every extra thread competes with them.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub http_threads: u32,
    /// Allow cross-origin (CORS) requests from this origin, e.g. `http://localhost:3000`, or
    /// `*` for any (repeatable). Default: none (pages on other origins are refused).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Do not serve the chat page at `/` (llama-server's --no-webui); the API is unchanged.
    #[arg(long = "no-webui")]
    pub no_webui: bool,
    /// Where a reasoning block (`<think>…</think>`) goes: `auto` (or `deepseek`) puts it in
    /// `reasoning_content`, `none` leaves it in the content. A request's `reasoning_format`
    /// replaces it.
    #[arg(long = "reasoning-format", value_name = "none|auto|deepseek", default_value = "auto", value_parser = reasoning_format_parser())]
    pub reasoning_format: llama_tools::ReasoningFormat,
    /// Pooling of /v1/embeddings: mean, cls or last (none and rank give no vector per
    /// input). Default: what the model file declares; a model that declares none (a
    /// generative model) answers embedding requests with 400 until this is set.
    #[arg(long = "pooling", value_name = "mean|cls|last", env = "LLAMA_POOLING", value_parser = pooling_parser())]
    pub pooling: Option<llama_host::Pooling>,
    /// Seconds a client has to send its request body once its headers are in (408 after).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,
    /// Seconds a streaming client may leave its text unread before its request is
    /// cancelled and its slot freed.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub stall_timeout: u64,
    /// Seconds shutdown (Ctrl-C, SIGTERM) gives open requests before cancelling them.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_timeout: u64,
    /// Longest prompt in bytes, checked before tokenizing (default: 16 bytes per token a
    /// slot holds, at least 64 KiB).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub max_prompt_bytes: Option<u64>,
    /// A directory whose GGUF files are served too, each under its file name without
    /// `.gguf` (repeatable).
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<std::path::PathBuf>,
    /// Most models loaded at once; past it the least recently used idle one is unloaded.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub models_max: u32,
    /// Unload a model idle this many seconds (0: never). A request's `keep_alive` overrides it.
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub idle_unload: u64,
    /// Host memory kept free whatever is loaded, e.g. `1GiB`, `512MiB`.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub memory_reserve: u64,
    /// Most memory the loaded models may hold together (by their estimates), e.g. `3GiB`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,
    /// Seconds a load waits for a busy model to become idle so it can be unloaded
    /// (503 with Retry-After after that).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub load_wait: u64,
}

/// A size in bytes: a number, optionally with a unit: `k`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB` (powers of 1024; `KB`, `MB`, `GB` are powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => return Err(format!("unknown unit '{u}' (use B, KiB, MiB, GiB, TiB)")),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size such as 3GiB or 512MiB"))?;
    let bytes = n * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(bytes as u64)
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLoadError {
    Exit,
    Serve,
}

impl From<GpuLayers> for llama_host::offload::GpuLayers {
    fn from(l: GpuLayers) -> Self {
        use llama_host::offload;
        match l {
            GpuLayers::Auto => offload::GpuLayers::Auto,
            GpuLayers::All => offload::GpuLayers::All,
            GpuLayers::Count(n) => offload::GpuLayers::Count(n),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF path, a name from the config's [models], or a file in the models
    /// directory. Default: the config's default-model, else the default model.
    #[arg(value_name = "MODEL")]
    pub name: Option<String>,
    /// Same as the positional MODEL. Without either: $LLAMA_MODEL, then the config.
    /// `llama serve` takes it more than once (one model each), and `NAME=FILE` names one.
    #[arg(short = 'm', long = "model", value_name = "FILE", conflicts_with = "name", action = clap::ArgAction::Append)]
    pub model: Vec<String>,
    /// Backend: auto, cpu, cuda or metal. A named backend that cannot run is an error.
    #[arg(long, default_value = "auto", value_name = "NAME", env = "LLAMA_BACKEND")]
    pub backend: String,
    /// Layers to offload to the GPU (`-ngl`): a number, `all`, or `auto` (all on a GPU
    /// backend, none on the CPU). Asking for layers where only the CPU is usable is a warning.
    #[arg(long = "gpu-layers", value_name = "N|auto|all", default_value = "auto", env = "LLAMA_GPU_LAYERS", allow_hyphen_values = true)]
    pub gpu_layers: GpuLayers,
    /// GPUs to offload to, by name as `llama backends` lists them (`CUDA0,CUDA1`), or
    /// `none`. Default: every GPU of the backend in use.
    #[arg(long = "device", value_name = "NAME,..|none", env = "LLAMA_DEVICE")]
    pub device: Option<Devices>,
    /// How to spread the model over several GPUs: `none` (only --main-gpu), `layer` (whole
    /// layers per GPU) or `row` (matrices split across GPUs).
    #[arg(long = "split-mode", value_name = "none|layer|row", default_value = "layer", env = "LLAMA_SPLIT_MODE")]
    pub split_mode: SplitModeArg,
    /// With `--split-mode none`, the GPU to use, counted from 0 among the offload devices.
    #[arg(long = "main-gpu", value_name = "N", default_value_t = 0, env = "LLAMA_MAIN_GPU", allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(0..1024))]
    pub main_gpu: u32,
    /// Remote devices: `llama rpc-server`s at HOST:PORT, comma-separated. Their devices join
    /// the offload devices ahead of local GPUs; `-ngl` counts the layers taken off this
    /// machine's CPU (`auto`: all of them).
    #[arg(long = "rpc", value_name = "HOST:PORT,...", env = "LLAMA_RPC")]
    pub rpc: Option<RpcServers>,
    /// The share of the offloaded layers per offload device (remote devices first, in
    /// --rpc order, then local GPUs), as proportions: `3,1`. Default: by free memory.
    #[arg(long = "tensor-split", value_name = "P,...", env = "LLAMA_TENSOR_SPLIT")]
    pub tensor_split: Option<TensorSplit>,
    /// Seconds an RPC server gets to accept the connection and answer the handshake.
    #[arg(long = "rpc-timeout", value_name = "SECONDS", default_value = "5", env = "LLAMA_RPC_TIMEOUT")]
    pub rpc_timeout: Seconds,
    /// Keep the weights in the file's layout: no repacking into the CPU's fastest kernels'
    /// layouts (llama.cpp's --no-repack). Slower prompts; the same kernels as a remote CPU
    /// device (which never repacks), so the same numbers.
    #[arg(long = "no-repack")]
    pub no_repack: bool,
}

/// Most RPC servers one load may use (llama.cpp holds at most 16 offload devices).
pub const MAX_RPC_SERVERS: usize = 16;

/// `--rpc`: RPC server endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcServers(pub Vec<String>);

impl std::str::FromStr for RpcServers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let list: Vec<String> = s.split(',').map(|e| e.trim().to_string()).collect();
        if list.len() > MAX_RPC_SERVERS {
            return Err(format!("{} servers is over the limit of {MAX_RPC_SERVERS}", list.len()));
        }
        for (i, e) in list.iter().enumerate() {
            let ok = e.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains(char::is_whitespace) && !host.contains(':') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(format!("'{e}' is not HOST:PORT (like 192.168.1.10:50052)"));
            }
            if list[..i].contains(e) {
                return Err(format!("'{e}' is named twice"));
            }
        }
        Ok(RpcServers(list))
    }
}

/// `--tensor-split`: proportions per offload device.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSplit(pub Vec<f32>);

impl std::str::FromStr for TensorSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([',', '/']).map(str::trim).collect();
        if parts.len() > MAX_RPC_SERVERS {
            return Err(format!("{} proportions is over the limit of {MAX_RPC_SERVERS} devices", parts.len()));
        }
        let values = parts
            .iter()
            .map(|p| p.parse::<f32>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| format!("'{p}' is not a proportion >= 0")))
            .collect::<Result<Vec<f32>, String>>()?;
        if values.iter().all(|v| *v == 0.0) {
            return Err("every proportion is 0".into());
        }
        Ok(TensorSplit(values))
    }
}

/// A duration in seconds (`2`, `0.5`), between 0.1 s and 10 minutes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub std::time::Duration);

impl std::str::FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<f64>() {
            Ok(v) if (0.1..=600.0).contains(&v) => Ok(Seconds(std::time::Duration::from_secs_f64(v))),
            _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 600")),
        }
    }
}

/// `--device`: which GPUs to offload to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "toml::Value")]
pub enum Devices {
    /// No offload device at all.
    None,
    Named(Vec<String>),
}

impl std::str::FromStr for Devices {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Devices::None);
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).collect();
        if names.iter().any(|n| n.is_empty() || n.contains(char::is_whitespace)) {
            return Err(format!("'{s}' is not a comma-separated list of device names (like CUDA0,CUDA1) or 'none'"));
        }
        Ok(Devices::Named(names))
    }
}

impl TryFrom<toml::Value> for Devices {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => s.parse(),
            toml::Value::Array(items) if items.is_empty() => Ok(Devices::None),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("{i} is not a device name")))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|names| names.join(",").parse()),
            other => Err(format!("{other} is not a device list: expected \"CUDA0,CUDA1\", [\"CUDA0\"] or \"none\"")),
        }
    }
}

/// `--split-mode`, llama.cpp's names.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitModeArg {
    None,
    Layer,
    Row,
}

impl From<SplitModeArg> for llama_host::SplitMode {
    fn from(m: SplitModeArg) -> Self {
        match m {
            SplitModeArg::None => llama_host::SplitMode::None,
            SplitModeArg::Layer => llama_host::SplitMode::Layer,
            SplitModeArg::Row => llama_host::SplitMode::Row,
        }
    }
}

impl ModelArgs {
    /// The offload flags as the host's offload decision takes them (`llama_host::offload`).
    pub fn offload(&self) -> llama_host::offload::OffloadRequest {
        use llama_host::offload;
        llama_host::offload::OffloadRequest {
            gpu_layers: self.gpu_layers.into(),
            devices: match &self.device {
                None => offload::Devices::Every,
                Some(Devices::None) => offload::Devices::None,
                Some(Devices::Named(names)) => offload::Devices::Named(names.clone()),
            },
            split_mode: self.split_mode.into(),
            main_gpu: self.main_gpu,
            rpc: self.rpc.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
            rpc_timeout: self.rpc_timeout.0,
            tensor_split: self.tensor_split.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
            repack: !self.no_repack,
        }
    }
}

/// `--gpu-layers`: how much of the model goes to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "toml::Value")]
pub enum GpuLayers {
    Auto,
    All,
    Count(u32),
}

impl std::str::FromStr for GpuLayers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GpuLayers::Auto),
            "all" | "-1" => Ok(GpuLayers::All),
            n => n.parse::<u32>().map(GpuLayers::Count).map_err(|_| format!("'{n}' is not a layer count, 'auto' or 'all'")),
        }
    }
}

impl TryFrom<toml::Value> for GpuLayers {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => s.parse(),
            toml::Value::Integer(n) if n >= 0 && n <= u32::MAX as i64 => Ok(GpuLayers::Count(n as u32)),
            other => Err(format!("{other} is out of range: expected a layer count >= 0, \"auto\" or \"all\"")),
        }
    }
}

/// Context and threads.
#[derive(Args, Debug, Clone)]
pub struct ContextArgs {
    /// Context length in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096, env = "LLAMA_CTX_SIZE")]
    pub ctx_size: u32,
    /// Threads for generation (default: one per hardware thread).
    #[arg(short = 't', long = "threads", env = "LLAMA_THREADS", allow_hyphen_values = true)]
    pub threads: Option<i32>,
    /// Threads for prompt processing (default: --threads).
    #[arg(long = "threads-batch", visible_alias = "tb", env = "LLAMA_THREADS_BATCH", allow_hyphen_values = true)]
    pub threads_batch: Option<i32>,
    /// Logical batch size: most prompt tokens per decode call.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, env = "LLAMA_BATCH_SIZE")]
    pub batch_size: u32,
    /// Physical micro-batch size.
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512, env = "LLAMA_UBATCH_SIZE")]
    pub ubatch_size: u32,
    /// Most tokens kept in the KV cache for reuse by the next turn; 0 turns the prompt
    /// cache off (default: the whole context).
    #[arg(long = "cache-tokens", env = "LLAMA_CACHE_TOKENS")]
    pub cache_tokens: Option<u32>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// The KV cache's element types and flash attention, llama.cpp's flags (`-ctk`, `-ctv`,
/// `-fa`; `normalize_args` maps the single-dash spellings). Resolved by
/// `opts::kv_cache`, which also checks that a quantized V cache has flash attention.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// K cache type (`-ctk`): f16, or q8_0 / q4_0 for about half / a quarter of the memory.
    #[arg(long = "cache-type-k", visible_alias = "ctk", value_name = "TYPE", default_value = "f16", env = "LLAMA_CACHE_TYPE_K", value_parser = cache_type_parser())]
    pub cache_type_k: llama_host::CacheType,
    /// V cache type (`-ctv`): f16, q8_0 or q4_0; a quantized V cache needs --flash-attn on or auto.
    #[arg(long = "cache-type-v", visible_alias = "ctv", value_name = "TYPE", default_value = "f16", env = "LLAMA_CACHE_TYPE_V", value_parser = cache_type_parser())]
    pub cache_type_v: llama_host::CacheType,
    /// Flash attention (`-fa`): on, off, or auto (llama.cpp decides per device).
    #[arg(long = "flash-attn", visible_alias = "fa", value_name = "on|off|auto", default_value = "auto", env = "LLAMA_FLASH_ATTN", value_parser = flash_attn_parser())]
    pub flash_attn: llama_host::FlashAttn,
}

/// The host's cache type names as clap's possible values, so a bad one is a usage error
/// that lists them (and `--help` shows them).
fn cache_type_parser() -> impl clap::builder::TypedValueParser<Value = llama_host::CacheType> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(llama_host::CacheType::NAMES).map(|s| s.parse().expect("clap let through only the listed names"))
}

fn reasoning_format_parser() -> impl clap::builder::TypedValueParser<Value = llama_tools::ReasoningFormat> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["none", "auto", "deepseek"]).map(|s| llama_tools::ReasoningFormat::parse(&s).expect("clap let through only the listed names"))
}

fn flash_attn_parser() -> impl clap::builder::TypedValueParser<Value = llama_host::FlashAttn> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(llama_host::FlashAttn::NAMES).map(|s| s.parse().expect("clap let through only the listed names"))
}

/// Sampling and output limits.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate; -1 runs until the model stops or the context is full.
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_hyphen_values = true, env = "LLAMA_N_PREDICT")]
    pub n_predict: i32,
    /// Random seed (-1: a random one).
    #[arg(short = 's', long = "seed", default_value_t = -1, allow_hyphen_values = true, env = "LLAMA_SEED")]
    pub seed: i64,
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8, allow_hyphen_values = true, env = "LLAMA_TEMP")]
    pub temp: f32,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", default_value_t = 40, allow_hyphen_values = true, env = "LLAMA_TOP_K")]
    pub top_k: i32,
    /// Top-p (nucleus) sampling (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95, allow_hyphen_values = true, env = "LLAMA_TOP_P")]
    pub top_p: f32,
    /// Min-p sampling (0.0 = off).
    #[arg(long = "min-p", default_value_t = 0.05, allow_hyphen_values = true, env = "LLAMA_MIN_P")]
    pub min_p: f32,
    /// Penalty for repeated tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0, allow_hyphen_values = true, env = "LLAMA_REPEAT_PENALTY")]
    pub repeat_penalty: f32,
    /// How many last tokens the penalties look at (0 = off, -1 = the context).
    #[arg(long = "repeat-last-n", default_value_t = 64, allow_hyphen_values = true, env = "LLAMA_REPEAT_LAST_N")]
    pub repeat_last_n: i32,
    /// Presence penalty (0.0 = off).
    #[arg(long = "presence-penalty", default_value_t = 0.0, allow_hyphen_values = true, env = "LLAMA_PRESENCE_PENALTY")]
    pub presence_penalty: f32,
    /// Frequency penalty (0.0 = off).
    #[arg(long = "frequency-penalty", default_value_t = 0.0, allow_hyphen_values = true, env = "LLAMA_FREQUENCY_PENALTY")]
    pub frequency_penalty: f32,
    /// Stop before this string (repeatable); it never appears in the output.
    /// [env: LLAMA_STOP=, a comma-separated list or a JSON array of strings]
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// Token bias, llama.cpp's syntax: TOKEN_ID(+|-)BIAS, e.g. `15043+1` or `15043-inf`
    /// (repeatable). [env: LLAMA_LOGIT_BIAS=, a comma-separated list or a JSON array]
    #[arg(short = 'l', long = "logit-bias", value_name = "TOKEN(+|-)BIAS", allow_hyphen_values = true)]
    pub logit_bias: Vec<String>,
    /// Constrain the output to this GBNF grammar (llama.cpp's format, start rule `root`).
    #[arg(long = "grammar", value_name = "GBNF", group = "constraint")]
    pub grammar: Option<String>,
    /// Constrain the output to the GBNF grammar in this file.
    #[arg(long = "grammar-file", value_name = "FILE", group = "constraint")]
    pub grammar_file: Option<PathBuf>,
    /// Constrain the output to JSON matching this JSON Schema: the schema itself, or
    /// `@FILE` to read it from a file.
    #[arg(short = 'j', long = "json-schema", value_name = "JSON|@FILE", group = "constraint")]
    pub json_schema: Option<String>,
    /// Constrain the output to JSON matching the JSON Schema in this file.
    #[arg(long = "json-schema-file", value_name = "FILE", group = "constraint")]
    pub json_schema_file: Option<PathBuf>,
    /// Constrain the output to a JSON object (any object).
    #[arg(long = "json", group = "constraint")]
    pub json: bool,
}

/// Speculative decoding (llama.cpp's `--spec-*` flags under their older, shorter names; the
/// new names are aliases).
#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Draft tokens and verify them in each step: `ngram` (prompt lookup: what followed the
    /// last tokens earlier in the prompt and output), `draft` (a small model with the same
    /// vocabulary, --draft-model), or `none`. The output is the same; edits, quotes and
    /// rewrites come faster. Default: none (draft with --draft-model).
    #[arg(long = "spec", value_name = "none|ngram|draft", env = "LLAMA_SPEC")]
    pub spec: Option<String>,
    /// The draft model for `--spec draft`.
    #[arg(long = "draft-model", visible_alias = "model-draft", alias = "spec-draft-model", value_name = "FILE", env = "LLAMA_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// Most tokens drafted per step (1..=64; default 63 for ngram, 8 for draft).
    #[arg(long = "draft-max", alias = "spec-draft-n-max", alias = "draft", value_name = "N")]
    pub draft_max: Option<u32>,
    /// Drafts shorter than this are not verified (default 1).
    #[arg(long = "draft-min", alias = "spec-draft-n-min", value_name = "N")]
    pub draft_min: Option<u32>,
    /// Draft model: stop a draft at a token less likely than this (default 0.5).
    #[arg(long = "draft-p-min", alias = "spec-draft-p-min", value_name = "P")]
    pub draft_p_min: Option<f32>,
    /// ngram: how many last tokens are looked up (1..=16, default 3).
    #[arg(long = "spec-ngram-n", alias = "spec-ngram-simple-size-n", value_name = "N")]
    pub spec_ngram_n: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(short = 'p', long = "prompt", required_unless_present = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file (as llama.cpp's `-f`).
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// Send the prompt through the model's chat template as one user turn.
    #[arg(long)]
    pub chat: bool,
    /// System prompt (with --chat).
    #[arg(long = "system", visible_alias = "sys", env = "LLAMA_SYSTEM")]
    pub system: Option<String>,
    /// Chat template (with --chat): a built-in name (gemma, chatml) or a Jinja file;
    /// default: the model's.
    #[arg(long = "chat-template", value_name = "NAME|FILE", env = "LLAMA_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub ctx: ContextArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print no statistics line to stderr.
    #[arg(long)]
    pub no_stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt.
    #[arg(long = "system", visible_alias = "sys", env = "LLAMA_SYSTEM")]
    pub system: Option<String>,
    /// Chat template: a built-in name (gemma, chatml) or a Jinja file; default: the model's.
    #[arg(long = "chat-template", value_name = "NAME|FILE", env = "LLAMA_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub ctx: ContextArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print no statistics line after each reply.
    #[arg(long)]
    pub no_stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to embed (repeatable: one input each).
    #[arg(short = 'p', long = "prompt", value_name = "TEXT", required_unless_present = "file")]
    pub prompts: Vec<String>,
    /// Embed each line of this file (`-` reads stdin), after the -p texts.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Pooling: none (a vector per token), mean, cls, last or rank. Default: the model's.
    #[arg(long = "pooling", value_name = "none|mean|cls|last|rank", env = "LLAMA_POOLING", value_parser = pooling_parser())]
    pub pooling: Option<llama_host::Pooling>,
    /// Normalisation: -1 none, 0 max-absolute (int16 range), 1 taxicab, 2 Euclidean, p > 2 p-norm.
    #[arg(long = "embd-normalize", value_name = "N", default_value_t = 2, allow_hyphen_values = true)]
    pub embd_normalize: i32,
    /// Print JSON (each input's index, token count and vector) instead of one vector per line.
    #[arg(long)]
    pub json: bool,
    /// Threads (default: the config's `threads`, else one per hardware thread).
    #[arg(short = 't', long = "threads", allow_hyphen_values = true, env = "LLAMA_THREADS")]
    pub threads: Option<i32>,
    /// Tokens one batch holds, and so the longest input (llama.cpp pools per micro-batch).
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Inputs decoded together in one batch.
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 64)]
    pub parallel: u32,
    /// Flash attention (`-fa`). Off by default, unlike generation: with it on, an input's
    /// vector moves slightly with what shares its batch.
    #[arg(long = "flash-attn", visible_alias = "fa", value_name = "on|off|auto", default_value = "off", value_parser = flash_attn_parser())]
    pub flash_attn: llama_host::FlashAttn,
    /// Print no statistics line to stderr.
    #[arg(long)]
    pub no_stats: bool,
}

fn pooling_parser() -> impl clap::builder::TypedValueParser<Value = llama_host::Pooling> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(llama_host::Pooling::NAMES).map(|s| s.parse().expect("clap let through only the listed names"))
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PsArgs {
    /// The server: http://HOST[:PORT][/PATH] (plain HTTP only).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080", env = "LLAMA_URL")]
    pub url: String,
    /// API key, sent as `Authorization: Bearer KEY` (the server's --api-key).
    #[arg(long, value_name = "KEY", env = "LLAMA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the loaded models as a JSON array (the server's entries).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BackendsArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also estimate how many of this model's layers fit on each GPU backend's devices
    /// (a GGUF path or model name; read from the file's header, nothing is loaded).
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: Option<String>,
    /// Context length the estimate reserves KV cache for.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: u32,
    /// The cache types the estimate reserves KV cache for.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Also list the devices of these RPC servers (HOST:PORT,...) with their memory.
    #[arg(long = "rpc", value_name = "HOST:PORT,...", env = "LLAMA_RPC")]
    pub rpc: Option<RpcServers>,
    /// Seconds each RPC server gets to answer.
    #[arg(long = "rpc-timeout", value_name = "SECONDS", default_value = "5", env = "LLAMA_RPC_TIMEOUT")]
    pub rpc_timeout: Seconds,
    #[command(subcommand)]
    pub action: Option<BackendsAction>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BackendsAction {
    /// Check a backend library and copy it into the per-user backends directory.
    Install {
        /// The backend library file.
        file: PathBuf,
        /// Install here instead of the per-user backends directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: u32,
    /// Generated tokens for the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: u32,
    /// Threads (default: the config's `threads`, else one per hardware thread).
    #[arg(short = 't', long = "threads", allow_hyphen_values = true, env = "LLAMA_THREADS")]
    pub threads: Option<i32>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: u32,
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    pub ubatch_size: u32,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Concurrent streams to measure aggregate generation at (comma-separated; empty or 0 skips).
    #[arg(long = "concurrency", value_delimiter = ',', default_value = "1,2,4,8")]
    pub concurrency: Vec<u32>,
    /// New tokens per stream in the concurrency test.
    #[arg(long = "concurrent-tokens", default_value_t = 64)]
    pub concurrent_tokens: u32,
    /// Skip the time-to-first-token test with and without prefix reuse.
    #[arg(long)]
    pub no_prefix_test: bool,
    /// Run the concurrency test in the engine's batch-invariant mode (weights not
    /// repacked, padded batches): what exact, concurrency-independent outputs cost.
    #[arg(long)]
    pub batch_invariant: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// With --spec: measure speculative decoding against none on the workloads of
    /// --spec-workloads (edit, prose, four concurrent edits) instead of the tests above.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// The speculation workloads' directory (edit.prompt, prose.prompt).
    #[arg(long = "spec-workloads", value_name = "DIR", default_value = "bench/spec")]
    pub spec_workloads: PathBuf,
    /// New tokens per request of the edit workloads.
    #[arg(long = "spec-tokens", value_name = "N", default_value_t = 512)]
    pub spec_tokens: u32,
    /// New tokens per request of the prose workload.
    #[arg(long = "spec-prose-tokens", value_name = "N", default_value_t = 256)]
    pub spec_prose_tokens: u32,
}

/// llama.cpp's `--logit-bias` syntax: `TOKEN(+|-)BIAS`, BIAS a number or `inf`.
pub fn parse_logit_bias(s: &str) -> Result<llama_host::LogitBias, String> {
    let bad = || format!("'{s}' is not TOKEN(+|-)BIAS, e.g. 15043+1 or 15043-inf");
    let split = s.char_indices().skip(1).find(|(_, c)| *c == '+' || *c == '-').map(|(i, _)| i).ok_or_else(bad)?;
    let token: i32 = s[..split].parse().map_err(|_| bad())?;
    let bias: f32 = s[split..].parse().map_err(|_| bad())?;
    Ok(llama_host::LogitBias { token, bias })
}

/// llama.cpp spells some flags as multi-letter short options (`-ub 512`, `-tb 4`,
/// `-np 4`, `-ctk q8_0`, `-fa on`); clap does not, so they are rewritten to their long
/// names first (`-fa` would otherwise be `-f a`, `-ctk` `-c tk`).
pub fn normalize_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-ub") => "--ubatch-size".into(),
            Some("-tb") => "--threads-batch".into(),
            Some("-ngl") => "--gpu-layers".into(),
            Some("-sm") => "--split-mode".into(),
            Some("-mg") => "--main-gpu".into(),
            Some("-dev") => "--device".into(),
            Some("-ts") => "--tensor-split".into(),
            Some("-nr") => "--no-repack".into(),
            Some("-np") => "--parallel".into(),
            Some("-ctk") => "--cache-type-k".into(),
            Some("-ctv") => "--cache-type-v".into(),
            Some("-fa") => "--flash-attn".into(),
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("3GiB").unwrap(), 3 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "3 parsecs", "-1GiB", "1e30TiB", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gpu_layers_parse_and_validate() {
        let parse = |v: &str| Cli::try_parse_from(normalize_args(["llama", "run", "-ngl", v, "-p", "x"].iter().map(Into::into)));
        let layers = |v: &str| match parse(v).unwrap().command {
            Command::Run(r) => r.model.gpu_layers,
            _ => panic!("not run"),
        };
        assert_eq!(layers("12"), GpuLayers::Count(12));
        assert_eq!(layers("all"), GpuLayers::All);
        assert_eq!(layers("-1"), GpuLayers::All);
        assert_eq!(layers("auto"), GpuLayers::Auto);
        let e = parse("-3").unwrap_err().to_string();
        assert!(e.contains("--gpu-layers") && e.contains("not a layer count"), "{e}");
        assert!(parse("lots").is_err());
    }

    #[test]
    fn llama_cpp_style_flags_parse() {
        let argv = [
            "llama", "run", "-m", "x.gguf", "-p", "hi", "-n", "32", "-c", "512", "-t", "2", "-b", "64", "-ub", "32", "--seed",
            "7", "--temp", "0", "--top-k", "5", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.3",
            "--repeat-last-n", "32", "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--stop", "a", "--stop",
            "b", "-l", "15-inf",
        ];
        let cli = Cli::parse_from(normalize_args(argv.iter().map(Into::into)));
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!((r.ctx.ctx_size, r.ctx.threads, r.ctx.batch_size, r.ctx.ubatch_size), (512, Some(2), 64, 32));
        let s = &r.sampling;
        assert_eq!((s.n_predict, s.seed, s.temp, s.top_k, s.top_p, s.min_p), (32, 7, 0.0, 5, 0.9, 0.1));
        assert_eq!((s.repeat_penalty, s.repeat_last_n, s.presence_penalty, s.frequency_penalty), (1.3, 32, 0.5, 0.25));
        assert_eq!(s.stop, vec!["a", "b"]);
        assert_eq!(s.logit_bias, vec!["15-inf"]);
    }

    #[test]
    fn a_positional_model_name_parses() {
        let cli = Cli::parse_from(["llama", "run", "gemma", "-p", "hi"]);
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.model.name.as_deref(), Some("gemma"));
    }

    #[test]
    fn negative_n_predict_means_unlimited() {
        let cli = Cli::parse_from(["llama", "run", "-p", "hi", "-n", "-1"]);
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.sampling.n_predict, -1);
    }

    #[test]
    fn offload_flags_parse_and_reach_the_offload_request() {
        use llama_host::offload::{Devices as D, GpuLayers as L, OffloadRequest};
        let model = |args: &[&str]| {
            let mut v = vec!["llama", "run", "-p", "x"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(normalize_args(v.iter().map(|a| a.into()))).map_err(|e| e.to_string())?.command {
                Command::Run(r) => Ok::<_, String>(r.model),
                _ => unreachable!(),
            }
        };
        let m = model(&["-dev", "CUDA0,CUDA1", "-sm", "row", "-mg", "1", "-ngl", "20"]).unwrap();
        assert_eq!(m.device, Some(Devices::Named(vec!["CUDA0".into(), "CUDA1".into()])));
        let r = m.offload();
        assert_eq!((r.gpu_layers, r.split_mode, r.main_gpu), (L::Count(20), llama_host::SplitMode::Row, 1));
        assert_eq!(r.devices, D::Named(vec!["CUDA0".to_string(), "CUDA1".to_string()]));
        let none = model(&["--device", "none", "--split-mode", "none"]).unwrap().offload();
        assert_eq!((none.devices, none.split_mode), (D::None, llama_host::SplitMode::None));
        assert_eq!(model(&[]).unwrap().offload(), OffloadRequest::default());
        for bad in [&["--split-mode", "diagonal"][..], &["--main-gpu", "-1"], &["--device", "CUDA0,,CUDA1"], &["--device", ""]] {
            assert!(model(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn llama_cpp_s_np_and_f_parse() {
        let cli = Cli::parse_from(normalize_args(["llama", "serve", "-m", "x.gguf", "-np", "2"].iter().map(Into::into)));
        let Command::Serve(s) = cli.command else { panic!("not serve") };
        assert_eq!(s.parallel, 2);
        let cli = Cli::parse_from(normalize_args(["llama", "run", "-m", "x.gguf", "-f", "prompt.txt"].iter().map(Into::into)));
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!((r.file, r.prompt), (Some(PathBuf::from("prompt.txt")), None));
        for bad in [&["llama", "run", "-m", "x.gguf"][..], &["llama", "run", "-p", "x", "-f", "y"]] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// llama.cpp's `-ctk`, `-ctv`, `-fa` reach every command that makes a context (and the
    /// `backends -m` estimate); a bad name is a usage error listing the names.
    /// `--rpc`, `--tensor-split` (`-ts`), `--rpc-timeout` and `--no-repack` (`-nr`) reach the
    /// offload request; bad values are refused by name.
    #[test]
    fn rpc_flags_parse_and_bad_values_are_refused() {
        let parse = |argv: &[&str]| Cli::try_parse_from(normalize_args(argv.iter().map(Into::into))).map_err(|e| e.to_string());
        let model = |extra: &[&str]| match parse(&[&["llama", "run", "-p", "x"][..], extra].concat()).map(|c| c.command) {
            Ok(Command::Run(r)) => Ok(r.model.offload()),
            Ok(_) => unreachable!(),
            Err(e) => Err(e),
        };
        let o = model(&["--rpc", "10.0.0.2:50052, host-b:50053", "-ts", "3,1", "--rpc-timeout", "2.5", "-nr"]).unwrap();
        assert_eq!(o.rpc, vec!["10.0.0.2:50052".to_string(), "host-b:50053".to_string()]);
        assert_eq!((o.tensor_split, o.rpc_timeout, o.repack), (vec![3.0, 1.0], std::time::Duration::from_millis(2500), false));
        let d = model(&[]).unwrap();
        assert!(d.rpc.is_empty() && d.tensor_split.is_empty() && d.repack);
        assert_eq!(d.rpc_timeout, std::time::Duration::from_secs(5));
        for (bad, flag) in [
            (&["--rpc", "nohost"][..], "--rpc"),
            (&["--rpc", "a:0"], "--rpc"),
            (&["--rpc", "a:70000"], "--rpc"),
            (&["--rpc", "a:1,a:1"], "named twice"),
            (&["--rpc", "::1:5"], "--rpc"),
            (&["-ts", "1,x"], "--tensor-split"),
            (&["-ts", "0,0"], "every proportion is 0"),
            (&["-ts", "1,-1"], "--tensor-split"),
            (&["--rpc-timeout", "0"], "--rpc-timeout"),
            (&["--rpc-timeout", "1e9"], "--rpc-timeout"),
        ] {
            let e = model(bad).unwrap_err();
            assert!(e.contains(flag), "{bad:?}: {e}");
        }
        let many = (1..=17).map(|i| format!("h:{i}")).collect::<Vec<_>>().join(",");
        assert!(model(&["--rpc", &many]).unwrap_err().contains("limit of 16"));
        match parse(&["llama", "rpc-server", "--host", "0.0.0.0", "--port", "5", "-t", "3", "--cache", "/tmp/c"]).unwrap().command {
            Command::RpcServer(r) => assert_eq!((r.host.as_str(), r.port, r.threads, r.cache.as_deref()), ("0.0.0.0", 5, Some(3), Some(std::path::Path::new("/tmp/c")))),
            _ => unreachable!(),
        }
        match parse(&["llama", "backends", "--rpc", "a:1,b:2"]).unwrap().command {
            Command::Backends(b) => assert_eq!(b.rpc.map(|r| r.0.len()), Some(2)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn cache_flags_parse_on_every_command() {
        use llama_host::{CacheType as T, FlashAttn as F};
        let parse = |argv: &[&str]| Cli::try_parse_from(normalize_args(argv.iter().map(Into::into))).map_err(|e| e.to_string());
        let cache = |argv: &[&str]| match parse(argv).unwrap().command {
            Command::Run(r) => r.ctx.cache,
            Command::Chat(c) => c.ctx.cache,
            Command::Bench(b) => b.cache,
            Command::Serve(s) => s.cache,
            Command::Backends(b) => b.cache,
            Command::List(_) | Command::Ps(_) | Command::Embed(_) | Command::RpcServer(_) => unreachable!(),
        };
        let short = ["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"];
        for cmd in [&["llama", "run", "-p", "x"][..], &["llama", "chat"], &["llama", "bench"], &["llama", "serve"], &["llama", "backends"]] {
            let c = cache(&[cmd, &short[..]].concat());
            assert_eq!((c.cache_type_k, c.cache_type_v, c.flash_attn), (T::Q8_0, T::Q4_0, F::On), "{cmd:?}");
            let d = cache(cmd);
            assert_eq!((d.cache_type_k, d.cache_type_v, d.flash_attn), (T::F16, T::F16, F::Auto), "{cmd:?}");
        }
        let c = cache(&["llama", "run", "-p", "x", "--cache-type-k", "q4_0", "--cache-type-v", "q8_0", "--flash-attn", "off"]);
        assert_eq!((c.cache_type_k, c.cache_type_v, c.flash_attn), (T::Q4_0, T::Q8_0, F::Off));
        let e = parse(&["llama", "run", "-p", "x", "--cache-type-k", "bogus"]).unwrap_err();
        assert!(e.contains("--cache-type-k") && e.contains("f16") && e.contains("q8_0") && e.contains("q4_0"), "{e}");
        let e = parse(&["llama", "run", "-p", "x", "-fa", "maybe"]).unwrap_err();
        assert!(e.contains("--flash-attn") && e.contains("on") && e.contains("auto"), "{e}");
    }

    #[test]
    fn backends_install_parses() {
        let cli = Cli::parse_from(["llama", "backends", "install", "/tmp/x.so"]);
        let Command::Backends(b) = cli.command else { panic!("not backends") };
        assert!(matches!(b.action, Some(BackendsAction::Install { .. })));
    }
}
