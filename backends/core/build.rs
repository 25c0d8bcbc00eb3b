//! Records which CPU features the C compiler enables for llama.cpp in this build.
//!
//! The Rust code of the workspace is built for the x86-64 baseline (so the host starts on any
//! CPU), but llama.cpp is compiled with the C flags of `.cargo/config.toml` (`-march=native`)
//! or of scripts/build-cpu-variants. What a plugin needs is what its C compiler was allowed
//! to use: ask the same compiler, with the same flags, which instruction-set macros it
//! defines, add the Rust code's own target features, and hand the list to
//! `compiled_cpu_features()` and the ELF note the host reads without opening the library.

use std::process::Command;

/// Compiler macro → the feature name the host checks (Rust's `target_feature` names).
const X86_MACROS: &[(&str, &str)] = &[
    ("__SSSE3__", "ssse3"),
    ("__SSE4_1__", "sse4.1"),
    ("__SSE4_2__", "sse4.2"),
    ("__POPCNT__", "popcnt"),
    ("__AVX__", "avx"),
    ("__AVX2__", "avx2"),
    ("__FMA__", "fma"),
    ("__F16C__", "f16c"),
    ("__BMI__", "bmi1"),
    ("__BMI2__", "bmi2"),
    ("__LZCNT__", "lzcnt"),
    ("__MOVBE__", "movbe"),
    ("__AVX512F__", "avx512f"),
    ("__AVX512BW__", "avx512bw"),
    ("__AVX512VL__", "avx512vl"),
    ("__AVX512DQ__", "avx512dq"),
    ("__AVX512CD__", "avx512cd"),
    ("__AVX512VNNI__", "avx512vnni"),
    ("__AVX512VBMI__", "avx512vbmi"),
    ("__AVX512BF16__", "avx512bf16"),
    ("__AVXVNNI__", "avxvnni"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    for var in ["CFLAGS", "CC", &format!("CFLAGS_{}", target.replace('-', "_")), &format!("CC_{}", target.replace('-', "_"))] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut features: Vec<&str> = Vec::new();
    // The Rust side's target features (a variant built with `-C target-cpu=LEVEL`).
    let rust: Vec<String> = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default().split(',').map(str::to_string).collect();
    if arch == "x86_64" || arch == "x86" {
        let macros = compiler_macros().unwrap_or_else(|e| panic!("cannot ask the C compiler for its CPU features: {e}"));
        for (mac, name) in X86_MACROS {
            let in_c = macros.lines().any(|l| l.split_whitespace().nth(1) == Some(mac));
            if in_c || rust.iter().any(|r| r == name) {
                features.push(name);
            }
        }
    }
    if arch == "aarch64" {
        for name in ["neon", "dotprod", "i8mm", "sve"] {
            if rust.iter().any(|r| r == name) {
                features.push(name);
            }
        }
    }
    println!("cargo:rustc-env=LLAMA_CPU_FEATURES={}", features.join(","));

    // The try/catch wrappers around llama.cpp's grammar calls (src/grammar_shim.cpp says why).
    println!("cargo:rerun-if-changed=src/grammar_shim.cpp");
    cc::Build::new().cpp(true).std("c++17").file("src/grammar_shim.cpp").compile("llama_rs_grammar_shim");
}

/// `cc -dM -E` over an empty file with the flags llama.cpp's build gets from the
/// environment (the cc crate reads `CFLAGS_<target>`/`CFLAGS`, as llama-cpp-sys-2's does).
fn compiler_macros() -> Result<String, String> {
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-dM", "-E", "-x", "c", "-"]);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd)?;
    Ok(out)
}

fn run(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
