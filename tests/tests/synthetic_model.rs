//! scripts/make-bench-model (the GPU check's model) writes a file the validator and llama.cpp
//! accept, and `llama run` generates from it.

use llama_tests::{assert_exit, llama, stderr};

#[test]
fn the_synthetic_benchmark_model_loads_and_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("synthetic.gguf");
    let o = std::process::Command::new(root.join("scripts/make-bench-model"))
        .arg(&model)
        .args(["--layers", "2", "--embd", "256", "--ff", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "1000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = llama(&["run", "-m", model.to_str().unwrap(), "-p", "t1 t2 t3", "-n", "8", "--temp", "0"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("generated 8 tokens"), "{}", stderr(&o));
}
