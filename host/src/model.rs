//! The library API over a selected backend: `Model::load`, sessions, generation.
//! Checks the file before the backend sees the path: the cheap things first (it exists, is a
//! file, starts with "GGUF"), so the common mistakes get precise errors, then the GGUF
//! validator (crate `llama-gguf`) over the header and tensor table, because llama.cpp aborts
//! the process on some malformed files instead of returning an error. That happens once per
//! load: [`ModelFile::open`] checks and validates, and the same `ModelFile` serves the
//! offload decision (`offload.rs`, the layer fit) and [`Model::load_file`].

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::embed::{EmbedParams, Embedder, Pooling, MAX_EMBED_SEQS};
use crate::error::{GenerateError, LoadError, SessionError};
use crate::ops::{ContextOps, ModelOps};
use crate::select::LoadedBackend;
use crate::session::Session;
use crate::types::{BackendError, ContextParams, ContextSize, Grammar, KvCacheParams, ModelInfo, ModelParams};

/// A model loaded through a backend (or, in tests, any [`ModelOps`]).
pub struct Model {
    // Field order: the model goes before the backend that implements it.
    raw: Box<dyn ModelOps>,
    info: ModelInfo,
    path: PathBuf,
    backend: Option<LoadedBackend>,
    /// The file has a classification head (`cls.weight` or `cls.output.weight`): rank
    /// pooling has something to score with.
    has_classifier: bool,
    /// The file has layers that may apply after the final hidden state when embedding
    /// (a classification head, dense projections: tensors `cls*`, `dense_*`).
    post_hidden_layers: bool,
}

/// A model file checked and validated, not loaded: its header and tensor table, read once
/// for everything that needs them before the load (the GPU layer fit, `llama backends -m`)
/// and then handed to [`Model::load_file`], which does not read them again.
#[derive(Debug, Clone)]
pub struct ModelFile {
    path: PathBuf,
    gguf: llama_gguf::GgufFile,
}

impl ModelFile {
    /// Checks `path` (exists, a non-empty file starting with `GGUF`) and runs the GGUF
    /// validator over it. The errors are [`Model::load`]'s.
    #[tracing::instrument(skip_all, fields(path = %path.as_ref().display()))]
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile, LoadError> {
        let path = path.as_ref();
        Ok(ModelFile { path: path.to_path_buf(), gguf: check_file(path)? })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header, key/values and tensor table.
    pub fn gguf(&self) -> &llama_gguf::GgufFile {
        &self.gguf
    }

    /// The model's memory needs per layer with a KV cache of `n_ctx` tokens of the types
    /// `cache` names (`fit.rs`).
    pub fn footprint(&self, n_ctx: u32, cache: &KvCacheParams) -> Result<crate::fit::ModelFootprint, crate::fit::FitError> {
        crate::fit::ModelFootprint::of(&self.gguf, n_ctx, cache)
    }
}

fn check_file(path: &Path) -> Result<llama_gguf::GgufFile, LoadError> {
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
    Ok(file)
}

impl Model {
    /// Loads a GGUF file through `backend`: [`ModelFile::open`], then [`Model::load_file`].
    #[tracing::instrument(skip_all, fields(path = %path.as_ref().display(), backend = backend.name()))]
    pub fn load(backend: &LoadedBackend, path: impl AsRef<Path>, params: &ModelParams) -> Result<Model, LoadError> {
        Self::load_inner(backend, &ModelFile::open(path)?, params, None)
    }

    /// Loads a file [`ModelFile::open`] already checked and validated (it is not read again
    /// before the backend opens it).
    #[tracing::instrument(skip_all, fields(path = %file.path().display(), backend = backend.name()))]
    pub fn load_file(backend: &LoadedBackend, file: &ModelFile, params: &ModelParams) -> Result<Model, LoadError> {
        Self::load_inner(backend, file, params, None)
    }

