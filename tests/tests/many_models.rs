//! `llama serve` with many models, through the real binary, the real CPU plugin and two real
//! models (Gemma 3 270M and SmolLM2 135M Instruct): the right model answers, load on
//! demand, one load for many waiters, eviction by count and by memory, idle unload and the
//! memory it gives back, a corrupt file in the catalogue, the admin routes and `llama ps`,
//! and a swap soak. Outcomes and counters only, never durations.

use std::path::PathBuf;

use llama_tests::server::{sse_events, wait_for, Server};
use llama_tests::{assert_exit, llama, model_path, stdout};
use serde_json::{json, Value};

const PROMPT: &str = "The capital of France is";

fn smol_path() -> PathBuf {
    llama_tests::smollm2_model_path()
}

/// `llama serve ARGS` once its preload (if any) is done.
fn serve(args: &[&str]) -> Server {
    let s = Server::spawn(args);
    s.wait_ready();
    s
}

fn gemma() -> String {
    model_path().to_str().unwrap().to_string()
}

fn smol_arg() -> String {
    format!("smol={}", smol_path().display())
}

/// The gemma model's name in the catalogue: its file name without `.gguf`.
const GEMMA: &str = "gemma-3-270m-q4_k_m";

/// `llama run`'s greedy text: what the server must answer for the same model and prompt.
fn run_greedy(path: &str, n: u32) -> String {
    let o = llama(&["run", "-m", path, "-p", PROMPT, "-n", &n.to_string(), "--temp", "0", "-t", "2"]);
    assert_exit(&o, 0);
    stdout(&o).strip_suffix('\n').unwrap_or(&stdout(&o)).to_string()
}

fn complete(s: &Server, model: &str, n: u32) -> (u16, Value) {
    s.post("/v1/completions", &json!({"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0}))
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {v}")).to_string()
}

/// Each model's status in /v1/models.
fn statuses(s: &Server) -> Vec<(String, String)> {
    let v: Value = ureq::get(&s.url("/v1/models")).call().unwrap().into_json().unwrap();
    v["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap().to_string(), m["status"].as_str().unwrap().to_string())).collect()
}

fn status_of(s: &Server, name: &str) -> String {
    statuses(s).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not listed")).1
}

fn entry(s: &Server, name: &str) -> Value {
    let v: Value = ureq::get(&s.url("/v1/models")).call().unwrap().into_json().unwrap();
    v["data"].as_array().unwrap().iter().find(|m| m["id"] == name).cloned().unwrap_or_else(|| panic!("{name} not in {v}"))
}

#[test]
fn two_models_answer_interleaved_and_concurrent_requests_with_their_own_text() {
    let want_gemma = run_greedy(&gemma(), 12);
    let want_smol = run_greedy(smol_path().to_str().unwrap(), 12);
    assert_ne!(want_gemma, want_smol, "the two models should not write the same text");
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "2048"]);
    assert_eq!(statuses(&s), vec![(GEMMA.to_string(), "loaded".to_string()), ("smol".to_string(), "unloaded".to_string())]);
    let smol = entry(&s, "smol");
    assert_eq!((smol["arch"].as_str(), smol["quantization"].as_str()), (Some("llama"), Some("Q4_1")), "{smol}");
    assert_eq!(smol["size_bytes"], 98_362_432, "{smol}");
    // Interleaved: one after the other, alternating.
    for _ in 0..2 {
        assert_eq!(text(&complete(&s, "smol", 12).1), want_smol);
        assert_eq!(text(&complete(&s, GEMMA, 12).1), want_gemma);
    }
    // Concurrent: one request to each at the same time, three rounds.
    for _ in 0..3 {
        let (a, b) = std::thread::scope(|sc| {
            let a = sc.spawn(|| complete(&s, GEMMA, 12));
            let b = sc.spawn(|| complete(&s, "smol", 12));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
        assert_eq!(text(&a.1), want_gemma);
        assert_eq!(text(&b.1), want_smol);
        assert_eq!((a.1["model"].as_str(), b.1["model"].as_str()), (Some(GEMMA), Some("smol")));
    }
    assert_eq!(statuses(&s), vec![(GEMMA.to_string(), "loaded".to_string()), ("smol".to_string(), "loaded".to_string())]);
    // A model the server does not know: 404 as ever.
    let (code, v) = complete(&s, "nope", 4);
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("model_not_found")), "{v}");
}

#[test]
fn one_model_at_a_time_swaps_by_lru_and_never_cuts_a_stream() {
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "2048", "--models-max", "1"]);
    for m in [GEMMA, "smol", GEMMA] {
        let (code, v) = complete(&s, m, 4);
        assert_eq!(code, 200, "{m}: {v}");
    }
    assert_eq!(s.metric("llama_model_unloads_total{model=\"gemma-3-270m-q4_k_m\",reason=\"lru\"}"), 1.0);
    assert_eq!(s.metric("llama_model_unloads_total{model=\"smol\",reason=\"lru\"}"), 1.0);
    assert_eq!(s.metric("llama_models_loaded"), 1.0);

    // A long stream from gemma in flight while smol is asked for: the stream ends intact,
    // and smol is served after it (or refused with Retry-After), never by cutting it.
    let stream = ureq::post(&s.url("/v1/completions"))
        .send_json(json!({"model": GEMMA, "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}))
        .unwrap();
    let order = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        let events = sc.spawn(|| {
            let events = sse_events(stream);
            order.lock().unwrap().push("stream ended");
            events
        });
        let other = sc.spawn(|| {
            let r = match ureq::post(&s.url("/v1/completions")).send_json(json!({"model": "smol", "prompt": PROMPT, "max_tokens": 4})) {
                Ok(r) => (r.status(), None),
                Err(ureq::Error::Status(code, r)) => (code, r.header("retry-after").map(str::to_string)),
                Err(e) => panic!("{e}"),
            };
            order.lock().unwrap().push("smol answered");
            r
        });
        let events = events.join().unwrap();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        assert!(!events.iter().any(|e| e.contains("\"error\"")), "{events:?}");
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 120, "the stream was cut: {usage}");
        let outcome = other.join().unwrap();
        eprintln!("smol during gemma's stream: HTTP {}, order {:?}", outcome.0, order.lock().unwrap());
        match outcome {
            (200, _) => assert_eq!(*order.lock().unwrap(), ["stream ended", "smol answered"], "smol was served before gemma's stream ended"),
            (503, retry) => assert!(retry.is_some(), "503 without Retry-After"),
            (code, _) => panic!("smol: {code}"),
        }
    });
}

