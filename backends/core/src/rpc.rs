//! Remote devices over ggml's RPC backend, with a guard between ggml's client and the network.
//!
//! ggml's RPC client treats a server that fails mid-run as fatal: every failed send or
//! receive ends in `GGML_ABORT` (`abort()`), so one remote machine going away would take the
//! whole host down with every other model and client on it. The same happens when the
//! first connection is refused or the handshake finds another protocol version.
//!
//! So ggml never talks to a remote server directly. For each server a load uses, a [`Link`]
//! listens on a loopback port of its own and ggml is given that port as the endpoint. Each
//! connection ggml opens there is relayed, message by message, to a connection of its own to
//! the real server. While the server answers, the relay only copies (and counts) bytes. When
//! it stops answering, the link is marked lost and the relay answers ggml itself from then
//! on, with replies of the exact sizes ggml expects (an allocation that fails, zeroed
//! tensors), so ggml's client carries on instead of aborting. The model checks its links
//! after every decode and reports `BackendError::Rpc { failure: Lost }`, and never computes
//! again: the host reloads it.
//!
//! Before any of that, [`probe`] connects to the server itself, within the caller's timeout
//! (ggml's own connect has none), and checks the protocol version: an unreachable server or
//! another version is a typed error naming the address, before ggml is involved.
//!
//! The relay knows the protocol's framing (ggml-rpc.cpp, protocol 7.0.0): a request is
//! `cmd: u8, size: u64, payload`; some commands are answered with `size: u64, payload` of a
//! size fixed per command (or, for GET_TENSOR, asked for in the request). ggml's client sends
//! one command at a time and waits for its answer, so at most one answer is outstanding.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_plugin_api::abi_stable::std_types::{RString, RVec};
use llama_plugin_api::{BackendError, DeviceInfo, RemoteServer, RpcFailure};

/// The protocol this build's ggml speaks (ggml-rpc.h's RPC_PROTO_*_VERSION). A server is
/// compatible when its major version is the same and its minor version not newer (ggml's
/// own rule).
pub const PROTO: (u8, u8, u8) = (7, 0, 0);

// Commands (ggml-rpc.cpp's `rpc_cmd`).
const ALLOC_BUFFER: u8 = 0;
const GET_ALIGNMENT: u8 = 1;
const GET_MAX_SIZE: u8 = 2;
const BUFFER_GET_BASE: u8 = 3;
const SET_TENSOR_HASH: u8 = 7;
const GET_TENSOR: u8 = 8;
const COPY_TENSOR: u8 = 9;
const GET_DEVICE_MEMORY: u8 = 11;
const GET_ALLOC_SIZE: u8 = 13;
const HELLO: u8 = 14;
const DEVICE_COUNT: u8 = 15;
/// Commands at or past this are not in the protocol.
const CMD_COUNT: u8 = 19;

/// HELLO's request: the client's transport capabilities (RPC_CONN_CAPS_SIZE bytes).
const CAPS: usize = 24;
/// HELLO's answer: major, minor, patch, padding, then the server's capabilities.
const HELLO_RSP: usize = 4 + CAPS;
/// The largest request payload read whole (all but SET_TENSOR and GRAPH_COMPUTE are small
/// fixed structs); larger ones are streamed through.
const SMALL: usize = 64 << 10;
/// The relay's buffer for streamed requests and answers: a token's logits (a vocabulary of
/// 262,144 floats is 1 MiB) pass in a few reads and writes rather than sixteen of each.
const STREAM_BUF: usize = 1 << 20;

/// The size of the answer to `cmd`, whose request payload is `payload` (its first bytes
/// at least, for GET_TENSOR: the size asked for is its last field); `None`: no answer.
fn answer_size(cmd: u8, payload: &[u8]) -> Option<u64> {
    match cmd {
        ALLOC_BUFFER | GET_DEVICE_MEMORY => Some(16),
        GET_ALIGNMENT | GET_MAX_SIZE | BUFFER_GET_BASE | GET_ALLOC_SIZE => Some(8),
        SET_TENSOR_HASH | COPY_TENSOR => Some(1),
        HELLO => Some(HELLO_RSP as u64),
        DEVICE_COUNT => Some(4),
        // rpc_msg_get_tensor_req: tensor, offset: u64, size: u64.
        GET_TENSOR => payload.len().checked_sub(8).map(|at| u64::from_le_bytes(payload[at..].try_into().unwrap_or([0; 8]))),
        _ => None,
    }
}

