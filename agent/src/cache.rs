//! What the Workload API serves from: the entries this agent holds and their SVIDs,
//! published as immutable snapshots through a `watch` channel by the sync worker.

use std::sync::Arc;

use lanyard_proto::{Selector, SpiffeId};

use crate::identity::PrivateKey;

/// A workload X509-SVID held by the agent.
#[derive(Debug)]
pub struct Svid {
    /// Concatenated DER, leaf first (the Workload API's wire form).
    pub chain: Vec<u8>,
    pub key: PrivateKey,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// Entry revision it was signed for; a newer revision means a new SVID.
    pub revision: i64,
    /// Unix ms at which to renew it.
    pub renew_at_ms: i64,
}

/// One entry and its SVID, when signed.
#[derive(Debug, Clone)]
pub struct CachedEntry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub selectors: Vec<Selector>,
    pub hint: String,
    pub revision: i64,
    pub svid: Option<Arc<Svid>>,
}

/// Everything the Workload API needs at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// False until the first sync with the server completed.
    pub synced: bool,
    /// Oldest entry first, so a workload's default SVID stays the same.
    pub entries: Vec<CachedEntry>,
    /// The trust domain's CA certificates, concatenated DER.
    pub bundle: Arc<Vec<u8>>,
    pub bundle_sequence: u64,
}

impl Snapshot {
    /// Entries whose selectors are all among the workload's.
    pub fn matching<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> impl Iterator<Item = &'a CachedEntry> + 'a {
        self.entries
            .iter()
            .filter(move |e| lanyard_proto::selector::matches_all(&e.selectors, selectors))
    }
}
