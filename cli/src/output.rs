//! Writing results: generated text to stdout, the statistics line to stderr.

use std::io::Write;

use llama_host::{FinishReason, GenerationStats};

use crate::CliError;

pub fn stats_line(stats: &GenerationStats, backend: &str) -> String {
    format!(
        "llama: prompt {} tokens ({} cached, {} decoded), {:.2} tokens/s | generated {} tokens, {:.2} tokens/s | finish {} | backend {}",
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

/// Streams a generation to stdout. A closed stdout ends it quietly.
pub fn stream_to_stdout(stream: &mut llama_host::Stream<'_, '_>, out: &mut impl Write) -> Result<String, CliError> {
    let mut text = String::new();
    for piece in stream.by_ref() {
        let piece = piece?;
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            stream.stop();
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(CliError::Output(e));
        }
        text.push_str(&piece);
    }
    Ok(text)
}
