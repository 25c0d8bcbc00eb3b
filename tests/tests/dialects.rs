//! The checks every API dialect shares (API key, Host, Origin, the routing table), seen
//! through the real binary on each dialect's routes: refused the same way, and answered in
//! that dialect's error shape (OpenAI's object, Ollama's `{"error": "…"}`, Anthropic's
//! `{"type": "error", …}`). The dialects' own behaviour is in ollama_http.rs and
//! anthropic_http.rs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use llama_tests::server::Server;
use serde_json::Value;

/// One request on its own connection: the status line's code and the body as JSON.
fn raw(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: localhost\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    c.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, serde_json::from_str(body).unwrap_or(Value::Null), head.to_string())
}

#[derive(Clone, Copy)]
enum Shape {
    OpenAi,
    Ollama,
    Anthropic,
}

/// The body is an error in `shape`; returns its message.
fn error_in(shape: Shape, v: &Value) -> String {
    let message = match shape {
        Shape::OpenAi => v["error"]["message"].as_str(),
        Shape::Ollama => v["error"].as_str(),
        Shape::Anthropic => {
            assert_eq!(v["type"], "error", "{v}");
            assert!(v["error"]["type"].is_string(), "{v}");
            v["error"]["message"].as_str()
        }
    };
    message.unwrap_or_else(|| panic!("not an error in this dialect's shape: {v}")).to_string()
}

const ROUTES: [(&str, &str, Shape); 4] = [
    ("POST", "/v1/chat/completions", Shape::OpenAi),
    ("POST", "/api/chat", Shape::Ollama),
    ("GET", "/api/tags", Shape::Ollama),
    ("POST", "/v1/messages", Shape::Anthropic),
];

#[test]
fn the_key_host_and_origin_checks_hold_on_every_dialect_in_its_shape() {
    let s = Server::start(&["--parallel", "1", "--api-key", "sekrit"]);
    let addr = s.addr();
    for (method, path, shape) in ROUTES {
        // No key, a wrong key in either header: 401.
        for headers in [vec![], vec![("Authorization", "Bearer nope")], vec![("x-api-key", "nope")]] {
            let (code, v, _) = raw(&addr, method, path, &headers, "{}");
            assert_eq!(code, 401, "{path} {headers:?}: {v}");
            error_in(shape, &v);
        }
        // A rebound DNS name, a foreign page: 403, before the key is even looked at.
        let (code, v, _) = raw(&addr, method, path, &[("Host", "evil.example"), ("x-api-key", "sekrit")], "{}");
        assert_eq!(code, 403, "{path}: {v}");
        assert!(error_in(shape, &v).contains("localhost"), "{v}");
        let (code, v, _) = raw(&addr, method, path, &[("Origin", "http://evil.example"), ("x-api-key", "sekrit")], "{}");
        assert_eq!(code, 403, "{path}: {v}");
        error_in(shape, &v);
    }
    // Anthropic's header works on the OpenAI routes too, and Bearer on Anthropic's.
    let (code, v, _) = raw(&addr, "GET", "/v1/models", &[("x-api-key", "sekrit")], "");
    assert_eq!(code, 200, "{v}");
    let (code, v, _) = raw(&addr, "POST", "/v1/messages", &[("Authorization", "Bearer sekrit"), ("Content-Type", "application/json")], "{");
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // The scheme's name is case-insensitive; the key is not.
    let (code, v, _) = raw(&addr, "GET", "/v1/models", &[("Authorization", "bearer sekrit")], "");
    assert_eq!(code, 200, "{v}");
    let (code, v, _) = raw(&addr, "GET", "/v1/models", &[("Authorization", "Bearer SEKRIT")], "");
    assert_eq!(code, 401, "{v}");
    // /health needs no key.
    let (code, _, _) = raw(&addr, "GET", "/health", &[], "");
    assert_eq!(code, 200);
}

