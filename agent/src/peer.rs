//! The Workload API socket's connections. Each accepted connection gets its peer's
//! credentials (`SO_PEERCRED`) and the peer process pinned by a pidfd at once, before the
//! first byte is read, and is counted against caps that keep one local user from
//! exhausting the agent:
//!
//! - per uid: at most [`Limits::connections_per_uid`] open connections (one more is closed
//!   at once) and [`Limits::streams_per_uid`] open streams (one more is refused with
//!   RESOURCE_EXHAUSTED by the Workload API);
//! - in total: at most [`Limits::max_connections`], kept below the descriptor limit
//!   (each connection costs two descriptors, the socket and the pidfd);
//! - a connection with no request in flight for [`Limits::idle_timeout`] is closed;
//! - accept errors (EMFILE and the like) back off instead of spinning, and every refusal
//!   is logged at most once a minute per uid.
//!
//! The connection layer owns these counts; requests and streams hold permits that give
//! their share back when dropped.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use lanyard_attestors::workload::{
    AttestError, FileId, Holders, PeerCredentials, Process, peer_credentials, sharing,
};
use lanyard_daemon::logging::RateLimit;
use lanyard_daemon::shutdown::Shutdown;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How often one refusal per uid (and kind) is logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Descriptors kept free for everything else the agent opens (the server connection, data
/// files, /proc during attestation).
const RESERVED_FDS: u64 = 256;
/// Never raise the descriptor limit above this, whatever the hard limit allows.
const MAX_FD_LIMIT: u64 = 1 << 20;
/// First and longest pause after an accept error that more accepting cannot cure.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Caps on what Workload API callers may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub connections_per_uid: usize,
    pub streams_per_uid: usize,
    /// The total; [`raise_fd_limit`] tells how many descriptors allow.
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_uid: 256,
            streams_per_uid: 256,
            max_connections: 16_384,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// These limits with the total capped to what `fd_limit` descriptors allow.
    pub fn within_fd_limit(mut self, fd_limit: u64) -> Self {
        let fit = fd_limit.saturating_sub(RESERVED_FDS) / 2;
        self.max_connections = self
            .max_connections
            .min(usize::try_from(fit).unwrap_or(usize::MAX))
            .max(1);
        self
    }
}

/// Raises the soft descriptor limit to the hard one (at most 2^20) and returns the soft
/// limit in force. Failure (a seccomp filter, say) leaves the limit as it was.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(MAX_FD_LIMIT);
    let hard = limit.maximum.unwrap_or(MAX_FD_LIMIT).min(MAX_FD_LIMIT);
    if hard > soft {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit; keeping it");
            }
        }
    }
    soft
}

/// Counts of connections and streams per uid and in total: the one owner of these numbers.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    counts: Mutex<Counts>,
    refusals: RateLimit<(u32, Refusal)>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    connections: HashMap<u32, usize>,
    streams: HashMap<u32, usize>,
}

/// What a caller was refused, for logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    Connections,
    Total,
    Streams,
}

impl Registry {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Registry {
            limits,
            counts: Mutex::new(Counts::default()),
            refusals: RateLimit::new(REFUSAL_LOG_INTERVAL, 4096),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open connections in total and of `uid`.
    pub fn connections(&self, uid: u32) -> (usize, usize) {
        let counts = self.counts();
        (
            counts.total,
            counts.connections.get(&uid).copied().unwrap_or(0),
        )
    }

    /// Counts a new connection of `uid`, or refuses it.
    fn admit(self: &Arc<Self>, uid: u32) -> Result<ConnPermit, Refusal> {
        let mut counts = self.counts();
        if counts.total >= self.limits.max_connections {
            return Err(Refusal::Total);
        }
        let mine = counts.connections.entry(uid).or_insert(0);
        if *mine >= self.limits.connections_per_uid {
            return Err(Refusal::Connections);
        }
        *mine += 1;
        counts.total += 1;
        Ok(ConnPermit {
            registry: Arc::clone(self),
            uid,
        })
    }

