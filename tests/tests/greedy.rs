//! `llama run --temp 0` is deterministic and equals a plain llama.cpp greedy decode loop
//! over the same model and prompt.

use llama_cpp_sys_2 as sys;
use llama_tests::{assert_exit, llama, model_path, stdout};

const PROMPT: &str = "The capital of France is";
const N: usize = 32;

/// The reference: llama.cpp's C API directly, no plugin, no host. Greedy sampling, the
/// prompt tokenized with special tokens, decoding one token at a time.
fn plain_llama_cpp_greedy(model_path: &std::path::Path, prompt: &str, n: usize) -> String {
    unsafe extern "C" fn quiet(_: sys::ggml_log_level, _: *const std::ffi::c_char, _: *mut std::ffi::c_void) {}
    let path = std::ffi::CString::new(model_path.to_str().unwrap()).unwrap();
    let mut out = Vec::new();
    // SAFETY: a straight-line use of llama.cpp's C API: every pointer passed is either
    // returned by llama.cpp and checked for NULL, or a live Rust buffer of the stated size.
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let model = sys::llama_model_load_from_file(path.as_ptr(), sys::llama_model_default_params());
        assert!(!model.is_null(), "reference: model failed to load");
        let vocab = sys::llama_model_get_vocab(model);
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = 4096;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null(), "reference: context failed");
        let mut tokens = vec![0i32; prompt.len() + 8];
        let n_tok = sys::llama_tokenize(vocab, prompt.as_ptr().cast(), prompt.len() as i32, tokens.as_mut_ptr(), tokens.len() as i32, true, true);
        assert!(n_tok > 0);
        tokens.truncate(n_tok as usize);
        let sampler = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
        sys::llama_sampler_chain_add(sampler, sys::llama_sampler_init_greedy());
        assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(tokens.as_mut_ptr(), tokens.len() as i32)), 0);
        for _ in 0..n {
            let mut tok = sys::llama_sampler_sample(sampler, ctx, -1);
            if sys::llama_vocab_is_eog(vocab, tok) {
                break;
            }
            let mut buf = [0u8; 256];
            let len = sys::llama_token_to_piece(vocab, tok, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false);
            assert!(len >= 0);
            out.extend_from_slice(&buf[..len as usize]);
            assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(&mut tok, 1)), 0);
        }
        sys::llama_sampler_free(sampler);
        sys::llama_free(ctx);
        sys::llama_model_free(model);
    }
    String::from_utf8(out).expect("reference output is UTF-8")
}

fn llama_greedy(threads: &str) -> String {
    let model = model_path();
    let o = llama(&["run", "-m", model.to_str().unwrap(), "-p", PROMPT, "-n", "32", "--temp", "0", "-t", threads]);
    assert_exit(&o, 0);
    stdout(&o)
}

#[test]
fn greedy_run_is_identical_across_runs() {
    let a = llama_greedy("2");
    let b = llama_greedy("2");
    assert!(!a.trim().is_empty(), "no text generated");
    assert_eq!(a, b);
}

#[test]
fn greedy_run_equals_a_plain_llama_cpp_loop() {
    let ours = llama_greedy("2");
    let reference = plain_llama_cpp_greedy(&model_path(), PROMPT, N);
    // `llama run` ends its output with one newline.
    assert_eq!(ours.strip_suffix('\n').unwrap_or(&ours), reference);
    assert!(!reference.trim().is_empty(), "the reference generated nothing");
}

#[test]
fn the_stats_line_goes_to_stderr() {
    let model = model_path();
    let o = llama(&["run", "-m", model.to_str().unwrap(), "-p", PROMPT, "-n", "4", "--temp", "0"]);
    assert_exit(&o, 0);
    let err = llama_tests::stderr(&o);
    assert!(err.contains("prompt") && err.contains("tokens/s") && err.contains("backend cpu"), "stderr: {err}");
    assert!(!stdout(&o).contains("tokens/s"));
}