#[test]
fn ten_concurrent_requests_for_an_unloaded_model_share_one_load() {
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "2048", "-np", "4", "--queue", "8"]);
    assert_eq!(status_of(&s, "smol"), "unloaded");
    let results: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..10).map(|_| sc.spawn(|| complete(&s, "smol", 4))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (code, v) in &results {
        assert_eq!(*code, 200, "{v}");
    }
    assert_eq!(s.metric("llama_model_loads_total{model=\"smol\",outcome=\"ok\"}"), 1.0);
    assert_eq!(s.metric("llama_model_loads_total{model=\"smol\",outcome=\"failed\"}"), 0.0);
}

/// The servers' own estimates of each model at `-c 2048` (bytes), read from /v1/models.
fn estimates() -> (u64, u64) {
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "2048"]);
    assert_eq!(complete(&s, "smol", 1).0, 200);
    let g = entry(&s, GEMMA)["memory_bytes"].as_u64().unwrap();
    let m = entry(&s, "smol")["memory_bytes"].as_u64().unwrap();
    (g, m)
}

#[test]
fn a_memory_budget_refuses_what_cannot_fit_and_swaps_what_can() {
    let (g, m) = estimates();
    eprintln!("estimates at -c 2048: gemma {g} bytes, smol {m} bytes");
    assert!(m < g, "smol ({m}) should need less than gemma ({g})");
    // Between the two: gemma can never fit, smol serves on.
    let budget = ((g + m) / 2).to_string();
    let s = serve(&["-m", &smol_arg(), "-m", &gemma(), "-c", "2048", "--memory-budget", &budget]);
    let (code, v) = complete(&s, GEMMA, 4);
    assert_eq!((code, v["error"]["type"].as_str()), (503, Some("insufficient_memory")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("needed {g} bytes")) && msg.contains("budget"), "{msg}");
    eprintln!("gemma under a {budget}-byte budget: {msg}");
    assert!(!msg.contains(".gguf") && !msg.contains("/root") && !msg.contains("/tmp"), "a path in {msg}");
    assert_eq!(complete(&s, "smol", 4).0, 200, "the other model stopped serving");
    assert_eq!(status_of(&s, GEMMA), "unloaded");
    drop(s);

    // Room for either, not both: alternating requests are all answered, by swapping.
    let budget = (g + m / 2).to_string();
    let s = serve(&["-m", &smol_arg(), "-m", &gemma(), "-c", "2048", "--memory-budget", &budget]);
    for model in [GEMMA, "smol", GEMMA, "smol"] {
        let (code, v) = complete(&s, model, 4);
        assert_eq!(code, 200, "{model}: {v}");
    }
    assert_eq!(s.metric("llama_model_unloads_total{reason=\"memory\"}"), 4.0);
    assert_eq!(s.metric("llama_model_unloads_total{reason=\"lru\"}"), 0.0);
}

/// RssAnon and RssFile of a process, KiB.
fn rss_parts(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0);
    (get("RssAnon:"), get("RssFile:"))
}

