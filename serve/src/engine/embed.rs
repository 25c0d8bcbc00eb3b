//! Embedding requests in the engine: admitted like generation (the same `slots + queue`
//! places, deadlines, cancellation, metrics), checked and tokenized before queueing, then
//! decoded by the engine thread on a second, embeddings-only context made on first use.
//! Each engine step runs at most one embedding batch (inputs of several queued requests
//! packed together, in arrival order) besides the generation step, so a large embedding
//! request never stalls the streams, and a stream never starves the embeddings.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llama_host::{EmbedParams, Embedder, Model, Normalize, Pooling};

use super::handle::CancelOnDrop;
use super::SubmitError;
use crate::metrics::{Metrics, Outcome};

/// Most inputs in one embedding request (OpenAI's own limit).
pub const MAX_EMBED_INPUTS: usize = 2048;
/// Most tokens in one embedding request, all inputs together: about a minute of work on a
/// small CPU, cancellable between batches.
pub const MAX_EMBED_TOKENS: usize = 65_536;

/// One input: text (tokenized with the model's special tokens, as llama-server does) or
/// token ids.
#[derive(Debug, Clone)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<i64>),
}

/// An embedding request.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub inputs: Vec<EmbedInput>,
    pub normalize: Normalize,
    /// Give up (an error) if not finished by then, queued or running.
    pub deadline: Option<Instant>,
}

/// The vectors, one per input in input order, and the tokens they took.
#[derive(Debug, Clone)]
pub struct EmbedOutput {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}

/// Why an admitted embedding request did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedFailure {
    #[error("cancelled")]
    Cancelled,
    #[error("the request's deadline passed")]
    Timeout,
    #[error("{0}")]
    Error(String),
}

/// An admitted embedding request; dropping it cancels.
pub struct EmbedHandle {
    pub(super) rx: flume::Receiver<Result<EmbedOutput, EmbedFailure>>,
    pub(super) _cancel: CancelOnDrop,
}

impl EmbedHandle {
    /// Waits for the vectors.
    pub async fn wait(self) -> Result<EmbedOutput, EmbedFailure> {
        self.rx.recv_async().await.unwrap_or(Err(EmbedFailure::Cancelled))
    }

    /// Waits for the vectors, blocking this thread.
    pub fn wait_blocking(self) -> Result<EmbedOutput, EmbedFailure> {
        self.rx.recv().unwrap_or(Err(EmbedFailure::Cancelled))
    }
}

/// How the engine embeds: the pooling it resolved at start, or why it cannot embed.
#[derive(Debug, Clone)]
pub(super) struct EmbedSetup {
    pub(super) pooling: Result<Pooling, String>,
    pub(super) params: EmbedParams,
}

impl EmbedSetup {
    /// The pooling asked for (`--pooling`, the model's config), else the one the model file
    /// declares; refused when it gives no single vector per input (none), or ranks.
    pub(super) fn new(model: &Model, asked: Option<Pooling>, params: EmbedParams) -> EmbedSetup {
        let how = "start the server with --pooling mean (or cls, last), or set pooling in the model's config entry";
        let pooling = match asked.or_else(|| declared_pooling(model)) {
            Some(p @ (Pooling::Mean | Pooling::Cls | Pooling::Last)) => Ok(p),
            Some(Pooling::Rank) => Err("rank pooling scores documents for reranking; it gives no embedding vectors".to_string()),
            Some(Pooling::None) if asked.is_some() => Err(format!("pooling none gives one vector per token, not one per input; {how}")),
            _ => Err(format!("the model declares no pooling (a generative model gives one vector per token); {how}")),
        };
        EmbedSetup { params: EmbedParams { pooling: pooling.as_ref().ok().copied(), ..params }, pooling }
    }
}

/// `<arch>.pooling_type` from the model file (llama.cpp's numbering).
fn declared_pooling(model: &Model) -> Option<Pooling> {
    let arch = model.meta("general.architecture")?;
    match model.meta(&format!("{arch}.pooling_type"))?.trim() {
        "0" => Some(Pooling::None),
        "1" => Some(Pooling::Mean),
        "2" => Some(Pooling::Cls),
        "3" => Some(Pooling::Last),
        "4" => Some(Pooling::Rank),
        _ => None,
    }
}

