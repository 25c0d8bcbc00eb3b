//! The Metal backend plugin: exports the root module for a Metal build of llama.cpp.
//! Usable only when ggml finds a Metal GPU; its probe says which and how much memory.

use llama_plugin_api::Accelerator;

/// A usable GPU outranks the CPU backend (score 10).
const SCORE: u32 = 90;

llama_backend_core::declare_backend!("metal", Accelerator::Metal, || llama_backend_core::probe_gpu("Metal", SCORE));