    /// Counts a new stream of `uid`, or refuses it (the caller answers RESOURCE_EXHAUSTED).
    pub fn admit_stream(self: &Arc<Self>, uid: u32) -> Result<StreamPermit, usize> {
        let mut counts = self.counts();
        let mine = counts.streams.entry(uid).or_insert(0);
        if *mine >= self.limits.streams_per_uid {
            drop(counts);
            self.log_refusal(uid, Refusal::Streams);
            return Err(self.limits.streams_per_uid);
        }
        *mine += 1;
        Ok(StreamPermit {
            registry: Arc::clone(self),
            uid,
        })
    }

    /// Logs a refusal, at most once per [`REFUSAL_LOG_INTERVAL`] per uid and kind.
    pub fn log_refusal(&self, uid: u32, what: Refusal) {
        let Some(suppressed) = self.refusals.check(&(uid, what)) else {
            return;
        };
        let limits = &self.limits;
        match what {
            Refusal::Connections => tracing::warn!(
                uid,
                limit = limits.connections_per_uid,
                suppressed,
                "closed a Workload API connection: this uid holds as many as one user may"
            ),
            Refusal::Total => tracing::warn!(
                uid,
                limit = limits.max_connections,
                suppressed,
                "closed a Workload API connection: the agent holds as many as it may"
            ),
            Refusal::Streams => tracing::warn!(
                uid,
                limit = limits.streams_per_uid,
                suppressed,
                "refused a Workload API stream: this uid holds as many as one user may"
            ),
        }
    }

    fn release(&self, uid: u32, stream: bool) {
        let mut counts = self.counts();
        let map = if stream {
            &mut counts.streams
        } else {
            &mut counts.connections
        };
        if let Some(n) = map.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&uid);
            }
        }
        if !stream {
            counts.total = counts.total.saturating_sub(1);
        }
    }
}

/// One counted connection; gives its place back when dropped.
#[derive(Debug)]
struct ConnPermit {
    registry: Arc<Registry>,
    uid: u32,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.registry.release(self.uid, false);
    }
}

/// One counted stream; gives its place back when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    registry: Arc<Registry>,
    uid: u32,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.registry.release(self.uid, true);
    }
}

/// Requests in flight on one connection, and since when there were none.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    state: Mutex<IdleState>,
}

#[derive(Debug)]
struct IdleState {
    since: Instant,
    /// The connection's reader, woken when the last request ends so it arms its timer.
    reader: Option<Waker>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(IdleState {
                since: Instant::now(),
                reader: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, IdleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks a request in flight for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut state = self.0.state();
            state.since = Instant::now();
            if let Some(reader) = state.reader.take() {
                reader.wake();
            }
        }
    }
}

/// What the binary selectors of a connection's peer are worth.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BinaryGrant {
    /// Not checked yet.
    Unchecked,
    /// Held by the peer alone when checked; the peer has not executed another program.
    OnlyPeer,
    /// Never again on this connection, and why.
    Tainted(String),
}

/// Everything the agent knows about one connection's peer: its request extension.
#[derive(Debug)]
pub struct Peer {
    pub id: u64,
    /// `SO_PEERCRED`, when the kernel gave it.
    pub creds: Option<PeerCredentials>,
    /// The process pinned at accept time, or why there is none (a peer in a pid namespace
    /// the agent cannot see, say).
    process: Result<Arc<Process>, Arc<AttestError>>,
    /// Readable once the pinned process exits; streams wait on it.
    exit: Option<AsyncFd<PidfdOf>>,
    /// Our end's inode, for the peer lookup.
    socket_ino: Option<u64>,
    binary: Mutex<BinaryGrant>,
    activity: Arc<Activity>,
}

/// The pinned process's pidfd, as tokio's reactor registers it.
#[derive(Debug)]
struct PidfdOf(Arc<Process>);

impl AsRawFd for PidfdOf {
    fn as_raw_fd(&self) -> RawFd {
        self.0.pidfd().as_raw_fd()
    }
}

