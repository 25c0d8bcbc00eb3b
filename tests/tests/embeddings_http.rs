//! `/v1/embeddings` through the real binary, plugin and models: one request of 64 inputs
//! equals 64 requests of one, in order; the official `openai` client (float and base64);
//! bad input answered 400 naming the problem with the server serving on; a model that
//! cannot pool refused with the reason; embeddings beside a generation stream; metrics.

use llama_host::embed::cosine;
use llama_tests::server::{wait_for, Server};
use llama_tests::{model_path, smollm2_model_path};
use serde_json::{json, Value};

fn both_models(extra: &[&str]) -> Server {
    let gemma = format!("gemma={}", model_path().display());
    let smol = format!("smol={}", smollm2_model_path().display());
    let mut args = vec!["-m", smol.as_str(), "--models-max", "2"];
    args.extend_from_slice(extra);
    let s = Server::start_with(&gemma, &args);
    s.wait_ready();
    s
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"].as_array().unwrap_or_else(|| panic!("no data in {v}")).iter().map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn sentences(n: usize) -> Vec<String> {
    let subjects = ["The cat", "A lawyer", "My grandmother", "The old bridge", "Our team", "The river", "A small robot", "The library"];
    let verbs = ["sleeps near", "argues about", "remembers", "crosses", "celebrates", "floods", "repairs", "opens"];
    let objects = ["the window", "taxes", "the war", "the valley", "a victory", "the town", "a bicycle", "at nine"];
    (0..n).map(|i| format!("{} {} {} ({i}).", subjects[i % 8], verbs[(i / 8) % 8], objects[(i * 3) % 8])).collect()
}

