//! OpenAI-compatible tool calling and reasoning output for `llama serve`, pure and testable
//! without a model: which format a model writes calls in ([`ToolFormat`]), the grammar
//! that keeps a call valid ([`tool_grammar`], [`after_reasoning`]), and the streaming
//! parser that turns the answer back into content, reasoning and calls
//! ([`ToolCallParser`]).
//!
//! One request, end to end:
//! 1. `ToolFormat::detect(template.source_text())` once per model; the request's tools
//!    through [`Tool::list_from_openai`], its `tool_choice` through [`ToolChoice::from_openai`].
//! 2. The prompt: llama-host's `ChatTemplate::render_with(.., Some(tools), ..)`.
//! 3. The grammar: [`tool_grammar`] with a JSON Schema converter (llama-grammar's
//!    `SchemaConverter` through [`GrammarBuilder`]); when the model reasons, wrap it with
//!    [`after_reasoning`] (`forced_open` from [`thinking_forced_open`] over the prompt).
//! 4. The answer: [`ToolCallParser::push`] each text delta, [`ToolCallParser::finish`] at
//!    the end; a [`ParseFailure`] still carries the message (unparsed text as content).
//!
//! Never panics on model output, and bounds what it holds: [`MAX_TOOLS`], [`MAX_CALLS`],
//! [`MAX_CALL_BYTES`].

mod format;
mod grammar;
mod parse;
mod reasoning;
#[cfg(test)]
mod tests;

pub use format::{check_name, Tool, ToolChoice, ToolFormat, MAX_NAME_LEN, MAX_TOOLS};
pub use grammar::{after_reasoning, gbnf_literal, regex_escape, tool_grammar, GrammarBuilder, GrammarSpec};
pub use parse::{Finished, OutputEvent, ParseFailure, ParseProblem, ParsedMessage, ParsedToolCall, ToolCallParser, MAX_CALLS, MAX_CALL_BYTES};
pub use reasoning::{thinking_forced_open, ReasoningFormat, ThinkTags};

/// A request's tools or tool choice that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("tools[{index}] is not a function tool ({{\"type\": \"function\", \"function\": {{\"name\": ..}}}})")]
    NotAFunction { index: usize },
    #[error("tool name '{name}' is not valid: names are 1 to 64 letters, digits, '_' or '-'")]
    InvalidName { name: String },
    #[error("two tools are named '{name}'")]
    DuplicateName { name: String },
    #[error("{count} tools is more than the {limit} allowed")]
    TooManyTools { count: usize, limit: usize },
    #[error("the parameters of tool '{tool}' are not a JSON Schema object")]
    ParametersNotAnObject { tool: String },
    #[error("the parameters schema of tool '{tool}' cannot be turned into a grammar: {source}")]
    SchemaRefused { tool: String, #[source] source: Box<dyn std::error::Error + Send + Sync> },
    #[error("tool_choice names '{name}', which is not among the tools")]
    UnknownTool { name: String },
    #[error("tool_choice asks for a call but there are no tools")]
    NoTools,
    #[error("tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ..}}}}")]
    BadToolChoice,
    #[error("the tool grammar could not be finished: {0}")]
    Grammar(#[source] Box<dyn std::error::Error + Send + Sync>),
}
