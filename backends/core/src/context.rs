//! One llama.cpp inference context with its sampler: the `Context` trait object.
//! Used by one thread at a time (the trait object is `Send`, not `Sync`).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{RResult, RSlice, RString};
use llama_plugin_api::abi_stable::std_types::RVec;
use llama_plugin_api::{
    AbortBox, AbortHandle_TO, BackendError, BatchToken, CacheType, ContextBox, ContextParams, Context_TO, FlashAttn, SampleRequest,
    Sampled, SamplingParams,
};

use crate::model::LlamaModel;
use crate::sampler::Sampler;
use crate::{guard, invalid, log};

struct RawContext(NonNull<sys::llama_context>);

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed exactly once, before the model
        // (the owning `LlamaContext` drops this field before its model Arc).
        unsafe { sys::llama_free(self.0.as_ptr()) }
    }
}

pub(crate) struct LlamaContext {
    // Field order matters: the samplers and context go before the model they refer to.
    /// Sequence 0's sampler (the single-sequence API).
    sampler: Sampler,
    /// Samplers of the other sequences (index = sequence id), set by `set_seq_sampling`.
    seq_samplers: Vec<Option<Sampler>>,
    ctx: RawContext,
    /// A batch with explicit per-token output flags, for decoding without logits.
    batch: Batch,
    model: Arc<LlamaModel>,
    /// Read by llama.cpp's abort callback; the context holds it as long as llama.cpp may.
    abort: Arc<AtomicBool>,
    n_ctx: u32,
    n_batch: u32,
    n_seq_max: u32,
    /// Tokens in the KV cache; resynchronised from llama.cpp after every decode.
    n_past: u32,
}

/// llama.cpp asks this between graph nodes whether to stop (contexts and embedders).
pub(crate) unsafe extern "C" fn should_abort(data: *mut c_void) -> bool {
    // SAFETY: `data` is the `AtomicBool` inside the owner's `abort` Arc, which outlives the
    // llama_context (dropped after it: see the field order of `LlamaContext` and
    // `LlamaEmbedder`).
    unsafe { &*(data as *const AtomicBool) }.load(Ordering::Relaxed)
}

pub(crate) struct Abort(pub(crate) Arc<AtomicBool>);

impl llama_plugin_api::AbortHandle for Abort {
    fn abort(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// SAFETY: a llama_context has no thread affinity; the trait object is `Send` but not
// `Sync`, so it is used by one thread at a time as llama.cpp requires.
unsafe impl Send for LlamaContext {}

pub(crate) struct Batch(pub(crate) sys::llama_batch);

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed exactly once.
        unsafe { sys::llama_batch_free(self.0) }
    }
}

/// Every parameter llama.cpp would refuse less clearly (a log line and a null context),
/// refused here with a typed error naming it.
fn check_params(p: &ContextParams) -> Result<(), BackendError> {
    if p.n_ctx == 0 {
        return Err(invalid("n_ctx", "must be at least 1"));
    }
    if p.n_batch == 0 {
        return Err(invalid("n_batch", "must be at least 1"));
    }
    if p.n_ubatch == 0 {
        return Err(invalid("n_ubatch", "must be at least 1"));
    }
    if p.n_threads <= 0 {
        return Err(invalid("n_threads", format!("{} is below 1", p.n_threads)));
    }
    if p.n_threads_batch <= 0 {
        return Err(invalid("n_threads_batch", format!("{} is below 1", p.n_threads_batch)));
    }
    // llama.cpp refuses this pair with a log line and a null context; checked here it is a
    // typed parameter error naming both settings.
    llama_plugin_api::validate_kv_cache(p.type_v, p.flash_attn)?;
    Ok(())
}

