//! The library API over a selected backend: `Model::load`, sessions, generation.
//! Checks the cheap things (the file exists, is a file, starts with "GGUF") before the
//! backend sees the path, so the common mistakes get precise errors.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RStr};
use llama_plugin_api::{ContextBox, ContextParams, ModelBox, ModelInfo, ModelParams, SamplingParams};

use crate::error::{GenerateError, LoadError, SessionError};
use crate::select::LoadedBackend;
use crate::utf8::Utf8Stream;

/// A model loaded through a backend.
pub struct Model {
    // Field order: the model goes before the backend that implements it.
    raw: ModelBox,
    info: ModelInfo,
    path: PathBuf,
    backend: LoadedBackend,
}

fn check_file(path: &Path) -> Result<(), LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound { path: path.to_path_buf() },
        _ => LoadError::Io { path: path.to_path_buf(), source },
    })?;
    if meta.is_dir() {
        return Err(LoadError::IsDirectory { path: path.to_path_buf() });
    }
    if meta.len() == 0 {
        return Err(LoadError::Empty { path: path.to_path_buf() });
    }
    let mut magic = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut magic))
        .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    if magic != b"GGUF" {
        return Err(LoadError::NotGguf { path: path.to_path_buf(), found: format!("{:?}", String::from_utf8_lossy(&magic)) });
    }
    Ok(())
}

impl Model {
    /// Loads a GGUF file through `backend`.
    #[tracing::instrument(skip_all, fields(path = %path.as_ref().display(), backend = backend.name()))]
    pub fn load(backend: &LoadedBackend, path: impl AsRef<Path>, params: &ModelParams) -> Result<Model, LoadError> {
        let path = path.as_ref();
        check_file(path)?;
        let path_str = path.to_str().ok_or_else(|| LoadError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path is not valid UTF-8"),
        })?;
        let raw = backend
            .raw()
            .load_model(RStr::from_str(path_str), params.clone())
            .into_result()
            .map_err(|source| LoadError::Rejected { path: path.to_path_buf(), source })?;
        let info = raw.info();
        tracing::info!(model = %info.description, params = info.n_params, "model loaded");
        Ok(Model { raw, info, path: path.to_path_buf(), backend: backend.clone() })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn backend(&self) -> &LoadedBackend {
        &self.backend
    }

    /// Text to tokens, the way prompts are tokenized (special tokens parsed).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>, GenerateError> {
        Ok(self.raw.tokenize(RStr::from_str(text), add_special, true).into_result()?.into_vec())
    }

    /// The raw bytes of one token.
    pub fn token_bytes(&self, token: i32) -> Result<Vec<u8>, GenerateError> {
        Ok(self.raw.token_bytes(token).into_result()?.into_vec())
    }

    /// A GGUF metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        self.raw.meta(RStr::from_str(key)).into_option().map(|s| s.into_string())
    }

    pub(crate) fn new_context(&self, params: ContextParams) -> Result<ContextBox, SessionError> {
        Ok(self.raw.new_context(params).into_result()?)
    }

    /// A new session with its own context (KV cache).
    pub fn session(&self, params: &SessionParams) -> Result<Session<'_>, SessionError> {
        let ctx = self.new_context(params.to_context_params())?;
        Ok(Session { model: self, ctx })
    }
}

/// Sizes and threads of a session; defaults follow llama.cpp's tools.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
}

/// Threads used when none are given: one per hardware thread.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
}

impl Default for SessionParams {
    fn default() -> Self {
        let t = default_threads();
        SessionParams { n_ctx: 4096, n_batch: 2048, n_ubatch: 512, n_threads: t, n_threads_batch: t }
    }
}

impl SessionParams {
    pub(crate) fn to_context_params(&self) -> ContextParams {
        ContextParams {
            n_ctx: self.n_ctx,
            n_batch: self.n_batch,
            n_ubatch: self.n_ubatch,
            n_threads: self.n_threads,
            n_threads_batch: self.n_threads_batch,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate; `None` runs until end of generation or a full context.
    pub max_tokens: Option<u32>,
    pub sampling: SamplingParams,
    /// Add BOS and other special tokens the model expects around a prompt.
    pub add_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: None, sampling: SamplingParams::default(), add_special: true }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing, including sampling the first token.
    pub prompt_time: Duration,
    /// Decoding the generated tokens after the first.
    pub generation_time: Duration,
    /// Single-token decode steps timed in `generation_time`.
    pub decode_steps: usize,
    pub finish: FinishReason,
}

impl GenerationStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_time)
    }
    pub fn generation_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.generation_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// One conversation with a model: a context and its KV cache.
pub struct Session<'m> {
    model: &'m Model,
    ctx: ContextBox,
}

impl Session<'_> {
    pub fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    /// Generates a continuation of `prompt`, handing text to `on_text` as it is produced.
    /// `on_text` returns `Break` to stop. Starts from an empty context each time.
    #[tracing::instrument(skip_all, fields(prompt_bytes = prompt.len(), max_tokens = ?opts.max_tokens))]
    pub fn generate(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, GenerateError> {
        let tokens = self.model.tokenize(prompt, opts.add_special)?;
        if tokens.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let n_ctx = self.ctx.n_ctx();
        if tokens.len() > n_ctx as usize {
            return Err(GenerateError::PromptTooLong { tokens: tokens.len(), n_ctx });
        }
        self.ctx.clear();
        self.ctx.set_sampling(opts.sampling.clone()).into_result()?;
        let mut stats = GenerationStats {
            prompt_tokens: tokens.len(),
            generated_tokens: 0,
            prompt_time: Duration::ZERO,
            generation_time: Duration::ZERO,
            decode_steps: 0,
            finish: FinishReason::Length,
        };
        if opts.max_tokens == Some(0) {
            let t = Instant::now();
            self.ctx.decode(RSlice::from_slice(&tokens), false).into_result()?;
            stats.prompt_time = t.elapsed();
            return Ok(stats);
        }
        let t = Instant::now();
        let mut next = self.ctx.decode_sample(RSlice::from_slice(&tokens)).into_result()?;
        stats.prompt_time = t.elapsed();
        let t = Instant::now();
        let mut text = Utf8Stream::default();
        stats.finish = loop {
            if next.is_eog {
                break FinishReason::Stop;
            }
            stats.generated_tokens += 1;
            let piece = text.push(&self.model.token_bytes(next.token)?);
            if !piece.is_empty() && on_text(&piece).is_break() {
                break FinishReason::Cancelled;
            }
            if opts.max_tokens.is_some_and(|m| stats.generated_tokens >= m as usize) {
                break FinishReason::Length;
            }
            if self.ctx.n_past() >= n_ctx {
                break FinishReason::ContextFull;
            }
            next = self.ctx.decode_sample(RSlice::from_slice(&[next.token])).into_result()?;
            stats.decode_steps += 1;
        };
        stats.generation_time = t.elapsed();
        let rest = text.finish();
        if !rest.is_empty() {
            let _ = on_text(&rest);
        }
        tracing::debug!(generated = stats.generated_tokens, finish = ?stats.finish, "generation done");
        Ok(stats)
    }
}
