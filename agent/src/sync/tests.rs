//! The sync worker against a scripted fake server, under paused time: every timing
//! below is exact, because the worker reads time only from a clock that follows
//! tokio's, and tokio only moves time when every task waits.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lanyard_daemon::fs::{DirMode, PrivateDir};
use lanyard_daemon::shutdown::Trigger;
use lanyard_proto::agent::{SvidRequest, SvidResult, SyncEntriesResponse};
use lanyard_proto::types::{Entry, X509Bundle};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{SnapshotRx, SyncError, SyncStatus, SyncWorker};
use crate::client::{AgentServer, CallError, TlsSetupError};
use crate::identity::{AgentSvid, IdentityFiles, key_and_csr};
use crate::rotation::{Clock, TokioClock};

const START_MS: i64 = 1_800_000_000_000;
const AGENT_ID: &str = "spiffe://example.org/lanyard/agent/join_token/t";

/// A CA that signs like the server: notBefore backdated 10 s, the profile's extensions.
#[derive(Debug)]
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: Vec<u8>,
    serial: u64,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let der = params.self_signed(&key).expect("ca").der().to_vec();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            der,
            serial: 0,
        }
    }

    /// Signs `csr` for `id` (the CSR's own SAN is ignored, as the server does).
    fn sign(&mut self, csr: &[u8], id: &str, now_s: i64, ttl_s: i64) -> Vec<u8> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr);
        let mut req = rcgen::CertificateSigningRequestParams::from_der(&der).expect("csr");
        let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).expect("time");
        self.serial += 1;
        let p = &mut req.params;
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("uri"))];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = at(now_s - 10);
        p.not_after = at(now_s + ttl_s);
        let mut serial = vec![0x01];
        serial.extend(self.serial.to_be_bytes());
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        req.signed_by(&self.issuer).expect("sign").der().to_vec()
    }
}

/// How the fake answers a kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer,
    Unavailable,
    Denied,
}

impl Mode {
    fn fail(self) -> Option<CallError> {
        match self {
            Mode::Answer => None,
            Mode::Unavailable => Some(CallError::from(tonic::Status::unavailable(
                "connection refused",
            ))),
            Mode::Denied => Some(CallError::from(tonic::Status::permission_denied(
                "agent was evicted",
            ))),
        }
    }
}

#[derive(Debug)]
struct State {
    ca: Ca,
    clock: Arc<TokioClock>,
    svid_ttl_s: i64,
    agent_ttl_s: i64,
    /// Entry id -> (SPIFFE ID, revision).
    entries: Vec<(String, String, i64)>,
    bundle_sequence: u64,
    stream: Mode,
    sign: Mode,
    renew: Mode,
    /// Entries the server refuses one by one (a per-result error).
    refuse: HashSet<String>,
    /// Entries signed for another SPIFFE ID than asked (a misbehaving server).
    wrong_id: HashSet<String>,
    sync_calls: Vec<i64>,
    sign_calls: Vec<(i64, Vec<String>)>,
    renew_calls: Vec<i64>,
    authenticated: usize,
    push: Option<mpsc::UnboundedSender<Result<SyncEntriesResponse, tonic::Status>>>,
}

impl State {
    fn message(&self) -> SyncEntriesResponse {
        SyncEntriesResponse {
            entries: self
                .entries
                .iter()
                .map(|(id, spiffe_id, revision)| Entry {
                    id: id.clone(),
                    spiffe_id: spiffe_id.clone(),
                    selectors: vec![lanyard_proto::types::Selector {
                        r#type: "unix".into(),
                        value: "uid:1000".into(),
                    }],
                    revision_number: *revision,
                    ..Entry::default()
                })
                .collect(),
            bundle: Some(X509Bundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![self.ca.der.clone()],
                sequence: self.bundle_sequence,
            }),
        }
    }

    fn now_s(&self) -> i64 {
        self.clock.now_ms().div_euclid(1000)
    }
}

