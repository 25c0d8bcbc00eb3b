//! The engine's rules over the fake model (llama_host::fake): no plugin, no model file, and
//! a backend that can be told to misbehave. The real-model engine tests are in
//! tests/tests/engine.rs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use llama_host::fake::{FakeBehaviour, FakeModel};
use llama_host::{ContextSize, GenerateOptions, SamplingParams};

use super::*;

/// Only so a broken engine fails the test instead of hanging it; never a timing claim.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn config(slots: u32, queue: usize) -> EngineConfig {
    EngineConfig {
        slots,
        queue,
        size: ContextSize { n_ctx: 1024 * slots, n_batch: 64, n_ubatch: 64, n_threads: 1, n_threads_batch: 1 },
        stream_capacity: 1,
        ..EngineConfig::default()
    }
}

fn start(reply: &str, config: EngineConfig) -> (Engine, Arc<FakeBehaviour>) {
    let (model, fake) = FakeModel::new(reply).into_model();
    (Engine::start(Arc::new(model), config).expect("the engine starts"), fake)
}

fn request(prompt: &str, max_tokens: Option<u32>) -> Request {
    let opts = GenerateOptions { max_tokens, sampling: SamplingParams { temperature: 0.0, ..Default::default() }, ..Default::default() };
    Request { prompt: prompt.into(), opts, deadline: None }
}

/// All text and the final stats, or a panic if the engine never finishes the request.
fn finish(h: Handle) -> (String, RequestStats) {
    let mut text = String::new();
    loop {
        match h.next_timeout(HANG_GUARD) {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(s)) => return (text, s),
            None => panic!("the request never finished (text so far {text:?})"),
        }
    }
}

#[test]
fn fewer_sampled_tokens_than_asked_fail_the_request_and_the_engine_lives_on() {
    let (e, fake) = start("hi", config(2, 2));
    fake.short_samples.store(1, Ordering::SeqCst);
    let (_, stats) = finish(e.submit(request("one", None)).unwrap());
    assert_eq!(stats.finish, Finish::Error);
    assert!(stats.error.as_deref().unwrap_or("").contains("sampled tokens"), "{stats:?}");
    fake.short_samples.store(0, Ordering::SeqCst);
    let (text, stats) = finish(e.submit(request("two", None)).unwrap());
    assert_eq!((text.as_str(), stats.finish), ("hi", Finish::Stop));
}

#[test]
fn a_token_without_bytes_is_an_error_not_silence() {
    let (e, fake) = start("hi", config(1, 0));
    fake.fail_token_bytes.store(true, Ordering::SeqCst);
    let (text, stats) = finish(e.submit(request("x", None)).unwrap());
    assert_eq!((text.as_str(), stats.finish), ("", Finish::Error));
    assert!(stats.error.unwrap().contains("not in the vocabulary"));
}

#[test]
fn a_failed_decode_step_fails_its_requests_only() {
    let (e, fake) = start("ok", config(1, 1));
    fake.fail_step.store(true, Ordering::SeqCst);
    assert_eq!(finish(e.submit(request("a", None)).unwrap()).1.finish, Finish::Error);
    fake.fail_step.store(false, Ordering::SeqCst);
    assert_eq!(finish(e.submit(request("b", None)).unwrap()).0, "ok");
}

#[test]
fn batch_invariant_mode_with_a_batch_of_one_is_refused_not_spun() {
    let mut c = config(1, 0);
    c.batch_invariant = true;
    c.size.n_batch = 1;
    let (model, _) = FakeModel::new("x").into_model();
    let err = Engine::start(Arc::new(model), c).err().expect("refused");
    assert!(err.to_string().contains("batch-size"), "{err}");
}

#[test]
fn max_tokens_zero_generates_nothing() {
    let (e, _) = start("never", config(1, 0));
    let (text, stats) = finish(e.submit(request("prompt", Some(0))).unwrap());
    assert_eq!((text.as_str(), stats.generated_tokens, stats.finish), ("", 0, Finish::Length));
}

#[test]
fn sizes_that_would_overflow_are_refused() {
    for (slots, queue) in [(2, 1usize << 62), (2, usize::MAX), (0, 1), (100_000, 1)] {
        // Validated before the context is made, so no size here is ever allocated.
        let mut c = config(1, queue);
        c.slots = slots;
        let (model, _) = FakeModel::new("x").into_model();
        let err = Engine::start(Arc::new(model), c).err();
        assert!(matches!(err, Some(StartError::InvalidConfig { .. })), "slots {slots} queue {queue}: {err:?}");
    }
}

