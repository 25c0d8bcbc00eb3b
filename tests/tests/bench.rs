//! `llama bench --json` reports pp and tg throughput. No time is asserted: only that the
//! measurement ran and produced positive rates.

use llama_tests::{assert_exit, llama, model_path, stdout};

#[test]
fn bench_json_has_pp_and_tg() {
    let model = model_path();
    let o = llama(&["bench", "-m", model.to_str().unwrap(), "-p", "32", "-n", "8", "-r", "2", "-t", "2", "--concurrency", "1,2", "--concurrent-tokens", "8", "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("bench --json is JSON");
    for key in ["pp_tokens_per_s", "tg_tokens_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v:#}");
    }
    assert_eq!(v["pp"]["samples"].as_array().unwrap().len(), 2);
    assert_eq!(v["backend"], "cpu");
    let streams: Vec<u64> = v["concurrent"].as_array().unwrap().iter().map(|c| c["streams"].as_u64().unwrap()).collect();
    assert_eq!(streams, vec![1, 2]);
    for c in v["concurrent"].as_array().unwrap() {
        assert!(c["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{c}");
        assert!(c["sequential_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{c}");
    }
    let pr = &v["prefix_reuse"];
    assert!(pr["cached_tokens"].as_u64().unwrap() > 900, "{pr}");
    assert!(pr["ttft_with_reuse_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_table_names_the_tests() {
    let model = model_path();
    let o = llama(&["bench", "-m", model.to_str().unwrap(), "-p", "16", "-n", "4", "-r", "1", "--concurrency", "0", "--no-prefix-test"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("pp16") && out.contains("tg4"), "{out}");
}

/// Threads of this process right now (Linux /proc).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

// Defect 13: after `llama bench`'s pp/tg rows, one stream of its concurrency rows ran at
// about 0.58x its speed alone. The cause was the pp/tg phase's OpenMP pool, left alive on
// the calling thread: with the engine's team there were more OpenMP threads than cores, so
// libgomp slept at barriers instead of spinning. The measurement now runs on a thread that
// ends with it, taking its pool along: no thread of it outlives the measurement.
#[test]
fn the_pp_tg_measurement_leaves_no_thread_pool_behind() {
    use llama_serve::bench::{run, BenchParams};
    let model = llama_tests::model();
    let size = llama_host::ContextSize { n_ctx: 0, n_batch: 512, n_ubatch: 512, n_threads: 2, n_threads_batch: 2 };
    // This test's own thread has decoded nothing yet: before the fix, the measurement left
    // its pool on it (one more thread for good); the model is loaded (by `model()`) first.
    // A finished pool's workers exit on their own shortly after: count once they have.
    let settled = || {
        let mut n = threads();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let m = threads();
            if m == n {
                return n;
            }
            n = m;
        }
    };
    let before = settled();
    let r = run(model, &BenchParams { n_prompt: 16, n_gen: 4, reps: 1, size, cache: Default::default() }).unwrap();
    assert!(r.pp.is_some() && r.tg.is_some());
    let after = llama_tests::server::wait_for("the measurement's threads are gone", || (threads() <= before).then_some(threads()));
    assert!(after <= before, "{after} threads after, {before} before");
}

// Defect 12: with batch-invariant mode and `-b 1` the engine planned nothing and spun for
// ever. A batch of one cannot hold the padding token and a real one: refused as a bad
// argument before any engine starts.
#[test]
fn batch_invariant_with_a_batch_of_one_is_a_bad_argument_not_a_spin() {
    let model = model_path();
    let mut child = llama_tests::llama_cmd(&[
        "bench", "-m", model.to_str().unwrap(), "-p", "0", "-n", "0", "-b", "1", "--batch-invariant", "--concurrency", "1", "--no-prefix-test",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let status = llama_tests::server::wait_for("llama bench ends", || child.try_wait().unwrap());
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(2), "{}", llama_tests::stderr(&out));
    assert!(llama_tests::stderr(&out).contains("batch-size"), "{}", llama_tests::stderr(&out));
}

/// `llama bench --spec ngram --json` runs the three speculation workloads of bench/spec,
/// without and with n-gram drafts. No time or ratio is asserted: only that each workload
/// ran in both modes and the edit, mostly a copy of its prompt, was drafted for.
#[test]
fn bench_spec_ngram_json_has_the_three_workloads() {
    let model = llama_tests::smollm2_model_path();
    let workloads = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/spec");
    let o = llama(&[
        "bench", "-m", model.to_str().unwrap(), "--spec", "ngram", "--spec-workloads", workloads.to_str().unwrap(),
        "--spec-tokens", "48", "--spec-prose-tokens", "32", "-r", "1", "-t", "1", "--json",
    ]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("bench --spec --json is JSON");
    let spec = &v["spec"];
    assert_eq!(spec["mode"], "ngram");
    let names: Vec<&str> = spec["workloads"].as_array().unwrap().iter().map(|w| w["workload"].as_str().unwrap()).collect();
    assert_eq!(names, ["edit", "prose", "edit-x4"]);
    for w in spec["workloads"].as_array().unwrap() {
        for side in ["without", "with"] {
            assert!(w[side]["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{side} in {w:#}");
        }
        assert_eq!(w["without"]["drafted"], 0, "{w:#}");
        assert!(w["same_text"].is_boolean(), "{w:#}");
    }
    assert!(spec["workloads"][0]["with"]["drafted"].as_u64().unwrap() > 0, "{spec:#}");
}

#[test]
fn bench_spec_names_a_missing_workload_directory() {
    let model = llama_tests::smollm2_model_path();
    let o = llama(&["bench", "-m", model.to_str().unwrap(), "--spec", "ngram", "--spec-workloads", "/nonexistent/spec-workloads"]);
    assert_exit(&o, 1);
    assert!(llama_tests::stderr(&o).contains("/nonexistent/spec-workloads/edit.prompt"), "{}", llama_tests::stderr(&o));
}
