//! `cormorant`: parse the command line, then run the daemon or one client command.

use std::process::ExitCode;

use clap::Parser;

use cormorant::cli::{Cli, Command};
use cormorant::daemon::Config;
use cormorant::image::NodeId;
use cormorant::store::TierDirs;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let config = Config {
                run_dir: cli.run_dir,
                dirs: TierDirs {
                    ram: args.ram_dir,
                    volume: args.volume_dir,
                },
                node: NodeId::local(),
                use_uring: !args.no_uring,
            };
            cormorant::serve::run(config).map_err(|e| e.to_string())
        }
        Command::Image(command) => {
            cormorant::commands::run(&cli.run_dir, command).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cormorant: {message}");
            ExitCode::FAILURE
        }
    }
}
