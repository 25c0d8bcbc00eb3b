//! A loaded llama.cpp model: a thin owner of `llama_model`, plus the `Model` trait object.
//! Contexts hold an `Arc` of it, so the host may drop its model handle in any order.

use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
use llama_plugin_api::{BackendError, ContextBox, ContextParams, EmbedParams, EmbedderBox, Grammar, ModelBox, ModelInfo, ModelParams, Model_TO, ProgressSink, SplitMode};

use crate::{context, embed, guard, invalid, log};

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

    /// A GGUF metadata value as a string, if the key exists.
    pub(crate) fn meta_string(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let raw = self.raw.as_ptr();
        LlamaModel::read_string(|buf, len| {
            // SAFETY: `key` is NUL-terminated; `buf` is writable for `len` bytes; the model is alive.
            unsafe { sys::llama_model_meta_val_str(raw, key.as_ptr(), buf, len) }
        })
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
    mp.split_mode = split_mode(params.split_mode);
    mp.main_gpu = params.main_gpu;
    // NULL-terminated, as llama.cpp wants it; it copies the handles during the load, and
    // this vector outlives the (synchronous) load call.
    let chosen = offload_devices(params)?;
    let mut device_ptrs: Vec<sys::ggml_backend_dev_t> = chosen.iter().flatten().copied().collect();
    device_ptrs.push(std::ptr::null_mut());
    if chosen.is_some() {
        mp.devices = device_ptrs.as_mut_ptr();
    }
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
    let device_names = match &params.devices {
        ROption::RNone => "all".to_string(),
        ROption::RSome(names) if names.is_empty() => "none".to_string(),
        ROption::RSome(names) => names.iter().map(RString::as_str).collect::<Vec<_>>().join(","),
    };
    log::info(&format!(
        "llama_model_load_from_file: n_gpu_layers = {}, split_mode = {}, main_gpu = {}, devices = {}, use_extra_bufts = {}, mmap = {}",
        mp.n_gpu_layers,
        params.split_mode.as_str(),
        mp.main_gpu,
        device_names,
        mp.use_extra_bufts,
        params.use_mmap
    ));
    log::clear_first_error();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; failures return NULL.
    let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
    let raw = NonNull::new(raw).ok_or_else(|| BackendError::ModelLoad {
        reason: RString::from(log::take_first_error().unwrap_or_else(|| "no reason given".to_string())),
    })?;
    let model = Arc::new(LlamaModel { raw });
    Ok(Model_TO::from_value(ModelHandle { model }, TD_Opaque))
}

fn split_mode(m: SplitMode) -> sys::llama_split_mode {
    match m {
        SplitMode::None => sys::LLAMA_SPLIT_MODE_NONE,
        SplitMode::Layer => sys::LLAMA_SPLIT_MODE_LAYER,
        SplitMode::Row => sys::LLAMA_SPLIT_MODE_ROW,
        SplitMode::Tensor => sys::LLAMA_SPLIT_MODE_TENSOR,
    }
}

/// The offload devices for `params` from the GPUs ggml registered; `None`: llama.cpp's
/// default, every GPU.
fn offload_devices(params: &ModelParams) -> Result<Option<Vec<sys::ggml_backend_dev_t>>, BackendError> {
    let available = crate::registered_devices(&crate::DEVICE_GPU);
    let names: Vec<&str> = available.iter().map(|(_, n)| n.as_str()).collect();
    Ok(resolve_offload(params, &names)?.map(|picked| picked.into_iter().map(|i| available[i].0).collect()))
}

