//! The admin API on the Unix socket: entries, join tokens, agents, bans, bundle, health.
//! Every change goes through [`State`]; every failure is an [`AdminError`], mapped to a
//! gRPC status in one place.

use lanyard_attestors::node::join_token;
use lanyard_daemon::health::Readiness;
use lanyard_proto::admin::admin_service_server::AdminService;
use lanyard_proto::admin::*;
use lanyard_proto::{SpiffeId, types};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::convert::{self, InputError, entry_from_proto, entry_to_proto};
use crate::datastore::{Entry, EntryFilter, StoreError, StoredToken};
use crate::state::{BatchError, ChangeError, State};

/// Default join token lifetime: long enough to copy onto a new runner, short enough
/// that a leaked one is soon useless.
const DEFAULT_TOKEN_TTL: i32 = 600;

/// More entries than this in one batch is refused; the transaction would hold the write
/// lock too long.
pub const MAX_BATCH_ENTRIES: usize = 10_000;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("entry {index} of the batch: {source}")]
    BatchInput {
        /// 1-based, as an operator counts the entries of a file.
        index: usize,
        source: InputError,
    },
    #[error("a batch holds at most {MAX_BATCH_ENTRIES} entries, got {0}")]
    BatchTooLarge(usize),
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error(transparent)]
    Batch(BatchError),
    #[error("no entry with id {0}")]
    EntryNotFound(String),
    #[error("no attested agent {0}")]
    AgentNotFound(SpiffeId),
    #[error("no attested agent {id}; it is banned since {}", lanyard_daemon::output::rfc3339(*.since))]
    AgentBanned { id: SpiffeId, since: i64 },
    #[error("agent {0} is not banned")]
    NotBanned(SpiffeId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot make a join token: the operating system's random source failed")]
    Random,
    #[error("uid {0} may not use the admin API")]
    ForeignUid(u32),
    #[error("admin API caller has no peer credentials")]
    NoPeerCredentials,
}

/// Maps a datastore error: the admin's mistakes get their code, faults are INTERNAL.
fn store_status(e: &StoreError, message: String) -> Status {
    match e {
        StoreError::DuplicateEntry { .. } => Status::already_exists(message),
        StoreError::EntryNotFound(_) => Status::not_found(message),
        StoreError::Corrupt(_) | StoreError::Db(_) | StoreError::Migrate(_) => {
            tracing::error!(error = %message, "admin API: datastore failure");
            Status::internal(message)
        }
    }
}

fn change_status(e: &ChangeError, message: String) -> Status {
    match e {
        ChangeError::IdTaken { .. } => Status::failed_precondition(message),
        ChangeError::Store(store) => store_status(store, message),
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let message = e.to_string();
        match &e {
            AdminError::Input(_) | AdminError::BatchInput { .. } | AdminError::BatchTooLarge(_) => {
                Status::invalid_argument(message)
            }
            AdminError::Change(change) => change_status(change, message),
            AdminError::Batch(batch) => change_status(&batch.source, message),
            AdminError::EntryNotFound(_)
            | AdminError::AgentNotFound(_)
            | AdminError::AgentBanned { .. }
            | AdminError::NotBanned(_) => Status::not_found(message),
            AdminError::Store(store) => store_status(store, message),
            AdminError::ForeignUid(_) | AdminError::NoPeerCredentials => {
                Status::permission_denied(message)
            }
            AdminError::Random => {
                tracing::error!(error = %message, "admin API failure");
                Status::internal(message)
            }
        }
    }
}

type AdminResult<T> = Result<Response<T>, AdminError>;

/// The admin service.
#[derive(Debug, Clone)]
pub struct Admin {
    state: State,
    readiness: watch::Receiver<Readiness>,
}

impl Admin {
    pub fn new(state: State, readiness: watch::Receiver<Readiness>) -> Self {
        Admin { state, readiness }
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
        Some(uid) => Err(AdminError::ForeignUid(uid).into()),
        None => Err(AdminError::NoPeerCredentials.into()),
    }
}

