//! The SPIFFE Workload API on the agent's Unix socket. Callers are identified only by
//! what the kernel says about the socket peer (SO_PEERCRED, then /proc), never by
//! anything in the request. Streams send the complete current state on every change
//! and never end with OK: PERMISSION_DENIED when the caller's last identity goes,
//! UNAVAILABLE when the agent shuts down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lanyard_attestors::workload::{PeerCredentials, UnixAttestor};
use lanyard_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use lanyard_proto::workload::*;
use lanyard_proto::{NO_IDENTITY_ISSUED, Selector, TrustDomain, WORKLOAD_SECURITY_HEADER};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::cache::Snapshot;
use crate::sync::SnapshotRx;

/// How long a first request waits for the agent's first sync or a pending SVID before
/// answering UNAVAILABLE (clients retry that).
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(5);

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    trust_domain: TrustDomain,
    cache: SnapshotRx,
    attestor: Arc<UnixAttestor>,
    shutdown: watch::Receiver<bool>,
    open_streams: Arc<AtomicUsize>,
}

/// Counts a stream task for as long as it lives.
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        StreamGuard(Arc::clone(counter))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once shutdown is signalled.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn no_identity() -> Status {
    Status::permission_denied(NO_IDENTITY_ISSUED)
}

fn shutting_down() -> Status {
    Status::unavailable("the agent is shutting down")
}

