//! A llama.cpp sampler chain built from `SamplingParams`, in llama.cpp's default order:
//! penalties → top-k → top-p → min-p → temperature → random draw (or greedy at temp 0),
//! and, with a grammar, llama.cpp's grammar sampler kept outside the chain.
//!
//! Sampling with a grammar follows llama.cpp's own `common_sampler_sample`: checking every
//! token of the vocabulary against the grammar costs far more than the chain, so the chain
//! picks first and only the chosen token is checked; only when the grammar rejects it are
//! all candidates filtered by the grammar and the chain run again on what is left.

use std::ffi::{c_char, CString};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;
use crate::{invalid, log};
use llama_plugin_api::abi_stable::std_types::ROption;
use llama_plugin_api::{BackendError, Grammar, SamplingParams};

// The try/catch wrappers of src/grammar_shim.cpp: each returns 0, or 1 after a C++
// exception, whose message it writes into `err` (NUL-terminated, cut to `err_len`).
extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn llama_rs_grammar_init(
        vocab: *const sys::llama_vocab,
        text: *const c_char,
        root: *const c_char,
        lazy: bool,
        patterns: *mut *const c_char,
        n_patterns: usize,
        tokens: *const sys::llama_token,
        n_tokens: usize,
        out: *mut *mut sys::llama_sampler,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn llama_rs_sampler_accept(smpl: *mut sys::llama_sampler, token: sys::llama_token, err: *mut c_char, err_len: usize) -> i32;
    fn llama_rs_sampler_apply(smpl: *mut sys::llama_sampler, cur: *mut sys::llama_token_data_array, err: *mut c_char, err_len: usize) -> i32;
}

/// Room for a C++ exception's message.
const ERR_LEN: usize = 512;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// llama.cpp's grammar sampler, on its own (never inside a chain).
pub(crate) struct GrammarSampler {
    raw: NonNull<sys::llama_sampler>,
    /// With trigger patterns: the vocabulary (to size each accepted token's text), the
    /// bytes of output accepted so far, and how many the trigger search may look at.
    lazy: Option<LazySearch>,
}

/// The stack bound of a lazy grammar's trigger search (see `grammar_bounds`). The count is
/// of all output accepted, an upper bound of llama.cpp's trigger buffer (which it clears
/// when the trigger fires, a moment this side cannot see).
struct LazySearch {
    vocab: *const sys::llama_vocab,
    fed: usize,
    limit: usize,
}

// SAFETY: a grammar sampler is plain heap state (rules, stacks, a pointer to the model's
// immutable vocabulary, which `LazySearch` also holds) with no thread affinity; its owner is
// used by one thread at a time (the trigger search thread borrows it while its owner waits).
unsafe impl Send for GrammarSampler {}

impl Drop for GrammarSampler {
    fn drop(&mut self) {
        // SAFETY: built by llama_sampler_init_grammar*, owned by no chain, freed once.
        unsafe { sys::llama_sampler_free(self.raw.as_ptr()) }
    }
}

impl GrammarSampler {
    /// Checks the bounds (`Grammar::validate`, trigger tokens in the vocabulary), then
    /// lets llama.cpp parse the grammar. A grammar it refuses is `InvalidParam` (field
    /// `grammar`) with llama.cpp's first error line as the reason.
    pub(crate) fn new(g: &Grammar, vocab: *const sys::llama_vocab, n_vocab: i32) -> Result<GrammarSampler, BackendError> {
        g.validate()?;
        if let Some(t) = g.trigger_tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(invalid("grammar", format!("trigger token {t} is not in the vocabulary of {n_vocab}")));
        }
        // validate() refused NUL bytes, so these conversions cannot fail.
        let cstr = |s: &str| CString::new(s).map_err(|_| invalid("grammar", "contains a NUL byte"));
        let text = cstr(&g.text)?;
        let root = cstr(&g.root)?;
        let patterns: Vec<CString> = g.trigger_patterns.iter().map(|p| cstr(p)).collect::<Result<_, _>>()?;
        let mut pattern_ptrs: Vec<*const c_char> = patterns.iter().map(|p| p.as_ptr()).collect();
        let mut out = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        log::clear_first_error();
        // SAFETY: every string is NUL-terminated and outlives the call; the pattern and
        // token arrays hold the lengths passed; the vocabulary belongs to the live model
        // (the caller holds it). The shim catches C++ exceptions.
        let threw = unsafe {
            llama_rs_grammar_init(
                vocab,
                text.as_ptr(),
                root.as_ptr(),
                g.lazy,
                pattern_ptrs.as_mut_ptr(),
                pattern_ptrs.len(),
                g.trigger_tokens.as_ptr(),
                g.trigger_tokens.len(),
                &mut out,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        let logged = log::take_first_error();
        if threw != 0 {
            // A trigger pattern std::regex refused is the usual cause.
            return Err(invalid("grammar", format!("llama.cpp refused the grammar: {}", message(&err))));
        }
        let raw = NonNull::new(out).ok_or_else(|| {
            // llama.cpp's parser returns NULL after logging why (its first error line).
            invalid("grammar", logged.unwrap_or_else(|| "llama.cpp could not parse the grammar".to_string()))
        })?;
        let lazy = (g.lazy && !g.trigger_patterns.is_empty()).then(|| LazySearch {
            vocab,
            fed: 0,
            limit: llama_plugin_api::grammar_bounds::max_untriggered_bytes(g.trigger_patterns.iter().map(|p| p.as_str())),
        });
        Ok(GrammarSampler { raw, lazy })
    }

    /// Lets the grammar set the logit of every candidate it rejects to -inf.
    fn apply(&mut self, cur: &mut sys::llama_token_data_array) -> Result<(), BackendError> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `cur` points at `cur.size` valid entries; the grammar sampler is alive.
        let threw = unsafe { llama_rs_sampler_apply(self.raw.as_ptr(), cur, err.as_mut_ptr().cast(), ERR_LEN) };
        if threw != 0 {
            return Err(invalid("grammar", format!("llama.cpp's grammar failed: {}", message(&err))));
        }
        Ok(())
    }