impl Admin {
    fn new_entry(&self, raw: &types::Entry) -> Result<Entry, InputError> {
        entry_from_proto(
            raw,
            &self.state.trust_domain,
            &self.state.server_id,
            uuid::Uuid::new_v4().to_string(),
            self.state.now(),
        )
    }

    fn filter(&self, req: &ListEntriesRequest) -> Result<EntryFilter, InputError> {
        let parse = |field: &'static str, raw: &str| {
            (!raw.is_empty())
                .then(|| convert::member_id(field, raw, &self.state.trust_domain))
                .transpose()
        };
        Ok(EntryFilter {
            spiffe_id: parse("spiffe_id", &req.spiffe_id)?,
            parent_id: parse("parent_id", &req.parent_id)?,
            selectors: convert::selectors(&req.selectors)?,
        })
    }

    fn agent_id(&self, raw: &str) -> Result<SpiffeId, InputError> {
        convert::member_id("spiffe_id", raw, &self.state.trust_domain)
    }

    async fn create_entry(&self, req: Request<CreateEntryRequest>) -> AdminResult<types::Entry> {
        let by = who(&req);
        let raw = req.into_inner().entry.ok_or(InputError::Missing("entry"))?;
        let entry = self.state.create_entry(self.new_entry(&raw)?).await?;
        tracing::info!(target: "audit", %by, action = "entry.create", id = %entry.id, spiffe_id = %entry.spiffe_id,
            parent_id = %entry.parent_id, "entry created");
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn batch_create(
        &self,
        req: Request<BatchCreateEntriesRequest>,
    ) -> AdminResult<BatchCreateEntriesResponse> {
        let by = who(&req);
        let raw = req.into_inner().entries;
        if raw.len() > MAX_BATCH_ENTRIES {
            return Err(AdminError::BatchTooLarge(raw.len()));
        }
        let batch = raw
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.new_entry(e).map_err(|source| AdminError::BatchInput {
                    index: i + 1,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let created = self
            .state
            .create_entries(batch)
            .await
            .map_err(AdminError::Batch)?;
        for e in &created {
            tracing::info!(target: "audit", %by, action = "entry.create", id = %e.id, spiffe_id = %e.spiffe_id,
                parent_id = %e.parent_id, batch = created.len(), "entry created");
        }
        Ok(Response::new(BatchCreateEntriesResponse {
            entries: created.iter().map(|e| entry_to_proto(e)).collect(),
        }))
    }

    async fn update_entry(&self, req: Request<UpdateEntryRequest>) -> AdminResult<types::Entry> {
        let by = who(&req);
        let raw = req.into_inner().entry.ok_or(InputError::Missing("entry"))?;
        if raw.id.is_empty() {
            return Err(InputError::Missing("entry id").into());
        }
        let existing = self
            .state
            .entries()
            .get(&raw.id)
            .cloned()
            .ok_or_else(|| AdminError::EntryNotFound(raw.id.clone()))?;
        let entry = entry_from_proto(
            &raw,
            &self.state.trust_domain,
            &self.state.server_id,
            raw.id.clone(),
            existing.created_at,
        )?;
        let stored = self.state.update_entry(entry).await?;
        tracing::info!(target: "audit", %by, action = "entry.update", id = %stored.id, spiffe_id = %stored.spiffe_id,
            revision = stored.revision_number, "entry updated");
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> AdminResult<DeleteEntryResponse> {
        let by = who(&req);
        let req = req.into_inner();
        let mut ids: Vec<String> = Vec::with_capacity(req.ids.len() + 1);
        for id in std::iter::once(req.id).chain(req.ids) {
            if !id.is_empty() && !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Err(InputError::Missing("entry id").into());
        }
        let gone = self.state.delete_entries(&ids).await?;
        for e in &gone {
            tracing::info!(target: "audit", %by, action = "entry.delete", id = %e.id, spiffe_id = %e.spiffe_id, "entry deleted");
        }
        Ok(Response::new(DeleteEntryResponse {
            deleted: gone.into_iter().map(|e| e.id).collect(),
        }))
    }

    fn get_entry(&self, req: Request<GetEntryRequest>) -> AdminResult<types::Entry> {
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(InputError::Missing("id").into());
        }
        let snapshot = self.state.entries();
        let entry = snapshot.get(&id).ok_or(AdminError::EntryNotFound(id))?;
        Ok(Response::new(entry_to_proto(entry)))
    }

    fn list_entries(&self, req: Request<ListEntriesRequest>) -> AdminResult<ListEntriesResponse> {
        let filter = self.filter(req.get_ref())?;
        let snapshot = self.state.entries();
        let entries = snapshot
            .iter()
            .filter(|e| filter.matches(e))
            .map(|e| entry_to_proto(e))
            .collect();
        Ok(Response::new(ListEntriesResponse { entries }))
    }

    fn count_entries(&self, req: Request<ListEntriesRequest>) -> AdminResult<CountEntriesResponse> {
        let filter = self.filter(req.get_ref())?;
        let snapshot = self.state.entries();
        let count = if filter.spiffe_id.is_none()
            && filter.parent_id.is_none()
            && filter.selectors.is_empty()
        {
            snapshot.len()
        } else {
            snapshot.iter().filter(|e| filter.matches(e)).count()
        };
        Ok(Response::new(CountEntriesResponse {
            count: count as u64,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> AdminResult<JoinToken> {
        let by = who(&req);
        let req = req.into_inner();
        let ttl = if req.ttl == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            req.ttl
        };
        if ttl < convert::MIN_TTL_SECS {
            return Err(InputError::TokenTtl(ttl).into());
        }
        let alias = (!req.spiffe_id.is_empty())
            .then(|| convert::workload_id("spiffe_id", &req.spiffe_id, &self.state.trust_domain))
            .transpose()?;
        let token = join_token::generate().ok_or(AdminError::Random)?;
        let digest = join_token::digest_of(&token);
        let node = join_token::identity(&digest.id).map_err(InputError::Selector)?;
        let agent_id =
            SpiffeId::new(&self.state.trust_domain, &node.agent_path).map_err(|source| {
                InputError::BadId {
                    field: "agent ID",
                    raw: node.agent_path.clone(),
                    source,
                }
            })?;
        let now = self.state.now();
        let stored = StoredToken {
            hash: digest.hash,
            id: digest.id.clone(),
            expires_at: now + i64::from(ttl),
            created_at: now,
        };
        // The alias is a node entry (parented to the server) whose only selector is the
        // one an agent gets by attesting with this token.
        let alias_entry = alias.as_ref().map(|id| Entry {
            id: uuid::Uuid::new_v4().to_string(),
            spiffe_id: id.clone(),
            parent_id: self.state.server_id.clone(),
            selectors: node.selectors.clone(),
            x509_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            created_at: now,
            revision_number: 0,
        });
        self.state.create_join_token(&stored, alias_entry).await?;
        // The token itself is never logged; its ID names it.
        tracing::info!(target: "audit", %by, action = "token.create", token_id = %digest.id, agent = %agent_id,
            expires_at = stored.expires_at, alias = alias.as_ref().map(|a| a.as_str()).unwrap_or(""),
            "join token created");
        Ok(Response::new(JoinToken {
            token,
            expires_at: stored.expires_at,
            spiffe_id: alias.map(|a| a.to_string()).unwrap_or_default(),
            agent_id: agent_id.to_string(),
            token_id: digest.id,
        }))
    }

    async fn list_agents(&self) -> AdminResult<ListAgentsResponse> {
        let agents = self.state.agents().await?;
        let snapshot = self.state.entries();
        let agents = agents
            .iter()
            .map(|a| convert::agent_to_proto(a, snapshot.aliases(&a.selectors)))
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn get_agent(&self, req: Request<GetAgentRequest>) -> AdminResult<types::Agent> {
        let id = self.agent_id(&req.into_inner().spiffe_id)?;
        match self.state.agent(&id).await? {
            Some(a) => {
                let aliases = self.state.entries().aliases(&a.selectors);
                Ok(Response::new(convert::agent_to_proto(&a, aliases)))
            }
            None => match self.state.ban(&id).await? {
                Some(ban) => Err(AdminError::AgentBanned {
                    id,
                    since: ban.banned_at,
                }),
                None => Err(AdminError::AgentNotFound(id)),
            },
        }
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> AdminResult<EvictAgentResponse> {
        let by = who(&req);
        let id = self.agent_id(&req.into_inner().spiffe_id)?;
        if !self.state.evict_agent(&id).await? {
            return Err(AdminError::AgentNotFound(id));
        }
        tracing::info!(target: "audit", %by, action = "agent.evict", agent = %id, "agent evicted");
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn ban_agent(&self, req: Request<BanAgentRequest>) -> AdminResult<BanAgentResponse> {
        let by = who(&req);
        let id = self.agent_id(&req.into_inner().spiffe_id)?;
        let banned = self.state.ban_agent(&id).await?;
        tracing::info!(target: "audit", %by, action = "agent.ban", agent = %id, was_attested = banned.was_attested,
            already = banned.already, "agent banned");
        Ok(Response::new(BanAgentResponse {
            was_attested: banned.was_attested,
            already_banned: banned.already,
        }))
    }

    async fn unban_agent(
        &self,
        req: Request<UnbanAgentRequest>,
    ) -> AdminResult<UnbanAgentResponse> {
        let by = who(&req);
        let id = self.agent_id(&req.into_inner().spiffe_id)?;
        if !self.state.unban_agent(&id).await? {
            return Err(AdminError::NotBanned(id));
        }
        tracing::info!(target: "audit", %by, action = "agent.unban", agent = %id, "agent unbanned");
        Ok(Response::new(UnbanAgentResponse {}))
    }

    async fn list_bans(&self) -> AdminResult<ListBansResponse> {
        let bans = self
            .state
            .bans()
            .await?
            .into_iter()
            .map(|b| Ban {
                spiffe_id: b.spiffe_id.to_string(),
                banned_at: b.banned_at,
            })
            .collect();
        Ok(Response::new(ListBansResponse { bans }))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_entry(
        &self,
        req: Request<CreateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        Ok(Admin::create_entry(self, req).await?)
    }

    async fn batch_create_entries(
        &self,
        req: Request<BatchCreateEntriesRequest>,
    ) -> Result<Response<BatchCreateEntriesResponse>, Status> {
        Ok(self.batch_create(req).await?)
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        Ok(Admin::update_entry(self, req).await?)
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        Ok(Admin::delete_entry(self, req).await?)
    }

    async fn get_entry(
        &self,
        req: Request<GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        Ok(Admin::get_entry(self, req)?)
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        Ok(Admin::list_entries(self, req)?)
    }

    async fn count_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        Ok(Admin::count_entries(self, req)?)
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        Ok(Admin::create_join_token(self, req).await?)
    }

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Admin::list_agents(self).await?)
    }

    async fn get_agent(
        &self,
        req: Request<GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        Ok(Admin::get_agent(self, req).await?)
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        Ok(Admin::evict_agent(self, req).await?)
    }

    async fn ban_agent(
        &self,
        req: Request<BanAgentRequest>,
    ) -> Result<Response<BanAgentResponse>, Status> {
        Ok(Admin::ban_agent(self, req).await?)
    }

    async fn unban_agent(
        &self,
        req: Request<UnbanAgentRequest>,
    ) -> Result<Response<UnbanAgentResponse>, Status> {
        Ok(Admin::unban_agent(self, req).await?)
    }

    async fn list_bans(
        &self,
        _req: Request<ListBansRequest>,
    ) -> Result<Response<ListBansResponse>, Status> {
        Ok(Admin::list_bans(self).await?)
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<types::X509Bundle>, Status> {
        Ok(Response::new(
            self.state.bundle().to_proto(&self.state.trust_domain),
        ))
    }

    async fn get_health(
        &self,
        _req: Request<GetHealthRequest>,
    ) -> Result<Response<GetHealthResponse>, Status> {
        Ok(Response::new(GetHealthResponse {
            reasons: self.readiness.borrow().reasons.clone(),
        }))
    }
}
