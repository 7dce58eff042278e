//! `server.toml`: every key can also be given as a flag, and a flag wins.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use lanyard_daemon::config::Duration;
use lanyard_daemon::logging::LogFormat;
use lanyard_proto::TrustDomain;
use serde::Deserialize;

/// Where the CLI and daemon look for the admin socket unless told otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/lanyard/server/admin.sock";

/// The file's shape; every field optional so flags can fill gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    trust_domain: Option<String>,
    bind_address: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    ca_ttl: Option<Duration>,
    default_x509_svid_ttl: Option<Duration>,
    agent_ttl: Option<Duration>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    health: Option<HealthFile>,
}

/// `[health]` in server.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    bind_address: Option<SocketAddr>,
}

/// `lanyard-server run` flags; each overrides the key of the same name in the file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Path to server.toml.
    #[arg(long, short = 'c', env = "LANYARD_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Agent API address (TCP, TLS 1.3) [default: 0.0.0.0:8081].
    #[arg(long)]
    pub bind_address: Option<SocketAddr>,
    /// Admin API Unix socket [default: /run/lanyard/server/admin.sock].
    #[arg(long, env = "LANYARD_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Directory for the CA key and the datastore [default: /var/lib/lanyard/server].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CA lifetime: seconds or 30m, 24h, 365d ... [default: 365d].
    #[arg(long)]
    pub ca_ttl: Option<Duration>,
    /// Default workload X509-SVID lifetime [default: 1h].
    #[arg(long)]
    pub default_x509_svid_ttl: Option<Duration>,
    /// Agent X509-SVID lifetime [default: 1h].
    #[arg(long)]
    pub agent_ttl: Option<Duration>,
    /// Serve /live and /ready over HTTP on this address [default: off].
    #[arg(long)]
    pub health_bind_address: Option<SocketAddr>,
    /// trace, debug, info, warn or error [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// text or json [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub trust_domain: TrustDomain,
    pub bind_address: SocketAddr,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub ca_ttl: Duration,
    pub default_x509_svid_ttl: Duration,
    pub agent_ttl: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Where `/live` and `/ready` are served, if anywhere.
    pub health_bind_address: Option<SocketAddr>,
    /// Connection limits of the agent API (not in the file: the defaults suit every
    /// deployment so far; tests narrow them).
    pub limits: crate::tls::Limits,
}

/// A configuration problem, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] lanyard_daemon::config::FileError),
    #[error("trust_domain is required (in the config file or as --trust-domain)")]
    MissingTrustDomain,
    #[error("trust_domain \"{value}\" is invalid: {source}")]
    TrustDomain {
        value: String,
        source: lanyard_proto::IdError,
    },
    #[error("{key} must be at least {min} seconds, got {got}")]
    TooShort {
        key: &'static str,
        min: u64,
        got: u64,
    },
    #[error("{key} ({svid}) must be shorter than ca_ttl ({ca})")]
    SvidOutlivesCa {
        key: &'static str,
        svid: Duration,
        ca: Duration,
    },
    #[error("log_level \"{0}\" is not one of trace, debug, info, warn, error")]
    LogLevel(String),
}

