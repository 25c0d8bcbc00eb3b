//! The engine through the library with the real plugin and model: concurrency, isolation,
//! admission, cancellation, and a soak.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_host::ContextSize;
use llama_serve::engine::{Engine, EngineConfig, Event, Finish, Request, SubmitError};
use llama_host::{GenerateOptions, SamplingParams};
use llama_tests::{rss_kib, shared_model};

fn greedy(max: u32) -> GenerateOptions {
    GenerateOptions { max_tokens: Some(max), sampling: SamplingParams { temperature: 0.0, ..Default::default() }, ..Default::default() }
}

fn engine(slots: u32, queue: usize) -> Engine {
    let config = EngineConfig { slots, queue, size: ContextSize { n_ctx: 512 * slots, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, stream_capacity: 4, ..EngineConfig::default() };
    Engine::start(Arc::clone(shared_model()), config).expect("engine starts")
}

fn req(prompt: &str, opts: GenerateOptions) -> Request {
    Request { prompt: prompt.to_string(), opts, deadline: None }
}

/// A hang guard, not a timing claim: it only turns a wait that would never end (a broken
/// build) into a failure. Tests assert outcomes and order of events, never a duration.
const HANG_GUARD: Duration = Duration::from_secs(120);

const PROMPTS: [&str; 4] = ["The capital of France is", "Once upon a time", "The best way to cook rice is", "In 1492, Columbus"];

/// The repacked-weights-off model that batch-invariant mode needs.
fn unpacked_model() -> &'static Arc<llama_host::Model> {
    static M: std::sync::OnceLock<Arc<llama_host::Model>> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let m = shared_model();
        Arc::new(llama_host::Model::load(m.backend().expect("loaded through a plugin"), m.path(), &llama_host::ModelParams { repack: false, ..Default::default() }).unwrap())
    })
}

#[test]
fn concurrent_greedy_requests_equal_their_solo_outputs() {
    let config = EngineConfig { slots: 4, queue: 4, size: ContextSize { n_ctx: 2560, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, batch_invariant: true, ..EngineConfig::default() };
    // Each alone, on a fresh engine per request (nothing cached).
    let solo: Vec<String> = PROMPTS
        .iter()
        .map(|p| Engine::start(Arc::clone(unpacked_model()), config.clone()).unwrap().submit(req(p, greedy(32))).unwrap().collect().0)
        .collect();
    // All together on another fresh engine.
    let e = Engine::start(Arc::clone(unpacked_model()), config).unwrap();
    let handles: Vec<_> = PROMPTS.iter().map(|p| e.submit(req(p, greedy(32))).unwrap()).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let readers: Vec<_> = handles.into_iter().map(|h| s.spawn(move || h.collect().0)).collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert!(!a.is_empty());
        assert_eq!(a, b, "request {i} differs when batched with others");
    }
}

