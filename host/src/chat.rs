//! Chat: a conversation rendered into a prompt by the model's chat template.
//!
//! The template comes from the GGUF (`tokenizer.chat_template`, a Jinja template written
//! for Python's jinja2) and is rendered with minijinja plus its Python-compatibility
//! methods (`.strip()`, `.startswith()`, ...). A model without a template gets a built-in
//! one chosen by its architecture (Gemma's turn format for gemma*, ChatML otherwise), or
//! the one named with `ChatTemplate::builtin`, or a file (`ChatTemplate::from_file`).
//! Templates are untrusted input (they come with model files): rendering is bounded in
//! instructions ([`RENDER_FUEL`]) and output ([`MAX_RENDER_BYTES`]), never unbounded.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Model;

/// Instructions one render may run: a real template over a long conversation uses a few
/// hundred thousand; a loop that does not end stops here (about a second) with
/// [`ChatError::OutOfFuel`].
pub const RENDER_FUEL: u64 = 20_000_000;

/// Bytes one render may write: far more than any context holds as text.
pub const MAX_RENDER_BYTES: usize = 32 << 20;

/// One message of a conversation.
///
/// The optional fields are left out of what the template sees when they are `None`, so a
/// template's `message.tool_calls is defined` tests mean what their authors meant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Always text (templates concatenate it); an assistant turn that only called tools has "".
    #[serde(default)]
    pub content: String,
    /// The calls an assistant turn made (OpenAI's shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the id of the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a `tool` message: the function's name (OpenAI's older `function` role had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into(), ..Message::default() }
    }
}

/// One call in an assistant turn, OpenAI's `{id, type: "function", function: {name, arguments}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// Always `function` today.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_string()
}

/// The function a [`ToolCall`] names and its arguments as JSON text (OpenAI sends a string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: impl Into<String>) -> Self {
        ToolCall { id: id.into(), kind: function_kind(), function: FunctionCall { name: name.into(), arguments: arguments.into() } }
    }
}

/// What a template's source says it understands. A heuristic over the text (llama.cpp's
/// minja probes by rendering instead): a template that never mentions `tools` cannot show
/// them to the model, whatever it is given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateCaps {
    /// Reads a `tools` variable: the tool list can be handed to it.
    pub supports_tools: bool,
    /// Reads `tool_calls` on messages: assistant turns with calls render as the model's format.
    pub supports_tool_calls: bool,
    /// Has a branch for `role == 'tool'`: results render as the model was trained.
    pub supports_tool_role: bool,
    /// The reasoning block's open and close tags, when the template writes or strips them.
    pub think_tags: Option<(&'static str, &'static str)>,
}

