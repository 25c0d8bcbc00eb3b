//! `llama ps`: the models a running `llama serve` has loaded (or is loading), read from its
//! `GET /v1/models`. It only reads; it never changes what the server holds. The server's
//! answer is untrusted: names and messages are printed with control characters escaped,
//! so a hostile server cannot drive the terminal.

use serde::Deserialize;

use crate::http_client::{self, HttpError, Limits};
use crate::opts::PsOpts;
use crate::CliError;

/// Why `llama ps` could not show the models; each case has its own exit code (error.rs).
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    #[error("cannot connect to {url}: is `llama serve` running at {url}?")]
    Unreachable { url: String, #[source] source: HttpError },
    /// Connected, but the exchange failed (a timeout, a reset).
    #[error("no answer from {url}")]
    NoAnswer { url: String, #[source] source: HttpError },
    #[error("the server at {url} wants an API key: --api-key or LLAMA_API_KEY")]
    ApiKeyWanted { url: String },
    #[error("the server at {url} refused the API key (401): check --api-key or LLAMA_API_KEY")]
    ApiKeyRefused { url: String },
    #[error("the server at {url} answered {status}: {message}")]
    Status { url: String, status: String, message: String },
    #[error("unexpected answer from {url}: not an HTTP response the client can read")]
    BadHttp { url: String, #[source] source: HttpError },
    #[error("unexpected answer from {url}: not the /v1/models list (is it `llama serve`?)")]
    BadBody { url: String, #[source] source: serde_json::Error },
}

/// `/v1/models`: only `data` matters here; each entry is kept as sent for `--json`.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<serde_json::Value>,
}

/// One entry of `/v1/models`, the fields the table shows. The load fields are present
/// only while the model is loaded; `idle_seconds` is null while requests are in flight,
/// `unload_in_seconds` null when the model is never unloaded for idleness.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub id: String,
    pub status: ModelStatus,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub ctx_size: Option<u64>,
    #[serde(default)]
    pub slots_busy: Option<u32>,
    #[serde(default)]
    pub slots_total: Option<u32>,
    #[serde(default)]
    pub idle_seconds: Option<f64>,
    #[serde(default)]
    pub unload_in_seconds: Option<f64>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Loaded,
    Loading,
    Unloaded,
    Failed,
    /// A status a newer server may add: not shown, not an error.
    #[serde(other)]
    Other,
}

/// An entry as sent and as read.
pub struct Listed {
    pub raw: serde_json::Value,
    pub entry: ModelEntry,
}

pub fn run(a: &PsOpts) -> Result<(), CliError> {
    let shown = fetch(a)?;
    if a.json {
        let raw: Vec<&serde_json::Value> = shown.iter().map(|l| &l.raw).collect();
        outln!("{}", serde_json::to_string_pretty(&raw).expect("JSON values serialize"))?;
    } else if shown.is_empty() {
        outln!("no models loaded")?;
    } else {
        let entries: Vec<ModelEntry> = shown.into_iter().map(|l| l.entry).collect();
        out!("{}", table(&entries))?;
    }
    Ok(())
}

/// The loaded and loading models the server lists, in its order.
fn fetch(a: &PsOpts) -> Result<Vec<Listed>, PsError> {
    let url = a.url.to_string();
    let auth = a.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Accept", "application/json"), ("User-Agent", concat!("llama/", env!("CARGO_PKG_VERSION")))];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let resp = http_client::get(&a.url, "/v1/models", &headers, Limits::default()).map_err(|source| match &source {
        e if e.is_unreachable() => PsError::Unreachable { url: url.clone(), source },
        HttpError::Timeout { .. } | HttpError::Io { .. } => PsError::NoAnswer { url: url.clone(), source },
        _ => PsError::BadHttp { url: url.clone(), source },
    })?;
    match resp.status {
        200..=299 => {}
        401 if a.api_key.is_some() => return Err(PsError::ApiKeyRefused { url }),
        401 => return Err(PsError::ApiKeyWanted { url }),
        status => {
            let status = printable(&format!("{status} {}", resp.reason)).trim_end().to_string();
            return Err(PsError::Status { url, status, message: error_message(&resp.body) });
        }
    }
    parse(&resp.body).map_err(|source| PsError::BadBody { url, source })
}

/// The entries to show: loaded and loading, every entry checked against the contract
/// (a malformed one fails the whole answer rather than being silently dropped).
fn parse(body: &[u8]) -> Result<Vec<Listed>, serde_json::Error> {
    let list: ModelList = serde_json::from_slice(body)?;
    let mut shown = Vec::new();
    for raw in list.data {
        let entry = ModelEntry::deserialize(&raw)?;
        if matches!(entry.status, ModelStatus::Loaded | ModelStatus::Loading) {
            shown.push(Listed { raw, entry });
        }
    }
    Ok(shown)
}

/// The server's `error.message` (OpenAI's error shape), else the start of the body.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Wrapper {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    let text = match serde_json::from_slice::<Wrapper>(body) {
        Ok(w) => w.error.message,
        Err(_) => String::from_utf8_lossy(body).trim().chars().take(200).collect(),
    };
    match printable(&text) {
        t if t.is_empty() => "(no message)".to_string(),
        t => t,
    }
}

