//! The `lanyard-agent` command line: `run` starts the daemon, `validate` checks its
//! configuration; `api` and `healthcheck` are clients of the agent's socket. Everything
//! they print goes through `lanyard_daemon::outln!` (a closed pipe, as in `| head`, ends
//! the command quietly), times as RFC 3339 UTC in text and as Unix seconds in JSON.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lanyard_daemon::fs::{DirMode, FsError, PrivateDir};
use lanyard_daemon::outln;
use lanyard_proto::WORKLOAD_SECURITY_HEADER;
use lanyard_proto::agent_local::HealthRequest;
use lanyard_proto::agent_local::local_service_client::LocalServiceClient;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{X509svid, X509svidRequest, X509svidResponse};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::config::{DEFAULT_SOCKET_PATH, RunArgs};

#[derive(Debug, Parser)]
#[command(
    name = "lanyard-agent",
    version,
    about = "Lanyard node agent: serves SVIDs through the SPIFFE Workload API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Check the configuration (and data_dir) without starting: one line and exit 0, or
    /// the error and exit 78.
    Validate(RunArgs),
    /// Talk to the Workload API like a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Check that the agent is ready; if not, say why and exit 1.
    Healthcheck(SocketArgs),
}

#[derive(Debug, Args, Clone)]
pub struct SocketArgs {
    /// The Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET, else /run/lanyard/agent/api.sock].
    #[arg(long)]
    pub socket_path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs once.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Print every X509-SVID update until interrupted.
    Watch(SocketArgs),
    /// Show the selectors the agent attests for this process (or for process --pid of
    /// your own user; root may name any), and the SPIFFE IDs they earn.
    DebugSelectors {
        #[command(flatten)]
        socket: SocketArgs,
        /// Another process of yours to look at.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        pid: Option<i32>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Fetch this process's X509-SVIDs and bundle.
    X509 {
        #[command(flatten)]
        socket: SocketArgs,
        /// Write svid.N.pem, svid.N.key (0600) and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// A client command's failure: one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Address(String),
    #[error("cannot reach the agent at {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("the agent answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the agent closed the stream without an answer")]
    NoAnswer,
    #[error("the agent at {path} is not ready: {}", .reasons.join("; "))]
    NotReady { path: PathBuf, reasons: Vec<String> },
    #[error("cannot write the SVID files: {0}")]
    Write(#[from] FsError),
    #[error("the agent sent an unusable certificate: {0}")]
    Certificate(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The socket to use: the flag, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
fn socket_path(args: &SocketArgs) -> Result<PathBuf, ClientError> {
    let raw = args
        .socket_path
        .clone()
        .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.to_string());
    lanyard_proto::endpoint::socket_path_from_uri(&raw).map_err(ClientError::Address)
}

async fn connect(args: &SocketArgs) -> Result<(PathBuf, Channel), ClientError> {
    let path = socket_path(args)?;
    let channel = lanyard_daemon::uds::channel(&path)
        .await
        .map_err(|e| ClientError::Connect {
            path: path.clone(),
            reason: std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
        })?;
    Ok((path, channel))
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        WORKLOAD_SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

async fn first_x509(channel: Channel) -> Result<X509svidResponse, ClientError> {
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?.ok_or(ClientError::NoAnswer)
}

fn describe(svid: &X509svid) -> Result<(String, String, i64), ClientError> {
    let certs = lanyard_proto::svid::split_der_chain(&svid.x509_svid)
        .map_err(|e| ClientError::Certificate(e.to_string()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| ClientError::Certificate("empty chain".into()))?;
    let info = lanyard_proto::svid::check_leaf(leaf, None)
        .map_err(|e| ClientError::Certificate(e.to_string()))?;
    Ok((info.spiffe_id.to_string(), info.serial_hex, info.not_after))
}

fn pem_concat(label: &str, der_concat: &[u8]) -> Result<String, ClientError> {
    let certs = lanyard_proto::svid::split_der_chain(der_concat)
        .map_err(|e| ClientError::Certificate(e.to_string()))?;
    Ok(lanyard_daemon::output::pem_all(label, certs))
}

/// Opens the directory `--write` names: created 0700 if missing; an existing one must
/// be the caller's own and not writable by group or others (nor a symlink), and so must
/// its parents be safe from renames by others (see `PrivateDir`).
fn output_dir(dir: &Path) -> Result<PrivateDir, FsError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| FsError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match nix::unistd::mkdir(dir, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        // Refused after all (a parent others can change): leave nothing behind.
        Ok(()) => PrivateDir::open(dir, DirMode::Private).inspect_err(|_| {
            let _ = std::fs::remove_dir(dir);
        }),
        Err(nix::errno::Errno::EEXIST) => PrivateDir::open(dir, DirMode::Searchable),
        Err(e) => Err(FsError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Writes each SVID, its key (0600) and bundle into `dir` (see [`output_dir`]); every
/// file is written through the directory's descriptor as an exclusive temporary file
/// renamed into place, so a link planted at a name is replaced, never followed.
fn write_files(dir: &Path, response: &X509svidResponse) -> Result<(), ClientError> {
    let dir = output_dir(dir)?;
    for (i, svid) in response.svids.iter().enumerate() {
        dir.write_atomic(
            &format!("svid.{i}.pem"),
            pem_concat("CERTIFICATE", &svid.x509_svid)?.as_bytes(),
        )?;
        let key = Zeroizing::new(lanyard_daemon::output::pem(
            "PRIVATE KEY",
            &svid.x509_svid_key,
        ));
        dir.write_atomic(&format!("svid.{i}.key"), key.as_bytes())?;
        dir.write_atomic(
            &format!("bundle.{i}.pem"),
            pem_concat("CERTIFICATE", &svid.bundle)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Runs a client subcommand.
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Run(_) | Command::Validate(_) => Ok(()),
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 {
            socket,
            write,
            output,
        })) => {
            let (_, channel) = connect(&socket).await?;
            let started = std::time::Instant::now();
            let response = first_x509(channel).await?;
            let elapsed = started.elapsed();
            let described = response
                .svids
                .iter()
                .map(describe)
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(dir) = &write {
                write_files(dir, &response)?;
            }
            match output {
                Output::Json => outln!(
                    "{}",
                    serde_json::json!({ "svids": described.iter().zip(&response.svids).map(|((id, serial, not_after), s)| serde_json::json!({
                        "spiffe_id": id, "serial": serial, "not_after": not_after, "hint": s.hint,
                    })).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    outln!(
                        "Received {} svid after {:.3}ms",
                        response.svids.len(),
                        elapsed.as_secs_f64() * 1000.0
                    );
                    for (i, (id, serial, not_after)) in described.iter().enumerate() {
                        outln!(
                            "\nSPIFFE ID        : {id}\nSerial           : {serial}\nValid until      : {}",
                            lanyard_daemon::output::rfc3339(*not_after)
                        );
                        if !response.svids[i].hint.is_empty() {
                            outln!("Hint             : {}", response.svids[i].hint);
                        }
                    }
                    if let Some(dir) = &write {
                        outln!(
                            "\nWrote svid.N.pem, svid.N.key and bundle.N.pem to {}",
                            dir.display()
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Api(ApiCommand::Watch(socket)) => {
            let (_, channel) = connect(&socket).await?;
            let mut client = SpiffeWorkloadApiClient::new(channel);
            let mut stream = client
                .fetch_x509svid(with_header(X509svidRequest {}))
                .await?
                .into_inner();
            while let Some(update) = stream.message().await? {
                let ids = update
                    .svids
                    .iter()
                    .map(describe)
                    .collect::<Result<Vec<_>, _>>()?;
                let line: Vec<String> = ids
                    .iter()
                    .map(|(id, serial, _)| format!("{id} (serial {serial})"))
                    .collect();
                outln!("Received {} svid: {}", ids.len(), line.join(", "));
            }
            Err(ClientError::NoAnswer)
        }
        Command::Api(ApiCommand::DebugSelectors {
            socket,
            pid,
            output,
        }) => debug_selectors(&socket, pid, output).await,
        Command::Healthcheck(socket) => {
            let (path, channel) = connect(&socket).await?;
            let health = LocalServiceClient::new(channel)
                .health(HealthRequest {})
                .await?
                .into_inner();
            if !health.ready {
                return Err(ClientError::NotReady {
                    path,
                    reasons: health.reasons,
                });
            }
            outln!("Agent is healthy (socket {}).", path.display());
            Ok(())
        }
    }
}

/// `api debug-selectors`: asks the agent's local service what it attests for a process.
async fn debug_selectors(
    socket: &SocketArgs,
    pid: Option<i32>,
    output: Output,
) -> Result<(), ClientError> {
    let (_, channel) = connect(socket).await?;
    let answer = LocalServiceClient::new(channel)
        .debug_selectors(lanyard_proto::agent_local::DebugSelectorsRequest {
            pid: pid.unwrap_or(0),
        })
        .await?
        .into_inner();
    match output {
        Output::Json => outln!(
            "{}",
            serde_json::json!({
                "pid": answer.pid,
                "uid": answer.uid,
                "gid": answer.gid,
                "selectors": answer.selectors.iter().map(|s| serde_json::json!({
                    "selector": s.selector, "conditional": s.conditional,
                })).collect::<Vec<_>>(),
                "identities": answer.identities.iter().map(|i| serde_json::json!({
                    "spiffe_id": i.spiffe_id, "entry_id": i.entry_id,
                    "conditional": i.conditional, "svid_ready": i.svid_ready,
                })).collect::<Vec<_>>(),
                "binary_withheld": answer.binary_withheld,
            })
        ),
        Output::Text => {
            outln!(
                "Process {} (uid {}, gid {})",
                answer.pid,
                answer.uid,
                answer.gid
            );
            outln!("\nSelectors:");
            for s in &answer.selectors {
                let note = if s.conditional { "  (binary*)" } else { "" };
                outln!("  {}{note}", s.selector);
            }
            if answer.identities.is_empty() {
                outln!(
                    "\nNo registration entry matches these selectors: this process gets no identity."
                );
            } else {
                outln!("\nSPIFFE IDs these selectors earn:");
                for i in &answer.identities {
                    let mut notes = Vec::new();
                    if i.conditional {
                        notes.push("binary*");
                    }
                    if !i.svid_ready {
                        notes.push("SVID not signed yet");
                    }
                    let notes = if notes.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes.join(", "))
                    };
                    outln!("  {} (entry {}){notes}", i.spiffe_id, i.entry_id);
                }
            }
            if answer.selectors.iter().any(|s| s.conditional) {
                outln!(
                    "\n* unix:path and unix:sha256 count only on a connection that the process made itself, holds alone, and still runs the same program on."
                );
            }
            if !answer.binary_withheld.is_empty() {
                outln!(
                    "  On this connection they do not: {}.",
                    answer.binary_withheld
                );
            }
        }
    }
    Ok(())
}
