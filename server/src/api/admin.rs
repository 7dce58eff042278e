//! The admin API on the Unix socket: entries, join tokens, agents, bundle.

use lanyard_attestors::node::join_token;
use lanyard_proto::admin::admin_service_server::AdminService;
use lanyard_proto::admin::*;
use lanyard_proto::types;
use tonic::{Request, Response, Status};

use super::convert::{self, entry_from_proto, entry_to_proto};
use crate::ca::now_unix;
use crate::datastore::{EntryFilter, JoinToken as StoredToken, StoreError};
use crate::state::State;

/// Default join token lifetime: long enough to copy onto a new runner, short enough
/// that a leaked one is soon useless.
const DEFAULT_TOKEN_TTL: i32 = 600;

/// The admin service.
#[derive(Debug, Clone)]
pub struct Admin {
    state: State,
}

impl Admin {
    pub fn new(state: State) -> Self {
        Admin { state }
    }
}

/// Maps datastore errors to statuses: the one place this service does so.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::DuplicateEntry => Status::already_exists(e.to_string()),
        StoreError::EntryNotFound(_) => Status::not_found(e.to_string()),
        other => {
            tracing::error!(error = %other, "datastore failure");
            Status::internal(other.to_string())
        }
    }
}

/// Who made an admin call, for the audit trail: the peer uid of the admin socket.
fn who<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map_or_else(
            || "unknown".to_string(),
            |cred| format!("uid:{}", cred.uid()),
        )
}

/// Only the server's own user (or root) may use the admin socket; the socket's
/// directory is 0700 as well, this is the second lock.
pub fn authorize_peer(req: Request<()>) -> Result<Request<()>, Status> {
    let uid = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    let me = nix::unistd::geteuid().as_raw();
    match uid {
        Some(0) => Ok(req),
        Some(uid) if uid == me => Ok(req),
        Some(uid) => Err(Status::permission_denied(format!(
            "uid {uid} may not use the admin API"
        ))),
        None => Err(Status::permission_denied(
            "admin API caller has no peer credentials",
        )),
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_entry(
        &self,
        req: Request<CreateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let by = who(&req);
        let raw = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let entry = entry_from_proto(
            &raw,
            &self.state.trust_domain,
            uuid::Uuid::new_v4().to_string(),
            now_unix(),
        )?;
        self.state
            .change_entries(self.state.store.create_entry(&entry))
            .await
            .map_err(status)?;
        tracing::info!(target: "audit", %by, action = "entry.create", id = %entry.id, spiffe_id = %entry.spiffe_id,
            parent_id = %entry.parent_id, "entry created");
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let by = who(&req);
        let raw = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        if raw.id.is_empty() {
            return Err(Status::invalid_argument("entry id is required"));
        }
        let entry = entry_from_proto(&raw, &self.state.trust_domain, raw.id.clone(), 0)?;
        let stored = self
            .state
            .change_entries(self.state.store.update_entry(&entry))
            .await
            .map_err(status)?;
        tracing::info!(target: "audit", %by, action = "entry.update", id = %stored.id, spiffe_id = %stored.spiffe_id,
            revision = stored.revision_number, "entry updated");
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        let by = who(&req);
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("entry id is required"));
        }
        let gone = self
            .state
            .change_entries(self.state.store.delete_entry(&id))
            .await
            .map_err(status)?;
        tracing::info!(target: "audit", %by, action = "entry.delete", id = %gone.id, spiffe_id = %gone.spiffe_id, "entry deleted");
        Ok(Response::new(DeleteEntryResponse {}))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let req = req.into_inner();
        let parse = |field: &str, raw: &str| {
            (!raw.is_empty())
                .then(|| convert::member_id(field, raw, &self.state.trust_domain))
                .transpose()
        };
        let filter = EntryFilter {
            spiffe_id: parse("spiffe_id", &req.spiffe_id)?,
            parent_id: parse("parent_id", &req.parent_id)?,
            selectors: convert::selectors(&req.selectors)?,
        };
        let entries = self.state.entries();
        let entries = entries
            .all()
            .iter()
            .filter(|e| filter.matches(e))
            .map(|e| entry_to_proto(e))
            .collect();
        Ok(Response::new(ListEntriesResponse { entries }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let by = who(&req);
        let req = req.into_inner();
        let ttl = if req.ttl == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            req.ttl
        };
        if ttl < convert::MIN_TTL_SECS {
            return Err(Status::invalid_argument(format!(
                "token ttl must be at least {} seconds, got {ttl}",
                convert::MIN_TTL_SECS
            )));
        }
        let alias = (!req.spiffe_id.is_empty())
            .then(|| convert::workload_id("spiffe_id", &req.spiffe_id, &self.state.trust_domain))
            .transpose()?;
        let token = uuid::Uuid::new_v4().to_string();
        let now = now_unix();
        let stored = StoredToken {
            token: token.clone(),
            expires_at: now + i64::from(ttl),
            alias: alias.clone(),
        };
        // The alias is a node entry (parented to the server) whose only selector is the
        // one an agent gets by attesting with this token.
        let alias_entry = alias
            .as_ref()
            .map(|id| -> Result<_, Status> {
                Ok(crate::datastore::Entry {
                    id: uuid::Uuid::new_v4().to_string(),
                    spiffe_id: id.clone(),
                    parent_id: self.state.server_id.clone(),
                    selectors: vec![
                        join_token::selector(&token)
                            .map_err(|e| Status::internal(e.to_string()))?,
                    ],
                    x509_svid_ttl: 0,
                    dns_names: vec![],
                    hint: String::new(),
                    created_at: now,
                    revision_number: 0,
                })
            })
            .transpose()?;
        self.state
            .change_entries(
                self.state
                    .store
                    .create_join_token(&stored, alias_entry.as_ref()),
            )
            .await
            .map_err(status)?;
        tracing::info!(target: "audit", %by, action = "token.create", expires_at = stored.expires_at,
            alias = alias.as_ref().map(|a| a.as_str()).unwrap_or(""), "join token created");
        Ok(Response::new(JoinToken {
            token,
            expires_at: stored.expires_at,
            spiffe_id: alias.map(|a| a.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.state.store.list_agents().await.map_err(status)?;
        let snapshot = self.state.entries();
        let agents = agents
            .iter()
            .map(|a| {
                convert::agent_to_proto(a, snapshot.aliases(&self.state.server_id, &a.selectors))
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let by = who(&req);
        let raw = req.into_inner().spiffe_id;
        let id = convert::member_id("spiffe_id", &raw, &self.state.trust_domain)?;
        if !self.state.store.delete_agent(&id).await.map_err(status)? {
            return Err(Status::not_found(format!("no attested agent {id}")));
        }
        self.state.announce_eviction(id.clone());
        tracing::info!(target: "audit", %by, action = "agent.evict", agent = %id, "agent evicted");
        Ok(Response::new(EvictAgentResponse {}))
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