/// What the relay answers in ggml's place once the server is gone: values ggml's client
/// accepts without asserting, that make any further load fail (no buffer can be
/// allocated) and leave computed tensors zero.
fn stand_in(cmd: u8, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    match cmd {
        // A power of two: ggml's allocators assert on it.
        GET_ALIGNMENT => out.copy_from_slice(&64u64.to_le_bytes()),
        GET_MAX_SIZE => out.copy_from_slice(&u64::MAX.to_le_bytes()),
        // Any non-null base: ggml only computes addresses from it.
        BUFFER_GET_BASE => out.copy_from_slice(&4096u64.to_le_bytes()),
        HELLO => out[..3].copy_from_slice(&[PROTO.0, PROTO.1, PROTO.2]),
        _ => {}
    }
    out
}

/// The timeout the ABI carries in milliseconds, at least 1 ms.
pub fn timeout(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms.max(1)))
}

fn rpc_error(endpoint: &str, failure: RpcFailure, reason: impl Into<String>) -> BackendError {
    BackendError::Rpc { endpoint: RString::from(endpoint), failure, reason: RString::from(reason.into()) }
}

/// The address of `endpoint` (`host:port`), resolved.
pub(crate) fn resolve(endpoint: &str) -> Result<SocketAddr, BackendError> {
    let bad = |why: String| rpc_error(endpoint, RpcFailure::Unreachable, why);
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| bad("not HOST:PORT".into()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad("not HOST:PORT".into()));
    }
    endpoint
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve the host: {e}")))?
        .next()
        .ok_or_else(|| bad("the host has no address".into()))
}

/// Connects within `timeout` and says HELLO; the stream has `timeout` for reads and writes
/// (the caller clears it for a relay). Returns the server's (major, minor, patch).
fn connect(endpoint: &str, timeout: Duration) -> Result<(TcpStream, (u8, u8, u8)), BackendError> {
    let addr = resolve(endpoint)?;
    let unreachable = |why: String| rpc_error(endpoint, RpcFailure::Unreachable, why);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
            unreachable(format!("no answer to the connection within {:.1} s (--rpc-timeout)", timeout.as_secs_f64()))
        } else {
            unreachable(e.to_string())
        }
    })?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let silent = |e: io::Error| {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            // ggml's RPC server serves one client at a time: it accepts (the kernel does) but
            // answers nobody else until that client disconnects.
            unreachable(format!("it accepted the connection but did not answer within {:.1} s (an RPC server serves one client at a time: is another host or model using it?)", timeout.as_secs_f64()))
        } else {
            unreachable(format!("the handshake failed: {e}"))
        }
    };
    let mut hello = vec![HELLO];
    hello.extend_from_slice(&(CAPS as u64).to_le_bytes());
    hello.extend_from_slice(&[0u8; CAPS]);
    s.write_all(&hello).map_err(silent)?;
    let mut size = [0u8; 8];
    s.read_exact(&mut size).map_err(silent)?;
    if u64::from_le_bytes(size) != HELLO_RSP as u64 {
        return Err(rpc_error(endpoint, RpcFailure::Protocol, format!("not a ggml RPC server of protocol {}.x (its handshake answer is {} bytes, not {HELLO_RSP})", PROTO.0, u64::from_le_bytes(size))));
    }
    let mut rsp = [0u8; HELLO_RSP];
    s.read_exact(&mut rsp).map_err(silent)?;
    let version = (rsp[0], rsp[1], rsp[2]);
    if version.0 != PROTO.0 || version.1 > PROTO.1 {
        return Err(rpc_error(
            endpoint,
            RpcFailure::Protocol,
            format!("it speaks RPC protocol {}.{}.{}, this build speaks {}.{}.{} (the major versions must match and the server's minor version must not be newer)", version.0, version.1, version.2, PROTO.0, PROTO.1, PROTO.2),
        ));
    }
    Ok((s, version))
}

