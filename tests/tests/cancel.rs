//! Streaming, cancellation and backpressure through the library, with the real plugin
//! and model loaded in-process. Latencies are printed (for the notes), never asserted.

use std::time::{Duration, Instant};

use llama_host::{FinishReason, GenerateOptions, SamplingParams};
use llama_tests::{model, session_params};

fn greedy(max: u32) -> GenerateOptions {
    GenerateOptions { max_tokens: Some(max), sampling: SamplingParams { temperature: 0.0, ..Default::default() }, ..Default::default() }
}

#[test]
fn cancel_mid_generation_stops_within_a_step_and_leaks_no_kv() {
    let m = model();
    let mut s = m.session(&session_params(2048)).unwrap();
    let reference: String = s.stream("Tell me a story.", &greedy(24)).unwrap().map(Result::unwrap).collect();

    let mut stream = s.stream("Tell me a story.", &greedy(400)).unwrap();
    let canceller = stream.canceller();
    let mut pieces = 0;
    let mut cancelled_at = None;
    for piece in stream.by_ref() {
        piece.unwrap();
        pieces += 1;
        if pieces == 5 {
            // From another thread, as a signal handler or a server would.
            let c = canceller.clone();
            std::thread::spawn(move || c.cancel()).join().unwrap();
            cancelled_at = Some(Instant::now());
        }
    }
    let latency = cancelled_at.expect("generated 5 pieces").elapsed();
    let stats = stream.stats().clone();
    drop(stream);
    eprintln!("cancel latency mid-generation: {latency:?} (one decode step is about 1/{:.0} s)", stats.generation_tokens_per_s());
    assert_eq!(stats.finish, Some(FinishReason::Cancelled));
    assert!(stats.generated_tokens <= 6, "generation went on after cancel: {} tokens", stats.generated_tokens);
    // No leak: the backend holds exactly what the session accounts for.
    assert_eq!(s.kv_tokens() as usize, s.cached_tokens());
    // The session stays usable and deterministic.
    let again: String = s.stream("Tell me a story.", &greedy(24)).unwrap().map(Result::unwrap).collect();
    assert_eq!(again, reference);
}

#[test]
fn cancel_mid_prompt_interrupts_the_prompt() {
    let m = model();
    let p = session_params(4096);
    let mut s = m.session(&llama_host::SessionParams { size: llama_host::ContextSize { n_batch: 256, n_ubatch: 64, ..p.size }, ..p }).unwrap();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(300); // ~3000 tokens
    let mut stream = s.stream(&long, &greedy(8)).unwrap();
    let canceller = stream.canceller();
    let start = Instant::now();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let at = Instant::now();
        canceller.cancel();
        at
    });
    let first = stream.next();
    let ended = Instant::now();
    let cancelled_at = t.join().unwrap();
    let stats = stream.stats().clone();
    drop(stream);
    assert!(first.is_none(), "the prompt was not interrupted");
    assert_eq!(stats.finish, Some(FinishReason::Cancelled));
    eprintln!(
        "cancel latency mid-prompt: {:?} after cancel; prompt ran {:?} of {} tokens; {} tokens landed in the cache",
        ended.duration_since(cancelled_at),
        ended.duration_since(start),
        stats.prompt_tokens,
        s.cached_tokens()
    );
    assert!(s.cached_tokens() < stats.prompt_tokens, "the whole prompt was decoded despite the cancel");
    assert_eq!(s.kv_tokens() as usize, s.cached_tokens(), "KV cells leaked");
    // Usable afterwards.
    let text: String = s.stream("Hello", &greedy(4)).unwrap().map(Result::unwrap).collect();
    assert!(!text.is_empty());
}

#[test]
fn dropping_the_stream_stops_generation() {
    let m = model();
    let mut s = m.session(&session_params(1024)).unwrap();
    {
        let mut stream = s.stream("Count: one, two,", &greedy(200)).unwrap();
        stream.next().unwrap().unwrap();
        stream.next().unwrap().unwrap();
    }
    let held = s.kv_tokens();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.kv_tokens(), held, "generation continued after the stream was dropped");
    assert_eq!(held as usize, s.cached_tokens());
}

#[test]
fn a_consumer_that_stops_reading_pauses_generation() {
    let m = model();
    let mut s = m.session(&session_params(1024)).unwrap();
    let mut stream = s.stream("Once upon a time", &greedy(200)).unwrap();
    for _ in 0..3 {
        stream.next().unwrap().unwrap();
    }
    let before = stream.stats().generated_tokens;
    std::thread::sleep(Duration::from_secs(2));
    let after = stream.stats().generated_tokens;
    // Generation is pull-driven: the capacity between producer and consumer is zero
    // tokens, so nothing at all is produced while the consumer does not read.
    eprintln!("tokens produced while the consumer slept 2 s: {}", after - before);
    assert_eq!(after, before);
    stream.next().unwrap().unwrap();
    assert_eq!(stream.stats().generated_tokens, before + 1);
}

#[test]
fn with_the_cache_off_nothing_stays_in_kv() {
    let m = model();
    let mut s = m.session(&llama_host::SessionParams { cache_tokens: 0, ..session_params(1024) }).unwrap();
    let _: Vec<_> = s.stream("Hello there", &greedy(4)).unwrap().collect();
    assert_eq!(s.kv_tokens(), 0);
    let mut stream = s.stream("Hello there", &greedy(50)).unwrap();
    stream.next().unwrap().unwrap();
    stream.stop();
    drop(stream);
    assert_eq!(s.kv_tokens(), 0);
}

#[test]
fn sigint_stops_llama_run_with_exit_130() {
    use std::io::Read;
    let model = llama_tests::model_path();
    let mut child = llama_tests::llama_cmd(&["run", "-m", model.to_str().unwrap(), "-p", "Tell me a long story.", "-n", "2000", "--temp", "0", "-t", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first generated bytes, then interrupt.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let sent = Instant::now();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    eprintln!("llama run exited {:?} after SIGINT", sent.elapsed());
    assert_eq!(o.status.code(), Some(130), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("finish cancelled"), "{err}");
}
