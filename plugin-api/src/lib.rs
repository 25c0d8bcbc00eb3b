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

mod gbnf;
/// Checks GBNF text as llama.cpp's parser would, within [`grammar_bounds`]; the error says
/// `line L, column C: <what>` (see the module `gbnf`).
pub use gbnf::check as check_gbnf;

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
    /// Remote devices: the endpoints (`host:port`) of ggml RPC servers (`llama rpc-server`),
    /// whose devices join the offload devices ahead of the local GPUs, in this order.
    pub rpc_servers: RVec<RString>,
    /// How long each RPC server gets to accept the connection and answer the handshake,
    /// in milliseconds.
    pub rpc_timeout_ms: u32,
    /// The share of the offloaded layers each offload device gets (RPC devices first, then
    /// local GPUs), as proportions; empty splits by free memory (llama.cpp's default).
    pub tensor_split: RVec<f32>,
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
            rpc_servers: RVec::new(),
            rpc_timeout_ms: 5_000,
            tensor_split: RVec::new(),
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
    /// Where the weights went, one entry per device that holds any (llama.cpp's own
    /// assignment, as it logged it during the load).
    pub placement: RVec<Placement>,
}

/// The part of a model one device holds.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Placement {
    /// ggml's device name (`CPU`, `CUDA0`, `RPC0`).
    pub device: RString,
    /// What the device is: for a remote device, the RPC server's endpoint.
    pub description: RString,
    /// Repeating layers assigned to the device.
    pub layers: u32,
    /// The device holds the output layer (the head).
    pub output: bool,
    /// Bytes of weights in the device's buffers.
    pub bytes: u64,
}

/// Bytes exchanged with one RPC server since the model loaded (the load included).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct RpcTraffic {
    pub endpoint: RString,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A ggml RPC server as its handshake described it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RemoteServer {
    pub endpoint: RString,
    /// Its RPC protocol version, `major.minor.patch`.
    pub protocol: RString,
    /// Its devices: name (`RPC<n>` in the order given), memory as the server reports it.
    pub devices: RVec<DeviceInfo>,
}

/// How `llama rpc-server` serves this machine's devices.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RpcServeParams {
    /// `host:port` to listen on.
    pub endpoint: RString,
    /// Where the server keeps tensors it was sent, by hash, so a client loading the same
    /// model again sends only hashes (ggml's `-c`); none: no cache.
    pub cache_dir: ROption<RString>,
    pub n_threads: u32,
}

/// Why an RPC server failed a load or a request.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFailure {
    /// Nothing answered at the address within the timeout (refused, unroutable, silent).
    Unreachable,
    /// Something answered but not in this build's protocol (another version, or not an
    /// RPC server at all).
    Protocol,
    /// The server went away after the model was placed on it: the model cannot compute.
    Lost,
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
    /// Constrains the generated text to a GBNF grammar (llama.cpp's grammar sampler).
    pub grammar: ROption<Grammar>,
}

/// A GBNF grammar the generated text must match (llama.cpp's grammar syntax). Only the new
/// output is constrained, never the prompt.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Grammar {
    /// The GBNF rules.
    pub text: RString,
    /// The rule the output must match (usually `root`).
    pub root: RString,
    /// Lazy: the grammar applies only once a trigger appears in the output (a pattern
    /// matches the text generated so far, or a trigger token is sampled); before that the
    /// output is free.
    pub lazy: bool,
    /// Regular expressions that start a lazy grammar: Rust `regex` syntax over bytes
    /// ([`grammar_bounds::trigger_regex`]; no look-around), matched against the output from
    /// its start. The grammar applies from the first capture group (the whole match without
    /// one).
    pub trigger_patterns: RVec<RString>,
    /// Token ids that start a lazy grammar.
    pub trigger_tokens: RVec<i32>,
}

