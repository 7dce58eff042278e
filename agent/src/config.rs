//! `agent.toml`: every key can also be given as a flag, and a flag wins. Everything that
//! can be checked without starting is checked here, at load, so a wrong setting ends the
//! agent at once with a sentence naming it (`lanyard-agent validate` runs just this):
//! the trust domain, the server address, the bootstrap bundle (readable PEM CA
//! certificates), and where the join token comes from.
//!
//! The join token never travels on a command line (every local user can read
//! `/proc/<pid>/cmdline`) nor sits in the config file (config files are usually world
//! readable): it comes from `LANYARD_JOIN_TOKEN` (`/proc/<pid>/environ` is readable only
//! by the agent's own user and root) or from `join_token_file`, a file that must be
//! private to the agent's user the way OpenSSH insists on private keys.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;
use lanyard_daemon::config::Duration;
use lanyard_daemon::logging::LogFormat;
use lanyard_proto::TrustDomain;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Where the agent serves the Workload API unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/lanyard/agent/api.sock";
/// Where the agent keeps its identity unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/lanyard/agent";
/// The environment variable a join token may come from.
pub const JOIN_TOKEN_ENV: &str = "LANYARD_JOIN_TOKEN";
/// How long the server may be out of reach before the agent reports itself not ready.
pub const DEFAULT_UNREACHABLE_GRACE: Duration = Duration::from_secs(60);
/// A join token file larger than this is not a join token.
const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    trust_domain: Option<String>,
    server_address: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    insecure_bootstrap: Option<bool>,
    data_dir: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    join_token_file: Option<PathBuf>,
    /// Accepted by the parser only to be refused with the reason, rather than as an
    /// unknown key.
    join_token: Option<serde::de::IgnoredAny>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    health: HealthFile,
    #[serde(default)]
    workload_api: WorkloadApiFile,
}

/// The `[workload_api]` table: what one local user may hold open.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadApiFile {
    connections_per_uid: Option<usize>,
    streams_per_uid: Option<usize>,
    max_connections: Option<usize>,
    idle_timeout: Option<Duration>,
}

/// The `[health]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    bind_address: Option<SocketAddr>,
    unreachable_grace: Option<Duration>,
}

/// `lanyard-agent run` (and `validate`) flags; each overrides the key of the same name
/// in the file.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// Path to agent.toml.
    #[arg(long, short = 'c', env = "LANYARD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Refused: a token on the command line is readable by every local user.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    pub join_token: Option<String>,
    /// File holding the one-time join token for the first attestation, owned by the
    /// agent's user (or root) and readable by nobody else; or set LANYARD_JOIN_TOKEN.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The server's agent API, host:port.
    #[arg(long)]
    pub server_address: Option<String>,
    /// PEM bundle (the trust domain's CA certificates) that authenticates the server on
    /// first contact.
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
    /// Serve /live and /ready over HTTP on this address, e.g. 127.0.0.1:8089 [default: off].
    #[arg(long)]
    pub health_bind_address: Option<SocketAddr>,
    /// How long the server may be unreachable before the agent is not ready: seconds or
    /// 30s, 2m [default: 60s].
    #[arg(long)]
    pub health_unreachable_grace: Option<Duration>,
    /// trace, debug, info, warn or error [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// text or json [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Where configuration reads environment variables from: the process, or a map in tests
/// (so no test mutates the process environment).
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Environment for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// How the agent authenticates the server before it has attested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// `trust_bundle_path` and the CA certificates (DER) read from it at load.
    Bundle {
        path: PathBuf,
        roots: Vec<Vec<u8>>,
    },
    Insecure,
}

/// A join token: zeroized on drop, never printed.
#[derive(Clone)]
pub struct JoinToken(Zeroizing<String>);

impl JoinToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(redacted)")
    }
}

