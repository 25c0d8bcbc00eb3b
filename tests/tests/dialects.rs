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
    // /health needs no key.
    let (code, _, _) = raw(&addr, "GET", "/health", &[], "");
    assert_eq!(code, 200);
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
}
