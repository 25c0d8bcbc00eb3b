//! Multi-turn chat: prompt-cache reuse through the library, `llama chat` with piped stdin
//! and through a pseudo-terminal.

use std::time::Duration;

use llama_host::chat::{ChatTemplate, Conversation};
use llama_host::{GenerateOptions, SamplingParams};
use llama_tests::{assert_exit, llama_bin, llama_cmd, model, model_path, session_params, stderr, stdout};

/// One test of this file at a time: each decodes with llama.cpp's thread pool (in this
/// process or a `llama` child), and two at once on 2 cores slow each other down many times
/// over (OpenMP threads spin while they wait): the interactive test once waited 180 s for
/// a 100-token reply beside another test's decoding.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn greedy(max: u32) -> GenerateOptions {
    GenerateOptions {
        max_tokens: Some(max),
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        add_special: false,
        ..Default::default()
    }
}

#[test]
fn turn_three_decodes_only_its_new_tokens() {
    let _serial = serial();
    let m = model();
    let tmpl = ChatTemplate::for_model(m).unwrap();
    let mut s = m.session(&session_params(4096)).unwrap();
    let mut conv = Conversation::new(Some("You are terse."));
    let mut turns = Vec::new();
    for q in ["What is the capital of France?", "And of Italy?", "And of Spain?"] {
        conv.push("user", q);
        let prompt = tmpl.render(&conv.messages, true).unwrap();
        let before = s.cached_tokens();
        let mut stream = s.stream(&prompt, &greedy(16)).unwrap();
        let reply: String = stream.by_ref().map(Result::unwrap).collect();
        let stats = stream.stats().clone();
        drop(stream);
        conv.push("assistant", reply.trim());
        turns.push((before, stats));
    }
    for (i, (before, st)) in turns.iter().enumerate() {
        eprintln!(
            "turn {}: prompt {} tokens, {} cached, {} decoded (cache held {before})",
            i + 1,
            st.prompt_tokens,
            st.cached_tokens,
            st.decoded_prompt_tokens
        );
    }
    let (_, t2) = &turns[1];
    let (held, t3) = &turns[2];
    assert_eq!(t3.cached_tokens + t3.decoded_prompt_tokens, t3.prompt_tokens);
    // All of turn 2's prompt is reused: nothing of the history is decoded again...
    assert!(t3.cached_tokens >= t2.prompt_tokens, "turn 3 reused {} of turn 2's {} prompt tokens", t3.cached_tokens, t2.prompt_tokens);
    // ...and what is decoded is at most what is new since the cache was filled.
    assert!(t3.decoded_prompt_tokens <= t3.prompt_tokens - t2.prompt_tokens);
    assert!(*held >= t3.cached_tokens);
}

#[test]
fn an_edited_history_drops_exactly_what_no_longer_matches() {
    let _serial = serial();
    let m = model();
    let mut s = m.session(&session_params(2048)).unwrap();
    let base = "The history of the Roman empire is long. ".repeat(4);
    let _: Vec<_> = s.stream(&base, &greedy(4)).unwrap().collect();
    let full = m.tokenize(&base, false).unwrap();
    // Change the last sentence: the shared prefix is reused, the rest decoded.
    let edited = format!("{}The history of Greece is longer.", "The history of the Roman empire is long. ".repeat(3));
    let edited_tokens = m.tokenize(&edited, false).unwrap();
    let common = full.iter().zip(&edited_tokens).take_while(|(a, b)| a == b).count();
    let mut stream = s.stream(&edited, &greedy(2)).unwrap();
    let _: Vec<_> = stream.by_ref().collect();
    let st = stream.stats().clone();
    drop(stream);
    assert_eq!(st.cached_tokens, common);
    assert_eq!(st.decoded_prompt_tokens, edited_tokens.len() - common);
}

