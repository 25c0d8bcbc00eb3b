//! The one place where the plugin ABI's FFI-safe types (abi_stable's `RString`, `RVec`,
//! `ROption`, the `*_TO` trait objects) meet the library's plain types: conversions both
//! ways, and the plugin's model and context wrapped as [`ModelOps`]/[`ContextOps`].

use abi_stable::std_types::{ROption, RSlice, RStr, RString, RVec};
use llama_plugin_api as api;

use crate::ops::{AbortHandle, ContextOps, ModelOps};
use crate::types::*;

pub(crate) fn accelerator(a: api::Accelerator) -> Accelerator {
    match a {
        api::Accelerator::Cpu => Accelerator::Cpu,
        api::Accelerator::Cuda => Accelerator::Cuda,
        api::Accelerator::Metal => Accelerator::Metal,
    }
}

pub(crate) fn split_mode(m: SplitMode) -> api::SplitMode {
    match m {
        SplitMode::None => api::SplitMode::None,
        SplitMode::Layer => api::SplitMode::Layer,
        SplitMode::Row => api::SplitMode::Row,
        SplitMode::Tensor => api::SplitMode::Tensor,
    }
}

pub(crate) fn cache_type(t: CacheType) -> api::CacheType {
    match t {
        CacheType::F16 => api::CacheType::F16,
        CacheType::Q8_0 => api::CacheType::Q8_0,
        CacheType::Q4_0 => api::CacheType::Q4_0,
    }
}

pub(crate) fn flash_attn(f: FlashAttn) -> api::FlashAttn {
    match f {
        FlashAttn::Auto => api::FlashAttn::Auto,
        FlashAttn::On => api::FlashAttn::On,
        FlashAttn::Off => api::FlashAttn::Off,
    }
}

/// The plugin ABI's rule for the cache types (`KvCacheParams::validate`).
pub(crate) fn validate_kv_cache(p: &KvCacheParams) -> Result<(), ParamError> {
    api::validate_kv_cache(cache_type(p.type_v), flash_attn(p.flash_attn)).map_err(|e| ParamError { field: e.field, reason: e.reason })
}

pub(crate) fn model_params(p: &ModelParams, progress: Option<api::ProgressSink>) -> api::ModelParams {
    api::ModelParams {
        n_gpu_layers: p.n_gpu_layers,
        split_mode: split_mode(p.split_mode),
        main_gpu: p.main_gpu,
        devices: match &p.devices {
            None => ROption::RNone,
            Some(names) => ROption::RSome(names.iter().map(|n| RString::from(n.as_str())).collect()),
        },
        use_mmap: p.use_mmap,
        repack: p.repack,
        progress: progress.into(),
        rpc_servers: p.rpc.iter().map(|e| RString::from(e.as_str())).collect(),
        rpc_timeout_ms: timeout_ms(p.rpc_timeout),
        tensor_split: p.tensor_split.iter().copied().collect(),
    }
}

/// A timeout as the ABI carries it: milliseconds, 1 to `u32::MAX`.
pub(crate) fn timeout_ms(d: std::time::Duration) -> u32 {
    d.as_millis().clamp(1, u128::from(u32::MAX)) as u32
}

pub(crate) fn remote_server(r: &api::RemoteServer) -> crate::RemoteServer {
    crate::RemoteServer { endpoint: r.endpoint.to_string(), protocol: r.protocol.to_string(), devices: r.devices.iter().map(device).collect() }
}

pub(crate) fn sampling(p: &SamplingParams) -> api::SamplingParams {
    api::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
        logit_bias: p.logit_bias.iter().map(|b| api::LogitBias { token: b.token, bias: b.bias }).collect(),
        grammar: p.grammar.as_ref().map(grammar).into(),
    }
}

pub(crate) fn grammar(g: &Grammar) -> api::Grammar {
    api::Grammar {
        text: RString::from(g.text.as_str()),
        root: RString::from(g.root.as_str()),
        lazy: g.lazy,
        trigger_patterns: g.trigger_patterns.iter().map(|p| RString::from(p.as_str())).collect(),
        trigger_tokens: g.trigger_tokens.iter().copied().collect(),
    }
}

/// The plugin ABI's bounds of a grammar (`Grammar::validate`), for models without a
/// plugin (fakes).
pub(crate) fn validate_grammar(g: &Grammar) -> Result<(), BackendError> {
    grammar(g).validate().map_err(|e| BackendError::InvalidParam { field: e.field.into(), reason: e.reason })
}

pub(crate) fn device(d: &api::DeviceInfo) -> DeviceInfo {
    DeviceInfo { name: d.name.to_string(), description: d.description.to_string(), memory_total: d.memory_total, memory_free: d.memory_free }
}

pub(crate) fn backend_info(i: &api::BackendInfo) -> BackendInfo {
    BackendInfo { name: i.name.to_string(), accelerator: accelerator(i.accelerator), version: i.version.to_string(), llama_build: i.llama_build.to_string() }
}

