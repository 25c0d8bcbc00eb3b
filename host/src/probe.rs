//! Probing one backend candidate, in this process or, crash-isolated, in a short-lived child.
//!
//! Opening a shared library runs its initialisers, and a plugin's probe is its own code:
//! either can segfault, abort or hang. Isolated probing re-executes the `llama` binary with a
//! hidden subcommand that opens and probes one file and prints the outcome as JSON; the host
//! waits with a timeout, so a library that crashes or hangs is reported ("probe crashed:
//! signal 11 (SIGSEGV)", "probe timed out after 10 s") and skipped while the host carries on.
//! Only a file whose child came back usable is then opened in the host process. The same
//! child mode asks the NVIDIA driver (`--cuda-driver`), so cuInit never runs in the host.
//!
//! Outcomes are cached per plugin file (path and the file's identity: size, modification
//! time, device, inode and change time; host version and the machine's accelerator state),
//! so an ordinary start probes nothing. The cache must never vouch for a file it did not
//! see: one swapped in under the same size and mtime has a new change time. Outcomes that
//! say more about the moment than about the file (a timeout) are not cached.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::plugin;
use crate::report::DeviceReport;

/// The hidden subcommand of the `llama` binary that probes one file in a child.
pub const PROBE_SUBCOMMAND: &str = "__probe-backend";

/// The argument of [`PROBE_SUBCOMMAND`] that asks the NVIDIA driver instead of probing a file
/// (a candidate is never passed under this name: see `child_path_arg`).
pub const CUDA_DRIVER_ARG: &str = "--cuda-driver";

/// What probing one candidate file found. Plain data, so a child can report it as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ProbeOutcome {
    /// The file was refused before any of its functions ran (see `plugin::PluginError`).
    Rejected { kind: String, reason: String },
    /// The backend answered its probe.
    Probed {
        name: String,
        accelerator: String,
        version: String,
        llama_build: String,
        usable: bool,
        score: u32,
        reason: String,
        devices: Vec<DeviceReport>,
    },
    /// The child died or hung: the file must not be opened in the host.
    Crashed { reason: String },
}

/// Opens and probes `path` in this process.
pub fn in_process(path: &Path) -> ProbeOutcome {
    match plugin::open(path) {
        Err(e) => ProbeOutcome::Rejected { kind: e.kind().to_string(), reason: e.to_string() },
        Ok(p) => ProbeOutcome::Probed {
            name: p.info.name.to_string(),
            accelerator: p.info.accelerator.as_str().to_string(),
            version: p.info.version.to_string(),
            llama_build: p.info.llama_build.to_string(),
            usable: p.probe.usable,
            score: p.probe.score,
            reason: p.probe.reason.to_string(),
            devices: p
                .probe
                .devices
                .iter()
                .map(|d| DeviceReport {
                    name: d.name.to_string(),
                    description: d.description.to_string(),
                    memory_total: d.memory_total,
                    memory_free: d.memory_free,
                })
                .collect(),
        },
    }
}

/// How to probe in a child process.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// The `llama` binary: run as `EXE __probe-backend PATH`.
    pub exe: PathBuf,
    pub timeout: Duration,
    /// The outcome cache file; `None` probes every time.
    pub cache: Option<PathBuf>,
}

impl Isolation {
    /// Isolation through this executable, with the per-user cache.
    pub fn current_exe(timeout: Duration) -> Option<Isolation> {
        Some(Isolation { exe: std::env::current_exe().ok()?, timeout, cache: default_cache_file() })
    }
}

/// `$XDG_CACHE_HOME/llama/probes.json`, else `~/.cache/llama/probes.json`.
pub fn default_cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llama").join("probes.json"))
}

/// The child side: probe `path` and print the outcome as one JSON line; with
/// [`CUDA_DRIVER_ARG`], ask the NVIDIA driver and print its answer instead.
pub fn child_main(path: &Path) -> std::io::Result<()> {
    let line = if path == Path::new(CUDA_DRIVER_ARG) {
        serde_json::to_string(&crate::hardware::query_cuda_driver_here())
    } else {
        serde_json::to_string(&in_process(path))
    };
    println!("{}", line.map_err(std::io::Error::other)?);
    Ok(())
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        _ => "",
    }
}

