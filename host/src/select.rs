//! Discovery, probing and selection of backends. Every candidate file is opened and checked
//! (see `plugin`), asked to probe, and recorded in the report with its verdict; the best
//! usable one is initialised. A backend the user named is used or refused, never swapped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llama_plugin_api::{BackendBox, ABI_VERSION};

use crate::types::{Accelerator, BackendInfo, DeviceInfo};

use crate::discovery::{self, SearchDir};
use crate::error::SelectError;
use crate::hardware;
use crate::plugin;
use crate::probe::{self, ProbeOutcome};
use crate::report::{CandidateReport, SearchDirReport, SelectionReport, Verdict};

/// Which backend to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// The usable backend with the best score.
    Auto,
    /// This backend or an error.
    Named(String),
}

impl std::str::FromStr for BackendChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s.eq_ignore_ascii_case("auto") { BackendChoice::Auto } else { BackendChoice::Named(s.to_ascii_lowercase()) })
    }
}

/// Where to look for backends.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryOptions {
    /// `--backend-dir` values, searched first.
    pub backend_dirs: Vec<PathBuf>,
    /// `LLAMA_BACKEND_PATH` (a PATH-style list).
    pub env_path: Option<String>,
    /// The running executable.
    pub exe: Option<PathBuf>,
    /// The per-user backends directory.
    pub user_dir: Option<PathBuf>,
    /// Probe each candidate in a child process (crash isolation); `None` probes in this
    /// process, which a library user may prefer when there is no `llama` binary to run.
    pub isolation: Option<crate::probe::Isolation>,
}

impl DiscoveryOptions {
    /// The standard places, from the process environment.
    pub fn from_env() -> Self {
        DiscoveryOptions {
            backend_dirs: Vec::new(),
            env_path: std::env::var("LLAMA_BACKEND_PATH").ok(),
            exe: std::env::current_exe().ok(),
            user_dir: discovery::user_backends_dir(),
            isolation: None,
        }
    }

    pub fn search_dirs(&self) -> Vec<SearchDir> {
        discovery::search_dirs(&self.backend_dirs, self.env_path.as_deref(), self.exe.as_deref(), self.user_dir.clone())
    }
}

/// The backends found on this machine.
pub struct Backends {
    report: SelectionReport,
    /// Report rows of the plugins that passed their checks and probed usable (opened in this
    /// process only when selected).
    usable: Vec<usize>,
}

/// An initialised backend, shared by the models loaded through it.
#[derive(Clone)]
pub struct LoadedBackend {
    inner: Arc<BackendInner>,
}

struct BackendInner {
    backend: BackendBox,
    info: BackendInfo,
    /// The devices its probe reported (maybe from the probe cache).
    devices: Vec<DeviceInfo>,
    path: PathBuf,
    /// The library's root module (libraries are never unloaded, so it stays valid).
    module: llama_plugin_api::BackendModRef,
}

impl LoadedBackend {
    pub fn name(&self) -> &str {
        self.inner.info.name.as_str()
    }
    pub fn info(&self) -> &BackendInfo {
        &self.inner.info
    }
    /// The devices its probe reported when it was selected (maybe from the probe cache).
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.inner.devices
    }
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    pub(crate) fn raw(&self) -> &BackendBox {
        &self.inner.backend
    }

    /// The backend's devices as they are now: its probe run again in this process (the
    /// report's figures may come from the probe cache, and free GPU memory changes).
    pub fn devices_now(&self) -> Vec<DeviceInfo> {
        (self.inner.module.probe())().devices.iter().map(crate::boundary::device).collect()
    }

    /// The RPC server at `endpoint` (`host:port`): connected within `timeout`, its
    /// protocol checked and its devices listed with their memory. Device names count from
    /// `RPC0` per server; a load numbers them across servers in `--rpc` order.
    pub fn rpc_server_info(&self, endpoint: &str, timeout: std::time::Duration) -> Result<crate::RemoteServer, crate::BackendError> {
        let ms = crate::boundary::timeout_ms(timeout);
        let r = self.inner.backend.rpc_server_info(abi_stable::std_types::RStr::from_str(endpoint), ms).into_result().map_err(crate::boundary::error)?;
        Ok(crate::boundary::remote_server(&r))
    }

    /// Serves this backend's devices to remote hosts (ggml's RPC server) on `endpoint`.
    /// Blocks while the server runs; returns only with the reason it could not start or
    /// stopped.
    pub fn rpc_serve(&self, endpoint: &str, cache_dir: Option<&str>, n_threads: u32) -> crate::BackendError {
        let params = llama_plugin_api::RpcServeParams {
            endpoint: endpoint.into(),
            cache_dir: cache_dir.map(abi_stable::std_types::RString::from).into(),
            n_threads,
        };
        match self.inner.backend.rpc_serve(params).into_result() {
            Ok(()) => crate::BackendError::Unavailable { reason: "the RPC server stopped".into() },
            Err(e) => crate::boundary::error(e),
        }
    }
}

