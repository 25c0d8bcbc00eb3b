//! `llama embed`: embedding vectors of texts, as llama.cpp's `llama-embedding` computes
//! them: one vector per line on stdout (one per token without pooling, inputs separated by
//! a blank line), or JSON with `--json`; a statistics line on stderr.

use std::io::Write;
use std::time::Instant;

use llama_host::{EmbedError, Pooling};

use crate::load::{load_model, select_backend};
use crate::opts::{EmbedOpts, Global};
use crate::signals::Interrupts;
use crate::CliError;

pub fn run(g: &Global, o: &EmbedOpts, _ints: &Interrupts) -> Result<(), CliError> {
    let backend = select_backend(g, &o.load)?;
    let model = load_model(&backend, &o.load, o.params.n_ctx)?;
    let mut embedder = model.embedder(&o.params)?;
    let info = embedder.info();
    // Every input is tokenized and checked before the first batch, so a bad line costs no
    // decoding and names itself (Ctrl-C with nothing registered exits 130 at once).
    let mut inputs = Vec::with_capacity(o.inputs.len());
    for (i, text) in o.inputs.iter().enumerate() {
        let origin = || format!("input {} ({})", i + 1, o.origins[i]);
        // The error's own index counts from 1 like the origin's ("input 3 (FILE line 3):
        // input 3 has ..."), not from 0.
        if text.is_empty() {
            return Err(CliError::EmbedInput { origin: origin(), source: EmbedError::EmptyInput { index: i + 1 } });
        }
        let tokens = model.tokenize(text, true)?;
        embedder.check_input(i + 1, &tokens).map_err(|source| CliError::EmbedInput { origin: origin(), source })?;
        inputs.push(tokens);
    }
    let started = Instant::now();
    let vectors = embedder.embed_all(&inputs, o.normalize, |_| false)?;
    let elapsed = started.elapsed().as_secs_f64();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if o.json {
        let data: Vec<serde_json::Value> = vectors
            .iter()
            .zip(&inputs)
            .enumerate()
            .map(|(index, (v, t))| {
                let embedding = if info.pooling == Pooling::None { serde_json::json!(v) } else { serde_json::json!(v[0]) };
                serde_json::json!({ "index": index, "tokens": t.len(), "embedding": embedding })
            })
            .collect();
        let doc = serde_json::json!({
            "model": o.load.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "pooling": info.pooling.as_str(),
            "normalize": o.normalize.get(),
            "n_embd": info.n_out,
            "data": data,
        });
        serde_json::to_writer(&mut out, &doc).map_err(|e| CliError::Output(e.into()))?;
        writeln!(out).map_err(CliError::Output)?;
    } else {
        for (i, rows) in vectors.iter().enumerate() {
            if info.pooling == Pooling::None && i > 0 {
                writeln!(out).map_err(CliError::Output)?;
            }
            for row in rows {
                let line: Vec<String> = row.iter().map(|x| x.to_string()).collect();
                writeln!(out, "{}", line.join(" ")).map_err(CliError::Output)?;
            }
        }
    }
    out.flush().map_err(CliError::Output)?;
    if !o.no_stats {
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        errln!(
            "{} inputs, {tokens} tokens, {} floats each, pooling {}, in {:.2} s ({:.1} inputs/s, {:.1} tokens/s) · backend {}",
            inputs.len(),
            info.n_out,
            info.pooling,
            elapsed,
            inputs.len() as f64 / elapsed.max(1e-9),
            tokens as f64 / elapsed.max(1e-9),
            backend.name()
        );
    }
    Ok(())
}
