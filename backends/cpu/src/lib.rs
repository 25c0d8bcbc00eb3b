//! The CPU backend plugin: exports the root module for a CPU build of llama.cpp.
//! Thin on purpose; everything else lives in llama-backend-core.

use llama_backend_core as core;
use llama_plugin_api::abi_stable::std_types::RString;
use llama_plugin_api::{Accelerator, ProbeReport};

/// Base score of a usable CPU backend: any usable accelerator outranks it (the highest CPU
/// score is 10 + 21 features).
const CPU_SCORE: u32 = 10;

/// A CPU build's score: the base plus one per CPU feature it was compiled for, so among the
/// variants this CPU can run (the host refuses the others before running any of their
/// code), the most capable one wins.
fn cpu_score() -> u32 {
    CPU_SCORE + core::compiled_cpu_feature_count() as u32
}

fn probe_cpu() -> ProbeReport {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let simd = core::system_info();
    ProbeReport {
        usable: true,
        score: cpu_score(),
        reason: RString::from(format!("{threads} hardware threads; llama.cpp CPU features: {simd}")),
        devices: core::devices(&[core::DEVICE_CPU]),
    }
}

core::declare_backend!("cpu", Accelerator::Cpu, probe_cpu);
