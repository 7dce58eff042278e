//! Who a Workload API caller is under the agent's current entries: its attested
//! selectors, with the binary ones (`unix:path`, `unix:sha256`) granted only when an entry
//! needs them and the connection passes its check ([`Peer::check_binary`]), so ordinary
//! callers never pay for that check.

use std::sync::Arc;
use std::time::Duration;

use lanyard_attestors::workload::{Attestation, Digest, Process, UnixAttestor};
use lanyard_daemon::logging::RateLimit;
use lanyard_proto::Selector;
use lanyard_proto::selector::matches_all;

use crate::cache::Snapshot;
use crate::peer::Peer;
use crate::workload_api::error::ApiError;

/// How often a refusal (or withheld binary selectors) is logged per uid.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A caller as judged for one snapshot.
#[derive(Debug, Clone)]
pub struct Judged {
    /// What entries are matched against.
    pub selectors: Vec<Selector>,
    pub attestation: Attestation,
    /// Why the binary selectors were not granted, when an entry needed them.
    pub withheld: Option<String>,
}

/// Attests callers and decides which of their selectors count.
#[derive(Debug)]
pub struct Attester {
    attestor: Arc<UnixAttestor>,
    refusals: RateLimit<u32>,
}

/// Whether a selector describes the executable (and so depends on the connection check).
pub fn is_binary(selector: &Selector) -> bool {
    selector.kind() == lanyard_attestors::workload::unix::SELECTOR_KIND
        && (selector.value().starts_with("path:") || selector.value().starts_with("sha256:"))
}

/// Whether any entry names a digest: only then is an executable worth hashing.
pub fn wants_sha256(snapshot: &Snapshot) -> Digest {
    let any = snapshot.entries.iter().any(|e| {
        e.selectors
            .iter()
            .any(|s| is_binary(s) && s.value().starts_with("sha256:"))
    });
    if any {
        Digest::Wanted
    } else {
        Digest::NotWanted
    }
}

/// Whether some entry that needs binary selectors would match with them.
fn needs_binary(snapshot: &Snapshot, all: &[Selector]) -> bool {
    snapshot
        .entries
        .iter()
        .any(|e| e.selectors.iter().any(is_binary) && matches_all(&e.selectors, all))
}

impl Attester {
    pub fn new(attestor: Arc<UnixAttestor>) -> Self {
        Attester {
            attestor,
            refusals: RateLimit::new(LOG_INTERVAL, 4096),
        }
    }

    pub fn attestor(&self) -> &Arc<UnixAttestor> {
        &self.attestor
    }

    /// Attests `process`: inline when only small /proc reads are needed (a thread handoff
    /// would cost more than the work), on a blocking thread when an executable must be
    /// hashed.
    pub async fn attest(
        &self,
        process: &Arc<Process>,
        digest: Digest,
    ) -> Result<Attestation, ApiError> {
        let inline = self.attestor.attest_cached(process, digest);
        let attested = match inline {
            Ok(Some(attestation)) => Ok(attestation),
            Ok(None) => {
                let (attestor, process) = (Arc::clone(&self.attestor), Arc::clone(process));
                tokio::task::spawn_blocking(move || attestor.attest(&process, digest))
                    .await
                    .map_err(|e| ApiError::Internal(format!("attestation task failed: {e}")))?
            }
            Err(e) => Err(e),
        };
        attested.map_err(|e| {
            tracing::debug!(pid = process.pid(), error = %e, "workload attestation failed");
            ApiError::from_attest(&e)
        })
    }

    /// The selectors `peer`'s requests are judged by under `snapshot`.
    pub async fn judge(&self, peer: &Arc<Peer>, snapshot: &Snapshot) -> Result<Judged, ApiError> {
        let process = peer.process().map_err(ApiError::from_attest)?;
        let attestation = self.attest(process, wants_sha256(snapshot)).await?;
        if attestation.binary.is_empty() {
            return Ok(Judged {
                selectors: attestation.credentials.clone(),
                attestation,
                withheld: None,
            });
        }
        let all = attestation.all();
        if !needs_binary(snapshot, &all) {
            // No entry would match differently: the connection check is not needed.
            return Ok(Judged {
                selectors: attestation.credentials.clone(),
                attestation,
                withheld: None,
            });
        }
        let checking = Arc::clone(peer);
        let exe = attestation.exe;
        let checked = tokio::task::spawn_blocking(move || checking.check_binary(exe))
            .await
            .map_err(|e| ApiError::Internal(format!("connection check failed: {e}")))?;
        Ok(match checked {
            Ok(()) => Judged {
                selectors: all,
                attestation,
                withheld: None,
            },
            Err(reason) => Judged {
                selectors: attestation.credentials.clone(),
                attestation,
                withheld: Some(reason),
            },
        })
    }

    /// Logs (info, at most once per [`LOG_INTERVAL`] per uid) why a caller got nothing.
    pub fn log_refusal(&self, peer: &Peer, judged: Option<&Judged>, error: &ApiError) {
        let uid = peer.creds.map_or(u32::MAX, |c| c.uid);
        let Some(suppressed) = self.refusals.check(&uid) else {
            return;
        };
        let pid = peer.creds.map_or(0, |c| c.pid);
        let selectors = judged.map(|j| {
            j.attestation
                .all()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        });
        let withheld = judged.and_then(|j| j.withheld.as_deref());
        tracing::info!(
            pid,
            uid,
            selectors = selectors.as_deref().unwrap_or(""),
            binary_selectors_withheld = withheld.unwrap_or(""),
            suppressed,
            reason = %error,
            "refused a Workload API caller"
        );
    }
}
