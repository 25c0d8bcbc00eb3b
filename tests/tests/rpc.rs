//! Remote devices over ggml's RPC backend, through the real binary: two `llama rpc-server`
//! processes on loopback, a model split across them, the official openai client against
//! `llama serve --rpc`, a server killed mid-generation and restarted, and an unreachable
//! or silent address.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llama_tests::server::{spawn_serve, status_json, wait_for};
use llama_tests::{assert_exit, llama, llama_cmd, model_path, smollm2_model_path, stderr, stdout};
use serde_json::{json, Value};

/// The tests run one after the other: each starts several processes, on 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A `llama rpc-server` on a loopback port, killed when dropped.
struct RpcServer {
    child: Child,
    port: u16,
}

impl RpcServer {
    fn start() -> RpcServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        RpcServer::on(port)
    }

    fn on(port: u16) -> RpcServer {
        let child = llama_cmd(&["rpc-server", "--port", &port.to_string(), "-t", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Up once it accepts; a connection that says nothing is dropped by the server.
        wait_for("the RPC server listens", || TcpStream::connect(("127.0.0.1", port)).ok().map(drop));
        RpcServer { child, port }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

const PROMPT: &str = "The history of the printing press";

fn greedy(extra: &[&str]) -> std::process::Output {
    let m = model_path();
    let mut args = vec!["run", "-m", m.to_str().unwrap(), "-p", PROMPT, "-n", "24", "--temp", "0", "-t", "1", "--no-stats"];
    args.extend_from_slice(extra);
    llama(&args)
}

/// Acceptance 1: the model split across two servers (the report shows layers and MiB per
/// device) gives the CPU's greedy text; `backends --rpc` lists both servers' devices.
#[test]
fn a_model_split_across_two_servers_gives_the_cpu_text() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let both = format!("{},{}", a.endpoint(), b.endpoint());

    // A second server on a taken port says so before it starts (exit 2).
    let taken = llama(&["rpc-server", "--port", &a.port.to_string()]);
    assert_exit(&taken, 2);
    assert!(stderr(&taken).contains(&format!("cannot listen on 127.0.0.1:{}", a.port)), "{}", stderr(&taken));

    let listed = llama(&["backends", "--rpc", &both]);
    assert_exit(&listed, 0);
    for s in [&a, &b] {
        assert!(stdout(&listed).contains(&format!("rpc {} (protocol 7.0.0):", s.endpoint())), "{}", stdout(&listed));
    }
    assert!(stdout(&listed).contains("MiB free of"), "{}", stdout(&listed));

    // The servers' CPU devices compute on the weights as the file lays them out: the local
    // run does too (`--no-repack`), so both use the same kernels and the same numbers.
    // (With repacking, this prompt's greedy text parts after 15 tokens.)
    let local = greedy(&["--no-repack"]);
    assert_exit(&local, 0);
    let remote = greedy(&["--rpc", &both, "-ngl", "all"]);
    assert_exit(&remote, 0);
    assert_eq!(stdout(&remote), stdout(&local), "greedy text over RPC differs from the CPU's\n{}", stderr(&remote));
    assert!(!stdout(&local).trim().is_empty());
    // `placed: RPC0 (A) N layers, X MiB; RPC1 (B) M layers + output, Y MiB; CPU 0 layers, Z MiB`
    let placed = stderr(&remote).lines().find(|l| l.starts_with("llama: placed:")).map(str::to_string).unwrap_or_else(|| panic!("no placement line:\n{}", stderr(&remote)));
    let part = |ep: &str| placed.split("; ").find(|p| p.contains(&format!("({ep})"))).unwrap_or_else(|| panic!("{ep} missing: {placed}")).to_string();
    for s in [&a, &b] {
        let p = part(&s.endpoint());
        let layers: u32 = p.split(") ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(layers > 0, "{p}");
        assert!(p.ends_with("MiB") && !p.contains(" 0.0 MiB"), "{p}");
    }
    assert!(placed.contains("+ output"), "{placed}");

    // --tensor-split 1,0: everything offloaded on the first server, nothing on the second.
    let first_only = greedy(&["--rpc", &both, "-ngl", "all", "-ts", "1,0"]);
    assert_exit(&first_only, 0);
    assert_eq!(stdout(&first_only), stdout(&local));
    let placed = stderr(&first_only).lines().find(|l| l.starts_with("llama: placed:")).unwrap().to_string();
    assert!(placed.contains(&format!("({}) 18 layers + output", a.endpoint())) && !placed.contains(&b.endpoint()), "{placed}");
    // Layers counted off the CPU: -ngl 4 puts the last 3 repeating layers and the output
    // layer on the servers, the rest stays here.
    let four = greedy(&["--rpc", &both, "-ngl", "4", "--no-repack"]);
    assert_exit(&four, 0);
    assert_eq!(stdout(&four), stdout(&local));
    let placed = stderr(&four).lines().find(|l| l.starts_with("llama: placed:")).unwrap().to_string();
    assert!(placed.contains("CPU 15 layers"), "{placed}");
    // More proportions than devices is refused by name (exit 2).
    let bad = greedy(&["--rpc", &a.endpoint(), "-ts", "1,1"]);
    assert_exit(&bad, 2);
    assert!(stderr(&bad).contains("tensor_split"), "{}", stderr(&bad));
}

/// Acceptance 4: nothing listening is an error naming the address, exit 4; so is a server
/// that accepts but never answers, once the timeout has passed; and a malformed address is
/// a bad argument.
#[test]
fn an_unreachable_or_silent_server_is_exit_4_naming_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let refused = greedy(&["--rpc", "127.0.0.1:1"]);
    assert_exit(&refused, 4);
    assert!(stderr(&refused).contains("RPC server 127.0.0.1:1 is unreachable"), "{}", stderr(&refused));

    // The kernel accepts into the backlog; nothing ever answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = greedy(&["--rpc", &addr, "--rpc-timeout", "1"]);
    assert_exit(&out, 4);
    assert!(stderr(&out).contains(&addr) && stderr(&out).contains("did not answer within 1.0 s"), "{}", stderr(&out));
    // A hang guard, not a timing measurement: without the timeout this would never end.
    assert!(started.elapsed() < Duration::from_secs(60));

    let listed = llama(&["backends", "--rpc", "127.0.0.1:1"]);
    assert_exit(&listed, 4);
    assert!(stdout(&listed).contains("rpc 127.0.0.1:1: unusable"), "{}", stdout(&listed));

    for bad in ["nohost", "host:0", "a:1,a:1", ":5"] {
        let out = greedy(&["--rpc", bad]);
        assert_exit(&out, 2);
        assert!(stderr(&out).contains("--rpc"), "{bad}: {}", stderr(&out));
    }
}

fn post(base: &str, body: Value) -> (u16, Value) {
    status_json("a chat request", ureq::post(&format!("{base}/v1/chat/completions")).send_json(body))
}

/// Acceptances 2 and 3: `serve --rpc` answers the official openai client; a server killed
/// mid-generation ends that request with an error while the host stays up, the model
/// answers 503 until it loads again, and after a restart the next request works.
#[test]
fn serve_over_rpc_answers_openai_and_survives_a_lost_server() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut a, b) = (RpcServer::start(), RpcServer::start());
    let both = format!("{},{}", a.endpoint(), b.endpoint());
    let smol = smollm2_model_path();
    let (mut server, base) = spawn_serve(&["-m", smol.to_str().unwrap(), "--rpc", &both, "-ngl", "all", "--port", "0", "-t", "1", "-np", "1"]);
    wait_for("the model is ready", || ureq::get(&format!("{base}/health")).call().ok().filter(|r| r.status() == 200).map(drop));

    let said = llama_tests::run_python_client("openai_chat.py", &base);
    assert!(said.contains("non-streaming:") && said.contains("streaming:"), "{said}");

    let hello = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0});
    let (code, before) = post(&base, hello.clone());
    assert_eq!(code, 200, "{before}");

    // A long streamed reply; the first server dies once it has started.
    let long = json!({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000, "temperature": 0, "stream": true,
        "ignore_eos": true});
    let mut reader = BufReader::new(ureq::post(&format!("{base}/v1/chat/completions")).send_json(long).unwrap().into_reader());
    let mut first = String::new();
    while !first.starts_with("data: {") {
        first.clear();
        reader.read_line(&mut first).unwrap();
    }
    a.kill();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"code\":\"generation_failed\"") && rest.contains("RPC server"), "{}", &rest[rest.len().saturating_sub(600)..]);
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{}", &rest[rest.len().saturating_sub(300)..]);

    // The host is up; the model answers 503 while its server is away.
    assert!(server.try_wait().unwrap().is_none(), "the host died");
    let (code, v) = post(&base, hello.clone());
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("device_unavailable")), "{v}");
    assert!(!v.to_string().contains(&a.endpoint()), "the server's address is the operator's: {v}");
    let (code, v) = post(&base, hello.clone());
    assert_eq!(code, 503, "{v}");

    // The server comes back on its address: the next request loads the model again and works.
    let _a2 = RpcServer::on(a.port);
    let (code, after) = post(&base, hello);
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["choices"][0]["message"]["content"], before["choices"][0]["message"]["content"]);
    let metrics = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("llama_model_unloads_total") && l.contains("device_lost") && l.ends_with(" 1")), "{metrics}");
    let _ = server.kill();
    let _ = server.wait();
    drop(b);
}
