//! How many of a model's layers fit in a GPU's free memory, estimated from the GGUF file
//! alone (no backend, no load): what `llama backends -m MODEL` prints, so a user can pick
//! `--gpu-layers` before a load fails for lack of memory.
//!
//! The arithmetic follows how llama.cpp places a model with `n_gpu_layers = N`
//! (`llama-model.cpp`, `i_gpu_start = n_layer + 1 - N`): the output head counts as the last
//! layer, so N = 1 offloads the head alone and N = k the head plus the last k - 1 repeating
//! layers with their share of the KV cache (`N = n_layer + 1` is "all"). The token
//! embeddings stay in host memory. A model with tied embeddings (no `output.weight`) gets a copy of
//! `token_embd.weight` as its output head.

use llama_gguf::{GgufFile, MetaValue};
use serde::Serialize;

use crate::types::{CacheType, KvCacheParams};

/// Memory held back on every GPU for llama.cpp's compute buffers, the CUDA/Metal runtime
/// and the desktop: 1 GiB, as llama.cpp's own fitting does by default.
pub const GPU_MARGIN: u64 = 1 << 30;

/// A model's memory needs, per layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFootprint {
    /// Repeating layers (`block_count`).
    pub n_layer: u32,
    /// Weights of each repeating layer, in bytes.
    pub layer_bytes: Vec<u64>,
    /// The output head (and its norm), offloaded with the last "layer".
    pub output_bytes: u64,
    /// Weights that stay in host memory (token embeddings).
    pub host_bytes: u64,
    /// The KV cache of one layer at `n_ctx` tokens, keys and values of the types below.
    pub kv_bytes_per_layer: u64,
    pub n_ctx: u32,
    /// The cache types the KV figures are for.
    pub type_k: CacheType,
    pub type_v: CacheType,
}

/// The verdict for one GPU (or several, pooled as a layer split pools them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerFit {
    /// What `--gpu-layers` could be: 0 ..= n_layer + 1.
    pub layers: u32,
    /// `n_layer + 1`: the value that offloads everything.
    pub all: u32,
    /// Bytes the offloaded part needs (weights + KV), and what was available after the margin.
    pub needed_bytes: u64,
    pub available_bytes: u64,
}

/// The file lacks a hyperparameter the estimate needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot estimate the model's size per layer: {0}")]
pub struct FitError(String);

fn uint(f: &GgufFile, key: &str) -> Option<u64> {
    f.get(key).and_then(MetaValue::as_u64)
}

/// A per-layer value: a scalar, or an array of one value per layer (the largest is taken,
/// since the estimate must not fall short).
fn per_layer_max(f: &GgufFile, key: &str) -> Option<u64> {
    match f.get(key)? {
        MetaValue::Array { values, .. } => values.iter().filter_map(|v| v.as_u64()).max(),
        v => v.as_u64(),
    }
}

impl ModelFootprint {
    /// The footprint of the model in `f` with a KV cache of `n_ctx` tokens of `cache`'s types.
    pub fn of(f: &GgufFile, n_ctx: u32, cache: &KvCacheParams) -> Result<ModelFootprint, FitError> {
        let arch = f.architecture().ok_or_else(|| FitError("no general.architecture".into()))?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = uint(f, &key("block_count")).ok_or_else(|| FitError(format!("no {arch}.block_count")))?;
        // llama.cpp's own bound; the validator enforces it for loads, this keeps a bare
        // header read (`llama backends -m`) from allocating or looping on a wild value.
        if n_layer > llama_gguf::limits::MAX_LAYERS {
            return Err(FitError(format!("{arch}.block_count {n_layer} is over {}", llama_gguf::limits::MAX_LAYERS)));
        }
        let n_layer = n_layer as u32;
        let n_embd = uint(f, &key("embedding_length")).ok_or_else(|| FitError(format!("no {arch}.embedding_length")))?;
        let n_head = per_layer_max(f, &key("attention.head_count")).unwrap_or(0);
        let n_head_kv = per_layer_max(f, &key("attention.head_count_kv")).unwrap_or(n_head);
        let head_dim = n_embd.checked_div(n_head).unwrap_or(0);
        let k_len = uint(f, &key("attention.key_length")).unwrap_or(head_dim);
        let v_len = uint(f, &key("attention.value_length")).unwrap_or(head_dim);

        let mut layer_bytes = vec![0u64; n_layer as usize];
        let (mut output_bytes, mut host_bytes, mut embd_bytes, mut tied) = (0u64, 0u64, 0u64, true);
        for t in &f.tensors {
            let layer = t.name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            match layer {
                Some(i) if i < layer_bytes.len() => layer_bytes[i] += t.n_bytes,
                _ if t.name.starts_with("output") => {
                    tied &= t.name != "output.weight";
                    output_bytes += t.n_bytes;
                }
                _ => {
                    if t.name == "token_embd.weight" {
                        embd_bytes = t.n_bytes;
                    }
                    host_bytes += t.n_bytes;
                }
            }
        }
        if tied {
            output_bytes += embd_bytes;
        }
        // Keys and values for every token of the context, each token's row rounded up to
        // whole bytes (ggml stores whole blocks; rounding up keeps the estimate from falling
        // short). Saturating: the factors come from the file, and an absurd product only
        // makes the model "not fit".
        let row = |len: u64, t: CacheType| {
            let (bytes, elements) = t.bytes_per_element();
            n_head_kv.saturating_mul(len).saturating_mul(bytes).div_ceil(elements)
        };
        let per_token = row(k_len, cache.type_k).saturating_add(row(v_len, cache.type_v));
        let kv_bytes_per_layer = u64::from(n_ctx).saturating_mul(per_token);
        Ok(ModelFootprint { n_layer, layer_bytes, output_bytes, host_bytes, kv_bytes_per_layer, n_ctx, type_k: cache.type_k, type_v: cache.type_v })
    }