pub(crate) fn new(model: Arc<LlamaModel>, p: &ContextParams) -> Result<ContextBox, BackendError> {
    check_params(p)?;
    // SAFETY: returns a plain struct of defaults.
    let mut cp = unsafe { sys::llama_context_default_params() };
    cp.n_ctx = p.n_ctx;
    cp.n_batch = p.n_batch.min(p.n_ctx);
    cp.n_ubatch = p.n_ubatch.min(cp.n_batch);
    cp.n_threads = p.n_threads;
    cp.n_threads_batch = p.n_threads_batch;
    cp.n_seq_max = p.n_seq_max.max(1);
    cp.kv_unified = p.kv_unified;
    cp.type_k = ggml_type(p.type_k);
    cp.type_v = ggml_type(p.type_v);
    cp.flash_attn_type = flash_attn_type(p.flash_attn);
    // llama.cpp's C default keeps a full-size cache for sliding-window layers; its own
    // tools (common) turn that off: for Gemma 3 at 4096 tokens it is 45 MiB more. `truncate`
    // checks that the window a continuation needs is still there.
    cp.swa_full = false;
    let abort = Arc::new(AtomicBool::new(false));
    cp.abort_callback = Some(should_abort);
    cp.abort_callback_data = Arc::as_ptr(&abort) as *mut c_void;
    log::clear_first_error();
    // SAFETY: the model is alive (we hold an Arc for the life of the context).
    let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
    let raw = NonNull::new(raw).ok_or_else(|| BackendError::ContextCreate {
        reason: RString::from(log::take_first_error().unwrap_or_else(|| "no reason given".to_string())),
    })?;
    let ctx = RawContext(raw);
    // SAFETY: reads back the sizes llama.cpp settled on.
    let (padded_ctx, n_batch) = unsafe { (sys::llama_n_ctx(raw.as_ptr()), sys::llama_n_batch(raw.as_ptr())) };
    // llama.cpp rounds the context up (to a multiple of 256); the limit the caller asked
    // for is the one enforced, so `-c 32` means 32 tokens.
    let n_ctx = p.n_ctx.min(padded_ctx);
    let sampler = Sampler::new(&SamplingParams::default(), model.vocab(), model.n_vocab(), n_ctx)?;
    // SAFETY: allocates token/pos/seq/logit arrays for `n_batch` tokens, one sequence each.
    let batch = Batch(unsafe { sys::llama_batch_init(n_batch as i32, 0, 1) });
    let n_seq_max = cp.n_seq_max;
    let seq_samplers = (0..n_seq_max).map(|_| None).collect();
    Ok(Context_TO::from_value(
        LlamaContext { sampler, seq_samplers, ctx, batch, model, abort, n_ctx, n_batch, n_seq_max, n_past: 0 },
        TD_Opaque,
    ))
}

fn ggml_type(t: CacheType) -> sys::ggml_type {
    match t {
        CacheType::F16 => sys::GGML_TYPE_F16,
        CacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
        CacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
    }
}

pub(crate) fn flash_attn_type(f: FlashAttn) -> sys::llama_flash_attn_type {
    match f {
        FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
}

impl LlamaContext {
    fn check_tokens(&self, tokens: &[i32]) -> Result<(), BackendError> {
        let n_vocab = self.model.n_vocab();
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(BackendError::InvalidToken { token: bad });
        }
        let needed = self.n_past as u64 + tokens.len() as u64;
        if needed > self.n_ctx as u64 {
            return Err(BackendError::ContextFull { n_ctx: self.n_ctx, needed: needed.min(u32::MAX as u64) as u32 });
        }
        Ok(())
    }

    fn decode_chunk(&mut self, chunk: &[i32], logits_last: bool) -> Result<(), BackendError> {
        match self.decode_seq(0, chunk, self.n_past as i32, logits_last) {
            Ok(()) => {
                self.n_past += chunk.len() as u32;
                Ok(())
            }
            // A failed or aborted decode may leave some micro-batches in the cache.
            Err(e) => Err(self.resync(e)),
        }
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: the context is alive; the memory handle is owned by it.
        unsafe { sys::llama_get_memory(self.ctx.0.as_ptr()) }
    }

    /// Reads how many tokens llama.cpp really holds for the sequence.
    fn resync<E>(&mut self, e: E) -> E {
        // SAFETY: valid memory handle of a live context; sequence 0 is the only one.
        let pos_max = unsafe { sys::llama_memory_seq_pos_max(self.memory(), 0) };
        self.n_past = (pos_max + 1).max(0) as u32;
        e
    }

    fn decode_all(&mut self, tokens: &[i32], logits_last: bool) -> Result<(), BackendError> {
        self.check_tokens(tokens)?;
        let n = self.n_batch as usize;
        let chunks = tokens.chunks(n);
        let count = chunks.len();
        for (i, chunk) in tokens.chunks(n).enumerate() {
            self.decode_chunk(chunk, logits_last && i + 1 == count)?;
        }
        Ok(())
    }
}

