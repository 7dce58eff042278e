//! `lanyard-agent`: parse flags, then either run the daemon or act as a Workload API client.

use std::process::ExitCode;

use clap::Parser;
use lanyard_agent::cli::{Cli, Command};
use lanyard_agent::config::AgentConfig;

/// Exit code for configuration errors (EX_CONFIG), as sysexits.h has it.
const EX_CONFIG: u8 = 78;

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
                    return ExitCode::from(EX_CONFIG);
                }
            };
            lanyard_proto::daemon::init_logging(&config.log_level, config.log_format);
            match runtime.block_on(lanyard_agent::run::run(config, signal())) {
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

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
