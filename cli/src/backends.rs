//! `llama backends`: the selection report (what was found, what is used and why), the
//! layer-fit estimate for a model with `-m`, and `install`.

use std::path::Path;

use llama_host::{BackendChoice, Backends};

use crate::args::BackendsAction;
use crate::opts::{BackendsOpts, Global};
use crate::CliError;

pub fn run(g: &Global, a: &BackendsOpts) -> Result<(), CliError> {
    if let Some(BackendsAction::Install { file, dir }) = &a.action {
        let dir = match dir {
            Some(d) => d.clone(),
            None => llama_host::user_backends_dir().ok_or(llama_host::InstallError::NoUserDir)?,
        };
        let (dest, [name, version, build]) = llama_host::install_backend(file, &dir, g.discovery().isolation.as_ref())?;
        outln!("installed {name} backend {version} ({build}) to {}", dest.display())?;
        return Ok(());
    }
    let mut backends = Backends::discover(&g.discovery());
    // Selecting initialises the winner, so the report shows what `llama run` would use.
    let selected = backends.select(BackendChoice::Auto);
    let model = match &a.model {
        Some(path) => Some(model_fit(path, a.ctx_size, &a.cache, backends.report())?),
        None => None,
    };
    // `--rpc`: each server asked through the selected backend (which speaks its protocol).
    let remote: Vec<Remote> = match &selected {
        Ok(backend) => a.rpc.iter().map(|e| Remote::ask(backend, e, a.rpc_timeout)).collect(),
        Err(_) => Vec::new(),
    };
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a llama_host::SelectionReport,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: Option<ModelFit>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            rpc: &'a [Remote],
        }
        outln!("{}", serde_json::to_string_pretty(&Out { report: backends.report(), model, rpc: &remote }).expect("the report serializes"))?;
    } else {
        out!("{}", backends.report())?;
        for r in &remote {
            out!("{r}")?;
        }
        if let Some(m) = model {
            out!("{m}")?;
        }
    }
    // Nothing usable: the report above says why; the exit code says so to scripts (4).
    selected?;
    // A server that cannot be used is an error too (exit 4), after the whole listing.
    if let Some(e) = remote.into_iter().find_map(|r| r.error) {
        return Err(CliError::Load(llama_host::LoadError::Remote(e)));
    }
    Ok(())
}

/// One `--rpc` server as `llama backends` lists it.
#[derive(serde::Serialize)]
struct Remote {
    endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    devices: Vec<RemoteDevice>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_text")]
    error: Option<llama_host::BackendError>,
}

#[derive(serde::Serialize)]
struct RemoteDevice {
    name: String,
    memory_total: u64,
    memory_free: u64,
}

fn as_text<S: serde::Serializer>(e: &Option<llama_host::BackendError>, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_str(&e.to_string()),
        None => s.serialize_none(),
    }
}

impl Remote {
    fn ask(backend: &llama_host::LoadedBackend, endpoint: &str, timeout: std::time::Duration) -> Remote {
        match backend.rpc_server_info(endpoint, timeout) {
            Ok(r) => Remote {
                endpoint: r.endpoint,
                protocol: Some(r.protocol),
                devices: r.devices.into_iter().map(|d| RemoteDevice { name: d.name, memory_total: d.memory_total, memory_free: d.memory_free }).collect(),
                error: None,
            },
            Err(e) => Remote { endpoint: endpoint.to_string(), protocol: None, devices: Vec::new(), error: Some(e) },
        }
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match (&self.error, &self.protocol) {
            (Some(e), _) => writeln!(f, "rpc {}: unusable: {e}", self.endpoint),
            (None, protocol) => {
                writeln!(f, "rpc {} (protocol {}):", self.endpoint, protocol.as_deref().unwrap_or("?"))?;
                for (i, d) in self.devices.iter().enumerate() {
                    writeln!(f, "  device {i}: {:.0} MiB free of {:.0} MiB", mib(d.memory_free), mib(d.memory_total))?;
                }
                Ok(())
            }
        }
    }
}

/// `llama backends -m MODEL`: the model's memory needs and the layers each GPU backend could take.
#[derive(serde::Serialize)]
struct ModelFit {
    path: std::path::PathBuf,
    /// The KV cache of every layer at `footprint.n_ctx` tokens of its cache types.
    kv_cache_bytes: u64,
    footprint: llama_host::fit::ModelFootprint,
    gpus: Vec<llama_host::fit::BackendFit>,
}

fn model_fit(path: &Path, n_ctx: u32, cache: &llama_host::KvCacheParams, report: &llama_host::SelectionReport) -> Result<ModelFit, CliError> {
    // Checked and validated like a load, so what is estimated is what `llama run` would load.
    let file = llama_host::ModelFile::open(path)?;
    let footprint = file.footprint(n_ctx, cache).map_err(|e| CliError::InvalidArg { field: "model", reason: e.to_string() })?;
    let gpus = llama_host::fit::for_report(report, &footprint);
    Ok(ModelFit { path: path.to_path_buf(), kv_cache_bytes: footprint.kv_bytes(), footprint, gpus })
}

impl std::fmt::Display for ModelFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use llama_host::report::gib;
        let m = &self.footprint;
        let all = m.n_layer + 1;
        writeln!(f, "model {}:", self.path.display())?;
        writeln!(
            f,
            "  {} layers + output head: {:.2} GiB on a GPU with every layer offloaded (weights {:.2} GiB, KV cache {:.2} GiB at {} tokens, an upper bound); {:.2} GiB of embeddings stay in host memory",
            m.n_layer,
            gib(m.offloaded_bytes(all)),
            gib(m.offloaded_bytes(all).saturating_sub(self.kv_cache_bytes)),
            gib(self.kv_cache_bytes),
            m.n_ctx,
            gib(m.host_bytes)
        )?;
        // In MiB too: a small model's cache is a few hundredths of a GiB, and the point of
        // the line is to compare cache types.
        writeln!(
            f,
            "  KV cache: {} bytes ({:.1} MiB) at {} tokens, K {} and V {} (--cache-type-k/-v)",
            self.kv_cache_bytes,
            self.kv_cache_bytes as f64 / (1u64 << 20) as f64,
            m.n_ctx,
            m.type_k,
            m.type_v
        )?;
        if self.gpus.is_empty() {
            writeln!(f, "  no GPU device found: every layer runs on the CPU")?;
        }
        for g in &self.gpus {
            let memory = if g.from_free_memory { "free" } else { "total (the driver's figure; the plugin reports free)" };
            let flag = if g.fit.layers == g.fit.all { "all".to_string() } else { g.fit.layers.to_string() };
            writeln!(
                f,
                "  {} ({}): {} of {} layers fit (--gpu-layers {flag}); {:.2} GiB available = {memory} memory of {} device(s) less a {:.0} GiB margin each",
                g.backend,
                g.verdict,
                g.fit.layers,
                g.fit.all,
                gib(g.fit.available_bytes),
                g.devices,
                gib(llama_host::fit::GPU_MARGIN)
            )?;
        }
        Ok(())
    }
}
