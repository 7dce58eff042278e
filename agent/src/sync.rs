//! The sync worker: one task owns the agent's SVID and every workload SVID. It keeps a
//! server-push stream of authorized entries open, signs what is missing or due for
//! rotation in batches, verifies what it receives, and publishes snapshots. A still
//! valid SVID keeps being served while renewal fails; an SVID is dropped at its
//! notAfter, never served past it.
//!
//! It reaches the server only through [`AgentServer`] and reads time only from its
//! [`Clock`], so renewal, backoff, revision and eviction are tested against a fake
//! server under paused time (see the tests below).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lanyard_daemon::shutdown::Shutdown;
use lanyard_proto::agent::{SvidRequest, SyncEntriesResponse};
use lanyard_proto::{Selector, SpiffeId, svid};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::cache::{CachedEntry, Snapshot, Svid};
use crate::client::{AgentServer, CallError, TlsSetupError};
use crate::identity::{AgentSvid, IdentityFiles, PrivateKey, key_and_csr};
use crate::rotation::{Clock, instant_at, renew_at_ms, retry_delay};

/// The server caps batches at this many CSRs.
const MAX_BATCH: usize = 1000;

/// Why the worker stopped for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error(
        "the server no longer accepts this agent ({}); it was evicted or its SVID expired: start it again with a new join token",
        .0.message()
    )]
    Rejected(tonic::Status),
    #[error("stored agent identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot make a key and CSR: {0}")]
    Keys(#[from] rcgen::Error),
    #[error("key generation task failed: {0}")]
    KeyTask(#[from] tokio::task::JoinError),
}

/// A received SVID that must not be served.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error("server returned no certificate")]
    Empty,
    #[error("not a valid X509-SVID: {0}")]
    Profile(#[from] svid::ProfileError),
    #[error("certificate is for {got}, expected {want}")]
    WrongId { got: SpiffeId, want: SpiffeId },
    #[error("certificate does not carry our key")]
    WrongKey,
    #[error("certificate does not chain to the trust bundle")]
    Untrusted,
    #[error("certificate expired on arrival")]
    Expired,
}

/// Checks a signed chain before it is served: SVID profile, the ID asked for, our key,
/// a signature by one of the bundle's CAs, and that it is still valid.
fn verify_received(
    chain: &[Vec<u8>],
    want: &SpiffeId,
    public_key: &[u8],
    roots: &[Vec<u8>],
    now_ms: i64,
) -> Result<svid::LeafInfo, Unusable> {
    let leaf = chain.first().ok_or(Unusable::Empty)?;
    let info = svid::check_leaf(leaf, None)?;
    if info.spiffe_id != *want {
        return Err(Unusable::WrongId {
            got: info.spiffe_id,
            want: want.clone(),
        });
    }
    if info.not_after * 1000 <= now_ms {
        return Err(Unusable::Expired);
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| Unusable::Empty)?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(Unusable::WrongKey);
    }
    // Walk up through any intermediates; the top must be signed by a bundle root.
    let mut child = cert;
    for der in &chain[1..] {
        let (_, parent) =
            x509_parser::parse_x509_certificate(der).map_err(|_| Unusable::Untrusted)?;
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| Unusable::Untrusted)?;
        child = parent;
    }
    let trusted = roots.iter().any(|root| {
        x509_parser::parse_x509_certificate(root)
            .is_ok_and(|(_, r)| child.verify_signature(Some(r.public_key())).is_ok())
    });
    if !trusted {
        return Err(Unusable::Untrusted);
    }
    Ok(info)
}

/// The public key bytes (SubjectPublicKeyInfo bit string) of a PKCS#8 P-256 key.
fn public_key_of(key: &PrivateKey) -> Vec<u8> {
    rcgen::KeyPair::try_from(key.pkcs8_der())
        .map(|k| k.public_key_raw().to_vec())
        .unwrap_or_default()
}

/// Handle for the Workload API: the latest snapshot and its changes.
pub type SnapshotRx = watch::Receiver<Arc<Snapshot>>;

/// The server has not answered since `since_ms` (Unix ms); `error` is the last failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    pub since_ms: i64,
    pub error: String,
}

/// What the worker knows about its link to the server and its own SVID, for readiness
/// (the workload SVIDs themselves are in the [`Snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncStatus {
    /// Set while calls to the server fail; cleared by the next one that succeeds.
    pub unreachable: Option<Unreachable>,
    /// The agent's own SVID validity, Unix seconds, and when it was due for renewal
    /// (Unix ms; a failed renewal does not move this).
    pub agent_not_before: i64,
    pub agent_not_after: i64,
    pub agent_renew_at_ms: i64,
    /// Entries whose SVID expired before it could be renewed, and still have none.
    pub lapsed: usize,
}

