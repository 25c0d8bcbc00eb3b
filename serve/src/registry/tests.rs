//! The registry's rules on fake models (the real binary and models are exercised by
//! tests/tests/many_models.rs): one load per model, eviction order and reasons, leases that
//! keep a model loaded, failures reported to every waiter and retried, memory checks,
//! keep-alive, admin unload, shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_host::fake::FakeModel;
use llama_host::ContextSize;

use super::*;
use crate::engine::{Engine, EngineConfig};

#[derive(Default)]
struct Counts {
    loads: AtomicUsize,
    fail_next: AtomicUsize,
    /// Each load sleeps this long (ms), so requests arrive while it runs.
    delay_ms: AtomicUsize,
    panic_next: AtomicBool,
}

struct FakeLoader {
    counts: Arc<Counts>,
    need: MemoryNeed,
}

impl Loader for FakeLoader {
    fn estimate(&self, _: &str) -> Result<MemoryNeed, LoadFailure> {
        Ok(self.need)
    }

    fn load(&self, _: &str, metrics: Arc<Metrics>) -> Result<Ready, LoadFailure> {
        std::thread::sleep(Duration::from_millis(self.counts.delay_ms.load(Ordering::SeqCst) as u64));
        if self.counts.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a loader bug");
        }
        if self.counts.fail_next.load(Ordering::SeqCst) > 0 {
            self.counts.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(LoadFailure { public: "bad magic".into(), source: Arc::new(std::io::Error::other("/secret/path: bad magic")), unavailable: false });
        }
        self.counts.loads.fetch_add(1, Ordering::SeqCst);
        let (model, _) = FakeModel::new("hi").into_model();
        let size = ContextSize { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 1, n_threads_batch: 1 };
        let engine = Engine::start_with_metrics(Arc::new(model), EngineConfig { slots: 1, queue: 1, size, ..EngineConfig::default() }, metrics).unwrap();
        Ok(Ready { engine: Arc::new(engine), template: None, defaults: Default::default() })
    }
}

fn spec(name: &str) -> ModelSpec {
    ModelSpec { name: name.into(), facts: ModelFacts::default(), admission: 16, keep_alive: None }
}

fn registry(names: &[&str], config: RegistryConfig, need: MemoryNeed) -> (Arc<Registry>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let loader = FakeLoader { counts: counts.clone(), need };
    (Registry::new(names.iter().map(|n| spec(n)).collect(), None, Box::new(loader), config), counts)
}

fn small() -> MemoryNeed {
    MemoryNeed { host_bytes: 1 << 20, device_bytes: 0 }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn status(r: &Registry, name: &str) -> &'static str {
    r.list().into_iter().find(|m| m.name == name).unwrap().status
}

/// Polls until `cond`, or fails after a hang guard (not a timing claim).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: not the case after 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(r: &Registry, line: &str) -> u64 {
    let text = r.render_prometheus();
    text.lines().find_map(|l| l.strip_prefix(line)?.trim().parse().ok()).unwrap_or_else(|| panic!("no {line} in\n{text}"))
}

#[test]
fn ten_requests_for_an_unloaded_model_share_one_load() {
    let (reg, counts) = registry(&["a"], RegistryConfig::default(), small());
    counts.delay_ms.store(200, Ordering::SeqCst);
    let rt = rt();
    let leases = rt.block_on(async {
        let tasks: Vec<_> = (0..10).map(|_| tokio::spawn({
            let reg = reg.clone();
            async move { reg.acquire(Some("a"), None).await.map(|_| ()) }
        })).collect();
        let mut ok = 0;
        for t in tasks {
            t.await.unwrap().unwrap();
            ok += 1;
        }
        ok
    });
    assert_eq!(leases, 10);
    assert_eq!(counts.loads.load(Ordering::SeqCst), 1);
    assert_eq!(metric(&reg, "llama_model_loads_total{model=\"a\",outcome=\"ok\"}"), 1);
}

#[test]
fn past_models_max_the_least_recently_used_idle_model_goes() {
    let (reg, _) = registry(&["a", "b", "c"], RegistryConfig { models_max: 2, ..RegistryConfig::default() }, small());
    let rt = rt();
    rt.block_on(async {
        drop(reg.acquire(Some("a"), None).await.unwrap());
        drop(reg.acquire(Some("b"), None).await.unwrap());
        // `a` used again: `b` is now the least recently used.
        drop(reg.acquire(Some("a"), None).await.unwrap());
        drop(reg.acquire(Some("c"), None).await.unwrap());
    });
    assert_eq!((status(&reg, "a"), status(&reg, "b"), status(&reg, "c")), ("loaded", "unloaded", "loaded"));
    assert_eq!(metric(&reg, "llama_model_unloads_total{model=\"b\",reason=\"lru\"}"), 1);
    assert_eq!(metric(&reg, "llama_models_loaded"), 2);
}

