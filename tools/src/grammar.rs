//! The grammar (GBNF) that constrains a tool call, and its lazy triggers.
//!
//! Each function's call is `{"name": <its name as a literal>, "arguments": <its parameters
//! schema>}` (Llama 3 says `parameters`), wrapped in the format's markers. The JSON Schema →
//! GBNF conversion is not done here: it goes through [`GrammarBuilder`], which llama-grammar's
//! `SchemaConverter` implements, so this module is tested with a stand-in.
//!
//! Lazy grammars follow llama.cpp's `llama_sampler_init_grammar_lazy_patterns`: sampling is
//! free until a trigger pattern matches the output so far (searched from its start); the
//! grammar is then fed the output from the pattern's first capture group on, and constrains
//! the rest. Every pattern built here starts with `^` and has one capture group that begins
//! at the format's opening marker, so [`after_reasoning`] can put a think block in front.

use serde_json::Value;

use crate::format::{check_unique, Tool, ToolChoice, ToolFormat};
use crate::reasoning::ThinkTags;
use crate::ToolError;

/// A grammar for the sampler, the same fields as `llama_host::Grammar` (the integrator
/// converts): GBNF text, its root rule, and when it is lazy, what wakes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrammarSpec {
    pub text: String,
    pub root: String,
    /// Free sampling until a trigger matches.
    pub lazy: bool,
    /// Regexes (ECMAScript, as llama.cpp's std::regex) over the output so far; the grammar
    /// applies from the first capture group.
    pub trigger_patterns: Vec<String>,
    /// Token ids that wake the grammar; none from here (this crate knows no vocabulary).
    pub trigger_tokens: Vec<i32>,
}

/// What building a tool grammar needs from a JSON Schema → GBNF converter; llama-grammar's
/// `SchemaConverter` is one (`impl GrammarBuilder for llama_grammar::SchemaConverter` maps
/// each method to its namesake).
pub trait GrammarBuilder {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Adds the rules for `schema`; returns the name of the rule that matches it.
    fn add_schema(&mut self, name_hint: &str, schema: &Value) -> Result<String, Self::Error>;
    /// Adds a rule with this body (GBNF); returns the name it got.
    fn add_rule(&mut self, name: &str, body: &str) -> String;
    /// The whole grammar text.
    fn finish(self) -> Result<String, Self::Error>;
}

/// `s` as a GBNF string literal (llama-grammar's, so tool names and schema literals are
/// escaped one way).
pub use llama_grammar::gbnf_literal;

/// llama-grammar's converter, as this module's builder.
impl GrammarBuilder for llama_grammar::SchemaConverter {
    type Error = llama_grammar::SchemaError;
    fn add_schema(&mut self, name_hint: &str, schema: &Value) -> Result<String, Self::Error> {
        llama_grammar::SchemaConverter::add_schema(self, name_hint, schema)
    }
    fn add_rule(&mut self, name: &str, body: &str) -> String {
        llama_grammar::SchemaConverter::add_rule(self, name, body)
    }
    fn finish(self) -> Result<String, Self::Error> {
        llama_grammar::SchemaConverter::finish(self)
    }
}

/// `s` as a literal in an ECMAScript regex.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\^$.|?*+()[]{}/-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whitespace between JSON tokens: bounded, so a model cannot loop on newlines for ever
/// inside a constrained call.
const WS_BODY: &str = "[ \\t\\n]{0,20}";

/// A trigger that fires at `marker_regex` anywhere in the output.
fn anywhere(marker_regex: &str) -> String {
    format!("^[\\s\\S]*?({marker_regex}[\\s\\S]*)")
}

