//! The server's shared state: datastore, CA, and the entry and bundle snapshots that
//! agent sync streams watch. Every entry change goes through here so the snapshot that
//! agents see is always what the datastore holds.

use std::sync::Arc;
use std::time::Duration;

use lanyard_proto::{SpiffeId, TrustDomain};
use tokio::sync::{Mutex, broadcast, watch};

use crate::ca::Ca;
use crate::datastore::{DataStore, StoreResult, StoredBundle};
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

/// Shared server state. Cheap to clone (`Arc` inside).
#[derive(Debug, Clone)]
pub struct State(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub trust_domain: TrustDomain,
    pub server_id: SpiffeId,
    pub store: Arc<dyn DataStore>,
    pub ca: Arc<Ca>,
    pub default_svid_ttl: Duration,
    entries: watch::Sender<Arc<EntrySnapshot>>,
    bundle: watch::Sender<Arc<Bundle>>,
    evictions: broadcast::Sender<SpiffeId>,
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

impl State {
    /// Loads entries and the bundle; makes sure the bundle holds the CA's root.
    pub async fn new(
        store: Arc<dyn DataStore>,
        ca: Arc<Ca>,
        default_svid_ttl: Duration,
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
            let now = crate::ca::now_unix();
            bundle.x509_authorities.retain(|c| {
                lanyard_proto::svid::check_ca(c).is_ok_and(|not_after| not_after > now)
            });
            bundle.x509_authorities.push(ca.cert_der().to_vec());
            bundle.sequence += 1;
            store.store_bundle(td.as_str(), &bundle).await?;
        }
        let entries = EntrySnapshot::new(store.list_entries().await?);
        let server_id = lanyard_proto::server_id(&td);
        Ok(State(Arc::new(Inner {
            trust_domain: td,
            server_id,
            store,
            ca,
            default_svid_ttl,
            entries: watch::channel(Arc::new(entries)).0,
            bundle: watch::channel(Arc::new(Bundle {
                x509_authorities: bundle.x509_authorities,
                sequence: bundle.sequence,
            }))
            .0,
            evictions: broadcast::channel(64).0,
            publish: Mutex::new(()),
        })))
    }

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

    pub fn watch_evictions(&self) -> broadcast::Receiver<SpiffeId> {
        self.evictions.subscribe()
    }

    pub fn announce_eviction(&self, id: SpiffeId) {
        let _ = self.evictions.send(id);
    }

    /// Runs a datastore change and then republishes the entry snapshot, under one lock.
    pub async fn change_entries<T, F>(&self, change: F) -> StoreResult<T>
    where
        F: std::future::Future<Output = StoreResult<T>>,
    {
        let _guard = self.publish.lock().await;
        let out = change.await?;
        self.reload_entries_locked().await?;
        Ok(out)
    }

    /// Rereads all entries and publishes them if anything changed. The safety net for
    /// changes made by another server sharing the datastore.
    pub async fn resync_entries(&self) -> StoreResult<()> {
        let _guard = self.publish.lock().await;
        self.reload_entries_locked().await
    }

    async fn reload_entries_locked(&self) -> StoreResult<()> {
        let fresh = self.store.list_entries().await?;
        let changed = {
            let current = self.entries.borrow();
            current.all().len() != fresh.len()
                || current
                    .all()
                    .iter()
                    .zip(&fresh)
                    .any(|(a, b)| a.id != b.id || a.revision_number != b.revision_number)
        };
        if changed {
            self.entries
                .send_replace(Arc::new(EntrySnapshot::new(fresh)));
        }
        Ok(())
    }
}
