//! A loaded llama.cpp model: a thin owner of `llama_model`, plus the `Model` trait object.
//! Contexts hold an `Arc` of it, so the host may drop its model handle in any order.

use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
use llama_plugin_api::{BackendError, ContextBox, ContextParams, ModelBox, ModelInfo, ModelParams, Model_TO, ProgressSink};

use crate::{context, guard, log};

pub(crate) struct LlamaModel {
    raw: NonNull<sys::llama_model>,
}

// SAFETY: llama.cpp's model is immutable after load; its read-only queries (vocab,
// metadata, tokenizer) are safe from several threads, and contexts are created from it
// concurrently by llama.cpp's own server.
unsafe impl Send for LlamaModel {}
// SAFETY: see `Send`: shared access is read-only.
unsafe impl Sync for LlamaModel {}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_model_load_from_file and is freed exactly once;
        // every context holding the model keeps this owner alive through an Arc.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

impl LlamaModel {
    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }

    pub(crate) fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is valid for the life of `self`.
        unsafe { sys::llama_model_get_vocab(self.raw.as_ptr()) }
    }

    pub(crate) fn n_vocab(&self) -> i32 {
        // SAFETY: the vocab pointer belongs to the live model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }
    }

    pub(crate) fn is_eog(&self, token: i32) -> bool {
        // SAFETY: the vocab pointer belongs to the live model; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    fn read_string(f: impl Fn(*mut c_char, usize) -> i32) -> Option<String> {
        let mut buf = vec![0u8; 256];
        loop {
            let n = f(buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            // llama.cpp returns the full length when the buffer was too small.
            buf.resize(n + 1, 0);
        }
    }

    fn describe(&self) -> ModelInfo {
        let raw = self.raw.as_ptr();
        let description = Self::read_string(|buf, len| {
            // SAFETY: `buf` is writable for `len` bytes; the model is alive.
            unsafe { sys::llama_model_desc(raw, buf, len) }
        })
        .unwrap_or_default();
        // SAFETY: plain queries on a live model.
        let (n_params, size_bytes, n_ctx_train, bos) = unsafe {
            (
                sys::llama_model_n_params(raw),
                sys::llama_model_size(raw),
                sys::llama_model_n_ctx_train(raw),
                sys::llama_vocab_bos(self.vocab()),
            )
        };
        ModelInfo {
            description: RString::from(description),
            n_params,
            size_bytes,
            n_vocab: self.n_vocab(),
            n_ctx_train: n_ctx_train.max(0) as u32,
            bos,
        }
    }

    pub(crate) fn token_bytes(&self, token: i32, special: bool) -> Result<Vec<u8>, BackendError> {
        if token < 0 || token >= self.n_vocab() {
            return Err(BackendError::InvalidToken { token });
        }
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes; the token id was range-checked.
            let n = unsafe {
                sys::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr().cast(), buf.len() as i32, 0, special)
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize((-n) as usize, 0);
        }
    }

    pub(crate) fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, BackendError> {
        let len = i32::try_from(text.len())
            .map_err(|_| BackendError::Tokenize { reason: RString::from("text longer than 2 GiB") })?;
        // A token is at least one byte, plus room for BOS/EOS.
        let mut tokens = vec![0i32; text.len() + 8];
        // SAFETY: `text` is valid for `len` bytes (no NUL needed: the length is passed);
        // `tokens` is writable for its length.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr().cast(),
                len,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                add_special,
                parse_special,
            )
        };
        if n < 0 {
            return Err(BackendError::Tokenize { reason: RString::from(format!("needs {} token slots", -n)) });
        }
        tokens.truncate(n as usize);
        Ok(tokens)
    }
}

/// llama.cpp's progress callback → the host's sink. Returning true continues the load.
unsafe extern "C" fn report_progress(progress: f32, user: *mut c_void) -> bool {
    // SAFETY: `user` points at the `ProgressSink` in `load`'s frame, alive during the load,
    // which is the only time llama.cpp calls this.
    let sink = unsafe { &*(user as *const ProgressSink) };
    (sink.report)(sink.user, progress);
    true
}

pub(crate) fn load(path: &str, params: &ModelParams) -> Result<ModelBox, BackendError> {
    let c_path = CString::new(path)
        .map_err(|_| BackendError::ModelLoad { reason: RString::from("path contains a NUL byte") })?;
    // SAFETY: returns a plain struct of defaults.
    let mut mp = unsafe { sys::llama_model_default_params() };
    mp.n_gpu_layers = params.n_gpu_layers;
    mp.use_extra_bufts = params.repack;
    if !params.use_mmap {
        mp.load_mode = sys::LLAMA_LOAD_MODE_NONE;
    }
    // The sink lives on this stack frame for the whole (synchronous) load.
    let progress: Option<ProgressSink> = params.progress.into_option();
    if let Some(sink) = progress.as_ref() {
        mp.progress_callback = Some(report_progress);
        mp.progress_callback_user_data = sink as *const ProgressSink as *mut c_void;
    }
    // What llama.cpp is asked for: visible with `llama -vv`, so offload settings can be seen
    // to arrive even on a build without a GPU (where llama.cpp itself says nothing of them).
    log::info(&format!("llama_model_load_from_file: n_gpu_layers = {}, use_extra_bufts = {}, mmap = {}", mp.n_gpu_layers, mp.use_extra_bufts, params.use_mmap));
    log::clear_first_error();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; failures return NULL.
    let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
    let raw = NonNull::new(raw).ok_or_else(|| BackendError::ModelLoad {
        reason: RString::from(log::take_first_error().unwrap_or_else(|| "no reason given".to_string())),
    })?;
    let model = Arc::new(LlamaModel { raw });
    Ok(Model_TO::from_value(ModelHandle { model }, TD_Opaque))
}

struct ModelHandle {
    model: Arc<LlamaModel>,
}

impl llama_plugin_api::Model for ModelHandle {
    fn info(&self) -> ModelInfo {
        self.model.describe()
    }

    fn tokenize(&self, text: RStr<'_>, add_special: bool, parse_special: bool) -> RResult<RVec<i32>, BackendError> {
        guard(|| self.model.tokenize(text.as_str(), add_special, parse_special).map(RVec::from))
    }

    fn token_bytes(&self, token: i32, special: bool) -> RResult<RVec<u8>, BackendError> {
        guard(|| self.model.token_bytes(token, special).map(RVec::from))
    }

    fn meta(&self, key: RStr<'_>) -> ROption<RString> {
        let Ok(key) = CString::new(key.as_str()) else { return ROption::RNone };
        let raw = self.model.as_ptr();
        LlamaModel::read_string(|buf, len| {
            // SAFETY: `key` is NUL-terminated; `buf` is writable for `len` bytes; the model is alive.
            unsafe { sys::llama_model_meta_val_str(raw, key.as_ptr(), buf, len) }
        })
            .map(RString::from)
            .into()
    }

    fn new_context(&self, params: ContextParams) -> RResult<ContextBox, BackendError> {
        guard(|| context::new(self.model.clone(), &params))
    }
}
