//! Speculative decoding through the engine with the real plugin and the real models:
//! drafts change how many steps a generation takes, never what it says.
//!
//! Exactness is checked in the engine's batch-invariant mode: there every token is computed
//! by the same kernels whether its step holds one row or a token and its drafts. In the
//! default mode a verification step is a multi-row product (llama.cpp's tinyBLAS for the
//! output layer) while a lone token takes `vec_dot`; their sums differ in the last bits, so
//! a greedy near-tie can flip, as with continuous batching (docs/ARCHITECTURE.md).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use llama_host::spec::{SpecMode, SpecParams};
use llama_host::{BackendChoice, Backends, ContextSize, DiscoveryOptions, GenerateOptions, Model, ModelParams, SamplingParams};
use llama_serve::engine::{DraftModel, Engine, EngineConfig, Event, Finish, Request, RequestStats};
use llama_tests::{llama_bin, smollm2_model_path};

/// A plugin-loaded model without repacked weights (batch-invariant mode needs it).
fn load(path: std::path::PathBuf) -> Arc<Model> {
    let opts = DiscoveryOptions { backend_dirs: Vec::new(), env_path: None, exe: Some(llama_bin()), user_dir: None, isolation: None };
    let backend = Backends::discover(&opts).select(BackendChoice::Named("cpu".into())).expect("the CPU plugin in target/release");
    Arc::new(Model::load(&backend, path, &ModelParams { repack: false, ..Default::default() }).expect("the model loads"))
}

fn smollm2() -> &'static Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| load(smollm2_model_path()))
}

fn engine(model: &Arc<Model>, draft: Option<&Arc<Model>>, slots: u32) -> Engine {
    let config = EngineConfig {
        slots,
        queue: 32,
        size: ContextSize { n_ctx: 1024 * slots, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() },
        batch_invariant: true,
        prefix_cache: false,
        draft: draft.map(|d| DraftModel(Arc::clone(d))),
        ..EngineConfig::default()
    };
    Engine::start(Arc::clone(model), config).expect("engine starts")
}

fn greedy(max: u32, spec: Option<SpecParams>) -> GenerateOptions {
    GenerateOptions { max_tokens: Some(max), sampling: SamplingParams { temperature: 0.0, ..Default::default() }, spec, ..Default::default() }
}

fn ngram() -> Option<SpecParams> {
    Some(SpecParams::new(SpecMode::Ngram))
}

fn draft() -> Option<SpecParams> {
    Some(SpecParams { p_min: 0.0, ..SpecParams::new(SpecMode::Draft) })
}

fn run(e: &Engine, prompt: &str, opts: GenerateOptions) -> (String, RequestStats) {
    e.submit(Request { prompt: prompt.into(), opts, deadline: None }).expect("admitted").collect()
}

/// Twenty prompts that repeat themselves or invite repetition (lists, code, quotes), where
/// prompt lookup finds drafts, and a few that do not.
const PROMPTS: [&str; 20] = [
    "Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
    "Monday, Tuesday, Wednesday,",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "<ul>\n<li>apple</li>\n<li>banana</li>\n<li>",
    "SELECT name FROM users WHERE id = 1;\nSELECT name FROM users WHERE id = 2;\nSELECT",
    "To be, or not to be, that is the question:",
    "{\"a\": 1, \"b\": 2, \"c\": 3, \"d\":",
    "Once upon a time, in a land far away,",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
    "red green blue red green blue red",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
    "A B C D E F G",
    "Dear Sir or Madam, I am writing to",
    "import os\nimport sys\nimport",
    "Q: What is 2+2?\nA: 4\nQ: What is 3+3?\nA:",
    "Roses are red, violets are blue,",
    "fn main() {\n    println!(\"hello\");\n    println!(\"hello\");\n",
    "In 1492, Columbus sailed the ocean blue.",
];

const TOKENS: u32 = 48;

