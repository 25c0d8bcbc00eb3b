//! `llama embed` through the real binary, plugin and models: its vectors against llama.cpp's
//! own `llama-embedding` (recorded by `scripts/embed-compare --record` in
//! tests/fixtures/embeddings/reference.json, both models, mean and last pooling); the same
//! vectors whatever the batch an input is decoded in (to llama.cpp's own spread), and the
//! batch sizes llama.cpp itself aborts on; the plain output's shape and the normalisations;
//! `-f -`; the errors, which name the input and print nothing on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use llama_tests::{assert_exit, llama, llama_cmd, model_path, smollm2_model_path, stderr, stdout};
use serde_json::Value;

/// The least cosine similarity accepted between two vectors that should be the same: the
/// same input decoded in the same batch layout, by us or by llama-embedding.
const MIN_COSINE: f64 = 0.9999;

/// The least cosine accepted between an input's vectors from batches of different
/// composition. llama.cpp's CPU kernels give a token slightly different values with the
/// batch around it: llama-embedding's own vectors of a sentence alone and in the batch of
/// ten differ by cosines down to 0.9970 (Gemma, last pooling, its default flash attention).
/// `llama embed` removes the two largest causes (flash attention off, batches padded to
/// whole row groups: docs/ARCHITECTURE.md, "Embeddings"), which leaves most vectors equal
/// to the last bit, but one of these sentences with Gemma's last-token pooling still moves
/// to 0.9981 in batches of three. Two different test sentences are at most 0.95 alike, so
/// 0.99 still catches a pooling or masking mix-up between sequences. (The same batch layout
/// is held to MIN_COSINE, and so is mean pooling over HTTP: tests/tests/embeddings_http.rs.)
const BATCH_SPREAD_MIN_COSINE: f64 = 0.99;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/embeddings").join(name)
}

fn sentences_file() -> String {
    fixture("sentences.txt").to_str().unwrap().to_string()
}

fn sentences() -> Vec<String> {
    let text = std::fs::read_to_string(fixture("sentences.txt")).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 10, "the ten test sentences");
    lines
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn models() -> [PathBuf; 2] {
    [model_path(), smollm2_model_path()]
}

fn file_name(model: &Path) -> String {
    model.file_name().unwrap().to_string_lossy().into_owned()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector lengths");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

/// `llama embed -m MODEL --json -t 2 --no-stats ARGS`: must succeed; the parsed document.
fn embed_json(model: &Path, args: &[&str]) -> Value {
    let mut all = vec!["embed", "-m", model.to_str().unwrap(), "--json", "-t", "2", "--no-stats"];
    all.extend_from_slice(args);
    let o = llama(&all);
    assert_exit(&o, 0);
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

/// The pooled vectors of a `--json` document, in input order (checking the indexes).
fn vectors(doc: &Value) -> Vec<Vec<f64>> {
    let data = doc["data"].as_array().unwrap();
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i, "{d}");
            let v = floats(&d["embedding"]);
            assert_eq!(v.len() as u64, doc["n_embd"].as_u64().unwrap());
            v
        })
        .collect()
}

/// The least cosine over pairs of corresponding vectors, after checking the counts.
fn min_cosine(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len(), "vector counts");
    got.iter().zip(want).map(|(a, b)| cosine(a, b)).fold(f64::INFINITY, f64::min)
}

/// The vectors of plain output: one per line, space-separated floats.
fn plain_rows(text: &str) -> Vec<Vec<f64>> {
    text.lines().map(|l| l.split(' ').map(|x| x.parse::<f64>().unwrap_or_else(|e| panic!("{e}: {x:?}"))).collect()).collect()
}

