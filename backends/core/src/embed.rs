//! An embeddings context: llama.cpp with `embeddings = true`, pooling one vector per
//! sequence (or one per token without pooling). Several inputs go through one decode as
//! separate sequences, as llama.cpp's `llama-embedding` batches them.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llama_cpp_sys_2 as sys;
use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{RResult, RSlice, RString, RVec};
use llama_plugin_api::{AbortBox, AbortHandle_TO, BackendError, EmbedInfo, EmbedParams, EmbedderBox, Embedder_TO, Pooling};

use crate::context::{should_abort, Abort, Batch};
use crate::model::LlamaModel;
use crate::{guard, invalid, log};

/// llama.cpp's limit on sequences in one context (`LLAMA_MAX_SEQ`); one is kept for padding.
const MAX_SEQ: u32 = 255;

/// The CPU's repacked weight kernels compute rows in groups of this many (a GEMM) and the
/// batch's last `n % ROW_GROUP` rows one by one (a GEMV), which sums in another order: an
/// input alone, or last in a batch, would have its last tokens computed differently than
/// anywhere else (Gemma 3's last-token vectors moved by 2e-3 in cosine). Every batch is
/// padded to whole row groups with a spare sequence, never read. (llama.cpp's kernels have
/// other, rarer dependences on the batch's shape; see docs/ARCHITECTURE.md, "Embeddings".)
const ROW_GROUP: u32 = 4;

pub(crate) struct LlamaEmbedder {
    // Field order: the batch and context go before the model they refer to.
    batch: Batch,
    ctx: NonNull<sys::llama_context>,
    model: Arc<LlamaModel>,
    abort: Arc<AtomicBool>,
    /// Read and written by llama.cpp's eval callback during a decode (`capture_hidden`),
    /// and by `embed` between decodes, always through this pointer (from `Box::into_raw`,
    /// so its address is stable and no Rust reference to it outlives a use); freed in
    /// `drop` after the context.
    capture: NonNull<Capture>,
    info: EmbedInfo,
}

/// The final hidden states of a batch, taken as llama.cpp computes them.
///
/// A generative model's graph ends in its output layer, computed for every token of an
/// embeddings batch (pooling needs every token as an output) though nothing reads the
/// logits: for Gemma 3's 262,144-token vocabulary that layer is more work than the rest of
/// the model. llama.cpp's scheduler asks an eval callback, node by node, whether it wants a
/// node's data, and stops computing a graph split when the callback says so after seeing
/// it. The callback asks for `result_norm` (the normalised last hidden state every
/// architecture names so, which pooling reads), copies it and stops: the output layer, and
/// llama.cpp's own pooling after it, never run; the pooling is done here (`pool`). Where
/// the node is not found, or has another shape, nothing is stopped and llama.cpp's pooled
/// vectors are read as before.
struct Capture {
    /// Off for rank pooling (it needs the classification head after the hidden state) and
    /// for models whose pooled vector goes through further dense layers.
    enabled: bool,
    /// Floats per row and rows expected in the batch being decoded.
    n_embd: usize,
    rows: usize,
    data: Vec<f32>,
    /// Whether `data` holds this decode's rows.
    got: bool,
    /// Whether the first decode's outcome was logged.
    reported: bool,
}

const HIDDEN_NODE: &[u8] = b"result_norm";