/// Resident memory once it is at most `bound` KiB and has stayed there: read again a second
/// later (a first reading can catch the release half done), so the figure is the settled one.
fn settled(s: &Server, what: &str, bound: f64) -> u64 {
    wait_for(what, || Some(s.rss_kib()).filter(|&r| r as f64 <= bound));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = s.rss_kib();
    assert!(after as f64 <= bound, "{what}: {after} KiB a second later, over {bound:.0} KiB");
    after
}

#[test]
fn an_idle_model_is_unloaded_and_its_memory_given_back() {
    // gemma stays loaded (its own keep-alive: never); smol goes after 2 s idle.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, format!("[models.gemma]\npath = {:?}\nkeep-alive = -1\n", gemma())).unwrap();
    let s = serve(&["--config", cfg.to_str().unwrap(), "-m", "gemma", "-m", &smol_arg(), "-c", "2048", "--idle-unload", "2"]);
    assert_eq!(complete(&s, "gemma", 4).0, 200);
    let before = s.rss_kib();
    let parts_before = rss_parts(s.child.id());
    assert_eq!(complete(&s, "smol", 8).0, 200);
    let loaded = s.rss_kib();
    assert!(loaded > before + 50 * 1024, "loading smol did not show in resident memory: {before} KiB, then {loaded} KiB");
    assert_eq!(status_of(&s, "smol"), "loaded");
    let unload_in = entry(&s, "smol")["unload_in_seconds"].as_f64().unwrap();
    assert!(unload_in <= 2.0, "{unload_in}");
    assert!(entry(&s, "gemma")["unload_in_seconds"].is_null(), "gemma would be unloaded");
    wait_for("smol is unloaded after 2 s idle", || (status_of(&s, "smol") == "unloaded").then_some(()));
    assert_eq!(s.metric("llama_model_unloads_total{model=\"smol\",reason=\"idle\"}"), 1.0);
    assert_eq!(status_of(&s, "gemma"), "loaded", "gemma's keep-alive -1 did not hold");
    // The status flips first, the memory is freed right after (the engine thread is joined,
    // then the model freed): wait for it, failing only after the hang guard.
    let bound = before as f64 * 1.10;
    let after = settled(&s, "resident memory comes back within 10 % of before smol's load", bound);
    let parts_after = rss_parts(s.child.id());
    eprintln!(
        "resident memory: {before} KiB before smol's first load (anon {} + file {}), {loaded} KiB with smol loaded, {after} KiB after its idle unload (anon {} + file {})",
        parts_before.0, parts_before.1, parts_after.0, parts_after.1
    );
}

#[test]
fn a_server_that_never_loaded_a_model_gives_back_what_a_load_took() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(smol_path(), dir.path().join("smol.gguf")).unwrap();
    // No -m: nothing is preloaded, so the first figure is the server before any model.
    let s = serve(&["--models-dir", dir.path().to_str().unwrap(), "-c", "2048", "--idle-unload", "1"]);
    assert_eq!(status_of(&s, "smol"), "unloaded");
    let before = s.rss_kib();
    let parts_before = rss_parts(s.child.id());
    assert_eq!(complete(&s, "smol", 8).0, 200);
    let loaded = s.rss_kib();
    wait_for("smol is unloaded after 1 s idle", || (status_of(&s, "smol") == "unloaded").then_some(()));
    // At least 95 % of what the load took comes back (the backend's code pages, paged in by
    // the first load, stay mapped: file-backed and shared).
    let bound = loaded as f64 - (loaded - before) as f64 * 0.95;
    let after = settled(&s, "95 % of the load's memory comes back", bound);
    let parts_after = rss_parts(s.child.id());
    eprintln!(
        "resident memory of a server with no model before: {before} KiB (anon {} + file {}), {loaded} KiB with smol loaded, {after} KiB after its unload (anon {} + file {})",
        parts_before.0, parts_before.1, parts_after.0, parts_after.1
    );
}

#[test]
fn a_corrupt_file_in_the_models_directory_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = b"GGUF".to_vec();
    bad.extend_from_slice(&3u32.to_le_bytes());
    bad.extend_from_slice(&[0xff; 64]);
    std::fs::write(dir.path().join("broken.gguf"), &bad).unwrap();
    let s = serve(&["-m", &gemma(), "--models-dir", dir.path().to_str().unwrap(), "-c", "2048"]);
    assert_eq!(statuses(&s), vec![(GEMMA.to_string(), "loaded".to_string()), ("broken".to_string(), "unloaded".to_string())]);
    for _ in 0..2 {
        let (code, v) = complete(&s, "broken", 4);
        assert_eq!((code, v["error"]["code"].as_str()), (500, Some("model_load_failed")), "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(!msg.contains(dir.path().to_str().unwrap()) && !msg.contains(".gguf"), "the path leaked: {msg}");
    }
    let b = entry(&s, "broken");
    assert_eq!(b["status"], "failed", "{b}");
    assert!(b["reason"].as_str().is_some_and(|r| r.contains("invalid model file") && !r.contains(dir.path().to_str().unwrap())), "{b}");
    // Tried again on each request, and counted as such; the other model is untouched.
    assert_eq!(s.metric("llama_model_loads_total{model=\"broken\",outcome=\"failed\"}"), 2.0);
    let (code, v) = complete(&s, GEMMA, 4);
    assert_eq!(code, 200, "{v}");
    assert_eq!(status_of(&s, GEMMA), "loaded");
}