#[derive(Debug, Clone)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("fake state")
    }

    /// Pushes the current entries and bundle on the open stream.
    fn push(&self) {
        let state = self.state();
        let msg = state.message();
        if let Some(tx) = &state.push {
            let _ = tx.send(Ok(msg));
        }
    }

    /// Breaks the open stream as a server going away would.
    fn break_stream(&self) {
        let mut state = self.state();
        if let Some(tx) = state.push.take() {
            let _ = tx.send(Err(tonic::Status::unavailable("server shutting down")));
        }
    }

    fn sign_times(&self, entry: &str) -> Vec<i64> {
        self.state()
            .sign_calls
            .iter()
            .filter(|(_, ids)| ids.iter().any(|id| id == entry))
            .map(|(at, _)| *at)
            .collect()
    }
}

impl AgentServer for Fake {
    type Entries = UnboundedReceiverStream<Result<SyncEntriesResponse, tonic::Status>>;

    async fn sync_entries(&mut self) -> Result<Self::Entries, CallError> {
        let mut state = self.state();
        let now = state.clock.now_ms();
        state.sync_calls.push(now);
        if let Some(e) = state.stream.fail() {
            return Err(e);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Ok(state.message()));
        state.push = Some(tx);
        Ok(UnboundedReceiverStream::new(rx))
    }

    async fn renew_agent(&mut self, csr: Vec<u8>) -> Result<Vec<Vec<u8>>, CallError> {
        let mut state = self.state();
        let now = state.clock.now_ms();
        state.renew_calls.push(now);
        if let Some(e) = state.renew.fail() {
            return Err(e);
        }
        let (now_s, ttl) = (state.now_s(), state.agent_ttl_s);
        Ok(vec![state.ca.sign(&csr, AGENT_ID, now_s, ttl)])
    }

    async fn sign_x509_svids(
        &mut self,
        requests: Vec<SvidRequest>,
    ) -> Result<Vec<SvidResult>, CallError> {
        let mut state = self.state();
        let now = state.clock.now_ms();
        let ids = requests.iter().map(|r| r.entry_id.clone()).collect();
        state.sign_calls.push((now, ids));
        if let Some(e) = state.sign.fail() {
            return Err(e);
        }
        let (now_s, ttl) = (state.now_s(), state.svid_ttl_s);
        Ok(requests
            .into_iter()
            .map(|r| {
                let spiffe_id = state
                    .entries
                    .iter()
                    .find(|(id, ..)| *id == r.entry_id)
                    .map(|(_, s, _)| s.clone());
                match spiffe_id {
                    Some(_) if state.refuse.contains(&r.entry_id) => SvidResult {
                        entry_id: r.entry_id,
                        x509_svid_chain: vec![],
                        error: "not authorized".into(),
                    },
                    Some(spiffe_id) => {
                        let id = if state.wrong_id.contains(&r.entry_id) {
                            "spiffe://example.org/someone-else".to_string()
                        } else {
                            spiffe_id
                        };
                        SvidResult {
                            x509_svid_chain: vec![state.ca.sign(&r.csr, &id, now_s, ttl)],
                            entry_id: r.entry_id,
                            error: String::new(),
                        }
                    }
                    None => SvidResult {
                        entry_id: r.entry_id,
                        x509_svid_chain: vec![],
                        error: "no such entry".into(),
                    },
                }
            })
            .collect())
    }

    fn authenticate(
        &mut self,
        _agent: &AgentSvid,
        _roots: &[Vec<u8>],
    ) -> Result<(), TlsSetupError> {
        self.state().authenticated += 1;
        Ok(())
    }
}

/// A running worker, its fake server and what it publishes.
struct Setup {
    fake: Fake,
    clock: Arc<TokioClock>,
    snapshots: SnapshotRx,
    status: watch::Receiver<SyncStatus>,
    trigger: Trigger,
    task: tokio::task::JoinHandle<Result<(), SyncError>>,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

struct Options {
    entries: Vec<(&'static str, &'static str)>,
    svid_ttl_s: i64,
    agent_ttl_s: i64,
    seed: u64,
    stream: Mode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            entries: vec![("e1", "spiffe://example.org/w1")],
            svid_ttl_s: 100,
            agent_ttl_s: 100_000,
            seed: 7,
            stream: Mode::Answer,
        }
    }
}