/// One request with a fixed-size answer, over a probe connection.
fn ask(s: &mut TcpStream, cmd: u8, payload: &[u8], answer: usize) -> io::Result<Vec<u8>> {
    let mut req = vec![cmd];
    req.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    req.extend_from_slice(payload);
    s.write_all(&req)?;
    let mut size = [0u8; 8];
    s.read_exact(&mut size)?;
    if u64::from_le_bytes(size) != answer as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("answered {} bytes where {answer} were expected", u64::from_le_bytes(size))));
    }
    let mut out = vec![0u8; answer];
    s.read_exact(&mut out)?;
    Ok(out)
}

/// Connects to the server at `endpoint` within `timeout`, checks its version and lists its
/// devices with their memory. The connection is closed again (a server serves one client
/// at a time). Device names are `RPC<i>`, counted from `first`.
pub fn probe(endpoint: &str, timeout: Duration, first: usize) -> Result<RemoteServer, BackendError> {
    let (mut s, v) = connect(endpoint, timeout)?;
    let failed = |e: io::Error| rpc_error(endpoint, RpcFailure::Protocol, format!("listing its devices failed: {e}"));
    let count = ask(&mut s, DEVICE_COUNT, &[], 4).map_err(failed)?;
    let count = u32::from_le_bytes(count[..4].try_into().unwrap_or([0; 4]));
    if count == 0 || count > 64 {
        return Err(rpc_error(endpoint, RpcFailure::Protocol, format!("it reports {count} devices")));
    }
    let mut devices = RVec::new();
    for d in 0..count {
        let mem = ask(&mut s, GET_DEVICE_MEMORY, &d.to_le_bytes(), 16).map_err(failed)?;
        let free = u64::from_le_bytes(mem[..8].try_into().unwrap_or([0; 8]));
        let total = u64::from_le_bytes(mem[8..].try_into().unwrap_or([0; 8]));
        devices.push(DeviceInfo {
            name: RString::from(format!("RPC{}", first + d as usize)),
            description: RString::from(if count == 1 { endpoint.to_string() } else { format!("{endpoint} device {d}") }),
            memory_total: total,
            memory_free: free,
        });
    }
    let _ = s.shutdown(Shutdown::Both);
    Ok(RemoteServer { endpoint: RString::from(endpoint), protocol: RString::from(format!("{}.{}.{}", v.0, v.1, v.2)), devices })
}

/// What a link shares with its relays.
struct LinkState {
    endpoint: String,
    timeout: Duration,
    /// How and why the server was lost, once it was.
    lost: Mutex<Option<(RpcFailure, String)>>,
    lost_flag: AtomicBool,
    /// The listener stops accepting.
    closing: AtomicBool,
    /// Relays running now (bounded: see [`MAX_RELAYS`]).
    relays: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// Most connections relayed at once per link. ggml holds one per server at a time (a few
/// short-lived ones during a load); more is somebody else on the loopback port.
const MAX_RELAYS: u64 = 16;

impl LinkState {
    fn lose(&self, failure: RpcFailure, why: String) {
        if let Ok(mut lost) = self.lost.lock() {
            if lost.is_none() {
                crate::log::warn(&format!("rpc: lost the server {}: {why}", self.endpoint));
                *lost = Some((failure, why));
            }
        }
        self.lost_flag.store(true, Ordering::SeqCst);
    }

    fn is_lost(&self) -> bool {
        self.lost_flag.load(Ordering::SeqCst)
    }
}

/// One remote server as a model uses it: a loopback endpoint for ggml that relays to it.
pub struct Link {
    state: Arc<LinkState>,
    local: SocketAddr,
}

/// A loopback listener whose address no earlier link of this process had. ggml caches
/// connections, device lists, buffer types (alignment) and allocation sizes by endpoint
/// string for the life of the process, so an endpoint must never be reused: a model loaded
/// after a loss must not meet the lost server's cached answers (nor the relay's stand-ins).
/// On Linux all of 127.0.0.0/8 is loopback: each link gets an address of its own (16 million
/// before one repeats). Elsewhere, 127.0.0.1 with a port no earlier link used.
fn fresh_listener() -> io::Result<TcpListener> {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(1);
    if cfg!(target_os = "linux") {
        for _ in 0..16 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) % 0x00FF_FFFE + 1;
            let ip = std::net::Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
            if ip == std::net::Ipv4Addr::new(127, 0, 0, 1) {
                continue;
            }
            if let Ok(l) = TcpListener::bind((ip, 0)) {
                return Ok(l);
            }
        }
    }
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut held = Vec::new();
    for _ in 0..64 {
        let l = TcpListener::bind(("127.0.0.1", 0))?;
        let port = l.local_addr()?.port();
        let mut used = USED.lock().unwrap_or_else(|p| p.into_inner());
        if !used.contains(&port) {
            used.push(port);
            return Ok(l);
        }
        // Kept open until a fresh one is found, so the system offers another port.
        held.push(l);
    }
    Err(io::Error::other("no loopback port left that this process has not used"))
}

