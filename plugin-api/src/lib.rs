//! The stable ABI between the `llama` host and its compute backends.
//!
//! A backend is a shared library exporting one abi_stable root module, [`BackendModRef`].
//! Everything that crosses the boundary is declared here with `#[derive(StableAbi)]`, so the
//! host can check a library's layout before calling into it. Calls are coarse: one call per
//! decode step; logits and samplers stay inside the backend and only token ids cross.
//! This crate must never depend on llama.cpp.

// abi_stable's `sabi_trait` expands to impls inside a generated module.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

pub use abi_stable;

/// The plugin ABI version (this crate's version). A backend built against another major
/// version is refused at load.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The root module's name; a library whose root module has another name is not a backend.
pub const ROOT_MODULE_NAME: &str = "llama_backend";

/// What kind of hardware a backend computes on.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Cpu,
    Cuda,
    Metal,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Cpu => "cpu",
            Accelerator::Cuda => "cuda",
            Accelerator::Metal => "metal",
        }
    }
}

/// Static facts about a backend, known without touching the hardware.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct BackendInfo {
    /// Short name used on the command line (`cpu`, `cuda`, `metal`).
    pub name: RString,
    pub accelerator: Accelerator,
    /// Version of the backend library itself.
    pub version: RString,
    /// Which llama.cpp it links (binding crate version and llama.cpp build).
    pub llama_build: RString,
}

/// One compute device as the backend sees it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct DeviceInfo {
    pub name: RString,
    pub description: RString,
    /// Bytes; 0 when unknown.
    pub memory_total: u64,
    pub memory_free: u64,
}

/// The answer to "can you run here, and how well?".
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ProbeReport {
    pub usable: bool,
    /// Higher is better; only compared between usable backends.
    pub score: u32,
    /// A sentence for the user: why it is usable or not.
    pub reason: RString,
    pub devices: RVec<DeviceInfo>,
}

/// Severity of a log line coming from the backend (llama.cpp's own log included).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// Where a backend sends its log lines. Called from any backend thread.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogSink {
    pub log: extern "C" fn(LogLevel, RStr<'_>),
}

/// How a model is spread over several GPUs (llama.cpp's `split_mode`).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMode {
    /// One GPU only: the one `main_gpu` names.
    None,
    /// Whole layers (and their KV cache) per GPU, in proportion to free memory.
    Layer,
    /// Matrices split by rows across GPUs (tensor parallelism where the backend supports it).
    Row,
    /// llama.cpp's experimental tensor-parallel meta device.
    Tensor,
}

impl SplitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitMode::None => "none",
            SplitMode::Layer => "layer",
            SplitMode::Row => "row",
            SplitMode::Tensor => "tensor",
        }
    }
}

/// How to load a model file.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to an accelerator, counted from the last; negative means all.
    /// A backend without GPU devices (the CPU one) has nothing to offload to.
    pub n_gpu_layers: i32,
    pub split_mode: SplitMode,
    /// With `SplitMode::None`: the index, among the offload devices, of the one GPU to use.
    pub main_gpu: i32,
    /// Offload devices by ggml name (`CUDA0`, `MTL0`); `None` means every GPU the backend
    /// has, an empty list none at all. A name the backend does not have is an error.
    pub devices: ROption<RVec<RString>>,
    pub use_mmap: bool,
    /// Let the backend repack weights into layouts for its fastest kernels (llama.cpp's
    /// "extra buffer types"). Off makes every token's math independent of how many
    /// tokens share a batch, at some prompt-processing speed.
    pub repack: bool,
    /// Told the load progress (0.0 to 1.0) while the weights load.
    pub progress: ROption<ProgressSink>,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            n_gpu_layers: 0,
            split_mode: SplitMode::Layer,
            main_gpu: 0,
            devices: ROption::RNone,
            use_mmap: true,
            repack: true,
            progress: ROption::RNone,
        }
    }
}

/// A load-progress callback: `report(user, progress)`, called on the loading thread during
/// `load_model` only. `user` is the caller's, passed back untouched.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ProgressSink {
    pub report: extern "C" fn(user: *mut std::ffi::c_void, progress: f32),
    pub user: *mut std::ffi::c_void,
}

/// Facts about a loaded model.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ModelInfo {
    /// llama.cpp's one-line description ("gemma3 270M Q4_K - Medium").
    pub description: RString,
    pub n_params: u64,
    pub size_bytes: u64,
    pub n_vocab: i32,
    pub n_ctx_train: u32,
    /// Beginning-of-sequence token, or -1.
    pub bos: i32,
}

