//! Embeddings: an embeddings context over a loaded model ([`Model::embedder`]), batches of
//! inputs packed to fit it ([`pack`]), and llama.cpp's normalisations ([`Normalize`]).
//!
//! ```no_run
//! # use llama_host::{Model, EmbedParams, Normalize, Pooling};
//! # fn f(model: &Model) -> Result<(), Box<dyn std::error::Error>> {
//! let mut embedder = model.embedder(&EmbedParams { pooling: Some(Pooling::Mean), ..EmbedParams::default() })?;
//! let inputs = vec![model.tokenize("a sentence", true)?, model.tokenize("another", true)?];
//! let vectors = embedder.embed_all(&inputs, Normalize::EUCLIDEAN, |_| false)?;
//! # Ok(()) }
//! ```

use std::ops::Range;

use crate::ops::AbortHandle;
use crate::types::BackendError;

/// How a sequence's per-token states become its vector (llama.cpp's `--pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// No pooling: one vector per token.
    None,
    /// The mean over the sequence's tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// The last token's state.
    Last,
    /// A reranker's relevance score (needs a model with a classification head).
    Rank,
}

impl Pooling {
    pub const ALL: [Pooling; 5] = [Pooling::None, Pooling::Mean, Pooling::Cls, Pooling::Last, Pooling::Rank];
    pub const NAMES: [&'static str; 5] = ["none", "mean", "cls", "last", "rank"];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl std::str::FromStr for Pooling {
    type Err = crate::UnknownName;
    fn from_str(s: &str) -> Result<Self, crate::UnknownName> {
        Pooling::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| crate::UnknownName {
            what: "pooling type",
            value: s.to_string(),
            expected: &Pooling::NAMES,
        })
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sizes and threads of an embeddings context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedParams {
    /// Tokens one batch holds, and so the longest input. llama.cpp pools per micro-batch,
    /// so this is the batch, the micro-batch and the cache at once; its compute buffer
    /// grows with it (a generative model also computes its logits for every token: 1 MiB
    /// per token for a 262k vocabulary), hence llama.cpp's micro-batch default, 512.
    pub n_ctx: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    /// Most inputs in one batch.
    pub n_seq_max: u32,
    /// `None`: what the model file declares (no pooling when it declares nothing).
    pub pooling: Option<Pooling>,
    /// Flash attention; off by default: with it on an input's vector moves more with what
    /// else shares its batch (docs/ARCHITECTURE.md, "Embeddings").
    pub flash_attn: crate::FlashAttn,
    /// Whether the backend may skip the output layer; [`Model::embedder`] decides it from
    /// the file's tensors (`false` where layers follow the hidden state), whatever is set.
    ///
    /// [`Model::embedder`]: crate::Model::embedder
    pub may_skip_output: bool,
}

/// Most bytes llama.cpp's logits buffer of an embeddings context may take: it holds
/// `n_ctx × n_vocab` floats (llama.cpp reserves it whether or not the output layer runs),
/// 1 MiB per token for a 262k vocabulary.
pub const MAX_EMBED_LOGIT_BYTES: u64 = 2 << 30;

/// The most tokens an embeddings context may hold for a vocabulary of `n_vocab` tokens
/// ([`MAX_EMBED_LOGIT_BYTES`], and at most 65,536), a multiple of 4.
pub fn max_embed_tokens(n_vocab: i32) -> u32 {
    let per_token = u64::from(n_vocab.max(1) as u32) * 4;
    ((MAX_EMBED_LOGIT_BYTES / per_token).min(65_536) as u32 / 4 * 4).max(4)
}

/// Most inputs one batch may hold (llama.cpp's `LLAMA_MAX_SEQ`).
pub const MAX_EMBED_SEQS: u32 = 255;

impl Default for EmbedParams {
    fn default() -> Self {
        let t = crate::default_threads();
        EmbedParams { n_ctx: 512, n_threads: t, n_threads_batch: t, n_seq_max: 64, pooling: None, flash_attn: crate::FlashAttn::Off, may_skip_output: false }
    }
}

/// What an embeddings context settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedInfo {
    /// Tokens one batch holds (the longest input).
    pub n_ctx: u32,
    /// Inputs one batch holds.
    pub n_seq_max: u32,
    /// The pooling in effect (the model's own, when none was asked for).
    pub pooling: Pooling,
    /// Floats per vector (the embedding width; with rank pooling, the score count).
    pub n_out: usize,
}

/// An input the embeddings context cannot take, or a backend failure.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
    #[error("input {index} has {tokens} tokens; the limit is {limit} (raise the micro-batch size, -ub)")]
    InputTooLong { index: usize, tokens: usize, limit: u32 },
    #[error("input {index}: token id {token} is not in the vocabulary")]
    InvalidToken { index: usize, token: i32 },
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: String, reason: String },
    #[error(transparent)]
    Backend(BackendError),
}

