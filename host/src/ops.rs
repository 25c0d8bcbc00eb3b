//! What a loaded model and an inference context can do, as traits of plain Rust types.
//!
//! A backend plugin's model and context implement these through `boundary.rs`; tests
//! implement them with fakes, so the rules of sessions and the engine are tested without a
//! model file or a plugin (`Model::from_ops`).

use crate::types::{BackendError, BatchToken, ContextParams, Grammar, ModelInfo, SampleRequest, Sampled, SamplingParams};

/// A loaded model: tokenizer, weights, contexts.
pub trait ModelOps: Send + Sync {
    fn info(&self) -> ModelInfo;

    /// Bytes exchanged with each RPC server the model lives on (none by default).
    fn rpc_traffic(&self) -> Vec<crate::RpcTraffic> {
        Vec::new()
    }

    /// The RPC server this model lost, if any: it cannot compute until loaded again.
    fn lost(&self) -> Option<BackendError> {
        None
    }

    /// Text to token ids. `add_special` adds BOS where the model wants it; `parse_special`
    /// turns `<start_of_turn>`-style text into control tokens.
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, BackendError>;

    /// The bytes of one token (may be an incomplete UTF-8 sequence). `special` renders
    /// control tokens as their text instead of nothing.
    fn token_bytes(&self, token: i32, special: bool) -> Result<Vec<u8>, BackendError>;

    /// A GGUF metadata value as a string, if the key exists.
    fn meta(&self, key: &str) -> Option<String>;

    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn ContextOps>, BackendError>;

    /// Builds (and frees) the sampler for `grammar` against this model's vocabulary:
    /// `InvalidParam` (field `grammar`) when it is out of bounds or does not parse. The
    /// default checks the bounds only (for models with no grammar engine, such as fakes).
    fn check_grammar(&self, grammar: &Grammar) -> Result<(), BackendError> {
        crate::boundary::validate_grammar(grammar)
    }

    /// A new embeddings context. The default refuses (a model with no embeddings, such as
    /// a fake that does not implement them).
    fn new_embedder(&self, params: &crate::embed::EmbedParams) -> Result<Box<dyn crate::embed::EmbedderOps>, BackendError> {
        let _ = params;
        Err(BackendError::InvalidParam { field: "pooling".into(), reason: "this model computes no embeddings".into() })
    }
}

/// Aborts a context's decoding from another thread.
pub trait AbortHandle: Send + Sync {
    fn abort(&self);
}

/// One inference context (KV cache + samplers), used by one thread at a time. The method
/// contracts are the plugin ABI's (`llama-plugin-api`'s `Context`).
pub trait ContextOps: Send {
    /// Context length in tokens.
    fn n_ctx(&self) -> u32;
    /// Tokens currently held in the KV cache (sequence 0).
    fn n_past(&self) -> u32;
    /// Forgets everything in the KV cache and resets the sampler.
    fn clear(&mut self);
    /// Keeps the first `n_keep` tokens; false when the cache cannot drop just the rest.
    fn truncate(&mut self, n_keep: u32) -> bool;
    /// Adds tokens to the sampler's history without decoding.
    fn accept(&mut self, tokens: &[i32]);
    /// A handle that aborts this context's decoding from any thread, until `reset_abort`.
    fn abort_handle(&self) -> Box<dyn AbortHandle>;
    fn reset_abort(&mut self);
    /// Sequences this context holds at once.
    fn n_seq_max(&self) -> u32;
    /// Replaces the sampler of sequence `seq`; `history` feeds its repetition penalties.
    fn set_seq_sampling(&mut self, seq: i32, params: &SamplingParams, history: &[i32]) -> Result<(), BackendError>;
    /// One decode step over several sequences: decodes `batch` and samples each request
    /// in `samples`, in order. The outer error fails the whole step; otherwise there is
    /// exactly one result per request, and a sequence whose sampling failed (a grammar dead
    /// end) has its own error there while the others were sampled.
    fn step(&mut self, batch: &[BatchToken], samples: &[SampleRequest]) -> Result<Vec<Result<Sampled, BackendError>>, BackendError>;
    /// A draft model's drafting: decodes `tokens` into `seq` at `pos..` (after dropping
    /// what it held from `pos` on), then up to `n_max` greedy tokens while their
    /// probability is at least `p_min`; the drafts leave the cache again.
    fn draft(&mut self, seq: i32, tokens: &[i32], pos: i32, n_max: u32, p_min: f32) -> Result<Vec<i32>, BackendError>;
    /// Removes positions `[p0, p1)` of `seq` (`p1 < 0`: to the end); false if it cannot.
    fn seq_remove(&mut self, seq: i32, p0: i32, p1: i32) -> bool;
    /// The last position `seq` holds, or -1.
    fn seq_pos_max(&self, seq: i32) -> i32;
    /// Whether `seq` can continue at position `pos`.
    fn seq_can_continue(&self, seq: i32, pos: i32) -> bool;
    /// Replaces the sampler chain (sequence 0).
    fn set_sampling(&mut self, params: &SamplingParams) -> Result<(), BackendError>;
    /// Appends tokens to the KV cache without sampling; logits for the last when asked.
    fn decode(&mut self, tokens: &[i32], logits_last: bool) -> Result<(), BackendError>;
    /// Appends `tokens` and samples the next token from the last position.
    fn decode_sample(&mut self, tokens: &[i32]) -> Result<Sampled, BackendError>;
}