#[test]
fn admin_routes_need_the_key_and_llama_ps_shows_what_is_loaded() {
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "2048", "--api-key", "k3y"]);
    let post = |path: &str, key: Option<&str>| {
        let mut r = ureq::post(&s.url(path));
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_json(json!({"model": "smol"})) {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(post("/models/load", None).0, 401);
    assert_eq!(post("/models/unload", Some("wrong")).0, 401);
    let (code, v) = post("/models/load", Some("k3y"));
    assert_eq!((code, v["status"].as_str()), (200, Some("loaded")), "{v}");

    let ps = |args: &[&str]| {
        let mut a = vec!["ps", "--url", &s.base];
        a.extend_from_slice(args);
        llama(&a)
    };
    let o = ps(&["--api-key", "k3y"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains(GEMMA) && out.contains("smol") && out.contains("NAME"), "{out}");
    let o = ps(&["--api-key", "k3y", "--json"]);
    assert_exit(&o, 0);
    let listed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(names, [GEMMA, "smol"]);
    // Without the key: a clear error, not a table.
    let o = ps(&[]);
    assert_ne!(o.status.code(), Some(0));

    let (code, v) = post("/models/unload", Some("k3y"));
    assert_eq!((code, v["status"].as_str()), (200, Some("unloaded")), "{v}");
    let o = ps(&["--api-key", "k3y", "--json"]);
    let listed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(names, [GEMMA], "smol still listed as loaded after its unload");
    let r = ureq::get(&s.url("/metrics")).set("Authorization", "Bearer k3y").call().unwrap().into_string().unwrap();
    assert!(r.contains("llama_model_unloads_total{model=\"smol\",reason=\"admin\"} 1"), "{r}");
    // An unknown model: 404.
    let r = ureq::post(&s.url("/models/load")).set("Authorization", "Bearer k3y").send_json(json!({"model": "nope"}));
    assert!(matches!(r, Err(ureq::Error::Status(404, _))), "{r:?}");
}

#[test]
fn soak_of_300_requests_swapping_models_every_time() {
    let s = serve(&["-m", &gemma(), "-m", &smol_arg(), "-c", "1024", "--models-max", "1"]);
    let mut rss = Vec::new();
    for i in 1..=300 {
        let model = if i % 2 == 0 { GEMMA } else { "smol" };
        let (code, v) = complete(&s, model, 2);
        assert_eq!(code, 200, "request {i} to {model}: {v}");
        rss.push(s.rss_kib());
    }
    // Gemma's requests only (even ones: the two models differ by ~190 MB), and the median of
    // eleven of them: a leak raises every later sample, while one sample can catch the
    // allocator holding freed memory for a moment (a CI run once read 395 MB at request 300
    // against 354 MB at 50; rerun, 356 and 360 MB).
    //
    // glibc's allocator can also settle one step higher once, and stay there: a CI run read
    // ~356 MB for every Gemma request up to request 78 and ~392 MB (+36 MB, both models alike)
    // for every one after, flat to request 300. A leak does not stop: it grows in the second
    // half as in the first. So the check is twofold: no growth from request 150 to 300 beyond
    // noise, and from 50 to 300 less than 64 MiB in all (a leak of 0.5 MB per load would be
    // 62 MB over the 125 Gemma loads between them).
    let gemma_median = |from: usize, to: usize| {
        let mut w: Vec<u64> = (from..=to).filter(|r| r % 2 == 0).map(|r| rss[r - 1]).collect();
        w.sort_unstable();
        w[w.len() / 2]
    };
    let (at50, at150, at300) = (gemma_median(40, 60), gemma_median(140, 160), gemma_median(280, 300));
    eprintln!("resident memory (median of 11 gemma requests): {at50} KiB around request 50, {at150} KiB around 150, {at300} KiB around 300");
    assert!(
        at300 as f64 <= at150 as f64 * 1.05 && at300 <= at50 + 64 * 1024,
        "resident memory grew: {at50} KiB around request 50, {at150} KiB around 150, {at300} KiB around 300 (all: {rss:?})"
    );
    let unloads = s.metric("llama_model_unloads_total{reason=\"lru\"}");
    assert!(unloads >= 298.0, "{unloads} swaps for 300 alternating requests");
}