#[test]
fn time_to_first_token_with_and_without_the_cache() {
    let _serial = serial();
    // Reported in the notes (not asserted): a turn after 1,000+ tokens of history.
    let m = model();
    let tmpl = ChatTemplate::for_model(m).unwrap();
    let history = "Please remember this list of facts about rivers and mountains. ".repeat(110);
    let mut ttft = Vec::new();
    for cache_tokens in [u32::MAX, 0] {
        let mut s = m.session(&llama_host::SessionParams { cache_tokens, ..session_params(4096) }).unwrap();
        let mut conv = Conversation::new(None);
        conv.push("user", history.as_str());
        let prompt = tmpl.render(&conv.messages, true).unwrap();
        let mut stream = s.stream(&prompt, &greedy(8)).unwrap();
        let reply: String = stream.by_ref().map(Result::unwrap).collect();
        let first_prompt = stream.stats().prompt_tokens;
        drop(stream);
        conv.push("assistant", reply.trim());
        conv.push("user", "Which rivers?");
        let prompt = tmpl.render(&conv.messages, true).unwrap();
        let mut stream = s.stream(&prompt, &greedy(1)).unwrap();
        let _: Vec<_> = stream.by_ref().collect();
        let st = stream.stats().clone();
        assert!(first_prompt >= 1000, "history is only {first_prompt} tokens");
        eprintln!(
            "cache {}: history {first_prompt} tokens, turn 2 prompt {} tokens ({} cached), time to first token {:?}",
            if cache_tokens == 0 { "off" } else { "on" },
            st.prompt_tokens,
            st.cached_tokens,
            st.prompt_time
        );
        ttft.push(st.prompt_time);
    }
    eprintln!("ratio cache on / off: {:.3}", ttft[0].as_secs_f64() / ttft[1].as_secs_f64());
}

#[test]
fn piped_chat_reads_one_turn_per_line_and_reuses_the_cache() {
    let _serial = serial();
    let model = model_path();
    let mut child = llama_cmd(&["chat", "-m", model.to_str().unwrap(), "-n", "8", "--temp", "0", "-t", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Hello!\nHow are you?\n/reset\nHi again.\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    let err = stderr(&o);
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with("llama: prompt")).collect();
    assert_eq!(stats.len(), 3, "{err}");
    assert!(stats[0].contains("(0 cached"), "{}", stats[0]);
    assert!(!stats[1].contains("(0 cached"), "turn 2 reused nothing: {}", stats[1]);
    assert!(err.contains("(conversation reset)"));
    assert!(stats[2].contains("(0 cached"), "after /reset the cache is empty: {}", stats[2]);
    assert!(!stdout(&o).trim().is_empty());
}

#[test]
fn interactive_chat_through_a_terminal() {
    let _serial = serial();
    let model = model_path();
    let mut cmd = std::process::Command::new(llama_bin());
    cmd.args(["chat", "-m", model.to_str().unwrap(), "-n", "100", "--temp", "0", "-t", "2"])
        .env("XDG_DATA_HOME", std::env::temp_dir())
        .env_remove("LLAMA_BACKEND_PATH");
    // Generous: a loaded machine (CI running other tests) is slow, and a timeout here is a
    // failure, not a measurement.
    let mut p = rexpect::session::spawn_command(cmd, Some(180_000)).unwrap();
    p.exp_string("> ").unwrap();
    // Turn 1, short.
    p.send_line("/help").unwrap();
    p.exp_string("/reset").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("Say hello.").unwrap();
    p.exp_string("llama: prompt").unwrap();
    p.exp_string("> ").unwrap();
    // Turn 2, interrupted with Ctrl-C while the reply streams.
    p.send_line("Write a long story about a dragon.").unwrap();
    // Well before 100 tokens are out: the reply (or its prompt) is interrupted.
    std::thread::sleep(Duration::from_millis(300));
    p.send_control('c').unwrap();
    p.exp_string("[stopped]").unwrap();
    p.exp_string("finish cancelled").unwrap();
    p.exp_string("> ").unwrap();
    // Still in the chat: reset, then leave.
    p.send_line("/reset").unwrap();
    p.exp_string("(conversation reset)").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/exit").unwrap();
    p.exp_eof().unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("llama chat ended with {other:?}"),
    }
}

#[test]
fn save_and_load_a_conversation() {
    let _serial = serial();
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conv.json");
    let script = format!("Hello!\n/save {}\n/reset\n/load {}\nBye.\n", file.display(), file.display());
    let mut child = llama_cmd(&["chat", "-m", model.to_str().unwrap(), "-n", "4", "--temp", "0", "--system", "Be brief."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let roles: Vec<&str> = saved["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, vec!["system", "user", "assistant"]);
    assert!(stderr(&o).contains("(loaded 3 messages"), "{}", stderr(&o));
}
