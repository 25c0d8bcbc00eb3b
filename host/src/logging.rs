//! The log sink handed to backends: llama.cpp's lines become `tracing` events under the
//! target `llama_cpp`, so they are filtered like every other log (quiet unless -v).

use abi_stable::std_types::RStr;
use llama_plugin_api::{LogLevel, LogSink};

extern "C" fn forward(level: LogLevel, line: RStr<'_>) {
    let line = line.as_str();
    match level {
        LogLevel::Error => tracing::error!(target: "llama_cpp", "{line}"),
        LogLevel::Warn => tracing::warn!(target: "llama_cpp", "{line}"),
        LogLevel::Info => tracing::info!(target: "llama_cpp", "{line}"),
        LogLevel::Debug => tracing::debug!(target: "llama_cpp", "{line}"),
    }
}

pub(crate) fn sink() -> LogSink {
    LogSink { log: forward }
}
