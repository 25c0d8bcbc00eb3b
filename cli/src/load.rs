//! What every model-loading command shares: select the backend (with the GPU warning),
//! open the model file once and let the host decide its offload for that backend, load
//! with a progress bar on a terminal.

use llama_host::offload::{self, AutoFit};
use llama_host::{BackendChoice, Backends, LoadedBackend, Model, ModelFile, ModelParams};

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
    let flags: Vec<String> = l.offload.gpu_asks().iter().map(|name| format!("--{name}")).collect();
    if !flags.is_empty() && !l.offload.has_remote() && selected.info().accelerator == llama_host::Accelerator::Cpu && choice == BackendChoice::Auto {
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

/// Opens the model file (checked and validated, once) and decides its parameters for the
/// backend in use (`llama_host::offload`), saying so when `--gpu-layers auto` cannot
/// offload every layer. `n_ctx` is the context the estimate reserves KV cache for, of the
/// cache types in `l`.
pub fn prepare(backend: &LoadedBackend, l: &LoadOpts, n_ctx: u32) -> Result<(ModelFile, ModelParams), CliError> {
    let file = ModelFile::open(&l.path)?;
    let decision = offload::for_backend(&l.offload, backend, l.backend == BackendChoice::Auto, &file, n_ctx, &l.cache);
    use llama_host::report::gib;
    match &decision.auto {
        AutoFit::Partial { layers, fit } => tracing::warn!(
            "the model needs about {:.1} GiB of GPU memory and {:.1} GiB is free (less a margin): offloading {layers} of {} layers, the rest runs on the CPU (--gpu-layers N overrides)",
            gib(fit.needed_bytes),
            gib(fit.available_bytes),
            fit.all
        ),
        AutoFit::All(fit) => {
            tracing::info!(needed_gib = gib(fit.needed_bytes), available_gib = gib(fit.available_bytes), "every layer fits on the GPU")
        }
        AutoFit::NotAsked | AutoFit::Unknown => {}
    }
    Ok((file, decision.params))
}

/// Loads the model with a progress bar on a terminal.
/// `n_ctx` is the context the `--gpu-layers auto` estimate reserves KV cache for.
pub fn load_model(backend: &LoadedBackend, l: &LoadOpts, n_ctx: u32) -> Result<Model, CliError> {
    let (file, params) = prepare(backend, l, n_ctx)?;
    load_with_params(backend, &file, &params)
}

/// With `--draft-model`: loads the draft model (offloaded as the model is) and gives its
/// context to `session`, after the vocabulary check. The model must outlive the session's
/// use of it, so it is returned.
pub fn attach_draft(backend: &LoadedBackend, l: &LoadOpts, g: &crate::opts::Generation, session: &mut llama_host::Session<'_>) -> Result<Option<Model>, CliError> {
    let Some(path) = &g.draft_model else { return Ok(None) };
    let draft = load_model(backend, &LoadOpts { path: path.clone(), ..l.clone() }, g.session.size.n_ctx)?;
    session.set_draft_model(&draft)?;
    Ok(Some(draft))
}

pub fn load_with_params(backend: &LoadedBackend, file: &ModelFile, params: &ModelParams) -> Result<Model, CliError> {
    let label = file.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::debug!(n_gpu_layers = params.n_gpu_layers, split_mode = params.split_mode.as_str(), main_gpu = params.main_gpu, "model parameters");
    let model = match progress::bar(label) {
        Some(bar) => Model::load_file_with_progress(backend, file, params, bar)?,
        None => Model::load_file(backend, file, params)?,
    };
    // With remote devices, where the model went is the first thing to know.
    if !params.rpc.is_empty() {
        errln!("llama: {}", placement_line(&model.info().placement));
    } else {
        tracing::info!("{}", placement_line(&model.info().placement));
    }
    Ok(model)
}

/// `placed: RPC0 (10.0.0.2:50052) 9 layers, 60.5 MiB; ...`: each device with its layers
/// (and the output layer where it is) and the MiB of weights on it.
pub fn placement_line(placement: &[llama_host::Placement]) -> String {
    let parts: Vec<String> = placement
        .iter()
        .map(|p| {
            let what = if p.description.is_empty() { p.device.clone() } else { format!("{} ({})", p.device, p.description) };
            let output = if p.output { " + output" } else { "" };
            format!("{what} {} layers{output}, {:.1} MiB", p.layers, p.bytes as f64 / (1024.0 * 1024.0))
        })
        .collect();
    format!("placed: {}", parts.join("; "))
}
