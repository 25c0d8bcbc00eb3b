//! Handcrafted files: a small valid model, then one defect at a time, each refused with
//! the field it names.

use super::*;

/// Builds GGUF bytes: metadata, then tensors laid out in order at the default alignment.
pub(crate) struct Builder {
    pub kvs: Vec<(String, u32, Vec<u8>)>,
    pub tensors: Vec<(String, Vec<u64>, u32)>,
    pub version: u32,
}

pub(crate) fn s(v: &str) -> Vec<u8> {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(v.as_bytes());
    b
}

pub(crate) fn u32v(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub(crate) fn arr(et: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut b = et.to_le_bytes().to_vec();
    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        b.extend_from_slice(i);
    }
    b
}

impl Builder {
    /// A tiny but complete "llama" model: 2 layers, 4 tokens, one f32 tensor.
    pub fn model() -> Builder {
        let toks: Vec<Vec<u8>> = ["<s>", "</s>", "a", "b"].iter().map(|t| s(t)).collect();
        let scores: Vec<Vec<u8>> = (0..4).map(|i| (i as f32).to_le_bytes().to_vec()).collect();
        let kvs = vec![
            ("general.architecture".into(), types::STRING, s("llama")),
            ("llama.block_count".into(), types::U32, u32v(2)),
            ("llama.context_length".into(), types::U32, u32v(128)),
            ("llama.embedding_length".into(), types::U32, u32v(32)),
            ("llama.attention.head_count".into(), types::U32, u32v(4)),
            ("tokenizer.ggml.model".into(), types::STRING, s("llama")),
            ("tokenizer.ggml.tokens".into(), types::ARRAY, arr(types::STRING, &toks)),
            ("tokenizer.ggml.scores".into(), types::ARRAY, arr(types::F32, &scores)),
            ("tokenizer.ggml.bos_token_id".into(), types::U32, u32v(0)),
        ];
        Builder { kvs, tensors: vec![("token_embd.weight".into(), vec![32, 4], 0), ("output_norm.weight".into(), vec![32], 0)], version: 3 }
    }

    pub fn set(mut self, key: &str, t: u32, v: Vec<u8>) -> Builder {
        self.kvs.retain(|kv| kv.0 != key);
        self.kvs.push((key.into(), t, v));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kvs {
            b.extend_from_slice(&s(k));
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims, t) in &self.tensors {
            b.extend_from_slice(&s(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            // Absurd shapes get no data: the table is what is under test.
            let size = dims.iter().try_fold(4u64, |a, d| a.checked_mul(*d)).filter(|&n| n < 1 << 20).unwrap_or(0);
            sizes.push(size);
            offset = (offset + size).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.resize(b.len() + offset as usize, 0);
        b
    }
}

fn field_of(bytes: &[u8]) -> String {
    match validate_bytes(bytes) {
        Ok(_) => panic!("accepted"),
        Err(p) => p.field,
    }
}

#[test]
fn the_handcrafted_model_is_valid() {
    let f = validate_bytes(&Builder::model().bytes()).unwrap();
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensors[1].offset, 512);
}

#[test]
fn reads_from_a_file_and_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, Builder::model().set("llama.block_count", types::U32, u32v(0)).bytes()).unwrap();
    let e = validate(&p).unwrap_err();
    assert!(e.to_string().contains("m.gguf"), "{e}");
    assert!(e.to_string().contains("llama.block_count: 0 is outside 1..=512"), "{e}");
    assert!(!e.reason().contains("m.gguf"), "reason() must not carry the path: {}", e.reason());
    std::fs::write(&p, b"hello world").unwrap();
    assert!(matches!(read(&p), Err(GgufError::BadMagic { .. })));
}

#[test]
fn header_defects() {
    let mut b = Builder::model().bytes();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(field_of(&b), "version");
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(field_of(&b), "version");
    let mut b = Builder::model().bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(field_of(&b), "tensor_count");
    let mut b = Builder::model().bytes();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_eq!(field_of(&b), "kv_count");
    assert_eq!(field_of(b"GGU"), "magic");
}

