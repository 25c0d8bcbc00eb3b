//! A bounded reader and validator for GGUF model files, run before llama.cpp sees a file.
//!
//! llama.cpp trusts much of a GGUF file: some malformed values make it abort the whole
//! process (a failed `GGML_ASSERT`) or read past an array. This crate reads the header, the
//! key/value metadata and the tensor table, never the weights, and checks everything against
//! the bytes actually in the file: every count and length is bounded by what is left before
//! it is used, sizes are overflow-checked, offsets must lie inside the file and be aligned.
//! [`validate`] then checks the model-level values llama.cpp asserts on (layer count, expert
//! counts, head counts, rope scaling, vocabulary arrays and special token ids).
//!
//! A rejected file gets a [`GgufError`] naming the field and its value. A multi-gigabyte
//! model is checked in milliseconds: only the header and tensor table are read.
//!
//! Memory stays about what the metadata occupies in the file: no length is allocated
//! before it is checked against the bytes left and a cap, short scalar arrays keep their
//! bytes as stored, and error messages quote at most a short prefix of any name or string.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// GGUF value types.
pub mod types {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// llama.cpp's limits, from llama-hparams.h, ggml.h and gguf.h.
pub mod limits {
    pub const MAX_LAYERS: u64 = 512;
    pub const MAX_EXPERTS: u64 = 1024;
    /// A tensor name holds at most this many bytes including its terminating NUL.
    pub const MAX_NAME: usize = 64;
    pub const MAX_DIMS: u32 = 4;
    pub const DEFAULT_ALIGNMENT: u64 = 32;
    /// Scalar arrays up to this length keep their values (per-layer hyperparameters).
    pub const KEEP_ARRAY_VALUES: u64 = 4096;
    /// The GGUF specification's limit on a key's length.
    pub const MAX_KEY: u64 = 65535;
    /// llama.cpp's `GGUF_MAX_STRING_LENGTH` and `GGUF_MAX_ARRAY_ELEMENTS`.
    pub const MAX_STRING: u64 = 1 << 30;
    pub const MAX_ARRAY_LEN: u64 = 1 << 30;
    /// Far above any real model (tens of keys, a few thousand tensors), low enough that
    /// the per-entry bookkeeping of a file made of tiny entries stays a few megabytes.
    pub const MAX_KEYS: u64 = 1 << 16;
    pub const MAX_TENSORS: u64 = 1 << 16;
    /// llama.cpp's architecture names are short identifiers; a longer one names none.
    pub const MAX_ARCHITECTURE: usize = 64;
    /// Bytes of a name or string quoted in an error message (escaped, so a control
    /// character counts as the several it is shown as).
    pub const SHOWN_BYTES: usize = 64;
}

/// A name or string from the file as an error message quotes it: escaped, and cut to
/// [`limits::SHOWN_BYTES`] bytes with its full length, so that a crafted 2 MiB name
/// cannot make a 2 MiB message (which the server would send to clients).
struct Shown<'a> {
    text: &'a str,
    /// The length of what `text` is a prefix of.
    full_len: u64,
}

fn shown(text: &str) -> Shown<'_> {
    Shown { text, full_len: text.len() as u64 }
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut chars = self.text.escape_debug().peekable();
        let mut written = 0;
        while let Some(&c) = chars.peek() {
            written += c.len_utf8();
            if written > limits::SHOWN_BYTES {
                break;
            }
            f.write_char(c)?;
            chars.next();
        }
        if chars.peek().is_some() || self.full_len > self.text.len() as u64 {
            write!(f, "…({} bytes)", self.full_len)?;
        }
        Ok(())
    }
}

/// Fixed size of a scalar type; None for string, array and unknown types.
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        types::U8 | types::I8 | types::BOOL => Some(1),
        types::U16 | types::I16 => Some(2),
        types::U32 | types::I32 | types::F32 => Some(4),
        types::U64 | types::I64 | types::F64 => Some(8),
        _ => None,
    }
}