/// Checks and tokenizes a request's inputs (on the caller's thread: tokenizing costs time
/// that grows with the text). Every error names the input by its index.
pub(super) fn prepare(model: &Model, setup: &EmbedSetup, max_bytes: usize, req: &EmbedRequest) -> Result<Vec<Vec<i32>>, SubmitError> {
    if let Err(reason) = &setup.pooling {
        return Err(SubmitError::CannotEmbed { reason: reason.clone() });
    }
    if req.inputs.is_empty() {
        return Err(SubmitError::NoInput);
    }
    if req.inputs.len() > MAX_EMBED_INPUTS {
        return Err(SubmitError::TooManyInputs { count: req.inputs.len(), limit: MAX_EMBED_INPUTS });
    }
    let limit = setup.params.n_ctx as usize;
    let n_vocab = i64::from(model.info().n_vocab);
    let mut total = 0usize;
    let mut out = Vec::with_capacity(req.inputs.len());
    for (index, input) in req.inputs.iter().enumerate() {
        let tokens = match input {
            EmbedInput::Text(t) if t.is_empty() => return Err(SubmitError::EmptyInput { index }),
            EmbedInput::Text(t) if t.len() > max_bytes => return Err(SubmitError::InputTooLarge { index, bytes: t.len(), limit: max_bytes }),
            EmbedInput::Text(t) => model.tokenize(t, true).map_err(|e| SubmitError::InvalidParam { field: format!("input[{index}]"), reason: e.to_string() })?,
            EmbedInput::Tokens(ids) => {
                if ids.is_empty() {
                    return Err(SubmitError::EmptyInput { index });
                }
                if ids.len() > limit {
                    return Err(SubmitError::InputTooLong { index, tokens: ids.len(), limit });
                }
                let mut tokens = Vec::with_capacity(ids.len());
                for &id in ids {
                    if !(0..n_vocab).contains(&id) {
                        return Err(SubmitError::InvalidToken { index, token: id });
                    }
                    tokens.push(id as i32);
                }
                tokens
            }
        };
        if tokens.is_empty() {
            return Err(SubmitError::EmptyInput { index });
        }
        if tokens.len() > limit {
            return Err(SubmitError::InputTooLong { index, tokens: tokens.len(), limit });
        }
        total += tokens.len();
        if total > MAX_EMBED_TOKENS {
            return Err(SubmitError::TooManyTokens { limit: MAX_EMBED_TOKENS });
        }
        out.push(tokens);
    }
    Ok(out)
}

/// A queued embedding request on the engine thread.
pub(super) struct EmbedJob {
    pub(super) span: tracing::Span,
    pub(super) inputs: Vec<Vec<i32>>,
    pub(super) normalize: Normalize,
    pub(super) deadline: Option<Instant>,
    pub(super) submitted: Instant,
    pub(super) tx: flume::Sender<Result<EmbedOutput, EmbedFailure>>,
    pub(super) cancel: Arc<AtomicBool>,
    /// Vectors of the inputs done so far (the first `results.len()`).
    pub(super) results: Vec<Vec<f32>>,
    pub(super) started: Option<Instant>,
}

/// The engine thread's embedding side: its queue and its context.
pub(super) struct EmbedQueue {
    model: Arc<Model>,
    setup: EmbedSetup,
    jobs: VecDeque<EmbedJob>,
    /// Made on first use and kept: lent to the compute thread for each batch.
    embedder: Option<Embedder>,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicUsize>,
}

impl EmbedQueue {
    pub(super) fn new(model: Arc<Model>, setup: EmbedSetup, metrics: Arc<Metrics>, in_flight: Arc<AtomicUsize>) -> EmbedQueue {
        EmbedQueue { model, setup, jobs: VecDeque::new(), embedder: None, metrics, in_flight }
    }