#[test]
fn key_value_defects() {
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(b"abc");
    assert_eq!(field_of(&Builder::model().set("general.name", types::STRING, huge).bytes()), "general.name");
    assert_eq!(field_of(&Builder::model().set("general.name", 99, vec![0; 8]).bytes()), "general.name");
    let mut nested = arr(types::ARRAY, &[]);
    nested.truncate(4);
    nested.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(field_of(&Builder::model().set("x.nested", types::ARRAY, nested).bytes()), "x.nested");
    let mut big_arr = types::STRING.to_le_bytes().to_vec();
    big_arr.extend_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(field_of(&Builder::model().set("tokenizer.ggml.tokens", types::ARRAY, big_arr).bytes()), "tokenizer.ggml.tokens");
    let mut dup = Builder::model();
    dup.kvs.push(("llama.block_count".into(), types::U32, u32v(2)));
    assert_eq!(field_of(&dup.bytes()), "llama.block_count");
    assert_eq!(field_of(&Builder::model().set("general.alignment", types::U64, 32u64.to_le_bytes().to_vec()).bytes()), "general.alignment");
    assert_eq!(field_of(&Builder::model().set("general.alignment", types::U32, u32v(24)).bytes()), "general.alignment");
    assert_eq!(field_of(&Builder::model().set("split.count", types::U32, u32v(1)).bytes()), "split.count");
}

#[test]
fn tensor_table_defects() {
    let with = |f: &dyn Fn(&mut Builder)| {
        let mut b = Builder::model();
        f(&mut b);
        field_of(&b.bytes())
    };
    assert!(with(&|b| b.tensors[0].0 = "x".repeat(64)).ends_with("name"));
    assert!(with(&|b| b.tensors[1].0 = "token_embd.weight".into()).ends_with("name"));
    assert!(with(&|b| b.tensors[0].1 = vec![1, 1, 1, 1, 1]).ends_with("n_dims"));
    assert!(with(&|b| b.tensors[0].1 = vec![0, 4]).ends_with("dimension 0"));
    assert!(with(&|b| b.tensors[0].1 = vec![1 << 40, 1 << 40]).ends_with("dims"));
    assert!(with(&|b| b.tensors[0].2 = 4).ends_with("type"));
    assert!(with(&|b| b.tensors[0].2 = 99).ends_with("type"));
    // q4_0 blocks hold 32 elements.
    assert!(with(&|b| {
        b.tensors[0].2 = 2;
        b.tensors[0].1 = vec![16, 4];
    })
    .ends_with("dimension 0"));
    // Data cut short.
    let mut bytes = Builder::model().bytes();
    bytes.truncate(bytes.len() - 64);
    assert!(field_of(&bytes).ends_with("data"));
}

#[test]
fn a_misplaced_offset_is_refused() {
    let b = Builder::model();
    let mut bytes = b.bytes();
    // The second tensor's offset is the last 8 bytes of its table entry.
    let name = s("output_norm.weight");
    let at = bytes.windows(name.len()).position(|w| w == name.as_slice()).unwrap() + name.len() + 4 + 8 + 4;
    bytes[at..at + 8].copy_from_slice(&520u64.to_le_bytes());
    assert_eq!(field_of(&bytes), "tensor 'output_norm.weight' offset");
}

#[test]
fn hyperparameter_defects() {
    let m = Builder::model;
    assert_eq!(field_of(&m().set("llama.block_count", types::U32, u32v(513)).bytes()), "llama.block_count");
    assert_eq!(field_of(&m().set("llama.block_count", types::STRING, s("2")).bytes()), "llama.block_count");
    assert_eq!(field_of(&m().set("llama.context_length", types::U32, u32v(0)).bytes()), "llama.context_length");
    assert_eq!(field_of(&m().set("llama.embedding_length", types::U32, u32v(0)).bytes()), "llama.embedding_length");
    assert_eq!(field_of(&m().set("llama.nextn_predict_layers", types::U32, u32v(3)).bytes()), "llama.nextn_predict_layers");
    assert_eq!(field_of(&m().set("llama.expert_count", types::U32, u32v(2000)).bytes()), "llama.expert_count");
    assert_eq!(field_of(&m().set("llama.expert_used_count", types::U32, u32v(2)).bytes()), "llama.expert_used_count");
    let heads = arr(types::U32, &[u32v(4), u32v(4), u32v(4)]);
    assert_eq!(field_of(&m().set("llama.attention.head_count", types::ARRAY, heads).bytes()), "llama.attention.head_count");
    assert_eq!(field_of(&m().set("llama.rope.scaling.type", types::STRING, s("weird")).bytes()), "llama.rope.scaling.type");
    assert_eq!(field_of(&m().set("general.architecture", types::U32, u32v(1)).bytes()), "general.architecture");
    let mut no_arch = m();
    no_arch.kvs.retain(|kv| kv.0 != "general.architecture");
    assert_eq!(field_of(&no_arch.bytes()), "general.architecture");
}

