//! Speculative decoding through the real binary: `llama run --spec`, `--draft-model`'s
//! vocabulary check, and `llama serve`'s per-model default, per-request `speculative`
//! field, its bounds and its metrics.

use llama_tests::server::Server;
use llama_tests::{assert_exit, llama, model_path, smollm2_model_path, stderr, stdout};
use serde_json::json;

const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,";

fn smol() -> String {
    smollm2_model_path().to_str().unwrap().to_string()
}

/// `llama run --spec ngram` drafts from the prompt and says so on its statistics line.
#[test]
fn run_with_ngram_speculation_reports_its_drafts() {
    let m = smol();
    let o = llama(&["run", "-m", &m, "-p", COUNTING, "-n", "24", "--temp", "0", "-t", "2", "--spec", "ngram"]);
    assert_exit(&o, 0);
    assert!(!stdout(&o).trim().is_empty());
    let err = stderr(&o);
    assert!(err.contains("drafts ") && err.contains(" accepted of "), "{err}");
}

/// A draft model is checked against the model: another vocabulary is refused, naming both.
#[test]
fn a_draft_model_with_another_vocabulary_is_refused_naming_both() {
    let (m, g) = (smol(), model_path());
    let o = llama(&["run", "-m", &m, "-p", "Hi", "-n", "4", "-t", "2", "--draft-model", g.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("gemma") && err.contains("smollm2") && err.contains("vocabulary"), "{err}");
}

/// Bad speculation flags fail before anything loads, naming the flag.
#[test]
fn bad_speculation_flags_are_named() {
    let m = smol();
    for (args, flag) in [
        (vec!["--spec", "draft"], "draft-model"),
        (vec!["--spec", "medusa"], "spec"),
        (vec!["--spec", "ngram", "--draft-max", "0"], "draft-max"),
        (vec!["--spec", "ngram", "--draft-max", "65"], "draft-max"),
        (vec!["--spec", "ngram", "--spec-ngram-n", "99"], "spec-ngram-n"),
        (vec!["--spec", "draft", "--draft-model", &m, "--draft-p-min", "2"], "draft-p-min"),
    ] {
        let mut all = vec!["run", "-m", &m, "-p", "Hi", "-n", "2"];
        all.extend(args.iter().copied());
        let o = llama(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{args:?}: {}", stderr(&o));
    }
}

/// The server speculates by default with `--spec ngram`; a request can turn it off or
/// change its sizes; bad fields are
/// 400s naming them, with the server serving on. The metrics count drafts.
#[test]
fn serve_speculates_per_model_and_per_request() {
    let s = Server::start_with(&smol(), &["--spec", "ngram"]);
    s.wait_ready();
    let ask = |extra: serde_json::Value| {
        let mut body = json!({"prompt": COUNTING, "max_tokens": 24, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        s.post("/v1/completions", &body)
    };
    let (code, with) = ask(json!({}));
    assert_eq!(code, 200, "{with}");
    let drafted = s.metric("llama_spec_draft_tokens_total");
    assert!(drafted > 0.0, "no drafts counted");
    assert!(s.metric("llama_spec_accepted_tokens_total") <= drafted);
    let (code, off) = ask(json!({"speculative": {"mode": "none"}}));
    assert_eq!(code, 200, "{off}");
    assert_eq!(s.metric("llama_spec_draft_tokens_total"), drafted, "mode none still drafted");
    let (code, small) = ask(json!({"speculative": {"n_max": 2, "ngram_n": 2}}));
    assert_eq!(code, 200, "{small}");
    for (bad, param) in [
        (json!({"speculative": {"n_max": 0}}), "speculative.n_max"),
        (json!({"speculative": {"n_max": 100000}}), "speculative.n_max"),
        (json!({"speculative": {"p_min": -1}}), "speculative.p_min"),
        (json!({"speculative": {"mode": "medusa"}}), "speculative.mode"),
        (json!({"speculative": {"mode": "draft"}}), "speculative.mode"),
    ] {
        let (code, v) = ask(bad.clone());
        assert_eq!(code, 400, "{bad}: {v}");
        assert_eq!(v["error"]["param"], param, "{bad}: {v}");
    }
    let (code, v) = ask(json!({"speculative": {"n_maxx": 3}}));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("n_maxx"), "{v}");
    let (code, v) = ask(json!({"speculative": "fast"}));
    assert_eq!(code, 400, "{v}");
    let (code, _) = ask(json!({}));
    assert_eq!(code, 200, "the server stopped serving after bad requests");
}
