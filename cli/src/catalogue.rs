//! The models `llama serve` serves: each `-m FILE` (or `-m NAME=FILE`), the config's
//! `[models]`, and the GGUF files of the models directories, each under one name.
//!
//! With `-m` (or a positional model) the catalogue is those models plus the files of any
//! `--models-dir`, and the first one is preloaded: `llama serve -m FILE` serves FILE as
//! before. Without, it is the config's named models and the files of every models directory
//! (`--models-dir`, the config's, the default one), and the model `llama run` would pick
//! (`$LLAMA_MODEL`, the config's `default-model`, the default model) is preloaded when there
//! is one.

use std::path::{Path, PathBuf};

use crate::args::ServeArgs;
use crate::config::{Config, ModelSettings};
use crate::{models, CliError};

/// Most models one server lists: a models directory with more GGUF files than this is
/// almost certainly not a directory of models, and the list must stay small to answer.
pub const MAX_MODELS: usize = 1024;

/// One model the server may load.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    pub path: PathBuf,
    /// Its `[models.NAME]` settings (empty for a plain path).
    pub settings: ModelSettings,
}

/// The catalogue, and the model to load at start.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub models: Vec<ServedModel>,
    pub preload: Option<String>,
}

/// The name a file is served under: its file name without `.gguf`.
fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "llama".into())
}

impl Catalogue {
    fn push(&mut self, m: ServedModel) {
        if self.models.iter().any(|e| e.name == m.name) {
            tracing::debug!(model = %m.name, path = %m.path.display(), "a model of this name is already listed; this one is not served");
            return;
        }
        if self.models.len() >= MAX_MODELS {
            tracing::warn!(model = %m.name, "more than {MAX_MODELS} models: the rest are not served");
            return;
        }
        self.models.push(m);
    }

    /// The GGUF files directly in `dir`, in name order.
    fn add_dir(&mut self, dir: &Path) {
        for path in models::gguf_files(dir, MAX_MODELS + 1) {
            self.push(ServedModel { name: stem(&path), path, settings: ModelSettings::default() });
        }
    }
}

/// One `-m` value: `NAME=FILE` names the model (unless the whole value is an existing
/// file); a config name keeps its name and settings; anything else is served under its
/// file name without `.gguf`.
fn given(value: &str, cfg: &Config) -> Result<ServedModel, CliError> {
    if let Some((name, file)) = value.split_once('=').filter(|_| !Path::new(value).exists()) {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(CliError::InvalidArg { field: "--model", reason: format!("'{name}' is not a model name (NAME=FILE)") });
        }
        let settings = cfg.models.get(file).map(|m| m.settings.clone()).unwrap_or_default();
        return Ok(ServedModel { name: name.to_string(), path: models::resolve_name(file, cfg)?, settings });
    }
    if let Some(m) = cfg.models.get(value) {
        return Ok(ServedModel { name: value.to_string(), path: m.path.clone(), settings: m.settings.clone() });
    }
    let path = models::resolve_name(value, cfg)?;
    Ok(ServedModel { name: stem(&path), path, settings: ModelSettings::default() })
}

pub fn resolve(a: &ServeArgs, cfg: &Config) -> Result<Catalogue, CliError> {
    let mut c = Catalogue { models: Vec::new(), preload: None };
    let given_values: Vec<&String> = a.model.name.iter().chain(&a.model.model).collect();
    if !given_values.is_empty() {
        for v in given_values {
            let m = given(v, cfg)?;
            c.preload.get_or_insert_with(|| m.name.clone());
            c.push(m);
        }
        for d in &a.models_dirs {
            c.add_dir(d);
        }
        return Ok(c);
    }
    // No model given: the one `llama run` would use is preloaded, if there is one.
    let default = models::resolve(&a.model, cfg);
    if let Ok(path) = &default {
        let named = cfg.models.iter().find(|(_, m)| &m.path == path);
        let m = match named {
            Some((name, m)) => ServedModel { name: name.clone(), path: path.clone(), settings: m.settings.clone() },
            None => ServedModel { name: stem(path), path: path.clone(), settings: ModelSettings::default() },
        };
        c.preload = Some(m.name.clone());
        c.push(m);
    }
    for (name, m) in &cfg.models {
        c.push(ServedModel { name: name.clone(), path: m.path.clone(), settings: m.settings.clone() });
    }
    for d in a.models_dirs.iter().cloned().chain(models::dirs(cfg)) {
        c.add_dir(&d);
    }
    match default {
        Err(e) if c.models.is_empty() => Err(e),
        _ => Ok(c),
    }
}