impl LlamaContext {
    /// Whether `seq` still holds what continuing at `pos` needs: a sliding-window cache
    /// keeps only the last window of positions, and the one before `pos` may already have
    /// been evicted (as llama-server checks before reusing a slot).
    fn window_intact(&self, seq: i32, pos: i32) -> bool {
        // SAFETY: plain queries on the live model and memory; `seq` is in range (callers check).
        let (n_swa, pos_min) = unsafe { (sys::llama_model_n_swa(self.model.as_ptr()), sys::llama_memory_seq_pos_min(self.memory(), seq)) };
        pos == 0 || n_swa <= 0 || pos_min <= (pos - n_swa).max(0)
    }

    fn seq_slot(&mut self, seq: i32) -> Result<&mut Option<Sampler>, BackendError> {
        let n = self.n_seq_max;
        if seq < 0 || seq as u32 >= n {
            return Err(invalid("seq", format!("{seq} is outside 0..{n}")));
        }
        Ok(&mut self.seq_samplers[seq as usize])
    }

    fn step_batch(&mut self, tokens: &[BatchToken], samples: &[SampleRequest]) -> Result<RVec<RResult<Sampled, BackendError>>, BackendError> {
        if tokens.is_empty() {
            return Err(invalid("batch", "empty"));
        }
        if tokens.len() > self.n_batch as usize {
            return Err(invalid("batch", format!("{} tokens exceed the batch size {}", tokens.len(), self.n_batch)));
        }
        let n_vocab = self.model.n_vocab();
        for t in tokens {
            if t.token < 0 || t.token >= n_vocab {
                return Err(BackendError::InvalidToken { token: t.token });
            }
            if t.seq < 0 || t.seq as u32 >= self.n_seq_max {
                return Err(invalid("seq", format!("{} is outside 0..{}", t.seq, self.n_seq_max)));
            }
        }
        for r in samples {
            let ok = tokens.get(r.index as usize).is_some_and(|t| t.logits && t.seq == r.seq);
            if r.index < 0 || !ok {
                return Err(invalid("samples", format!("entry {} of sequence {} has no logits in this batch", r.index, r.seq)));
            }
            // Drafts follow their sequence's entry, one position after another, with logits.
            let first = &tokens[r.index as usize];
            let drafts = tokens.get(r.index as usize + 1..).and_then(|rest| rest.get(..r.n_draft as usize));
            let ok = drafts.is_some_and(|d| {
                d.iter().enumerate().all(|(k, t)| t.seq == r.seq && t.logits && i64::from(t.pos) == i64::from(first.pos) + k as i64 + 1)
            });
            if !ok {
                return Err(invalid("samples", format!("the {} drafts of sequence {} do not follow entry {} in order with logits", r.n_draft, r.seq, r.index)));
            }
            if r.n_draft > 0 && !self.can_drop_tail() {
                return Err(no_tail_removal());
            }
            if self.seq_samplers[r.seq as usize].is_none() {
                return Err(invalid("samples", format!("sequence {} has no sampler (set_seq_sampling)", r.seq)));
            }
        }
        let b = &mut self.batch.0;
        b.n_tokens = tokens.len() as i32;
        for (i, t) in tokens.iter().enumerate() {
            // SAFETY: the batch arrays hold n_batch entries and tokens.len() <= n_batch;
            // seq_id[i] points at an array of one seq id (llama_batch_init with n_seq_max 1).
            unsafe {
                *b.token.add(i) = t.token;
                *b.pos.add(i) = t.pos;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = t.seq;
                *b.logits.add(i) = t.logits as i8;
            }
        }
        let rc = self.model.decode(self.ctx.0.as_ptr(), *b);
        self.resync(());
        rc?;
        let mut out = RVec::with_capacity(samples.len());
        for r in samples {
            // One sequence's failure (a grammar dead end, a C++ exception the shim caught)
            // is that sequence's result only: the sequences batched with it belong to
            // other clients and are sampled as if it were not there.
            let result = match self.verify(tokens, r) {
                Ok(s) => RResult::ROk(s),
                Err(BackendError::InvalidParam { field, reason }) => {
                    RResult::RErr(BackendError::InvalidParam { field, reason: RString::from(format!("sequence {}: {reason}", r.seq)) })
                }
                Err(other) => RResult::RErr(other),
            };
            let mut result = result;
            if r.n_draft > 0 {
                // The rejected drafts leave the KV cache (on an error too: the sequence
                // keeps only what was accepted).
                let accepted = match &result { RResult::ROk(s) => s.accepted, RResult::RErr(_) => 0 };
                if accepted < r.n_draft {
                    let first_rejected = tokens[r.index as usize + 1 + accepted as usize].pos;
                    // SAFETY: valid memory handle; the sequence id was checked above.
                    let removed = unsafe { sys::llama_memory_seq_rm(self.memory(), r.seq, first_rejected, -1) };
                    // A sliding-window cache may have evicted, while the drafts were
                    // decoded, cells the continuation needs: the sequence cannot go on.
                    if !removed || !self.window_intact(r.seq, first_rejected) {
                        result = RResult::RErr(invalid(
                            "samples",
                            format!("sequence {}: the KV cache could not drop the rejected drafts (sliding window); retry without speculation", r.seq),
                        ));
                    }
                }
            }
            out.push(result);
        }
        self.resync(());
        Ok(out)
    }