/// Reads a streamed answer to its end (the server closes it): the body as text, chunk
/// framing included.
fn read_to_end(mut c: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// Review finding: past the drain deadline the server cancelled open streams and exited
// before their connections wrote the error that says so: clients got a cut-off body.
#[test]
fn streams_cut_short_by_shutdown_end_with_their_dialects_error() {
    let mut s = Server::start(&["--parallel", "3", "--drain-timeout", "1", "-c", "12288"]);
    let addr = s.addr();
    let streams: Vec<(&str, String)> = vec![
        ("/v1/chat/completions", r#"{"messages":[{"role":"user","content":"Tell me a very long story."}],"max_tokens":4000,"stream":true}"#.into()),
        ("/api/generate", r#"{"prompt":"Tell me a very long story.","options":{"num_predict":4000}}"#.into()),
        ("/v1/messages", r#"{"max_tokens":4000,"stream":true,"messages":[{"role":"user","content":"Tell me a very long story."}]}"#.into()),
    ];
    let conns: Vec<TcpStream> = streams
        .iter()
        .map(|(path, body)| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            c.write_all(req.as_bytes()).unwrap();
            let mut first = [0u8; 12];
            c.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200", "{path}");
            c
        })
        .collect();
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let bodies: Vec<String> = conns.into_iter().map(read_to_end).collect();
    let status = llama_tests::server::wait_for("the server exits", || s.child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Each ends with its dialect's error, and the chunked body is complete.
    assert!(bodies[0].contains(r#""code":"cancelled""#) && bodies[0].contains("data: [DONE]"), "{}", bodies[0]);
    assert!(bodies[1].contains(r#"{"error":"the request was cancelled: the server is shutting down"}"#), "{}", bodies[1]);
    assert!(!bodies[1].contains(r#""done":true"#), "{}", bodies[1]);
    assert!(bodies[2].contains("event: error") && !bodies[2].contains("message_stop"), "{}", bodies[2]);
    for b in &bodies {
        assert!(b.ends_with("0\r\n\r\n"), "the chunked body did not end: {}", &b[b.len().saturating_sub(200)..]);
    }
}

#[test]
fn an_empty_model_name_is_the_default_model() {
    let s = Server::start(&["--parallel", "1"]);
    let (code, v) = s.post("/v1/chat/completions", &serde_json::json!({"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}));
    assert_eq!(code, 200, "{v}");
    let (code, v) = s.post("/v1/messages", &serde_json::json!({"model": "", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}));
    assert_eq!(code, 200, "{v}");
}

#[test]
fn unknown_paths_and_wrong_methods_answer_in_the_paths_dialect() {
    let s = Server::start(&["--parallel", "1"]);
    let addr = s.addr();
    let cases = [
        ("GET", "/api/no-such-route", 404, Shape::Ollama),
        ("GET", "/api/chat", 405, Shape::Ollama),
        ("POST", "/api/tags", 405, Shape::Ollama),
        ("GET", "/v1/messages", 405, Shape::Anthropic),
        ("POST", "/v1/messages/nothing", 404, Shape::Anthropic),
        ("GET", "/v1/nothing", 404, Shape::OpenAi),
    ];
    for (method, path, status, shape) in cases {
        let (code, v, _) = raw(&addr, method, path, &[], "");
        assert_eq!(code, status, "{method} {path}: {v}");
        error_in(shape, &v);
    }
    // The CORS preflight names the headers Anthropic's and Ollama's browser clients send.
    drop(s);
    let s = Server::start(&["--parallel", "1", "--cors-origin", "http://app.test"]);
    let (code, _, head) = raw(
        &s.addr(),
        "OPTIONS",
        "/v1/messages",
        &[("Origin", "http://app.test"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "x-api-key")],
        "",
    );
    assert_eq!(code, 204, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-api-key"), "{head}");
    // What an SDK in a browser asks to send is allowed for an allowed origin.
    let asked = "content-type,x-api-key,anthropic-version,anthropic-dangerous-direct-browser-access,x-stainless-os";
    let (code, _, head) = raw(
        &s.addr(),
        "OPTIONS",
        "/v1/messages",
        &[("Origin", "http://app.test"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", asked)],
        "",
    );
    assert_eq!(code, 204, "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("access-control-allow-headers: {asked}")), "{head}");
}
