//! A bounded reader for the GGUF header: the key/value metadata, read without llama.cpp
//! and without trusting any length in the file (every count and length is checked against
//! the bytes left before it is used). Used by `llama list` to describe model files.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A metadata value; arrays are summarised by type and length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { element_type: u32, len: u64 },
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
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

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: not a GGUF file")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version}")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: malformed header: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// The header of a GGUF file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufHeader {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata: BTreeMap<String, MetaValue>,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
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

struct Reader<R> {
    inner: R,
    left: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.left {
            return Err(format!("a length of {n} bytes runs past the end of the file ({} left)", self.left));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| e.to_string())?;
        self.left -= n;
        Ok(buf)
    }
    fn skip(&mut self, n: u64) -> Result<(), String> {
        if n > self.left {
            return Err(format!("a length of {n} bytes runs past the end of the file ({} left)", self.left));
        }
        self.inner.seek(SeekFrom::Current(n as i64)).map_err(|e| e.to_string())?;
        self.left -= n;
        Ok(())
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        Ok(String::from_utf8_lossy(&self.bytes(n)?).into_owned())
    }
    /// Fixed size of a scalar type, or None for string/array.
    fn scalar_size(t: u32) -> Result<Option<u64>, String> {
        Ok(match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            8 | 9 => None,
            _ => return Err(format!("unknown value type {t}")),
        })
    }
    fn value(&mut self, t: u32, depth: u32) -> Result<MetaValue, String> {
        let le = |b: Vec<u8>| -> [u8; 8] {
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(&b);
            a
        };
        Ok(match t {
            0 => MetaValue::UInt(self.bytes(1)?[0] as u64),
            1 => MetaValue::Int(self.bytes(1)?[0] as i8 as i64),
            2 => MetaValue::UInt(u16::from_le_bytes(self.bytes(2)?.try_into().expect("2")) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::UInt(self.u32()? as u64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => MetaValue::Bool(self.bytes(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(le(self.bytes(8)?))),
            9 => {
                if depth > 0 {
                    return Err("nested arrays are not supported".into());
                }
                let et = self.u32()?;
                let len = self.u64()?;
                match Self::scalar_size(et)? {
                    Some(size) => {
                        let total = len.checked_mul(size).ok_or("array size overflows")?;
                        self.skip(total)?;
                    }
                    None => {
                        // Each element takes at least 8 bytes (a string length or an array header).
                        if len > self.left / 8 {
                            return Err(format!("an array of {len} elements cannot fit in the {} bytes left", self.left));
                        }
                        for _ in 0..len {
                            if et == 8 {
                                let n = self.u64()?;
                                self.skip(n)?;
                            } else {
                                self.value(et, depth + 1)?;
                            }
                        }
                    }
                }
                MetaValue::Array { element_type: et, len }
            }
            _ => return Err(format!("unknown value type {t}")),
        })
    }
}

/// Reads the header and metadata of a GGUF file.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    let io = |source| GgufError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut r = Reader { inner: BufReader::new(file), left: len };
    let malformed = |what: String| GgufError::Malformed { path: path.to_path_buf(), what };
    let magic = r.bytes(4).map_err(|_| GgufError::BadMagic { path: path.to_path_buf() })?;
    if magic != b"GGUF" {
        return Err(GgufError::BadMagic { path: path.to_path_buf() });
    }
    let version = r.u32().map_err(malformed)?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version { path: path.to_path_buf(), version });
    }
    let tensor_count = r.u64().map_err(malformed)?;
    let kv_count = r.u64().map_err(malformed)?;
    // Each key/value takes at least 12 bytes (key length + type).
    if kv_count > r.left / 12 {
        return Err(malformed(format!("{kv_count} key/value pairs cannot fit in the file")));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string().map_err(|e| malformed(format!("key #{i}: {e}")))?;
        let t = r.u32().map_err(|e| malformed(format!("type of {key}: {e}")))?;
        let v = r.value(t, 0).map_err(|e| malformed(format!("value of {key}: {e}")))?;
        metadata.insert(key, v);
    }
    Ok(GgufHeader { version, tensor_count, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn file(kvs: &[(&str, u32, Vec<u8>)]) -> tempfile::NamedTempFile {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend_from_slice(&string(k));
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(v);
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b).unwrap();
        f
    }

    #[test]
    fn reads_architecture_and_quantization() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend(string("a"));
        arr.extend(string("bc"));
        let f = file(&[
            ("general.architecture", 8, string("gemma3")),
            ("general.file_type", 4, 15u32.to_le_bytes().to_vec()),
            ("tokenizer.ggml.tokens", 9, arr),
        ]);
        let h = read_header(f.path()).unwrap();
        assert_eq!(h.architecture(), Some("gemma3"));
        assert_eq!(h.quantization(), Some("Q4_K_M"));
        assert_eq!(h.get("tokenizer.ggml.tokens"), Some(&MetaValue::Array { element_type: 8, len: 2 }));
    }

    #[test]
    fn a_length_past_the_end_is_malformed_not_a_huge_allocation() {
        let mut v = (u64::MAX / 2).to_le_bytes().to_vec();
        v.extend_from_slice(b"abc");
        let f = file(&[("general.name", 8, v)]);
        assert!(matches!(read_header(f.path()), Err(GgufError::Malformed { .. })));
    }

    #[test]
    fn a_huge_array_count_is_malformed() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&u64::MAX.to_le_bytes());
        let f = file(&[("tokenizer.ggml.tokens", 9, arr)]);
        assert!(matches!(read_header(f.path()), Err(GgufError::Malformed { .. })));
    }

    #[test]
    fn not_gguf_is_bad_magic() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"hello world").unwrap();
        assert!(matches!(read_header(f.path()), Err(GgufError::BadMagic { .. })));
    }
}
