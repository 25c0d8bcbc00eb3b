//! Grammar-constrained sampling through the real CPU plugin, on Gemma 3 and SmolLM2: the
//! output matches the grammar exactly, bad grammars are typed parameter errors (llama.cpp's
//! own message, or the bounds checked before llama.cpp sees the text), lazy grammars wait
//! for their trigger, and two sequences of one context keep their own grammars.

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

use llama_host::{
    BackendChoice, Backends, BatchToken, ContextParams, ContextSize, DiscoveryOptions, GenerateError, GenerateOptions, Grammar, LogitBias,
    Model, ModelParams, SampleRequest, SamplingParams,
};
use llama_tests::{llama_bin, session_params, shared_model, smollm2_model_path};

fn smollm2() -> &'static Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let opts = DiscoveryOptions { backend_dirs: Vec::new(), env_path: None, exe: Some(llama_bin()), user_dir: None, isolation: None };
        let mut backends = Backends::discover(&opts);
        let backend = backends.select(BackendChoice::Named("cpu".into())).expect("the CPU plugin in target/release");
        Arc::new(Model::load(&backend, smollm2_model_path(), &ModelParams::default()).expect("SmolLM2 loads"))
    })
}

fn models() -> [(&'static str, &'static Arc<Model>); 2] {
    [("gemma", shared_model()), ("smollm2", smollm2())]
}

fn opts(grammar: Option<Grammar>, temperature: f32, max: u32) -> GenerateOptions {
    GenerateOptions { max_tokens: Some(max), sampling: SamplingParams { temperature, seed: 7, grammar, ..Default::default() }, ..Default::default() }
}