/// llama.cpp's eval callback (`cb_eval`): see [`Capture`].
unsafe extern "C" fn capture_hidden(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: `user` is the embedder's `Capture` (a leaked Box), alive for the context's
    // life; while llama_decode runs, this callback is the only code using it (`embed` holds
    // no reference across the decode); `t` is a node of the graph being computed, valid
    // for the call.
    let (cap, t) = unsafe { (&mut *(user as *mut Capture), &*t) };
    let name = t.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8);
    let is_hidden = name.eq(HIDDEN_NODE.iter().copied());
    if ask {
        return cap.enabled && !cap.got && is_hidden;
    }
    // Asked for, and now computed: take it if it has the expected shape, then stop.
    let shape_ok = t.type_ == sys::GGML_TYPE_F32
        && t.ne[0] == cap.n_embd as i64
        && t.ne[1] == cap.rows as i64
        && t.ne[2] == 1
        && t.ne[3] == 1
        && t.nb[1] == cap.n_embd * std::mem::size_of::<f32>();
    if !shape_ok {
        return true;
    }
    cap.data.resize(cap.n_embd * cap.rows, 0.0);
    // SAFETY: the tensor holds n_embd * rows contiguous f32 (checked above), computed (the
    // scheduler synchronised before this call); `data` has room for exactly that.
    unsafe { sys::ggml_backend_tensor_get(t, cap.data.as_mut_ptr().cast(), 0, cap.data.len() * std::mem::size_of::<f32>()) };
    cap.got = true;
    false
}

/// Pools the captured hidden states of a batch as llama.cpp's graph would: the mean of a
/// sequence's rows, its first row (cls) or its last (last); without pooling every token's
/// row. Rows are in batch order: the inputs one after another.
fn pool(cap: &Capture, pooling: Pooling, lengths: &[u32]) -> Vec<f32> {
    let n = cap.n_embd;
    let row = |i: usize| &cap.data[i * n..(i + 1) * n];
    let total: usize = lengths.iter().map(|&l| l as usize).sum();
    if pooling == Pooling::None {
        return cap.data[..total * n].to_vec();
    }
    let mut out = Vec::with_capacity(lengths.len() * n);
    let mut start = 0;
    for &len in lengths {
        let len = len as usize;
        match pooling {
            Pooling::Cls => out.extend_from_slice(row(start)),
            Pooling::Last => out.extend_from_slice(row(start + len - 1)),
            _ => {
                // llama.cpp multiplies by 1/len and sums in f32.
                let scale = 1.0 / len as f32;
                let mut acc = vec![0.0f32; n];
                for i in start..start + len {
                    for (a, &x) in acc.iter_mut().zip(row(i)) {
                        *a += x * scale;
                    }
                }
                out.extend_from_slice(&acc);
            }
        }
        start += len;
    }
    out
}

// SAFETY: a llama_context has no thread affinity; the trait object is `Send` but not
// `Sync`, so one thread at a time uses it, as llama.cpp requires.
unsafe impl Send for LlamaEmbedder {}

impl Drop for LlamaEmbedder {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed exactly once, before the model Arc.
        unsafe { sys::llama_free(self.ctx.as_ptr()) }
        // SAFETY: from Box::into_raw in `new`, freed exactly once, after the context that
        // held a pointer to it (its callback can no longer run).
        drop(unsafe { Box::from_raw(self.capture.as_ptr()) });
    }
}

fn pooling_type(p: Pooling) -> sys::llama_pooling_type {
    match p {
        Pooling::Model => sys::LLAMA_POOLING_TYPE_UNSPECIFIED,
        Pooling::None => sys::LLAMA_POOLING_TYPE_NONE,
        Pooling::Mean => sys::LLAMA_POOLING_TYPE_MEAN,
        Pooling::Cls => sys::LLAMA_POOLING_TYPE_CLS,
        Pooling::Last => sys::LLAMA_POOLING_TYPE_LAST,
        Pooling::Rank => sys::LLAMA_POOLING_TYPE_RANK,
    }
}

fn pooling_of(t: sys::llama_pooling_type) -> Option<Pooling> {
    Some(match t {
        sys::LLAMA_POOLING_TYPE_NONE => Pooling::None,
        sys::LLAMA_POOLING_TYPE_MEAN => Pooling::Mean,
        sys::LLAMA_POOLING_TYPE_CLS => Pooling::Cls,
        sys::LLAMA_POOLING_TYPE_LAST => Pooling::Last,
        sys::LLAMA_POOLING_TYPE_RANK => Pooling::Rank,
        _ => return None,
    })
}

