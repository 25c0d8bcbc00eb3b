//! `llama bench --json` reports pp and tg throughput. No time is asserted: only that the
//! measurement ran and produced positive rates.

use llama_tests::{assert_exit, llama, model_path, stdout};

#[test]
fn bench_json_has_pp_and_tg() {
    let model = model_path();
    let o = llama(&["bench", "-m", model.to_str().unwrap(), "-p", "32", "-n", "8", "-r", "2", "-t", "2", "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("bench --json is JSON");
    for key in ["pp_tokens_per_s", "tg_tokens_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v:#}");
    }
    assert_eq!(v["pp"]["samples"].as_array().unwrap().len(), 2);
    assert_eq!(v["backend"], "cpu");
}

#[test]
fn bench_table_names_the_tests() {
    let model = model_path();
    let o = llama(&["bench", "-m", model.to_str().unwrap(), "-p", "16", "-n", "4", "-r", "1"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("pp16") && out.contains("tg4"), "{out}");
}