fn generate(model: &Model, prompt: &str, o: &GenerateOptions) -> Result<String, GenerateError> {
    let mut s = model.session(&session_params(512)).unwrap();
    let mut out = String::new();
    s.generate(prompt, o, |t| {
        out.push_str(t);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

fn invalid_grammar(r: Result<impl std::fmt::Debug, GenerateError>) -> String {
    match r {
        Err(GenerateError::InvalidParam { field, reason }) if field == "grammar" => reason,
        other => panic!("not an invalid grammar: {other:?}"),
    }
}

#[test]
fn yes_or_no_is_all_a_yes_no_grammar_lets_out() {
    for (name, model) in models() {
        for temp in [0.0, 0.8] {
            let out = generate(model, "Is the sky green? Answer:", &opts(Some(Grammar::new(r#"root ::= "yes" | "no""#)), temp, 16)).unwrap();
            // The grammar completes after one word: only end-of-generation is left, so the
            // output ends there (well before 16 tokens).
            assert!(out == "yes" || out == "no", "{name} at temperature {temp}: {out:?}");
        }
    }
}

#[test]
fn a_json_grammar_gives_json_that_parses() {
    let g = Grammar::new(
        r#"root ::= "{\"answer\": " num ", \"sure\": " bool "}"
num ::= [0-9]{1,3}
bool ::= "true" | "false"  # a comment (with a parenthesis"#,
    );
    for (name, model) in models() {
        let out = generate(model, "What is 6 times 7? Reply in JSON.", &opts(Some(g.clone()), 0.0, 40)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {out:?}: {e}"));
        assert!(v["answer"].is_u64() && v["sure"].is_boolean(), "{name}: {out}");
    }
}

#[test]
fn a_grammar_that_does_not_parse_is_an_invalid_param_with_where_and_why() {
    let model = shared_model();
    for (text, says) in [
        // Refused by the Rust parser, with the line and column.
        (r#"root ::= "unterminated"#, "line 1, column 10: unterminated string"),
        (r#"root ::= undefined-rule"#, "line 1, column 10: undefined rule 'undefined-rule'"),
        (r#"other ::= "a""#, "no rule 'root'"),
        ("root ::= (\"a\"\n  | \"b\" ]", "line 2, column 9: expecting ')'"),
        // Left recursion, refused before llama.cpp's exponential check.
        (r#"root ::= root "a" | "b""#, "line 1, column 1: rule 'root' is left-recursive"),
    ] {
        let reason = invalid_grammar(model.check_grammar(&Grammar::new(text)));
        assert!(reason.contains(says), "{text}: {reason}");
        // The same refusal when a generation asks for it: never an unconstrained generation.
        let reason = invalid_grammar(generate(model, "Hi", &opts(Some(Grammar::new(text)), 0.0, 4)));
        assert!(reason.contains(says), "{text}: {reason}");
    }
    assert_eq!(model.check_grammar(&Grammar::new(r#"root ::= "yes" | "no""#)).unwrap(), ());
}

#[test]
fn huge_and_deep_grammars_are_refused_before_llama_cpp() {
    let model = shared_model();
    let big = Grammar::new(format!("root ::= \"{}\"", "a".repeat(2 << 20)));
    assert!(invalid_grammar(model.check_grammar(&big)).contains("bytes"));
    let deep = Grammar::new(format!("root ::= {}\"a\"{}", "(".repeat(1000), ")".repeat(1000)));
    assert!(invalid_grammar(model.check_grammar(&deep)).contains("nest"));
    let rep = Grammar::new(r#"root ::= "a"{0,50000}"#);
    assert!(invalid_grammar(model.check_grammar(&rep)).contains("50000"));
    // The longest chain of rules the bounds let through parses on a test thread's stack
    // (llama.cpp recurses along it).
    let chain: String = (0..1998).map(|i| format!("r{i} ::= r{} \"x\"\n", i + 1)).collect::<String>() + "r1998 ::= \"x\"\nroot ::= r0\n";
    model.check_grammar(&Grammar::new(chain)).unwrap();
}

#[test]
fn bad_triggers_are_refused_without_reaching_a_cpp_exception() {
    let model = shared_model();
    let lazy = |patterns: &[&str], tokens: &[i32]| Grammar {
        lazy: true,
        trigger_patterns: patterns.iter().map(|p| p.to_string()).collect(),
        trigger_tokens: tokens.to_vec(),
        ..Grammar::new(r#"root ::= "x""#)
    };
    let reason = invalid_grammar(model.check_grammar(&lazy(&["(unclosed"], &[])));
    assert!(reason.contains("trigger pattern 0") && reason.contains("not supported"), "{reason}");
    // The regex crate (linear time) has no look-around: refused by name, not mis-matched.
    let reason = invalid_grammar(model.check_grammar(&lazy(&[r"^(?!\s*<think>)\s*(\{[\s\S]*)"], &[])));
    assert!(reason.contains(r"(?!\\s*<think>)") && reason.contains("look-around"), "{reason}");
    let reason = invalid_grammar(model.check_grammar(&lazy(&[], &[-1])));
    assert!(reason.contains("vocabulary"), "{reason}");
    model.check_grammar(&lazy(&[r"[\s\S]*?(<tool>)"], &[])).unwrap();
}

#[test]
fn a_lazy_grammar_waits_for_its_trigger_pattern() {
    let model = smollm2();
    let prompt = "The capital of France is";
    let free = generate(model, prompt, &opts(None, 0.0, 12)).unwrap();
    // A word of the free output (not its first) triggers the grammar; what follows it is
    // then the grammar's.
    let word = free
        .split(|c: char| !c.is_ascii_alphabetic())
        .skip(1)
        .find(|w| w.len() >= 3 && free.find(w) == free.rfind(w))
        .unwrap_or_else(|| panic!("no trigger word in {free:?}"));
    let at = free.find(word).unwrap();
    let g = Grammar { lazy: true, trigger_patterns: vec![word.to_string()], ..Grammar::new(format!("root ::= \"{word}\" \" 42.\"")) };
    let out = generate(model, prompt, &opts(Some(g), 0.0, 24)).unwrap();
    assert_eq!(out, format!("{}{word} 42.", &free[..at]), "free output: {free:?}");
}

/// The trigger spans two tokens and its capture starts inside the second one: the grammar
/// is fed the rest of that token (its text re-tokenized) and constrains what follows.
#[test]
fn a_lazy_grammar_fires_on_a_trigger_split_across_tokens() {
    let model = smollm2();
    let prompt = "The capital of France is";
    let free = generate(model, prompt, &opts(None, 0.0, 12)).unwrap();
    let alpha = |w: &str| w.len() >= 3 && w.chars().all(|c| c.is_ascii_alphabetic());
    let words: Vec<&str> = free.split(' ').collect();
    let (w1, w2) = words
        .windows(2)
        .map(|p| (p[0], p[1]))
        .find(|&(a, b)| alpha(a) && alpha(b) && free.matches(&format!("{a} {b}")).count() == 1)
        .unwrap_or_else(|| panic!("no two words to trigger on in {free:?}"));
    let end = free.find(&format!("{w1} {w2}")).unwrap() + w1.len() + 1 + w2.len();
    let tail = &w2[1..];
    let g = Grammar {
        lazy: true,
        trigger_patterns: vec![format!("{w1} {}({tail})", &w2[..1])],
        ..Grammar::new(format!("root ::= \"{tail}\" \" 42.\""))
    };
    let out = generate(model, prompt, &opts(Some(g), 0.0, 24)).unwrap();
    assert_eq!(out, format!("{} 42.", &free[..end]), "free output: {free:?}");
}

#[test]
fn a_dead_end_grammar_ends_the_generation_with_an_error() {
    let model = shared_model();
    // The only token the grammar allows is banned: nothing can follow.
    let mut o = opts(Some(Grammar::new("root ::= <[1000]>")), 0.0, 4);
    o.sampling.logit_bias = vec![LogitBias { token: 1000, bias: f32::NEG_INFINITY }];
    let reason = invalid_grammar(generate(model, "Hi", &o));
    assert!(reason.contains("dead end"), "{reason}");
}

/// The serve engine's path: one context, two sequences, each with its own grammar
/// (`set_seq_sampling`, with the prompt as penalty history only), sampled in one step.
#[test]
fn two_sequences_of_one_context_keep_their_own_grammars() {
    for (name, model) in models() {
        let size = ContextSize { n_ctx: 512, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() };
        let mut ctx = model.new_context(&ContextParams { size, n_seq_max: 2, ..ContextParams::default() }).unwrap();
        let prompt = model.tokenize("Pick one:", true).unwrap();
        let grammars = [r#"root ::= "yes" | "no""#, r#"root ::= "abc" [0-9]"#];
        for (seq, g) in grammars.iter().enumerate() {
            let p = SamplingParams { temperature: 0.7, seed: 3, repeat_penalty: 1.1, grammar: Some(Grammar::new(*g)), ..Default::default() };
            ctx.set_seq_sampling(seq as i32, &p, &prompt).unwrap();
        }
        let mut batch: Vec<BatchToken> = Vec::new();
        for seq in 0..2 {
            for (i, &t) in prompt.iter().enumerate() {
                batch.push(BatchToken { token: t, pos: i as i32, seq, logits: i + 1 == prompt.len() });
            }
        }
        let mut samples = vec![SampleRequest::new(0, prompt.len() as i32 - 1), SampleRequest::new(1, 2 * prompt.len() as i32 - 1)];
        let mut texts = [Vec::new(), Vec::new()];
        let mut pos = prompt.len() as i32;
        for _ in 0..12 {
            if samples.is_empty() {
                break;
            }
            let sampled: Vec<_> = ctx.step(&batch, &samples).unwrap().into_iter().map(Result::unwrap).collect();
            batch.clear();
            let mut next = Vec::new();
            for (r, s) in samples.iter().zip(&sampled) {
                if s.is_eog {
                    continue;
                }
                texts[r.seq as usize].extend(model.token_bytes(s.token, false).unwrap());
                next.push(SampleRequest::new(r.seq, batch.len() as i32));
                batch.push(BatchToken { token: s.token, pos, seq: r.seq, logits: true });
            }
            pos += 1;
            samples = next;
        }
        assert!(samples.is_empty(), "{name}: a sequence did not end");
        let [a, b] = texts.map(|t| String::from_utf8(t).unwrap());
        assert!(a == "yes" || a == "no", "{name}: {a:?}");
        assert!(b.len() == 4 && b.starts_with("abc") && b.as_bytes()[3].is_ascii_digit(), "{name}: {b:?}");
    }
}

/// A grammar dead end in one sequence of a step is that sequence's error only: the
/// sequence batched with it (another client's, without a grammar) is sampled in the same
/// step and goes on to generate exactly what it generates alone.
#[test]
fn a_dead_end_in_one_sequence_leaves_the_other_sequence_of_the_step_alone() {
    let model = smollm2();
    let prompt = model.tokenize("The capital of France is", true).unwrap();
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    // The only token the grammar allows is banned: a dead end at the first sample.
    let dead = SamplingParams {
        grammar: Some(Grammar::new("root ::= <[1000]>")),
        logit_bias: vec![LogitBias { token: 1000, bias: f32::NEG_INFINITY }],
        ..greedy.clone()
    };
    let run = |with_dead_end: bool| -> Vec<i32> {
        let size = ContextSize { n_ctx: 512, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() };
        let mut ctx = model.new_context(&ContextParams { size, n_seq_max: 2, ..ContextParams::default() }).unwrap();
        ctx.set_seq_sampling(0, &greedy, &prompt).unwrap();
        let mut batch: Vec<BatchToken> =
            prompt.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i as i32, seq: 0, logits: i + 1 == prompt.len() }).collect();
        let mut samples = vec![SampleRequest::new(0, prompt.len() as i32 - 1)];
        if with_dead_end {
            ctx.set_seq_sampling(1, &dead, &prompt).unwrap();
            batch.extend(prompt.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i as i32, seq: 1, logits: i + 1 == prompt.len() }));
            samples.push(SampleRequest::new(1, batch.len() as i32 - 1));
        }
        let mut first = ctx.step(&batch, &samples).expect("the step as a whole succeeds");
        assert_eq!(first.len(), samples.len());
        if with_dead_end {
            match first.pop().unwrap() {
                Err(llama_host::BackendError::InvalidParam { field, reason }) => {
                    assert_eq!(field, "grammar");
                    assert!(reason.contains("sequence 1") && reason.contains("dead end"), "{reason}");
                }
                other => panic!("the dead-end sequence sampled {other:?}"),
            }
            // The engine frees the failed sequence's cells; the survivor goes on alone.
            assert!(ctx.seq_remove(1, 0, -1));
        }
        let mut out = vec![first.pop().unwrap().expect("the other sequence is sampled").token];
        let mut pos = prompt.len() as i32;
        while out.len() < 16 {
            let batch = [BatchToken { token: *out.last().unwrap(), pos, seq: 0, logits: true }];
            let s = ctx.step(&batch, &[SampleRequest::new(0, 0)]).unwrap().pop().unwrap().unwrap();
            if s.is_eog {
                break;
            }
            out.push(s.token);
            pos += 1;
        }
        out
    };
    let alone = run(false);
    assert!(alone.len() > 4, "{alone:?}");
    assert_eq!(run(true), alone);
}

/// `a ::= "x" a "y" | "x" a "z"` doubles llama.cpp's grammar stacks on every `x` (and each
/// token costs quadratic time in them, on the compute thread all sequences share): the
/// sequence ends with a grammar error once they pass the bound, within a few tokens and
/// quickly, while the sequence batched with it samples exactly what it samples alone.
#[test]
fn an_exponentially_ambiguous_grammar_ends_its_sequence_only() {
    let model = smollm2();
    let prompt = model.tokenize("Write x:", true).unwrap();
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let doubling = SamplingParams { grammar: Some(Grammar::new("root ::= a\na ::= \"x\" a \"y\" | \"x\" a \"z\"")), ..greedy.clone() };
    let run = |with_doubling: bool| -> (Vec<i32>, Option<String>) {
        let size = ContextSize { n_ctx: 512, n_threads: 2, n_threads_batch: 2, ..ContextSize::default() };
        let mut ctx = model.new_context(&ContextParams { size, n_seq_max: 2, ..ContextParams::default() }).unwrap();
        let seqs: &[i32] = if with_doubling { &[0, 1] } else { &[0] };
        let mut batch = Vec::new();
        let mut samples = Vec::new();
        for &seq in seqs {
            ctx.set_seq_sampling(seq, if seq == 0 { &greedy } else { &doubling }, &prompt).unwrap();
            batch.extend(prompt.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i as i32, seq, logits: i + 1 == prompt.len() }));
            samples.push(SampleRequest::new(seq, batch.len() as i32 - 1));
        }
        let (mut out, mut error, mut pos) = (Vec::new(), None, prompt.len() as i32);
        for _ in 0..40 {
            if samples.is_empty() {
                break;
            }
            let t = std::time::Instant::now();
            let results = ctx.step(&batch, &samples).expect("the step as a whole succeeds");
            eprintln!("step: {:?}", t.elapsed());
            let (mut next_batch, mut next) = (Vec::new(), Vec::new());
            for (r, res) in samples.iter().zip(results) {
                match res {
                    Ok(s) if s.is_eog => {}
                    Ok(s) => {
                        if r.seq == 0 {
                            out.push(s.token);
                        }
                        next.push(SampleRequest::new(r.seq, next_batch.len() as i32));
                        next_batch.push(BatchToken { token: s.token, pos, seq: r.seq, logits: true });
                    }
                    Err(llama_host::BackendError::InvalidParam { field, reason }) if r.seq == 1 && field == "grammar" => {
                        error = Some(reason);
                        assert!(ctx.seq_remove(1, 0, -1));
                    }
                    Err(e) => panic!("sequence {}: {e:?}", r.seq),
                }
            }
            batch = next_batch;
            samples = next;
            pos += 1;
        }
        (out, error)
    };
    let (alone, _) = run(false);
    let t = std::time::Instant::now();
    let (together, error) = run(true);
    let error = error.expect("the ambiguous grammar's sequence ends with a grammar error");
    assert!(error.contains("too ambiguous"), "{error}");
    assert_eq!(together, alone);
    eprintln!("both runs with the doubling grammar: {:?}; {error}", t.elapsed());
}

/// llama.cpp's own trigger search (libstdc++'s regex) recursed per character of output,
/// about 300 bytes more per group around the repeated part: with 21 nested groups a 2 MiB
/// thread (this test's) overflowed after 313 characters. The search is now the regex
/// crate's, which does not recurse.
#[test]
fn a_long_untriggered_output_does_not_overflow_a_small_stack() {
    let model = smollm2();
    let pattern = format!(r"{}[\s\S]{}*?(<tool_call>[\s\S]*)", "(".repeat(21), ")".repeat(21));
    let g = Grammar { lazy: true, trigger_patterns: vec![pattern], ..Grammar::new(r#"root ::= "<tool_call>" [a-z]*"#) };
    let mut o = opts(Some(g), 0.8, 160);
    o.sampling.seed = 11;
    // SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: the story never ends by itself.
    o.sampling.logit_bias = (0..3).map(|token| LogitBias { token, bias: f32::NEG_INFINITY }).collect();
    let out = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || generate(model, "Write a long story about a fox who lives in a forest.", &o))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert!(out.len() > 400 && !out.contains("<tool_call>"), "{} bytes: {out:?}", out.len());
}

/// A trigger that never comes: the output is searched without bound (the old search had a
/// byte limit per pattern cost: 200 groups allowed under 2,000 bytes, and took quadratic
/// time), and generation speed does not fall as the output grows.
#[test]
fn a_trigger_that_never_comes_costs_no_growing_time() {
    let model = smollm2();
    let pattern = format!("{}\\x01{}", "(".repeat(200), ")".repeat(200));
    let tool_call = r"^[\s\S]*?(<tool_call>[\s\S]*)".to_string();
    let g = Grammar { lazy: true, trigger_patterns: vec![pattern, tool_call], ..Grammar::new(r#"root ::= "<tool_call>""#) };
    let mut o = opts(Some(g), 0.8, 440);
    o.sampling.seed = 5;
    // SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: the story never ends by itself.
    o.sampling.logit_bias = (0..3).map(|token| LogitBias { token, bias: f32::NEG_INFINITY }).collect();
    let mut s = model.session(&session_params(512)).unwrap();
    let mut out = String::new();
    let mut times = Vec::new();
    let t0 = std::time::Instant::now();
    s.generate("Write a long story about a fox who lives in a forest.", &o, |t| {
        out.push_str(t);
        times.push(t0.elapsed());
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(out.len() > 1500 && !out.contains("<tool_call>"), "{} bytes: {out:?}", out.len());
    let n = times.len();
    let per = |a: usize, b: usize| (times[b] - times[a]) / (b - a) as u32;
    println!("{} bytes, {n} tokens: {:?} per token over the first 100, {:?} over the last 100", out.len(), per(0, 100), per(n - 101, n - 1));
}