#[test]
fn vectors_match_llama_cpp_reference() {
    let reference = reference();
    assert_eq!(reference["sentences"], serde_json::json!(sentences()), "reference.json is of another sentences.txt: run scripts/embed-compare --record");
    let file = sentences_file();
    for model in models() {
        let name = file_name(&model);
        for pooling in ["mean", "last"] {
            let want: Vec<Vec<f64>> = reference["vectors"][&name][pooling]
                .as_array()
                .unwrap_or_else(|| panic!("no recorded {pooling} vectors for {name}: run scripts/embed-compare --record"))
                .iter()
                .map(floats)
                .collect();
            let doc = embed_json(&model, &["-f", &file, "--pooling", pooling]);
            assert_eq!(doc["model"], name.as_str());
            assert_eq!(doc["pooling"], pooling);
            assert_eq!(doc["normalize"], 2);
            for d in doc["data"].as_array().unwrap() {
                assert!(d["tokens"].as_u64().unwrap() > 1, "{}", d["tokens"]);
            }
            let got = vectors(&doc);
            let min = min_cosine(&got, &want);
            eprintln!("{name} {pooling}: min cosine against llama-embedding {min:.9}");
            assert!(min >= MIN_COSINE, "{name} {pooling}: min cosine {min}");
        }
    }
}

#[test]
fn batch_composition_does_not_change_the_vectors() {
    let file = sentences_file();
    let sentences = sentences();
    for model in models() {
        let name = file_name(&model);
        for pooling in ["mean", "last"] {
            let batch = vectors(&embed_json(&model, &["-f", &file, "--pooling", pooling]));
            // The same ten sentences as -p flags: the same inputs in the same batch.
            let mut args = vec!["--pooling", pooling];
            for s in &sentences {
                args.extend(["-p", s.as_str()]);
            }
            let prompts = vectors(&embed_json(&model, &args));
            let min = min_cosine(&prompts, &batch);
            eprintln!("{name} {pooling}: -p against -f: min cosine {min:.9}");
            assert!(min >= MIN_COSINE, "{name} {pooling}: -p against -f: {min}");
            // Each sentence in a batch of its own (-np 1): ten batches through one context,
            // each the same as the sentence alone in a process of its own (nothing of one
            // batch stays in the cache for the next).
            let one_each = vectors(&embed_json(&model, &["-f", &file, "--pooling", pooling, "-np", "1"]));
            for i in [0, 4, 9] {
                let alone = vectors(&embed_json(&model, &["-p", &sentences[i], "--pooling", pooling]));
                let c = cosine(&alone[0], &one_each[i]);
                assert!(c >= MIN_COSINE, "{name} {pooling}: sentence {} alone against -np 1: {c}", i + 1);
                let c = cosine(&alone[0], &batch[i]);
                eprintln!("{name} {pooling}: sentence {} alone against the batch of ten: cosine {c:.6}", i + 1);
                assert!(c >= BATCH_SPREAD_MIN_COSINE, "{name} {pooling}: sentence {} alone: {c}", i + 1);
            }
            // Batches of one, of three, and of at most 20 tokens (-ub 20, below the default
            // 64 inputs per batch) against the batch of ten.
            for flags in [["-np", "1"], ["-np", "3"], ["-ub", "20"]] {
                let split = vectors(&embed_json(&model, &["-f", &file, "--pooling", pooling, flags[0], flags[1]]));
                let min = min_cosine(&split, &batch);
                eprintln!("{name} {pooling}: {flags:?} against the batch of ten: min cosine {min:.6}");
                assert!(min >= BATCH_SPREAD_MIN_COSINE, "{name} {pooling} {flags:?}: {min}");
            }
        }
    }
}

