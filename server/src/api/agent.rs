//! The agent API (TLS 1.3): node attestation, agent SVID renewal, pushed entry sync and
//! batch signing of workload CSRs. Only AttestAgent and GetBundle may be called without
//! the agent's X509-SVID; everything else authenticates the agent by it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lanyard_attestors::node::{NodeAttestError, join_token};
use lanyard_proto::agent::agent_service_server::AgentService;
use lanyard_proto::agent::*;
use lanyard_proto::types;
use lanyard_proto::{SpiffeId, svid};
use rcgen::PublicKeyData;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::entry_to_proto;
use crate::ca::{CaError, VerifiedCsr, now_unix};
use crate::datastore::{AgentRecord, Entry, StoreError, TokenUse};
use crate::state::State;
use crate::tls::PeerInfo;

/// More CSRs than this in one call is refused; agents split larger batches.
pub const MAX_BATCH: usize = 1000;
/// Batches are split over the cores, but not into pieces smaller than this (a thread
/// handoff costs more than signing a few SVIDs).
const MIN_CHUNK: usize = 8;

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    state: State,
    /// Lifetime of agent SVIDs.
    agent_ttl: Duration,
    /// Turns true on shutdown: open sync streams then end with UNAVAILABLE, so the
    /// graceful shutdown does not wait for agents to hang up.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AgentApi {
    pub fn new(
        state: State,
        agent_ttl: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        AgentApi {
            state,
            agent_ttl,
            shutdown,
        }
    }
}

/// Resolves once shutdown is signalled.
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Maps internal errors to statuses: the one place this service does so.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Node(#[from] NodeAttestError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Ca(CaError::Expired | CaError::Sign(_)) | ApiError::Store(_) => {
                tracing::error!(error = %e, "agent API failure");
                Status::internal(e.to_string())
            }
            ApiError::Ca(e) => Status::invalid_argument(e.to_string()),
            ApiError::Node(e) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// An authenticated agent: its record, and the serial and public key of the SVID it
/// presented.
struct Caller {
    record: AgentRecord,
    serial: String,
    public_key: Vec<u8>,
}