pub(crate) fn new(model: Arc<LlamaModel>, p: &EmbedParams) -> Result<EmbedderBox, BackendError> {
    // The host bounds it far lower (by the logits buffer, `max_embed_tokens`); this keeps
    // every size below, and the batch's i32 length, in range for any host.
    if p.n_ctx == 0 || p.n_ctx > 1 << 20 {
        return Err(invalid("n_ctx", format!("{} is outside 1..={}", p.n_ctx, 1u32 << 20)));
    }
    if p.n_threads <= 0 || p.n_threads_batch <= 0 {
        return Err(invalid("n_threads", "must be at least 1"));
    }
    if !(1..=MAX_SEQ).contains(&p.n_seq_max) {
        return Err(invalid("n_seq_max", format!("{} is outside 1..={MAX_SEQ}", p.n_seq_max)));
    }
    // SAFETY: plain queries on the live model.
    let (has_encoder, has_decoder) = unsafe { (sys::llama_model_has_encoder(model.as_ptr()), sys::llama_model_has_decoder(model.as_ptr())) };
    if has_encoder && has_decoder {
        return Err(invalid("pooling", "embeddings of encoder-decoder models are not supported (as in llama.cpp)"));
    }
    // SAFETY: returns a plain struct of defaults.
    let mut cp = unsafe { sys::llama_context_default_params() };
    cp.embeddings = true;
    cp.pooling_type = pooling_type(p.pooling);
    // One size for the batch, the micro-batch and the cache: llama.cpp pools per
    // micro-batch, so each sequence must be decoded in one.
    // Rows one batch holds: the inputs' tokens, rounded up to whole row groups.
    let capacity = p.n_ctx.saturating_add(ROW_GROUP - 1) / ROW_GROUP * ROW_GROUP;
    // At most one input per token fits a batch; and llama.cpp aborts the process
    // (GGML_ASSERT n_outputs_max <= n_batch) when n_seq_max exceeds n_batch, as with
    // `llama embed -ub 8` and 64 inputs per batch. So no more than n_ctx.
    let n_seq_max = p.n_seq_max.min(p.n_ctx);
    // One more sequence for the padding rows; the size rounded up to a multiple of the
    // sequences: llama.cpp reserves its worst-case graph with the micro-batch rounded up to
    // a multiple of n_seq_max but its outputs not, and with mean pooling that aborts the
    // process (GGML_ASSERT in ggml_mul_mat; llama-embedding -ub 300 does it too).
    let seqs = n_seq_max + 1;
    let room = capacity.div_ceil(seqs).saturating_mul(seqs);
    cp.n_ctx = room;
    cp.n_batch = room;
    cp.n_ubatch = room;
    cp.n_seq_max = seqs;
    cp.kv_unified = true;
    cp.n_threads = p.n_threads;
    cp.n_threads_batch = p.n_threads_batch;
    cp.swa_full = false;
    cp.flash_attn_type = crate::context::flash_attn_type(p.flash_attn);
    // Models whose pooled vector goes through further dense layers (sentence-transformers'
    // modules, converted with --sentence-transformers-dense-modules) must run the graph to
    // its end.
    let arch = model.meta_string("general.architecture").unwrap_or_default();
    let dense = model.meta_string(&format!("{arch}.dense_2_feat_out")).is_some() || model.meta_string(&format!("{arch}.dense_3_feat_out")).is_some();
    let capture = Box::new(Capture { enabled: p.may_skip_output && !dense, n_embd: 0, rows: 0, data: Vec::new(), got: false, reported: false });
    // Freed by the embedder's `drop`, or below when no embedder is made.
    let capture = NonNull::from(Box::leak(capture));
    let free_capture = || {
        // SAFETY: from Box::leak above, freed once, on a path where no context holds it.
        drop(unsafe { Box::from_raw(capture.as_ptr()) })
    };
    cp.cb_eval = Some(capture_hidden);
    cp.cb_eval_user_data = capture.as_ptr().cast();
    let abort = Arc::new(AtomicBool::new(false));
    cp.abort_callback = Some(should_abort);
    cp.abort_callback_data = Arc::as_ptr(&abort) as *mut c_void;
    log::clear_first_error();
    // SAFETY: the model is alive (we hold an Arc for the life of the context).
    let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
    let Some(ctx) = NonNull::new(raw) else {
        free_capture();
        return Err(BackendError::ContextCreate { reason: RString::from(log::take_first_error().unwrap_or_else(|| "no reason given".to_string())) });
    };
    // SAFETY: plain queries on the live context and model.
    let (pooling, n_ctx, n_embd, n_cls) = unsafe {
        (
            sys::llama_pooling_type(ctx.as_ptr()),
            sys::llama_n_ctx(ctx.as_ptr()).min(sys::llama_n_batch(ctx.as_ptr())).min(sys::llama_n_ubatch(ctx.as_ptr())),
            sys::llama_model_n_embd_out(model.as_ptr()),
            sys::llama_model_n_cls_out(model.as_ptr()),
        )
    };
    let embedder_ctx = ctx;
    let Some(pooling) = pooling_of(pooling) else {
        // SAFETY: freed once; nothing else holds it yet.
        unsafe { sys::llama_free(embedder_ctx.as_ptr()) };
        free_capture();
        return Err(invalid("pooling", format!("llama.cpp chose an unknown pooling type {pooling}")));
    };
    // The longest input, and the most tokens of one batch, stay what was asked for.
    let n_ctx = n_ctx.min(p.n_ctx);
    let n_out = if pooling == Pooling::Rank { n_cls } else { n_embd.max(0) as u32 };
    // SAFETY: the capture is live (freed only by the embedder's drop) and nothing else
    // touches it: no decode has run on the new context yet.
    let cap = unsafe { &mut *capture.as_ptr() };
    cap.enabled &= pooling != Pooling::Rank;
    cap.n_embd = n_out as usize;
    // SAFETY: token/pos/seq/logit arrays for `capacity` rows (the tokens and the padding),
    // one sequence id each.
    let batch = Batch(unsafe { sys::llama_batch_init(capacity as i32, 0, 1) });
    let info = EmbedInfo { n_ctx, n_seq_max, pooling, n_out };
    Ok(Embedder_TO::from_value(LlamaEmbedder { batch, ctx: embedder_ctx, model, abort, capture, info }, TD_Opaque))
}

