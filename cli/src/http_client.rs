//! A small blocking HTTP/1.1 client for the commands that talk to a running `llama serve`
//! (`llama ps`): one GET per connection over a plain `TcpStream`, no TLS, no pooling, no
//! async runtime. What the peer sends is untrusted: the client never panics on it, never
//! reads without bound and never waits without a deadline; every malformed, truncated or
//! oversized answer is a typed [`HttpError`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long one exchange may take and how much it may read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for any one step: connecting, a write, a read.
    pub io_timeout: Duration,
    /// Longest the whole exchange may take: without it a server sending one byte every
    /// few seconds would hold the command for ever, each read within `io_timeout`.
    pub deadline: Duration,
    /// Most bytes of response, head and body together.
    pub max_response: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { io_timeout: Duration::from_secs(10), deadline: Duration::from_secs(30), max_response: 16 << 20 }
    }
}

/// The longest head (status line and headers) accepted; hyper's own default limit is
/// well below it.
const MAX_HEAD: usize = 64 << 10;
/// The most header lines accepted.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// `http://host[:port][/base]`, checked once so a request can be built from it without
/// further checks: every byte is printable ASCII (nothing can split the request line or a
/// header) and the host is a name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Without brackets for an IPv6 address.
    host: String,
    port: u16,
    /// The path prefix requests go under: empty or `/base`, without a trailing `/`.
    base: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("https is not supported: `llama serve` speaks plain HTTP (use http://, or a TLS proxy's plain side)")]
    Https,
    #[error("unsupported scheme '{scheme}': expected http://HOST[:PORT][/PATH]")]
    Scheme { scheme: String },
    #[error("expected http://HOST[:PORT][/PATH]")]
    NoScheme,
    #[error("only printable ASCII is allowed (percent-encode anything else)")]
    BadChar,
    #[error("{what} is not supported")]
    Unsupported { what: &'static str },
    #[error("'{host}' is not a host name or IP address")]
    BadHost { host: String },
    #[error("'{port}' is not a port (1-65535)")]
    BadPort { port: String },
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, UrlError> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => return Err(UrlError::Https),
            Some((scheme, _)) => return Err(UrlError::Scheme { scheme: scheme.to_string() }),
            None => return Err(UrlError::NoScheme),
        };
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(UrlError::BadChar);
        }
        if rest.contains(['?', '#']) {
            return Err(UrlError::Unsupported { what: "a query or fragment" });
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') {
            return Err(UrlError::Unsupported { what: "user info (user@host)" });
        }
        let bad_host = || UrlError::BadHost { host: authority.to_string() };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (addr, tail) = v6.split_once(']').ok_or_else(bad_host)?;
                addr.parse::<Ipv6Addr>().map_err(|_| bad_host())?;
                let port = match tail {
                    "" => None,
                    t => Some(t.strip_prefix(':').ok_or_else(bad_host)?),
                };
                (addr, port)
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if !authority.starts_with('[')
            && (host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
        {
            return Err(bad_host());
        }
        let port = match port {
            // `http://host:` means the default port (RFC 3986).
            None | Some("") => 80,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| UrlError::BadPort { port: p.to_string() })?,
        };
        Ok(Url { host: host.to_string(), port, base: path.trim_end_matches('/').to_string() })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.base)
    }
}

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The reason phrase, as sent (may be empty).
    pub reason: String,
    pub body: Vec<u8>,
}