/// One little-endian scalar of type `t` from its `scalar_size(t)` bytes.
fn decode_scalar(t: u32, bytes: &[u8]) -> MetaValue {
    let mut wide = [0u8; 8];
    let n = bytes.len().min(8);
    wide[..n].copy_from_slice(&bytes[..n]);
    let v = u64::from_le_bytes(wide);
    match t {
        types::I8 => MetaValue::Int(v as u8 as i8 as i64),
        types::I16 => MetaValue::Int(v as u16 as i16 as i64),
        types::I32 => MetaValue::Int(v as u32 as i32 as i64),
        types::I64 => MetaValue::Int(v as i64),
        types::F32 => MetaValue::Float(f32::from_bits(v as u32) as f64),
        types::F64 => MetaValue::Float(f64::from_bits(v)),
        types::BOOL => MetaValue::Bool(v != 0),
        // U8, U16, U32, U64 (only scalar types reach here).
        _ => MetaValue::UInt(v),
    }
}

/// The values of a short scalar array, kept as the file stores them (little-endian, one
/// element after another): a u8 array costs a byte per element, not a [`MetaValue`] (40).
/// Empty for arrays whose values are not kept (long ones, strings).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scalars {
    element_type: u32,
    raw: Vec<u8>,
}

impl Scalars {
    /// Values of `element_type` (a scalar type) from their little-endian bytes; None when
    /// the type is not a scalar or the bytes are not a whole number of elements.
    pub fn from_le_bytes(element_type: u32, raw: Vec<u8>) -> Option<Scalars> {
        let size = scalar_size(element_type)? as usize;
        // Not is_multiple_of: the workspace declares Rust 1.85.
        raw.chunks_exact(size).remainder().is_empty().then_some(Scalars { element_type, raw })
    }

    fn element_size(&self) -> usize {
        scalar_size(self.element_type).unwrap_or(1) as usize
    }

    pub fn len(&self) -> usize {
        self.raw.len() / self.element_size()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<MetaValue> {
        let size = self.element_size();
        let at = i.checked_mul(size)?;
        self.raw.get(at..at.checked_add(size)?).map(|b| decode_scalar(self.element_type, b))
    }

    /// The values, decoded one at a time.
    pub fn iter(&self) -> impl Iterator<Item = MetaValue> + '_ {
        self.raw.chunks_exact(self.element_size()).map(|b| decode_scalar(self.element_type, b))
    }
}

/// A metadata value. Arrays keep their element type and length, and their values when
/// they are short scalar arrays (per-layer hyperparameters); long ones are skipped.
/// Strings are kept whole (chat templates); they cost what they occupy in the file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array {
        element_type: u32,
        len: u64,
        #[serde(skip)]
        values: Scalars,
    },
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::Int(v) => Some(v),
            MetaValue::UInt(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaValue::Int(v) => write!(f, "{v}"),
            MetaValue::UInt(v) => write!(f, "{v}"),
            MetaValue::Float(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::Str(s) => write!(f, "\"{}\"", shown(s)),
            MetaValue::Array { element_type, len, .. } => write!(f, "[{} x {len}]", type_name(*element_type)),
        }
    }
}

/// The name of a GGUF value type.
pub fn type_name(t: u32) -> &'static str {
    match t {
        types::U8 => "u8",
        types::I8 => "i8",
        types::U16 => "u16",
        types::I16 => "i16",
        types::U32 => "u32",
        types::I32 => "i32",
        types::F32 => "f32",
        types::BOOL => "bool",
        types::STRING => "string",
        types::ARRAY => "array",
        types::U64 => "u64",
        types::I64 => "i64",
        types::F64 => "f64",
        _ => "unknown",
    }
}