/// The grammar for a request, or `None` when nothing is to be constrained
/// ([`ToolChoice::None`]). `parallel == false` allows exactly one call; [`ToolChoice::Named`]
/// always means one call of that function.
///
/// `Auto` is lazy for the marker formats (free text until the model opens a call) and
/// whole-output for [`ToolFormat::Generic`] (either the calls object or the content object).
/// `Required` and `Named` constrain from the first token.
pub fn tool_grammar<B: GrammarBuilder>(
    format: ToolFormat,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    mut builder: B,
) -> Result<Option<GrammarSpec>, ToolError> {
    if tools.len() > crate::MAX_TOOLS {
        return Err(ToolError::TooManyTools { count: tools.len(), limit: crate::MAX_TOOLS });
    }
    for t in tools {
        crate::format::check_name(&t.name)?;
    }
    check_unique(tools)?;
    let (selected, parallel): (Vec<&Tool>, bool) = match choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Auto | ToolChoice::Required => (tools.iter().collect(), parallel),
        ToolChoice::Named(name) => {
            let t = tools.iter().find(|t| &t.name == name).ok_or_else(|| ToolError::UnknownTool { name: name.clone() })?;
            (vec![t], false)
        }
    };
    if selected.is_empty() {
        return Err(ToolError::NoTools);
    }
    let schema_err = |tool: &str| {
        let tool = tool.to_string();
        move |e: B::Error| ToolError::SchemaRefused { tool, source: Box::new(e) }
    };
    let ws = builder.add_rule("tool-ws", WS_BODY);
    let lit = gbnf_literal;
    let mut alternatives = Vec::with_capacity(selected.len());
    for (i, t) in selected.iter().enumerate() {
        if !t.parameters.is_object() {
            return Err(ToolError::ParametersNotAnObject { tool: t.name.clone() });
        }
        let args = builder.add_schema(&format!("tool-{i}-args"), &t.parameters).map_err(schema_err(&t.name))?;
        let body = format!(
            "{} {ws} {} {ws} {} {ws} {} {ws} {} {ws} {} {ws} {} {ws} {args} {ws} {}",
            lit("{"),
            lit("\"name\""),
            lit(":"),
            lit(&format!("\"{}\"", t.name)),
            lit(","),
            lit(&format!("\"{}\"", format.arguments_key())),
            lit(":"),
            lit("}"),
        );
        alternatives.push(builder.add_rule(&format!("tool-{i}-call"), &body));
    }
    let call = builder.add_rule("tool-call", &alternatives.join(" | "));
    // `one (sep one)*` when parallel, else `one`.
    let list = |one: &str, sep: &str| if parallel { format!("{one} ( {ws} {sep} {ws} {one} )*") } else { one.to_string() };
    let (body, lazy, patterns) = match format {
        ToolFormat::Hermes => {
            let block = builder.add_rule("tool-call-block", &format!("{} {ws} {call} {ws} {}", lit("<tool_call>"), lit("</tool_call>")));
            // Blocks follow one another with only whitespace between.
            let body = if parallel { format!("{block} ( {ws} {block} )*") } else { block };
            (body, true, vec![anywhere(&regex_escape("<tool_call>"))])
        }
        ToolFormat::Llama3 => {
            let body = format!("( {} {ws} )? {}", lit("<|python_tag|>"), list(&call, &lit(";")));
            // The JSON form counts only as the whole answer (leading whitespace aside): a
            // `{"name"` in the middle of prose is prose.
            (body, true, vec![anywhere(&regex_escape("<|python_tag|>")), "^\\s*(\\{\\s*\"name\"[\\s\\S]*)".to_string()])
        }
        ToolFormat::Mistral => {
            let body = format!("{} {ws} {} {ws} {} {ws} {}", lit("[TOOL_CALLS]"), lit("["), list(&call, &lit(",")), lit("]"));
            (body, true, vec![anywhere(&regex_escape("[TOOL_CALLS]"))])
        }
        ToolFormat::Generic => {
            let calls = format!(
                "{} {ws} {} {ws} {} {ws} {} {ws} {} {ws} {} {ws} {}",
                lit("{"),
                lit("\"tool_calls\""),
                lit(":"),
                lit("["),
                list(&call, &lit(",")),
                lit("]"),
                lit("}")
            );
            let calls = builder.add_rule("tool-calls-object", &calls);
            let body = if *choice == ToolChoice::Auto {
                let string = builder.add_schema("tool-content", &serde_json::json!({"type": "string"})).map_err(schema_err("content"))?;
                let content = builder.add_rule(
                    "tool-content-object",
                    &format!("{} {ws} {} {ws} {} {ws} {string} {ws} {}", lit("{"), lit("\"content\""), lit(":"), lit("}")),
                );
                format!("{calls} | {content}")
            } else {
                calls
            };
            (body, false, Vec::new())
        }
    };
    let root = builder.add_rule("root", &body);
    let text = builder.finish().map_err(|e| ToolError::Grammar(Box::new(e)))?;
    let lazy = lazy && *choice == ToolChoice::Auto;
    Ok(Some(GrammarSpec {
        text,
        root,
        lazy,
        trigger_patterns: if lazy { patterns } else { Vec::new() },
        trigger_tokens: Vec::new(),
    }))
}

/// A GBNF rule body matching any text that does not contain `tag`, approximately: each
/// alternative is a proper prefix of the tag followed by a character that breaks it
/// (`[^<] | "<" [^/] | "</" [^t] ...`). It is exact for tags whose first character does not
/// recur (both known tags); it refuses a few strings that contain the tag's first character
/// twice in a row just before the tag (`<</think>` cannot close the block).
fn not_containing(tag: &str) -> String {
    let chars: Vec<char> = tag.chars().collect();
    let class = |c: char| {
        let c = match c {
            '\\' | ']' | '^' | '-' => format!("\\{c}"),
            '\n' => "\\n".into(),
            c => c.to_string(),
        };
        format!("[^{c}]")
    };
    let mut alts = vec![class(chars[0])];
    for i in 1..chars.len() {
        let prefix: String = chars[..i].iter().collect();
        alts.push(format!("{} {}", gbnf_literal(&prefix), class(chars[i])));
    }
    format!("( {} )*", alts.join(" | "))
}