#[test]
fn vocabulary_defects() {
    let m = Builder::model;
    let short: Vec<Vec<u8>> = (0..3).map(|i| (i as f32).to_le_bytes().to_vec()).collect();
    assert_eq!(field_of(&m().set("tokenizer.ggml.scores", types::ARRAY, arr(types::F32, &short)).bytes()), "tokenizer.ggml.scores");
    let bytes4: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8]).collect();
    assert_eq!(field_of(&m().set("tokenizer.ggml.scores", types::ARRAY, arr(types::U8, &bytes4)).bytes()), "tokenizer.ggml.scores");
    assert_eq!(field_of(&m().set("tokenizer.ggml.token_type", types::ARRAY, arr(types::U8, &bytes4)).bytes()), "tokenizer.ggml.token_type");
    assert_eq!(field_of(&m().set("tokenizer.ggml.tokens", types::ARRAY, arr(types::U32, &[u32v(1)])).bytes()), "tokenizer.ggml.tokens");
    assert_eq!(field_of(&m().set("tokenizer.ggml.bos_token_id", types::U32, u32v(4)).bytes()), "tokenizer.ggml.bos_token_id");
    assert_eq!(field_of(&m().set("tokenizer.ggml.eos_token_id", types::I32, u32v(-5i32 as u32)).bytes()), "tokenizer.ggml.eos_token_id");
    assert_eq!(field_of(&m().set("llama.vocab_size", types::U32, u32v(5)).bytes()), "llama.vocab_size");
    // "None" markers are fine.
    validate_bytes(&m().set("tokenizer.ggml.eos_token_id", types::I32, u32v(-1i32 as u32)).bytes()).unwrap();
    validate_bytes(&m().set("tokenizer.ggml.eos_token_id", types::U32, u32v(u32::MAX)).bytes()).unwrap();
}

#[test]
fn every_prefix_of_a_valid_file_is_refused_without_panicking() {
    let bytes = Builder::model().bytes();
    for n in 0..bytes.len() {
        assert!(validate_bytes(&bytes[..n]).is_err(), "a {n}-byte prefix was accepted");
    }
}

/// The fuzz target's seed corpus and every input the fuzzer ever crashed on (fuzz/regressions,
/// kept as regression tests) go through the validator without panicking; the handcrafted
/// model seeds are valid.
#[test]
fn seed_corpus_and_fuzz_regressions() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seen = 0;
    for dir in ["corpus/seeds", "regressions"] {
        for entry in std::fs::read_dir(fuzz.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| validate_bytes(&bytes));
            assert!(result.is_ok(), "{} panicked the validator", path.display());
            let model_seed = ["minimal-llama.gguf", "per-layer-arrays.gguf", "moe-quantized.gguf"].iter().any(|n| path.ends_with(n));
            if model_seed {
                if let Ok(Err(p)) = &result {
                    panic!("seed {} is refused: {p}", path.display());
                }
            }
            seen += 1;
        }
    }
    assert!(seen >= 5, "the seed corpus is missing");
}

fn problem_of(bytes: &[u8]) -> Problem {
    match validate_bytes(bytes) {
        Ok(_) => panic!("accepted"),
        Err(p) => p,
    }
}

/// Short scalar arrays keep their values as the file's bytes; each element decodes back
/// to the value it was written as, the way host/src/fit.rs reads per-layer maxima.
#[test]
fn short_scalar_arrays_keep_their_values_compactly() {
    let heads = arr(types::I32, &[u32v(4), u32v(2), u32v(4)]);
    let model = Builder::model().set("llama.block_count", types::U32, u32v(3)).set("llama.attention.head_count", types::ARRAY, heads);
    let f = validate_bytes(&model.bytes()).unwrap();
    let Some(MetaValue::Array { element_type, len, values }) = f.get("llama.attention.head_count") else { panic!("not an array") };
    assert_eq!((*element_type, *len, values.len()), (types::I32, 3, 3));
    assert_eq!(values.iter().filter_map(|v| v.as_u64()).max(), Some(4));
    assert_eq!(values.get(1), Some(MetaValue::Int(2)));
    assert_eq!(values.get(3), None);

    let mixed = [
        (types::I8, vec![0xFF], MetaValue::Int(-1)),
        (types::U16, vec![0x34, 0x12], MetaValue::UInt(0x1234)),
        (types::I16, (-300i16).to_le_bytes().to_vec(), MetaValue::Int(-300)),
        (types::F32, 1.5f32.to_le_bytes().to_vec(), MetaValue::Float(1.5)),
        (types::BOOL, vec![2], MetaValue::Bool(true)),
        (types::U64, u64::MAX.to_le_bytes().to_vec(), MetaValue::UInt(u64::MAX)),
        (types::F64, (-2.25f64).to_le_bytes().to_vec(), MetaValue::Float(-2.25)),
    ];
    for (t, bytes, value) in mixed {
        let f = validate_bytes(&Builder::model().set("x.a", types::ARRAY, arr(t, &[bytes.clone(), bytes.clone()])).bytes()).unwrap();
        let Some(MetaValue::Array { values, .. }) = f.get("x.a") else { panic!("not an array") };
        assert_eq!(values.iter().collect::<Vec<_>>(), vec![value.clone(), value.clone()], "{}", type_name(t));
        assert_eq!(Scalars::from_le_bytes(t, [bytes.clone(), bytes].concat()).as_ref(), Some(values));
    }
    // Long arrays and string arrays keep their length, not their values.
    let long: Vec<Vec<u8>> = (0..=limits::KEEP_ARRAY_VALUES).map(|_| vec![1]).collect();
    let f = validate_bytes(&Builder::model().set("x.long", types::ARRAY, arr(types::U8, &long)).bytes()).unwrap();
    assert!(matches!(f.get("x.long"), Some(MetaValue::Array { len: 4097, values, .. }) if values.is_empty()));
    assert!(matches!(f.get("tokenizer.ggml.tokens"), Some(MetaValue::Array { len: 4, values, .. }) if values.is_empty()));
    assert_eq!(Scalars::from_le_bytes(types::STRING, vec![]), None);
    assert_eq!(Scalars::from_le_bytes(types::U32, vec![0; 3]), None);
}