impl Link {
    /// Listens on a fresh loopback endpoint ([`fresh_listener`]) for ggml's connections
    /// to `endpoint`.
    pub fn open(endpoint: &str, timeout: Duration) -> Result<Link, BackendError> {
        let listener = fresh_listener().map_err(|e| rpc_error(endpoint, RpcFailure::Unreachable, format!("cannot open a loopback port for the relay: {e}")))?;
        let local = listener.local_addr().map_err(|e| rpc_error(endpoint, RpcFailure::Unreachable, e.to_string()))?;
        let state = Arc::new(LinkState {
            endpoint: endpoint.to_string(),
            timeout,
            lost: Mutex::new(None),
            lost_flag: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            relays: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        let st = state.clone();
        std::thread::Builder::new()
            .name("llama-rpc-accept".into())
            .spawn(move || accept_loop(listener, st))
            .map_err(|e| rpc_error(endpoint, RpcFailure::Unreachable, format!("cannot start the relay: {e}")))?;
        Ok(Link { state, local })
    }

    /// The endpoint ggml is given.
    pub fn local_endpoint(&self) -> String {
        self.local.to_string()
    }

    pub fn endpoint(&self) -> &str {
        &self.state.endpoint
    }

    /// Why the server was lost, if it was: `Lost`, or `Unreachable` when a connection the
    /// relay opened for ggml could not reach it.
    pub fn lost(&self) -> Option<BackendError> {
        if !self.state.is_lost() {
            return None;
        }
        let (failure, why) = self.state.lost.lock().ok().and_then(|l| l.clone()).unwrap_or((RpcFailure::Lost, String::new()));
        Some(rpc_error(&self.state.endpoint, failure, why))
    }

    /// Bytes sent to and received from the server so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.state.sent.load(Ordering::Relaxed), self.state.received.load(Ordering::Relaxed))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Relays already running end when ggml closes their connections (the model is freed
        // before its links); the listener ends at its next wake-up, which this gives it.
        self.state.closing.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
    }
}

fn accept_loop(listener: TcpListener, state: Arc<LinkState>) {
    for conn in listener.incoming() {
        if state.closing.load(Ordering::SeqCst) {
            return;
        }
        let down = match conn {
            Ok(down) => down,
            Err(_) => {
                // Out of descriptors, say: wait rather than spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if state.relays.fetch_add(1, Ordering::SeqCst) >= MAX_RELAYS {
            state.relays.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let st = state.clone();
        let spawned = std::thread::Builder::new().name("llama-rpc-relay".into()).spawn(move || {
            relay(down, &st);
            st.relays.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            state.relays.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// How a relayed request or answer went.
enum Flow {
    Done,
    /// ggml's side closed: the relay ends.
    DownGone,
}

/// Relays one of ggml's connections to a connection of its own to the server.
fn relay(mut down: TcpStream, state: &LinkState) {
    down.set_nodelay(true).ok();
    // ggml's first words are its HELLO; anything else is not ggml (a port scan, a stranger)
    // and is dropped before the server is bothered: a server serves one client at a time,
    // and a stranger's connection must not take it from the model, nor mark it lost.
    let mut hello = [0u8; 9 + CAPS];
    if down.read_exact(&mut hello).is_err() || hello[0] != HELLO || u64::from_le_bytes(hello[1..9].try_into().unwrap_or([0; 8])) != CAPS as u64 {
        return;
    }
    // The server side, greeted by the relay itself, unless the server is already lost.
    let mut up: Option<TcpStream> = None;
    let mut version = PROTO;
    if !state.is_lost() {
        match connect(&state.endpoint, state.timeout) {
            Ok((s, v)) => {
                version = v;
                // Graph computations take as long as they take: no read timeout from here on.
                s.set_read_timeout(None).ok();
                s.set_write_timeout(None).ok();
                up = Some(s);
            }
            Err(BackendError::Rpc { failure, reason, .. }) => state.lose(failure, reason.into_string()),
            Err(e) => state.lose(RpcFailure::Unreachable, e.to_string()),
        }
    }
    // ggml's HELLO is answered here with the server's version (a server takes one HELLO
    // per connection, and the relay's came first), and no transport upgrade.
    let mut reply = vec![0u8; HELLO_RSP];
    reply[..3].copy_from_slice(&[version.0, version.1, version.2]);
    if down.write_all(&(HELLO_RSP as u64).to_le_bytes()).and_then(|()| down.write_all(&reply)).is_err() {
        return;
    }
    let mut buf = vec![0u8; STREAM_BUF];
    loop {
        let mut head = [0u8; 9];
        if down.read_exact(&mut head).is_err() {
            break; // ggml closed the connection: the model or buffer that held it is gone.
        }
        let cmd = head[0];
        let size = u64::from_le_bytes(head[1..].try_into().unwrap_or([0; 8]));
        if cmd >= CMD_COUNT || cmd == HELLO {
            break; // Not ggml speaking: drop the connection.
        }
        // The request: small ones whole (their fields decide the answer's size), large ones
        // (tensor data, graphs) streamed through in pieces.
        let mut small = Vec::new();
        if size as usize <= SMALL {
            small.resize(size as usize, 0);
            if down.read_exact(&mut small).is_err() {
                break;
            }
        }
        if let Flow::DownGone = forward_request(&mut down, &mut up, state, &head, &small, size, &mut buf) {
            break;
        }
        let Some(answer) = answer_size(cmd, &small) else { continue };
        if let Flow::DownGone = forward_answer(&mut down, &mut up, state, cmd, answer, &mut buf) {
            break;
        }
    }
    if let Some(s) = up {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Sends the request (`head`, then `small` or the `size` bytes still in `down`) to the
/// server. When the server fails part-way, the rest of the request is still read from
/// ggml (and dropped), so ggml's stream stays in step.
fn forward_request(down: &mut TcpStream, up: &mut Option<TcpStream>, state: &LinkState, head: &[u8; 9], small: &[u8], size: u64, buf: &mut [u8]) -> Flow {
    let streamed = size as usize > SMALL;
    let mut left = if streamed { size } else { 0 };
    if let Some(s) = up.as_mut() {
        let sent = s.write_all(head).and_then(|()| if streamed { Ok(()) } else { s.write_all(small) });
        let mut failed = sent.err();
        while failed.is_none() && left > 0 {
            let want = buf.len().min(left as usize);
            if down.read_exact(&mut buf[..want]).is_err() {
                return Flow::DownGone;
            }
            left -= want as u64;
            failed = s.write_all(&buf[..want]).err();
        }
        match failed {
            None => {
                state.sent.fetch_add(9 + size, Ordering::Relaxed);
            }
            Some(e) => {
                state.lose(RpcFailure::Lost, format!("sending to it failed: {e}"));
                *up = None;
            }
        }
    }
    // The server is gone (now or before): what ggml still sends of this request is dropped.
    while left > 0 {
        let want = buf.len().min(left as usize);
        if down.read_exact(&mut buf[..want]).is_err() {
            return Flow::DownGone;
        }
        left -= want as u64;
    }
    Flow::Done
}

/// Passes the server's answer of `size` bytes to ggml as it arrives, or the relay's own
/// ([`stand_in`]) once the server is gone; a server that fails part-way through an answer
/// has the rest filled with zeros. Small answers are checked before ggml sees them: a size
/// other than asked, a device count over 64, an alignment that is not a power of two would
/// each end in an abort inside ggml, so they count as a lost server instead.
fn forward_answer(down: &mut TcpStream, up: &mut Option<TcpStream>, state: &LinkState, cmd: u8, size: u64, buf: &mut [u8]) -> Flow {
    let lose = |up: &mut Option<TcpStream>, e: io::Error| {
        state.lose(RpcFailure::Lost, if e.kind() == io::ErrorKind::UnexpectedEof { "it closed the connection".to_string() } else { format!("reading its answer failed: {e}") });
        *up = None;
    };
    let mut done: u64 = 0;
    if let Some(s) = up.as_mut() {
        let mut prefix = [0u8; 8];
        match s.read_exact(&mut prefix).map(|()| u64::from_le_bytes(prefix)) {
            Err(e) => lose(up, e),
            Ok(got) if got != size => lose(up, io::Error::new(io::ErrorKind::InvalidData, format!("it answered {got} bytes where {size} were expected"))),
            Ok(_) if size as usize <= SMALL => {
                let mut small = vec![0u8; size as usize];
                match s.read_exact(&mut small).and_then(|()| sane(cmd, &small)) {
                    Err(e) => lose(up, e),
                    Ok(()) => {
                        state.received.fetch_add(8 + size, Ordering::Relaxed);
                        if down.write_all(&prefix).and_then(|()| down.write_all(&small)).is_err() {
                            return Flow::DownGone;
                        }
                        return Flow::Done;
                    }
                }
            }
            Ok(_) => {
                if down.write_all(&prefix).is_err() {
                    return Flow::DownGone;
                }
                // Streamed: ggml has the prefix, so from here on exactly `size` bytes follow.
                while done < size {
                    let want = buf.len().min((size - done) as usize);
                    match s.read(&mut buf[..want]) {
                        Ok(0) => {
                            lose(up, io::ErrorKind::UnexpectedEof.into());
                            break;
                        }
                        Ok(n) => {
                            if down.write_all(&buf[..n]).is_err() {
                                return Flow::DownGone;
                            }
                            done += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            lose(up, e);
                            break;
                        }
                    }
                }
                state.received.fetch_add(8 + done, Ordering::Relaxed);
                if done == size {
                    return Flow::Done;
                }
                // The server died mid-answer: zeros for the rest.
                return zeros(down, size - done, buf);
            }
        }
    }
    // The relay's own answer, in pieces for a large one.
    if down.write_all(&size.to_le_bytes()).is_err() {
        return Flow::DownGone;
    }
    if size as usize <= SMALL {
        return if down.write_all(&stand_in(cmd, size)).is_err() { Flow::DownGone } else { Flow::Done };
    }
    zeros(down, size, buf)
}

/// Writes `n` zero bytes to ggml (the part of an answer the server did not give).
fn zeros(down: &mut TcpStream, mut n: u64, buf: &mut [u8]) -> Flow {
    buf.fill(0);
    while n > 0 {
        let k = buf.len().min(n as usize);
        if down.write_all(&buf[..k]).is_err() {
            return Flow::DownGone;
        }
        n -= k as u64;
    }
    Flow::Done
}

/// The values in a server's answer that ggml asserts on.
fn sane(cmd: u8, answer: &[u8]) -> io::Result<()> {
    let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
    match cmd {
        DEVICE_COUNT => {
            let n = u32::from_le_bytes(answer.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
            if n > 64 {
                return bad(format!("it reports {n} devices"));
            }
        }
        GET_ALIGNMENT => {
            let a = u64::from_le_bytes(answer.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
            if !a.is_power_of_two() {
                return bad(format!("it reports an alignment of {a}, not a power of two"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks that something can listen at `endpoint`, so `rpc-server` fails with a reason
/// rather than ggml's bare "Failed to create server socket".
pub fn check_bind(endpoint: &str) -> Result<(), BackendError> {
    let addr = resolve(endpoint).map_err(|_| BackendError::invalid_param("endpoint", format!("{endpoint} is not a HOST:PORT this machine can listen on")))?;
    TcpListener::bind(addr).map(drop).map_err(|e| BackendError::invalid_param("endpoint", format!("cannot listen on {endpoint}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_sizes_follow_the_protocol() {
        assert_eq!(answer_size(HELLO, &[0; CAPS]), Some(28));
        assert_eq!(answer_size(6, &[]), None, "SET_TENSOR has no answer");
        assert_eq!(answer_size(10, &[]), None, "GRAPH_COMPUTE has no answer");
        let mut get = vec![0u8; 40];
        get[32..].copy_from_slice(&1234u64.to_le_bytes());
        assert_eq!(answer_size(GET_TENSOR, &get), Some(1234));
        assert_eq!(stand_in(GET_ALIGNMENT, 8), 64u64.to_le_bytes());
        assert_eq!(stand_in(HELLO, 28)[..3], [PROTO.0, PROTO.1, PROTO.2]);
    }

    #[test]
    fn an_unreachable_server_is_named_within_the_timeout() {
        let t = std::time::Instant::now();
        let e = probe("127.0.0.1:1", Duration::from_secs(2), 0).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        match e {
            BackendError::Rpc { endpoint, failure, .. } => assert_eq!((endpoint.as_str(), failure), ("127.0.0.1:1", RpcFailure::Unreachable)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(probe("nonsense", Duration::from_secs(1), 0), Err(BackendError::Rpc { failure: RpcFailure::Unreachable, .. })));
    }

    /// A peer that reads ggml's HELLO and answers `answer`, once; its address.
    fn one_shot_server(answer: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 9 + CAPS];
            let _ = s.read_exact(&mut b);
            let _ = s.write_all(&answer);
        });
        addr
    }

    /// Something that is not an RPC server (it answers with text) is a protocol error.
    #[test]
    fn a_stranger_is_a_protocol_error() {
        let addr = one_shot_server(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        let e = probe(&addr, Duration::from_secs(5), 0).unwrap_err();
        assert!(matches!(e, BackendError::Rpc { failure: RpcFailure::Protocol, .. }), "{e:?}");
    }

    /// A stand-in RPC server: greets, answers DEVICE_COUNT (1) and GET_TENSOR (0xAB bytes),
    /// takes SET_TENSOR silently, and closes the connection after `serve` commands.
    fn fake_server(serve: usize) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { return };
                let mut hello = [0u8; 9 + CAPS];
                if s.read_exact(&mut hello).is_err() {
                    continue;
                }
                let mut rsp = (HELLO_RSP as u64).to_le_bytes().to_vec();
                rsp.extend_from_slice(&[PROTO.0, PROTO.1, PROTO.2, 0]);
                rsp.extend_from_slice(&[0; CAPS]);
                s.write_all(&rsp).unwrap();
                for _ in 0..serve {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).is_err() {
                        break;
                    }
                    let mut payload = vec![0u8; u64::from_le_bytes(head[1..].try_into().unwrap()) as usize];
                    s.read_exact(&mut payload).unwrap();
                    match head[0] {
                        DEVICE_COUNT => s.write_all(&[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).unwrap(),
                        GET_TENSOR => {
                            let n = answer_size(GET_TENSOR, &payload).unwrap();
                            s.write_all(&n.to_le_bytes()).unwrap();
                            s.write_all(&vec![0xAB; n as usize]).unwrap();
                        }
                        _ => {}
                    }
                }
                // Gone: the connection closes (as when the process is killed).
            }
        });
        addr
    }

    /// What ggml's client does: one command, then its answer when it has one.
    fn call(s: &mut TcpStream, cmd: u8, payload: &[u8]) -> Option<Vec<u8>> {
        let mut req = vec![cmd];
        req.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        req.extend_from_slice(payload);
        s.write_all(&req).unwrap();
        let size = answer_size(cmd, payload)?;
        let mut prefix = [0u8; 8];
        s.read_exact(&mut prefix).unwrap();
        assert_eq!(u64::from_le_bytes(prefix), size, "command {cmd}: the answer has the size ggml expects");
        let mut out = vec![0u8; size as usize];
        s.read_exact(&mut out).unwrap();
        Some(out)
    }

    fn get_tensor(size: u64) -> Vec<u8> {
        let mut req = vec![0u8; 32];
        req.extend_from_slice(&size.to_le_bytes());
        req
    }

    /// The relay passes a live server's answers through and counts the bytes; once the server
    /// is gone it answers every command itself, with the sizes ggml's client checks, so
    /// ggml never aborts, and the link reports the loss.
    #[test]
    fn the_relay_answers_for_a_lost_server() {
        let server = fake_server(3);
        let link = Link::open(&server, Duration::from_secs(5)).unwrap();
        let mut ggml = TcpStream::connect(link.local_endpoint()).unwrap();
        let hello = call(&mut ggml, HELLO, &[0; CAPS]).unwrap();
        assert_eq!(hello[..3], [PROTO.0, PROTO.1, PROTO.2]);
        assert_eq!(call(&mut ggml, DEVICE_COUNT, &[]).unwrap(), [1, 0, 0, 0]);
        assert_eq!(call(&mut ggml, 6, &vec![7u8; 100 << 10]), None, "SET_TENSOR (streamed: over SMALL) has no answer");
        assert_eq!(call(&mut ggml, GET_TENSOR, &get_tensor(1000)).unwrap(), vec![0xAB; 1000]);
        assert!(link.lost().is_none());
        let (sent, received) = link.traffic();
        assert!(sent >= (100 << 10) && received >= 1000 + 4, "{sent} {received}");
        // The server has served its 3 commands and closed: the next answer is the relay's.
        assert_eq!(call(&mut ggml, GET_TENSOR, &get_tensor(64)).unwrap(), vec![0; 64]);
        assert_eq!(call(&mut ggml, GET_ALIGNMENT, &[0; 4]).unwrap(), 64u64.to_le_bytes());
        assert_eq!(call(&mut ggml, ALLOC_BUFFER, &[0; 12]).unwrap(), [0; 16], "a failed allocation");
        assert_eq!(call(&mut ggml, 10, &[1, 2, 3]), None, "GRAPH_COMPUTE has no answer");
        // A large request after the loss is still read whole: the next command is in step.
        assert_eq!(call(&mut ggml, 6, &vec![7u8; 200 << 10]), None);
        assert_eq!(call(&mut ggml, GET_TENSOR, &get_tensor(100_000)).unwrap(), vec![0; 100_000]);
        assert_eq!(call(&mut ggml, GET_DEVICE_MEMORY, &[0; 4]).unwrap(), [0; 16]);
        match link.lost() {
            Some(BackendError::Rpc { endpoint, failure: RpcFailure::Lost, reason }) => {
                assert_eq!(endpoint.as_str(), server);
                // Seen as the write that fails or the read that finds the stream closed.
                assert!(reason.contains("closed the connection") || reason.contains("failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A connection ggml opens after the loss is answered by the relay alone.
        let mut again = TcpStream::connect(link.local_endpoint()).unwrap();
        assert_eq!(call(&mut again, HELLO, &[0; CAPS]).unwrap()[..3], [PROTO.0, PROTO.1, PROTO.2]);
        assert_eq!(call(&mut again, DEVICE_COUNT, &[]).unwrap(), [0; 4]);
    }

    /// A connection that does not open with ggml's HELLO (a port scan, a stranger) is
    /// dropped without reaching the server: the link is not lost, the server stays free.
    #[test]
    fn a_stranger_on_the_relay_port_is_dropped() {
        let server = fake_server(10);
        let link = Link::open(&server, Duration::from_secs(1)).unwrap();
        for probe in [&b""[..], b"GET / HTTP/1.1\r\n\r\n", &[HELLO, 1, 0, 0, 0, 0, 0, 0, 0, 0]] {
            let mut s = TcpStream::connect(link.local_endpoint()).unwrap();
            let _ = s.write_all(probe);
            let _ = s.shutdown(Shutdown::Write);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty(), "answered a stranger: {rest:?}");
        }
        assert!(link.lost().is_none());
        let mut ggml = TcpStream::connect(link.local_endpoint()).unwrap();
        call(&mut ggml, HELLO, &[0; CAPS]).unwrap();
        assert_eq!(call(&mut ggml, DEVICE_COUNT, &[]).unwrap(), [1, 0, 0, 0]);
        assert!(link.lost().is_none());
    }

    /// Each link listens on an endpoint no earlier link used (ggml caches by endpoint).
    #[test]
    fn every_link_gets_a_fresh_endpoint() {
        let server = fake_server(0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let link = Link::open(&server, Duration::from_secs(1)).unwrap();
            assert!(seen.insert(link.local_endpoint()), "{} again", link.local_endpoint());
        }
    }

    /// A server of another major version is refused naming both versions.
    #[test]
    fn another_version_is_named() {
        let mut rsp = (HELLO_RSP as u64).to_le_bytes().to_vec();
        rsp.extend_from_slice(&[6, 1, 2, 0]);
        rsp.extend_from_slice(&[0; CAPS]);
        let addr = one_shot_server(rsp);
        let e = probe(&addr, Duration::from_secs(5), 0).unwrap_err().to_string();
        assert!(e.contains("6.1.2") && e.contains("7.0.0") && e.contains(&addr), "{e}");
    }
}
