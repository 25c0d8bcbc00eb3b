//! The config file: defaults for every flag and named models.
//!
//! ```toml
//! models-dir = "/data/models"          # where `llama list` and bare names look
//! default-model = "gemma"              # used when no model is given
//!
//! [models]                             # `llama run gemma` → this path
//! gemma = "/data/models/gemma-3-270m-q4_k_m.gguf"
//!
//! [models.smol]                        # a model with its own settings (`llama serve`)
//! path = "/data/models/smollm2-135m-instruct-q4_1.gguf"
//! ctx-size = 4096
//! parallel = 2
//! temp = 0.2
//!
//! [defaults]                           # the long flag names
//! temp = 0.7
//! ctx-size = 8192
//! cache-type-k = "q8_0"                # KV cache types and flash attention
//! cache-type-v = "q8_0"
//! flash-attn = "auto"
//! ```
//!
//! Precedence: flag > environment variable > this file > built-in default. An unknown key
//! or a bad value is an error naming the key and the line (toml's own error report).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Deserializer};

use crate::args::{CacheArgs, ContextArgs, ModelArgs, SamplingArgs};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub models_dir: Option<PathBuf>,
    pub default_model: Option<String>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelEntry>,
    #[serde(default)]
    pub defaults: Defaults,
    /// The file this came from, for messages.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

fn range<'de, D: Deserializer<'de>, T>(d: D, ok: impl Fn(&T) -> bool, expect: &str) -> Result<Option<T>, D::Error>
where
    T: Deserialize<'de> + std::fmt::Display,
{
    let v = T::deserialize(d)?;
    if ok(&v) {
        Ok(Some(v))
    } else {
        Err(serde::de::Error::custom(format!("{v} is out of range: expected {expect}")))
    }
}
fn probability<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    range(d, |v: &f32| (0.0..=1.0).contains(v), "a number from 0 to 1")
}
fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    range(d, |v: &f32| v.is_finite() && *v >= 0.0, "a number >= 0")
}
fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    range(d, |v: &f32| v.is_finite() && *v > 0.0, "a number > 0")
}
fn at_least_one_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    range(d, |v: &u32| *v >= 1, "an integer >= 1")
}
fn at_least_one_i32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    range(d, |v: &i32| *v >= 1, "an integer >= 1")
}
fn keep_alive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    range(d, |v: &i64| (-1..=31_536_000).contains(v), "seconds from 0 to 31536000, or -1 for never")
}
fn gpu_index<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    range(d, |v: &u32| *v < 1024, "a GPU index from 0 to 1023")
}
fn non_negative_i32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    range(d, |v: &i32| *v >= 0, "an integer >= 0")
}
fn logit_biases<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    for b in &v {
        crate::args::parse_logit_bias(b).map_err(serde::de::Error::custom)?;
    }
    Ok(Some(v))
}

/// A named model: `NAME = "path"`, or a `[models.NAME]` table with its path and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub path: PathBuf,
    pub settings: ModelSettings,
}