fn start(options: Options) -> Setup {
    let clock = Arc::new(TokioClock::starting_at(START_MS));
    let mut ca = Ca::new();
    let agent_id = lanyard_proto::SpiffeId::parse(AGENT_ID).expect("id");
    let (key, csr) = key_and_csr(Some(&agent_id)).expect("key");
    let now_s = clock.now_ms() / 1000;
    let leaf = ca.sign(&csr, AGENT_ID, now_s, options.agent_ttl_s);
    let info = lanyard_proto::svid::check_leaf(&leaf, None).expect("agent svid");
    let agent = AgentSvid {
        spiffe_id: agent_id,
        chain: vec![leaf],
        key,
        not_before: info.not_before,
        not_after: info.not_after,
    };
    let roots = vec![ca.der.clone()];
    let tmp = tempfile::tempdir().expect("tmp");
    let data_dir = tmp.path().join("data");
    let dir = Arc::new(PrivateDir::open_or_create(&data_dir, DirMode::Private).expect("dir"));
    let files = IdentityFiles::new(dir);
    files.store(&agent, &roots).expect("store");
    let fake = Fake(Arc::new(Mutex::new(State {
        ca,
        clock: Arc::clone(&clock),
        svid_ttl_s: options.svid_ttl_s,
        agent_ttl_s: options.agent_ttl_s,
        entries: options
            .entries
            .iter()
            .map(|(id, spiffe)| (id.to_string(), spiffe.to_string(), 1))
            .collect(),
        bundle_sequence: 1,
        stream: options.stream,
        sign: Mode::Answer,
        renew: Mode::Answer,
        refuse: HashSet::new(),
        wrong_id: HashSet::new(),
        sync_calls: vec![],
        sign_calls: vec![],
        renew_calls: vec![],
        authenticated: 0,
        push: None,
    })));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let (worker, snapshots, status) = SyncWorker::new(fake.clone(), files, agent, roots, dyn_clock);
    let worker = worker.with_rng(fastrand::Rng::with_seed(options.seed));
    let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
    let task = tokio::spawn(worker.run(shutdown));
    Setup {
        fake,
        clock,
        snapshots,
        status,
        trigger,
        task,
        data_dir,
        _tmp: tmp,
    }
}

/// What the snapshot serves for `entry`: (serial, not_after, revision).
fn served(snapshots: &SnapshotRx, entry: &str) -> Option<(String, i64, i64)> {
    let snap = snapshots.borrow();
    snap.entries
        .iter()
        .find(|e| e.id == entry)
        .and_then(|e| e.svid.as_ref())
        .map(|s| (s.serial.clone(), s.not_after, s.revision))
}