/// The element type of the K or V cache (llama.cpp's `type_k`/`type_v`). The quantized
/// types hold about half (q8_0) or a quarter (q4_0) of f16's bytes, at some precision.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    F16,
    Q8_0,
    Q4_0,
}

impl CacheType {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
        }
    }

    pub fn is_quantized(self) -> bool {
        self != CacheType::F16
    }
}

/// When llama.cpp uses flash attention (its `flash_attn_type`). A quantized V cache needs
/// it: `Off` with one is refused.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashAttn {
    /// llama.cpp decides per device (and turns it on for a quantized V cache).
    Auto,
    On,
    Off,
}

impl FlashAttn {
    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttn::Auto => "auto",
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
        }
    }
}

/// Sizes and threads of one inference context.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ContextParams {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Logical batch: the most tokens handed to one decode call.
    pub n_batch: u32,
    /// Physical micro-batch.
    pub n_ubatch: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    /// Sequences the context holds at once (parallel requests).
    pub n_seq_max: u32,
    /// One KV buffer shared by all sequences (llama.cpp's `kv_unified`): a batch of tokens
    /// from several sequences is one micro-batch, and the caller keeps each sequence within
    /// its share. Off: each sequence gets `n_ctx / n_seq_max` cells of its own.
    pub kv_unified: bool,
    /// Element types of the K and V caches.
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub flash_attn: FlashAttn,
}

/// Sampler settings. `temperature <= 0` means greedy.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u32,
    /// Added to the logits of these tokens before sampling (`-inf` bans a token).
    pub logit_bias: RVec<LogitBias>,
}

/// One logit bias entry.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct LogitBias {
    pub token: i32,
    pub bias: f32,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults (common/common.h).
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: u32::MAX,
            logit_bias: RVec::new(),
        }
    }
}

/// A sampling value out of range, by field name (`top_p`, `temperature`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ParamError {}

impl From<ParamError> for BackendError {
    fn from(e: ParamError) -> Self {
        BackendError::invalid_param(e.field, e.reason)
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ParamError {
    ParamError { field, reason: reason.into() }
}

impl SamplingParams {
    /// Checks every value; the error names the field. Backends check too (the host
    /// may be another program), but callers can fail early with this.
    pub fn validate(&self) -> Result<(), ParamError> {
        let p = self;
        if !p.temperature.is_finite() || p.temperature < 0.0 {
            return Err(invalid("temperature", format!("{} is not a number >= 0", p.temperature)));
        }
        if p.top_k < 0 {
            return Err(invalid("top_k", format!("{} is below 0", p.top_k)));
        }
        if !(0.0..=1.0).contains(&p.top_p) {
            return Err(invalid("top_p", format!("{} is outside 0..=1", p.top_p)));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(invalid("min_p", format!("{} is outside 0..=1", p.min_p)));
        }
        if !p.repeat_penalty.is_finite() || p.repeat_penalty <= 0.0 {
            return Err(invalid("repeat_penalty", format!("{} is not a number > 0", p.repeat_penalty)));
        }
        if p.repeat_last_n < -1 {
            return Err(invalid("repeat_last_n", format!("{} is below -1", p.repeat_last_n)));
        }
        if !p.frequency_penalty.is_finite() {
            return Err(invalid("frequency_penalty", "not a finite number"));
        }
        if !p.presence_penalty.is_finite() {
            return Err(invalid("presence_penalty", "not a finite number"));
        }
        if let Some(b) = p.logit_bias.iter().find(|b| b.bias.is_nan()) {
            return Err(invalid("logit_bias", format!("bias for token {} is not a number", b.token)));
        }
        Ok(())
    }
}

/// llama.cpp's rule for the KV cache types: a quantized V cache is only stored by flash
/// attention, so it cannot be combined with `FlashAttn::Off` (llama.cpp would refuse the
/// context with a log line only). The error names both settings by their flag names.
pub fn validate_kv_cache(type_v: CacheType, flash_attn: FlashAttn) -> Result<(), ParamError> {
    if type_v.is_quantized() && flash_attn == FlashAttn::Off {
        return Err(invalid(
            "cache-type-v",
            format!("a quantized V cache ({}) needs flash attention: flash-attn on or auto, not off", type_v.as_str()),
        ));
    }
    Ok(())
}

/// Seed value asking the backend to pick a random seed.
pub const SEED_RANDOM: u32 = u32::MAX;

/// One token of a multi-sequence batch.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchToken {
    pub token: i32,
    /// Position of the token in its sequence.
    pub pos: i32,
    pub seq: i32,
    /// Compute logits for this token (it will be sampled from).
    pub logits: bool,
}

/// Sample the next token of `seq` with its sampler from batch entry `index`'s logits.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRequest {
    pub seq: i32,
    pub index: i32,
}

