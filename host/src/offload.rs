//! The GPU offload decision: from what the user asked ([`OffloadRequest`]), the backend in
//! use and its devices' free memory right now, the [`ModelParams`] a load gets. [`decide`]
//! is a pure function of plain values, unit-tested with stand-in device lists;
//! [`for_backend`] gathers those values from a real backend and a validated [`ModelFile`].
//! It never fails and never loads anything: what it cannot estimate it leaves to llama.cpp
//! (every layer), as before the estimate existed.

use crate::fit::{LayerFit, ModelFootprint};
use crate::{Accelerator, DeviceInfo, KvCacheParams, LoadedBackend, ModelFile, ModelParams, SplitMode};

/// How much of the model goes to the GPU (`--gpu-layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// Every layer that fits the offload devices' free memory on a GPU backend; none on the CPU.
    #[default]
    Auto,
    All,
    Count(u32),
}

impl GpuLayers {
    /// Whether this asks for GPU offload explicitly.
    pub fn wants_gpu(self) -> bool {
        matches!(self, GpuLayers::All | GpuLayers::Count(1..))
    }

    /// llama.cpp's `n_gpu_layers` before any estimate, on a backend that is (`true`) or is
    /// not a GPU: negative means all layers.
    pub fn n_gpu_layers(self, gpu: bool) -> i32 {
        match self {
            GpuLayers::Auto if gpu => -1,
            GpuLayers::Auto => 0,
            GpuLayers::All => -1,
            GpuLayers::Count(n) => n.min(i32::MAX as u32) as i32,
        }
    }
}

/// Which GPUs to offload to (`--device`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Devices {
    /// Every GPU of the backend in use.
    #[default]
    Every,
    /// No offload device at all.
    None,
    /// These, by ggml name (`CUDA0`), in this order (llama.cpp counts `main_gpu` in it).
    Named(Vec<String>),
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct OffloadRequest {
    pub gpu_layers: GpuLayers,
    pub devices: Devices,
    pub split_mode: SplitMode,
    /// With `SplitMode::None`, the GPU to use, counted among the offload devices.
    pub main_gpu: u32,
    /// RPC servers whose devices join the offload devices (`--rpc`), ahead of local GPUs.
    pub rpc: Vec<String>,
    /// `--rpc-timeout`.
    pub rpc_timeout: std::time::Duration,
    /// `--tensor-split` proportions, one per offload device; empty: by free memory.
    pub tensor_split: Vec<f32>,
    /// Repack weights for the CPU's fastest kernels (off: `--no-repack`).
    pub repack: bool,
}

impl Default for OffloadRequest {
    fn default() -> Self {
        OffloadRequest {
            gpu_layers: GpuLayers::Auto,
            devices: Devices::Every,
            split_mode: SplitMode::Layer,
            main_gpu: 0,
            rpc: Vec::new(),
            rpc_timeout: crate::DEFAULT_RPC_TIMEOUT,
            tensor_split: Vec::new(),
            repack: true,
        }
    }
}

impl OffloadRequest {
    /// The settings that ask for a GPU explicitly, by option name (`gpu-layers`, `device`,
    /// `main-gpu`); empty when none do. For the warning when only the CPU is usable.
    pub fn gpu_asks(&self) -> Vec<&'static str> {
        let mut asks = Vec::new();
        if self.gpu_layers.wants_gpu() {
            asks.push("gpu-layers");
        }
        if matches!(self.devices, Devices::Named(_)) {
            asks.push("device");
        }
        if self.main_gpu != 0 {
            asks.push("main-gpu");
        }
        asks
    }

    /// Whether there are offload devices beyond the backend's own: remote ones.
    pub fn has_remote(&self) -> bool {
        !self.rpc.is_empty()
    }
}

/// Where the model would go.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The backend computes on a GPU.
    pub gpu: bool,
    /// The backend was chosen automatically: on a CPU fallback, GPU device names (which
    /// mean nothing to it) are dropped rather than refused.
    pub automatic: bool,
    /// The backend's devices and their free memory now; read only for `GpuLayers::Auto` on
    /// a GPU.
    pub devices: &'a [DeviceInfo],
}

/// What the `auto` estimate found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoFit {
    /// Not `GpuLayers::Auto` on a GPU backend: nothing was estimated.
    NotAsked,
    /// Nothing to estimate with (no offload device, no free-memory figure, no per-layer
    /// sizes): every layer, and llama.cpp decides.
    Unknown,
    /// Every layer fits.
    All(LayerFit),
    /// Only this many layers (llama.cpp's `n_gpu_layers`) fit.
    Partial { layers: u32, fit: LayerFit },
}

/// The decision: the load's parameters and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Offload {
    pub params: ModelParams,
    pub auto: AutoFit,
}

