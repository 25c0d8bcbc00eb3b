//! The chat page at `/`, in a real headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, installed by scripts/deps), against the real `llama
//! serve`, the real CPU plugin and the real models. What a person does, the test does:
//! picks a model, types, presses Enter and Stop, reloads, exports and imports files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_tests::server::{wait_for, Server};
use llama_tests::webdriver::{keys, Browser, BrowserOptions};
use llama_tests::{model_path, smollm2_model_path, target_dir};
use serde_json::{json, Value};

fn smol() -> String {
    smollm2_model_path().to_str().unwrap().to_string()
}

/// The name `llama serve` gives a model file: its stem.
fn name_of(path: &Path) -> String {
    path.file_stem().unwrap().to_str().unwrap().to_string()
}

/// A browser on the server's page, the page's scripts loaded.
fn open(s: &Server, opts: BrowserOptions) -> Browser {
    let b = Browser::start(opts);
    b.goto(&s.url("/"));
    b.wait_for("#input");
    b
}

/// Opens the settings, types `value` into the field `id`, closes them (the field's change
/// event stores it in the conversation).
fn set_setting(b: &Browser, id: &str, value: &str) {
    if !b.find("#settings").displayed() {
        b.find("#settings-toggle").click();
    }
    let f = b.wait_for(id);
    f.clear();
    f.send_keys(value);
    b.find("#settings-close").click();
}

/// Picks `model` in the model picker and waits until the server reports it loaded.
fn pick(b: &Browser, model: &str) {
    b.wait_until("the model list arrives", &format!("document.querySelector('#model option[value=\"{model}\"]') !== null"));
    b.find(&format!("#model option[value=\"{model}\"]")).click();
    b.wait_until(&format!("{model} is loaded"), &format!("document.querySelector('#model').value === '{model}' && document.querySelector('#model-status').textContent.startsWith('loaded')"));
}

/// Types `text` into the message box and presses Enter.
fn say(b: &Browser, text: &str) {
    let input = b.find("#input");
    input.send_keys(text);
    input.send_keys(keys::ENTER);
}

/// Waits until the last reply is complete (its statistics line shown) and returns it.
fn last_stats(b: &Browser) -> String {
    b.wait_until("the reply completes with its statistics", "(() => { const s = [...document.querySelectorAll('.msg.assistant')].pop(); return s && s.querySelector('.stats') ? s.querySelector('.stats').textContent : null; })()")
        .as_str()
        .unwrap()
        .to_string()
}

/// Every conversation the page stored (one localStorage key each).
fn stored(b: &Browser) -> Vec<Value> {
    let raw = b.execute("return Object.keys(localStorage).filter(k => k.startsWith('llama.chat.conv.')).map(k => localStorage.getItem(k));", &[]);
    raw.as_array().unwrap().iter().map(|v| serde_json::from_str(v.as_str().unwrap()).unwrap()).collect()
}

/// The conversation this tab has open, as stored.
fn current_conversation(b: &Browser) -> Value {
    let raw = b.execute("return localStorage.getItem('llama.chat.conv.' + sessionStorage.getItem('llama.chat.current'));", &[]);
    serde_json::from_str(raw.as_str().expect("the current conversation is stored")).unwrap()
}

