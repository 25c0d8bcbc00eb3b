//! The CUDA backend plugin: exports the root module for a CUDA build of llama.cpp.
//! Usable only when ggml finds a CUDA GPU; its probe says which and how much memory.

use llama_plugin_api::Accelerator;

/// A usable GPU outranks the CPU backend (score 10).
const SCORE: u32 = 100;

llama_backend_core::declare_backend!("cuda", Accelerator::Cuda, || llama_backend_core::probe_gpu("CUDA", SCORE));
