//! Structured output and tool calls on the completion endpoints: which grammar a request
//! asks for (`response_format`, llama-server's `grammar` and `json_schema`, `tools` with
//! `tool_choice`), and how the model's text becomes OpenAI's message (content,
//! `reasoning_content`, `tool_calls`).
//!
//! Two phases, as the rest of a request: [`Constraint::of`] checks everything that needs no
//! model (field types, conflicts, the JSON Schema's conversion, the tools' names and
//! schemas) before a model is loaded for the request; [`Constraint::plan`] then builds the
//! grammar for this model's template (its tool-call format and reasoning tags) on the
//! blocking thread that renders the prompt, and has the backend parse it, so a grammar
//! llama.cpp refuses is a 400 before the request is queued.

use llama_host::chat::ChatTemplate;
use llama_host::{Grammar, Model};
use llama_tools::{after_reasoning, thinking_forced_open, tool_grammar, GrammarSpec, ReasoningFormat, ThinkTags, Tool, ToolCallParser, ToolChoice, ToolFormat};
use serde::Deserialize;
use serde_json::Value;

use super::{clip, ApiError};

/// `response_format`: OpenAI's three kinds; llama-server's `schema` on `json_object` too.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum ResponseFormat {
    Text,
    JsonObject {
        #[serde(default)]
        schema: Option<Value>,
    },
    JsonSchema {
        json_schema: JsonSchemaFormat,
    },
}

#[derive(Deserialize)]
pub(super) struct JsonSchemaFormat {
    /// OpenAI requires a name; it only labels the schema.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    /// Absent: any JSON object (as OpenAI's `json_object`).
    #[serde(default)]
    schema: Option<Value>,
    /// OpenAI's strict mode: the output always matches the schema. Here it always does
    /// (the grammar enforces it), so `strict` changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// Structured output: OpenAI's `response_format`, llama-server's `grammar` (GBNF) and
/// `json_schema`; tool calls: `tools`, `tool_choice`, `parallel_tool_calls`; llama-server's
/// per-request `reasoning_format` (`none`, `auto`, `deepseek`). Taken out of the request
/// whole for the blocking thread that builds the constraint.
#[derive(Deserialize, Default)]
pub(super) struct ConstraintFields {
    pub response_format: Option<ResponseFormat>,
    pub grammar: Option<String>,
    pub json_schema: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub reasoning_format: Option<String>,
}

impl ConstraintFields {
    pub(super) fn borrowed(&self) -> Fields<'_> {
        Fields {
            response_format: self.response_format.as_ref(),
            grammar: self.grammar.as_deref(),
            json_schema: self.json_schema.as_ref(),
            tools: self.tools.as_deref(),
            tool_choice: self.tool_choice.as_ref(),
            parallel_tool_calls: self.parallel_tool_calls,
            reasoning_format: self.reasoning_format.as_deref(),
        }
    }
}

/// The constraint fields of a request, as it sent them.
pub(super) struct Fields<'a> {
    pub response_format: Option<&'a ResponseFormat>,
    pub grammar: Option<&'a str>,
    pub json_schema: Option<&'a Value>,
    pub tools: Option<&'a [Value]>,
    pub tool_choice: Option<&'a Value>,
    pub parallel_tool_calls: Option<bool>,
    pub reasoning_format: Option<&'a str>,
}

/// What a request's output is held to, checked without the model.
pub(super) struct Constraint {
    kind: Kind,
    pub reasoning: ReasoningFormat,
}

enum Kind {
    None,
    /// A whole-output grammar (GBNF given, or converted from a JSON Schema).
    Grammar(String),
    /// Tool calls: the tools as sent (for the template), parsed, and the choice.
    Tools { raw: Vec<Value>, tools: Vec<Tool>, choice: ToolChoice, parallel: bool },
}

