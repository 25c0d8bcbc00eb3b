//! Ollama's API (`/api/*`) through the real binary and models: the official `ollama`
//! Python client end to end; bad input answered as Ollama's `{"error": …}` with the right
//! status and the server serving on; streams as NDJSON ending with one `done` line; and
//! the same greedy text as the OpenAI routes for the same prompt (raw and templated).

use std::io::{BufRead, BufReader};

use llama_tests::server::Server;
use llama_tests::{model_path, smollm2_model_path};
use serde_json::{json, Value};

/// SmolLM2 as `smol` (the default) and Gemma as `gemma`, both able to embed.
fn both_models() -> Server {
    let smol = format!("smol={}", smollm2_model_path().display());
    let gemma = format!("gemma={}", model_path().display());
    let s = Server::start_with(&smol, &["-m", gemma.as_str(), "--models-max", "2", "--pooling", "mean"]);
    s.wait_ready();
    s
}

/// Sends `body` as is (it may not be JSON) with `method`.
fn send(s: &Server, method: &str, path: &str, body: &str) -> (u16, Value) {
    match ureq::request(method, &s.url(path)).set("content-type", "application/json").send_string(body) {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// The lines of an NDJSON answer, each parsed.
fn ndjson(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let r = ureq::post(&s.url(path)).send_json(body.clone()).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    BufReader::new(r.into_reader()).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
}

#[test]
fn the_official_ollama_client_lists_shows_generates_chats_calls_tools_embeds_and_unloads() {
    let smol = format!("smol={}", smollm2_model_path().display());
    let s = Server::start_with(&smol, &["--pooling", "mean"]);
    s.wait_ready();
    llama_tests::run_python_client("ollama_client.py", &s.base);
}

#[test]
fn bad_input_gets_an_ollama_error_with_its_status_and_the_server_serves_on() {
    let s = both_models();
    let gen = |extra: Value| {
        let mut body = json!({"model": "smol", "prompt": "Hello", "stream": false, "options": {"num_predict": 2}});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body.to_string()
    };
    let chat = |extra: Value| {
        let mut body = json!({"model": "smol", "messages": [{"role": "user", "content": "Hello"}], "stream": false});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body.to_string()
    };
    let cases: Vec<(&str, &str, &str, String, u16, &str)> = vec![
        ("malformed JSON", "POST", "/api/generate", "{\"model\": \"smol\", ".into(), 400, "invalid request"),
        ("a body that is not an object", "POST", "/api/chat", "[1, 2]".into(), 400, "invalid request"),
        ("options.temperature as a string", "POST", "/api/generate", gen(json!({"options": {"temperature": "hot"}})), 400, "options.temperature"),
        ("options.num_predict below -2", "POST", "/api/generate", gen(json!({"options": {"num_predict": -3}})), 400, "options.num_predict"),
        ("options.temperature below 0", "POST", "/api/generate", gen(json!({"options": {"temperature": -1}})), 400, "invalid options.temperature"),
        ("options.top_k not a whole number", "POST", "/api/generate", gen(json!({"options": {"top_k": 1.5}})), 400, "options.top_k"),
        ("options as an array", "POST", "/api/generate", gen(json!({"options": [1]})), 400, "invalid options"),
        ("seventeen stop strings", "POST", "/api/chat", chat(json!({"options": {"stop": vec!["x"; 17]}})), 400, "options.stop"),
        ("messages not an array", "POST", "/api/chat", chat(json!({"messages": "Hello"})), 400, "invalid messages"),
        ("a message without a role", "POST", "/api/chat", chat(json!({"messages": [{"content": "Hello"}]})), 400, "invalid messages"),
        ("stream as a string", "POST", "/api/generate", gen(json!({"stream": "yes"})), 400, "invalid stream"),
        ("a bad keep_alive", "POST", "/api/generate", gen(json!({"keep_alive": "soon"})), 400, "keep_alive"),
        ("a bad format", "POST", "/api/chat", chat(json!({"format": "yaml"})), 400, "format must be"),
        ("a schema that is not one", "POST", "/api/chat", chat(json!({"format": {"type": "strange"}})), 400, "invalid format"),
        (
            "format with tools",
            "POST",
            "/api/chat",
            chat(json!({"format": "json", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})),
            400,
            "format and tools",
        ),
        ("an unknown model", "POST", "/api/generate", gen(json!({"model": "nope"})), 404, "model 'nope' not found"),
        ("an unknown model in chat", "POST", "/api/chat", chat(json!({"model": "nope"})), 404, "model 'nope' not found"),
        ("an unknown model shown", "POST", "/api/show", json!({"model": "nope"}).to_string(), 404, "model 'nope' not found"),
        ("an unknown model embedded", "POST", "/api/embed", json!({"model": "nope", "input": "a"}).to_string(), 404, "model 'nope' not found"),
        ("an unknown model in the legacy route", "POST", "/api/embeddings", json!({"model": "nope", "prompt": ""}).to_string(), 404, "model 'nope' not found"),
        ("unloading an unknown model", "POST", "/api/generate", json!({"model": "nope", "keep_alive": 0}).to_string(), 404, "model 'nope' not found"),
        ("images", "POST", "/api/generate", gen(json!({"images": ["aGVsbG8="]})), 400, "images"),
        ("images in a message", "POST", "/api/chat", chat(json!({"messages": [{"role": "user", "content": "Hi", "images": ["aGVsbG8="]}]})), 400, "images"),
        ("a suffix", "POST", "/api/generate", gen(json!({"suffix": "end"})), 400, "suffix"),
        ("a template", "POST", "/api/generate", gen(json!({"template": "{{ .Prompt }}"})), 400, "template"),
        ("a context", "POST", "/api/generate", gen(json!({"context": [1, 2, 3]})), 400, "context"),
        ("an embed input of numbers", "POST", "/api/embed", json!({"model": "smol", "input": [1, 2]}).to_string(), 400, "not a string"),
        ("an embed input longer than the context", "POST", "/api/embed", json!({"model": "smol", "input": "word ".repeat(9000)}).to_string(), 400, "limit is"),
        ("a prompt longer than the context", "POST", "/api/generate", gen(json!({"prompt": "word ".repeat(9000)})), 400, "limit is"),
        ("pull", "POST", "/api/pull", json!({"model": "llama3"}).to_string(), 501, "--models-dir"),
        ("push", "POST", "/api/push", json!({"model": "llama3"}).to_string(), 501, "-m NAME=FILE"),
        ("create", "POST", "/api/create", json!({"model": "x", "from": "smol"}).to_string(), 501, "/api/create is not supported"),
        ("copy", "POST", "/api/copy", json!({"source": "smol", "destination": "x"}).to_string(), 501, "/api/copy is not supported"),
        ("delete", "DELETE", "/api/delete", json!({"model": "smol"}).to_string(), 501, "/api/delete is not supported"),
    ];
    for (what, method, path, body, status, needle) in cases {
        let (code, v) = send(&s, method, path, &body);
        assert_eq!(code, status, "{what}: {v}");
        // Ollama's shape: one string, nothing else.
        let obj = v.as_object().unwrap_or_else(|| panic!("{what}: {v}"));
        assert_eq!(obj.len(), 1, "{what}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
        assert!(msg.contains(needle), "{what}: {msg}");
        let (code, ok) = s.post("/api/generate", &json!({"model": "smol", "prompt": "Still there?", "stream": false, "options": {"num_predict": 2}}));
        assert_eq!(code, 200, "after {what}: {ok}");
        assert_eq!(ok["done"], true, "after {what}: {ok}");
    }
    // A wrong method on a known route, and an unknown route, in Ollama's shape too.
    let (code, v) = send(&s, "GET", "/api/chat", "");
    assert_eq!((code, v["error"].is_string()), (405, true), "{v}");
    let (code, v) = send(&s, "GET", "/api/nothing", "");
    assert_eq!((code, v["error"].is_string()), (404, true), "{v}");
    // Nothing refused was left running.
    assert_eq!(s.metrics().get("llama_requests_in_flight"), 0.0);
}

#[test]
fn streams_are_ndjson_pieces_then_one_done_line_and_match_the_whole_answer() {
    let s = both_models();
    for (path, model) in [("/api/generate", "smol"), ("/api/chat", "gemma")] {
        let mut body = json!({"model": model, "options": {"temperature": 0, "num_predict": 12}});
        if path == "/api/generate" {
            body["prompt"] = json!("Name three colours.");
        } else {
            body["messages"] = json!([{"role": "user", "content": "Name three colours."}]);
        }
        let lines = ndjson(&s, path, &body);
        let (last, pieces) = lines.split_last().unwrap();
        assert!(pieces.len() >= 2, "{lines:?}");
        for p in pieces {
            assert_eq!((p["done"].as_bool(), p["model"].as_str()), (Some(false), Some(model)), "{p}");
            assert!(p["created_at"].as_str().unwrap().ends_with('Z'), "{p}");
        }
        assert_eq!(last["done"], true, "{last}");
        let reason = last["done_reason"].as_str().unwrap();
        let eval_count = last["eval_count"].as_u64().unwrap();
        assert!((reason == "length" && eval_count == 12) || (reason == "stop" && (1..=12).contains(&eval_count)), "{last}");
        assert!(last["prompt_eval_count"].as_u64().unwrap() > 0, "{last}");
        for k in ["total_duration", "load_duration", "prompt_eval_duration", "eval_duration"] {
            assert!(last[k].is_u64(), "{k}: {last}");
        }
        let text: String = pieces
            .iter()
            .map(|p| if path == "/api/generate" { p["response"].as_str() } else { p["message"]["content"].as_str() }.unwrap().to_string())
            .collect();
        body["stream"] = json!(false);
        let (code, whole) = s.post(path, &body);
        assert_eq!(code, 200, "{whole}");
        let whole_text = if path == "/api/generate" { &whole["response"] } else { &whole["message"]["content"] };
        assert_eq!(whole_text.as_str().unwrap(), text, "{path}");
        assert_eq!(whole["eval_count"], eval_count);
        assert_eq!(whole["done_reason"], reason);
    }
}

#[test]
fn generate_renders_like_the_openai_routes_raw_and_templated() {
    let s = both_models();
    for model in ["smol", "gemma"] {
        let opts = json!({"temperature": 0, "num_predict": 10});
        // raw: the prompt as is, as /v1/completions.
        let (code, raw) =
            s.post("/api/generate", &json!({"model": model, "prompt": "The capital of France is", "raw": true, "stream": false, "options": opts}));
        assert_eq!(code, 200, "{raw}");
        let (code, openai) = s.post("/v1/completions", &json!({"model": model, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 10}));
        assert_eq!(code, 200, "{openai}");
        assert_eq!(raw["response"], openai["choices"][0]["text"], "{model} raw");
        // Not raw: system and prompt through the chat template, as /v1/chat/completions.
        let (code, templated) = s.post(
            "/api/generate",
            &json!({"model": model, "system": "Answer briefly.", "prompt": "What is the capital of France?", "stream": false, "options": opts}),
        );
        assert_eq!(code, 200, "{templated}");
        let messages = json!([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]);
        let (code, openai) = s.post("/v1/chat/completions", &json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 10}));
        assert_eq!(code, 200, "{openai}");
        assert_eq!(templated["response"], openai["choices"][0]["message"]["content"], "{model} templated");
        assert_eq!(templated["prompt_eval_count"], openai["usage"]["prompt_tokens"], "{model}");
        // /api/chat is the same conversation.
        let (code, chat) = s.post("/api/chat", &json!({"model": model, "messages": messages, "stream": false, "options": opts}));
        assert_eq!(code, 200, "{chat}");
        assert_eq!(chat["message"]["content"], templated["response"], "{model} chat");
        assert_eq!(chat["message"]["role"], "assistant");
    }
}

#[test]
fn an_empty_prompt_loads_keep_alive_zero_unloads_and_embed_matches_v1() {
    let s = both_models();
    let loaded = |s: &Server| -> Vec<String> {
        let v: Value = ureq::get(&s.url("/api/ps")).call().unwrap().into_json().unwrap();
        v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    assert!(!loaded(&s).contains(&"gemma".to_string()));
    let (code, v) = s.post("/api/chat", &json!({"model": "gemma", "messages": []}));
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["done_reason"].as_str(), v["message"]["content"].as_str()), (Some("load"), Some("")), "{v}");
    assert!(loaded(&s).contains(&"gemma".to_string()));
    let (code, v) = s.post("/api/generate", &json!({"model": "gemma", "keep_alive": 0}));
    assert_eq!((code, v["done_reason"].as_str()), (200, Some("unload")), "{v}");
    assert!(!loaded(&s).contains(&"gemma".to_string()));
    // Unloading a model that is not loaded does not load it.
    let (code, v) = s.post("/api/chat", &json!({"model": "gemma", "messages": [], "keep_alive": "0s"}));
    assert_eq!((code, v["done_reason"].as_str()), (200, Some("unload")), "{v}");
    assert!(!loaded(&s).contains(&"gemma".to_string()));
    // /api/embed: the same vectors as /v1/embeddings (both L2-normalised).
    let (code, ours) = s.post("/api/embed", &json!({"model": "gemma", "input": ["a cat", "a dog"]}));
    assert_eq!(code, 200, "{ours}");
    let (code, v1) = s.post("/v1/embeddings", &json!({"model": "gemma", "input": ["a cat", "a dog"]}));
    assert_eq!(code, 200, "{v1}");
    for i in 0..2 {
        let a: Vec<f64> = ours["embeddings"][i].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let b: Vec<f64> = v1["data"][i]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "input {i}");
    }
    assert_eq!(ours["prompt_eval_count"], v1["usage"]["prompt_tokens"]);
    // The legacy route: one vector, not normalised (as Ollama's).
    let (code, legacy) = s.post("/api/embeddings", &json!({"model": "gemma", "prompt": "a cat"}));
    assert_eq!(code, 200, "{legacy}");
    let norm: f64 = legacy["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "{norm}");
}

