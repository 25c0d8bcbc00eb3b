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

// ---- The environment: a bad value is an error naming the variable, never a panic. ----

#[test]
fn a_probe_timeout_that_is_not_a_duration_is_a_bad_argument() {
    for v in ["inf", "1e20", "NaN", "-1", "0", "soon"] {
        let o = run(cmd(&["backends"]).env("LLAMA_PROBE_TIMEOUT", v));
        let (code, err) = outcome(&o);
        assert_eq!(code, Some(2), "LLAMA_PROBE_TIMEOUT={v}: {err}");
        assert!(err.contains("LLAMA_PROBE_TIMEOUT") && err.contains(&format!("'{v}'")), "LLAMA_PROBE_TIMEOUT={v}: {err}");
    }
}

#[test]
fn a_trace_file_that_cannot_be_created_is_a_bad_argument() {
    let o = run(cmd(&["backends"]).env("LLAMA_TRACE_FILE", "/nonexistent/x.json"));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("LLAMA_TRACE_FILE") && err.contains("/nonexistent/x.json"), "{err}");
}

// ---- A closed stdout or stderr is a normal end (exit 0), never a panic (101). ----

/// Runs `c` with stdout and stderr both a pipe whose reading end is already closed, as
/// `llama ... 2>&1 | head -c 0` does; stdin from `input`.
fn into_closed_pipe(c: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn every_command_ends_quietly_when_its_output_is_closed() {
    let model = llama_tests::model_path();
    let m = model.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, &[u8])> = vec![
        ("run", vec!["run", "-m", m, "-p", "Hello", "-n", "4", "--temp", "0"], b""),
        ("chat", vec!["chat", "-m", m, "-n", "4", "--temp", "0"], b"Hello\nAgain\n"),
        ("list", vec!["list"], b""),
        ("list --json", vec!["list", "--json"], b""),
        ("backends", vec!["backends"], b""),
        ("backends --json", vec!["backends", "--json"], b""),
        ("bench", vec!["bench", "-m", m, "-p", "8", "-n", "2", "-r", "1", "--concurrency", "0", "--no-prefix-test"], b""),
        ("bench --json", vec!["bench", "-m", m, "-p", "8", "-n", "2", "-r", "1", "--concurrency", "0", "--no-prefix-test", "--json"], b""),
    ];
    for (name, args, input) in cases {
        let o = into_closed_pipe(&mut cmd(&args), input);
        assert_eq!(o.status.code(), Some(0), "llama {name} into a closed pipe ended with {:?}", o.status);
    }
    // An error message into a closed stderr keeps its exit code.
    let o = into_closed_pipe(&mut cmd(&["run", "-m", "/nonexistent/never.gguf", "-p", "x"]), b"");
    assert_eq!(o.status.code(), Some(3), "{:?}", o.status);
}

#[test]
fn run_into_head_ends_with_exit_0() {
    // `llama run ... 2>&1 | head -c 5`: the reader goes away after a few bytes.
    use std::io::Read;
    let model = llama_tests::model_path();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let mut child = cmd(&["run", "-m", model.to_str().unwrap(), "-p", "Once upon a time", "-n", "48", "--temp", "0"])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut five = [0u8; 5];
    reader.read_exact(&mut five).unwrap();
    drop(reader);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// ---- Model names: file stem, unique prefix, and a helpful error. ----

/// A models directory holding the test model as `name` (a hard link, else a copy).
fn models_dir_with(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let dest = dir.path().join(name);
        if std::fs::hard_link(llama_tests::model_path(), &dest).is_err() {
            std::fs::copy(llama_tests::model_path(), &dest).unwrap();
        }
    }
    dir
}

