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
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { n_gpu_layers: 0, split_mode: SplitMode::Layer, main_gpu: 0, devices: None, use_mmap: true, repack: true }
    }
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
        }
    }
}

/// A sampling value out of range, by field name (`top_p`, `temperature`, ...).
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

/// Sizes and threads of one inference context, with its sequence layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextParams {
    pub size: ContextSize,
    /// Sequences the context holds at once (parallel requests).
    pub n_seq_max: u32,
    /// One KV buffer shared by all sequences (llama.cpp's `kv_unified`).
    pub kv_unified: bool,
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

/// Sample the next token of `seq` with its sampler from batch entry `index`'s logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRequest {
    pub seq: i32,
    pub index: i32,
}

/// What a decode step produced for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    pub token: i32,
    /// The token ends generation (end of turn / end of sequence).
    pub is_eog: bool,
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
}
