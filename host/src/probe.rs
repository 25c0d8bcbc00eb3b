//! Probing one backend candidate, in this process or, crash-isolated, in a short-lived child.
//!
//! Opening a shared library runs its initialisers, and a plugin's probe is its own code:
//! either can segfault, abort or hang. Isolated probing re-executes the `llama` binary with a
//! hidden subcommand that opens and probes one file and prints the outcome as JSON; the host
//! waits with a timeout, so a library that crashes or hangs is reported ("probe crashed:
//! signal 11 (SIGSEGV)", "probe timed out after 10 s") and skipped while the host carries on.
//! Only a file whose child came back usable is then opened in the host process.
//!
//! Outcomes are cached per plugin file (path, size, modification time, host version and the
//! machine's accelerator state), so an ordinary start spawns no child at all.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::plugin;
use crate::report::DeviceReport;

/// The hidden subcommand of the `llama` binary that probes one file in a child.
pub const PROBE_SUBCOMMAND: &str = "__probe-backend";

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

/// The child side: probe `path` and print the outcome as one JSON line.
pub fn child_main(path: &Path) -> std::io::Result<()> {
    let outcome = in_process(path);
    let line = serde_json::to_string(&outcome).map_err(std::io::Error::other)?;
    println!("{line}");
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

/// Probes `path` in a child process, bounded by `timeout`.
pub fn isolated(iso: &Isolation, path: &Path) -> ProbeOutcome {
    let crashed = |reason: String| ProbeOutcome::Crashed { reason };
    let mut child = match Command::new(&iso.exe)
        .arg(PROBE_SUBCOMMAND)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return crashed(format!("probe could not start ({}): {e}", iso.exe.display())),
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
                return crashed(format!("probe timed out after {} s", iso.timeout.as_secs_f64().round()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return crashed(format!("probe could not be awaited: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = signal_name(sig);
        return crashed(if name.is_empty() { format!("probe crashed: signal {sig}") } else { format!("probe crashed: signal {sig} ({name})") });
    }
    if !status.success() {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return crashed(format!("probe failed with exit code {}: {last}", status.code().unwrap_or(-1)));
    }
    match stdout.lines().rev().find_map(|l| serde_json::from_str::<ProbeOutcome>(l).ok()) {
        Some(o) => o,
        None => crashed("probe printed no result".into()),
    }
}

/// The machine's side of a cache key: this host, and the accelerator state (a driver
/// installed since changes a CUDA plugin's answer). The same for every candidate.
fn machine_key() -> String {
    let cuda = crate::hardware::cuda_driver().map(|d| d.version.to_string()).unwrap_or_else(|_| "none".into());
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

/// What makes a cached outcome still true: the file itself (path, size, mtime) and `machine`.
fn cache_key(path: &Path, machine: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    let canonical = std::fs::canonicalize(path).ok()?;
    Some(format!("{}|{}|{}|{machine}", canonical.display(), meta.len(), mtime))
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
        let fresh: Vec<Option<ProbeOutcome>> = std::thread::scope(|s| {
            let handles: Vec<_> = paths
                .iter()
                .zip(&cached)
                .map(|(p, c)| c.is_none().then(|| s.spawn(move || isolated(iso, p))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.map(|h| h.join().unwrap_or_else(|_| ProbeOutcome::Crashed { reason: "probe thread panicked".into() })))
                .collect()
        });
        let mut out = Vec::with_capacity(paths.len());
        for ((key, hit), probed) in keys.into_iter().zip(cached).zip(fresh) {
            match (hit, probed) {
                (Some(o), _) => {
                    self.hits += 1;
                    out.push((o, true));
                }
                (None, Some(o)) => {
                    self.misses += 1;
                    if let Some(k) = key.filter(|_| cacheable(&o)) {
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
        let stale = ProbeOutcome::Rejected { kind: "abi-version".into(), reason: "built for plugin ABI 1.0.0, host expects 2.0.0".into() };
        assert!(!cacheable(&failed));
        assert!(cacheable(&stale) && cacheable(&ProbeOutcome::Crashed { reason: "x".into() }));
        assert!(machine_key().contains("|cuda:") && machine_key().contains(";libs:"), "{}", machine_key());
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
    }
}