/// No script error in the page. A response with an error status is logged by the browser
/// too ("Failed to load resource"): expected where a test makes the server say 401 or 503.
fn assert_no_script_errors(b: &Browser) {
    let errors: Vec<String> = b.console_errors().into_iter().filter(|e| !e.contains("Failed to load resource: the server responded with a status of")).collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// Where the screenshots go: target/webui-screenshots.
fn screenshot_dir() -> PathBuf {
    target_dir().parent().unwrap().join("webui-screenshots")
}

#[test]
fn a_picked_model_streams_its_reply_into_the_page_which_ends_with_its_statistics() {
    // Two models: the page must really pick one (the second loads on demand).
    let s = Server::start(&["-m", &smol(), "-c", "2048", "-np", "2"]);
    let smol_name = name_of(&smollm2_model_path());
    let b = open(&s, BrowserOptions::default());
    // The browser's console is really read (so the check at the end means something).
    b.execute("console.error('console-probe');", &[]);
    assert!(b.console_errors().iter().any(|e| e.contains("console-probe")), "the browser log is not readable");
    let options: Vec<String> = b.find_all("#model option").iter().map(|o| o.attr("value").unwrap()).collect();
    assert!(options.contains(&smol_name) && options.contains(&name_of(&model_path())), "both models are offered: {options:?}");
    pick(&b, &smol_name);

    // Shift+Enter adds a line; it does not send.
    let input = b.find("#input");
    input.send_keys(&format!("first{}{}{}second", keys::SHIFT, keys::ENTER, keys::NULL));
    assert_eq!(input.prop("value"), json!("first\nsecond"));
    assert_eq!(b.find_all(".msg").len(), 0, "Shift+Enter sent the message");
    input.clear();

    set_setting(&b, "#max-tokens", "48");
    set_setting(&b, "#temperature", "0");
    // Every change of the reply's text while it streams in is recorded.
    b.execute(
        "window.__lengths = []; new MutationObserver(() => { const r = document.querySelector('.msg.assistant .body'); \
         if (r && document.querySelector('#stop') && !document.querySelector('#stop').hidden) window.__lengths.push(r.textContent.length); }) \
         .observe(document.querySelector('#messages'), { childList: true, subtree: true, characterData: true });",
        &[],
    );
    say(&b, "Write a short poem about the sea.");
    let stats = last_stats(&b);
    let lengths: Vec<u64> = b.execute("return window.__lengths;", &[]).as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let mut distinct: Vec<u64> = lengths.iter().copied().filter(|l| *l > 0).collect();
    distinct.dedup();
    assert!(distinct.len() >= 3, "the reply appeared in at least 3 steps before it completed, saw lengths {lengths:?}");
    let reply = b.find(".msg.assistant .body").text();
    assert!(!reply.trim().is_empty(), "an empty reply");
    assert!(stats.contains("48 tokens") && stats.contains("tok/s") && stats.contains("prompt ") && stats.contains("length"), "statistics: {stats}");
    println!("reply in {} DOM steps; statistics: {stats}", distinct.len());

    // The request carried the conversation's settings and went to the picked model.
    let conv = current_conversation(&b);
    assert_eq!(conv["model"], json!(smol_name));
    assert_eq!(conv["settings"]["max_tokens"], json!(48));
    assert_eq!(conv["messages"][1]["stats"]["completion_tokens"], json!(48));

    // Regenerate: the same settings, temperature 0, so the same text, and still one reply.
    b.find(".regenerate").click();
    last_stats(&b);
    assert_eq!(b.find_all(".msg.assistant").len(), 1);
    assert_eq!(b.find(".msg.assistant .body").text(), reply, "a greedy regeneration differs");

    // Edit and resend the question: the conversation is cut there and answered anew.
    b.find(".msg.user .edit").click();
    let area = b.wait_for(".edit-input");
    area.clear();
    area.send_keys("Name three colours.");
    b.find(".edit-send").click();
    b.wait_until("the edited question is sent", "document.querySelector('.msg.user .body') && document.querySelector('.msg.user .body').textContent === 'Name three colours.'");
    last_stats(&b);
    assert_eq!(b.find_all(".msg").len(), 2);
    assert_ne!(b.find(".msg.assistant .body").text(), reply);
    assert_no_script_errors(&b);
}

#[test]
fn stop_ends_the_reply_and_the_server_frees_the_slot_within_a_second() {
    let s = Server::start_with(&smol(), &["-c", "4096", "-np", "2"]);
    let b = open(&s, BrowserOptions::default());
    pick(&b, &name_of(&smollm2_model_path()));
    set_setting(&b, "#max-tokens", "2000");
    // A grammar that cannot end before 1,000 lines: the reply runs until Stop.
    set_setting(&b, "#extra", &json!({"grammar": "root ::= (\"n\" [0-9] [0-9]? \"\\n\"){1000}"}).to_string());
    say(&b, "Count.");
    b.wait_until("the reply has begun", "document.querySelector('.msg.assistant .body') && document.querySelector('.msg.assistant .body').textContent.length > 20");
    assert_eq!(s.metric("llama_active_sequences"), 1.0, "the reply holds a slot while it streams");
    b.find("#stop").click();
    let stopped = Instant::now();
    // The acceptance bound: the slot is free within 1 s of pressing Stop.
    let freed = loop {
        if s.metric("llama_active_sequences") == 0.0 {
            break stopped.elapsed();
        }
        assert!(stopped.elapsed() < Duration::from_secs(1), "a sequence is still active 1 s after Stop:\n{}", s.metrics().0);
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("slot freed {} ms after Stop", freed.as_millis());
    let stats = last_stats(&b);
    assert!(stats.contains("stopped"), "statistics after Stop: {stats}");
    let text = b.find(".msg.assistant .body").text();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.find(".msg.assistant .body").text(), text, "the reply kept growing after Stop");
    assert!(b.find("#send").displayed() && !b.find("#stop").displayed());
    let conv = current_conversation(&b);
    let n = conv["messages"][1]["stats"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 2000, "tokens kept: {n}");
    // The cancelled request is counted as such.
    assert!(s.metric("llama_requests_total{outcome=\"cancelled\"}") >= 1.0, "{}", s.metrics().0);
    assert_no_script_errors(&b);
}

#[test]
fn conversations_survive_a_reload_and_an_export_imports_as_the_same_conversation() {
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "2"]);
    let downloads = tempfile::tempdir().unwrap();
    let b = open(&s, BrowserOptions { download_dir: Some(downloads.path().to_path_buf()), ..BrowserOptions::default() });
    pick(&b, &name_of(&smollm2_model_path()));
    set_setting(&b, "#max-tokens", "16");
    set_setting(&b, "#system-prompt", "You answer briefly.");
    say(&b, "What is the capital of France?");
    last_stats(&b);

    // Rename it.
    b.find("#conversations li.current .conv-rename").click();
    // The field starts with the old title selected: typing replaces it (clearing it would
    // blur it, which ends the edit).
    let title = b.wait_for(".conv-title-edit");
    title.send_keys(&format!("Geography{}", keys::ENTER));
    b.wait_until("the renamed conversation", "document.querySelector('#conversations li.current .conv-open').textContent === 'Geography'");
    let original = current_conversation(&b);
    assert_eq!(original["title"], json!("Geography"));
    assert_eq!(original["settings"]["system"], json!("You answer briefly."));
    assert_eq!(original["messages"].as_array().unwrap().len(), 2);

    // A second conversation, so the reload has to reopen the right one from the list.
    b.find("#new-chat").click();
    b.refresh();
    b.wait_for("#input");
    let listed: Vec<String> = b.find_all("#conversations .conv-open").iter().map(|e| e.text()).collect();
    assert!(listed.contains(&"Geography".to_string()), "listed after reload: {listed:?}");
    let geo = b.find_all("#conversations li").into_iter().find(|li| li.find(".conv-open").text() == "Geography").unwrap();
    geo.find(".conv-open").click();
    b.wait_until("its messages are shown", "document.querySelectorAll('.msg').length === 2");
    assert_eq!(b.find(".msg.user .body").text(), "What is the capital of France?");
    assert_eq!(b.find(".msg.assistant .body").text().trim(), original["messages"][1]["content"].as_str().unwrap().trim());
    let n = original["messages"][1]["stats"]["completion_tokens"].as_u64().unwrap();
    assert!(b.find(".msg.assistant .stats").text().starts_with(&format!("{n} tokens")), "the reply's statistics are kept");

    // Export it; delete it; import the file: the same conversation, id and all.
    b.find("#export").click();
    let file = wait_for("the export is downloaded", || {
        std::fs::read_dir(downloads.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json"))
    });
    let mut text = String::new();
    // The download may still be being written when it first appears.
    let exported: Value = wait_for("the export is complete JSON", || {
        text.clear();
        std::fs::File::open(&file).ok()?.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    });
    assert_eq!(exported["format"], json!("llama-chat"));
    assert_eq!(exported["conversations"][0], original, "the export differs from the stored conversation");

    b.find("#conversations li.current .conv-delete").click();
    assert!(b.alert_text().unwrap().contains("Geography"));
    b.accept_alert();
    b.wait_until("the conversation is deleted", "![...document.querySelectorAll('#conversations .conv-open')].some(e => e.textContent === 'Geography')");

    b.find("#import-file").send_keys(file.to_str().unwrap());
    b.wait_until("the import is listed", "[...document.querySelectorAll('#conversations .conv-open')].some(e => e.textContent === 'Geography')");
    assert_eq!(current_conversation(&b), original, "the imported conversation differs from the exported one");
    assert_eq!(b.find_all(".msg").len(), 2);

    // A file that is not an export is refused, and nothing is lost.
    let bad = downloads.path().join("bad.json");
    std::fs::write(&bad, r#"{"conversations": [{"messages": [{"role": "wizard", "content": 1}]}]}"#).unwrap();
    let before = stored(&b).len();
    b.find("#import-file").send_keys(bad.to_str().unwrap());
    b.wait_until("the refusal is shown", "document.querySelector('#banner-text').textContent.startsWith('Nothing was imported')");
    assert_eq!(stored(&b).len(), before);
    assert_no_script_errors(&b);
}

/// Text a script in the page would set if any part of the payload ran.
const PWNED: &str = "window.__pwned";

#[test]
fn html_script_and_javascript_links_in_a_reply_are_shown_as_text() {
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "2"]);
    let b = open(&s, BrowserOptions::default());
    pick(&b, &name_of(&smollm2_model_path()));
    // A grammar makes the real model's streamed reply exactly the payload (the page sends
    // the conversation's extra request fields with each request).
    let payload = "<img src=x onerror=window.__pwned=1> <script>window.__pwned=2</script> [click me](javascript:window.__pwned=3) <a href=javascript:window.__pwned=4>a link</a> **bold**";
    let code = "<b onmouseover=window.__pwned=5>hi</b>";
    let grammar = format!("root ::= \"{payload}\\n\\n```html\\n{code}\\n```\\n\"");
    set_setting(&b, "#extra", &json!({"grammar": grammar}).to_string());
    set_setting(&b, "#max-tokens", "200");
    say(&b, "Say something.");
    let stats = last_stats(&b);
    assert!(stats.contains("stop"), "the grammar's text ends the reply: {stats}");

    let body = b.find(".msg.assistant .body");
    let text = body.text();
    for part in ["<img src=x onerror=window.__pwned=1>", "<script>window.__pwned=2</script>", "[click me](javascript:window.__pwned=3)", "<a href=javascript:window.__pwned=4>a link</a>", code] {
        assert!(text.contains(part), "{part:?} is not shown as text in {text:?}");
    }
    // Nothing of it became markup: no image, script, or javascript: link anywhere in the
    // page, and the code block is a code block (with its copy button).
    let markup = b.execute(
        "const m = document.querySelector('#messages'); return { img: m.querySelectorAll('img').length, script: m.querySelectorAll('script').length, \
         b: m.querySelectorAll('b').length, links: [...m.querySelectorAll('a')].map(a => a.getAttribute('href')), \
         strong: [...m.querySelectorAll('strong')].map(e => e.textContent), code: [...m.querySelectorAll('pre code')].map(e => e.textContent), \
         copy: m.querySelectorAll('.copy-code').length };",
        &[],
    );
    assert_eq!(markup["img"], json!(0), "{markup}");
    assert_eq!(markup["script"], json!(0), "{markup}");
    assert_eq!(markup["b"], json!(0), "{markup}");
    assert_eq!(markup["links"], json!([]), "{markup}");
    assert_eq!(markup["strong"], json!(["bold"]), "Markdown still works: {markup}");
    assert_eq!(markup["code"], json!([code]), "{markup}");
    assert_eq!(markup["copy"], json!(1), "{markup}");
    // Hover and click everything the payload could have hooked.
    for e in b.find_all("#messages .body *") {
        if e.displayed() {
            e.click();
        }
    }
    assert_eq!(b.execute(&format!("return typeof {PWNED};"), &[]), json!("undefined"), "part of the payload ran");
    // The user's own message is text too.
    b.find("#input").send_keys(&format!("<img src=x onerror={PWNED}=9>"));
    b.find("#input").send_keys(keys::ENTER);
    last_stats(&b);
    assert_eq!(b.execute("return document.querySelectorAll('#messages img').length;", &[]), json!(0));
    assert_eq!(b.execute(&format!("return typeof {PWNED};"), &[]), json!("undefined"));
    assert_no_script_errors(&b);
}

