//! `lanyard-server run`: start the CA, the datastore and both APIs; stop on a signal.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
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
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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

fn ensure_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Binds the admin socket in a directory only the server's user can enter.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, RunError> {
    let err = |reason: String| RunError::AdminSocket {
        path: path.to_path_buf(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(e.to_string()))?;
    }
    let mode = std::fs::metadata(dir)
        .map_err(|e| err(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "its directory {} has mode {:o}; it must be 0700 so only the server's user can reach the admin API",
            dir.display(),
            mode & 0o777
        )));
    }
    lanyard_proto::uds::bind(path, 0o600).map_err(|e| err(e.to_string()))
}

/// A running server, for tests and for `main`.
#[derive(Debug)]
pub struct Running {
    pub state: State,
    pub agent_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
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
    ensure_private_dir(&config.data_dir).map_err(|source| RunError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = SqliteStore::open(&config.data_dir.join("datastore.sqlite3")).await?;
    let (ca, created) =
        Ca::load_or_create(&config.data_dir, &config.trust_domain, config.ca_ttl.0)?;
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
    let admin_listener = bind_admin_socket(&config.admin_socket)?;

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