    /// Samples request `r` from the batch just decoded (its entries computed logits:
    /// checked by the caller), verifying its drafts in order: llama.cpp's rule
    /// (`common_sampler_sample_and_accept_n`). Each sample goes through the sequence's
    /// sampler exactly as one-token steps would, grammar and penalties included, so the
    /// output does not depend on the drafts, only the number of steps does.
    fn verify(&mut self, tokens: &[BatchToken], r: &SampleRequest) -> Result<Sampled, BackendError> {
        let ctx = self.ctx.0.as_ptr();
        let n_vocab = self.model.n_vocab();
        let sampler = self.seq_samplers[r.seq as usize].as_mut().expect("checked by the caller");
        let mut accepted = 0u32;
        loop {
            let token = sampler.sample(ctx, r.index + accepted as i32, n_vocab)?;
            let is_eog = self.model.is_eog(token);
            let draft = (accepted < r.n_draft).then(|| tokens[r.index as usize + 1 + accepted as usize].token);
            if is_eog || draft != Some(token) {
                return Ok(Sampled { token, is_eog, accepted });
            }
            accepted += 1;
        }
    }

    /// Greedy drafting on this (draft model's) context: see `Context::draft`.
    fn draft_tokens(&mut self, seq: i32, tokens: &[i32], pos: i32, n_max: u32, p_min: f32) -> Result<RVec<i32>, BackendError> {
        if seq < 0 || seq as u32 >= self.n_seq_max {
            return Err(invalid("seq", format!("{seq} is outside 0..{}", self.n_seq_max)));
        }
        if tokens.is_empty() {
            return Err(invalid("tokens", "nothing to decode"));
        }
        if pos < 0 {
            return Err(invalid("pos", format!("{pos} is below 0")));
        }
        if !(0.0..=1.0).contains(&p_min) {
            return Err(invalid("p_min", format!("{p_min} is outside 0..=1")));
        }
        let n_vocab = self.model.n_vocab();
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(BackendError::InvalidToken { token: bad });
        }
        let end = i64::from(pos) + tokens.len() as i64 + i64::from(n_max);
        if end > i64::from(self.n_ctx) {
            return Err(BackendError::ContextFull { n_ctx: self.n_ctx, needed: end.min(i64::from(u32::MAX)) as u32 });
        }
        if !self.can_drop_tail() {
            return Err(no_tail_removal());
        }
        let mem = self.memory();
        // SAFETY: valid memory handle; the sequence id is in range (checked).
        if !unsafe { sys::llama_memory_seq_rm(mem, seq, pos, -1) } {
            return Err(invalid("draft", format!("sequence {seq}: the draft model's cache cannot drop positions from {pos} on")));
        }
        let held = pos + tokens.len() as i32;
        let mut drafts = RVec::new();
        let result = (|| {
            let mut p = pos;
            let n = self.n_batch as usize;
            for chunk in tokens.chunks(n) {
                let last = p + chunk.len() as i32 == held;
                self.decode_seq(seq, chunk, p, last)?;
                p += chunk.len() as i32;
            }
            while (drafts.len() as u32) < n_max {
                // SAFETY: the last decode computed logits for its last entry (index -1).
                let logits = unsafe { sys::llama_get_logits_ith(self.ctx.0.as_ptr(), -1) };
                if logits.is_null() {
                    return Err(invalid("draft", "llama.cpp returned no logits"));
                }
                // SAFETY: a logits row holds n_vocab floats.
                let logits = unsafe { std::slice::from_raw_parts(logits, n_vocab as usize) };
                let (best, p_best) = top_probability(logits);
                if p_best < p_min || self.model.is_eog(best) {
                    break;
                }
                drafts.push(best);
                if drafts.len() as u32 == n_max {
                    break;
                }
                self.decode_seq(seq, &[best], p, true)?;
                p += 1;
            }
            Ok(())
        })();
        // The drafted tokens leave the cache: the caller's history decides what stays.
        // SAFETY: as above.
        let removed = unsafe { sys::llama_memory_seq_rm(mem, seq, held, -1) };
        self.resync(());
        if !removed || !self.window_intact(seq, held) {
            return Err(invalid("draft", format!("sequence {seq}: the draft model's cache cannot drop its drafts")));
        }
        result.map(|()| drafts)
    }

    /// Whether this model's cache can drop the last positions of a sequence (rejected
    /// drafts): a recurrent or hybrid model's state cannot be rolled back to a position.
    fn can_drop_tail(&self) -> bool {
        // SAFETY: plain queries on the live model.
        unsafe { !sys::llama_model_is_recurrent(self.model.as_ptr()) && !sys::llama_model_is_hybrid(self.model.as_ptr()) }
    }

    /// Decodes `chunk` into sequence `seq` at positions `pos..`, with logits for the last
    /// entry only when `logits_last`.
    fn decode_seq(&mut self, seq: i32, chunk: &[i32], pos: i32, logits_last: bool) -> Result<(), BackendError> {
        let b = &mut self.batch.0;
        b.n_tokens = chunk.len() as i32;
        for (i, &tok) in chunk.iter().enumerate() {
            // SAFETY: the batch arrays hold n_batch entries and chunk.len() <= n_batch
            // (callers chunk by n_batch); seq_id[i] points at an array of one seq id.
            unsafe {
                *b.token.add(i) = tok;
                *b.pos.add(i) = pos + i as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = seq;
                *b.logits.add(i) = (logits_last && i + 1 == chunk.len()) as i8;
            }
        }
        self.model.decode(self.ctx.0.as_ptr(), *b)
    }
}