#[test]
fn a_model_name_resolves_by_unique_prefix() {
    let dir = models_dir_with(&["gemma-3-270m-q4_k_m.gguf"]);
    let o = run(cmd(&["run", "gemma", "-p", "Hi", "-n", "1"]).env("LLAMA_MODELS_DIR", dir.path()));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    // The stem, exactly.
    let o = run(cmd(&["backends", "-m", "gemma-3-270m-q4_k_m"]).env("LLAMA_MODELS_DIR", dir.path()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn an_ambiguous_model_prefix_names_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["gemma-a.gguf", "gemma-b.gguf", "other.gguf"] {
        std::fs::write(dir.path().join(f), b"GGUF").unwrap();
    }
    let o = run(cmd(&["run", "gemma", "-p", "Hi"]).env("LLAMA_MODELS_DIR", dir.path()));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("gemma-a.gguf") && err.contains("gemma-b.gguf") && !err.contains("other.gguf"), "{err}");
    // An exact stem is never ambiguous.
    std::fs::write(dir.path().join("gemma.gguf"), b"GGUF").unwrap();
    let o = run(cmd(&["run", "gemma", "-p", "Hi"]).env("LLAMA_MODELS_DIR", dir.path()));
    assert!(stderr(&o).contains("gemma.gguf") && !stderr(&o).contains("gemma-a.gguf"), "{}", stderr(&o));
}

#[test]
fn an_unknown_model_suggests_llama_list() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(cmd(&["run", "nosuchmodel", "-p", "Hi"]).env("LLAMA_MODELS_DIR", dir.path()));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("llama list"), "{err}");
}

// ---- Every generation flag has a variable and a config key; bench and serve too. ----

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.toml");
    std::fs::write(&p, text).unwrap();
    let s = p.to_str().unwrap().to_string();
    (dir, s)
}

#[test]
fn llama_stop_is_read_from_the_environment() {
    let model = llama_tests::model_path();
    let m = model.to_str().unwrap();
    let args = ["run", "-m", m, "-p", "The capital of France is", "-n", "24", "--temp", "0"];
    let o = run(&mut cmd(&args));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let full = llama_tests::stdout(&o);
    // Stop at the second word of the greedy continuation.
    let word = full.split_whitespace().nth(1).expect("a few words").to_string();
    let o = run(cmd(&args).env("LLAMA_STOP", &word));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let cut = llama_tests::stdout(&o);
    assert!(!cut.contains(&word) && cut.len() < full.len(), "LLAMA_STOP={word:?}: {cut:?} (without: {full:?})");
    // A list: a JSON array.
    let o = run(cmd(&args).env("LLAMA_STOP", format!("[\"zzzz\", {word:?}]")));
    assert_eq!(llama_tests::stdout(&o), cut);
}

#[test]
fn llama_logit_bias_is_read_from_the_environment() {
    let o = run(cmd(&["run", "-m", "/nonexistent/never.gguf", "-p", "Hi"]).env("LLAMA_LOGIT_BIAS", "15043+1,nonsense"));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("LLAMA_LOGIT_BIAS") && err.contains("nonsense"), "{err}");
}