/// Bounds on a grammar, checked before llama.cpp parses it: its recursive-descent parser
/// and its grammar engine have had stack-overflow and memory advisories, so the text is
/// kept well inside what they were tested with.
pub mod grammar_bounds {
    /// Largest grammar text, in bytes.
    pub const MAX_GRAMMAR_BYTES: usize = 1 << 20;
    /// Deepest nesting of parentheses.
    pub const MAX_NESTING: usize = 128;
    /// Largest count in one `{m,n}` repetition, and largest (rules in the repeated item ×
    /// count): llama.cpp's MAX_REPETITION_THRESHOLD. llama.cpp refuses a larger minimum but
    /// silently drops a larger maximum (an unbounded repetition); both are refused here.
    pub const MAX_REPETITION: u64 = 2_000;
    /// Largest sum of the counts of all repetitions (llama.cpp expands each into rules).
    pub const MAX_REPETITION_SUM: u64 = 100_000;
    /// Most rule definitions (`name ::= ...`): llama.cpp walks chains of rule references
    /// recursively, so a long chain is a deep native recursion.
    pub const MAX_RULES: usize = 2_000;
    /// Most calls llama.cpp's left-recursion check may make (one per rule, and one per
    /// leftmost path into a sub-rule, counted before llama.cpp runs it; see
    /// `check_gbnf`): that check re-explores shared sub-rules, exponentially in the worst
    /// case, inside the uncancellable grammar construction. A chain of the 2,000 rules
    /// allowed is ~2,000,000 calls already (quadratic, since every rule is checked from the
    /// top), and parses quickly (tests/tests/grammar.rs), so the cap sits above it.
    pub const MAX_LEFT_RECURSION_CALLS: u64 = 10_000_000;
    /// Most leftmost paths from one rule through its sub-rules: llama.cpp builds one parse
    /// stack per path when a grammar starts, de-duplicating them by linear search, so many
    /// thousands would take seconds before the first token. JSON-schema grammars start in a
    /// handful of ways; a 2,000-rule chain in 2,000.
    pub const MAX_LEFTMOST_PATHS: u64 = 4_096;
    /// Most grammar elements repetitions may copy in all: llama.cpp writes `x{m,n}` out as
    /// copies of x, so `"<1 MB>"{2000}` would be gigabytes. 4,000,000 elements (each a
    /// character or a reference) is about 32 MB.
    pub const MAX_EXPANDED_ELEMENTS: u64 = 4_000_000;
    /// Most trigger patterns of a lazy grammar, and the longest one in bytes.
    pub const MAX_TRIGGER_PATTERNS: usize = 64;
    pub const MAX_TRIGGER_PATTERN_BYTES: usize = 1024;
    /// Largest product of the counted repetitions (`{m,n}`) of one trigger pattern: C++'s
    /// std::regex expands each into copies of its operand.
    pub const MAX_PATTERN_REPETITION_PRODUCT: u64 = 1_000;
    /// Most trigger tokens.
    pub const MAX_TRIGGER_TOKENS: usize = 1024;

    /// Compiles a lazy grammar's trigger pattern the way backends match it: Rust `regex`
    /// syntax over bytes (Unicode off: `\s`, `\w`, `.` and classes see bytes, as C++'s
    /// std::regex saw llama.cpp's std::string), leftmost-first like ECMAScript. The `regex`
    /// crate matches in linear time without recursion, so it has no look-around and no
    /// back-references; a pattern using them is refused with the crate's reason.
    pub fn trigger_regex(pattern: &str) -> Result<regex::bytes::Regex, String> {
        regex::bytes::RegexBuilder::new(pattern).unicode(false).build().map_err(|e| match e {
            // The syntax error's text is a caret diagram; its last line says what is wrong.
            regex::Error::Syntax(text) => {
                text.lines().rev().find_map(|l| l.strip_prefix("error: ")).map_or(text.clone(), str::to_string)
            }
            other => other.to_string(),
        })
    }
    /// Longest rule name given as the root.
    pub const MAX_ROOT_BYTES: usize = 256;
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
            grammar: ROption::RNone,
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
        if let ROption::RSome(g) = &p.grammar {
            g.validate()?;
        }
        Ok(())
    }
}