/// Which step of the exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Sending,
    Receiving,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connecting => "connecting",
            Phase::Sending => "sending the request",
            Phase::Receiving => "reading the response",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("header {name} is not a token or its value holds a control character")]
    InvalidHeader { name: String },
    #[error("request path '{path}' is not printable ASCII")]
    InvalidPath { path: String },
    #[error("cannot resolve {host}")]
    Resolve { host: String, #[source] source: io::Error },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("cannot connect to {addr}")]
    Connect { addr: SocketAddr, #[source] source: io::Error },
    #[error("timed out {phase}")]
    Timeout { phase: Phase },
    #[error("the connection failed while {phase}")]
    Io { phase: Phase, #[source] source: io::Error },
    #[error("the response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the connection closed before the end of the response's {part}")]
    Truncated { part: &'static str },
    #[error("malformed response: {reason}")]
    Malformed { reason: &'static str },
}

impl HttpError {
    /// Whether nothing could be reached at all (as opposed to a server that answered badly):
    /// the name does not resolve, or no connection could be made.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HttpError::Resolve { .. } | HttpError::NoAddress { .. } | HttpError::Connect { .. } | HttpError::Timeout { phase: Phase::Connecting }
        )
    }
}

/// `GET {url}{path}` with `headers`, the whole response read within `limits`.
/// `Connection: close` asks the server to end the response by closing, but the response is
/// also complete as soon as its framing says so, whichever comes first.
pub fn get(url: &Url, path: &str, headers: &[(&str, &str)], limits: Limits) -> Result<Response, HttpError> {
    let request = request(url, path, headers)?;
    let deadline = Instant::now() + limits.deadline;
    let mut stream = connect(url, deadline, limits.io_timeout)?;
    stream.set_write_timeout(Some(step(deadline, limits.io_timeout, Phase::Sending)?)).map_err(|source| HttpError::Io { phase: Phase::Sending, source })?;
    stream.write_all(request.as_bytes()).map_err(|e| io_error(Phase::Sending, e))?;
    let mut receiver = Receiver::new(limits.max_response);
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        stream.set_read_timeout(Some(step(deadline, limits.io_timeout, Phase::Receiving)?)).map_err(|source| HttpError::Io { phase: Phase::Receiving, source })?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(Phase::Receiving, e)),
        };
        if n == 0 || receiver.push(&chunk[..n])? {
            return receiver.finish();
        }
    }
}

fn request(url: &Url, path: &str, headers: &[(&str, &str)]) -> Result<String, HttpError> {
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    let value = |s: &str| s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    // The path is the caller's, checked like the URL: nothing may break the request line.
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::InvalidPath { path: path.escape_default().to_string() });
    }
    let mut r = format!("GET {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", url.base, url.authority());
    for (name, v) in headers {
        if !token(name) || !value(v) {
            return Err(HttpError::InvalidHeader { name: name.to_string() });
        }
        r.push_str(&format!("{name}: {v}\r\n"));
    }
    r.push_str("\r\n");
    Ok(r)
}

/// Connects to the first address of the host that answers, each try within the step
/// timeout and all of them within the deadline.
fn connect(url: &Url, deadline: Instant, io_timeout: Duration) -> Result<TcpStream, HttpError> {
    let addrs: Vec<SocketAddr> =
        (url.host.as_str(), url.port).to_socket_addrs().map_err(|source| HttpError::Resolve { host: url.host.clone(), source })?.collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, step(deadline, io_timeout, Phase::Connecting)?) {
            Ok(s) => return Ok(s),
            Err(source) => last = Some(HttpError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| HttpError::NoAddress { host: url.host.clone() }))
}

/// The timeout of the next step: `io_timeout`, or what is left before the deadline if less.
/// Never zero (a zero timeout is an error for the socket calls): past the deadline it is
/// a timeout error.
fn step(deadline: Instant, io_timeout: Duration, phase: Phase) -> Result<Duration, HttpError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HttpError::Timeout { phase });
    }
    Ok(left.min(io_timeout))
}

fn io_error(phase: Phase, e: io::Error) -> HttpError {
    // A socket timeout reads as WouldBlock on Unix and TimedOut on Windows.
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout { phase },
        _ => HttpError::Io { phase, source: e },
    }
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    Length(usize),
    Chunked,
    /// Neither length nor chunked: the body ends when the connection closes.
    UntilClose,
}

/// What the head says; the headers themselves are only needed for the framing.
struct Head {
    status: u16,
    reason: String,
    framing: Framing,
}

/// Assembles a response from the bytes as they arrive and tells when it is complete, so a
/// server that keeps the connection open after a complete response does not make us wait.
/// Work per call is proportional to the new bytes (a server sending one byte at a time
/// costs no rescans of what came before).
struct Receiver {
    buf: Vec<u8>,
    max: usize,
    /// The parsed head and where the body starts in `buf`.
    head: Option<(Head, usize)>,
    chunked: Chunked,
}

impl Receiver {
    fn new(max: usize) -> Receiver {
        Receiver { buf: Vec::new(), max, head: None, chunked: Chunked::default() }
    }