/// What is wrong, without the file's path: a field and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Problem {
    pub field: String,
    pub problem: String,
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> Problem {
    // Callers quote file contents through `Shown`; this is the backstop that keeps every
    // message short whatever a future caller formats into it.
    Problem { field: clip(field.into(), 128), problem: clip(problem.into(), 256) }
}

/// `s` cut to at most `max` bytes (on a character boundary), marked with an ellipsis.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Bytes from the file as a string. Invalid UTF-8 becomes '?' byte for byte, in place:
/// U+FFFD (three bytes) would let a string of invalid bytes triple in memory.
fn into_string(bytes: Vec<u8>) -> String {
    let mut bytes = match String::from_utf8(bytes) {
        Ok(s) => return s,
        Err(e) => e.into_bytes(),
    };
    let mut from = 0;
    while let Err(e) = std::str::from_utf8(&bytes[from..]) {
        let bad = from + e.valid_up_to();
        let end = e.error_len().map_or(bytes.len(), |n| bad + n);
        bytes[bad..end].fill(b'?');
        from = end;
    }
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: not a GGUF file")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: invalid model file: {problem}")]
    Invalid { path: PathBuf, problem: Problem },
}

impl GgufError {
    /// The message without the file's path, for places that must not reveal paths.
    pub fn reason(&self) -> String {
        match self {
            GgufError::Io { source, .. } => format!("cannot read the model file: {source}"),
            GgufError::BadMagic { .. } => "not a GGUF file".into(),
            GgufError::Version { version, .. } => format!("unsupported GGUF version {version}"),
            GgufError::Invalid { problem, .. } => format!("invalid model file: {problem}"),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

/// The header, metadata and tensor table of a GGUF file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufFile {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    /// The GGUF type each key was stored with (llama.cpp reads most keys at one type).
    #[serde(skip)]
    pub value_types: BTreeMap<String, u32>,
    #[serde(skip)]
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data starts in the file.
    pub data_offset: u64,
    pub file_len: u64,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }

    /// The number of weights: the elements of every tensor (what Ollama shows as "268M").
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))).fold(0u64, u64::saturating_add)
    }

    /// A per-architecture key (`{arch}.{suffix}`), e.g. `context_length`.
    pub fn arch_key(&self, suffix: &str) -> Option<&MetaValue> {
        self.get(&format!("{}.{suffix}", self.architecture()?))
    }

    /// The quantization as llama.cpp names it (`Q4_K_M`), from `general.file_type`.
    pub fn quantization(&self) -> Option<&'static str> {
        self.get("general.file_type").and_then(MetaValue::as_u64).and_then(file_type_name)
    }
}

/// llama.cpp's `llama_ftype` names.
pub fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// ggml tensor types a GGUF file may hold: (id, name, elements per block, bytes per block).
/// Ids missing here were removed from ggml (a file using them is refused). A test in the
/// backend crate checks this table against the linked ggml.
pub const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
];

fn ggml_type(t: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES.iter().find(|e| e.0 == t).map(|e| (e.1, e.2, e.3))
}

/// A reader that knows its position and how many bytes are left, and refuses any length
/// that runs past the end before allocating or seeking.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

type Res<T> = Result<T, Problem>;

