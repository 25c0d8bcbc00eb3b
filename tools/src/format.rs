//! The tool-call formats models are trained on, how one is chosen from a chat template, and
//! the request side's tools and tool choice. Pure: no model, no grammar engine.

use serde_json::Value;

use crate::ToolError;

/// Most tools one request may declare (a prompt and a grammar grow with each).
pub const MAX_TOOLS: usize = 128;

/// Longest function name, as OpenAI allows.
pub const MAX_NAME_LEN: usize = 64;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    /// Hermes 2 Pro / Qwen 2.5+: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`,
    /// one block per call, text around them is content.
    Hermes,
    /// Llama 3.1+: `{"name": .., "parameters": {..}}` as the whole answer, optionally after
    /// `<|python_tag|>`; several calls separated by `;`.
    Llama3,
    /// Mistral (Nemo, Small 3): `[TOOL_CALLS][{"name": .., "arguments": {..}}, ...]`; the
    /// newer `[TOOL_CALLS]name[ARGS]{..}` is understood when parsing.
    Mistral,
    /// Ours, for templates that know no tools (as llama.cpp's generic format): the whole
    /// answer is one JSON object, `{"tool_calls": [{"name": .., "arguments": {..}}, ..]}` or
    /// `{"content": ".."}`. llama-host's `describe_tools_generic` tells the model so.
    Generic,
}

impl ToolFormat {
    /// The format a template's source implies. Rules, first match wins:
    /// 1. `[TOOL_CALLS]` → [`ToolFormat::Mistral`];
    /// 2. `<tool_call>` → [`ToolFormat::Hermes`] (Qwen, Hermes; also Hermes on Llama 3);
    /// 3. `<|python_tag|>`, or Llama 3's `<|start_header_id|>` with an `ipython` role
    ///    (3.2 has no python tag) → [`ToolFormat::Llama3`];
    /// 4. anything else → [`ToolFormat::Generic`].
    pub fn detect(template_source: &str) -> ToolFormat {
        let has = |s: &str| template_source.contains(s);
        if has("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if has("<tool_call>") {
            ToolFormat::Hermes
        } else if has("<|python_tag|>") || (has("<|start_header_id|>") && has("ipython")) {
            ToolFormat::Llama3
        } else {
            ToolFormat::Generic
        }
    }

    /// Its name, for `-v` logs.
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "Hermes (<tool_call>)",
            ToolFormat::Llama3 => "Llama 3.x (JSON, <|python_tag|>)",
            ToolFormat::Mistral => "Mistral ([TOOL_CALLS])",
            ToolFormat::Generic => "Generic (JSON answer)",
        }
    }

    /// The key a call's arguments go under.
    pub fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }
}

impl std::fmt::Display for ToolFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// Its arguments' JSON Schema (an object; `{}` when the request gave none).
    pub parameters: Value,
}

impl Tool {
    /// One of OpenAI's `tools` entries: `{"type": "function", "function": {name, description?,
    /// parameters?}}` (the bare function object is accepted too). `index` names it in errors.
    pub fn from_openai(index: usize, tool: &Value) -> Result<Tool, ToolError> {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("function");
        if kind != "function" {
            return Err(ToolError::NotAFunction { index });
        }
        let f = tool.get("function").unwrap_or(tool);
        let name = f.get("name").and_then(Value::as_str).ok_or(ToolError::NotAFunction { index })?;
        check_name(name)?;
        let parameters = f.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({}));
        if !parameters.is_object() {
            return Err(ToolError::ParametersNotAnObject { tool: name.to_string() });
        }
        Ok(Tool { name: name.to_string(), description: f.get("description").and_then(Value::as_str).map(str::to_string), parameters })
    }

    /// All of a request's `tools`, checked: count, names, duplicates.
    pub fn list_from_openai(tools: &[Value]) -> Result<Vec<Tool>, ToolError> {
        if tools.len() > MAX_TOOLS {
            return Err(ToolError::TooManyTools { count: tools.len(), limit: MAX_TOOLS });
        }
        let list = tools.iter().enumerate().map(|(i, t)| Tool::from_openai(i, t)).collect::<Result<Vec<_>, _>>()?;
        check_unique(&list)?;
        Ok(list)
    }
}

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$`. The grammar writes names as
/// literals and the parser matches them, so nothing else may get in.
pub fn check_name(name: &str) -> Result<(), ToolError> {
    let ok = !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ToolError::InvalidName { name: name.chars().take(80).collect() })
    }
}

pub(crate) fn check_unique(tools: &[Tool]) -> Result<(), ToolError> {
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(ToolError::DuplicateName { name: w[0].to_string() }),
        None => Ok(()),
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Never call: no grammar, and the answer is not parsed for calls.
    None,
    /// The model decides: calls are constrained only once the model starts one.
    #[default]
    Auto,
    /// At least one call, from the first token.
    Required,
    /// Exactly one call of this function.
    Named(String),
}

impl ToolChoice {
    /// OpenAI's JSON: `"none"`, `"auto"`, `"required"` or `{"type": "function",
    /// "function": {"name": ..}}`; absent means `Auto`.
    pub fn from_openai(v: Option<&Value>) -> Result<ToolChoice, ToolError> {
        match v {
            None | Some(Value::Null) => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                _ => Err(ToolError::BadToolChoice),
            },
            Some(obj) => obj
                .pointer("/function/name")
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Named(n.to_string()))
                .ok_or(ToolError::BadToolChoice),
        }
    }
}