impl Grammar {
    /// The bounds of [`grammar_bounds`] that need no vocabulary, and the syntax: the text
    /// is parsed as llama.cpp parses it ([`check_gbnf`]: nesting, repetition counts, rule
    /// count, undefined rules, the root rule, each problem with its line and column), the
    /// trigger patterns' sizes. Trigger tokens are checked against the vocabulary by the
    /// backend; left recursion and `<text>` tokens are llama.cpp's to refuse.
    pub fn validate(&self) -> Result<(), ParamError> {
        use grammar_bounds::*;
        let field = "grammar";
        if self.text.len() > MAX_GRAMMAR_BYTES {
            return Err(invalid(field, format!("{} bytes is over the limit of {MAX_GRAMMAR_BYTES}", self.text.len())));
        }
        if self.text.contains('\0') {
            return Err(invalid(field, "the text contains a NUL byte"));
        }
        if self.text.trim().is_empty() {
            return Err(invalid(field, "the text is empty"));
        }
        if self.root.is_empty() {
            return Err(invalid(field, "the root rule name is empty"));
        }
        if self.root.len() > MAX_ROOT_BYTES || self.root.contains('\0') {
            return Err(invalid(field, format!("the root rule name is not a name of at most {MAX_ROOT_BYTES} bytes")));
        }
        check_gbnf(&self.text, &self.root).map_err(|reason| invalid(field, reason))?;
        if !self.lazy && (!self.trigger_patterns.is_empty() || !self.trigger_tokens.is_empty()) {
            return Err(invalid(field, "trigger patterns and tokens need a lazy grammar"));
        }
        if self.trigger_patterns.len() > MAX_TRIGGER_PATTERNS {
            return Err(invalid(field, format!("{} trigger patterns is over the limit of {MAX_TRIGGER_PATTERNS}", self.trigger_patterns.len())));
        }
        for (i, pat) in self.trigger_patterns.iter().enumerate() {
            if pat.is_empty() || pat.len() > MAX_TRIGGER_PATTERN_BYTES {
                return Err(invalid(field, format!("trigger pattern {i} is empty or over {MAX_TRIGGER_PATTERN_BYTES} bytes")));
            }
            if pat.contains('\0') {
                return Err(invalid(field, format!("trigger pattern {i} contains a NUL byte")));
            }
            scan_pattern(pat.as_bytes()).map_err(|reason| invalid(field, format!("trigger pattern {i}: {reason}")))?;
            trigger_regex(pat).map_err(|reason| {
                invalid(field, format!("trigger pattern {i} ({pat:?}) is not supported: {reason} (patterns are Rust regex syntax, matched in linear time)"))
            })?;
        }
        if self.trigger_tokens.len() > MAX_TRIGGER_TOKENS {
            return Err(invalid(field, format!("{} trigger tokens is over the limit of {MAX_TRIGGER_TOKENS}", self.trigger_tokens.len())));
        }
        if self.lazy && self.trigger_patterns.is_empty() && self.trigger_tokens.is_empty() {
            return Err(invalid(field, "a lazy grammar needs a trigger pattern or token"));
        }
        Ok(())
    }
}

/// Reads the decimal number at `s[*i..]` (saturating), moving `*i` past it; None when no digit.
fn number(s: &[u8], i: &mut usize) -> Option<u64> {
    let start = *i;
    let mut n: u64 = 0;
    while let Some(d) = s.get(*i).filter(|c| c.is_ascii_digit()) {
        n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
        *i += 1;
    }
    (*i > start).then_some(n)
}