/// Checks the offload settings against the GPU names a backend has, before llama.cpp sees
/// them, so a wrong device name or GPU index is a typed error naming the parameter
/// (llama.cpp would only log it and fail the load). Returns the chosen devices' indices.
pub(crate) fn resolve_offload(params: &ModelParams, available: &[&str]) -> Result<Option<Vec<usize>>, BackendError> {
    let have = || {
        if available.is_empty() {
            "this backend has no GPU devices".to_string()
        } else {
            format!("this backend has {}", available.join(", "))
        }
    };
    let chosen = match &params.devices {
        ROption::RNone => None,
        ROption::RSome(wanted) => Some(
            wanted
                .iter()
                .map(|w| {
                    available
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(w.as_str()))
                        .ok_or_else(|| invalid("device", format!("no device '{w}' ({})", have())))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if let Some(picked) = &chosen {
        if let Some((i, _)) = picked.iter().enumerate().find(|(i, d)| picked[..*i].contains(d)) {
            return Err(invalid("device", format!("'{}' is named twice", available[picked[i]])));
        }
    }
    let n = chosen.as_ref().map_or(available.len(), Vec::len);
    if params.split_mode == SplitMode::Tensor && n == 0 {
        return Err(invalid("split_mode", format!("tensor parallelism needs at least one GPU ({})", have())));
    }
    if params.main_gpu < 0 {
        return Err(invalid("main_gpu", format!("{} is below 0", params.main_gpu)));
    }
    if params.split_mode == SplitMode::None && n > 0 && params.main_gpu as usize >= n {
        return Err(invalid("main_gpu", format!("{} is not a GPU index: {n} offload device(s), counted from 0 ({})", params.main_gpu, have())));
    }
    Ok(chosen)
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
        self.model.meta_string(key.as_str()).map(RString::from).into()
    }

    fn new_context(&self, params: ContextParams) -> RResult<ContextBox, BackendError> {
        guard(|| context::new(self.model.clone(), &params))
    }

    fn check_grammar(&self, grammar: Grammar) -> RResult<(), BackendError> {
        // Built and dropped (freed) at once: only whether llama.cpp accepts it matters.
        guard(|| crate::sampler::GrammarSampler::new(&grammar, self.model.vocab(), self.model.n_vocab()).map(drop))
    }

    fn new_embedder(&self, params: EmbedParams) -> RResult<EmbedderBox, BackendError> {
        guard(|| embed::new(self.model.clone(), &params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(devices: Option<&[&str]>, split_mode: SplitMode, main_gpu: i32) -> ModelParams {
        ModelParams {
            devices: devices.map(|d| d.iter().map(|n| RString::from(*n)).collect::<RVec<_>>()).into(),
            split_mode,
            main_gpu,
            ..ModelParams::default()
        }
    }

    fn field(e: BackendError) -> String {
        match e {
            BackendError::InvalidParam { field, reason } => format!("{field}: {reason}"),
            other => panic!("not InvalidParam: {other:?}"),
        }
    }

    #[test]
    fn offload_devices_resolve_by_name_and_bad_ones_are_named() {
        let gpus = ["CUDA0", "CUDA1"];
        assert_eq!(resolve_offload(&params(None, SplitMode::Layer, 0), &gpus).unwrap(), None);
        assert_eq!(resolve_offload(&params(Some(&["cuda1", "CUDA0"]), SplitMode::Layer, 0), &gpus).unwrap(), Some(vec![1, 0]));
        assert_eq!(resolve_offload(&params(Some(&[]), SplitMode::Layer, 0), &gpus).unwrap(), Some(vec![]));
        let e = field(resolve_offload(&params(Some(&["CUDA2"]), SplitMode::Layer, 0), &gpus).unwrap_err());
        assert_eq!(e, "device: no device 'CUDA2' (this backend has CUDA0, CUDA1)");
        let e = field(resolve_offload(&params(Some(&["CUDA0"]), SplitMode::Layer, 0), &[]).unwrap_err());
        assert_eq!(e, "device: no device 'CUDA0' (this backend has no GPU devices)");
        let e = field(resolve_offload(&params(Some(&["CUDA1", "cuda1"]), SplitMode::Layer, 0), &gpus).unwrap_err());
        assert_eq!(e, "device: 'CUDA1' is named twice");
        let e = field(resolve_offload(&params(Some(&[]), SplitMode::Tensor, 0), &gpus).unwrap_err());
        assert!(e.starts_with("split_mode: tensor parallelism needs at least one GPU"), "{e}");
    }

    #[test]
    fn main_gpu_must_index_an_offload_device_in_single_gpu_mode() {
        let gpus = ["CUDA0", "CUDA1"];
        assert!(resolve_offload(&params(None, SplitMode::None, 1), &gpus).is_ok());
        let e = field(resolve_offload(&params(None, SplitMode::None, 2), &gpus).unwrap_err());
        assert!(e.starts_with("main_gpu: 2 is not a GPU index: 2 offload device(s)"), "{e}");
        let e = field(resolve_offload(&params(Some(&["CUDA1"]), SplitMode::None, 1), &gpus).unwrap_err());
        assert!(e.starts_with("main_gpu: 1 is not a GPU index: 1 offload device(s)"), "{e}");
        // Other split modes spread over all devices; main_gpu only places small tensors.
        assert!(resolve_offload(&params(None, SplitMode::Row, 1), &gpus).is_ok());
        // No GPU at all (the CPU backend): nothing to check against, nothing offloaded.
        assert!(resolve_offload(&params(None, SplitMode::None, 3), &[]).is_ok());
        assert_eq!(field(resolve_offload(&params(None, SplitMode::Layer, -1), &gpus).unwrap_err()), "main_gpu: -1 is below 0");
    }
}