    /// Advances the grammar past `token`, which `apply` allowed.
    ///
    /// A grammar with trigger patterns may run llama.cpp's trigger search here, a
    /// `std::regex_search` over all the output so far whose recursion grows with its
    /// length: it runs on a thread with `TRIGGER_SEARCH_STACK` of stack, whatever the
    /// caller's thread (a 2 MiB Rust thread overflowed after about 11,900 characters with
    /// the usual tool-call pattern), and the output it may search is bounded so that the
    /// search fits that stack.
    fn accept(&mut self, token: i32) -> Result<(), BackendError> {
        use llama_plugin_api::grammar_bounds::TRIGGER_SEARCH_STACK;
        let Some(lazy) = &mut self.lazy else { return self.accept_here(token) };
        // SAFETY: the vocabulary belongs to the live model; a null buffer of length 0 only
        // asks for the piece's size (returned negated when it does not fit).
        let piece = unsafe { sys::llama_token_to_piece(lazy.vocab, token, std::ptr::null_mut(), 0, 0, true) };
        lazy.fed = lazy.fed.saturating_add(piece.unsigned_abs() as usize);
        if lazy.fed > lazy.limit {
            return Err(invalid(
                "grammar",
                format!(
                    "the output reached {} bytes, over the {} bytes a lazy grammar's trigger patterns may be searched in (their stack bound)",
                    lazy.fed, lazy.limit
                ),
            ));
        }
        // A fresh thread per token costs tens of microseconds against milliseconds of
        // decoding; its stack is virtual memory, committed only as far as the search goes.
        std::thread::scope(|s| {
            let search = std::thread::Builder::new()
                .name("llama-grammar".into())
                .stack_size(TRIGGER_SEARCH_STACK)
                .spawn_scoped(s, || self.accept_here(token))
                .map_err(|e| invalid("grammar", format!("cannot start the trigger search thread: {e}")))?;
            search.join().unwrap_or_else(|_| Err(invalid("grammar", "the trigger search panicked")))
        })
    }

    fn accept_here(&mut self, token: i32) -> Result<(), BackendError> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the grammar sampler is alive; a token the grammar cannot take makes
        // llama.cpp throw, which the shim catches.
        let threw = unsafe { llama_rs_sampler_accept(self.raw.as_ptr(), token, err.as_mut_ptr().cast(), ERR_LEN) };
        if threw != 0 {
            return Err(invalid("grammar", format!("the output no longer matches the grammar: {}", message(&err))));
        }
        Ok(())
    }

    fn reset(&mut self) {
        // SAFETY: valid sampler owned by self. llama.cpp rebuilds the grammar from the text
        // it already parsed (and patterns std::regex already compiled once).
        unsafe { sys::llama_sampler_reset(self.raw.as_ptr()) }
        if let Some(lazy) = &mut self.lazy {
            lazy.fed = 0;
        }
    }
}

