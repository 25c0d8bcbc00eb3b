//! `llama bench`: llama-bench's pp/tg tests, then concurrency and prefix reuse through
//! the engine; with `--spec`, speculative decoding against none on bench/spec's workloads
//! instead (llama_serve::bench does the measuring; this prints it).


use llama_host::{ContextSize, LoadedBackend, Model, ModelParams};
use llama_serve::bench::{self, BenchParams, BenchResult};

use crate::load::{load_model, load_with_params, prepare, select_backend};
use crate::opts::LoadOpts;
use crate::opts::{BenchOpts, Global};
use crate::CliError;

pub fn run(g: &Global, o: &BenchOpts) -> Result<(), CliError> {
    let a = &o.args;
    let backend = select_backend(g, &o.load)?;
    if let Some(spec) = o.spec {
        return run_spec(&backend, o, spec);
    }
    // The context the auto GPU-layer estimate reserves KV cache for. The parameters are
    // resolved once: the batch-invariant model below must get the same offload as this one
    // (a second estimate would see the GPU memory this one took).
    let n_ctx = a.n_prompt.saturating_add(a.n_gen).max(4096);
    let (file, params) = prepare(&backend, &o.load, n_ctx)?;
    let model = load_with_params(&backend, &file, &params)?;
    let t = o.threads;
    let p = BenchParams {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        reps: a.reps,
        size: ContextSize { n_ctx: 0, n_batch: a.batch_size, n_ubatch: a.ubatch_size, n_threads: t, n_threads_batch: t },
        cache: o.load.cache,
    };
    let r = bench::run(&model, &p)?;
    let model = if a.batch_invariant {
        // Batch-invariant engines need the weights in their plain layout.
        Model::load_file(&backend, &file, &ModelParams { repack: false, ..params })?
    } else {
        model
    };
    let model = std::sync::Arc::new(model);
    let cp = bench::ConcurrentParams {
        streams: a.concurrency.iter().copied().filter(|&n| n > 0).collect(),
        n_gen: a.concurrent_tokens,
        size: p.size,
        batch_invariant: a.batch_invariant,
        cache: p.cache,
    };
    let concurrent = bench::concurrent(&model, &cp)?;
    let prefix = if a.no_prefix_test { None } else { Some(bench::prefix_reuse(&model, &cp, 1000)?) };
    if a.json {
        outln!("{}", bench_json(&model, &backend, &p, &r, &concurrent, prefix.as_ref(), a.batch_invariant))?;
    } else {
        outln!("| model | size | backend | threads | test | t/s |")?;
        outln!("| --- | ---: | --- | ---: | ---: | ---: |")?;
        let size = format!("{:.2} MiB", model.info().size_bytes as f64 / (1u64 << 20) as f64);
        for (name, t) in [("pp", &r.pp), ("tg", &r.tg)] {
            if let Some(t) = t {
                outln!(
                    "| {} | {size} | {} | {} | {name}{} | {:.2} ± {:.2} |",
                    model.info().description,
                    backend.name(),
                    p.size.n_threads,
                    t.tokens,
                    t.tokens_per_s,
                    t.stddev
                )?;
            }
        }
        if !concurrent.is_empty() {
            outln!()?;
            outln!("| streams | aggregate t/s (batched) | t/s one at a time | batched / one at a time | vs 1 stream |")?;
            outln!("| ---: | ---: | ---: | ---: | ---: |")?;
            let base = concurrent[0].tokens_per_s;
            for c in &concurrent {
                outln!(
                    "| {} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
                    c.streams,
                    c.tokens_per_s,
                    c.sequential_tokens_per_s,
                    c.tokens_per_s / c.sequential_tokens_per_s,
                    c.tokens_per_s / base
                )?;
            }
        }
        if let Some(pr) = &prefix {
            outln!()?;
            outln!(
                "time to first token, {}-token prompt sharing {} tokens with the previous one: {:.1} ms with prefix reuse, {:.1} ms without ({:.3}x)",
                pr.prompt_tokens,
                pr.cached_tokens,
                pr.ttft_with_reuse_ms,
                pr.ttft_without_reuse_ms,
                pr.ttft_with_reuse_ms / pr.ttft_without_reuse_ms
            )?;
        }
    }
    Ok(())
}

