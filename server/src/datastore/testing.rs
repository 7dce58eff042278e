//! A datastore for unit tests: SQLite underneath, counting the reads that scale with the
//! number of entries, and able to fail writes on demand.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use lanyard_proto::SpiffeId;

use super::{
    AgentRecord, AttestRefusal, Ban, Banned, DataStore, Entry, SqliteStore, StoreError,
    StoreResult, StoredBundle, StoredToken,
};

#[derive(Debug)]
pub(crate) struct TestStore {
    pub inner: SqliteStore,
    pub list_entries: AtomicUsize,
    pub entry_revisions: AtomicUsize,
    /// Rows fetched by id.
    pub get_entries: AtomicUsize,
    /// When set, the readiness probe's write fails as on a full disk.
    pub fail_probe: AtomicBool,
}

impl TestStore {
    pub async fn open(dir: &std::path::Path) -> Self {
        TestStore {
            inner: SqliteStore::open(&dir.join("ds.sqlite3"))
                .await
                .expect("store"),
            list_entries: AtomicUsize::new(0),
            entry_revisions: AtomicUsize::new(0),
            get_entries: AtomicUsize::new(0),
            fail_probe: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl DataStore for TestStore {
    async fn create_entries(&self, entries: &[Entry]) -> StoreResult<()> {
        self.inner.create_entries(entries).await
    }
    async fn update_entry(&self, entry: &Entry) -> StoreResult<Entry> {
        self.inner.update_entry(entry).await
    }
    async fn delete_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>> {
        self.inner.delete_entries(ids).await
    }
    async fn list_entries(&self) -> StoreResult<Vec<Entry>> {
        self.list_entries.fetch_add(1, Ordering::SeqCst);
        self.inner.list_entries().await
    }
    async fn entry_revisions(&self) -> StoreResult<Vec<(String, i64)>> {
        self.entry_revisions.fetch_add(1, Ordering::SeqCst);
        self.inner.entry_revisions().await
    }
    async fn get_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>> {
        self.get_entries.fetch_add(ids.len(), Ordering::SeqCst);
        self.inner.get_entries(ids).await
    }
    async fn create_join_token(&self, t: &StoredToken, a: Option<&Entry>) -> StoreResult<()> {
        self.inner.create_join_token(t, a).await
    }
    async fn record_attestation(
        &self,
        a: &AgentRecord,
        t: Option<&str>,
        now: i64,
    ) -> StoreResult<Result<(), AttestRefusal>> {
        self.inner.record_attestation(a, t, now).await
    }
    async fn prune_join_tokens(
        &self,
        now: i64,
        forget: i64,
        limit: u32,
    ) -> StoreResult<Vec<Entry>> {
        self.inner.prune_join_tokens(now, forget, limit).await
    }
    async fn renew_agent(&self, i: &SpiffeId, p: &str, s: &str, e: i64) -> StoreResult<bool> {
        self.inner.renew_agent(i, p, s, e).await
    }
    async fn drop_previous_serial(&self, i: &SpiffeId, c: &str) -> StoreResult<()> {
        self.inner.drop_previous_serial(i, c).await
    }
    async fn get_agent(&self, i: &SpiffeId) -> StoreResult<Option<AgentRecord>> {
        self.inner.get_agent(i).await
    }
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.inner.list_agents().await
    }
    async fn evict_agent(&self, i: &SpiffeId) -> StoreResult<Option<Vec<Entry>>> {
        self.inner.evict_agent(i).await
    }
    async fn ban_agent(&self, i: &SpiffeId, now: i64) -> StoreResult<Banned> {
        self.inner.ban_agent(i, now).await
    }
    async fn unban_agent(&self, i: &SpiffeId) -> StoreResult<bool> {
        self.inner.unban_agent(i).await
    }
    async fn get_ban(&self, i: &SpiffeId) -> StoreResult<Option<Ban>> {
        self.inner.get_ban(i).await
    }
    async fn list_bans(&self) -> StoreResult<Vec<Ban>> {
        self.inner.list_bans().await
    }
    async fn load_bundle(&self, td: &str) -> StoreResult<Option<StoredBundle>> {
        self.inner.load_bundle(td).await
    }
    async fn store_bundle(&self, td: &str, b: &StoredBundle) -> StoreResult<()> {
        self.inner.store_bundle(td, b).await
    }
    async fn probe_write(&self, now: i64) -> StoreResult<()> {
        if self.fail_probe.load(Ordering::SeqCst) {
            return Err(StoreError::Db(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "database or disk is full",
            ))));
        }
        self.inner.probe_write(now).await
    }
}