pub(crate) struct Sampler {
    raw: NonNull<sys::llama_sampler>,
    /// The grammar, outside the chain (see the module comment).
    grammar: Option<GrammarSampler>,
    /// Candidates for a grammar sampling step (one per vocabulary entry), kept between steps.
    cur: Vec<sys::llama_token_data>,
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
    pub(crate) fn new(p: &SamplingParams, vocab: *const sys::llama_vocab, n_vocab: i32, n_ctx: u32) -> Result<Sampler, BackendError> {
        p.validate()?;
        if let Some(b) = p.logit_bias.iter().find(|b| b.token < 0 || b.token >= n_vocab) {
            return Err(invalid("logit_bias", format!("token {} is not in the vocabulary of {n_vocab}", b.token)));
        }
        let grammar = match &p.grammar {
            ROption::RSome(g) => Some(GrammarSampler::new(g, vocab, n_vocab)?),
            ROption::RNone => None,
        };
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
            Ok(Sampler { raw, grammar, cur: Vec::new() })
        }
    }

    pub(crate) fn reset(&mut self) {
        // SAFETY: valid chain owned by self.
        unsafe { sys::llama_sampler_reset(self.raw.as_ptr()) }
        if let Some(g) = &mut self.grammar {
            g.reset();
        }
    }

    /// Samples the next token from entry `idx` of the last decode's logits (`-1`: the
    /// last entry) and accepts it (into the grammar and the chain).
    ///
    /// Without a grammar this is `llama_sampler_sample`, unchanged. With one it is
    /// llama.cpp's rejection sampling (`common_sampler_sample`): the chain picks; the
    /// grammar checks that one token; only if it rejects it does the grammar filter every
    /// candidate and the chain pick again. A grammar that admits no token at all is an
    /// error (a dead end), never an unconstrained token.
    pub(crate) fn sample(&mut self, ctx: *mut sys::llama_context, idx: i32, n_vocab: i32) -> Result<i32, BackendError> {
        let Some(grammar) = self.grammar.as_mut() else {
            // SAFETY: the caller's decode produced logits for entry `idx`; the chain is
            // alive. llama_sampler_sample also accepts the token into the chain.
            return Ok(unsafe { sys::llama_sampler_sample(self.raw.as_ptr(), ctx, idx) });
        };
        // SAFETY: the context is alive and its last decode computed logits for `idx`
        // (callers check); llama.cpp returns NULL for an entry without logits.
        let logits = unsafe { sys::llama_get_logits_ith(ctx, idx) };
        if logits.is_null() {
            return Err(invalid("samples", format!("batch entry {idx} has no logits")));
        }
        // SAFETY: llama.cpp's logits row for one entry holds n_vocab floats.
        let logits = unsafe { std::slice::from_raw_parts(logits, n_vocab as usize) };
        let chain = self.raw.as_ptr();
        let cur = &mut self.cur;
        let fill = |cur: &mut Vec<sys::llama_token_data>| {
            cur.clear();
            cur.extend(logits.iter().enumerate().map(|(id, &logit)| sys::llama_token_data { id: id as i32, logit, p: 0.0 }));
            sys::llama_token_data_array { data: cur.as_mut_ptr(), size: cur.len(), selected: -1, sorted: false }
        };
        // The chain's choice, then that one token through the grammar.
        let mut arr = fill(cur);
        // SAFETY: `arr` points at `cur`'s n_vocab entries, alive for the call.
        unsafe { sys::llama_sampler_apply(chain, &mut arr) };
        let mut token = chosen(&arr)?;
        let mut single = sys::llama_token_data { id: token, logit: 1.0, p: 0.0 };
        let mut one = sys::llama_token_data_array { data: &mut single, size: 1, selected: -1, sorted: false };
        grammar.apply(&mut one)?;
        if single.logit == f32::NEG_INFINITY {
            // Rejected: the grammar filters every candidate, then the chain picks again.
            let mut arr = fill(cur);
            grammar.apply(&mut arr)?;
            if cur.iter().all(|c| c.logit == f32::NEG_INFINITY) {
                return Err(dead_end());
            }
            let mut arr = sys::llama_token_data_array { data: cur.as_mut_ptr(), size: cur.len(), selected: -1, sorted: false };
            // SAFETY: as above.
            unsafe { sys::llama_sampler_apply(chain, &mut arr) };
            token = chosen(&arr)?;
            // The chain may have pushed the grammar's last candidates to -inf (a logit
            // bias): what it then picks is not allowed.
            if arr.selected >= 0 && cur[arr.selected as usize].logit == f32::NEG_INFINITY {
                return Err(dead_end());
            }
        }
        grammar.accept(token)?;
        // SAFETY: valid chain; any token id is accepted (penalty history).
        unsafe { sys::llama_sampler_accept(chain, token) };
        Ok(token)
    }

    /// Adds tokens to the chain's history (repetition penalties) without sampling. The
    /// grammar never sees them: it constrains the new output only.
    pub(crate) fn accept(&mut self, tokens: &[i32]) {
        for &t in tokens {
            // SAFETY: valid chain owned by self; penalties accept any token id.
            unsafe { sys::llama_sampler_accept(self.raw.as_ptr(), t) }
        }
    }
}

/// The token the chain selected.
fn chosen(arr: &sys::llama_token_data_array) -> Result<i32, BackendError> {
    if arr.selected < 0 || arr.selected as usize >= arr.size {
        return Err(invalid("sampler", "the sampler chain selected no token"));
    }
    // SAFETY: `selected` is inside the array's `size` entries (checked).
    Ok(unsafe { (*arr.data.add(arr.selected as usize)).id })
}

fn dead_end() -> BackendError {
    invalid("grammar", "the grammar admits no token here (a dead end: no continuation of the output so far matches it)")
}
