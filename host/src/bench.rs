//! `llama bench`: prompt processing (pp) and token generation (tg) throughput, measured
//! the way llama.cpp's llama-bench does so the two can be compared: pp decodes `n_prompt`
//! random tokens in `n_batch` chunks, tg decodes `n_gen` tokens one at a time; each test
//! gets its own context, a warm-up run first, then `reps` timed runs from an empty cache.

use std::time::Instant;

use abi_stable::std_types::RSlice;
use llama_plugin_api::ContextParams;

use crate::error::SessionError;
use crate::Model;

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub n_prompt: u32,
    pub n_gen: u32,
    pub reps: u32,
    pub n_threads: i32,
    pub n_batch: u32,
    pub n_ubatch: u32,
}

/// Mean and standard deviation of tokens/s over the repetitions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    pub tokens: u32,
    pub tokens_per_s: f64,
    pub stddev: f64,
    pub samples: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub pp: Option<Throughput>,
    pub tg: Option<Throughput>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("decode failed during the benchmark: {0}")]
    Decode(#[from] llama_plugin_api::BackendError),
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: &'static str, reason: String },
}

/// A small deterministic generator: the token ids only need to be valid, not meaningful.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: i32) -> i32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n.max(1) as u64) as i32
    }
}

fn summarize(tokens: u32, samples: Vec<f64>) -> Throughput {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64
    } else {
        0.0
    };
    Throughput { tokens, tokens_per_s: mean, stddev: var.sqrt(), samples }
}

pub fn run(model: &Model, p: &BenchParams) -> Result<BenchResult, BenchError> {
    if p.reps == 0 {
        return Err(BenchError::InvalidParam { field: "reps", reason: "must be at least 1".into() });
    }
    let n_vocab = model.info().n_vocab;
    let bos = model.info().bos;
    let mut rng = Lcg(42);
    let ctx_params = |n_ctx: u32| ContextParams {
        n_ctx,
        n_batch: p.n_batch,
        n_ubatch: p.n_ubatch,
        n_threads: p.n_threads,
        n_threads_batch: p.n_threads,
        n_seq_max: 1,
    };
    let mut result = BenchResult { pp: None, tg: None };

    if p.n_prompt > 0 {
        let mut ctx = model.new_context(ctx_params(p.n_prompt))?;
        let mut prompt: Vec<i32> = (0..p.n_prompt).map(|_| rng.next(n_vocab)).collect();
        if bos >= 0 {
            prompt[0] = bos;
        }
        // Warm-up, as llama-bench does: first-touch costs are not measured.
        ctx.decode(RSlice::from_slice(&prompt), true).into_result()?;
        let mut samples = Vec::new();
        for _ in 0..p.reps {
            ctx.clear();
            let t = Instant::now();
            ctx.decode(RSlice::from_slice(&prompt), true).into_result()?;
            samples.push(p.n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        result.pp = Some(summarize(p.n_prompt, samples));
    }

    if p.n_gen > 0 {
        let mut ctx = model.new_context(ctx_params(p.n_gen))?;
        let first = if bos >= 0 { bos } else { rng.next(n_vocab) };
        ctx.decode(RSlice::from_slice(&[first]), true).into_result()?;
        let mut samples = Vec::new();
        for _ in 0..p.reps {
            ctx.clear();
            let mut token = first;
            let t = Instant::now();
            for _ in 0..p.n_gen {
                ctx.decode(RSlice::from_slice(&[token]), true).into_result()?;
                token = rng.next(n_vocab);
            }
            samples.push(p.n_gen as f64 / t.elapsed().as_secs_f64());
        }
        result.tg = Some(summarize(p.n_gen, samples));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_mean_and_sample_stddev() {
        let s = summarize(10, vec![10.0, 20.0, 30.0]);
        assert!((s.tokens_per_s - 20.0).abs() < 1e-9);
        assert!((s.stddev - 10.0).abs() < 1e-9);
    }

    #[test]
    fn random_tokens_stay_in_the_vocabulary() {
        let mut r = Lcg(1);
        assert!((0..1000).map(|_| r.next(7)).all(|t| (0..7).contains(&t)));
    }
}
