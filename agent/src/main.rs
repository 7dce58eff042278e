//! `lanyard-agent`: parse flags, then either run the daemon or act as a Workload API client.

use std::process::ExitCode;

use clap::Parser;
use lanyard_agent::cli::{Cli, Command};
use lanyard_agent::config::AgentConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lanyard-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let config = match AgentConfig::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lanyard-agent: {e}");
                    return ExitCode::from(lanyard_daemon::EXIT_CONFIG);
                }
            };
            lanyard_daemon::logging::init(&config.log_level, config.log_format);
            match runtime.block_on(lanyard_agent::run::run(
                config,
                lanyard_daemon::shutdown::signalled(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lanyard-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        client => match runtime.block_on(lanyard_agent::cli::run_client(client)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lanyard-agent: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
