//! Corrupt variants of the real model through `llama run` and `llama serve` start-up.
//! Every variant but the two weight-only damages must be refused by both commands with exit
//! code 3 (model file refused) and an `error:` line; those two leave a valid file, so `llama run`
//! must exit 0 and `llama serve` must become ready and answer a completion with 200. The
//! variants cover the header, the key/values, the tensor table, offsets, truncation, the
//! vocabulary and hyperparameters.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use llama_tests::{llama_cmd, model_path};

/// A hang guard, not a timing claim: only a start-up that never ends fails on it.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The variants whose damage leaves a valid file (only weight bytes change): they must run.
const STILL_VALID: [&str; 2] = ["weights zeroed", "weights noise"];

/// Where a key's type and value start.
fn kv(bytes: &[u8], key: &str) -> (usize, usize) {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat.as_slice()).unwrap_or_else(|| panic!("no key {key}")) + pat.len();
    (at, at + 4)
}

/// Where a tensor's table entry fields start: (n_dims, first dim, type, offset).
fn tensor(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat.as_slice()).unwrap_or_else(|| panic!("no tensor {name}")) + pat.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    (at, at + 4, ty, ty + 4)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

fn variants(data_offset: usize) -> Vec<(&'static str, Mutation)> {
    let v: Vec<(&'static str, Mutation)> = vec![
        // Header.
        ("magic", Box::new(|b| b[3] = b'X')),
        ("version 1", Box::new(|b| put_u32(b, 4, 1))),
        ("version 4", Box::new(|b| put_u32(b, 4, 4))),
        ("big-endian version", Box::new(|b| b[4..8].copy_from_slice(&3u32.to_be_bytes()))),
        ("tensor count huge", Box::new(|b| put_u64(b, 8, u64::MAX))),
        ("tensor count +1", Box::new(|b| {
            let n = u64::from_le_bytes(b[8..16].try_into().unwrap());
            put_u64(b, 8, n + 1)
        })),
        ("tensor count 0", Box::new(|b| put_u64(b, 8, 0))),
        ("kv count huge", Box::new(|b| put_u64(b, 16, u64::MAX / 3))),
        ("kv count +3", Box::new(|b| {
            let n = u64::from_le_bytes(b[16..24].try_into().unwrap());
            put_u64(b, 16, n + 3)
        })),
        ("kv count 0", Box::new(|b| put_u64(b, 16, 0))),
        // Key/values.
        ("first key length huge", Box::new(|b| put_u64(b, 24, u64::MAX - 7))),
        ("architecture type unknown", Box::new(|b| {
            let (t, _) = kv(b, "general.architecture");
            put_u32(b, t, 99)
        })),
        ("architecture string length huge", Box::new(|b| {
            let (_, v) = kv(b, "general.architecture");
            put_u64(b, v, 1 << 60)
        })),
        ("architecture unknown", Box::new(|b| {
            let (_, v) = kv(b, "general.architecture");
            b[v + 8] = b'x'
        })),
        ("alignment not a power of two", Box::new(|b| {
            // general.file_type and general.alignment have names of the same length.
            let (t, v) = kv(b, "general.file_type");
            b[t - 9..t].copy_from_slice(b"alignment");
            put_u32(b, v, 48)
        })),
        ("duplicate key", Box::new(|b| {
            // Two keys of the same length: the second is renamed to the first.
            let (t, _) = kv(b, "gemma3.attention.head_count");
            let len = "gemma3.attention.head_count".len();
            b[t - len..t].copy_from_slice(b"gemma3.attention.key_length");
        })),
        // Hyperparameters.
        ("block_count 0", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.block_count");
            put_u32(b, v, 0)
        })),
        ("block_count 100000", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.block_count");
            put_u32(b, v, 100_000)
        })),
        ("block_count as f32", Box::new(|b| {
            let (t, _) = kv(b, "gemma3.block_count");
            put_u32(b, t, 6)
        })),
        ("context_length 0", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.context_length");
            put_u32(b, v, 0)
        })),
        ("embedding_length 0", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.embedding_length");
            put_u32(b, v, 0)
        })),
        ("embedding_length 7", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.embedding_length");
            put_u32(b, v, 7)
        })),
        ("head_count 0", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.attention.head_count");
            put_u32(b, v, 0)
        })),
        ("head_count 1000", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.attention.head_count");
            put_u32(b, v, 1000)
        })),
        ("head_count_kv 0", Box::new(|b| {
            let (_, v) = kv(b, "gemma3.attention.head_count_kv");
            put_u32(b, v, 0)
        })),
        // Vocabulary.
        ("tokens element type u32", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.tokens");
            put_u32(b, v, 4)
        })),
        ("tokens count huge", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.tokens");
            put_u64(b, v + 4, u64::MAX / 2)
        })),
        ("scores count huge", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.scores");
            put_u64(b, v + 4, u64::MAX / 8)
        })),
        ("scores element type u8", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.scores");
            put_u32(b, v, 0);
        })),
        ("token_type element type u8", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.token_type");
            put_u32(b, v, 0);
        })),
        ("bos token id out of range", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.bos_token_id");
            put_u32(b, v, 10_000_000)
        })),
        ("eos token id = vocabulary size", Box::new(|b| {
            let (_, v) = kv(b, "tokenizer.ggml.eos_token_id");
            put_u32(b, v, 262_144)
        })),
        // Tensor table.
        ("tensor n_dims 5", Box::new(|b| {
            let (n, _, _, _) = tensor(b, "token_embd.weight");
            put_u32(b, n, 5)
        })),
        ("tensor n_dims 0", Box::new(|b| {
            let (n, _, _, _) = tensor(b, "token_embd.weight");
            put_u32(b, n, 0)
        })),
        ("tensor dimension 0", Box::new(|b| {
            let (_, d, _, _) = tensor(b, "token_embd.weight");
            put_u64(b, d, 0)
        })),
        ("tensor dimension huge", Box::new(|b| {
            let (_, d, _, _) = tensor(b, "token_embd.weight");
            put_u64(b, d, 1 << 62)
        })),
        ("tensor dimensions swapped", Box::new(|b| {
            let (_, d, _, _) = tensor(b, "token_embd.weight");
            let (x, y) = (b[d..d + 8].to_vec(), b[d + 8..d + 16].to_vec());
            b[d..d + 8].copy_from_slice(&y);
            b[d + 8..d + 16].copy_from_slice(&x);
        })),
        ("tensor type removed (q4_2)", Box::new(|b| {
            let (_, _, t, _) = tensor(b, "blk.0.attn_q.weight");
            put_u32(b, t, 4)
        })),
        ("tensor type unknown", Box::new(|b| {
            let (_, _, t, _) = tensor(b, "blk.0.attn_q.weight");
            put_u32(b, t, 200)
        })),
        ("tensor type changed to f32", Box::new(|b| {
            let (_, _, t, _) = tensor(b, "blk.0.attn_q.weight");
            put_u32(b, t, 0)
        })),
        ("tensor offset misaligned", Box::new(|b| {
            let (_, _, _, o) = tensor(b, "blk.0.attn_k.weight");
            let v = u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
            put_u64(b, o, v + 1)
        })),
        ("tensor offset past the end", Box::new(|b| {
            let (_, _, _, o) = tensor(b, "output_norm.weight");
            put_u64(b, o, 1 << 40)
        })),
        ("tensor name too long", Box::new(|b| {
            let (n, _, _, _) = tensor(b, "token_embd.weight");
            let len_at = n - "token_embd.weight".len() - 8;
            put_u64(b, len_at, 100)
        })),
        ("duplicate tensor name", Box::new(|b| {
            let (n, _, _, _) = tensor(b, "blk.1.attn_q.weight");
            let start = n - "blk.1.attn_q.weight".len();
            b[start..n].copy_from_slice(b"blk.0.attn_q.weight");
        })),
        ("missing tensor (renamed)", Box::new(|b| {
            let (n, _, _, _) = tensor(b, "blk.0.attn_q.weight");
            b[n - "weight".len() - 3] = b'z';
        })),
        // Truncation.
        ("truncated to 4 bytes", Box::new(|b| b.truncate(4))),
        ("truncated to 24 bytes", Box::new(|b| b.truncate(24))),
        ("truncated to 4 KiB", Box::new(|b| b.truncate(4096))),
        ("truncated inside the tensor table", Box::new(move |b| b.truncate(data_offset - 100))),
        ("truncated at the data", Box::new(move |b| b.truncate(data_offset))),
        ("truncated by half", Box::new(|b| {
            let n = b.len() / 2;
            b.truncate(n)
        })),
        ("last byte missing", Box::new(|b| {
            b.pop();
        })),
        // Weights: still a valid file.
        ("weights zeroed", Box::new(move |b| b[data_offset..data_offset + (1 << 20)].fill(0))),
        ("weights noise", Box::new(move |b| {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for byte in &mut b[data_offset + (1 << 20)..data_offset + (2 << 20)] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
        })),
    ];
    v
}