impl From<BackendError> for EmbedError {
    fn from(e: BackendError) -> Self {
        match crate::error::invalid_param(e) {
            Ok((field, reason)) => EmbedError::InvalidParam { field, reason },
            Err(other) => EmbedError::Backend(other),
        }
    }
}

/// An embeddings context as the library sees it; the plugin's through `boundary.rs`.
pub trait EmbedderOps: Send {
    fn info(&self) -> EmbedInfo;
    fn abort_handle(&self) -> Box<dyn AbortHandle>;
    fn reset_abort(&mut self);
    /// One batch (the plugin ABI's `Embedder::embed`): rows of `n_out` floats one after
    /// another, one per input (per token without pooling), not normalised.
    fn embed(&mut self, tokens: &[i32], lengths: &[u32]) -> Result<Vec<f32>, BackendError>;
}

/// An embeddings context: decodes batches of inputs and returns their vectors.
pub struct Embedder {
    raw: Box<dyn EmbedderOps>,
    info: EmbedInfo,
    n_vocab: i32,
}

/// One input's result: its vector, or with no pooling one vector per token.
pub type Vectors = Vec<Vec<f32>>;

impl Embedder {
    pub(crate) fn new(raw: Box<dyn EmbedderOps>, n_vocab: i32) -> Embedder {
        let info = raw.info();
        Embedder { raw, info, n_vocab }
    }

    pub fn info(&self) -> EmbedInfo {
        self.info
    }

    /// A handle that aborts a batch in progress from any thread (until `reset_abort`).
    pub fn abort_handle(&self) -> Box<dyn AbortHandle> {
        self.raw.abort_handle()
    }

    pub fn reset_abort(&mut self) {
        self.raw.reset_abort()
    }

    /// Checks one input against this context: not empty, within `n_ctx`, every id in the
    /// vocabulary. `index` names it in the error.
    pub fn check_input(&self, index: usize, tokens: &[i32]) -> Result<(), EmbedError> {
        if tokens.is_empty() {
            return Err(EmbedError::EmptyInput { index });
        }
        if tokens.len() > self.info.n_ctx as usize {
            return Err(EmbedError::InputTooLong { index, tokens: tokens.len(), limit: self.info.n_ctx });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t < 0 || t >= self.n_vocab) {
            return Err(EmbedError::InvalidToken { index, token });
        }
        Ok(())
    }

    /// Decodes `inputs` as one batch (they must fit: see [`pack`]) and returns each
    /// input's vectors, normalised by `norm`.
    pub fn embed_batch(&mut self, inputs: &[&[i32]], norm: Normalize) -> Result<Vec<Vectors>, EmbedError> {
        for (i, t) in inputs.iter().enumerate() {
            self.check_input(i, t)?;
        }
        let lengths: Vec<u32> = inputs.iter().map(|t| t.len() as u32).collect();
        let tokens: Vec<i32> = inputs.concat();
        let flat = self.raw.embed(&tokens, &lengths)?;
        let n = self.info.n_out.max(1);
        let mut rows = flat.chunks_exact(n).map(|row| {
            let mut v = row.to_vec();
            norm.apply(&mut v);
            v
        });
        let per_input = |len: usize| if self.info.pooling == Pooling::None { len } else { 1 };
        let out: Vec<Vectors> = inputs.iter().map(|t| rows.by_ref().take(per_input(t.len())).collect()).collect();
        if out.iter().zip(inputs).any(|(v, t)| v.len() != per_input(t.len())) {
            return Err(EmbedError::Backend(BackendError::Decode { code: -1 }));
        }
        Ok(out)
    }

    /// Embeds any number of inputs, in batches that fit ([`pack`]), in order. Every input is
    /// checked before the first batch runs, so a bad one costs no decoding. `cancelled` is
    /// asked before each batch; when it says yes the error is `Backend(Aborted)`.
    pub fn embed_all(&mut self, inputs: &[Vec<i32>], norm: Normalize, mut cancelled: impl FnMut(usize) -> bool) -> Result<Vec<Vectors>, EmbedError> {
        for (i, t) in inputs.iter().enumerate() {
            self.check_input(i, t)?;
        }
        let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let mut out = Vec::with_capacity(inputs.len());
        for range in pack(&lens, self.info.n_ctx as usize, self.info.n_seq_max as usize) {
            if cancelled(range.start) {
                return Err(EmbedError::Backend(BackendError::Aborted));
            }
            let batch: Vec<&[i32]> = inputs[range].iter().map(Vec::as_slice).collect();
            out.extend(self.embed_batch(&batch, norm)?);
        }
        Ok(out)
    }
}