impl TemplateCaps {
    /// Reads the capabilities from template text.
    pub fn from_source(src: &str) -> TemplateCaps {
        let think_tags = if src.contains("<|START_THINKING|>") {
            Some(("<|START_THINKING|>", "<|END_THINKING|>"))
        } else if src.contains("<think>") || src.contains("</think>") {
            Some(("<think>", "</think>"))
        } else {
            None
        };
        TemplateCaps {
            // `tools` as a word: `tool_calls` alone does not count.
            supports_tools: src.match_indices("tools").any(|(i, _)| !src[i + 5..].starts_with(|c: char| c.is_alphanumeric() || c == '_')),
            supports_tool_calls: src.contains("tool_calls"),
            supports_tool_role: src.contains("'tool'") || src.contains("\"tool\""),
            think_tags,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the chat template ({origin}) does not compile: {source}")]
    Template { origin: String, #[source] source: minijinja::Error },
    #[error("rendering the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
    #[error("rendering the chat template ran past {limit} instructions (a loop that does not end?)")]
    OutOfFuel { limit: u64 },
    #[error("the chat template wrote more than {limit} bytes")]
    TooLong { limit: usize },
    #[error("unknown built-in chat template '{name}' (known: {known})")]
    UnknownBuiltin { name: String, known: &'static str },
    #[error("chat template file {} does not exist (and '{}' is not a built-in template: {known})", path.display(), path.display())]
    FileNotFound { path: PathBuf, known: &'static str },
    #[error("cannot read chat template file {}", path.display())]
    ReadFile { path: PathBuf, #[source] source: std::io::Error },
}

/// Gemma's turn format (gemma, gemma2, gemma3): no system role, so a system prompt is
/// prepended to the first user turn, as Google's own template does.
const GEMMA: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
{%- endif -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// ChatML, the common fallback (llama.cpp's too).
const CHATML: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}";

const BUILTINS: &str = "gemma, chatml";

/// A compiled chat template with the model's special tokens.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The Jinja text itself: tool-format and reasoning detection read it.
    text: String,
    caps: TemplateCaps,
    /// Where the template came from, for `-v` and errors.
    pub source: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
}

/// jinja2's `tojson` as Hugging Face renders chat templates: Python's `json.dumps` with
/// `ensure_ascii=False` (`", "` and `": "` separators, no HTML escaping), so tool schemas
/// and call arguments reach the model spelled as in training. Keys come out sorted:
/// serde_json here keeps no insertion order.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

/// Writes `v` as Python's `json.dumps(v, ensure_ascii=False, indent=indent)` does.
pub(crate) fn py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn py_json_string(v: &serde_json::Value) -> String {
    let mut out = String::new();
    py_json(v, None, 0, &mut out);
    out
}

/// The model's BOS and EOS tokens as text (empty when it has none).
fn special_tokens(model: &Model) -> (String, String) {
    let special = |key: &str| {
        model
            .meta(key)
            .and_then(|id| id.parse::<i32>().ok())
            .and_then(|id| model.token_bytes(id, true).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    (special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id"))
}

/// A `fmt::Write`/`io::Write` sink for rendering that refuses to grow past a bound.
struct Bounded {
    out: Vec<u8>,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > MAX_RENDER_BYTES {
            self.over = true;
            return Err(std::io::Error::other("the chat template's output is too long"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// The model's own template, else the built-in one for its architecture. A model
    /// template that does not compile is an error ([`ChatError::Template`]); see
    /// [`ChatTemplate::for_model_or_builtin`] to fall back instead.
    pub fn for_model(model: &Model) -> Result<ChatTemplate, ChatError> {
        let (bos, eos) = special_tokens(model);
        match model.meta("tokenizer.chat_template") {
            Some(t) => Self::compile(t, bos, eos, "the model's tokenizer.chat_template".into()),
            None => Self::arch_builtin(model, bos, eos),
        }
    }

    /// Like [`ChatTemplate::for_model`], but a model template that does not compile falls
    /// back to the built-in one for the architecture (as llama.cpp's server does), and
    /// the compile error comes back beside it so the caller can say so (a warning):
    /// never dropped without a word.
    pub fn for_model_or_builtin(model: &Model) -> Result<(ChatTemplate, Option<ChatError>), ChatError> {
        match Self::for_model(model) {
            Ok(t) => Ok((t, None)),
            Err(e @ ChatError::Template { .. }) => {
                let (bos, eos) = special_tokens(model);
                Ok((Self::arch_builtin(model, bos, eos)?, Some(e)))
            }
            Err(e) => Err(e),
        }
    }

    fn arch_builtin(model: &Model, bos: String, eos: String) -> Result<ChatTemplate, ChatError> {
        let arch = model.meta("general.architecture").unwrap_or_default();
        let name = if arch.starts_with("gemma") { "gemma" } else { "chatml" };
        let has_own = model.meta("tokenizer.chat_template").is_some();
        let why = if has_own { "the model's own does not compile" } else { "the model has no chat template" };
        Self::compile(Self::builtin_source(name)?.to_string(), bos, eos, format!("built-in '{name}' ({why}; architecture {arch})"))
    }

    /// A built-in template by name (`gemma`, `chatml`), with the model's special tokens.
    /// The model's own template is not compiled: it may be the reason for choosing this.
    pub fn builtin(model: &Model, name: &str) -> Result<ChatTemplate, ChatError> {
        let source = Self::builtin_source(name)?;
        let (bos, eos) = special_tokens(model);
        Self::compile(source.to_string(), bos, eos, format!("built-in '{name}'"))
    }

    /// A Jinja template from a file, with the model's special tokens (the model's own
    /// template is not compiled).
    pub fn from_file(model: &Model, path: &Path) -> Result<ChatTemplate, ChatError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ChatError::FileNotFound { path: path.to_path_buf(), known: BUILTINS },
            _ => ChatError::ReadFile { path: path.to_path_buf(), source },
        })?;
        let (bos, eos) = special_tokens(model);
        Self::compile(text, bos, eos, path.display().to_string())
    }

    /// A template named by a user (`--chat-template`): a built-in name, else a file.
    pub fn named(model: &Model, name_or_file: &str) -> Result<ChatTemplate, ChatError> {
        if Self::builtin_source(name_or_file).is_ok() {
            Self::builtin(model, name_or_file)
        } else {
            Self::from_file(model, Path::new(name_or_file))
        }
    }

    fn builtin_source(name: &str) -> Result<&'static str, ChatError> {
        match name {
            "gemma" => Ok(GEMMA),
            "chatml" => Ok(CHATML),
            _ => Err(ChatError::UnknownBuiltin { name: name.to_string(), known: BUILTINS }),
        }
    }

    /// Compiles template text (for a template given on the command line too). `origin`
    /// says where it came from, in errors and for `-v`.
    pub fn compile(source: String, bos_token: String, eos_token: String, origin: String) -> Result<ChatTemplate, ChatError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        // Fuel is counted per render: every render gets the whole amount.
        env.set_fuel(Some(RENDER_FUEL));
        let template_error = |source| ChatError::Template { origin: origin.clone(), source };
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks on.
        env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(template_error)?);
        let caps = TemplateCaps::from_source(&source);
        env.add_template_owned("chat", source.clone()).map_err(template_error)?;
        Ok(ChatTemplate { env, bos_token, eos_token, text: source, caps, source: origin })
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The template's Jinja text (not where it came from: that is [`ChatTemplate::source`]).
    pub fn source_text(&self) -> &str {
        &self.text
    }

    /// What the template understands of tools and reasoning, read from its text.
    pub fn capabilities(&self) -> &TemplateCaps {
        &self.caps
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins. Bounded: [`ChatError::OutOfFuel`], [`ChatError::TooLong`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_with(messages, add_generation_prompt, None, None)
    }

    /// [`ChatTemplate::render`] with OpenAI tool objects (`{"type": "function", "function":
    /// {name, description, parameters}}`) and extra template variables (`enable_thinking`,
    /// ...; the fixed ones win over them).
    ///
    /// A template that reads `tools` gets them as given. One that does not gets them
    /// described in the system turn, with the JSON answer format of llama-tools' `Generic`
    /// format (see [`describe_tools_generic`]); likewise a template that knows no
    /// `tool_calls` sees an assistant's calls as that JSON in its content, and one without a
    /// `tool` role sees results as user turns, consecutive same-role turns merged so strict
    /// templates (Gemma's alternation check) still render.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&[serde_json::Value]>,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, ChatError> {
        let tools = tools.filter(|t| !t.is_empty());
        let adapted = adapt_messages(messages, tools, &self.caps);
        let messages = adapted.as_deref().unwrap_or(messages);
        let mut ctx = extra.cloned().unwrap_or_default();
        ctx.insert("messages".into(), serde_json::Value::Array(messages.iter().map(template_message).collect()));
        if let Some(tools) = tools.filter(|_| self.caps.supports_tools) {
            ctx.insert("tools".into(), serde_json::Value::Array(tools.to_vec()));
        }
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.as_str().into());
        ctx.insert("eos_token".into(), self.eos_token.as_str().into());
        let tmpl = self.env.get_template("chat").map_err(|source| ChatError::Template { origin: self.source.clone(), source })?;
        let mut out = Bounded { out: Vec::new(), over: false };
        let rendered = tmpl.render_captured_to(minijinja::value::Value::from(minijinja::value::Serde(&ctx)), &mut out);
        match rendered {
            // minijinja writes whole `str`s, so the bytes are UTF-8.
            Ok(_) => Ok(String::from_utf8_lossy(&out.out).into_owned()),
            Err(_) if out.over => Err(ChatError::TooLong { limit: MAX_RENDER_BYTES }),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(ChatError::OutOfFuel { limit: RENDER_FUEL }),
            Err(e) => Err(ChatError::Render(e)),
        }
    }
}

/// A message as templates see it: `None` fields absent, and each call's `arguments`
/// parsed into JSON when it parses (Hermes/Qwen templates write `arguments | tojson`,
/// which would quote a string a second time), as llama.cpp does.
fn template_message(m: &Message) -> serde_json::Value {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Some(calls) = v.get_mut("tool_calls").and_then(|c| c.as_array_mut()) {
        for call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments") {
                if let Some(parsed) = args.as_str().and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok()) {
                    *args = parsed;
                }
            }
        }
    }
    v
}

/// The function object of an OpenAI tool (`{"type": "function", "function": {...}}`), or
/// the tool itself when it is already the bare function.
fn tool_function(tool: &serde_json::Value) -> &serde_json::Value {
    tool.get("function").unwrap_or(tool)
}

/// The system text that shows `tools` to a model whose template cannot, and the answer
/// format llama-tools' `Generic` format parses (and its grammar enforces): keep the two
/// in step.
pub fn describe_tools_generic(tools: &[serde_json::Value]) -> String {
    let mut s = String::from("You can call the following tools (functions). Each is described as JSON with its name, what it does and the JSON Schema of its arguments:\n\n");
    for t in tools {
        let f = tool_function(t);
        let field = |k: &str, default: serde_json::Value| py_json_string(f.get(k).unwrap_or(&default));
        // Written by hand: name first reads better than serde_json's sorted keys.
        s.push_str(&format!(
            "{{\"name\": {}, \"description\": {}, \"parameters\": {}}}\n",
            field("name", serde_json::Value::Null),
            field("description", "".into()),
            field("parameters", serde_json::json!({})),
        ));
    }
    s.push_str(
        "\nAnswer with a single JSON object and nothing else. To call tools:\n\
         {\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<arguments as its schema describes>}}]}\n\
         To answer the user directly:\n\
         {\"content\": \"<your answer>\"}",
    );
    s
}

/// An assistant's calls as the `Generic` JSON answer (for templates without `tool_calls`).
fn calls_as_generic_json(calls: &[ToolCall]) -> String {
    let calls: Vec<String> = calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<serde_json::Value>(&c.function.arguments)
                .unwrap_or_else(|_| serde_json::Value::String(c.function.arguments.clone()));
            format!("{{\"name\": {}, \"arguments\": {}}}", py_json_string(&c.function.name.as_str().into()), py_json_string(&args))
        })
        .collect();
    format!("{{\"tool_calls\": [{}]}}", calls.join(", "))
}