impl<R: Read + Seek> Reader<R> {
    fn left(&self) -> u64 {
        self.len - self.pos
    }
    fn need(&self, n: u64, field: &str) -> Res<()> {
        if n > self.left() {
            return Err(problem(field, format!("{n} bytes run past the end of the file ({} left at offset {})", self.left(), self.pos)));
        }
        Ok(())
    }
    fn fill(&mut self, buf: &mut [u8], field: &str) -> Res<()> {
        self.need(buf.len() as u64, field)?;
        self.inner.read_exact(buf).map_err(|e| problem(field, format!("read failed: {e}")))?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    /// `n` bytes; callers bound `n` by a cap first, `need` bounds it by the file.
    fn bytes(&mut self, n: u64, field: &str) -> Res<Vec<u8>> {
        self.need(n, field)?;
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf, field)?;
        Ok(buf)
    }
    fn array<const N: usize>(&mut self, field: &str) -> Res<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, field)?;
        Ok(buf)
    }
    fn skip(&mut self, n: u64, field: &str) -> Res<()> {
        self.need(n, field)?;
        // Short skips (the strings of a 256k-token vocabulary) read through the buffer: a
        // seek would throw the buffer away and cost a system call each.
        if n <= 4096 {
            let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink()).map_err(|e| problem(field, format!("read failed: {e}")))?;
            if copied != n {
                return Err(problem(field, "the file ended early"));
            }
        } else {
            self.inner.seek(SeekFrom::Current(n as i64)).map_err(|e| problem(field, format!("seek failed: {e}")))?;
        }
        self.pos += n;
        Ok(())
    }
    fn u32(&mut self, field: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// A string's length, checked against what is left and against `max`, nothing read.
    fn string_len(&mut self, field: &str, max: u64) -> Res<u64> {
        let n = self.u64(field)?;
        self.need(n, field)?;
        if n > max {
            return Err(problem(field, format!("a string of {n} bytes, at most {max} allowed")));
        }
        Ok(n)
    }
    fn string(&mut self, field: &str, max: u64) -> Res<String> {
        let n = self.string_len(field, max)?;
        Ok(into_string(self.bytes(n, field)?))
    }

    fn value(&mut self, t: u32, field: &str) -> Res<MetaValue> {
        match t {
            types::STRING => Ok(MetaValue::Str(self.string(field, limits::MAX_STRING)?)),
            types::ARRAY => self.array_value(field),
            _ => {
                let size = scalar_size(t).ok_or_else(|| problem(field, format!("unknown value type {t}")))?;
                let mut buf = [0u8; 8];
                self.fill(&mut buf[..size as usize], field)?;
                Ok(decode_scalar(t, &buf[..size as usize]))
            }
        }
    }

    fn array_value(&mut self, field: &str) -> Res<MetaValue> {
        let et = self.u32(field)?;
        let len = self.u64(field)?;
        if et == types::ARRAY {
            return Err(problem(field, "nested arrays are not supported"));
        }
        if len > limits::MAX_ARRAY_LEN {
            return Err(problem(field, format!("an array of {len} elements, at most {} allowed", limits::MAX_ARRAY_LEN)));
        }
        let mut values = Scalars { element_type: et, raw: Vec::new() };
        if et == types::STRING {
            // Each string takes at least its 8-byte length.
            if len > self.left() / 8 {
                return Err(problem(field, format!("an array of {len} strings cannot fit in the {} bytes left", self.left())));
            }
            for _ in 0..len {
                let n = self.string_len(field, limits::MAX_STRING)?;
                self.skip(n, field)?;
            }
        } else {
            let size = scalar_size(et).ok_or_else(|| problem(field, format!("unknown value type {et}")))?;
            // At most 2^30 elements of at most 8 bytes: no overflow.
            let total = len * size;
            self.need(total, field)?;
            if len <= limits::KEEP_ARRAY_VALUES {
                values.raw = self.bytes(total, field)?;
            } else {
                self.skip(total, field)?;
            }
        }
        Ok(MetaValue::Array { element_type: et, len, values })
    }

    /// A tensor name: llama.cpp allows fewer than [`limits::MAX_NAME`] bytes. A longer one
    /// is refused from its length field, quoting only the start of it.
    fn tensor_name(&mut self, i: u64) -> Res<String> {
        let field = format!("tensor #{i} name");
        let n = self.u64(&field)?;
        self.need(n, &field)?;
        if n >= limits::MAX_NAME as u64 {
            let start = into_string(self.bytes(n.min(limits::SHOWN_BYTES as u64), &field)?);
            let name = Shown { text: &start, full_len: n };
            return Err(problem(format!("tensor '{name}' name"), format!("is {n} bytes, at most {} allowed", limits::MAX_NAME - 1)));
        }
        Ok(into_string(self.bytes(n, &field)?))
    }
}

