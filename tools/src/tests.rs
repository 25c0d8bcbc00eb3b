//! Tests over whole answers: each is fed whole, split at every character boundary, and one
//! character at a time, and must give the same deltas and the same message each way.

use crate::*;
use serde_json::json;

fn normalize(events: Vec<OutputEvent>) -> Vec<OutputEvent> {
    let mut out: Vec<OutputEvent> = Vec::new();
    for e in events {
        let e = match e {
            OutputEvent::ToolCallBegin { index, id, name } => {
                assert!(id.len() == 29 && id.starts_with("call_") && id[5..].bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
                OutputEvent::ToolCallBegin { index, id: "ID".into(), name }
            }
            e => e,
        };
        match (out.last_mut(), e) {
            (Some(OutputEvent::Content(a)), OutputEvent::Content(b)) | (Some(OutputEvent::Reasoning(a)), OutputEvent::Reasoning(b)) => a.push_str(&b),
            (Some(OutputEvent::ToolCallArgs { index: i, fragment: a }), OutputEvent::ToolCallArgs { index: j, fragment: b }) if *i == j => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

type Outcome = (Vec<OutputEvent>, Result<ParsedMessage, (ParseProblem, ParsedMessage)>);

fn feed(make: &dyn Fn() -> ToolCallParser, pieces: &[&str]) -> Outcome {
    let mut p = make();
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(p.push(piece));
    }
    let (tail, message) = match p.finish() {
        Ok(f) => (f.events, Ok(f.message)),
        Err(e) => (e.recovered.events.clone(), Err((e.problem, e.recovered.message))),
    };
    events.extend(tail);
    // The deltas add up to the message.
    let msg = match &message {
        Ok(m) | Err((_, m)) => m,
    };
    let content: String = events.iter().filter_map(|e| if let OutputEvent::Content(c) = e { Some(c.as_str()) } else { None }).collect();
    assert_eq!(msg.content.clone().unwrap_or_default(), content, "content deltas");
    let reasoning: String = events.iter().filter_map(|e| if let OutputEvent::Reasoning(c) = e { Some(c.as_str()) } else { None }).collect();
    assert_eq!(msg.reasoning_content.clone().unwrap_or_default(), reasoning, "reasoning deltas");
    for (i, call) in msg.tool_calls.iter().enumerate() {
        let args: String = events
            .iter()
            .filter_map(|e| match e {
                OutputEvent::ToolCallArgs { index, fragment } if *index == i => Some(fragment.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(args, call.arguments, "call {i}'s fragments");
        assert!(events.iter().any(|e| matches!(e, OutputEvent::ToolCallBegin { index, id, name } if *index == i && *id == call.id && *name == call.name)));
    }
    (normalize(events), message.map_err(|(p, mut m)| {
        m.tool_calls.iter_mut().for_each(|c| c.id.clear());
        (p, m)
    }).map(|mut m| {
        m.tool_calls.iter_mut().for_each(|c| c.id.clear());
        m
    }))
}

/// Feeds `text` every way; returns the (common) outcome.
fn parse_all_ways(make: &dyn Fn() -> ToolCallParser, text: &str) -> Outcome {
    let whole = feed(make, &[text]);
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    for &b in &bounds {
        let split = feed(make, &[&text[..b], &text[b..]]);
        assert_eq!(split, whole, "split at byte {b} of {text:?}");
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(feed(make, &refs), whole, "one character at a time: {text:?}");
    whole
}

fn ok(make: &dyn Fn() -> ToolCallParser, text: &str) -> (Vec<OutputEvent>, ParsedMessage) {
    let (events, msg) = parse_all_ways(make, text);
    (events, msg.unwrap_or_else(|(p, m)| panic!("{p}: {m:?}")))
}

fn call(name: &str, args: &str) -> ParsedToolCall {
    ParsedToolCall { id: String::new(), name: name.into(), arguments: args.into() }
}

fn begin(index: usize, name: &str) -> OutputEvent {
    OutputEvent::ToolCallBegin { index, id: "ID".into(), name: name.into() }
}

fn args(index: usize, fragment: &str) -> OutputEvent {
    OutputEvent::ToolCallArgs { index, fragment: fragment.into() }
}

fn content(s: &str) -> OutputEvent {
    OutputEvent::Content(s.into())
}

fn hermes() -> ToolCallParser {
    ToolCallParser::new(ToolFormat::Hermes, ReasoningFormat::None, false)
}

#[test]
fn hermes_call_after_text() {
    let (events, msg) = ok(&hermes, "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
    assert_eq!(events, vec![content("Let me check."), begin(0, "get_weather"), args(0, r#"{"city": "Paris"}"#)]);
    assert_eq!(msg.content.as_deref(), Some("Let me check."));
    assert_eq!(msg.tool_calls, vec![call("get_weather", r#"{"city": "Paris"}"#)]);
}

#[test]
fn hermes_parallel_calls_and_nested_arguments() {
    let text = "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": {\"y\": [1, \"}]\\\"\"]}}}</tool_call>\n<tool_call>{\"name\":\"b\",\"arguments\":{}}</tool_call>";
    let (events, msg) = ok(&hermes, text);
    assert_eq!(msg.content, None);
    assert_eq!(msg.tool_calls, vec![call("a", r#"{"x": {"y": [1, "}]\""]}}"#), call("b", "{}")]);
    assert_eq!(events.len(), 4);
}

#[test]
fn a_partial_marker_is_held_until_resolved() {
    let mut p = hermes();
    assert_eq!(p.push("Hello <tool_c"), vec![content("Hello")]);
    assert_eq!(normalize(p.push("all>{\"name\": \"f\", ")), vec![begin(0, "f")]);
    let mut q = hermes();
    assert_eq!(q.push("a <tool_c"), vec![content("a")]);
    assert_eq!(q.push("x> b"), vec![content(" <tool_cx> b")]);
    assert_eq!(q.finish().unwrap().message.content.as_deref(), Some("a <tool_cx> b"));
}

#[test]
fn hermes_begin_goes_out_as_soon_as_the_name_is_known() {
    let mut p = hermes();
    let evs = normalize(p.push("<tool_call>{\"name\": \"f\", \"arguments\": {\"q\": \"a"));
    assert_eq!(evs, vec![begin(0, "f"), args(0, "{\"q\": \"a")]);
    let evs = normalize(p.push("b\"}}</tool_call> done"));
    assert_eq!(evs, vec![args(0, "b\"}"), content("done")]);
}

#[test]
fn text_between_and_after_calls_is_content() {
    let (_, msg) = ok(&hermes, "A <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> B");
    assert_eq!(msg.content.as_deref(), Some("A B"));
    assert_eq!(msg.tool_calls.len(), 1);
}

#[test]
fn keys_in_another_order_and_string_arguments_are_read_whole() {
    let (events, msg) = ok(&hermes, "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"f\"}</tool_call>");
    assert_eq!(msg.tool_calls, vec![call("f", r#"{"a":1}"#)]);
    assert_eq!(events, vec![begin(0, "f"), args(0, r#"{"a":1}"#)]);
    let (_, msg) = ok(&hermes, "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>");
    assert_eq!(msg.tool_calls, vec![call("f", r#"{"a": 1}"#)]);
}

#[test]
fn a_call_that_is_not_json_is_content_and_reported() {
    let (_, out) = parse_all_ways(&hermes, "Hi <tool_call>not json</tool_call> bye");
    let (problem, msg) = out.unwrap_err();
    assert!(matches!(problem, ParseProblem::MalformedCall { index: 0, .. }), "{problem}");
    assert_eq!(msg.content.as_deref(), Some("Hi <tool_call>not json</tool_call> bye"));
    assert!(msg.tool_calls.is_empty());
}

#[test]
fn an_answer_that_ends_mid_call_keeps_its_text() {
    let text = "ok <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"unfinish";
    let (events, out) = parse_all_ways(&hermes, text);
    let (problem, msg) = out.unwrap_err();
    assert_eq!(problem, ParseProblem::TruncatedCall { index: 0 });
    assert_eq!(msg.content.as_deref(), Some(text));
    assert!(msg.tool_calls.is_empty());
    // The call's start was streamed before the end was known.
    assert!(events.contains(&begin(0, "f")));
    let e = ParseFailure { problem, recovered: Box::default() };
    assert!(e.to_string().contains("ended inside tool call 0"), "{e}");
}

#[test]
fn a_malformed_call_after_a_good_one_keeps_the_good_one() {
    let (_, out) = parse_all_ways(&hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call><tool_call>{\"name\": 3}</tool_call>");
    let (problem, msg) = out.unwrap_err();
    assert!(matches!(problem, ParseProblem::MalformedCall { index: 1, .. }), "{problem}");
    assert_eq!(msg.tool_calls, vec![call("f", "{}")]);
    assert_eq!(msg.content.as_deref(), Some("<tool_call>{\"name\": 3}</tool_call>"));
}

#[test]
fn unicode_in_content_and_arguments() {
    let (_, msg) = ok(&hermes, "héllo 🌍 <tool_call>{\"name\": \"f\", \"arguments\": {\"v\": \"日本 🌍\"}}</tool_call>");
    assert_eq!(msg.content.as_deref(), Some("héllo 🌍"));
    assert_eq!(msg.tool_calls, vec![call("f", "{\"v\": \"日本 🌍\"}")]);
}

fn llama3() -> ToolCallParser {
    ToolCallParser::new(ToolFormat::Llama3, ReasoningFormat::None, false)
}

#[test]
fn llama3_json_answer_and_python_tag() {
    let (events, msg) = ok(&llama3, "  {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}");
    assert_eq!(events, vec![begin(0, "get_weather"), args(0, r#"{"city": "Paris"}"#)]);
    assert_eq!(msg.content, None);
    let (_, msg) = ok(&llama3, "<|python_tag|>{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"a\": 1}}");
    assert_eq!(msg.tool_calls, vec![call("f", "{}"), call("g", r#"{"a": 1}"#)]);
    let (_, msg) = ok(&llama3, "Sure, I'll call <|python_tag|>{\"name\": \"f\", \"parameters\": {}}");
    assert_eq!(msg.content.as_deref(), Some("Sure, I'll call"));
    assert_eq!(msg.tool_calls.len(), 1);
}

#[test]
fn llama3_json_in_prose_is_prose() {
    let text = "Write {\"name\": \"x\"} like this.";
    let (_, msg) = ok(&llama3, text);
    assert_eq!(msg.content.as_deref(), Some(text));
    let (_, msg) = ok(&llama3, "{\"title\": 1}");
    assert_eq!(msg.content.as_deref(), Some("{\"title\": 1}"));
    assert!(msg.tool_calls.is_empty());
}

fn mistral() -> ToolCallParser {
    ToolCallParser::new(ToolFormat::Mistral, ReasoningFormat::None, false)
}

#[test]
fn mistral_array_of_calls_with_ids() {
    let text = "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}, \"id\": \"abc123def\"}, {\"name\": \"b\", \"arguments\": {}}]";
    let (events, msg) = ok(&mistral, text);
    assert_eq!(msg.tool_calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
    assert_eq!(events, vec![begin(0, "a"), args(0, r#"{"x": 1}"#), begin(1, "b"), args(1, "{}")]);
}

#[test]
fn mistral_args_form() {
    let (events, msg) = ok(&mistral, "Calling.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]f[ARGS]{}");
    assert_eq!(msg.content.as_deref(), Some("Calling."));
    assert_eq!(msg.tool_calls, vec![call("get_weather", r#"{"city": "Paris"}"#), call("f", "{}")]);
    assert_eq!(events[1], begin(0, "get_weather"));
}

#[test]
fn mistral_garbage_after_the_marker_is_content() {
    let (_, out) = parse_all_ways(&mistral, "[TOOL_CALLS] !!");
    let (problem, msg) = out.unwrap_err();
    assert!(matches!(problem, ParseProblem::MalformedCall { .. }));
    assert_eq!(msg.content.as_deref(), Some("[TOOL_CALLS] !!"));
}

fn generic() -> ToolCallParser {
    ToolCallParser::new(ToolFormat::Generic, ReasoningFormat::None, false)
}

#[test]
fn generic_calls_and_content() {
    let (_, msg) = ok(&generic, "{\"tool_calls\": [{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]}");
    assert_eq!(msg.tool_calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
    assert_eq!(msg.content, None);
    let (events, msg) = ok(&generic, r#"{"content": "Caf\u00e9 \"ok\"\n\ud83c\udf0d done"}"#);
    assert_eq!(msg.content.as_deref(), Some("Café \"ok\"\n🌍 done"));
    assert_eq!(events, vec![content("Café \"ok\"\n🌍 done")]);
}

#[test]
fn generic_unconstrained_text_is_content() {
    let (_, msg) = ok(&generic, "Just text.");
    assert_eq!(msg.content.as_deref(), Some("Just text."));
    let (_, out) = parse_all_ways(&generic, "{\"content\": \"cut");
    let (problem, msg) = out.unwrap_err();
    assert_eq!(problem, ParseProblem::TruncatedAnswer);
    assert_eq!(msg.content.as_deref(), Some("cut"));
}

#[test]
fn content_only_parser_finds_no_calls() {
    let text = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
    let (_, msg) = ok(&|| ToolCallParser::content_only(ReasoningFormat::Auto, false), text);
    assert_eq!(msg.content.as_deref(), Some(text));
}

#[test]
fn reasoning_is_split_from_content() {
    let make = || ToolCallParser::new(ToolFormat::Hermes, ReasoningFormat::Auto, false);
    let (events, msg) = ok(&make, "<think>\nI should look.\n</think>\n\nThe answer.");
    assert_eq!(events, vec![OutputEvent::Reasoning("I should look.".into()), content("The answer.")]);
    assert_eq!(msg.reasoning_content.as_deref(), Some("I should look."));
    // Not at the start: content.
    let (_, msg) = ok(&make, "Hi <think>x</think>");
    assert_eq!(msg.content.as_deref(), Some("Hi <think>x</think>"));
    assert_eq!(msg.reasoning_content, None);
    // Unclosed: all reasoning.
    let (_, msg) = ok(&make, "<think>still going");
    assert_eq!(msg.reasoning_content.as_deref(), Some("still going"));
}

#[test]
fn reasoning_then_a_call() {
    let make = || ToolCallParser::new(ToolFormat::Hermes, ReasoningFormat::Deepseek, true);
    let text = "Need weather; <tool_call> later.</think>\n<tool_call>{\"name\": \"w\", \"arguments\": {\"c\": \"P\"}}</tool_call>";
    let (events, msg) = ok(&make, text);
    // A marker inside the reasoning is reasoning.
    assert_eq!(msg.reasoning_content.as_deref(), Some("Need weather; <tool_call> later."));
    assert_eq!(msg.tool_calls, vec![call("w", r#"{"c": "P"}"#)]);
    assert_eq!(events[0], OutputEvent::Reasoning("Need weather; <tool_call> later.".into()));
}

#[test]
fn reasoning_none_keeps_the_block_in_content() {
    let (_, msg) = ok(&|| ToolCallParser::content_only(ReasoningFormat::None, false), "<think>a</think>b");
    assert_eq!(msg.content.as_deref(), Some("<think>a</think>b"));
    let (_, msg) = ok(&|| ToolCallParser::content_only(ReasoningFormat::None, true), "a</think>b");
    assert_eq!(msg.content.as_deref(), Some("<think>a</think>b"));
}

#[test]
fn command_r7b_thinking_tags() {
    let make = || ToolCallParser::content_only(ReasoningFormat::Auto, false).with_think_tags(ThinkTags::COMMAND_R7B);
    let (_, msg) = ok(&make, "<|START_THINKING|>plan<|END_THINKING|>answer");
    assert_eq!(msg.reasoning_content.as_deref(), Some("plan"));
    assert_eq!(msg.content.as_deref(), Some("answer"));
}

#[test]
fn generic_after_reasoning() {
    let make = || ToolCallParser::new(ToolFormat::Generic, ReasoningFormat::Auto, false);
    let (_, msg) = ok(&make, "<think>hm</think>{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {}}]}");
    assert_eq!(msg.reasoning_content.as_deref(), Some("hm"));
    assert_eq!(msg.tool_calls, vec![call("f", "{}")]);
}

#[test]
fn more_calls_than_allowed_stop_at_the_limit() {
    let one = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
    let mut p = hermes();
    for _ in 0..MAX_CALLS + 2 {
        p.push(one);
    }
    let e = p.finish().unwrap_err();
    assert_eq!(e.problem, ParseProblem::TooManyCalls { limit: MAX_CALLS });
    assert_eq!(e.recovered.message.tool_calls.len(), MAX_CALLS);
    assert_eq!(e.recovered.message.content.as_deref(), Some(format!("{one}{one}").as_str()));
}

#[test]
fn a_call_longer_than_allowed_becomes_content() {
    let mut p = hermes();
    p.push("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"");
    let chunk = "x".repeat(1 << 16);
    for _ in 0..(MAX_CALL_BYTES >> 16) + 1 {
        p.push(&chunk);
    }
    let e = p.finish().unwrap_err();
    assert!(matches!(e.problem, ParseProblem::CallTooLong { .. }));
    assert!(e.recovered.message.content.unwrap().len() > MAX_CALL_BYTES);
}

#[test]
fn ids_are_unique() {
    let mut p = hermes();
    for _ in 0..50 {
        p.push("<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>");
    }
    let calls = p.finish().unwrap().message.tool_calls;
    let mut ids: Vec<_> = calls.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
}

#[test]
fn long_streams_cost_linear_time() {
    // One character at a time, a megabyte of content with '<' throughout: quadratic
    // rescanning would take minutes in a debug build.
    let mut p = hermes();
    let mut n = 0;
    for i in 0..1_000_000 {
        let ev = p.push(if i % 7 == 0 { "<" } else { "a" });
        n += ev.len();
    }
    assert!(n > 0);
    assert_eq!(p.finish().unwrap().message.content.unwrap().len(), 1_000_000);
}

#[test]
fn format_detection_from_templates() {
    assert_eq!(ToolFormat::detect("{{ '[TOOL_CALLS]' }}"), ToolFormat::Mistral);
    assert_eq!(ToolFormat::detect("<tool_call>\n{{ tool_call | tojson }}"), ToolFormat::Hermes);
    assert_eq!(ToolFormat::detect("{{ '<|python_tag|>' }}"), ToolFormat::Llama3);
    assert_eq!(ToolFormat::detect("<|start_header_id|>ipython<|end_header_id|>"), ToolFormat::Llama3);
    assert_eq!(ToolFormat::detect("<start_of_turn>"), ToolFormat::Generic);
    assert_eq!(ToolFormat::Hermes.to_string(), "Hermes (<tool_call>)");
}

#[test]
fn openai_tools_and_choice_are_checked() {
    let t = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    assert_eq!(Tool::list_from_openai(&[t("a"), t("b-2_x")]).unwrap().len(), 2);
    assert!(matches!(Tool::list_from_openai(&[t("a"), t("a")]), Err(ToolError::DuplicateName { .. })));
    assert!(matches!(Tool::list_from_openai(&[t("a b")]), Err(ToolError::InvalidName { .. })));
    assert!(matches!(Tool::list_from_openai(&[t(&"x".repeat(65))]), Err(ToolError::InvalidName { .. })));
    assert!(matches!(Tool::list_from_openai(&vec![t("a"); MAX_TOOLS + 1]), Err(ToolError::TooManyTools { .. })));
    let bad = json!({"type": "function", "function": {"name": "f", "parameters": "x"}});
    let e = Tool::list_from_openai(&[bad]).unwrap_err();
    assert!(e.to_string().contains("'f'"), "{e}");
    assert!(matches!(Tool::from_openai(0, &json!({"type": "retrieval"})), Err(ToolError::NotAFunction { index: 0 })));
    assert_eq!(ToolChoice::from_openai(None).unwrap(), ToolChoice::Auto);
    assert_eq!(ToolChoice::from_openai(Some(&json!("required"))).unwrap(), ToolChoice::Required);
    assert_eq!(ToolChoice::from_openai(Some(&json!({"type": "function", "function": {"name": "f"}}))).unwrap(), ToolChoice::Named("f".into()));
    assert!(ToolChoice::from_openai(Some(&json!("sometimes"))).is_err());
}

// ---- grammar, with a stand-in converter ----

#[derive(Debug, thiserror::Error)]
#[error("unsupported schema keyword 'not' at {0}")]
struct StandInError(String);

/// Writes each schema as a rule named after the hint whose body is the schema's JSON (so
/// tests can see which schema went where); refuses `not` as the real converter does.
#[derive(Default)]
struct StandIn {
    rules: Vec<(String, String)>,
}

impl GrammarBuilder for StandIn {
    type Error = StandInError;
    fn add_schema(&mut self, name_hint: &str, schema: &serde_json::Value) -> Result<String, StandInError> {
        if schema.get("not").is_some() {
            return Err(StandInError("/not".into()));
        }
        self.rules.push((name_hint.to_string(), format!("SCHEMA({schema})")));
        Ok(name_hint.to_string())
    }
    fn add_rule(&mut self, name: &str, body: &str) -> String {
        self.rules.push((name.to_string(), body.to_string()));
        name.to_string()
    }
    fn finish(self) -> Result<String, StandInError> {
        Ok(self.rules.iter().map(|(n, b)| format!("{n} ::= {b}\n")).collect())
    }
}

fn tools() -> Vec<Tool> {
    vec![
        Tool { name: "get_weather".into(), description: None, parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}) },
        Tool { name: "now".into(), description: None, parameters: json!({}) },
    ]
}

fn grammar(format: ToolFormat, choice: ToolChoice, parallel: bool) -> GrammarSpec {
    tool_grammar(format, &tools(), &choice, parallel, StandIn::default()).unwrap().unwrap()
}

fn rule<'a>(g: &'a GrammarSpec, name: &str) -> &'a str {
    g.text.lines().find_map(|l| l.strip_prefix(&format!("{name} ::= "))).unwrap_or_else(|| panic!("no rule {name} in\n{}", g.text))
}

#[test]
fn each_call_is_its_name_and_its_schema() {
    let g = grammar(ToolFormat::Hermes, ToolChoice::Auto, true);
    assert_eq!(
        rule(&g, "tool-0-call"),
        r#""{" tool-ws "\"name\"" tool-ws ":" tool-ws "\"get_weather\"" tool-ws "," tool-ws "\"arguments\"" tool-ws ":" tool-ws tool-0-args tool-ws "}""#
    );
    assert!(rule(&g, "tool-0-args").contains("\"city\""));
    assert_eq!(rule(&g, "tool-call"), "tool-0-call | tool-1-call");
    assert_eq!(rule(&g, "tool-call-block"), r#""<tool_call>" tool-ws tool-call tool-ws "</tool_call>""#);
    assert_eq!(rule(&g, "root"), "tool-call-block ( tool-ws tool-call-block )*");
    assert!(g.lazy);
    assert_eq!(g.trigger_patterns, vec![r"^[\s\S]*?(<tool_call>[\s\S]*)".to_string()]);
    assert_eq!(g.root, "root");
}

#[test]
fn one_call_unless_parallel() {
    let g = grammar(ToolFormat::Hermes, ToolChoice::Required, false);
    assert_eq!(rule(&g, "root"), "tool-call-block");
    assert!(!g.lazy && g.trigger_patterns.is_empty());
    let g = grammar(ToolFormat::Mistral, ToolChoice::Named("now".into()), true);
    assert_eq!(rule(&g, "root"), r#""[TOOL_CALLS]" tool-ws "[" tool-ws tool-call tool-ws "]""#);
    assert_eq!(rule(&g, "tool-call"), "tool-0-call");
    assert!(rule(&g, "tool-0-call").contains(r#""\"now\"""#));
}

#[test]
fn llama3_and_mistral_triggers() {
    let g = grammar(ToolFormat::Llama3, ToolChoice::Auto, true);
    assert!(rule(&g, "tool-0-call").contains(r#""\"parameters\"""#));
    assert_eq!(rule(&g, "root"), r#"( "<|python_tag|>" tool-ws )? tool-call ( tool-ws ";" tool-ws tool-call )*"#);
    assert_eq!(g.trigger_patterns, vec![r"^[\s\S]*?(<\|python_tag\|>[\s\S]*)".to_string(), r#"^\s*(\{\s*"name"[\s\S]*)"#.to_string()]);
    let g = grammar(ToolFormat::Mistral, ToolChoice::Auto, true);
    assert_eq!(rule(&g, "root"), r#""[TOOL_CALLS]" tool-ws "[" tool-ws tool-call ( tool-ws "," tool-ws tool-call )* tool-ws "]""#);
    assert_eq!(g.trigger_patterns, vec![r"^[\s\S]*?(\[TOOL_CALLS\][\s\S]*)".to_string()]);
}

#[test]
fn generic_constrains_the_whole_answer() {
    let g = grammar(ToolFormat::Generic, ToolChoice::Auto, false);
    assert!(!g.lazy);
    assert_eq!(rule(&g, "root"), "tool-calls-object | tool-content-object");
    assert!(rule(&g, "tool-content").contains(r#"{"type":"string"}"#));
    let g = grammar(ToolFormat::Generic, ToolChoice::Required, true);
    assert_eq!(rule(&g, "root"), "tool-calls-object");
    assert!(rule(&g, "tool-calls-object").starts_with(r#""{" tool-ws "\"tool_calls\"" tool-ws ":" tool-ws "[" tool-ws tool-call ( tool-ws "," tool-ws tool-call )*"#));
}

#[test]
fn grammar_errors_name_the_tool() {
    let mut t = tools();
    assert!(tool_grammar(ToolFormat::Hermes, &t, &ToolChoice::None, true, StandIn::default()).unwrap().is_none());
    let e = tool_grammar(ToolFormat::Hermes, &t, &ToolChoice::Named("nope".into()), true, StandIn::default()).unwrap_err();
    assert!(matches!(e, ToolError::UnknownTool { .. }) && e.to_string().contains("'nope'"), "{e}");
    assert!(matches!(tool_grammar(ToolFormat::Hermes, &[], &ToolChoice::Required, true, StandIn::default()), Err(ToolError::NoTools)));
    t[1].parameters = json!({"not": {}});
    let e = tool_grammar(ToolFormat::Hermes, &t, &ToolChoice::Auto, true, StandIn::default()).unwrap_err();
    assert!(matches!(&e, ToolError::SchemaRefused { tool, .. } if tool == "now"), "{e}");
    assert!(e.to_string().contains("'now'") && e.to_string().contains("'not'"), "{e}");
    t[1].parameters = json!([1]);
    assert!(matches!(tool_grammar(ToolFormat::Hermes, &t, &ToolChoice::Auto, true, StandIn::default()), Err(ToolError::ParametersNotAnObject { .. })));
    t[1] = t[0].clone();
    assert!(matches!(tool_grammar(ToolFormat::Hermes, &t, &ToolChoice::Auto, true, StandIn::default()), Err(ToolError::DuplicateName { .. })));
}

#[test]
fn grammar_after_a_forced_open_think_block() {
    let lazy = after_reasoning(grammar(ToolFormat::Hermes, ToolChoice::Auto, true), true, &ThinkTags::THINK);
    assert_eq!(lazy.trigger_patterns, vec![r"^[\s\S]*?<\/think>[\s\S]*?(<tool_call>[\s\S]*)".to_string()]);
    let whole = after_reasoning(grammar(ToolFormat::Hermes, ToolChoice::Required, true), true, &ThinkTags::THINK);
    assert!(whole.lazy);
    assert_eq!(whole.root, "think-wrap-root");
    assert_eq!(rule(&whole, "think-wrap-root"), r#""</think>" think-wrap-ws root"#);
    assert_eq!(whole.trigger_patterns, vec![r"^[\s\S]*?(<\/think>[\s\S]*)".to_string()]);
}

#[test]
fn grammar_with_an_optional_think_block() {
    let lazy = after_reasoning(grammar(ToolFormat::Llama3, ToolChoice::Auto, true), false, &ThinkTags::THINK);
    assert_eq!(lazy.trigger_patterns[1], r#"^(?:\s*<think>[\s\S]*?<\/think>)?\s*(\{\s*"name"[\s\S]*)"#);
    let whole = after_reasoning(grammar(ToolFormat::Generic, ToolChoice::Auto, true), false, &ThinkTags::COMMAND_R7B);
    assert!(!whole.lazy);
    assert_eq!(rule(&whole, "think-wrap-root"), r#"( think-wrap-ws "<|START_THINKING|>" think-wrap-body "<|END_THINKING|>" think-wrap-ws )? root"#);
    assert!(rule(&whole, "think-wrap-body").starts_with(r#"( [^<] | "<" [^|] | "<|" [^E] |"#), "{}", whole.text);
}

/// The look-ahead-free triggers behave as `(?!\s*<think>)` did, checked with the syntax the
/// backends match them in (`trigger_regex`, the regex crate over bytes).
#[test]
fn triggers_skip_a_leading_think_block_without_look_around() {
    use llama_plugin_api::grammar_bounds::trigger_regex;
    let lazy = after_reasoning(grammar(ToolFormat::Hermes, ToolChoice::Auto, true), false, &ThinkTags::THINK);
    let hermes: Vec<_> = lazy.trigger_patterns.iter().map(|p| trigger_regex(p).unwrap()).collect();
    // Where the grammar starts (the first group), or None when nothing fires.
    let fires = |text: &str| hermes.iter().find_map(|re| re.captures(text.as_bytes()).map(|c| c.get(1).unwrap().start()));
    assert_eq!(fires("<tool_call>{"), Some(0));
    assert_eq!(fires("  <tool_call>"), Some(2));
    assert_eq!(fires("Sure. <tool_call>"), Some(6));
    assert_eq!(fires("<<tool_call>"), Some(1));
    assert_eq!(fires("<thi<tool_call>"), Some(4), "not a think block: fires");
    assert_eq!(fires("<thinking><tool_call>"), Some(10), "differs at byte 6: not the open tag");
    assert_eq!(fires(" <think>plan <tool_call>"), None, "inside an unclosed block");
    assert_eq!(fires("<think>plan <tool_call></think>"), None, "inside the block, even once closed");
    assert_eq!(fires("<think>plan</think>\n<tool_call>"), Some(20));
    let llama3 = after_reasoning(grammar(ToolFormat::Llama3, ToolChoice::Auto, true), false, &ThinkTags::THINK);
    let json = trigger_regex(&llama3.trigger_patterns[1]).unwrap();
    assert!(json.is_match(b"<think>x</think> {\"name\""));
    assert!(json.is_match(b" {\"name\""));
    assert!(!json.is_match(b"<think> {\"name\""));
    for p in lazy.trigger_patterns.iter().chain(&llama3.trigger_patterns) {
        assert!(!p.contains("(?!") && !p.contains("(?="), "{p}");
    }
    let r7b = after_reasoning(grammar(ToolFormat::Hermes, ToolChoice::Auto, true), false, &ThinkTags::COMMAND_R7B);
    let re = trigger_regex(&r7b.trigger_patterns[0]).unwrap();
    assert!(re.is_match(b"<|START_THINK<tool_call>") && !re.is_match(b"<|START_THINKING|> <tool_call>"));
}

#[test]
fn gbnf_and_regex_escaping() {
    assert_eq!(gbnf_literal("a\"b\\c\n"), r#""a\"b\\c\n""#);
    assert_eq!(regex_escape("[TOOL_CALLS]<|x|>"), r"\[TOOL_CALLS\]<\|x\|>");
}