    fn load_inner(backend: &LoadedBackend, file: &ModelFile, params: &ModelParams, progress: Option<llama_plugin_api::ProgressSink>) -> Result<Model, LoadError> {
        let path = file.path();
        let path_str = path.to_str().ok_or_else(|| LoadError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path is not valid UTF-8"),
        })?;
        let raw = backend
            .raw()
            .load_model(abi_stable::std_types::RStr::from_str(path_str), crate::boundary::model_params(params, progress))
            .into_result()
            .map_err(|source| match crate::boundary::error(source) {
                // A load parameter the backend refused (an unknown device, a GPU index out of
                // range) is the caller's mistake, not the file's.
                BackendError::InvalidParam { field, reason } => LoadError::InvalidParam { field, reason },
                e @ BackendError::Rpc { .. } => LoadError::Remote(e),
                source => LoadError::Rejected { path: path.to_path_buf(), source },
            })?;
        let raw: Box<dyn ModelOps> = Box::new(crate::boundary::PluginModel(raw));
        let info = raw.info();
        tracing::info!(model = %info.description, params = info.n_params, "model loaded");
        let tensors = &file.gguf().tensors;
        let has_classifier = tensors.iter().any(|t| t.name == "cls.weight" || t.name == "cls.output.weight");
        let post_hidden_layers = tensors.iter().any(|t| t.name.starts_with("cls") || t.name.starts_with("dense_"));
        Ok(Model { raw, info, path: path.to_path_buf(), backend: Some(backend.clone()), has_classifier, post_hidden_layers })
    }

    /// A model implemented by `ops` rather than a backend plugin: the seam tests use to
    /// run sessions and the engine over a fake.
    pub fn from_ops(ops: Box<dyn ModelOps>, path: impl Into<PathBuf>) -> Model {
        let info = ops.info();
        Model { raw: ops, info, path: path.into(), backend: None, has_classifier: false, post_hidden_layers: true }
    }

    /// Like [`Model::load`], reporting load progress (0.0 to 1.0) to `on_progress` on this
    /// thread while the weights load.
    pub fn load_with_progress<F: FnMut(f32)>(
        backend: &LoadedBackend,
        path: impl AsRef<Path>,
        params: &ModelParams,
        on_progress: F,
    ) -> Result<Model, LoadError> {
        Self::load_file_with_progress(backend, &ModelFile::open(path)?, params, on_progress)
    }

    /// Like [`Model::load_file`], reporting load progress (0.0 to 1.0) to `on_progress` on
    /// this thread while the weights load.
    pub fn load_file_with_progress<F: FnMut(f32)>(
        backend: &LoadedBackend,
        file: &ModelFile,
        params: &ModelParams,
        mut on_progress: F,
    ) -> Result<Model, LoadError> {
        extern "C" fn trampoline<F: FnMut(f32)>(user: *mut std::ffi::c_void, progress: f32) {
            // SAFETY: `user` is the `&mut F` below, alive for the synchronous load call.
            let f = unsafe { &mut *(user as *mut F) };
            // A panic must not unwind into llama.cpp's C++ frames.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(progress)));
        }
        let sink = llama_plugin_api::ProgressSink { report: trampoline::<F>, user: &mut on_progress as *mut F as *mut std::ffi::c_void };
        Self::load_inner(backend, file, params, Some(sink))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Bytes exchanged with each RPC server the model lives on, since it loaded.
    pub fn rpc_traffic(&self) -> Vec<crate::RpcTraffic> {
        self.raw.rpc_traffic()
    }

    /// The RPC server this model lost, if any (`BackendError::Rpc` with `Lost`): it cannot
    /// compute until it is loaded again.
    pub fn lost(&self) -> Option<BackendError> {
        self.raw.lost()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backend it was loaded through (`None` for a model made with [`Model::from_ops`]).
    pub fn backend(&self) -> Option<&LoadedBackend> {
        self.backend.as_ref()
    }

    /// Text to tokens, the way prompts are tokenized (special tokens parsed).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>, GenerateError> {
        Ok(self.raw.tokenize(text, add_special, true)?)
    }

    /// The raw bytes of one token; `special` renders control tokens as their text.
    pub fn token_bytes(&self, token: i32, special: bool) -> Result<Vec<u8>, GenerateError> {
        Ok(self.raw.token_bytes(token, special)?)
    }

    /// A GGUF metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        self.raw.meta(key)
    }