/// Where the join token for the first attestation comes from.
#[derive(Debug, Clone)]
pub enum JoinTokenSource {
    /// None given: the agent must already hold an identity.
    None,
    /// `LANYARD_JOIN_TOKEN`.
    Environment(JoinToken),
    /// `join_token_file`; `token` is `None` when the file does not exist, which is fine
    /// once the agent has attested (operators delete a spent token's file).
    File {
        path: PathBuf,
        token: Option<JoinToken>,
    },
}

/// Why no join token is at hand when one is needed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoJoinToken {
    #[error(
        "this agent has no stored identity; give it a join token with --join-token-file (join_token_file) or LANYARD_JOIN_TOKEN"
    )]
    NotGiven,
    #[error(
        "this agent has no stored identity and join_token_file {0} does not exist; write the join token there (mode 0600)"
    )]
    FileMissing(PathBuf),
}

impl JoinTokenSource {
    /// The token, for an agent that needs to attest.
    pub fn token(&self) -> Result<&JoinToken, NoJoinToken> {
        match self {
            JoinTokenSource::Environment(t)
            | JoinTokenSource::File {
                token: Some(t),
                path: _,
            } => Ok(t),
            JoinTokenSource::File { path, token: None } => {
                Err(NoJoinToken::FileMissing(path.clone()))
            }
            JoinTokenSource::None => Err(NoJoinToken::NotGiven),
        }
    }
}

/// Readiness settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Where to serve `/live` and `/ready`; off when `None`.
    pub bind_address: Option<SocketAddr>,
    /// How long the server may be out of reach before the agent is not ready.
    pub unreachable_grace: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    pub server_address: String,
    pub bootstrap: Bootstrap,
    pub data_dir: PathBuf,
    pub socket_path: PathBuf,
    pub join_token: JoinTokenSource,
    pub health: HealthConfig,
    /// Caps on Workload API callers (the total is lowered further to fit the fd limit).
    pub workload_api: crate::peer::Limits,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// What is wrong with the bootstrap bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleProblem {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("it is not PEM: {0}")]
    NotPem(pem::PemError),
    #[error(
        "it holds no CERTIFICATE block; it must hold the trust domain's CA certificates (lanyard-server bundle show)"
    )]
    NoCertificates,
    #[error("certificate {index} in it cannot be parsed: {source}")]
    Unparsable {
        index: usize,
        source: x509_parser::error::X509Error,
    },
    #[error(
        "certificate {index} in it ({subject}) is not a CA certificate; it must hold the trust domain's CA certificates (lanyard-server bundle show), not an SVID"
    )]
    NotCa { index: usize, subject: String },
    #[error("certificate {index} in it cannot be a trust anchor: {source}")]
    Anchor { index: usize, source: webpki::Error },
}

/// What is wrong with the join token file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileProblem {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("it is a symbolic link; name the file itself")]
    Symlink,
    #[error("it is not a regular file")]
    NotAFile,
    #[error(
        "it is owned by uid {owner}; it must belong to uid {me}, which runs the agent, or to root"
    )]
    Owner { owner: u32, me: u32 },
    #[error("it has mode {mode:04o}, so other users can read or change it; chmod 600 it")]
    Mode { mode: u32 },
    #[error("it is empty")]
    Empty,
    #[error("it does not hold a join token (expected one line of text)")]
    NotAToken,
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
    #[error("trust_bundle_path {path}: {problem}")]
    TrustBundle {
        path: PathBuf,
        problem: BundleProblem,
    },
    #[error("socket_path {0} must be absolute")]
    SocketPath(PathBuf),
    #[error("log_level \"{0}\" is not one of trace, debug, info, warn, error")]
    LogLevel(String),
    #[error("[workload_api] {key} must be at least {min}, got {got}")]
    WorkloadApiLimit {
        key: &'static str,
        min: u64,
        got: u64,
    },
    #[error(
        "--join-token is refused because every local user can read a process's command line (/proc/<pid>/cmdline); pass the token in the LANYARD_JOIN_TOKEN environment variable or in a file named by --join-token-file"
    )]
    TokenOnCommandLine,
    #[error(
        "config file {0}: join_token is refused because config files are usually readable by other users; put the token in a file only the agent's user can read and name it with join_token_file, or pass it in LANYARD_JOIN_TOKEN"
    )]
    TokenInConfigFile(PathBuf),
    #[error("both join_token_file and LANYARD_JOIN_TOKEN are set; give the join token one way")]
    TwoTokens,
    #[error("join_token_file {path}: {problem}")]
    TokenFile {
        path: PathBuf,
        problem: TokenFileProblem,
    },
}

