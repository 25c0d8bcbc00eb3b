//! Which model file a command means, and `llama list`.
//!
//! A model is given as a path, a name from the config's `[models]`, or a file name in a
//! models directory (with or without `.gguf`, or any unique prefix of it). Without one: `$LLAMA_MODEL`, the config's
//! `default-model`, then the default model that scripts/fetch-model installs.

use std::path::{Path, PathBuf};

use llama_host::gguf;

use crate::args::ModelArgs;
use crate::config::Config;
use crate::opts::ListOpts;
use crate::CliError;

/// File name of the default model installed by scripts/fetch-model.
pub const DEFAULT_MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

/// The models directories: the config's, then the default one.
pub(crate) fn dirs(cfg: &Config) -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = cfg.models_dir.iter().cloned().collect();
    if let Some(def) = llama_host::default_models_dir() {
        if !d.contains(&def) {
            d.push(def);
        }
    }
    d
}

pub fn resolve(args: &ModelArgs, cfg: &Config) -> Result<PathBuf, CliError> {
    if args.model.len() > 1 {
        return Err(CliError::InvalidArg { field: "--model", reason: format!("given {} times; only `llama serve` serves several models", args.model.len()) });
    }
    let given = args
        .name
        .clone()
        .or_else(|| args.model.first().cloned())
        .or_else(|| std::env::var("LLAMA_MODEL").ok().filter(|s| !s.is_empty()))
        .or_else(|| cfg.default_model.clone());
    match given {
        Some(name) => resolve_name(&name, cfg),
        None => {
            let default = llama_host::default_models_dir().map(|d| d.join(DEFAULT_MODEL));
            match default {
                Some(p) if p.is_file() => Ok(p),
                other => Err(CliError::NoModel {
                    path: other.map(|p| p.display().to_string()).unwrap_or_else(|| "(no home directory)".into()),
                }),
            }
        }
    }
}

pub(crate) fn resolve_name(name: &str, cfg: &Config) -> Result<PathBuf, CliError> {
    if let Some(m) = cfg.models.get(name) {
        return Ok(m.path.clone());
    }
    let as_path = Path::new(name);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    // A bare name (no directory part) may be a file in a models directory; the lookup
    // refuses anything that would leave the directory (see `find_model_in`).
    // By file name, stem or unique prefix (`gemma` finds `gemma-3-270m-q4_k_m.gguf`).
    if as_path.components().count() == 1 {
        match llama_host::find_model(&dirs(cfg), name) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            // Not a plain name (".hidden"): it can only be a path, handled below.
            Err(llama_host::ModelNameError::NotAName { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Something that looks like a path goes to the loader, which says precisely what is
    // wrong with it (missing, a directory, ...).
    if as_path.components().count() > 1 || name.ends_with(".gguf") {
        return Ok(as_path.to_path_buf());
    }
    Err(CliError::UnknownModel {
        name: name.to_string(),
        dirs: dirs(cfg).iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// What `llama list` and `llama serve`'s catalogue show of a model file without loading
/// it: its size and what its GGUF header says.
#[derive(serde::Serialize)]
pub(crate) struct FileFacts {
    pub size_bytes: Option<u64>,
    pub architecture: Option<String>,
    pub quantization: Option<String>,
    /// Weights in the file (the elements of every tensor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// The context the model was trained for (`{arch}.context_length`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// The file's modification time, in seconds since 1970.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified: Option<u64>,
    /// The chat template in the file (`tokenizer.chat_template`); not listed (it is long).
    #[serde(skip)]
    pub chat_template: Option<String>,
    /// Whether the file names a pooling type (`{arch}.pooling_type`): an embedding model.
    #[serde(skip)]
    pub pooling: bool,
    /// Why the header could not be read, when it could not.
    pub error: Option<String>,
}

pub(crate) fn file_facts(path: &Path) -> FileFacts {
    let meta = std::fs::metadata(path).ok();
    let size_bytes = meta.as_ref().map(|m| m.len());
    let modified = meta.and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
    let none = FileFacts {
        size_bytes,
        architecture: None,
        quantization: None,
        parameters: None,
        context_length: None,
        modified,
        chat_template: None,
        pooling: false,
        error: None,
    };
    match gguf::read(path) {
        Ok(h) => FileFacts {
            architecture: h.architecture().map(str::to_string),
            quantization: h.quantization().map(str::to_string),
            parameters: Some(h.parameter_count()).filter(|&n| n > 0),
            context_length: h.arch_key("context_length").and_then(gguf::MetaValue::as_u64),
            chat_template: h.get("tokenizer.chat_template").and_then(gguf::MetaValue::as_str).map(str::to_string),
            pooling: h.arch_key("pooling_type").is_some(),
            ..none
        },
        Err(e) => FileFacts { error: Some(e.to_string()), ..none },
    }
}

/// The GGUF files directly in `dir`, in name order, at most `limit` of them (a missing or
/// unreadable directory has none).
pub(crate) fn gguf_files(dir: &Path, limit: usize) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> =
        rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "gguf") && p.is_file()).take(limit).collect();
    paths.sort();
    paths
}

#[derive(serde::Serialize)]
struct Entry {
    name: String,
    path: PathBuf,
    #[serde(flatten)]
    facts: FileFacts,
}

fn describe(name: String, path: PathBuf) -> Entry {
    Entry { name, facts: file_facts(&path), path }
}

pub fn list(a: &ListOpts, cfg: &Config) -> Result<(), CliError> {
    let named: Vec<Entry> = cfg.models.iter().map(|(n, m)| describe(n.clone(), m.path.clone())).collect();
    let mut files = Vec::new();
    for dir in dirs(cfg) {
        for p in gguf_files(&dir, usize::MAX) {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.push(describe(name, p));
        }
    }
    if a.json {
        let v = serde_json::json!({ "named": named, "files": files, "models_dirs": dirs(cfg) });
        outln!("{}", serde_json::to_string_pretty(&v).expect("serializes"))?;
        return Ok(());
    }
    let row = |e: &Entry| {
        let size = e.facts.size_bytes.map(|b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)).unwrap_or_else(|| "missing".into());
        match &e.facts.error {
            Some(err) if e.facts.size_bytes.is_some() => format!("{:28} {:>11}  unreadable: {err}", e.name, size),
            _ => format!(
                "{:28} {:>11}  {:10} {:8}  {}",
                e.name,
                size,
                e.facts.architecture.as_deref().unwrap_or("-"),
                e.facts.quantization.as_deref().unwrap_or("-"),
                e.path.display()
            ),
        }
    };
    if !named.is_empty() {
        outln!("named models (config):")?;
        for e in &named {
            outln!("  {}", row(e))?;
        }
    }
    for dir in dirs(cfg) {
        outln!("models in {}:", dir.display())?;
        let here: Vec<&Entry> = files.iter().filter(|e| e.path.parent() == Some(dir.as_path())).collect();
        if here.is_empty() {
            outln!("  (none)")?;
        }
        for e in here {
            outln!("  {}", row(e))?;
        }
    }
    Ok(())
}