#[test]
fn batch_sizes_llama_cpp_aborts_on_are_handled() {
    // llama.cpp aborts the process (a GGML_ASSERT) when a context holds more sequences than
    // its batch has tokens (-ub 8 with the default -np 64), and with mean pooling when the
    // micro-batch is not a multiple of the sequences (-ub 100 with -np 64; -np 3 with the
    // default -ub 512). The embedder sizes its context around both.
    let model = model_path();
    let file = sentences_file();
    let short = ["-p", "Hi", "-p", "Yes.", "-p", "a b c"];
    let cases: [&[&str]; 4] = [&["-ub", "8"], &["-ub", "100"], &["-np", "3"], &["-ub", "100", "-np", "7"]];
    for flags in cases {
        for pooling in ["mean", "last"] {
            let mut args = vec!["--pooling", pooling];
            args.extend_from_slice(flags);
            if flags.contains(&"8") {
                args.extend_from_slice(&short);
            } else {
                args.extend(["-f", file.as_str()]);
            }
            let v = vectors(&embed_json(&model, &args));
            assert_eq!(v.len(), if flags.contains(&"8") { 3 } else { 10 }, "{args:?}");
            for x in &v {
                assert!((norm(x) - 1.0).abs() < 1e-4, "{args:?}: {}", norm(x));
            }
        }
    }
}

