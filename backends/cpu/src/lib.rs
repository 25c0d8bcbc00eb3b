//! The CPU backend plugin: exports the root module for a CPU build of llama.cpp.
//! Thin on purpose; everything else lives in llama-backend-core.

use llama_backend_core as core;
use llama_plugin_api::abi_stable::export_root_module;
use llama_plugin_api::abi_stable::prefix_type::PrefixTypeTrait;
use llama_plugin_api::abi_stable::std_types::{RResult, RString};
use llama_plugin_api::{Accelerator, BackendBox, BackendError, BackendInfo, BackendMod, BackendModRef, LogSink, ProbeReport};

/// Score of a usable CPU backend: any usable accelerator outranks it.
const CPU_SCORE: u32 = 10;

extern "C" fn info() -> BackendInfo {
    core::backend_info("cpu", Accelerator::Cpu)
}

extern "C" fn probe() -> ProbeReport {
    core::guard_probe(probe_cpu)
}

fn probe_cpu() -> ProbeReport {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let simd = core::system_info();
    ProbeReport {
        usable: true,
        score: CPU_SCORE,
        reason: RString::from(format!("{threads} hardware threads; llama.cpp CPU features: {simd}")),
        devices: core::devices(&[core::DEVICE_CPU]),
    }
}

extern "C" fn init(sink: LogSink) -> RResult<BackendBox, BackendError> {
    core::init(sink, info())
}

#[export_root_module]
pub fn get_library() -> BackendModRef {
    BackendMod { required_cpu_features: core::compiled_cpu_features(), info, probe, init }.leak_into_prefix()
}