fn align_up(v: u64, alignment: u64) -> Option<u64> {
    v.checked_add(alignment - 1).map(|x| x / alignment * alignment)
}

/// Reads and checks the structure of a GGUF file: header, metadata, tensor table, offsets.
fn parse_from<R: Read + Seek>(inner: R, len: u64) -> Result<GgufFile, ParseError> {
    let mut r = Reader { inner, pos: 0, len };
    let magic = r.array::<4>("magic").map_err(|_| ParseError::BadMagic)?;
    if &magic != b"GGUF" {
        return Err(ParseError::BadMagic);
    }
    let version = r.u32("version")?;
    if version.swap_bytes() == 3 || version.swap_bytes() == 2 {
        return Err(problem("version", format!("{version:#x} is a big-endian GGUF file; only little-endian files are supported")).into());
    }
    if !(2..=3).contains(&version) {
        return Err(ParseError::Version(version));
    }
    let tensor_count = r.u64("tensor_count")?;
    let kv_count = r.u64("kv_count")?;
    // A key/value takes at least 12 bytes (key length + type), a tensor entry at least 32.
    if kv_count > r.left() / 12 {
        return Err(problem("kv_count", format!("{kv_count} key/value pairs cannot fit in the file")).into());
    }
    if kv_count > limits::MAX_KEYS {
        return Err(problem("kv_count", format!("{kv_count} key/value pairs, at most {} allowed", limits::MAX_KEYS)).into());
    }
    if tensor_count > limits::MAX_TENSORS {
        return Err(problem("tensor_count", format!("{tensor_count} tensors, at most {} allowed", limits::MAX_TENSORS)).into());
    }
    let mut metadata = BTreeMap::new();
    let mut value_types = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("key #{i}"), limits::MAX_KEY)?;
        // Names go into messages: escaped, and only their start.
        let field = shown(&key).to_string();
        let t = r.u32(&field)?;
        let v = r.value(t, &field)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(problem(field, "the key appears twice").into());
        }
        value_types.insert(key, t);
    }
    let alignment = match metadata.get("general.alignment") {
        None => limits::DEFAULT_ALIGNMENT,
        // llama.cpp reads it as a u32 and aborts on any other type.
        Some(v) if value_types["general.alignment"] != types::U32 => {
            return Err(problem("general.alignment", format!("{v} is a {}, must be a u32", type_name(value_types["general.alignment"]))).into())
        }
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(problem("general.alignment", format!("{v} is not a power of two")).into()),
        },
    };
    if tensor_count > r.left() / 32 {
        return Err(problem("tensor_count", format!("{tensor_count} tensors cannot fit in the file")).into());
    }
    // Grown as entries are read, not sized from the count: an entry takes 72 bytes here
    // and can take as few as 32 in the file.
    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    let mut expected_offset = 0u64;
    for i in 0..tensor_count {
        let name = r.tensor_name(i)?;
        let field = |what: &str| format!("tensor '{}' {what}", shown(&name));
        if !names.insert(name.clone()) {
            return Err(problem(field("name"), "appears twice").into());
        }
        let n_dims = r.u32(&field("n_dims"))?;
        if n_dims == 0 || n_dims > limits::MAX_DIMS {
            return Err(problem(field("n_dims"), format!("{n_dims} is outside 1..={}", limits::MAX_DIMS)).into());
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for d in 0..n_dims {
            let ne = r.u64(&field("dims"))?;
            // ggml stores dimensions as int64 and needs every one at least 1.
            if ne == 0 || ne > i64::MAX as u64 {
                return Err(problem(field(&format!("dimension {d}")), format!("{} is out of range", ne as i64)).into());
            }
            elements = elements
                .checked_mul(ne)
                .filter(|&e| e <= i64::MAX as u64)
                .ok_or_else(|| problem(field("dims"), format!("{dims:?} x {ne} elements overflow")))?;
            dims.push(ne);
        }
        let ggml_type_id = r.u32(&field("type"))?;
        let Some((type_name, block, block_bytes)) = ggml_type(ggml_type_id) else {
            return Err(problem(field("type"), format!("{ggml_type_id} is not a tensor type this llama.cpp supports")).into());
        };
        if dims[0] % block != 0 {
            return Err(problem(field("dimension 0"), format!("{} is not a multiple of the {type_name} block size {block}", dims[0])).into());
        }
        let n_bytes = (elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| problem(field("size"), "the byte size overflows"))?;
        let offset = r.u64(&field("offset"))?;
        // llama.cpp requires the tensors packed in table order, each padded to the alignment.
        if offset != expected_offset {
            return Err(problem(field("offset"), format!("{offset}, expected {expected_offset} (tensors are stored in order, aligned to {alignment})")).into());
        }
        expected_offset = align_up(offset.checked_add(n_bytes).ok_or_else(|| problem(field("offset"), "overflows"))?, alignment)
            .ok_or_else(|| problem(field("offset"), "overflows"))?;
        tensors.push(TensorInfo { name, dims, ggml_type: ggml_type_id, offset, n_bytes });
    }
    let data_offset = align_up(r.pos, alignment).ok_or_else(|| problem("data offset", "overflows"))?;
    for t in &tensors {
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= len => {}
            _ => {
                return Err(problem(
                    format!("tensor '{}' data", shown(&t.name)),
                    format!("bytes {}..{} lie past the end of the file ({len} bytes)", data_offset.saturating_add(t.offset), end.unwrap_or(u64::MAX)),
                )
                .into())
            }
        }
    }
    Ok(GgufFile { version, tensor_count, metadata, value_types, tensors, alignment, data_offset, file_len: len })
}

