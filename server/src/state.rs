//! The server's shared state and the only writer of entries and agents. Every change
//! goes through a method here that writes the datastore and then applies the same change
//! to the in-memory entry index and publishes the new snapshot, so what agents see is
//! always what the datastore holds, and no caller can forget to publish.

use std::sync::Arc;
use std::time::Duration;

use lanyard_attestors::forms::Scope;
use lanyard_proto::{SpiffeId, TrustDomain};
use tokio::sync::{Mutex, broadcast, watch};

use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::datastore::{
    AgentRecord, AttestRefusal, Ban, Banned, DataStore, Entry, StoreError, StoreResult,
    StoredBundle, StoredToken,
};
use crate::entries::EntrySnapshot;

/// The trust domain's X.509 roots as served to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub x509_authorities: Vec<Vec<u8>>,
    pub sequence: u64,
}

impl Bundle {
    pub fn to_proto(&self, td: &TrustDomain) -> lanyard_proto::types::X509Bundle {
        lanyard_proto::types::X509Bundle {
            trust_domain: td.as_str().to_string(),
            x509_authorities: self.x509_authorities.clone(),
            sequence: self.sequence,
        }
    }
}

/// Why a change to the entries was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// A workload entry would take a node alias's ID, or a node entry a workload
    /// entry's: entries parented to that ID would then reach agents they were not meant
    /// for (see [`EntrySnapshot::authorized`]).
    #[error(
        "spiffe_id {spiffe_id} is already the ID of a {existing} entry; a {new} entry with the same ID would hand the entries parented to it to other agents"
    )]
    IdTaken {
        spiffe_id: SpiffeId,
        existing: Scope,
        new: Scope,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A batch change that failed at one entry; nothing of the batch was applied.
#[derive(Debug, thiserror::Error)]
#[error("entry {} of the batch ({spiffe_id}): {source}", .index + 1)]
pub struct BatchError {
    /// 0-based position in the batch.
    pub index: usize,
    pub spiffe_id: String,
    #[source]
    pub source: ChangeError,
}

/// How many expired join tokens one pruning transaction removes; small, so the write
/// lock is never held for long.
pub const PRUNE_BATCH: u32 = 100;

/// How long an expired join token's digest is kept, so that using it is refused as
/// "expired" (which tells the operator what to do) rather than "unknown".
pub const EXPIRED_TOKEN_RETENTION_SECS: i64 = 24 * 3600;

/// A change to an agent that its open sync streams must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Evicted or banned: its streams end with PERMISSION_DENIED.
    Gone(SpiffeId),
    /// Renewed to `serial`: streams opened with an older SVID end, so the agent
    /// reconnects with the new one (and a copy of the old one loses its stream).
    Renewed { id: SpiffeId, serial: String },
}

/// Shared server state. Cheap to clone (`Arc` inside).
#[derive(Debug, Clone)]
pub struct State(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub trust_domain: TrustDomain,
    pub server_id: SpiffeId,
    pub ca: Arc<Ca>,
    pub clock: SharedClock,
    /// Lifetime of workload X509-SVIDs whose entry names none.
    pub default_svid_ttl: Duration,
    /// Lifetime of agent X509-SVIDs.
    pub agent_ttl: Duration,
    store: Arc<dyn DataStore>,
    entries: watch::Sender<Arc<EntrySnapshot>>,
    bundle: watch::Sender<Arc<Bundle>>,
    agent_events: broadcast::Sender<AgentEvent>,
    /// Serializes "change the datastore, then publish", so snapshots never go backwards.
    publish: Mutex<()>,
}

impl std::ops::Deref for State {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::fmt::Debug for dyn DataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataStore")
    }
}

/// The lifetimes the server signs with.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub default_svid_ttl: Duration,
    pub agent_ttl: Duration,
}