/// When an entry may be tried again after failures.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at_ms: i64,
    failures: u32,
}

/// What one round of signing did, for one log line.
#[derive(Debug, Default)]
struct Signed {
    new: usize,
    renewed: usize,
    updated: usize,
    failed: usize,
}

/// Whether to keep following the entry stream.
enum Flow {
    Stop,
    Reconnect,
}

/// The worker's state.
#[derive(Debug)]
pub struct SyncWorker<S> {
    server: S,
    files: IdentityFiles,
    agent: AgentSvid,
    agent_renew_at_ms: i64,
    agent_failures: u32,
    roots: Vec<Vec<u8>>,
    bundle_sequence: u64,
    entries: Vec<CachedEntry>,
    retry: HashMap<String, Retry>,
    lapsed: HashSet<String>,
    synced: bool,
    clock: Arc<dyn Clock>,
    rng: fastrand::Rng,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<SyncStatus>,
}

impl<S: AgentServer> SyncWorker<S> {
    /// A worker for `agent`, its `roots`, and a connection to the server. Returns the
    /// worker, its snapshots (for the Workload API) and its status (for readiness).
    pub fn new(
        server: S,
        files: IdentityFiles,
        agent: AgentSvid,
        roots: Vec<Vec<u8>>,
        clock: Arc<dyn Clock>,
    ) -> (Self, SnapshotRx, watch::Receiver<SyncStatus>) {
        let (snapshots, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut rng = fastrand::Rng::new();
        let agent_renew_at_ms = renew_at_ms(clock.now_ms(), agent.not_after, rng.f64());
        let (status, status_rx) = watch::channel(SyncStatus {
            agent_not_before: agent.not_before,
            agent_not_after: agent.not_after,
            agent_renew_at_ms,
            ..SyncStatus::default()
        });
        let worker = SyncWorker {
            server,
            files,
            agent,
            agent_renew_at_ms,
            agent_failures: 0,
            roots,
            bundle_sequence: 0,
            entries: vec![],
            retry: HashMap::new(),
            lapsed: HashSet::new(),
            synced: false,
            clock,
            rng,
            snapshots,
            status,
        };
        (worker, snapshot_rx, status_rx)
    }

    /// Draws renewal jitter from `rng` (tests seed it).
    pub fn with_rng(mut self, rng: fastrand::Rng) -> Self {
        self.rng = rng;
        self.agent_renew_at_ms =
            renew_at_ms(self.clock.now_ms(), self.agent.not_after, self.rng.f64());
        let at = self.agent_renew_at_ms;
        self.status.send_modify(|s| s.agent_renew_at_ms = at);
        self
    }

    /// Runs until `shutdown` or until the server rejects the agent.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<(), SyncError> {
        let mut failures = 0u32;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            let opened = tokio::select! {
                () = shutdown.wait() => return Ok(()),
                opened = self.server.sync_entries() => opened,
            };
            match opened {
                Ok(stream) => {
                    self.reached_server();
                    match self.follow(stream, &shutdown, &mut failures).await? {
                        Flow::Stop => return Ok(()),
                        Flow::Reconnect => {}
                    }
                }
                Err(CallError::Refused(status)) => return Err(self.rejected(status)),
                Err(e) => {
                    self.unreachable(&e);
                    let delay = retry_delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the server; serving cached SVIDs");
                    // Renewal attempts and expiry go on while the stream is down.
                    let until_ms = self.clock.now_ms() + delay.as_millis() as i64;
                    while self.clock.now_ms() < until_ms {
                        let wake = instant_at(&*self.clock, until_ms.min(self.next_due_ms()));
                        tokio::select! {
                            () = shutdown.wait() => return Ok(()),
                            () = tokio::time::sleep_until(wake) => { self.tick().await?; }
                        }
                    }
                }
            }
        }
    }

    /// Follows an open entry stream until it ends, the agent SVID is renewed (the stream
    /// was authenticated with the old one) or shutdown.
    async fn follow(
        &mut self,
        mut stream: S::Entries,
        shutdown: &Shutdown,
        failures: &mut u32,
    ) -> Result<Flow, SyncError> {
        loop {
            let wake = instant_at(&*self.clock, self.next_due_ms());
            tokio::select! {
                () = shutdown.wait() => return Ok(Flow::Stop),
                msg = stream.next() => match msg {
                    Some(Ok(msg)) => {
                        // Only a stream that delivers resets the reconnect backoff, so a
                        // server that accepts and drops at once is not hammered.
                        *failures = 0;
                        self.apply(msg)?;
                        if self.tick().await? {
                            return Ok(Flow::Reconnect);
                        }
                    }
                    None => {
                        tracing::info!("the server closed the entry stream; reconnecting");
                        return Ok(Flow::Reconnect);
                    }
                    Some(Err(status)) => match CallError::from(status) {
                        CallError::Refused(status) => return Err(self.rejected(status)),
                        e => {
                            self.unreachable(&e);
                            tracing::warn!(error = %e, "the entry stream broke; reconnecting");
                            return Ok(Flow::Reconnect);
                        }
                    },
                },
                () = tokio::time::sleep_until(wake) => {
                    if self.tick().await? {
                        return Ok(Flow::Reconnect);
                    }
                }
            }
        }
    }

    fn rejected(&self, status: tonic::Status) -> SyncError {
        self.files.forget();
        SyncError::Rejected(status)
    }

    /// A call succeeded: the server is back (if it was away), and every entry that was
    /// backing off may be tried at once, so workloads catch up right after an outage.
    fn reached_server(&mut self) {
        let was = self.status.borrow().unreachable.clone();
        if let Some(was) = was {
            let away_s = (self.clock.now_ms() - was.since_ms).max(0) / 1000;
            tracing::info!(
                unreachable_for_s = away_s,
                "reached the server again; catching up"
            );
            self.retry.clear();
            self.status.send_modify(|s| s.unreachable = None);
        }
    }

    /// A call failed: the server is unreachable since the first failure in a row.
    fn unreachable(&mut self, e: &CallError) {
        let now = self.clock.now_ms();
        self.status.send_if_modified(|s| match &mut s.unreachable {
            Some(u) if u.error == e.to_string() => false,
            Some(u) => {
                u.error = e.to_string();
                true
            }
            None => {
                s.unreachable = Some(Unreachable {
                    since_ms: now,
                    error: e.to_string(),
                });
                true
            }
        });
    }

    /// The earliest moment (Unix ms) something needs doing: a renewal, a missing SVID,
    /// a retry, or an SVID to drop at its notAfter.
    fn next_due_ms(&self) -> i64 {
        let now = self.clock.now_ms();
        let mut at = self.agent_renew_at_ms;
        for e in &self.entries {
            let due = match &e.svid {
                Some(s) if s.revision == e.revision => {
                    at = at.min(s.not_after * 1000);
                    s.renew_at_ms
                }
                Some(s) => {
                    at = at.min(s.not_after * 1000);
                    now
                }
                None => now,
            };
            let due = self.retry.get(&e.id).map_or(due, |r| due.max(r.at_ms));
            at = at.min(due);
        }
        at
    }

    /// Does whatever is due: renews the agent SVID, signs missing and due workload
    /// SVIDs, drops expired ones. Returns whether the agent SVID was renewed.
    async fn tick(&mut self) -> Result<bool, SyncError> {
        let renewed = self.renew_agent_if_due().await?;
        self.drop_expired();
        self.sign_due().await?;
        self.drop_expired();
        Ok(renewed)
    }

    /// Drops every workload SVID at or past its notAfter and publishes the smaller set.
    fn drop_expired(&mut self) {
        let now = self.clock.now_ms();
        let mut dropped = 0;
        for e in &mut self.entries {
            if e.svid.as_ref().is_some_and(|s| s.not_after * 1000 <= now) {
                e.svid = None;
                self.lapsed.insert(e.id.clone());
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "dropped workload X509-SVIDs that expired before they could be renewed"
            );
            self.publish();
        }
    }

    fn publish(&self) {
        let snapshot = Snapshot {
            synced: self.synced,
            entries: self.entries.clone(),
            bundle: Arc::new(self.roots.concat()),
            bundle_sequence: self.bundle_sequence,
        };
        self.snapshots.send_replace(Arc::new(snapshot));
        let lapsed = self.lapsed.len();
        self.status.send_if_modified(|s| {
            let changed = s.lapsed != lapsed;
            s.lapsed = lapsed;
            changed
        });
    }

    /// Takes in a pushed entry set and bundle.
    fn apply(&mut self, msg: SyncEntriesResponse) -> Result<(), SyncError> {
        if let Some(bundle) = msg.bundle.filter(|b| !b.x509_authorities.is_empty()) {
            self.bundle_sequence = bundle.sequence;
            // The first message after a start carries the roots the agent already has.
            if bundle.x509_authorities != self.roots {
                self.roots = bundle.x509_authorities;
                // A failed write is not fatal: the roots are in memory, and the next
                // bundle change or renewal writes the files again.
                if let Err(e) = self.files.store(&self.agent, &self.roots) {
                    tracing::warn!(error = %e, "cannot persist the new trust bundle");
                }
                // New roots also authenticate the server from now on.
                self.server.authenticate(&self.agent, &self.roots)?;
            }
        }
        let mut old: HashMap<String, CachedEntry> =
            self.entries.drain(..).map(|e| (e.id.clone(), e)).collect();
        for raw in msg.entries {
            let parsed = SpiffeId::parse(&raw.spiffe_id)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    raw.selectors
                        .iter()
                        .map(|s| Selector::try_from(s).map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|sel| (id, sel))
                });
            let (spiffe_id, selectors) = match parsed {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(entry = %raw.id, %why, "ignoring an entry the server sent");
                    continue;
                }
            };
            // An updated entry keeps serving its current SVID until the re-signed one
            // arrives (sign_due sees the revision changed), unless its ID changed.
            let svid = old
                .remove(&raw.id)
                .filter(|e| e.spiffe_id == spiffe_id)
                .and_then(|e| e.svid);
            self.entries.push(CachedEntry {
                id: raw.id,
                spiffe_id,
                selectors,
                hint: raw.hint,
                revision: raw.revision_number,
                svid,
            });
        }
        let live: HashSet<&str> = self.entries.iter().map(|e| e.id.as_str()).collect();
        self.retry.retain(|id, _| live.contains(id.as_str()));
        self.lapsed.retain(|id| live.contains(id.as_str()));
        self.synced = true;
        self.publish();
        Ok(())
    }

    /// Renews the agent SVID when due. A failure other than a rejection is retried with
    /// a capped backoff; the current SVID stays in use meanwhile.
    async fn renew_agent_if_due(&mut self) -> Result<bool, SyncError> {
        let now = self.clock.now_ms();
        if now < self.agent_renew_at_ms {
            return Ok(false);
        }
        let id = self.agent.spiffe_id.clone();
        let (key, csr) = key_and_csr(Some(&id))?;
        let why = match self.server.renew_agent(csr).await {
            Ok(chain) => {
                self.reached_server();
                let now = self.clock.now_ms();
                match verify_received(&chain, &id, &public_key_of(&key), &self.roots, now) {
                    Ok(info) => {
                        let agent = AgentSvid {
                            spiffe_id: id,
                            chain,
                            key,
                            not_before: info.not_before,
                            not_after: info.not_after,
                        };
                        match self.files.store(&agent, &self.roots) {
                            Ok(()) => {
                                self.server.authenticate(&agent, &self.roots)?;
                                self.agent_renew_at_ms =
                                    renew_at_ms(now, agent.not_after, self.rng.f64());
                                self.agent = agent;
                                self.agent_failures = 0;
                                let renew_at = self.agent_renew_at_ms;
                                self.status.send_modify(|s| {
                                    s.agent_not_before = info.not_before;
                                    s.agent_not_after = info.not_after;
                                    s.agent_renew_at_ms = renew_at;
                                });
                                tracing::info!(serial = %info.serial_hex, not_after = %lanyard_daemon::output::rfc3339(info.not_after), "renewed the agent SVID");
                                return Ok(true);
                            }
                            Err(e) => format!("cannot store it: {e}"),
                        }
                    }
                    Err(e) => format!("refusing what the server returned: {e}"),
                }
            }
            Err(CallError::Refused(status)) => return Err(self.rejected(status)),
            Err(e) => {
                self.unreachable(&e);
                e.to_string()
            }
        };
        let delay = retry_delay(self.agent_failures);
        self.agent_failures = self.agent_failures.saturating_add(1);
        tracing::warn!(%why, retry_in = ?delay, "agent SVID renewal failed; retrying");
        self.agent_renew_at_ms = self.clock.now_ms() + delay.as_millis() as i64;
        Ok(false)
    }

    /// Signs every workload SVID that is missing, due for renewal, or signed for an
    /// older revision of its entry, unless it is backing off; logs one line per round.
    async fn sign_due(&mut self) -> Result<(), SyncError> {
        let now = self.clock.now_ms();
        let due: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let e = &self.entries[i];
                let wanted = e
                    .svid
                    .as_ref()
                    .is_none_or(|s| now >= s.renew_at_ms || s.revision != e.revision);
                wanted && self.retry.get(&e.id).is_none_or(|r| now >= r.at_ms)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut signed = Signed::default();
        for chunk in due.chunks(MAX_BATCH) {
            self.sign_batch(chunk, &mut signed).await?;
        }
        self.publish();
        // One line per round that signed anything; a round where every request failed
        // was already logged with its cause.
        if signed.new + signed.renewed + signed.updated > 0 {
            tracing::info!(
                new = signed.new,
                renewed = signed.renewed,
                updated = signed.updated,
                failed = signed.failed,
                lapsed = self.lapsed.len(),
                "signed workload X509-SVIDs"
            );
        }
        Ok(())
    }

    async fn sign_batch(
        &mut self,
        indexes: &[usize],
        signed: &mut Signed,
    ) -> Result<(), SyncError> {
        let ids: Vec<(String, SpiffeId)> = indexes
            .iter()
            .map(|&i| {
                (
                    self.entries[i].id.clone(),
                    self.entries[i].spiffe_id.clone(),
                )
            })
            .collect();
        // Key generation is CPU work; keep it off the async workers.
        let keyed = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|(entry_id, id)| {
                    key_and_csr(Some(&id)).map(|(key, csr)| (entry_id, id, key, csr))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await??;
        let requests = keyed
            .iter()
            .map(|(entry_id, _, _, csr)| SvidRequest {
                entry_id: entry_id.clone(),
                csr: csr.clone(),
            })
            .collect();
        let results = match self.server.sign_x509_svids(requests).await {
            Ok(results) => {
                self.reached_server();
                results
            }
            Err(CallError::Refused(status)) => return Err(self.rejected(status)),
            Err(e) => {
                self.unreachable(&e);
                tracing::warn!(error = %e, entries = keyed.len(), "signing request failed; serving cached SVIDs");
                let now = self.clock.now_ms();
                for (entry_id, ..) in &keyed {
                    self.note_failure(entry_id, now);
                }
                signed.failed += keyed.len();
                return Ok(());
            }
        };
        let mut by_entry: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        let mut refused = 0;
        let mut first_refusal = None;
        for r in results {
            if r.error.is_empty() {
                by_entry.insert(r.entry_id, r.x509_svid_chain);
            } else {
                refused += 1;
                first_refusal.get_or_insert((r.entry_id, r.error));
            }
        }
        // One line per batch, however many entries the server refused.
        if let Some((entry, error)) = first_refusal {
            tracing::warn!(refused, first_entry = %entry, first_error = %error, "the server refused to sign some entries");
        }
        let now = self.clock.now_ms();
        for (entry_id, id, key, _) in keyed {
            let Some(chain) = by_entry.remove(&entry_id) else {
                self.note_failure(&entry_id, now);
                signed.failed += 1;
                continue;
            };
            match verify_received(&chain, &id, &public_key_of(&key), &self.roots, now) {
                Ok(info) => {
                    let renew_at = renew_at_ms(now, info.not_after, self.rng.f64());
                    let Some(entry) = self.entries.iter_mut().find(|e| e.id == entry_id) else {
                        continue;
                    };
                    match &entry.svid {
                        None => signed.new += 1,
                        Some(s) if s.revision == entry.revision => signed.renewed += 1,
                        Some(_) => signed.updated += 1,
                    }
                    entry.svid = Some(Arc::new(Svid {
                        chain: chain.concat(),
                        key,
                        serial: info.serial_hex,
                        not_before: info.not_before,
                        not_after: info.not_after,
                        revision: entry.revision,
                        renew_at_ms: renew_at,
                    }));
                    self.retry.remove(&entry_id);
                    self.lapsed.remove(&entry_id);
                }
                Err(why) => {
                    tracing::error!(entry = %entry_id, %why, "refusing an SVID the server returned");
                    self.note_failure(&entry_id, now);
                    signed.failed += 1;
                }
            }
        }
        Ok(())
    }

    /// Capped exponential backoff per entry: one entry the server keeps refusing does
    /// not hold up the others, nor make the agent hammer the server.
    fn note_failure(&mut self, entry_id: &str, now: i64) {
        let failures = self.retry.get(entry_id).map_or(0, |r| r.failures);
        let at_ms = now + retry_delay(failures).as_millis() as i64;
        self.retry.insert(
            entry_id.to_string(),
            Retry {
                at_ms,
                failures: failures.saturating_add(1),
            },
        );
    }
}

#[cfg(test)]
mod tests;