/// Why a child gave no answer; `transient` when that says more about this moment than
/// about what it was asked (a timeout: a cold disk or a busy machine), so it is asked again.
struct ChildFailure {
    reason: String,
    transient: bool,
}

/// Runs `EXE __probe-backend ARG`, bounded by the timeout; its stdout when it exits normally.
/// `what` names the job in the failure sentences ("probe crashed: signal 11 (SIGSEGV)").
fn run_child(iso: &Isolation, what: &str, arg: &std::ffi::OsStr) -> Result<String, ChildFailure> {
    let fail = |reason: String, transient: bool| ChildFailure { reason, transient };
    let mut child = match Command::new(&iso.exe)
        .arg(PROBE_SUBCOMMAND)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Err(fail(format!("{what} could not start ({}): {e}", iso.exe.display()), true)),
    };
    // Read both pipes on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= iso.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers finish once the child's pipes close; a grandchild holding
                // them must not stall the host, so they are left to finish on their own.
                return Err(fail(format!("{what} timed out after {} s", iso.timeout.as_secs_f64().round()), true));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(fail(format!("{what} could not be awaited: {e}"), true)),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = signal_name(sig);
        let sig = if name.is_empty() { format!("signal {sig}") } else { format!("signal {sig} ({name})") };
        return Err(fail(format!("{what} crashed: {sig}"), false));
    }
    if !status.success() {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(fail(format!("{what} failed with exit code {}: {last}", status.code().unwrap_or(-1)), false));
    }
    Ok(stdout)
}

/// `path` as the child's argument: a relative path that could read as an option (the
/// driver query's `--cuda-driver`) is passed as `./path`.
fn child_path_arg(path: &Path) -> PathBuf {
    if path.is_relative() && path.as_os_str().to_string_lossy().starts_with('-') {
        Path::new(".").join(path)
    } else {
        path.to_path_buf()
    }
}

/// Probes `path` in a child process, bounded by `timeout`.
pub fn isolated(iso: &Isolation, path: &Path) -> ProbeOutcome {
    probe_in_child(iso, path).0
}

/// The outcome, and whether it is a fact about the file that may be cached (not a timeout,
/// nor a child that could not be started or awaited).
fn probe_in_child(iso: &Isolation, path: &Path) -> (ProbeOutcome, bool) {
    match run_child(iso, "probe", child_path_arg(path).as_os_str()) {
        Ok(stdout) => match stdout.lines().rev().find_map(|l| serde_json::from_str::<ProbeOutcome>(l).ok()) {
            Some(o) => (o, true),
            None => (ProbeOutcome::Crashed { reason: "probe printed no result".into() }, true),
        },
        Err(f) => (ProbeOutcome::Crashed { reason: f.reason }, !f.transient),
    }
}

/// Asks the NVIDIA driver in a child (`llama __probe-backend --cuda-driver`): what it said,
/// or why the child gave no answer ("the NVIDIA driver query crashed: signal 11 (SIGSEGV)").
pub(crate) fn cuda_driver_in_child(iso: &Isolation) -> Result<crate::hardware::CudaDriver, String> {
    const WHAT: &str = "the NVIDIA driver query";
    let stdout = run_child(iso, WHAT, CUDA_DRIVER_ARG.as_ref()).map_err(|f| f.reason)?;
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Result<crate::hardware::CudaDriver, String>>(l).ok())
        .unwrap_or_else(|| Err(format!("{WHAT} printed no result")))
}

