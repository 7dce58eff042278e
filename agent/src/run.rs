//! `lanyard-agent run`: attest (or reload the stored identity), start the sync worker,
//! serve the Workload API, stop on a signal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lanyard_attestors::node::join_token;
use lanyard_attestors::workload::{UnixAttestor, UnixAttestorConfig};
use lanyard_daemon::fs::{DirMode, FsError, PrivateDir};
use lanyard_daemon::lock::{InstanceLock, LockError};
use lanyard_proto::agent::AttestAgentRequest;
use lanyard_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Code;

use crate::config::{AgentConfig, Bootstrap};
use crate::identity::{AgentSvid, IdentityError, IdentityFiles, key_and_csr, read_pem_bundle};
use crate::rotation::{Clock, SystemClock};
use crate::sync::{SyncError, SyncWorker};
use crate::tls::SpiffeServerVerifier;
use crate::workload_api::WorkloadApi;

/// How long the agent keeps trying to reach the server for its first attestation.
const ATTEST_PATIENCE: Duration = Duration::from_secs(60);

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("data_dir: {0}")]
    DataDir(#[from] FsError),
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "this agent has no stored identity; start it with --join-token (or LANYARD_JOIN_TOKEN)"
    )]
    NeedJoinToken,
    #[error("the stored agent SVID expired; start the agent with a new --join-token")]
    Expired,
    #[error("the server refused attestation: {0}")]
    AttestationRefused(String),
    #[error("cannot reach the server at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the server's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("Workload API socket {path}: {reason}")]
    Socket {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("Workload API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Attests with a join token; returns the new identity and bundle.
async fn attest(config: &AgentConfig, token: &str) -> Result<(AgentSvid, Vec<Vec<u8>>), RunError> {
    let server_id = lanyard_proto::server_id(&config.trust_domain);
    let (key, csr) = key_and_csr(None).map_err(|e| RunError::BadAnswer(e.to_string()))?;
    let request = AttestAgentRequest {
        method: join_token::METHOD.into(),
        payload: join_token::evidence(token),
        csr,
    };
    let deadline = tokio::time::Instant::now() + ATTEST_PATIENCE;
    let mut failures = 0;
    let response = loop {
        let verifier = match &config.bootstrap {
            Bootstrap::Bundle(path) => {
                SpiffeServerVerifier::new(&read_pem_bundle(path)?, server_id.clone())?
            }
            Bootstrap::Insecure => {
                tracing::warn!(
                    "INSECURE BOOTSTRAP: trusting whatever answers at {} for attestation; use trust_bundle_path outside local trials",
                    config.server_address
                );
                SpiffeServerVerifier::insecure(server_id.clone())
            }
        };
        let mut client = crate::client::connect(&config.server_address, verifier, None)?;
        match client.attest_agent(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::Unknown)
                    && tokio::time::Instant::now() < deadline =>
            {
                failures += 1;
                let delay = crate::rotation::retry_delay(failures.min(3));
                tracing::warn!(error = %status.message(), retry_in = ?delay, "server not reachable yet");
                tokio::time::sleep(delay).await;
            }
            Err(status) if status.code() == Code::Unavailable => {
                return Err(RunError::Unreachable {
                    address: config.server_address.clone(),
                    reason: status.message().to_string(),
                });
            }
            Err(status) => return Err(RunError::AttestationRefused(status.message().to_string())),
        }
    };
    let bundle = response
        .bundle
        .map(|b| b.x509_authorities)
        .unwrap_or_default();
    if bundle.is_empty() {
        return Err(RunError::BadAnswer("no trust bundle".into()));
    }
    let leaf = response
        .x509_svid_chain
        .first()
        .ok_or_else(|| RunError::BadAnswer("no agent SVID".into()))?;
    let info = lanyard_proto::svid::check_leaf(leaf, None)
        .map_err(|e| RunError::BadAnswer(e.to_string()))?;
    if info.spiffe_id.as_str() != response.spiffe_id
        || !info.spiffe_id.is_member_of(&config.trust_domain)
    {
        return Err(RunError::BadAnswer(format!(
            "agent SVID names {}",
            info.spiffe_id
        )));
    }
    tracing::info!(spiffe_id = %info.spiffe_id, "attested to the server");
    Ok((
        AgentSvid {
            spiffe_id: info.spiffe_id,
            chain: response.x509_svid_chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        },
        bundle,
    ))
}

/// Loads the stored identity, or attests with the join token.
async fn identity(
    config: &AgentConfig,
    files: &IdentityFiles,
    clock: &dyn Clock,
) -> Result<(AgentSvid, Vec<Vec<u8>>), RunError> {
    match files.load()? {
        Some((svid, bundle)) if svid.not_after * 1000 > clock.now_ms() => {
            tracing::info!(spiffe_id = %svid.spiffe_id, "loaded the stored agent SVID");
            return Ok((svid, bundle));
        }
        Some(_) if config.join_token.is_none() => return Err(RunError::Expired),
        _ => {}
    }
    let token = config
        .join_token
        .as_deref()
        .ok_or(RunError::NeedJoinToken)?;
    let (svid, bundle) = attest(config, token).await?;
    files.store(&svid, &bundle)?;
    Ok((svid, bundle))
}

/// Binds the Workload API socket; anyone may connect (identity comes from attestation).
/// Its directory must be the agent's own and not writable by others; the socket's lock
/// keeps a second agent from unlinking a live socket.
fn bind_socket(path: &Path) -> Result<(UnixListener, PrivateDir, InstanceLock), RunError> {
    let err = |reason: String| RunError::Socket {
        path: path.to_path_buf(),
        reason,
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(err("not a socket file path".into()));
    };
    let dir =
        PrivateDir::open_or_create(dir, DirMode::Searchable).map_err(|e| err(e.to_string()))?;
    let lock = InstanceLock::acquire(
        &dir,
        &lanyard_daemon::uds::lock_name(name),
        format!("Workload API socket {}", path.display()),
    )?;
    let listener =
        lanyard_daemon::uds::bind(&dir, name, 0o777, &lock).map_err(|e| err(e.to_string()))?;
    Ok((listener, dir, lock))
}

/// Runs the agent until `stop` resolves.
pub async fn run(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    lanyard_daemon::fs::set_private_umask();
    let data_dir = Arc::new(PrivateDir::open_or_create(
        &config.data_dir,
        DirMode::Private,
    )?);
    let _data_lock = InstanceLock::acquire(
        &data_dir,
        "lock",
        format!("data_dir {}", config.data_dir.display()),
    )?;
    let files = IdentityFiles::new(Arc::clone(&data_dir));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (agent, bundle) = identity(&config, &files, &*clock).await?;
    let agent_id = agent.spiffe_id.clone();
    let (worker, cache) = SyncWorker::new(
        config.trust_domain.clone(),
        config.server_address.clone(),
        files,
        agent,
        bundle,
        clock,
    )?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let attestor = Arc::new(UnixAttestor::new(UnixAttestorConfig::default()));
    let api = WorkloadApi::new(
        config.trust_domain.clone(),
        cache,
        attestor,
        shutdown_rx.clone(),
    );
    let (listener, socket_dir, _socket_lock) = bind_socket(&config.socket_path)?;
    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    let mut server_stop = shutdown_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(api))
            .add_service(health_svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = server_stop.wait_for(|s| *s).await;
            }),
    );
    tracing::info!(spiffe_id = %agent_id, socket = %format!("unix://{}", config.socket_path.display()),
        "lanyard-agent is serving the Workload API");
    let mut worker_task = tokio::spawn(worker.run(shutdown_rx));

    let (outcome, worker_done) = tokio::select! {
        () = stop => (Ok(()), false),
        done = &mut worker_task => (match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::from(e)),
            Err(e) => Err(RunError::BadAnswer(format!("sync worker died: {e}"))),
        }, true),
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    if !worker_done {
        let _ = worker_task.await;
    }
    let served = server
        .await
        .map_err(|e| RunError::BadAnswer(e.to_string()))?;
    if let Some(name) = config.socket_path.file_name().and_then(|n| n.to_str()) {
        let _ = socket_dir.remove(name);
    }
    outcome?;
    served?;
    Ok(())
}