    pub(super) fn push(&mut self, job: EmbedJob) {
        self.jobs.push_back(job);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Ends a job: accounting first (a client that has its answer may submit again at
    /// once and must find its admission place free), then the answer.
    fn end(&self, job: EmbedJob, result: Result<EmbedOutput, EmbedFailure>) {
        let outcome = match &result {
            Ok(_) => Outcome::Embedded,
            Err(EmbedFailure::Cancelled) => Outcome::Cancelled,
            Err(EmbedFailure::Timeout) => Outcome::Timeout,
            Err(EmbedFailure::Error(_)) => Outcome::Error,
        };
        self.metrics.count(outcome);
        if job.started.is_none() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.metrics.active_sequences.fetch_sub(1, Ordering::Relaxed);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        job.span.in_scope(|| tracing::info!(?outcome, inputs = job.inputs.len(), total_ms = job.submitted.elapsed().as_secs_f64() * 1e3, "embedding finished"));
        let _ = job.tx.try_send(result);
    }

    /// Ends cancelled and timed-out jobs (queued or part-done).
    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        let (keep, gone): (VecDeque<EmbedJob>, VecDeque<EmbedJob>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|j| !(j.cancel.load(Ordering::SeqCst) || j.tx.is_disconnected() || j.deadline.is_some_and(|d| now >= d)));
        self.jobs = keep;
        for job in gone {
            let timed_out = job.deadline.is_some_and(|d| now >= d) && !job.cancel.load(Ordering::SeqCst);
            self.end(job, Err(if timed_out { EmbedFailure::Timeout } else { EmbedFailure::Cancelled }));
        }
    }

    /// Ends every job (shutdown).
    pub(super) fn cancel_all(&mut self) {
        for job in std::mem::take(&mut self.jobs) {
            self.end(job, Err(EmbedFailure::Cancelled));
        }
    }

    /// Runs one batch: the next inputs in arrival order, as many as fit. The context is
    /// made first if there is none; when that fails every queued job ends with the reason.
    /// `budget`: the most tokens this batch may take (the engine gives less while streams
    /// generate, so one embedding batch never holds them up for long).
    pub(super) fn step(&mut self, budget: u32) {
        if self.jobs.is_empty() {
            return;
        }
        if self.embedder.is_none() {
            match self.model.embedder(&self.setup.params) {
                Ok(e) => {
                    let i = e.info();
                    tracing::info!(pooling = %i.pooling, n_ctx = i.n_ctx, n_seq_max = i.n_seq_max, n_embd = i.n_out, "embeddings context created");
                    self.embedder = Some(e);
                }
                Err(e) => {
                    let reason = format!("the model cannot compute embeddings: {e}");
                    tracing::warn!("{reason}");
                    for job in std::mem::take(&mut self.jobs) {
                        self.end(job, Err(EmbedFailure::Error(reason.clone())));
                    }
                    return;
                }
            }
        }
        let mut embedder = self.embedder.take().expect("made above");
        let info = embedder.info();
        // (job, first input, count) runs in batch order.
        let mut picks = fill(&self.jobs, info.n_ctx.min(budget) as usize, info.n_seq_max as usize);
        if picks.is_empty() {
            // The oldest job's next input is longer than the budget: it goes alone, so a
            // long input still gets through while streams generate.
            picks = fill(&self.jobs, info.n_ctx as usize, 1);
        }
        if picks.is_empty() {
            self.embedder = Some(embedder);
            return;
        }
        let tokens: usize = picks.iter().map(|&(j, first, n)| self.jobs[j].inputs[first..first + n].iter().map(Vec::len).sum::<usize>()).sum();
        let now = Instant::now();
        for &(j, _, _) in &picks {
            let job = &mut self.jobs[j];
            if job.started.is_none() {
                job.started = Some(now);
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.metrics.active_sequences.fetch_add(1, Ordering::Relaxed);
                self.metrics.queue_wait.observe(now.duration_since(job.submitted).as_secs_f64());
            }
        }
        let batch: Vec<Vec<i32>> = picks.iter().flat_map(|&(j, first, n)| self.jobs[j].inputs[first..first + n].iter().cloned()).collect();
        let norms: Vec<Normalize> = picks.iter().flat_map(|&(j, _, n)| std::iter::repeat(self.jobs[j].normalize).take(n)).collect();
        let t = Instant::now();
        // On the process's compute thread, as every decode (`compute.rs`); the context is
        // lent and comes back. Normalisation differs per request, so it is applied here.
        let (embedder, result) = super::compute::run(move || {
            let refs: Vec<&[i32]> = batch.iter().map(Vec::as_slice).collect();
            let r = embedder.embed_batch(&refs, Normalize::NONE);
            (embedder, r)
        });
        self.embedder = Some(embedder);
        self.metrics.busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(vectors) => {
                self.metrics.embedded_inputs.fetch_add(vectors.len() as u64, Ordering::Relaxed);
                self.metrics.prompt_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
                let mut vectors = vectors.into_iter().zip(norms);
                for &(j, _, n) in &picks {
                    for (mut rows, norm) in vectors.by_ref().take(n) {
                        let mut v = rows.pop().unwrap_or_default();
                        norm.apply(&mut v);
                        self.jobs[j].results.push(v);
                    }
                }
            }
            Err(e) => {
                let reason = format!("embedding failed: {e}");
                tracing::warn!("{reason}");
                // The batch's jobs fail; the others were not in it and carry on.
                let failed: Vec<usize> = picks.iter().map(|p| p.0).collect();
                for j in failed.into_iter().rev() {
                    let job = self.jobs.remove(j).expect("picked jobs are queued");
                    self.end(job, Err(EmbedFailure::Error(reason.clone())));
                }
                return;
            }
        }
        // Finished jobs answer.
        let mut j = 0;
        while j < self.jobs.len() {
            if self.jobs[j].results.len() == self.jobs[j].inputs.len() {
                let mut job = self.jobs.remove(j).expect("in range");
                let prompt_tokens = job.inputs.iter().map(Vec::len).sum();
                let vectors = std::mem::take(&mut job.results);
                self.end(job, Ok(EmbedOutput { vectors, prompt_tokens }));
            } else {
                j += 1;
            }
        }
    }
}