/// Makes `spec` apply after the model's reasoning block.
///
/// - `forced_open` (the prompt ended inside an open think block): the grammar becomes lazy.
///   A whole-output grammar is woken by the close tag and starts with it (`close ws root`);
///   a lazy one's triggers only count after the close tag.
/// - otherwise the model may open a block at the very start. A whole-output grammar gets an
///   optional leading block (`(open text-without-close close ws)? root`, see
///   [`not_containing`] for its approximation); a lazy one's triggers skip a leading block
///   (a marker inside an unclosed block does not fire) and otherwise fire as before.
///
/// Relies on the `^`-anchored patterns [`tool_grammar`] builds; others get the prefix too.
/// The patterns use no look-around: the backend matches them with Rust's `regex` crate
/// (linear time), which has none.
pub fn after_reasoning(spec: GrammarSpec, forced_open: bool, tags: &ThinkTags) -> GrammarSpec {
    let close_re = regex_escape(tags.close);
    let insert = |p: &str, prefix: &str| format!("^{prefix}{}", p.strip_prefix('^').unwrap_or(p));
    let mut spec = spec;
    let rule_ws = "think-wrap-ws ::= [ \\t\\n]*";
    match (forced_open, spec.lazy) {
        (true, true) => {
            let prefix = format!("[\\s\\S]*?{close_re}");
            spec.trigger_patterns = spec.trigger_patterns.iter().map(|p| insert(p, &prefix)).collect();
        }
        (true, false) => {
            spec.text = format!(
                "{}\n{rule_ws}\nthink-wrap-root ::= {} think-wrap-ws {}\n",
                spec.text.trim_end(),
                gbnf_literal(tags.close),
                spec.root
            );
            spec.root = "think-wrap-root".into();
            spec.lazy = true;
            spec.trigger_patterns = vec![anywhere(&close_re)];
        }
        (false, true) => {
            spec.trigger_patterns = spec.trigger_patterns.iter().map(|p| skip_leading_block(p, tags)).collect();
        }
        (false, false) => {
            spec.text = format!(
                "{}\n{rule_ws}\nthink-wrap-body ::= {}\nthink-wrap-root ::= ( think-wrap-ws {} think-wrap-body {} think-wrap-ws )? {}\n",
                spec.text.trim_end(),
                not_containing(tags.close),
                gbnf_literal(tags.open),
                gbnf_literal(tags.close),
                spec.root
            );
            spec.root = "think-wrap-root".into();
        }
    }
    spec
}

/// `pattern` firing only outside a leading reasoning block: when the output starts (after
/// whitespace) with the open tag, the trigger counts only after the close tag.
///
/// This was `^(?:\s*OPEN[\s\S]*?CLOSE|(?!\s*OPEN))...`; the backend's matcher (the `regex`
/// crate, chosen for its linear time) has no look-ahead, so "does not start with OPEN" is
/// spelled out. For [`anywhere`]'s `^[\s\S]*?(MARKER[\s\S]*)`, the text before the marker,
/// after leading whitespace, either
/// - is a proper prefix `OPEN[..m]` of the open tag that the marker then leaves (checked
///   here, on the literal texts), or
/// - follows the open tag for `j` bytes and then differs from it (`OPEN[..j][^OPEN[j]]`),
///   with anything after;
///
/// which together are exactly the texts not starting with OPEN. Other patterns (the JSON
/// form `^\s*(\{...)`, which cannot begin with a tag) get an optional leading block: the
/// look-ahead added nothing to them. Byte-wise, as the matcher reads the output.
fn skip_leading_block(pattern: &str, tags: &ThinkTags) -> String {
    let block = format!("\\s*{}[\\s\\S]*?{}", regex_escape(tags.open), regex_escape(tags.close));
    let body = pattern.strip_prefix('^').unwrap_or(pattern);
    let marker_re = body.strip_prefix("[\\s\\S]*?(").and_then(|g| g.strip_suffix("[\\s\\S]*)"));
    let Some(marker_re) = marker_re else { return format!("^(?:{block})?{body}") };
    // regex_escape only puts a backslash before single characters.
    let mut marker = String::new();
    let mut chars = marker_re.chars();
    while let Some(c) = chars.next() {
        marker.push(if c == '\\' { chars.next().unwrap_or(c) } else { c });
    }
    let hex = |b: u8| format!("\\x{b:02X}");
    let lit = |bs: &[u8]| bs.iter().map(|&b| hex(b)).collect::<String>();
    let open = tags.open.as_bytes();
    let mut alts = vec![format!("{block}[\\s\\S]*?")];
    for m in 0..open.len() {
        let mut text = open[..m].to_vec();
        text.extend_from_slice(marker.as_bytes());
        if !text.starts_with(open) {
            alts.push(format!("\\s*{}", lit(&open[..m])));
        }
    }
    for j in 0..open.len() {
        let other = if j == 0 { format!("[^\\s{}]", hex(open[0])) } else { format!("[^{}]", hex(open[j])) };
        alts.push(format!("\\s*{}{other}[\\s\\S]*?", lit(&open[..j])));
    }
    format!("^(?:{})({marker_re}[\\s\\S]*)", alts.join("|"))
}