/// Every call must carry `workload.spiffe.io: true`, exactly once (spec §5.3).
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    let values: Vec<_> = req
        .metadata()
        .get_all(WORKLOAD_SECURITY_HEADER)
        .iter()
        .collect();
    match values.as_slice() {
        [v] if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// What one message would carry; equal keys mean nothing changed for this caller.
#[derive(Debug, PartialEq, Eq)]
struct ViewKey {
    serials: Vec<String>,
    bundle_sequence: u64,
}

/// A caller's X509 view: `Ok(None)` while its SVIDs are still being signed.
fn x509_view(
    snapshot: &Snapshot,
    selectors: &[Selector],
) -> Result<Option<(ViewKey, X509svidResponse)>, Status> {
    let matched: Vec<_> = snapshot.matching(selectors).collect();
    if matched.is_empty() {
        return Err(no_identity());
    }
    let mut hints = HashSet::new();
    let mut svids = Vec::with_capacity(matched.len());
    let mut serials = Vec::with_capacity(matched.len());
    for entry in &matched {
        let Some(svid) = &entry.svid else { continue };
        // A non-empty hint must be unique within a response; the first wins.
        if !entry.hint.is_empty() && !hints.insert(entry.hint.as_str()) {
            continue;
        }
        serials.push(svid.serial.clone());
        svids.push(X509svid {
            spiffe_id: entry.spiffe_id.to_string(),
            x509_svid: svid.chain.clone(),
            x509_svid_key: svid.key.pkcs8_der().to_vec(),
            bundle: snapshot.bundle.to_vec(),
            hint: entry.hint.clone(),
        });
    }
    if svids.is_empty() {
        return Ok(None);
    }
    let key = ViewKey {
        serials,
        bundle_sequence: snapshot.bundle_sequence,
    };
    Ok(Some((
        key,
        X509svidResponse {
            svids,
            crl: vec![],
            federated_bundles: HashMap::new(),
        },
    )))
}

/// A caller's bundle view: its own trust domain's CAs, if it holds any identity.
fn bundles_view(
    td: &TrustDomain,
    snapshot: &Snapshot,
    selectors: &[Selector],
) -> Result<Option<(u64, X509BundlesResponse)>, Status> {
    if snapshot.matching(selectors).next().is_none() {
        return Err(no_identity());
    }
    if snapshot.bundle.is_empty() {
        return Ok(None);
    }
    let bundles = BTreeMap::from([(td.id_string(), snapshot.bundle.to_vec())])
        .into_iter()
        .collect();
    Ok(Some((
        snapshot.bundle_sequence,
        X509BundlesResponse {
            crl: vec![],
            bundles,
        },
    )))
}

/// Attests a caller: inline when only small /proc reads are needed (a thread handoff
/// would cost more than the work), on a blocking thread when a new executable must be
/// hashed.
async fn attest(
    attestor: &Arc<UnixAttestor>,
    peer: PeerCredentials,
) -> Result<Vec<Selector>, Status> {
    let failed = |e: lanyard_attestors::workload::AttestError| {
        tracing::debug!(pid = peer.pid, error = %e, "workload attestation failed");
        Status::unavailable(format!("could not attest the caller: {e}"))
    };
    if let Some(selectors) = attestor.attest_cached(&peer).map_err(failed)? {
        return Ok(selectors);
    }
    let attestor = Arc::clone(attestor);
    tokio::task::spawn_blocking(move || attestor.attest(&peer))
        .await
        .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?
        .map_err(failed)
}

impl WorkloadApi {
    pub fn new(
        trust_domain: TrustDomain,
        cache: SnapshotRx,
        attestor: Arc<UnixAttestor>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        WorkloadApi {
            trust_domain,
            cache,
            attestor,
            shutdown,
            open_streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Stream tasks alive right now (a cancelled stream must bring this back down).
    pub fn open_streams(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.open_streams)
    }

    /// The caller's credentials as the kernel reported them when it connected.
    fn peer<T>(req: &Request<T>) -> Result<PeerCredentials, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| Status::unavailable("cannot read the caller's peer credentials"))?;
        let pid = cred
            .pid()
            .ok_or_else(|| Status::unavailable("the kernel gave no pid for the caller"))?;
        Ok(PeerCredentials {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }

    /// Serves `view` as a stream: first message as soon as there is one (or an error
    /// after FIRST_MESSAGE_WAIT), then one message per change of the caller's view.
    /// The caller is attested again before each later message, so its identity follows
    /// the process (a new program or a changed uid ends or changes what it receives).
    fn stream<K, M, F>(
        &self,
        peer: PeerCredentials,
        selectors: Vec<Selector>,
        view: F,
    ) -> Result<StreamOf<M>, Status>
    where
        K: PartialEq + Send + 'static,
        M: Send + 'static,
        F: Fn(&Snapshot, &[Selector]) -> Result<Option<(K, M)>, Status> + Send + 'static,
    {
        let attestor = Arc::clone(&self.attestor);
        let mut cache = self.cache.clone();
        let mut shutdown = self.shutdown.clone();
        let current = move |cache: &mut SnapshotRx, selectors: &[Selector]| {
            let snapshot = cache.borrow_and_update().clone();
            if snapshot.synced {
                view(&snapshot, selectors)
            } else {
                Ok(None)
            }
        };
        // The first message is built here, before the stream task runs, so it is ready
        // the moment tonic polls the stream.
        let (tx, rx) = mpsc::channel(2);
        let mut last: Option<K> = None;
        if let Some((key, msg)) = current(&mut cache, &selectors)? {
            let _ = tx.try_send(Ok(msg));
            last = Some(key);
        }
        let guard = StreamGuard::new(&self.open_streams);
        tokio::spawn(async move {
            let _guard = guard;
            let first_deadline = tokio::time::Instant::now() + FIRST_MESSAGE_WAIT;
            loop {
                let waiting_first = last.is_none();
                tokio::select! {
                    changed = cache.changed() => if changed.is_err() { let _ = tx.send(Err(shutting_down())).await; return; },
                    () = stopped(&mut shutdown) => { let _ = tx.send(Err(shutting_down())).await; return; }
                    () = tx.closed() => return,
                    () = tokio::time::sleep_until(first_deadline), if waiting_first => {
                        let _ = tx.send(Err(Status::unavailable("SVIDs are not ready yet; retry"))).await;
                        return;
                    }
                }
                let selectors = match attest(&attestor, peer).await {
                    Ok(selectors) => selectors,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                match current(&mut cache, &selectors) {
                    Ok(Some((key, msg))) => {
                        if last.as_ref() != Some(&key) {
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                            last = Some(key);
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let peer = Self::peer(&req)?;
        // An unknown caller gets PERMISSION_DENIED from the stream's first evaluation,
        // as the call's status rather than through the stream.
        let selectors = attest(&self.attestor, peer).await?;
        Ok(Response::new(self.stream(peer, selectors, x509_view)?))
    }

    type FetchX509BundlesStream = StreamOf<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let peer = Self::peer(&req)?;
        let selectors = attest(&self.attestor, peer).await?;
        let td = self.trust_domain.clone();
        Ok(Response::new(self.stream(
            peer,
            selectors,
            move |s, sel| bundles_view(&td, s, sel),
        )?))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not served by this agent yet",
        ))
    }

    type FetchJWTBundlesStream = StreamOf<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT bundles are not served by this agent yet",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT-SVID validation is not served by this agent yet",
        ))
    }

    type FetchWITSVIDStream = StreamOf<WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _req: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    type FetchWITBundlesStream = StreamOf<WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _req: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CachedEntry, Svid};

    fn entry(
        id: &str,
        spiffe: &str,
        selectors: &[&str],
        hint: &str,
        serial: Option<&str>,
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
                    not_after: 10,
                    revision: 0,
                    renew_at_ms: 5000,
                })
            }),
        }
    }

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

    #[test]
    fn view_keeps_entry_order_and_unique_hints() {
        let snap = snapshot(vec![
            entry("a", "spiffe://td/first", &["unix:uid:1"], "web", Some("01")),
            entry(
                "b",
                "spiffe://td/second",
                &["unix:uid:1", "unix:gid:2"],
                "web",
                Some("02"),
            ),
            entry("c", "spiffe://td/third", &["unix:uid:1"], "", Some("03")),
            entry("d", "spiffe://td/other", &["unix:uid:7"], "", Some("04")),
        ]);
        let (key, msg) = x509_view(&snap, &sel(&["unix:uid:1", "unix:gid:2"]))
            .expect("ok")
            .expect("ready");
        let ids: Vec<_> = msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        // "b" repeats hint "web" and is dropped; "d" does not match; order is entry order.
        assert_eq!(ids, ["spiffe://td/first", "spiffe://td/third"]);
        assert_eq!(key.serials, ["01", "03"]);
        assert!(msg.svids.iter().all(|s| s.bundle == [9, 9]));
        assert!(
            msg.federated_bundles.is_empty(),
            "own trust domain never in federated_bundles"
        );
    }

    #[test]
    fn no_match_is_permission_denied_and_pending_is_not_ready() {
        let snap = snapshot(vec![entry("a", "spiffe://td/x", &["unix:uid:1"], "", None)]);
        let err = x509_view(&snap, &sel(&["unix:uid:2"])).expect_err("no identity");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(err.message(), NO_IDENTITY_ISSUED);
        assert!(
            x509_view(&snap, &sel(&["unix:uid:1"]))
                .expect("ok")
                .is_none(),
            "SVID still being signed"
        );
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
        )]);
        let (_, msg) = bundles_view(&td, &snap, &sel(&["unix:uid:1"]))
            .expect("ok")
            .expect("ready");
        assert_eq!(msg.bundles.get("spiffe://example.org"), Some(&vec![9, 9]));
        assert!(bundles_view(&td, &snap, &sel(&["unix:uid:5"])).is_err());
    }

    #[test]
    fn security_header_must_be_exactly_true_once() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        assert!(check_header(&ok).is_ok());
        for bad in ["True", "false", ""] {
            let mut req = Request::new(());
            req.metadata_mut()
                .insert(WORKLOAD_SECURITY_HEADER, bad.parse().expect("value"));
            assert_eq!(
                check_header(&req).expect_err(bad).code(),
                tonic::Code::InvalidArgument
            );
        }
        assert!(check_header(&Request::new(())).is_err());
        let mut twice = Request::new(());
        twice
            .metadata_mut()
            .append(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        twice
            .metadata_mut()
            .append(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
        assert!(check_header(&twice).is_err());
    }

    /// Cancelled streams leak nothing (spec §6 item 21): after clients hang up, the count
    /// of stream tasks goes back to zero; shutdown ends open streams with UNAVAILABLE.
    #[tokio::test]
    async fn cancelled_streams_free_their_tasks_and_shutdown_is_unavailable() {
        use lanyard_attestors::workload::UnixAttestorConfig;
        use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
        use lanyard_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

        let uid = nix::unistd::geteuid().as_raw();
        let me = format!("unix:uid:{uid}");
        let (_cache_tx, cache) = watch::channel(Arc::new(snapshot(vec![entry(
            "a",
            "spiffe://example.org/me",
            &[me.as_str()],
            "",
            Some("01"),
        )])));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let attestor = Arc::new(UnixAttestor::new(UnixAttestorConfig::default()));
        let td = TrustDomain::new("example.org").expect("td");
        let api = WorkloadApi::new(td, cache, attestor, shutdown);
        let open = api.open_streams();
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
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(api))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let request = || {
            let mut req = Request::new(X509svidRequest {});
            req.metadata_mut()
                .insert(WORKLOAD_SECURITY_HEADER, "true".parse().expect("value"));
            req
        };
        let channel = lanyard_daemon::uds::channel(&socket)
            .await
            .expect("connect");
        let mut client = SpiffeWorkloadApiClient::new(channel);
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
        assert_eq!(open.load(Ordering::SeqCst), 5);
        streams.truncate(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) != 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            open.load(Ordering::SeqCst),
            1,
            "cancelled streams must end their tasks"
        );
        shutdown_tx.send(true).expect("shutdown");
        let ended = streams[0]
            .message()
            .await
            .expect_err("ends with an error, never OK");
        assert_eq!(ended.code(), tonic::Code::Unavailable);
    }
}
