//! The in-memory view of all registration entries that every agent-facing decision is
//! made from: which entries an agent may sign for, and which node aliases it holds.
//! The view is an immutable snapshot published through a `watch` channel, so sync
//! streams wake on change (push, not polling) and readers never hold a lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use lanyard_proto::{Selector, SpiffeId};

use crate::datastore::Entry;

/// All entries at one moment, indexed by parent.
#[derive(Debug, Default)]
pub struct EntrySnapshot {
    entries: Vec<Arc<Entry>>,
    by_parent: HashMap<SpiffeId, Vec<usize>>,
}

impl EntrySnapshot {
    pub fn new(entries: Vec<Entry>) -> Self {
        let entries: Vec<Arc<Entry>> = entries.into_iter().map(Arc::new).collect();
        let mut by_parent: HashMap<SpiffeId, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_parent.entry(e.parent_id.clone()).or_default().push(i);
        }
        EntrySnapshot { entries, by_parent }
    }

    pub fn all(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    /// Node aliases held by an agent with these node selectors: node entries (parented
    /// to the server) whose selectors are all among the agent's.
    pub fn aliases(&self, server_id: &SpiffeId, node_selectors: &[Selector]) -> Vec<SpiffeId> {
        self.by_parent
            .get(server_id)
            .into_iter()
            .flatten()
            .map(|&i| &self.entries[i])
            .filter(|e| lanyard_proto::selector::matches_all(&e.selectors, node_selectors))
            .map(|e| e.spiffe_id.clone())
            .collect()
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
        let mut picked: Vec<usize> = Vec::new();
        while let Some(parent) = queue.pop_front() {
            for &i in self.by_parent.get(parent).into_iter().flatten() {
                picked.push(i);
                let child = &self.entries[i].spiffe_id;
                if seen_ids.insert(child) {
                    queue.push_back(child);
                }
            }
        }
        picked.sort_unstable();
        picked.dedup();
        picked
            .into_iter()
            .map(|i| Arc::clone(&self.entries[i]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
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

    #[test]
    fn agent_gets_its_own_and_alias_entries_only() {
        let server = id("spiffe://td/lanyard/server");
        let agent = id("spiffe://td/lanyard/agent/join_token/a");
        let snap = EntrySnapshot::new(vec![
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
        ]);
        let aliases = snap.aliases(&server, &[Selector::parse("join_token:a").expect("sel")]);
        assert_eq!(aliases, vec![id("spiffe://td/runner")]);
        let got: Vec<String> = snap
            .authorized(&agent, &aliases)
            .iter()
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(got, vec!["e2", "e3", "e4"]);
        let stranger = id("spiffe://td/lanyard/agent/join_token/z");
        assert!(snap.authorized(&stranger, &[]).is_empty());
    }

    #[test]
    fn cycles_terminate() {
        let agent = id("spiffe://td/a");
        let snap = EntrySnapshot::new(vec![
            entry(1, "spiffe://td/x", "spiffe://td/a", &["unix:uid:1"]),
            entry(2, "spiffe://td/a", "spiffe://td/x", &["unix:uid:1"]),
        ]);
        assert_eq!(snap.authorized(&agent, &[]).len(), 2);
    }
}
