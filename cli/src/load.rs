//! What every model-loading command shares: select the backend (with the GPU warning),
//! decide the model parameters for it, load with a progress bar on a terminal.

use std::path::Path;

use llama_host::{BackendChoice, Backends, LoadedBackend, Model, ModelParams};

use crate::args;
use crate::opts::{Global, LoadOpts};
use crate::{progress, CliError};

/// Discovers backends, prints the report with -v, and selects.
pub fn select_backend(g: &Global, l: &LoadOpts) -> Result<LoadedBackend, CliError> {
    let mut backends = Backends::discover(&g.discovery());
    let choice = l.backend.clone();
    let selected = backends.select(choice.clone());
    if g.verbose > 0 {
        err!("{}", backends.report());
    }
    let selected = selected?;
    // GPU offload asked for, but the backend in use is the CPU: say why, once, and go on.
    // (A GPU backend named with --backend that cannot run is already an error above.)
    let flags = l.offload.gpu_flags();
    if !flags.is_empty() && selected.info().accelerator == llama_host::Accelerator::Cpu && choice == BackendChoice::Auto {
        let why: Vec<String> = backends
            .report()
            .candidates
            .iter()
            .filter(|c| c.is_gpu())
            .map(|c| format!("{}: {}", c.name, c.reason))
            .collect();
        let verb = if flags.len() == 1 { "asks" } else { "ask" };
        tracing::warn!("{} {verb} for GPU offload, but no GPU backend is usable here ({}); running on the CPU", flags.join(", "), why.join("; "));
    }
    Ok(selected)
}

/// Model parameters from the command line, resolved for the backend in use.
pub fn model_params(backend: &LoadedBackend, l: &LoadOpts, n_ctx: u32) -> ModelParams {
    let m = &l.offload;
    let gpu = backend.info().accelerator != llama_host::Accelerator::Cpu;
    let mut params = m.model_params(gpu, l.backend == BackendChoice::Auto);
    if gpu && m.gpu_layers == args::GpuLayers::Auto {
        if let Some(n) = auto_gpu_layers(backend, m, &l.path, n_ctx) {
            params.n_gpu_layers = n;
        }
    }
    params
}

/// `--gpu-layers auto` on a GPU backend: every layer if the model fits the offload devices'
/// free memory right now, else as many as the estimate says fit (a load that asks for more
/// than fits fails outright). `None` (all layers) when there is nothing to estimate with.
fn auto_gpu_layers(backend: &LoadedBackend, m: &args::ModelArgs, path: &Path, n_ctx: u32) -> Option<i32> {
    let now = backend.devices_now();
    let mut devices: Vec<&llama_host::DeviceInfo> = match &m.device {
        // In the user's order: llama.cpp takes the devices (and --main-gpu's index) that way.
        Some(args::Devices::Named(names)) => names.iter().filter_map(|n| now.iter().find(|d| d.name.eq_ignore_ascii_case(n))).collect(),
        Some(args::Devices::None) => return None,
        None => now.iter().collect(),
    };
    if m.split_mode == args::SplitModeArg::None {
        devices = devices.get(m.main_gpu as usize).into_iter().copied().collect();
    }
    let footprint = llama_host::fit::ModelFootprint::of(&llama_host::gguf::read(path).ok()?, n_ctx).ok()?;
    let (layers, fit) = llama_host::fit::auto_gpu_layers(&footprint, &devices)?;
    use llama_host::report::gib;
    if layers >= 0 {
        tracing::warn!(
            "the model needs about {:.1} GiB of GPU memory and {:.1} GiB is free (less a margin): offloading {layers} of {} layers, the rest runs on the CPU (--gpu-layers N overrides)",
            gib(fit.needed_bytes),
            gib(fit.available_bytes),
            fit.all
        );
    } else {
        tracing::info!(needed_gib = gib(fit.needed_bytes), available_gib = gib(fit.available_bytes), "every layer fits on the GPU");
    }
    Some(layers)
}

/// Loads the model with a progress bar on a terminal.
/// `n_ctx` is the context the `--gpu-layers auto` estimate reserves KV cache for.
pub fn load_model(backend: &LoadedBackend, l: &LoadOpts, n_ctx: u32) -> Result<Model, CliError> {
    load_with_params(backend, &l.path, &model_params(backend, l, n_ctx))
}

pub fn load_with_params(backend: &LoadedBackend, path: &Path, params: &ModelParams) -> Result<Model, CliError> {
    let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::debug!(n_gpu_layers = params.n_gpu_layers, split_mode = params.split_mode.as_str(), main_gpu = params.main_gpu, "model parameters");
    Ok(match progress::bar(label) {
        Some(bar) => Model::load_with_progress(backend, path, params, bar)?,
        None => Model::load(backend, path, params)?,
    })
}
