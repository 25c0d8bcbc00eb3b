//! llama.cpp's log callback → the host's log sink. llama.cpp emits lines in pieces
//! (GGML_LOG_LEVEL_CONT continues the previous one), so pieces are joined into whole lines.
//! The first error line of the current thread since the last clear is kept: it becomes the
//! reason of a failed load (the lines after it only repeat that the load failed).

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::std_types::RStr;
use llama_plugin_api::{LogLevel, LogSink};

static SINK: OnceLock<LogSink> = OnceLock::new();
/// The line being assembled and its level.
static PENDING: Mutex<(String, u32)> = Mutex::new((String::new(), sys::GGML_LOG_LEVEL_INFO));

thread_local! {
    static FIRST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    /// While a load runs on this thread: the lines that say where its weights go.
    static PLACEMENT: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Starts keeping the current thread's placement lines (`... assigned to device ...`,
/// `... model buffer size = ...`), which llama.cpp logs during a load and has no API for.
pub fn start_placement_capture() {
    PLACEMENT.with(|p| *p.borrow_mut() = Some(Vec::new()));
}

/// Stops keeping them and returns them.
pub fn end_placement_capture() -> Vec<String> {
    PLACEMENT.with(|p| p.borrow_mut().take()).unwrap_or_default()
}

pub fn install(sink: LogSink) {
    // The first sink wins: one host per process.
    let _ = SINK.set(sink);
    // SAFETY: `callback` is a valid `extern "C"` function for the whole life of the
    // library (libraries are never unloaded); user_data is unused.
    unsafe {
        sys::llama_log_set(Some(callback), std::ptr::null_mut());
        sys::ggml_log_set(Some(callback), std::ptr::null_mut());
    }
}

/// Forgets the current thread's recorded error line.
pub fn clear_first_error() {
    FIRST_ERROR.with(|e| e.borrow_mut().take());
}

/// Takes the current thread's first error line since the last clear, if any.
pub fn take_first_error() -> Option<String> {
    FIRST_ERROR.with(|e| e.borrow_mut().take())
}

/// A line of the backend's own, logged like llama.cpp's (info level).
pub(crate) fn info(line: &str) {
    emit(line, sys::GGML_LOG_LEVEL_INFO);
}

/// A warning of the backend's own.
pub(crate) fn warn(line: &str) {
    emit(line, sys::GGML_LOG_LEVEL_WARN);
}

fn level_of(level: u32) -> LogLevel {
    match level {
        sys::GGML_LOG_LEVEL_ERROR => LogLevel::Error,
        sys::GGML_LOG_LEVEL_WARN => LogLevel::Warn,
        sys::GGML_LOG_LEVEL_INFO => LogLevel::Info,
        _ => LogLevel::Debug,
    }
}

fn emit(line: &str, level: u32) {
    let line = line.trim_end();
    if line.is_empty() {
        return;
    }
    if line.contains("assigned to device") || line.contains("model buffer size") {
        PLACEMENT.with(|p| {
            if let Some(lines) = p.borrow_mut().as_mut() {
                lines.push(line.to_string());
            }
        });
    }
    if level == sys::GGML_LOG_LEVEL_ERROR {
        FIRST_ERROR.with(|e| {
            e.borrow_mut().get_or_insert_with(|| line.to_string());
        });
    }
    if let Some(sink) = SINK.get() {
        (sink.log)(level_of(level), RStr::from_str(line));
    }
}

unsafe extern "C" fn callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // Never panic here: this runs inside llama.cpp's C++ frames.
    let Ok(mut pending) = PENDING.lock() else { return };
    if level != sys::GGML_LOG_LEVEL_CONT {
        if !pending.0.is_empty() {
            let (line, lvl) = std::mem::take(&mut *pending);
            emit(&line, lvl);
        }
        pending.1 = level;
    }
    pending.0.push_str(&text);
    while let Some(pos) = pending.0.find('\n') {
        let line: String = pending.0.drain(..=pos).collect();
        let lvl = pending.1;
        emit(&line, lvl);
    }
}