/// Integer options as whole floats (as Go's Ollama takes them); `/api/show` of a model
/// whose file has no template (Gemma: the server's built-in one chats and calls tools);
/// `/api/embed` of nothing loads the model and answers no vectors.
#[test]
fn whole_float_options_show_without_a_file_template_and_an_empty_embed() {
    let s = both_models();
    let (code, v) = s.post("/api/generate", &json!({"model": "smol", "prompt": "Hi", "stream": false, "options": {"num_predict": 2.0, "top_k": 5.0, "seed": 1.0, "repeat_last_n": 64.0, "num_ctx": 2048.0}}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["eval_count"], 2, "{v}");
    let (code, v) = s.post("/api/show", &json!({"model": "gemma"}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["capabilities"], json!(["completion", "tools"]), "{v}");
    let (code, v) = s.post("/api/show", &json!({"model": "smol"}));
    assert_eq!((code, &v["capabilities"]), (200, &json!(["completion", "tools"])), "{v}");
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let (code, v) = s.post("/api/chat", &json!({"model": "gemma", "stream": false, "tools": tools, "options": {"num_predict": 4}, "messages": [{"role": "user", "content": "Weather in Paris?"}]}));
    assert_eq!(code, 200, "{v}");
    let loaded = |s: &Server| -> Vec<String> {
        let v: Value = ureq::get(&s.url("/api/ps")).call().unwrap().into_json().unwrap();
        v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    for input in [json!(""), json!([])] {
        let (code, v) = s.post("/api/generate", &json!({"model": "gemma", "keep_alive": 0}));
        assert_eq!(code, 200, "{v}");
        assert!(!loaded(&s).contains(&"gemma".to_string()));
        let (code, v) = s.post("/api/embed", &json!({"model": "gemma", "input": input}));
        assert_eq!(code, 200, "{input}: {v}");
        assert_eq!((v["model"].as_str(), &v["embeddings"]), (Some("gemma"), &json!([])), "{v}");
        assert!(v["load_duration"].is_u64() && v["total_duration"].is_u64(), "{v}");
        assert!(loaded(&s).contains(&"gemma".to_string()), "{input}");
    }
}
