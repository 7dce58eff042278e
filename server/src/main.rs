//! `lanyard-server`: parse flags, then run the daemon, validate its configuration, or
//! act as an admin client.

use std::process::ExitCode;

use clap::Parser;
use lanyard_server::cli::{Cli, Command};
use lanyard_server::config::{RunArgs, ServerConfig};

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
            let Some(config) = load(&args) else {
                return ExitCode::from(lanyard_daemon::EXIT_CONFIG);
            };
            lanyard_daemon::logging::init(&config.log_level, config.log_format);
            runtime.block_on(serve(config))
        }
        Command::Validate(args) => {
            let Some(config) = load(&args) else {
                return ExitCode::from(lanyard_daemon::EXIT_CONFIG);
            };
            match lanyard_server::run::validate(&config) {
                Ok(()) => {
                    lanyard_daemon::outln!(
                        "configuration is valid: trust domain {}, agent API {}, data_dir {}, admin socket {}",
                        config.trust_domain,
                        config.bind_address,
                        config.data_dir.display(),
                        config.admin_socket.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lanyard-server: {e}");
                    ExitCode::from(lanyard_daemon::EXIT_CONFIG)
                }
            }
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

/// The configuration, or `None` after printing why it is unusable.
fn load(args: &RunArgs) -> Option<ServerConfig> {
    match ServerConfig::load(args) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("lanyard-server: {e}");
            None
        }
    }
}

async fn serve(config: ServerConfig) -> ExitCode {
    let mut running = match lanyard_server::run::start(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lanyard-server: {e}");
            return if e.is_config() {
                ExitCode::from(lanyard_daemon::EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    lanyard_daemon::notify::ready(&format!("serving the agent API on {}", running.agent_addr));
    tokio::select! {
        () = lanyard_daemon::shutdown::signalled() => {
            tracing::info!("shutting down");
            lanyard_daemon::notify::stopping();
            match running.shutdown().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => { eprintln!("lanyard-server: {e}"); ExitCode::FAILURE }
            }
        }
        failed = running.failed() => {
            lanyard_daemon::notify::stopping();
            if let Some(e) = failed {
                eprintln!("lanyard-server: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
