//! A llama.cpp sampler chain built from `SamplingParams`, in llama.cpp's default order:
//! penalties → top-k → top-p → min-p → temperature → random draw (or greedy at temp 0),
//! and, with a grammar, llama.cpp's grammar sampler kept outside the chain.
//!
//! Sampling with a grammar follows llama.cpp's own `common_sampler_sample`: checking every
//! token of the vocabulary against the grammar costs far more than the chain, so the chain
//! picks first and only the chosen token is checked; only when the grammar rejects it are
//! all candidates filtered by the grammar and the chain run again on what is left.
//!
//! A lazy grammar's trigger search is done here, in Rust (src/trigger.rs), not by llama.cpp.

use std::ffi::{c_char, CString};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;
use crate::trigger::TriggerSearch;
use crate::{invalid, log};
use llama_plugin_api::abi_stable::std_types::ROption;
use llama_plugin_api::{BackendError, Grammar, SamplingParams};

// The try/catch wrappers of src/grammar_shim.cpp: each returns 0, or 1 after a C++
// exception, whose message it writes into `err` (NUL-terminated, cut to `err_len`).
extern "C" {
    fn llama_rs_grammar_init(
        vocab: *const sys::llama_vocab,
        text: *const c_char,
        root: *const c_char,
        out: *mut *mut sys::llama_sampler,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn llama_rs_sampler_accept(smpl: *mut sys::llama_sampler, token: sys::llama_token, err: *mut c_char, err_len: usize) -> i32;
    fn llama_rs_sampler_apply(smpl: *mut sys::llama_sampler, cur: *mut sys::llama_token_data_array, err: *mut c_char, err_len: usize) -> i32;
    fn llama_rs_grammar_stack_count(smpl: *mut sys::llama_sampler) -> usize;
}

/// Most stacks a sequence's grammar may hold after a token. llama.cpp keeps one stack per
/// way the output so far can still be parsed; a grammar like `a ::= "x" a "y" | "x" a "z"`
/// doubles them on every `x`, and llama.cpp de-duplicates them with a linear search per
/// stack (quadratic per token) and checks each against the vocabulary when the chain's pick
/// is rejected: about a second per token after ~14 tokens, minutes after ~17, on the one
/// compute thread every sequence shares. Ordinary grammars (JSON, schemas) stay at a few
/// dozen; over this the sequence ends with a grammar error. Measured on SmolLM2 with the
/// doubling grammar: the steps at 512..1024 stacks took ~0.5 s each, so 256 (~30 ms).
pub(crate) const MAX_GRAMMAR_STACKS: usize = 256;

/// Room for a C++ exception's message.
const ERR_LEN: usize = 512;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// llama.cpp's grammar sampler, on its own (never inside a chain).
///
/// A lazy grammar is built non-lazy and held back: llama.cpp's own lazy mode re-searches
/// the whole output with std::regex after every token (quadratic time, and a recursion per
/// character), which stalled every sequence sharing the compute thread. Until a trigger
/// fires, this side watches the output ([`Waiting`]) and the grammar neither filters nor
/// sees tokens; when one fires, the grammar is advanced over the triggering text.
pub(crate) struct GrammarSampler {
    raw: NonNull<sys::llama_sampler>,
    vocab: *const sys::llama_vocab,
    /// A lazy grammar's triggers, and whether it is still waiting for one.
    lazy: Option<Lazy>,
}

struct Lazy {
    tokens: Vec<i32>,
    /// With trigger patterns: the search over the output so far.
    search: Option<TriggerSearch>,
    waiting: bool,
}

// SAFETY: a grammar sampler is plain heap state (rules, stacks, a pointer to the model's
// immutable vocabulary) with no thread affinity; its owner is used by one thread at a time.
unsafe impl Send for GrammarSampler {}

impl Drop for GrammarSampler {
    fn drop(&mut self) {
        // SAFETY: built by llama_sampler_init_grammar, owned by no chain, freed once.
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
        let mut out = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        log::clear_first_error();
        // SAFETY: both strings are NUL-terminated and outlive the call; the vocabulary
        // belongs to the live model (the caller holds it). The shim catches C++ exceptions.
        let threw = unsafe { llama_rs_grammar_init(vocab, text.as_ptr(), root.as_ptr(), &mut out, err.as_mut_ptr().cast(), ERR_LEN) };
        let logged = log::take_first_error();
        if threw != 0 {
            return Err(invalid("grammar", format!("llama.cpp refused the grammar: {}", message(&err))));
        }
        let raw = NonNull::new(out).ok_or_else(|| {
            // llama.cpp's parser returns NULL after logging why (its first error line).
            invalid("grammar", logged.unwrap_or_else(|| "llama.cpp could not parse the grammar".to_string()))
        })?;
        // Owned from here: an error below frees it.
        let mut sampler = GrammarSampler { raw, vocab, lazy: None };
        if g.lazy {
            let search = if g.trigger_patterns.is_empty() {
                None
            } else {
                let patterns: Vec<&str> = g.trigger_patterns.iter().map(|p| p.as_str()).collect();
                Some(TriggerSearch::new(&patterns).map_err(|e| invalid("grammar", e.0))?)
            };
            sampler.lazy = Some(Lazy { tokens: g.trigger_tokens.to_vec(), search, waiting: true });
        }
        Ok(sampler)
    }

    fn waiting(&self) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.waiting)
    }

    /// Lets the grammar set the logit of every candidate it rejects to -inf (nothing while
    /// a lazy grammar waits for its trigger).
    fn apply(&mut self, cur: &mut sys::llama_token_data_array) -> Result<(), BackendError> {
        if self.waiting() {
            return Ok(());
        }
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `cur` points at `cur.size` valid entries; the grammar sampler is alive.
        let threw = unsafe { llama_rs_sampler_apply(self.raw.as_ptr(), cur, err.as_mut_ptr().cast(), ERR_LEN) };
        if threw != 0 {
            return Err(invalid("grammar", format!("llama.cpp's grammar failed: {}", message(&err))));
        }
        Ok(())
    }

    /// Advances the grammar past `token`, which `apply` allowed; while a lazy grammar
    /// waits, looks for its trigger instead (llama.cpp's `llama_grammar_accept_impl`).
    fn accept(&mut self, token: i32) -> Result<(), BackendError> {
        let Some(lazy) = self.lazy.as_mut().filter(|l| l.waiting) else { return self.accept_here(token) };
        if lazy.tokens.contains(&token) {
            // A trigger token: the grammar starts with it.
            lazy.waiting = false;
            if let Some(search) = lazy.search.as_mut() {
                search.reset().map_err(|e| invalid("grammar", e.0))?;
            }
            return self.replay(token);
        }
        let Some(search) = lazy.search.as_mut() else { return Ok(()) };
        let piece = piece(self.vocab, token)?;
        let Some(fired) = search.push(token, &piece).map_err(|e| invalid("grammar", e.0))? else { return Ok(()) };
        lazy.waiting = false;
        // The tokens whose pieces reach past the start, llama.cpp's replay: whole pieces
        // as their own tokens, the one the start cuts as its text's tokens.
        let mut whole = Vec::new();
        let mut cut = None;
        let mut begin = 0;
        for &(tok, end) in search.tokens() {
            if end > fired.start {
                if begin >= fired.start {
                    whole.push(tok);
                } else {
                    cut = Some(search.text()[fired.start..end].to_vec());
                }
            }
            begin = end;
        }
        // Nothing more to search until a reset.
        search.reset().map_err(|e| invalid("grammar", e.0))?;
        if let Some(text) = cut {
            for t in tokenize_exact(self.vocab, &text)? {
                self.replay(t)?;
            }
        }
        for t in whole {
            self.replay(t)?;
        }
        Ok(())
    }

    /// Accepts a token of the triggering text into the just-started grammar. The grammar
    /// is asked first (one candidate through `apply`): llama.cpp aborts the process when an
    /// end-of-generation token reaches a grammar that is not complete, and a piece it
    /// cannot take becomes the usual grammar error here rather than its exception.
    fn replay(&mut self, token: i32) -> Result<(), BackendError> {
        let mut single = sys::llama_token_data { id: token, logit: 1.0, p: 0.0 };
        let mut one = sys::llama_token_data_array { data: &mut single, size: 1, selected: -1, sorted: false };
        self.apply(&mut one)?;
        if single.logit == f32::NEG_INFINITY {
            return Err(invalid("grammar", "the grammar does not match the text its trigger starts it at"));
        }
        self.accept_here(token)
    }

    fn accept_here(&mut self, token: i32) -> Result<(), BackendError> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the grammar sampler is alive; a token the grammar cannot take makes
        // llama.cpp throw, which the shim catches.
        let threw = unsafe { llama_rs_sampler_accept(self.raw.as_ptr(), token, err.as_mut_ptr().cast(), ERR_LEN) };
        if threw != 0 {
            return Err(invalid("grammar", format!("the output no longer matches the grammar: {}", message(&err))));
        }
        // SAFETY: the grammar sampler is alive (built by llama_rs_grammar_init, so its ctx
        // is llama.cpp's llama_sampler_grammar; the shim checks the sampler's name).
        let stacks = unsafe { llama_rs_grammar_stack_count(self.raw.as_ptr()) };
        if stacks > MAX_GRAMMAR_STACKS {
            return Err(invalid(
                "grammar",
                format!(
                    "the grammar is too ambiguous: {stacks} ways to parse the output so far (at most {MAX_GRAMMAR_STACKS}); \
                     rules like `a ::= \"x\" a \"y\" | \"x\" a \"z\"` double them on every token"
                ),
            ));
        }
        Ok(())
    }

    fn reset(&mut self) {
        // SAFETY: valid sampler owned by self. llama.cpp rebuilds the grammar from the text
        // it already parsed.
        unsafe { sys::llama_sampler_reset(self.raw.as_ptr()) }
        if let Some(lazy) = &mut self.lazy {
            lazy.waiting = true;
            if let Some(search) = &mut lazy.search {
                // Cannot fail: the start state was computed when the search was built.
                let _ = search.reset();
            }
        }
    }
}

