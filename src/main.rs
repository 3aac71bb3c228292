//! `cormorant`: parse the command line, then run the daemon or one client command.

// Issue 11: no unwrap or expect outside tests (a panic on a queue thread loses a VM), and
// every unsafe block says why it is sound.
#![warn(
    clippy::undocumented_unsafe_blocks,
    clippy::unwrap_used,
    clippy::expect_used
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;

use cormorant::cli::{Cli, Command};
use cormorant::config::Config;

fn main() -> ExitCode {
    // Millisecond timestamps: a live migration's switch-over is read from two daemons' logs.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => Config::from_args(cli.run_dir, args)
            .map_err(|e| e.to_string())
            .and_then(|config| cormorant::serve::run(config).map_err(|e| e.to_string())),
        command => cormorant::commands::run(&cli.run_dir, command).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cormorant: {message}");
            ExitCode::FAILURE
        }
    }
}
