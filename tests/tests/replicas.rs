//! Several `llama serve` processes behind a balancer: /health says ready, busy or loading,
//! /metrics has free slots and queue depth per model, and a balancer with health checks
//! keeps answering when one replica dies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_tests::server::{spawn_serve, status_json, wait_for, Server};
use llama_tests::smollm2_model_path;
use serde_json::{json, Value};

fn smol() -> String {
    smollm2_model_path().to_str().unwrap().to_string()
}

/// The two tests run one after the other: three `llama serve` processes on 2 cores would
/// only slow each other down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn health(base: &str, query: &str) -> (u16, Value) {
    status_json("/health", ureq::get(&format!("{base}/health{query}")).call())
}

#[test]
fn health_and_metrics_say_when_every_slot_is_busy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "1", "--queue", "4"]);
    // Loading: 503 with its code (seen while the model loads, which is quick here).
    let (code, h) = health(&s.base, "");
    assert!(code == 200 || (code == 503 && h["error"]["code"] == "loading"), "{code} {h}");
    s.wait_ready();
    let (code, h) = health(&s.base, "");
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")), "{h}");
    assert_eq!((h["slots_idle"].as_u64(), h["slots_total"].as_u64(), h["queue_depth"].as_u64()), (Some(1), Some(1), Some(0)), "{h}");
    // One streamed request holds the only slot; a second waits in the queue.
    let long = json!({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000, "stream": true,
        "grammar": "root ::= (\"n\" [0-9] [0-9]? \"\\n\"){1000}"});
    let mut held = ureq::post(&s.url("/v1/chat/completions")).send_json(long.clone()).unwrap().into_reader();
    let mut first = [0u8; 64];
    held.read_exact(&mut first).unwrap();
    let queued = {
        let url = s.url("/v1/chat/completions");
        std::thread::spawn(move || ureq::post(&url).send_json(json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})).map(|r| r.status()).ok())
    };
    wait_for("the second request is queued", || (s.metric("llama_queue_depth") == 1.0).then_some(()));
    let (code, h) = health(&s.base, "");
    assert_eq!((code, h["status"].as_str()), (200, Some("busy")), "a busy replica stays in a plain health check's pool: {h}");
    assert_eq!((h["slots_idle"].as_u64(), h["queue_depth"].as_u64()), (Some(0), Some(1)), "{h}");
    // llama-server's way of taking a busy replica out of a pool.
    let (code, h) = health(&s.base, "?fail_on_no_slot=1");
    assert_eq!((code, h["error"]["code"].as_str()), (503, Some("no_slot_available")), "{h}");
    let m = s.metrics();
    assert_eq!((m.get("llama_slots_idle"), m.get("llama_slots_total"), m.get("llama_queue_depth")), (0.0, 1.0, 1.0));
    drop(held);
    assert_eq!(queued.join().unwrap(), Some(200));
    wait_for("the slot is free again", || (health(&s.base, "").1["status"] == "ok").then_some(()));
    assert_eq!(s.metric("llama_slots_idle"), 1.0);
}

/// A replica: `llama serve` on a free port, not serialized with the other servers of this
/// binary (the point is to run two).
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start() -> Replica {
        let model = smol();
        let (child, base) = spawn_serve(&["-m", &model, "--port", "0", "-t", "1", "-c", "1024", "-np", "1"]);
        wait_for("the replica is ready", || (ureq::get(&format!("{base}/health")).call().map(|r| r.status()).ok() == Some(200)).then_some(()));
        Replica { child, base }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The smallest balancer that does what nginx or haproxy would here: round robin over the
/// replicas /health reports up (checked every 100 ms), and a request whose replica fails
/// before answering anything is sent to the next one.
struct Balancer {
    addr: String,
    /// Which replica answered each request, in order.
    answered_by: Arc<Mutex<Vec<usize>>>,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    fn start(replicas: Vec<String>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let up: Arc<Vec<AtomicBool>> = Arc::new(replicas.iter().map(|_| AtomicBool::new(true)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let answered_by = Arc::new(Mutex::new(Vec::new()));
        {
            let (up, stop, replicas) = (up.clone(), stop.clone(), replicas.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(500)).build();
                while !stop.load(Ordering::Relaxed) {
                    for (i, r) in replicas.iter().enumerate() {
                        let ok = agent.get(&format!("{r}/health")).call().is_ok();
                        up[i].store(ok, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        {
            let answered_by = answered_by.clone();
            std::thread::spawn(move || {
                let mut next = 0usize;
                for client in listener.incoming() {
                    let Ok(mut client) = client else { continue };
                    let Some(request) = read_request(&mut client) else { continue };
                    // Each replica at most once, starting with the next in turn that is up.
                    let mut answered = false;
                    for k in 0..replicas.len() {
                        let i = (next + k) % replicas.len();
                        if !up[i].load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Some(response) = forward(&replicas[i], &request) {
                            let _ = client.write_all(&response);
                            answered_by.lock().unwrap().push(i);
                            next = i + 1;
                            answered = true;
                            break;
                        }
                        up[i].store(false, Ordering::Relaxed);
                    }
                    if !answered {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    }
                }
            });
        }
        Balancer { addr, answered_by, stop }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 request (headers and a Content-Length body), its `Connection` header
/// replaced by `close` so the replica ends the response with its connection.
fn read_request(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut reader = BufReader::new(client.try_clone().ok()?);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    head.extend_from_slice(&body);
    Some(head)
}

/// The replica's whole response, or None when it failed before answering anything.
fn forward(replica: &str, request: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(replica.trim_start_matches("http://")).ok()?;
    s.write_all(request).ok()?;
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    (!response.is_empty()).then_some(response)
}

#[test]
fn a_balancer_with_health_checks_answers_every_request_when_a_replica_dies_mid_run() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut a = Replica::start();
    let b = Replica::start();
    let balancer = Balancer::start(vec![a.base.clone(), b.base.clone()]);
    let ask = |i: usize| {
        let r = ureq::post(&format!("{}/v1/chat/completions", balancer.addr))
            .send_json(json!({"messages": [{"role": "user", "content": format!("Say the number {i}.")}], "max_tokens": 8}))
            .unwrap_or_else(|e| panic!("request {i} through the balancer: {e}"));
        assert_eq!(r.status(), 200, "request {i}");
        let v: Value = r.into_json().unwrap();
        assert!(v["choices"][0]["message"]["content"].is_string(), "request {i}: {v}");
    };
    for i in 0..6 {
        ask(i);
    }
    let before = balancer.answered_by.lock().unwrap().clone();
    assert!(before.contains(&0) && before.contains(&1), "both replicas served: {before:?}");
    // Replica A dies while a request is on its way to it (one slot, a longer answer).
    let in_flight = {
        let url = format!("{}/v1/chat/completions", balancer.addr);
        std::thread::spawn(move || ureq::post(&url).send_json(json!({"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 200})).map(|r| r.status()))
    };
    std::thread::sleep(Duration::from_millis(300));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert_eq!(in_flight.join().unwrap().map_err(|e| e.to_string()), Ok(200), "the request in flight when a replica died");
    for i in 6..16 {
        ask(i);
    }
    let all = balancer.answered_by.lock().unwrap().clone();
    assert!(all[before.len() + 1..].iter().all(|r| *r == 1), "after the kill only replica B answers: {all:?}");
    assert_eq!(all.len(), 17, "every request was answered: {all:?}");
}