/// The machine's side of a cache key: this host, and the accelerator state (a driver
/// installed since changes a CUDA plugin's answer). The same for every candidate. Cheap
/// facts only: the driver's files and kernel module, never the driver itself (cuInit).
fn machine_key() -> String {
    let cuda = crate::hardware::cuda_driver_fingerprint();
    // Where the dynamic loader looks decides which libraries a plugin finds (its cuBLAS).
    let search = ["LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"].map(|v| std::env::var(v).unwrap_or_default()).join(";");
    format!(
        "host {} abi {}|cuda:{cuda};metal:{};cpu-off:{};libs:{search}",
        env!("CARGO_PKG_VERSION"),
        llama_plugin_api::ABI_VERSION,
        crate::hardware::metal_platform().is_ok(),
        crate::hardware::disabled_cpu_features().join(",")
    )
}

/// Whether an outcome may be cached. A library that could not be loaded (a missing
/// dependency, usually: the CUDA plugin without cuBLAS) is asked again next time, since
/// installing the dependency changes nothing the key can see, and a failed dlopen is cheap.
fn cacheable(o: &ProbeOutcome) -> bool {
    !matches!(o, ProbeOutcome::Rejected { kind, .. } if kind == "load-failed")
}

/// What makes a cached outcome still true: the file itself (its path and identity) and
/// `machine`.
fn cache_key(path: &Path, machine: &str) -> Option<String> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let id = file_identity(&canonical)?;
    Some(format!("{}|{id}|{machine}", canonical.display()))
}

/// One version of a file, told without reading it: device, inode, size, modification time
/// and change time. `touch -r` and copying can set the mtime back, never the ctime; a file
/// replaced in place gets a new ctime, one renamed over it a new inode.
pub(crate) fn file_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{}:{}:{}:{}.{:09}:{}.{:09}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    entries: BTreeMap<String, ProbeOutcome>,
}

fn load_cache(file: &Path) -> CacheFile {
    std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn store_cache(file: &Path, cache: &CacheFile) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".probes.json.tmp-{}", std::process::id()));
    let Ok(bytes) = serde_json::to_vec_pretty(cache) else { return };
    // A copy then a rename: a concurrent reader sees the old file or the new one.
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Probes many candidates through one cache: hits are answered from it, misses probed in
/// children and stored. Entries for files that no longer exist are dropped.
pub struct Prober<'a> {
    iso: &'a Isolation,
    cache: CacheFile,
    dirty: bool,
    /// How many candidates were answered from the cache and how many were probed.
    pub hits: usize,
    pub misses: usize,
}