/// What a decode step produced.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    pub token: i32,
    /// The token ends generation (end of turn / end of sequence).
    pub is_eog: bool,
}

/// Every error a backend can return. Typed: the host maps each kind to its own error.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum BackendError {
    /// llama.cpp refused the model file; `reason` is its last error line.
    ModelLoad { reason: RString },
    /// The context could not be created (usually: not enough memory for the KV cache).
    ContextCreate { reason: RString },
    /// A parameter is out of range.
    InvalidParam { field: RString, reason: RString },
    /// The text could not be tokenized.
    Tokenize { reason: RString },
    /// A token id outside the vocabulary.
    InvalidToken { token: i32 },
    /// Tokens would not fit in the context.
    ContextFull { n_ctx: u32, needed: u32 },
    /// llama_decode found no KV slot for the batch.
    NoKvSlot,
    /// llama_decode failed with this code.
    Decode { code: i32 },
    /// The operation was aborted by the host.
    Aborted,
    /// The backend cannot run here (the hardware or driver is missing).
    Unavailable { reason: RString },
    /// A panic inside the backend, caught at the boundary.
    Panic { message: RString },
}

impl BackendError {
    /// `InvalidParam` naming `field`: how every backend reports a parameter it refuses.
    pub fn invalid_param(field: &str, reason: impl Into<String>) -> Self {
        BackendError::InvalidParam { field: RString::from(field), reason: RString::from(reason.into()) }
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::ModelLoad { reason } => write!(f, "llama.cpp could not load the model: {reason}"),
            BackendError::ContextCreate { reason } => write!(f, "could not create the context: {reason}"),
            BackendError::InvalidParam { field, reason } => write!(f, "invalid {field}: {reason}"),
            BackendError::Tokenize { reason } => write!(f, "tokenization failed: {reason}"),
            BackendError::InvalidToken { token } => write!(f, "token id {token} is not in the vocabulary"),
            BackendError::ContextFull { n_ctx, needed } => {
                write!(f, "{needed} tokens do not fit in the context of {n_ctx} tokens")
            }
            BackendError::NoKvSlot => write!(f, "no free KV cache slot for the batch"),
            BackendError::Decode { code } => write!(f, "llama_decode failed with code {code}"),
            BackendError::Aborted => write!(f, "aborted"),
            BackendError::Unavailable { reason } => write!(f, "backend unavailable: {reason}"),
            BackendError::Panic { message } => write!(f, "backend panicked: {message}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// An initialised backend: loads models.
#[sabi_trait]
pub trait Backend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// Loads a GGUF model file.
    #[sabi(last_prefix_field)]
    fn load_model(&self, path: RStr<'_>, params: ModelParams) -> RResult<ModelBox, BackendError>;
}

/// A loaded model: tokenizer and weights. Contexts keep the model alive on their own.
#[sabi_trait]
pub trait Model: Send + Sync {
    fn info(&self) -> ModelInfo;

    /// Text to token ids. `add_special` adds BOS where the model wants it;
    /// `parse_special` turns `<start_of_turn>`-style text into control tokens.
    fn tokenize(&self, text: RStr<'_>, add_special: bool, parse_special: bool) -> RResult<RVec<i32>, BackendError>;

    /// The bytes of one token (may be an incomplete UTF-8 sequence). `special` renders
    /// control tokens (`<start_of_turn>`) as their text instead of nothing.
    fn token_bytes(&self, token: i32, special: bool) -> RResult<RVec<u8>, BackendError>;

    /// A GGUF metadata value as a string, if the key exists.
    fn meta(&self, key: RStr<'_>) -> ROption<RString>;

    #[sabi(last_prefix_field)]
    fn new_context(&self, params: ContextParams) -> RResult<ContextBox, BackendError>;
}

/// One inference context (KV cache + sampler), used by one thread at a time.
#[sabi_trait]
pub trait Context: Send {
    /// Context length in tokens.
    fn n_ctx(&self) -> u32;

    /// Tokens currently held in the KV cache (read from llama.cpp, so it stays true after
    /// an aborted or failed decode).
    fn n_past(&self) -> u32;

    /// Forgets everything in the KV cache and resets the sampler.
    fn clear(&mut self);

    /// Keeps the first `n_keep` tokens of the KV cache and drops the rest. Returns false
    /// when the cache cannot drop just those (a sliding-window cache that already evicted
    /// what would be needed); the caller then clears and decodes from scratch.
    fn truncate(&mut self, n_keep: u32) -> bool;

    /// Adds tokens to the sampler's history (for repetition penalties) without decoding:
    /// the prompt, which llama.cpp's tools also count as history.
    fn accept(&mut self, tokens: RSlice<'_, i32>);

    /// A handle that aborts this context's decoding from any thread: a decode in progress
    /// stops at its next check (between graph nodes) and returns `Aborted`. The flag stays
    /// set until `reset_abort`.
    fn abort_handle(&self) -> AbortBox;

    /// Clears the abort flag.
    fn reset_abort(&mut self);

    /// Sequences this context holds at once.
    fn n_seq_max(&self) -> u32;

    /// Replaces the sampler of sequence `seq`; `history` (the prompt) feeds its repetition
    /// penalties.
    fn set_seq_sampling(&mut self, seq: i32, params: SamplingParams, history: RSlice<'_, i32>) -> RResult<(), BackendError>;

    /// One decode step over several sequences (continuous batching): decodes `batch`
    /// (at most n_batch tokens) and samples each request in `samples`, in order.
    fn step(&mut self, batch: RSlice<'_, BatchToken>, samples: RSlice<'_, SampleRequest>) -> RResult<RVec<Sampled>, BackendError>;

    /// Removes positions `[p0, p1)` of sequence `seq` (`p1 < 0`: to the end) from the KV
    /// cache. Returns false if that cannot be done (see `truncate`).
    fn seq_remove(&mut self, seq: i32, p0: i32, p1: i32) -> bool;

    /// The last position sequence `seq` holds, or -1 when it holds none.
    fn seq_pos_max(&self, seq: i32) -> i32;

    /// Whether sequence `seq` can continue at position `pos` (a sliding-window cache
    /// keeps the window before it).
    fn seq_can_continue(&self, seq: i32, pos: i32) -> bool;

    /// Replaces the sampler chain.
    fn set_sampling(&mut self, params: SamplingParams) -> RResult<(), BackendError>;

    /// Appends tokens to the KV cache in micro-batches, without sampling.
    /// Logits are computed for the last token only when `logits_last` is set.
    fn decode(&mut self, tokens: RSlice<'_, i32>, logits_last: bool) -> RResult<(), BackendError>;

    /// One generation step: appends `tokens` (a prompt, or the previously sampled token)
    /// and samples the next token from the last position.
    #[sabi(last_prefix_field)]
    fn decode_sample(&mut self, tokens: RSlice<'_, i32>) -> RResult<Sampled, BackendError>;
}

/// Aborts a context's decoding from another thread.
#[sabi_trait]
pub trait AbortHandle: Send + Sync {
    #[sabi(last_prefix_field)]
    fn abort(&self);
}

pub type AbortBox = AbortHandle_TO<'static, RBox<()>>;
pub type BackendBox = Backend_TO<'static, RBox<()>>;
pub type ModelBox = Model_TO<'static, RBox<()>>;
pub type ContextBox = Context_TO<'static, RBox<()>>;

/// The root module every backend library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = BackendModRef)))]
#[sabi(missing_field(panic))]
pub struct BackendMod {
    /// CPU features the library was compiled to use (`avx2`, `fma`, ...). The host checks
    /// them before calling any function of the library: code built for a feature the CPU
    /// lacks dies with SIGILL.
    pub required_cpu_features: RSlice<'static, RStr<'static>>,

    pub info: extern "C" fn() -> BackendInfo,

    /// Looks at the hardware without initialising anything heavy.
    pub probe: extern "C" fn() -> ProbeReport,

    /// Initialises the backend; logs from now on go to `sink`.
    #[sabi(last_prefix_field)]
    pub init: extern "C" fn(sink: LogSink) -> RResult<BackendBox, BackendError>,
}

impl RootModule for BackendModRef {
    declare_root_module_statics! {BackendModRef}
    const BASE_NAME: &'static str = "llama_backend";
    const NAME: &'static str = ROOT_MODULE_NAME;
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
