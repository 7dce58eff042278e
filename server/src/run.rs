//! `lanyard-server run`: take the locks, open the datastore and the CA, serve both APIs
//! (and `/live`, `/ready` if configured), keep the server's upkeep going, stop on a
//! signal. Also `validate`: the same checks without starting anything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lanyard_daemon::fs::{DirMode, FsError, PrivateDir};
use lanyard_daemon::health::Readiness;
use lanyard_daemon::lock::{InstanceLock, LockError};
use lanyard_daemon::shutdown::{Shutdown, Trigger};
use lanyard_proto::admin::admin_service_server::AdminServiceServer;
use lanyard_proto::agent::agent_service_server::AgentServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::server::NamedService;

use crate::api::{admin, agent};
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::config::ServerConfig;
use crate::datastore::SqliteStore;
use crate::state::{Lifetimes, State};

/// Lifetime of the server's own TLS certificate; rotated at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often what changed in the datastore is reread, as a safety net behind the push
/// path for several servers sharing a datastore.
const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How often expired unused join tokens are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// How often readiness is re-evaluated (with a small datastore write).
const PROBE_INTERVAL: Duration = Duration::from_secs(3);
/// A datastore write slower than this counts as failing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams one agent connection may have open at once (an agent uses three).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// How long a shutdown waits for open connections to finish; a peer that never speaks
/// HTTP/2 on its connection must not hold the server up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const DATASTORE: &str = "datastore.sqlite3";

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("data_dir: {0}")]
    DataDir(#[source] FsError),
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("admin socket {path}: the path has no file name")]
    AdminSocketName { path: std::path::PathBuf },
    #[error("admin socket {path}: {source}")]
    AdminSocketDir {
        path: std::path::PathBuf,
        source: FsError,
    },
    #[error("admin socket {path}: {source}")]
    AdminSocketBind {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("health endpoint: cannot listen on {addr}: {source}")]
    HealthBind {
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

impl RunError {
    /// Whether the operator must change something before a restart can help (a path that
    /// is unsafe or unusable), so the daemon exits with `EXIT_CONFIG` and systemd does not
    /// restart it in a loop.
    pub fn is_config(&self) -> bool {
        match self {
            RunError::DataDir(e) => !matches!(e, FsError::Io { .. }),
            RunError::AdminSocketName { .. }
            | RunError::AdminSocketDir { .. }
            | RunError::AdminSocketBind { .. }
            | RunError::HealthBind { .. } => true,
            RunError::Locked(LockError::Fs(e)) | RunError::Ca(crate::ca::CaError::Fs(e)) => {
                !matches!(e, FsError::Io { .. })
            }
            RunError::Ca(crate::ca::CaError::BadKey(_) | crate::ca::CaError::BadCert { .. }) => {
                true
            }
            RunError::Locked(_)
            | RunError::Bind { .. }
            | RunError::Ca(_)
            | RunError::Store(_)
            | RunError::Tls(_)
            | RunError::Serve(_) => false,
        }
    }
}

/// The admin socket's directory and name.
fn admin_socket_parts(path: &Path) -> Result<(&Path, &str), RunError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name =
        path.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| RunError::AdminSocketName {
                path: path.to_path_buf(),
            })?;
    Ok((dir, name))
}