/// Names quoted in messages are escaped and cut, with their full length; short ones are
/// quoted whole as before.
#[test]
fn names_in_messages_are_cut_to_an_escaped_prefix() {
    let p = problem_of(&{
        let mut b = Builder::model();
        b.tensors[0].0 = format!("\n{}", "x".repeat(99));
        b.bytes()
    });
    assert_eq!(p.field, format!("tensor '\\n{}…(100 bytes)' name", "x".repeat(62)));
    assert_eq!(p.problem, "is 100 bytes, at most 63 allowed");
    let value = "y".repeat(1000);
    let p = problem_of(&Builder::model().set("llama.rope.scaling.type", types::STRING, s(&value)).bytes());
    assert_eq!(p.problem, format!("\"{}…(1000 bytes)\" is not one of none, linear, yarn, longrope", "y".repeat(64)));
    let p = problem_of(&Builder::model().set("llama.rope.scaling.type", types::STRING, s("we\"ird")).bytes());
    assert_eq!(p.to_string(), "llama.rope.scaling.type: \"we\\\"ird\" is not one of none, linear, yarn, longrope");
}

/// Lengths over llama.cpp's or the specification's limits are refused from the length
/// field, before anything of that size is read.
#[test]
fn lengths_over_the_caps_are_refused_before_reading() {
    let padded = |mut b: Vec<u8>, at: usize, v: u64| {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b.resize(b.len() + (1 << 20), 0);
        b
    };
    let p = problem_of(&padded(Builder::model().bytes(), 16, limits::MAX_KEYS + 1));
    assert_eq!((p.field.as_str(), p.problem.as_str()), ("kv_count", "65537 key/value pairs, at most 65536 allowed"));
    let p = problem_of(&padded(Builder::model().bytes(), 8, limits::MAX_TENSORS + 1));
    assert_eq!((p.field.as_str(), p.problem.as_str()), ("tensor_count", "65537 tensors, at most 65536 allowed"));
    let mut long_key = Builder::model();
    long_key.kvs.push(("k".repeat(limits::MAX_KEY as usize + 1), types::U32, u32v(0)));
    let p = problem_of(&long_key.bytes());
    assert_eq!((p.field.as_str(), p.problem.as_str()), ("key #9", "a string of 65536 bytes, at most 65535 allowed"));
    let mut too_long = types::U8.to_le_bytes().to_vec();
    too_long.extend_from_slice(&(limits::MAX_ARRAY_LEN + 1).to_le_bytes());
    assert_eq!(field_of(&Builder::model().set("x.a", types::ARRAY, too_long).bytes()), "x.a");
    let p = problem_of(&Builder::model().set("general.architecture", types::STRING, s(&"a".repeat(65))).bytes());
    assert_eq!(p.field, "general.architecture");
}

/// Invalid UTF-8 is kept byte for byte as '?', never grown (U+FFFD takes three bytes).
#[test]
fn invalid_utf8_strings_do_not_grow() {
    let mut value = 3u64.to_le_bytes().to_vec();
    value.extend_from_slice(&[b'a', 0xFF, 0xC3]);
    let f = validate_bytes(&Builder::model().set("general.name", types::STRING, value).bytes()).unwrap();
    assert_eq!(f.get("general.name").and_then(MetaValue::as_str), Some("a??"));
}

/// The fuzz target (fuzz/fuzz_targets/gguf_validate.rs) calls this entry point.
#[test]
fn the_fuzz_entry_point_keeps_its_signature() {
    let entry: fn(&[u8]) -> Result<GgufFile, Problem> = validate_bytes;
    assert!(entry(b"").is_err());
}
