//! Writing results: generated text to stdout, the statistics line to stderr. Nothing here
//! panics on a closed stream (`println!` does): a closed stdout is a normal end (exit 0,
//! `CliError::is_closed_output`), a closed stderr loses its line.

use std::io::Write;

/// `println!` returning `Result<(), CliError>` instead of panicking; `?` it, and a closed
/// stdout ends the command with exit 0.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::CliError::Output)
    }};
}

/// `print!` returning `Result<(), CliError>`, like [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        write!(out, $($arg)*).and_then(|_| out.flush()).map_err($crate::CliError::Output)
    }};
}

/// `eprintln!` that never panics: on a closed stderr the line is dropped.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` that never panics, flushed (prompts).
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, $($arg)*).and_then(|_| err.flush());
    }};
}

use llama_host::{FinishReason, GenerationStats};

use crate::CliError;

pub fn stats_line(stats: &GenerationStats, backend: &str) -> String {
    let spec = match stats.spec.acceptance() {
        Some(rate) => format!(" | drafts {} accepted of {} ({:.0}%)", stats.spec.accepted, stats.spec.drafted, rate * 100.0),
        None => String::new(),
    };
    format!(
        "llama: prompt {} tokens ({} cached, {} decoded), {:.2} tokens/s | generated {} tokens, {:.2} tokens/s{spec} | finish {} | backend {}",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.decoded_prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s(),
        match stats.finish {
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Cancelled) | None => "cancelled",
        },
        backend
    )
}

/// What [`stream_to_stdout`] wrote.
pub struct Streamed {
    pub text: String,
    /// The reader went away (`| head`): generation was stopped, quietly.
    pub closed: bool,
}

/// Streams a generation to stdout. A closed stdout stops it quietly.
pub fn stream_to_stdout(stream: &mut llama_host::Stream<'_, '_>, out: &mut impl Write) -> Result<Streamed, CliError> {
    let mut text = String::new();
    for piece in stream.by_ref() {
        let piece = piece?;
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            stream.stop();
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(Streamed { text, closed: true });
            }
            return Err(CliError::Output(e));
        }
        text.push_str(&piece);
    }
    Ok(Streamed { text, closed: false })
}
