//! The library's parameter and result types: plain Rust (`String`, `Vec`, `Option`).
//!
//! The plugin ABI has its own FFI-safe twins of these (`llama-plugin-api`, abi_stable's
//! `RString`/`RVec`/`ROption`); they are converted in one place, `boundary.rs`, and never
//! appear in this crate's public API.

/// What kind of hardware a backend computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// How a model is spread over several GPUs (llama.cpp's `split_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMode {
    /// One GPU only: the one `main_gpu` names.
    None,
    /// Whole layers (and their KV cache) per GPU, in proportion to free memory.
    Layer,
    /// Matrices split by rows across GPUs.
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
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    /// Layers to offload to an accelerator, counted from the last; negative means all.
    pub n_gpu_layers: i32,
    pub split_mode: SplitMode,
    /// With `SplitMode::None`: the index, among the offload devices, of the one GPU to use.
    pub main_gpu: i32,
    /// Offload devices by ggml name (`CUDA0`); `None` means every GPU the backend has, an
    /// empty list none at all.
    pub devices: Option<Vec<String>>,
    pub use_mmap: bool,
    /// Let the backend repack weights into layouts for its fastest kernels. Off makes every
    /// token's math independent of how many tokens share a batch (batch-invariant mode).
    pub repack: bool,
    /// RPC servers (`host:port` of `llama rpc-server`s) whose devices join the offload
    /// devices, ahead of the local GPUs.
    pub rpc: Vec<String>,
    /// How long each RPC server gets to connect and answer its handshake.
    pub rpc_timeout: std::time::Duration,
    /// The share of the offloaded layers per offload device (remote ones first); empty:
    /// by free memory.
    pub tensor_split: Vec<f32>,
}

/// The default `--rpc-timeout`.
pub const DEFAULT_RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            n_gpu_layers: 0,
            split_mode: SplitMode::Layer,
            main_gpu: 0,
            devices: None,
            use_mmap: true,
            repack: true,
            rpc: Vec::new(),
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            tensor_split: Vec::new(),
        }
    }
}

/// The part of a model one device holds (as llama.cpp placed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// ggml's device name (`CPU`, `CUDA0`, `RPC0`).
    pub device: String,
    /// For a remote device, its RPC server's address.
    pub description: String,
    /// Repeating layers on the device.
    pub layers: u32,
    /// The device holds the output layer.
    pub output: bool,
    /// Bytes of weights on it.
    pub bytes: u64,
}

/// Bytes exchanged with one RPC server since the model loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcTraffic {
    pub endpoint: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// An RPC server as its handshake described it.
#[derive(Debug, Clone)]
pub struct RemoteServer {
    pub endpoint: String,
    /// Its protocol version, `major.minor.patch`.
    pub protocol: String,
    pub devices: Vec<DeviceInfo>,
}

/// Why an RPC server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFailure {
    /// Nothing answered within the timeout.
    Unreachable,
    /// It answered in another protocol (version), or is not an RPC server.
    Protocol,
    /// It went away after the model was placed on it.
    Lost,
}

/// One logit bias entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitBias {
    pub token: i32,
    pub bias: f32,
}

/// Seed value asking the backend to pick a random seed.
pub const SEED_RANDOM: u32 = u32::MAX;

/// Sampler settings. `temperature <= 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
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
    pub logit_bias: Vec<LogitBias>,
    /// Constrains the generated text to a GBNF grammar; checked with
    /// [`Model::check_grammar`](crate::Model::check_grammar) before a request is queued.
    pub grammar: Option<Grammar>,
}

/// A GBNF grammar the generated text must match (llama.cpp's grammar syntax). Only the new
/// output is constrained, never the prompt. Bounds (size, nesting, repetition counts,
/// triggers) are checked before llama.cpp parses it; see docs/API.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    /// The GBNF rules.
    pub text: String,
    /// The rule the output must match (usually `root`).
    pub root: String,
    /// Lazy: the grammar applies only once a trigger pattern matches the output so far or
    /// a trigger token is sampled.
    pub lazy: bool,
    /// Regular expressions (ECMAScript) that start a lazy grammar.
    pub trigger_patterns: Vec<String>,
    /// Token ids that start a lazy grammar.
    pub trigger_tokens: Vec<i32>,
}

