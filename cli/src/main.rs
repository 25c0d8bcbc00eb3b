//! The `llama` command. Thin over llama-host and llama-serve: parse the arguments, resolve
//! them once with the environment and the config file (`opts.rs`), set up logging and
//! Ctrl-C, run one command module, map its error to an exit code (`error.rs`).

// First: its print macros (`outln!`, `errln!`, ...) are used by the modules below.
#[macro_use]
mod output;
mod args;
mod backends;
mod bench;
mod catalogue;
mod chat;
mod config;
mod constraint;
mod embed;
mod error;
mod http_client;
mod load;
mod logging;
mod models;
mod opts;
mod progress;
mod ps;
mod rpc_server;
mod run;
mod serve;
mod signals;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use args::Cli;
pub use error::CliError;
use opts::{CommandOpts, Options};
use signals::Interrupts;

fn dispatch(o: &Options) -> Result<(), CliError> {
    let g = &o.global;
    // `serve` handles SIGINT/SIGTERM itself (graceful shutdown).
    let ints = if matches!(o.command, CommandOpts::Serve(_)) { Interrupts::default() } else { Interrupts::install() };
    match &o.command {
        CommandOpts::Run(a) => run::run(g, a, &ints),
        CommandOpts::Chat(a) => chat::run(g, a, &ints),
        CommandOpts::List(a) => models::list(a, &o.config),
        CommandOpts::Backends(a) => backends::run(g, a),
        CommandOpts::Bench(a) => bench::run(g, a),
        CommandOpts::Embed(a) => embed::run(g, a, &ints),
        CommandOpts::Serve(a) => serve::run(g, a),
        CommandOpts::Ps(a) => ps::run(a),
        CommandOpts::RpcServer(a) => rpc_server::run(g, a),
    }
}

fn main() -> ExitCode {
    // The child side of crash-isolated backend probing (see llama_host::probe): not a user
    // command, so it is handled before argument parsing and never listed in --help.
    let mut raw = std::env::args_os().skip(1);
    if raw.next().is_some_and(|a| a == llama_host::probe::PROBE_SUBCOMMAND) {
        let Some(path) = raw.next() else { return ExitCode::from(2) };
        return match llama_host::probe::child_main(std::path::Path::new(&path)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    let matches = Cli::command().get_matches_from(args::normalize_args(std::env::args_os()));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let code = match Options::resolve(&cli, &matches) {
        Ok(mut options) => {
            let trace_guard = logging::init(&options.global, options.trace.take());
            let code = dispatch(&options);
            drop(trace_guard);
            code
        }
        Err(e) => Err(e),
    };
    match code {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Interrupted) => ExitCode::from(130),
        // `llama ... | head`: the reader has what it wanted.
        Err(e) if e.is_closed_output() => ExitCode::SUCCESS,
        Err(e) => {
            error::print_error(&e);
            ExitCode::from(e.exit_code())
        }
    }
}
