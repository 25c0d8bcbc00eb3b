//! Anthropic's Messages API through the real binary and model: the official `anthropic`
//! Python client (whole and streamed answers, its stream helper, a tool round trip,
//! count_tokens, stop sequences, structured output, its `x-api-key`), the raw event
//! sequence, and bad input answered in Anthropic's error shape with the server serving on.

use std::io::{BufRead, BufReader};

use llama_tests::server::Server;
use llama_tests::{model_path, smollm2_model_path};
use serde_json::{json, Value};

fn smol(extra: &[&str]) -> Server {
    let s = Server::start_with(smollm2_model_path().to_str().unwrap(), extra);
    s.wait_ready();
    s
}

fn model_name() -> String {
    smollm2_model_path().file_stem().unwrap().to_string_lossy().into_owned()
}

#[test]
fn the_official_anthropic_client_works_with_an_api_key() {
    let s = smol(&["--api-key", "t0p-secret"]);
    llama_tests::run_python_client_with("anthropic_client.py", &[&s.base, "t0p-secret", &model_name()]);
}

/// Posts `body` as is (it may not be JSON) with `headers`: the status, the Retry-After
/// header and the body as JSON.
fn post_raw(s: &Server, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut req = ureq::post(&s.url(path)).set("content-type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.send_string(body) {
        Ok(r) => (r.status(), r.header("retry-after").map(str::to_string), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.header("retry-after").map(str::to_string), r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// A good request after each bad one: the server serves on.
fn still_serving(s: &Server, headers: &[(&str, &str)]) {
    let body = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let (code, _, v) = post_raw(s, "/v1/messages", &body, headers);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["type"], "message", "{v}");
}

/// Anthropic's error object, with the expected type.
fn assert_error(what: &str, v: &Value, kind: &str) -> String {
    assert_eq!(v["type"], "error", "{what}: {v}");
    assert_eq!(v["error"]["type"], kind, "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: no message in {v}")).to_string();
    assert!(v.as_object().unwrap().len() == 2 && v["error"].as_object().unwrap().len() == 2, "{what}: {v}");
    message
}

#[test]
fn bad_input_gets_anthropics_error_shape_and_the_server_serves_on() {
    let s = smol(&["--max-body", "8192"]);
    let user = json!([{"role": "user", "content": "Hi"}]);
    let image = json!([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]);
    let cases: Vec<(&str, &str, String, u16, &str, &str)> = vec![
        ("malformed JSON", "/v1/messages", "{\"max_tokens\": 5,".into(), 400, "invalid_request_error", "invalid request"),
        ("max_tokens of the wrong type", "/v1/messages", json!({"max_tokens": "five", "messages": user}).to_string(), 400, "invalid_request_error", "invalid type"),
        ("messages of the wrong type", "/v1/messages", json!({"max_tokens": 5, "messages": "Hi"}).to_string(), 400, "invalid_request_error", "invalid type"),
        ("missing max_tokens", "/v1/messages", json!({"messages": user}).to_string(), 400, "invalid_request_error", "max_tokens: Field required"),
        ("max_tokens 0", "/v1/messages", json!({"max_tokens": 0, "messages": user}).to_string(), 400, "invalid_request_error", "max_tokens: must be at least 1"),
        ("missing messages", "/v1/messages", json!({"max_tokens": 5}).to_string(), 400, "invalid_request_error", "messages: Field required"),
        ("an unknown model", "/v1/messages", json!({"model": "no-such-model", "max_tokens": 5, "messages": user}).to_string(), 404, "not_found_error", "no-such-model"),
        ("an image block", "/v1/messages", json!({"max_tokens": 5, "messages": image}).to_string(), 400, "invalid_request_error", "messages.0.content.1: image blocks are not supported"),
        (
            "an unknown block type",
            "/v1/messages",
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}).to_string(),
            400,
            "invalid_request_error",
            "messages.0.content.0: 'hologram' blocks are not supported",
        ),
        (
            "a server tool",
            "/v1/messages",
            json!({"max_tokens": 5, "messages": user, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}).to_string(),
            400,
            "invalid_request_error",
            "tools.0.type",
        ),
        (
            "a tool_choice naming no tool",
            "/v1/messages",
            json!({"max_tokens": 5, "messages": user, "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}}).to_string(),
            400,
            "invalid_request_error",
            "'g'",
        ),
        (
            "a schema in output_config.format that is not one",
            "/v1/messages",
            json!({"max_tokens": 5, "messages": user, "output_config": {"format": {"type": "json_schema", "schema": {"type": "strange"}}}}).to_string(),
            400,
            "invalid_request_error",
            "invalid output_config.format",
        ),
        ("too many stop sequences", "/v1/messages", json!({"max_tokens": 5, "messages": user, "stop_sequences": vec!["x"; 17]}).to_string(), 400, "invalid_request_error", "stop"),
        ("a body over --max-body", "/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(10_000)}]}).to_string(), 413, "request_too_large", "8192"),
        ("count_tokens with an image", "/v1/messages/count_tokens", json!({"messages": image}).to_string(), 400, "invalid_request_error", "messages.0.content.1: image"),
        ("count_tokens for an unknown model", "/v1/messages/count_tokens", json!({"model": "nope", "messages": user}).to_string(), 404, "not_found_error", "nope"),
    ];
    for (what, path, body, status, kind, needle) in cases {
        let (code, _, v) = post_raw(&s, path, &body, &[]);
        eprintln!("{what}: {code} {v}");
        assert_eq!(code, status, "{what}: {v}");
        let message = assert_error(what, &v, kind);
        assert!(message.contains(needle), "{what}: '{needle}' not in '{message}'");
        still_serving(&s, &[]);
    }
    // A route of this dialect with the wrong method is answered in its shape too.
    match ureq::get(&s.url("/v1/messages")).call() {
        Err(ureq::Error::Status(405, r)) => {
            assert_error("GET /v1/messages", &r.into_json().unwrap(), "invalid_request_error");
        }
        other => panic!("GET /v1/messages: {other:?}"),
    }
}

#[test]
fn a_wrong_or_missing_key_is_an_authentication_error() {
    let s = smol(&["--api-key", "k3y"]);
    let body = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    for (what, headers) in [("no key", &[][..]), ("a wrong x-api-key", &[("x-api-key", "nope")][..]), ("a wrong Bearer", &[("authorization", "Bearer nope")][..])] {
        let (code, _, v) = post_raw(&s, "/v1/messages", &body, headers);
        assert_eq!(code, 401, "{what}: {v}");
        assert_error(what, &v, "authentication_error");
    }
    still_serving(&s, &[("x-api-key", "k3y")]);
    still_serving(&s, &[("authorization", "Bearer k3y")]);
    let (code, _, v) = post_raw(&s, "/v1/messages/count_tokens", &json!({"messages": [{"role": "user", "content": "Hi"}]}).to_string(), &[("x-api-key", "k3y")]);
    assert_eq!(code, 200, "{v}");
    assert!(v["input_tokens"].as_u64().is_some_and(|n| n > 0), "{v}");
}

/// The raw stream: `event:` names in Anthropic's order, each with its JSON data whose
/// `type` is the event's name, as text/event-stream.
#[test]
fn a_stream_is_anthropics_event_sequence() {
    let s = smol(&[]);
    let body = json!({"max_tokens": 12, "temperature": 0, "stream": true, "messages": [{"role": "user", "content": "Say hello."}]});
    let r = ureq::post(&s.url("/v1/messages")).send_json(body.clone()).unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let lines: Vec<String> = BufReader::new(r.into_reader()).lines().map_while(Result::ok).collect();
    let mut events: Vec<(String, Value)> = Vec::new();
    for pair in lines.split(|l| l.is_empty()).filter(|p| !p.is_empty()) {
        assert_eq!(pair.len(), 2, "{pair:?}");
        let name = pair[0].strip_prefix("event: ").unwrap_or_else(|| panic!("{pair:?}")).to_string();
        let data: Value = serde_json::from_str(pair[1].strip_prefix("data: ").unwrap_or_else(|| panic!("{pair:?}"))).unwrap();
        assert_eq!(data["type"], name.as_str(), "{pair:?}");
        events.push((name, data));
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).filter(|n| *n != "ping").collect();
    eprintln!("{names:?}");
    assert_eq!(names[..2], ["message_start", "content_block_start"]);
    assert_eq!(names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    assert!(names[2..names.len() - 3].iter().all(|n| *n == "content_block_delta"), "{names:?}");
    let text: String = events.iter().filter(|(n, _)| n == "content_block_delta").map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string()).collect();
    let (_, start) = &events[0];
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    // The same request whole: the same text, reason and counts.
    let mut whole = body;
    whole["stream"] = json!(false);
    let (code, v) = s.post("/v1/messages", &whole);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["content"][0]["text"], text.as_str(), "{v}");
    assert_eq!(v["stop_reason"], delta["delta"]["stop_reason"], "{v}");
    assert_eq!(v["usage"]["output_tokens"], delta["usage"]["output_tokens"], "{v}");
    assert_eq!(v["usage"]["input_tokens"], start["message"]["usage"]["input_tokens"], "{v}");
    assert_eq!(v["id"].as_str().map(|id| id.starts_with("msg_")), Some(true), "{v}");
}

/// With one slot and no queue, a second request while the first runs is answered 503
/// `overloaded_error` with Retry-After, and served once the first is gone.
#[test]
fn a_full_server_answers_overloaded_with_retry_after() {
    let s = smol(&["--parallel", "1", "--queue", "0"]);
    // A grammar that never ends: the first request holds the slot until it is dropped.
    let r = ureq::post(&s.url("/v1/completions")).send_json(json!({"prompt": "x", "max_tokens": 4000, "stream": true, "grammar": "root ::= \"ab\" root"})).unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    let body = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let (code, retry, v) = post_raw(&s, "/v1/messages", &body, &[]);
    assert_eq!(code, 503, "{v}");
    assert_eq!(retry.as_deref(), Some("1"), "{v}");
    assert_error("a full server", &v, "overloaded_error");
    drop(reader);
    llama_tests::server::wait_for("the slot is freed", || Some(s.metric("llama_active_sequences")).filter(|n| *n == 0.0));
    still_serving(&s, &[]);
}

/// The events of a streamed answer, `ping`s left out.
fn stream_events(s: &Server, body: &Value) -> Vec<(String, Value)> {
    let r = ureq::post(&s.url("/v1/messages")).send_json(body.clone()).unwrap();
    let lines: Vec<String> = BufReader::new(r.into_reader()).lines().map_while(Result::ok).collect();
    lines
        .split(|l| l.is_empty())
        .filter(|p| p.len() == 2)
        .map(|p| (p[0].trim_start_matches("event: ").to_string(), serde_json::from_str(p[1].trim_start_matches("data: ")).unwrap()))
        .filter(|(n, _): &(String, Value)| n != "ping")
        .collect()
}

/// A call cut short by `max_tokens`: its partial `tool_use` block, then `max_tokens`,
/// never the call's text again as a `text` block (as Anthropic streams it). Ids are the
/// server's, unique per answer.
#[test]
fn a_streamed_call_cut_short_by_max_tokens_is_not_repeated_as_text() {
    let s = smol(&[]);
    let tools = json!([{"name": "weather", "description": "Describe the weather.", "input_schema": {"type": "object", "properties": {"a_very_long_description_of_the_weather_in_the_city": {"type": "string"}}, "required": ["a_very_long_description_of_the_weather_in_the_city"]}}]);
    let body = json!({"max_tokens": 20, "temperature": 0, "stream": true, "tools": tools, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Describe the weather in Paris at length."}]});
    let events = stream_events(&s, &body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("{names:?}");
    let starts: Vec<&str> = events.iter().filter(|(n, _)| n == "content_block_start").map(|(_, d)| d["content_block"]["type"].as_str().unwrap()).collect();
    let first_call = starts.iter().position(|t| *t == "tool_use").unwrap_or_else(|| panic!("no tool_use block: {events:?}"));
    assert!(starts[first_call..].iter().all(|t| *t == "tool_use"), "a block after the call: {starts:?}");
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens", "{events:?}");
    assert_eq!(names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    // Message ids: the server's, a new one per answer.
    let id = |events: &[(String, Value)]| events[0].1["message"]["id"].as_str().unwrap().to_string();
    let again = stream_events(&s, &body);
    assert!(id(&events).starts_with("msg_") && id(&events) != id(&again), "{} {}", id(&events), id(&again));
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    whole["max_tokens"] = json!(200);
    let (code, a) = s.post("/v1/messages", &whole);
    let (_, b) = s.post("/v1/messages", &whole);
    assert_eq!(code, 200, "{a}");
    assert_ne!(a["id"], b["id"]);
    let (ca, cb) = (&a["content"].as_array().unwrap().last().unwrap()["id"], &b["content"].as_array().unwrap().last().unwrap()["id"]);
    assert!(ca.as_str().unwrap().starts_with("toolu_") && ca != cb, "{a} {b}");
}

/// Consecutive turns of one role are one turn (as Anthropic merges them): Gemma's
/// template, which requires the roles to alternate, takes them.
#[test]
fn consecutive_user_turns_are_merged_for_a_template_that_needs_alternation() {
    let gemma = format!("gemma={}", model_path().display());
    let s = Server::start_with(&gemma, &[]);
    s.wait_ready();
    let body = json!({"model": "gemma", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}]});
    let (code, v) = s.post("/v1/messages", &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["type"], "message", "{v}");
    let (code, v) = s.post("/v1/messages/count_tokens", &body);
    assert_eq!(code, 200, "{v}");
}