impl Grammar {
    /// A grammar applied from the first generated token, matched from rule `root`.
    pub fn new(text: impl Into<String>) -> Grammar {
        Grammar { text: text.into(), root: "root".into(), lazy: false, trigger_patterns: Vec::new(), trigger_tokens: Vec::new() }
    }
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
            seed: SEED_RANDOM,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }
}

/// A parameter value out of range, by field name (`top_p`, `temperature`, `cache-type-v`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ParamError {
    pub field: &'static str,
    pub reason: String,
}

impl SamplingParams {
    /// Checks every value; the error names the field. Backends check too, but callers can
    /// fail early with this. The rules are the plugin ABI's own, so the two never disagree.
    pub fn validate(&self) -> Result<(), ParamError> {
        crate::boundary::sampling(self).validate().map_err(|e| ParamError { field: e.field, reason: e.reason })
    }
}

/// One compute device as a backend sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub description: String,
    /// Bytes; 0 when unknown.
    pub memory_total: u64,
    pub memory_free: u64,
}

/// Static facts about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Short name used on the command line (`cpu`, `cuda`, `metal`).
    pub name: String,
    pub accelerator: Accelerator,
    /// Version of the backend library itself.
    pub version: String,
    /// Which llama.cpp it links.
    pub llama_build: String,
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// llama.cpp's one-line description ("gemma3 270M Q4_K - Medium").
    pub description: String,
    pub n_params: u64,
    pub size_bytes: u64,
    pub n_vocab: i32,
    pub n_ctx_train: u32,
    /// Beginning-of-sequence token, or -1.
    pub bos: i32,
    /// Where the weights went, per device (empty for models not loaded by a plugin).
    pub placement: Vec<Placement>,
}

/// The sizes every inference context is made with, shared by sessions, the engine and the
/// benchmark (one struct instead of the same fields in each of their parameter types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextSize {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Logical batch: the most tokens handed to one decode call.
    pub n_batch: u32,
    /// Physical micro-batch.
    pub n_ubatch: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
}

impl Default for ContextSize {
    /// llama.cpp's tools' defaults, one thread per hardware thread.
    fn default() -> Self {
        let t = crate::default_threads();
        ContextSize { n_ctx: 4096, n_batch: 2048, n_ubatch: 512, n_threads: t, n_threads_batch: t }
    }
}

impl ContextSize {
    /// Checks the values a backend would refuse less clearly; the field names the flag.
    pub fn validate(&self) -> Result<(), crate::SessionError> {
        let bad = |field: &str, reason: String| Err(crate::SessionError::InvalidParam { field: field.into(), reason });
        if self.n_ctx == 0 {
            return bad("context length (-c)", "must be at least 1".into());
        }
        if self.n_batch == 0 {
            return bad("batch size (-b)", "must be at least 1".into());
        }
        if self.n_ubatch == 0 {
            return bad("micro-batch size (-ub)", "must be at least 1".into());
        }
        if self.n_threads < 1 {
            return bad("threads (-t)", format!("{} is below 1", self.n_threads));
        }
        if self.n_threads_batch < 1 {
            return bad("batch threads (-tb)", format!("{} is below 1", self.n_threads_batch));
        }
        Ok(())
    }
}

