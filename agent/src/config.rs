//! `agent.toml`: every key can also be given as a flag, and a flag wins.

use std::path::PathBuf;

use clap::Args;
use lanyard_daemon::logging::LogFormat;
use lanyard_proto::TrustDomain;
use serde::Deserialize;

/// Where the agent serves the Workload API unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/lanyard/agent/api.sock";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    trust_domain: Option<String>,
    server_address: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    insecure_bootstrap: Option<bool>,
    data_dir: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    join_token: Option<String>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// `lanyard-agent run` flags; each overrides the key of the same name in the file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Path to agent.toml.
    #[arg(long, short = 'c', env = "LANYARD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// One-time join token for the first attestation (also LANYARD_JOIN_TOKEN).
    #[arg(long, env = "LANYARD_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The server's agent API, host:port.
    #[arg(long)]
    pub server_address: Option<String>,
    /// PEM bundle that authenticates the server on first contact.
    #[arg(long)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust the server blindly on first contact (local trials only).
    #[arg(long)]
    pub insecure_bootstrap: bool,
    /// Directory for the agent's SVID, key and bundle [default: /var/lib/lanyard/agent].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Workload API socket [default: /run/lanyard/agent/api.sock].
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// trace, debug, info, warn or error [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// text or json [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// How the agent authenticates the server before it has attested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    Bundle(PathBuf),
    Insecure,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    pub server_address: String,
    pub bootstrap: Bootstrap,
    pub data_dir: PathBuf,
    pub socket_path: PathBuf,
    pub join_token: Option<String>,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// A configuration problem, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] lanyard_daemon::config::FileError),
    #[error("{0} is required (in the config file or as a flag)")]
    Missing(&'static str),
    #[error("trust_domain \"{value}\" is invalid: {source}")]
    TrustDomain {
        value: String,
        source: lanyard_proto::IdError,
    },
    #[error("server_address \"{0}\" must be host:port")]
    ServerAddress(String),
    #[error(
        "set trust_bundle_path to the server's CA bundle, or insecure_bootstrap = true for a local trial"
    )]
    NoBootstrap,
    #[error("socket_path {0} must be absolute")]
    SocketPath(PathBuf),
    #[error("log_level \"{0}\" is not one of trace, debug, info, warn, error")]
    LogLevel(String),
}

impl AgentConfig {
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => lanyard_daemon::config::read_toml(path)?,
            None => FileConfig::default(),
        };
        let td_raw = args
            .trust_domain
            .clone()
            .or(file.trust_domain)
            .ok_or(ConfigError::Missing("trust_domain"))?;
        let trust_domain =
            TrustDomain::new(&td_raw).map_err(|source| ConfigError::TrustDomain {
                value: td_raw.clone(),
                source,
            })?;
        let server_address = args
            .server_address
            .clone()
            .or(file.server_address)
            .ok_or(ConfigError::Missing("server_address"))?;
        let port_ok = server_address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ConfigError::ServerAddress(server_address));
        }
        let bootstrap = match (
            args.trust_bundle_path.clone().or(file.trust_bundle_path),
            args.insecure_bootstrap || file.insecure_bootstrap == Some(true),
        ) {
            (Some(path), _) => Bootstrap::Bundle(path),
            (None, true) => Bootstrap::Insecure,
            (None, false) => return Err(ConfigError::NoBootstrap),
        };
        let socket_path = args
            .socket_path
            .clone()
            .or(file.socket_path)
            .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into());
        if !socket_path.is_absolute() {
            return Err(ConfigError::SocketPath(socket_path));
        }
        let log_level = args
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into());
        if !lanyard_daemon::logging::is_level(&log_level) {
            return Err(ConfigError::LogLevel(log_level));
        }
        Ok(AgentConfig {
            trust_domain,
            server_address,
            bootstrap,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| "/var/lib/lanyard/agent".into()),
            socket_path,
            join_token: args
                .join_token
                .clone()
                .or(file.join_token)
                .filter(|t| !t.trim().is_empty()),
            log_level,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        AgentConfig::load(&RunArgs {
            config: Some(path),
            ..RunArgs::default()
        })
    }

    #[test]
    fn good_and_bad_files() {
        let c = load_text("trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\ninsecure_bootstrap = true\n")
            .expect("ok");
        assert_eq!(c.bootstrap, Bootstrap::Insecure);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        let e = load_text("trust_domain = \"example.org\"\nserver_address = \"x:1\"\n")
            .expect_err("no bootstrap");
        assert!(matches!(e, ConfigError::NoBootstrap));
        let e = load_text("trust_domain = \"example.org\"\nserver_address = \"nohost\"\ninsecure_bootstrap = true").expect_err("addr");
        assert!(e.to_string().contains("host:port"), "{e}");
        let e = load_text("trustdomain = 1").expect_err("unknown key");
        assert!(e.to_string().contains("trustdomain"), "{e}");
    }
}
