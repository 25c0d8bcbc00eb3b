//! Bad model input: each case is a typed error and exit code 3, never a crash or abort.

use std::path::Path;

use llama_tests::{assert_exit, llama, model_path, stderr};

fn run_with(model: &Path) -> std::process::Output {
    llama(&["run", "-m", model.to_str().unwrap(), "-p", "Hello", "-n", "4"])
}

fn assert_refused(model: &Path, expect: &str) {
    let o = run_with(model);
    // A signal (abort, segfault) has no exit code: assert_exit catches it too.
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(expect), "expected {expect:?} in:\n{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn missing_path() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(&dir.path().join("nope.gguf"), "does not exist");
}

#[test]
fn a_directory() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(dir.path(), "is a directory");
}

#[test]
fn an_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert_refused(&p, "is empty");
}

#[test]
fn a_text_file_renamed_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "just some notes\n").unwrap();
    assert_refused(&p, "is not a GGUF model");
}

#[test]
fn a_truncated_model() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(model_path()).unwrap();
    for (name, len) in [("half.gguf", src.len() / 2), ("header-only.gguf", 4096), ("magic-only.gguf", 4)] {
        let p = dir.path().join(name);
        std::fs::write(&p, &src[..len]).unwrap();
        assert_refused(&p, "invalid model file");
    }
}