/// The model parameters for `request` on `target`. `footprint` is the model's memory need
/// per layer (`ModelFile::footprint`), used only for `GpuLayers::Auto` on a GPU.
pub fn decide(request: &OffloadRequest, target: &Target<'_>, footprint: Option<&ModelFootprint>) -> Offload {
    let devices = match &request.devices {
        Devices::Named(_) if !target.gpu && target.automatic => None,
        Devices::Named(names) => Some(names.clone()),
        Devices::None => Some(Vec::new()),
        Devices::Every => None,
    };
    // Remote devices are offload devices on any backend: `auto` puts every layer on the
    // offload devices (remote and local together), as the user asked for them by name.
    let offloads = target.gpu || request.has_remote();
    let mut params = ModelParams {
        n_gpu_layers: request.gpu_layers.n_gpu_layers(offloads),
        split_mode: request.split_mode,
        main_gpu: request.main_gpu.min(i32::MAX as u32) as i32,
        devices,
        rpc: request.rpc.clone(),
        rpc_timeout: request.rpc_timeout,
        tensor_split: request.tensor_split.clone(),
        repack: request.repack,
        ..ModelParams::default()
    };
    // Remote memory is not estimated here (it is asked at load, through the relay): with
    // --rpc, `auto` is every layer and llama.cpp splits them by free memory.
    let auto = if target.gpu && request.gpu_layers == GpuLayers::Auto && !request.has_remote() { estimate(request, target.devices, footprint) } else { AutoFit::NotAsked };
    if let AutoFit::Partial { layers, .. } = auto {
        params.n_gpu_layers = layers as i32;
    }
    Offload { params, auto }
}

/// `GpuLayers::Auto` on a GPU: every layer if the model fits the offload devices' free
/// memory, else as many as fit (a load that asks for more than fits fails outright).
fn estimate(request: &OffloadRequest, now: &[DeviceInfo], footprint: Option<&ModelFootprint>) -> AutoFit {
    let mut devices: Vec<&DeviceInfo> = match &request.devices {
        // In the user's order: llama.cpp takes the devices (and main_gpu's index) that way.
        Devices::Named(names) => names.iter().filter_map(|n| now.iter().find(|d| d.name.eq_ignore_ascii_case(n))).collect(),
        Devices::None => return AutoFit::Unknown,
        Devices::Every => now.iter().collect(),
    };
    if request.split_mode == SplitMode::None {
        devices = devices.get(request.main_gpu as usize).into_iter().copied().collect();
    }
    let Some(footprint) = footprint else { return AutoFit::Unknown };
    match crate::fit::auto_gpu_layers(footprint, &devices) {
        None => AutoFit::Unknown,
        Some((layers, fit)) if layers < 0 => AutoFit::All(fit),
        Some((layers, fit)) => AutoFit::Partial { layers: layers as u32, fit },
    }
}