/// The messages rewritten for what the template lacks (see [`ChatTemplate::render_with`]);
/// `None` when it needs nothing, so the common case copies nothing.
fn adapt_messages(messages: &[Message], tools: Option<&[serde_json::Value]>, caps: &TemplateCaps) -> Option<Vec<Message>> {
    let describe = tools.filter(|_| !caps.supports_tools);
    let rewrite_calls = !caps.supports_tool_calls && messages.iter().any(|m| m.tool_calls.is_some());
    let rewrite_results = !caps.supports_tool_role && messages.iter().any(|m| m.role == "tool");
    if describe.is_none() && !rewrite_calls && !rewrite_results {
        return None;
    }
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if let Some(tools) = describe {
        let text = describe_tools_generic(tools);
        match messages.first() {
            Some(first) if first.role == "system" => {
                out.push(Message::new("system", format!("{}\n\n{text}", first.content)));
            }
            _ => out.push(Message::new("system", text)),
        }
    }
    let skip = usize::from(describe.is_some() && messages.first().is_some_and(|m| m.role == "system"));
    // Names of earlier calls by id, for results that do not carry their function's name.
    let mut call_names: Vec<(&str, &str)> = Vec::new();
    for m in &messages[skip..] {
        if let Some(calls) = &m.tool_calls {
            call_names.extend(calls.iter().map(|c| (c.id.as_str(), c.function.name.as_str())));
        }
        let converted = if rewrite_calls && m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) {
            let json = calls_as_generic_json(m.tool_calls.as_deref().unwrap_or_default());
            let content = if m.content.trim().is_empty() { json } else { format!("{}\n{json}", m.content) };
            Message::new(&m.role, content)
        } else if rewrite_results && m.role == "tool" {
            let id = m.tool_call_id.as_deref();
            let name = m.name.as_deref().or_else(|| id.and_then(|id| call_names.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)));
            let head = match (id, name) {
                (Some(id), Some(name)) => format!("Result of tool call {id} ({name}):"),
                (Some(id), None) => format!("Result of tool call {id}:"),
                (None, Some(name)) => format!("Result of a tool call ({name}):"),
                (None, None) => "Result of a tool call:".to_string(),
            };
            Message::new("user", format!("{head}\n{}", m.content))
        } else {
            m.clone()
        };
        match out.last_mut() {
            // A rewritten turn can land beside one of its role (a result after a user turn,
            // two results in a row): merge them, templates may insist on alternation.
            Some(prev) if prev.role == converted.role && prev.role != "tool" && prev.tool_calls.is_none() && converted.tool_calls.is_none() => {
                prev.content.push_str("\n\n");
                prev.content.push_str(&converted.content);
            }
            _ => out.push(converted),
        }
    }
    Some(out)
}