    /// The KV cache of every repeating layer (an upper bound: sliding-window layers hold less).
    pub fn kv_bytes(&self) -> u64 {
        u64::from(self.n_layer).saturating_mul(self.kv_bytes_per_layer)
    }

    /// Bytes on the GPU with `n` offloaded layers (llama.cpp's `n_gpu_layers`): the output
    /// head first, then repeating layers from the last one down.
    pub fn offloaded_bytes(&self, n: u32) -> u64 {
        if n == 0 {
            return 0;
        }
        let repeating = (n - 1).min(self.n_layer) as usize;
        let layers = self.layer_bytes[self.layer_bytes.len() - repeating..].iter().fold(0u64, |a, b| a.saturating_add(*b));
        self.output_bytes.saturating_add(layers).saturating_add((repeating as u64).saturating_mul(self.kv_bytes_per_layer))
    }

    /// The most layers that fit in `free` bytes over `devices` GPUs, after [`GPU_MARGIN`]
    /// on each.
    pub fn fit(&self, free: u64, devices: u32) -> LayerFit {
        let available = free.saturating_sub(GPU_MARGIN * u64::from(devices.max(1)));
        let all = self.n_layer + 1;
        let layers = (0..=all).rev().find(|&n| self.offloaded_bytes(n) <= available).unwrap_or(0);
        LayerFit { layers, all, needed_bytes: self.offloaded_bytes(all), available_bytes: available }
    }
}

/// `--gpu-layers auto` on a GPU backend: every layer when the model fits the devices' free
/// memory, else as many as fit (llama.cpp's `n_gpu_layers`; -1 is all). `None` when the
/// devices report no free memory, so there is nothing to estimate against.
pub fn auto_gpu_layers(model: &ModelFootprint, devices: &[&crate::DeviceInfo]) -> Option<(i32, LayerFit)> {
    let free: u64 = devices.iter().map(|d| d.memory_free).sum();
    if free == 0 {
        return None;
    }
    let fit = model.fit(free, devices.len() as u32);
    let layers = if fit.layers >= fit.all { -1 } else { fit.layers as i32 };
    Some((layers, fit))
}

/// The estimate for one GPU backend of a selection report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendFit {
    pub backend: String,
    pub verdict: crate::report::Verdict,
    /// GPUs pooled (a layer split spreads layers over all of them).
    pub devices: u32,
    /// Whether the devices reported free memory (a backend's probe) or only their total
    /// (the driver, when no plugin is installed).
    pub from_free_memory: bool,
    pub fit: LayerFit,
}