impl AgentApi {
    /// Authenticates the caller by its client certificate: a current SVID of an agent the
    /// datastore knows (evicted agents and superseded SVIDs are refused).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let leaf = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.certs.clone())
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this call needs the agent's X509-SVID as TLS client certificate",
                )
            })?;
        let info = svid::check_leaf(&leaf, None).map_err(|e| {
            Status::unauthenticated(format!("client certificate is not an agent SVID: {e}"))
        })?;
        let record = self
            .state
            .store
            .get_agent(&info.spiffe_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "agent {} is not attested (evicted?)",
                    info.spiffe_id
                ))
            })?;
        if info.serial_hex != record.serial && info.serial_hex != record.previous_serial {
            return Err(Status::permission_denied(format!(
                "agent {} presented a superseded SVID (serial {})",
                info.spiffe_id, info.serial_hex
            )));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|_| Status::unauthenticated("client certificate is not valid DER"))?;
        let public_key = cert.public_key().subject_public_key.data.to_vec();
        Ok(Caller {
            record,
            serial: info.serial_hex,
            public_key,
        })
    }

    /// The entries this agent may sign for, keyed by entry id.
    fn authorized(&self, agent: &AgentRecord) -> Vec<Arc<Entry>> {
        let snapshot = self.state.entries();
        let aliases = snapshot.aliases(&self.state.server_id, &agent.selectors);
        snapshot.authorized(&agent.spiffe_id, &aliases)
    }

    fn sign_agent(
        &self,
        id: &SpiffeId,
        csr: &VerifiedCsr,
    ) -> Result<crate::ca::SignedSvid, ApiError> {
        Ok(self
            .state
            .ca
            .sign_svid(id, csr.public_key(), self.agent_ttl, &[])?)
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn attest_agent(
        &self,
        req: Request<AttestAgentRequest>,
    ) -> Result<Response<AttestAgentResponse>, Status> {
        let remote = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote.to_string())
            .unwrap_or_default();
        let req = req.into_inner();
        if req.method != join_token::METHOD {
            return Err(ApiError::from(NodeAttestError::UnknownMethod(req.method)).into());
        }
        let (token, node) = join_token::verify_form(&req.payload).map_err(ApiError::from)?;
        let agent_id = SpiffeId::new(&self.state.trust_domain, &node.agent_path)
            .map_err(|e| Status::invalid_argument(format!("agent ID: {e}")))?;
        let csr = VerifiedCsr::parse(&req.csr).map_err(ApiError::from)?;
        if csr
            .spiffe_id
            .as_ref()
            .is_some_and(|asked| *asked != agent_id)
        {
            return Err(Status::invalid_argument(
                "agent CSR asks for an ID other than the agent's",
            ));
        }
        // Sign before spending the token, so a signing failure leaves the token usable;
        // the SVID is discarded unless the token is accepted.
        let signed = self.sign_agent(&agent_id, &csr)?;
        let now = now_unix();
        let refused = |why: &str| {
            tracing::warn!(target: "audit", action = "agent.attest", method = join_token::METHOD, %remote,
                outcome = "refused", reason = why, "node attestation refused");
            Status::permission_denied(format!("join token {why}"))
        };
        match self
            .state
            .store
            .use_join_token(&token, &agent_id, now)
            .await
            .map_err(ApiError::from)?
        {
            TokenUse::Accepted(_) => {}
            TokenUse::Unknown => return Err(refused("is unknown")),
            TokenUse::AlreadyUsed => return Err(refused("was already used")),
            TokenUse::Expired => return Err(refused("has expired")),
        }
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: join_token::METHOD.into(),
            selectors: node.selectors.clone(),
            serial: signed.serial_hex.clone(),
            previous_serial: String::new(),
            expires_at: signed.not_after,
            attested_at: now,
        };
        self.state
            .store
            .upsert_agent(&record)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(target: "audit", action = "agent.attest", method = join_token::METHOD, agent = %agent_id,
            %remote, serial = %signed.serial_hex, outcome = "ok", "agent attested");
        Ok(Response::new(AttestAgentResponse {
            spiffe_id: agent_id.to_string(),
            x509_svid_chain: signed.chain,
            bundle: Some(self.state.bundle().to_proto(&self.state.trust_domain)),
            selectors: node.selectors.iter().map(types::Selector::from).collect(),
        }))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let caller = self.caller(&req).await?;
        let csr = VerifiedCsr::parse(&req.get_ref().csr).map_err(ApiError::from)?;
        if csr.public_key().der_bytes() == caller.public_key {
            return Err(ApiError::from(CaError::CsrKeyReused).into());
        }
        let id = caller.record.spiffe_id.clone();
        if csr.spiffe_id.as_ref().is_some_and(|asked| *asked != id) {
            return Err(Status::invalid_argument(
                "agent CSR asks for an ID other than the agent's",
            ));
        }
        let signed = self.sign_agent(&id, &csr)?;
        let renewed = self
            .state
            .store
            .renew_agent(&id, &caller.serial, &signed.serial_hex, signed.not_after)
            .await
            .map_err(ApiError::from)?;
        if !renewed {
            return Err(Status::permission_denied(format!(
                "agent {id} was evicted or renewed meanwhile"
            )));
        }
        tracing::info!(target: "audit", action = "agent.renew", agent = %id, serial = %signed.serial_hex, "agent SVID renewed");
        Ok(Response::new(RenewAgentResponse {
            x509_svid_chain: signed.chain,
        }))
    }

    type SyncEntriesStream = SyncStream;

    async fn sync_entries(
        &self,
        req: Request<SyncEntriesRequest>,
    ) -> Result<Response<SyncStream>, Status> {
        let caller = self.caller(&req).await?;
        let api = self.clone();
        let mut entries_rx = self.state.watch_entries();
        let mut bundle_rx = self.state.watch_bundle();
        let mut evictions = self.state.watch_evictions();
        let mut shutdown = self.shutdown.clone();
        let agent_id = caller.record.spiffe_id.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last_sent: Option<(Vec<(String, i64)>, u64)> = None;
            loop {
                entries_rx.borrow_and_update();
                let bundle = bundle_rx.borrow_and_update().clone();
                let entries = api.authorized(&caller.record);
                let key = (
                    entries
                        .iter()
                        .map(|e| (e.id.clone(), e.revision_number))
                        .collect::<Vec<_>>(),
                    bundle.sequence,
                );
                if last_sent.as_ref() != Some(&key) {
                    let msg = SyncEntriesResponse {
                        entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
                        bundle: Some(bundle.to_proto(&api.state.trust_domain)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last_sent = Some(key);
                }
                tokio::select! {
                    changed = entries_rx.changed() => if changed.is_err() { return },
                    changed = bundle_rx.changed() => if changed.is_err() { return },
                    evicted = evictions.recv() => match evicted {
                        Ok(id) if id == agent_id => {
                            let _ = tx.send(Err(Status::permission_denied(format!("agent {agent_id} was evicted")))).await;
                            return;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Missed evictions: ask the datastore whether this agent is one.
                            if matches!(api.state.store.get_agent(&agent_id).await, Ok(None)) {
                                let _ = tx.send(Err(Status::permission_denied(format!("agent {agent_id} was evicted")))).await;
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    () = stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
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

    async fn sign_x509_svids(
        &self,
        req: Request<SignX509SvidsRequest>,
    ) -> Result<Response<SignX509SvidsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} CSRs per call, got {}",
                requests.len()
            )));
        }
        let authorized: HashMap<String, Arc<Entry>> = self
            .authorized(&caller.record)
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        // Signing is CPU work: keep it off the async workers, and spread one batch over
        // the cores, since an agent sends its batches one at a time.
        let authorized = Arc::new(authorized);
        let agent = Arc::new((caller.record.spiffe_id.clone(), caller.public_key));
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
                    .map_err(|e| Status::internal(format!("signing task failed: {e}")))?,
            );
        }
        Ok(Response::new(SignX509SvidsResponse { results }))
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
                error: why,
            }
        }
    }
}

