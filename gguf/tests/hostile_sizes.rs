//! Crafted files whose length fields are legal but large: the validator must cost about
//! what the file holds in memory (not tens of times that), and its error messages must stay
//! short whatever the file names (the server sends `GgufError::reason()` to clients).
//!
//! A counting global allocator measures the peak bytes one thread holds while it validates.
//! Counters are per thread, so tests running in parallel do not see each other's memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use llama_gguf::types;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // try_with: the allocator also runs while a thread's locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// GlobalAlloc contract; the bookkeeping beside it never allocates (const thread locals).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on as the contract requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from this allocator (so from System) with this layout.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: ptr came from System with this layout; the caller guarantees new_size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread held at any moment during
/// it, beyond what it held before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as u64)
}

fn string(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s);
}

/// A GGUF v3 file: key/values (already encoded values), then one f32 tensor per name with
/// `dims`, packed at the default alignment of 32, then its data.
fn gguf(kvs: &[(Vec<u8>, u32, Vec<u8>)], tensors: &[(Vec<u8>, Vec<u64>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, t, v) in kvs {
        string(&mut b, k);
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(v);
    }
    let mut offset = 0u64;
    for (name, dims) in tensors {
        string(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // ggml type 0: f32
        b.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + 4 * dims.iter().product::<u64>()).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.resize(b.len() + offset as usize, 0);
    b
}

fn kv_str(k: &[u8], v: &[u8]) -> (Vec<u8>, u32, Vec<u8>) {
    let mut e = Vec::new();
    string(&mut e, v);
    (k.to_vec(), types::STRING, e)
}

fn kv_u32(k: &str, v: u32) -> (Vec<u8>, u32, Vec<u8>) {
    (k.as_bytes().to_vec(), types::U32, v.to_le_bytes().to_vec())
}

/// A two-token vocabulary, so that token ids are checked.
fn tokens() -> (Vec<u8>, u32, Vec<u8>) {
    let mut v = types::STRING.to_le_bytes().to_vec();
    v.extend_from_slice(&2u64.to_le_bytes());
    string(&mut v, b"a");
    string(&mut v, b"b");
    (b"tokenizer.ggml.tokens".to_vec(), types::ARRAY, v)
}

/// The smallest model the validator accepts, plus `extra` key/values.
fn model(extra: Vec<(Vec<u8>, u32, Vec<u8>)>, tensor_name: &[u8]) -> Vec<u8> {
    let mut kvs = vec![kv_str(b"general.architecture", b"llama"), kv_u32("llama.block_count", 1)];
    kvs.extend(extra);
    gguf(&kvs, &[(tensor_name.to_vec(), vec![32])])
}

fn write_temp(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join("crafted.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Memory the validator may use beyond the file's own size: buffers, maps, the tensor table.
const SLACK: u64 = 4 << 20;

#[test]
fn many_short_u8_arrays_cost_about_their_size_in_memory() {
    // 6000 arrays of 4000 u8 (short enough that their values are kept): about 24 MB.
    let arrays = (0..6000u32)
        .map(|i| {
            let mut v = types::U8.to_le_bytes().to_vec();
            v.extend_from_slice(&4000u64.to_le_bytes());
            v.extend(std::iter::repeat_n(7u8, 4000));
            (format!("x.array.{i}").into_bytes(), types::ARRAY, v)
        })
        .collect();
    let bytes = model(arrays, b"token_embd.weight");
    let len = bytes.len() as u64;

    let (result, in_memory) = peak_during(|| llama_gguf::validate_bytes(&bytes).map(|f| f.metadata.len()));
    assert_eq!(result.expect("the crafted model is valid"), 6002);

    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), &bytes);
    drop(bytes);
    let (result, from_file) = peak_during(|| llama_gguf::validate(&path).map(|f| f.metadata.len()));
    assert_eq!(result.expect("the crafted model is valid"), 6002);

    println!("file {len} bytes: peak {in_memory} bytes validating in memory, {from_file} bytes from the file");
    for peak in [in_memory, from_file] {
        assert!(peak < 2 * len + SLACK, "validating a {len}-byte file held {peak} bytes at its peak");
    }
}

#[test]
fn a_24_mb_tensor_name_is_refused_without_being_read() {
    let name = vec![b'a'; 24 << 20];
    let bytes = model(vec![], &name);
    drop(name);
    let len = bytes.len() as u64;

    let (result, in_memory) = peak_during(|| llama_gguf::validate_bytes(&bytes).map(drop));
    let e = result.expect_err("a 24 MB tensor name is refused");
    assert!(e.field.ends_with("name"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), &bytes);
    drop(bytes);
    let (result, from_file) = peak_during(|| llama_gguf::validate(&path).map(drop));
    assert!(result.is_err());

    println!("file {len} bytes: peak {in_memory} bytes validating in memory, {from_file} bytes from the file");
    for peak in [in_memory, from_file] {
        assert!(peak < 2 * len + SLACK, "validating a {len}-byte file held {peak} bytes at its peak");
        // The name is refused by its length field: nothing close to its size is needed.
        assert!(peak < SLACK, "refusing a 24 MB name held {peak} bytes at its peak");
    }
}

/// Every way a 2 MiB name or value can reach an error message: the message quotes a short
/// prefix of it, both from `validate_bytes` and, path aside, from `validate` and `reason()`.
#[test]
fn a_2_mib_name_gives_a_short_error_message() {
    let huge = |c: u8| vec![c; 2 << 20];
    let long_key = [b"tokenizer.ggml.".to_vec(), vec![b'k'; 60_000], b"_token_id".to_vec()].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tensor name", model(vec![], &huge(b'n'))),
        // Escaping makes each control character several characters long in the message.
        ("tensor name of control characters", model(vec![], &huge(1))),
        ("duplicate 2 MiB key", model(vec![kv_u32("x", 0), (huge(b'k'), types::U32, vec![0; 4]), (huge(b'k'), types::U32, vec![0; 4])], b"t")),
        ("60 kB token id key", model(vec![tokens(), (long_key, types::U32, 99u32.to_le_bytes().to_vec())], b"t")),
        ("2 MiB architecture", gguf(&[kv_str(b"general.architecture", &huge(b'a')), kv_u32("x", 0)], &[(b"t".to_vec(), vec![32])])),
        ("2 MiB rope scaling type", model(vec![kv_str(b"llama.rope.scaling.type", &huge(b'r'))], b"t")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut long = Vec::new();
    for (what, bytes) in cases {
        // Not expect_err: the Ok value's Debug would print the 2 MiB name.
        let Err(p) = llama_gguf::validate_bytes(&bytes) else { panic!("{what}: accepted") };
        let path = write_temp(dir.path(), &bytes);
        let Err(e) = llama_gguf::validate(&path) else { panic!("{what}: accepted") };
        let shown = e.to_string();
        let without_path = shown.len() - path.as_os_str().len();
        let sizes = [p.to_string().len(), e.reason().len(), without_path];
        println!("{what}: problem {} bytes, reason() {} bytes, error {} bytes besides the path", sizes[0], sizes[1], sizes[2]);
        if sizes.iter().any(|&n| n >= 512) {
            long.push(what);
        }
    }
    assert!(long.is_empty(), "error messages of 512 bytes or more for: {long:?}");
}