fn model_info(i: &api::ModelInfo) -> ModelInfo {
    ModelInfo {
        description: i.description.to_string(),
        n_params: i.n_params,
        size_bytes: i.size_bytes,
        n_vocab: i.n_vocab,
        n_ctx_train: i.n_ctx_train,
        bos: i.bos,
        placement: i
            .placement
            .iter()
            .map(|p| crate::Placement { device: p.device.to_string(), description: p.description.to_string(), layers: p.layers, output: p.output, bytes: p.bytes })
            .collect(),
    }
}

pub(crate) fn error(e: api::BackendError) -> BackendError {
    use api::BackendError as E;
    match e {
        E::ModelLoad { reason } => BackendError::ModelLoad { reason: reason.into() },
        E::ContextCreate { reason } => BackendError::ContextCreate { reason: reason.into() },
        E::InvalidParam { field, reason } => BackendError::InvalidParam { field: field.into(), reason: reason.into() },
        E::Tokenize { reason } => BackendError::Tokenize { reason: reason.into() },
        E::InvalidToken { token } => BackendError::InvalidToken { token },
        E::ContextFull { n_ctx, needed } => BackendError::ContextFull { n_ctx, needed },
        E::NoKvSlot => BackendError::NoKvSlot,
        E::Decode { code } => BackendError::Decode { code },
        E::Aborted => BackendError::Aborted,
        E::Unavailable { reason } => BackendError::Unavailable { reason: reason.into() },
        E::Panic { message } => BackendError::Panic { message: message.into() },
        E::Rpc { endpoint, failure, reason } => BackendError::Rpc {
            endpoint: endpoint.into(),
            failure: match failure {
                api::RpcFailure::Unreachable => crate::RpcFailure::Unreachable,
                api::RpcFailure::Protocol => crate::RpcFailure::Protocol,
                api::RpcFailure::Lost => crate::RpcFailure::Lost,
            },
            reason: reason.into(),
        },
    }
}

fn result<T>(r: abi_stable::std_types::RResult<T, api::BackendError>) -> Result<T, BackendError> {
    r.into_result().map_err(error)
}

fn sampled(s: api::Sampled) -> Sampled {
    Sampled { token: s.token, is_eog: s.is_eog, accepted: s.accepted }
}

/// A plugin's model as [`ModelOps`].
pub(crate) struct PluginModel(pub api::ModelBox);

impl ModelOps for PluginModel {
    fn info(&self) -> ModelInfo {
        model_info(&self.0.info())
    }
    fn rpc_traffic(&self) -> Vec<crate::RpcTraffic> {
        self.0
            .rpc_traffic()
            .iter()
            .map(|t| crate::RpcTraffic { endpoint: t.endpoint.to_string(), bytes_sent: t.bytes_sent, bytes_received: t.bytes_received })
            .collect()
    }
    fn lost(&self) -> Option<BackendError> {
        self.0.lost().into_option().map(error)
    }
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, BackendError> {
        result(self.0.tokenize(RStr::from_str(text), add_special, parse_special)).map(RVec::into_vec)
    }
    fn token_bytes(&self, token: i32, special: bool) -> Result<Vec<u8>, BackendError> {
        result(self.0.token_bytes(token, special)).map(RVec::into_vec)
    }
    fn meta(&self, key: &str) -> Option<String> {
        self.0.meta(RStr::from_str(key)).into_option().map(RString::into_string)
    }
    fn new_context(&self, p: &ContextParams) -> Result<Box<dyn ContextOps>, BackendError> {
        let params = api::ContextParams {
            n_ctx: p.size.n_ctx,
            n_batch: p.size.n_batch,
            n_ubatch: p.size.n_ubatch,
            n_threads: p.size.n_threads,
            n_threads_batch: p.size.n_threads_batch,
            n_seq_max: p.n_seq_max,
            kv_unified: p.kv_unified,
            type_k: cache_type(p.cache.type_k),
            type_v: cache_type(p.cache.type_v),
            flash_attn: flash_attn(p.cache.flash_attn),
        };
        Ok(Box::new(PluginContext(result(self.0.new_context(params))?)))
    }
    fn check_grammar(&self, g: &Grammar) -> Result<(), BackendError> {
        result(self.0.check_grammar(grammar(g)))
    }
    fn new_embedder(&self, p: &crate::embed::EmbedParams) -> Result<Box<dyn crate::embed::EmbedderOps>, BackendError> {
        let params = api::EmbedParams {
            n_ctx: p.n_ctx,
            n_threads: p.n_threads,
            n_threads_batch: p.n_threads_batch,
            n_seq_max: p.n_seq_max,
            pooling: p.pooling.map_or(api::Pooling::Model, pooling),
            flash_attn: flash_attn(p.flash_attn),
            may_skip_output: p.may_skip_output,
        };
        Ok(Box::new(PluginEmbedder(result(self.0.new_embedder(params))?)))
    }
}