impl LlamaEmbedder {
    fn check(&self, tokens: &[i32], lengths: &[u32]) -> Result<(), BackendError> {
        if lengths.is_empty() {
            return Err(invalid("inputs", "no input"));
        }
        if lengths.len() > self.info.n_seq_max as usize {
            return Err(invalid("inputs", format!("{} inputs exceed the {} sequences of one batch", lengths.len(), self.info.n_seq_max)));
        }
        if let Some(i) = lengths.iter().position(|&n| n == 0) {
            return Err(invalid("inputs", format!("input {i} is empty")));
        }
        let total: u64 = lengths.iter().map(|&n| u64::from(n)).sum();
        if total != tokens.len() as u64 {
            return Err(invalid("inputs", format!("the lengths add up to {total}, not the {} tokens given", tokens.len())));
        }
        if total > u64::from(self.info.n_ctx) {
            return Err(BackendError::ContextFull { n_ctx: self.info.n_ctx, needed: total.min(u64::from(u32::MAX)) as u32 });
        }
        let n_vocab = self.model.n_vocab();
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(BackendError::InvalidToken { token: bad });
        }
        Ok(())
    }

    fn embed(&mut self, tokens: &[i32], lengths: &[u32]) -> Result<RVec<f32>, BackendError> {
        self.check(tokens, lengths)?;
        let ctx = self.ctx.as_ptr();
        // SAFETY: the memory handle belongs to the live context; `true` clears the data too.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(ctx), true) };
        let b = &mut self.batch.0;
        let pad_seq = lengths.len() as i32;
        // The inputs, then padding rows up to the next row group (`ROW_GROUP`). Token 0
        // pads: any id in the vocabulary will do, its sequence is never read.
        let mut rows: Vec<(i32, i32, i32)> = Vec::with_capacity(tokens.len() + ROW_GROUP as usize);
        let mut next = 0usize;
        for (seq, &len) in lengths.iter().enumerate() {
            for pos in 0..len as i32 {
                rows.push((tokens[next], seq as i32, pos));
                next += 1;
            }
        }
        let mut pad_pos = 0;
        while rows.len() % ROW_GROUP as usize != 0 {
            rows.push((0, pad_seq, pad_pos));
            pad_pos += 1;
        }
        b.n_tokens = rows.len() as i32;
        for (i, &(tok, seq, pos)) in rows.iter().enumerate() {
            // SAFETY: the batch arrays hold `capacity` entries: tokens.len() <= n_ctx (`check`)
            // rounded up to a row group is at most that; seq_id[i] points at an array of one id
            // (llama_batch_init with 1); the padding sequence is n_seq_max, within the
            // context's n_seq_max + 1.
            unsafe {
                *b.token.add(i) = tok;
                *b.pos.add(i) = pos;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = seq;
                *b.logits.add(i) = 1;
            }
        }
        {
            // SAFETY: the capture is live for the embedder's life; no decode is running
            // (this thread runs them), so this is its only reference; it ends before the
            // decode below.
            let cap = unsafe { &mut *self.capture.as_ptr() };
            cap.rows = rows.len();
            cap.got = false;
        }
        self.model.decode(ctx, *b)?;
        // SAFETY: as above: the decode has returned, so the callback is done with it.
        let cap = unsafe { &mut *self.capture.as_ptr() };
        if !cap.reported {
            cap.reported = true;
            crate::log::info(if cap.got {
                "embeddings: pooled from the final hidden states; the output layer is skipped"
            } else {
                "embeddings: the graph runs to its end (no result_norm node of the expected shape, or pooling that needs it)"
            });
        }
        if cap.got {
            return Ok(RVec::from(pool(cap, self.info.pooling, lengths)));
        }
        let n_out = self.info.n_out as usize;
        let rows = if self.info.pooling == Pooling::None { tokens.len() } else { lengths.len() };
        let mut out = RVec::with_capacity(rows * n_out);
        for r in 0..rows {
            // SAFETY: the decode above output every row; with pooling each sequence id
            // 0..lengths.len() has a pooled vector, without it each input token (the first
            // tokens.len() rows) a row.
            let ptr = unsafe {
                if self.info.pooling == Pooling::None {
                    sys::llama_get_embeddings_ith(ctx, r as i32)
                } else {
                    sys::llama_get_embeddings_seq(ctx, r as i32)
                }
            };
            if ptr.is_null() {
                return Err(BackendError::Decode { code: -1 });
            }
            // SAFETY: llama.cpp returns `n_out` floats for the row (n_embd_out, or n_cls_out
            // with rank pooling), alive until the next decode.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, n_out) });
        }
        Ok(out)
    }
}

impl llama_plugin_api::Embedder for LlamaEmbedder {
    fn info(&self) -> EmbedInfo {
        self.info
    }

    fn abort_handle(&self) -> AbortBox {
        AbortHandle_TO::from_value(Abort(self.abort.clone()), TD_Opaque)
    }

    fn reset_abort(&mut self) {
        self.abort.store(false, Ordering::Relaxed);
    }

    fn embed(&mut self, tokens: RSlice<'_, i32>, lengths: RSlice<'_, u32>) -> RResult<RVec<f32>, BackendError> {
        guard(|| LlamaEmbedder::embed(self, tokens.as_slice(), lengths.as_slice()))
    }
}