    /// Adds bytes; true once the response is complete.
    fn push(&mut self, bytes: &[u8]) -> Result<bool, HttpError> {
        if self.buf.len().saturating_add(bytes.len()) > self.max {
            return Err(HttpError::TooLarge { limit: self.max });
        }
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        if self.head.is_none() {
            // Only where the new bytes could complete a "\r\n\r\n".
            let from = before.saturating_sub(3);
            match find(&self.buf[from..], b"\r\n\r\n") {
                Some(i) => {
                    let end = from + i;
                    if end > MAX_HEAD {
                        return Err(HttpError::Malformed { reason: "headers longer than 64 KiB" });
                    }
                    let head = parse_head(&self.buf[..end], self.max)?;
                    self.head = Some((head, end + 4));
                }
                None if self.buf.len() > MAX_HEAD => return Err(HttpError::Malformed { reason: "headers longer than 64 KiB" }),
                None => return Ok(false),
            }
        }
        let Some((head, start)) = &self.head else { return Ok(false) };
        let body = &self.buf[*start..];
        Ok(match head.framing {
            Framing::Empty => true,
            Framing::Length(n) => body.len() >= n,
            Framing::Chunked => self.chunked.advance(body)?,
            Framing::UntilClose => false,
        })
    }

    /// The response, once complete or at the end of the connection.
    fn finish(mut self) -> Result<Response, HttpError> {
        let Some((head, start)) = self.head.take() else { return Err(HttpError::Truncated { part: "head" }) };
        let body = match head.framing {
            Framing::Empty => Vec::new(),
            Framing::Length(n) => {
                let b = &self.buf[start..];
                if b.len() < n {
                    return Err(HttpError::Truncated { part: "body" });
                }
                b[..n].to_vec()
            }
            Framing::Chunked => {
                if !self.chunked.advance(&self.buf[start..])? {
                    return Err(HttpError::Truncated { part: "chunked body" });
                }
                std::mem::take(&mut self.chunked.body)
            }
            Framing::UntilClose => self.buf.split_off(start),
        };
        Ok(Response { status: head.status, reason: head.reason, body })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status line and headers (without the blank line that ends them).
fn parse_head(head: &[u8], max_body: usize) -> Result<Head, HttpError> {
    let malformed = |reason| HttpError::Malformed { reason };
    let mut lines = Vec::new();
    let mut rest = head;
    while let Some(i) = find(rest, b"\r\n") {
        lines.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    lines.push(rest);
    // A bare CR or LF is where parsers disagree on line ends: refused, not guessed.
    if lines.iter().any(|l| l.contains(&b'\r') || l.contains(&b'\n')) {
        return Err(malformed("a bare CR or LF in the head"));
    }
    let (status, reason) = parse_status_line(lines[0])?;
    let mut headers = Vec::new();
    for line in lines.into_iter().skip(1) {
        if headers.len() == MAX_HEADERS {
            return Err(malformed("more than 100 header lines"));
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(malformed("a folded header line"));
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(malformed("a header line without ':'"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(malformed("a header name that is not a token"));
        }
        let value = String::from_utf8_lossy(value).trim_matches([' ', '\t']).to_string();
        headers.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    let framing = framing(status, &headers, max_body)?;
    Ok(Head { status, reason, framing })
}

/// `HTTP/1.x NNN reason`.
fn parse_status_line(line: &[u8]) -> Result<(u16, String), HttpError> {
    let bad = HttpError::Malformed { reason: "not an HTTP/1.x status line" };
    let rest = line.strip_prefix(b"HTTP/1.").ok_or(bad)?;
    let [minor, b' ', d1, d2, d3, tail @ ..] = rest else {
        return Err(HttpError::Malformed { reason: "not an HTTP/1.x status line" });
    };
    if !minor.is_ascii_digit() || ![d1, d2, d3].iter().all(|d| d.is_ascii_digit()) {
        return Err(HttpError::Malformed { reason: "not an HTTP/1.x status line" });
    }
    let status = [d1, d2, d3].iter().fold(0u16, |n, d| n * 10 + u16::from(**d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(HttpError::Malformed { reason: "a status code outside 100-599" });
    }
    let reason = match tail {
        [] => "",
        [b' ', r @ ..] => std::str::from_utf8(r).unwrap_or(""),
        _ => return Err(HttpError::Malformed { reason: "not an HTTP/1.x status line" }),
    };
    Ok((status, reason.to_string()))
}

/// How the body is framed (RFC 9112 6.3): chunked wins over a length; lengths that
/// disagree, or a length past the limit, are refused before any body is read.
fn framing(status: u16, headers: &[(String, String)], max_body: usize) -> Result<Framing, HttpError> {
    if status < 200 || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if let Some(last) = values(headers, "transfer-encoding").filter(|v| !v.is_empty()).last() {
        // We send no Accept-Encoding: anything but plain chunked cannot be decoded here.
        return if last.eq_ignore_ascii_case("chunked") {
            Ok(Framing::Chunked)
        } else {
            Err(HttpError::Malformed { reason: "a transfer-encoding other than chunked" })
        };
    }
    let mut length = None;
    for v in values(headers, "content-length") {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed { reason: "a content-length that is not a number" });
        }
        // More digits than any limit needs: too large, not an overflow.
        let n = v.parse::<usize>().unwrap_or(usize::MAX);
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::Malformed { reason: "content-length values that disagree" });
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > max_body => Err(HttpError::TooLarge { limit: max_body }),
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::UntilClose),
    }
}

/// The comma-separated values of every header `name`, in order.
fn values<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).flat_map(|(_, v)| v.split(',')).map(str::trim)
}

/// A chunked body decoded as it arrives: `advance` is given the whole body received so far
/// and resumes where the last call stopped.
#[derive(Default)]
struct Chunked {
    /// Bytes of the received body already consumed.
    pos: usize,
    state: ChunkState,
    body: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Bytes of the current chunk still to come.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailer,
    Done,
}

impl Chunked {
    /// True once the last chunk and the trailer are in.
    fn advance(&mut self, input: &[u8]) -> Result<bool, HttpError> {
        let malformed = |reason| HttpError::Malformed { reason };
        loop {
            let rest = input.get(self.pos..).unwrap_or_default();
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(eol) = find(&rest[..rest.len().min(MAX_CHUNK_LINE + 2)], b"\r\n") else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(malformed("a chunk-size or trailer line longer than 4 KiB"));
                        }
                        return Ok(false);
                    };
                    let line = &rest[..eol];
                    self.pos += eol + 2;
                    self.state = match self.state {
                        ChunkState::Trailer if line.is_empty() => ChunkState::Done,
                        ChunkState::Trailer => ChunkState::Trailer,
                        _ => match chunk_size(line)? {
                            0 => ChunkState::Trailer,
                            n => ChunkState::Data(n),
                        },
                    };
                }
                ChunkState::Data(n) => {
                    let take = n.min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    self.pos += take;
                    if take < n {
                        self.state = ChunkState::Data(n - take);
                        return Ok(false);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(malformed("a chunk longer than its size"));
                    }
                    self.pos += 2;
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;extensions`.
fn chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let tail = &line[digits..];
    let tail_ok = tail.iter().find(|b| **b != b' ' && **b != b'\t').is_none_or(|b| *b == b';');
    if digits == 0 || !tail_ok {
        return Err(HttpError::Malformed { reason: "a chunk size that is not hexadecimal" });
    }
    // A size past usize (16+ hex digits) is past any limit: the total bound refuses it
    // when its data arrives; usize::MAX keeps it from wrapping meanwhile.
    let hex = std::str::from_utf8(&line[..digits]).unwrap_or("");
    Ok(usize::from_str_radix(hex, 16).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A one-connection server: reads the request head, writes `parts` (pausing between
    /// them, so a response arrives in pieces), then closes unless `hold` (then it keeps the
    /// connection open for that long). Returns the request it read.
    fn serve(parts: Vec<Vec<u8>>, hold: Duration) -> (Url, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/base/", listener.local_addr().unwrap())).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            for p in parts {
                // The client may have given up already (a refused response): not our failure.
                if s.write_all(&p).and_then(|_| s.flush()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(hold);
            String::from_utf8_lossy(&req).into_owned()
        });
        (url, handle)
    }

    fn fetch(parts: Vec<&[u8]>, limits: Limits) -> (Result<Response, HttpError>, String) {
        let (url, server) = serve(parts.into_iter().map(<[u8]>::to_vec).collect(), Duration::ZERO);
        let r = get(&url, "/v1/models", &[("Authorization", "Bearer k")], limits);
        (r, server.join().unwrap())
    }

    fn quick() -> Limits {
        Limits { io_timeout: Duration::from_secs(5), deadline: Duration::from_secs(10), max_response: 1 << 20 }
    }

    #[test]
    fn a_content_length_body_and_the_request_sent() {
        let (r, req) = fetch(vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhel"[..], b"lo"], quick());
        let r = r.unwrap();
        assert_eq!((r.status, r.reason.as_str(), r.body.as_slice()), (200, "OK", &b"hello"[..]));
        assert!(req.starts_with("GET /base/v1/models HTTP/1.1\r\n"), "{req}");
        for h in ["Host: 127.0.0.1:", "Connection: close\r\n", "Authorization: Bearer k\r\n"] {
            assert!(req.contains(h), "{h} missing from {req}");
        }
    }

    /// The framing says when the response is complete: a server that keeps the connection
    /// open after it (ignoring `Connection: close`) does not make the client wait.
    #[test]
    fn a_complete_response_does_not_wait_for_the_close() {
        let (url, server) = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()], Duration::from_secs(3));
        let t = Instant::now();
        let r = get(&url, "/", &[], quick()).unwrap();
        assert_eq!(r.body, b"ok");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        server.join().unwrap();
    }

    #[test]
    fn a_chunked_body_with_extensions_and_trailers() {
        let (r, _) = fetch(
            vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel"[..], b"lo\r\n", b"1A\r\n", &[b'x'; 26], b"\r\n0\r\nX-T: 1\r\n\r\n"],
            quick(),
        );
        let r = r.unwrap();
        assert_eq!(r.body, [&b"hello"[..], &[b'x'; 26]].concat());
    }

    #[test]
    fn a_401_is_a_response_not_an_error() {
        let body = br#"{"error":{"message":"invalid API key"}}"#;
        let head = format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n", body.len());
        let (r, _) = fetch(vec![head.as_bytes(), body], quick());
        let r = r.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (401, &body[..]));
    }

    #[test]
    fn a_body_until_close() {
        let (r, _) = fetch(vec![&b"HTTP/1.0 200 OK\r\n\r\nall of "[..], b"it"], quick());
        assert_eq!(r.unwrap().body, b"all of it");
    }

    #[test]
    fn garbage_is_malformed() {
        let (r, _) = fetch(vec![&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]], quick());
        assert!(matches!(r, Err(HttpError::Malformed { .. })), "{r:?}");
    }

    #[test]
    fn truncated_responses() {
        let cases: [(&[u8], &str); 4] = [
            (b"HTTP/1.1 200 OK\r\nContent-Len", "head"),
            (b"", "head"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "body"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "chunked body"),
        ];
        for (parts, part) in cases {
            let (r, _) = fetch(vec![parts], quick());
            assert!(matches!(r, Err(HttpError::Truncated { part: p }) if p == part), "{:?}: {r:?}", String::from_utf8_lossy(parts));
        }
    }

    #[test]
    fn oversized_responses() {
        let small = Limits { max_response: 1000, ..quick() };
        // Announced: refused before the body is read.
        let (r, _) = fetch(vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n"[..]], small);
        assert!(matches!(r, Err(HttpError::TooLarge { limit: 1000 })), "{r:?}");
        // Not announced: refused when it passes the limit.
        let big = vec![b'x'; 2000];
        let (r, _) = fetch(vec![&b"HTTP/1.1 200 OK\r\n\r\n"[..], &big], small);
        assert!(matches!(r, Err(HttpError::TooLarge { .. })), "{r:?}");
        let (r, _) = fetch(vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7D0\r\n"[..], &big], small);
        assert!(matches!(r, Err(HttpError::TooLarge { .. })), "{r:?}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let (url, server) = serve(Vec::new(), Duration::from_millis(1500));
        let limits = Limits { io_timeout: Duration::from_millis(300), ..quick() };
        let r = get(&url, "/", &[], limits);
        assert!(matches!(r, Err(HttpError::Timeout { phase: Phase::Receiving })), "{r:?}");
        server.join().unwrap();
    }

    /// A server that keeps sending, each byte within the step timeout, is still cut off at
    /// the deadline.
    #[test]
    fn a_trickling_server_meets_the_deadline() {
        let parts: Vec<Vec<u8>> = std::iter::once(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()).chain((0..200).map(|_| b"x".to_vec())).collect();
        let (url, server) = serve(parts, Duration::ZERO);
        let limits = Limits { io_timeout: Duration::from_secs(1), deadline: Duration::from_millis(500), ..quick() };
        let t = Instant::now();
        let r = get(&url, "/", &[], limits);
        assert!(matches!(r, Err(HttpError::Timeout { phase: Phase::Receiving })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(server);
    }

    #[test]
    fn nothing_listening_is_unreachable() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = get(&Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(), "/", &[], quick());
        let e = r.unwrap_err();
        assert!(e.is_unreachable(), "{e:?}");
    }

    #[test]
    fn a_header_value_cannot_split_the_request() {
        let url = Url::parse("http://127.0.0.1:9").unwrap();
        let r = get(&url, "/", &[("Authorization", "Bearer k\r\nX-Evil: 1")], quick());
        assert!(matches!(r, Err(HttpError::InvalidHeader { .. })), "{r:?}");
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("127.0.0.1", 8080, ""));
        assert_eq!(u.to_string(), "http://127.0.0.1:8080");
        let u = Url::parse("HTTP://example.com/llama/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("example.com", 80, "/llama"));
        let u = Url::parse("http://[::1]:9000/x").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.to_string().as_str()), ("::1", 9000, "http://[::1]:9000/x"));
        assert_eq!(Url::parse("http://h:").unwrap().port, 80);
        assert_eq!(Url::parse("https://h"), Err(UrlError::Https));
        assert_eq!(Url::parse("ftp://h"), Err(UrlError::Scheme { scheme: "ftp".into() }));
        assert_eq!(Url::parse("localhost:8080"), Err(UrlError::NoScheme));
        assert_eq!(Url::parse("http://h/a b"), Err(UrlError::BadChar));
        assert_eq!(Url::parse("http://h/\r\nX: y"), Err(UrlError::BadChar));
        assert_eq!(Url::parse("http://h/é"), Err(UrlError::BadChar));
        assert!(matches!(Url::parse("http://h/?q=1"), Err(UrlError::Unsupported { .. })));
        assert!(matches!(Url::parse("http://u:p@h/"), Err(UrlError::Unsupported { .. })));
        for bad in ["http://", "http://:80", "http://[::1", "http://[nope]:1", "http://::1:80", "http://h%41"] {
            assert!(matches!(Url::parse(bad), Err(UrlError::BadHost { .. })), "{bad}: {:?}", Url::parse(bad));
        }
        for bad in ["http://h:0", "http://h:65536", "http://h:x", "http://[::1]:x"] {
            assert!(matches!(Url::parse(bad), Err(UrlError::BadPort { .. })), "{bad}: {:?}", Url::parse(bad));
        }
    }

    /// The parser alone, fed in pieces of every size.
    fn parse(bytes: &[u8], piece: usize) -> Result<Response, HttpError> {
        let mut r = Receiver::new(1 << 20);
        for p in bytes.chunks(piece.max(1)) {
            if r.push(p)? {
                break;
            }
        }
        r.finish()
    }

    #[test]
    fn any_piece_size_gives_the_same_response() {
        let msg = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n2 ; x\r\nde\r\n0\r\n\r\n";
        for piece in 1..msg.len() {
            assert_eq!(parse(msg, piece).unwrap().body, b"abcde", "piece {piece}");
        }
    }

    #[test]
    fn malformed_heads_and_chunks() {
        let cases: &[&[u8]] = &[
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200OK\r\n\r\n",
            b"HTTP/1.1 200 OK\nX: y\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        ];
        for bad in cases {
            let r = parse(bad, 7);
            assert!(matches!(r, Err(HttpError::Malformed { .. })), "{:?}: {r:?}", String::from_utf8_lossy(bad));
        }
        // A chunk size past usize neither wraps around nor panics (the network's size bound
        // refuses its data).
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffff\r\nabc", 5);
        assert!(matches!(r, Err(HttpError::Truncated { .. })), "{r:?}");
        // An endless head.
        let r = parse(&[b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD]].concat(), 4096);
        assert!(matches!(r, Err(HttpError::Malformed { .. })), "{r:?}");
        // Too many headers.
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X: 1\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(parse(many.as_bytes(), 64), Err(HttpError::Malformed { .. })));
        // 204 has no body, whatever follows.
        assert_eq!(parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", 3).unwrap().body, b"");
    }

    /// Random and mutated bytes: every outcome is a response or a typed error, never a panic.
    #[test]
    fn hostile_bytes_never_panic() {
        let seeds: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
            b"HTTP/1.1 401 Unauthorized\r\n\r\n",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"\r\n :;0123456789abcdefHTP/.chunkedContent-Length\x00\xff";
        for _ in 0..20_000 {
            let mut m = seeds[(rand() % 3) as usize].to_vec();
            for _ in 0..(rand() % 6) {
                let i = (rand() as usize) % (m.len() + 1);
                let b = alphabet[(rand() as usize) % alphabet.len()];
                match rand() % 3 {
                    0 => m.insert(i, b),
                    1 if i < m.len() => m[i] = b,
                    _ if i < m.len() => drop(m.remove(i)),
                    _ => {}
                }
            }
            let _ = parse(&m, 1 + (rand() as usize) % 9);
        }
    }
}
