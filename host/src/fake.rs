//! A model and context in plain Rust, for tests: sessions and the engine run over it
//! exactly as over a backend plugin (through [`ModelOps`]/[`ContextOps`]), without a model
//! file, a plugin or llama.cpp, and it can be told to misbehave the ways a backend might.
//!
//! The fake's vocabulary is bytes: the text "abc" is tokens `[97, 98, 99]`, token `t` is
//! the byte `t`. It "generates" by repeating the text of [`FakeBehaviour::reply`] and then
//! an end-of-generation token (256).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::ops::{AbortHandle, ContextOps, ModelOps};
use crate::types::{BackendError, BatchToken, ContextParams, ModelInfo, SampleRequest, Sampled, SamplingParams};
use crate::Model;

/// The fake's end-of-generation token.
pub const EOG: i32 = 256;

/// How the fake behaves; shared, so a test can change it while an engine runs.
#[derive(Debug, Default)]
pub struct FakeBehaviour {
    /// What each sequence generates before its end-of-generation token (empty: it never
    /// ends by itself).
    pub reply: Mutex<Vec<u8>>,
    /// `step` returns this many fewer sampled tokens than asked for (a broken backend).
    pub short_samples: AtomicUsize,
    /// `token_bytes` fails.
    pub fail_token_bytes: AtomicBool,
    /// `step` fails with a decode error.
    pub fail_step: AtomicBool,
    /// `step` fails the sampling of every sequence holding this token (as a grammar dead
    /// end fails one sequence of a step), and samples the others.
    pub fail_sample_on: Mutex<Option<i32>>,
    /// Calls of `tokenize`, to check what work a refused request cost.
    pub tokenize_calls: AtomicUsize,
    /// Tokens decoded by all contexts (prompts and generated tokens).
    pub decoded_tokens: AtomicUsize,
}

/// The fake model. `FakeModel::new().into_model()` is a [`Model`].
pub struct FakeModel {
    pub behaviour: Arc<FakeBehaviour>,
}

impl FakeModel {
    pub fn new(reply: &str) -> FakeModel {
        let b = FakeBehaviour::default();
        *b.reply.lock().expect("fresh") = reply.as_bytes().to_vec();
        FakeModel { behaviour: Arc::new(b) }
    }

    /// The model, and the handle that steers it.
    pub fn into_model(self) -> (Model, Arc<FakeBehaviour>) {
        let b = self.behaviour.clone();
        (Model::from_ops(Box::new(self), "fake.gguf"), b)
    }
}

impl ModelOps for FakeModel {
    fn info(&self) -> ModelInfo {
        ModelInfo { description: "fake byte model".into(), n_params: 0, size_bytes: 0, n_vocab: 257, n_ctx_train: 1 << 20, bos: -1, placement: Vec::new() }
    }
    fn tokenize(&self, text: &str, _add_special: bool, _parse_special: bool) -> Result<Vec<i32>, BackendError> {
        self.behaviour.tokenize_calls.fetch_add(1, Ordering::SeqCst);
        Ok(text.bytes().map(i32::from).collect())
    }
    fn token_bytes(&self, token: i32, _special: bool) -> Result<Vec<u8>, BackendError> {
        if self.behaviour.fail_token_bytes.load(Ordering::SeqCst) {
            return Err(BackendError::InvalidToken { token });
        }
        match u8::try_from(token) {
            Ok(b) => Ok(vec![b]),
            Err(_) => Ok(Vec::new()),
        }
    }
    fn meta(&self, _key: &str) -> Option<String> {
        None
    }
    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn ContextOps>, BackendError> {
        Ok(Box::new(FakeContext { behaviour: self.behaviour.clone(), n_ctx: params.size.n_ctx, n_seq: params.n_seq_max, seqs: HashMap::new(), aborted: Arc::default() }))
    }
}

struct FakeAbort(Arc<AtomicBool>);

impl AbortHandle for FakeAbort {
    fn abort(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
}

/// A fake context: per sequence, the tokens it holds and how far into the reply it is.
struct FakeContext {
    behaviour: Arc<FakeBehaviour>,
    n_ctx: u32,
    n_seq: u32,
    seqs: HashMap<i32, (Vec<i32>, usize)>,
    aborted: Arc<AtomicBool>,
}

impl FakeContext {
    fn next(&mut self, seq: i32) -> Sampled {
        let reply = self.behaviour.reply.lock().expect("not poisoned").clone();
        let (_, at) = self.seqs.entry(seq).or_default();
        if reply.is_empty() {
            return Sampled { token: i32::from(b'x'), is_eog: false, accepted: 0 };
        }
        let s = match reply.get(*at) {
            Some(&b) => Sampled { token: i32::from(b), is_eog: false, accepted: 0 },
            None => Sampled { token: EOG, is_eog: true, accepted: 0 },
        };
        *at += 1;
        s
    }