/// A model's own settings (`[models.NAME]`), used by `llama serve` for that model over the
/// command line's values, as Ollama's Modelfile parameters or llama-server's presets.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelSettings {
    #[serde(default, deserialize_with = "at_least_one_u32")]
    pub ctx_size: Option<u32>,
    #[serde(default, deserialize_with = "at_least_one_u32")]
    pub parallel: Option<u32>,
    pub queue: Option<usize>,
    pub gpu_layers: Option<crate::args::GpuLayers>,
    pub cache_type_k: Option<llama_host::CacheType>,
    pub cache_type_v: Option<llama_host::CacheType>,
    pub flash_attn: Option<llama_host::FlashAttn>,
    pub chat_template: Option<String>,
    /// Pooling of its embedding requests, over `--pooling`.
    pub pooling: Option<llama_host::Pooling>,
    /// Seconds the model stays loaded once idle (-1: never; 0: unloaded once idle), over
    /// `--idle-unload`; a request's `keep_alive` replaces it.
    #[serde(default, deserialize_with = "keep_alive")]
    pub keep_alive: Option<i64>,
    pub n_predict: Option<i32>,
    pub seed: Option<i64>,
    #[serde(default, deserialize_with = "non_negative")]
    pub temp: Option<f32>,
    #[serde(default, deserialize_with = "non_negative_i32")]
    pub top_k: Option<i32>,
    #[serde(default, deserialize_with = "probability")]
    pub top_p: Option<f32>,
    #[serde(default, deserialize_with = "probability")]
    pub min_p: Option<f32>,
    #[serde(default, deserialize_with = "positive")]
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Vec<String>>,
    /// Speculative decoding for this model (`"none"`, `"ngram"`, `"draft"`) over `--spec`,
    /// and its sizes and draft model over the flags of the same names.
    pub spec: Option<String>,
    pub draft_model: Option<PathBuf>,
    pub draft_max: Option<u32>,
    pub draft_min: Option<u32>,
    pub draft_p_min: Option<f32>,
    pub spec_ngram_n: Option<u32>,
}

impl<'de> Deserialize<'de> for ModelEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ModelEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a model path, or a table with `path` and the model's settings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModelEntry, E> {
                Ok(ModelEntry { path: PathBuf::from(v), settings: ModelSettings::default() })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ModelEntry, A::Error> {
                use serde::de::Error;
                let mut t = toml::Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let path = match t.remove("path") {
                    Some(toml::Value::String(p)) => PathBuf::from(p),
                    Some(_) => return Err(A::Error::custom("`path` must be a string")),
                    None => return Err(A::Error::missing_field("path")),
                };
                // The other keys are the settings, checked (names and ranges) by their type.
                let settings = ModelSettings::deserialize(toml::Value::Table(t)).map_err(|e| A::Error::custom(e.message()))?;
                Ok(ModelEntry { path, settings })
            }
        }
        d.deserialize_any(V)
    }
}

/// Defaults for flags, under their long names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Defaults {
    pub backend: Option<String>,
    pub gpu_layers: Option<crate::args::GpuLayers>,
    pub device: Option<crate::args::Devices>,
    pub split_mode: Option<crate::args::SplitModeArg>,
    #[serde(default, deserialize_with = "gpu_index")]
    pub main_gpu: Option<u32>,
    #[serde(default, deserialize_with = "at_least_one_u32")]
    pub ctx_size: Option<u32>,
    #[serde(default, deserialize_with = "at_least_one_i32")]
    pub threads: Option<i32>,
    #[serde(default, deserialize_with = "at_least_one_i32")]
    pub threads_batch: Option<i32>,
    #[serde(default, deserialize_with = "at_least_one_u32")]
    pub batch_size: Option<u32>,
    #[serde(default, deserialize_with = "at_least_one_u32")]
    pub ubatch_size: Option<u32>,
    pub cache_tokens: Option<u32>,
    /// `"f16"`, `"q8_0"` or `"q4_0"`, the flag's names.
    pub cache_type_k: Option<llama_host::CacheType>,
    pub cache_type_v: Option<llama_host::CacheType>,
    /// `"on"`, `"off"` or `"auto"`.
    pub flash_attn: Option<llama_host::FlashAttn>,
    pub n_predict: Option<i32>,
    pub seed: Option<i64>,
    #[serde(default, deserialize_with = "non_negative")]
    pub temp: Option<f32>,
    #[serde(default, deserialize_with = "non_negative_i32")]
    pub top_k: Option<i32>,
    #[serde(default, deserialize_with = "probability")]
    pub top_p: Option<f32>,
    #[serde(default, deserialize_with = "probability")]
    pub min_p: Option<f32>,
    #[serde(default, deserialize_with = "positive")]
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Vec<String>>,
    /// `["15043+1", "15044-inf"]`, the flag's syntax.
    #[serde(default, deserialize_with = "logit_biases")]
    pub logit_bias: Option<Vec<String>>,
    /// Output constraints (`run`, `chat`), the flags' values: GBNF text, a GBNF file, a
    /// JSON Schema (text or `@FILE`), a JSON Schema file, or `true` for any JSON object.
    pub grammar: Option<String>,
    pub grammar_file: Option<PathBuf>,
    pub json_schema: Option<String>,
    pub json_schema_file: Option<PathBuf>,
    pub json: Option<bool>,
    pub system: Option<String>,
    pub chat_template: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The config file in use: `--config FILE`, else `$LLAMA_CONFIG`, else the platform's
