//! A minimal W3C WebDriver client over chromedriver, for the chat page tests: a real headless
//! Chromium, started per test and driven like a person would (clicks, keys, uploads,
//! downloads, dialogs, a phone-sized window, the dark scheme).
//!
//! Hand-written because the protocol the tests need is a dozen JSON-over-HTTP calls, and the
//! WebDriver client crates are async: they would add a tokio runtime to the test crate.
//! Every WebDriver error panics with the command, the HTTP status and WebDriver's own
//! `error`/`message`: the tests are the only users, and a panic is their failure.

use std::cell::Cell;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::server::{wait_for, HANG_GUARD};

/// The key of a W3C element reference object (the spec's "web element identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Longer than the script and page-load timeouts asked of chromedriver (30 s, 60 s), so their
/// own errors come back first; short enough that a wedged chromedriver fails the test.
const HTTP_TIMEOUT: Duration = Duration::from_secs(90);

/// WebDriver's special keys, to put in [`Element::send_keys`] text.
pub mod keys {
    pub const NULL: &str = "\u{E000}";
    pub const ENTER: &str = "\u{E007}";
    pub const SHIFT: &str = "\u{E008}";
    pub const ESCAPE: &str = "\u{E00C}";
}

/// How the browser starts.
#[derive(Clone, Debug)]
pub struct BrowserOptions {
    /// The window (and, checked, the viewport) size in CSS pixels.
    pub width: u32,
    pub height: u32,
    /// Where downloads land, without a prompt; Chromium's default (~/Downloads) when `None`.
    pub download_dir: Option<PathBuf>,
    /// Emulate `prefers-color-scheme: dark` from the start.
    pub dark: bool,
}

impl Default for BrowserOptions {
    fn default() -> Self {
        BrowserOptions { width: 1280, height: 900, download_dir: None, dark: false }
    }
}

/// A WebDriver error as chromedriver reports it.
struct WdError {
    status: u16,
    error: String,
    message: String,
}

/// What a command needs: the HTTP agent and the session's URL. Cheap to clone (the agent is
/// shared), so every [`Element`] carries one.
#[derive(Clone)]
struct Session {
    agent: ureq::Agent,
    /// `http://127.0.0.1:<port>/session/<id>`
    url: String,
}

impl Session {
    /// One command; `body` `None` is a GET (or a DELETE for `method` "DELETE"). Returns the
    /// response's `value`.
    fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        request(&self.agent, method, &format!("{}{path}", self.url), body)
    }

    /// [`Session::try_cmd`], panicking on any error with the command and WebDriver's answer.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: HTTP {} {}: {}", e.status, e.error, e.message))
    }

    fn get(&self, path: &str) -> Value {
        self.cmd("GET", path, None)
    }

    fn post(&self, path: &str, body: Value) -> Value {
        self.cmd("POST", path, Some(body))
    }

    fn element(&self, v: Value, what: &str) -> Element {
        let id = v.get(ELEMENT_KEY).and_then(Value::as_str).unwrap_or_else(|| panic!("WebDriver {what}: not an element reference: {v}"));
        Element { session: self.clone(), id: id.to_string() }
    }

    fn elements(&self, v: Value, what: &str) -> Vec<Element> {
        match v {
            Value::Array(items) => items.into_iter().map(|e| self.element(e, what)).collect(),
            other => panic!("WebDriver {what}: not a list of elements: {other}"),
        }
    }

    /// Finds from `base` ("" for the document, "/element/<id>" within an element); `None`
    /// only for "no such element", other errors panic.
    fn try_find(&self, base: &str, css: &str) -> Option<Element> {
        let path = format!("{base}/element");
        match self.try_cmd("POST", &path, Some(json!({"using": "css selector", "value": css}))) {
            Ok(v) => Some(self.element(v, &format!("find {css:?}"))),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("WebDriver find {css:?}: HTTP {} {}: {}", e.status, e.error, e.message),
        }
    }

    fn find(&self, base: &str, css: &str) -> Element {
        self.try_find(base, css).unwrap_or_else(|| panic!("no element matches {css:?}"))
    }

    fn find_all(&self, base: &str, css: &str) -> Vec<Element> {
        let v = self.post(&format!("{base}/elements"), json!({"using": "css selector", "value": css}));
        self.elements(v, &format!("find all {css:?}"))
    }
}