    /// The reply's next tokens, accepting the drafts that match them (the backend's rule);
    /// the rejected drafts leave the sequence.
    fn verify(&mut self, batch: &[BatchToken], s: &SampleRequest) -> Sampled {
        let mut accepted = 0;
        loop {
            let next = self.next(s.seq);
            let draft = (accepted < s.n_draft).then(|| batch[(s.index as u32 + 1 + accepted) as usize]);
            if next.is_eog || draft.map(|d| d.token) != Some(next.token) {
                if let Some(d) = draft {
                    self.seq_remove(s.seq, d.pos, -1);
                }
                return Sampled { accepted, ..next };
            }
            accepted += 1;
        }
    }

    fn append(&mut self, seq: i32, tokens: &[i32]) -> Result<(), BackendError> {
        let held: usize = self.seqs.values().map(|(t, _)| t.len()).sum();
        if held + tokens.len() > self.n_ctx as usize {
            return Err(BackendError::ContextFull { n_ctx: self.n_ctx, needed: (held + tokens.len()) as u32 });
        }
        self.behaviour.decoded_tokens.fetch_add(tokens.len(), Ordering::SeqCst);
        self.seqs.entry(seq).or_default().0.extend_from_slice(tokens);
        Ok(())
    }
}

impl ContextOps for FakeContext {
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }
    fn n_past(&self) -> u32 {
        self.seqs.get(&0).map_or(0, |(t, _)| t.len() as u32)
    }
    fn clear(&mut self) {
        self.seqs.clear();
    }
    fn truncate(&mut self, n_keep: u32) -> bool {
        if let Some((t, at)) = self.seqs.get_mut(&0) {
            t.truncate(n_keep as usize);
            *at = 0;
        }
        true
    }
    fn accept(&mut self, _tokens: &[i32]) {}
    fn abort_handle(&self) -> Box<dyn AbortHandle> {
        Box::new(FakeAbort(self.aborted.clone()))
    }
    fn reset_abort(&mut self) {
        self.aborted.store(false, Ordering::SeqCst);
    }
    fn n_seq_max(&self) -> u32 {
        self.n_seq
    }
    fn set_seq_sampling(&mut self, seq: i32, params: &SamplingParams, _history: &[i32]) -> Result<(), BackendError> {
        if let Err(e) = params.validate() {
            return Err(BackendError::InvalidParam { field: e.field.into(), reason: e.reason });
        }
        self.seqs.entry(seq).or_default().1 = 0;
        Ok(())
    }
    fn step(&mut self, batch: &[BatchToken], samples: &[SampleRequest]) -> Result<Vec<Result<Sampled, BackendError>>, BackendError> {
        if self.behaviour.fail_step.load(Ordering::SeqCst) {
            return Err(BackendError::Decode { code: -3 });
        }
        for t in batch {
            self.append(t.seq, &[t.token])?;
        }
        let n = samples.len().saturating_sub(self.behaviour.short_samples.load(Ordering::SeqCst));
        let poison = *self.behaviour.fail_sample_on.lock().expect("not poisoned");
        Ok(samples[..n]
            .iter()
            .map(|s| {
                let held = self.seqs.get(&s.seq).map_or(&[][..], |(t, _)| t.as_slice());
                match poison {
                    Some(p) if held.contains(&p) => Err(BackendError::InvalidParam {
                        field: "grammar".into(),
                        reason: format!("sequence {}: the grammar admits no token here (a dead end)", s.seq),
                    }),
                    _ => Ok(self.verify(batch, s)),
                }
            })
            .collect())
    }
    fn draft(&mut self, seq: i32, tokens: &[i32], pos: i32, _n_max: u32, _p_min: f32) -> Result<Vec<i32>, BackendError> {
        self.seq_remove(seq, pos, -1);
        self.append(seq, tokens)?;
        Ok(Vec::new())
    }
    fn seq_remove(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        if let Some((t, _)) = self.seqs.get_mut(&seq) {
            let p0 = (p0.max(0) as usize).min(t.len());
            let p1 = if p1 < 0 { t.len() } else { (p1 as usize).min(t.len()) };
            t.drain(p0..p1.max(p0));
        }
        true
    }
    fn seq_pos_max(&self, seq: i32) -> i32 {
        self.seqs.get(&seq).map_or(-1, |(t, _)| t.len() as i32 - 1)
    }
    fn seq_can_continue(&self, _seq: i32, _pos: i32) -> bool {
        true
    }
    fn set_sampling(&mut self, params: &SamplingParams) -> Result<(), BackendError> {
        self.set_seq_sampling(0, params, &[])
    }
    fn decode(&mut self, tokens: &[i32], _logits_last: bool) -> Result<(), BackendError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(BackendError::Aborted);
        }
        self.append(0, tokens)
    }
    fn decode_sample(&mut self, tokens: &[i32]) -> Result<Sampled, BackendError> {
        self.decode(tokens, true)?;
        Ok(self.next(0))
    }
}
