//! KV cache types and flash attention (`-ctk`, `-ctv`, `-fa`) end to end: the real binary,
//! the real CPU plugin, the real model. A quantized cache generates; a quantized V cache
//! without flash attention is refused before anything loads; the `backends -m` estimate
//! shrinks with the cache type.

use std::sync::Arc;

use llama_host::{CacheType, FlashAttn, KvCacheParams, SessionError};
use llama_serve::engine::{Engine, EngineConfig, StartError};
use llama_tests::{assert_exit, llama, model_path, session_params, shared_model, stderr, stdout};

#[test]
fn a_q8_0_cache_with_flash_attention_generates() {
    let m = model_path();
    let o = llama(&["run", "-vv", "-m", m.to_str().unwrap(), "-p", "The capital of France is", "-n", "8", "--temp", "0", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("generated 8 tokens"), "{err}");
    // llama.cpp's own account of the cache it made: the types reached it.
    assert!(err.contains("K (q8_0)") && err.contains("V (q8_0)"), "{err}");
    assert!(err.contains("flash_attn            = enabled"), "{err}");
    assert!(!stdout(&o).trim().is_empty());
}

/// The long names, through the environment (flag > environment > config > default).
#[test]
fn cache_types_come_from_the_long_flags_and_the_environment() {
    let m = model_path();
    let o = llama_tests::llama_cmd(&["run", "-vv", "-m", m.to_str().unwrap(), "-p", "Hi", "-n", "2", "--temp", "0", "--cache-type-k", "q4_0"])
        .env("LLAMA_CACHE_TYPE_V", "q4_0")
        .env("LLAMA_FLASH_ATTN", "auto")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("generated 2 tokens") && err.contains("K (q4_0)") && err.contains("V (q4_0)"), "{err}");
}