fn bench_json(
    model: &Model,
    backend: &LoadedBackend,
    p: &BenchParams,
    r: &BenchResult,
    concurrent: &[bench::ConcurrentResult],
    prefix: Option<&bench::PrefixReuse>,
    concurrent_invariant: bool,
) -> String {
    let v = serde_json::json!({
        "model": model.path(),
        "model_description": model.info().description.as_str(),
        "backend": backend.name(),
        "threads": p.size.n_threads,
        "n_prompt": p.n_prompt,
        "n_gen": p.n_gen,
        "n_batch": p.size.n_batch,
        "n_ubatch": p.size.n_ubatch,
        "type_k": p.cache.type_k.as_str(),
        "type_v": p.cache.type_v.as_str(),
        "flash_attn": p.cache.flash_attn.as_str(),
        "repetitions": p.reps,
        "pp_tokens_per_s": r.pp.as_ref().map(|t| t.tokens_per_s),
        "pp_stddev": r.pp.as_ref().map(|t| t.stddev),
        "tg_tokens_per_s": r.tg.as_ref().map(|t| t.tokens_per_s),
        "tg_stddev": r.tg.as_ref().map(|t| t.stddev),
        "pp": r.pp,
        "tg": r.tg,
        "concurrent": concurrent,
        "batch_invariant": concurrent_invariant,
        "prefix_reuse": prefix,
    });
    serde_json::to_string_pretty(&v).expect("bench results serialize")
}

/// `llama bench --spec MODE`: the speculation benchmark (llama_serve::bench::spec_bench).
fn run_spec(backend: &LoadedBackend, o: &BenchOpts, spec: llama_host::spec::SpecParams) -> Result<(), CliError> {
    let a = &o.args;
    let n_ctx = bench::SPEC_STREAMS * 2048;
    // Read first: a missing directory should not wait for the models to load.
    let workloads = bench::SpecWorkloads::load(&a.spec_workloads, a.spec_tokens, a.spec_prose_tokens)?;
    let model = std::sync::Arc::new(load_model(backend, &o.load, n_ctx)?);
    // The draft model only for draft speculation: an n-gram run needs none.
    let draft = match (&o.draft_model, spec.mode) {
        (Some(path), llama_host::spec::SpecMode::Draft) => {
            Some(std::sync::Arc::new(load_model(backend, &LoadOpts { path: path.clone(), ..o.load.clone() }, n_ctx)?))
        }
        _ => None,
    };
    let t = o.threads;
    let size = ContextSize { n_ctx, n_batch: a.batch_size, n_ubatch: a.ubatch_size, n_threads: t, n_threads_batch: t };
    let r = bench::spec_bench(model.clone(), draft.clone(), size, o.load.cache, spec, &workloads, a.reps)?;
    if a.json {
        let v = serde_json::json!({
            "model": model.path(),
            "model_description": model.info().description.as_str(),
            "draft_model": draft.as_ref().map(|d| d.path()),
            "backend": backend.name(),
            "threads": t,
            "spec": r,
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("bench results serialize"))?;
        return Ok(());
    }
    outln!(
        "{} on {}, {} threads, --spec {} (draft-max {}, draft-min {}, {}), {} repetitions",
        model.info().description,
        backend.name(),
        t,
        r.mode,
        r.draft_max,
        r.draft_min,
        match spec.mode {
            llama_host::spec::SpecMode::Ngram => format!("ngram-n {}", r.ngram_n),
            llama_host::spec::SpecMode::Draft => format!("p-min {}", r.p_min),
        },
        r.repetitions
    )?;
    for w in &r.workloads {
        let accepted = match w.with.drafted {
            0 => "no drafts".to_string(),
            d => format!("accepted {}/{d} ({:.0}%)", w.with.accepted, 100.0 * w.with.accepted as f64 / d as f64),
        };
        let same = match w.first_difference {
            None => "yes".to_string(),
            Some(at) => format!("no (from byte {at})"),
        };
        let rate = if w.streams > 1 { "aggregate tok/s" } else { "tok/s" };
        outln!(
            "{:<8} without {:>7.1} {rate}  with {:>7.1} {rate}  {:.2}x  {accepted}  same text: {same}",
            w.workload,
            w.without.tokens_per_s,
            w.with.tokens_per_s,
            w.ratio
        )?;
    }
    outln!("(edit, prose: generation speed, prompt excluded; edit-x4: {} streams, generated tokens over wall time, prompts included)", bench::SPEC_STREAMS)?;
    Ok(())
}