/// One candidate as the chooser sees it: pure data, so selection is unit-tested.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub name: String,
    pub usable: bool,
    pub score: u32,
}

/// Picks the candidate to use: the highest score among the usable ones (earlier wins a
/// tie, so the search order decides between equal backends), restricted to `name` when
/// the user named one. Returns the index, or `None` when nothing fits.
pub(crate) fn choose(options: &[Candidate], choice: &BackendChoice) -> Option<usize> {
    options
        .iter()
        .enumerate()
        .filter(|(_, o)| o.usable)
        .filter(|(_, o)| match choice {
            BackendChoice::Auto => true,
            BackendChoice::Named(n) => &o.name == n,
        })
        .fold(None, |best: Option<(usize, u32)>, (i, o)| match best {
            Some((_, s)) if s >= o.score => best,
            _ => Some((i, o.score)),
        })
        .map(|(i, _)| i)
}

const KNOWN: [Accelerator; 3] = [Accelerator::Cpu, Accelerator::Cuda, Accelerator::Metal];

impl Backends {
    /// Opens and probes every candidate in the search directories. Never fails: what goes
    /// wrong is in the report.
    #[tracing::instrument(skip_all)]
    pub fn discover(opts: &DiscoveryOptions) -> Backends {
        let dirs = opts.search_dirs();
        let mut report = SelectionReport {
            host_abi: ABI_VERSION,
            search_dirs: dirs.iter().map(|d| SearchDirReport { dir: d.dir.clone(), origin: d.origin, exists: d.dir.is_dir() }).collect(),
            candidates: Vec::new(),
        };
        let mut usable = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut paths = Vec::new();
        for dir in &dirs {
            for path in discovery::candidates_in(dir) {
                // The same file reached twice (a symlinked directory, say) is one candidate.
                let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if !seen.contains(&canonical) {
                    seen.push(canonical);
                    paths.push(path);
                }
            }
        }
        let mut prober = opts.isolation.as_ref().map(probe::Prober::new);
        let outcomes: Vec<(ProbeOutcome, bool)> = match prober.as_mut() {
            Some(p) => p.probe_all(&paths),
            None => paths.iter().map(|p| (probe::in_process(p), false)).collect(),
        };
        {
            for (path, (outcome, cached)) in paths.into_iter().zip(outcomes) {
                let row = report.candidates.len();
                let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let mut c = CandidateReport {
                    name: file_name,
                    path: Some(path.clone()),
                    verdict: Verdict::Rejected,
                    score: None,
                    reason: String::new(),
                    rejection: None,
                    version: None,
                    llama_build: None,
                    devices: Vec::new(),
                };
                // The probe may have run on another CPU (a cached outcome, or a child that an
                // emulator ran natively): this process checks the features the library
                // declares itself, before it would ever open the library.
                let outcome = match (outcome, plugin::check_declared_cpu_features(&path)) {
                    (ProbeOutcome::Probed { .. }, Err(e)) => ProbeOutcome::Rejected { kind: e.kind().into(), reason: e.to_string() },
                    (o, _) => o,
                };
                match outcome {
                    ProbeOutcome::Rejected { kind, reason } => {
                        c.reason = reason;
                        c.rejection = Some(kind);
                    }
                    ProbeOutcome::Crashed { reason } => {
                        c.reason = reason;
                        c.rejection = Some("probe-crashed".into());
                    }
                    ProbeOutcome::Probed { name, accelerator, version, llama_build, usable: probed_usable, score, reason, devices } => {
                        let host_reason = KNOWN.iter().find(|a| a.as_str() == accelerator).and_then(|a| hardware::accelerator_unavailable(*a, opts.isolation.as_ref()));
                        let ok = probed_usable && host_reason.is_none();
                        c.name = name;
                        c.verdict = if ok { Verdict::Usable } else { Verdict::Unusable };
                        c.score = ok.then_some(score);
                        c.reason = host_reason.unwrap_or(reason);
                        c.version = Some(version);
                        c.llama_build = Some(llama_build);
                        c.devices = devices;
                        if ok {
                            usable.push(row);
                        }
                    }
                }
                tracing::debug!(path = %path.display(), verdict = %c.verdict, reason = %c.reason, cached, "backend candidate");
                report.candidates.push(c);
            }
        }
        if let Some(p) = &prober {
            tracing::debug!(cached = p.hits, probed = p.misses, "backend probes");
        }
        // Known backends without any plugin file still get a row that says why they are
        // not in use, so "why is my GPU not used?" has an answer.
        for acc in KNOWN {
            let name = acc.as_str();
            let present = report.candidates.iter().any(|c| c.name == name && c.verdict != Verdict::Rejected);
            if !present {
                let mut reason = String::new();
                let mut devices = Vec::new();
                if let Some(hw) = hardware::accelerator_unavailable(acc, opts.isolation.as_ref()) {
                    reason.push_str(&hw);
                    reason.push_str("; ");
                } else if acc == Accelerator::Cuda {
                    // The driver works: say what it offers, so the missing plugin is the answer.
                    if let Ok(d) = hardware::cuda_driver_via(opts.isolation.as_ref()) {
                        reason.push_str(&format!("NVIDIA driver {} with {} device(s); ", hardware::cuda_version_string(d.version), d.devices.len()));
                        devices = d
                            .devices
                            .iter()
                            .map(|g| crate::report::DeviceReport { name: g.name.clone(), description: "CUDA device (from the driver)".into(), memory_total: g.total_memory, memory_free: 0 })
                            .collect();
                    }
                }
                // A file named for this backend that was refused (built for CPU features this
                // CPU lacks, say) is the answer: point at its row, not at installing one.
                let prefix = format!("{}llama_backend_{name}", std::env::consts::DLL_PREFIX);
                let refused: Vec<String> = report
                    .candidates
                    .iter()
                    .filter(|c| c.verdict == Verdict::Rejected && c.path.as_ref().and_then(|p| p.file_name()).is_some_and(|f| f.to_string_lossy().starts_with(&prefix)))
                    .map(|c| c.name.clone())
                    .collect();
                if !refused.is_empty() {
                    reason.push_str(&format!("no usable {name} backend plugin: {} refused (see its row)", refused.join(", ")));
                } else if acc == Accelerator::Cpu {
                    // Nothing runs without it (a `llama` binary copied alone, say): say where
                    // plugins are looked for and how to put one there.
                    let searched: Vec<String> = report.search_dirs.iter().map(|d| d.dir.display().to_string()).collect();
                    let user = report.search_dirs.iter().find(|d| d.origin == discovery::Origin::User).map_or_else(|| "the per-user backends directory".to_string(), |d| d.dir.display().to_string());
                    let file = format!("{}llama_backend_cpu.{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_EXTENSION);
                    reason.push_str(&format!(
                        "no cpu backend plugin found (searched {}); install llama with its plugins (scripts/install in the source tree), or copy {file} beside the llama binary or into {user}",
                        searched.join(", ")
                    ));
                } else {
                    reason.push_str(&format!("no {name} backend plugin found"));
                }
                report.candidates.push(CandidateReport {
                    name: name.to_string(),
                    path: None,
                    verdict: Verdict::NotFound,
                    score: None,
                    reason,
                    rejection: None,
                    version: None,
                    llama_build: None,
                    devices,
                });
            }
        }
        Backends { report, usable }
    }

    pub fn report(&self) -> &SelectionReport {
        &self.report
    }

    /// Initialises the chosen backend and marks it selected in the report. Under `Auto`, a
    /// backend whose initialisation fails is reported and the next best is tried.
    #[tracing::instrument(skip(self))]
    pub fn select(&mut self, choice: BackendChoice) -> Result<LoadedBackend, SelectError> {
        loop {
            let options: Vec<Candidate> = self
                .usable
                .iter()
                .map(|&row| {
                    let c = &self.report.candidates[row];
                    Candidate { name: c.name.clone(), usable: c.verdict == Verdict::Usable, score: c.score.unwrap_or(0) }
                })
                .collect();
            let Some(i) = choose(&options, &choice) else {
                return Err(self.no_backend(&choice));
            };
            let row = self.usable[i];
            let path = self.report.candidates[row].path.clone().expect("a usable candidate has a file");
            // Only now is the library opened in this process (its probe ran in a child when
            // isolated); a failure here drops it and, under Auto, the next best is tried.
            let loaded = plugin::load(&path).map_err(|e| e.to_string()).and_then(|(module, info)| {
                (module.init())(crate::logging::sink()).into_result().map(|b| (b, info, module)).map_err(|e| format!("initialisation failed: {e}"))
            });
            match loaded {
                Ok((backend, info, module)) => {
                    let c = &mut self.report.candidates[row];
                    c.verdict = Verdict::Selected;
                    tracing::info!(backend = %c.name, path = ?c.path, "backend selected");
                    let devices = c
                        .devices
                        .iter()
                        .map(|d| DeviceInfo { name: d.name.clone(), description: d.description.clone(), memory_total: d.memory_total, memory_free: d.memory_free })
                        .collect();
                    let info = crate::boundary::backend_info(&info);
                    return Ok(LoadedBackend { inner: Arc::new(BackendInner { backend, info, devices, path, module }) });
                }
                Err(reason) => {
                    self.usable.remove(i);
                    let c = &mut self.report.candidates[row];
                    c.verdict = Verdict::Unusable;
                    c.score = None;
                    c.reason = reason;
                    if choice != BackendChoice::Auto {
                        return Err(self.no_backend(&choice));
                    }
                }
            }
        }
    }

    fn no_backend(&self, choice: &BackendChoice) -> SelectError {
        match choice {
            BackendChoice::Auto => SelectError::NoneUsable {
                reasons: self.report.candidates.iter().map(|c| format!("{}: {}", c.name, c.reason)).collect(),
            },
            BackendChoice::Named(name) => {
                let reasons: Vec<String> = self
                    .report
                    .candidates
                    .iter()
                    .filter(|c| &c.name == name)
                    .map(|c| match &c.path {
                        Some(p) => format!("{} ({}): {}", c.name, p.display(), c.reason),
                        None => format!("{}: {}", c.name, c.reason),
                    })
                    .collect();
                if reasons.is_empty() && !KNOWN.iter().any(|a| a.as_str() == name) {
                    SelectError::Unknown { name: name.clone(), known: KNOWN.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ") }
                } else {
                    SelectError::Unavailable { name: name.clone(), reasons }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &str, usable: bool, score: u32) -> Candidate {
        Candidate { name: name.into(), usable, score }
    }

    #[test]
    fn auto_takes_the_highest_usable_score() {
        let opts = [opt("cpu", true, 10), opt("cuda", false, 0), opt("cuda", true, 100), opt("metal", true, 50)];
        assert_eq!(choose(&opts, &BackendChoice::Auto), Some(2));
    }

    #[test]
    fn auto_falls_back_to_cpu_when_nothing_else_is_usable() {
        let opts = [opt("cuda", false, 0), opt("cpu", true, 10), opt("metal", false, 0)];
        assert_eq!(choose(&opts, &BackendChoice::Auto), Some(1));
    }

    /// CPU variants as scripts/build-cpu-variants builds them: each declares its features,
    /// scores 10 + their number; the host refuses those the CPU lacks features for, then
    /// takes the best of the rest.
    #[test]
    fn cpu_variants_are_chosen_by_the_features_this_cpu_has() {
        let baseline: &[&str] = &[];
        let v3: &[&str] = &["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"];
        let v4: &[&str] = &["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"];
        let variants = [("x86-64", baseline), ("x86-64-v3", v3), ("x86-64-v4", v4)];
        let pick = |cpu: &'static [&'static str]| {
            let has = move |f: &str| Some(cpu.contains(&f));
            let opts: Vec<Candidate> = variants
                .iter()
                .map(|(_, req)| {
                    let missing = hardware::missing_cpu_features(req.iter().copied(), has);
                    opt("cpu", missing.is_empty(), 10 + req.len() as u32)
                })
                .collect();
            let missing_v4 = hardware::missing_cpu_features(v4.iter().copied(), has);
            (choose(&opts, &BackendChoice::Auto).map(|i| variants[i].0), missing_v4)
        };
        // An AVX2 machine without AVX-512: v3, and v4 refused naming what is missing.
        let (chosen, missing) = pick(&["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"]);
        assert_eq!(chosen, Some("x86-64-v3"));
        assert_eq!(missing, vec!["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"]);
        // An AVX-512 machine: v4. An old machine: the baseline.
        assert_eq!(pick(&["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"]).0, Some("x86-64-v4"));
        assert_eq!(pick(&["sse4.2"]).0, Some("x86-64"));
    }

    #[test]
    fn ties_go_to_the_earlier_candidate() {
        let opts = [opt("cpu", true, 10), opt("cpu", true, 10)];
        assert_eq!(choose(&opts, &BackendChoice::Auto), Some(0));
    }

    #[test]
    fn a_named_backend_is_never_swapped_for_another() {
        let opts = [opt("cpu", true, 10), opt("cuda", false, 0)];
        assert_eq!(choose(&opts, &BackendChoice::Named("cuda".into())), None);
        assert_eq!(choose(&opts, &BackendChoice::Named("cpu".into())), Some(0));
    }

    #[test]
    fn nothing_usable_is_none() {
        assert_eq!(choose(&[], &BackendChoice::Auto), None);
        assert_eq!(choose(&[opt("cpu", false, 10)], &BackendChoice::Auto), None);
    }

    #[test]
    fn choice_parses_case_insensitively() {
        assert_eq!("AUTO".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert_eq!("Cuda".parse::<BackendChoice>().unwrap(), BackendChoice::Named("cuda".into()));
    }

    #[test]
    fn discovery_over_an_empty_tree_reports_known_backends_as_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DiscoveryOptions {
            backend_dirs: vec![tmp.path().to_path_buf()],
            env_path: None,
            exe: None,
            user_dir: None,
            isolation: None,
        };
        let mut b = Backends::discover(&opts);
        let names: Vec<&str> = b.report().candidates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["cpu", "cuda", "metal"]);
        assert!(b.report().candidates.iter().all(|c| c.verdict == Verdict::NotFound));
        assert!(matches!(b.select(BackendChoice::Auto), Err(SelectError::NoneUsable { .. })));
        assert!(matches!(b.select(BackendChoice::Named("cuda".into())), Err(SelectError::Unavailable { .. })));
        assert!(matches!(b.select(BackendChoice::Named("tpu".into())), Err(SelectError::Unknown { .. })));
    }
}