/// Every control in `selectors` that is shown can be clicked where it is: inside the
/// viewport's width, and the element at its centre is the control (nothing covers it).
fn assert_reachable(b: &Browser, selectors: &[&str]) {
    for sel in selectors {
        let r = b.execute(
            "const e = document.querySelector(arguments[0]); if (!e) return 'missing'; e.scrollIntoView({block: 'center', inline: 'nearest'}); \
             const r = e.getBoundingClientRect(); if (r.width === 0 || r.height === 0) return 'not shown'; \
             if (r.left < 0 || r.right > window.innerWidth + 0.5) return `outside the viewport: ${r.left}..${r.right} of ${window.innerWidth}`; \
             const at = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2); \
             return (at === e || e.contains(at) || (e.control && e.control === at)) ? 'ok' : `covered by ${at ? at.outerHTML.slice(0, 80) : 'nothing'}`;",
            &[json!(sel)],
        );
        assert_eq!(r, json!("ok"), "control {sel}");
    }
}

#[test]
fn at_phone_width_every_control_is_reachable_and_both_widths_and_schemes_are_screenshotted() {
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "2"]);
    let b = open(&s, BrowserOptions::default());
    pick(&b, &name_of(&smollm2_model_path()));
    set_setting(&b, "#max-tokens", "40");
    set_setting(&b, "#temperature", "0");
    say(&b, "Show a Python function that adds two numbers, in a code block.");
    last_stats(&b);
    let dir = screenshot_dir();
    let background = |b: &Browser| b.execute("return getComputedStyle(document.body).backgroundColor;", &[]);
    b.set_color_scheme(false);
    let light = background(&b);
    b.set_color_scheme(true);
    let dark = background(&b);
    assert_ne!(light, dark, "the page looks the same in both colour schemes");
    assert_eq!(light, json!("rgb(255, 255, 255)"));
    for (width, height) in [(1280, 800), (390, 844)] {
        b.set_window_size(width, height);
        // At phone width the conversation list slides out of view (a short transition).
        b.wait_until("the list is in its place", "document.querySelector('#sidebar').getBoundingClientRect().left >= 0 || document.querySelector('#sidebar').getBoundingClientRect().right <= 0");
        for dark in [false, true] {
            b.set_color_scheme(dark);
            let scheme = if dark { "dark" } else { "light" };
            assert_eq!(b.execute("return matchMedia('(prefers-color-scheme: dark)').matches;", &[]), json!(dark));
            let shot = dir.join(format!("chat-{width}-{scheme}.png"));
            b.screenshot(&shot);
            assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"), "{}", shot.display());
        }
    }
    b.set_color_scheme(false);
    // 390 px: no sideways scrolling, and every control reachable, the list and the settings
    // behind their buttons.
    assert_eq!(b.execute("return window.innerWidth;", &[]), json!(390));
    assert_eq!(b.execute("return document.documentElement.scrollWidth <= window.innerWidth;", &[]), json!(true), "the page scrolls sideways at 390 px");
    assert_reachable(&b, &["#open-sidebar", "#model", "#settings-toggle", "#input", "#send", ".msg.user .edit", ".msg.assistant .copy-msg", ".msg.assistant .regenerate"]);
    b.find("#open-sidebar").click();
    b.wait_until("the list slides in", "document.querySelector('#sidebar').getBoundingClientRect().left >= 0");
    assert_reachable(&b, &["#new-chat", "#close-sidebar", "#conversations .conv-open", "#conversations .conv-rename", "#conversations .conv-delete", "#export", "#export-all", "#import-label"]);
    b.screenshot(&dir.join("chat-390-light-conversations.png"));
    b.find("#close-sidebar").click();
    b.wait_until("the list slides away", "document.querySelector('#sidebar').getBoundingClientRect().right <= 0");
    b.find("#settings-toggle").click();
    assert_reachable(&b, &["#system-prompt", "#temperature", "#top-p", "#top-k", "#min-p", "#max-tokens", "#seed", "#extra", "#settings-close"]);
    b.screenshot(&dir.join("chat-390-light-settings.png"));
    b.find("#settings-close").click();
    // Still usable there: a message sent at 390 px is answered.
    say(&b, "Hi!");
    b.wait_until("the second reply", "document.querySelectorAll('.msg.assistant .stats').length === 2");
    assert_reachable(&b, &["#send", "#input"]);
    println!("screenshots in {}", dir.display());
    assert_no_script_errors(&b);
}