/// The element type of the K or V cache, by llama.cpp's names (`--cache-type-k`,
/// `--cache-type-v`): the quantized types hold about half (q8_0) or a quarter (q4_0) of
/// f16's bytes per token, at some precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum CacheType {
    #[default]
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl CacheType {
    pub const ALL: [CacheType; 3] = [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    /// The names `FromStr` takes, in `ALL`'s order (for a command line's list of values).
    pub const NAMES: [&'static str; 3] = ["f16", "q8_0", "q4_0"];

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

    /// Bytes per element as a fraction `(bytes, elements)`, ggml's block size: f16 `(2, 1)`,
    /// q8_0 `(34, 32)` (32 int8 and an f16 scale), q4_0 `(18, 32)`. A fraction, not an
    /// `f64`, so a size estimate can round up exactly.
    pub fn bytes_per_element(self) -> (u64, u64) {
        match self {
            CacheType::F16 => (2, 1),
            CacheType::Q8_0 => (34, 32),
            CacheType::Q4_0 => (18, 32),
        }
    }
}

/// A name `FromStr` does not know, with the names it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a {what} (expected one of: {})", expected.join(", "))]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

impl std::str::FromStr for CacheType {
    type Err = UnknownName;
    /// llama.cpp's names, exactly (`f16`, `q8_0`, `q4_0`).
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        CacheType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| UnknownName {
            what: "KV cache type",
            value: s.to_string(),
            expected: &CacheType::NAMES,
        })
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When llama.cpp uses flash attention (`--flash-attn`). A quantized V cache needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    /// llama.cpp decides per device, and turns it on for a quantized V cache.
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttn {
    pub const ALL: [FlashAttn; 3] = [FlashAttn::On, FlashAttn::Off, FlashAttn::Auto];
    /// The names `FromStr` takes, in `ALL`'s order.
    pub const NAMES: [&'static str; 3] = ["on", "off", "auto"];

    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttn::Auto => "auto",
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
        }
    }
}

impl std::str::FromStr for FlashAttn {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        FlashAttn::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| UnknownName {
            what: "flash attention setting",
            value: s.to_string(),
            expected: &FlashAttn::NAMES,
        })
    }
}

impl std::fmt::Display for FlashAttn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The KV cache's element types and flash attention: what a context stores per token.
/// The default is llama.cpp's: f16 keys and values, flash attention `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KvCacheParams {
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub flash_attn: FlashAttn,
}

impl KvCacheParams {
    /// Bytes per K cache element as `(bytes, elements)`: see [`CacheType::bytes_per_element`].
    pub fn bytes_per_element_k(&self) -> (u64, u64) {
        self.type_k.bytes_per_element()
    }

    /// Bytes per V cache element as `(bytes, elements)`.
    pub fn bytes_per_element_v(&self) -> (u64, u64) {
        self.type_v.bytes_per_element()
    }

    /// A quantized V cache needs flash attention on or auto; the error names `cache-type-v`
    /// and `flash-attn`. The rule is the plugin ABI's own, so host and backend never disagree.
    pub fn validate(&self) -> Result<(), ParamError> {
        crate::boundary::validate_kv_cache(self)
    }
}

/// Sizes and threads of one inference context, with its sequence layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextParams {
    pub size: ContextSize,
    /// Sequences the context holds at once (parallel requests).
    pub n_seq_max: u32,
    /// One KV buffer shared by all sequences (llama.cpp's `kv_unified`).
    pub kv_unified: bool,
    /// The KV cache's element types and flash attention.
    pub cache: KvCacheParams,
}

impl Default for ContextParams {
    /// One sequence with its own cache, llama.cpp's tools' sizes and cache types.
    fn default() -> Self {
        ContextParams { size: ContextSize::default(), n_seq_max: 1, kv_unified: false, cache: KvCacheParams::default() }
    }
}

/// One token of a multi-sequence batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchToken {
    pub token: i32,
    /// Position of the token in its sequence.
    pub pos: i32,
    pub seq: i32,
    /// Compute logits for this token (it will be sampled from).
    pub logits: bool,
}

/// Sample the next token of `seq` with its sampler from batch entry `index`'s logits, after
/// verifying the `n_draft` drafted tokens that follow that entry in the batch (speculative
/// decoding: each draft is accepted only if the sampler, fed the same history, picks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRequest {
    pub seq: i32,
    pub index: i32,
    pub n_draft: u32,
}

impl SampleRequest {
    /// A request without drafts.
    pub fn new(seq: i32, index: i32) -> SampleRequest {
        SampleRequest { seq, index, n_draft: 0 }
    }
}

/// What a decode step produced for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    /// The token sampled after the accepted drafts.
    pub token: i32,
    /// The token ends generation (end of turn / end of sequence).
    pub is_eog: bool,
    /// Drafts accepted before `token` (their KV cells stay; the rejected ones' are gone).
    pub accepted: u32,
}