/// The connect info tonic attaches to every request of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Arc<Peer>);

impl Peer {
    /// A peer for `socket`, pinned now.
    fn of(
        socket: &UnixStream,
        creds: Result<PeerCredentials, AttestError>,
        id: u64,
        proc_root: &std::path::Path,
    ) -> Peer {
        let (creds, process) = match creds {
            Ok(creds) => (
                Some(creds),
                Process::of_peer(creds, socket.as_fd(), proc_root),
            ),
            Err(e) => (None, Err(e)),
        };
        let process = process.map(Arc::new).map_err(Arc::new);
        Self::from_parts(creds, process, inode_of(socket), id)
    }

    fn from_parts(
        creds: Option<PeerCredentials>,
        process: Result<Arc<Process>, Arc<AttestError>>,
        socket_ino: Option<u64>,
        id: u64,
    ) -> Peer {
        let exit = process.as_ref().ok().and_then(|p| watch_exit(p).ok());
        Peer {
            id,
            creds,
            process,
            exit,
            socket_ino,
            binary: Mutex::new(BinaryGrant::Unchecked),
            activity: Arc::new(Activity::new()),
        }
    }

    /// A peer for a process pinned elsewhere (tests drive the Workload API with it).
    pub fn for_process(process: Process, socket_ino: Option<u64>) -> Peer {
        let creds = Some(process.creds());
        Self::from_parts(creds, Ok(Arc::new(process)), socket_ino, 0)
    }

    /// The pinned process, or why there is none.
    pub fn process(&self) -> Result<&Arc<Process>, &AttestError> {
        self.process.as_ref().map_err(|e| &**e)
    }

    /// Resolves once the pinned process has exited (never, without one).
    pub async fn exited(&self) {
        let Some(fd) = &self.exit else {
            return std::future::pending().await;
        };
        loop {
            match fd.readable().await {
                // The pidfd is never read: readiness is the whole message.
                Ok(mut ready) => {
                    if fd.get_ref().0.has_exited() {
                        return;
                    }
                    ready.clear_ready();
                }
                Err(_) => return std::future::pending().await,
            }
        }
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn begin_request(&self) -> InFlight {
        self.activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(&self.activity))
    }

    /// Whether the binary selectors of the peer, attested running `exe`, may be granted on
    /// this connection: `Err` says why not. Checks once, then remembers; a connection seen
    /// shared, or whose peer executed another program since connecting, never gets them
    /// again. Blocking (it may scan /proc): call it where that is fine.
    pub fn check_binary(&self, exe: Option<FileId>) -> Result<(), String> {
        let process = self.process.as_ref().map_err(ToString::to_string)?;
        let mut grant = self.binary.lock().unwrap_or_else(PoisonError::into_inner);
        if let BinaryGrant::Tainted(reason) = &*grant {
            return Err(reason.clone());
        }
        if exe.is_none() || exe != process.first_exe() {
            let reason =
                "the connecting process executed another program after it connected".to_owned();
            *grant = BinaryGrant::Tainted(reason.clone());
            return Err(reason);
        }
        if *grant == BinaryGrant::OnlyPeer {
            return Ok(());
        }
        let ino = self
            .socket_ino
            .ok_or_else(|| "the connection's socket inode is unknown".to_owned())?;
        let peer_ino = sharing::peer_inode_of(ino)
            .map_err(|e| format!("cannot look up the connection's peer socket: {e}"))?;
        let creds = process.creds();
        match sharing::holders(process.proc_root(), peer_ino, creds.pid, creds.uid) {
            Holders::OnlyPeer => {
                *grant = BinaryGrant::OnlyPeer;
                Ok(())
            }
            Holders::Shared { pid } => {
                let reason = format!("process {pid} holds the connection too");
                *grant = BinaryGrant::Tainted(reason.clone());
                Err(reason)
            }
            Holders::NotHeldByPeer => {
                let reason = "the connecting process no longer holds the connection".to_owned();
                *grant = BinaryGrant::Tainted(reason.clone());
                Err(reason)
            }
            // Not proven either way: refused this time, checked again next time.
            Holders::Unknown { reason } => Err(format!("cannot check who holds it: {reason}")),
        }
    }
}

