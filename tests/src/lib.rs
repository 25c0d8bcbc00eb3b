//! Helpers shared by the integration tests: where the built binary, plugins, fixtures and
//! the model are. The tests need `cargo build --release --workspace` first (scripts/test
//! does it), and the models (`scripts/fetch-model all`); a missing model fails, never skips.

pub mod server;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use llama_host::{BackendChoice, Backends, ContextSize, DiscoveryOptions, Model, ModelParams, SessionParams};

/// `target/release` (or whichever profile directory the test binary runs from).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_path_buf()
}

/// The built `llama` binary.
pub fn llama_bin() -> PathBuf {
    let bin = target_dir().join(format!("llama{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: run `cargo build --release --workspace` first (scripts/test does)", bin.display());
    bin
}

/// A shared library built by the workspace (`name` without prefix/extension).
pub fn built_library(name: &str) -> PathBuf {
    let file = format!("{}{name}.{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_EXTENSION);
    let p = target_dir().join(file);
    assert!(p.is_file(), "{} is missing: run `cargo build --release --workspace` first", p.display());
    p
}

/// The test model: $LLAMA_TEST_MODEL, else the default model installed by scripts/fetch-model.
pub fn model_path() -> PathBuf {
    let p = match std::env::var_os("LLAMA_TEST_MODEL").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => models_dir().join("gemma-3-270m-q4_k_m.gguf"),
    };
    assert!(p.is_file(), "the test model {} is missing: run scripts/fetch-model", p.display());
    p
}

/// File name `scripts/fetch-model smollm2` installs in the models directory.
pub const SMOLLM2_MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";

/// The second test model, SmolLM2 135M Instruct Q4_1 (a llama-architecture model with a
/// ChatML template, next to the default Gemma 3): for tests that need two different models.
/// Missing, it fails the test with the command that fetches it, never skips.
pub fn smollm2_model_path() -> PathBuf {
    let p = models_dir().join(SMOLLM2_MODEL_FILE);
    assert!(p.is_file(), "the test model {} is missing: run `scripts/fetch-model smollm2` (or `scripts/fetch-model all`)", p.display());
    p
}

/// Where scripts/fetch-model installs models: $LLAMA_MODELS_DIR, else
/// ${XDG_DATA_HOME:-~/.local/share}/llama/models (the script's own rule).
pub fn models_dir() -> PathBuf {
    std::env::var_os("LLAMA_MODELS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()).map(|d| PathBuf::from(d).join("llama/models")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share/llama/models"))
}

/// Runs `llama` with `args`, isolated from the user's own backends directory.
pub fn llama(args: &[&str]) -> Output {
    llama_cmd(args).output().expect("run llama")
}

/// The `llama` command with an isolated environment (no per-user plugins, no env path).
pub fn llama_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(llama_bin());
    cmd.args(args)
        .env_remove("LLAMA_BACKEND_PATH")
        .env_remove("LLAMA_LOG")
        .env_remove("LLAMA_PROBE_TIMEOUT")
        .env("XDG_DATA_HOME", empty_data_home())
        // The probe cache of the tests' own, beside the build output.
        .env("XDG_CACHE_HOME", llama_bin().parent().expect("binary has a directory").join("llama-tests-cache"));
    cmd
}

/// An empty per-user data directory, so a developer's installed plugins don't leak in.
/// One fixed directory beside the build output: it is only ever read, so test processes can
/// share it, and nothing is left behind in the system temp directory.
fn empty_data_home() -> PathBuf {
    let d = llama_bin().parent().expect("binary has a directory").join("llama-tests-empty-data");
    std::fs::create_dir_all(&d).expect("create empty data dir");
    d
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Panics with the output when the process did not exit with `code`, or died by a signal.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The real model loaded in-process through the real CPU plugin from `target/release`,
/// once per test binary (loading is the expensive part).
pub fn model() -> &'static Model {
    shared_model()
}

/// The same model as an `Arc`, for an engine.
pub fn shared_model() -> &'static Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        // As the executable's directory: only `libllama_backend_*` files are candidates there,
        // not the misbehaving fixture libraries beside them (probed in-process here).
        let opts = DiscoveryOptions { backend_dirs: Vec::new(), env_path: None, exe: Some(llama_bin()), user_dir: None, isolation: None };
        let mut backends = Backends::discover(&opts);
        let backend = backends.select(BackendChoice::Named("cpu".into())).expect("the CPU plugin in target/release");
        Arc::new(Model::load(&backend, model_path(), &ModelParams::default()).expect("the test model loads"))
    })
}

/// Resident memory of this process in KiB (Linux /proc).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Session parameters for tests: 2 threads, the given context.
pub fn session_params(n_ctx: u32) -> SessionParams {
    SessionParams { size: ContextSize { n_ctx, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, ..SessionParams::default() }
}

/// The private Python folder with the official `openai` client and `jsonschema`, installed
/// (once, from PyPI, pinned) by the project's own `scripts/fetch-clients`: for PYTHONPATH.
pub fn python_clients_path() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let out = Command::new(root.join("scripts/fetch-clients")).output().expect("run scripts/fetch-clients");
    assert!(out.status.success(), "scripts/fetch-clients failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a Python client script of tests/clients against a server at `base`, with the
/// private `openai`/`jsonschema` folder on PYTHONPATH; fails the test unless the script
/// succeeds and ends with "ok". Returns what it printed.
pub fn run_python_client(script: &str, base: &str) -> String {
    run_python_client_with(script, &[base])
}

/// [`run_python_client`] with the script's arguments given whole (a base URL and an API
/// key, say).
pub fn run_python_client_with(script: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let o = Command::new("python3").arg(root.join("tests/clients").join(script)).args(args).env("PYTHONPATH", python_clients_path()).output().expect("run python3");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{stdout}");
    assert!(o.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    stdout
}