/// Every error a backend can return.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("llama.cpp could not load the model: {reason}")]
    ModelLoad { reason: String },
    #[error("could not create the context: {reason}")]
    ContextCreate { reason: String },
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error("tokenization failed: {reason}")]
    Tokenize { reason: String },
    #[error("token id {token} is not in the vocabulary")]
    InvalidToken { token: i32 },
    #[error("{needed} tokens do not fit in the context of {n_ctx} tokens")]
    ContextFull { n_ctx: u32, needed: u32 },
    #[error("no free KV cache slot for the batch")]
    NoKvSlot,
    #[error("llama_decode failed with code {code}")]
    Decode { code: i32 },
    #[error("aborted")]
    Aborted,
    #[error("backend unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("backend panicked: {message}")]
    Panic { message: String },
    /// The backend broke its contract (say, fewer sampled tokens than asked for).
    #[error("the backend broke its contract: {what}")]
    Protocol { what: String },
    /// A remote device failed: its server is unreachable, speaks another protocol, or went
    /// away (then the model cannot compute until it is loaded again).
    #[error("{}", rpc_message(endpoint, *failure, reason))]
    Rpc { endpoint: String, failure: RpcFailure, reason: String },
}

fn rpc_message(endpoint: &str, failure: RpcFailure, reason: &str) -> String {
    match failure {
        RpcFailure::Unreachable => format!("RPC server {endpoint} is unreachable: {reason}"),
        RpcFailure::Protocol => format!("RPC server {endpoint}: {reason}"),
        RpcFailure::Lost => format!("lost the RPC server {endpoint}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_round_trip() {
        for (t, name) in CacheType::ALL.into_iter().zip(CacheType::NAMES) {
            assert_eq!((t.as_str(), name.parse::<CacheType>().unwrap()), (name, t));
            // The config file's names (serde) are the same.
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{name}\""));
        }
        for (f, name) in FlashAttn::ALL.into_iter().zip(FlashAttn::NAMES) {
            assert_eq!((f.as_str(), name.parse::<FlashAttn>().unwrap()), (name, f));
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{name}\""));
        }
        let e = "q5_1".parse::<CacheType>().unwrap_err().to_string();
        assert_eq!(e, "'q5_1' is not a KV cache type (expected one of: f16, q8_0, q4_0)");
        assert!("Q8_0".parse::<CacheType>().is_err(), "llama.cpp's names are lower case");
        assert!("yes".parse::<FlashAttn>().unwrap_err().to_string().contains("on, off, auto"));
    }

    #[test]
    fn the_default_cache_is_llama_cpps() {
        let d = KvCacheParams::default();
        assert_eq!((d.type_k, d.type_v, d.flash_attn), (CacheType::F16, CacheType::F16, FlashAttn::Auto));
        assert_eq!((d.bytes_per_element_k(), d.bytes_per_element_v()), ((2, 1), (2, 1)));
        let q = KvCacheParams { type_k: CacheType::Q8_0, type_v: CacheType::Q4_0, ..d };
        assert_eq!((q.bytes_per_element_k(), q.bytes_per_element_v()), ((34, 32), (18, 32)));
        assert_eq!(ContextParams::default().cache, d);
    }

    #[test]
    fn a_quantized_v_cache_needs_flash_attention() {
        for type_v in [CacheType::Q8_0, CacheType::Q4_0] {
            for flash_attn in [FlashAttn::On, FlashAttn::Auto] {
                assert!(KvCacheParams { type_v, flash_attn, ..Default::default() }.validate().is_ok());
            }
            let e = KvCacheParams { type_v, flash_attn: FlashAttn::Off, ..Default::default() }.validate().unwrap_err();
            assert_eq!(e.field, "cache-type-v");
            assert!(e.reason.contains(type_v.as_str()) && e.reason.contains("flash-attn"), "{e}");
        }
        // A quantized K cache works without flash attention, as in llama.cpp.
        let k_only = KvCacheParams { type_k: CacheType::Q4_0, flash_attn: FlashAttn::Off, ..Default::default() };
        assert!(k_only.validate().is_ok());
    }
}