#[test]
fn admission_comes_before_tokenizing_and_the_byte_cap_before_both() {
    let (e, fake) = start("", config(1, 0));
    let running = e.submit(request("busy", None)).unwrap();
    let calls = fake.tokenize_calls.load(Ordering::SeqCst);
    assert!(matches!(e.submit(request("refused", None)), Err(SubmitError::Overloaded { .. })));
    assert_eq!(fake.tokenize_calls.load(Ordering::SeqCst), calls, "a refused request was tokenized");
    drop(running);
    // The place comes back once the engine has ended the dropped request.
    let huge = "x".repeat(e.max_prompt_bytes() + 1);
    let err = loop {
        match e.submit(request(&huge, None)) {
            Err(SubmitError::Overloaded { .. }) => std::thread::sleep(Duration::from_millis(5)),
            other => break other.err(),
        }
    };
    assert!(matches!(err, Some(SubmitError::PromptTooLarge { .. })), "{err:?}");
    assert_eq!(fake.tokenize_calls.load(Ordering::SeqCst), calls, "an oversized prompt was tokenized");
}

#[test]
fn a_consumer_that_stops_reading_loses_its_slot_after_the_stall_timeout() {
    let mut c = config(1, 1);
    c.stall_timeout = Duration::from_millis(200);
    // An endless reply: only the stall rule can end the first request.
    let (e, _) = start("", c);
    let stalled = e.submit(request("never read", None)).unwrap();
    let (text, stats) = finish(e.submit(request("next", Some(3))).unwrap());
    assert_eq!((text.as_str(), stats.finish), ("xxx", Finish::Length));
    // The stalled one ended as cancelled (what it could still take of its events).
    let events: Vec<Event> = std::iter::from_fn(|| stalled.next_timeout(HANG_GUARD)).collect();
    assert!(events.iter().all(|ev| !matches!(ev, Event::Done(s) if s.finish != Finish::Cancelled)), "{events:?}");
    assert_eq!(e.metrics().outcome(crate::metrics::Outcome::Cancelled), 1);
}

#[test]
fn shutdown_ends_paused_requests_and_the_engine_thread() {
    let mut c = config(2, 2);
    c.stall_timeout = Duration::from_secs(3600);
    let (e, fake) = start("", c);
    let paused = e.submit(request("never read", None)).unwrap();
    let queued = e.submit(request("also never read", None)).unwrap();
    // Wait until both sequences are paused: nothing more is decoded (each consumer's
    // channel holds one piece and the engine holds the next).
    loop {
        let before = fake.decoded_tokens.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        let after = fake.decoded_tokens.load(Ordering::SeqCst);
        if after == before && after > "never read".len() + "also never read".len() {
            break;
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(e);
        let _ = tx.send(());
    });
    rx.recv_timeout(HANG_GUARD).expect("dropping the engine returned (its thread ended)");
    // Both streams end: what was buffered, then the end of the channel.
    for h in [paused, queued] {
        let n = std::iter::from_fn(|| h.next_timeout(HANG_GUARD)).count();
        assert!(n <= 2, "{n} events");
    }
}

#[test]
fn a_shut_down_engine_says_so_and_refuses_requests() {
    let (e, _) = start("x", config(1, 0));
    assert!(e.is_running());
    e.shutdown();
    assert!(!e.is_running());
    assert!(matches!(e.submit(request("y", None)), Err(SubmitError::Stopped)));
}

/// A sequence whose sampling fails inside a step (a grammar dead end, say) ends its own
/// request with the reason; the request batched with it in the same steps completes.
#[test]
fn a_sampling_failure_ends_only_its_own_request() {
    let (e, fake) = start("fine", config(2, 2));
    *fake.fail_sample_on.lock().unwrap() = Some(i32::from(b'!'));
    let bad = e.submit(request("poisoned!", None)).unwrap();
    let good = e.submit(request("healthy", None)).unwrap();
    let (_, bad) = finish(bad);
    assert_eq!(bad.finish, Finish::Error);
    assert!(bad.error.as_deref().unwrap_or("").contains("dead end"), "{bad:?}");
    let (text, good) = finish(good);
    assert_eq!((text.as_str(), good.finish), ("fine", Finish::Stop));
}