/// A trigger pattern is compiled by C++'s std::regex, which copies the operand of a counted
/// repetition `{m,n}` up to n times: nested counts multiply. The product of every count
/// in the pattern (an upper bound of the nested ones) is kept small. Escapes and classes
/// are skipped as in ECMAScript regular expressions.
pub fn scan_pattern(s: &[u8]) -> Result<(), String> {
    use grammar_bounds::MAX_PATTERN_REPETITION_PRODUCT as MAX;
    let mut product: u64 = 1;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 1,
            b'[' => {
                i += 1;
                while i < s.len() && s[i] != b']' {
                    i += if s[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' => {
                let mut j = i + 1;
                let m = number(s, &mut j);
                let mut n = m;
                if s.get(j) == Some(&b',') {
                    j += 1;
                    n = number(s, &mut j).or(m);
                }
                product = product.saturating_mul(n.unwrap_or(1).max(1));
                if product > MAX {
                    return Err(format!("its counted repetitions multiply to more than {MAX}"));
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
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
///
/// With `n_draft > 0` the request also verifies drafted tokens (speculative decoding):
/// batch entries `index + 1 ..= index + n_draft` are the drafts, in order, at the positions
/// after entry `index`, all of `seq` and all with logits. The backend samples at `index`; while
/// the sampled token equals the next draft it accepts that draft and samples again from the
/// draft's logits (the same sampler, fed the same history as without drafts, so greedy output
/// and a seeded sampler's draws are what one token per step would give). The first mismatch,
/// an end-of-generation token, or the last draft's logits end it. The rejected drafts' KV
/// cells are removed before `step` returns.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRequest {
    pub seq: i32,
    pub index: i32,
    /// Drafted tokens following entry `index` to verify (0: none).
    pub n_draft: u32,
}

/// What a decode step produced.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    /// The token sampled after the accepted drafts (the next token to decode).
    pub token: i32,
    /// The token ends generation (end of turn / end of sequence).
    pub is_eog: bool,
    /// How many of the request's drafts were accepted, in order, before `token`: the
    /// sequence's output grew by those drafts and then `token`.
    pub accepted: u32,
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
    /// A remote device (ggml RPC server) failed; `endpoint` is the address the user gave.
    Rpc { endpoint: RString, failure: RpcFailure, reason: RString },
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
            BackendError::Rpc { endpoint, failure, reason } => match failure {
                RpcFailure::Unreachable => write!(f, "RPC server {endpoint} is unreachable: {reason}"),
                RpcFailure::Protocol => write!(f, "RPC server {endpoint}: {reason}"),
                RpcFailure::Lost => write!(f, "lost the RPC server {endpoint}: {reason}"),
            },
        }
    }
}

impl std::error::Error for BackendError {}

/// An initialised backend: loads models.
#[sabi_trait]
pub trait Backend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// Loads a GGUF model file.
    fn load_model(&self, path: RStr<'_>, params: ModelParams) -> RResult<ModelBox, BackendError>;

    /// Connects to the ggml RPC server at `endpoint` (within `timeout_ms`), checks its
    /// protocol version and lists its devices. `Rpc` errors say why it cannot be used.
    fn rpc_server_info(&self, endpoint: RStr<'_>, timeout_ms: u32) -> RResult<RemoteServer, BackendError>;

    /// Serves this backend's devices (its GPUs, else the CPU) to remote hosts through
    /// ggml's RPC server. Blocks for as long as the server runs: it returns only when the
    /// server cannot start or stops.
    #[sabi(last_prefix_field)]
    fn rpc_serve(&self, params: RpcServeParams) -> RResult<(), BackendError>;
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

    fn new_context(&self, params: ContextParams) -> RResult<ContextBox, BackendError>;

    /// Builds the grammar sampler for `grammar` against this model's vocabulary and frees
    /// it: `InvalidParam` (field `grammar`) when it is out of bounds or llama.cpp cannot
    /// parse it. Lets a server refuse a bad grammar before queueing the request.
    fn check_grammar(&self, grammar: Grammar) -> RResult<(), BackendError>;

    /// An embeddings context (llama.cpp's `embeddings = true`) with the pooling `params`
    /// asks for. `InvalidParam` (field `pooling`) when the model cannot pool that way.
    fn new_embedder(&self, params: EmbedParams) -> RResult<EmbedderBox, BackendError>;

    /// Bytes exchanged with each RPC server the model was placed on (none without `--rpc`).
    /// The failure of a server the model lives on, once seen, is in `lost`.
    fn rpc_traffic(&self) -> RVec<RpcTraffic>;

    /// The first RPC server this model lost, if any (`BackendError::Rpc` with `Lost`): the
    /// model cannot compute any more and must be loaded again.
    #[sabi(last_prefix_field)]
    fn lost(&self) -> ROption<BackendError>;
}

/// How an embeddings context turns a sequence's per-token hidden states into its vector
/// (llama.cpp's `llama_pooling_type`).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Whatever the model file declares (`<arch>.pooling_type`); none when it declares nothing.
    Model,
    /// No pooling: one vector per token.
    None,
    /// The average over the sequence's tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// The last token's state.
    Last,
    /// A reranker's relevance score (a classification head over the sequence).
    Rank,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Model => "model",
            Pooling::None => "none",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

/// Sizes and threads of an embeddings context.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct EmbedParams {
    /// Tokens one `embed` call may hold in all: the batch, the micro-batch and the KV cache
    /// are all this size, so every sequence is pooled from one micro-batch (llama.cpp pools
    /// per micro-batch: a sequence split across two would get the second part's pooling).
    pub n_ctx: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    /// Most sequences (inputs) in one `embed` call.
    pub n_seq_max: u32,
    pub pooling: Pooling,
    /// Flash attention. Off is the one setting where an input's vector does not depend on
    /// what shares its batch: llama.cpp's CPU flash attention takes one path below 64
    /// queries and a tiled one from 64 on, whose sums depend on where a sequence's cells
    /// sit in the cache (Gemma 3's vectors move by up to 6e-4 in cosine).
    pub flash_attn: FlashAttn,
    /// The host found nothing after the final hidden state that pooling needs (no
    /// classification head, no dense projection layers in the file): the backend may stop
    /// the graph there and pool the hidden states itself instead of running the output
    /// layer (see `backends/core/src/embed.rs`, `Capture`).
    pub may_skip_output: bool,
}

/// What an embeddings context settled on.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedInfo {
    /// Tokens one `embed` call may hold in all (the longest input).
    pub n_ctx: u32,
    pub n_seq_max: u32,
    /// The pooling in effect (never `Model`: the model's own choice, resolved).
    pub pooling: Pooling,
    /// Floats per vector: the model's embedding width, or with `Rank` its score count.
    pub n_out: u32,
}