#[test]
fn plain_output_is_one_vector_per_line() {
    let model = model_path();
    let m = model.to_str().unwrap();
    let file = sentences_file();
    let o = llama(&["embed", "-m", m, "-f", &file, "--pooling", "mean", "-t", "2", "--no-stats"]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    assert!(text.ends_with('\n') && !text.contains("\n\n"), "{text}");
    let rows = plain_rows(&text);
    assert_eq!(rows.len(), 10);
    let n_embd = rows[0].len();
    assert_eq!(n_embd, 640, "Gemma 3 270M's embedding width");
    for r in &rows {
        assert_eq!(r.len(), n_embd);
        // The default normalisation is Euclidean.
        assert!((norm(r) - 1.0).abs() < 1e-4, "{}", norm(r));
    }
    // The same vectors as --json prints.
    let json = vectors(&embed_json(&model, &["-f", &file, "--pooling", "mean"]));
    assert!(min_cosine(&rows, &json) >= MIN_COSINE);

    // 0: scaled so the largest |x| is 32760 (the int16 range).
    let o = llama(&["embed", "-m", m, "-f", &file, "--pooling", "mean", "-t", "2", "--no-stats", "--embd-normalize", "0"]);
    assert_exit(&o, 0);
    for (r, unit) in plain_rows(&stdout(&o)).iter().zip(&rows) {
        let max = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!((max - 32760.0).abs() < 0.1, "{max}");
        assert!(cosine(r, unit) >= MIN_COSINE);
    }
    // -1: not normalised, the same direction.
    let o = llama(&["embed", "-m", m, "-f", &file, "--pooling", "mean", "-t", "2", "--no-stats", "--embd-normalize", "-1"]);
    assert_exit(&o, 0);
    let raw = plain_rows(&stdout(&o));
    assert_eq!(raw.len(), 10);
    for (r, unit) in raw.iter().zip(&rows) {
        assert!((norm(r) - 1.0).abs() > 1e-2, "a raw vector of norm {}", norm(r));
        assert!(cosine(r, unit) >= MIN_COSINE);
    }
}

#[test]
fn pooling_none_gives_a_line_per_token_and_a_blank_line_between_inputs() {
    let model = model_path();
    let m = model.to_str().unwrap();
    let inputs = ["Hello world.", "café", "The train leaves at 7:45."];
    let mut args = vec!["embed", "-m", m, "--pooling", "none", "-t", "2", "--no-stats"];
    for p in inputs {
        args.extend(["-p", p]);
    }
    let o = llama(&args);
    assert_exit(&o, 0);
    let text = stdout(&o);
    let groups: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(groups.len(), inputs.len(), "{text}");
    // Token counts from --json, whose embedding is then a list of per-token vectors.
    let mut json_args = vec!["--pooling", "none"];
    for p in inputs {
        json_args.extend(["-p", p]);
    }
    let doc = embed_json(&model, &json_args);
    assert_eq!(doc["pooling"], "none");
    let n_embd = doc["n_embd"].as_u64().unwrap() as usize;
    for (i, (group, d)) in groups.iter().zip(doc["data"].as_array().unwrap()).enumerate() {
        let tokens = d["tokens"].as_u64().unwrap() as usize;
        let rows = plain_rows(group.trim_end_matches('\n'));
        assert_eq!(rows.len(), tokens, "input {i}: a line per token");
        assert!(tokens >= 2, "BOS and at least one token");
        let per_token: Vec<Vec<f64>> = d["embedding"].as_array().unwrap().iter().map(floats).collect();
        assert_eq!(per_token.len(), tokens);
        for (r, j) in rows.iter().zip(&per_token) {
            assert_eq!(r.len(), n_embd);
            assert!((norm(r) - 1.0).abs() < 1e-4, "each token's vector is normalised: {}", norm(r));
            assert!(cosine(r, j) >= MIN_COSINE);
        }
    }
}

/// Runs `llama embed -m MODEL ARGS` (with `stdin` piped in when given).
fn embed_with_stdin(model: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = vec!["embed", "-m", model.to_str().unwrap(), "-t", "2"];
    all.extend_from_slice(args);
    let mut cmd = llama_cmd(&all);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run llama");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

#[test]
fn bad_inputs_and_options_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let gaps = dir.path().join("gaps.txt");
    std::fs::write(&gaps, "a\n\nb").unwrap();
    let gaps = gaps.to_str().unwrap();
    let missing = dir.path().join("missing.txt");
    let missing = missing.to_str().unwrap();
    let long = "This sentence has a good many more than eight tokens in it.";
    for model in models() {
        let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
            (vec!["-f", gaps], vec!["input 2 (", "gaps.txt line 2)", "empty"]),
            (vec!["-p", "short", "-p", long, "-ub", "8"], vec!["input 2 (-p number 2)", "the limit is 8", "-ub"]),
            (vec!["-p", "x", "--embd-normalize", "99"], vec!["--embd-normalize", "99"]),
            (vec!["-p", "x", "--embd-normalize", "-3"], vec!["--embd-normalize", "-3"]),
            (vec!["-p", "x", "--pooling", "rank"], vec!["rank", "reranker"]),
            (vec!["-p", "x", "--pooling", "avg"], vec!["avg", "none, mean, cls, last, rank"]),
            (vec!["-p", "x", "-np", "0"], vec!["--parallel", "0"]),
            (vec!["-f", missing], vec![missing]),
        ];
        for (args, needles) in cases {
            let o = embed_with_stdin(&model, &args, None);
            let err = stderr(&o);
            eprintln!("{args:?} -> {}", err.trim());
            assert_exit(&o, 2);
            assert!(stdout(&o).is_empty(), "{args:?}: stdout {:?}", stdout(&o));
            for n in needles {
                assert!(err.contains(n), "{args:?}: no {n:?} in {err}");
            }
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // An empty line from stdin, too, after the -p texts: named by its line.
    let o = embed_with_stdin(&model_path(), &["-p", "first", "-f", "-"], Some("one\ntwo\n\nfour\n"));
    assert_exit(&o, 2);
    assert!(stdout(&o).is_empty());
    assert!(stderr(&o).contains("input 4 (- line 3)"), "{}", stderr(&o));
}

#[test]
fn dash_reads_the_inputs_from_stdin() {
    let model = model_path();
    let file = sentences_file();
    let text = std::fs::read_to_string(&file).unwrap();
    // With a final line break, as a pipe usually ends: it adds no empty input.
    let o = embed_with_stdin(&model, &["-f", "-", "--json", "--pooling", "mean", "--no-stats"], Some(&format!("{text}\n")));
    assert_exit(&o, 0);
    let doc: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let piped = vectors(&doc);
    assert_eq!(piped.len(), 10);
    let from_file = vectors(&embed_json(&model, &["-f", &file, "--pooling", "mean"]));
    let min = min_cosine(&piped, &from_file);
    assert!(min >= MIN_COSINE, "{min}");
    // The statistics line goes to stderr.
    let o = embed_with_stdin(&model, &["-f", "-", "--pooling", "mean"], Some(&text));
    assert_exit(&o, 0);
    assert_eq!(plain_rows(&stdout(&o)).len(), 10);
    assert!(stderr(&o).contains("10 inputs"), "{}", stderr(&o));
}
