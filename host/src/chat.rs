//! Chat: a conversation rendered into a prompt by the model's chat template.
//!
//! The template comes from the GGUF (`tokenizer.chat_template`, a Jinja template written
//! for Python's jinja2) and is rendered with minijinja plus its Python-compatibility
//! methods (`.strip()`, `.startswith()`, ...). A model without a template gets a built-in
//! one chosen by its architecture (Gemma's turn format for gemma*, ChatML otherwise), or
//! the one named with `ChatTemplate::builtin`.

use serde::{Deserialize, Serialize};

use crate::Model;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the chat template does not compile: {0}")]
    Template(#[source] minijinja::Error),
    #[error("rendering the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
    #[error("unknown built-in chat template '{name}' (known: {known})")]
    UnknownBuiltin { name: String, known: &'static str },
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
    /// Where the template came from, for `-v` and errors.
    pub source: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// The model's own template, else the built-in one for its architecture.
    pub fn for_model(model: &Model) -> Result<ChatTemplate, ChatError> {
        let special = |key: &str| {
            model
                .meta(key)
                .and_then(|id| id.parse::<i32>().ok())
                .and_then(|id| model.token_bytes(id, true).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let (bos, eos) = (special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id"));
        if let Some(t) = model.meta("tokenizer.chat_template") {
            return Self::compile(t, bos, eos, "the model's tokenizer.chat_template".into());
        }
        let arch = model.meta("general.architecture").unwrap_or_default();
        let name = if arch.starts_with("gemma") { "gemma" } else { "chatml" };
        let (src, name) = (Self::builtin_source(name)?, name);
        Self::compile(src.to_string(), bos, eos, format!("built-in '{name}' (the model has no chat template; architecture {arch})"))
    }

    /// A built-in template by name (`gemma`, `chatml`), with the model's special tokens.
    pub fn builtin(model: &Model, name: &str) -> Result<ChatTemplate, ChatError> {
        let from_model = Self::for_model(model)?;
        Self::compile(Self::builtin_source(name)?.to_string(), from_model.bos_token, from_model.eos_token, format!("built-in '{name}'"))
    }

    fn builtin_source(name: &str) -> Result<&'static str, ChatError> {
        match name {
            "gemma" => Ok(GEMMA),
            "chatml" => Ok(CHATML),
            _ => Err(ChatError::UnknownBuiltin { name: name.to_string(), known: BUILTINS }),
        }
    }

    /// Compiles template text (for a template given on the command line too).
    pub fn compile(source: String, bos_token: String, eos_token: String, origin: String) -> Result<ChatTemplate, ChatError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks on.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(ChatError::Template)?,
        );
        env.add_template_owned("chat", source).map_err(ChatError::Template)?;
        Ok(ChatTemplate { env, bos_token, eos_token, source: origin })
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(ChatError::Template)?;
        tmpl.render(minijinja::context! {
            messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(ChatError::Render)
    }
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

    #[test]
    fn reset_keeps_the_system_prompt() {
        let mut c = Conversation::new(Some("sys"));
        c.push("user", "x");
        c.reset();
        assert_eq!(c.messages, vec![Message::new("system", "sys")]);
    }
}
