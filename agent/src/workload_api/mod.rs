//! The SPIFFE Workload API on the agent's Unix socket. Callers are identified only by
//! what the kernel says about the socket peer (SO_PEERCRED and the pidfd taken when the
//! connection was accepted, then /proc), never by anything in the request. Streams send
//! the complete current state on every change, drop each SVID at its notAfter, and never
//! end with OK: PERMISSION_DENIED when the caller's last identity goes (or the process
//! that connected exits), UNAVAILABLE when the agent shuts down.
//!
//! - [`caller`]: which selectors a caller's requests are judged by;
//! - [`view`]: what a caller sees of the snapshot at a given time;
//! - [`error`]: every way a call can fail, and the one mapping to gRPC statuses.

pub mod caller;
pub mod error;
pub mod view;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lanyard_daemon::shutdown::Shutdown;
use lanyard_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use lanyard_proto::workload::*;
use lanyard_proto::{Selector, TrustDomain, WORKLOAD_SECURITY_HEADER};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::cache::Snapshot;
use crate::peer::{Peer, PeerInfo, Registry, StreamPermit};
use crate::rotation::{Clock, instant_at};
use crate::sync::SnapshotRx;
use caller::{Attester, Judged};
pub use error::ApiError;
use view::{View, bundles_view, x509_view};

/// How long a first request waits for the agent's first sync or a pending SVID before
/// answering UNAVAILABLE (clients retry that).
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(5);

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The interceptor every Workload API call passes (and no other service's calls): the
/// `workload.spiffe.io` header must be present exactly once, with the value `true`
/// (the Workload API standard).
pub fn check_header(req: Request<()>) -> Result<Request<()>, Status> {
    let mut values = req.metadata().get_all(WORKLOAD_SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(req),
        _ => Err(ApiError::SecurityHeader.into()),
    }
}

/// The Workload API service with its security-header interceptor, ready to serve.
pub type Server = InterceptedService<
    SpiffeWorkloadApiServer<WorkloadApi>,
    fn(Request<()>) -> Result<Request<()>, Status>,
>;

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    trust_domain: TrustDomain,
    cache: SnapshotRx,
    attester: Arc<Attester>,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
    open_streams: Arc<AtomicUsize>,
}

/// Counts a stream task for as long as it lives, and holds its uid's stream place.
struct StreamGuard {
    counter: Arc<AtomicUsize>,
    _permit: StreamPermit,
}

