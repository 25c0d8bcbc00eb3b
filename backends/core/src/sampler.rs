//! A llama.cpp sampler chain built from `SamplingParams`, in llama.cpp's default order:
//! penalties → top-k → top-p → min-p → temperature → random draw (or greedy at temp 0).

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::std_types::RString;
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

fn invalid(field: &str, reason: impl Into<String>) -> BackendError {
    BackendError::InvalidParam { field: RString::from(field), reason: RString::from(reason.into()) }
}

pub(crate) fn validate(p: &SamplingParams) -> Result<(), BackendError> {
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return Err(invalid("temperature", format!("{} is not a number >= 0", p.temperature)));
    }
    if p.top_k < 0 {
        return Err(invalid("top_k", format!("{} is below 0", p.top_k)));
    }
    if !(0.0..=1.0).contains(&p.top_p) {
        return Err(invalid("top_p", format!("{} is outside 0..=1", p.top_p)));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return Err(invalid("min_p", format!("{} is outside 0..=1", p.min_p)));
    }
    if !p.repeat_penalty.is_finite() || p.repeat_penalty <= 0.0 {
        return Err(invalid("repeat_penalty", format!("{} is not a number > 0", p.repeat_penalty)));
    }
    if p.repeat_last_n < -1 {
        return Err(invalid("repeat_last_n", format!("{} is below -1", p.repeat_last_n)));
    }
    if !p.frequency_penalty.is_finite() {
        return Err(invalid("frequency_penalty", "not a finite number"));
    }
    if !p.presence_penalty.is_finite() {
        return Err(invalid("presence_penalty", "not a finite number"));
    }
    Ok(())
}

impl Sampler {
    pub(crate) fn new(p: &SamplingParams, n_vocab: i32, n_ctx: u32) -> Result<Sampler, BackendError> {
        validate(p)?;
        // SAFETY: plain constructors; each returned sampler is handed to the chain, which
        // takes ownership (llama_sampler_chain_add).
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let raw = NonNull::new(chain).ok_or_else(|| invalid("sampler", "llama.cpp returned no sampler chain"))?;
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
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
}
