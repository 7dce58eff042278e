//! The in-memory index of all registration entries that every agent-facing decision is
//! made from: which entries an agent may sign for, and which node aliases it holds.
//!
//! The index is a persistent value (`imbl` maps share structure between versions), so
//! [`crate::state::State`] applies each change to a copy in O(log n) and publishes it as
//! a new snapshot through a `watch` channel: sync streams wake on change (push, not
//! polling), readers never hold a lock, and no change rereads the datastore.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use imbl::{HashMap, OrdMap};
use lanyard_proto::{Selector, SpiffeId};

use crate::datastore::Entry;

/// Where an entry sorts: oldest first, then in the order this server learned of it, so
/// an agent's default (first) SVID stays the same across changes and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Order {
    created_at: i64,
    seq: u64,
}

type Ordered = OrdMap<Order, Arc<Entry>>;

/// How many node entries (aliases) and workload entries use one SPIFFE ID.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdUse {
    pub node: u32,
    pub workload: u32,
}

/// All entries at one moment, indexed by id, by parent, by SPIFFE ID and (node entries)
/// by selector. Cloning is O(1).
#[derive(Debug, Clone)]
pub struct EntrySnapshot {
    server_id: SpiffeId,
    all: Ordered,
    by_id: HashMap<String, Order>,
    by_parent: HashMap<SpiffeId, Ordered>,
    ids: HashMap<SpiffeId, IdUse>,
    /// Node entries under each of their selectors, to find an agent's aliases without
    /// looking at every node entry.
    nodes_by_selector: HashMap<Selector, Ordered>,
    next_seq: u64,
}

impl EntrySnapshot {
    /// An index of `entries`, given oldest first (as the datastore lists them).
    pub fn new(server_id: SpiffeId, entries: Vec<Entry>) -> Self {
        let mut snapshot = EntrySnapshot {
            server_id,
            all: OrdMap::new(),
            by_id: HashMap::new(),
            by_parent: HashMap::new(),
            ids: HashMap::new(),
            nodes_by_selector: HashMap::new(),
            next_seq: 0,
        };
        for e in entries {
            snapshot.upsert(e);
        }
        snapshot
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every entry, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.all.values()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Entry>> {
        self.by_id.get(id).and_then(|order| self.all.get(order))
    }

    /// Whether `e` is a node entry (a node alias): parented to the server.
    pub fn is_node_entry(&self, e: &Entry) -> bool {
        e.parent_id == self.server_id
    }

    /// How the entries use `spiffe_id`.
    pub fn id_use(&self, spiffe_id: &SpiffeId) -> IdUse {
        self.ids.get(spiffe_id).copied().unwrap_or_default()
    }

    /// Adds `entry`, or replaces the entry with its id (keeping its place).
    pub fn upsert(&mut self, entry: Entry) {
        let order = match self.by_id.get(&entry.id) {
            Some(order) => {
                let order = *order;
                self.unindex(order);
                order
            }
            None => {
                let order = Order {
                    created_at: entry.created_at,
                    seq: self.next_seq,
                };
                self.next_seq += 1;
                order
            }
        };
        self.index(order, Arc::new(entry));
    }

    /// Removes the entry with `id`; returns it if it was there.
    pub fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let order = self.by_id.remove(id)?;
        self.unindex(order)
    }

    fn index(&mut self, order: Order, entry: Arc<Entry>) {
        self.by_id.insert(entry.id.clone(), order);
        self.by_parent
            .entry(entry.parent_id.clone())
            .or_default()
            .insert(order, Arc::clone(&entry));
        let node = self.is_node_entry(&entry);
        let id_use = self.ids.entry(entry.spiffe_id.clone()).or_default();
        if node {
            id_use.node += 1;
            for s in &entry.selectors {
                self.nodes_by_selector
                    .entry(s.clone())
                    .or_default()
                    .insert(order, Arc::clone(&entry));
            }
        } else {
            id_use.workload += 1;
        }
        self.all.insert(order, entry);
    }

