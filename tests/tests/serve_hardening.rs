//! `llama serve` against hostile or careless clients, through the real binary and model:
//! each test pins a defect found by attacking the server over HTTP (named in its comment).

use std::io::{Read, Write};
use std::net::TcpStream;

use llama_tests::server::{wait_for, Server, HANG_GUARD};
use llama_tests::{llama_cmd, model_path, stderr};
use serde_json::json;

/// Prompt text that is slow to tokenize: control-token names, parsed as special tokens.
fn special_tokens(bytes: usize) -> String {
    "<start_of_turn><end_of_turn>".repeat(bytes / 28)
}

/// A raw HTTP/1.1 request on a fresh connection; the stream is returned unread.
fn send_raw(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    c
}

/// Whether anything has arrived on `c` yet (without waiting).
fn has_answer(c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = c.peek(&mut b);
    c.set_nonblocking(false).unwrap();
    matches!(r, Ok(n) if n > 0)
}

// Defect 1: a 1 MiB prompt of special-token text was tokenized on an async worker (38 s
// here) before any length check, and answered `context_length_exceeded` at the end.
#[test]
fn a_prompt_over_the_byte_cap_is_refused_before_tokenizing() {
    let s = Server::start(&["--max-body", "4194304"]);
    let (code, v) = s.post("/v1/completions", &json!({"prompt": special_tokens(1 << 20), "max_tokens": 4}));
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("prompt_too_large")), "{v}");
    let (code, v) = s.post("/tokenize", &json!({"content": special_tokens(1 << 20)}));
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("prompt_too_large")), "{v}");
}

// Defect 1: two such requests made /health wait 76 s. Tokenizing now runs on blocking
// threads: with one HTTP worker, /health answers while both are still being tokenized.
#[test]
fn health_answers_while_prompts_are_tokenized() {
    let s = Server::start(&["--http-threads", "1", "--max-body", "4194304", "--max-prompt-bytes", "4194304", "--parallel", "2"]);
    let body = serde_json::to_vec(&json!({"prompt": special_tokens(512 << 10), "max_tokens": 1})).unwrap();
    let slow: Vec<TcpStream> =
        (0..2).map(|_| send_raw(&s.addr(), "POST", "/v1/completions", &[("Content-Type", "application/json")], &body)).collect();
    // Whatever the order the server reads them in, /health must not wait for them.
    let r = ureq::get(&s.url("/health")).call().unwrap();
    assert_eq!(r.status(), 200);
    let answered: Vec<bool> = slow.iter().map(has_answer).collect();
    assert_eq!(answered, vec![false, false], "/health was answered only after the slow prompts");
}

// Defect 2: a request body that never arrives held its connection for ever (256 of them
// locked everyone out).
#[test]
fn a_body_that_never_arrives_gets_408_and_the_connection_closes() {
    let s = Server::start(&["--body-timeout", "1"]);
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"pro", s.addr());
    c.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    // Read to the end: the server must answer and then close.
    c.read_to_string(&mut answer).expect("an answer and a closed connection, not a hang");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    // Everyone else is still served.
    assert_eq!(ureq::get(&s.url("/health")).call().unwrap().status(), 200);
}

// Defect 4: SIGTERM with a stream open that its client does not read: "server stopped" was
// logged, but the process never exited (the engine waited for the request).
#[test]
fn sigterm_with_an_unread_stream_open_exits() {
    let mut s = Server::start(&["--parallel", "1", "--drain-timeout", "1", "--stall-timeout", "3600", "-c", "16384"]);
    let body = serde_json::to_vec(&json!({"prompt": "Tell me a long story.", "max_tokens": 16000, "stream": true, "temperature": 0})).unwrap();
    let mut c = send_raw(&s.addr(), "POST", "/v1/completions", &[("Content-Type", "application/json")], &body);
    let mut first = [0u8; 64];
    c.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first));
    // The client now stops reading; the generation goes on (or pauses on a full socket).
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_for("the server exits after SIGTERM", || s.child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{status:?}");
    drop(c);
}

// Defect 6: a page on another origin could make a key-less loopback server generate with a
// "simple" cross-origin POST (text/plain, no preflight).
#[test]
fn pages_on_other_origins_are_refused() {
    let s = Server::start(&["--cors-origin", "http://good.example"]);
    let body = br#"{"prompt": "Hi", "max_tokens": 1}"#;
    let status = |origin: Option<&str>| {
        let mut headers = vec![("Content-Type", "text/plain")];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let mut c = send_raw(&s.addr(), "POST", "/v1/completions", &headers, body);
        c.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12]).into_owned()
    };
    assert_eq!(status(Some("http://evil.example")), "403");
    assert_eq!(status(Some("null")), "403");
    let own = format!("http://{}", s.addr());
    assert_eq!(status(Some(&own)), "200", "the server's own origin (its chat page) is allowed");
    assert_eq!(status(Some("http://good.example")), "200", "an allowed origin");
    // curl and SDKs send no Origin; Ollama's own examples send no JSON content type.
    assert_eq!(status(None), "200");
}

// Defect 7: `--queue 4611686018427387904` panicked the loader thread and left /health at
// 503 `loading` for ever; `--parallel 2 --queue 18446744073709551615` wrapped the
// admission count. Each is a bad argument now, before anything binds or loads.
#[test]
fn queue_sizes_that_would_overflow_are_bad_arguments() {
    let model = model_path();
    for extra in [&["--queue", "4611686018427387904"][..], &["--parallel", "2", "--queue", "18446744073709551615"], &["--parallel", "100000"]] {
        let mut args = vec!["serve", "-m", model.to_str().unwrap(), "--port", "0"];
        args.extend_from_slice(extra);
        let mut child = llama_cmd(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let status = wait_for("llama serve exits", || child.try_wait().unwrap());
        let out = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("queue") || err.contains("parallel"), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

// Defect 9: `max_tokens: 0` still generated one token.
#[test]
fn max_tokens_zero_generates_nothing() {
    let s = Server::start(&[]);
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 0})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0})),
    ] {
        let (code, v) = s.post(path, &body);
        assert_eq!(code, 200, "{v}");
        let choice = &v["choices"][0];
        let text = choice["text"].as_str().or(choice["message"]["content"].as_str());
        assert_eq!((text, v["usage"]["completion_tokens"].as_u64()), (Some(""), Some(0)), "{v}");
        assert_eq!(choice["finish_reason"], "length");
    }
}

// Review finding: hyper has no write timeout, so a client that sends requests and never
// reads the answers kept its connection (and its place among the 256) for ever; 256 of them
// locked everyone out, /health included. A response that makes no progress for
// --stall-timeout now ends its connection.
#[test]
fn a_client_that_never_reads_its_answers_loses_its_connection() {
    let s = Server::start(&["--stall-timeout", "1"]);
    let mut c = TcpStream::connect(s.addr()).unwrap();
    // Before the fix this write blocked until the hang guard: a timeout, not a reset.
    c.set_write_timeout(Some(HANG_GUARD)).unwrap();
    let burst = format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr()).repeat(2000);
    let err = loop {
        if let Err(e) = c.write_all(burst.as_bytes()) {
            break e;
        }
    };
    assert!(matches!(err.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe), "{err:?}");
    assert_eq!(ureq::get(&s.url("/health")).call().unwrap().status(), 200);
}
