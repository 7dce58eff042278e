//! The datastore: entries, attested agents, join tokens, bans and CA state, behind one
//! trait so SQLite (embedded default) and PostgreSQL (several servers) serve the same
//! server. Only [`crate::state::State`] calls it, so every change also reaches the
//! in-memory index.

mod sqlite;
#[cfg(test)]
pub(crate) mod testing;

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
    /// Serial of the SVID before the last renewal, or empty. It is accepted only until
    /// the current serial has been used once (a lost renewal reply stays survivable, a
    /// stolen old SVID cannot lock out the current one).
    pub previous_serial: String,
    /// Unix seconds: notAfter of the current SVID.
    pub expires_at: i64,
    pub attested_at: i64,
}

/// A join token as stored: its digest, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// The token's ID (first 32 hex digits of `hash`).
    pub id: String,
    pub expires_at: i64,
    pub created_at: i64,
}

/// The trust domain's X.509 roots as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub x509_authorities: Vec<Vec<u8>>,
    pub sequence: u64,
}

/// A banned agent ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub banned_at: i64,
}

/// Narrows a listing of entries; every set field must match.
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

/// Why the datastore refused to record an attestation (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestRefusal {
    /// The agent ID is banned since `since` (Unix seconds).
    Banned {
        since: i64,
    },
    TokenUnknown,
    TokenUsed,
    TokenExpired,
}

/// What banning an agent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banned {
    /// Whether the agent was attested (and is now evicted).
    pub was_attested: bool,
    /// Whether it was banned already.
    pub already: bool,
    /// Alias entries of the join token it attested with, removed with it.
    pub removed: Vec<Entry>,
}

/// Errors of the datastore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("an entry for {spiffe_id} with the same parent ID and selectors already exists")]
    DuplicateEntry { spiffe_id: String },
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

/// Everything the server keeps. Implementations make every method atomic: a method
/// that fails has changed nothing.
#[async_trait]
pub trait DataStore: Send + Sync + 'static {
    /// Stores new entries in one transaction (all or none); `id`, `created_at` and
    /// `revision_number` are set by the caller.
    async fn create_entries(&self, entries: &[Entry]) -> StoreResult<()>;
    /// Replaces the entry with the same id, bumping its revision; returns the stored entry.
    async fn update_entry(&self, entry: &Entry) -> StoreResult<Entry>;
    /// Deletes entries in one transaction (all or none); returns what was deleted.
    async fn delete_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>>;
    /// All entries, oldest first. Read at start; changes are applied incrementally after.
    async fn list_entries(&self) -> StoreResult<Vec<Entry>>;
    /// Every entry's id and revision, for the safety-net resync to find what changed.
    async fn entry_revisions(&self) -> StoreResult<Vec<(String, i64)>>;
    /// The entries with these ids that exist.
    async fn get_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>>;

    /// Stores a join token and, in the same transaction, the node-alias entry it grants
    /// (linked to it, so it goes with the token).
    async fn create_join_token(
        &self,
        token: &StoredToken,
        alias_entry: Option<&Entry>,
    ) -> StoreResult<()>;
    /// Records an attestation in one transaction: refused if the agent ID is banned;
    /// with `token_hash`, spends the token (known, unused, unexpired at `now`) for this
    /// agent; then stores the agent.
    async fn record_attestation(
        &self,
        agent: &AgentRecord,
        token_hash: Option<&str>,
        now: i64,
    ) -> StoreResult<Result<(), AttestRefusal>>;
    /// Removes the alias entries of up to `limit` join tokens that expired unused by
    /// `now`, and forgets up to `limit` tokens that expired before `forget_before`
    /// (unused ones, and used ones whose agent is gone). Until a token is forgotten, its
    /// digest still answers "expired" rather than "unknown". Returns the removed entries.
    async fn prune_join_tokens(
        &self,
        now: i64,
        forget_before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Entry>>;

    /// Records a renewed agent SVID, but only if the agent still exists and `presented`
    /// is its current serial, or its previous serial while the current one is unused;
    /// `presented` becomes the previous serial. Returns whether it did, so an eviction or
    /// a competing renewal is never overwritten.
    async fn renew_agent(
        &self,
        id: &SpiffeId,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> StoreResult<bool>;
    /// The current serial was used: the previous one stops being accepted.
    async fn drop_previous_serial(&self, id: &SpiffeId, current: &str) -> StoreResult<()>;
    async fn get_agent(&self, id: &SpiffeId) -> StoreResult<Option<AgentRecord>>;
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Removes an agent and the alias entries of the join token it used. `None` if no
    /// such agent.
    async fn evict_agent(&self, id: &SpiffeId) -> StoreResult<Option<Vec<Entry>>>;
    /// Bans an agent ID (remembered even if it is not attested now) and evicts it.
    async fn ban_agent(&self, id: &SpiffeId, now: i64) -> StoreResult<Banned>;
    /// Lifts a ban; returns whether there was one.
    async fn unban_agent(&self, id: &SpiffeId) -> StoreResult<bool>;
    async fn get_ban(&self, id: &SpiffeId) -> StoreResult<Option<Ban>>;
    async fn list_bans(&self) -> StoreResult<Vec<Ban>>;

    async fn load_bundle(&self, trust_domain: &str) -> StoreResult<Option<StoredBundle>>;
    async fn store_bundle(&self, trust_domain: &str, bundle: &StoredBundle) -> StoreResult<()>;

    /// A small write that proves the datastore still accepts writes.
    async fn probe_write(&self, now: i64) -> StoreResult<()>;
}