    /// Takes the entry at `order` out of every index but `by_id`.
    fn unindex(&mut self, order: Order) -> Option<Arc<Entry>> {
        let entry = self.all.remove(&order)?;
        remove_from(&mut self.by_parent, &entry.parent_id, &order);
        let node = self.is_node_entry(&entry);
        if node {
            for s in &entry.selectors {
                remove_from(&mut self.nodes_by_selector, s, &order);
            }
        }
        if let Some(id_use) = self.ids.get_mut(&entry.spiffe_id) {
            if node {
                id_use.node = id_use.node.saturating_sub(1);
            } else {
                id_use.workload = id_use.workload.saturating_sub(1);
            }
            if *id_use == IdUse::default() {
                self.ids.remove(&entry.spiffe_id);
            }
        }
        Some(entry)
    }

    /// Node aliases held by an agent with these node selectors: node entries (parented
    /// to the server) whose selectors are all among the agent's, oldest first.
    pub fn aliases(&self, node_selectors: &[Selector]) -> Vec<SpiffeId> {
        let mut found: Vec<(Order, &Arc<Entry>)> = node_selectors
            .iter()
            .filter_map(|s| self.nodes_by_selector.get(s))
            .flat_map(|m| m.iter().map(|(o, e)| (*o, e)))
            .filter(|(_, e)| lanyard_proto::selector::matches_all(&e.selectors, node_selectors))
            .collect();
        found.sort_unstable_by_key(|(o, _)| *o);
        found.dedup_by_key(|(o, _)| *o);
        let mut ids: Vec<SpiffeId> = Vec::with_capacity(found.len());
        for (_, e) in found {
            if !ids.contains(&e.spiffe_id) {
                ids.push(e.spiffe_id.clone());
            }
        }
        ids
    }

    /// Every workload entry the agent may sign for: entries parented to the agent or to
    /// one of its aliases, and, transitively, entries parented to those. Node entries
    /// themselves are never returned. Oldest first, so the default SVID stays stable.
    pub fn authorized(&self, agent_id: &SpiffeId, aliases: &[SpiffeId]) -> Vec<Arc<Entry>> {
        let mut seen_ids: HashSet<&SpiffeId> = HashSet::new();
        let mut queue: VecDeque<&SpiffeId> = VecDeque::new();
        seen_ids.insert(agent_id);
        queue.push_back(agent_id);
        for a in aliases {
            if seen_ids.insert(a) {
                queue.push_back(a);
            }
        }
        let mut picked: Vec<(Order, &Arc<Entry>)> = Vec::new();
        while let Some(parent) = queue.pop_front() {
            // Entries under the server are node entries, never an agent's to sign.
            if *parent == self.server_id {
                continue;
            }
            for (order, e) in self.by_parent.get(parent).into_iter().flatten() {
                picked.push((*order, e));
                if seen_ids.insert(&e.spiffe_id) {
                    queue.push_back(&e.spiffe_id);
                }
            }
        }
        picked.sort_unstable_by_key(|(o, _)| *o);
        picked.dedup_by_key(|(o, _)| *o);
        picked.into_iter().map(|(_, e)| Arc::clone(e)).collect()
    }
}