/// An embeddings context, used by one thread at a time.
#[sabi_trait]
pub trait Embedder: Send {
    fn info(&self) -> EmbedInfo;

    /// A handle that aborts this context's decoding from any thread (see `Context`).
    fn abort_handle(&self) -> AbortBox;

    /// Clears the abort flag.
    fn reset_abort(&mut self);

    /// Decodes several inputs in one batch, each its own sequence: input `i` is the next
    /// `lengths[i]` tokens of `tokens`. Returns the vectors one after another, `n_out`
    /// floats each: one per input, or with `Pooling::None` one per token. Nothing is kept
    /// between calls. `ContextFull` when the tokens exceed `n_ctx`; `InvalidParam` when
    /// there are more inputs than `n_seq_max`, an input is empty or the lengths do not add
    /// up; `InvalidToken` for an id outside the vocabulary. The vectors are not normalised.
    #[sabi(last_prefix_field)]
    fn embed(&mut self, tokens: RSlice<'_, i32>, lengths: RSlice<'_, u32>) -> RResult<RVec<f32>, BackendError>;
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
    /// (at most n_batch tokens) and samples each request in `samples`, in order, verifying
    /// the drafts a request carries (see [`SampleRequest`]).
    ///
    /// The outer error fails the whole step (the decode itself failed, or the arguments are
    /// wrong). Otherwise there is exactly one result per request: a sequence whose sampling
    /// fails (its grammar reached a dead end, or llama.cpp's grammar threw) gets its own
    /// error there, and the other sequences of the step are still sampled. The batch was
    /// decoded either way, so the failed sequence's KV cells hold this step's tokens.
    fn step(
        &mut self,
        batch: RSlice<'_, BatchToken>,
        samples: RSlice<'_, SampleRequest>,
    ) -> RResult<RVec<RResult<Sampled, BackendError>>, BackendError>;