impl<'a> Prober<'a> {
    pub fn new(iso: &'a Isolation) -> Prober<'a> {
        let cache = iso.cache.as_deref().map(load_cache).unwrap_or_default();
        Prober { iso, cache, dirty: false, hits: 0, misses: 0 }
    }

    /// The outcome for each path, and whether it came from the cache. Misses are probed in
    /// children running side by side, so a hanging plugin costs one timeout, not one each.
    pub fn probe_all(&mut self, paths: &[PathBuf]) -> Vec<(ProbeOutcome, bool)> {
        let machine = machine_key();
        let keys: Vec<Option<String>> = paths.iter().map(|p| cache_key(p, &machine)).collect();
        let cached: Vec<Option<ProbeOutcome>> = keys.iter().map(|k| k.as_ref().and_then(|k| self.cache.entries.get(k)).cloned()).collect();
        let iso = self.iso;
        let fresh: Vec<Option<(ProbeOutcome, bool)>> = std::thread::scope(|s| {
            let handles: Vec<_> = paths
                .iter()
                .zip(&cached)
                .map(|(p, c)| c.is_none().then(|| s.spawn(move || probe_in_child(iso, p))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.map(|h| h.join().unwrap_or_else(|_| (ProbeOutcome::Crashed { reason: "probe thread panicked".into() }, false))))
                .collect()
        });
        let mut out = Vec::with_capacity(paths.len());
        for ((key, hit), probed) in keys.into_iter().zip(cached).zip(fresh) {
            match (hit, probed) {
                (Some(o), _) => {
                    self.hits += 1;
                    out.push((o, true));
                }
                (None, Some((o, settled))) => {
                    self.misses += 1;
                    if let Some(k) = key.filter(|_| settled && cacheable(&o)) {
                        self.cache.entries.insert(k, o.clone());
                        self.dirty = true;
                    }
                    out.push((o, false));
                }
                (None, None) => unreachable!("every miss is probed"),
            }
        }
        out
    }
}

impl Drop for Prober<'_> {
    fn drop(&mut self) {
        let Some(file) = &self.iso.cache else { return };
        let before = self.cache.entries.len();
        self.cache.entries.retain(|k, _| k.split('|').next().is_some_and(|p| Path::new(p).exists()));
        if self.dirty || self.cache.entries.len() != before {
            store_cache(file, &self.cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_failures_are_not_cached_and_the_loader_path_is_in_the_key() {
        let failed = ProbeOutcome::Rejected { kind: "load-failed".into(), reason: "cannot be loaded: libcublas.so.13: …".into() };
        let stale = ProbeOutcome::Rejected { kind: "abi-version".into(), reason: "built for plugin ABI 2.0.0, host expects 5.0.0".into() };
        assert!(!cacheable(&failed));
        assert!(cacheable(&stale) && cacheable(&ProbeOutcome::Crashed { reason: "x".into() }));
        assert!(machine_key().contains("|cuda:[") && machine_key().contains(";libs:"), "{}", machine_key());
    }

    #[test]
    fn outcomes_round_trip_as_json() {
        let o = ProbeOutcome::Crashed { reason: "probe crashed: signal 11 (SIGSEGV)".into() };
        let s = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<ProbeOutcome>(&s).unwrap(), o);
        assert!(s.contains("\"outcome\":\"crashed\""), "{s}");
    }

    #[test]
    fn a_child_that_cannot_start_is_reported() {
        let iso = Isolation { exe: "/nonexistent/llama".into(), timeout: Duration::from_secs(1), cache: None };
        match isolated(&iso, Path::new("/tmp/x.so")) {
            ProbeOutcome::Crashed { reason } => assert!(reason.starts_with("probe could not start"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cache_key_changes_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("libllama_backend_x.so");
        std::fs::write(&f, b"one").unwrap();
        let a = cache_key(&f, &machine_key()).unwrap();
        std::fs::write(&f, b"three").unwrap();
        let b = cache_key(&f, &machine_key()).unwrap();
        assert_ne!(a, b, "a rewritten plugin must be probed again");
        assert!(a.contains(env!("CARGO_PKG_VERSION")));

        // Another file of the same size renamed over it, its mtime set back: still new.
        let other = dir.path().join("other.so");
        std::fs::write(&other, b"THREE").unwrap();
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::File::options().write(true).open(&other).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(&other, &f).unwrap();
        let c = cache_key(&f, &machine_key()).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.len(), m.modified().unwrap()), (5, mtime));
        assert_ne!(b, c, "a file swapped in under the same size and mtime must be probed again");
    }

    /// A child that outlives the timeout: a slow plugin (a cold disk, a busy machine) is
    /// reported this time and asked again next time, not refused for good.
    #[test]
    fn a_timed_out_probe_is_not_cached() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("slow-llama");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugin = dir.path().join("libllama_backend_slow.so");
        std::fs::write(&plugin, b"\x7fELF").unwrap();
        let cache = dir.path().join("probes.json");
        let iso = Isolation { exe, timeout: Duration::from_millis(200), cache: Some(cache.clone()) };
        let mut prober = Prober::new(&iso);
        let out = prober.probe_all(std::slice::from_ref(&plugin));
        assert_eq!(out, vec![(ProbeOutcome::Crashed { reason: "probe timed out after 0 s".into() }, false)]);
        drop(prober);
        assert!(load_cache(&cache).entries.is_empty(), "a timed-out probe was cached");
    }

    #[test]
    fn a_candidate_never_reads_as_the_driver_query() {
        assert_eq!(child_path_arg(Path::new(CUDA_DRIVER_ARG)), Path::new("./--cuda-driver"));
        assert_eq!(child_path_arg(Path::new("/b/libx.so")), Path::new("/b/libx.so"));
        assert_eq!(child_path_arg(Path::new("b/libx.so")), Path::new("b/libx.so"));
    }
}
