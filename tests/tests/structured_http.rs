//! Structured output and tool calls over HTTP, through the real binary, plugin and models:
//! the official `openai` Python client (response_format, its `parse` helper, tools with
//! tool_choice, its streaming helpers, a round trip), bad constraints answered 400 with the
//! server serving on, and reasoning blocks split into `reasoning_content`.

use std::path::Path;

use llama_tests::server::{sse_events, Server};
use llama_tests::smollm2_model_path;
use serde_json::{json, Value};

fn smol(extra: &[&str]) -> Server {
    let s = Server::start_with(smollm2_model_path().to_str().unwrap(), extra);
    s.wait_ready();
    s
}

#[test]
fn the_official_openai_client_gets_structured_output_and_tool_calls() {
    let s = smol(&[]);
    llama_tests::run_python_client("openai_structured.py", &s.base);
}

/// A request that must work after each bad one: the server serves on.
fn still_serving(s: &Server) {
    let (code, v) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}));
    assert_eq!(code, 200, "{v}");
}

fn nested(depth: usize) -> String {
    // {"type":"array","items":{"type":"array","items": ... {}}}
    let mut s = String::new();
    for _ in 0..depth {
        s.push_str("{\"type\":\"array\",\"items\":");
    }
    s.push_str("{}");
    s.push_str(&"}".repeat(depth));
    s
}

#[test]
fn bad_constraints_get_400_naming_the_problem() {
    let s = smol(&["--max-body", "16777216"]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let tool = |parameters: Value| json!([{"type": "function", "function": {"name": "f", "parameters": parameters}}]);
    let huge_grammar = format!("root ::= \"a\"\n{}", "x ::= \"b\"\n".repeat(1_000_000));
    assert!(huge_grammar.len() >= 10_000_000);
    let cases: Vec<(&str, String, &str)> = vec![
        ("GBNF that does not parse", chat(json!({"grammar": "root ::= (\"a\" | "})).to_string(), "grammar"),
        ("an undefined rule", chat(json!({"grammar": "root ::= answer"})).to_string(), "answer"),
        ("an unsupported schema keyword", chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}})).to_string(), "'not'"),
        ("a schema nested 10,000 deep", format!("{{\"prompt\": \"x\", \"json_schema\": {}}}", nested(10_000)), "nested deeper than 128"),
        ("a schema nested 100 deep", format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}], \"json_schema\": {}}}", nested(100)), "deep"),
        (
            "a $ref cycle with no base case",
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}})).to_string(),
            "base case",
        ),
        (
            "an object that requires itself",
            chat(json!({"json_schema": {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}})).to_string(),
            "base case",
        ),
        ("a grammar of 10 MB", chat(json!({"grammar": huge_grammar})).to_string(), "1048576"),
        ("a tool whose parameters is not a schema", chat(json!({"tools": tool(json!("a string"))})).to_string(), "'f'"),
        ("a tool whose parameters has a bad type", chat(json!({"tools": tool(json!({"type": "object", "properties": {"a": {"type": "strange"}}}))})).to_string(), "'f'"),
        ("a tool with a bad name", chat(json!({"tools": [{"type": "function", "function": {"name": "no spaces allowed", "parameters": {}}}]})).to_string(), "name"),
        ("tool_choice naming no tool", chat(json!({"tools": tool(json!({"type": "object"})), "tool_choice": {"type": "function", "function": {"name": "g"}}})).to_string(), "'g'"),
        ("two constraints at once", chat(json!({"grammar": "root ::= \"a\"", "json_schema": {"type": "object"}})).to_string(), "together"),
        ("an unknown response_format", chat(json!({"response_format": {"type": "xml"}})).to_string(), "xml"),
        ("an unknown reasoning_format", chat(json!({"reasoning_format": "loud"})).to_string(), "reasoning_format"),
    ];
    for (what, body, needle) in cases {
        let (code, v) = match ureq::post(&s.url("/v1/chat/completions")).set("Content-Type", "application/json").send_string(&body) {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(e) => panic!("{what}: {e}"),
        };
        let message = v["error"]["message"].as_str().unwrap_or_default().to_string();
        eprintln!("{what}: {code} {message} (param {})", v["error"]["param"]);
        assert_eq!(code, 400, "{what}: {v}");
        assert!(message.contains(needle), "{what}: '{needle}' not in {message}");
        still_serving(&s);
    }
}

#[test]
fn a_grammar_over_the_body_limit_is_refused_by_size() {
    let s = smol(&[]);
    let body = json!({"prompt": "x", "grammar": "x".repeat(10 << 20)}).to_string();
    match ureq::post(&s.url("/v1/completions")).set("Content-Type", "application/json").send_string(&body) {
        Err(ureq::Error::Status(413, r)) => eprintln!("10 MB grammar, default --max-body: 413 {}", r.into_string().unwrap()),
        // The server may close before reading it all.
        Err(ureq::Error::Transport(t)) => eprintln!("10 MB grammar: connection closed: {t}"),
        other => panic!("{other:?}"),
    }
    still_serving(&s);
}

