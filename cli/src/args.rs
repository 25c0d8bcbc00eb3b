//! Command-line arguments. Flag names follow llama.cpp's tools where they have one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "llama", version, about = "Run GGUF models on the best backend this machine has")]
pub struct Cli {
    /// More log output: -v shows the backend report and llama.cpp's log, -vv debug detail.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// A directory of backend plugins, searched before the standard places (repeatable).
    #[arg(long = "backend-dir", value_name = "DIR", global = true)]
    pub backend_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of a prompt, streamed to stdout.
    Run(RunArgs),
    /// Show which backends were found and which one is used.
    Backends(BackendsArgs),
    /// Measure prompt processing and generation speed (like llama-bench).
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model file (GGUF). Default: $LLAMA_MODEL, else the default model in the models directory.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Backend: auto, cpu, cuda or metal. A named backend that cannot run is an error.
    #[arg(long, default_value = "auto", value_name = "NAME")]
    pub backend: String,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: String,
    /// Tokens to generate; -1 runs until the model stops or the context is full.
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_hyphen_values = true)]
    pub n_predict: i32,
    /// Context length in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: u32,
    /// Threads for generation (default: one per hardware thread).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<i32>,
    /// Threads for prompt processing (default: --threads).
    #[arg(long = "threads-batch", visible_alias = "tb")]
    pub threads_batch: Option<i32>,
    /// Logical batch size: most prompt tokens per decode call.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    /// Physical micro-batch size.
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Random seed (-1 or none: a random one).
    #[arg(short = 's', long = "seed", allow_hyphen_values = true)]
    pub seed: Option<i64>,
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Print no statistics line to stderr.
    #[arg(long)]
    pub no_stats: bool,
}

#[derive(Args, Debug)]
pub struct BackendsArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<BackendsAction>,
}

#[derive(Subcommand, Debug)]
pub enum BackendsAction {
    /// Check a backend library and copy it into the per-user backends directory.
    Install {
        /// The backend library file.
        file: PathBuf,
        /// Install here instead of the per-user backends directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: u32,
    /// Generated tokens for the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: u32,
    /// Threads (default: one per hardware thread).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<i32>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: u32,
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// llama.cpp spells some flags as multi-letter short options (`-ub 512`, `-tb 4`);
/// clap does not, so they are rewritten to their long names first.
pub fn normalize_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-ub") => "--ubatch-size".into(),
            Some("-tb") => "--threads-batch".into(),
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_style_flags_parse() {
        let argv = ["llama", "run", "-m", "x.gguf", "-p", "hi", "-n", "32", "-c", "512", "-t", "2", "-b", "64", "-ub", "32", "--seed", "7", "--temp", "0"];
        let cli = Cli::parse_from(normalize_args(argv.iter().map(Into::into)));
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!((r.n_predict, r.ctx_size, r.threads, r.batch_size, r.ubatch_size), (32, 512, Some(2), 64, 32));
        assert_eq!((r.seed, r.temp), (Some(7), 0.0));
    }

    #[test]
    fn negative_n_predict_means_unlimited() {
        let cli = Cli::parse_from(["llama", "run", "-p", "hi", "-n", "-1"]);
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.n_predict, -1);
    }

    #[test]
    fn backends_install_parses() {
        let cli = Cli::parse_from(["llama", "backends", "install", "/tmp/x.so"]);
        let Command::Backends(b) = cli.command else { panic!("not backends") };
        assert!(matches!(b.action, Some(BackendsAction::Install { .. })));
    }
}
