//! `lanyard-agent`: parse flags, then run the daemon, check its configuration, or act as
//! a client of the agent's socket. Each error is one line on stderr; configuration
//! errors exit 78, which systemd does not restart.

use std::process::ExitCode;

use clap::Parser;
use lanyard_agent::cli::{Cli, Command};
use lanyard_agent::config::{AgentConfig, RunArgs};
use lanyard_daemon::outln;

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("lanyard-agent: {e}");
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new()
        .map_err(|e| fail(&format!("cannot start the async runtime: {e}"), 1))
}

fn run(args: &RunArgs) -> ExitCode {
    let config = match AgentConfig::load(args) {
        Ok(c) => c,
        Err(e) => return fail(&e, lanyard_daemon::EXIT_CONFIG),
    };
    lanyard_daemon::logging::init(&config.log_level, config.log_format);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(lanyard_agent::run::run(
        config,
        lanyard_daemon::shutdown::signalled(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, e.exit_code()),
    }
}

fn validate(args: &RunArgs) -> ExitCode {
    let config = match AgentConfig::load(args) {
        Ok(c) => c,
        Err(e) => return fail(&e, lanyard_daemon::EXIT_CONFIG),
    };
    match lanyard_agent::run::validate(&config) {
        Ok(valid) => {
            outln!("{}", valid.summary);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, lanyard_daemon::EXIT_CONFIG),
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(&args),
        Command::Validate(args) => validate(&args),
        client => {
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(lanyard_agent::cli::run_client(client)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e, 1),
            }
        }
    }
}
