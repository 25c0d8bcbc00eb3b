//! `schema-to-gbnf [FILE]`: reads a JSON Schema from FILE (or stdin), prints the GBNF
//! grammar. Exit status 1 with the error on stderr when the schema can't be converted.

use std::io::Read;
use std::process::ExitCode;

fn run() -> Result<String, String> {
    let mut text = String::new();
    match std::env::args_os().nth(1) {
        Some(path) => {
            text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.to_string_lossy()))?;
        }
        None => {
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("stdin: {e}"))?;
        }
    }
    let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("schema is not JSON: {e}"))?;
    llama_grammar::json_schema_to_grammar(&schema).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(grammar) => {
            print!("{grammar}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("schema-to-gbnf: {e}");
            ExitCode::FAILURE
        }
    }
}
