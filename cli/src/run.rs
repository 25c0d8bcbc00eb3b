//! `llama run`: one prompt (or one chat turn with `--chat`), streamed to stdout, and a
//! statistics line on stderr.

use llama_host::chat::Conversation;

use crate::load::{load_model, select_backend};
use crate::opts::{Global, RunOpts};
use crate::output::{stats_line, stream_to_stdout};
use crate::signals::Interrupts;
use crate::CliError;

pub fn run(g: &Global, a: &RunOpts, ints: &Interrupts) -> Result<(), CliError> {
    let backend = select_backend(g, &a.load)?;
    let model = load_model(&backend, &a.load, a.gen.session.size.n_ctx)?;
    let mut session = model.session(&a.gen.session)?;
    let _draft = crate::load::attach_draft(&backend, &a.load, &a.gen, &mut session)?;
    let prompt = if a.chat {
        let mut conv = Conversation::new(a.system.as_deref());
        conv.push("user", a.prompt.as_str());
        let tmpl = crate::chat::template(&model, a.chat_template.as_deref(), a.system.as_deref())?;
        tmpl.render(&conv.messages, true)?
    } else {
        a.prompt.clone()
    };
    let mut stream = session.stream(&prompt, &a.gen.generate)?;
    ints.watch(stream.canceller());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = stream_to_stdout(&mut stream, &mut out);
    let interrupted = ints.clear();
    let streamed = result?;
    if !streamed.closed {
        use std::io::Write;
        // The reader may leave between the last piece and this newline: still a normal end.
        let _ = writeln!(out);
    }
    if !a.no_stats {
        errln!("{}", stats_line(stream.stats(), backend.name()));
        // With remote devices: what crossed the network, the load included.
        for t in model.rpc_traffic() {
            errln!("llama: rpc {}: sent {} bytes, received {} bytes", t.endpoint, t.bytes_sent, t.bytes_received);
        }
    }
    if interrupted {
        return Err(CliError::Interrupted);
    }
    Ok(())
}
