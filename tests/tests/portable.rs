//! The host starts on any x86-64 CPU: under an emulated CPU without the native plugin's
//! instruction set (qemu-user, `-cpu Nehalem`: SSE4.2, no AVX), `llama` runs, and `llama
//! backends` refuses the plugin naming the features this CPU lacks, instead of dying with
//! SIGILL. qemu-user is installed by scripts/test; a missing one fails the test.

use std::process::Command;

use llama_tests::{llama_bin, stdout, stderr};

fn qemu(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new("qemu-x86_64")
        .args(["-cpu", "Nehalem"])
        .arg(llama_bin())
        .args(args)
        .env_remove("LLAMA_BACKEND_PATH")
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .output()
        .expect("qemu-x86_64 (Debian qemu-user) is installed by scripts/test")
}

#[test]
fn the_host_starts_on_a_cpu_without_avx() {
    let o = qemu(&["--version"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).starts_with("llama "), "{}", stdout(&o));
}

#[test]
fn a_native_plugin_is_refused_on_an_older_cpu_naming_the_features() {
    let o = qemu(&["backends"]);
    // 4: no usable backend. A SIGILL would have no exit code.
    assert_eq!(o.status.code(), Some(4), "stdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    let report = stdout(&o);
    let row = report.lines().find(|l| l.starts_with("libllama_backend_cpu")).unwrap_or_else(|| panic!("no plugin row in\n{report}"));
    assert!(row.contains("rejected") && row.contains("needs CPU features this CPU lacks"), "{row}");
    // This test machine's native build uses AVX2 at least; Nehalem has none of it.
    assert!(row.split_whitespace().any(|w| w == "avx2"), "{row}");
    assert!(!row.split_whitespace().any(|w| w == "sse4.2"), "Nehalem has SSE4.2: {row}");
    // The cpu row points at that refusal rather than at installing a plugin.
    let cpu = report.lines().find(|l| l.starts_with("cpu ")).unwrap_or_else(|| panic!("no cpu row in\n{report}"));
    assert!(cpu.contains("libllama_backend_cpu.so refused"), "{cpu}");
}