#[test]
fn with_an_api_key_the_page_asks_for_the_key_and_works_once_it_is_given() {
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "2", "--api-key", "page-test-key"]);
    // The page itself loads without the key; the API does not answer without it.
    assert_eq!(ureq::get(&s.url("/")).call().unwrap().status(), 200);
    assert!(matches!(ureq::get(&s.url("/v1/models")).call(), Err(ureq::Error::Status(401, _))));
    let b = open(&s, BrowserOptions::default());
    b.wait_for("#key-prompt");
    assert!(b.find("#banner-text").text().contains("needs an API key"));
    b.find("#api-key").send_keys(&format!("wrong-key{}", keys::ENTER));
    b.wait_until("the wrong key is refused", "document.querySelector('#banner-text').textContent.includes('refused')");
    assert!(b.find("#key-prompt").displayed());
    b.find("#api-key").send_keys(&format!("page-test-key{}", keys::ENTER));
    b.wait_until("the prompt goes once the key works", "document.querySelector('#key-prompt').hidden && document.querySelectorAll('#model option').length > 0");
    set_setting(&b, "#max-tokens", "12");
    say(&b, "Write a long story about a dragon.");
    let stats = last_stats(&b);
    assert!(stats.contains("12 tokens") && stats.contains("length"), "{stats}");
    assert!(b.find_all(".msg.assistant .error").is_empty());
    // Kept for this tab only, never with the conversations.
    assert_eq!(b.execute("return sessionStorage.getItem('llama.apiKey');", &[]), json!("page-test-key"));
    let everything = b.execute("return JSON.stringify(Object.entries(localStorage));", &[]);
    assert!(everything.as_str().unwrap().contains("Write a long story") && !everything.as_str().unwrap().contains("page-test-key"), "{everything}");
    assert_no_script_errors(&b);
}