/// One HTTP exchange with chromedriver; a WebDriver error comes back as [`WdError`], a
/// transport error (chromedriver gone, timed out) panics.
fn request(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> Result<Value, WdError> {
    let req = agent.request(method, url);
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match res {
        Ok(r) => {
            let v: Value = r.into_json().unwrap_or_else(|e| panic!("WebDriver {method} {url}: unreadable answer: {e}"));
            Ok(v.get("value").cloned().unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(status, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            let field = |k: &str| v["value"][k].as_str().unwrap_or("").to_string();
            Err(WdError { status, error: field("error"), message: field("message") })
        }
        Err(e) => panic!("WebDriver {method} {url}: {e}"),
    }
}

/// JavaScript truthiness of a script's result (NaN arrives as null).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A headless Chromium with its chromedriver and one session. Dropping it ends the session
/// (Chromium quits), kills chromedriver and removes the throwaway profile.
pub struct Browser {
    session: Session,
    child: Child,
    /// A fresh profile per browser: no state leaks between tests (storage, cookies).
    _profile: tempfile::TempDir,
    /// Whether [`Browser::set_window_size`] had to override the viewport, so the next call
    /// starts from the real window again.
    metrics_override: Cell<bool>,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a session in a fresh profile.
    /// Chromium is $CHROMIUM or /usr/bin/chromium, chromedriver $CHROMEDRIVER or
    /// /usr/bin/chromedriver.
    pub fn start(opts: BrowserOptions) -> Browser {
        let env_or = |k: &str, d: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(d));
        let chromium = env_or("CHROMIUM", "/usr/bin/chromium");
        let chromedriver = env_or("CHROMEDRIVER", "/usr/bin/chromedriver");
        // A port the kernel just had free; chromedriver takes it a moment later (another
        // process grabbing it in between fails the start, loudly).
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port();
        let mut child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e} (scripts/deps test installs chromium-driver)", chromedriver.display()));
        let agent = ureq::AgentBuilder::new().timeout(HTTP_TIMEOUT).build();
        let base = format!("http://127.0.0.1:{port}");
        let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("chromedriver answers /status ready", || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{} exited before it was ready: {status}", chromedriver.display());
                }
                let r = agent.get(&format!("{base}/status")).timeout(Duration::from_secs(2)).call().ok()?;
                let v: Value = r.into_json().ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            })
        }));
        if let Err(p) = ready {
            let _ = child.kill();
            let _ = child.wait();
            std::panic::resume_unwind(p);
        }
        let profile = tempfile::Builder::new().prefix("llama-tests-chromium-").tempdir().expect("a temp profile dir");
        let args = vec![
            "--headless=new".to_string(),
            // Chromium's sandbox refuses to run as root, which the test machines are.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={},{}", opts.width, opts.height),
            format!("--user-data-dir={}", profile.path().display()),
            "--no-first-run".into(),
            "--disable-extensions".into(),
        ];
        let mut chrome = json!({"binary": chromium, "args": args});
        if let Some(dir) = &opts.download_dir {
            chrome["prefs"] = json!({"download.default_directory": dir, "download.prompt_for_download": false});
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            // Dialogs stay open until the test handles them (alert_text, accept_alert): the
            // default would dismiss them behind the test's back at the next command.
            "unhandledPromptBehavior": "ignore",
            "timeouts": {"script": 30_000, "pageLoad": 60_000, "implicit": 0},
            "goog:chromeOptions": chrome,
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let created = match request(&agent, "POST", &format!("{base}/session"), Some(caps)) {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("WebDriver new session: HTTP {} {}: {}", e.status, e.error, e.message);
            }
        };
        let id = created["sessionId"].as_str().unwrap_or_else(|| panic!("WebDriver new session: no sessionId in {created}")).to_string();
        let browser = Browser { session: Session { agent, url: format!("{base}/session/{id}") }, child, _profile: profile, metrics_override: Cell::new(false) };
        if opts.dark {
            browser.set_color_scheme(true);
        }
        browser
    }

    /// Navigates and waits for the page's load event.
    pub fn goto(&self, url: &str) {
        self.session.post("/url", json!({"url": url}));
    }

    pub fn refresh(&self) {
        self.session.post("/refresh", json!({}));
    }

    /// Runs `script` as a function body (`arguments[i]` are `args`); returns what it returns.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.session.post("/execute/sync", json!({"script": script, "args": args}))
    }

    /// Runs `script` with a callback as its last argument; returns what it is called with.
    pub fn execute_async(&self, script: &str, args: &[Value]) -> Value {
        self.session.post("/execute/async", json!({"script": script, "args": args}))
    }

    /// The first element matching `css`; panics naming the selector when there is none.
    pub fn find(&self, css: &str) -> Element {
        self.session.find("", css)
    }

    pub fn try_find(&self, css: &str) -> Option<Element> {
        self.session.try_find("", css)
    }

    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.session.find_all("", css)
    }

    /// Polls until an element matching `css` is present and displayed (pages render
    /// asynchronously); panics after the hang guard.
    pub fn wait_for(&self, css: &str) -> Element {
        wait_for(&format!("an element {css:?} displayed"), || {
            let e = self.session.try_find("", css)?;
            // Replaced between the two calls (stale): look again.
            let shown = e.session.try_cmd("GET", &format!("/element/{}/displayed", e.id), None).ok()?;
            shown.as_bool().filter(|s| *s).map(|_| e)
        })
    }

    /// Polls `return (<js_condition>)` until it is truthy and returns its value; panics naming
    /// `what` after the hang guard, with the script's last error if it threw.
    pub fn wait_until(&self, what: &str, js_condition: &str) -> Value {
        let script = format!("return ({js_condition});");
        let t = Instant::now();
        loop {
            let last = match self.session.try_cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []}))) {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => format!("last value {v}"),
                // A page still loading throws (an element not there yet): keep polling.
                Err(e) => format!("last error {}: {}", e.error, e.message),
            };
            assert!(t.elapsed() < HANG_GUARD, "{what}: `{js_condition}` still not true after the hang guard ({HANG_GUARD:?}); {last}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resizes the window and makes sure the page's viewport is exactly `width` wide (what
    /// media queries see); if the window and viewport differ, the viewport is overridden.
    pub fn set_window_size(&self, width: u32, height: u32) {
        if self.metrics_override.replace(false) {
            self.cdp("Emulation.clearDeviceMetricsOverride", json!({}));
        }
        self.session.post("/window/rect", json!({"width": width, "height": height}));
        let inner = self.execute("return window.innerWidth;", &[]);
        if inner.as_u64() != Some(u64::from(width)) {
            self.cdp("Emulation.setDeviceMetricsOverride", json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}));
            self.metrics_override.set(true);
            let inner = self.execute("return window.innerWidth;", &[]);
            assert_eq!(inner.as_u64(), Some(u64::from(width)), "window.innerWidth after resizing to {width}x{height} and overriding the viewport");
        }
    }

    /// Emulates `prefers-color-scheme` (dark or light) for the session's pages.
    pub fn set_color_scheme(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.cdp("Emulation.setEmulatedMedia", json!({"features": [{"name": "prefers-color-scheme", "value": value}]}));
    }

    /// A Chrome DevTools Protocol command through chromedriver, for what WebDriver lacks.
    pub fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.session.post("/goog/cdp/execute", json!({"cmd": cmd, "params": params}))
    }

    /// Writes a PNG of the viewport to `path` (parent directories created).
    pub fn screenshot(&self, path: &Path) {
        let v = self.session.get("/screenshot");
        let b64 = v.as_str().unwrap_or_else(|| panic!("WebDriver screenshot: not a string: {v}"));
        let png = base64::engine::general_purpose::STANDARD.decode(b64).expect("WebDriver screenshot: base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The SEVERE entries of the browser log since the last call (uncaught exceptions,
    /// failed loads, console.error); empty when chromedriver keeps no log.
    pub fn console_errors(&self) -> Vec<String> {
        let body = json!({"type": "browser"});
        let log = match self.session.try_cmd("POST", "/se/log", Some(body.clone())) {
            Ok(v) => v,
            Err(e) if e.error == "unknown command" || e.error == "unknown method" => match self.session.try_cmd("POST", "/log", Some(body)) {
                Ok(v) => v,
                Err(_) => return Vec::new(),
            },
            Err(e) => panic!("WebDriver browser log: HTTP {} {}: {}", e.status, e.error, e.message),
        };
        let entries = log.as_array().cloned().unwrap_or_default();
        entries.iter().filter(|e| e["level"] == "SEVERE").map(|e| e["message"].as_str().unwrap_or("").to_string()).collect()
    }

    /// Opens a new tab (same profile, so the same localStorage) and returns its handle; the
    /// session stays on the current tab until [`Browser::switch_to`].
    pub fn new_tab(&self) -> String {
        let v = self.session.post("/window/new", json!({"type": "tab"}));
        v["handle"].as_str().unwrap_or_else(|| panic!("WebDriver new window: no handle in {v}")).to_string()
    }

    /// The current tab's handle.
    pub fn tab(&self) -> String {
        self.session.get("/window").as_str().expect("a window handle").to_string()
    }

    /// Makes `handle`'s tab the one commands go to.
    pub fn switch_to(&self, handle: &str) {
        self.session.post("/window", json!({"handle": handle}));
    }

    /// The open dialog's text (alert, confirm, prompt), `None` when none is open.
    pub fn alert_text(&self) -> Option<String> {
        match self.session.try_cmd("GET", "/alert/text", None) {
            Ok(v) => Some(v.as_str().unwrap_or("").to_string()),
            Err(e) if e.error == "no such alert" => None,
            Err(e) => panic!("WebDriver GET /alert/text: HTTP {} {}: {}", e.status, e.error, e.message),
        }
    }

    /// Accepts the open dialog (OK).
    pub fn accept_alert(&self) {
        self.session.post("/alert/accept", json!({}));
    }

    /// Types into the open prompt (accept it after).
    pub fn send_alert_text(&self, text: &str) {
        self.session.post("/alert/text", json!({"text": text}));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium; errors (chromedriver already gone) don't matter.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = self.session.agent.delete(&self.session.url).timeout(Duration::from_secs(30)).call();
        }));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An element of the page, as WebDriver references it.