/// Greedy output with n-gram drafts equals output without, token for token, for 20 prompts
/// (SmolLM2), and the drafts were really used.
#[test]
fn ngram_speculation_keeps_greedy_output_exact() {
    let e = engine(smollm2(), None, 1);
    let (mut drafted, mut accepted) = (0, 0);
    for p in PROMPTS {
        let (plain, ps) = run(&e, p, greedy(TOKENS, None));
        let (spec, ss) = run(&e, p, greedy(TOKENS, ngram()));
        assert_eq!(plain, spec, "prompt {p:?}: n-gram speculation changed the output");
        assert_eq!((ps.generated_tokens, ps.finish), (ss.generated_tokens, ss.finish), "prompt {p:?}");
        drafted += ss.spec.drafted;
        accepted += ss.spec.accepted;
    }
    eprintln!("n-gram over 20 prompts: {accepted} of {drafted} drafts accepted");
    assert!(accepted > 0, "no draft was ever accepted ({drafted} drafted)");
}

/// The same model as its own draft model: the same output, and (greedy drafting from the
/// same weights) nearly every draft accepted.
#[test]
fn a_model_drafting_for_itself_is_exact_and_almost_always_accepted() {
    let e = engine(smollm2(), Some(smollm2()), 1);
    let (mut drafted, mut accepted) = (0, 0);
    for p in PROMPTS {
        let (plain, _) = run(&e, p, greedy(TOKENS, None));
        let (spec, ss) = run(&e, p, greedy(TOKENS, draft()));
        assert_eq!(plain, spec, "prompt {p:?}: draft-model speculation changed the output");
        drafted += ss.spec.drafted;
        accepted += ss.spec.accepted;
    }
    eprintln!("self-drafting over 20 prompts: {accepted} of {drafted} drafts accepted");
    assert!(drafted > 0 && accepted * 10 >= drafted * 9, "{accepted} of {drafted} accepted");
}

/// Under sampling with a fixed seed, SmolLM2 drafting for itself gives the same text on
/// every run, and the same text as without drafts: each draft is accepted only if the
/// sampler, with its random state where one-token steps would have it, draws it.
#[test]
fn seeded_sampling_with_drafts_is_reproducible() {
    let e = engine(smollm2(), Some(smollm2()), 1);
    let sampled = |spec| GenerateOptions {
        max_tokens: Some(TOKENS),
        sampling: SamplingParams { temperature: 0.8, seed: 42, ..Default::default() },
        spec,
        ..Default::default()
    };
    let prompt = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n";
    let (plain, _) = run(&e, prompt, sampled(None));
    let runs: Vec<(String, RequestStats)> = (0..3).map(|_| run(&e, prompt, sampled(draft()))).collect();
    for (text, stats) in &runs {
        assert_eq!(text, &runs[0].0, "a seeded run with drafts differs from the first");
        assert!(stats.spec.drafted > 0, "nothing was drafted");
    }
    assert_eq!(runs[0].0, plain, "seeded sampling with drafts differs from without");
}

/// Several sequences with drafts in one step (continuous batching): each output equals
/// its solo, speculation-free output.
#[test]
fn concurrent_speculating_requests_equal_their_solo_outputs() {
    let solo_engine = engine(smollm2(), None, 1);
    let prompts = &PROMPTS[..4];
    let solo: Vec<String> = prompts.iter().map(|p| run(&solo_engine, p, greedy(TOKENS, None)).0).collect();
    let e = engine(smollm2(), None, 4);
    let handles: Vec<_> = prompts.iter().map(|p| e.submit(Request { prompt: (*p).into(), opts: greedy(TOKENS, ngram()), deadline: None }).unwrap()).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let readers: Vec<_> = handles.into_iter().map(|h| s.spawn(move || h.collect().0)).collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(solo, together);
}

/// The token limit is never passed, however many drafts a step accepts: every limit from
/// 1 to 20 gives exactly the speculation-free prefix.
#[test]
fn max_tokens_is_exact_with_drafts() {
    let e = engine(smollm2(), None, 1);
    let p = PROMPTS[4];
    for max in 1..=20 {
        let (plain, ps) = run(&e, p, greedy(max, None));
        let (spec, ss) = run(&e, p, greedy(max, ngram()));
        assert_eq!((plain, ps.generated_tokens), (spec, ss.generated_tokens), "max_tokens {max}");
        assert!(ss.generated_tokens <= max as usize);
    }
}

