//! A loaded llama.cpp model: a thin owner of `llama_model`, plus the `Model` trait object.
//! Contexts hold an `Arc` of it, so the host may drop its model handle in any order.

use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
use llama_plugin_api::{
    BackendError, ContextBox, ContextParams, EmbedParams, EmbedderBox, Grammar, ModelBox, ModelInfo, ModelParams, Model_TO, Placement, ProgressSink, RpcTraffic, SplitMode,
};

use crate::{context, embed, guard, invalid, log, rpc};

extern "C" {
    // ggml-rpc.h, which the binding crate does not generate bindings for. Built in because
    // GGML_RPC is on (.cargo/config.toml).
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
}

pub(crate) struct LlamaModel {
    raw: NonNull<sys::llama_model>,
    /// The relays to the RPC servers the model was placed on. Dropped after the model is
    /// freed (fields drop after `drop`), so freeing its remote buffers still reaches them.
    links: Vec<rpc::Link>,
    /// Where llama.cpp put the weights.
    placement: Vec<Placement>,
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

    /// The first RPC server this model lost, as an error.
    pub(crate) fn lost(&self) -> Option<BackendError> {
        self.links.iter().find_map(rpc::Link::lost)
    }

    /// `llama_decode` on a context of this model, its return code as an error. A model that
    /// lost an RPC server does not compute: its remote weights are gone, and what the relay
    /// answers in the server's place is zeros.
    pub(crate) fn decode(&self, ctx: *mut sys::llama_context, batch: sys::llama_batch) -> Result<(), BackendError> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        // SAFETY: the caller's context is alive, belongs to this model and is used by this
        // thread only; the batch is filled.
        let rc = unsafe { sys::llama_decode(ctx, batch) };
        if !self.links.is_empty() {
            // A remote device computes asynchronously (ggml queues the graph and returns):
            // wait for it, so the decode's time is its own and a server lost during it is
            // this decode's error, not the next one's.
            // SAFETY: as above.
            unsafe { sys::llama_synchronize(ctx) };
        }
        if let Some(e) = self.lost() {
            return Err(e);
        }
        match rc {
            0 => Ok(()),
            1 => Err(BackendError::NoKvSlot),
            2 => Err(BackendError::Aborted),
            code => Err(BackendError::Decode { code }),
        }
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
            placement: self.placement.clone().into(),
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
    // this vector outlives the (synchronous) load call. Remote devices come first (as
    // llama.cpp's own tools order them), then the local GPUs.
    let chosen = offload_devices(params)?;
    // SAFETY: a plain query.
    let max_devices = unsafe { sys::llama_max_devices() };
    // The proportions' values are checked before any server is contacted (what the user got
    // wrong is not a network error); their count once the servers' devices are known (a
    // server may have several).
    split_values(params, max_devices)?;
    let local = chosen.clone().unwrap_or_else(|| crate::registered_devices(&crate::DEVICE_GPU).into_iter().map(|(d, _)| d).collect());
    let (links, remote) = remote_devices(params, rpc::timeout(params.rpc_timeout_ms))?;
    let mut device_ptrs: Vec<sys::ggml_backend_dev_t> = remote.iter().map(|r| r.dev).collect();
    device_ptrs.extend(local.iter().copied());
    let n_offload = device_ptrs.len();
    // llama.cpp reads `tensor_split` and `main_gpu` against this list: remote devices first.
    if n_offload > max_devices {
        return Err(invalid("rpc", format!("{n_offload} offload devices, over llama.cpp's {max_devices}")));
    }
    if !links.is_empty() && params.split_mode == SplitMode::None && params.main_gpu as usize >= n_offload {
        return Err(invalid("main_gpu", format!("{} is not a device index: {n_offload} offload device(s), remote ones first, counted from 0", params.main_gpu)));
    }
    device_ptrs.push(std::ptr::null_mut());
    if chosen.is_some() || !links.is_empty() {
        mp.devices = device_ptrs.as_mut_ptr();
    }
    // llama.cpp reads llama_max_devices() proportions; all zero means by free memory.
    let split = tensor_split(params, n_offload, max_devices)?;
    if !params.tensor_split.is_empty() {
        mp.tensor_split = split.as_ptr();
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
    log::start_placement_capture();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; failures return NULL.
    let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
    let lines = log::end_placement_capture();
    let lost = links.iter().find_map(rpc::Link::lost);
    let raw = match (NonNull::new(raw), lost) {
        (Some(raw), None) => raw,
        (raw, lost) => {
            if let Some(raw) = raw {
                // SAFETY: loaded just now and owned by nobody else; freed once.
                unsafe { sys::llama_model_free(raw.as_ptr()) };
            }
            // A server lost during the load is the reason, whatever llama.cpp made of it.
            return Err(lost.unwrap_or_else(|| BackendError::ModelLoad {
                reason: RString::from(log::take_first_error().unwrap_or_else(|| "no reason given".to_string())),
            }));
        }
    };
    let placement = placement(&lines, &remote);
    let model = Arc::new(LlamaModel { raw, links, placement });
    Ok(Model_TO::from_value(ModelHandle { model }, TD_Opaque))
}

/// One device of an RPC server, as ggml registered it for a load.
struct RemoteDevice {
    dev: sys::ggml_backend_dev_t,
    /// ggml's name for it (`RPC0`).
    name: String,
    /// The server's address as the user gave it.
    endpoint: String,
    /// The buffer-name prefix ggml gives the device's buffers: `RPC<i>[<relay endpoint>]`.
    buffer_prefix: String,
}

/// Checks every RPC server of `params` (reachable within `timeout`, same protocol), opens a
/// relay to each and registers its devices with ggml through the relay.
fn remote_devices(params: &ModelParams, timeout: std::time::Duration) -> Result<(Vec<rpc::Link>, Vec<RemoteDevice>), BackendError> {
    let mut links = Vec::new();
    let mut remote = Vec::new();
    let mut addresses = Vec::new();
    for endpoint in params.rpc_servers.iter() {
        let endpoint = endpoint.as_str();
        // The same server under two names would be asked twice, and it serves one client at
        // a time: the second connection would wait for ever.
        let addr = rpc::resolve(endpoint)?;
        if addresses.contains(&addr) {
            return Err(invalid("rpc", format!("{endpoint} is the same server ({addr}) as an earlier one")));
        }
        addresses.push(addr);
        rpc::probe(endpoint, timeout, 0)?;
        let link = rpc::Link::open(endpoint, timeout)?;
        let local = link.local_endpoint();
        let c_local = CString::new(local.clone()).map_err(|_| invalid("rpc", "NUL in an endpoint"))?;
        // SAFETY: `c_local` is NUL-terminated; ggml copies it. The relay is listening, so
        // ggml's connect succeeds and its handshake is answered (by the server or, if it
        // went away since the probe, by the relay), never an abort.
        let reg = unsafe { ggml_backend_rpc_add_server(c_local.as_ptr()) };
        if let Some(e) = link.lost() {
            return Err(e);
        }
        if reg.is_null() {
            return Err(BackendError::Rpc { endpoint: endpoint.into(), failure: llama_plugin_api::RpcFailure::Protocol, reason: "it reports no devices".into() });
        }
        // SAFETY: `reg` is the registry ggml just made for this endpoint; it is never freed.
        let count = unsafe { sys::ggml_backend_reg_dev_count(reg) };
        for d in 0..count {
            // SAFETY: `d` is below the registry's device count.
            let dev = unsafe { sys::ggml_backend_reg_dev_get(reg, d) };
            // SAFETY: a live device's name, owned by ggml.
            let name = crate::ggml_text(unsafe { sys::ggml_backend_dev_name(dev) });
            remote.push(RemoteDevice { dev, name, endpoint: endpoint.to_string(), buffer_prefix: format!("RPC{d}[{local}]") });
        }
        links.push(link);
    }
    Ok((links, remote))
}

/// llama.cpp's `tensor_split` array (`max` floats) for `n` offload devices.
fn tensor_split(params: &ModelParams, n: usize, max: usize) -> Result<Vec<f32>, BackendError> {
    let asked = &params.tensor_split;
    if asked.len() > n.max(1) {
        return Err(invalid("tensor_split", format!("{} proportions for {n} offload device(s) (remote devices first, then local GPUs)", asked.len())));
    }
    split_values(params, max)?;
    let mut out = vec![0f32; max];
    out[..asked.len()].copy_from_slice(asked);
    Ok(out)
}

/// The `tensor_split` proportions themselves: at most `max`, each a number >= 0, not all 0.
fn split_values(params: &ModelParams, max: usize) -> Result<(), BackendError> {
    let asked = &params.tensor_split;
    if asked.len() > max {
        return Err(invalid("tensor_split", format!("{} proportions, over llama.cpp's {max} devices", asked.len())));
    }
    if let Some(bad) = asked.iter().find(|p| !p.is_finite() || **p < 0.0) {
        return Err(invalid("tensor_split", format!("{bad} is not a proportion >= 0")));
    }
    if !asked.is_empty() && asked.iter().all(|p| *p == 0.0) {
        return Err(invalid("tensor_split", "every proportion is 0"));
    }
    Ok(())
}

/// Where llama.cpp put the weights, from the lines it logged during the load:
/// `load_tensors: layer  N assigned to device DEV, ...` (the last layer index is the output
/// layer) and `load_tensors: BUFFER model buffer size = X MiB`.
fn placement(lines: &[String], remote: &[RemoteDevice]) -> Vec<Placement> {
    let mut out: Vec<Placement> = Vec::new();
    let mut last_layer: Option<(u32, usize)> = None;
    let entry = |out: &mut Vec<Placement>, device: &str| -> usize {
        if let Some(i) = out.iter().position(|p| p.device.as_str() == device) {
            return i;
        }
        let description = remote.iter().find(|r| r.name == device).map_or_else(String::new, |r| r.endpoint.clone());
        out.push(Placement { device: device.into(), description: description.into(), layers: 0, output: false, bytes: 0 });
        out.len() - 1
    };
    for line in lines {
        if let Some(rest) = line.split("layer").nth(1).filter(|_| line.contains("assigned to device")) {
            let il: u32 = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let dev = line.split("assigned to device").nth(1).unwrap_or("").trim().split(',').next().unwrap_or("").trim();
            let i = entry(&mut out, dev);
            out[i].layers += 1;
            if last_layer.is_none_or(|(l, _)| il > l) {
                last_layer = Some((il, i));
            }
        } else if let Some((name, size)) = line.split_once("model buffer size =") {
            let buffer = name.trim_start_matches("load_tensors:").trim();
            let mib: f64 = size.trim().trim_end_matches("MiB").trim().parse().unwrap_or(0.0);
            let device = remote.iter().find(|r| buffer.starts_with(&r.buffer_prefix)).map_or_else(
                || if buffer.starts_with("CPU") { "CPU".to_string() } else { buffer.split(['_', '[']).next().unwrap_or(buffer).to_string() },
                |r| r.name.clone(),
            );
            let i = entry(&mut out, &device);
            out[i].bytes += (mib * 1024.0 * 1024.0) as u64;
        }
    }
    // The highest layer index is the output layer, not a repeating one.
    if let Some((_, i)) = last_layer {
        out[i].output = true;
        out[i].layers -= 1;
    }
    out
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
    // With remote devices the index counts them too: checked at load, once they are known.
    if params.split_mode == SplitMode::None && n > 0 && params.rpc_servers.is_empty() && params.main_gpu as usize >= n {
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

    fn rpc_traffic(&self) -> RVec<RpcTraffic> {
        self.model
            .links
            .iter()
            .map(|l| {
                let (bytes_sent, bytes_received) = l.traffic();
                RpcTraffic { endpoint: l.endpoint().into(), bytes_sent, bytes_received }
            })
            .collect()
    }

    fn lost(&self) -> ROption<BackendError> {
        self.model.lost().into()
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

    /// llama.cpp's load lines, as it logs them, summed per device: repeating layers, the
    /// output layer (the highest index), MiB of buffers; remote buffers named by their relay.
    #[test]
    fn placement_is_read_from_llama_cpps_lines() {
        let remote = [RemoteDevice { dev: std::ptr::null_mut(), name: "RPC0".into(), endpoint: "10.0.0.2:50052".into(), buffer_prefix: "RPC0[127.0.0.1:40000]".into() }];
        let lines: Vec<String> = [
            "load_tensors: layer   0 assigned to device CPU, is_swa = 0",
            "load_tensors: layer   1 assigned to device RPC0, is_swa = 1",
            "load_tensors: layer   2 assigned to device RPC0, is_swa = 0",
            "load_tensors: layer   3 assigned to device RPC0, is_swa = 0",
            "load_tensors:   CPU_Mapped model buffer size =   170.00 MiB",
            "load_tensors:   CPU_REPACK model buffer size =    10.50 MiB",
            "load_tensors: RPC0[127.0.0.1:40000] model buffer size =    35.75 MiB",
        ]
        .iter()
        .map(|l| l.to_string())
        .collect();
        let p = placement(&lines, &remote);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].device.as_str(), p[0].layers, p[0].output, p[0].bytes), ("CPU", 1, false, ((170.0 + 10.5) * 1048576.0) as u64));
        assert_eq!((p[1].device.as_str(), p[1].description.as_str(), p[1].layers, p[1].output), ("RPC0", "10.0.0.2:50052", 2, true));
        assert_eq!(p[1].bytes, (35.75 * 1048576.0) as u64);
        assert!(placement(&[], &remote).is_empty());
    }

    #[test]
    fn tensor_split_is_checked_against_the_offload_devices() {
        let with = |split: &[f32]| ModelParams { tensor_split: split.iter().copied().collect(), ..ModelParams::default() };
        assert_eq!(tensor_split(&with(&[3.0, 1.0]), 2, 16).unwrap()[..3], [3.0, 1.0, 0.0]);
        assert_eq!(tensor_split(&with(&[]), 2, 16).unwrap(), vec![0.0; 16]);
        assert!(field(tensor_split(&with(&[1.0, 1.0, 1.0]), 2, 16).unwrap_err()).contains("3 proportions for 2 offload device(s)"));
        assert!(field(tensor_split(&with(&[f32::NAN]), 1, 16).unwrap_err()).contains("not a proportion"));
        assert!(field(tensor_split(&with(&[0.0, 0.0]), 2, 16).unwrap_err()).contains("every proportion is 0"));
        // Before the servers are asked, only the values: a server may bring several devices.
        assert!(split_values(&with(&[1.0, 1.0, 1.0]), 16).is_ok());
        assert!(field(split_values(&with(&[0.0]), 16).unwrap_err()).contains("every proportion is 0"));
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