enum ParseError {
    BadMagic,
    Version(u32),
    Invalid(Problem),
}

impl From<Problem> for ParseError {
    fn from(p: Problem) -> Self {
        ParseError::Invalid(p)
    }
}

fn with_path(path: &Path, e: ParseError) -> GgufError {
    let path = path.to_path_buf();
    match e {
        ParseError::BadMagic => GgufError::BadMagic { path },
        ParseError::Version(version) => GgufError::Version { path, version },
        ParseError::Invalid(problem) => GgufError::Invalid { path, problem },
    }
}

/// Reads a GGUF file's header, metadata and tensor table, checking its structure.
pub fn read(path: &Path) -> Result<GgufFile, GgufError> {
    let io = |source| GgufError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    parse_from(BufReader::with_capacity(1 << 16, file), len).map_err(|e| with_path(path, e))
}

/// Reads and fully checks a model file: structure, then the model-level values.
pub fn validate(path: &Path) -> Result<GgufFile, GgufError> {
    let f = read(path)?;
    check_model(&f).map_err(|problem| GgufError::Invalid { path: path.to_path_buf(), problem })?;
    Ok(f)
}

/// [`validate`] over bytes in memory (the fuzz target's entry point).
pub fn validate_bytes(bytes: &[u8]) -> Result<GgufFile, Problem> {
    let f = parse_from(std::io::Cursor::new(bytes), bytes.len() as u64).map_err(|e| match e {
        ParseError::BadMagic => problem("magic", "not a GGUF file"),
        ParseError::Version(v) => problem("version", format!("unsupported version {v}")),
        ParseError::Invalid(p) => p,
    })?;
    check_model(&f)?;
    Ok(f)
}

