//! Agent readiness: whether it can hand out SVIDs now, and if not, why. This module owns
//! the one `watch::Sender<Readiness>`; everything else reads a receiver from
//! [`Health::subscribe`]: the HTTP `/ready` endpoint, the gRPC health service, the
//! local API behind `lanyard-agent healthcheck`, and systemd's status line.
//!
//! The agent is not ready
//! - until it has attested and completed its first entry sync with the server;
//! - when the server has been unreachable for longer than the grace
//!   (`health.unreachable_grace`);
//! - when it holds workload SVIDs that were not renewed and have less than a quarter of
//!   their lifetime left (renewal is due at half-life; the time counts from receipt, as
//!   renewal does, since the server backdates notBefore), or SVIDs that lapsed;
//! - when its own SVID is that close to expiry.
//!
//! Reasons change only at moments computed from the facts, so the monitor wakes exactly
//! then instead of polling, and each reason's text is stable while it holds.

use std::sync::Arc;

use lanyard_daemon::health::Readiness;
use lanyard_daemon::output::rfc3339;
use lanyard_daemon::shutdown::Shutdown;
use tokio::sync::watch;

use crate::cache::Snapshot;
use crate::rotation::{Clock, instant_at};
use crate::sync::{SnapshotRx, SyncStatus};

/// The facts readiness is judged from, and how strictly.
#[derive(Debug)]
pub struct Inputs {
    pub status: watch::Receiver<SyncStatus>,
    pub snapshots: SnapshotRx,
    pub server_address: String,
    pub unreachable_grace: std::time::Duration,
}

/// The owner of the agent's readiness.
#[derive(Debug)]
pub struct Health {
    tx: watch::Sender<Readiness>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready: the agent is starting.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Readiness {
            reasons: vec!["the agent is starting".into()],
        });
        Health { tx }
    }

    /// A receiver that always holds the current readiness.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.tx.subscribe()
    }

    /// Before the sync worker runs: not ready, for `reason`.
    pub fn not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        lanyard_daemon::notify::status(&format!("not ready: {reason}"));
        self.tx.send_replace(Readiness {
            reasons: vec![reason],
        });
    }

    /// Keeps readiness in step with the sync worker until `shutdown` or until the
    /// worker stops.
    pub fn monitor(
        self,
        mut inputs: Inputs,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let now = clock.now_ms();
                let (readiness, next) = {
                    let status = inputs.status.borrow_and_update();
                    let snapshot = inputs.snapshots.borrow_and_update();
                    assess(
                        &status,
                        &snapshot,
                        now,
                        &inputs.server_address,
                        inputs.unreachable_grace,
                    )
                };
                self.publish(readiness);
                let wake = next.map(|at| instant_at(&*clock, at));
                tokio::select! {
                    () = shutdown.wait() => return,
                    changed = inputs.status.changed() => if changed.is_err() {
                        self.not_ready("the sync worker stopped");
                        return;
                    },
                    changed = inputs.snapshots.changed() => if changed.is_err() {
                        self.not_ready("the sync worker stopped");
                        return;
                    },
                    () = async {
                        match wake {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        })
    }

    fn publish(&self, readiness: Readiness) {
        let changed = self.tx.send_if_modified(|current| {
            if *current == readiness {
                return false;
            }
            *current = readiness.clone();
            true
        });
        if changed {
            if readiness.is_ready() {
                tracing::info!("the agent is ready");
                lanyard_daemon::notify::status("ready: serving SVIDs");
            } else {
                tracing::warn!(reasons = ?readiness.reasons, "the agent is not ready");
                lanyard_daemon::notify::status(&format!(
                    "not ready: {}",
                    readiness.reasons.join("; ")
                ));
            }
        }
    }
}