/// Takes the admin socket's lock in a directory only the server's user can enter, so a
/// second server cannot unlink a live socket.
fn lock_admin_socket(path: &Path) -> Result<(PrivateDir, InstanceLock), RunError> {
    let (dir, name) = admin_socket_parts(path)?;
    let dir = PrivateDir::open_or_create(dir, DirMode::Private).map_err(|source| {
        RunError::AdminSocketDir {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let lock = InstanceLock::acquire(
        &dir,
        &lanyard_daemon::uds::lock_name(name),
        format!("admin socket {}", path.display()),
    )?;
    Ok((dir, lock))
}

fn bind_admin_socket(
    path: &Path,
    dir: &PrivateDir,
    lock: &InstanceLock,
) -> Result<UnixListener, RunError> {
    let (_, name) = admin_socket_parts(path)?;
    lanyard_daemon::uds::bind(dir, name, 0o600, lock).map_err(|source| RunError::AdminSocketBind {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks a configuration without starting: the data_dir and the admin socket's
/// directory, where they exist, must be fit for use (owner, mode, parents, no symlinks).
pub fn validate(config: &ServerConfig) -> Result<(), RunError> {
    if std::fs::symlink_metadata(&config.data_dir).is_ok() {
        let dir =
            PrivateDir::open(&config.data_dir, DirMode::Private).map_err(RunError::DataDir)?;
        for name in ["ca.key", DATASTORE] {
            if dir.exists(name).map_err(RunError::DataDir)? {
                dir.ensure_private_file(name).map_err(RunError::DataDir)?;
            }
        }
    }
    let (admin_dir, _) = admin_socket_parts(&config.admin_socket)?;
    if std::fs::symlink_metadata(admin_dir).is_ok() {
        PrivateDir::open(admin_dir, DirMode::Private).map_err(|source| {
            RunError::AdminSocketDir {
                path: config.admin_socket.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// A running server, for tests and for `main`.
#[derive(Debug)]
pub struct Running {
    pub state: State,
    pub agent_addr: std::net::SocketAddr,
    pub health_addr: Option<std::net::SocketAddr>,
    pub readiness: watch::Receiver<Readiness>,
    trigger: Trigger,
    /// Held for as long as the server runs: one server per data_dir and admin socket.
    _locks: [InstanceLock; 2],
    tasks: tokio::task::JoinSet<Result<(), RunError>>,
}

impl Running {
    /// Stops accepting, ends open streams and waits (a few seconds at most) for the
    /// servers to finish.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        self.trigger.trigger();
        let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok(Err(e)) = done {
                    return Err(e);
                }
            }
            Ok(())
        })
        .await;
        match finished {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    "connections still open after the shutdown grace period; closing them"
                );
                self.tasks.abort_all();
                Ok(())
            }
        }
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

/// Why the server is not ready now.
async fn readiness_now(state: &State) -> Readiness {
    let mut reasons = Vec::new();
    if state.ca.is_expired() {
        reasons.push(format!(
            "the CA expired at {} and cannot sign; rotate it",
            lanyard_daemon::output::rfc3339(state.ca.not_after())
        ));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, state.probe_store()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("the datastore does not accept writes: {e}")),
        Err(_) => reasons.push(format!(
            "the datastore did not complete a write within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
    Readiness { reasons }
}

/// Starts everything with the system clock; returns once both APIs are listening.
pub async fn start(config: &ServerConfig) -> Result<Running, RunError> {
    start_with_clock(config, crate::clock::system()).await
}

/// Starts everything; time comes from `clock`.
pub async fn start_with_clock(
    config: &ServerConfig,
    clock: SharedClock,
) -> Result<Running, RunError> {
    lanyard_daemon::fs::set_private_umask();
    // Both locks first, so a second server on the same data_dir or admin socket is
    // refused before it touches anything.
    let (admin_dir, admin_lock) = lock_admin_socket(&config.admin_socket)?;
    let data_dir = PrivateDir::open_or_create(&config.data_dir, DirMode::Private)
        .map_err(RunError::DataDir)?;
    let data_lock = InstanceLock::acquire(
        &data_dir,
        "lock",
        format!("data_dir {}", config.data_dir.display()),
    )?;
    // SQLite opens its files by path: make sure each is a private regular file of ours
    // first (never a planted symlink); the umask keeps the ones it creates 0600.
    data_dir
        .ensure_private_file(DATASTORE)
        .map_err(RunError::DataDir)?;
    for companion in ["-wal", "-shm", "-journal"] {
        let name = format!("{DATASTORE}{companion}");
        if data_dir.exists(&name).map_err(RunError::DataDir)? {
            data_dir
                .ensure_private_file(&name)
                .map_err(RunError::DataDir)?;
        }
    }
    let store = SqliteStore::open(&data_dir.join(DATASTORE)).await?;
    let (ca, created) = Ca::load_or_create(
        &data_dir,
        &config.trust_domain,
        config.ca_ttl.0,
        clock.clone(),
    )?;
    let not_after = lanyard_daemon::output::rfc3339(ca.not_after());
    if created {
        tracing::info!(trust_domain = %config.trust_domain, %not_after, "created a new CA");
    } else {
        tracing::info!(trust_domain = %config.trust_domain, %not_after, "loaded the CA");
    }
    let state = State::new(
        Arc::new(store),
        Arc::new(ca),
        clock,
        Lifetimes {
            default_svid_ttl: config.default_x509_svid_ttl.0,
            agent_ttl: config.agent_ttl.0,
        },
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
    let admin_listener = bind_admin_socket(&config.admin_socket, &admin_dir, &admin_lock)?;

    let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
    let (readiness_tx, readiness) = watch::channel(readiness_now(&state).await);
    let mut tasks = tokio::task::JoinSet::new();

    let agent_svc = AgentServiceServer::new(agent::AgentApi::new(state.clone(), shutdown.clone()));
    let incoming = crate::tls::incoming(listener, tls.clone(), config.limits.clone());
    let keepalive = (
        config.limits.keepalive_interval,
        config.limits.keepalive_timeout,
    );
    tasks.spawn({
        let shutdown = shutdown.clone();
        async move {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(keepalive.0))
                .http2_keepalive_timeout(Some(keepalive.1))
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
                .add_service(agent_svc)
                .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
                .await?;
            Ok(())
        }
    });

    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    lanyard_daemon::health::mirror_to_grpc(
        readiness.clone(),
        health_reporter,
        vec![<AdminServiceServer<admin::Admin> as NamedService>::NAME],
    );
    let admin_svc = AdminServiceServer::with_interceptor(
        admin::Admin::new(state.clone(), readiness.clone()),
        admin::authorize_peer,
    );
    let admin_incoming = UnixListenerStream::new(admin_listener);
    tasks.spawn({
        let shutdown = shutdown.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(admin_svc)
                .add_service(health_svc)
                .serve_with_incoming_shutdown(admin_incoming, async move { shutdown.wait().await })
                .await?;
            Ok(())
        }
    });

    let health_addr = match config.health_bind_address {
        Some(addr) => {
            let (bound, task) =
                lanyard_daemon::health::serve_http(addr, readiness.clone(), shutdown.clone())
                    .await
                    .map_err(|source| RunError::HealthBind { addr, source })?;
            tasks.spawn(async move {
                let _ = task.await;
                Ok(())
            });
            Some(bound)
        }
        None => None,
    };

    tasks.spawn(upkeep(
        state.clone(),
        tls,
        tls_not_after,
        readiness_tx,
        shutdown,
    ));

    tracing::info!(agent_api = %agent_addr, admin_socket = %config.admin_socket.display(),
        health = ?health_addr, trust_domain = %config.trust_domain, "lanyard-server is serving");
    Ok(Running {
        state,
        agent_addr,
        health_addr,
        readiness,
        trigger,
        _locks: [data_lock, admin_lock],
        tasks,
    })
}

/// Background upkeep: readiness, the server's TLS certificate, pruning of expired join
/// tokens and the safety-net resync of entries.
async fn upkeep(
    state: State,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    tls_not_after: i64,
    readiness: watch::Sender<Readiness>,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let mut rotate_at = rotation_instant(&state, tls_not_after);
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    let mut prune = tokio::time::interval(PRUNE_INTERVAL);
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            _ = probe.tick() => {
                let now = readiness_now(&state).await;
                readiness.send_if_modified(|current| {
                    if *current == now {
                        return false;
                    }
                    if now.is_ready() {
                        tracing::info!("ready again");
                        lanyard_daemon::notify::status("serving");
                    } else {
                        tracing::warn!(reasons = ?now.reasons, "not ready");
                        lanyard_daemon::notify::status(&format!("not ready: {}", now.reasons.join("; ")));
                    }
                    *current = now;
                    true
                });
            }
            _ = resync.tick() => {
                match state.resync_entries().await {
                    Ok(0) => {}
                    Ok(changed) => tracing::info!(changed, "resync applied entry changes made elsewhere"),
                    Err(e) => tracing::warn!(error = %e, "entry resync failed"),
                }
            }
            _ = prune.tick() => {
                match state.prune_join_tokens().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed the alias entries of expired unused join tokens"),
                    Err(e) => tracing::warn!(error = %e, "pruning join tokens failed"),
                }
            }
            () = tokio::time::sleep_until(rotate_at) => {
                match crate::tls::server_config(&state.ca, &state.bundle().x509_authorities, SERVER_SVID_TTL) {
                    Ok((config, not_after)) => {
                        tls.store(Arc::new(config));
                        rotate_at = rotation_instant(&state, not_after);
                        tracing::info!(not_after = %lanyard_daemon::output::rfc3339(not_after), "rotated the server's TLS certificate");
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

/// Half of the remaining lifetime from now.
fn rotation_instant(state: &State, not_after: i64) -> tokio::time::Instant {
    let remaining = u64::try_from(not_after - state.now()).unwrap_or(0).max(2);
    tokio::time::Instant::now() + Duration::from_secs(remaining / 2)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test]
    async fn readiness_names_an_expired_ca_and_an_unwritable_datastore() {
        let (_dir, state, store, clock) = crate::state::tests::state().await;
        assert_eq!(readiness_now(&state).await, Readiness::default());
        store.fail_probe.store(true, Ordering::SeqCst);
        let not_ready = readiness_now(&state).await;
        assert_eq!(not_ready.reasons.len(), 1, "{not_ready:?}");
        assert!(
            not_ready.reasons[0].starts_with("the datastore does not accept writes"),
            "{not_ready:?}"
        );
        store.fail_probe.store(false, Ordering::SeqCst);
        // The CA of the test state lives an hour.
        clock.advance(3600);
        let expired = readiness_now(&state).await;
        assert_eq!(expired.reasons.len(), 1, "{expired:?}");
        assert!(
            expired.reasons[0].starts_with("the CA expired at "),
            "{expired:?}"
        );
    }
}