/// A conversation: the messages so far, renderable with a template, saved as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn new(system: Option<&str>) -> Self {
        Conversation { messages: system.map(|s| vec![Message::new("system", s)]).unwrap_or_default() }
    }

    /// Drops every message but the system prompt.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }

    pub fn push(&mut self, role: &str, content: impl Into<String>) {
        self.messages.push(Message::new(role, content));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma() -> ChatTemplate {
        ChatTemplate::compile(GEMMA.into(), "<bos>".into(), "<eos>".into(), "test".into()).unwrap()
    }

    #[test]
    fn gemma_turns_render_like_googles_template() {
        let mut c = Conversation::new(Some("Be brief."));
        c.push("user", "Hi");
        c.push("assistant", "Hello!");
        c.push("user", "Bye");
        let out = gemma().render(&c.messages, true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn each_turn_extends_the_previous_prompt() {
        // The prompt cache relies on this: turn N's prompt starts with turn N-1's text.
        let t = gemma();
        let mut c = Conversation::new(None);
        c.push("user", "one");
        let first = t.render(&c.messages, true).unwrap();
        c.push("assistant", "two");
        c.push("user", "three");
        let second = t.render(&c.messages, true).unwrap();
        assert!(second.starts_with(&first), "{second:?} does not extend {first:?}");
    }

    #[test]
    fn roles_out_of_order_are_a_render_error() {
        let c = Conversation { messages: vec![Message::new("assistant", "x")] };
        assert!(matches!(gemma().render(&c.messages, true), Err(ChatError::Render(_))));
    }

    #[test]
    fn python_string_methods_work_in_templates() {
        let t = ChatTemplate::compile(
            "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}".into(),
            String::new(),
            String::new(),
            "test".into(),
        )
        .unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "HI");
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::compile(CHATML.into(), String::new(), String::new(), "test".into()).unwrap();
        let out = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    /// A model whose metadata is `meta`: enough for the template functions.
    struct FakeModel(Vec<(&'static str, String)>);

    impl crate::ModelOps for FakeModel {
        fn info(&self) -> crate::ModelInfo {
            crate::ModelInfo { description: "fake".into(), n_params: 0, size_bytes: 0, n_vocab: 4, n_ctx_train: 64, bos: 1, placement: Vec::new() }
        }
        fn tokenize(&self, _: &str, _: bool, _: bool) -> Result<Vec<i32>, crate::BackendError> {
            Ok(Vec::new())
        }
        fn token_bytes(&self, token: i32, _: bool) -> Result<Vec<u8>, crate::BackendError> {
            Ok(match token {
                1 => b"<bos>".to_vec(),
                2 => b"<eos>".to_vec(),
                _ => Vec::new(),
            })
        }
        fn meta(&self, key: &str) -> Option<String> {
            self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
        }
        fn new_context(&self, _: &crate::ContextParams) -> Result<Box<dyn crate::ContextOps>, crate::BackendError> {
            Err(crate::BackendError::Unavailable { reason: "fake".into() })
        }
    }

    fn model_with_template(template: &str) -> Model {
        let meta = vec![
            ("general.architecture", "gemma3".to_string()),
            ("tokenizer.ggml.bos_token_id", "1".to_string()),
            ("tokenizer.ggml.eos_token_id", "2".to_string()),
            ("tokenizer.chat_template", template.to_string()),
        ];
        Model::from_ops(Box::new(FakeModel(meta)), "fake.gguf")
    }

    #[test]
    fn a_builtin_template_does_not_need_the_models_template_to_compile() {
        let m = model_with_template("{% for %}");
        let t = ChatTemplate::builtin(&m, "chatml").expect("a built-in template for a model whose own does not compile");
        assert_eq!(t.render(&[Message::new("user", "hi")], true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(ChatTemplate::builtin(&m, "gemma").unwrap().bos_token(), "<bos>");
    }

    #[test]
    fn a_model_template_that_does_not_compile_is_reported_not_dropped() {
        let m = model_with_template("{% for %}");
        let e = ChatTemplate::for_model(&m).err().expect("the model's template does not compile");
        assert!(matches!(e, ChatError::Template { .. }) && e.to_string().contains("tokenizer.chat_template"), "{e}");
        let (t, problem) = ChatTemplate::for_model_or_builtin(&m).unwrap();
        assert!(t.source.contains("built-in 'gemma'"), "{}", t.source);
        assert!(matches!(problem, Some(ChatError::Template { .. })));
        let good = model_with_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}");
        let (t, problem) = ChatTemplate::for_model_or_builtin(&good).unwrap();
        assert!(problem.is_none());
        assert_eq!(t.render(&[Message::new("user", "hi")], true).unwrap(), "<bos>hi");
    }

    #[test]
    fn a_missing_template_file_is_named_as_a_missing_file() {
        let m = model_with_template("{% for %}");
        let e = ChatTemplate::named(&m, "/nonexistent/template.jinja").err().unwrap();
        assert!(matches!(e, ChatError::FileNotFound { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/template.jinja does not exist"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jinja");
        std::fs::write(&f, "{{ eos_token }}").unwrap();
        let t = ChatTemplate::named(&m, f.to_str().unwrap()).expect("a file template for a model whose own does not compile");
        assert_eq!(t.render(&[], false).unwrap(), "<eos>");
    }

    #[test]
    fn a_template_that_loops_for_ever_runs_out_of_fuel() {
        // 10^10 iterations that write nothing: without a bound this renders for hours.
        let t = ChatTemplate::compile(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}".into(),
            String::new(),
            String::new(),
            "test".into(),
        )
        .unwrap();
        match t.render(&[Message::new("user", "hi")], true) {
            Ok(text) => panic!("rendered {} bytes", text.len()),
            Err(e) => assert!(matches!(e, ChatError::OutOfFuel { .. }) && e.to_string().contains("instructions"), "{e}"),
        }
    }

    #[test]
    fn a_template_that_writes_without_end_is_cut_off() {
        // 100,000 x 1,000 bytes, in few instructions.
        let t = ChatTemplate::compile(
            "{% for a in range(100000) %}{{ 'x' * 1000 }}{% endfor %}".into(),
            String::new(),
            String::new(),
            "test".into(),
        )
        .unwrap();
        match t.render(&[Message::new("user", "hi")], true) {
            Ok(text) => panic!("rendered {} bytes", text.len()),
            Err(e) => assert!(matches!(e, ChatError::TooLong { .. }) && e.to_string().contains("bytes"), "{e}"),
        }
    }

    /// The shape of Qwen 2.5's template: tools in the system turn, calls as Hermes JSON
    /// written with `arguments | tojson`, results in `<tool_response>`.
    const QWEN_LIKE: &str = "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}\
{%- for m in messages %}\
{%- if m.role == 'assistant' and m.tool_calls is defined %}<|im_start|>assistant\n{% for tc in m.tool_calls %}{% set f = tc.function %}<tool_call>{\"name\": \"{{ f.name }}\", \"arguments\": {{ f.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n\
{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n\
{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}\
{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn weather_tool() -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn conversation_with_a_call() -> Vec<Message> {
        vec![
            Message::new("user", "Weather in Paris?"),
            Message { tool_calls: Some(vec![ToolCall::new("call_1", "get_weather", r#"{"city": "Paris"}"#)]), ..Message::new("assistant", "") },
            Message { tool_call_id: Some("call_1".into()), ..Message::new("tool", "18C, sunny") },
        ]
    }

    #[test]
    fn capabilities_are_read_from_the_template_text() {
        let caps = TemplateCaps::from_source(QWEN_LIKE);
        assert!(caps.supports_tools && caps.supports_tool_calls && caps.supports_tool_role, "{caps:?}");
        let gemma = TemplateCaps::from_source(GEMMA);
        assert_eq!(gemma, TemplateCaps::default());
        // `tool_calls` alone is not `tools`.
        assert!(!TemplateCaps::from_source("{{ m.tool_calls }}").supports_tools);
        assert_eq!(TemplateCaps::from_source("{{ '<think>\n' }}").think_tags, Some(("<think>", "</think>")));
        assert_eq!(
            TemplateCaps::from_source("<|START_THINKING|>x<|END_THINKING|>").think_tags,
            Some(("<|START_THINKING|>", "<|END_THINKING|>"))
        );
    }

    #[test]
    fn a_template_that_knows_tools_gets_them_and_arguments_as_an_object() {
        let t = ChatTemplate::compile(QWEN_LIKE.into(), String::new(), String::new(), "test".into()).unwrap();
        let out = t.render_with(&conversation_with_a_call(), true, Some(&[weather_tool()]), None).unwrap();
        assert!(out.starts_with("<|im_start|>system\n<tools>{"), "{out}");
        assert!(out.contains(r#""name": "get_weather""#), "{out}");
        // Parsed, so `tojson` writes an object, not a quoted string, spelled as Python does.
        assert!(out.contains(r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#), "{out}");
        assert!(out.contains("<tool_response>18C, sunny</tool_response>"), "{out}");
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
        // Without tools the template sees no `tools` at all.
        let plain = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(plain, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn unset_fields_are_not_defined_for_templates() {
        let t = ChatTemplate::compile(
            "{% for m in messages %}{{ m.tool_calls is defined }},{{ m.name is defined }};{% if m.role == 'tool' %}{% endif %}{% endfor %}".into(),
            String::new(),
            String::new(),
            "test".into(),
        )
        .unwrap();
        let msgs = [Message::new("user", "x"), Message { name: Some("f".into()), ..Message::new("tool", "y") }];
        assert_eq!(t.render(&msgs, false).unwrap(), "False,False;False,True;");
    }

    #[test]
    fn tools_reach_a_template_that_knows_none_through_the_system_turn() {
        let mut msgs = vec![Message::new("system", "Be brief.")];
        msgs.extend(conversation_with_a_call());
        msgs.push(Message { tool_call_id: Some("call_2".into()), name: Some("get_time".into()), ..Message::new("tool", "noon") });
        // Gemma's template raises on roles that do not alternate: it must still render.
        let out = gemma().render_with(&msgs, true, Some(&[weather_tool()]), None).unwrap();
        assert!(out.starts_with("<bos><start_of_turn>user\nBe brief.\n\nYou can call the following tools"), "{out}");
        assert!(out.contains(r#"{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties""#), "{out}");
        assert!(out.contains(r#"{"tool_calls": [{"name": "<function name>""#), "{out}");
        assert!(out.contains("<start_of_turn>model\n{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}<end_of_turn>"), "{out}");
        assert!(
            out.contains("<start_of_turn>user\nResult of tool call call_1 (get_weather):\n18C, sunny\n\nResult of tool call call_2 (get_time):\nnoon<end_of_turn>"),
            "{out}"
        );
        assert!(out.ends_with("<start_of_turn>model\n"), "{out}");
    }

    #[test]
    fn tojson_writes_like_pythons_json_dumps() {
        let t = ChatTemplate::compile("{{ v | tojson }}|{{ v | tojson(indent=2) }}".into(), String::new(), String::new(), "test".into()).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("v".into(), serde_json::json!({"a": [1, "é<"], "b": {}}));
        assert_eq!(t.render_with(&[], false, None, Some(&extra)).unwrap(), "{\"a\": [1, \"é<\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"é<\"\n  ],\n  \"b\": {}\n}");
    }

    #[test]
    fn extra_variables_reach_the_template_and_fixed_ones_win() {
        let t = ChatTemplate::compile("{{ enable_thinking }} {{ add_generation_prompt }}".into(), String::new(), String::new(), "test".into()).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), false.into());
        extra.insert("add_generation_prompt".into(), "overridden".into());
        assert_eq!(t.render_with(&[], true, None, Some(&extra)).unwrap(), "False True");
    }

    #[test]
    fn messages_round_trip_through_openai_json() {
        let json = r#"{"role":"assistant","content":"","tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]}"#;
        let m: Message = serde_json::from_str(json).unwrap();
        assert_eq!(m.tool_calls.as_ref().unwrap()[0], ToolCall::new("call_1", "f", "{}"));
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        let plain: Message = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(plain, Message::new("user", "hi"));
    }

    #[test]
    fn reset_keeps_the_system_prompt() {
        let mut c = Conversation::new(Some("sys"));
        c.push("user", "x");
        c.reset();
        assert_eq!(c.messages, vec![Message::new("system", "sys")]);
    }
}