/// The estimate for every GPU backend in `report` that lists devices with memory.
pub fn for_report(report: &crate::report::SelectionReport, model: &ModelFootprint) -> Vec<BackendFit> {
    report
        .candidates
        .iter()
        .filter(|c| c.is_gpu() && c.devices.iter().any(|d| d.memory_total > 0))
        .map(|c| {
            let from_free_memory = c.devices.iter().any(|d| d.memory_free > 0);
            let memory: u64 = c.devices.iter().map(|d| if from_free_memory { d.memory_free } else { d.memory_total }).sum();
            let devices = c.devices.len() as u32;
            BackendFit { backend: c.name.clone(), verdict: c.verdict, devices, from_free_memory, fit: model.fit(memory, devices) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_gguf::TensorInfo;
    use std::collections::BTreeMap;

    /// A 4-layer model: 100 MB per layer, a 50 MB output head, 30 MB of embeddings.
    fn model(tied: bool) -> GgufFile {
        let mut metadata = BTreeMap::new();
        metadata.insert("general.architecture".into(), MetaValue::Str("llama".into()));
        metadata.insert("llama.block_count".into(), MetaValue::UInt(4));
        metadata.insert("llama.embedding_length".into(), MetaValue::UInt(1024));
        metadata.insert("llama.attention.head_count".into(), MetaValue::UInt(8));
        metadata.insert("llama.attention.head_count_kv".into(), MetaValue::UInt(2));
        let t = |name: &str, n_bytes: u64| TensorInfo { name: name.into(), dims: vec![1], ggml_type: 0, offset: 0, n_bytes };
        let mut tensors = vec![t("token_embd.weight", 30_000_000), t("output_norm.weight", 4096)];
        if !tied {
            tensors.push(t("output.weight", 50_000_000));
        }
        for i in 0..4 {
            tensors.push(t(&format!("blk.{i}.attn_q.weight"), 60_000_000));
            tensors.push(t(&format!("blk.{i}.ffn_up.weight"), 40_000_000));
        }
        GgufFile { version: 3, tensor_count: tensors.len() as u64, metadata, value_types: BTreeMap::new(), tensors, alignment: 32, data_offset: 0, file_len: 0 }
    }

    fn f16() -> KvCacheParams {
        KvCacheParams::default()
    }

    fn kv(type_k: CacheType, type_v: CacheType) -> u64 {
        let cache = KvCacheParams { type_k, type_v, ..KvCacheParams::default() };
        ModelFootprint::of(&model(false), 4096, &cache).unwrap().kv_bytes_per_layer
    }

    #[test]
    fn quantized_caches_take_their_types_bytes() {
        let f16_bytes = kv(CacheType::F16, CacheType::F16);
        // 4096 tokens x 2 KV heads x 128 elements, K and V: 32 q8_0 values in 34 bytes.
        assert_eq!(kv(CacheType::Q8_0, CacheType::Q8_0), 4096 * 2 * (2 * 128 * 34 / 32));
        let ratio = |b: u64| b as f64 / f16_bytes as f64;
        assert!((ratio(kv(CacheType::Q8_0, CacheType::Q8_0)) - 0.53125).abs() < 1e-9);
        assert!((ratio(kv(CacheType::Q4_0, CacheType::Q4_0)) - 0.28125).abs() < 1e-9, "q4_0: 18 bytes per 32");
        // K and V count on their own.
        assert_eq!(kv(CacheType::Q8_0, CacheType::F16) + kv(CacheType::F16, CacheType::Q8_0), f16_bytes + kv(CacheType::Q8_0, CacheType::Q8_0));
        let m = ModelFootprint::of(&model(false), 4096, &KvCacheParams { type_k: CacheType::Q4_0, ..f16() }).unwrap();
        assert_eq!((m.type_k, m.type_v, m.kv_bytes()), (CacheType::Q4_0, CacheType::F16, 4 * m.kv_bytes_per_layer));
    }

    /// A row that is not a whole number of blocks is rounded up, never down.
    #[test]
    fn the_kv_estimate_rounds_up() {
        let mut f = model(false);
        f.metadata.insert("llama.attention.key_length".into(), MetaValue::UInt(33));
        f.metadata.insert("llama.attention.value_length".into(), MetaValue::UInt(33));
        let q8 = KvCacheParams { type_k: CacheType::Q8_0, type_v: CacheType::Q8_0, ..f16() };
        // 2 heads x 33 elements = 66 per row: 66 x 34 / 32 = 70.125, so 71 bytes each for K and V.
        assert_eq!(ModelFootprint::of(&f, 1, &q8).unwrap().kv_bytes_per_layer, 2 * 71);
    }

    /// The byte counts are ggml's: the GGUF validator's type table, which a backend test
    /// checks against the linked ggml.
    #[test]
    fn cache_type_sizes_are_ggmls() {
        for t in CacheType::ALL {
            let (_, _, block, size) = llama_gguf::GGML_TYPES.iter().find(|e| e.1 == t.as_str()).copied().unwrap();
            assert_eq!(t.bytes_per_element(), (size, block), "{t}");
        }
    }

    #[test]
    fn the_footprint_adds_up_by_layer() {
        let m = ModelFootprint::of(&model(false), 4096, &f16()).unwrap();
        assert_eq!(m.layer_bytes, vec![100_000_000; 4]);
        assert_eq!((m.output_bytes, m.host_bytes), (50_004_096, 30_000_000));
        // 4096 tokens x 2 KV heads x (128 + 128) x 2 bytes.
        assert_eq!(m.kv_bytes_per_layer, 4096 * 2 * 256 * 2);
        assert_eq!(m.offloaded_bytes(0), 0);
        // llama.cpp offloads the head first: 1 is the head alone, 3 the head + 2 layers.
        assert_eq!(m.offloaded_bytes(1), 50_004_096);
        assert_eq!(m.offloaded_bytes(3), 2 * (100_000_000 + 4_194_304) + 50_004_096);
        assert_eq!(m.offloaded_bytes(5), 4 * (100_000_000 + 4_194_304) + 50_004_096);
        assert_eq!(m.offloaded_bytes(9), m.offloaded_bytes(5), "more than all is all");
        // Tied embeddings: the output head is a copy of them.
        assert_eq!(ModelFootprint::of(&model(true), 4096, &f16()).unwrap().output_bytes, 30_004_096);
    }

    #[test]
    fn layers_fit_after_the_margin() {
        let m = ModelFootprint::of(&model(false), 4096, &f16()).unwrap();
        let (per_layer, head) = (100_000_000 + 4_194_304, 50_004_096);
        assert_eq!(m.fit(80 << 30, 1).layers, 5, "everything fits an 80 GiB card");
        assert_eq!(m.fit(GPU_MARGIN + head + 2 * per_layer + 10, 1).layers, 3);
        assert_eq!(m.fit(GPU_MARGIN + 4 * per_layer, 1).layers, 4, "the head comes first: 3 layers and the head");
        assert_eq!(m.fit(GPU_MARGIN + head - 1, 1).layers, 0, "not even the head");
        assert_eq!(m.fit(GPU_MARGIN / 2, 1).layers, 0);
        // Two GPUs: a margin on each.
        assert_eq!(m.fit(2 * GPU_MARGIN + head + per_layer, 2).layers, 2);
        assert_eq!(m.fit(80 << 30, 1).all, 5);
    }

    #[test]
    fn auto_offloads_what_fits() {
        let m = ModelFootprint::of(&model(false), 4096, &f16()).unwrap();
        let gpu = |free: u64| crate::DeviceInfo { name: "CUDA0".into(), description: String::new(), memory_total: 80 << 30, memory_free: free };
        let (big, small) = (gpu(80 << 30), gpu(GPU_MARGIN + 50_004_096 + 3 * (100_000_000 + 4_194_304)));
        assert_eq!(auto_gpu_layers(&m, &[&big]).map(|f| f.0), Some(-1));
        assert_eq!(auto_gpu_layers(&m, &[&small]).map(|f| f.0), Some(4), "the head and 3 layers");
        assert_eq!(auto_gpu_layers(&m, &[&gpu(0)]), None, "no free-memory figure: nothing to go by");
        assert_eq!(auto_gpu_layers(&m, &[]), None);
    }

    #[test]
    fn missing_hyperparameters_are_named() {
        let mut f = model(false);
        f.metadata.insert("llama.block_count".into(), MetaValue::UInt(1 << 40));
        assert!(ModelFootprint::of(&f, 4096, &f16()).unwrap_err().to_string().contains("block_count 1099511627776 is over 512"));
        f.metadata.insert("llama.attention.head_count_kv".into(), MetaValue::UInt(u64::MAX));
        f.metadata.insert("llama.block_count".into(), MetaValue::UInt(4));
        let wild = ModelFootprint::of(&f, 4096, &f16()).unwrap();
        assert_eq!((wild.kv_bytes_per_layer, wild.fit(80 << 30, 1).layers), (u64::MAX, 1), "saturates: only the head fits");
        f.metadata.remove("llama.block_count");
        assert_eq!(ModelFootprint::of(&f, 4096, &f16()).unwrap_err().to_string(), "cannot estimate the model's size per layer: no llama.block_count");
    }
}