impl StreamGuard {
    fn new(counter: &Arc<AtomicUsize>, permit: StreamPermit) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        StreamGuard {
            counter: Arc::clone(counter),
            _permit: permit,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The peer of the connection a request came on.
fn peer_of<T>(req: &Request<T>) -> Result<Arc<Peer>, ApiError> {
    req.extensions()
        .get::<PeerInfo>()
        .map(|info| Arc::clone(&info.0))
        .ok_or_else(|| ApiError::Internal("the connection carries no peer information".into()))
}

impl WorkloadApi {
    pub fn new(
        trust_domain: TrustDomain,
        cache: SnapshotRx,
        attester: Arc<Attester>,
        registry: Arc<Registry>,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> Self {
        WorkloadApi {
            trust_domain,
            cache,
            attester,
            registry,
            clock,
            shutdown,
            open_streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// This service behind its security-header interceptor.
    pub fn into_server(self) -> Server {
        SpiffeWorkloadApiServer::with_interceptor(self, check_header as fn(_) -> _)
    }

    /// Stream tasks alive right now (a cancelled stream must bring this back down).
    pub fn open_streams(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.open_streams)
    }

    /// Judges the caller for the current snapshot, logging a refusal.
    async fn judge(&self, peer: &Arc<Peer>) -> Result<Judged, ApiError> {
        let snapshot = self.cache.borrow().clone();
        self.attester.judge(peer, &snapshot).await.inspect_err(|e| {
            self.attester.log_refusal(peer, None, e);
        })
    }

    /// Serves `view` as a stream: first message as soon as there is one (or an error
    /// after FIRST_MESSAGE_WAIT), then one message per change of the caller's view. The
    /// caller is judged again before each later message, so its identity follows the
    /// process that connected (a new program, a changed uid, or its exit ends or changes
    /// what it receives); the stream also wakes when the earliest SVID it served expires.
    fn stream<K, M, F>(
        &self,
        peer: Arc<Peer>,
        judged: Judged,
        view: F,
    ) -> Result<StreamOf<M>, ApiError>
    where
        K: PartialEq + Send + 'static,
        M: Send + 'static,
        F: Fn(&Snapshot, &[Selector], i64) -> Result<Option<View<K, M>>, ApiError> + Send + 'static,
    {
        let uid = peer.creds.map_or(u32::MAX, |c| c.uid);
        let permit = self
            .registry
            .admit_stream(uid)
            .map_err(|limit| ApiError::TooManyStreams { uid, limit })?;
        let attester = Arc::clone(&self.attester);
        let clock = Arc::clone(&self.clock);
        let mut cache = self.cache.clone();
        let shutdown = self.shutdown.clone();
        let current = move |cache: &mut SnapshotRx, selectors: &[Selector], now_ms: i64| {
            let snapshot = cache.borrow_and_update().clone();
            if snapshot.synced {
                view(&snapshot, selectors, now_ms)
            } else {
                Ok(None)
            }
        };
        // The first message is built here, before the stream task runs, so it is ready
        // the moment tonic polls the stream; an unknown caller gets PERMISSION_DENIED as
        // the call's status.
        let (tx, rx) = mpsc::channel(2);
        let mut last: Option<K> = None;
        let mut expires: Option<i64> = None;
        match current(&mut cache, &judged.selectors, clock.now_ms()) {
            Ok(Some(first)) => {
                let _ = tx.try_send(Ok(first.message));
                last = Some(first.key);
                expires = first.expires_ms;
            }
            Ok(None) => {}
            Err(e) => {
                attester.log_refusal(&peer, Some(&judged), &e);
                return Err(e);
            }
        }
        let guard = StreamGuard::new(&self.open_streams, permit);
        tokio::spawn(async move {
            let _guard = guard;
            let first_deadline = tokio::time::Instant::now() + FIRST_MESSAGE_WAIT;
            let end = |e: ApiError| Err(Status::from(e));
            loop {
                let waiting_first = last.is_none();
                let expiry = expires.map(|at| instant_at(&*clock, at));
                tokio::select! {
                    changed = cache.changed() => if changed.is_err() {
                        let _ = tx.send(end(ApiError::ShuttingDown)).await;
                        return;
                    },
                    () = shutdown.wait() => {
                        let _ = tx.send(end(ApiError::ShuttingDown)).await;
                        return;
                    }
                    () = tx.closed() => return,
                    () = peer.exited() => {}
                    () = sleep_until(expiry), if expiry.is_some() => {}
                    () = tokio::time::sleep_until(first_deadline), if waiting_first => {
                        let _ = tx.send(end(ApiError::NotReady)).await;
                        return;
                    }
                }
                let snapshot = cache.borrow().clone();
                let judged = match attester.judge(&peer, &snapshot).await {
                    Ok(judged) => judged,
                    Err(e) => {
                        attester.log_refusal(&peer, None, &e);
                        let _ = tx.send(end(e)).await;
                        return;
                    }
                };
                match current(&mut cache, &judged.selectors, clock.now_ms()) {
                    Ok(Some(next)) => {
                        expires = next.expires_ms;
                        if last.as_ref() != Some(&next.key) {
                            if tx.send(Ok(next.message)).await.is_err() {
                                return;
                            }
                            last = Some(next.key);
                        }
                    }
                    Ok(None) => expires = None,
                    Err(e) => {
                        attester.log_refusal(&peer, Some(&judged), &e);
                        let _ = tx.send(end(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let peer = peer_of(&req)?;
        let judged = self.judge(&peer).await?;
        Ok(Response::new(self.stream(peer, judged, x509_view)?))
    }

    type FetchX509BundlesStream = StreamOf<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let peer = peer_of(&req)?;
        let judged = self.judge(&peer).await?;
        let td = self.trust_domain.clone();
        Ok(Response::new(self.stream(
            peer,
            judged,
            move |s, sel, _| bundles_view(&td, s, sel),
        )?))
    }

    async fn fetch_jwtsvid(
        &self,
        _req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(ApiError::Unimplemented("JWT-SVIDs are not served by this agent yet").into())
    }

    type FetchJWTBundlesStream = StreamOf<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(ApiError::Unimplemented("JWT bundles are not served by this agent yet").into())
    }

    async fn validate_jwtsvid(
        &self,
        _req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(ApiError::Unimplemented("JWT-SVID validation is not served by this agent yet").into())
    }

    type FetchWITSVIDStream = StreamOf<WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _req: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(ApiError::Unimplemented("the WIT-SVID profile is not supported").into())
    }

    type FetchWITBundlesStream = StreamOf<WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _req: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(ApiError::Unimplemented("the WIT-SVID profile is not supported").into())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use lanyard_attestors::workload::{Process, UnixAttestor, UnixAttestorConfig};
    use lanyard_daemon::shutdown::Trigger;
    use lanyard_proto::NO_IDENTITY_ISSUED;
    use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio::io::AsyncReadExt;
    use tokio::sync::watch;
    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;
    use crate::cache::{CachedEntry, Svid};
    use crate::peer::{InFlightLayer, Limits};
    use crate::rotation::{SystemClock, TokioClock};

    fn entry(
        id: &str,
        spiffe: &str,
        selectors: &[&str],
        hint: &str,
        serial: Option<&str>,
        not_after: i64,
    ) -> CachedEntry {
        CachedEntry {
            id: id.into(),
            spiffe_id: lanyard_proto::SpiffeId::parse(spiffe).expect("id"),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).expect("selector"))
                .collect(),
            hint: hint.into(),
            revision: 0,
            svid: serial.map(|serial| {
                let (key, _) = crate::identity::key_and_csr(None).expect("key");
                Arc::new(Svid {
                    chain: vec![1, 2, 3],
                    key,
                    serial: serial.into(),
                    not_before: 0,
                    not_after,
                    revision: 0,
                    renew_at_ms: 5000,
                })
            }),
        }
    }

    /// Far in the future (Unix seconds).
    const LATER: i64 = 4_000_000_000;

    fn snapshot(entries: Vec<CachedEntry>) -> Snapshot {
        Snapshot {
            synced: true,
            entries,
            bundle: Arc::new(vec![9, 9]),
            bundle_sequence: 1,
        }
    }

    fn sel(s: &[&str]) -> Vec<Selector> {
        s.iter()
            .map(|s| Selector::parse(s).expect("selector"))
            .collect()
    }

    fn my_uid_selector() -> String {
        format!("unix:uid:{}", nix::unistd::geteuid().as_raw())
    }

    fn attester() -> Arc<Attester> {
        Arc::new(Attester::new(Arc::new(UnixAttestor::new(
            UnixAttestorConfig::default(),
        ))))
    }

    fn api(cache: SnapshotRx, limits: Limits, clock: Arc<dyn Clock>) -> (WorkloadApi, Trigger) {
        let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
        let td = TrustDomain::new("example.org").expect("td");
        let api = WorkloadApi::new(
            td,
            cache,
            attester(),
            Registry::new(limits),
            clock,
            shutdown,
        );
        (api, trigger)
    }

    fn request() -> Request<X509svidRequest> {
        let mut req = Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        req
    }

    #[test]
    fn view_keeps_entry_order_and_unique_hints() {
        let snap = snapshot(vec![
            entry(
                "a",
                "spiffe://td/first",
                &["unix:uid:1"],
                "web",
                Some("01"),
                LATER,
            ),
            entry(
                "b",
                "spiffe://td/second",
                &["unix:uid:1", "unix:gid:2"],
                "web",
                Some("02"),
                LATER,
            ),
            entry(
                "c",
                "spiffe://td/third",
                &["unix:uid:1"],
                "",
                Some("03"),
                LATER,
            ),
            entry(
                "d",
                "spiffe://td/other",
                &["unix:uid:7"],
                "",
                Some("04"),
                LATER,
            ),
        ]);
        let view = x509_view(&snap, &sel(&["unix:uid:1", "unix:gid:2"]), 0)
            .expect("ok")
            .expect("ready");
        let ids: Vec<_> = view
            .message
            .svids
            .iter()
            .map(|s| s.spiffe_id.as_str())
            .collect();
        // "b" repeats hint "web" and is dropped; "d" does not match; order is entry order.
        assert_eq!(ids, ["spiffe://td/first", "spiffe://td/third"]);
        assert_eq!(view.key.serials, ["01", "03"]);
        assert_eq!(view.expires_ms, Some(LATER * 1000));
        assert!(view.message.svids.iter().all(|s| s.bundle == [9, 9]));
        assert!(
            view.message.federated_bundles.is_empty(),
            "own trust domain never in federated_bundles"
        );
    }

    #[test]
    fn no_match_is_permission_denied_and_pending_is_not_ready() {
        let snap = snapshot(vec![entry(
            "a",
            "spiffe://td/x",
            &["unix:uid:1"],
            "",
            None,
            0,
        )]);
        let err = x509_view(&snap, &sel(&["unix:uid:2"]), 0).expect_err("no identity");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), NO_IDENTITY_ISSUED);
        assert!(
            x509_view(&snap, &sel(&["unix:uid:1"]), 0)
                .expect("ok")
                .is_none(),
            "SVID still being signed"
        );
    }

    #[test]
    fn an_svid_is_never_in_a_view_at_or_after_its_not_after() {
        let snap = snapshot(vec![
            entry(
                "a",
                "spiffe://td/short",
                &["unix:uid:1"],
                "",
                Some("01"),
                100,
            ),
            entry(
                "b",
                "spiffe://td/long",
                &["unix:uid:1"],
                "",
                Some("02"),
                200,
            ),
        ]);
        let me = sel(&["unix:uid:1"]);
        let both = x509_view(&snap, &me, 99_999).expect("ok").expect("ready");
        assert_eq!(both.key.serials, ["01", "02"]);
        assert_eq!(
            both.expires_ms,
            Some(100_000),
            "wakes at the earliest notAfter"
        );
        let one = x509_view(&snap, &me, 100_000).expect("ok").expect("ready");
        assert_eq!(one.key.serials, ["02"], "dropped exactly at notAfter");
        assert_eq!(one.expires_ms, Some(200_000));
        assert!(matches!(
            x509_view(&snap, &me, 200_000),
            Err(ApiError::NoIdentity)
        ));
        // An expired SVID next to one still being signed: wait for the new one.
        let renewing = snapshot(vec![
            entry(
                "a",
                "spiffe://td/short",
                &["unix:uid:1"],
                "",
                Some("01"),
                100,
            ),
            entry("b", "spiffe://td/new", &["unix:uid:1"], "", None, 0),
        ]);
        assert!(x509_view(&renewing, &me, 100_000).expect("ok").is_none());
    }

    #[test]
    fn bundles_are_keyed_by_trust_domain_id() {
        let td = TrustDomain::new("example.org").expect("td");
        let snap = snapshot(vec![entry(
            "a",
            "spiffe://example.org/x",
            &["unix:uid:1"],
            "",
            Some("01"),
            LATER,
        )]);
        let view = bundles_view(&td, &snap, &sel(&["unix:uid:1"]))
            .expect("ok")
            .expect("ready");
        assert_eq!(
            view.message.bundles.get("spiffe://example.org"),
            Some(&vec![9, 9])
        );
        assert!(bundles_view(&td, &snap, &sel(&["unix:uid:5"])).is_err());
    }

    #[test]
    fn security_header_must_be_exactly_true_once() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        assert!(check_header(ok).is_ok());
        for bad in ["True", "false", ""] {
            let mut req = Request::new(());
            req.metadata_mut()
                .insert(WORKLOAD_SECURITY_HEADER, bad.parse().expect("value"));
            let status = check_header(req).expect_err(bad);
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(status.message(), "security header missing from request");
        }
        assert!(check_header(Request::new(())).is_err());
        let mut twice = Request::new(());
        for _ in 0..2 {
            twice
                .metadata_mut()
                .append(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        }
        assert!(check_header(twice).is_err());
    }

    /// A stream served straight from `api` to a caller pinned as `process`.
    async fn open(
        api: &WorkloadApi,
        process: Process,
    ) -> Result<StreamOf<X509svidResponse>, ApiError> {
        let peer = Arc::new(Peer::for_process(process, None));
        let judged = api.judge(&peer).await?;
        api.stream(peer, judged, x509_view)
    }

    fn me() -> Process {
        Process::by_pid(std::process::id() as i32, Path::new("/proc")).expect("me")
    }

    /// An open stream drops each SVID at its notAfter (waking for it, with no other event)
    /// and ends PERMISSION_DENIED when nothing is left.
    #[tokio::test(start_paused = true)]
    async fn open_streams_shrink_at_not_after_and_end_when_nothing_is_left() {
        let start_s = 1_800_000_000;
        let clock = Arc::new(TokioClock::starting_at(start_s * 1000));
        let me_sel = my_uid_selector();
        let (_tx, cache) = watch::channel(Arc::new(snapshot(vec![
            entry(
                "a",
                "spiffe://example.org/short",
                &[&me_sel],
                "",
                Some("01"),
                start_s + 10,
            ),
            entry(
                "b",
                "spiffe://example.org/long",
                &[&me_sel],
                "",
                Some("02"),
                start_s + 20,
            ),
        ])));
        let (api, _trigger) = api(cache, Limits::default(), clock.clone());
        let mut stream = open(&api, me()).await.expect("stream");
        let ids = |m: &X509svidResponse| -> Vec<String> {
            m.svids.iter().map(|s| s.spiffe_id.clone()).collect()
        };
        let first = stream.next().await.expect("first").expect("ok");
        assert_eq!(
            ids(&first),
            ["spiffe://example.org/short", "spiffe://example.org/long"]
        );
        let second = stream.next().await.expect("second").expect("ok");
        assert_eq!(ids(&second), ["spiffe://example.org/long"]);
        assert_eq!(
            clock.now_ms(),
            (start_s + 10) * 1000,
            "woke exactly at notAfter"
        );
        let end = stream
            .next()
            .await
            .expect("end")
            .expect_err("no identity left");
        assert_eq!(end.code(), Code::PermissionDenied);
        assert_eq!(end.message(), NO_IDENTITY_ISSUED);
        assert_eq!(clock.now_ms(), (start_s + 20) * 1000);
        assert!(stream.next().await.is_none(), "and then the stream is over");
    }

    /// The identity belongs to the process that connected: when it exits, the stream
    /// ends PERMISSION_DENIED even though the connection (held by others) lives on.
    #[tokio::test]
    async fn a_stream_ends_when_the_connecting_process_exits() {
        let me_sel = my_uid_selector();
        let (_tx, cache) = watch::channel(Arc::new(snapshot(vec![entry(
            "a",
            "spiffe://example.org/me",
            &[&me_sel],
            "",
            Some("01"),
            LATER,
        )])));
        let (api, _trigger) = api(cache, Limits::default(), Arc::new(SystemClock));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let process = Process::by_pid(child.id() as i32, Path::new("/proc")).expect("pin");
        let mut stream = open(&api, process).await.expect("stream");
        stream.next().await.expect("first").expect("ok");
        child.kill().expect("kill");
        child.wait().expect("reap");
        let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("ends promptly")
            .expect("an error")
            .expect_err("not OK");
        assert_eq!(end.code(), Code::PermissionDenied);
        assert_eq!(
            end.message(),
            "the calling process exited or was replaced during attestation"
        );
    }

    /// A Workload API server on a socket in a temporary directory, served as run.rs
    /// serves it.
    struct Served {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        open_streams: Arc<AtomicUsize>,
        trigger: Trigger,
        _cache: watch::Sender<Arc<Snapshot>>,
    }

    async fn serve(snapshot: Snapshot, limits: Limits) -> Served {
        let (cache_tx, cache) = watch::channel(Arc::new(snapshot));
        let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
        let registry = Registry::new(limits);
        let td = TrustDomain::new("example.org").expect("td");
        let api = WorkloadApi::new(
            td,
            cache,
            attester(),
            Arc::clone(&registry),
            Arc::new(SystemClock),
            shutdown.clone(),
        );
        let open_streams = api.open_streams();
        let dir = tempfile::tempdir().expect("tmp");
        let run = lanyard_daemon::fs::PrivateDir::open_or_create(
            &dir.path().join("run"),
            lanyard_daemon::fs::DirMode::Searchable,
        )
        .expect("socket dir");
        let lock = lanyard_daemon::lock::InstanceLock::acquire(&run, "api.sock.lock", "socket")
            .expect("lock");
        let socket = run.join("api.sock");
        let listener = lanyard_daemon::uds::bind(&run, "api.sock", 0o777, &lock).expect("bind");
        let incoming =
            crate::peer::incoming(listener, registry, PathBuf::from("/proc"), shutdown.clone());
        tokio::spawn(async move {
            let _lock = lock;
            tonic::transport::Server::builder()
                .layer(InFlightLayer)
                .add_service(api.into_server())
                .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
                .await
        });
        Served {
            _dir: dir,
            socket,
            open_streams,
            trigger,
            _cache: cache_tx,
        }
    }

    fn mine() -> Snapshot {
        snapshot(vec![entry(
            "a",
            "spiffe://example.org/me",
            &[&my_uid_selector()],
            "",
            Some("01"),
            LATER,
        )])
    }

    async fn client(served: &Served) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        let channel = lanyard_daemon::uds::channel(&served.socket)
            .await
            .expect("connect");
        SpiffeWorkloadApiClient::new(channel)
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancelled streams leak nothing: after clients hang up, the count of stream tasks
    /// goes back to zero; shutdown ends open streams with UNAVAILABLE.
    #[tokio::test]
    async fn cancelled_streams_free_their_tasks_and_shutdown_is_unavailable() {
        let served = serve(mine(), Limits::default()).await;
        let mut client = client(&served).await;
        let mut streams = Vec::new();
        for _ in 0..5 {
            let mut stream = client
                .fetch_x509svid(request())
                .await
                .expect("stream")
                .into_inner();
            let first = stream.message().await.expect("message").expect("first");
            assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/me");
            streams.push(stream);
        }
        assert_eq!(served.open_streams.load(Ordering::SeqCst), 5);
        streams.truncate(1);
        wait_for("cancelled streams end their tasks", || {
            served.open_streams.load(Ordering::SeqCst) == 1
        })
        .await;
        served.trigger.trigger();
        let ended = streams[0]
            .message()
            .await
            .expect_err("ends with an error, never OK");
        assert_eq!(ended.code(), Code::Unavailable);
    }

    /// One user may hold only so many streams; a stream over the cap is refused with a
    /// sentence, and a closed stream gives its place back.
    #[tokio::test]
    async fn streams_over_the_per_uid_cap_are_resource_exhausted() {
        let limits = Limits {
            streams_per_uid: 2,
            ..Limits::default()
        };
        let served = serve(mine(), limits).await;
        let mut client = client(&served).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(
                client
                    .fetch_x509svid(request())
                    .await
                    .expect("within the cap"),
            );
        }
        let refused = client
            .fetch_x509svid(request())
            .await
            .expect_err("over the cap");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(
            refused.message(),
            format!(
                "uid {uid} already holds 2 open Workload API streams, the most one user may; close some and retry"
            )
        );
        open.pop();
        wait_for("the closed stream's task ends", || {
            served.open_streams.load(Ordering::SeqCst) == 1
        })
        .await;
        client
            .fetch_x509svid(request())
            .await
            .expect("a place came back");
    }

    /// A connection with no request in flight is closed after the idle timeout; one with
    /// an open stream is not.
    #[tokio::test]
    async fn idle_connections_are_closed_and_busy_ones_are_not() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let served = serve(mine(), limits).await;
        let mut client = client(&served).await;
        let mut stream = client
            .fetch_x509svid(request())
            .await
            .expect("stream")
            .into_inner();
        stream.message().await.expect("first").expect("message");

        let mut idle = tokio::net::UnixStream::connect(&served.socket)
            .await
            .expect("connect");
        let started = tokio::time::Instant::now();
        // The server's HTTP/2 settings arrive first, then the end of the stream.
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut seen))
            .await
            .expect("closed within the timeout")
            .expect("read");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // The stream's connection is still there: shutdown reaches it as UNAVAILABLE, not
        // as a broken connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        served.trigger.trigger();
        let ended = stream.message().await.expect_err("ends with an error");
        assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
        assert_eq!(ended.message(), "the agent is shutting down");
    }

    /// Connections over the per-uid cap are closed at once; those within it stay.
    #[tokio::test]
    async fn connections_over_the_per_uid_cap_are_closed_at_once() {
        let limits = Limits {
            connections_per_uid: 3,
            ..Limits::default()
        };
        let served = serve(mine(), limits).await;
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(
                tokio::net::UnixStream::connect(&served.socket)
                    .await
                    .expect("connect"),
            );
        }
        let mut closed = 0;
        for conn in &mut conns {
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                Ok(Ok(_)) => {} // the server's HTTP/2 preface: open
                Err(_) => {}    // nothing yet: open
            }
        }
        assert_eq!(closed, 2);
    }
}
