//! `lanyard-agent run`: take the data dir's and the socket's instance locks, attest (or
//! reload the stored identity), start the sync worker, serve the Workload API and
//! readiness, stop on a signal. `lanyard-agent validate` checks what `run` would check
//! before it starts, and nothing more.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lanyard_attestors::workload::{UnixAttestor, UnixAttestorConfig};
use lanyard_daemon::fs::{DirMode, FsError, PrivateDir};
use lanyard_daemon::lock::{InstanceLock, LockError};
use lanyard_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::attest::AttestError;
use crate::client::{GrpcServer, TlsSetupError};
use crate::config::{AgentConfig, JoinTokenSource};
use crate::health::{Health, Inputs};
use crate::identity::{IdentityError, IdentityFiles};
use crate::local_api::LocalApi;
use crate::peer::{InFlightLayer, Registry};
use crate::rotation::{Clock, SystemClock};
use crate::sync::{SyncError, SyncWorker};
use crate::workload_api::WorkloadApi;
use crate::workload_api::caller::Attester;

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
    #[error(transparent)]
    Attest(Box<AttestError>),
    #[error("Workload API socket {path}: {reason}")]
    Socket {
        path: PathBuf,
        reason: SocketProblem,
    },
    #[error("health bind_address {address}: {source}")]
    HealthBind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("Workload API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("an agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<AttestError> for RunError {
    fn from(e: AttestError) -> Self {
        RunError::Attest(Box::new(e))
    }
}

/// What is wrong with the Workload API socket path.
#[derive(Debug, thiserror::Error)]
pub enum SocketProblem {
    #[error("not a socket file path")]
    NotAFilePath,
    #[error(transparent)]
    Dir(FsError),
    #[error(transparent)]
    Bind(std::io::Error),
}

impl RunError {
    /// The exit status: [`lanyard_daemon::EXIT_CONFIG`] when restarting the agent as it
    /// is cannot help (systemd's `RestartPreventExitStatus=78` stops the loop), else 1.
    pub fn exit_code(&self) -> u8 {
        let config = match self {
            RunError::DataDir(_) | RunError::Locked(_) | RunError::HealthBind { .. } => true,
            RunError::Socket { reason, .. } => !matches!(reason, SocketProblem::Bind(_)),
            RunError::Attest(e) => e.is_config(),
            RunError::Sync(SyncError::Rejected(_)) => true,
            RunError::Identity(_)
            | RunError::Sync(_)
            | RunError::Tls(_)
            | RunError::Serve(_)
            | RunError::Task(_) => false,
        };
        if config {
            lanyard_daemon::EXIT_CONFIG
        } else {
            1
        }
    }
}

/// The Workload API socket's directory and instance lock. Taken before attesting, so a
/// second agent on the same socket is refused before it spends a join token, and held
/// for the life of the agent, so nobody unlinks a live socket.
#[derive(Debug)]
struct SocketLock {
    path: PathBuf,
    name: String,
    dir: PrivateDir,
    lock: InstanceLock,
}

impl SocketLock {
    /// Its directory must be the agent's own and not writable by others.
    fn acquire(path: &Path) -> Result<Self, RunError> {
        let err = |reason| RunError::Socket {
            path: path.to_path_buf(),
            reason,
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            return Err(err(SocketProblem::NotAFilePath));
        };
        let dir = PrivateDir::open_or_create(parent, DirMode::Searchable)
            .map_err(|e| err(SocketProblem::Dir(e)))?;
        let lock = InstanceLock::acquire(
            &dir,
            &lanyard_daemon::uds::lock_name(name),
            format!("Workload API socket {}", path.display()),
        )?;
        Ok(SocketLock {
            path: path.to_path_buf(),
            name: name.to_string(),
            dir,
            lock,
        })
    }

    /// Binds the socket (replacing a stale one: the lock proves nobody serves on it);
    /// anyone may connect, identity comes from attestation.
    fn bind(self) -> Result<(UnixListener, SocketDir, InstanceLock), RunError> {
        let listener = lanyard_daemon::uds::bind(&self.dir, &self.name, 0o777, &self.lock)
            .map_err(|e| RunError::Socket {
                path: self.path.clone(),
                reason: SocketProblem::Bind(e),
            })?;
        Ok((
            listener,
            SocketDir {
                dir: self.dir,
                name: self.name,
            },
            self.lock,
        ))
    }
}

/// The socket's directory, to remove the socket on a clean stop.
#[derive(Debug)]
struct SocketDir {
    dir: PrivateDir,
    name: String,
}

impl SocketDir {
    fn remove_socket(&self) {
        let _ = self.dir.remove(&self.name);
    }
}

/// What `validate` found, for its one line.
#[derive(Debug)]
pub struct Validated {
    pub summary: String,
}

/// Checks the configuration and the data directory as `run` would before starting,
/// without creating, locking or contacting anything.
pub fn validate(config: &AgentConfig) -> Result<Validated, RunError> {
    let identity = if config.data_dir.exists() {
        let dir = Arc::new(PrivateDir::open(&config.data_dir, DirMode::Private)?);
        IdentityFiles::new(dir).exists()?
    } else {
        false
    };
    if let Some(parent) = config.socket_path.parent().filter(|p| p.exists()) {
        PrivateDir::open(parent, DirMode::Searchable).map_err(|e| RunError::Socket {
            path: config.socket_path.clone(),
            reason: SocketProblem::Dir(e),
        })?;
    }
    let how = if identity {
        "a stored identity".to_string()
    } else {
        config.join_token.token().map_err(AttestError::from)?;
        match &config.join_token {
            JoinTokenSource::File { path, .. } => {
                format!("the join token in {}", path.display())
            }
            JoinTokenSource::Environment(_) | JoinTokenSource::None => {
                "the join token in LANYARD_JOIN_TOKEN".to_string()
            }
        }
    };
    Ok(Validated {
        summary: format!(
            "the configuration is valid: trust domain {}, server {}, attesting with {how}, Workload API at unix://{}",
            config.trust_domain,
            config.server_address,
            config.socket_path.display()
        ),
    })
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
    let socket = SocketLock::acquire(&config.socket_path)?;
    let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
    let health = Health::new();
    let health_http = match config.health.bind_address {
        Some(address) => {
            let (bound, task) =
                lanyard_daemon::health::serve_http(address, health.subscribe(), shutdown.clone())
                    .await
                    .map_err(|source| RunError::HealthBind { address, source })?;
            tracing::info!(address = %bound, "serving /live and /ready over HTTP");
            Some(task)
        }
        None => None,
    };
    health.not_ready(format!(
        "attesting to the server at {}",
        config.server_address
    ));
    let files = IdentityFiles::new(Arc::clone(&data_dir));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    tokio::pin!(stop);
    let (agent, bundle) = tokio::select! {
        attested = crate::attest::identity(&config, &files, &*clock) => attested?,
        () = &mut stop => {
            trigger.trigger();
            return Ok(());
        }
    };
    let agent_id = agent.spiffe_id.clone();
    let server = GrpcServer::new(
        &config.trust_domain,
        &config.server_address,
        &agent,
        &bundle,
    )?;
    let (worker, cache, sync_status) =
        SyncWorker::new(server, files, agent, bundle, Arc::clone(&clock));
    let readiness = health.subscribe();
    let health_task = health.monitor(
        Inputs {
            status: sync_status,
            snapshots: cache.clone(),
            server_address: config.server_address.clone(),
            unreachable_grace: config.health.unreachable_grace.into(),
        },
        Arc::clone(&clock),
        shutdown.clone(),
    );
    // The Workload API's own stop flag, flipped with `trigger`.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let attestor = Arc::new(UnixAttestor::new(UnixAttestorConfig::default()));
    let attester = Arc::new(Attester::new(attestor));
    let limits = config
        .workload_api
        .clone()
        .within_fd_limit(crate::peer::raise_fd_limit());
    tracing::info!(
        pidfd = %lanyard_attestors::workload::pidfd_support(),
        max_connections = limits.max_connections,
        connections_per_uid = limits.connections_per_uid,
        streams_per_uid = limits.streams_per_uid,
        idle_timeout = ?limits.idle_timeout,
        "Workload API callers are pinned by pidfd"
    );
    let registry = Registry::new(limits);
    let api = WorkloadApi::new(
        config.trust_domain.clone(),
        cache.clone(),
        Arc::clone(&attester),
        Arc::clone(&registry),
        Arc::clone(&clock),
        shutdown.clone(),
    );
    let local = LocalApi::new(attester, cache, readiness.clone());
    let (listener, socket_dir, _socket_lock) = socket.bind()?;
    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    let incoming = crate::peer::incoming(
        listener,
        registry,
        UnixAttestorConfig::default().proc_root,
        shutdown.clone(),
    );
    let mut server_stop = shutdown_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(InFlightLayer)
            .add_service(api.into_server())
            .add_service(local.into_server())
            .add_service(health_svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = server_stop.wait_for(|s| *s).await;
            }),
    );
    lanyard_daemon::health::mirror_to_grpc(
        readiness.clone(),
        health_reporter,
        vec![<SpiffeWorkloadApiServer<WorkloadApi> as tonic::server::NamedService>::NAME],
    );
    tracing::info!(spiffe_id = %agent_id, socket = %format!("unix://{}", config.socket_path.display()),
        "lanyard-agent is serving the Workload API");
    lanyard_daemon::notify::ready(&format!(
        "serving the Workload API at unix://{}",
        config.socket_path.display()
    ));
    let mut worker_task = tokio::spawn(worker.run(shutdown.clone()));

    let (outcome, worker_done) = tokio::select! {
        () = &mut stop => (Ok(()), false),
        done = &mut worker_task => (match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::from(e)),
            Err(e) => Err(RunError::Task(e)),
        }, true),
    };
    tracing::info!("shutting down");
    lanyard_daemon::notify::stopping();
    trigger.trigger();
    let _ = shutdown_tx.send(true);
    if !worker_done {
        let _ = worker_task.await;
    }
    let served = server.await?;
    socket_dir.remove_socket();
    let _ = health_task.await;
    if let Some(task) = health_http {
        let _ = task.await;
    }
    outcome?;
    served?;
    Ok(())
}
