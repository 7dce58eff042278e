//! `lanyard-server run`: start the CA, the datastore and both APIs; stop on a signal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lanyard_daemon::fs::{DirMode, FsError, PrivateDir};
use lanyard_daemon::lock::{InstanceLock, LockError};
use lanyard_proto::admin::admin_service_server::AdminServiceServer;
use lanyard_proto::agent::agent_service_server::AgentServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::{admin, agent};
use crate::ca::Ca;
use crate::config::ServerConfig;
use crate::datastore::SqliteStore;
use crate::state::State;

/// Lifetime of the server's own TLS certificate; rotated at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often all entries are reread as a safety net behind the push path.
const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("data_dir: {0}")]
    DataDir(#[from] FsError),
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("admin socket {path}: {reason}")]
    AdminSocket {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Store(#[from] crate::datastore::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the admin socket in a directory only the server's user can enter, holding the
/// socket's lock so a second server cannot unlink a live socket.
fn bind_admin_socket(path: &Path) -> Result<(UnixListener, InstanceLock), RunError> {
    let err = |reason: String| RunError::AdminSocket {
        path: path.to_path_buf(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| err("the path has no file name".into()))?;
    let dir = PrivateDir::open_or_create(dir, DirMode::Private).map_err(|e| err(e.to_string()))?;
    let lock = InstanceLock::acquire(
        &dir,
        &lanyard_daemon::uds::lock_name(name),
        format!("admin socket {}", path.display()),
    )?;
    let listener =
        lanyard_daemon::uds::bind(&dir, name, 0o600, &lock).map_err(|e| err(e.to_string()))?;
    Ok((listener, lock))
}

/// A running server, for tests and for `main`.
#[derive(Debug)]
pub struct Running {
    pub state: State,
    pub agent_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Held for as long as the server runs: one server per data_dir and admin socket.
    _locks: [InstanceLock; 2],
    tasks: tokio::task::JoinSet<Result<(), RunError>>,
}

impl Running {
    /// Stops accepting, ends open streams and waits for the servers to finish.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        let _ = self.shutdown.send(true);
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until a server task fails (it should not) and reports why; `None` when
    /// every task ended cleanly.
    pub async fn failed(&mut self) -> Option<RunError> {
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Some(e);
            }
        }
        None
    }
}

/// Starts everything; returns once both APIs are listening.
pub async fn start(config: &ServerConfig) -> Result<Running, RunError> {
    lanyard_daemon::fs::set_private_umask();
    let data_dir = PrivateDir::open_or_create(&config.data_dir, DirMode::Private)?;
    let data_lock = InstanceLock::acquire(
        &data_dir,
        "lock",
        format!("data_dir {}", config.data_dir.display()),
    )?;
    data_dir.ensure_private_file("datastore.sqlite3")?;
    let store = SqliteStore::open(&data_dir.join("datastore.sqlite3")).await?;
    let (ca, created) = Ca::load_or_create(&data_dir, &config.trust_domain, config.ca_ttl.0)?;
    if created {
        tracing::info!(trust_domain = %config.trust_domain, not_after = ca.not_after(), "created a new CA");
    } else {
        tracing::info!(trust_domain = %config.trust_domain, not_after = ca.not_after(), "loaded the CA");
    }
    let state = State::new(
        Arc::new(store),
        Arc::new(ca),
        config.default_x509_svid_ttl.0,
    )
    .await?;

    let (tls, tls_not_after) =
        crate::tls::server_config(&state.ca, &state.bundle().x509_authorities, SERVER_SVID_TTL)?;
    let tls = Arc::new(ArcSwap::from_pointee(tls));
    let listener = TcpListener::bind(config.bind_address)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.bind_address,
            source,
        })?;
    let agent_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.bind_address,
        source,
    })?;
    let (admin_listener, admin_lock) = bind_admin_socket(&config.admin_socket)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let agent_svc = AgentServiceServer::new(agent::AgentApi::new(
        state.clone(),
        config.default_x509_svid_ttl.0,
        shutdown_rx.clone(),
    ));
    let incoming = crate::tls::incoming(listener, tls.clone());
    tasks.spawn({
        let rx = shutdown_rx.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(agent_svc)
                .serve_with_incoming_shutdown(incoming, stopped(rx))
                .await?;
            Ok(())
        }
    });

    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AdminServiceServer<admin::Admin>>()
        .await;
    let admin_svc = AdminServiceServer::with_interceptor(
        admin::Admin::new(state.clone()),
        admin::authorize_peer,
    );
    let admin_incoming = UnixListenerStream::new(admin_listener);
    tasks.spawn({
        let rx = shutdown_rx.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(admin_svc)
                .add_service(health_svc)
                .serve_with_incoming_shutdown(admin_incoming, stopped(rx))
                .await?;
            Ok(())
        }
    });

    // Background upkeep: the server's TLS certificate and the entry safety-net resync.
    tasks.spawn({
        let state = state.clone();
        let rx = shutdown_rx.clone();
        async move {
            let mut rotate_at = rotation_instant(tls_not_after);
            let mut resync = tokio::time::interval(RESYNC_INTERVAL);
            loop {
                tokio::select! {
                    () = stopped(rx.clone()) => return Ok(()),
                    _ = resync.tick() => {
                        if let Err(e) = state.resync_entries().await {
                            tracing::warn!(error = %e, "entry resync failed");
                        }
                    }
                    () = tokio::time::sleep_until(rotate_at) => {
                        match crate::tls::server_config(&state.ca, &state.bundle().x509_authorities, SERVER_SVID_TTL) {
                            Ok((config, not_after)) => {
                                tls.store(Arc::new(config));
                                rotate_at = rotation_instant(not_after);
                                tracing::info!(not_after, "rotated the server's TLS certificate");
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "rotating the server's TLS certificate failed");
                                rotate_at = tokio::time::Instant::now() + Duration::from_secs(30);
                            }
                        }
                    }
                }
            }
        }
    });

    tracing::info!(agent_api = %agent_addr, admin_socket = %config.admin_socket.display(),
        trust_domain = %config.trust_domain, "lanyard-server is serving");
    Ok(Running {
        state,
        agent_addr,
        shutdown,
        _locks: [data_lock, admin_lock],
        tasks,
    })
}

/// Resolves once shutdown is signalled.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Half of the remaining lifetime from now.
fn rotation_instant(not_after: i64) -> tokio::time::Instant {
    let remaining = (not_after - crate::ca::now_unix()).max(2) as u64;
    tokio::time::Instant::now() + Duration::from_secs(remaining / 2)
}
