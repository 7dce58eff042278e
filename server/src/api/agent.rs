//! The agent API (TLS 1.3): node attestation, agent SVID renewal, pushed entry sync and
//! batch signing of workload CSRs. Only AttestAgent (once per connection) and GetBundle
//! may be called without the agent's X509-SVID; every other call authenticates the agent
//! by it, on every call: the certificate's validity period against the server's clock,
//! and the agent's standing in the datastore (attested, not banned, serial current).
//! Every failure is an [`AgentApiError`], mapped to a gRPC status in one place.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lanyard_attestors::node::{NodeAttestError, join_token};
use lanyard_proto::agent::agent_service_server::AgentService;
use lanyard_proto::agent::*;
use lanyard_proto::types;
use lanyard_proto::{IdError, SpiffeId};
use rcgen::PublicKeyData;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::entry_to_proto;
use crate::ca::{CaError, CsrError, VerifiedCsr};
use crate::datastore::{AgentRecord, AttestRefusal, Entry, StoreError};
use crate::state::{AgentEvent, State};
use crate::tls::{ClientCert, PeerInfo};

/// More CSRs than this in one call is refused; agents split larger batches.
pub const MAX_BATCH: usize = 1000;
/// Batches are split over the cores, but not into pieces smaller than this (a thread
/// handoff costs more than signing a few SVIDs).
const MIN_CHUNK: usize = 8;

/// Why an agent API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentApiError {
    // -- The caller is not (or no longer) authenticated.
    #[error("this call needs the agent's X509-SVID as TLS client certificate")]
    NoClientCertificate,
    #[error("client certificate is not an agent X509-SVID: {0}")]
    NotAnSvid(Arc<lanyard_proto::svid::ProfileError>),
    #[error("agent X509-SVID is not valid before {}", lanyard_daemon::output::rfc3339(*.0))]
    NotYetValid(i64),
    #[error("agent X509-SVID expired at {}; the agent must renew before expiry or attest again", lanyard_daemon::output::rfc3339(*.0))]
    Expired(i64),
    // -- Authenticated, but refused.
    #[error("agent {0} is not attested (evicted?)")]
    NotAttested(SpiffeId),
    #[error("agent {0} is banned")]
    Banned(SpiffeId),
    #[error("agent {id} presented a superseded X509-SVID (serial {serial})")]
    Superseded { id: SpiffeId, serial: String },
    #[error("agent {0} was evicted or renewed meanwhile")]
    RenewalLost(SpiffeId),
    #[error("node attestation refused: {0}")]
    Attestation(Refused),
    #[error("AttestAgent may be called once per connection; connect again to retry")]
    AttestedOnThisConnection,
    // -- The request is malformed.
    #[error(transparent)]
    Evidence(#[from] NodeAttestError),
    #[error("agent CSR: {0}")]
    Csr(#[from] CsrError),
    #[error("agent CSR asks for {asked}, but the agent is {expected}")]
    CsrId { asked: SpiffeId, expected: SpiffeId },
    #[error("agent CSR reuses the key of the presented SVID; renewal needs a fresh key")]
    KeyReused,
    #[error("at most {MAX_BATCH} CSRs per call, got {0}")]
    TooManyCsrs(usize),
    // -- Our fault.
    #[error("agent ID {path} is invalid: {source}")]
    AgentId { path: String, source: IdError },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing task failed: {0}")]
    SigningTask(String),
    // -- Neither's fault.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why the datastore refused an attestation, as the agent is told.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("agent {id} is banned since {}; an operator must unban it first", lanyard_daemon::output::rfc3339(*.since))]
    Banned { id: SpiffeId, since: i64 },
    #[error("join token is unknown")]
    TokenUnknown,
    #[error("join token was already used")]
    TokenUsed,
    #[error("join token has expired")]
    TokenExpired,
}

impl From<AgentApiError> for Status {
    fn from(e: AgentApiError) -> Status {
        let message = e.to_string();
        match e {
            AgentApiError::NoClientCertificate
            | AgentApiError::NotAnSvid(_)
            | AgentApiError::NotYetValid(_)
            | AgentApiError::Expired(_) => Status::unauthenticated(message),
            AgentApiError::NotAttested(_)
            | AgentApiError::Banned(_)
            | AgentApiError::Superseded { .. }
            | AgentApiError::RenewalLost(_)
            | AgentApiError::Attestation(_) => Status::permission_denied(message),
            AgentApiError::AttestedOnThisConnection => Status::failed_precondition(message),
            AgentApiError::Evidence(_)
            | AgentApiError::Csr(_)
            | AgentApiError::CsrId { .. }
            | AgentApiError::KeyReused
            | AgentApiError::TooManyCsrs(_) => Status::invalid_argument(message),
            AgentApiError::ShuttingDown => Status::unavailable(message),
            AgentApiError::Ca(CaError::Expired(_)) => {
                tracing::error!(error = %message, "agent API: the CA cannot sign");
                Status::unavailable(message)
            }
            AgentApiError::AgentId { .. }
            | AgentApiError::Ca(_)
            | AgentApiError::Store(_)
            | AgentApiError::SigningTask(_) => {
                tracing::error!(error = %message, "agent API failure");
                Status::internal(message)
            }
        }
    }
}

/// Why one CSR of a SignX509Svids batch was refused; reaches the wire as
/// `SvidResult.error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidRefusal {
    #[error("entry {0} is not authorized for this agent")]
    NotAuthorized(String),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("CSR names no SPIFFE ID; its URI SAN must be {0}")]
    NoId(SpiffeId),
    #[error("CSR asks for {asked}, but the entry is {expected}")]
    IdMismatch { asked: SpiffeId, expected: SpiffeId },
    #[error("CSR reuses a key that is not fresh (the agent's own)")]
    KeyReused,
    #[error(transparent)]
    Ca(#[from] CaError),
}