#[test]
fn a_busy_server_is_said_so_and_the_page_retries_until_it_is_answered() {
    // One slot and no queue: a second request gets 503 while the first runs.
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "1", "--queue", "0"]);
    let b = open(&s, BrowserOptions::default());
    pick(&b, &name_of(&smollm2_model_path()));
    set_setting(&b, "#max-tokens", "8");
    // Another client holds the slot with a long streamed answer.
    let holder = ureq::post(&s.url("/v1/chat/completions"))
        .send_json(json!({"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 4000, "stream": true}))
        .unwrap();
    let mut held = holder.into_reader();
    let mut first = [0u8; 64];
    held.read_exact(&mut first).unwrap();
    let busy_banner = "!document.querySelector('#banner').hidden && document.querySelector('#banner-text').textContent.includes('busy') && document.querySelector('#banner-text').textContent.includes('retrying')";
    // Stop while the page waits to retry: the reply ends as stopped, the notice goes.
    say(&b, "A question that is stopped.");
    b.wait_until("the page says the server is busy", busy_banner);
    b.find("#stop").click();
    let stats = last_stats(&b);
    assert!(stats.contains("stopped"), "{stats}");
    assert!(b.find("#banner").attr("hidden").is_some(), "the retry notice outlived the Stop");
    assert!(b.find("#send").displayed() && !b.find("#stop").displayed());
    say(&b, "Write a long story about a dragon.");
    b.wait_until("the page says the server is busy", busy_banner);
    // The other client goes away; the page's retry gets the slot.
    drop(held);
    b.wait_until("the second reply is done", "document.querySelectorAll('.msg.assistant .stats').length === 2");
    let stats = last_stats(&b);
    assert!(stats.contains("8 tokens"), "{stats}");
    assert!(b.find("#banner").attr("hidden").is_some(), "the busy notice is still shown after the answer");
    assert!(b.find_all(".msg.assistant .error").is_empty());
    assert_no_script_errors(&b);
    // Both replies were kept, the stopped one with no text.
    let conv = current_conversation(&b);
    assert_eq!(conv["messages"][1]["stats"]["finish"], json!("stopped"));
    assert_eq!(conv["messages"][3]["stats"]["completion_tokens"], json!(8));
}

#[test]
fn the_page_is_served_with_its_security_headers_and_no_webui_turns_it_off() {
    let s = Server::start_with(&smol(), &["-c", "2048"]);
    for path in ["/", "/webui/app.js", "/webui/app.css", "/webui/icon.svg"] {
        let r = ureq::get(&s.url(path)).call().unwrap();
        let csp = r.header("content-security-policy").unwrap_or_default().to_string();
        assert_eq!(
            csp,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'",
            "{path}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        let etag = r.header("etag").unwrap().to_string();
        let len = r.header("content-length").unwrap().to_string();
        let head = ureq::head(&s.url(path)).call().unwrap();
        assert_eq!((head.status(), head.header("content-length").unwrap()), (200, len.as_str()), "{path}");
        assert!(head.into_string().unwrap().is_empty(), "HEAD {path} has a body");
        let again = ureq::get(&s.url(path)).set("If-None-Match", &etag).call().unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    // The same Host and Origin checks as the API.
    assert!(matches!(ureq::get(&s.url("/")).set("Host", "attacker.example").call(), Err(ureq::Error::Status(403, _))));
    assert!(matches!(ureq::get(&s.url("/")).set("Origin", "http://attacker.example").call(), Err(ureq::Error::Status(403, _))));
    assert_eq!(ureq::get(&s.url("/v1/models")).call().unwrap().header("x-content-type-options"), Some("nosniff"));
    drop(s);

    let s = Server::start_with(&smol(), &["-c", "2048", "--no-webui"]);
    match ureq::get(&s.url("/")).call() {
        Err(ureq::Error::Status(404, r)) => assert!(r.into_string().unwrap().contains("--no-webui")),
        other => panic!("/ with --no-webui: {other:?}"),
    }
    assert!(matches!(ureq::get(&s.url("/webui/app.js")).call(), Err(ureq::Error::Status(404, _))));
    assert_eq!(ureq::get(&s.url("/v1/models")).call().unwrap().status(), 200, "the API is unchanged");
}

#[test]
fn a_hostile_import_renders_as_text_and_pathological_markdown_does_not_freeze_the_page() {
    let s = Server::start_with(&smol(), &["-c", "2048"]);
    let b = open(&s, BrowserOptions::default());
    let dir = tempfile::tempdir().unwrap();
    // Markup in every field the page shows, unsafe link targets, and Markdown that made
    // naive patterns backtrack for minutes (a heading, a table rule and a list item over long
    // runs of spaces, a long run of backticks, many unclosed emphasis marks).
    // Each just under the page's caps (8,000 characters a block line, 20,000 an inline
    // line), so the patterns really run on them; and some over, for the long-line path. A
    // pattern that backtracks takes minutes on these and runs into WebDriver's 30 s script
    // timeout (the old heading pattern: 8 s at 4,000 characters, cubic).
    let pathological = [
        format!("# a{}b", " ".repeat(7990)),
        format!("#{}#b", " ".repeat(7990)),
        format!("# {} x", "#".repeat(7990)),
        format!("a | b\n|{}x", " ".repeat(7990)),
        format!("a | b\n--{}x", " ".repeat(7990)),
        format!("-{}y\u{2028}x", " ".repeat(7990)),
        format!("-{}x", " -".repeat(3990)),
        format!("x{}a", "`".repeat(19990)),
        "**a ".repeat(4900),
        "_a ".repeat(6600),
        "~~a".repeat(6600),
        "[".repeat(19000),
        "![a](".repeat(3900),
        format!("http://{}", ".".repeat(19000)),
        format!("> {}", ">".repeat(5000)),
        format!("# a{}b", " ".repeat(200000)),
        format!("a | b\n{}x", " ".repeat(200000)),
    ]
    .join("\n\n");
    let reply = format!(
        "```\"><img src=x onerror={PWNED}=12>\ncode\n```\n\n[x](javascript:{PWNED}=13) [y](JAVASCRIPT:{PWNED}=14) [z](data:text/html,<script>{PWNED}=15</script>) \
         ![i](http://example.com/a.png)\n\nsee https://example.com/path and [label https://a.example](https://b.example)\n\n{pathological}"
    );
    let conversation = json!({
        "id": "hostile-1",
        "title": format!("<img src=x onerror={PWNED}=10>"),
        "model": format!("\"><img src=x onerror={PWNED}=11>"),
        "settings": {"system": "<script>x</script>", "temperature": "hot", "extra": "{\"a\":1}"},
        "messages": [
            {"role": "user", "content": format!("<script>{PWNED}=16</script>")},
            {"role": "assistant", "content": reply, "reasoning": format!("<img src=x onerror={PWNED}=17>"),
             "error": format!("<script>{PWNED}=18</script>"), "stats": {"completion_tokens": 3, "finish": "<b>x</b>"}},
        ],
    });
    let file = dir.path().join("hostile.json");
    std::fs::write(&file, json!({"format": "llama-chat", "version": 1, "conversations": [conversation]}).to_string()).unwrap();
    b.find("#import-file").send_keys(file.to_str().unwrap());
    b.wait_until("the import is shown", "document.querySelectorAll('.msg').length === 2");
    let took = b.execute("const t = performance.now(); document.querySelector('#new-chat').click(); document.querySelector('li[data-id=\"hostile-1\"] .conv-open').click(); return performance.now() - t;", &[]);
    println!("rendering the pathological conversation took {took} ms");
    let seen = b.execute(
        "const m = document.querySelector('#app'); return { img: m.querySelectorAll('img').length, script: document.querySelectorAll('script').length, \
         nested: m.querySelectorAll('a a').length, links: [...m.querySelectorAll('#messages a')].map(a => a.getAttribute('href')), \
         title: document.querySelector('li[data-id=\"hostile-1\"] .conv-open').textContent, error: document.querySelector('.msg .error').textContent, \
         reasoning: document.querySelector('.msg .reasoning div').textContent, stats: document.querySelector('.msg .stats').textContent, \
         user: document.querySelector('.msg.user .body').textContent, body: document.querySelector('.msg.assistant .body').textContent.length };",
        &[],
    );
    assert_eq!(seen["img"], json!(0), "{seen}");
    // The page's own script tag only.
    assert_eq!(seen["script"], json!(1), "{seen}");
    assert_eq!(seen["nested"], json!(0), "a link inside a link: {seen}");
    assert_eq!(seen["links"], json!(["http://example.com/a.png", "https://example.com/path", "https://b.example/"]), "{seen}");
    assert_eq!(seen["title"], json!(format!("<img src=x onerror={PWNED}=10>")));
    assert_eq!(seen["user"], json!(format!("<script>{PWNED}=16</script>")));
    assert_eq!(seen["error"], json!(format!("<script>{PWNED}=18</script>")));
    assert_eq!(seen["reasoning"], json!(format!("<img src=x onerror={PWNED}=17>")));
    assert!(seen["stats"].as_str().unwrap().contains("<b>x</b>"), "{seen}");
    assert!(seen["body"].as_u64().unwrap() > 500_000, "the long lines are all shown: {seen}");
    // A setting of the wrong type is dropped, not used.
    assert_eq!(current_conversation(&b)["settings"]["temperature"], Value::Null);
    for e in b.find_all("#messages .body a, #messages .body code, #messages .reasoning summary") {
        if e.displayed() {
            e.click();
            let _ = b.execute("window.focus();", &[]);
        }
    }
    assert_eq!(b.execute(&format!("return typeof {PWNED};"), &[]), json!("undefined"), "part of the import ran");
    assert_no_script_errors(&b);
}

#[test]
fn two_tabs_share_the_conversations_without_overwriting_each_other() {
    let s = Server::start_with(&smol(), &["-c", "2048", "-np", "2"]);
    let b = open(&s, BrowserOptions::default());
    let a = b.tab();
    set_setting(&b, "#max-tokens", "6");
    say(&b, "First tab's question.");
    last_stats(&b);
    let b_tab = b.new_tab();
    b.switch_to(&b_tab);
    b.goto(&s.url("/"));
    b.wait_for("#input");
    // The second tab lists the first tab's conversation and opens its own.
    b.wait_until("the other tab's conversation is listed", "document.querySelectorAll('#conversations .conv-open').length === 1");
    b.find("#new-chat").click();
    set_setting(&b, "#max-tokens", "6");
    // The first tab streams a long reply while the second starts another conversation.
    b.switch_to(&a);
    set_setting(&b, "#max-tokens", "400");
    set_setting(&b, "#extra", &json!({"grammar": "root ::= (\"n\" [0-9] [0-9]? \"\\n\"){1000}"}).to_string());
    say(&b, "Count.");
    b.wait_until("the first tab's reply has begun", "document.querySelector('.msg.assistant:last-child .body') && document.querySelector('.msg.assistant:last-child .body').textContent.length > 20");
    b.switch_to(&b_tab);
    say(&b, "Second tab's question.");
    b.wait_until("both replies are done", "document.querySelectorAll('.msg.assistant .stats').length === 1");
    b.switch_to(&a);
    last_stats(&b);
    b.wait_until("the first tab's second reply is done", "document.querySelectorAll('.msg.assistant .stats').length === 2");
    // Every conversation of both tabs is stored, and each tab kept its own open.
    let titles: Vec<String> = stored(&b).iter().map(|c| c["title"].as_str().unwrap().to_string()).collect();
    assert_eq!(titles.len(), 2, "{titles:?}");
    assert!(titles.contains(&"First tab's question.".to_string()) && titles.contains(&"Second tab's question.".to_string()), "{titles:?}");
    assert_eq!(current_conversation(&b)["title"], json!("First tab's question."));
    assert_eq!(current_conversation(&b)["messages"].as_array().unwrap().len(), 4);
    let listed = b.find_all("#conversations .conv-open").len();
    assert_eq!(listed, 2, "the first tab lists the second tab's conversation");
    assert_no_script_errors(&b);
    b.switch_to(&b_tab);
    assert_eq!(current_conversation(&b)["title"], json!("Second tab's question."));
    assert_no_script_errors(&b);
}