/// Checks the values llama.cpp asserts on or trusts when it loads a model.
pub fn check_model(f: &GgufFile) -> Result<(), Problem> {
    let arch = match f.get("general.architecture") {
        // Its name prefixes the keys named in messages below.
        Some(MetaValue::Str(a)) if a.len() > limits::MAX_ARCHITECTURE => {
            return Err(problem("general.architecture", format!("\"{}\" is not an architecture name", shown(a))))
        }
        Some(MetaValue::Str(a)) => a.clone(),
        Some(v) => return Err(problem("general.architecture", format!("{v} is not a string"))),
        None => return Err(problem("general.architecture", "missing")),
    };
    let key = |k: &str| format!("{arch}.{k}");
    // An integer key: must be an integer when present.
    let int = |k: &str| -> Res<Option<u64>> {
        match f.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| problem(k, format!("{v} is not a non-negative integer"))),
        }
    };
    // A per-layer key: one integer, or an array of at most `n_layer` integers; returns the largest.
    let per_layer = |k: &str, n_layer: u64| -> Res<Option<u64>> {
        match f.get(k) {
            None => Ok(None),
            Some(MetaValue::Array { len, values, element_type }) => {
                if *len > n_layer {
                    return Err(problem(k, format!("an array of {len} values for {n_layer} layers")));
                }
                let mut max = 0;
                for v in values.iter() {
                    max = max.max(v.as_u64().ok_or_else(|| problem(k, format!("holds {v}, not a non-negative integer ({})", type_name(*element_type))))?);
                }
                Ok(Some(max))
            }
            Some(v) => v.as_u64().map(Some).ok_or_else(|| problem(k, format!("{v} is not a non-negative integer"))),
        }
    };

    // Split files: llama.cpp reads these at fixed types and aborts on any other.
    for (k, t) in [("split.no", types::U16), ("split.count", types::U16), ("split.tensors.count", types::I32)] {
        if let Some(&found) = f.value_types.get(k) {
            if found != t {
                return Err(problem(k, format!("is a {}, must be a {}", type_name(found), type_name(t))));
            }
        }
    }

    // Vocabulary (also in vocab-only files).
    check_vocab(f, &arch)?;

    // CLIP projector files have no language-model hyperparameters.
    if arch == "clip" {
        return Ok(());
    }
    let n_layer = int(&key("block_count"))?.ok_or_else(|| problem(key("block_count"), "missing"))?;
    if n_layer == 0 || n_layer > limits::MAX_LAYERS {
        return Err(problem(key("block_count"), format!("{n_layer} is outside 1..={}", limits::MAX_LAYERS)));
    }
    match int(&key("context_length"))? {
        Some(0) => return Err(problem(key("context_length"), "0 is not a context length")),
        Some(n) if n > u32::MAX as u64 => return Err(problem(key("context_length"), format!("{n} is out of range"))),
        _ => {}
    }
    match int(&key("embedding_length"))? {
        Some(0) => return Err(problem(key("embedding_length"), "0 is not an embedding size")),
        Some(n) if n > u32::MAX as u64 => return Err(problem(key("embedding_length"), format!("{n} is out of range"))),
        _ => {}
    }
    if let Some(n) = int(&key("nextn_predict_layers"))? {
        if n > n_layer {
            return Err(problem(key("nextn_predict_layers"), format!("{n} is more than the {n_layer} layers")));
        }
    }
    let n_expert = int(&key("expert_count"))?.unwrap_or(0);
    let n_used = per_layer(&key("expert_used_count"), n_layer)?.unwrap_or(0);
    let n_groups = int(&key("expert_group_count"))?.unwrap_or(0);
    let n_group_used = int(&key("expert_group_used_count"))?.unwrap_or(0);
    if n_expert > limits::MAX_EXPERTS {
        return Err(problem(key("expert_count"), format!("{n_expert} is more than {}", limits::MAX_EXPERTS)));
    }
    if n_used > n_expert {
        return Err(problem(key("expert_used_count"), format!("{n_used} is more than the {n_expert} experts")));
    }
    if n_expert > 0 {
        if n_used == 0 {
            return Err(problem(key("expert_used_count"), format!("0 with {n_expert} experts")));
        }
        if n_groups >= n_expert {
            return Err(problem(key("expert_group_count"), format!("{n_groups} is not less than the {n_expert} experts")));
        }
        if n_groups > 1 && (n_expert % n_groups != 0 || n_group_used == 0 || n_group_used >= n_groups) {
            return Err(problem(key("expert_group_used_count"), format!("{n_group_used} with {n_groups} groups of {n_expert} experts")));
        }
    } else if n_groups != 0 {
        return Err(problem(key("expert_group_count"), format!("{n_groups} without experts")));
    }
    for k in ["feed_forward_length", "attention.head_count", "attention.head_count_kv"] {
        if let Some(n) = per_layer(&key(k), n_layer)? {
            if n > u32::MAX as u64 {
                return Err(problem(key(k), format!("{n} is out of range")));
            }
        }
    }
    if let Some(v) = f.get(&key("rope.scaling.type")) {
        // llama.cpp asserts on any other value.
        if !matches!(v.as_str(), Some("none" | "linear" | "yarn" | "longrope")) {
            return Err(problem(key("rope.scaling.type"), format!("{v} is not one of none, linear, yarn, longrope")));
        }
    }
    Ok(())
}