/// Signs one CSR if its entry is authorized for the agent, the CSR's single URI SAN is
/// the entry's SPIFFE ID, its signature verifies and its key is not the agent's own.
fn sign_one(
    state: &State,
    authorized: &HashMap<String, Arc<Entry>>,
    agent_key: &[u8],
    req: &SvidRequest,
) -> Result<(Arc<Entry>, crate::ca::SignedSvid), String> {
    let entry = authorized
        .get(&req.entry_id)
        .ok_or_else(|| format!("entry {} is not authorized for this agent", req.entry_id))?;
    let csr = VerifiedCsr::parse(&req.csr).map_err(|e| e.to_string())?;
    match &csr.spiffe_id {
        Some(id) if *id == entry.spiffe_id => {}
        Some(id) => {
            return Err(CaError::CsrIdMismatch {
                asked: id.to_string(),
                expected: entry.spiffe_id.to_string(),
            }
            .to_string());
        }
        None => {
            return Err(format!(
                "CSR names no SPIFFE ID; its URI SAN must be {}",
                entry.spiffe_id
            ));
        }
    }
    if csr.public_key().der_bytes() == agent_key {
        return Err(CaError::CsrKeyReused.to_string());
    }
    let ttl = match entry.x509_svid_ttl {
        0 => state.default_svid_ttl,
        secs => Duration::from_secs(u64::from(secs)),
    };
    let signed = state
        .ca
        .sign_svid(&entry.spiffe_id, csr.public_key(), ttl, &entry.dns_names)
        .map_err(|e| e.to_string())?;
    Ok((Arc::clone(entry), signed))
}