fn remove_from<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Ordered>,
    key: &K,
    order: &Order,
) {
    if let Some(inner) = map.get_mut(key) {
        inner.remove(order);
        if inner.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    fn server() -> SpiffeId {
        id("spiffe://td/lanyard/server")
    }

    fn entry(n: i64, spiffe: &str, parent: &str, sel: &[&str]) -> Entry {
        Entry {
            id: format!("e{n}"),
            spiffe_id: id(spiffe),
            parent_id: id(parent),
            selectors: sel
                .iter()
                .map(|s| Selector::parse(s).expect("sel"))
                .collect(),
            x509_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            created_at: n,
            revision_number: 0,
        }
    }

    fn ids(entries: &[Arc<Entry>]) -> Vec<String> {
        entries.iter().map(|e| e.id.clone()).collect()
    }

    fn sample() -> EntrySnapshot {
        EntrySnapshot::new(
            server(),
            vec![
                entry(
                    1,
                    "spiffe://td/runner",
                    "spiffe://td/lanyard/server",
                    &["join_token:a"],
                ),
                entry(2, "spiffe://td/job", "spiffe://td/runner", &["unix:uid:1"]),
                entry(
                    3,
                    "spiffe://td/direct",
                    "spiffe://td/lanyard/agent/join_token/a",
                    &["unix:uid:2"],
                ),
                entry(4, "spiffe://td/nested", "spiffe://td/job", &["unix:uid:3"]),
                entry(
                    5,
                    "spiffe://td/other",
                    "spiffe://td/lanyard/agent/join_token/b",
                    &["unix:uid:1"],
                ),
                entry(
                    6,
                    "spiffe://td/other-runner",
                    "spiffe://td/lanyard/server",
                    &["join_token:b"],
                ),
            ],
        )
    }

    #[test]
    fn agent_gets_its_own_and_alias_entries_only() {
        let snap = sample();
        let agent = id("spiffe://td/lanyard/agent/join_token/a");
        let aliases = snap.aliases(&[Selector::parse("join_token:a").expect("sel")]);
        assert_eq!(aliases, vec![id("spiffe://td/runner")]);
        assert_eq!(ids(&snap.authorized(&agent, &aliases)), ["e2", "e3", "e4"]);
        let stranger = id("spiffe://td/lanyard/agent/join_token/z");
        assert!(snap.authorized(&stranger, &[]).is_empty());
        // Holding the server's ID as an "alias" never yields node entries.
        assert!(snap.authorized(&stranger, &[server()]).is_empty());
    }

    #[test]
    fn changes_apply_incrementally_and_keep_the_order() {
        let before = sample();
        let mut after = before.clone();
        let agent = id("spiffe://td/lanyard/agent/join_token/a");
        let aliases = vec![id("spiffe://td/runner")];
        // An update keeps the entry's place, however its fields change.
        let mut e2 = entry(2, "spiffe://td/job", "spiffe://td/runner", &["unix:uid:9"]);
        e2.revision_number = 1;
        after.upsert(e2);
        // A new entry goes after the older ones.
        after.upsert(entry(
            7,
            "spiffe://td/late",
            "spiffe://td/runner",
            &["unix:uid:4"],
        ));
        assert_eq!(
            ids(&after.authorized(&agent, &aliases)),
            ["e2", "e3", "e4", "e7"]
        );
        assert_eq!(after.get("e2").map(|e| e.revision_number), Some(1));
        // The old snapshot is untouched (readers holding it see a consistent view).
        assert_eq!(before.get("e2").map(|e| e.revision_number), Some(0));
        assert_eq!(before.len(), 6);
        assert_eq!(after.len(), 7);
        // Removing the alias's node entry removes the alias, and so the subtree.
        assert!(after.remove("e1").is_some());
        assert!(after.remove("e1").is_none());
        assert!(
            after
                .aliases(&[Selector::parse("join_token:a").expect("sel")])
                .is_empty()
        );
        assert_eq!(ids(&after.authorized(&agent, &[])), ["e3"]);
        assert_eq!(
            after.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["e2", "e3", "e4", "e5", "e6", "e7"]
        );
    }

    #[test]
    fn id_use_counts_node_and_workload_entries() {
        let mut snap = sample();
        assert_eq!(
            snap.id_use(&id("spiffe://td/runner")),
            IdUse {
                node: 1,
                workload: 0
            }
        );
        assert_eq!(
            snap.id_use(&id("spiffe://td/job")),
            IdUse {
                node: 0,
                workload: 1
            }
        );
        snap.remove("e2");
        assert_eq!(snap.id_use(&id("spiffe://td/job")), IdUse::default());
    }

    #[test]
    fn aliases_need_all_their_selectors() {
        let snap = EntrySnapshot::new(
            server(),
            vec![
                entry(
                    1,
                    "spiffe://td/both",
                    "spiffe://td/lanyard/server",
                    &["a:1", "b:2"],
                ),
                entry(2, "spiffe://td/one", "spiffe://td/lanyard/server", &["a:1"]),
            ],
        );
        let a = Selector::parse("a:1").expect("sel");
        let b = Selector::parse("b:2").expect("sel");
        assert_eq!(
            snap.aliases(std::slice::from_ref(&a)),
            vec![id("spiffe://td/one")]
        );
        assert_eq!(
            snap.aliases(&[b, a]),
            vec![id("spiffe://td/both"), id("spiffe://td/one")]
        );
    }

    #[test]
    fn cycles_terminate() {
        let agent = id("spiffe://td/a");
        let snap = EntrySnapshot::new(
            server(),
            vec![
                entry(1, "spiffe://td/x", "spiffe://td/a", &["unix:uid:1"]),
                entry(2, "spiffe://td/a", "spiffe://td/x", &["unix:uid:1"]),
            ],
        );
        assert_eq!(snap.authorized(&agent, &[]).len(), 2);
    }
}