/// Splits inputs of these lengths, in order, into consecutive batches of at most `n_ctx`
/// tokens and `n_seq_max` inputs each (every length must be 1..=n_ctx).
pub fn pack(lens: &[usize], n_ctx: usize, n_seq_max: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &len) in lens.iter().enumerate() {
        if i > start && (tokens + len > n_ctx || i - start >= n_seq_max) {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += len;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// llama.cpp's `--embd-normalize`: -1 none, 0 max-absolute scaled to int16 (32760), 1
/// taxicab, 2 Euclidean, p > 2 the p-norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalize(i32);

impl Normalize {
    pub const NONE: Normalize = Normalize(-1);
    pub const MAX_ABS: Normalize = Normalize(0);
    pub const TAXICAB: Normalize = Normalize(1);
    pub const EUCLIDEAN: Normalize = Normalize(2);
    /// The largest p accepted: past it |x|^p overflows a double for ordinary values.
    pub const MAX_P: i32 = 64;

    /// llama.cpp's number for it; out of range is an error naming the range.
    pub fn new(n: i32) -> Result<Normalize, EmbedError> {
        if !(-1..=Self::MAX_P).contains(&n) {
            return Err(EmbedError::InvalidParam {
                field: "embd-normalize".into(),
                reason: format!("{n} is not -1 (none), 0 (max-absolute), 1 (taxicab), 2 (Euclidean) or a p-norm up to {}", Self::MAX_P),
            });
        }
        Ok(Normalize(n))
    }

    pub fn get(self) -> i32 {
        self.0
    }

    /// Normalises `v` in place, computing in f64 as llama.cpp's `common_embd_normalize`
    /// does; an all-zero vector stays zero.
    pub fn apply(self, v: &mut [f32]) {
        let sum: f64 = match self.0 {
            -1 => return,
            0 => v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs()))) / 32760.0,
            2 => v.iter().map(|&x| f64::from(x * x)).sum::<f64>().sqrt(),
            p => v.iter().map(|&x| f64::from(x.abs()).powi(p)).sum::<f64>().powf(1.0 / f64::from(p)),
        };
        let scale = if sum > 0.0 { (1.0 / sum) as f32 } else { 0.0 };
        for x in v {
            *x *= scale;
        }
    }
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::EUCLIDEAN
    }
}

/// Cosine similarity of two vectors of equal length (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let na: f64 = a.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&y| f64::from(y) * f64::from(y)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_respects_tokens_and_sequences_in_order() {
        assert_eq!(pack(&[3, 3, 3], 6, 10), vec![0..2, 2..3]);
        assert_eq!(pack(&[1, 1, 1, 1, 1], 100, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(pack(&[6, 1, 5], 6, 10), vec![0..1, 1..3]);
        assert_eq!(pack(&[], 6, 10), Vec::<Range<usize>>::new());
        let lens: Vec<usize> = (0..1000).map(|i| 1 + i % 7).collect();
        let batches = pack(&lens, 20, 8);
        assert_eq!(batches.first().map(|r| r.start), Some(0));
        assert_eq!(batches.last().map(|r| r.end), Some(1000));
        for w in batches.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in &batches {
            assert!(r.len() <= 8 && lens[r.clone()].iter().sum::<usize>() <= 20);
        }
    }

    #[test]
    fn normalisations_match_llama_cpp() {
        let mut v = vec![3.0, -4.0];
        Normalize::EUCLIDEAN.apply(&mut v);
        assert_eq!(v, vec![0.6, -0.8]);
        let mut v = vec![1.0, -3.0];
        Normalize::TAXICAB.apply(&mut v);
        assert_eq!(v, vec![0.25, -0.75]);
        let mut v = vec![1.0, -2.0];
        Normalize::MAX_ABS.apply(&mut v);
        assert_eq!(v, vec![16380.0, -32760.0]);
        let mut v = vec![1.0, -2.0];
        Normalize::NONE.apply(&mut v);
        assert_eq!(v, vec![1.0, -2.0]);
        let mut v = vec![3.0, 4.0];
        Normalize::new(3).unwrap().apply(&mut v);
        let n = (27.0f64 + 64.0).powf(1.0 / 3.0);
        assert!((f64::from(v[0]) - 3.0 / n).abs() < 1e-6 && (f64::from(v[1]) - 4.0 / n).abs() < 1e-6);
        let mut z = vec![0.0, 0.0];
        Normalize::EUCLIDEAN.apply(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
        assert!(Normalize::new(-2).is_err() && Normalize::new(65).is_err());
    }

    #[test]
    fn pooling_names_round_trip() {
        for p in Pooling::ALL {
            assert_eq!(p.as_str().parse::<Pooling>().unwrap(), p);
        }
        assert!("avg".parse::<Pooling>().unwrap_err().to_string().contains("mean"));
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 1.0]), 0.0);
    }
}
