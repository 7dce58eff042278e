//! The datastore: entries, attested agents, join tokens and CA state, behind one trait
//! so SQLite (embedded default) and PostgreSQL (several servers) serve the same server.

mod sqlite;

pub use sqlite::SqliteStore;

use async_trait::async_trait;
use lanyard_proto::{Selector, SpiffeId};

/// A registration entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    /// Sorted and free of duplicates.
    pub selectors: Vec<Selector>,
    /// Seconds; 0 means the server default.
    pub x509_svid_ttl: u32,
    pub dns_names: Vec<String>,
    pub hint: String,
    /// Unix seconds.
    pub created_at: i64,
    pub revision_number: i64,
}

/// An attested node agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub spiffe_id: SpiffeId,
    pub attestation_type: String,
    pub selectors: Vec<Selector>,
    /// Lowercase hex serial of the current agent SVID.
    pub serial: String,
    /// Serial of the SVID before the last renewal, still accepted until it expires.
    pub previous_serial: String,
    /// Unix seconds: notAfter of the current SVID.
    pub expires_at: i64,
    pub attested_at: i64,
}

/// A join token and the node alias it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub token: String,
    pub expires_at: i64,
    pub alias: Option<SpiffeId>,
}

/// The trust domain's X.509 roots as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub x509_authorities: Vec<Vec<u8>>,
    pub sequence: u64,
}

/// Narrows `list_entries`; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub spiffe_id: Option<SpiffeId>,
    pub parent_id: Option<SpiffeId>,
    /// Every one of these must be among the entry's selectors.
    pub selectors: Vec<Selector>,
}

impl EntryFilter {
    pub fn matches(&self, e: &Entry) -> bool {
        self.spiffe_id.as_ref().is_none_or(|id| *id == e.spiffe_id)
            && self.parent_id.as_ref().is_none_or(|id| *id == e.parent_id)
            && self.selectors.iter().all(|s| e.selectors.contains(s))
    }
}

/// What consuming a join token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    Accepted(JoinToken),
    Unknown,
    AlreadyUsed,
    Expired,
}

/// Errors of the datastore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("an entry with the same SPIFFE ID, parent ID and selectors already exists")]
    DuplicateEntry,
    #[error("no entry with id {0}")]
    EntryNotFound(String),
    #[error("datastore record is corrupt: {0}")]
    Corrupt(String),
    #[error("datastore: {0}")]
    Db(#[from] sqlx::Error),
    #[error("datastore migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the server keeps. Implementations must make every method atomic.
#[async_trait]
pub trait DataStore: Send + Sync + 'static {
    /// Stores a new entry; `entry.id`, `created_at` and `revision_number` are set by the caller.
    async fn create_entry(&self, entry: &Entry) -> StoreResult<()>;
    /// Replaces the entry with the same id, bumping its revision; returns the stored entry.
    async fn update_entry(&self, entry: &Entry) -> StoreResult<Entry>;
    /// Deletes an entry; returns what was deleted.
    async fn delete_entry(&self, id: &str) -> StoreResult<Entry>;
    /// All entries, oldest first.
    async fn list_entries(&self) -> StoreResult<Vec<Entry>>;

    /// Stores a join token and, in the same transaction, the node-alias entry it grants.
    async fn create_join_token(
        &self,
        token: &JoinToken,
        alias_entry: Option<&Entry>,
    ) -> StoreResult<()>;
    /// Marks a token used by `agent_id` if it is known, unused and unexpired at `now`.
    async fn use_join_token(
        &self,
        token: &str,
        agent_id: &SpiffeId,
        now: i64,
    ) -> StoreResult<TokenUse>;

    async fn upsert_agent(&self, agent: &AgentRecord) -> StoreResult<()>;
    /// Records a renewed agent SVID, but only if the agent still exists and `presented`
    /// is its current or previous serial; `presented` becomes the previous serial. Returns
    /// whether it did, so an eviction or a competing renewal is never overwritten.
    async fn renew_agent(
        &self,
        id: &SpiffeId,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> StoreResult<bool>;
    async fn get_agent(&self, id: &SpiffeId) -> StoreResult<Option<AgentRecord>>;
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Removes an agent; returns whether it existed.
    async fn delete_agent(&self, id: &SpiffeId) -> StoreResult<bool>;

    async fn load_bundle(&self, trust_domain: &str) -> StoreResult<Option<StoredBundle>>;
    async fn store_bundle(&self, trust_domain: &str, bundle: &StoredBundle) -> StoreResult<()>;
}