fn check_vocab(f: &GgufFile, arch: &str) -> Result<(), Problem> {
    let tokens = match f.get("tokenizer.ggml.tokens") {
        None => None,
        Some(MetaValue::Array { element_type: types::STRING, len, .. }) => Some(*len),
        Some(v) => return Err(problem("tokenizer.ggml.tokens", format!("{v} is not an array of strings"))),
    };
    let Some(n_vocab) = tokens else {
        return Ok(());
    };
    if n_vocab == 0 || n_vocab > i32::MAX as u64 {
        return Err(problem("tokenizer.ggml.tokens", format!("{n_vocab} tokens is out of range")));
    }
    // llama.cpp indexes these arrays by token id, trusting their element type.
    for (k, allowed) in [("tokenizer.ggml.scores", &[types::F32, types::I32][..]), ("tokenizer.ggml.token_type", &[types::I32][..])] {
        match f.get(k) {
            None => {}
            Some(MetaValue::Array { element_type, len, .. }) if allowed.contains(element_type) && *len < n_vocab => {
                return Err(problem(k, format!("{len} entries for {n_vocab} tokens")));
            }
            Some(MetaValue::Array { element_type, .. }) if allowed.contains(element_type) => {}
            Some(v) => return Err(problem(k, format!("{v} is not an array of {}", allowed.iter().map(|t| type_name(*t)).collect::<Vec<_>>().join(" or ")))),
        }
    }
    if let Some(MetaValue::Array { element_type, .. }) = f.get("tokenizer.ggml.merges") {
        if *element_type != types::STRING {
            return Err(problem("tokenizer.ggml.merges", format!("an array of {}, must be strings", type_name(*element_type))));
        }
    }
    if let Some(v) = f.get(&format!("{arch}.vocab_size")) {
        if v.as_u64() != Some(n_vocab) {
            return Err(problem(format!("{arch}.vocab_size"), format!("{v}, but the vocabulary holds {n_vocab} tokens")));
        }
    }
    for (k, v) in f.metadata.range("tokenizer.ggml.".to_string()..) {
        if !k.starts_with("tokenizer.ggml.") {
            break;
        }
        if !k.ends_with("_token_id") {
            continue;
        }
        // -1 (as a signed value) means "none"; anything else must name a token.
        match v.as_i64() {
            // -1 stored signed, or as a u32.
            Some(-1) | Some(0xFFFF_FFFF) => {}
            Some(id) if (0..n_vocab as i64).contains(&id) => {}
            _ => return Err(problem(shown(k).to_string(), format!("{v} is not a token id (the vocabulary holds {n_vocab} tokens)"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