/// The inputs of one batch: (job, first input, count) per job, taking one input from each
/// queued job in turn (oldest first) while they fit `n_ctx` tokens and `n_seq_max` inputs,
/// so a large request cannot hold back the small ones queued after it: each gets its share
/// of every batch. A job's inputs are taken in order. A job whose next input does not fit
/// takes no more this batch; the others go on filling it.
fn fill(jobs: &VecDeque<EmbedJob>, n_ctx: usize, n_seq_max: usize) -> Vec<(usize, usize, usize)> {
    let lens: Vec<Vec<usize>> = jobs.iter().map(|j| j.inputs[j.results.len()..].iter().map(Vec::len).collect()).collect();
    fill_lens(&lens, n_ctx, n_seq_max).into_iter().map(|(j, _, n)| (j, jobs[j].results.len(), n)).collect()
}

/// [`fill`] over the remaining inputs' lengths of each job.
fn fill_lens(lens: &[Vec<usize>], n_ctx: usize, n_seq_max: usize) -> Vec<(usize, usize, usize)> {
    let mut taken = vec![0usize; lens.len()];
    let mut open = vec![true; lens.len()];
    let (mut tokens, mut seqs) = (0usize, 0usize);
    while seqs < n_seq_max && open.iter().any(|&o| o) {
        for j in 0..lens.len() {
            if !open[j] || seqs >= n_seq_max {
                continue;
            }
            match lens[j].get(taken[j]) {
                Some(&len) if tokens + len <= n_ctx => {
                    tokens += len;
                    seqs += 1;
                    taken[j] += 1;
                }
                _ => open[j] = false,
            }
        }
    }
    (0..lens.len()).filter(|&j| taken[j] > 0).map(|j| (j, 0, taken[j])).collect()
}

#[cfg(test)]
mod tests {
    use super::fill_lens;

    #[test]
    fn a_large_request_shares_each_batch_with_the_small_ones_behind_it() {
        let big = vec![10usize; 1000];
        let small = vec![3usize];
        // 100 tokens: the small request gets its input in the first batch.
        let picks = fill_lens(&[big.clone(), small.clone()], 100, 64);
        assert_eq!(picks, vec![(0, 0, 9), (1, 0, 1)]);
        // Inputs are bounded too.
        assert_eq!(fill_lens(&[big.clone(), big.clone()], 10_000, 5), vec![(0, 0, 3), (1, 0, 2)]);
        // A job whose next input does not fit stops; the rest still fill.
        assert_eq!(fill_lens(&[vec![90, 90], vec![5, 5, 5]], 100, 64), vec![(0, 0, 1), (1, 0, 2)]);
        // Nothing fits: nothing is picked.
        assert_eq!(fill_lens(&[vec![200]], 100, 64), vec![]);
        assert_eq!(fill_lens(&[], 100, 64), vec![]);
    }
}
