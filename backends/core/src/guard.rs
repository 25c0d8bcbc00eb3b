//! The panic barrier: every call from the host runs inside `guard`, so a Rust panic in the
//! backend becomes a typed error instead of unwinding into (or aborting) the host.

use std::panic::{catch_unwind, AssertUnwindSafe};

use llama_plugin_api::abi_stable::std_types::{RResult, RString};
use llama_plugin_api::BackendError;

/// Runs a probe; a panic becomes an unusable report instead of an abort (an `extern "C"`
/// function that unwinds aborts the process).
pub fn guard_probe(f: impl FnOnce() -> llama_plugin_api::ProbeReport) -> llama_plugin_api::ProbeReport {
    match guard(|| Ok(f())) {
        RResult::ROk(report) => report,
        RResult::RErr(e) => llama_plugin_api::ProbeReport {
            usable: false,
            score: 0,
            reason: RString::from(format!("probe failed: {e}")),
            devices: Default::default(),
        },
    }
}

pub fn guard<T>(f: impl FnOnce() -> Result<T, BackendError>) -> RResult<T, BackendError> {
    // AssertUnwindSafe: after a panic the host gets an error and is expected to drop the
    // object; no state observed after the panic is trusted.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.into(),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            RResult::RErr(BackendError::Panic { message: RString::from(message) })
        }
    }
}