/// config directory (`$XDG_CONFIG_HOME/llama/config.toml`, `~/.config/llama/config.toml`)
/// when that file exists.
pub fn locate(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("LLAMA_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from)?;
            Some(if cfg!(target_os = "macos") { home.join("Library/Application Support") } else { home.join(".config") })
        })?;
    let p = base.join("llama").join("config.toml");
    p.is_file().then_some(p)
}

pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut c: Config = toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string().trim_end().to_string() })?;
    c.path = Some(path.to_path_buf());
    Ok(c)
}

/// Whether an argument still has its built-in default (neither flag nor environment).
fn unset(m: &ArgMatches, id: &str) -> bool {
    !matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

macro_rules! fill {
    ($m:expr, $from:expr, $to:expr, $($field:ident),* $(,)?) => {
        $( if unset($m, stringify!($field)) {
            if let Some(v) = $from.$field.clone() { $to.$field = v.into(); }
        } )*
    };
}

impl Config {
    /// Fills the arguments the user left at their defaults with this file's values.
    pub fn apply(&self, m: &ArgMatches, model: &mut ModelArgs, ctx: &mut ContextArgs, s: &mut SamplingArgs) {
        self.apply_model(m, model);
        let d = &self.defaults;
        fill!(m, d, ctx, ctx_size, threads, threads_batch, batch_size, ubatch_size, cache_tokens);
        self.apply_cache(m, &mut ctx.cache);
        fill!(m, d, s, n_predict, seed, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, stop);
        fill!(m, d, s, logit_bias);
        // One constraint at most: the file's applies only when no flag names one.
        let flagged = ["grammar", "grammar_file", "json_schema", "json_schema_file", "json"].iter().any(|id| !unset(m, id));
        if !flagged {
            fill!(m, d, s, grammar, grammar_file, json_schema, json_schema_file, json);
        }
    }

    /// Fills `threads` (`bench`, `serve`: their only session-size flag the config sets).
    pub fn apply_threads(&self, m: &ArgMatches, threads: &mut Option<i32>) {
        if unset(m, "threads") && threads.is_none() {
            *threads = self.defaults.threads;
        }
    }

    /// Fills the KV cache arguments (`cache-type-k`, `cache-type-v`, `flash-attn`): every
    /// command that makes a context, and `backends -m`'s estimate.
    pub fn apply_cache(&self, m: &ArgMatches, cache: &mut CacheArgs) {
        let d = &self.defaults;
        fill!(m, d, cache, cache_type_k, cache_type_v, flash_attn);
    }

    /// Fills the model and offload arguments (`backend`, `gpu-layers`, `device`,
    /// `split-mode`, `main-gpu`): all a command that loads a model shares (`serve`, `bench`).
    pub fn apply_model(&self, m: &ArgMatches, model: &mut ModelArgs) {
        let d = &self.defaults;
        fill!(m, d, model, backend, gpu_layers, device, split_mode, main_gpu);
    }

    /// A string default (`system`, `chat_template`) when neither the flag nor its variable
    /// was given.
    pub fn text_default(&self, m: &ArgMatches, id: &str, current: &mut Option<String>) {
        let v = match id {
            "system" => &self.defaults.system,
            "chat_template" => &self.defaults.chat_template,
            _ => return,
        };
        if unset(m, id) && current.is_none() {
            current.clone_from(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("test.toml")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("test.toml")).unwrap_err().to_string()
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse_ok(
            "models-dir = \"/m\"\ndefault-model = \"g\"\n[models]\ng = \"/m/g.gguf\"\n[defaults]\ntemp = 0.5\nctx-size = 512\nstop = [\"x\"]\n",
        );
        assert_eq!(c.models["g"].path, PathBuf::from("/m/g.gguf"));
        assert_eq!(c.defaults.temp, Some(0.5));
        assert_eq!(c.defaults.ctx_size, Some(512));
    }

    #[test]
    fn a_model_table_holds_its_path_and_settings() {
        let c = parse_ok("[models.s]\npath = \"/m/s.gguf\"\nctx-size = 2048\nparallel = 2\ntemp = 0.2\nchat-template = \"chatml\"\n[models]\ng = \"/m/g.gguf\"\n");
        assert_eq!(c.models["s"].path, PathBuf::from("/m/s.gguf"));
        assert_eq!(c.models["s"].settings.ctx_size, Some(2048));
        assert_eq!(c.models["s"].settings.parallel, Some(2));
        assert_eq!(c.models["s"].settings.temp, Some(0.2));
        assert_eq!(c.models["g"].settings, ModelSettings::default());
        let e = parse_err("[models.s]\npath = \"/m/s.gguf\"\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = parse_err("[models.s]\nctx-size = 1\n");
        assert!(e.contains("path"), "{e}");
        let e = parse_err("[models.s]\npath = \"/m\"\ntop-p = 7\n");
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn gpu_layers_in_the_config() {
        use crate::args::GpuLayers;
        assert_eq!(parse_ok("[defaults]\ngpu-layers = \"all\"\n").defaults.gpu_layers, Some(GpuLayers::All));
        assert_eq!(parse_ok("[defaults]\ngpu-layers = 12\n").defaults.gpu_layers, Some(GpuLayers::Count(12)));
        let c = parse_ok("[defaults]\ndevice = \"CUDA0,CUDA1\"\nsplit-mode = \"row\"\nmain-gpu = 1\n");
        assert_eq!(c.defaults.device, Some(crate::args::Devices::Named(vec!["CUDA0".into(), "CUDA1".into()])));
        assert_eq!(c.defaults.split_mode, Some(crate::args::SplitModeArg::Row));
        assert_eq!(c.defaults.main_gpu, Some(1));
        assert_eq!(parse_ok("[defaults]\ndevice = [\"CUDA1\"]\n").defaults.device, Some(crate::args::Devices::Named(vec!["CUDA1".into()])));
        assert_eq!(parse_ok("[defaults]\ndevice = \"none\"\n").defaults.device, Some(crate::args::Devices::None));
        assert_eq!(parse_ok("[defaults]\ndevice = []\n").defaults.device, Some(crate::args::Devices::None));
        assert!(parse_err("[defaults]\nsplit-mode = \"diagonal\"\n").contains("split-mode"));
        assert!(parse_err("[defaults]\nmain-gpu = -1\n").contains("main-gpu"));
        let e = parse_err("[defaults]\ngpu-layers = -4\n");
        assert!(e.contains("line 2") && e.contains("gpu-layers"), "{e}");
    }

    #[test]
    fn cache_types_in_the_config() {
        use llama_host::{CacheType, FlashAttn};
        let c = parse_ok("[defaults]\ncache-type-k = \"q8_0\"\ncache-type-v = \"q4_0\"\nflash-attn = \"on\"\n");
        assert_eq!((c.defaults.cache_type_k, c.defaults.cache_type_v, c.defaults.flash_attn), (Some(CacheType::Q8_0), Some(CacheType::Q4_0), Some(FlashAttn::On)));
        let e = parse_err("[defaults]\ncache-type-v = \"q5_1\"\n");
        assert!(e.contains("line 2") && e.contains("cache-type-v") && e.contains("q8_0"), "{e}");
        let e = parse_err("[defaults]\nflash-attn = true\n");
        assert!(e.contains("line 2") && e.contains("flash-attn"), "{e}");
        // A flag beats the config; the config beats the built-in default.
        let cfg = parse_ok("[defaults]\ncache-type-k = \"q8_0\"\nflash-attn = \"off\"\n");
        let r = run_args(&["llama", "run", "-p", "x"], &cfg);
        assert_eq!((r.ctx.cache.cache_type_k, r.ctx.cache.cache_type_v, r.ctx.cache.flash_attn), (CacheType::Q8_0, CacheType::F16, FlashAttn::Off));
        let r = run_args(&["llama", "run", "-p", "x", "--cache-type-k", "q4_0", "--flash-attn", "on"], &cfg);
        assert_eq!((r.ctx.cache.cache_type_k, r.ctx.cache.flash_attn), (CacheType::Q4_0, FlashAttn::On));
    }

    #[test]
    fn an_unknown_key_names_the_key_and_the_line() {
        let e = parse_err("[defaults]\ntemp = 0.5\ntempreature = 0.1\n");
        assert!(e.contains("line 3") && e.contains("tempreature"), "{e}");
    }

    #[test]
    fn a_bad_value_names_the_key_and_the_line() {
        let e = parse_err("[defaults]\n\ntop-p = 1.5\n");
        assert!(e.contains("line 3") && e.contains("top-p") && e.contains("out of range"), "{e}");
        let e = parse_err("[defaults]\nctx-size = \"big\"\n");
        assert!(e.contains("line 2") && e.contains("ctx-size"), "{e}");
        let e = parse_err("[defaults]\nthreads = 0\n");
        assert!(e.contains("line 2") && e.contains("threads"), "{e}");
        let e = parse_err("[defaults]\nlogit-bias = [\"15043+1\", \"x\"]\n");
        assert!(e.contains("line 2") && e.contains("logit-bias") && e.contains("TOKEN(+|-)BIAS"), "{e}");
        assert_eq!(parse_ok("[defaults]\nlogit-bias = [\"15043-inf\"]\n").defaults.logit_bias, Some(vec!["15043-inf".to_string()]));
    }

    fn run_args(argv: &[&str], cfg: &Config) -> crate::args::RunArgs {
        let m = crate::args::Cli::command().get_matches_from(argv);
        let (_, sub) = m.subcommand().unwrap();
        let cli = crate::args::Cli::from_arg_matches(&m).unwrap();
        let crate::args::Command::Run(mut r) = cli.command else { panic!() };
        cfg.apply(sub, &mut r.model, &mut r.ctx, &mut r.sampling);
        r
    }

    /// One test, not two: the environment is process-wide and tests run in parallel.
    #[test]
    fn precedence_is_flag_then_env_then_config_then_default() {
        let cfg = parse_ok("[defaults]\ntemp = 0.3\ntop-k = 7\nctx-size = 1024\n");
        // Config beats the built-in default.
        let r = run_args(&["llama", "run", "-p", "x"], &cfg);
        assert_eq!((r.sampling.temp, r.sampling.top_k, r.ctx.ctx_size), (0.3, 7, 1024));
        // A flag beats the config.
        let r = run_args(&["llama", "run", "-p", "x", "--temp", "0.9"], &cfg);
        assert_eq!(r.sampling.temp, 0.9);
        // Untouched keys keep the built-in default.
        assert_eq!(r.sampling.top_p, 0.95);
        // The environment beats the config, and a flag beats the environment.
        std::env::set_var("LLAMA_TOP_K", "3");
        let from_env = run_args(&["llama", "run", "-p", "x"], &cfg);
        let from_flag = run_args(&["llama", "run", "-p", "x", "--top-k", "9"], &cfg);
        std::env::remove_var("LLAMA_TOP_K");
        assert_eq!(from_env.sampling.top_k, 3);
        assert_eq!(from_flag.sampling.top_k, 9);
    }
}
