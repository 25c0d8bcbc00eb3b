//! Output constraints from the command line (`--grammar`, `--grammar-file`, `--json-schema`,
//! `--json-schema-file`, `--json`, or the config keys of the same names), as the one grammar
//! the sampler enforces. A schema is converted here, before the model loads, so a bad one
//! fails at once and names the flag.

use std::path::Path;

use llama_host::Grammar;

use crate::args::SamplingArgs;
use crate::CliError;

/// Largest grammar or schema file read (the backend refuses grammars over 1 MiB anyway;
/// this only keeps a wrong path such as a model file from being read into memory).
const MAX_FILE_BYTES: u64 = 4 << 20;

/// The flags that constrain the output; at most one may be given.
const FLAGS: &str = "--grammar, --grammar-file, --json-schema, --json-schema-file, --json";

/// The grammar the arguments ask for, if any.
pub fn grammar(s: &SamplingArgs) -> Result<Option<Grammar>, CliError> {
    let given = [s.grammar.is_some(), s.grammar_file.is_some(), s.json_schema.is_some(), s.json_schema_file.is_some(), s.json].iter().filter(|&&b| b).count();
    if given > 1 {
        return Err(CliError::InvalidArg { field: "grammar", reason: format!("give one of {FLAGS} (the command line and the config file together set {given})") });
    }
    let text = if let Some(g) = &s.grammar {
        g.clone()
    } else if let Some(f) = &s.grammar_file {
        read(f, "--grammar-file")?
    } else if let Some(j) = &s.json_schema {
        match j.strip_prefix('@') {
            Some(f) => schema(&read(Path::new(f), "--json-schema")?, "--json-schema")?,
            None => schema(j, "--json-schema")?,
        }
    } else if let Some(f) = &s.json_schema_file {
        schema(&read(f, "--json-schema-file")?, "--json-schema-file")?
    } else if s.json {
        llama_grammar::json_object_grammar()
    } else {
        return Ok(None);
    };
    Ok(Some(Grammar::new(text)))
}

fn read(path: &Path, flag: &'static str) -> Result<String, CliError> {
    let too_big = |len: u64| CliError::InvalidArg { field: flag, reason: format!("{} is {len} bytes, more than the {MAX_FILE_BYTES} read", path.display()) };
    let meta = std::fs::metadata(path).map_err(|source| CliError::ArgFile { flag, path: path.to_path_buf(), source })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big(meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|source| CliError::ArgFile { flag, path: path.to_path_buf(), source })?;
    String::from_utf8(bytes).map_err(|_| CliError::InvalidArg { field: flag, reason: format!("{} is not UTF-8 text", path.display()) })
}

/// A JSON Schema's text → its grammar.
fn schema(text: &str, flag: &'static str) -> Result<String, CliError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| CliError::InvalidArg { field: flag, reason: format!("not JSON: {e}") })?;
    llama_grammar::json_schema_to_grammar(&value).map_err(|e| CliError::InvalidArg { field: flag, reason: e.to_string() })
}