#[test]
fn a_reasoning_block_goes_to_reasoning_content() {
    let s = smol(&[]);
    let grammar = "root ::= \"<think>\" [a-z ]{1,20} \"</think>\" [A-Za-z ]{1,20}";
    let body = |format: Option<&str>, stream: bool| {
        let mut b = json!({"messages": [{"role": "user", "content": "Hi"}], "grammar": grammar, "max_tokens": 60, "temperature": 0, "stream": stream});
        if let Some(f) = format {
            b["reasoning_format"] = json!(f);
        }
        b
    };
    let (code, v) = s.post("/v1/chat/completions", &body(None, false));
    assert_eq!(code, 200, "{v}");
    let m = &v["choices"][0]["message"];
    eprintln!("auto: {m}");
    let reasoning = m["reasoning_content"].as_str().expect("reasoning_content");
    assert!(!reasoning.is_empty() && !reasoning.contains("think"), "{m}");
    assert!(!m["content"].as_str().unwrap().contains("<think>"), "{m}");
    // none: the block stays in the content.
    let (_, v) = s.post("/v1/chat/completions", &body(Some("none"), false));
    let m = &v["choices"][0]["message"];
    eprintln!("none: {m}");
    assert!(m["content"].as_str().unwrap().starts_with("<think>") && m.get("reasoning_content").is_none(), "{m}");
    // Streamed: reasoning deltas first, then content deltas, the same text.
    let r = ureq::post(&s.url("/v1/chat/completions")).send_json(body(None, true)).unwrap();
    let (mut streamed_reasoning, mut streamed_content) = (String::new(), String::new());
    for e in sse_events(r) {
        if e == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(&e).unwrap();
        let d = &c["choices"][0]["delta"];
        if let Some(t) = d["reasoning_content"].as_str() {
            assert!(streamed_content.is_empty(), "reasoning after content: {e}");
            streamed_reasoning.push_str(t);
        }
        if let Some(t) = d["content"].as_str() {
            streamed_content.push_str(t);
        }
    }
    assert_eq!(streamed_reasoning, reasoning);
    assert_eq!(Some(streamed_content.as_str()), v_content(&s, &body(None, false)).as_deref());
}

fn v_content(s: &Server, body: &Value) -> Option<String> {
    let (_, v) = s.post("/v1/chat/completions", body);
    v["choices"][0]["message"]["content"].as_str().map(str::to_string)
}

#[test]
fn a_json_schema_on_completions_and_a_stream_of_tool_calls() {
    let s = smol(&[]);
    // llama-server's json_schema on /v1/completions.
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"], "additionalProperties": false});
    let (code, v) = s.post("/v1/completions", &json!({"prompt": "A number as JSON:", "json_schema": schema, "max_tokens": 40, "temperature": 0}));
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    let doc: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!((1..=9).contains(&doc["n"].as_i64().unwrap()), "{doc}");
    // Streamed tool calls: index, id, type and name first, then argument fragments that
    // concatenate to the arguments of the same request unstreamed.
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]);
    let req = |stream: bool| json!({"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": tools, "tool_choice": "required", "max_tokens": 80, "temperature": 0, "stream": stream});
    let (code, whole) = s.post("/v1/chat/completions", &req(false));
    assert_eq!(code, 200, "{whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls", "{whole}");
    let call = &whole["choices"][0]["message"]["tool_calls"][0];
    let r = ureq::post(&s.url("/v1/chat/completions")).send_json(req(true)).unwrap();
    let events = sse_events(r);
    let deltas: Vec<Value> = events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str::<Value>(e).unwrap()).collect();
    let calls: Vec<&Value> = deltas.iter().filter_map(|d| d["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert!(calls.len() >= 2, "{events:?}");
    let first = calls[0];
    assert_eq!(first["index"], 0);
    assert_eq!(first["type"], "function");
    assert_eq!(first["function"]["name"], "add");
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    assert!(calls[1..].iter().all(|c| c.get("id").is_none() && c["function"].get("name").is_none()), "{calls:?}");
    let args: String = calls.iter().map(|c| c["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(args, call["function"]["arguments"].as_str().unwrap());
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert!(parsed["a"].is_i64() && parsed["b"].is_i64(), "{parsed}");
    assert_eq!(deltas.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

/// A model whose template writes Hermes-style calls (`<tool_call>…</tool_call>`): the
/// format is taken from the template, `required` constrains from the first token, `auto`
/// lazily once the model opens a call, and history with calls and results renders.
#[test]
fn a_hermes_template_gets_hermes_calls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[models.hermes]\npath = {:?}\nchat-template = {:?}\n",
            smollm2_model_path().to_str().unwrap(),
            root.join("tests/fixtures/templates/hermes-tools.jinja").to_str().unwrap()
        ),
    )
    .unwrap();
    let s = Server::spawn(&["--config", config.to_str().unwrap(), "-m", "hermes", "-v"]);
    s.wait_ready();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]);
    let ask = |choice: Value, messages: Value| json!({"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": 80, "temperature": 0});
    let user = json!([{"role": "user", "content": "What is the weather in Oslo?"}]);
    let (code, v) = s.post("/v1/chat/completions", &ask(json!("required"), user.clone()));
    assert_eq!(code, 200, "{v}");
    eprintln!("required: {}", v["choices"][0]);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = v["choices"][0]["message"]["tool_calls"][0].clone();
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    // auto: whatever the model chooses, the answer is well formed (a call that parses, or text).
    let (code, v) = s.post("/v1/chat/completions", &ask(json!("auto"), user.clone()));
    assert_eq!(code, 200, "{v}");
    eprintln!("auto: {}", v["choices"][0]);
    let m = &v["choices"][0]["message"];
    if let Some(calls) = m["tool_calls"].as_array() {
        for c in calls {
            serde_json::from_str::<Value>(c["function"]["arguments"].as_str().unwrap()).unwrap();
        }
    } else {
        assert!(!m["content"].as_str().unwrap().contains("<tool_call>"), "{m}");
    }
    // The round trip: the call and its result in the history.
    let mut history = user.as_array().unwrap().clone();
    history.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
    history.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "{\"celsius\": 4}"}));
    let (code, v) = s.post("/v1/chat/completions", &ask(json!("none"), Value::Array(history)));
    assert_eq!(code, 200, "{v}");
    eprintln!("after the result: {}", v["choices"][0]);
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}