impl AgentConfig {
    /// Loads the configuration from `args`, the file they name and the process
    /// environment.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        Self::load_with(args, &ProcessEnvironment)
    }

    /// As [`AgentConfig::load`], reading environment variables from `env`.
    pub fn load_with(args: &RunArgs, env: &dyn Environment) -> Result<Self, ConfigError> {
        // Refused before anything else, so the sentence is the first thing the operator
        // sees and the token is never used.
        if args.join_token.is_some() {
            return Err(ConfigError::TokenOnCommandLine);
        }
        let file = match &args.config {
            Some(path) => {
                let file: FileConfig = lanyard_daemon::config::read_toml(path)?;
                if file.join_token.is_some() {
                    return Err(ConfigError::TokenInConfigFile(path.clone()));
                }
                file
            }
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
            (Some(path), _) => {
                let roots =
                    read_trust_bundle(&path).map_err(|problem| ConfigError::TrustBundle {
                        path: path.clone(),
                        problem,
                    })?;
                Bootstrap::Bundle { path, roots }
            }
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
        // An empty variable counts as unset: an env file keeps `LANYARD_JOIN_TOKEN=`
        // once the token is spent.
        let env_token = env
            .var(JOIN_TOKEN_ENV)
            .filter(|t| !t.trim().is_empty())
            .map(|t| JoinToken(Zeroizing::new(t.trim().to_string())));
        let join_token = match (
            args.join_token_file.clone().or(file.join_token_file),
            env_token,
        ) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoTokens),
            (Some(path), None) => {
                let token = read_token_file(&path).map_err(|problem| ConfigError::TokenFile {
                    path: path.clone(),
                    problem,
                })?;
                JoinTokenSource::File { path, token }
            }
            (None, Some(token)) => JoinTokenSource::Environment(token),
            (None, None) => JoinTokenSource::None,
        };
        Ok(AgentConfig {
            trust_domain,
            server_address,
            bootstrap,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            socket_path,
            join_token,
            health: HealthConfig {
                bind_address: args.health_bind_address.or(file.health.bind_address),
                unreachable_grace: args
                    .health_unreachable_grace
                    .or(file.health.unreachable_grace)
                    .unwrap_or(DEFAULT_UNREACHABLE_GRACE),
            },
            workload_api: workload_api_limits(&file.workload_api)?,
            log_level,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

/// The `[workload_api]` caps, defaulted and checked.
fn workload_api_limits(file: &WorkloadApiFile) -> Result<crate::peer::Limits, ConfigError> {
    let defaults = crate::peer::Limits::default();
    let at_least = |key: &'static str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(ConfigError::WorkloadApiLimit {
            key,
            min: 1,
            got: 0,
        }),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let idle_timeout = file.idle_timeout.map_or(defaults.idle_timeout, Into::into);
    if idle_timeout < std::time::Duration::from_secs(1) {
        return Err(ConfigError::WorkloadApiLimit {
            key: "idle_timeout (seconds)",
            min: 1,
            got: idle_timeout.as_secs(),
        });
    }
    Ok(crate::peer::Limits {
        connections_per_uid: at_least(
            "connections_per_uid",
            file.connections_per_uid,
            defaults.connections_per_uid,
        )?,
        streams_per_uid: at_least(
            "streams_per_uid",
            file.streams_per_uid,
            defaults.streams_per_uid,
        )?,
        max_connections: at_least(
            "max_connections",
            file.max_connections,
            defaults.max_connections,
        )?,
        idle_timeout,
    })
}