#[test]
fn logit_bias_is_accepted_in_the_config() {
    let model = llama_tests::model_path();
    let (_d, cfg) = config_file("[defaults]\nlogit-bias = [\"15043+1\", \"15044-inf\"]\n");
    let o = run(&mut cmd(&["--config", &cfg, "run", "-m", model.to_str().unwrap(), "-p", "Hi", "-n", "1"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_d, cfg) = config_file("[defaults]\n\nlogit-bias = [\"nope\"]\n");
    let o = run(&mut cmd(&["--config", &cfg, "run", "-m", model.to_str().unwrap(), "-p", "Hi", "-n", "1"]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 3") && err.contains("logit-bias"), "{err}");
}

#[test]
fn bench_honours_llama_threads_and_the_config() {
    let model = llama_tests::model_path();
    let bench = ["bench", "-m", model.to_str().unwrap(), "-p", "8", "-n", "2", "-r", "1", "--concurrency", "0", "--no-prefix-test", "--json"];
    let threads = |o: &Output| -> serde_json::Value {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
        serde_json::from_str::<serde_json::Value>(&llama_tests::stdout(o)).unwrap()["threads"].clone()
    };
    assert_eq!(threads(&run(cmd(&bench).env("LLAMA_THREADS", "1"))), 1);
    let (_d, cfg) = config_file("[defaults]\nthreads = 1\n");
    let mut args = vec!["--config", cfg.as_str()];
    args.extend_from_slice(&bench);
    assert_eq!(threads(&run(&mut cmd(&args))), 1);
}

#[test]
fn serve_honours_llama_threads() {
    let o = run(serve(&[]).env("LLAMA_THREADS", "0"));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("threads"), "{err}");
}

#[test]
fn serve_takes_llama_cpp_s_np() {
    let o = run(&mut serve(&["-np", "2"]));
    let (code, err) = outcome(&o);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert_eq!(code, Some(3), "{err}");
}

#[test]
fn run_reads_the_prompt_from_a_file() {
    let model = llama_tests::model_path();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prompt.txt");
    std::fs::write(&f, "The capital of France is").unwrap();
    let m = model.to_str().unwrap();
    let from_file = run(&mut cmd(&["run", "-m", m, "-f", f.to_str().unwrap(), "-n", "6", "--temp", "0"]));
    assert_eq!(from_file.status.code(), Some(0), "{}", stderr(&from_file));
    let from_flag = run(&mut cmd(&["run", "-m", m, "-p", "The capital of France is", "-n", "6", "--temp", "0"]));
    assert_eq!(llama_tests::stdout(&from_file), llama_tests::stdout(&from_flag));
    let o = run(&mut cmd(&["run", "-m", m, "--file", "/nonexistent/prompt.txt"]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/prompt.txt"), "{err}");
}

// ---- Chat templates given with --chat-template / LLAMA_CHAT_TEMPLATE. ----

fn chat_with(args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    use std::io::Write;
    let mut c = cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_missing_chat_template_file_is_a_bad_argument_named_as_a_file() {
    let model = llama_tests::model_path();
    let m = model.to_str().unwrap();
    for (args, env) in [
        (vec!["chat", "-m", m, "-n", "2", "--chat-template", "/nonexistent/t.jinja"], vec![]),
        (vec!["chat", "-m", m, "-n", "2"], vec![("LLAMA_CHAT_TEMPLATE", "/nonexistent/t.jinja")]),
    ] {
        let o = chat_with(&args, &env, "Hi\n");
        let (code, err) = outcome(&o);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("/nonexistent/t.jinja does not exist") && !err.contains("unknown built-in"), "{err}");
    }
}

#[test]
fn a_chat_template_that_never_ends_is_a_bad_argument() {
    let model = llama_tests::model_path();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("loop.jinja");
    std::fs::write(&f, "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}").unwrap();
    let o = chat_with(&["chat", "-m", model.to_str().unwrap(), "-n", "2", "--chat-template", f.to_str().unwrap()], &[], "Hi\n");
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("instructions"), "{err}");
}

/// A copy of the test model with a `tokenizer.chat_template` that does not compile. The
/// test model has none, so one is added as the first key/value; its size is a multiple of
/// the file's alignment, so the tensor data after it stays aligned where it was.
fn model_with_a_broken_template(dir: &std::path::Path) -> std::path::PathBuf {
    let source = llama_tests::model_path();
    let alignment = llama_host::gguf::read(&source).unwrap().alignment as usize;
    let bytes = std::fs::read(&source).unwrap();
    let key = b"tokenizer.chat_template";
    let mut text = b"{% for %}".to_vec();
    while (8 + key.len() + 4 + 8 + text.len()) % alignment != 0 {
        text.push(b' ');
    }
    let mut kv = Vec::new();
    kv.extend_from_slice(&(key.len() as u64).to_le_bytes());
    kv.extend_from_slice(key);
    kv.extend_from_slice(&8u32.to_le_bytes()); // a string
    kv.extend_from_slice(&(text.len() as u64).to_le_bytes());
    kv.extend_from_slice(&text);
    // magic, version (u32), tensor count (u64), key/value count (u64), then the key/values.
    let kv_count = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let mut out = Vec::with_capacity(bytes.len() + kv.len());
    out.extend_from_slice(&bytes[..16]);
    out.extend_from_slice(&(kv_count + 1).to_le_bytes());
    out.extend_from_slice(&kv);
    out.extend_from_slice(&bytes[24..]);
    let p = dir.join("broken-template.gguf");
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn a_model_whose_template_does_not_compile_still_chats() {
    let dir = tempfile::tempdir().unwrap();
    let broken = model_with_a_broken_template(dir.path());
    let b = broken.to_str().unwrap();
    // An explicit template does not need the model's own to compile.
    let o = chat_with(&["chat", "-m", b, "-n", "2", "--temp", "0", "--chat-template", "gemma"], &[], "Hi\n");
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    // Without one: the built-in template, and a warning that says why.
    let o = chat_with(&["chat", "-m", b, "-n", "2", "--temp", "0"], &[], "Hi\n");
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("does not compile") && err.contains("built-in 'gemma'"), "{err}");
    let o = run(&mut cmd(&["run", "-m", b, "--chat", "-p", "Hi", "-n", "2", "--temp", "0"]));
    let (code, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("does not compile"), "{err}");
}
