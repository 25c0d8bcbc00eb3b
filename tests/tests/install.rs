//! The install story: `scripts/install` lays out `PREFIX/bin/llama` and the CPU plugin in
//! `PREFIX/lib/llama/backends`, and that binary finds its plugin from any directory; a `llama`
//! binary copied on its own fails with a message that says where plugins are looked for and
//! how to put one there.

use std::path::{Path, PathBuf};
use std::process::Command;

use llama_tests::{assert_exit, built_library, llama_bin, model_path, stderr, stdout};
use serde_json::Value;

fn cpu_plugin_name() -> String {
    format!("{}llama_backend_cpu.{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_EXTENSION)
}

/// A command isolated from this user's own plugins, probe cache and environment path, with
/// its per-user directories inside `scratch`.
fn isolated(program: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("LLAMA_BACKEND_PATH")
        .env_remove("LLAMA_LOG")
        .env_remove("LLAMA_PROBE_TIMEOUT")
        .env("XDG_DATA_HOME", scratch.join("data"))
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .current_dir(scratch);
    cmd
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

#[test]
fn scripts_install_lays_out_a_binary_that_selects_its_cpu_plugin() {
    // --no-build copies what target/release holds: fail with the build command when it is
    // missing, never run cargo from inside the tests.
    llama_bin();
    built_library("llama_backend_cpu");
    let scratch = tempfile::tempdir().unwrap();
    // A space in the prefix: the script quotes its paths.
    let prefix = scratch.path().join("my prefix");
    let o = isolated(&repo_root().join("scripts/install"), scratch.path()).arg("--no-build").arg(&prefix).output().expect("run scripts/install");
    assert_exit(&o, 0);
    let bin = prefix.join("bin").join("llama");
    let plugin = prefix.join("lib/llama/backends").join(cpu_plugin_name());
    assert!(bin.is_file(), "{} missing after install:\n{}", bin.display(), stderr(&o));
    assert!(plugin.is_file(), "{} missing after install:\n{}", plugin.display(), stderr(&o));
    // The script ends with the installed binary's own report.
    let report = stdout(&o);
    assert!(report.contains(&plugin.display().to_string()), "the report does not show the installed plugin:\n{report}");

    // The installed binary, run from elsewhere, selects the installed plugin.
    let o = isolated(&bin, scratch.path()).args(["backends", "--json"]).output().unwrap();
    assert_exit(&o, 0);
    let r: Value = serde_json::from_slice(&o.stdout).expect("backends --json is JSON");
    let selected: Vec<&Value> = r["candidates"].as_array().unwrap().iter().filter(|c| c["verdict"] == "selected").collect();
    assert_eq!(selected.len(), 1, "{r:#}");
    assert_eq!(selected[0]["name"], "cpu", "{r:#}");
    assert_eq!(selected[0]["path"], plugin.display().to_string(), "{r:#}");

    // And it generates.
    let o = isolated(&bin, scratch.path()).args(["run", "-m", model_path().to_str().unwrap(), "-p", "Hello", "-n", "2", "-t", "2"]).output().unwrap();
    assert_exit(&o, 0);
    assert!(!o.stdout.is_empty(), "no text:\n{}", stderr(&o));
}

#[test]
fn scripts_install_without_a_build_names_the_missing_file() {
    // An empty checkout's layout: the script beside no target/release.
    let scratch = tempfile::tempdir().unwrap();
    let fake_root = scratch.path().join("checkout");
    std::fs::create_dir_all(fake_root.join("scripts")).unwrap();
    std::fs::copy(repo_root().join("scripts/install"), fake_root.join("scripts/install")).unwrap();
    let prefix = scratch.path().join("prefix");
    let o = isolated(&fake_root.join("scripts/install"), scratch.path()).arg("--no-build").arg(&prefix).output().unwrap();
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("target/release/llama is missing") && err.contains("cargo build --release"), "{err}");
    assert!(!prefix.exists(), "a failed install left {}", prefix.display());
}

#[test]
fn a_binary_copied_alone_says_where_plugins_are_looked_for() {
    let scratch = tempfile::tempdir().unwrap();
    let alone = scratch.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let bin = alone.join("llama");
    std::fs::copy(llama_bin(), &bin).unwrap();
    let o = isolated(&bin, scratch.path()).args(["run", "-m", model_path().to_str().unwrap(), "-p", "Hello", "-n", "2"]).output().unwrap();
    // Exit 4: no usable backend.
    assert_exit(&o, 4);
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    let user_dir = scratch.path().join("data/llama/backends");
    for needle in [
        "no cpu backend plugin found".to_string(),
        // Where it looked: beside the binary, ../lib/llama/backends, the per-user directory.
        alone.display().to_string(),
        scratch.path().join("lib/llama/backends").display().to_string(),
        user_dir.display().to_string(),
        // What to do about it.
        "scripts/install".to_string(),
        format!("copy {} beside the llama binary", cpu_plugin_name()),
    ] {
        assert!(err.contains(&needle), "the message lacks {needle:?}:\n{err}");
    }
}
