//! The config file through the real binary: named models, precedence, errors.

use llama_tests::{assert_exit, llama_cmd, model_path, stderr, stdout};

fn with_config(text: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut a = vec!["--config", cfg.to_str().unwrap()];
    a.extend_from_slice(args);
    llama_cmd(&a).env_remove("LLAMA_MODEL").output().unwrap()
}

#[test]
fn a_named_model_resolves_and_config_defaults_apply() {
    let model = model_path();
    let cfg = format!("[models]\nmini = {:?}\n[defaults]\nn-predict = 3\ntemp = 0.0\n", model.to_str().unwrap());
    let o = with_config(&cfg, &["run", "mini", "-p", "Hello"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("generated 3 tokens"), "{}", stderr(&o));
    // A flag beats the config.
    let o = with_config(&cfg, &["run", "mini", "-p", "Hello", "-n", "2"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("generated 2 tokens"), "{}", stderr(&o));
    // The environment beats the config, and loses to a flag.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &cfg).unwrap();
    let o = llama_cmd(&["--config", path.to_str().unwrap(), "run", "mini", "-p", "Hello"]).env("LLAMA_N_PREDICT", "4").output().unwrap();
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("generated 4 tokens"), "{}", stderr(&o));
    let o = llama_cmd(&["--config", path.to_str().unwrap(), "run", "mini", "-p", "Hello", "-n", "1"])
        .env("LLAMA_N_PREDICT", "4")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("generated 1 tokens"), "{}", stderr(&o));
}

#[test]
fn a_default_model_in_the_config_is_used() {
    let model = model_path();
    let cfg = format!("default-model = \"mini\"\n[models]\nmini = {:?}\n", model.to_str().unwrap());
    let o = with_config(&cfg, &["run", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
}

#[test]
fn an_unknown_key_is_an_error_with_key_and_line() {
    let o = with_config("[defaults]\ntemp = 0.5\ntop-q = 3\n", &["run", "-p", "Hi"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("line 3") && err.contains("top-q"), "{err}");
}

#[test]
fn a_bad_value_is_an_error_with_key_and_line() {
    let o = with_config("\n[defaults]\nmin-p = 7\n", &["run", "-p", "Hi"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("line 3") && err.contains("min-p"), "{err}");
}

#[test]
fn an_unknown_model_name_is_a_clear_error() {
    let o = with_config("", &["run", "nosuchmodel", "-p", "Hi"]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("unknown model 'nosuchmodel'"), "{}", stderr(&o));
}

#[test]
fn list_shows_named_models_and_files_with_their_headers() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&model, dir.path().join("linked.gguf")).unwrap();
    let cfg = format!("models-dir = {:?}\n[models]\nmini = {:?}\n", dir.path().to_str().unwrap(), model.to_str().unwrap());
    let o = with_config(&cfg, &["list", "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["named"][0]["name"], "mini");
    assert_eq!(v["named"][0]["architecture"], "gemma3");
    assert_eq!(v["named"][0]["quantization"], "Q4_K_M");
    let files = v["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["name"] == "linked.gguf" && f["quantization"] == "Q4_K_M"), "{v:#}");
    let o = with_config(&cfg, &["list"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("gemma3") && stdout(&o).contains("Q4_K_M"), "{}", stdout(&o));
}

#[test]
fn a_model_name_never_leaves_the_models_directory() {
    let root = tempfile::tempdir().unwrap();
    let models = root.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    // A name in the models directory that is a symlink to a model outside it.
    std::os::unix::fs::symlink(model_path(), models.join("escape.gguf")).unwrap();
    std::os::unix::fs::symlink(model_path(), models.join("inside.gguf")).unwrap();
    let cfg = format!("models-dir = {:?}\n", models.to_str().unwrap());
    let o = with_config(&cfg, &["run", "escape", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("'escape' leads outside the models directory"), "{}", stderr(&o));
    // A copy inside is fine; a traversal is not a name (it is a path, and must exist as one).
    std::fs::remove_file(models.join("inside.gguf")).unwrap();
    std::fs::copy(model_path(), models.join("inside.gguf")).unwrap();
    assert_exit(&with_config(&cfg, &["run", "inside", "-p", "Hi", "-n", "1"]), 0);
    let o = with_config(&cfg, &["run", "../secret.gguf", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}
