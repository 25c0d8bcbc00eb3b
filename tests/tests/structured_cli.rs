//! `llama run` with output constraints, through the real binary, plugin and models:
//! `--json-schema @FILE` for the 20 schemas in tests/fixtures/schemas, several seeds each,
//! every output that ends with finish `stop` validated against its schema by the Python
//! `jsonschema` package (a validator that is not ours); plus `--grammar`, `--json` and the
//! errors a bad constraint gets before the model loads.

use std::io::Write;
use std::path::{Path, PathBuf};

use llama_tests::{assert_exit, llama, model_path, smollm2_model_path, stderr, stdout};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn finish(stderr: &str) -> &str {
    stderr.rsplit("| finish ").next().and_then(|s| s.split_whitespace().next()).unwrap_or("?")
}

#[test]
fn every_stopped_output_validates_against_its_schema() {
    let mut schemas: Vec<PathBuf> =
        std::fs::read_dir(root().join("tests/fixtures/schemas")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    schemas.sort();
    assert_eq!(schemas.len(), 20, "the 20 test schemas");
    let smol = smollm2_model_path();
    let gemma = model_path();
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let mut out = std::fs::File::create(&results).unwrap();
    let (mut stopped, mut total) = (0, 0);
    for (i, schema) in schemas.iter().enumerate() {
        // Both models, three seeds per schema in all: the instruct model through its chat
        // template, the base model on a raw prompt.
        let runs: [(&Path, bool, u32); 3] = [(&smol, true, 1), (&smol, true, 2 + i as u32), (&gemma, false, 3)];
        for (model, chat, seed) in runs {
            let at = format!("@{}", schema.display());
            let seed_s = seed.to_string();
            let mut args = vec!["run", "-m", model.to_str().unwrap(), "--json-schema", &at, "-n", "256", "--temp", "0.7", "-s", &seed_s, "-t", "2", "-c", "1024"];
            args.extend(if chat { ["--chat", "-p", "Answer with a JSON document."] } else { ["-p", "Here is the JSON document:\n", ""] }.iter().filter(|a| !a.is_empty()));
            let o = llama(&args);
            assert_exit(&o, 0);
            let (text, err) = (stdout(&o), stderr(&o));
            let fin = finish(&err).to_string();
            total += 1;
            stopped += (fin == "stop") as usize;
            let line = serde_json::json!({"schema": schema, "seed": seed, "finish": fin, "output": text.trim_end_matches('\n')});
            writeln!(out, "{line}").unwrap();
        }
    }
    drop(out);
    let o = std::process::Command::new("python3")
        .arg(root().join("tests/clients/validate_json.py"))
        .arg(&results)
        .env("PYTHONPATH", llama_tests::python_clients_path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout);
    eprintln!("{report}");
    assert!(o.status.success(), "an output that stopped does not validate:\n{report}\n{}", String::from_utf8_lossy(&o.stderr));
    // Most outputs must finish: a constraint that never lets the model stop would pass the
    // validator vacuously.
    eprintln!("{stopped} of {total} outputs stopped");
    assert!(stopped * 4 >= total * 3, "only {stopped} of {total} outputs stopped");
}

#[test]
fn a_grammar_decides_the_output() {
    let smol = smollm2_model_path();
    let o = llama(&["run", "-m", smol.to_str().unwrap(), "--chat", "-p", "Is the sky blue?", "--grammar", "root ::= (\"yes\" | \"no\") \".\"", "-n", "16", "--temp", "0", "-t", "2"]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    assert!(["yes.", "no."].contains(&text.trim()), "{text:?}");
    assert_eq!(finish(&stderr(&o)), "stop");
}

#[test]
fn json_gives_a_json_object() {
    let o = llama(&["run", "-m", smollm2_model_path().to_str().unwrap(), "--chat", "-p", "Describe a cat.", "--json", "-n", "200", "--temp", "0", "-t", "2"]);
    assert_exit(&o, 0);
    if finish(&stderr(&o)) == "stop" {
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
        assert!(v.is_object(), "{v}");
    }
}

#[test]
fn bad_constraints_are_refused_before_the_model_loads() {
    let m = model_path();
    let m = m.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--grammar", "root ::= (\"a\""], "grammar"),
        (&["--json-schema", "{\"type\": \"object\", \"not\": {}}"], "'not'"),
        (&["--json-schema", "{not json"], "not JSON"),
        (&["--json-schema", "@/nonexistent/schema.json"], "/nonexistent/schema.json"),
        (&["--grammar-file", "/nonexistent/g.gbnf"], "/nonexistent/g.gbnf"),
        (&["--json-schema", "{\"$defs\": {\"a\": {\"$ref\": \"#/$defs/b\"}, \"b\": {\"$ref\": \"#/$defs/a\"}}, \"$ref\": \"#/$defs/a\"}"], "a"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["run", "-m", m, "-p", "x", "-n", "4"];
        args.extend_from_slice(flags);
        let o = llama(&args);
        assert_exit(&o, 2);
        let err = stderr(&o);
        eprintln!("{flags:?} -> {}", err.trim());
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Two constraints at once.
    let o = llama(&["run", "-m", m, "-p", "x", "--json", "--grammar", "root ::= \"a\""]);
    assert_exit(&o, 2);
}

#[test]
fn the_config_file_sets_a_constraint_and_a_flag_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[defaults]\ngrammar = 'root ::= \"from-config\"'\n").unwrap();
    let smol = smollm2_model_path();
    let base = ["--config", config.to_str().unwrap(), "run", "-m", smol.to_str().unwrap(), "--chat", "-p", "Hi", "-n", "16", "--temp", "0", "-t", "2"];
    let o = llama(&base);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "from-config");
    // A constraint flag replaces the file's (never two at once).
    let mut args = base.to_vec();
    args.extend(["--grammar", "root ::= \"from-flag\""]);
    let o = llama(&args);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "from-flag");
}