#[test]
fn a_quantized_v_cache_without_flash_attention_is_refused_before_loading() {
    let m = model_path();
    let o = llama(&["run", "-vv", "-m", m.to_str().unwrap(), "-p", "Hi", "-n", "8", "-ctv", "q4_0", "-fa", "off"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("--cache-type-v") && err.contains("q4_0") && err.contains("--flash-attn"), "{err}");
    // Nothing loaded: no backend was even selected (that is where -v's report comes from),
    // and llama.cpp said nothing.
    assert!(!err.contains("llama_model_load") && !err.contains("backends") && !err.contains("llama_context"), "{err}");
    // Checked before the model is looked for: a missing file is still the bad argument (2), not 3.
    let o = llama(&["run", "-m", "/nonexistent/never.gguf", "-p", "Hi", "-ctv", "q8_0", "--flash-attn", "off"]);
    assert_exit(&o, 2);
    // The same for `serve` (before it binds) and `bench`.
    let o = llama(&["serve", "-m", "/nonexistent/never.gguf", "--port", "0", "-ctv", "q4_0", "-fa", "off"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--cache-type-v"), "{}", stderr(&o));
    let o = llama(&["bench", "-m", "/nonexistent/never.gguf", "-ctv", "q4_0", "-fa", "off"]);
    assert_exit(&o, 2);
    // A quantized K cache alone needs no flash attention (as in llama.cpp).
    let o = llama(&["run", "-m", m.to_str().unwrap(), "-p", "Hi", "-n", "2", "--temp", "0", "-ctk", "q8_0", "-fa", "off"]);
    assert_exit(&o, 0);
}

#[test]
fn an_unknown_cache_type_is_a_usage_error_listing_the_types() {
    let o = llama(&["run", "-p", "Hi", "--cache-type-k", "bogus"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("bogus") && err.contains("--cache-type-k") && err.contains("f16, q8_0, q4_0"), "{err}");
    let o = llama(&["run", "-p", "Hi", "-fa", "sometimes"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("on, off, auto"), "{}", stderr(&o));
}

/// The config file's keys, with the flag winning over them.
#[test]
fn cache_types_in_the_config_apply_and_bad_ones_are_named() {
    let m = model_path();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[defaults]\ncache-type-k = \"q8_0\"\ncache-type-v = \"q8_0\"\nflash-attn = \"off\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    // q8_0 V with flash-attn off from the config: refused, naming the flags.
    let o = llama(&["--config", c, "run", "-m", m.to_str().unwrap(), "-p", "Hi", "-n", "2"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--cache-type-v") && stderr(&o).contains("--flash-attn"), "{}", stderr(&o));
    // The flag beats the config.
    let o = llama(&["--config", c, "run", "-vv", "-m", m.to_str().unwrap(), "-p", "Hi", "-n", "2", "--temp", "0", "-fa", "on"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("K (q8_0)") && stderr(&o).contains("V (q8_0)"), "{}", stderr(&o));
    std::fs::write(&cfg, "[defaults]\ncache-type-k = \"q2_k\"\n").unwrap();
    let o = llama(&["--config", c, "run", "-m", m.to_str().unwrap(), "-p", "Hi"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("cache-type-k") && stderr(&o).contains("q8_0"), "{}", stderr(&o));
}

fn kv_cache_bytes(extra: &[&str]) -> u64 {
    let m = model_path();
    let mut args = vec!["backends", "--json", "-m", m.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = llama(&args);
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("backends --json is JSON");
    r["model"]["kv_cache_bytes"].as_u64().unwrap_or_else(|| panic!("no kv_cache_bytes: {:#}", r["model"]))
}

/// `llama backends -m MODEL -ctk q8_0 -ctv q8_0`: the estimate's KV cache about halves.
#[test]
fn the_backends_estimate_shrinks_with_a_quantized_cache() {
    let f16 = kv_cache_bytes(&[]);
    let q8 = kv_cache_bytes(&["-ctk", "q8_0", "-ctv", "q8_0"]);
    let q4 = kv_cache_bytes(&["--cache-type-k", "q4_0", "--cache-type-v", "q4_0"]);
    let ratio = q8 as f64 / f16 as f64;
    assert!((0.45..0.6).contains(&ratio), "q8_0 {q8} vs f16 {f16}: {ratio}");
    assert!(q4 < q8, "q4_0 {q4} vs q8_0 {q8}");
    let m = model_path();
    let o = llama(&["backends", "-m", m.to_str().unwrap(), "-ctk", "q8_0", "-ctv", "q8_0"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains(&format!("KV cache: {q8} bytes")) && stdout(&o).contains("K q8_0 and V q8_0"), "{}", stdout(&o));
    // The estimate refuses what a run would.
    let o = llama(&["backends", "-m", m.to_str().unwrap(), "-ctv", "q4_0", "-fa", "off"]);
    assert_exit(&o, 2);
}

/// The library: a session and an engine take the cache types, and refuse a quantized V
/// cache without flash attention with a typed error naming it, before the backend sees it.
#[test]
fn sessions_and_engines_take_the_cache_types() {
    let model = shared_model();
    let q8 = KvCacheParams { type_k: CacheType::Q8_0, type_v: CacheType::Q8_0, flash_attn: FlashAttn::On };
    let mut s = model.session(&llama_host::SessionParams { cache: q8, ..session_params(512) }).unwrap();
    let opts = llama_host::GenerateOptions {
        max_tokens: Some(4),
        sampling: llama_host::SamplingParams { temperature: 0.0, ..Default::default() },
        ..Default::default()
    };
    let stats = s.generate("The capital of France is", &opts, |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(stats.generated_tokens, 4);

    let bad = KvCacheParams { type_v: CacheType::Q4_0, flash_attn: FlashAttn::Off, ..KvCacheParams::default() };
    match model.session(&llama_host::SessionParams { cache: bad, ..session_params(512) }) {
        Err(SessionError::InvalidParam { field, reason }) => assert!(field == "cache-type-v" && reason.contains("flash-attn"), "{field}: {reason}"),
        Err(e) => panic!("not a parameter error: {e}"),
        Ok(_) => panic!("a q4_0 V cache without flash attention was accepted"),
    }

    let size = llama_host::ContextSize { n_ctx: 1024, n_threads: 2, n_threads_batch: 2, ..Default::default() };
    let config = EngineConfig { slots: 2, size, cache: bad, ..EngineConfig::default() };
    match Engine::start(Arc::clone(model), config) {
        Err(StartError::InvalidConfig { field, .. }) => assert_eq!(field, "cache-type-v"),
        Err(e) => panic!("not a config error: {e}"),
        Ok(_) => panic!("the engine started with a q4_0 V cache and flash attention off"),
    }
    let engine = Engine::start(Arc::clone(model), EngineConfig { slots: 2, size, cache: q8, ..EngineConfig::default() }).unwrap();
    let h = engine.submit(llama_serve::engine::Request { prompt: "Once upon a time".into(), opts, deadline: None }).unwrap();
    assert_eq!(h.collect().1.generated_tokens, 4);
}