    /// Drafts tokens for sequence `seq` of this context (a draft model's context, for
    /// speculative decoding): removes the sequence's positions from `pos` on, decodes
    /// `tokens` at positions `pos..`, then picks the most likely next token (greedy) up to
    /// `n_max` times, stopping early when its probability is below `p_min`. The drafted
    /// tokens are removed from the KV cache again before returning, so the sequence holds
    /// exactly `pos + tokens.len()` positions. `tokens` must not be empty.
    fn draft(&mut self, seq: i32, tokens: RSlice<'_, i32>, pos: i32, n_max: u32, p_min: f32) -> RResult<RVec<i32>, BackendError>;

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
pub type EmbedderBox = Embedder_TO<'static, RBox<()>>;

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

#[cfg(test)]
mod grammar_tests {
    use super::grammar_bounds::*;
    use super::*;

    fn grammar(text: &str) -> Grammar {
        Grammar { text: text.into(), root: "root".into(), lazy: false, trigger_patterns: RVec::new(), trigger_tokens: RVec::new() }
    }

    fn refused(g: &Grammar) -> String {
        match g.validate() {
            Err(e) => {
                assert_eq!(e.field, "grammar");
                e.reason
            }
            Ok(()) => panic!("accepted: {:?}", &g.text[..g.text.len().min(80)]),
        }
    }

    #[test]
    fn ordinary_grammars_pass() {
        for text in [
            r#"root ::= "yes" | "no""#,
            "root ::= object\nobject ::= \"{\" ws ( string \":\" ws value ( \",\" ws string \":\" ws value )* )? \"}\"\nws ::= [ \\t\\n]*\nstring ::= \"\\\"\" [a-z]* \"\\\"\"\nvalue ::= string | [0-9]+",
            r#"root ::= [a-z]{1,5} ("," [0-9]{2,})*  # a comment with ((( and {99999}"#,
            r#"root ::= "((((" "\"" [(\]] <[42]> <think>"#,
        ] {
            assert_eq!(grammar(text).validate(), Ok(()), "{text}");
        }
    }

    #[test]
    fn a_grammar_over_one_mebibyte_is_refused() {
        let text = format!("root ::= \"{}\"", "a".repeat(MAX_GRAMMAR_BYTES));
        assert!(refused(&grammar(&text)).contains("bytes"));
    }

    #[test]
    fn deep_parentheses_are_refused_but_not_inside_literals_classes_or_comments() {
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(MAX_NESTING + 1), ")".repeat(MAX_NESTING + 1));
        assert!(refused(&grammar(&deep)).contains("nest"));
        let ok = format!("root ::= {}\"a\"{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert_eq!(grammar(&ok).validate(), Ok(()));
        let literal = format!("root ::= \"{}\" [{}] # {}\n", "(".repeat(1000), "(".repeat(1000), "(".repeat(1000));
        assert_eq!(grammar(&literal).validate(), Ok(()));
        // An escaped quote does not end the literal: the parentheses after it are still text.
        let escaped = format!("root ::= \"\\\"{}\"", "(".repeat(1000));
        assert_eq!(grammar(&escaped).validate(), Ok(()));
        // A closing bracket escaped inside a class does not end it.
        let class = format!("root ::= [\\]{}]", "(".repeat(1000));
        assert_eq!(grammar(&class).validate(), Ok(()));
    }

    #[test]
    fn repetition_counts_are_bounded_each_and_in_sum() {
        assert!(refused(&grammar(r#"root ::= "a"{2001}"#)).contains("2001"));
        assert!(refused(&grammar(r#"root ::= "a"{1, 99999999999999999999999}"#)).contains("over"));
        assert!(refused(&grammar(r#"root ::= "a"{ 0 , 20000 }"#)).contains("20000"));
        let many = format!("root ::= {}", "\"a\"{2000} ".repeat(51));
        assert!(refused(&grammar(&many)).contains("add up"));
        assert_eq!(grammar(&format!("root ::= {}", "\"a\"{2000} ".repeat(50))).validate(), Ok(()));
        assert_eq!(grammar(r#"root ::= "{99999}" [{] # {99999}"#).validate(), Ok(()));
    }

    #[test]
    fn too_many_rules_are_refused() {
        let chain: String = (0..=MAX_RULES).map(|i| format!("r{i} ::= r{}\n", i + 1)).collect();
        assert!(refused(&grammar(&chain)).contains("rules"));
    }

    #[test]
    fn nul_bytes_empty_text_and_root_are_refused() {
        assert!(refused(&grammar("root ::= \"a\0\"")).contains("NUL"));
        assert!(refused(&grammar("  ")).contains("empty"));
        let mut g = grammar(r#"root ::= "a""#);
        g.root = "".into();
        assert!(refused(&g).contains("root"));
    }

    #[test]
    fn trigger_bounds() {
        let mut g = grammar(r#"root ::= "a""#);
        g.trigger_tokens = vec![1].into();
        assert!(refused(&g).contains("lazy"));
        g.lazy = true;
        assert_eq!(g.validate(), Ok(()));
        g.trigger_tokens = vec![1; MAX_TRIGGER_TOKENS + 1].into();
        assert!(refused(&g).contains("trigger tokens"));
        g.trigger_tokens = RVec::new();
        assert!(refused(&g).contains("needs a trigger"));
        g.trigger_patterns = vec![RString::from("x"); MAX_TRIGGER_PATTERNS + 1].into();
        assert!(refused(&g).contains("trigger patterns"));
        g.trigger_patterns = vec![RString::from("x".repeat(MAX_TRIGGER_PATTERN_BYTES + 1))].into();
        assert!(refused(&g).contains("pattern 0"));
        g.trigger_patterns = vec![RString::from("((a{100}){100})")].into();
        assert!(refused(&g).contains("multiply"));
        g.trigger_patterns = vec![RString::from(r"[\s\S]*?<tool>\{[0-9]{1,3}\}")].into();
        assert_eq!(g.validate(), Ok(()));
    }

    #[test]
    fn a_trigger_pattern_with_look_around_is_refused_by_name() {
        let mut g = grammar(r#"root ::= "a""#);
        g.lazy = true;
        g.trigger_patterns = vec![RString::from(r"^[\s\S]*?(<tool_call>[\s\S]*)"), RString::from(r"^(?!\s*<think>)\s*(\{[\s\S]*)")].into();
        let reason = refused(&g);
        assert!(reason.contains("trigger pattern 1") && reason.contains(r"(?!\\s*<think>)"), "{reason}");
        assert!(reason.contains("look-around"), "{reason}");
        g.trigger_patterns = vec![RString::from(r"(a)\1")].into();
        assert!(refused(&g).contains("back"), "{}", refused(&g));
    }

    #[test]
    fn sampling_params_validate_their_grammar() {
        let mut p = SamplingParams::default();
        assert_eq!(p.validate(), Ok(()));
        p.grammar = ROption::RSome(grammar("root ::= \0"));
        assert_eq!(p.validate().unwrap_err().field, "grammar");
    }

    /// The layout abi_stable checks at load names the grammar (a plugin built without it
    /// is refused as another layout, besides the version).
    #[test]
    fn the_layout_includes_the_grammar() {
        let layout = format!("{:?}", <SamplingParams as StableAbi>::LAYOUT);
        assert!(layout.contains("grammar") && layout.contains("trigger_patterns"), "{}", &layout[..layout.len().min(400)]);
    }
}
