//! The second benchmark reference: llama-bench's pp/tg procedure written directly against
//! llama-cpp-sys-2 (no plugin, no host), with the same llama.cpp build the CPU backend
//! links. Shows what the plugin boundary costs, if anything.
//!
//!     cargo run --release -p llama-tests --example raw_bench -- MODEL [N_PROMPT N_GEN THREADS REPS]

use std::time::Instant;

use llama_cpp_sys_2 as sys;

unsafe extern "C" fn quiet(_: sys::ggml_log_level, _: *const std::ffi::c_char, _: *mut std::ffi::c_void) {}

fn arg(args: &[String], i: usize, default: u32) -> u32 {
    args.get(i).map(|s| s.parse().expect("numeric argument")).unwrap_or(default)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model_path = std::ffi::CString::new(args.get(1).expect("usage: raw_bench MODEL [N_PROMPT N_GEN THREADS REPS]").as_str()).unwrap();
    let (n_prompt, n_gen, threads, reps) = (arg(&args, 2, 512), arg(&args, 3, 128), arg(&args, 4, 2) as i32, arg(&args, 5, 5));
    // SAFETY: straight-line use of llama.cpp's C API; every returned pointer is checked for
    // NULL and every buffer passed is a live Rust buffer of the stated length.
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let model = sys::llama_model_load_from_file(model_path.as_ptr(), sys::llama_model_default_params());
        assert!(!model.is_null());
        let vocab = sys::llama_model_get_vocab(model);
        let n_vocab = sys::llama_vocab_n_tokens(vocab);
        let bos = sys::llama_vocab_bos(vocab);
        let mut seed = 42u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % n_vocab as u64) as i32
        };
        let ctx_for = |n_ctx: u32| {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = n_ctx;
            cp.n_batch = 2048.min(n_ctx);
            cp.n_ubatch = 512.min(cp.n_batch);
            cp.n_threads = threads;
            cp.n_threads_batch = threads;
            let ctx = sys::llama_init_from_model(model, cp);
            assert!(!ctx.is_null());
            ctx
        };
        if n_prompt > 0 {
            let ctx = ctx_for(n_prompt);
            let mut tokens: Vec<i32> = (0..n_prompt).map(|_| rnd()).collect();
            tokens[0] = bos;
            let n_batch = sys::llama_n_batch(ctx) as usize;
            let pp = |tokens: &mut Vec<i32>| {
                for chunk in tokens.chunks_mut(n_batch) {
                    assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(chunk.as_mut_ptr(), chunk.len() as i32)), 0);
                }
                sys::llama_synchronize(ctx);
            };
            pp(&mut tokens);
            let mut samples = Vec::new();
            for _ in 0..reps {
                sys::llama_memory_clear(sys::llama_get_memory(ctx), false);
                let t = Instant::now();
                pp(&mut tokens);
                samples.push(n_prompt as f64 / t.elapsed().as_secs_f64());
            }
            let (m, sd) = mean_sd(&samples);
            println!("raw pp{n_prompt}: {m:.2} ± {sd:.2} t/s");
            sys::llama_free(ctx);
        }
        if n_gen > 0 {
            let ctx = ctx_for(n_gen);
            let mut tok = bos;
            assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(&mut tok, 1)), 0);
            let mut samples = Vec::new();
            for _ in 0..reps {
                sys::llama_memory_clear(sys::llama_get_memory(ctx), false);
                let mut tok = bos;
                let t = Instant::now();
                for _ in 0..n_gen {
                    assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(&mut tok, 1)), 0);
                    sys::llama_synchronize(ctx);
                    tok = rnd();
                }
                samples.push(n_gen as f64 / t.elapsed().as_secs_f64());
            }
            let (m, sd) = mean_sd(&samples);
            println!("raw tg{n_gen}: {m:.2} ± {sd:.2} t/s");
            sys::llama_free(ctx);
        }
        sys::llama_model_free(model);
    }
}