/// Reads the bootstrap bundle: PEM, at least one certificate, every certificate a CA
/// that can serve as a trust anchor. Returns the certificates, DER.
pub fn read_trust_bundle(path: &Path) -> Result<Vec<Vec<u8>>, BundleProblem> {
    let bytes = std::fs::read(path).map_err(BundleProblem::Read)?;
    let blocks = pem::parse_many(bytes).map_err(BundleProblem::NotPem)?;
    let roots: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if roots.is_empty() {
        return Err(BundleProblem::NoCertificates);
    }
    for (i, der) in roots.iter().enumerate() {
        let index = i + 1;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| BundleProblem::Unparsable {
                index,
                source: match e {
                    x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                    x509_parser::nom::Err::Incomplete(_) => {
                        x509_parser::error::X509Error::InvalidCertificate
                    }
                },
            })?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(BundleProblem::NotCa {
                index,
                subject: cert.subject().to_string(),
            });
        }
        webpki::anchor_from_trusted_cert(&rustls_pki_types::CertificateDer::from(der.as_slice()))
            .map_err(|source| BundleProblem::Anchor { index, source })?;
    }
    Ok(roots)
}

/// Reads a join token file, refusing one that another user could have read or planted:
/// a symbolic link, not a regular file, owned by someone other than this uid or root,
/// or with any permission for group or others. `None` if it does not exist.
pub fn read_token_file(path: &Path) -> Result<Option<JoinToken>, TokenFileProblem> {
    // O_NONBLOCK: a FIFO planted at the path must not hang the agent; it is refused
    // below as not a regular file.
    let fd = match nix::fcntl::open(
        path,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => return Err(TokenFileProblem::Symlink),
        Err(e) => return Err(TokenFileProblem::Read(e.into())),
    };
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(TokenFileProblem::Read)?;
    if !meta.is_file() {
        return Err(TokenFileProblem::NotAFile);
    }
    let me = lanyard_daemon::fs::my_uid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(TokenFileProblem::Owner {
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenFileProblem::Mode { mode });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    (&mut file)
        .take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(TokenFileProblem::Read)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(TokenFileProblem::NotAToken);
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| TokenFileProblem::NotAToken)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileProblem::Empty);
    }
    if token.contains(char::is_whitespace) {
        return Err(TokenFileProblem::NotAToken);
    }
    Ok(Some(JoinToken(Zeroizing::new(token.to_string()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const BASE: &str = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\ninsecure_bootstrap = true\n";

    fn no_env() -> HashMap<String, String> {
        HashMap::new()
    }

    fn load_text_env(
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        AgentConfig::load_with(
            &RunArgs {
                config: Some(path),
                ..RunArgs::default()
            },
            env,
        )
    }

    fn load_text(text: &str) -> Result<AgentConfig, ConfigError> {
        load_text_env(text, &no_env())
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A self-signed certificate, CA or not, as PEM.
    fn cert_pem(ca: bool) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        }
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn good_and_bad_files() {
        let c = load_text(BASE).expect("ok");
        assert_eq!(c.bootstrap, Bootstrap::Insecure);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(
            c.health.bind_address, None,
            "health over HTTP is off by default"
        );
        assert_eq!(c.health.unreachable_grace, DEFAULT_UNREACHABLE_GRACE);
        assert!(matches!(c.join_token, JoinTokenSource::None));
        let e = load_text("trust_domain = \"example.org\"\nserver_address = \"x:1\"\n")
            .expect_err("no bootstrap");
        assert!(matches!(e, ConfigError::NoBootstrap));
        let e = load_text("trust_domain = \"example.org\"\nserver_address = \"nohost\"\ninsecure_bootstrap = true").expect_err("addr");
        assert!(e.to_string().contains("host:port"), "{e}");
        let e = load_text("trustdomain = 1").expect_err("unknown key");
        assert!(e.to_string().contains("trustdomain"), "{e}");
    }

    #[test]
    fn health_table_and_flags() {
        let c = load_text(&format!(
            "{BASE}[health]\nbind_address = \"127.0.0.1:8089\"\nunreachable_grace = \"2m\"\n"
        ))
        .expect("ok");
        assert_eq!(
            c.health.bind_address,
            Some("127.0.0.1:8089".parse().expect("addr"))
        );
        assert_eq!(c.health.unreachable_grace, Duration::from_secs(120));
        let e = load_text(&format!("{BASE}[health]\nbind_address = \"nowhere\"\n"))
            .expect_err("bad address");
        assert!(e.to_string().contains("line 5"), "{e}");
        let e = load_text(&format!("{BASE}[health]\nport = 1\n")).expect_err("unknown key");
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn workload_api_table_sets_the_caller_limits() {
        let c = load_text(&format!(
            "{BASE}[workload_api]\nconnections_per_uid = 64\nstreams_per_uid = 32\nmax_connections = 4096\nidle_timeout = \"10s\"\n"
        ))
        .expect("ok");
        assert_eq!(
            c.workload_api,
            crate::peer::Limits {
                connections_per_uid: 64,
                streams_per_uid: 32,
                max_connections: 4096,
                idle_timeout: std::time::Duration::from_secs(10),
            }
        );
        assert_eq!(
            load_text(BASE).expect("defaults").workload_api,
            crate::peer::Limits::default()
        );
        let e =
            load_text(&format!("{BASE}[workload_api]\nstreams_per_uid = 0\n")).expect_err("zero");
        assert_eq!(
            e.to_string(),
            "[workload_api] streams_per_uid must be at least 1, got 0"
        );
        let e = load_text(&format!("{BASE}[workload_api]\nidle_timeout = \"100ms\"\n"))
            .expect_err("too short");
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        let e = load_text(&format!("{BASE}[workload_api]\nstreams = 1\n")).expect_err("unknown");
        assert!(e.to_string().contains("streams"), "{e}");
    }

    #[test]
    fn a_token_on_the_command_line_is_refused_with_the_reason() {
        for given in ["secret-token", ""] {
            let e = AgentConfig::load_with(
                &RunArgs {
                    join_token: Some(given.into()),
                    trust_domain: Some("example.org".into()),
                    server_address: Some("127.0.0.1:1".into()),
                    insecure_bootstrap: true,
                    ..RunArgs::default()
                },
                &no_env(),
            )
            .expect_err("--join-token");
            let text = e.to_string();
            assert!(matches!(e, ConfigError::TokenOnCommandLine));
            for needle in [
                "/proc/<pid>/cmdline",
                "LANYARD_JOIN_TOKEN",
                "--join-token-file",
            ] {
                assert!(text.contains(needle), "{text}");
            }
            assert!(!text.contains("secret-token"), "{text}");
        }
    }

    #[test]
    fn a_token_in_the_config_file_is_refused_with_the_reason() {
        let e = load_text(&format!("{BASE}join_token = \"secret-token\"\n")).expect_err("key");
        let text = e.to_string();
        assert!(matches!(e, ConfigError::TokenInConfigFile(_)), "{text}");
        assert!(
            text.contains("join_token_file") && text.contains("LANYARD_JOIN_TOKEN"),
            "{text}"
        );
        assert!(!text.contains("secret-token"), "{text}");
    }

    #[test]
    fn token_from_environment_or_file_never_both() {
        let env = HashMap::from([(JOIN_TOKEN_ENV.to_string(), " tok-env \n".to_string())]);
        let c = load_text_env(BASE, &env).expect("env token");
        assert_eq!(c.join_token.token().expect("token").expose(), "tok-env");
        assert_eq!(
            format!("{:?}", c.join_token),
            "Environment(JoinToken(redacted))"
        );
        let blank = HashMap::from([(JOIN_TOKEN_ENV.to_string(), "  ".to_string())]);
        let c = load_text_env(BASE, &blank).expect("blank");
        assert!(matches!(c.join_token.token(), Err(NoJoinToken::NotGiven)));

        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("token");
        std::fs::write(&file, "tok-file\n").expect("write");
        chmod(&file, 0o600);
        let text = format!("{BASE}join_token_file = \"{}\"\n", file.display());
        let c = load_text(&text).expect("file token");
        assert_eq!(c.join_token.token().expect("token").expose(), "tok-file");
        let e = load_text_env(&text, &env).expect_err("both");
        assert!(matches!(e, ConfigError::TwoTokens), "{e}");

        // A file that is gone is fine until a token is needed, and then named.
        std::fs::remove_file(&file).expect("rm");
        let c = load_text(&text).expect("missing file");
        let e = c.join_token.token().expect_err("missing");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    }

    #[test]
    fn token_files_others_could_read_or_plant_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("token");
        std::fs::write(&file, "tok\n").expect("write");
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            chmod(&file, mode);
            let got = read_token_file(&file);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
        chmod(&file, 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(matches!(
            read_token_file(&link),
            Err(TokenFileProblem::Symlink)
        ));
        std::os::unix::fs::chown(&file, Some(65534), None).expect("chown");
        let e = read_token_file(&file).expect_err("owned by nobody");
        assert!(
            matches!(e, TokenFileProblem::Owner { owner: 65534, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("root"), "{e}");
        // Root may own it (an operator's file read by an agent running as another user).
        std::os::unix::fs::chown(&file, Some(0), None).expect("chown");
        assert!(read_token_file(&file).is_ok());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(matches!(
            read_token_file(&fifo),
            Err(TokenFileProblem::NotAFile)
        ));
        assert!(matches!(
            read_token_file(dir.path()),
            Err(TokenFileProblem::NotAFile)
        ));
        std::fs::write(&file, "\n").expect("write");
        assert!(matches!(
            read_token_file(&file),
            Err(TokenFileProblem::Empty)
        ));
        std::fs::write(&file, "two words").expect("write");
        assert!(matches!(
            read_token_file(&file),
            Err(TokenFileProblem::NotAToken)
        ));
        std::fs::write(&file, vec![b'a'; 10_000]).expect("write");
        assert!(matches!(
            read_token_file(&file),
            Err(TokenFileProblem::NotAToken)
        ));
        assert!(matches!(
            read_token_file(&dir.path().join("none")),
            Ok(None)
        ));
    }

    #[test]
    fn trust_bundle_is_checked_at_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let load_bundle = |path: &Path| {
            load_text(&format!(
                "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"{}\"\n",
                path.display()
            ))
        };
        let ca = write("ca.pem", &cert_pem(true));
        let c = load_bundle(&ca).expect("a CA bundle");
        assert!(matches!(c.bootstrap, Bootstrap::Bundle { ref roots, .. } if roots.len() == 1));

        let cases = [
            (dir.path().join("absent.pem"), "cannot read"),
            (write("garbage.pem", "not pem at all"), "no CERTIFICATE"),
            (
                write(
                    "key.pem",
                    "-----BEGIN PRIVATE KEY-----\nAQID\n-----END PRIVATE KEY-----\n",
                ),
                "no CERTIFICATE",
            ),
            (
                write(
                    "junk.pem",
                    "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n",
                ),
                "cannot be parsed",
            ),
            (write("leaf.pem", &cert_pem(false)), "not a CA certificate"),
            (
                write(
                    "mixed.pem",
                    &format!("{}{}", cert_pem(true), cert_pem(false)),
                ),
                "certificate 2",
            ),
        ];
        for (path, needle) in cases {
            let e = load_bundle(&path).expect_err("bad bundle");
            let text = e.to_string();
            assert!(matches!(e, ConfigError::TrustBundle { .. }), "{text}");
            assert!(text.starts_with("trust_bundle_path "), "{text}");
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
