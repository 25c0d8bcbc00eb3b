//! `llama chat`: a multi-turn conversation rendered with the model's chat template.
//!
//! On a terminal it is an interactive REPL (line editing, Ctrl-C cancels the reply and
//! stays, Ctrl-D or /exit leaves). When stdin is not a terminal each line is one user turn,
//! so it can be scripted. The session's prompt cache makes each turn decode only what the
//! previous turns did not (the statistics line shows cached vs decoded tokens).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use llama_host::chat::{ChatTemplate, Conversation};
use llama_host::{FinishReason, Model, Session};

use crate::load::{load_model, select_backend};
use crate::opts::{ChatOpts, Global};
use crate::output::{stats_line, stream_to_stdout};
use crate::signals::Interrupts;
use crate::CliError;

const HELP: &str = "commands: /reset (forget the conversation), /save FILE, /load FILE, /exit (or Ctrl-D); Ctrl-C stops a reply";

/// The chat template: `choice` (`--chat-template`: a built-in name or a file), else the
/// model's own, else the built-in one for its architecture. A model template that does not
/// compile is a warning and the built-in one is used; a template the user named must
/// render a first turn here, so a broken one is a bad argument (exit 2) before the chat
/// starts, not an error at every turn.
pub fn template(model: &Model, choice: Option<&str>, system: Option<&str>) -> Result<ChatTemplate, CliError> {
    let Some(name) = choice else {
        let (tmpl, problem) = ChatTemplate::for_model_or_builtin(model)?;
        if let Some(e) = problem {
            tracing::warn!("{e}; using the {} template instead (--chat-template NAME|FILE chooses another)", tmpl.source);
        }
        return Ok(tmpl);
    };
    let tmpl = ChatTemplate::named(model, name).map_err(CliError::ChatTemplate)?;
    let mut first = Conversation::new(system);
    first.push("user", "Hello");
    tmpl.render(&first.messages, true).map_err(CliError::ChatTemplate)?;
    Ok(tmpl)
}

enum Line {
    Text(String),
    Eof,
}

/// One line of input. The terminal stays in its own (cooked) mode throughout: it edits
/// the line (backspace, Ctrl-U, Ctrl-W), Ctrl-D ends input, and Ctrl-C is always a signal,
/// which cancels a streaming reply. (A raw-mode line editor would turn Ctrl-C during a
/// reply into input.)
fn read_line(stdin: &mut std::io::StdinLock<'static>, interactive: bool) -> Line {
    if interactive {
        err!("> ");
    }
    let mut l = String::new();
    match stdin.read_line(&mut l) {
        Ok(0) | Err(_) => Line::Eof,
        Ok(_) => Line::Text(l.trim_end_matches(['\n', '\r']).to_string()),
    }
}

pub fn run(g: &Global, a: &ChatOpts, ints: &Interrupts) -> Result<(), CliError> {
    let (opts, params) = (&a.gen.generate, &a.gen.session);
    let backend = select_backend(g, &a.load)?;
    let model = load_model(&backend, &a.load, params.size.n_ctx)?;
    let tmpl = template(&model, a.chat_template.as_deref(), a.system.as_deref())?;
    tracing::info!(template = %tmpl.source, "chat template");
    let mut session = model.session(params)?;
    let _draft = crate::load::attach_draft(&backend, &a.load, &a.gen, &mut session)?;
    let mut conv = Conversation::new(a.system.as_deref());

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        errln!("{} — {HELP}", model.info().description);
        // Ctrl-C at the prompt does not leave the chat.
        ints.on_idle(|| err!("\n(Ctrl-D or /exit leaves the chat)\n> "));
    }
    let mut stdin = std::io::stdin().lock();
    loop {
        let line = match read_line(&mut stdin, interactive) {
            Line::Eof => break,
            Line::Text(l) => l,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map(|(n, a)| (n, a.trim())).unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" | "bye" => break,
                "reset" => {
                    conv.reset();
                    session.reset();
                    errln!("(conversation reset)");
                }
                "save" if !arg.is_empty() => match save(&conv, Path::new(arg)) {
                    Ok(()) => errln!("(saved {} messages to {arg})", conv.messages.len()),
                    Err(e) => errln!("error: cannot save to {arg}: {e}"),
                },
                "load" if !arg.is_empty() => match load(Path::new(arg)) {
                    Ok(c) => {
                        conv = c;
                        errln!("(loaded {} messages from {arg})", conv.messages.len());
                    }
                    Err(e) => errln!("error: cannot load {arg}: {e}"),
                },
                _ => errln!("{HELP}"),
            }
            continue;
        }
        conv.push("user", line);
        match reply(&mut session, &tmpl, &conv, opts, ints) {
            Ok((text, stats, closed)) => {
                // A cancelled reply stays in the history as far as it got.
                conv.push("assistant", text);
                if !a.no_stats {
                    errln!("{}", stats_line(&stats, backend.name()));
                }
                // Nobody reads the replies any more (`llama chat | head`): a normal end.
                if closed {
                    break;
                }
            }
            Err(e) => {
                conv.messages.pop();
                crate::error::print_error(&e);
            }
        }
    }
    Ok(())
}

/// One reply, streamed to stdout: its text, statistics, and whether stdout was closed.
fn reply(
    session: &mut Session<'_>,
    tmpl: &ChatTemplate,
    conv: &Conversation,
    opts: &llama_host::GenerateOptions,
    ints: &Interrupts,
) -> Result<(String, llama_host::GenerationStats, bool), CliError> {
    let prompt = tmpl.render(&conv.messages, true)?;
    let mut stream = session.stream(&prompt, opts)?;
    ints.watch(stream.canceller());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let streamed = stream_to_stdout(&mut stream, &mut out);
    ints.clear();
    let streamed = streamed?;
    let stats = stream.stats().clone();
    let end = if stats.finish == Some(FinishReason::Cancelled) { " [stopped]\n" } else { "\n" };
    let closed = streamed.closed || out.write_all(end.as_bytes()).and_then(|_| out.flush()).is_err();
    Ok((streamed.text.trim().to_string(), stats, closed))
}

fn save(conv: &Conversation, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(conv).map_err(std::io::Error::other)?)
}

fn load(path: &Path) -> std::io::Result<Conversation> {
    serde_json::from_str(&std::fs::read_to_string(path)?).map_err(std::io::Error::other)
}