#[test]
fn a_model_in_use_is_never_evicted_and_the_load_waits_or_gets_no_room() {
    let config = RegistryConfig { models_max: 1, load_wait: Duration::from_millis(300), ..RegistryConfig::default() };
    let (reg, _) = registry(&["a", "b"], config, small());
    let rt = rt();
    rt.block_on(async {
        let lease = reg.acquire(Some("a"), None).await.unwrap();
        let e = reg.acquire(Some("b"), None).await.err().expect("b loaded while a was in use");
        assert!(matches!(e, AcquireError::NoRoom), "{e:?}");
        assert_eq!(status(&reg, "a"), "loaded");
        // Released while b waits: b's load goes ahead.
        let reg2 = reg.clone();
        let waiter = tokio::spawn(async move { reg2.acquire(Some("b"), None).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(lease);
        waiter.await.unwrap().unwrap();
    });
    assert_eq!((status(&reg, "a"), status(&reg, "b")), ("unloaded", "loaded"));
}

#[test]
fn a_failed_load_answers_every_waiter_and_the_next_request_tries_again() {
    let (reg, counts) = registry(&["a", "b"], RegistryConfig::default(), small());
    counts.fail_next.store(1, Ordering::SeqCst);
    counts.delay_ms.store(100, Ordering::SeqCst);
    let rt = rt();
    rt.block_on(async {
        let tasks: Vec<_> = (0..4).map(|_| tokio::spawn({
            let reg = reg.clone();
            async move { reg.acquire(Some("a"), None).await.err() }
        })).collect();
        for t in tasks {
            let e = t.await.unwrap().expect("a waiter got a model from a failed load");
            assert!(matches!(&e, AcquireError::LoadFailed(r) if r == "bad magic"), "{e:?}");
            assert!(!e.to_string().contains("/secret"), "{e}");
        }
        assert_eq!(status(&reg, "a"), "failed");
        // The others are untouched, and the next request for `a` loads it.
        drop(reg.acquire(Some("b"), None).await.unwrap());
        drop(reg.acquire(Some("a"), None).await.unwrap());
    });
    assert_eq!(status(&reg, "a"), "loaded");
    assert_eq!(metric(&reg, "llama_model_loads_total{model=\"a\",outcome=\"failed\"}"), 1);
}

#[test]
fn a_panicking_loader_is_a_failed_load_not_a_stuck_one() {
    let (reg, counts) = registry(&["a"], RegistryConfig::default(), small());
    counts.panic_next.store(true, Ordering::SeqCst);
    let e = rt().block_on(reg.acquire(Some("a"), None)).err().unwrap();
    assert!(matches!(e, AcquireError::LoadFailed(_)), "{e:?}");
    assert_eq!(status(&reg, "a"), "failed");
}

#[test]
fn a_model_over_the_budget_is_refused_with_the_figures() {
    let need = MemoryNeed { host_bytes: 300 << 20, device_bytes: 0 };
    let (reg, counts) = registry(&["a"], RegistryConfig { memory_budget: Some(200 << 20), ..RegistryConfig::default() }, need);
    let e = rt().block_on(reg.acquire(Some("a"), None)).err().unwrap();
    match e {
        AcquireError::InsufficientMemory { needed, available, budget } => assert_eq!((needed, available, budget), (300 << 20, 200 << 20, Some(200 << 20))),
        e => panic!("{e:?}"),
    }
    assert_eq!(counts.loads.load(Ordering::SeqCst), 0, "nothing was loaded");
    assert_eq!(status(&reg, "a"), "unloaded");
    assert_eq!(metric(&reg, "llama_model_loads_total{model=\"a\",outcome=\"insufficient_memory\"}"), 1);
}

#[test]
fn a_budget_for_one_model_swaps_them_with_reason_memory() {
    let need = MemoryNeed { host_bytes: 150 << 20, device_bytes: 0 };
    let (reg, _) = registry(&["a", "b"], RegistryConfig { memory_budget: Some(200 << 20), ..RegistryConfig::default() }, need);
    rt().block_on(async {
        for name in ["a", "b", "a", "b"] {
            drop(reg.acquire(Some(name), None).await.unwrap());
        }
    });
    assert_eq!(metric(&reg, "llama_model_unloads_total{model=\"a\",reason=\"memory\"}"), 2);
    assert_eq!(metric(&reg, "llama_model_unloads_total{model=\"b\",reason=\"memory\"}"), 1);
}

#[test]
fn keep_alive_zero_unloads_once_idle_and_idle_unload_after_its_time() {
    let config = RegistryConfig { idle_unload: Some(Duration::from_millis(200)), ..RegistryConfig::default() };
    let (reg, _) = registry(&["a", "b"], config, small());
    let rt = rt();
    rt.block_on(async {
        drop(reg.acquire(Some("a"), Some(KeepAlive::After(Duration::ZERO))).await.unwrap());
        drop(reg.acquire(Some("b"), Some(KeepAlive::Never)).await.unwrap());
    });
    eventually("a is unloaded once idle", || status(&reg, "a") == "unloaded");
    assert_eq!(metric(&reg, "llama_model_unloads_total{model=\"a\",reason=\"keep_alive\"}"), 1);
    // Review finding: the reaper unloaded a model with keep-alive 0 between its load and the
    // waiting request's lease, so the request loaded it again, up to 21 times here.
    assert_eq!(metric(&reg, "llama_model_loads_total{model=\"a\",outcome=\"ok\"}"), 1);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(status(&reg, "b"), "loaded", "keep_alive -1 overrides --idle-unload");
    // A model without keep_alive goes after --idle-unload.
    rt.block_on(async { drop(reg.acquire(Some("a"), None).await.unwrap()) });
    // Listed with at most --idle-unload to go, unless a busy machine let the reaper take it
    // already (then it must have gone for idleness).
    let listed = reg.list().into_iter().find(|m| m.name == "a").unwrap();
    assert!(listed.unload_in_seconds.flatten().is_some_and(|s| s <= 0.2) || status(&reg, "a") == "unloaded", "{listed:?}");
    eventually("a is unloaded again once idle", || status(&reg, "a") == "unloaded");
}

#[test]
fn an_admin_unload_of_a_busy_model_waits_for_its_requests() {
    let (reg, _) = registry(&["a"], RegistryConfig::default(), small());
    let rt = rt();
    let lease = rt.block_on(reg.acquire(Some("a"), None)).unwrap();
    assert!(!reg.unload("a").unwrap(), "unloaded under a request");
    assert_eq!(status(&reg, "a"), "loaded");
    drop(lease);
    eventually("a is unloaded once idle", || status(&reg, "a") == "unloaded");
    assert_eq!(metric(&reg, "llama_model_unloads_total{model=\"a\",reason=\"admin\"}"), 1);
    assert!(matches!(reg.unload("nope"), Err(AcquireError::UnknownModel(_))));
}

#[test]
fn unknown_names_and_the_default_model() {
    let (reg, _) = registry(&["a", "b"], RegistryConfig::default(), small());
    let rt = rt();
    assert!(matches!(rt.block_on(reg.acquire(Some("zzz"), None)).err().unwrap(), AcquireError::UnknownModel(n) if n == "zzz"));
    let lease = rt.block_on(reg.acquire(None, None)).unwrap();
    assert_eq!(lease.name(), "a");
}

#[test]
fn shutdown_waits_for_a_load_and_refuses_what_comes_after() {
    let (reg, counts) = registry(&["a"], RegistryConfig::default(), small());
    counts.delay_ms.store(300, Ordering::SeqCst);
    let rt = rt();
    let reg2 = reg.clone();
    let waiter = rt.spawn(async move { reg2.acquire(Some("a"), None).await.map(|_| ()) });
    std::thread::sleep(Duration::from_millis(50));
    reg.shutdown();
    // The load finished (it cannot be interrupted) but its model was not started.
    assert_eq!(counts.loads.load(Ordering::SeqCst), 1);
    assert_eq!(status(&reg, "a"), "unloaded");
    assert!(rt.block_on(waiter).unwrap().is_err());
    assert!(matches!(rt.block_on(reg.acquire(Some("a"), None)).err().unwrap(), AcquireError::ShuttingDown));
}

#[test]
fn waiting_for_a_load_counts_in_the_admission_bound() {
    let counts = Arc::new(Counts::default());
    counts.delay_ms.store(300, Ordering::SeqCst);
    let loader = FakeLoader { counts: counts.clone(), need: small() };
    let reg = Registry::new(vec![ModelSpec { admission: 2, ..spec("a") }], None, Box::new(loader), RegistryConfig::default());
    let rt = rt();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..4).map(|_| tokio::spawn({
            let reg = reg.clone();
            async move { reg.acquire(Some("a"), None).await.map(|_| ()) }
        })).collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| matches!(e, AcquireError::Busy)), "{results:?}");
}

#[test]
fn mem_available_parses_proc_meminfo() {
    assert_eq!(parse_mem_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"), Some(2 << 20));
    assert_eq!(parse_mem_available("MemTotal: 100 kB\n"), None);
    assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
}
