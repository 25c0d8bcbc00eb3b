//! `llama bench`: prompt processing (pp) and token generation (tg) throughput, measured
//! the way llama.cpp's llama-bench does so the two can be compared: pp decodes `n_prompt`
//! random tokens in `n_batch` chunks, tg decodes `n_gen` tokens one at a time; each test
//! gets its own context, a warm-up run first, then `reps` timed runs from an empty cache.

use std::time::Instant;

use llama_host::{BackendError, ContextParams, ContextSize, KvCacheParams, Model, SessionError};

use crate::engine::{Engine, EngineConfig, StartError};

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub n_prompt: u32,
    pub n_gen: u32,
    pub reps: u32,
    /// Threads and batch sizes; `n_ctx` is set per test (as llama-bench does).
    pub size: ContextSize,
    /// KV cache types and flash attention (llama-bench's `-ctk`, `-ctv`, `-fa`).
    pub cache: KvCacheParams,
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
    Decode(#[from] BackendError),
    #[error(transparent)]
    Engine(#[from] StartError),
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: &'static str, reason: String },
    #[error("cannot read the speculation workload {} (--spec-workloads names their directory)", path.display())]
    Workload { path: std::path::PathBuf, #[source] source: std::io::Error },
    #[error("a benchmark request failed: {0}")]
    Request(String),
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

/// Measures pp and tg, on a thread of its own that ends with the measurement.
///
/// Why a thread: llama.cpp's thread pool (OpenMP) belongs to the thread that decodes, and
/// lives until that thread ends. Left on the caller's thread, its idle worker still counts
/// among the process's OpenMP threads; with an engine's team alongside, there are more of
/// them than cores, and libgomp then stops spinning at its barriers and sleeps instead: the
/// engine measured afterwards ran at about 0.6x its speed (one stream 30.6 against 48.5
/// tokens/s here). The same holds for anything in a process that decodes on more than one
/// long-lived thread.
pub fn run(model: &Model, p: &BenchParams) -> Result<BenchResult, BenchError> {
    std::thread::scope(|s| s.spawn(|| run_here(model, p)).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

fn run_here(model: &Model, p: &BenchParams) -> Result<BenchResult, BenchError> {
    if p.reps == 0 {
        return Err(BenchError::InvalidParam { field: "reps", reason: "must be at least 1".into() });
    }
    let n_vocab = model.info().n_vocab;
    let bos = model.info().bos;
    let mut rng = Lcg(42);
    let ctx_params = |n_ctx: u32| ContextParams { size: ContextSize { n_ctx, ..p.size }, cache: p.cache, ..ContextParams::default() };
    let mut result = BenchResult { pp: None, tg: None };

    if p.n_prompt > 0 {
        let mut ctx = model.new_context(&ctx_params(p.n_prompt))?;
        let mut prompt: Vec<i32> = (0..p.n_prompt).map(|_| rng.next(n_vocab)).collect();
        if bos >= 0 {
            prompt[0] = bos;
        }
        // Warm-up, as llama-bench does: first-touch costs are not measured.
        ctx.decode(&prompt, true)?;
        let mut samples = Vec::new();
        for _ in 0..p.reps {
            ctx.clear();
            let t = Instant::now();
            ctx.decode(&prompt, true)?;
            samples.push(p.n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        result.pp = Some(summarize(p.n_prompt, samples));
    }

    if p.n_gen > 0 {
        let mut ctx = model.new_context(&ctx_params(p.n_gen))?;
        let first = if bos >= 0 { bos } else { rng.next(n_vocab) };
        ctx.decode(&[first], true)?;
        let mut samples = Vec::new();
        for _ in 0..p.reps {
            ctx.clear();
            let mut token = first;
            let t = Instant::now();
            for _ in 0..p.n_gen {
                ctx.decode(&[token], true)?;
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

    #[test]
    fn first_difference_is_the_first_differing_byte_or_the_shorter_length() {
        assert_eq!(first_difference("abc", "abc"), None);
        assert_eq!(first_difference("abc", "abd"), Some(2));
        assert_eq!(first_difference("ab", "abc"), Some(2));
    }

    #[test]
    fn generation_rate_leaves_out_the_first_token_and_the_prompt() {
        use std::time::Duration;
        let stats = crate::engine::RequestStats {
            id: 0,
            prompt_tokens: 10,
            cached_tokens: 0,
            generated_tokens: 11,
            queue_wait: Duration::ZERO,
            time_to_first_token: Some(Duration::from_secs(3)),
            total: Duration::from_secs(5),
            finish: crate::engine::Finish::Length,
            error: None,
            stop_sequence: None,
            spec: Default::default(),
        };
        assert!((generation_rate(&stats) - 5.0).abs() < 1e-9);
        assert_eq!(generation_rate(&crate::engine::RequestStats { generated_tokens: 1, ..stats }), 0.0);
    }
}

/// Aggregate generation throughput with `streams` concurrent requests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConcurrentResult {
    pub streams: u32,
    /// Batched: all streams in one engine with `streams` slots.
    pub tokens_per_s: f64,
    /// The same requests one at a time (one slot), for comparison.
    pub sequential_tokens_per_s: f64,
    pub generated_tokens: usize,
}

/// Time to first token of a prompt sharing a long prefix with the previous one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefixReuse {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub ttft_with_reuse_ms: f64,
    pub ttft_without_reuse_ms: f64,
}

#[derive(Debug, Clone)]
pub struct ConcurrentParams {
    pub streams: Vec<u32>,
    /// New tokens per stream.
    pub n_gen: u32,
    /// Threads and batch sizes; `n_ctx` is sized per engine.
    pub size: ContextSize,
    /// Engines in batch-invariant mode (the model must be loaded without repacking).
    pub batch_invariant: bool,
    /// KV cache types and flash attention of every engine.
    pub cache: KvCacheParams,
}

const TOPICS: [&str; 8] = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how bread is baked.",
    "Describe the history of the bicycle.",
    "Tell me everything about the moon.",
    "Write a long letter to a friend about a journey.",
    "Explain how rivers shape valleys.",
    "Describe a day in a busy market.",
    "Tell a long tale about a clever fox.",
];

fn engine_for(model: &std::sync::Arc<Model>, slots: u32, p: &ConcurrentParams, prefix_cache: bool) -> Result<Engine, BenchError> {
    let per_slot = 256u32.saturating_add(p.n_gen).next_multiple_of(256).max(512);
    let config = EngineConfig {
        slots,
        queue: 64,
        size: ContextSize { n_ctx: slots.saturating_mul(per_slot), ..p.size },
        stream_capacity: 64,
        prefix_cache,
        batch_invariant: p.batch_invariant,
        cache: p.cache,
        ..EngineConfig::default()
    };
    Ok(Engine::start(model.clone(), config)?)
}

fn run_requests(engine: &Engine, prompts: &[&str], n_gen: u32, all_at_once: bool) -> Result<(usize, f64), BenchError> {
    let opts = llama_host::GenerateOptions {
        max_tokens: Some(n_gen),
        sampling: llama_host::SamplingParams { temperature: 0.0, ..Default::default() },
        ..Default::default()
    };
    let submit = |p: &str| {
        engine
            .submit(crate::engine::Request { prompt: p.to_string(), opts: opts.clone(), deadline: None })
            .map_err(|e| BenchError::InvalidParam { field: "request", reason: e.to_string() })
    };
    let t = Instant::now();
    let mut generated = 0;
    if all_at_once {
        let handles = prompts.iter().map(|p| submit(p)).collect::<Result<Vec<_>, _>>()?;
        // One reader per stream, as concurrent clients would be: a stream nobody reads
        // pauses (by design), which would serialize the measurement.
        generated = std::thread::scope(|s| {
            let readers: Vec<_> = handles.into_iter().map(|h| s.spawn(move || h.collect().1.generated_tokens)).collect();
            readers.into_iter().map(|r| r.join().unwrap_or(0)).sum()
        });
    } else {
        for p in prompts {
            generated += submit(p)?.collect().1.generated_tokens;
        }
    }
    Ok((generated, t.elapsed().as_secs_f64()))
}

/// Aggregate throughput at each concurrency, batched and one at a time, on the same
/// requests (distinct prompts, greedy, `n_gen` new tokens each).
pub fn concurrent(model: &std::sync::Arc<Model>, p: &ConcurrentParams) -> Result<Vec<ConcurrentResult>, BenchError> {
    let mut out = Vec::new();
    for &n in &p.streams {
        if n == 0 {
            continue;
        }
        let prompts: Vec<&str> = (0..n as usize).map(|i| TOPICS[i % TOPICS.len()]).collect();
        let batched = engine_for(model, n, p, false)?;
        // Warm-up: one short request, so first-touch costs are not measured.
        run_requests(&batched, &prompts[..1], 2, true)?;
        let (gen_b, secs_b) = run_requests(&batched, &prompts, p.n_gen, true)?;
        drop(batched);
        let single = engine_for(model, 1, p, false)?;
        run_requests(&single, &prompts[..1], 2, true)?;
        let (gen_s, secs_s) = run_requests(&single, &prompts, p.n_gen, false)?;
        out.push(ConcurrentResult {
            streams: n,
            tokens_per_s: gen_b as f64 / secs_b,
            sequential_tokens_per_s: gen_s as f64 / secs_s,
            generated_tokens: gen_b,
        });
    }
    Ok(out)
}

/// Time to first token of a second prompt sharing a ~`prefix_tokens` prefix with the
/// first, with the prefix cache on and off.
pub fn prefix_reuse(model: &std::sync::Arc<Model>, p: &ConcurrentParams, prefix_words: usize) -> Result<PrefixReuse, BenchError> {
    let prefix = "The committee reviewed the annual report on rivers, forests and mountains. ".repeat(prefix_words / 12 + 1);
    let mut ttft = [0.0; 2];
    let mut stats = None;
    for (k, cache) in [true, false].into_iter().enumerate() {
        let engine = engine_for(model, 1, &ConcurrentParams { n_gen: 1024, ..p.clone() }, cache)?;
        let opts = llama_host::GenerateOptions { max_tokens: Some(1), ..Default::default() };
        let ask = |q: &str| {
            engine
                .submit(crate::engine::Request { prompt: format!("{prefix}{q}"), opts: opts.clone(), deadline: None })
                .map_err(|e| BenchError::InvalidParam { field: "request", reason: e.to_string() })
                .map(|h| h.collect().1)
        };
        ask("First question?")?;
        let second = ask("Second question?")?;
        ttft[k] = second.time_to_first_token.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        if cache {
            stats = Some(second);
        }
    }
    let s = stats.expect("the cached run ran");
    Ok(PrefixReuse { prompt_tokens: s.prompt_tokens, cached_tokens: s.cached_tokens, ttft_with_reuse_ms: ttft[0], ttft_without_reuse_ms: ttft[1] })
}

/// The speculation workloads (bench/spec, see its README): the prompts and how many
/// tokens each generates.
#[derive(Debug, Clone)]
pub struct SpecWorkloads {
    /// (i) edit: a ChatML prompt asking to repeat a ~600-token Python file with one rename.
    pub edit: String,
    /// (ii) prose continuation: plain text.
    pub prose: String,
    pub edit_tokens: u32,
    pub prose_tokens: u32,
}

impl SpecWorkloads {
    /// Reads `edit.prompt` and `prose.prompt` from `dir`.
    pub fn load(dir: &std::path::Path, edit_tokens: u32, prose_tokens: u32) -> Result<SpecWorkloads, BenchError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| BenchError::Workload { path, source })
        };
        Ok(SpecWorkloads { edit: read("edit.prompt")?, prose: read("prose.prompt")?, edit_tokens, prose_tokens })
    }
}

/// One workload in one mode (with or without speculation), over the timed repetitions.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecSide {
    /// Mean of `samples`.
    pub tokens_per_s: f64,
    pub samples: Vec<f64>,
    /// Generated tokens, summed over the timed repetitions (and streams).
    pub generated_tokens: usize,
    /// Drafted and accepted tokens, summed likewise (zero without speculation).
    pub drafted: usize,
    pub accepted: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecWorkloadResult {
    /// `edit`, `prose` or `edit-x4`.
    pub workload: &'static str,
    /// Concurrent requests (1, or 4 for `edit-x4`).
    pub streams: u32,
    /// Most new tokens per request.
    pub max_tokens: u32,
    pub without: SpecSide,
    pub with: SpecSide,
    /// `with.tokens_per_s / without.tokens_per_s`.
    pub ratio: f64,
    /// Whether the first timed repetition's texts (every stream's) were the same with and
    /// without speculation. Greedy speculation need not be byte-identical: verifying several
    /// tokens in one batch changes floating-point sums slightly.
    pub same_text: bool,
    /// When not: the first byte at which they differ.
    pub first_difference: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecBenchResult {
    pub mode: &'static str,
    pub draft_max: u32,
    pub draft_min: u32,
    pub p_min: f32,
    pub ngram_n: u32,
    pub repetitions: u32,
    pub workloads: Vec<SpecWorkloadResult>,
}

/// Slots of the speculation benchmark's engine (and streams of workload (iii)).
pub const SPEC_STREAMS: u32 = 4;
/// Tokens of each warm-up request: enough to touch every path (prompt, drafts, verification).
const SPEC_WARMUP_TOKENS: u32 = 32;

/// One finished request: its text and stats.
type Answer = (String, crate::engine::RequestStats);

/// Submits `n` copies of `prompt` at once and reads each on its own thread (a stream nobody
/// reads pauses); returns the answers and the wall time from the first submission to the
/// last answer.
fn spec_requests(engine: &Engine, prompt: &str, opts: &llama_host::GenerateOptions, n: u32) -> Result<(Vec<Answer>, f64), BenchError> {
    let t = Instant::now();
    let handles = (0..n)
        .map(|_| engine.submit(crate::engine::Request { prompt: prompt.to_string(), opts: opts.clone(), deadline: None }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Request(e.to_string()))?;
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let readers: Vec<_> = handles.into_iter().map(|h| s.spawn(move || h.collect())).collect();
        readers.into_iter().map(|r| r.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    for (_, stats) in &answers {
        if stats.finish == crate::engine::Finish::Error {
            return Err(BenchError::Request(stats.error.clone().unwrap_or_else(|| "unknown error".into())));
        }
    }
    Ok((answers, secs))
}

/// Generation speed of one request, prompt excluded, as llama-server's
/// `predicted_per_second`: the first token comes with the prompt, the others after it.
/// Zero when it generated fewer than two tokens.
fn generation_rate(stats: &crate::engine::RequestStats) -> f64 {
    let Some(ttft) = stats.time_to_first_token else { return 0.0 };
    let secs = stats.total.saturating_sub(ttft).as_secs_f64();
    if stats.generated_tokens < 2 || secs <= 0.0 {
        return 0.0;
    }
    (stats.generated_tokens - 1) as f64 / secs
}

/// The first byte at which `a` and `b` differ, `None` when equal.
fn first_difference(a: &str, b: &str) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.bytes().zip(b.bytes()).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())))
}

/// Speculative decoding against none, through the engine, on the three workloads:
/// (i) edit and (ii) prose, one stream each, rated by generation speed (prompt excluded);
/// (iii) four concurrent streams of (i), rated by aggregate throughput (generated tokens
/// over the wall time from the first submission to the last answer, which includes the
/// four prompts' processing, as scripts/spec-reference's edit-x4).
///
/// One engine ([`SPEC_STREAMS`] slots of 2048 tokens) serves both modes, with the prefix
/// cache off so every request processes its whole prompt, the same in both modes. Per
/// workload, one short warm-up request per mode, then `reps` repetitions, each running the
/// request without and then with speculation, so drift over the run touches both alike.
/// Greedy sampling; the prompts are tokenized without BOS (the edit prompt carries its own
/// ChatML markup, whose special tokens the tokenizer parses).
///
/// On a thread of its own, for the reason given at [`run`].
pub fn spec_bench(
    model: std::sync::Arc<Model>,
    draft: Option<std::sync::Arc<Model>>,
    size: ContextSize,
    cache: KvCacheParams,
    spec: llama_host::spec::SpecParams,
    workloads: &SpecWorkloads,
    reps: u32,
) -> Result<SpecBenchResult, BenchError> {
    std::thread::scope(|s| {
        s.spawn(|| spec_bench_here(model, draft, size, cache, spec, workloads, reps)).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn spec_bench_here(
    model: std::sync::Arc<Model>,
    draft: Option<std::sync::Arc<Model>>,
    size: ContextSize,
    cache: KvCacheParams,
    spec: llama_host::spec::SpecParams,
    w: &SpecWorkloads,
    reps: u32,
) -> Result<SpecBenchResult, BenchError> {
    if reps == 0 {
        return Err(BenchError::InvalidParam { field: "reps", reason: "must be at least 1".into() });
    }
    spec.validate().map_err(|e| BenchError::InvalidParam { field: "spec", reason: e.to_string() })?;
    // The rate leaves out the first token (it comes with the prompt): one more is needed.
    for (field, n) in [("spec-tokens", w.edit_tokens), ("spec-prose-tokens", w.prose_tokens)] {
        if n < 2 {
            return Err(BenchError::InvalidParam { field, reason: format!("{n} is below 2") });
        }
    }
    let config = EngineConfig {
        slots: SPEC_STREAMS,
        queue: 16,
        size: ContextSize { n_ctx: SPEC_STREAMS * 2048, ..size },
        stream_capacity: 64,
        prefix_cache: false,
        cache,
        draft: draft.map(crate::engine::DraftModel),
        ..EngineConfig::default()
    };
    let engine = Engine::start(model, config)?;
    let opts = |max_tokens: u32, spec| llama_host::GenerateOptions {
        max_tokens: Some(max_tokens),
        sampling: llama_host::SamplingParams { temperature: 0.0, ..Default::default() },
        add_special: false,
        stop: Vec::new(),
        spec,
    };
    let modes = [None, Some(spec)];
    let mut out = Vec::new();
    for (name, prompt, max_tokens, streams) in [
        ("edit", &w.edit, w.edit_tokens, 1),
        ("prose", &w.prose, w.prose_tokens, 1),
        ("edit-x4", &w.edit, w.edit_tokens, SPEC_STREAMS),
    ] {
        for m in modes {
            spec_requests(&engine, prompt, &opts(SPEC_WARMUP_TOKENS.min(max_tokens), m), 1)?;
        }
        let mut sides = [SpecSide::default(), SpecSide::default()];
        let mut texts: [Vec<String>; 2] = Default::default();
        for rep in 0..reps {
            for (k, m) in modes.into_iter().enumerate() {
                let (answers, secs) = spec_requests(&engine, prompt, &opts(max_tokens, m), streams)?;
                let side = &mut sides[k];
                let generated: usize = answers.iter().map(|(_, s)| s.generated_tokens).sum();
                side.samples.push(if streams == 1 { generation_rate(&answers[0].1) } else { generated as f64 / secs });
                side.generated_tokens += generated;
                side.drafted += answers.iter().map(|(_, s)| s.spec.drafted).sum::<usize>();
                side.accepted += answers.iter().map(|(_, s)| s.spec.accepted).sum::<usize>();
                if rep == 0 {
                    texts[k] = answers.into_iter().map(|(t, _)| t).collect();
                }
            }
        }
        for side in &mut sides {
            side.tokens_per_s = side.samples.iter().sum::<f64>() / side.samples.len() as f64;
        }
        let first_difference = texts[0].iter().zip(&texts[1]).filter_map(|(a, b)| first_difference(a, b)).min();
        let [without, with] = sides;
        out.push(SpecWorkloadResult {
            workload: name,
            streams,
            max_tokens,
            ratio: with.tokens_per_s / without.tokens_per_s,
            without,
            with,
            same_text: first_difference.is_none(),
            first_difference,
        });
    }
    Ok(SpecBenchResult {
        mode: spec.mode.as_str(),
        draft_max: spec.draft_max,
        draft_min: spec.draft_min,
        p_min: spec.p_min,
        ngram_n: spec.ngram_n,
        repetitions: reps,
        workloads: out,
    })
}
