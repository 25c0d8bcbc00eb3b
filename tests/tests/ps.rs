//! `llama ps` through the real binary, against canned HTTP servers in the test (no model
//! needed): the table and `--json` from the /v1/models contract, the API key sent, and each
//! failure's message and exit code (5 unreachable, 6 API key, 7 error status, 8 unreadable).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::thread::JoinHandle;

use llama_tests::{llama_cmd, stderr, stdout};

/// `llama ps` with `args`, without the caller's URL or API key.
fn ps(args: &[&str]) -> Command {
    let mut a = vec!["ps"];
    a.extend_from_slice(args);
    let mut c = llama_cmd(&a);
    c.env_remove("LLAMA_URL").env_remove("LLAMA_API_KEY").env_remove("LLAMA_CONFIG");
    c
}

/// A server that answers one connection with `response` and returns the request head.
fn canned(response: Vec<u8>) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&b[..n]),
            }
        }
        let _ = s.write_all(&response);
        String::from_utf8_lossy(&req).into_owned()
    });
    (url, handle)
}

fn json_response(status: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// hyper sends a body of unknown length chunked.
fn chunked_response(body: &str) -> Vec<u8> {
    let (a, b) = body.split_at(body.len() / 2);
    format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len()).into_bytes()
}

const MODELS: &str = r#"{"object":"list","data":[
 {"id":"gemma","object":"model","created":0,"owned_by":"llama","status":"loaded","size_bytes":253000000,
  "arch":"gemma3","quantization":"Q4_K_M","memory_bytes":600000000,"ctx_size":8192,"slots_busy":1,
  "slots_total":4,"idle_seconds":null,"unload_in_seconds":287.5},
 {"id":"smollm2","object":"model","created":0,"owned_by":"llama","status":"unloaded","size_bytes":98362432,
  "arch":"llama","quantization":"Q4_1"}]}"#;

fn outcome(o: &Output) -> (Option<i32>, String, String) {
    (o.status.code(), stdout(o), stderr(o))
}

#[test]
fn ps_shows_the_loaded_models_and_sends_the_key() {
    let (url, server) = canned(chunked_response(MODELS));
    let o = ps(&["--url", &url, "--api-key", "sekrit"]).output().unwrap();
    let (code, out, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    for col in ["NAME", "SIZE", "MEMORY", "CONTEXT", "SLOTS", "IDLE", "UNLOADS IN"] {
        assert!(header.contains(col), "{out}");
    }
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, ["gemma", "253", "MB", "600", "MB", "8192", "1/4", "busy", "4m47s"], "{out}");
    assert!(lines.next().is_none(), "an unloaded model is not shown: {out}");
    let req = server.join().unwrap();
    assert!(req.starts_with("GET /v1/models HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("Authorization: Bearer sekrit\r\n") && req.contains("Connection: close\r\n"), "{req}");
}

#[test]
fn ps_json_is_the_servers_loaded_entries() {
    let (url, server) = canned(json_response("200 OK", MODELS));
    // The URL and key from the environment; a base path is kept.
    let o = ps(&["--json"]).env("LLAMA_URL", format!("{url}/api/")).env("LLAMA_API_KEY", "k2").output().unwrap();
    let (code, out, err) = outcome(&o);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!((list[0]["id"].as_str(), list[0]["quantization"].as_str()), (Some("gemma"), Some("Q4_K_M")));
    let req = server.join().unwrap();
    assert!(req.starts_with("GET /api/v1/models HTTP/1.1\r\n") && req.contains("Bearer k2"), "{req}");
}

#[test]
fn ps_with_nothing_loaded_says_so() {
    let (url, _server) = canned(json_response("200 OK", r#"{"object":"list","data":[]}"#));
    let (code, out, err) = outcome(&ps(&["--url", &url]).output().unwrap());
    assert_eq!((code, out.as_str()), (Some(0), "no models loaded\n"), "{err}");
}

#[test]
fn ps_with_no_server_asks_whether_it_runs() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, err) = outcome(&ps(&["--url", &url]).output().unwrap());
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains(&format!("is `llama serve` running at {url}?")), "{err}");
}

#[test]
fn ps_names_the_missing_or_refused_api_key() {
    let body = r#"{"error":{"message":"missing or invalid API key","type":"authentication_error"}}"#;
    let (url, _s) = canned(json_response("401 Unauthorized", body));
    let (code, _, err) = outcome(&ps(&["--url", &url]).output().unwrap());
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("wants an API key: --api-key or LLAMA_API_KEY"), "{err}");
    let (url, _s) = canned(json_response("401 Unauthorized", body));
    let (code, _, err) = outcome(&ps(&["--url", &url, "--api-key", "wrong"]).output().unwrap());
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("refused the API key"), "{err}");
}

#[test]
fn ps_reports_an_error_status_with_the_servers_message() {
    let (url, _s) = canned(json_response("503 Service Unavailable", r#"{"error":{"message":"shutting down"}}"#));
    let (code, _, err) = outcome(&ps(&["--url", &url]).output().unwrap());
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("answered 503 Service Unavailable: shutting down"), "{err}");
}

#[test]
fn ps_refuses_an_answer_it_cannot_read() {
    for response in [b"garbage\r\n\r\n".to_vec(), json_response("200 OK", "<html>hello</html>"), json_response("200 OK", r#"{"data":[{"id":"x"}]}"#)] {
        let (url, _s) = canned(response);
        let (code, _, err) = outcome(&ps(&["--url", &url]).output().unwrap());
        assert_eq!(code, Some(8), "{err}");
        assert!(err.contains("unexpected answer from"), "{err}");
    }
}

#[test]
fn ps_refuses_bad_urls_and_keys_before_connecting() {
    for (args, env, wanted) in [
        (&["--url", "https://127.0.0.1:8080"][..], None, "https is not supported"),
        (&["--url", "127.0.0.1:8080"], None, "expected http://HOST[:PORT][/PATH]"),
        (&[], Some(("LLAMA_URL", "http://h:99999")), "is not a port"),
        (&["--api-key", ""], None, "--api-key is empty"),
        (&[], Some(("LLAMA_API_KEY", "")), "LLAMA_API_KEY is set but empty"),
        (&["--api-key", "a\nb"], None, "control character"),
    ] {
        let mut c = ps(args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let (code, _, err) = outcome(&c.output().unwrap());
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(wanted), "{args:?} {env:?}: {err}");
    }
}