#[test]
fn sixty_four_inputs_in_one_request_equal_sixty_four_requests_in_order() {
    let s = both_models(&["--pooling", "mean"]);
    let texts = sentences(64);
    for model in ["gemma", "smol"] {
        let (code, batch) = s.post("/v1/embeddings", &json!({"model": model, "input": texts}));
        assert_eq!(code, 200, "{batch}");
        let batch_vectors = vectors(&batch);
        assert_eq!(batch_vectors.len(), 64);
        for (i, d) in batch["data"].as_array().unwrap().iter().enumerate() {
            assert_eq!(d["index"], i, "out of order");
        }
        let mut worst = 1.0f64;
        for (i, t) in texts.iter().enumerate() {
            let (code, one) = s.post("/v1/embeddings", &json!({"model": model, "input": t}));
            assert_eq!(code, 200, "{one}");
            let c = cosine(&vectors(&one)[0], &batch_vectors[i]);
            assert!(c >= 0.9999, "{model} input {i}: cosine {c}");
            worst = worst.min(c);
        }
        // Distinct inputs give distinct vectors (the batch is not one vector repeated).
        assert!(cosine(&batch_vectors[0], &batch_vectors[9]) < 0.9999);
        eprintln!("{model}: 64 inputs in one request vs 64 requests: minimum cosine {worst:.7}");
        let usage = batch["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(usage >= 64 * 5, "{usage}");
    }
    let m = s.metrics();
    assert_eq!(m.get("llama_requests_total{outcome=\"embedded\"}"), 2.0 * 65.0);
    assert_eq!(m.get("llama_embedded_inputs_total"), 2.0 * 128.0);
    assert_eq!(m.get("llama_requests_in_flight"), 0.0);
}

#[test]
fn the_official_openai_client_gets_float_and_base64_embeddings() {
    let s = both_models(&["--pooling", "last"]);
    llama_tests::run_python_client("openai_embeddings.py", &s.base);
}

#[test]
fn bad_input_gets_400_naming_the_problem_and_the_server_serves_on() {
    let s = both_models(&["--pooling", "mean", "--max-body", "4194304"]);
    let long = "word ".repeat(2000);
    let many: Vec<&str> = vec!["a"; 100_000];
    let cases: Vec<(&str, Value, &str)> = vec![
        ("an empty string", json!({"input": ""}), "input 0 is empty"),
        ("an empty string among others", json!({"input": ["a", "b", ""]}), "input 2 is empty"),
        ("an empty array", json!({"input": []}), "empty array"),
        ("an empty token array", json!({"input": [[1, 2], []]}), "input 1 is empty"),
        ("a token id outside the vocabulary", json!({"input": [[5, 6], [7, 999999999]]}), "input 1: token id 999999999 is not in the vocabulary"),
        ("a negative token id", json!({"input": [-1]}), "token id -1"),
        ("a token id that is not an integer", json!({"input": [[1.5]]}), "1.5 is not a token id"),
        ("an input longer than the context", json!({"input": ["short", long]}), "input 1 has"),
        ("100,000 inputs", json!({"input": many}), "100000 inputs is over the limit of 2048"),
        ("3,000 token ids: one input, too long", json!({"input": vec![5; 3000]}), "input 0 has 3000 tokens; the limit is 512"),
        ("token ids mixed with a string", json!({"input": [5, "a"]}), "mixes token ids"),
        ("no input", json!({"model": "gemma"}), "'input' is required"),
        ("a number as input", json!({"input": 5}), "must be a string"),
        ("another model's width", json!({"input": "a", "dimensions": 17}), "cannot give 17"),
        ("an unknown encoding", json!({"input": "a", "encoding_format": "hex"}), "encoding_format"),
        ("a bad normalisation", json!({"input": "a", "embd_normalize": -7}), "embd-normalize"),
    ];
    for (what, body, needle) in cases {
        let (code, v) = s.post("/v1/embeddings", &body);
        assert_eq!(code, 400, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{what}: {msg}");
        // Never truncated silently: the too-long input's answer says so.
        if what.starts_with("an input longer") {
            assert!(msg.contains("never truncated") && msg.contains("limit is 512"), "{msg}");
            assert_eq!(v["error"]["code"], "context_length_exceeded");
        }
        let (code, ok) = s.post("/v1/embeddings", &json!({"input": "still serving"}));
        assert_eq!(code, 200, "after {what}: {ok}");
    }
    // Nothing refused was queued or left a place taken.
    let m = s.metrics();
    assert_eq!(m.get("llama_requests_in_flight"), 0.0);
    assert_eq!(m.get("llama_requests_total{outcome=\"error\"}"), 0.0);
}

#[test]
fn a_model_without_pooling_is_refused_with_the_reason_and_a_config_pooling_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, format!("[models.smol]\npath = \"{}\"\npooling = \"cls\"\n", smollm2_model_path().display())).unwrap();
    let gemma = format!("gemma={}", model_path().display());
    let s = Server::start_with(&gemma, &["-m", "smol", "--config", cfg.to_str().unwrap()]);
    s.wait_ready();
    let (code, v) = s.post("/v1/embeddings", &json!({"model": "gemma", "input": "hello"}));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["code"], "embeddings_unsupported");
    assert!(v["error"]["message"].as_str().unwrap().contains("--pooling"), "{v}");
    let (code, v) = s.post("/v1/embeddings", &json!({"model": "smol", "input": "hello"}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(vectors(&v)[0].len(), 576);
    // The generation side of the refused model is untouched.
    let (code, v) = s.post("/v1/completions", &json!({"model": "gemma", "prompt": "Hello", "max_tokens": 3}));
    assert_eq!(code, 200, "{v}");
}

#[test]
fn embeddings_and_a_generation_stream_share_the_model_without_stalling_each_other() {
    let s = both_models(&["--pooling", "mean", "--parallel", "2"]);
    let base = s.base.clone();
    // A long greedy stream on the same model.
    let stream = std::thread::spawn(move || {
        let r = ureq::post(&format!("{base}/v1/completions"))
            .send_json(json!({"model": "gemma", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": true}))
            .unwrap();
        llama_tests::server::sse_events(r)
    });
    wait_for("the stream is generating", || (s.metric("llama_active_sequences") >= 1.0).then_some(()));
    let texts = sentences(128);
    let (code, v) = s.post("/v1/embeddings", &json!({"model": "gemma", "input": texts}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(vectors(&v).len(), 128);
    let events = stream.join().unwrap();
    assert!(events.len() > 3 && events.last().map(String::as_str) == Some("[DONE]"), "{events:?}");
    let m = s.metrics();
    assert_eq!(m.get("llama_requests_in_flight"), 0.0);
    assert_eq!(m.get("llama_requests_total{outcome=\"embedded\"}"), 1.0);
}

#[test]
fn a_small_request_is_not_held_back_by_a_large_one_queued_before_it() {
    let s = both_models(&["--pooling", "mean"]);
    let base = s.base.clone();
    let big = std::thread::spawn(move || {
        let texts = sentences(1024);
        ureq::post(&format!("{base}/v1/embeddings")).send_json(json!({"model": "gemma", "input": texts})).map(|r| r.status()).unwrap_or(0)
    });
    wait_for("the large request is running", || (s.metric("llama_embedded_inputs_total") >= 1.0).then_some(()));
    let (code, v) = s.post("/v1/embeddings", &json!({"model": "gemma", "input": "a small one"}));
    assert_eq!(code, 200, "{v}");
    // The small one was answered while the large one was still in flight: batches are
    // shared between queued requests, not given to the oldest until it is done.
    let m = s.metrics();
    assert_eq!(m.get("llama_requests_total{outcome=\"embedded\"}"), 1.0, "{}", m.0);
    assert!(m.get("llama_requests_in_flight") >= 1.0);
    assert!(m.get("llama_embedded_inputs_total") < 1025.0);
    assert_eq!(big.join().unwrap(), 200);
}

#[test]
fn pooling_that_gives_no_vector_per_input_is_refused_at_start() {
    for pooling in ["none", "rank"] {
        let o = llama_tests::llama(&["serve", "-m", model_path().to_str().unwrap(), "--port", "0", "--pooling", pooling]);
        llama_tests::assert_exit(&o, 2);
        let err = llama_tests::stderr(&o);
        assert!(err.contains("pooling") && err.contains("mean, cls or last"), "{err}");
    }
}

#[test]
fn a_client_that_leaves_mid_request_frees_its_place() {
    let s = both_models(&["--pooling", "mean"]);
    let texts = sentences(2048);
    let body = json!({"model": "gemma", "input": texts}).to_string();
    // Send the request and close the connection before the answer.
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
        write!(c, "POST /v1/embeddings HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", s.addr(), body.len()).unwrap();
        wait_for("the request is admitted", || (s.metric("llama_requests_in_flight") >= 1.0).then_some(()));
    }
    wait_for("the request is cancelled", || (s.metric("llama_requests_total{outcome=\"cancelled\"}") == 1.0).then_some(()));
    let m = s.metrics();
    assert_eq!(m.get("llama_requests_in_flight"), 0.0);
    assert!(m.get("llama_embedded_inputs_total") < 2048.0, "the whole request ran: {}", m.0);
    let (code, v) = s.post("/v1/embeddings", &json!({"model": "gemma", "input": "next"}));
    assert_eq!(code, 200, "{v}");
}
