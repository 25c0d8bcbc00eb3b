//! The llama runtime as a library: finds backend plugins, picks the best one for this
//! machine, loads models through it and generates text.
//!
//! ```no_run
//! use llama_host::{Backends, BackendChoice, DiscoveryOptions, Model, ModelParams, SessionParams, GenerateOptions};
//! let mut backends = Backends::discover(&DiscoveryOptions::from_env());
//! let backend = backends.select(BackendChoice::Auto)?;
//! let model = Model::load(&backend, "model.gguf", &ModelParams::default())?;
//! let mut session = model.session(&SessionParams::default())?;
//! let stats = session.generate("The capital of France is", &GenerateOptions::default(), |text| {
//!     print!("{text}");
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! # Ok::<(), llama_host::Error>(())
//! ```
//!
//! This crate never links llama.cpp: only backends do.

pub mod fake;
pub mod fit;
pub mod offload;
pub mod chat;
mod boundary;
mod cpu_note;
pub mod embed;
mod ops;
mod types;
pub mod discovery;
pub use llama_gguf as gguf;
mod error;
pub mod hardware;
pub mod probe;
mod logging;
mod model;
mod plugin;
pub mod report;
mod select;
mod session;
pub mod spec;
mod stop;
mod text;
pub use text::TextOutput;
mod utf8;

pub use error::{Error, GenerateError, LoadError, SelectError, SessionError};
pub use ops::{AbortHandle, ContextOps, ModelOps};
pub use types::{
    Accelerator, BackendError, BackendInfo, BatchToken, CacheType, ContextParams, ContextSize, DeviceInfo, FlashAttn, Grammar, KvCacheParams, LogitBias,
    ModelInfo, ModelParams, ParamError, Placement, RemoteServer, RpcFailure, RpcTraffic, SampleRequest, Sampled, SamplingParams, SplitMode, UnknownName, DEFAULT_RPC_TIMEOUT,
    SEED_RANDOM,
};
pub use embed::{EmbedError, EmbedInfo, EmbedParams, Embedder, Normalize, Pooling};
pub use model::{default_threads, Model, ModelFile, SessionParams};
pub use session::{Canceller, FinishReason, GenerateOptions, GenerationStats, Session, Stream};
pub use plugin::{install_backend, InstallError};
pub use report::{CandidateReport, SelectionReport, Verdict};
pub use select::{BackendChoice, Backends, DiscoveryOptions, LoadedBackend};
pub use discovery::{default_models_dir, find_model, find_model_in, user_backends_dir, ModelNameError};