impl llama_plugin_api::Context for LlamaContext {
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn n_past(&self) -> u32 {
        self.n_past
    }

    fn clear(&mut self) {
        // SAFETY: the memory handle belongs to the live context; `true` also clears data.
        unsafe { sys::llama_memory_clear(self.memory(), true) };
        self.n_past = 0;
        self.sampler.reset();
    }

    fn truncate(&mut self, n_keep: u32) -> bool {
        if n_keep >= self.n_past {
            return true;
        }
        // SAFETY: valid memory handle; removes positions [n_keep, end) of sequence 0.
        let ok = unsafe { sys::llama_memory_seq_rm(self.memory(), 0, n_keep as i32, -1) };
        self.resync(());
        if !ok || self.n_past != n_keep {
            return false;
        }
        self.window_intact(0, n_keep as i32)
    }

    fn accept(&mut self, tokens: RSlice<'_, i32>) {
        self.sampler.accept(tokens.as_slice());
    }

    fn abort_handle(&self) -> AbortBox {
        AbortHandle_TO::from_value(Abort(self.abort.clone()), TD_Opaque)
    }

    fn reset_abort(&mut self) {
        self.abort.store(false, Ordering::Relaxed);
    }

    fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    fn set_seq_sampling(&mut self, seq: i32, params: SamplingParams, history: RSlice<'_, i32>) -> RResult<(), BackendError> {
        guard(|| {
            let mut sampler = Sampler::new(&params, self.model.vocab(), self.model.n_vocab(), self.n_ctx)?;
            sampler.accept(history.as_slice());
            *self.seq_slot(seq)? = Some(sampler);
            Ok(())
        })
    }

    fn step(
        &mut self,
        batch: RSlice<'_, BatchToken>,
        samples: RSlice<'_, SampleRequest>,
    ) -> RResult<RVec<RResult<Sampled, BackendError>>, BackendError> {
        guard(|| self.step_batch(batch.as_slice(), samples.as_slice()))
    }

    fn draft(&mut self, seq: i32, tokens: RSlice<'_, i32>, pos: i32, n_max: u32, p_min: f32) -> RResult<RVec<i32>, BackendError> {
        guard(|| self.draft_tokens(seq, tokens.as_slice(), pos, n_max, p_min))
    }

    fn seq_remove(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        if seq < 0 || seq as u32 >= self.n_seq_max {
            return false;
        }
        // SAFETY: valid memory handle; the sequence id is in range.
        let ok = unsafe { sys::llama_memory_seq_rm(self.memory(), seq, p0, p1) };
        if seq == 0 {
            self.resync(());
        }
        ok
    }