/// What [`Constraint::plan`] decided for this model: the prompt's tools, the grammar, and
/// how to read the answer.
pub(super) struct Plan {
    pub grammar: Option<Grammar>,
    pub parser: Option<ToolCallParser>,
    /// For `-v` logs: the tool-call format in use.
    pub format: Option<ToolFormat>,
}

/// A constraint's error under the name a dialect gives its schema field (Ollama's
/// `format`, Anthropic's `output_config.format`) rather than the OpenAI field the schema
/// was passed on as (`json_schema`, `response_format`); any other error as it is.
pub(super) fn schema_field_named(mut e: ApiError, name: &str) -> ApiError {
    if matches!(e.param.as_deref(), Some("json_schema" | "response_format")) {
        let named = format!("invalid {name}");
        e.message = e.message.replacen("invalid json_schema", &named, 1).replacen("invalid response_format", &named, 1);
        e.param = Some(name.into());
    }
    e
}

fn schema_error(e: llama_grammar::SchemaError, param: &str) -> ApiError {
    ApiError::bad_request(format!("invalid {param}: {}", clip(&e.to_string(), 300)), Some(param))
}

impl Constraint {
    pub(super) fn of(f: Fields<'_>, chat: bool, server_reasoning: ReasoningFormat) -> Result<Constraint, ApiError> {
        let reasoning = match f.reasoning_format {
            None => server_reasoning,
            Some(s) => ReasoningFormat::parse(s)
                .ok_or_else(|| ApiError::bad_request(format!("reasoning_format must be \"none\", \"auto\" or \"deepseek\", not '{}'", clip(s, 40)), Some("reasoning_format")))?,
        };
        let json_format = match f.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject { schema }) => Some(schema.as_ref()),
            Some(ResponseFormat::JsonSchema { json_schema }) => Some(json_schema.schema.as_ref()),
        };
        let given: Vec<&str> = [
            json_format.is_some().then_some("response_format"),
            f.grammar.is_some().then_some("grammar"),
            f.json_schema.is_some().then_some("json_schema"),
            f.tools.is_some_and(|t| !t.is_empty()).then_some("tools"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() > 1 {
            return Err(ApiError::bad_request(format!("{} cannot be used together: give one", given.join(" and ")), Some(given[1])));
        }
        if !chat && f.tools.is_some() {
            return Err(ApiError::bad_request("tools are for /v1/chat/completions", Some("tools")));
        }
        if f.tool_choice.is_some() && f.tools.is_none_or(|t| t.is_empty()) && f.tool_choice.is_some_and(|c| c != "none") {
            return Err(ApiError::bad_request("tool_choice needs tools", Some("tool_choice")));
        }
        let kind = if let Some(g) = f.grammar {
            Kind::Grammar(g.to_string())
        } else if let Some(s) = f.json_schema {
            Kind::Grammar(llama_grammar::json_schema_to_grammar(s).map_err(|e| schema_error(e, "json_schema"))?)
        } else if let Some(schema) = json_format {
            Kind::Grammar(match schema {
                Some(s) => llama_grammar::json_schema_to_grammar(s).map_err(|e| schema_error(e, "response_format"))?,
                None => llama_grammar::json_object_grammar(),
            })
        } else if let Some(raw) = f.tools.filter(|t| !t.is_empty()) {
            let tools = Tool::list_from_openai(raw).map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("tools")))?;
            let choice = ToolChoice::from_openai(f.tool_choice).map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("tool_choice")))?;
            // llama-server's default, not OpenAI's (true): small models asked for "one or
            // more" calls tend to repeat the same call until max_tokens.
            if let ToolChoice::Named(name) = &choice {
                if !tools.iter().any(|t| t.name == *name) {
                    return Err(ApiError::bad_request(format!("tool_choice names '{}', which is not among the tools", clip(name, 64)), Some("tool_choice")));
                }
            }
            let parallel = f.parallel_tool_calls.unwrap_or(false);
            // Every tool's schema is converted now, in the format-independent shape, so a
            // bad one is refused before a model is loaded for the request.
            tool_grammar(ToolFormat::Generic, &tools, &ToolChoice::Required, true, llama_grammar::SchemaConverter::new())
                .map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("tools")))?;
            Kind::Tools { raw: raw.to_vec(), tools, choice, parallel }
        } else {
            Kind::None
        };
        Ok(Constraint { kind, reasoning })
    }

    /// The tools for the chat template, when the request has any it may call. With
    /// `tool_choice: "none"` the template gets none: a template that knows no tools would
    /// otherwise be told to answer in the call format.
    pub(super) fn template_tools(&self) -> Option<&[Value]> {
        match &self.kind {
            Kind::Tools { raw, choice, .. } if *choice != ToolChoice::None => Some(raw),
            _ => None,
        }
    }

    /// The tool-call format of a template: its own when it knows tools, else the generic
    /// JSON format the fallback describes in the system turn.
    pub(super) fn format_of(template: &ChatTemplate) -> ToolFormat {
        if template.capabilities().supports_tools {
            ToolFormat::detect(template.source_text())
        } else {
            ToolFormat::Generic
        }
    }

    /// The grammar and the answer's parser for this model. `prompt` is the rendered prompt
    /// (chat) and tells whether the template opened a reasoning block itself.
    pub(super) fn plan(self, model: &Model, template: Option<&ChatTemplate>, prompt: &str) -> Result<Plan, ApiError> {
        let tags = template.and_then(|t| ThinkTags::detect(t.source_text()));
        let reasoning_on = template.is_some() && self.reasoning != ReasoningFormat::None;
        let forced_open = reasoning_on && tags.is_some() && thinking_forced_open(prompt);
        // The grammar applies after a reasoning block, when the model writes one.
        let wrap = |spec: GrammarSpec| match &tags {
            Some(t) if reasoning_on => after_reasoning(spec, forced_open, t),
            _ => spec,
        };
        let content_parser = || {
            template.map(|_| {
                let p = ToolCallParser::content_only(self.reasoning, forced_open);
                match tags {
                    Some(t) => p.with_think_tags(t),
                    None => p,
                }
            })
        };
        let (spec, parser, format) = match &self.kind {
            Kind::None => (None, content_parser(), None),
            Kind::Grammar(text) => {
                let spec = GrammarSpec { text: text.clone(), root: "root".into(), ..GrammarSpec::default() };
                (Some(wrap(spec)), content_parser(), None)
            }
            Kind::Tools { tools, choice, parallel, .. } => {
                let template = template.ok_or_else(|| ApiError::bad_request("this model has no chat template", Some("messages")))?;
                let format = Constraint::format_of(template);
                let spec = tool_grammar(format, tools, choice, *parallel, llama_grammar::SchemaConverter::new())
                    .map_err(|e| ApiError::bad_request(clip(&e.to_string(), 300), Some("tools")))?;
                let parser = if *choice == ToolChoice::None {
                    ToolCallParser::content_only(self.reasoning, forced_open)
                } else {
                    ToolCallParser::new(format, self.reasoning, forced_open)
                };
                let parser = match tags {
                    Some(t) => parser.with_think_tags(t),
                    None => parser,
                };
                (spec.map(wrap), Some(parser), Some(format))
            }
        };
        let grammar = spec.map(|s| Grammar { text: s.text, root: s.root, lazy: s.lazy, trigger_patterns: s.trigger_patterns, trigger_tokens: s.trigger_tokens });
        if let Some(g) = &grammar {
            // llama.cpp parses it here, against this model's vocabulary: a grammar it refuses
            // is this request's 400, never a failure after it was queued.
            model.check_grammar(g).map_err(|e| ApiError::bad_request(clip(&e.to_string(), 400), Some("grammar")))?;
        }
        Ok(Plan { grammar, parser, format })
    }
}
