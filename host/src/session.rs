//! Sessions: one context (KV cache + sampler) and the generation loop over it.
//!
//! Generation is pull-driven: [`Stream`] is an iterator that runs one decode step per
//! piece of text the consumer asks for. A consumer that stops reading pauses generation
//! with nothing buffered; dropping the stream stops it. A [`Canceller`] stops it from
//! another thread within one decode step, also in the middle of a long prompt (through
//! llama.cpp's abort callback, checked between graph nodes).
//!
//! The session keeps the tokens of its KV cache (`cached`) so the next generation decodes
//! only what differs from them (prompt cache for multi-turn chat).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ops::{AbortHandle, ContextOps};
use crate::spec::{ngram_draft, DraftCap, Drafter, SpecMode, SpecParams, SpecStats};
use crate::types::{BackendError, BatchToken, SampleRequest, Sampled, SamplingParams};

use crate::error::{GenerateError, SessionError};
use crate::text::TextOutput;
use crate::{Model, SessionParams};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate; `None` runs until end of generation or a full context.
    pub max_tokens: Option<u32>,
    pub sampling: SamplingParams,
    /// Add BOS and other special tokens the model expects around a prompt. Off for text
    /// rendered by a chat template, which carries its own.
    pub add_special: bool,
    /// Generation ends before any of these strings; they never appear in the output.
    pub stop: Vec<String>,
    /// Speculative decoding: drafted tokens verified in each step (`None`: one token per
    /// step). The output is the same either way; see [`crate::spec`].
    pub spec: Option<SpecParams>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: None, sampling: SamplingParams::default(), add_special: true, stop: Vec::new(), spec: None }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` was reached, or the context is full.
    Length,
    /// Cancelled by a [`Canceller`] or by the consumer.
    Cancelled,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens found in the KV cache and not decoded again.
    pub cached_tokens: usize,
    /// Prompt tokens decoded (`prompt_tokens - cached_tokens`).
    pub decoded_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing including sampling the first token: the time to first token.
    pub prompt_time: Duration,
    /// Decoding the generated tokens after the first.
    pub generation_time: Duration,
    /// Decode steps timed in `generation_time`.
    pub decode_steps: usize,
    /// Tokens those steps produced (more than the steps when drafts were accepted).
    pub timed_tokens: usize,
    /// Drafted and accepted tokens (speculative decoding).
    pub spec: SpecStats,
    pub finish: Option<FinishReason>,
}

impl GenerationStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.decoded_prompt_tokens, self.prompt_time)
    }
    pub fn generation_tokens_per_s(&self) -> f64 {
        rate(self.timed_tokens, self.generation_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// Stops a session's generation from any thread.
#[derive(Clone)]
pub struct Canceller {
    flag: Arc<AtomicBool>,
    abort: Arc<dyn AbortHandle>,
}

impl Canceller {
    /// Stops the generation in progress: the stream ends with `FinishReason::Cancelled`
    /// within one decode step (a prompt being decoded is interrupted too).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.abort.abort();
    }
}

/// One conversation with a model: a context, its KV cache and what the cache holds.
pub struct Session<'m> {
    model: &'m Model,
    ctx: Box<dyn ContextOps>,
    abort: Arc<dyn AbortHandle>,
    cancel: Arc<AtomicBool>,
    /// The tokens in the KV cache, in order. Invariant: `cached.len() == ctx.n_past()`
    /// whenever no generation is running.
    cached: Vec<i32>,
    cache_tokens: u32,
    params: SessionParams,
    /// The draft model's context, once [`Session::set_draft_model`] gave one.
    drafter: Option<Drafter>,
    /// Drafts sent in the last speculative step.
    last_drafted: usize,
}

impl<'m> Session<'m> {
    pub(crate) fn new(model: &'m Model, params: &SessionParams) -> Result<Session<'m>, SessionError> {
        params.validate()?;
        let ctx = model.new_context(&params.to_context_params())?;
        let abort: Arc<dyn AbortHandle> = Arc::from(ctx.abort_handle());
        Ok(Session {
            model,
            ctx,
            abort,
            cancel: Arc::new(AtomicBool::new(false)),
            cached: Vec::new(),
            cache_tokens: params.cache_tokens,
            params: params.clone(),
            drafter: None,
            last_drafted: 0,
        })
    }

    /// Lets generations with `SpecMode::Draft` draft with `draft`, a model with the same
    /// vocabulary (checked: a different one is an `InvalidParam` naming both files). Its
    /// context has this session's sizes.
    pub fn set_draft_model(&mut self, draft: &Model) -> Result<(), GenerateError> {
        self.drafter = Some(Drafter::new(self.model, draft, &self.params.to_context_params())?);
        Ok(())
    }

    pub fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Tokens the backend holds in the KV cache right now.
    pub fn kv_tokens(&self) -> u32 {
        self.ctx.n_past()
    }

    /// Tokens the session believes are cached (equal to `kv_tokens` between generations).
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.ctx.clear();
        self.cached.clear();
    }

    /// A handle that cancels this session's current generation from any thread.
    pub fn canceller(&self) -> Canceller {
        Canceller { flag: self.cancel.clone(), abort: self.abort.clone() }
    }

    /// Starts generating a continuation of `prompt`. Nothing is decoded until the stream
    /// is read.
    pub fn stream(&mut self, prompt: &str, opts: &GenerateOptions) -> Result<Stream<'_, 'm>, GenerateError> {
        let tokens = self.model.tokenize(prompt, opts.add_special)?;
        self.stream_tokens(tokens, opts)
    }

    /// Like [`Session::stream`] for an already tokenized prompt.
    pub fn stream_tokens(&mut self, tokens: Vec<i32>, opts: &GenerateOptions) -> Result<Stream<'_, 'm>, GenerateError> {
        if tokens.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let n_ctx = self.ctx.n_ctx();
        if tokens.len() > n_ctx as usize {
            return Err(GenerateError::PromptTooLong { tokens: tokens.len(), n_ctx });
        }
        if let Some(spec) = &opts.spec {
            spec.validate()?;
            if spec.mode == SpecMode::Draft && self.drafter.is_none() {
                return Err(GenerateError::InvalidParam { field: "spec".into(), reason: "draft speculation needs a draft model (--draft-model)".into() });
            }
            // Speculative steps sample through the sequence API (sequence 0); the prompt
            // is the penalties' history, as for the single-sequence sampler.
            self.ctx.set_seq_sampling(0, &opts.sampling, &tokens)?;
        } else {
            self.ctx.set_sampling(&opts.sampling)?;
        }
        self.last_drafted = 0;
        // A cancel aimed at an earlier generation must not stop this one.
        self.cancel.store(false, Ordering::SeqCst);
        self.ctx.reset_abort();
        let stats = GenerationStats { prompt_tokens: tokens.len(), ..GenerationStats::default() };
        Ok(Stream {
            session: self,
            state: State::Prefill(tokens),
            max_tokens: opts.max_tokens,
            spec: opts.spec,
            cap: opts.spec.as_ref().map(DraftCap::new),
            text: TextOutput::new(&opts.stop),
            stats,
            gen_start: None,
        })
    }

    /// Generates a continuation of `prompt`, handing text to `on_text` as it is produced;
    /// `on_text` returns `Break` to stop.
    pub fn generate(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, GenerateError> {
        let mut stream = self.stream(prompt, opts)?;
        while let Some(piece) = stream.next() {
            if on_text(&piece?).is_break() {
                stream.stop();
                break;
            }
        }
        Ok(stream.stats().clone())
    }

    /// Decodes `tokens` after the cache and samples, retrying once when an abort meant for
    /// an earlier generation interrupts it. Keeps `cached` equal to what the KV cache holds.
    fn decode_sample(&mut self, tokens: &[i32]) -> Result<Sampled, BackendError> {
        self.retrying(tokens, |ctx, t| ctx.decode_sample(t))
    }

    /// Decodes `tokens` after the cache without logits (a prompt's first part), as
    /// `decode_sample` does.
    fn decode_prefix(&mut self, tokens: &[i32]) -> Result<(), BackendError> {
        self.retrying(tokens, |ctx, t| ctx.decode(t, false))
    }

    /// Runs `decode` over what is left of `tokens`, once more when an abort meant for an
    /// earlier generation interrupted it, and records what landed in the cache.
    fn retrying<T>(&mut self, mut tokens: &[i32], decode: impl Fn(&mut dyn ContextOps, &[i32]) -> Result<T, BackendError>) -> Result<T, BackendError> {
        let mut retried = false;
        loop {
            let before = self.ctx.n_past() as usize;
            let result = decode(self.ctx.as_mut(), tokens);
            // Some micro-batches may have landed before a failure.
            let landed = (self.ctx.n_past() as usize).saturating_sub(before).min(tokens.len());
            self.cached.extend_from_slice(&tokens[..landed]);
            tokens = &tokens[landed..];
            match result {
                Err(BackendError::Aborted) if !retried && !tokens.is_empty() && !self.cancel.load(Ordering::SeqCst) => {
                    self.ctx.reset_abort();
                    retried = true;
                }
                other => return other,
            }
        }
    }

    /// One speculative step: decodes `next` (sampled, not yet in the cache) and the drafts
    /// that follow it, verifies them, and returns the accepted drafts and the token sampled
    /// after them. `left`: tokens the generation may still produce (drafts never reach past
    /// it, nor past the context).
    fn spec_step(&mut self, next: i32, spec: &SpecParams, cap: Option<DraftCap>, left: Option<usize>) -> Result<(Vec<i32>, Sampled), BackendError> {
        let pos = self.cached.len();
        // Room after `next`: the context, the batch (`next` takes one), the token limit.
        let cells_after = (self.ctx.n_ctx() as usize).saturating_sub(pos + 1);
        let room = spec.room(cap, cells_after, self.params.size.n_batch as usize - 1, left);
        self.cached.push(next);
        let drafts = match spec.mode {
            _ if room == 0 => Vec::new(),
            SpecMode::Ngram => ngram_draft(&self.cached, spec.ngram_n as usize, room),
            SpecMode::Draft => match self.drafter.as_mut().map(|d| d.draft(0, &self.cached, room as u32, spec.p_min)) {
                Some(Ok(d)) => d,
                // Drafting is an optimisation: a failure costs speed, never the generation.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "drafting failed; this step verifies no drafts");
                    Vec::new()
                }
                None => Vec::new(),
            },
        };
        self.cached.pop();
        let drafts = spec.usable(drafts);
        self.last_drafted = drafts.len();
        let mut batch = Vec::with_capacity(1 + drafts.len());
        batch.push(BatchToken { token: next, pos: pos as i32, seq: 0, logits: true });
        batch.extend(drafts.iter().enumerate().map(|(k, &token)| BatchToken { token, pos: (pos + 1 + k) as i32, seq: 0, logits: true }));
        let request = SampleRequest { seq: 0, index: 0, n_draft: drafts.len() as u32 };
        let mut result = self.ctx.step(&batch, &[request]);
        if matches!(result, Err(BackendError::Aborted)) && !self.cancel.load(Ordering::SeqCst) {
            // An abort meant for an earlier generation (see `decode_sample`): once more.
            self.ctx.seq_remove(0, pos as i32, -1);
            self.ctx.reset_abort();
            result = self.ctx.step(&batch, &[request]);
        }
        // What the cache holds now: `next` and the accepted drafts, or after a failure
        // whatever landed (the backend keeps the count true).
        let held = (self.ctx.n_past() as usize).saturating_sub(pos).min(batch.len());
        self.cached.extend(batch[..held].iter().map(|t| t.token));
        let sampled = result?.pop().ok_or(BackendError::InvalidParam { field: "samples".into(), reason: "the backend returned no sampled token".into() })??;
        let accepted = drafts[..(sampled.accepted as usize).min(drafts.len())].to_vec();
        Ok((accepted, sampled))
    }

    /// Reuses the longest cached prefix of `tokens`; returns how many tokens were reused.
    fn reuse_prefix(&mut self, tokens: &[i32]) -> usize {
        if self.cache_tokens == 0 {
            self.reset();
            return 0;
        }
        let common = self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // At least one token must be decoded to get logits to sample from.
        let keep = common.min(tokens.len() - 1).min(self.cache_tokens as usize);
        if self.ctx.truncate(keep as u32) {
            self.cached.truncate(keep);
            keep
        } else {
            // The cache cannot drop just the tail (sliding-window layers): start over.
            self.reset();
            0
        }
    }

    /// Brings the cache within its bound after a generation.
    fn trim_cache(&mut self) {
        let bound = self.cache_tokens as usize;
        if bound == 0 {
            self.reset();
        } else if self.cached.len() > bound {
            if self.ctx.truncate(bound as u32) {
                self.cached.truncate(bound);
            } else {
                self.reset();
            }
        }
    }
}

enum State {
    Prefill(Vec<i32>),
    Next(Sampled),
    Done,
}

/// A generation in progress: an iterator of text pieces. See the module docs.
pub struct Stream<'s, 'm> {
    session: &'s mut Session<'m>,
    state: State,
    max_tokens: Option<u32>,
    spec: Option<SpecParams>,
    cap: Option<DraftCap>,
    text: TextOutput,
    stats: GenerationStats,
    gen_start: Option<Instant>,
}

impl Stream<'_, '_> {
    /// Counts and timings so far; complete once the iterator has returned `None`.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// A handle that cancels this generation from any thread.
    pub fn canceller(&self) -> Canceller {
        self.session.canceller()
    }

    /// Ends the generation now (as the consumer's choice: `Cancelled`).
    pub fn stop(&mut self) {
        if !matches!(self.state, State::Done) {
            self.finish(FinishReason::Cancelled);
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        self.state = State::Done;
        self.stats.finish = Some(reason);
        if let Some(t) = self.gen_start {
            self.stats.generation_time = t.elapsed();
        }
        self.session.trim_cache();
        tracing::debug!(generated = self.stats.generated_tokens, finish = ?reason, cached = self.stats.cached_tokens, "generation done");
    }

    fn cancelled(&self) -> bool {
        self.session.cancel.load(Ordering::SeqCst)
    }

    /// One step: decode what is pending and sample; returns text to emit (maybe empty).
    fn step(&mut self) -> Result<Option<String>, GenerateError> {
        let sampled = match std::mem::replace(&mut self.state, State::Done) {
            State::Done => return Ok(None),
            State::Prefill(tokens) => {
                let t = Instant::now();
                let reused = self.session.reuse_prefix(&tokens);
                self.stats.cached_tokens = reused;
                self.stats.decoded_prompt_tokens = tokens.len() - reused;
                // The whole prompt is history for the repetition penalties, as in llama.cpp.
                self.session.ctx.accept(&tokens);
                if self.max_tokens == Some(0) {
                    let r = self.session.ctx.decode(&tokens[reused..], false);
                    self.stats.prompt_time = t.elapsed();
                    let held = (self.session.ctx.n_past() as usize).min(tokens.len());
                    self.session.cached = tokens[..held].to_vec();
                    let reason = match &r {
                        Err(BackendError::Aborted) if self.cancelled() => FinishReason::Cancelled,
                        _ => FinishReason::Length,
                    };
                    self.finish(reason);
                    return match r {
                        Err(BackendError::Aborted) if self.cancelled() => Ok(None),
                        r => r.map(|_| None).map_err(Into::into),
                    };
                }
                if let Some(spec) = self.spec {
                    // All but the last prompt token without logits; the last one starts the
                    // first speculative step (the prompt itself can be drafted from).
                    let (last, rest) = tokens[reused..].split_last().expect("a prompt keeps at least one token to decode");
                    let r = self.session.decode_prefix(rest).and_then(|()| self.session.spec_step(*last, &spec, self.cap, self.max_tokens.map(|m| m as usize)));
                    self.stats.prompt_time = t.elapsed();
                    self.gen_start = Some(Instant::now());
                    return self.take_step(r);
                }
                let r = self.session.decode_sample(&tokens[reused..]);
                self.stats.prompt_time = t.elapsed();
                self.gen_start = Some(Instant::now());
                r
            }
            State::Next(prev) => {
                if let Some(spec) = self.spec {
                    let left = self.max_tokens.map(|m| (m as usize).saturating_sub(self.stats.generated_tokens));
                    let r = self.session.spec_step(prev.token, &spec, self.cap, left);
                    self.stats.decode_steps += 1;
                    let before = self.stats.generated_tokens;
                    let out = self.take_step(r);
                    self.stats.timed_tokens += self.stats.generated_tokens - before;
                    return out;
                }
                let r = self.session.decode_sample(&[prev.token]);
                self.stats.decode_steps += 1;
                self.stats.timed_tokens += 1;
                r
            }
        };
        self.take_step(sampled.map(|s| (Vec::new(), s)))
    }

    /// One output token: appends its text to `text`; `Some(reason)` when generation ends
    /// with it (end of generation, a stop string, the token limit or a full context).
    fn take(&mut self, next: Sampled, text: &mut String) -> Result<Option<FinishReason>, GenerateError> {
        if next.is_eog {
            text.push_str(&self.text.flush());
            return Ok(Some(FinishReason::Stop));
        }
        self.stats.generated_tokens += 1;
        let bytes = self.session.model.token_bytes(next.token, false)?;
        let (piece, stopped) = self.text.push(&bytes);
        text.push_str(&piece);
        if stopped {
            return Ok(Some(FinishReason::Stop));
        }
        let at_limit = self.max_tokens.is_some_and(|m| self.stats.generated_tokens >= m as usize);
        let ctx_full = self.session.ctx.n_past() >= self.session.ctx.n_ctx();
        if at_limit || ctx_full {
            text.push_str(&self.text.flush());
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// The tokens of one step: the accepted drafts (speculative steps), then the sampled token,
    /// each through [`Stream::take`] as if it had been its own step, so a stop string or
    /// the token limit inside the accepted drafts ends the output exactly where it would
    /// have without them.
    fn take_step(&mut self, r: Result<(Vec<i32>, Sampled), BackendError>) -> Result<Option<String>, GenerateError> {
        let (accepted, next) = match r {
            Ok(r) => r,
            Err(BackendError::Aborted) if self.cancelled() => {
                self.finish(FinishReason::Cancelled);
                return Ok(None);
            }
            Err(e) => {
                self.finish(FinishReason::Cancelled);
                return Err(e.into());
            }
        };
        if self.cancelled() {
            self.finish(FinishReason::Cancelled);
            return Ok(None);
        }
        self.stats.spec.drafted += self.session.last_drafted;
        self.stats.spec.accepted += accepted.len();
        if let Some(cap) = &mut self.cap {
            cap.update(self.session.last_drafted, accepted.len());
        }
        let mut text = String::new();
        for token in accepted {
            if let Some(reason) = self.take(Sampled { token, is_eog: false, accepted: 0 }, &mut text)? {
                self.finish(reason);
                return Ok(Some(text));
            }
        }
        match self.take(next, &mut text)? {
            Some(reason) => self.finish(reason),
            None => self.state = State::Next(next),
        }
        Ok(Some(text))
    }
}

impl Iterator for Stream<'_, '_> {
    type Item = Result<String, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.step() {
                Ok(Some(text)) if text.is_empty() => continue,
                Ok(Some(text)) => return Some(Ok(text)),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for Stream<'_, '_> {
    /// Dropping a stream mid-way stops generation; the cache keeps what was decoded.
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            self.finish(FinishReason::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Session rules over the fake model (no plugin, no model file).
    use std::sync::atomic::Ordering;

    use crate::fake::FakeModel;
    use crate::{FinishReason, GenerateOptions, SessionParams};

    fn greedy(max_tokens: Option<u32>) -> GenerateOptions {
        GenerateOptions { max_tokens, sampling: crate::SamplingParams { temperature: 0.0, ..Default::default() }, ..Default::default() }
    }

    #[test]
    fn a_second_turn_decodes_only_what_the_cache_lacks() {
        let (model, fake) = FakeModel::new("ok").into_model();
        let mut s = model.session(&SessionParams::default()).unwrap();
        let first = s.generate("hello", &greedy(None), |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!((first.cached_tokens, first.generated_tokens, first.finish), (0, 2, Some(FinishReason::Stop)));
        let before = fake.decoded_tokens.load(Ordering::SeqCst);
        // "hello" + "ok" is cached; the new prompt shares "hellook".
        let second = s.generate("hellook, and more", &greedy(Some(1)), |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!(second.cached_tokens, 7);
        assert_eq!(fake.decoded_tokens.load(Ordering::SeqCst) - before, "hellook, and more".len() - 7);
    }

    #[test]
    fn max_tokens_zero_generates_nothing() {
        let (model, _) = FakeModel::new("never").into_model();
        let mut s = model.session(&SessionParams::default()).unwrap();
        let mut text = String::new();
        let stats = s.generate("prompt", &greedy(Some(0)), |t| {
            text.push_str(t);
            std::ops::ControlFlow::Continue(())
        });
        let stats = stats.unwrap();
        assert_eq!((text.as_str(), stats.generated_tokens, stats.finish), ("", 0, Some(FinishReason::Length)));
    }

    #[test]
    fn a_backend_error_ends_the_stream_with_the_error() {
        let (model, fake) = FakeModel::new("abc").into_model();
        fake.fail_token_bytes.store(true, Ordering::SeqCst);
        let mut s = model.session(&SessionParams::default()).unwrap();
        let err = s.generate("x", &greedy(None), |_| std::ops::ControlFlow::Continue(())).unwrap_err();
        assert!(err.to_string().contains("not in the vocabulary"), "{err}");
    }
}