fn pooling(p: crate::embed::Pooling) -> api::Pooling {
    use crate::embed::Pooling as P;
    match p {
        P::None => api::Pooling::None,
        P::Mean => api::Pooling::Mean,
        P::Cls => api::Pooling::Cls,
        P::Last => api::Pooling::Last,
        P::Rank => api::Pooling::Rank,
    }
}

/// A plugin's embeddings context as [`crate::embed::EmbedderOps`].
struct PluginEmbedder(api::EmbedderBox);

impl crate::embed::EmbedderOps for PluginEmbedder {
    fn info(&self) -> crate::embed::EmbedInfo {
        use crate::embed::Pooling as P;
        let i = self.0.info();
        let pooling = match i.pooling {
            api::Pooling::Mean => P::Mean,
            api::Pooling::Cls => P::Cls,
            api::Pooling::Last => P::Last,
            api::Pooling::Rank => P::Rank,
            // `Model` is resolved by the backend; were it not, no pooling is what llama.cpp does.
            api::Pooling::None | api::Pooling::Model => P::None,
        };
        crate::embed::EmbedInfo { n_ctx: i.n_ctx, n_seq_max: i.n_seq_max, pooling, n_out: i.n_out as usize }
    }
    fn abort_handle(&self) -> Box<dyn AbortHandle> {
        Box::new(PluginAbort(self.0.abort_handle()))
    }
    fn reset_abort(&mut self) {
        self.0.reset_abort()
    }
    fn embed(&mut self, tokens: &[i32], lengths: &[u32]) -> Result<Vec<f32>, BackendError> {
        result(self.0.embed(RSlice::from_slice(tokens), RSlice::from_slice(lengths))).map(RVec::into_vec)
    }
}

struct PluginAbort(api::AbortBox);

impl AbortHandle for PluginAbort {
    fn abort(&self) {
        self.0.abort()
    }
}

/// A plugin's context as [`ContextOps`].
struct PluginContext(api::ContextBox);

impl ContextOps for PluginContext {
    fn n_ctx(&self) -> u32 {
        self.0.n_ctx()
    }
    fn n_past(&self) -> u32 {
        self.0.n_past()
    }
    fn clear(&mut self) {
        self.0.clear()
    }
    fn truncate(&mut self, n_keep: u32) -> bool {
        self.0.truncate(n_keep)
    }
    fn accept(&mut self, tokens: &[i32]) {
        self.0.accept(RSlice::from_slice(tokens))
    }
    fn abort_handle(&self) -> Box<dyn AbortHandle> {
        Box::new(PluginAbort(self.0.abort_handle()))
    }
    fn reset_abort(&mut self) {
        self.0.reset_abort()
    }
    fn n_seq_max(&self) -> u32 {
        self.0.n_seq_max()
    }
    fn set_seq_sampling(&mut self, seq: i32, params: &SamplingParams, history: &[i32]) -> Result<(), BackendError> {
        result(self.0.set_seq_sampling(seq, sampling(params), RSlice::from_slice(history)))
    }
    fn step(&mut self, batch: &[BatchToken], samples: &[SampleRequest]) -> Result<Vec<Result<Sampled, BackendError>>, BackendError> {
        let batch: Vec<api::BatchToken> = batch.iter().map(|t| api::BatchToken { token: t.token, pos: t.pos, seq: t.seq, logits: t.logits }).collect();
        let samples: Vec<api::SampleRequest> = samples.iter().map(|s| api::SampleRequest { seq: s.seq, index: s.index, n_draft: s.n_draft }).collect();
        result(self.0.step(RSlice::from_slice(&batch), RSlice::from_slice(&samples)))
            .map(|v| v.into_iter().map(|r| r.into_result().map(sampled).map_err(error)).collect())
    }
    fn draft(&mut self, seq: i32, tokens: &[i32], pos: i32, n_max: u32, p_min: f32) -> Result<Vec<i32>, BackendError> {
        result(self.0.draft(seq, RSlice::from_slice(tokens), pos, n_max, p_min)).map(|v| v.into_vec())
    }
    fn seq_remove(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        self.0.seq_remove(seq, p0, p1)
    }
    fn seq_pos_max(&self, seq: i32) -> i32 {
        self.0.seq_pos_max(seq)
    }
    fn seq_can_continue(&self, seq: i32, pos: i32) -> bool {
        self.0.seq_can_continue(seq, pos)
    }
    fn set_sampling(&mut self, params: &SamplingParams) -> Result<(), BackendError> {
        result(self.0.set_sampling(sampling(params)))
    }
    fn decode(&mut self, tokens: &[i32], logits_last: bool) -> Result<(), BackendError> {
        result(self.0.decode(RSlice::from_slice(tokens), logits_last))
    }
    fn decode_sample(&mut self, tokens: &[i32]) -> Result<Sampled, BackendError> {
        result(self.0.decode_sample(RSlice::from_slice(tokens))).map(sampled)
    }
}