/// How a command ended: an exit code, or a signal (a crash).
fn describe(status: std::process::ExitStatus) -> Result<i32, String> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Ok(c),
        (None, Some(s)) => Err(format!("killed by signal {s}")),
        _ => Err("no exit status".into()),
    }
}

/// How `llama serve` start-up ended: "exit N" with its first `error:` line, or "served (CODE)"
/// once /health said ready and a completion was answered with CODE (then it is stopped).
fn serve_outcome(model: &Path) -> Result<(String, String), String> {
    let mut child = llama_cmd(&["serve", "-m", model.to_str().unwrap(), "--port", "0", "-t", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Either the address line comes, or stderr closes because serve exited.
    let addr = rx.recv_timeout(HANG_GUARD).ok();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let code = describe(status)?;
            let err = reader.join().unwrap();
            let first_error = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("").to_string();
            return if code == 0 { Err("serve exited 0 without serving".into()) } else { Ok((format!("exit {code}"), first_error)) };
        }
        if let Some(a) = &addr {
            if ureq::get(&format!("http://{a}/health")).call().is_ok_and(|r| r.status() == 200) {
                let (code, _) = match ureq::post(&format!("http://{a}/v1/completions")).send_json(serde_json::json!({"prompt": "Hi", "max_tokens": 2})) {
                    Ok(r) => (r.status(), ()),
                    Err(ureq::Error::Status(c, _)) => (c, ()),
                    Err(e) => return Err(format!("request failed: {e}")),
                };
                let _ = child.kill();
                let _ = child.wait();
                return Ok((format!("served ({code})"), String::new()));
            }
        }
        if t.elapsed() > HANG_GUARD {
            let _ = child.kill();
            return Err(format!("neither ready nor exited within the hang guard ({HANG_GUARD:?})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn corrupt_variants_of_the_real_model_end_with_typed_errors() {
    let original = std::fs::read(model_path()).unwrap();
    let header = llama_host::gguf::read(&model_path()).expect("the real model is valid");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("variant.gguf");
    let mut table = Vec::new();
    let mut failures = Vec::new();
    let vs = variants(header.data_offset as usize);
    assert_eq!(vs.len(), 54, "the variant count in docs/TEST_STRATEGY.md");
    for name in STILL_VALID {
        assert!(vs.iter().any(|(n, _)| *n == name), "no variant {name}");
    }
    for (name, mutate) in &vs {
        let mut b = original.clone();
        mutate(&mut b);
        std::fs::write(&path, &b).unwrap();
        drop(b);
        // llama run
        let o = llama_cmd(&["run", "-m", path.to_str().unwrap(), "-p", "Hello", "-n", "2", "-t", "2"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let first_error = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("").to_string();
        let run = match describe(o.status) {
            Err(e) => e,
            Ok(0) => "ran".to_string(),
            Ok(c) => format!("exit {c}"),
        };
        let (serve, serve_error) = match serve_outcome(&path) {
            Ok(outcome) => outcome,
            Err(e) => (e, String::new()),
        };
        let expected = if STILL_VALID.contains(name) {
            run == "ran" && serve == "served (200)"
        } else {
            run == "exit 3" && !first_error.is_empty() && serve == "exit 3" && !serve_error.is_empty()
        };
        let line = format!("{name:38} run: {run:7} serve: {serve:12} {}", first_error.replace(path.to_str().unwrap(), "F"));
        if !expected {
            let want = if STILL_VALID.contains(name) { "ran / served (200)" } else { "exit 3 with an error: line from both" };
            failures.push(format!("{line}\n  expected {want}; serve's error line: {serve_error:?}\n  run's stderr:\n{err}"));
        }
        table.push(line);
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{} of {} variants did not end as expected:\n{}", failures.len(), vs.len(), failures.join("\n"));
}
