//! Regression tests for the command line's argument, environment and config handling: each
//! pins a defect that once slipped through (a panic, a wrong exit code, a silently ignored
//! value). None of them needs generation; they run the real binary.
//!
//! `LLAMA_TEST_BIN=/path/to/llama` runs them against another build of `llama` (to check
//! that a test fails on the build before its fix).

use std::process::{Command, Output};

use llama_tests::{llama_cmd, stderr};

/// `llama_cmd` without the caller's API key and config, or the same for `$LLAMA_TEST_BIN`.
fn cmd(args: &[&str]) -> Command {
    let mut base = llama_cmd(args);
    base.env_remove("LLAMA_API_KEY").env_remove("LLAMA_CONFIG");
    let Some(bin) = std::env::var_os("LLAMA_TEST_BIN").filter(|b| !b.is_empty()) else { return base };
    let mut c = Command::new(bin);
    c.args(base.get_args());
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run llama")
}

/// Exit code and stderr, for messages that show both.
fn outcome(o: &Output) -> (Option<i32>, String) {
    (o.status.code(), stderr(o))
}

/// `llama serve` with a model file that does not exist: if an argument error is not caught
/// before the server starts, the server starts, fails to load and exits 3 instead of 2.
fn serve(extra: &[&str]) -> Command {
    let mut a = vec!["serve", "-m", "/nonexistent/never.gguf", "--port", "0"];
    a.extend_from_slice(extra);
    cmd(&a)
}

#[test]
fn serve_refuses_an_empty_api_key_flag() {
    let o = run(&mut serve(&["--api-key", ""]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--api-key is empty"), "{err}");
}

#[test]
fn serve_refuses_an_empty_api_key_variable() {
    let o = run(serve(&[]).env("LLAMA_API_KEY", ""));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("LLAMA_API_KEY is set but empty"), "{err}");
}

#[test]
fn serve_refuses_a_key_file_of_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, " \n\n").unwrap();
    let o = run(&mut serve(&["--api-key-file", key.to_str().unwrap()]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--api-key-file") && err.contains("holds no key"), "{err}");
}

#[test]
fn serve_with_a_missing_key_file_is_a_bad_argument() {
    let o = run(&mut serve(&["--api-key-file", "/nonexistent/key"]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read /nonexistent/key (--api-key-file)"), "{err}");
}

#[test]
fn serve_bounds_the_header_timeout() {
    let o = run(&mut serve(&["--header-timeout", "18446744073709551615"]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--header-timeout") && err.contains("18446744073709551615"), "{err}");
}