/// Waits (in paused time, so instantly in real time) until `pred` holds for the
/// snapshot; fails after an hour of simulated time.
async fn until(setup: &mut Setup, what: &str, pred: impl Fn(&SnapshotRx) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        if pred(&setup.snapshots) {
            return;
        }
        tokio::select! {
            changed = setup.snapshots.changed() => changed.expect("worker alive"),
            () = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Lets simulated time pass until `at_ms` on the worker's clock.
async fn sleep_until_ms(clock: &TokioClock, at_ms: i64) {
    let delta = at_ms - clock.now_ms();
    assert!(delta >= 0, "{at_ms} is in the past");
    tokio::time::sleep(Duration::from_millis(delta as u64)).await;
}

async fn stop(setup: Setup) -> Result<(), SyncError> {
    setup.trigger.trigger();
    setup.task.await.expect("worker task")
}

#[tokio::test(start_paused = true)]
async fn workload_svids_renew_at_half_life_within_jitter_bounds() {
    for seed in [1, 2, 3, 42, 4242] {
        let mut s = start(Options {
            seed,
            ..Options::default()
        });
        until(&mut s, "the first SVID", |snap| {
            served(snap, "e1").is_some()
        })
        .await;
        let (first, not_after, _) = served(&s.snapshots, "e1").expect("svid");
        let t0 = s.fake.sign_times("e1")[0];
        assert_eq!(t0, START_MS, "the first SVID is signed at once");
        until(&mut s, "the renewed SVID", |snap| {
            served(snap, "e1").is_some_and(|(serial, ..)| serial != first)
        })
        .await;
        let t1 = s.fake.sign_times("e1")[1];
        // Half the lifetime left at receipt, minus up to a tenth of it as jitter.
        let remaining = not_after * 1000 - t0;
        let (earliest, latest) = (t0 + remaining / 2 - remaining / 10, t0 + remaining / 2);
        assert!(
            (earliest..=latest).contains(&t1),
            "seed {seed}: renewed {} ms after receipt, expected {}..={}",
            t1 - t0,
            earliest - t0,
            latest - t0
        );
        assert_eq!(
            s.fake.sign_times("e1").len(),
            2,
            "one renewal, no busy loop"
        );
        stop(s).await.expect("clean stop");
    }
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_renewals_of_a_fleet() {
    let mut times = HashSet::new();
    for seed in 0..8 {
        let mut s = start(Options {
            seed,
            ..Options::default()
        });
        until(&mut s, "the first SVID", |snap| {
            served(snap, "e1").is_some()
        })
        .await;
        let (first, ..) = served(&s.snapshots, "e1").expect("svid");
        until(&mut s, "the renewal", |snap| {
            served(snap, "e1").is_some_and(|(serial, ..)| serial != first)
        })
        .await;
        times.insert(s.fake.sign_times("e1")[1]);
        stop(s).await.expect("stop");
    }
    assert!(
        times.len() >= 6,
        "jitter did not spread renewals: {times:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_entry_backs_off_with_a_cap_and_does_not_hold_up_others() {
    let mut s = start(Options {
        entries: vec![
            ("good", "spiffe://example.org/good"),
            ("bad", "spiffe://example.org/bad"),
        ],
        svid_ttl_s: 3600,
        ..Options::default()
    });
    s.fake.state().refuse.insert("bad".into());
    until(&mut s, "the good SVID", |snap| {
        served(snap, "good").is_some()
    })
    .await;
    sleep_until_ms(&s.clock, START_MS + 200_000).await;
    let times = s.fake.sign_times("bad");
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        &gaps[..8],
        &[1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000],
        "backoff doubles from 1 s and is capped at 30 s: {gaps:?}"
    );
    assert!(served(&s.snapshots, "bad").is_none());
    assert_eq!(
        s.fake.sign_times("good"),
        vec![START_MS],
        "the good entry was signed once, not with every retry of the bad one"
    );
    // Per-entry refusals are not an outage.
    assert_eq!(s.status.borrow().unreachable, None);
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_is_re_signed_and_the_old_svid_served_meanwhile() {
    let mut s = start(Options::default());
    until(&mut s, "the first SVID", |snap| {
        served(snap, "e1").is_some()
    })
    .await;
    let (first, _, revision) = served(&s.snapshots, "e1").expect("svid");
    assert_eq!(revision, 1);
    sleep_until_ms(&s.clock, START_MS + 5_000).await;

    // The entry changes while signing fails: the old SVID keeps being served.
    s.fake.state().sign = Mode::Unavailable;
    s.fake.state().entries[0].2 = 2;
    s.fake.push();
    let fake = s.fake.clone();
    until(&mut s, "the new revision and a signing attempt", |snap| {
        snap.borrow()
            .entries
            .first()
            .is_some_and(|e| e.revision == 2)
            && fake.sign_times("e1").len() == 2
    })
    .await;
    assert_eq!(
        s.fake.sign_times("e1").last(),
        Some(&(START_MS + 5_000)),
        "re-signing starts as soon as the revision changes"
    );
    let (serial, _, revision) = served(&s.snapshots, "e1").expect("still served");
    assert_eq!(
        (serial, revision),
        (first.clone(), 1),
        "the old SVID is served meanwhile"
    );

    s.fake.state().sign = Mode::Answer;
    until(&mut s, "the re-signed SVID", |snap| {
        served(snap, "e1").is_some_and(|(_, _, revision)| revision == 2)
    })
    .await;
    assert_eq!(
        s.clock.now_ms(),
        START_MS + 6_000,
        "retried after the first backoff step"
    );
    assert_ne!(served(&s.snapshots, "e1").expect("svid").0, first);
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_valid_svid_is_served_while_renewal_fails_and_dropped_at_not_after() {
    let mut s = start(Options {
        svid_ttl_s: 60,
        ..Options::default()
    });
    until(&mut s, "the first SVID", |snap| {
        served(snap, "e1").is_some()
    })
    .await;
    let (serial, not_after, _) = served(&s.snapshots, "e1").expect("svid");
    // The server goes away entirely.
    {
        let mut state = s.fake.state();
        state.sign = Mode::Unavailable;
        state.stream = Mode::Unavailable;
    }
    s.fake.break_stream();

    sleep_until_ms(&s.clock, not_after * 1000 - 1).await;
    assert_eq!(
        served(&s.snapshots, "e1").map(|(s, ..)| s),
        Some(serial),
        "a valid SVID keeps being served while renewal fails"
    );
    assert!(
        s.fake.sign_times("e1").len() > 2,
        "renewal was retried during the outage"
    );
    let unreachable = s
        .status
        .borrow()
        .unreachable
        .clone()
        .expect("outage noticed");
    assert!(unreachable.since_ms <= START_MS + 30_000, "{unreachable:?}");
    assert!(
        unreachable.error.contains("connection refused"),
        "{unreachable:?}"
    );

    until(&mut s, "the expired SVID to go", |snap| {
        served(snap, "e1").is_none()
    })
    .await;
    assert_eq!(
        s.clock.now_ms(),
        not_after * 1000,
        "dropped exactly at notAfter, not a moment later"
    );
    assert_eq!(s.status.borrow().lapsed, 1);
    // The entry itself stays (it is still authorized), and renewal keeps being tried.
    assert_eq!(s.snapshots.borrow().entries.len(), 1);

    // The server returns: the stream reconnects and the entry is signed at once.
    {
        let mut state = s.fake.state();
        state.sign = Mode::Answer;
        state.stream = Mode::Answer;
    }
    until(&mut s, "recovery", |snap| served(snap, "e1").is_some()).await;
    let reconnected = *s.fake.state().sync_calls.last().expect("sync");
    assert_eq!(
        s.fake.sign_times("e1").last(),
        Some(&reconnected),
        "per-entry backoff is reset when the server is back"
    );
    assert_eq!(s.status.borrow().lapsed, 0);
    assert_eq!(s.status.borrow().unreachable, None);
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn eviction_stops_the_worker_and_forgets_the_identity() {
    let mut s = start(Options {
        svid_ttl_s: 60,
        ..Options::default()
    });
    until(&mut s, "the first SVID", |snap| {
        served(snap, "e1").is_some()
    })
    .await;
    s.fake.state().sign = Mode::Denied;
    let outcome = tokio::time::timeout(Duration::from_secs(120), &mut s.task)
        .await
        .expect("the worker stops")
        .expect("task");
    let err = outcome.expect_err("rejected");
    assert!(matches!(err, SyncError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("evicted"), "{err}");
    assert!(!s.data_dir.join("agent_svid.key").exists());
    assert!(!s.data_dir.join("agent_svid.pem").exists());

    // The same on the stream itself.
    let s = start(Options {
        stream: Mode::Denied,
        ..Options::default()
    });
    let err = s.task.await.expect("task").expect_err("rejected");
    assert!(matches!(err, SyncError::Rejected(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_svid_for_another_id_is_refused_not_served() {
    let mut s = start(Options {
        entries: vec![
            ("e1", "spiffe://example.org/w1"),
            ("e2", "spiffe://example.org/w2"),
        ],
        ..Options::default()
    });
    s.fake.state().wrong_id.insert("e1".into());
    until(&mut s, "e2's SVID", |snap| served(snap, "e2").is_some()).await;
    sleep_until_ms(&s.clock, START_MS + 10_000).await;
    assert!(served(&s.snapshots, "e1").is_none());
    assert!(s.fake.sign_times("e1").len() >= 3, "retried with backoff");
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn the_agent_svid_renews_at_half_life_and_the_stream_reconnects_with_it() {
    let mut s = start(Options {
        agent_ttl_s: 100,
        svid_ttl_s: 10_000,
        ..Options::default()
    });
    until(&mut s, "the first SVID", |snap| {
        served(snap, "e1").is_some()
    })
    .await;
    let before = std::fs::read(s.data_dir.join("agent_svid.pem")).expect("stored");
    let first_not_after = s.status.borrow().agent_not_after;
    let mut status = s.status.clone();
    status
        .wait_for(|st| st.agent_not_after != first_not_after)
        .await
        .expect("renewed");
    let renewed_at = s.fake.state().renew_calls[0];
    let remaining = first_not_after * 1000 - START_MS;
    assert!(
        (START_MS + remaining * 4 / 10..=START_MS + remaining / 2).contains(&renewed_at),
        "renewed {} ms after start of a {remaining} ms life",
        renewed_at - START_MS
    );
    tokio::task::yield_now().await;
    let (authenticated, reopened) = {
        let state = s.fake.state();
        (state.authenticated, state.sync_calls.len())
    };
    assert_eq!(authenticated, 1, "later calls use the new SVID");
    assert_eq!(reopened, 2, "the stream reopened with the new SVID");
    assert_ne!(
        std::fs::read(s.data_dir.join("agent_svid.pem")).expect("stored"),
        before
    );
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_failing_agent_renewal_backs_off_and_keeps_the_current_svid() {
    let s = start(Options {
        agent_ttl_s: 100,
        svid_ttl_s: 10_000,
        ..Options::default()
    });
    s.fake.state().renew = Mode::Unavailable;
    let first_not_after = s.status.borrow().agent_not_after;
    sleep_until_ms(&s.clock, first_not_after * 1000 - 1000).await;
    let calls = s.fake.state().renew_calls.clone();
    let gaps: Vec<i64> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(calls.len() >= 4, "{calls:?}");
    assert_eq!(&gaps[..3], &[1000, 2000, 4000], "{gaps:?}");
    assert_eq!(s.status.borrow().agent_not_after, first_not_after);
    assert!(s.status.borrow().unreachable.is_some());
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_bundle_change_is_published_stored_and_authenticates_the_server() {
    let mut s = start(Options::default());
    until(&mut s, "the first SVID", |snap| {
        served(snap, "e1").is_some()
    })
    .await;
    // A second CA joins the bundle (as in a CA rotation).
    let mut msg = {
        let mut state = s.fake.state();
        state.bundle_sequence = 2;
        state.message()
    };
    let bundle = msg.bundle.as_mut().expect("bundle");
    bundle.x509_authorities.push(Ca::new().der);
    let want = bundle.x509_authorities.concat();
    s.fake
        .state()
        .push
        .as_ref()
        .expect("stream")
        .send(Ok(msg))
        .expect("push");
    until(&mut s, "the new bundle", |snap| {
        snap.borrow().bundle_sequence == 2
    })
    .await;
    assert_eq!(*s.snapshots.borrow().bundle, want);
    assert_eq!(
        s.fake.state().authenticated,
        1,
        "the new roots authenticate the server"
    );
    let stored = std::fs::read_to_string(s.data_dir.join("bundle.pem")).expect("bundle.pem");
    assert_eq!(stored.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(!stored.contains('\r'), "PEM with LF line endings");
    // The SVID signed by the CA that stayed keeps being served.
    assert!(served(&s.snapshots, "e1").is_some());
    stop(s).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_worker_during_an_outage() {
    let s = start(Options {
        stream: Mode::Unavailable,
        ..Options::default()
    });
    sleep_until_ms(&s.clock, START_MS + 10_000).await;
    assert!(
        s.fake.state().sync_calls.len() >= 3,
        "reconnects with backoff"
    );
    assert!(!s.snapshots.borrow().synced);
    stop(s).await.expect("clean stop during an outage");
}
