//! The library API over a selected backend: `Model::load`, sessions, generation.
//! Checks the file before the backend sees the path: the cheap things first (it exists, is a
//! file, starts with "GGUF"), so the common mistakes get precise errors, then the GGUF
//! validator (crate `llama-gguf`) over the header and tensor table, because llama.cpp aborts
//! the process on some malformed files instead of returning an error.

use std::io::Read;
use std::path::{Path, PathBuf};

use abi_stable::std_types::RStr;
use llama_plugin_api::{BackendError, ContextBox, ContextParams, ModelBox, ModelInfo, ModelParams};

use crate::error::{GenerateError, LoadError, SessionError};
use crate::select::LoadedBackend;
use crate::session::Session;

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
    let started = std::time::Instant::now();
    let file = llama_gguf::validate(path).map_err(LoadError::Invalid)?;
    tracing::debug!(tensors = file.tensors.len(), elapsed_us = started.elapsed().as_micros() as u64, "model file validated");
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
            .map_err(|source| match source {
                // A load parameter the backend refused (an unknown device, a GPU index out of
                // range) is the caller's mistake, not the file's.
                BackendError::InvalidParam { field, reason } => LoadError::InvalidParam { field: field.into_string(), reason: reason.into_string() },
                source => LoadError::Rejected { path: path.to_path_buf(), source },
            })?;
        let info = raw.info();
        tracing::info!(model = %info.description, params = info.n_params, "model loaded");
        Ok(Model { raw, info, path: path.to_path_buf(), backend: backend.clone() })
    }

    /// Like [`Model::load`], reporting load progress (0.0 to 1.0) to `on_progress` on this
    /// thread while the weights load.
    pub fn load_with_progress<F: FnMut(f32)>(
        backend: &LoadedBackend,
        path: impl AsRef<Path>,
        params: &ModelParams,
        mut on_progress: F,
    ) -> Result<Model, LoadError> {
        extern "C" fn trampoline<F: FnMut(f32)>(user: *mut std::ffi::c_void, progress: f32) {
            // SAFETY: `user` is the `&mut F` below, alive for the synchronous load call.
            let f = unsafe { &mut *(user as *mut F) };
            // A panic must not unwind into llama.cpp's C++ frames.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(progress)));
        }
        let mut params = params.clone();
        params.progress = abi_stable::std_types::ROption::RSome(llama_plugin_api::ProgressSink {
            report: trampoline::<F>,
            user: &mut on_progress as *mut F as *mut std::ffi::c_void,
        });
        Model::load(backend, path, &params)
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

    /// The raw bytes of one token; `special` renders control tokens as their text.
    pub fn token_bytes(&self, token: i32, special: bool) -> Result<Vec<u8>, GenerateError> {
        Ok(self.raw.token_bytes(token, special).into_result()?.into_vec())
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
        Session::new(self, params)
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
    /// Most tokens kept in the KV cache between generations for prefix reuse (multi-turn
    /// chat); 0 turns the prompt cache off. Bounded by the context length anyway.
    pub cache_tokens: u32,
}

/// Threads used when none are given: one per hardware thread.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
}

impl Default for SessionParams {
    fn default() -> Self {
        let t = default_threads();
        SessionParams { n_ctx: 4096, n_batch: 2048, n_ubatch: 512, n_threads: t, n_threads_batch: t, cache_tokens: u32::MAX }
    }
}

impl SessionParams {
    /// Checks the values a backend would refuse less clearly.
    pub fn validate(&self) -> Result<(), SessionError> {
        let bad = |field: &str, reason: String| Err(SessionError::InvalidParam { field: field.into(), reason });
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

    pub(crate) fn to_context_params(&self) -> ContextParams {
        ContextParams {
            n_ctx: self.n_ctx,
            n_batch: self.n_batch,
            n_ubatch: self.n_ubatch,
            n_threads: self.n_threads,
            n_threads_batch: self.n_threads_batch,
            n_seq_max: 1,
            kv_unified: false,
        }
    }
}