type ApiResult<T> = Result<Response<T>, AgentApiError>;

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    state: State,
    /// Open sync streams end with UNAVAILABLE on shutdown, so the graceful shutdown does
    /// not wait for agents to hang up.
    shutdown: lanyard_daemon::shutdown::Shutdown,
    /// Refused attestations are audited, but at most one line a minute per source
    /// address (with a count of the rest), so a guessing caller cannot flood the log.
    refusals: Arc<lanyard_daemon::logging::RateLimit<std::net::IpAddr>>,
}

impl AgentApi {
    pub fn new(state: State, shutdown: lanyard_daemon::shutdown::Shutdown) -> Self {
        AgentApi {
            state,
            shutdown,
            refusals: Arc::new(lanyard_daemon::logging::RateLimit::new(
                Duration::from_secs(60),
                4096,
            )),
        }
    }

    /// Audits a refused attestation, rate-limited per source address.
    fn audit_refusal(&self, remote: Option<std::net::SocketAddr>, e: &AgentApiError) {
        let ip = remote.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |r| r.ip());
        if let Some(held_back) = self.refusals.check(&ip) {
            let remote = remote.map_or_else(|| "unknown".to_string(), |r| r.to_string());
            tracing::warn!(target: "audit", action = "agent.attest", %remote, outcome = "refused",
                reason = %e, held_back, "attestation refused");
        }
    }
}

/// An authenticated agent: its record and what matters of the SVID it presented.
#[derive(Debug)]
struct Caller {
    record: AgentRecord,
    serial: String,
    not_after: i64,
    public_key: Vec<u8>,
}