/// Registers the pidfd of `process` with tokio's reactor.
fn watch_exit(process: &Arc<Process>) -> io::Result<AsyncFd<PidfdOf>> {
    // `AsyncFd::new` is deprecated in favour of the unsafe `register`, whose condition is
    // that the descriptor stays open and the same for the AsyncFd's whole life. It does:
    // `PidfdOf` owns an `Arc` of the `Process`, which owns the pidfd and never replaces it.
    #[allow(deprecated)]
    AsyncFd::new(PidfdOf(Arc::clone(process)))
}

fn inode_of(socket: &UnixStream) -> Option<u64> {
    nix::sys::stat::fstat(socket.as_fd())
        .ok()
        .map(|st| st.st_ino)
}

/// An accepted connection as tonic serves it.
#[derive(Debug)]
pub struct Connection {
    io: UnixStream,
    info: PeerInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _permit: ConnPermit,
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl Connection {
    /// Whether the connection has been idle (no request in flight) for the timeout; arms
    /// the timer and registers for the end of the last request otherwise.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let activity = &self.info.0.activity;
        let mut state = activity.state();
        state.reader = Some(cx.waker().clone());
        if activity.in_flight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let deadline = state.since + self.idle_timeout;
        drop(state);
        if Instant::now() >= deadline {
            return true;
        }
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        self.idle.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idle_expired(cx) {
            // End of stream: the HTTP/2 connection ends cleanly, nothing to log.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener` until `shutdown` (or until tonic drops the stream),
/// pinning each peer and applying the caps of `registry`.
pub fn incoming(
    listener: UnixListener,
    registry: Arc<Registry>,
    proc_root: PathBuf,
    shutdown: Shutdown,
) -> ReceiverStream<Result<Connection, std::convert::Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        let errors = RateLimit::new(REFUSAL_LOG_INTERVAL, 16);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.wait() => return,
                () = tx.closed() => return,
            };
            let (io, _) = match accepted {
                Ok(pair) => {
                    backoff = AcceptBackoff::default();
                    pair
                }
                Err(e) => {
                    let pause = backoff.after(&e);
                    let kind = e.raw_os_error().unwrap_or(0);
                    if let Some(suppressed) = errors.check(&kind) {
                        tracing::warn!(error = %e, suppressed, retry_in = ?pause, "accepting a Workload API connection failed");
                    }
                    match pause {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => tokio::task::yield_now().await,
                    }
                    continue;
                }
            };
            let Some(conn) = admit(io, &registry, &proc_root) else {
                continue;
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// How long to pause after a failed accept: out of descriptors or memory, accepting
/// again at once would fail again at once (and spin), so such errors pause, doubling
/// from 10 ms to 1 s; other errors (a connection reset before it was accepted) do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AcceptBackoff(Duration);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff(ACCEPT_BACKOFF.0)
    }
}

impl AcceptBackoff {
    fn after(&mut self, e: &io::Error) -> Option<Duration> {
        if !is_resource_error(e) {
            return None;
        }
        let pause = self.0;
        self.0 = (self.0 * 2).min(ACCEPT_BACKOFF.1);
        Some(pause)
    }
}

/// Counts and pins one accepted socket; `None` when it was closed over a cap.
fn admit(
    io: UnixStream,
    registry: &Arc<Registry>,
    proc_root: &std::path::Path,
) -> Option<Connection> {
    // The uid decides the caps; a socket without credentials counts as nobody's (u32::MAX).
    let creds = peer_credentials(io.as_fd());
    let uid = creds.as_ref().map_or(u32::MAX, |c| c.uid);
    let permit = match registry.admit(uid) {
        Ok(permit) => permit,
        Err(refusal) => {
            registry.log_refusal(uid, refusal);
            return None;
        }
    };
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
    let peer = Peer::of(&io, creds, id, proc_root);
    if let Err(error) = &peer.process {
        tracing::debug!(conn = id, uid, %error, "Workload API peer could not be pinned");
    }
    let idle_timeout = registry.limits.idle_timeout;
    Some(Connection {
        io,
        info: PeerInfo(Arc::new(peer)),
        idle_timeout,
        idle: Box::pin(tokio::time::sleep(idle_timeout)),
        _permit: permit,
    })
}

fn is_resource_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Marks every request in flight on its connection while it (and its response body) lives,
/// so the idle timeout only closes connections that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for InFlightService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<PeerInfo>()
            .map(|info| info.0.begin_request());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _guard: Option<InFlight>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection held by its peer alone passes the check, is remembered, and is
    /// tainted for good once its peer runs another program than it connected with.
    #[tokio::test]
    async fn binary_selectors_follow_the_connection_check_and_taint_for_good() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let ours = UnixStream::from_std(ours).expect("tokio");
        let creds = peer_credentials(ours.as_fd());
        let peer = Peer::of(&ours, creds, 1, std::path::Path::new("/proc"));
        let process = peer.process().expect("pinned");
        let exe = process.first_exe();
        assert!(exe.is_some());
        assert_eq!(peer.check_binary(exe), Ok(()));
        assert_eq!(peer.check_binary(exe), Ok(()), "remembered");
        let other = Some(FileId { dev: 0, ino: 1 });
        let tainted =
            Err("the connecting process executed another program after it connected".to_owned());
        assert_eq!(peer.check_binary(other), tainted);
        assert_eq!(peer.check_binary(exe), tainted, "for good");
        drop(theirs);
    }

    #[test]
    fn running_out_of_descriptors_backs_off_instead_of_spinning() {
        use nix::errno::Errno;
        let emfile = io::Error::from_raw_os_error(Errno::EMFILE as i32);
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<_> = (0..9).map(|_| backoff.after(&emfile)).collect();
        let ms = |m| Some(Duration::from_millis(m));
        assert_eq!(
            pauses,
            [
                ms(10),
                ms(20),
                ms(40),
                ms(80),
                ms(160),
                ms(320),
                ms(640),
                ms(1000),
                ms(1000)
            ]
        );
        for errno in [Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            let mut fresh = AcceptBackoff::default();
            assert_eq!(
                fresh.after(&io::Error::from_raw_os_error(errno as i32)),
                ms(10)
            );
        }
        let aborted = io::Error::from_raw_os_error(Errno::ECONNABORTED as i32);
        assert_eq!(AcceptBackoff::default().after(&aborted), None);
    }

    #[test]
    fn the_total_stays_below_the_descriptor_limit() {
        let limits = Limits::default().within_fd_limit(1024);
        assert_eq!(limits.max_connections, (1024 - 256) / 2);
        assert_eq!(
            Limits::default().within_fd_limit(1 << 20).max_connections,
            16_384
        );
        assert_eq!(Limits::default().within_fd_limit(10).max_connections, 1);
    }

    #[test]
    fn caps_are_per_uid_and_permits_give_their_place_back() {
        let registry = Registry::new(Limits {
            connections_per_uid: 2,
            streams_per_uid: 1,
            max_connections: 3,
            idle_timeout: Duration::from_secs(1),
        });
        let a1 = registry.admit(1).expect("first");
        let _a2 = registry.admit(1).expect("second");
        assert_eq!(registry.admit(1).expect_err("third"), Refusal::Connections);
        let b1 = registry.admit(2).expect("another uid");
        assert_eq!(registry.admit(3).expect_err("total"), Refusal::Total);
        drop(a1);
        assert_eq!(registry.connections(1), (2, 1));
        let _a3 = registry.admit(1).expect("a place came back");
        drop(b1);

        let s = registry.admit_stream(1).expect("stream");
        assert_eq!(registry.admit_stream(1).expect_err("second stream"), 1);
        let _other = registry.admit_stream(2).expect("another uid's stream");
        drop(s);
        registry.admit_stream(1).expect("a stream place came back");
    }
}
