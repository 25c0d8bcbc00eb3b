//! Typed errors, one enum per operation, and the umbrella [`Error`].

use std::path::PathBuf;

use crate::types::BackendError;

/// No backend could be selected.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("no usable backend:\n  {}", reasons.join("\n  "))]
    NoneUsable { reasons: Vec<String> },
    #[error("backend '{name}' cannot be used here:\n  {}", if reasons.is_empty() { "no plugin found".to_string() } else { reasons.join("\n  ") })]
    Unavailable { name: String, reasons: Vec<String> },
    #[error("unknown backend '{name}' (known: {known}, or auto)")]
    Unknown { name: String, known: String },
}

/// A model file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is a directory, not a model file")]
    IsDirectory { path: PathBuf },
    #[error("model file {path} is empty")]
    Empty { path: PathBuf },
    #[error("{path} is not a GGUF model (it starts with {found}, a GGUF file starts with \"GGUF\")")]
    NotGguf { path: PathBuf, found: String },
    /// The GGUF validator refused the file before llama.cpp saw it.
    #[error(transparent)]
    Invalid(llama_gguf::GgufError),
    #[error("cannot read model file {path}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: {source}")]
    Rejected { path: PathBuf, #[source] source: BackendError },
    /// A model parameter the backend cannot honour (`device`, `main_gpu`).
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    /// A remote device (`--rpc`) cannot be used: unreachable, another protocol, or lost
    /// during the load. Always `BackendError::Rpc`.
    #[error(transparent)]
    Remote(BackendError),
}

/// A session (inference context) could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error(transparent)]
    Backend(BackendError),
}

/// Splits a backend's parameter error (field, reason) from its other errors.
pub(crate) fn invalid_param(e: BackendError) -> Result<(String, String), BackendError> {
    match e {
        BackendError::InvalidParam { field, reason } => Ok((field, reason)),
        other => Err(other),
    }
}

impl From<BackendError> for SessionError {
    fn from(e: BackendError) -> Self {
        match invalid_param(e) {
            Ok((field, reason)) => SessionError::InvalidParam { field, reason },
            Err(other) => SessionError::Backend(other),
        }
    }
}

/// Generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the context holds {n_ctx}; raise -c or shorten the prompt")]
    PromptTooLong { tokens: usize, n_ctx: u32 },
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error(transparent)]
    Backend(BackendError),
}

impl From<BackendError> for GenerateError {
    fn from(e: BackendError) -> Self {
        match invalid_param(e) {
            Ok((field, reason)) => GenerateError::InvalidParam { field, reason },
            Err(other) => GenerateError::Backend(other),
        }
    }
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
}