    /// Whether `grammar` is usable with this model: the backend builds its grammar sampler
    /// against the model's vocabulary and frees it. `GenerateError::InvalidParam` (field
    /// `grammar`) when it is out of bounds or llama.cpp cannot parse it (the reason is
    /// llama.cpp's), so a server can refuse it before the request is queued.
    pub fn check_grammar(&self, grammar: &Grammar) -> Result<(), GenerateError> {
        Ok(self.raw.check_grammar(grammar)?)
    }

    /// A new inference context: the engine's (several sequences) or a benchmark's. Sessions
    /// make theirs with [`Model::session`].
    pub fn new_context(&self, params: &ContextParams) -> Result<Box<dyn ContextOps>, SessionError> {
        params.size.validate()?;
        validate_cache(&params.cache)?;
        Ok(self.raw.new_context(params)?)
    }

    /// A new embeddings context ([`crate::embed`]). Rank pooling needs a classification
    /// head, which generative models lack (llama.cpp would score with a hidden state).
    pub fn embedder(&self, params: &EmbedParams) -> Result<Embedder, SessionError> {
        let bad = |field: &str, reason: String| Err(SessionError::InvalidParam { field: field.into(), reason });
        if params.n_ctx == 0 {
            return bad("micro-batch size (-ub)", "must be at least 1".into());
        }
        let most = crate::embed::max_embed_tokens(self.info.n_vocab);
        if params.n_ctx > most {
            return bad(
                "micro-batch size (-ub)",
                format!(
                    "{} tokens is over {most} for embeddings with this model: llama.cpp reserves n_vocab ({}) floats per token for logits, at most {} GiB",
                    params.n_ctx,
                    self.info.n_vocab,
                    crate::embed::MAX_EMBED_LOGIT_BYTES >> 30
                ),
            );
        }
        if params.n_threads < 1 || params.n_threads_batch < 1 {
            return bad("threads (-t)", "must be at least 1".into());
        }
        if !(1..=MAX_EMBED_SEQS).contains(&params.n_seq_max) {
            return bad("parallel", format!("{} inputs per batch is outside 1..={MAX_EMBED_SEQS}", params.n_seq_max));
        }
        if params.pooling == Some(Pooling::Rank) && !self.has_classifier && self.backend.is_some() {
            return bad("pooling", "rank pooling needs a reranker model (a classification head, cls.weight or cls.output.weight); this model has none".into());
        }
        let params = EmbedParams { may_skip_output: !self.post_hidden_layers, ..*params };
        let raw = self.raw.new_embedder(&params)?;
        Ok(Embedder::new(raw, self.info.n_vocab))
    }

    /// A new session with its own context (KV cache).
    pub fn session(&self, params: &SessionParams) -> Result<Session<'_>, SessionError> {
        Session::new(self, params)
    }
}

/// Sizes and threads of a session; defaults follow llama.cpp's tools.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub size: ContextSize,
    /// The KV cache's element types and flash attention.
    pub cache: KvCacheParams,
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
        SessionParams { size: ContextSize::default(), cache: KvCacheParams::default(), cache_tokens: u32::MAX }
    }
}

impl SessionParams {
    /// Checks the values a backend would refuse less clearly.
    pub fn validate(&self) -> Result<(), SessionError> {
        self.size.validate()?;
        validate_cache(&self.cache)
    }

    pub(crate) fn to_context_params(&self) -> ContextParams {
        ContextParams { size: self.size, n_seq_max: 1, kv_unified: false, cache: self.cache }
    }
}

/// The cache types checked before a backend sees them, as a session's parameter error.
fn validate_cache(cache: &KvCacheParams) -> Result<(), SessionError> {
    cache.validate().map_err(|e| SessionError::InvalidParam { field: e.field.into(), reason: e.reason })
}