/// A stop string that falls inside an accepted draft cuts the output exactly where it
/// would without drafts.
#[test]
fn stop_strings_inside_accepted_drafts_cut_exactly() {
    let e = engine(smollm2(), None, 1);
    let p = PROMPTS[4];
    let (full, _) = run(&e, p, greedy(TOKENS, None));
    // Stops at several places of the output, including ones inside drafted runs.
    let words: Vec<&str> = full.split_whitespace().collect();
    let mut checked = 0;
    for w in words.iter().skip(2).step_by(3).take(6) {
        let stop = vec![w.to_string()];
        let (plain, ps) = run(&e, p, GenerateOptions { stop: stop.clone(), ..greedy(TOKENS, None) });
        let (spec, ss) = run(&e, p, GenerateOptions { stop, ..greedy(TOKENS, ngram()) });
        assert_eq!(plain, spec, "stop {w:?}");
        assert_eq!((ps.finish, ps.stop_sequence.clone()), (ss.finish, ss.stop_sequence.clone()), "stop {w:?}");
        checked += usize::from(ss.spec.accepted > 0);
    }
    assert!(checked > 0, "no stop-string run accepted a draft");
}

/// Cancelling a request mid-speculation frees its slot within a step: a request queued
/// behind it (one slot) starts.
#[test]
fn cancelling_mid_speculation_frees_the_slot() {
    let e = engine(smollm2(), None, 1);
    let h = e.submit(Request { prompt: PROMPTS[1].into(), opts: greedy(2000, ngram()), deadline: None }).unwrap();
    // Wait for the first text: the request is generating with drafts.
    match h.next_timeout(Duration::from_secs(120)) {
        Some(Event::Text(_)) => {}
        other => panic!("no text first: {other:?}"),
    }
    let queued = e.submit(Request { prompt: PROMPTS[2].into(), opts: greedy(4, ngram()), deadline: None }).unwrap();
    h.cancel();
    let stats = loop {
        match h.next_timeout(Duration::from_secs(120)) {
            Some(Event::Done(s)) => break s,
            Some(Event::Text(_)) => continue,
            None => panic!("no Done after cancel"),
        }
    };
    assert_eq!(stats.finish, Finish::Cancelled);
    assert!(stats.generated_tokens < 2000);
    let (_, qs) = queued.collect();
    assert_eq!(qs.finish, Finish::Length, "the queued request did not run after the cancel");
    let kv = e.kv_usage().unwrap();
    assert_eq!(kv.backend_tokens, kv.accounted_tokens, "KV cells the engine does not account for");
}

/// A grammar constrains drafts like any candidate: a draft it forbids is a mismatch, and the
/// output equals the constrained output without drafts.
#[test]
fn drafts_under_a_grammar_give_the_constrained_output() {
    let e = engine(smollm2(), None, 1);
    let p = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2,";
    let with_grammar = |spec| {
        let mut o = greedy(TOKENS, spec);
        o.sampling.grammar = Some(llama_host::Grammar::new("root ::= [0-9, ]+ \"11\""));
        o
    };
    let (plain, _) = run(&e, p, with_grammar(None));
    let (spec, ss) = run(&e, p, with_grammar(ngram()));
    assert_eq!(plain, spec);
    assert!(spec.bytes().all(|b| b.is_ascii_digit() || b == b',' || b == b' '), "{spec:?}");
    assert!(ss.spec.accepted > 0, "no draft accepted under the grammar");
}

/// A draft model catches a long prompt up over several steps (a bounded amount per step,
/// drafting nothing meanwhile), then drafts; the output is the one without drafts.
#[test]
fn a_draft_model_catches_up_a_long_prompt_in_bounded_steps() {
    let e = engine(smollm2(), Some(smollm2()), 1);
    let prompt: String = (1..=100).map(|i| format!("{i}, ")).collect();
    let (plain, _) = run(&e, &prompt, greedy(TOKENS, None));
    let (spec, ss) = run(&e, &prompt, greedy(TOKENS, draft()));
    assert!(ss.prompt_tokens > llama_host::spec::CATCH_UP, "{} prompt tokens", ss.prompt_tokens);
    assert_eq!(plain, spec);
    assert!(ss.spec.accepted > 0, "nothing accepted after catching up");
}
