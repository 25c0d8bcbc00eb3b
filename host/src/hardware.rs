//! What the host can tell about the hardware without loading any backend: CPU features
//! (checked before a plugin's code runs, since code built for a missing feature dies with
//! SIGILL) and whether a GPU driver is present at all.

/// Whether this CPU has `feature` (named as in Rust's `target_feature`). `None` when the
/// name is unknown to this host: such a plugin is refused, never run blind.
pub fn cpu_has(feature: &str) -> Option<bool> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse4.2" => has!("sse4.2"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "bmi2" => has!("bmi2"),
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512vl" => has!("avx512vl"),
            "avx512dq" => has!("avx512dq"),
            "avx512cd" => has!("avx512cd"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512bf16" => has!("avx512bf16"),
            "avxvnni" => has!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        Some(match feature {
            "neon" => has!("neon"),
            "dotprod" => has!("dotprod"),
            "i8mm" => has!("i8mm"),
            "sve" => has!("sve"),
            _ => return None,
        })
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        None
    }
}

/// The required features this CPU lacks (unknown names count as missing).
pub fn missing_cpu_features<'a>(required: impl IntoIterator<Item = &'a str>, has: impl Fn(&str) -> Option<bool>) -> Vec<String> {
    required.into_iter().filter(|f| has(f) != Some(true)).map(str::to_string).collect()
}

/// Whether an NVIDIA driver can be opened, with the reason when not. Cheap when absent
/// (one failed dlopen); the CUDA plugin's own probe says more.
pub fn cuda_driver() -> Result<(), String> {
    let lib = if cfg!(windows) { "nvcuda.dll" } else { "libcuda.so.1" };
    // SAFETY: opening the NVIDIA driver library runs its initialisers, which the driver
    // supports; we only test that it loads and drop it at once.
    match unsafe { libloading::Library::new(lib) } {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{lib} not found (no NVIDIA driver)")),
    }
}

/// Whether Metal can exist on this platform.
pub fn metal_platform() -> Result<(), String> {
    if cfg!(target_os = "macos") {
        Ok(())
    } else {
        Err(format!("Metal needs macOS (this is {})", std::env::consts::OS))
    }
}

/// The host-side reason an accelerator cannot be used here, before any plugin is loaded.
pub fn accelerator_unavailable(acc: llama_plugin_api::Accelerator) -> Option<String> {
    use llama_plugin_api::Accelerator;
    match acc {
        Accelerator::Cpu => None,
        Accelerator::Cuda => cuda_driver().err(),
        Accelerator::Metal => metal_platform().err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(have: &'static [&'static str]) -> impl Fn(&str) -> Option<bool> {
        move |f| match f {
            "avx2" | "fma" | "avx512f" | "f16c" => Some(have.contains(&f)),
            _ => None,
        }
    }

    #[test]
    fn missing_features_are_listed_in_order() {
        let has = fake(&["avx2", "fma"]);
        assert_eq!(missing_cpu_features(["avx2", "avx512f", "fma", "f16c"], &has), vec!["avx512f", "f16c"]);
        assert!(missing_cpu_features(["avx2", "fma"], &has).is_empty());
    }

    #[test]
    fn unknown_features_count_as_missing() {
        assert_eq!(missing_cpu_features(["amx-tile"], fake(&[])), vec!["amx-tile"]);
    }

    #[test]
    fn this_cpu_reports_known_features() {
        #[cfg(target_arch = "x86_64")]
        assert!(cpu_has("sse4.2").is_some());
        assert_eq!(cpu_has("no-such-feature"), None);
    }
}