impl ServerConfig {
    /// Merges the file named by `--config` (if any) with the flags and validates the result.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => lanyard_daemon::config::read_toml(path)?,
            None => FileConfig::default(),
        };
        let td_raw = args
            .trust_domain
            .clone()
            .or(file.trust_domain)
            .ok_or(ConfigError::MissingTrustDomain)?;
        let trust_domain =
            TrustDomain::new(&td_raw).map_err(|source| ConfigError::TrustDomain {
                value: td_raw.clone(),
                source,
            })?;
        let ca_ttl = args
            .ca_ttl
            .or(file.ca_ttl)
            .unwrap_or(Duration::from_secs(365 * 86400));
        let default_x509_svid_ttl = args
            .default_x509_svid_ttl
            .or(file.default_x509_svid_ttl)
            .unwrap_or(Duration::from_secs(3600));
        let agent_ttl = args
            .agent_ttl
            .or(file.agent_ttl)
            .unwrap_or(Duration::from_secs(3600));
        for (key, ttl) in [
            ("ca_ttl", ca_ttl),
            ("default_x509_svid_ttl", default_x509_svid_ttl),
            ("agent_ttl", agent_ttl),
        ] {
            if ttl.as_secs() < 10 {
                return Err(ConfigError::TooShort {
                    key,
                    min: 10,
                    got: ttl.as_secs(),
                });
            }
        }
        for (key, svid) in [
            ("default_x509_svid_ttl", default_x509_svid_ttl),
            ("agent_ttl", agent_ttl),
        ] {
            if svid >= ca_ttl {
                return Err(ConfigError::SvidOutlivesCa {
                    key,
                    svid,
                    ca: ca_ttl,
                });
            }
        }
        let log_level = args
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into());
        if !lanyard_daemon::logging::is_level(&log_level) {
            return Err(ConfigError::LogLevel(log_level));
        }
        Ok(ServerConfig {
            trust_domain,
            bind_address: args
                .bind_address
                .or(file.bind_address)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8081))),
            admin_socket: args
                .admin_socket
                .clone()
                .or(file.admin_socket)
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| "/var/lib/lanyard/server".into()),
            ca_ttl,
            default_x509_svid_ttl,
            agent_ttl,
            log_level,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            health_bind_address: args
                .health_bind_address
                .or(file.health.and_then(|h| h.bind_address)),
            limits: crate::tls::Limits::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text).expect("write");
        ServerConfig::load(&RunArgs {
            config: Some(path),
            ..RunArgs::default()
        })
    }

    #[test]
    fn file_and_flags_merge() {
        let c = load_text(
            "trust_domain = \"example.org\"\nca_ttl = \"2d\"\ndefault_x509_svid_ttl = 60\nagent_ttl = \"15m\"\n\n[health]\nbind_address = \"127.0.0.1:8080\"\n",
        )
        .expect("ok");
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.ca_ttl, Duration::from_secs(172800));
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(60));
        assert_eq!(c.agent_ttl, Duration::from_secs(900));
        assert_eq!(
            c.health_bind_address,
            Some("127.0.0.1:8080".parse().expect("addr"))
        );
        let defaults = load_text("trust_domain = \"example.org\"\n").expect("ok");
        assert_eq!(defaults.agent_ttl, Duration::from_secs(3600));
        assert_eq!(
            defaults.health_bind_address, None,
            "health HTTP is off by default"
        );
        let flags = RunArgs {
            trust_domain: Some("other.org".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            ServerConfig::load(&flags)
                .expect("ok")
                .trust_domain
                .as_str(),
            "other.org"
        );
    }

    #[test]
    fn bad_files_name_the_cause() {
        let e = load_text("trust_domain = \"example.org\"\nbogus = 1\n").expect_err("unknown key");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = load_text("trust_domain = \"Example.org\"").expect_err("uppercase");
        assert!(e.to_string().contains("Example.org"), "{e}");
        let e = load_text("trust_domain = ").expect_err("syntax");
        assert!(e.to_string().contains("line 1, column 16"), "{e}");
        assert!(matches!(
            load_text(""),
            Err(ConfigError::MissingTrustDomain)
        ));
        assert!(matches!(
            load_text("trust_domain = \"a\"\nca_ttl = 5"),
            Err(ConfigError::TooShort { .. })
        ));
        let e = load_text("trust_domain = \"a\"\nagent_ttl = \"5s\"").expect_err("short");
        assert!(e.to_string().contains("agent_ttl"), "{e}");
        let e = load_text(
            "trust_domain = \"a\"\nca_ttl = \"1h\"\ndefault_x509_svid_ttl = 60\nagent_ttl = \"2h\"",
        )
        .expect_err("agent outlives CA");
        assert!(
            e.to_string()
                .contains("agent_ttl (2h) must be shorter than ca_ttl (1h)"),
            "{e}"
        );
        let e = load_text("trust_domain = \"a\"\n[health]\nport = 1").expect_err("unknown key");
        assert!(
            e.to_string().contains("port") && e.to_string().contains("line 3"),
            "{e}"
        );
    }
}
