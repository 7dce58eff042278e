//! The agent's local service on the Workload API socket (`lanyard.agent.local.v1`): why a
//! process gets the identities it gets, and the agent's readiness. It hands out no SVIDs,
//! so it needs no Workload API security header, and it shows a process's selectors only
//! to that process's own user (or root).

use std::sync::Arc;

use lanyard_attestors::workload::{AttestError, Digest, Process};
use lanyard_daemon::health::Readiness;
use lanyard_proto::agent_local::local_service_server::{LocalService, LocalServiceServer};
use lanyard_proto::agent_local::{
    AttestedSelector, DebugSelectorsRequest, DebugSelectorsResponse, HealthRequest, HealthResponse,
    Identity,
};
use lanyard_proto::selector::matches_all;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::peer::{Peer, PeerInfo};
use crate::sync::SnapshotRx;
use crate::workload_api::caller::{Attester, is_binary};

/// Why a local call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The process asked about runs as another user than the caller.
    #[error("process {pid} runs as uid {owner}; only its own user or root may see its selectors")]
    NotYours { pid: i32, owner: u32 },
    /// The caller itself could not be identified.
    #[error("the agent cannot identify the caller: {0}")]
    UnknownCaller(String),
    /// The process asked about does not exist (any more).
    #[error("process {0} does not exist or exited")]
    NoSuchProcess(i32),
    /// Attesting it failed.
    #[error("could not attest process {pid}: {reason}")]
    Attestation { pid: i32, reason: String },
    /// A fault of the agent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<LocalError> for Status {
    fn from(error: LocalError) -> Status {
        let message = error.to_string();
        match error {
            LocalError::NotYours { .. } | LocalError::UnknownCaller(_) => {
                Status::permission_denied(message)
            }
            LocalError::NoSuchProcess(_) => Status::not_found(message),
            LocalError::Attestation { .. } => Status::unavailable(message),
            LocalError::Internal(_) => Status::internal(message),
        }
    }
}

/// The local service.
#[derive(Debug, Clone)]
pub struct LocalApi {
    attester: Arc<Attester>,
    cache: SnapshotRx,
    readiness: watch::Receiver<Readiness>,
}

impl LocalApi {
    pub fn new(
        attester: Arc<Attester>,
        cache: SnapshotRx,
        readiness: watch::Receiver<Readiness>,
    ) -> Self {
        LocalApi {
            attester,
            cache,
            readiness,
        }
    }

    pub fn into_server(self) -> LocalServiceServer<LocalApi> {
        LocalServiceServer::new(self)
    }

    async fn debug(
        &self,
        peer: &Arc<Peer>,
        pid: i32,
    ) -> Result<DebugSelectorsResponse, LocalError> {
        let caller = peer
            .creds
            .ok_or_else(|| LocalError::UnknownCaller("no peer credentials".into()))?;
        let snapshot = self.cache.borrow().clone();
        let (process, own) = if pid == 0 || pid == caller.pid {
            let process = peer
                .process()
                .map_err(|e| LocalError::UnknownCaller(e.to_string()))?;
            (Arc::clone(process), true)
        } else {
            let proc_root = self.attester.attestor().config().proc_root.clone();
            let process = tokio::task::spawn_blocking(move || Process::by_pid(pid, &proc_root))
                .await
                .map_err(|e| LocalError::Internal(e.to_string()))?
                .map_err(|e| match e {
                    AttestError::Replaced { .. }
                    | AttestError::ProcessGone { .. }
                    | AttestError::InvalidPid { .. } => LocalError::NoSuchProcess(pid),
                    other => LocalError::Attestation {
                        pid,
                        reason: other.to_string(),
                    },
                })?;
            let owner = process.creds().uid;
            if caller.uid != 0 && owner != caller.uid {
                return Err(LocalError::NotYours { pid, owner });
            }
            (Arc::new(process), false)
        };
        let target = process.creds();
        let attestation = self
            .attester
            .attest(&process, Digest::Wanted)
            .await
            .map_err(|e| LocalError::Attestation {
                pid: target.pid,
                reason: e.to_string(),
            })?;
        // For the caller's own connection, say whether the binary selectors would count.
        let withheld = if own && !attestation.binary.is_empty() {
            let checking = Arc::clone(peer);
            let exe = attestation.exe;
            tokio::task::spawn_blocking(move || checking.check_binary(exe))
                .await
                .map_err(|e| LocalError::Internal(e.to_string()))?
                .err()
                .unwrap_or_default()
        } else {
            String::new()
        };
        let all = attestation.all();
        let identities = snapshot
            .entries
            .iter()
            .filter(|e| matches_all(&e.selectors, &all))
            .map(|e| Identity {
                spiffe_id: e.spiffe_id.to_string(),
                entry_id: e.id.clone(),
                conditional: e.selectors.iter().any(is_binary),
                svid_ready: e.svid.is_some(),
            })
            .collect();
        Ok(DebugSelectorsResponse {
            pid: target.pid,
            uid: target.uid,
            gid: target.gid,
            selectors: all
                .iter()
                .map(|s| AttestedSelector {
                    selector: s.to_string(),
                    conditional: is_binary(s),
                })
                .collect(),
            identities,
            binary_withheld: withheld,
        })
    }
}

#[tonic::async_trait]
impl LocalService for LocalApi {
    async fn debug_selectors(
        &self,
        req: Request<DebugSelectorsRequest>,
    ) -> Result<Response<DebugSelectorsResponse>, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .map(|info| Arc::clone(&info.0))
            .ok_or_else(|| {
                LocalError::Internal("the connection carries no peer information".into())
            })?;
        let pid = req.get_ref().pid;
        Ok(Response::new(self.debug(&peer, pid).await?))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let now = self.readiness.borrow().clone();
        Ok(Response::new(HealthResponse {
            ready: now.is_ready(),
            reasons: now.reasons,
        }))
    }
}
