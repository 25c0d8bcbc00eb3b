//! Serving models: the engine that runs many requests on one context (continuous
//! batching, bounded admission, prefix reuse), the HTTP server in front of it (one module
//! per API dialect), Prometheus metrics, and the concurrency benchmark.
//!
//! The runtime itself (backends, models, sessions) is `llama-host`, which has no HTTP stack:
//! a library user who only generates text never compiles hyper or tokio.

pub mod bench;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod registry;