/// [`decide`] for a loaded backend and a validated file: the devices' free memory is asked
/// now (the backend's probe, run again in this process) and the per-layer sizes come from
/// `file`'s header, both only when `GpuLayers::Auto` on a GPU needs them. `automatic`: the
/// backend was chosen by `BackendChoice::Auto`. `n_ctx` and `cache`: the context (tokens and
/// cache types) the estimate reserves KV cache for.
pub fn for_backend(request: &OffloadRequest, backend: &LoadedBackend, automatic: bool, file: &ModelFile, n_ctx: u32, cache: &KvCacheParams) -> Offload {
    let gpu = backend.info().accelerator != Accelerator::Cpu;
    let estimate = gpu && request.gpu_layers == GpuLayers::Auto;
    let devices = if estimate { backend.devices_now() } else { Vec::new() };
    let footprint = if estimate { file.footprint(n_ctx, cache).ok() } else { None };
    decide(request, &Target { gpu, automatic, devices: &devices }, footprint.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::GPU_MARGIN;
    use crate::CacheType;

    /// 4 layers of 100 MB plus a 50 MB head (fit.rs's test model, built directly).
    fn footprint() -> ModelFootprint {
        ModelFootprint { n_layer: 4, layer_bytes: vec![100_000_000; 4], output_bytes: 50_000_000, host_bytes: 30_000_000, kv_bytes_per_layer: 0, n_ctx: 4096, type_k: CacheType::F16, type_v: CacheType::F16 }
    }

    fn gpu(name: &str, free: u64) -> DeviceInfo {
        DeviceInfo { name: name.into(), description: String::new(), memory_total: 80 << 30, memory_free: free }
    }

    fn on(devices: &[DeviceInfo]) -> Target<'_> {
        Target { gpu: true, automatic: true, devices }
    }

    /// Free memory for the head and `n` repeating layers, after the margin.
    fn room_for(n: u64) -> u64 {
        GPU_MARGIN + 50_000_000 + n * 100_000_000
    }

    #[test]
    fn auto_offloads_everything_that_fits_and_no_more() {
        let fp = footprint();
        let req = OffloadRequest::default();
        let big = [gpu("CUDA0", 80 << 30)];
        let all = decide(&req, &on(&big), Some(&fp));
        assert_eq!(all.params.n_gpu_layers, -1);
        assert!(matches!(all.auto, AutoFit::All(_)));
        let small = [gpu("CUDA0", room_for(2))];
        let some = decide(&req, &on(&small), Some(&fp));
        assert_eq!(some.params.n_gpu_layers, 3, "the head and 2 layers");
        assert!(matches!(some.auto, AutoFit::Partial { layers: 3, .. }));
        // Nothing to go by: every layer, llama.cpp decides.
        assert_eq!(decide(&req, &on(&[gpu("CUDA0", 0)]), Some(&fp)).auto, AutoFit::Unknown);
        assert_eq!(decide(&req, &on(&big), None).params.n_gpu_layers, -1);
    }

    #[test]
    fn auto_on_the_cpu_offloads_nothing_and_estimates_nothing() {
        let cpu = Target { gpu: false, automatic: true, devices: &[] };
        let o = decide(&OffloadRequest::default(), &cpu, Some(&footprint()));
        assert_eq!((o.params.n_gpu_layers, o.auto), (0, AutoFit::NotAsked));
        // An explicit count goes through as asked (the backend ignores it on the CPU).
        let o = decide(&OffloadRequest { gpu_layers: GpuLayers::Count(7), ..Default::default() }, &cpu, None);
        assert_eq!(o.params.n_gpu_layers, 7);
    }

    #[test]
    fn named_devices_pool_in_the_users_order_and_split_none_takes_main_gpu() {
        let fp = footprint();
        let now = [gpu("CUDA0", room_for(1)), gpu("CUDA1", 80 << 30)];
        // Both named: pooled, everything fits.
        let both = OffloadRequest { devices: Devices::Named(vec!["cuda1".into(), "CUDA0".into()]), ..Default::default() };
        assert_eq!(decide(&both, &on(&now), Some(&fp)).params.n_gpu_layers, -1);
        // Split none, main GPU 1 of the user's order (CUDA0, the small one).
        let one = OffloadRequest { split_mode: SplitMode::None, main_gpu: 1, ..both.clone() };
        let o = decide(&one, &on(&now), Some(&fp));
        assert_eq!((o.params.n_gpu_layers, o.params.main_gpu, o.params.split_mode), (2, 1, SplitMode::None));
        assert_eq!(o.params.devices, Some(vec!["cuda1".to_string(), "CUDA0".to_string()]));
        // A name the backend does not have contributes nothing to the estimate.
        let unknown = OffloadRequest { devices: Devices::Named(vec!["CUDA7".into()]), ..Default::default() };
        assert_eq!(decide(&unknown, &on(&now), Some(&fp)).auto, AutoFit::Unknown);
        // No device: nothing to estimate, an empty device list.
        let none = OffloadRequest { devices: Devices::None, ..Default::default() };
        let o = decide(&none, &on(&now), Some(&fp));
        assert_eq!((o.auto, o.params.devices), (AutoFit::Unknown, Some(Vec::new())));
    }

    #[test]
    fn gpu_names_are_dropped_on_a_cpu_fallback_and_kept_when_named() {
        let req = OffloadRequest { devices: Devices::Named(vec!["CUDA0".into()]), gpu_layers: GpuLayers::All, ..Default::default() };
        let fallback = Target { gpu: false, automatic: true, devices: &[] };
        assert_eq!(decide(&req, &fallback, None).params.devices, None);
        let named_cpu = Target { gpu: false, automatic: false, devices: &[] };
        assert_eq!(decide(&req, &named_cpu, None).params.devices, Some(vec!["CUDA0".to_string()]));
        assert_eq!(req.gpu_asks(), vec!["gpu-layers", "device"]);
        assert!(OffloadRequest::default().gpu_asks().is_empty());
    }

    #[test]
    fn gpu_layers_values() {
        assert_eq!(GpuLayers::Auto.n_gpu_layers(false), 0);
        assert_eq!(GpuLayers::Auto.n_gpu_layers(true), -1);
        assert_eq!(GpuLayers::Count(7).n_gpu_layers(false), 7);
        assert_eq!(GpuLayers::Count(u32::MAX).n_gpu_layers(true), i32::MAX);
        assert!(GpuLayers::Count(1).wants_gpu() && GpuLayers::All.wants_gpu());
        assert!(!GpuLayers::Count(0).wants_gpu() && !GpuLayers::Auto.wants_gpu());
    }
}
