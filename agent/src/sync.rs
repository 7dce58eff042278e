//! The sync worker: one task owns the agent's SVID and every workload SVID. It keeps a
//! server-push stream of authorized entries open, signs what is missing or due for
//! rotation in batches, verifies what it receives, and publishes snapshots. A still
//! valid SVID keeps being served while renewal fails.

use std::collections::HashMap;
use std::sync::Arc;

use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use lanyard_proto::agent::{
    RenewAgentRequest, SignX509SvidsRequest, SvidRequest, SyncEntriesRequest, SyncEntriesResponse,
};
use lanyard_proto::{Selector, SpiffeId, TrustDomain, svid};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use crate::cache::{CachedEntry, Snapshot, Svid};
use crate::identity::{AgentSvid, IdentityFiles, PrivateKey, key_and_csr};
use crate::rotation::{Clock, instant_at, renew_at_ms, retry_delay};
use crate::tls::SpiffeServerVerifier;

/// The server caps batches at this many CSRs.
const MAX_BATCH: usize = 1000;

/// Why the worker stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "the server no longer accepts this agent ({0}); it was evicted or its SVID expired: start it again with a new join token"
    )]
    Rejected(String),
    #[error("stored agent identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
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
}

/// Checks a signed chain before it is served: SVID profile, the ID asked for, our key,
/// and a signature by one of the bundle's CAs.
fn verify_received(
    chain: &[Vec<u8>],
    want: &SpiffeId,
    public_key: &[u8],
    roots: &[Vec<u8>],
) -> Result<svid::LeafInfo, Unusable> {
    let leaf = chain.first().ok_or(Unusable::Empty)?;
    let info = svid::check_leaf(leaf, None)?;
    if info.spiffe_id != *want {
        return Err(Unusable::WrongId {
            got: info.spiffe_id,
            want: want.clone(),
        });
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

/// The worker's state.
#[derive(Debug)]
pub struct SyncWorker {
    trust_domain: TrustDomain,
    server_address: String,
    files: IdentityFiles,
    agent: AgentSvid,
    agent_renew_at_ms: i64,
    roots: Vec<Vec<u8>>,
    bundle_sequence: u64,
    entries: Vec<CachedEntry>,
    /// Per-entry earliest retry after a failure, Unix ms, and the failure count.
    retry: HashMap<String, (i64, u32)>,
    synced: bool,
    client: AgentServiceClient<Channel>,
    clock: Arc<dyn Clock>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl SyncWorker {
    pub fn new(
        trust_domain: TrustDomain,
        server_address: String,
        files: IdentityFiles,
        agent: AgentSvid,
        roots: Vec<Vec<u8>>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, SnapshotRx), SyncError> {
        let client = Self::client_for(&trust_domain, &server_address, &agent, &roots)?;
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let agent_renew_at_ms = renew_at_ms(clock.now_ms(), agent.not_after, fastrand::f64());
        let worker = SyncWorker {
            trust_domain,
            server_address,
            files,
            agent,
            agent_renew_at_ms,
            roots,
            bundle_sequence: 0,
            entries: vec![],
            retry: HashMap::new(),
            synced: false,
            client,
            clock,
            tx,
        };
        Ok((worker, rx))
    }

    fn client_for(
        td: &TrustDomain,
        address: &str,
        agent: &AgentSvid,
        roots: &[Vec<u8>],
    ) -> Result<AgentServiceClient<Channel>, SyncError> {
        let verifier = SpiffeServerVerifier::new(roots, lanyard_proto::server_id(td))?;
        Ok(crate::client::connect(address, verifier, Some(agent))?)
    }

    fn publish(&self) {
        let snapshot = Snapshot {
            synced: self.synced,
            entries: self.entries.clone(),
            bundle: Arc::new(self.roots.concat()),
            bundle_sequence: self.bundle_sequence,
        };
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// A status that means the server does not (or no longer) accept this agent.
    fn is_rejection(status: &tonic::Status) -> bool {
        matches!(
            status.code(),
            Code::PermissionDenied | Code::Unauthenticated
        )
    }

    /// Runs until `shutdown` turns true or the server rejects the agent.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), SyncError> {
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let stream = self.client.sync_entries(SyncEntriesRequest {}).await;
            let mut stream = match stream {
                Ok(s) => {
                    failures = 0;
                    s.into_inner()
                }
                Err(status) if Self::is_rejection(&status) => return Err(self.rejected(status)),
                Err(status) => {
                    let delay = retry_delay(failures);
                    failures += 1;
                    tracing::warn!(error = %status.message(), retry_in = ?delay, "cannot reach the server; serving cached SVIDs");
                    tokio::select! {
                        changed = shutdown.changed() => if changed.is_err() { return Ok(()) },
                        () = self.wait_for_due(delay) => {}
                    }
                    // Rotation keeps going even while the stream is down.
                    self.rotate_due().await?;
                    continue;
                }
            };
            loop {
                let wake = self.next_due();
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    msg = stream.message() => match msg {
                        Ok(Some(msg)) => {
                            self.apply(msg)?;
                            self.rotate_due().await?;
                        }
                        Ok(None) => { tracing::info!("server closed the entry stream; reconnecting"); break; }
                        Err(status) if Self::is_rejection(&status) => return Err(self.rejected(status)),
                        Err(status) => { tracing::warn!(error = %status.message(), "entry stream broke; reconnecting"); break; }
                    },
                    () = tokio::time::sleep_until(wake) => {
                        let agent_renewed = self.rotate_due().await?;
                        if agent_renewed {
                            // The open stream was authenticated with the old SVID.
                            break;
                        }
                    }
                }
            }
        }
    }

    fn rejected(&self, status: tonic::Status) -> SyncError {
        self.files.forget();
        SyncError::Rejected(status.message().to_string())
    }

    async fn wait_for_due(&self, delay: std::time::Duration) {
        let until = std::cmp::min(tokio::time::Instant::now() + delay, self.next_due());
        tokio::time::sleep_until(until).await;
    }

    /// The earliest moment something needs doing.
    fn next_due(&self) -> tokio::time::Instant {
        let mut at = self.agent_renew_at_ms;
        for e in &self.entries {
            let due = match &e.svid {
                Some(s) => s.renew_at_ms,
                None => self.clock.now_ms(),
            };
            let due = self
                .retry
                .get(&e.id)
                .map_or(due, |(retry_at, _)| due.max(*retry_at));
            at = at.min(due);
        }
        instant_at(&*self.clock, at)
    }

    /// Takes in a pushed entry set and bundle.
    fn apply(&mut self, msg: SyncEntriesResponse) -> Result<(), SyncError> {
        if let Some(bundle) = msg.bundle
            && bundle.sequence != self.bundle_sequence
            && !bundle.x509_authorities.is_empty()
        {
            self.roots = bundle.x509_authorities;
            self.bundle_sequence = bundle.sequence;
            // A failed write is not fatal: the roots are in memory, and the next bundle
            // change or renewal writes the files again.
            if let Err(e) = self.files.store(&self.agent, &self.roots) {
                tracing::warn!(error = %e, "cannot persist the new trust bundle");
            }
            // New roots also authenticate the server from now on.
            self.client = Self::client_for(
                &self.trust_domain,
                &self.server_address,
                &self.agent,
                &self.roots,
            )?;
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
            // arrives (rotate_due sees the revision changed), unless its ID changed.
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
        self.retry
            .retain(|id, _| self.entries.iter().any(|e| &e.id == id));
        self.synced = true;
        self.publish();
        Ok(())
    }

    /// Renews the agent SVID and every workload SVID that is missing or due. Returns
    /// whether the agent SVID was renewed.
    async fn rotate_due(&mut self) -> Result<bool, SyncError> {
        let now = self.clock.now_ms();
        let mut agent_renewed = false;
        if now >= self.agent_renew_at_ms {
            match self.renew_agent().await {
                Ok(()) => agent_renewed = true,
                Err(RenewError::Rejected(status)) => return Err(self.rejected(status)),
                Err(RenewError::Retry(why)) => {
                    tracing::warn!(%why, "agent SVID renewal failed; retrying");
                    self.agent_renew_at_ms = now + retry_delay(2).as_millis() as i64;
                }
            }
        }
        let due: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let e = &self.entries[i];
                let wanted = e
                    .svid
                    .as_ref()
                    .is_none_or(|s| now >= s.renew_at_ms || s.revision != e.revision);
                wanted && self.retry.get(&e.id).is_none_or(|(at, _)| now >= *at)
            })
            .collect();
        if due.is_empty() {
            return Ok(agent_renewed);
        }
        for chunk in due.chunks(MAX_BATCH) {
            self.sign_batch(chunk).await?;
        }
        self.publish();
        Ok(agent_renewed)
    }

    async fn sign_batch(&mut self, indexes: &[usize]) -> Result<(), SyncError> {
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
        .await
        .map_err(|e| SyncError::Tls(rustls::Error::General(e.to_string())))?
        .map_err(|e| SyncError::Tls(rustls::Error::General(e.to_string())))?;
        let requests = keyed
            .iter()
            .map(|(entry_id, _, _, csr)| SvidRequest {
                entry_id: entry_id.clone(),
                csr: csr.clone(),
            })
            .collect();
        let now = self.clock.now_ms();
        let results = match self
            .client
            .sign_x509_svids(SignX509SvidsRequest { requests })
            .await
        {
            Ok(r) => r.into_inner().results,
            Err(status) if Self::is_rejection(&status) => return Err(self.rejected(status)),
            Err(status) => {
                tracing::warn!(error = %status.message(), "signing request failed; serving cached SVIDs");
                for (entry_id, ..) in &keyed {
                    self.note_failure(entry_id, now);
                }
                return Ok(());
            }
        };
        let mut by_entry: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for r in results {
            if r.error.is_empty() {
                by_entry.insert(r.entry_id, r.x509_svid_chain);
            } else {
                tracing::warn!(entry = %r.entry_id, error = %r.error, "server refused to sign");
            }
        }
        for (entry_id, id, key, _) in keyed {
            let Some(chain) = by_entry.remove(&entry_id) else {
                self.note_failure(&entry_id, now);
                continue;
            };
            let public_key = public_key_of(&key);
            match verify_received(&chain, &id, &public_key, &self.roots) {
                Ok(info) => {
                    let Some(entry) = self.entries.iter_mut().find(|e| e.id == entry_id) else {
                        continue;
                    };
                    entry.svid = Some(Arc::new(Svid {
                        chain: chain.concat(),
                        key,
                        serial: info.serial_hex,
                        not_before: info.not_before,
                        not_after: info.not_after,
                        revision: entry.revision,
                        renew_at_ms: renew_at_ms(now, info.not_after, fastrand::f64()),
                    }));
                    self.retry.remove(&entry_id);
                    tracing::debug!(entry = %entry_id, spiffe_id = %id, "X509-SVID updated");
                }
                Err(why) => {
                    tracing::error!(entry = %entry_id, %why, "refusing an SVID the server returned");
                    self.note_failure(&entry_id, now);
                }
            }
        }
        Ok(())
    }

    fn note_failure(&mut self, entry_id: &str, now: i64) {
        let failures = self.retry.get(entry_id).map_or(0, |(_, n)| *n) + 1;
        let at = now + retry_delay(failures - 1).as_millis() as i64;
        self.retry.insert(entry_id.to_string(), (at, failures));
    }

    async fn renew_agent(&mut self) -> Result<(), RenewError> {
        let id = self.agent.spiffe_id.clone();
        let (key, csr) = key_and_csr(Some(&id)).map_err(|e| RenewError::Retry(e.to_string()))?;
        let chain = match self.client.renew_agent(RenewAgentRequest { csr }).await {
            Ok(r) => r.into_inner().x509_svid_chain,
            Err(status) if Self::is_rejection(&status) => return Err(RenewError::Rejected(status)),
            Err(status) => return Err(RenewError::Retry(status.message().to_string())),
        };
        let info = verify_received(&chain, &id, &public_key_of(&key), &self.roots)
            .map_err(|e| RenewError::Retry(e.to_string()))?;
        let agent = AgentSvid {
            spiffe_id: id,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        };
        self.files
            .store(&agent, &self.roots)
            .map_err(|e| RenewError::Retry(e.to_string()))?;
        self.client = Self::client_for(
            &self.trust_domain,
            &self.server_address,
            &agent,
            &self.roots,
        )
        .map_err(|e| RenewError::Retry(e.to_string()))?;
        self.agent_renew_at_ms = renew_at_ms(self.clock.now_ms(), agent.not_after, fastrand::f64());
        self.agent = agent;
        tracing::info!(serial = %info.serial_hex, not_after = info.not_after, "renewed the agent SVID");
        Ok(())
    }
}

enum RenewError {
    Rejected(tonic::Status),
    Retry(String),
}