    fn seq_pos_max(&self, seq: i32) -> i32 {
        if seq < 0 || seq as u32 >= self.n_seq_max {
            return -1;
        }
        // SAFETY: valid memory handle; the sequence id is in range.
        unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq) }
    }

    fn seq_can_continue(&self, seq: i32, pos: i32) -> bool {
        if seq < 0 || seq as u32 >= self.n_seq_max {
            return false;
        }
        self.window_intact(seq, pos)
    }

    fn set_sampling(&mut self, params: SamplingParams) -> RResult<(), BackendError> {
        guard(|| {
            self.sampler = Sampler::new(&params, self.model.vocab(), self.model.n_vocab(), self.n_ctx)?;
            Ok(())
        })
    }

    fn decode(&mut self, tokens: RSlice<'_, i32>, logits_last: bool) -> RResult<(), BackendError> {
        guard(|| self.decode_all(tokens.as_slice(), logits_last))
    }

    fn decode_sample(&mut self, tokens: RSlice<'_, i32>) -> RResult<Sampled, BackendError> {
        guard(|| {
            if tokens.is_empty() {
                return Err(invalid("tokens", "nothing to decode"));
            }
            self.decode_all(tokens.as_slice(), true)?;
            // The last decode produced logits for its last token (index -1); sampling also
            // accepts the token (into the grammar and the chain's penalties).
            let token = self.sampler.sample(self.ctx.0.as_ptr(), -1, self.model.n_vocab())?;
            Ok(Sampled { token, is_eog: self.model.is_eog(token), accepted: 0 })
        })
    }
}

fn no_tail_removal() -> BackendError {
    invalid("spec", "speculative decoding needs a model whose KV cache can drop drafted tokens; this one is recurrent or hybrid")
}

/// The most likely token of a logits row and its probability (a softmax over the row).
fn top_probability(logits: &[f32]) -> (i32, f32) {
    let (best, max) = logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc });
    if !max.is_finite() {
        return (best as i32, 0.0);
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (best as i32, (1.0 / sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn top_probability_is_a_softmax_of_the_best() {
        let (t, p) = top_probability(&[0.0, 2.0, 0.0]);
        assert_eq!(t, 1);
        let e2 = 2f64.exp();
        assert!((f64::from(p) - e2 / (e2 + 2.0)).abs() < 1e-6, "{p}");
        assert_eq!(top_probability(&[f32::NEG_INFINITY; 3]).1, 0.0);
    }

    fn params(type_k: CacheType, type_v: CacheType, flash_attn: FlashAttn) -> ContextParams {
        ContextParams { n_ctx: 512, n_batch: 512, n_ubatch: 512, n_threads: 1, n_threads_batch: 1, n_seq_max: 1, kv_unified: false, type_k, type_v, flash_attn }
    }

    /// The ABI's names reach llama.cpp as the ggml types and flash-attention modes of the
    /// same names.
    #[test]
    fn cache_types_and_flash_attn_map_to_llama_cpps() {
        for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0] {
            // SAFETY: a lookup in ggml's static type table; the name is a static C string.
            let name = unsafe { CStr::from_ptr(sys::ggml_type_name(ggml_type(t))) };
            assert_eq!(name.to_str().unwrap(), t.as_str());
        }
        for (f, theirs) in [(FlashAttn::Auto, "auto"), (FlashAttn::On, "enabled"), (FlashAttn::Off, "disabled")] {
            // SAFETY: returns a static C string for every mode.
            let name = unsafe { CStr::from_ptr(sys::llama_flash_attn_type_name(flash_attn_type(f))) };
            assert_eq!(name.to_str().unwrap(), theirs);
        }
    }

    /// A quantized V cache with flash attention off is refused before llama.cpp sees it,
    /// as a typed parameter error naming both settings.
    #[test]
    fn a_quantized_v_cache_needs_flash_attention() {
        for type_v in [CacheType::Q8_0, CacheType::Q4_0] {
            match check_params(&params(CacheType::F16, type_v, FlashAttn::Off)) {
                Err(BackendError::InvalidParam { field, reason }) => {
                    assert_eq!(field.as_str(), "cache-type-v");
                    assert!(reason.contains(type_v.as_str()) && reason.contains("flash-attn"), "{reason}");
                }
                other => panic!("{type_v:?} with flash attention off: {other:?}"),
            }
            assert!(check_params(&params(CacheType::F16, type_v, FlashAttn::On)).is_ok());
            assert!(check_params(&params(CacheType::F16, type_v, FlashAttn::Auto)).is_ok());
        }
        assert!(check_params(&params(CacheType::Q4_0, CacheType::F16, FlashAttn::Off)).is_ok(), "a quantized K cache alone is fine");
    }
}