impl State {
    /// Loads entries and the bundle; makes sure the bundle holds the CA's root.
    pub async fn new(
        store: Arc<dyn DataStore>,
        ca: Arc<Ca>,
        clock: SharedClock,
        lifetimes: Lifetimes,
    ) -> StoreResult<Self> {
        let td = ca.trust_domain().clone();
        let mut bundle = store
            .load_bundle(td.as_str())
            .await?
            .unwrap_or(StoredBundle {
                x509_authorities: vec![],
                sequence: 0,
            });
        if !bundle.x509_authorities.iter().any(|c| c == ca.cert_der()) {
            // A new CA (first start, or the old one expired) joins the bundle; roots
            // that already expired leave it.
            let now = clock.now();
            bundle.x509_authorities.retain(|c| {
                lanyard_proto::svid::check_ca(c).is_ok_and(|not_after| not_after > now)
            });
            bundle.x509_authorities.push(ca.cert_der().to_vec());
            bundle.sequence += 1;
            store.store_bundle(td.as_str(), &bundle).await?;
        }
        let server_id = lanyard_proto::server_id(&td);
        let entries = EntrySnapshot::new(server_id.clone(), store.list_entries().await?);
        Ok(State(Arc::new(Inner {
            trust_domain: td,
            server_id,
            ca,
            clock,
            default_svid_ttl: lifetimes.default_svid_ttl,
            agent_ttl: lifetimes.agent_ttl,
            store,
            entries: watch::channel(Arc::new(entries)).0,
            bundle: watch::channel(Arc::new(Bundle {
                x509_authorities: bundle.x509_authorities,
                sequence: bundle.sequence,
            }))
            .0,
            agent_events: broadcast::channel(256).0,
            publish: Mutex::new(()),
        })))
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    // -- Reading --------------------------------------------------------------------

    pub fn entries(&self) -> Arc<EntrySnapshot> {
        self.entries.borrow().clone()
    }

    pub fn watch_entries(&self) -> watch::Receiver<Arc<EntrySnapshot>> {
        self.entries.subscribe()
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    pub fn watch_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    pub fn watch_agents(&self) -> broadcast::Receiver<AgentEvent> {
        self.agent_events.subscribe()
    }

    pub async fn agent(&self, id: &SpiffeId) -> StoreResult<Option<AgentRecord>> {
        self.store.get_agent(id).await
    }

    pub async fn agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.store.list_agents().await
    }

    pub async fn ban(&self, id: &SpiffeId) -> StoreResult<Option<Ban>> {
        self.store.get_ban(id).await
    }

    pub async fn bans(&self) -> StoreResult<Vec<Ban>> {
        self.store.list_bans().await
    }

    /// Proves the datastore still takes writes (for readiness).
    pub async fn probe_store(&self) -> StoreResult<()> {
        self.store.probe_write(self.now()).await
    }

    // -- Entries ----------------------------------------------------------------------

    /// Applies `change` to a copy of the current snapshot and publishes it.
    fn apply(&self, change: impl FnOnce(&mut EntrySnapshot)) {
        let mut next = EntrySnapshot::clone(&self.entries.borrow());
        change(&mut next);
        self.entries.send_replace(Arc::new(next));
    }

    /// Refuses an entry whose SPIFFE ID is already used by an entry of the other kind.
    /// `replacing` is the stored version of the entry being updated, if any.
    fn check_id(
        snapshot: &EntrySnapshot,
        entry: &Entry,
        replacing: Option<&Entry>,
    ) -> Result<(), ChangeError> {
        let mut used = snapshot.id_use(&entry.spiffe_id);
        if let Some(old) = replacing.filter(|old| old.spiffe_id == entry.spiffe_id) {
            if snapshot.is_node_entry(old) {
                used.node = used.node.saturating_sub(1);
            } else {
                used.workload = used.workload.saturating_sub(1);
            }
        }
        let (new, existing) = if snapshot.is_node_entry(entry) {
            (Scope::Node, (used.workload > 0).then_some(Scope::Workload))
        } else {
            (Scope::Workload, (used.node > 0).then_some(Scope::Node))
        };
        match existing {
            Some(existing) => Err(ChangeError::IdTaken {
                spiffe_id: entry.spiffe_id.clone(),
                existing,
                new,
            }),
            None => Ok(()),
        }
    }

    /// Creates entries in one transaction: all of them or, naming the first that fails,
    /// none.
    pub async fn create_entries(&self, batch: Vec<Entry>) -> Result<Vec<Arc<Entry>>, BatchError> {
        let _guard = self.publish.lock().await;
        let current = self.entries();
        // Checked against the index as the batch would leave it, so two entries of one
        // batch cannot collide either.
        let mut scratch = EntrySnapshot::clone(&current);
        for (index, e) in batch.iter().enumerate() {
            Self::check_id(&scratch, e, None).map_err(|source| BatchError {
                index,
                spiffe_id: e.spiffe_id.to_string(),
                source,
            })?;
            scratch.upsert(e.clone());
        }
        if let Err(e) = self.store.create_entries(&batch).await {
            let index = match &e {
                StoreError::DuplicateEntry { .. } => duplicate_index(&current, &batch),
                _ => None,
            };
            return Err(BatchError {
                index: index.unwrap_or(0),
                spiffe_id: index
                    .and_then(|i| batch.get(i))
                    .map(|e| e.spiffe_id.to_string())
                    .unwrap_or_default(),
                source: e.into(),
            });
        }
        let created: Vec<Arc<Entry>> = batch.iter().cloned().map(Arc::new).collect();
        self.apply(|s| {
            for e in batch {
                s.upsert(e);
            }
        });
        Ok(created)
    }

    /// Creates one entry.
    pub async fn create_entry(&self, entry: Entry) -> Result<Arc<Entry>, ChangeError> {
        self.create_entries(vec![entry])
            .await
            .map(|mut created| created.remove(0))
            .map_err(|e| e.source)
    }

    /// Replaces the entry with `entry.id`; returns it as stored (revision bumped).
    pub async fn update_entry(&self, entry: Entry) -> Result<Arc<Entry>, ChangeError> {
        let _guard = self.publish.lock().await;
        let current = self.entries();
        let old = current
            .get(&entry.id)
            .ok_or_else(|| StoreError::EntryNotFound(entry.id.clone()))?;
        Self::check_id(&current, &entry, Some(old))?;
        let stored = self.store.update_entry(&entry).await?;
        let out = Arc::new(stored.clone());
        self.apply(|s| s.upsert(stored));
        Ok(out)
    }

    /// Deletes entries in one transaction: all of them or none.
    pub async fn delete_entries(&self, ids: &[String]) -> Result<Vec<Entry>, ChangeError> {
        let _guard = self.publish.lock().await;
        let gone = self.store.delete_entries(ids).await?;
        self.apply(|s| {
            for e in &gone {
                s.remove(&e.id);
            }
        });
        Ok(gone)
    }

    /// Stores a join token and the node alias entry it grants, if any.
    pub async fn create_join_token(
        &self,
        token: &StoredToken,
        alias: Option<Entry>,
    ) -> Result<(), ChangeError> {
        let _guard = self.publish.lock().await;
        if let Some(alias) = &alias {
            Self::check_id(&self.entries(), alias, None)?;
        }
        self.store.create_join_token(token, alias.as_ref()).await?;
        if let Some(alias) = alias {
            self.apply(|s| s.upsert(alias));
        }
        Ok(())
    }

    /// Removes the alias entries of join tokens that expired unused, and forgets tokens
    /// expired for a day, a small batch at a time. Returns how many alias entries went.
    pub async fn prune_join_tokens(&self) -> StoreResult<usize> {
        let mut removed_total = 0;
        loop {
            let removed = {
                let _guard = self.publish.lock().await;
                let removed = self
                    .store
                    .prune_join_tokens(
                        self.now(),
                        self.now() - EXPIRED_TOKEN_RETENTION_SECS,
                        PRUNE_BATCH,
                    )
                    .await?;
                if !removed.is_empty() {
                    self.apply(|s| {
                        for e in &removed {
                            s.remove(&e.id);
                        }
                    });
                }
                removed.len()
            };
            removed_total += removed;
            if removed < PRUNE_BATCH as usize {
                return Ok(removed_total);
            }
            // Let other writers in between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Rereads what changed in the datastore and applies it: the safety net for changes
    /// made by another server sharing the datastore. Reads every entry's revision, and
    /// the full rows only of entries that are new or changed.
    pub async fn resync_entries(&self) -> StoreResult<usize> {
        let _guard = self.publish.lock().await;
        let current = self.entries();
        let revisions = self.store.entry_revisions().await?;
        let mut present = std::collections::HashSet::with_capacity(revisions.len());
        let mut fetch = Vec::new();
        for (id, revision) in revisions {
            if current
                .get(&id)
                .is_none_or(|e| e.revision_number != revision)
            {
                fetch.push(id.clone());
            }
            present.insert(id);
        }
        let gone: Vec<String> = current
            .iter()
            .filter(|e| !present.contains(&e.id))
            .map(|e| e.id.clone())
            .collect();
        if fetch.is_empty() && gone.is_empty() {
            return Ok(0);
        }
        let changed = self.store.get_entries(&fetch).await?;
        let count = changed.len() + gone.len();
        self.apply(|s| {
            for id in &gone {
                s.remove(id);
            }
            for e in changed {
                s.upsert(e);
            }
        });
        Ok(count)
    }

    // -- Agents -----------------------------------------------------------------------

    /// Records a node attestation (spending `token_hash` if given); refused when the
    /// agent ID is banned or the token cannot be spent.
    pub async fn record_attestation(
        &self,
        agent: &AgentRecord,
        token_hash: Option<&str>,
    ) -> StoreResult<Result<(), AttestRefusal>> {
        self.store
            .record_attestation(agent, token_hash, self.now())
            .await
    }

    /// Records a renewed agent SVID if `presented` may still renew (see
    /// [`DataStore::renew_agent`]).
    pub async fn renew_agent(
        &self,
        id: &SpiffeId,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let renewed = self
            .store
            .renew_agent(id, presented, serial, expires_at)
            .await?;
        if renewed {
            let _ = self.agent_events.send(AgentEvent::Renewed {
                id: id.clone(),
                serial: serial.to_string(),
            });
        }
        Ok(renewed)
    }

    /// The agent used its current SVID: its previous one stops being accepted.
    pub async fn drop_previous_serial(&self, id: &SpiffeId, current: &str) -> StoreResult<()> {
        self.store.drop_previous_serial(id, current).await
    }

    /// Forgets an agent (and its join token's alias entries) and ends its streams.
    /// Returns whether it existed.
    pub async fn evict_agent(&self, id: &SpiffeId) -> StoreResult<bool> {
        let _guard = self.publish.lock().await;
        let Some(removed) = self.store.evict_agent(id).await? else {
            return Ok(false);
        };
        self.apply(|s| {
            for e in &removed {
                s.remove(&e.id);
            }
        });
        let _ = self.agent_events.send(AgentEvent::Gone(id.clone()));
        Ok(true)
    }

    /// Bans an agent ID: it is evicted now and may not attest again until unbanned.
    pub async fn ban_agent(&self, id: &SpiffeId) -> StoreResult<Banned> {
        let _guard = self.publish.lock().await;
        let banned = self.store.ban_agent(id, self.now()).await?;
        self.apply(|s| {
            for e in &banned.removed {
                s.remove(&e.id);
            }
        });
        let _ = self.agent_events.send(AgentEvent::Gone(id.clone()));
        Ok(banned)
    }

    /// Lifts a ban; returns whether there was one.
    pub async fn unban_agent(&self, id: &SpiffeId) -> StoreResult<bool> {
        self.store.unban_agent(id).await
    }
}

/// Which entry of a failed batch duplicates a stored one or an earlier one of the batch.
fn duplicate_index(current: &EntrySnapshot, batch: &[Entry]) -> Option<usize> {
    let same = |a: &Entry, b: &Entry| {
        a.spiffe_id == b.spiffe_id && a.parent_id == b.parent_id && a.selectors == b.selectors
    };
    batch.iter().enumerate().find_map(|(i, e)| {
        let stored = current.iter().any(|c| same(c, e));
        let earlier = batch[..i].iter().any(|b| same(b, e));
        (stored || earlier).then_some(i)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::Ordering;

    use lanyard_proto::Selector;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::datastore::testing::TestStore;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    const AGENT: &str = "spiffe://example.org/lanyard/agent/join_token/a";

    fn entry(n: usize, spiffe: &str, parent: &str) -> Entry {
        Entry {
            id: format!("e{n}"),
            spiffe_id: id(spiffe),
            parent_id: id(parent),
            selectors: vec![Selector::parse(&format!("unix:uid:{n}")).expect("sel")],
            x509_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            created_at: 1000 + n as i64,
            revision_number: 0,
        }
    }

    /// A state over a [`TestStore`] with a manual clock.
    pub(crate) async fn state() -> (tempfile::TempDir, State, Arc<TestStore>, Arc<ManualClock>) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(TestStore::open(dir.path()).await);
        let clock = ManualClock::starting_now();
        let td = TrustDomain::new("example.org").expect("td");
        let ca = Ca::create(&td, Duration::from_secs(3600), clock.clone()).expect("ca");
        let lifetimes = Lifetimes {
            default_svid_ttl: Duration::from_secs(60),
            agent_ttl: Duration::from_secs(60),
        };
        let state = State::new(store.clone(), Arc::new(ca), clock.clone(), lifetimes)
            .await
            .expect("state");
        (dir, state, store, clock)
    }

    #[tokio::test]
    async fn changes_never_reread_the_entries() {
        let (_dir, state, store, _clock) = state().await;
        assert_eq!(
            store.list_entries.load(Ordering::SeqCst),
            1,
            "read at start"
        );
        let mut rx = state.watch_entries();
        rx.borrow_and_update();
        // Entry creation costs the same whatever the number of entries: no change reads
        // the entries back from the datastore, each is applied to the index.
        for n in 0..300 {
            state
                .create_entry(entry(n, &format!("spiffe://example.org/w{n}"), AGENT))
                .await
                .expect("create");
        }
        assert!(rx.has_changed().expect("open"), "changes are published");
        let mut changed = entry(7, "spiffe://example.org/w7", AGENT);
        changed.hint = "updated".into();
        let stored = state.update_entry(changed).await.expect("update");
        assert_eq!(stored.revision_number, 1);
        state
            .delete_entries(&["e3".into(), "e4".into()])
            .await
            .expect("delete");
        assert_eq!(
            store.list_entries.load(Ordering::SeqCst),
            1,
            "no full reload"
        );
        assert_eq!(store.entry_revisions.load(Ordering::SeqCst), 0);
        assert_eq!(store.get_entries.load(Ordering::SeqCst), 0);
        let snap = state.entries();
        assert_eq!(snap.len(), 298);
        assert_eq!(snap.get("e7").map(|e| e.hint.as_str()), Some("updated"));
        let authorized = snap.authorized(&id(AGENT), &[]);
        assert_eq!(authorized.len(), 298);
        assert_eq!(authorized[0].id, "e0", "oldest first");
        // The index matches what a fresh load of the datastore gives.
        let fresh = EntrySnapshot::new(
            state.server_id.clone(),
            store.inner.list_entries().await.expect("list"),
        );
        let a: Vec<_> = snap.iter().map(|e| (**e).clone()).collect();
        let b: Vec<_> = fresh.iter().map(|e| (**e).clone()).collect();
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn resync_applies_only_what_changed_elsewhere() {
        let (_dir, state, store, _clock) = state().await;
        for n in 0..20 {
            state
                .create_entry(entry(n, &format!("spiffe://example.org/w{n}"), AGENT))
                .await
                .expect("create");
        }
        assert_eq!(state.resync_entries().await.expect("resync"), 0);
        // Another server (sharing the datastore) changes two entries and adds one.
        store
            .inner
            .delete_entries(&["e1".into()])
            .await
            .expect("delete");
        let mut e2 = entry(2, "spiffe://example.org/w2", AGENT);
        e2.hint = "elsewhere".into();
        store.inner.update_entry(&e2).await.expect("update");
        store
            .inner
            .create_entries(&[entry(50, "spiffe://example.org/w50", AGENT)])
            .await
            .expect("create");
        assert_eq!(state.resync_entries().await.expect("resync"), 3);
        assert_eq!(
            store.get_entries.load(Ordering::SeqCst),
            2,
            "only changed rows"
        );
        assert_eq!(
            store.list_entries.load(Ordering::SeqCst),
            1,
            "never a full reload"
        );
        let snap = state.entries();
        assert!(snap.get("e1").is_none());
        assert_eq!(snap.get("e2").map(|e| e.hint.as_str()), Some("elsewhere"));
        assert!(snap.get("e50").is_some());
        assert_eq!(snap.len(), 20);
    }

    #[tokio::test]
    async fn node_alias_ids_and_workload_ids_stay_apart() {
        let (_dir, state, _store, _clock) = state().await;
        let server = state.server_id.to_string();
        state
            .create_entry(entry(1, "spiffe://example.org/runner", &server))
            .await
            .expect("alias");
        let err = state
            .create_entry(entry(2, "spiffe://example.org/runner", AGENT))
            .await
            .expect_err("workload entry with the alias's ID");
        assert!(
            matches!(
                err,
                ChangeError::IdTaken {
                    existing: Scope::Node,
                    ..
                }
            ),
            "{err}"
        );
        state
            .create_entry(entry(3, "spiffe://example.org/job", AGENT))
            .await
            .expect("workload");
        let err = state
            .create_entry(entry(4, "spiffe://example.org/job", &server))
            .await
            .expect_err("node entry with a workload's ID");
        assert!(err.to_string().contains("workload entry"), "{err}");
        // An update may not sneak it in either, but may keep its own ID.
        let mut moved = entry(3, "spiffe://example.org/runner", AGENT);
        moved.id = "e3".into();
        assert!(state.update_entry(moved).await.is_err());
        let mut same = entry(3, "spiffe://example.org/job", AGENT);
        same.hint = "ok".into();
        state.update_entry(same).await.expect("same ID");
        // Within one batch too: nothing of the batch is stored.
        let err = state
            .create_entries(vec![
                entry(5, "spiffe://example.org/x", &server),
                entry(6, "spiffe://example.org/x", AGENT),
            ])
            .await
            .expect_err("batch collision");
        assert_eq!(err.index, 1);
        assert!(state.entries().get("e5").is_none());
    }

    #[tokio::test]
    async fn batch_duplicates_name_the_failing_entry_and_store_nothing() {
        let (_dir, state, _store, _clock) = state().await;
        state
            .create_entry(entry(1, "spiffe://example.org/a", AGENT))
            .await
            .expect("create");
        let mut dup = entry(1, "spiffe://example.org/a", AGENT);
        dup.id = "dup".into();
        let err = state
            .create_entries(vec![entry(2, "spiffe://example.org/b", AGENT), dup])
            .await
            .expect_err("duplicate");
        assert_eq!(err.index, 1);
        assert!(err.to_string().contains("spiffe://example.org/a"), "{err}");
        assert_eq!(state.entries().len(), 1);
        assert!(state.entries().get("e2").is_none());
    }

    #[tokio::test]
    async fn expired_unused_tokens_take_their_alias_entries_with_them() {
        let (_dir, state, _store, clock) = state().await;
        let server = state.server_id.to_string();
        let token = StoredToken {
            hash: "ab".repeat(32),
            id: "ab".repeat(16),
            expires_at: clock.now() + 600,
            created_at: clock.now(),
        };
        state
            .create_join_token(
                &token,
                Some(entry(1, "spiffe://example.org/runner", &server)),
            )
            .await
            .expect("token");
        assert_eq!(state.entries().len(), 1);
        assert_eq!(state.prune_join_tokens().await.expect("prune"), 0);
        clock.advance(600);
        assert_eq!(state.prune_join_tokens().await.expect("prune"), 1);
        assert!(state.entries().is_empty(), "the alias went with its token");
    }
}
