//! Logging to stderr (text or JSON), plus the profiling hook: with `LLAMA_TRACE_FILE` set,
//! every span is also written to that file in Chrome's trace format.

use std::io::IsTerminal;

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::args::LogFormat;
use crate::opts::Global;

/// Installs the subscriber; spans also go to `trace` (`LLAMA_TRACE_FILE`, opened by the
/// option resolution, so a path that cannot be created is a typed error there, never a
/// panic here). The returned guard flushes the trace file when dropped.
pub fn init(g: &Global, trace: Option<std::fs::File>) -> Option<tracing_chrome::FlushGuard> {
    // llama.cpp's own log (target llama_cpp) is off unless asked for: load errors reach
    // the user through typed errors, not through its log. A server's model loads and
    // unloads (with their reason) are shown: an operator wants to see memory change hands.
    let default = match g.verbose {
        0 => "warn,llama_cpp=off,llama_serve::registry=info",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("LLAMA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = match g.log_format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.with_target(g.verbose > 0).boxed(),
    };
    let (chrome, guard) = match trace {
        Some(file) => {
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new().writer(file).include_args(true).build();
            // Spans and the runtime's own events; llama.cpp's log lines would drown them.
            (Some(layer.with_filter(EnvFilter::new("debug,llama_cpp=off"))), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(chrome).init();
    guard
}