/// `s` with control characters escaped (`\u{1b}`), safe to print on a terminal.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// The text table: NAME SIZE MEMORY CONTEXT SLOTS IDLE UNLOADS IN. A model still loading has
/// only its name and size; its IDLE column says `loading`.
pub fn table(models: &[ModelEntry]) -> String {
    let header = ["NAME", "SIZE", "MEMORY", "CONTEXT", "SLOTS", "IDLE", "UNLOADS IN"].map(String::from);
    let dash = || "-".to_string();
    let rows: Vec<[String; 7]> = models
        .iter()
        .map(|m| {
            let loaded = m.status == ModelStatus::Loaded;
            [
                printable(&m.id),
                m.size_bytes.map_or_else(dash, bytes),
                m.memory_bytes.map_or_else(dash, bytes),
                m.ctx_size.map_or_else(dash, |c| c.to_string()),
                match (m.slots_busy, m.slots_total) {
                    (Some(b), Some(t)) => format!("{b}/{t}"),
                    _ => dash(),
                },
                match (loaded, m.idle_seconds) {
                    (false, _) => "loading".to_string(),
                    (true, Some(s)) => duration(s),
                    (true, None) => "busy".to_string(),
                },
                match (loaded, m.unload_in_seconds) {
                    (false, _) => dash(),
                    (true, Some(s)) => duration(s),
                    (true, None) => "never".to_string(),
                },
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(w - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Decimal units as `ollama ps` prints them: `253 MB`, `1.5 GB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.5 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v < 9.95 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// Whole seconds, largest two units: `12s`, `4m47s`, `2h05m`, `3d04h`. Negative (a clock
/// oddity on the server) reads as 0; `as` saturates, so no value panics.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"{"object":"list","data":[
        {"id":"gemma","object":"model","created":0,"owned_by":"llama","status":"loaded",
         "size_bytes":253000000,"arch":"gemma3","quantization":"Q4_K_M",
         "memory_bytes":600000000,"ctx_size":8192,"slots_busy":1,"slots_total":4,
         "idle_seconds":12.5,"unload_in_seconds":287.5},
        {"id":"smol","object":"model","created":0,"owned_by":"llama","status":"loaded",
         "size_bytes":98362432,"arch":null,"quantization":null,
         "memory_bytes":150000000,"ctx_size":2048,"slots_busy":4,"slots_total":4,
         "idle_seconds":null,"unload_in_seconds":null},
        {"id":"big","object":"model","created":0,"owned_by":"llama","status":"loading",
         "size_bytes":null,"arch":null,"quantization":null},
        {"id":"gone","object":"model","created":0,"owned_by":"llama","status":"unloaded",
         "size_bytes":1,"arch":null,"quantization":null},
        {"id":"bad","object":"model","created":0,"owned_by":"llama","status":"failed","reason":"no",
         "size_bytes":1,"arch":null,"quantization":null},
        {"id":"new","object":"model","created":0,"owned_by":"llama","status":"sleeping"}
    ]}"#;

    #[test]
    fn only_loaded_and_loading_models_are_shown() {
        let shown = parse(CONTRACT.as_bytes()).unwrap();
        let ids: Vec<&str> = shown.iter().map(|l| l.entry.id.as_str()).collect();
        assert_eq!(ids, ["gemma", "smol", "big"]);
        // --json passes the server's entry through, fields it did not document included.
        assert_eq!(shown[0].raw["arch"], "gemma3");
        assert_eq!(shown[0].entry.idle_seconds, Some(12.5));
    }

    #[test]
    fn the_table() {
        let entries: Vec<ModelEntry> = parse(CONTRACT.as_bytes()).unwrap().into_iter().map(|l| l.entry).collect();
        let expected = "\
NAME    SIZE     MEMORY   CONTEXT   SLOTS   IDLE      UNLOADS IN
gemma   253 MB   600 MB   8192      1/4     12s       4m47s
smol    98 MB    150 MB   2048      4/4     busy      never
big     -        -        -         -       loading   -
";
        assert_eq!(table(&entries), expected);
    }

    #[test]
    fn names_cannot_drive_the_terminal() {
        let m = ModelEntry {
            id: "evil\u{1b}[2J".into(),
            status: ModelStatus::Loading,
            size_bytes: None,
            memory_bytes: None,
            ctx_size: None,
            slots_busy: None,
            slots_total: None,
            idle_seconds: None,
            unload_in_seconds: None,
        };
        let t = table(&[m]);
        assert!(!t.contains('\u{1b}') && t.contains("evil\\u{1b}[2J"), "{t}");
        assert_eq!(error_message(b"{\"error\":{\"message\":\"a\\u001bb\"}}"), "a\\u{1b}b");
    }

    #[test]
    fn a_body_off_the_contract_is_an_error() {
        for bad in [&b"<html>"[..], b"{}", b"{\"data\":[{\"id\":\"x\"}]}", b"{\"data\":[{\"id\":1,\"status\":\"loaded\"}]}"] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(b"{\"object\":\"list\",\"data\":[]}").unwrap().is_empty());
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(br#"{"error":{"message":"model not found","type":"x"}}"#), "model not found");
        assert_eq!(error_message(b"  plain text\n"), "plain text");
        assert_eq!(error_message(b""), "(no message)");
        assert_eq!(error_message(&[b'x'; 1000]).len(), 200);
    }

    #[test]
    fn durations_and_sizes() {
        let d = [(0.0, "0s"), (12.5, "12s"), (59.99, "59s"), (60.0, "1m00s"), (287.5, "4m47s"), (3600.0, "1h00m"), (7500.0, "2h05m")];
        for (s, text) in d {
            assert_eq!(duration(s), text, "{s}");
        }
        assert_eq!(duration(100_000.0), "1d03h");
        assert_eq!(duration(-5.0), "0s");
        assert_eq!(duration(f64::MAX), format!("{}d{:02}h", u64::MAX / 86400, u64::MAX % 86400 / 3600));
        let b = [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (98_362_432, "98 MB"), (253_113_024, "253 MB"), (1_500_000_000, "1.5 GB"), (999_600_000, "1.0 GB")];
        for (n, text) in b {
            assert_eq!(bytes(n), text, "{n}");
        }
        assert_eq!(bytes(u64::MAX), "18447 PB");
    }
}