fn peer<T>(req: &Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

impl AgentApi {
    /// Authenticates the caller by its client certificate, now: within its validity
    /// period by the server's clock, of an attested agent that is not banned, with its
    /// current serial (or the previous one, until the current one was used once).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, AgentApiError> {
        let client = peer(req)
            .map(|p| Arc::clone(&p.client))
            .ok_or(AgentApiError::NoClientCertificate)?;
        let svid = match &*client {
            ClientCert::None => return Err(AgentApiError::NoClientCertificate),
            ClientCert::Invalid(why) => return Err(AgentApiError::NotAnSvid(Arc::clone(why))),
            ClientCert::Svid(svid) => svid,
        };
        let now = self.state.now();
        if now < svid.not_before {
            return Err(AgentApiError::NotYetValid(svid.not_before));
        }
        if now > svid.not_after {
            return Err(AgentApiError::Expired(svid.not_after));
        }
        let id = svid.spiffe_id.clone();
        let Some(record) = self.state.agent(&id).await? else {
            return Err(match self.state.ban(&id).await? {
                Some(_) => AgentApiError::Banned(id),
                None => AgentApiError::NotAttested(id),
            });
        };
        if svid.serial == record.serial {
            if !record.previous_serial.is_empty() {
                // The current SVID is in use: the one before it is dropped, so whoever
                // holds a copy of it can no longer renew and lock this one out.
                self.state.drop_previous_serial(&id, &record.serial).await?;
            }
        } else if record.previous_serial.is_empty() || svid.serial != record.previous_serial {
            return Err(AgentApiError::Superseded {
                id,
                serial: svid.serial.clone(),
            });
        }
        Ok(Caller {
            record,
            serial: svid.serial.clone(),
            not_after: svid.not_after,
            public_key: svid.public_key.clone(),
        })
    }

    /// The entries this agent may sign for.
    fn authorized(&self, agent: &AgentRecord) -> Vec<Arc<Entry>> {
        let snapshot = self.state.entries();
        let aliases = snapshot.aliases(&agent.selectors);
        snapshot.authorized(&agent.spiffe_id, &aliases)
    }

    fn sign_agent(
        &self,
        id: &SpiffeId,
        csr: &VerifiedCsr,
    ) -> Result<crate::ca::SignedSvid, AgentApiError> {
        if let Some(asked) = csr.spiffe_id.as_ref().filter(|asked| *asked != id) {
            return Err(AgentApiError::CsrId {
                asked: asked.clone(),
                expected: id.clone(),
            });
        }
        Ok(self
            .state
            .ca
            .sign_svid(id, csr.public_key(), self.state.agent_ttl, &[])?)
    }

    async fn attest(&self, req: Request<AttestAgentRequest>) -> ApiResult<AttestAgentResponse> {
        let remote = peer(&req).map(|p| p.remote.to_string()).unwrap_or_default();
        // One attempt per connection, counted before anything is checked, so a caller
        // cannot try token after token on one connection.
        if peer(&req).is_some_and(|p| p.attest_called.swap(true, Ordering::SeqCst)) {
            return Err(AgentApiError::AttestedOnThisConnection);
        }
        let req = req.into_inner();
        if req.method != join_token::METHOD {
            return Err(NodeAttestError::unknown_method(&req.method).into());
        }
        let (digest, node) = join_token::verify_form(&req.payload)?;
        let agent_id =
            SpiffeId::new(&self.state.trust_domain, &node.agent_path).map_err(|source| {
                AgentApiError::AgentId {
                    path: node.agent_path.clone(),
                    source,
                }
            })?;
        let csr = VerifiedCsr::parse(&req.csr)?;
        // Sign before spending the token, so a signing failure leaves the token usable;
        // the SVID is discarded unless the attestation is recorded.
        let signed = self.sign_agent(&agent_id, &csr)?;
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: join_token::METHOD.into(),
            selectors: node.selectors.clone(),
            serial: signed.serial_hex.clone(),
            previous_serial: String::new(),
            expires_at: signed.not_after,
            attested_at: self.state.now(),
        };
        if let Err(refusal) = self
            .state
            .record_attestation(&record, Some(&digest.hash))
            .await?
        {
            let refused = match refusal {
                AttestRefusal::Banned { since } => Refused::Banned {
                    id: agent_id.clone(),
                    since,
                },
                AttestRefusal::TokenUnknown => Refused::TokenUnknown,
                AttestRefusal::TokenUsed => Refused::TokenUsed,
                AttestRefusal::TokenExpired => Refused::TokenExpired,
            };
            return Err(AgentApiError::Attestation(refused));
        }
        tracing::info!(target: "audit", action = "agent.attest", method = join_token::METHOD, agent = %agent_id,
            %remote, serial = %signed.serial_hex, outcome = "ok", "agent attested");
        Ok(Response::new(AttestAgentResponse {
            spiffe_id: agent_id.to_string(),
            x509_svid_chain: signed.chain,
            bundle: Some(self.state.bundle().to_proto(&self.state.trust_domain)),
            selectors: node.selectors.iter().map(types::Selector::from).collect(),
        }))
    }

    async fn renew(&self, req: Request<RenewAgentRequest>) -> ApiResult<RenewAgentResponse> {
        let caller = self.caller(&req).await?;
        let csr = VerifiedCsr::parse(&req.get_ref().csr)?;
        if csr.public_key().der_bytes() == caller.public_key {
            return Err(AgentApiError::KeyReused);
        }
        let id = caller.record.spiffe_id.clone();
        let signed = self.sign_agent(&id, &csr)?;
        let renewed = self
            .state
            .renew_agent(&id, &caller.serial, &signed.serial_hex, signed.not_after)
            .await?;
        if !renewed {
            return Err(AgentApiError::RenewalLost(id));
        }
        tracing::info!(target: "audit", action = "agent.renew", agent = %id, serial = %signed.serial_hex, "agent SVID renewed");
        Ok(Response::new(RenewAgentResponse {
            x509_svid_chain: signed.chain,
        }))
    }

    async fn sync(&self, req: Request<SyncEntriesRequest>) -> ApiResult<SyncStream> {
        let caller = self.caller(&req).await?;
        let api = self.clone();
        let mut entries_rx = self.state.watch_entries();
        let mut bundle_rx = self.state.watch_bundle();
        let mut agent_events = self.state.watch_agents();
        let shutdown = self.shutdown.clone();
        let agent_id = caller.record.spiffe_id.clone();
        let serial = caller.serial.clone();
        let not_after = caller.not_after;
        // The stream lives no longer than the SVID that opened it.
        let expires_in =
            Duration::from_secs(u64::try_from(not_after + 1 - self.state.now()).unwrap_or(0));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let expiry = tokio::time::sleep(expires_in);
            tokio::pin!(expiry);
            // What was sent last. Unchanged entries keep their `Arc` from snapshot to
            // snapshot, so comparing pointers finds a change without comparing contents.
            let mut last_sent: Option<(Vec<Arc<Entry>>, u64)> = None;
            loop {
                entries_rx.borrow_and_update();
                let bundle = bundle_rx.borrow_and_update().clone();
                let entries = api.authorized(&caller.record);
                let unchanged = last_sent.as_ref().is_some_and(|(sent, sequence)| {
                    *sequence == bundle.sequence
                        && sent.len() == entries.len()
                        && sent.iter().zip(&entries).all(|(a, b)| Arc::ptr_eq(a, b))
                });
                if !unchanged {
                    let msg = SyncEntriesResponse {
                        entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
                        bundle: Some(bundle.to_proto(&api.state.trust_domain)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last_sent = Some((entries, bundle.sequence));
                }
                let evicted = || Status::from(AgentApiError::NotAttested(agent_id.clone()));
                tokio::select! {
                    changed = entries_rx.changed() => if changed.is_err() { return },
                    changed = bundle_rx.changed() => if changed.is_err() { return },
                    event = agent_events.recv() => match event {
                        Ok(AgentEvent::Gone(id)) if id == agent_id => {
                            let _ = tx.send(Err(evicted())).await;
                            return;
                        }
                        // The agent renewed: end this stream cleanly so it reconnects
                        // with its new SVID (and a copy of the old one has no stream).
                        Ok(AgentEvent::Renewed { id, serial: new }) if id == agent_id && new != serial => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Missed events: ask the datastore about this agent.
                            match api.state.agent(&agent_id).await {
                                Ok(None) => {
                                    let _ = tx.send(Err(evicted())).await;
                                    return;
                                }
                                Ok(Some(now)) if now.serial != serial => return,
                                Ok(Some(_)) | Err(_) => {}
                            }
                        }
                        Err(_) => return,
                    },
                    () = &mut expiry => {
                        if api.state.now() > not_after {
                            let _ = tx.send(Err(AgentApiError::Expired(not_after).into())).await;
                            return;
                        }
                        // The clock disagrees with the timer (it was set back): check again soon.
                        expiry.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    () = shutdown.wait() => {
                        let _ = tx.send(Err(AgentApiError::ShuttingDown.into())).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn sign(&self, req: Request<SignX509SvidsRequest>) -> ApiResult<SignX509SvidsResponse> {
        let caller = self.caller(&req).await?;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(AgentApiError::TooManyCsrs(requests.len()));
        }
        let authorized: HashMap<String, Arc<Entry>> = self
            .authorized(&caller.record)
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        // Signing is CPU work: keep it off the async workers, and spread one batch over
        // the cores, since an agent sends its batches one at a time.
        let authorized = Arc::new(authorized);
        let agent = Arc::new((caller.record.spiffe_id.clone(), caller.public_key.clone()));
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let chunk = requests.len().div_ceil(cores).max(MIN_CHUNK);
        let mut tasks = Vec::new();
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let part: Vec<SvidRequest> = requests.by_ref().take(chunk).collect();
            let (state, authorized, agent) = (
                self.state.clone(),
                Arc::clone(&authorized),
                Arc::clone(&agent),
            );
            tasks.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|r| issue(&state, &authorized, &agent.0, &agent.1, r))
                    .collect::<Vec<_>>()
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.extend(
                task.await
                    .map_err(|e| AgentApiError::SigningTask(e.to_string()))?,
            );
        }
        Ok(Response::new(SignX509SvidsResponse { results }))
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn attest_agent(
        &self,
        req: Request<AttestAgentRequest>,
    ) -> Result<Response<AttestAgentResponse>, Status> {
        let remote = peer(&req).map(|p| p.remote);
        self.attest(req).await.map_err(|e| {
            self.audit_refusal(remote, &e);
            e.into()
        })
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        Ok(self.renew(req).await?)
    }

    type SyncEntriesStream = SyncStream;

    async fn sync_entries(
        &self,
        req: Request<SyncEntriesRequest>,
    ) -> Result<Response<SyncStream>, Status> {
        Ok(self.sync(req).await?)
    }

    async fn sign_x509_svids(
        &self,
        req: Request<SignX509SvidsRequest>,
    ) -> Result<Response<SignX509SvidsResponse>, Status> {
        Ok(self.sign(req).await?)
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<types::X509Bundle>, Status> {
        Ok(Response::new(
            self.state.bundle().to_proto(&self.state.trust_domain),
        ))
    }
}

/// Signs one request and audits the outcome either way.
fn issue(
    state: &State,
    authorized: &HashMap<String, Arc<Entry>>,
    agent_id: &SpiffeId,
    agent_key: &[u8],
    r: SvidRequest,
) -> SvidResult {
    match sign_one(state, authorized, agent_key, &r) {
        Ok((entry, signed)) => {
            tracing::info!(target: "audit", action = "svid.issue", agent = %agent_id, entry = %entry.id,
                spiffe_id = %entry.spiffe_id, serial = %signed.serial_hex, not_after = signed.not_after,
                "X509-SVID issued");
            SvidResult {
                entry_id: r.entry_id,
                x509_svid_chain: signed.chain,
                error: String::new(),
            }
        }
        Err(why) => {
            tracing::warn!(target: "audit", action = "svid.issue", agent = %agent_id, entry = %r.entry_id,
                outcome = "refused", reason = %why, "X509-SVID refused");
            SvidResult {
                entry_id: r.entry_id,
                x509_svid_chain: vec![],
                error: why.to_string(),
            }
        }
    }
}

/// Signs one CSR if its entry is authorized for the agent, the CSR's single URI SAN is
/// the entry's SPIFFE ID, its key is an uncompressed P-256 point whose signature verifies,
/// and the key is not the agent's own.
fn sign_one(
    state: &State,
    authorized: &HashMap<String, Arc<Entry>>,
    agent_key: &[u8],
    req: &SvidRequest,
) -> Result<(Arc<Entry>, crate::ca::SignedSvid), SvidRefusal> {
    let entry = authorized
        .get(&req.entry_id)
        .ok_or_else(|| SvidRefusal::NotAuthorized(req.entry_id.clone()))?;
    let csr = VerifiedCsr::parse(&req.csr)?;
    match &csr.spiffe_id {
        Some(id) if *id == entry.spiffe_id => {}
        Some(id) => {
            return Err(SvidRefusal::IdMismatch {
                asked: id.clone(),
                expected: entry.spiffe_id.clone(),
            });
        }
        None => return Err(SvidRefusal::NoId(entry.spiffe_id.clone())),
    }
    if csr.public_key().der_bytes() == agent_key {
        return Err(SvidRefusal::KeyReused);
    }
    let ttl = match entry.x509_svid_ttl {
        0 => state.default_svid_ttl,
        secs => Duration::from_secs(u64::from(secs)),
    };
    let signed = state
        .ca
        .sign_svid(&entry.spiffe_id, csr.public_key(), ttl, &entry.dns_names)?;
    Ok((Arc::clone(entry), signed))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;

    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
    use rustls_pki_types::CertificateDer;
    use tonic::Code;

    use super::*;
    use crate::clock::ManualClock;
    use crate::datastore::StoredToken;

    struct Fixture {
        _dir: tempfile::TempDir,
        api: AgentApi,
        state: State,
        clock: Arc<ManualClock>,
        _trigger: lanyard_daemon::shutdown::Trigger,
    }

    async fn fixture() -> Fixture {
        let (dir, state, _store, clock) = crate::state::tests::state().await;
        let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
        Fixture {
            _dir: dir,
            api: AgentApi::new(state.clone(), shutdown),
            state,
            clock,
            _trigger: trigger,
        }
    }

    fn csr(uri: Option<&str>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        }
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    /// A connection's view, as the TLS layer would attach it.
    fn conn(chain: Option<&[Vec<u8>]>) -> PeerInfo {
        let certs: Option<Vec<CertificateDer<'_>>> = chain.map(|c| {
            c.iter()
                .map(|d| CertificateDer::from(d.as_slice()))
                .collect()
        });
        PeerInfo {
            remote: SocketAddr::from(([192, 0, 2, 1], 4000)),
            client: Arc::new(ClientCert::read(certs.as_deref())),
            attest_called: Arc::new(AtomicBool::new(false)),
        }
    }

    fn on<T>(peer: &PeerInfo, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.extensions_mut().insert(peer.clone());
        req
    }

    async fn token(state: &State, token: &str) {
        let d = join_token::digest_of(token);
        let now = state.now();
        state
            .create_join_token(
                &StoredToken {
                    hash: d.hash,
                    id: d.id,
                    expires_at: now + 600,
                    created_at: now,
                },
                None,
            )
            .await
            .expect("token");
    }

    fn attest_req(token: &str) -> AttestAgentRequest {
        AttestAgentRequest {
            method: join_token::METHOD.into(),
            payload: join_token::evidence(token),
            csr: csr(None),
        }
    }

    /// Attests with a fresh token; returns the agent's ID and SVID chain.
    async fn attested(f: &Fixture, name: &str) -> (String, Vec<Vec<u8>>) {
        token(&f.state, name).await;
        let r = f
            .api
            .attest(on(&conn(None), attest_req(name)))
            .await
            .expect("attest")
            .into_inner();
        (r.spiffe_id, r.x509_svid_chain)
    }

    async fn renew(f: &Fixture, peer: &PeerInfo) -> Result<Vec<Vec<u8>>, Status> {
        f.api
            .renew(on(peer, RenewAgentRequest { csr: csr(None) }))
            .await
            .map(|r| r.into_inner().x509_svid_chain)
            .map_err(Status::from)
    }

    #[tokio::test]
    async fn a_renewal_after_the_svid_expired_is_refused_on_an_open_connection() {
        let f = fixture().await;
        let (_, chain) = attested(&f, "expiring-token").await;
        let open = conn(Some(&chain));
        renew(&f, &open).await.expect("a valid SVID renews");
        // The connection stays open; the SVID it presented expires (agent_ttl is 60 s).
        let (_, chain) = attested(&f, "second-token").await;
        let open = conn(Some(&chain));
        f.clock.advance(61);
        let status = renew(&f, &open).await.expect_err("renewal after notAfter");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("expired at"), "{status:?}");
        // ... and so does every other call on it.
        let status = f
            .api
            .sign(on(&open, SignX509SvidsRequest { requests: vec![] }))
            .await
            .map(|_| ())
            .map_err(Status::from)
            .expect_err("signing after notAfter");
        assert_eq!(status.code(), Code::Unauthenticated);
        // Before notBefore (a clock set back) is refused too.
        f.clock.advance(-3600);
        let status = renew(&f, &open).await.expect_err("before notBefore");
        assert!(status.message().contains("not valid before"), "{status:?}");
    }

    #[tokio::test]
    async fn a_superseded_svid_renews_only_until_the_current_one_was_used() {
        let f = fixture().await;
        let (_, s1) = attested(&f, "rotation-token").await;
        let old = conn(Some(&s1));
        let s2 = renew(&f, &old).await.expect("S1 renews");
        // The reply was lost: S1 may renew again while S2 has never been used.
        let s3 = renew(&f, &old).await.expect("S1 renews again");
        // S2 was superseded unused: it is refused.
        let status = renew(&f, &conn(Some(&s2))).await.expect_err("S2");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // S3 is used once: from now on S1 is dropped.
        let current = conn(Some(&s3));
        f.api
            .sign(on(&current, SignX509SvidsRequest { requests: vec![] }))
            .await
            .expect("S3 works");
        let status = renew(&f, &old)
            .await
            .expect_err("stolen S1 after S3 was used");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("superseded"), "{status:?}");
        // The holder of S1 could not lock the current SVID out.
        renew(&f, &current).await.expect("S3 still renews");
    }

    #[tokio::test]
    async fn streams_end_when_their_agent_renews_or_is_evicted() {
        use tokio_stream::StreamExt;
        let f = fixture().await;
        let (id, s1) = attested(&f, "stream-token").await;
        let old = conn(Some(&s1));
        let mut stream = f
            .api
            .sync(on(&old, SyncEntriesRequest {}))
            .await
            .expect("sync")
            .into_inner();
        stream.next().await.expect("first message").expect("ok");
        let s2 = renew(&f, &old).await.expect("renew");
        // Ended cleanly: the agent reconnects with the SVID it just got.
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream ends once the agent renewed");
        assert!(ended.is_none(), "{ended:?}");
        let mut current = f
            .api
            .sync(on(&conn(Some(&s2)), SyncEntriesRequest {}))
            .await
            .expect("sync with the new SVID")
            .into_inner();
        current.next().await.expect("first message").expect("ok");
        f.state
            .evict_agent(&SpiffeId::parse(&id).expect("id"))
            .await
            .expect("evict");
        let status = tokio::time::timeout(Duration::from_secs(5), current.next())
            .await
            .expect("the stream ends on eviction")
            .expect("an item")
            .expect_err("an error");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }

    #[tokio::test]
    async fn streams_push_only_changes_that_concern_their_agent() {
        use tokio_stream::StreamExt;
        let f = fixture().await;
        let (id, chain) = attested(&f, "push-token").await;
        let mut stream = f
            .api
            .sync(on(&conn(Some(&chain)), SyncEntriesRequest {}))
            .await
            .expect("sync")
            .into_inner();
        let first = stream.next().await.expect("first").expect("ok");
        assert!(first.entries.is_empty());
        let entry = |n: u32, parent: &str| Entry {
            id: format!("e{n}"),
            spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/w{n}")).expect("id"),
            parent_id: SpiffeId::parse(parent).expect("id"),
            selectors: vec![lanyard_proto::Selector::parse("unix:uid:1").expect("sel")],
            x509_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            created_at: n.into(),
            revision_number: 0,
        };
        f.state
            .create_entry(entry(1, "spiffe://example.org/someone-else"))
            .await
            .expect("create");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), stream.next())
                .await
                .is_err(),
            "a change for another agent is not pushed"
        );
        f.state.create_entry(entry(2, &id)).await.expect("create");
        let pushed = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("pushed")
            .expect("item")
            .expect("ok");
        assert_eq!(
            pushed
                .entries
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["e2"]
        );
    }

    #[tokio::test]
    async fn attestation_is_once_per_connection_and_echoes_methods_safely() {
        let f = fixture().await;
        token(&f.state, "good-token").await;
        let peer = conn(None);
        let status = Status::from(
            f.api
                .attest(on(&peer, attest_req("wrong-token")))
                .await
                .expect_err("unknown"),
        );
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("unknown"), "{status:?}");
        // A second attempt on the same connection, even with the right token, is refused.
        let status = Status::from(
            f.api
                .attest(on(&peer, attest_req("good-token")))
                .await
                .expect_err("second attempt"),
        );
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        // A new connection may.
        f.api
            .attest(on(&conn(None), attest_req("good-token")))
            .await
            .expect("new connection");
        let mut long = attest_req("x");
        long.method = format!("\u{1b}]0;owned\u{7}{}", "m".repeat(100_000));
        let status = Status::from(
            f.api
                .attest(on(&conn(None), long))
                .await
                .expect_err("unknown method"),
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() < 200, "{}", status.message().len());
        assert!(
            !status.message().chars().any(char::is_control),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn unauthenticated_callers_may_only_attest_and_fetch_the_bundle() {
        let f = fixture().await;
        let anonymous = conn(None);
        for status in [
            renew(&f, &anonymous).await.expect_err("renew"),
            Status::from(
                f.api
                    .sign(on(&anonymous, SignX509SvidsRequest { requests: vec![] }))
                    .await
                    .map(|_| ())
                    .expect_err("sign"),
            ),
            Status::from(
                f.api
                    .sync(on(&anonymous, SyncEntriesRequest {}))
                    .await
                    .map(|_| ())
                    .expect_err("sync"),
            ),
        ] {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
        AgentService::get_bundle(&f.api, on(&anonymous, GetBundleRequest {}))
            .await
            .expect("bundle");
    }

    #[tokio::test]
    async fn banned_and_evicted_agents_are_refused() {
        let f = fixture().await;
        let (id, chain) = attested(&f, "ban-token").await;
        let id = SpiffeId::parse(&id).expect("id");
        let peer = conn(Some(&chain));
        renew(&f, &peer).await.expect("renews");
        f.state.ban_agent(&id).await.expect("ban");
        let status = renew(&f, &conn(Some(&chain))).await.expect_err("banned");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("banned"), "{status:?}");
        // A ban also covers an agent not attested yet: the ID of an unused token's agent.
        let d = join_token::digest_of("future-token");
        let future = SpiffeId::new(
            &f.state.trust_domain,
            &join_token::identity(&d.id).expect("identity").agent_path,
        )
        .expect("id");
        f.state.ban_agent(&future).await.expect("ban");
        token(&f.state, "future-token").await;
        let status = Status::from(
            f.api
                .attest(on(&conn(None), attest_req("future-token")))
                .await
                .expect_err("banned ID"),
        );
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("is banned since"), "{status:?}");
        f.state.unban_agent(&future).await.expect("unban");
        f.api
            .attest(on(&conn(None), attest_req("future-token")))
            .await
            .expect("after unban, the unspent token works");
    }

    #[tokio::test]
    async fn csrs_with_other_curves_are_refused_by_their_key() {
        let f = fixture().await;
        token(&f.state, "curve-token").await;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let p384 = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .der()
            .to_vec();
        let mut req = attest_req("curve-token");
        req.csr = p384;
        let status = Status::from(f.api.attest(on(&conn(None), req)).await.expect_err("P-384"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("P-384"), "{status:?}");
        // The token was not spent by the refused attempt.
        f.api
            .attest(on(&conn(None), attest_req("curve-token")))
            .await
            .expect("token still usable");
    }
}