/// A token's text as llama.cpp's grammar sees it (`llama_vocab::token_to_piece`, which
/// renders special tokens).
fn piece(vocab: *const sys::llama_vocab, token: i32) -> Result<Vec<u8>, BackendError> {
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: the vocabulary belongs to the live model; `buf` holds `buf.len()` bytes.
        let n = unsafe { sys::llama_token_to_piece(vocab, token, buf.as_mut_ptr().cast(), buf.len() as i32, 0, true) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        // Negative: the size it needs.
        let need = n.unsigned_abs() as usize;
        if need <= buf.len() {
            return Err(invalid("grammar", format!("llama.cpp cannot render token {token}")));
        }
        buf.resize(need, 0);
    }
}

/// Tokens whose pieces spell exactly `text` (special tokens parsed, as in the output):
/// the grammar works on the pieces' characters, so these advance it as `text` would.
/// A tokenizer that changes the text (SentencePiece's leading space) is an error rather
/// than a grammar fed the wrong characters.
fn tokenize_exact(vocab: *const sys::llama_vocab, text: &[u8]) -> Result<Vec<i32>, BackendError> {
    let mut tokens = vec![0i32; text.len() + 2];
    // SAFETY: `text` is `text.len()` bytes (no NUL needed: the length is passed); `tokens`
    // holds `tokens.len()` entries; the vocabulary belongs to the live model.
    let n = unsafe {
        sys::llama_tokenize(vocab, text.as_ptr().cast(), text.len() as i32, tokens.as_mut_ptr(), tokens.len() as i32, false, true)
    };
    if n < 0 {
        return Err(invalid("grammar", "cannot tokenize the text a trigger starts the grammar at"));
    }
    tokens.truncate(n as usize);
    let mut spelled = Vec::with_capacity(text.len());
    for &t in &tokens {
        spelled.extend_from_slice(&piece(vocab, t)?);
    }
    if spelled != text {
        return Err(invalid(
            "grammar",
            format!("the trigger starts inside a token, and this vocabulary does not tokenize {:?} back to itself", String::from_utf8_lossy(text)),
        ));
    }
    Ok(tokens)
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
