//! A `llama serve` process for the HTTP tests: the real binary on a free loopback port
//! with the test model, started and waited for, killed on drop; one at a time per test
//! binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{llama_cmd, model_path};

/// A hang guard, not a timing claim: the longest any wait here may take before a broken build
/// fails instead of hanging forever. Tests assert outcomes (status codes, counters in /metrics,
/// the order of events), never how long something took; timings on 2 shared cores vary by
/// ±15 % and more.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Polls `cond` every 20 ms until it holds; panics naming `what` after [`HANG_GUARD`].
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(t.elapsed() < HANG_GUARD, "{what}: still not the case after the hang guard ({HANG_GUARD:?})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Server {
    pub child: Child,
    pub base: String,
    /// One server at a time: two servers with a model each on 2 cores would only slow each
    /// other down (and the soak's memory and descriptor figures are the server's alone).
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One read of /metrics, so several values can be compared as of the same moment.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of the series `query` selects: `name` or `name{label="v",...}`; a series
    /// matches when it has every label the query names (others, such as `model`, may differ),
    /// so on a one-model server a query without `model` reads that model's value.
    pub fn get(&self, query: &str) -> f64 {
        let (name, want) = split_series(query);
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let (n, labels) = split_series(series);
            if n == name && want.iter().all(|w| labels.contains(w)) {
                *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line}"));
            }
        }
        found.unwrap_or_else(|| panic!("no {query} in\n{}", self.0))
    }
}

/// `name{a="x",b="y"}` as its name and its `a="x"` label pairs.
fn split_series(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect()),
        None => (s, Vec::new()),
    }
}

/// A JSON answer's status and body, whether the status is a success or an error (ureq
/// makes 4xx/5xx an `Err`); panics on a transport error, naming `what`.
pub fn status_json(what: &str, r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{what}: {e}"),
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `llama serve ARGS`, not serialized with other servers (for tests that need several at
/// once): the process and its base URL, once it listens. Its stderr is drained so it never
/// blocks on a full pipe.
pub fn spawn_serve(args: &[&str]) -> (Child, String) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let mut child = llama_cmd(&all).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("llama serve printed its address").unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

impl Server {
    /// Starts `llama serve` on the test model and waits until /health says it is ready.
    pub fn start(extra: &[&str]) -> Server {
        let model = model_path();
        let s = Server::start_with(model.to_str().unwrap(), extra);
        wait_for("the model becomes ready", || match ureq::get(&s.url("/health")).call() {
            Ok(r) if r.status() == 200 => Some(()),
            Err(ureq::Error::Status(503, r)) => {
                let v: Value = r.into_json().unwrap();
                assert_eq!(v["error"]["code"], "loading", "{v}");
                None
            }
            other => panic!("/health: {other:?}"),
        });
        s
    }

    /// Starts `llama serve` on `model` and returns once it listens (possibly still loading).
    pub fn start_with(model: &str, extra: &[&str]) -> Server {
        let mut args = vec!["-m", model];
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }

    /// Starts `llama serve ARGS --port 0 -t 2` and returns once it listens.
    pub fn spawn(extra: &[&str]) -> Server {
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut args = vec!["--port", "0", "-t", "2"];
        args.extend_from_slice(extra);
        let (child, base) = spawn_serve(&args);
        Server { child, base, _serial: serial }
    }

    /// Waits until /health answers 200 (the preload, if any, is done).
    pub fn wait_ready(&self) {
        wait_for("the server becomes ready", || ureq::get(&self.url("/health")).call().ok().filter(|r| r.status() == 200).map(|_| ()));
    }

    /// Resident memory of the server process in KiB (Linux /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        match ureq::post(&self.url(path)).send_json(body.clone()) {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    pub fn metrics(&self) -> Metrics {
        Metrics(ureq::get(&self.url("/metrics")).call().unwrap().into_string().unwrap())
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an SSE body: the `data:` payloads, up to and including `[DONE]`.
pub fn sse_events(r: ureq::Response) -> Vec<String> {
    BufReader::new(r.into_reader()).lines().map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

