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
    /// Where the template came from, for `-v` and errors.
    pub source: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
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
        // Fuel is counted per render: every render gets the whole amount.
        env.set_fuel(Some(RENDER_FUEL));
        let template_error = |source| ChatError::Template { origin: origin.clone(), source };
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks on.
        env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(template_error)?);
        env.add_template_owned("chat", source).map_err(template_error)?;
        Ok(ChatTemplate { env, bos_token, eos_token, source: origin })
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins. Bounded: [`ChatError::OutOfFuel`], [`ChatError::TooLong`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(|source| ChatError::Template { origin: self.source.clone(), source })?;
        let mut out = Bounded { out: Vec::new(), over: false };
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
            &mut out,
        );
        match rendered {
            // minijinja writes whole `str`s, so the bytes are UTF-8.
            Ok(_) => Ok(String::from_utf8_lossy(&out.out).into_owned()),
            Err(_) if out.over => Err(ChatError::TooLong { limit: MAX_RENDER_BYTES }),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(ChatError::OutOfFuel { limit: RENDER_FUEL }),
            Err(e) => Err(ChatError::Render(e)),
        }
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

    /// A model whose metadata is `meta`: enough for the template functions.
    struct FakeModel(Vec<(&'static str, String)>);

    impl crate::ModelOps for FakeModel {
        fn info(&self) -> crate::ModelInfo {
            crate::ModelInfo { description: "fake".into(), n_params: 0, size_bytes: 0, n_vocab: 4, n_ctx_train: 64, bos: 1 }
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

    #[test]
    fn reset_keeps_the_system_prompt() {
        let mut c = Conversation::new(Some("sys"));
        c.push("user", "x");
        c.reset();
        assert_eq!(c.messages, vec![Message::new("system", "sys")]);
    }
}