/// The Unix ms from which an SVID due for renewal at `renew_at_ms` (half its life after
/// receipt) and valid until `not_after` (Unix seconds) has not been renewed for so long
/// that only a quarter of its life is left: halfway from the renewal to the expiry.
fn overdue_ms(renew_at_ms: i64, not_after: i64) -> i64 {
    renew_at_ms + (not_after * 1000 - renew_at_ms).max(0) / 2
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Readiness at `now_ms`, and the next moment (Unix ms) it could change by the passing
/// of time alone.
pub fn assess(
    status: &SyncStatus,
    snapshot: &Snapshot,
    now_ms: i64,
    server_address: &str,
    grace: std::time::Duration,
) -> (Readiness, Option<i64>) {
    let mut reasons = Vec::new();
    let mut next: Option<i64> = None;
    let mut later = |at: i64| {
        if at > now_ms {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    };

    if !snapshot.synced {
        reasons.push(format!(
            "waiting for the first sync of entries from the server at {server_address}"
        ));
    }
    if let Some(u) = &status.unreachable {
        let past_grace = u.since_ms + grace.as_millis() as i64;
        if now_ms >= past_grace {
            reasons.push(format!(
                "the server at {server_address} has not answered since {} (longer than the {} grace): {}",
                rfc3339(u.since_ms.div_euclid(1000)),
                lanyard_daemon::config::Duration(grace),
                u.error
            ));
        } else {
            later(past_grace);
        }
    }

    let agent_quarter = overdue_ms(status.agent_renew_at_ms, status.agent_not_after);
    if now_ms >= status.agent_not_after * 1000 {
        reasons.push(format!(
            "the agent's own SVID expired at {}",
            rfc3339(status.agent_not_after)
        ));
    } else if now_ms >= agent_quarter {
        reasons.push(format!(
            "the agent's own SVID expires at {} and has not been renewed",
            rfc3339(status.agent_not_after)
        ));
        later(status.agent_not_after * 1000);
    } else {
        later(agent_quarter);
    }

    // Counts and times only: any local user may ask for readiness, and the SPIFFE IDs
    // of other users' workloads are not theirs to learn.
    let mut stale = 0;
    let mut first: Option<i64> = None;
    for e in &snapshot.entries {
        let Some(svid) = &e.svid else { continue };
        let quarter = overdue_ms(svid.renew_at_ms, svid.not_after);
        if now_ms >= quarter {
            stale += 1;
            first = Some(first.map_or(svid.not_after, |at| at.min(svid.not_after)));
        } else {
            later(quarter);
        }
    }
    if let Some(at) = first {
        reasons.push(format!(
            "{} within the last quarter of {} lifetime without a renewal (the first expires at {})",
            plural(stale, "workload SVID is", "workload SVIDs are"),
            if stale == 1 { "its" } else { "their" },
            rfc3339(at)
        ));
    }
    if status.lapsed > 0 {
        reasons.push(format!(
            "{} expired before renewal; the workloads get nothing for {} until the server signs again",
            plural(status.lapsed, "workload SVID", "workload SVIDs"),
            if status.lapsed == 1 { "it" } else { "them" }
        ));
    }
    (Readiness { reasons }, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CachedEntry, Svid};
    use crate::rotation::TokioClock;
    use crate::sync::Unreachable;
    use std::time::Duration;

    const NOW: i64 = 1_800_000_000_000;
    const GRACE: Duration = Duration::from_secs(60);

    /// An entry whose SVID was received at `not_before` (Unix s) and is valid until
    /// `not_after`, due for renewal at half-life.
    fn entry(id: &str, not_before: i64, not_after: i64) -> CachedEntry {
        let (key, _) = crate::identity::key_and_csr(None).expect("key");
        CachedEntry {
            id: id.into(),
            spiffe_id: lanyard_proto::SpiffeId::parse(&format!("spiffe://example.org/{id}"))
                .expect("id"),
            selectors: vec![],
            hint: String::new(),
            revision: 1,
            svid: Some(Arc::new(Svid {
                chain: vec![],
                key,
                serial: "01".into(),
                not_before,
                not_after,
                revision: 1,
                renew_at_ms: (not_before + not_after) * 500,
            })),
        }
    }

    fn healthy_status() -> SyncStatus {
        SyncStatus {
            unreachable: None,
            agent_not_before: NOW / 1000 - 100,
            agent_not_after: NOW / 1000 + 3500,
            agent_renew_at_ms: NOW + 1_700_000,
            lapsed: 0,
        }
    }

    fn synced(entries: Vec<CachedEntry>) -> Snapshot {
        Snapshot {
            synced: true,
            entries,
            bundle: Arc::new(vec![]),
            bundle_sequence: 1,
        }
    }

    fn reasons(status: &SyncStatus, snapshot: &Snapshot, now: i64) -> Vec<String> {
        assess(status, snapshot, now, "srv:1", GRACE).0.reasons
    }

    #[test]
    fn ready_only_after_the_first_sync() {
        let r = reasons(&healthy_status(), &Snapshot::default(), NOW);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].contains("first sync") && r[0].contains("srv:1"),
            "{r:?}"
        );
        assert!(reasons(&healthy_status(), &synced(vec![]), NOW).is_empty());
    }

    #[test]
    fn an_unreachable_server_is_tolerated_for_the_grace() {
        let mut status = healthy_status();
        status.unreachable = Some(Unreachable {
            since_ms: NOW,
            error: "connection refused".into(),
        });
        let snap = synced(vec![]);
        let (r, next) = assess(&status, &snap, NOW + 59_999, "srv:1", GRACE);
        assert!(r.is_ready(), "{r:?}");
        assert_eq!(next, Some(NOW + 60_000), "wakes when the grace ends");
        let r = reasons(&status, &snap, NOW + 60_000);
        assert_eq!(r.len(), 1);
        for needle in [
            "srv:1",
            "2027-01-15T08:00:00Z",
            "1m grace",
            "connection refused",
        ] {
            assert!(r[0].contains(needle), "{needle}: {r:?}");
        }
        // The text does not tick with the clock, so readiness does not churn.
        assert_eq!(r, reasons(&status, &snap, NOW + 120_000));
    }

    #[test]
    fn workload_svids_in_their_last_quarter_make_the_agent_unready() {
        // Valid 100 s from NOW, due for renewal at 50 s: overdue from 75 s in.
        let nb = NOW / 1000;
        let snap = synced(vec![entry("a", nb, nb + 100), entry("b", nb, nb + 200)]);
        let (r, next) = assess(&healthy_status(), &snap, NOW + 74_999, "srv:1", GRACE);
        assert!(r.is_ready(), "{r:?}");
        assert_eq!(next, Some(NOW + 75_000));
        let r = reasons(&healthy_status(), &snap, NOW + 75_000);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].starts_with("1 workload SVID is within the last quarter"),
            "{r:?}"
        );
        assert!(
            r[0].contains("the first expires at 2027-01-15T08:01:40Z"),
            "{r:?}"
        );
        assert!(
            !r[0].contains("spiffe://"),
            "no workload IDs to any caller: {r:?}"
        );
        let r = reasons(&healthy_status(), &snap, NOW + 150_000);
        assert!(r[0].starts_with("2 workload SVIDs are"), "{r:?}");
        assert!(r[0].contains("2027-01-15T08:01:40Z"), "{r:?}");

        let mut status = healthy_status();
        status.lapsed = 3;
        let r = reasons(&status, &synced(vec![]), NOW);
        assert_eq!(r.len(), 1);
        assert!(
            r[0].starts_with("3 workload SVIDs expired before renewal"),
            "{r:?}"
        );
    }

    #[test]
    fn the_agent_svid_near_or_past_expiry_makes_the_agent_unready() {
        let mut status = healthy_status();
        status.agent_not_before = NOW / 1000;
        status.agent_not_after = NOW / 1000 + 400;
        status.agent_renew_at_ms = NOW + 200_000;
        let snap = synced(vec![]);
        let (r, next) = assess(&status, &snap, NOW, "srv:1", GRACE);
        assert!(r.is_ready());
        assert_eq!(next, Some(NOW + 300_000));
        let r = reasons(&status, &snap, NOW + 300_000);
        assert!(
            r[0].contains("agent's own SVID expires at") && r[0].contains("not been renewed"),
            "{r:?}"
        );
        let r = reasons(&status, &snap, NOW + 400_000);
        assert!(r[0].contains("agent's own SVID expired at"), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_monitor_wakes_when_a_reason_begins_and_follows_the_worker() {
        let clock = Arc::new(TokioClock::starting_at(NOW));
        let (status_tx, status) = watch::channel(healthy_status());
        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let health = Health::new();
        let mut ready = health.subscribe();
        assert!(!ready.borrow().is_ready(), "starting");
        health.not_ready("attesting");
        assert_eq!(ready.borrow().reasons, vec!["attesting".to_string()]);
        let (trigger, shutdown) = lanyard_daemon::shutdown::channel();
        let task = health.monitor(
            Inputs {
                status,
                snapshots,
                server_address: "srv:1".into(),
                unreachable_grace: GRACE,
            },
            clock.clone(),
            shutdown,
        );
        ready
            .wait_for(|r| r.reasons.iter().any(|r| r.contains("first sync")))
            .await
            .expect("rx");
        snap_tx.send_replace(Arc::new(synced(vec![])));
        ready
            .wait_for(Readiness::is_ready)
            .await
            .expect("ready after sync");
        status_tx.send_modify(|s| {
            s.unreachable = Some(Unreachable {
                since_ms: NOW,
                error: "down".into(),
            })
        });
        ready.wait_for(|r| !r.is_ready()).await.expect("unready");
        assert_eq!(clock.now_ms(), NOW + 60_000, "exactly when the grace ended");
        status_tx.send_modify(|s| s.unreachable = None);
        ready
            .wait_for(Readiness::is_ready)
            .await
            .expect("ready again");
        drop(status_tx);
        ready
            .wait_for(|r| r.reasons == ["the sync worker stopped"])
            .await
            .expect("worker gone");
        task.await.expect("monitor ends with the worker");
        drop(trigger);
    }
}
