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