pub struct Element {
    session: Session,
    id: String,
}

impl Element {
    fn path(&self, tail: &str) -> String {
        format!("/element/{}{tail}", self.id)
    }

    /// A real click at the element's centre: an element covered by another fails with
    /// chromedriver's "element click intercepted", as a person could not click it either.
    pub fn click(&self) {
        self.session.post(&self.path("/click"), json!({}));
    }

    /// Types `text` (with [`keys`] for special keys); for a file input, the file's path.
    pub fn send_keys(&self, text: &str) {
        self.session.post(&self.path("/value"), json!({"text": text}));
    }

    pub fn clear(&self) {
        self.session.post(&self.path("/clear"), json!({}));
    }

    /// The rendered text (as innerText, hidden parts left out).
    pub fn text(&self) -> String {
        let v = self.session.get(&self.path("/text"));
        v.as_str().unwrap_or("").to_string()
    }

    pub fn attr(&self, name: &str) -> Option<String> {
        self.session.get(&self.path(&format!("/attribute/{name}"))).as_str().map(str::to_string)
    }

    pub fn prop(&self, name: &str) -> Value {
        self.session.get(&self.path(&format!("/property/{name}")))
    }

    pub fn displayed(&self) -> bool {
        self.session.get(&self.path("/displayed")).as_bool().unwrap_or(false)
    }

    /// The first match of `css` within this element; panics naming the selector when none.
    pub fn find(&self, css: &str) -> Element {
        self.session.find(&self.path(""), css)
    }

    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.session.find_all(&self.path(""), css)
    }

    /// x, y, width, height in CSS pixels, relative to the document.
    pub fn rect(&self) -> (f64, f64, f64, f64) {
        let r = self.session.get(&self.path("/rect"));
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("WebDriver element rect: no {k} in {r}"));
        (f("x"), f("y"), f("width"), f("height"))
    }

    /// The W3C element reference, to pass as a script argument.
    pub fn json(&self) -> Value {
        json!({ELEMENT_KEY: self.id})
    }
}
