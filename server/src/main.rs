//! `lanyard-server`: parse flags, then either run the daemon or act as an admin client.

use std::process::ExitCode;

use clap::Parser;
use lanyard_server::cli::{Cli, Command};
use lanyard_server::config::ServerConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lanyard-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let config = match ServerConfig::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lanyard-server: {e}");
                    return ExitCode::from(lanyard_daemon::EXIT_CONFIG);
                }
            };
            lanyard_daemon::logging::init(&config.log_level, config.log_format);
            runtime.block_on(serve(config))
        }
        client => match runtime.block_on(lanyard_server::cli::run_client(client)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lanyard-server: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn serve(config: ServerConfig) -> ExitCode {
    let mut running = match lanyard_server::run::start(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lanyard-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        () = lanyard_daemon::shutdown::signalled() => {
            tracing::info!("shutting down");
            match running.shutdown().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => { eprintln!("lanyard-server: {e}"); ExitCode::FAILURE }
            }
        }
        failed = running.failed() => {
            if let Some(e) = failed {
                eprintln!("lanyard-server: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
