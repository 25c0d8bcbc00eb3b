//! Sampling controls through the real binary: each parameter shows its effect.

use llama_tests::{assert_exit, llama, model_path, stderr, stdout};

/// `llama run` with the test model; returns (text, stats line).
fn gen(extra: &[&str]) -> (String, String) {
    let model = model_path();
    let mut args = vec!["run", "-m", model.to_str().unwrap(), "-t", "2"];
    args.extend_from_slice(extra);
    let o = llama(&args);
    assert_exit(&o, 0);
    let text = stdout(&o);
    (text.strip_suffix('\n').unwrap_or(&text).to_string(), stderr(&o))
}

/// The number after `label` in the stats line (`generated 5 tokens`).
fn stat(stats: &str, label: &str) -> usize {
    let rest = &stats[stats.find(label).unwrap_or_else(|| panic!("no {label} in {stats}")) + label.len()..];
    rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

const PROMPT: &str = "Once upon a time";

#[test]
fn same_seed_same_text_different_seeds_differ() {
    let a = gen(&["-p", PROMPT, "-n", "24", "--temp", "0.8", "--seed", "1234"]).0;
    let b = gen(&["-p", PROMPT, "-n", "24", "--temp", "0.8", "--seed", "1234"]).0;
    assert_eq!(a, b, "the same seed gave different text");
    let others: Vec<String> =
        ["1", "2", "3"].iter().map(|s| gen(&["-p", PROMPT, "-n", "24", "--temp", "0.8", "--seed", s]).0).collect();
    assert!(others.iter().any(|o| *o != a), "four seeds at temperature 0.8 all gave {a:?}");
}

#[test]
fn top_k_1_equals_greedy() {
    let greedy = gen(&["-p", PROMPT, "-n", "16", "--temp", "0"]).0;
    let top1 = gen(&["-p", PROMPT, "-n", "16", "--temp", "1.5", "--top-k", "1", "--seed", "7"]).0;
    assert_eq!(greedy, top1);
}

#[test]
fn max_tokens_caps_the_count() {
    let (_, stats) = gen(&["-p", PROMPT, "-n", "5", "--temp", "0"]);
    assert_eq!(stat(&stats, "generated"), 5, "{stats}");
    assert!(stats.contains("finish length"), "{stats}");
}

#[test]
fn a_stop_string_ends_output_before_it() {
    let full = gen(&["-p", "The capital of France is", "-n", "32", "--temp", "0"]).0;
    // Stop at a word from the middle of the greedy text.
    let word = full.split_whitespace().nth(3).expect("enough words").to_string();
    let (text, stats) = gen(&["-p", "The capital of France is", "-n", "32", "--temp", "0", "--stop", &word]);
    assert!(!text.contains(&word), "{text:?} contains the stop string {word:?}");
    assert!(full.starts_with(&text), "{text:?} is not a prefix of {full:?}");
    assert_eq!(text, full[..full.find(&word).unwrap()]);
    assert!(stats.contains("finish stop"), "{stats}");
}

#[test]
fn repetition_penalty_changes_a_repetitive_greedy_continuation() {
    let prompt = "one two one two one two one two one two one two";
    let plain = gen(&["-p", prompt, "-n", "12", "--temp", "0"]).0;
    let penalized = gen(&["-p", prompt, "-n", "12", "--temp", "0", "--repeat-penalty", "1.8", "--repeat-last-n", "64"]).0;
    assert_ne!(plain, penalized, "repeat penalty had no effect on {plain:?}");
    let pres = gen(&["-p", prompt, "-n", "12", "--temp", "0", "--presence-penalty", "3"]).0;
    assert_ne!(plain, pres, "presence penalty had no effect");
    let freq = gen(&["-p", prompt, "-n", "12", "--temp", "0", "--frequency-penalty", "1.5"]).0;
    assert_ne!(plain, freq, "frequency penalty had no effect");
}

#[test]
fn logit_bias_bans_the_greedy_token() {
    let model = llama_tests::model();
    let greedy = gen(&["-p", PROMPT, "-n", "1", "--temp", "0"]).0;
    let first = model.tokenize(&greedy, false).unwrap()[0];
    let banned = gen(&["-p", PROMPT, "-n", "1", "--temp", "0", "-l", &format!("{first}-inf")]).0;
    assert_ne!(greedy, banned, "banning token {first} did not change {greedy:?}");
}

#[test]
fn min_p_and_top_p_restrict_the_choice() {
    // With min-p 1.0 or top-p 0.0 only the most likely token survives: greedy at any temperature.
    let greedy = gen(&["-p", PROMPT, "-n", "12", "--temp", "0"]).0;
    let min_p = gen(&["-p", PROMPT, "-n", "12", "--temp", "2", "--top-k", "0", "--top-p", "1", "--min-p", "1", "--seed", "3"]).0;
    let top_p = gen(&["-p", PROMPT, "-n", "12", "--temp", "2", "--top-k", "0", "--min-p", "0", "--top-p", "0", "--seed", "3"]).0;
    assert_eq!(greedy, min_p);
    assert_eq!(greedy, top_p);
}

#[test]
fn the_context_limit_ends_with_finish_length() {
    let (_, stats) = gen(&["-p", PROMPT, "-n", "-1", "--temp", "0", "-c", "24"]);
    assert!(stats.contains("finish length"), "{stats}");
    assert_eq!(stat(&stats, "prompt") + stat(&stats, "generated"), 24 + 1, "{stats}");
}

#[test]
fn a_prompt_longer_than_the_context_is_an_error_not_a_truncation() {
    let model = model_path();
    let long = "word ".repeat(100);
    let o = llama(&["run", "-m", model.to_str().unwrap(), "-p", &long, "-c", "32"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("but the context holds 32"), "{}", stderr(&o));
}

#[test]
fn invalid_values_name_the_field() {
    let model = model_path();
    let m = model.to_str().unwrap();
    for (args, expect) in [
        (vec!["--top-p", "1.5"], "--top-p"),
        (vec!["--temp", "-1"], "--temp"),
        (vec!["--top-k", "-2"], "--top-k"),
        (vec!["--min-p", "2"], "--min-p"),
        (vec!["-c", "0"], "context length"),
        (vec!["-t", "0"], "threads"),
        (vec!["-l", "nonsense"], "logit-bias"),
    ] {
        let mut a = vec!["run", "-m", m, "-p", "x"];
        a.extend_from_slice(&args);
        let o = llama(&a);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
    }
}
