//! The command's error type and its exit codes (README.md's table). Every failure a
//! command can meet is a variant here; nothing else decides an exit code.

use std::path::PathBuf;

use llama_serve::bench;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no model given: pass a model (name or -m FILE), set LLAMA_MODEL or default-model in the config; the default model is not installed at {path} (scripts/fetch-model installs it)")]
    NoModel { path: String },
    #[error("unknown model '{name}': not a file, not a name in the config's [models], not in the models directory {dirs} (`llama list` shows the models there)")]
    UnknownModel { name: String, dirs: String },
    #[error("invalid {field}: {reason}")]
    InvalidArg { field: &'static str, reason: String },
    /// An environment variable the command reads holds something it cannot use.
    #[error("invalid {var}='{value}': {reason}")]
    InvalidEnv { var: &'static str, value: String, reason: String },
    /// The template `--chat-template` names cannot be used (missing, does not compile, or
    /// does not render a first turn): a bad argument.
    #[error("--chat-template: {0}")]
    ChatTemplate(#[source] llama_host::chat::ChatError),
    /// `--url` / `LLAMA_URL` is not a URL the client can use: a bad argument.
    #[error("invalid --url '{url}': {source}")]
    InvalidUrl { url: String, #[source] source: crate::http_client::UrlError },
    /// A file named by a flag (`--api-key-file`, ...) cannot be read: a bad argument.
    #[error("cannot read {} ({flag})", path.display())]
    ArgFile { flag: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Select(#[from] llama_host::SelectError),
    #[error(transparent)]
    Load(#[from] llama_host::LoadError),
    #[error(transparent)]
    ModelName(#[from] llama_host::ModelNameError),
    #[error(transparent)]
    Session(#[from] llama_host::SessionError),
    #[error(transparent)]
    Generate(#[from] llama_host::GenerateError),
    #[error(transparent)]
    Chat(#[from] llama_host::chat::ChatError),
    /// An input `llama embed` cannot embed, named by where it came from.
    #[error("{origin}: {source}")]
    EmbedInput { origin: String, #[source] source: llama_host::EmbedError },
    #[error(transparent)]
    Embed(#[from] llama_host::EmbedError),
    #[error(transparent)]
    Install(#[from] llama_host::InstallError),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error(transparent)]
    Engine(#[from] llama_serve::engine::StartError),
    /// `llama serve` could not preload its model (and kept no fuller error).
    #[error(transparent)]
    Registry(#[from] llama_serve::registry::AcquireError),
    #[error(transparent)]
    Ps(#[from] crate::ps::PsError),
    /// A panic while loading the model in `llama serve`: a bug, reported as a failure.
    #[error("loading the model failed unexpectedly: {message}")]
    LoaderPanicked { message: String },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    /// `llama rpc-server` could not start or stopped.
    #[error("rpc-server: {0}")]
    RpcServer(llama_host::BackendError),
    /// Ctrl-C: not an error to print, exit 130 like a shell.
    #[error("interrupted")]
    Interrupted,
}

impl CliError {
    /// Exit codes: 2 bad arguments/config, 3 model file refused, 4 no usable backend or
    /// remote device (`--rpc`: unreachable, another protocol, lost),
    /// 5-8 a server that `llama ps` asked (unreachable, wants a key, answered an error
    /// status, answered something unreadable), 130 interrupted, 1 anything else.
    /// Documented in README.md.
    pub fn exit_code(&self) -> u8 {
        use crate::ps::PsError;
        use llama_host::{GenerateError, SessionError};
        use llama_serve::engine::StartError;
        match self {
            CliError::InvalidArg { .. }
            | CliError::InvalidUrl { .. }
            | CliError::InvalidEnv { .. }
            | CliError::ChatTemplate(_)
            | CliError::ArgFile { .. }
            | CliError::Config(_)
            | CliError::Session(SessionError::InvalidParam { .. })
            | CliError::Load(llama_host::LoadError::InvalidParam { .. })
            | CliError::Engine(StartError::InvalidConfig { .. } | StartError::Session(SessionError::InvalidParam { .. }))
            | CliError::Bench(
                llama_serve::bench::BenchError::InvalidParam { .. }
                | llama_serve::bench::BenchError::Session(SessionError::InvalidParam { .. })
                | llama_serve::bench::BenchError::Engine(StartError::InvalidConfig { .. }),
            )
            | CliError::Generate(GenerateError::InvalidParam { .. } | GenerateError::PromptTooLong { .. } | GenerateError::EmptyPrompt)
            | CliError::EmbedInput { .. }
            | CliError::Embed(llama_host::EmbedError::InvalidParam { .. })
            | CliError::RpcServer(llama_host::BackendError::InvalidParam { .. }) => 2,
            CliError::Select(_) | CliError::Install(_) | CliError::Load(llama_host::LoadError::Remote(_)) => 4,
            CliError::NoModel { .. } | CliError::UnknownModel { .. } | CliError::Load(_) | CliError::ModelName(_) => 3,
            // A remote device lost mid-run: the device is gone, as with no usable backend.
            CliError::Generate(GenerateError::Backend(llama_host::BackendError::Rpc { .. }))
            | CliError::Session(SessionError::Backend(llama_host::BackendError::Rpc { .. })) => 4,
            CliError::Ps(PsError::Unreachable { .. } | PsError::NoAnswer { .. }) => 5,
            CliError::Ps(PsError::ApiKeyWanted { .. } | PsError::ApiKeyRefused { .. }) => 6,
            CliError::Ps(PsError::Status { .. }) => 7,
            CliError::Ps(PsError::BadHttp { .. } | PsError::BadBody { .. }) => 8,
            CliError::Interrupted => 130,
            _ => 1,
        }
    }
}

impl CliError {
    /// Whether this is the reader of our output going away (`llama run | head`): a normal
    /// end, exit 0, nothing to print.
    pub fn is_closed_output(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// The error and each cause not already part of its message, on one line (for logs).
pub fn describe(e: &CliError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

/// The error and each cause not already part of its message. A closed stderr loses it
/// (there is nowhere left to say it); the exit code still tells.
pub fn print_error(e: &CliError) {
    use std::io::Write;
    let top = e.to_string();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {top}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let msg = s.to_string();
        if !top.contains(&msg) {
            let _ = writeln!(err, "  caused by: {msg}");
        }
        source = s.source();
    }
}
