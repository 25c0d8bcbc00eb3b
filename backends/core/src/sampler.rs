//! A llama.cpp sampler chain built from `SamplingParams`, in llama.cpp's default order:
//! penalties → top-k → top-p → min-p → temperature → random draw (or greedy at temp 0).

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;
use crate::invalid;
use llama_plugin_api::{BackendError, SamplingParams};

pub(crate) struct Sampler {
    raw: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain is plain heap state with no thread affinity; the context that
// owns it is used by one thread at a time.
unsafe impl Send for Sampler {}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain owns the samplers added to it; freed exactly once.
        unsafe { sys::llama_sampler_free(self.raw.as_ptr()) }
    }
}

impl Sampler {
    pub(crate) fn new(p: &SamplingParams, n_vocab: i32, n_ctx: u32) -> Result<Sampler, BackendError> {
        p.validate()?;
        if let Some(b) = p.logit_bias.iter().find(|b| b.token < 0 || b.token >= n_vocab) {
            return Err(invalid("logit_bias", format!("token {} is not in the vocabulary of {n_vocab}", b.token)));
        }
        // SAFETY: plain constructors; each returned sampler is handed to the chain, which
        // takes ownership (llama_sampler_chain_add).
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let raw = NonNull::new(chain).ok_or_else(|| invalid("sampler", "llama.cpp returned no sampler chain"))?;
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
            if !p.logit_bias.is_empty() {
                // `LogitBias` is #[repr(C)] {i32, f32}, the layout of llama_logit_bias.
                add(sys::llama_sampler_init_logit_bias(
                    n_vocab,
                    p.logit_bias.len() as i32,
                    p.logit_bias.as_ptr().cast::<sys::llama_logit_bias>(),
                ));
            }
            let last_n = if p.repeat_last_n == -1 { n_ctx as i32 } else { p.repeat_last_n };
            if last_n != 0 && (p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) {
                add(sys::llama_sampler_init_penalties(
                    n_vocab,
                    last_n,
                    p.repeat_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                ));
            }
            if p.temperature <= 0.0 {
                add(sys::llama_sampler_init_greedy());
            } else {
                if p.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(p.top_k.min(n_vocab)));
                }
                if p.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(p.top_p, 1));
                }
                if p.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(p.min_p, 1));
                }
                add(sys::llama_sampler_init_temp(p.temperature));
                add(sys::llama_sampler_init_dist(p.seed));
            }
            Ok(Sampler { raw })
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_sampler {
        self.raw.as_ptr()
    }

    pub(crate) fn reset(&mut self) {
        // SAFETY: valid chain owned by self.
        unsafe { sys::llama_sampler_reset(self.raw.as_ptr()) }
    }

    /// Adds tokens to the chain's history (repetition penalties) without sampling.
    pub(crate) fn accept(&mut self, tokens: &[i32]) {
        for &t in tokens {
            // SAFETY: valid chain owned by self; penalties accept any token id.
            unsafe { sys::llama_sampler_accept(self.raw.as_ptr(), t) }
        }
    }
}
