//! The CUDA backend plugin: exports the root module for a CUDA build of llama.cpp.
//! Usable only when ggml finds a CUDA GPU; its probe says which and how much memory.

use llama_backend_core as core;
use llama_plugin_api::abi_stable::export_root_module;
use llama_plugin_api::abi_stable::prefix_type::PrefixTypeTrait;
use llama_plugin_api::abi_stable::std_types::RResult;
use llama_plugin_api::{Accelerator, BackendBox, BackendError, BackendInfo, BackendMod, BackendModRef, LogSink, ProbeReport};

/// A usable GPU outranks the CPU backend (score 10).
const SCORE: u32 = 100;

extern "C" fn info() -> BackendInfo {
    core::backend_info("cuda", Accelerator::Cuda)
}

extern "C" fn probe() -> ProbeReport {
    core::probe_gpu("CUDA", SCORE)
}

extern "C" fn init(sink: LogSink) -> RResult<BackendBox, BackendError> {
    core::init(sink, info())
}

#[export_root_module]
pub fn get_library() -> BackendModRef {
    BackendMod { required_cpu_features: core::compiled_cpu_features(), info, probe, init }.leak_into_prefix()
}