/// A request alone in the engine produces exactly what a plain session produces.
/// (Concurrent requests are batched together; llama.cpp's CPU kernels do not promise the
/// same floating-point results for different batch shapes, so their greedy text can
/// differ from the solo text: see docs/ARCHITECTURE.md. They are checked for completing.)
#[test]
fn a_lone_request_equals_the_session_and_concurrent_ones_complete() {
    // Without the prefix cache each prompt is decoded whole, in the same batch shape as
    // the session's (even reusing the shared BOS cell changes the shape, and the numbers).
    let config = EngineConfig { slots: 4, queue: 4, size: ContextSize { n_ctx: 2048, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, prefix_cache: false, ..EngineConfig::default() };
    let e = Engine::start(Arc::clone(shared_model()), config).unwrap();
    let m = shared_model();
    for p in PROMPTS {
        let (via_engine, st) = e.submit(req(p, greedy(24))).unwrap().collect();
        let mut s = m.session(&llama_tests::session_params(512)).unwrap();
        let via_session: String = s.stream(p, &greedy(24)).unwrap().map(Result::unwrap).collect();
        assert_eq!(via_engine, via_session, "{p}");
        assert_eq!(st.generated_tokens, 24);
    }
    let handles: Vec<_> = PROMPTS.iter().map(|p| e.submit(req(p, greedy(24))).unwrap()).collect();
    for h in handles {
        let (text, st) = h.collect();
        assert!(!text.is_empty());
        assert_eq!((st.finish, st.generated_tokens), (Finish::Length, 24));
    }
    let kv = e.kv_usage().unwrap();
    assert_eq!(kv.backend_tokens, kv.accounted_tokens, "{kv:?}");
}

#[test]
fn cancelling_one_leaves_the_others_untouched() {
    let config = EngineConfig { slots: 3, queue: 0, size: ContextSize { n_ctx: 2048, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, batch_invariant: true, ..EngineConfig::default() };
    let solo: Vec<String> = PROMPTS[..2]
        .iter()
        .map(|p| Engine::start(Arc::clone(unpacked_model()), config.clone()).unwrap().submit(req(p, greedy(20))).unwrap().collect().0)
        .collect();
    let e = Engine::start(Arc::clone(unpacked_model()), config).unwrap();
    let a = e.submit(req(PROMPTS[0], greedy(20))).unwrap();
    let victim = e.submit(req(PROMPTS[2], greedy(200))).unwrap();
    let b = e.submit(req(PROMPTS[1], greedy(20))).unwrap();
    let (a_text, b_text) = std::thread::scope(|s| {
        let ra = s.spawn(move || a.collect());
        let rb = s.spawn(move || b.collect());
        // Let the victim produce something, then cancel it while the others run.
        let first = victim.next_timeout(HANG_GUARD);
        assert!(matches!(first, Some(Event::Text(_))), "{first:?}");
        victim.cancel();
        let (_, vstats) = victim.collect();
        assert_eq!(vstats.finish, Finish::Cancelled);
        assert!(vstats.generated_tokens < 200);
        let (ra, rb) = (ra.join().unwrap(), rb.join().unwrap());
        assert_eq!((ra.1.finish, rb.1.finish), (Finish::Length, Finish::Length));
        (ra.0, rb.0)
    });
    assert_eq!(a_text, solo[0]);
    assert_eq!(b_text, solo[1]);
    let kv = e.kv_usage().unwrap();
    assert_eq!(kv.backend_tokens, kv.accounted_tokens, "{kv:?}");
}

/// A request whose grammar reaches a dead end mid-generation ends with `Finish::Error` and
/// the reason; the request batched with it in the same steps completes, with exactly the
/// text it produces alone.
#[test]
fn a_grammar_dead_end_ends_only_its_own_request() {
    let config = EngineConfig { slots: 2, queue: 0, size: ContextSize { n_ctx: 1024, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, batch_invariant: true, ..EngineConfig::default() };
    let solo = Engine::start(Arc::clone(unpacked_model()), config.clone()).unwrap().submit(req(PROMPTS[0], greedy(20))).unwrap().collect().0;
    // "a", then only token 1000, which the logit bias bans: a dead end at the second token.
    let mut dead = greedy(20);
    dead.sampling.grammar = Some(llama_host::Grammar::new(r#"root ::= "a" <[1000]>"#));
    dead.sampling.logit_bias = vec![llama_host::LogitBias { token: 1000, bias: f32::NEG_INFINITY }];
    let e = Engine::start(Arc::clone(unpacked_model()), config).unwrap();
    let good = e.submit(req(PROMPTS[0], greedy(20))).unwrap();
    let bad = e.submit(req(PROMPTS[1], dead)).unwrap();
    let (bad_text, bad) = bad.collect();
    assert_eq!((bad_text.as_str(), bad.finish, bad.generated_tokens), ("a", Finish::Error, 1));
    assert!(bad.error.as_deref().unwrap_or("").contains("dead end"), "{bad:?}");
    let (text, st) = good.collect();
    assert_eq!((st.finish, st.generated_tokens), (Finish::Length, 20));
    assert_eq!(text, solo);
    let kv = e.kv_usage().unwrap();
    assert_eq!(kv.backend_tokens, kv.accounted_tokens, "{kv:?}");
}

/// "At once" is an order of events, not a time: the refusal comes back while the running
/// request is still unfinished, and it cannot finish by itself because nobody reads its
/// stream (it pauses after its channel's 4 pieces). A `submit` that waited for room would
/// therefore never return; the hang guard turns that into a failure.
#[test]
fn a_full_queue_is_refused_at_once() {
    let e = engine(1, 1);
    let running = e.submit(req(PROMPTS[0], greedy(200))).unwrap();
    let queued = e.submit(req(PROMPTS[1], greedy(4))).unwrap();
    let refused = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let e = &e;
        s.spawn(move || tx.send(e.submit(req(PROMPTS[2], greedy(4)))).unwrap());
        rx.recv_timeout(HANG_GUARD).expect("submit on a full queue blocked instead of refusing")
    });
    assert!(matches!(refused, Err(SubmitError::Overloaded { waiting: 2, limit: 2 })), "{:?}", refused.err());
    // Both admitted requests are still in flight, nothing has ended yet, one refusal counted.
    assert_eq!(e.in_flight(), 2);
    let outcome = |o| e.metrics().outcome(o);
    use llama_serve::metrics::Outcome;
    assert_eq!((outcome(Outcome::Rejected), outcome(Outcome::Length), outcome(Outcome::Stop), outcome(Outcome::Cancelled)), (1, 0, 0, 0));
    drop(running);
    assert!(matches!(queued.collect().1.finish, Finish::Length | Finish::Stop));
    // Room again.
    assert!(e.submit(req(PROMPTS[2], greedy(2))).is_ok());
}

#[test]
fn a_request_cancelled_while_queued_never_runs() {
    let e = engine(1, 2);
    let running = e.submit(req(PROMPTS[0], greedy(60))).unwrap();
    let queued = e.submit(req(PROMPTS[1], greedy(8))).unwrap();
    queued.cancel();
    let (text, stats) = queued.collect();
    assert_eq!(stats.finish, Finish::Cancelled);
    assert_eq!((text.as_str(), stats.generated_tokens, stats.time_to_first_token), ("", 0, None));
    assert!(matches!(running.collect().1.finish, Finish::Length | Finish::Stop));
    assert_eq!(e.metrics().outcome(llama_serve::metrics::Outcome::Cancelled), 1);
}

#[test]
fn a_deadline_ends_a_request_queued_or_running() {
    let e = engine(1, 2);
    let running = e.submit(Request { deadline: Some(Instant::now() + Duration::from_millis(300)), ..req(PROMPTS[0], greedy(400)) }).unwrap();
    let queued = e.submit(Request { deadline: Some(Instant::now() + Duration::from_millis(100)), ..req(PROMPTS[1], greedy(4)) }).unwrap();
    assert_eq!(queued.collect().1.finish, Finish::Timeout);
    assert_eq!(running.collect().1.finish, Finish::Timeout);
}

#[test]
fn a_slow_consumer_pauses_only_its_own_sequence() {
    let e = engine(2, 0);
    let slow = e.submit(req(PROMPTS[0], greedy(100))).unwrap();
    let fast = e.submit(req(PROMPTS[1], greedy(40))).unwrap();
    // The fast one finishes while the slow one is not read at all.
    let (_, fstats) = fast.collect();
    assert_eq!(fstats.generated_tokens, 40);
    std::thread::sleep(Duration::from_millis(500));
    let produced = e.metrics().generated_tokens.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    let later = e.metrics().generated_tokens.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(produced, later, "the unread sequence kept generating");
    // At most the channel capacity (4 pieces) plus one parked piece were produced for it.
    let (_, sstats) = slow.collect();
    assert!(sstats.generated_tokens > 0);
    eprintln!("slow consumer: {} tokens before pausing", produced - 40);
    assert!(produced - 40 <= 5 + 1, "{} tokens produced for an unread stream", produced - 40);
}

#[test]
fn the_prefix_cache_serves_a_shared_prefix() {
    let e = engine(1, 0);
    let long = "Here is a long shared system prompt about rivers and mountains. ".repeat(20);
    let (_, first) = e.submit(req(&format!("{long} Question one?"), greedy(4))).unwrap().collect();
    let (_, second) = e.submit(req(&format!("{long} Question two?"), greedy(4))).unwrap().collect();
    eprintln!("first: {} cached of {}, ttft {:?}; second: {} cached of {}, ttft {:?}", first.cached_tokens, first.prompt_tokens, first.time_to_first_token, second.cached_tokens, second.prompt_tokens, second.time_to_first_token);
    assert_eq!(first.cached_tokens, 0);
    assert!(second.cached_tokens >= second.prompt_tokens - 8, "{second:?}");
    let kv = e.kv_usage().unwrap();
    assert_eq!(kv.backend_tokens, kv.accounted_tokens);
}

/// 500 mixed requests: random lengths, a tenth cancelled, some with tiny deadlines.
#[test]
fn soak_500_mixed_requests() {
    let config = EngineConfig { slots: 4, queue: 600, size: ContextSize { n_ctx: 2048, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() }, stream_capacity: 4, prefix_cache: false, ..EngineConfig::default() };
    let e = Engine::start(Arc::clone(shared_model()), config).unwrap();
    let mut seed = 12345u64;
    let mut rnd = |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let words = ["apple", "river", "stone", "cloud", "music", "light", "green", "ocean"];
    let mut rss_after_50 = 0;
    let start = Instant::now();
    let mut outcomes = std::collections::BTreeMap::new();
    for wave in 0..10 {
        let mut handles = Vec::new();
        for _ in 0..50 {
            let n_words = 1 + rnd(40) as usize;
            let prompt: Vec<&str> = (0..n_words).map(|_| words[rnd(8) as usize]).collect();
            let opts = GenerateOptions { max_tokens: Some(1 + rnd(24) as u32), sampling: SamplingParams { temperature: 0.7, seed: rnd(1000) as u32, ..Default::default() }, ..Default::default() };
            let deadline = (rnd(10) == 0).then(|| Instant::now() + Duration::from_millis(rnd(50)));
            let h = e.submit(Request { prompt: prompt.join(" "), opts, deadline }).expect("admitted");
            let cancel = rnd(10) == 0;
            handles.push((h, cancel));
        }
        for (h, cancel) in handles {
            let mut early = None;
            if cancel {
                // The request may even have finished already: then this is its Done.
                if let Some(Event::Done(st)) = h.next_timeout(Duration::from_millis(rnd(30))) {
                    early = Some(st);
                }
                h.cancel();
            }
            let st = match early {
                Some(st) => st,
                None => h.collect().1,
            };
            if let Some(err) = &st.error {
                eprintln!("request {} failed: {err}", st.id);
            }
            *outcomes.entry(format!("{:?}", st.finish)).or_insert(0) += 1;
        }
        if wave == 0 {
            rss_after_50 = rss_kib();
        }
    }
    let rss_end = rss_kib();
    let total: usize = outcomes.values().sum();
    eprintln!("soak: {total} requests in {:?}, outcomes {outcomes:?}, RSS after 50: {rss_after_50} KiB, after 500: {rss_end} KiB ({:.3}x)", start.elapsed(), rss_end as f64 / rss_after_50 as f64);
    assert_eq!(total, 500, "every request ends with a definite outcome");
    assert!(!outcomes.contains_key("Error"), "{outcomes:?}");
    assert!((rss_end as f64) <= rss_after_50 as f64 * 1.10, "RSS grew from {rss_after_50} to {rss_end} KiB");
    let kv = e.kv_usage().unwrap();
    assert_eq!((kv.backend_tokens, kv.accounted_tokens, kv.active, kv.waiting), (0, 0, 0, 0), "KV cells left in use: {kv:?}");
    assert_eq!(e.in_flight(), 0);
}
