//! What a caller sees of the agent's snapshot: its X509-SVIDs and its bundle, as of a
//! given wall-clock time. An SVID is never served at or after its notAfter, whatever the
//! snapshot still holds; each view says when it will next shrink.

use std::collections::{BTreeMap, HashMap, HashSet};

use lanyard_proto::workload::{X509BundlesResponse, X509svid, X509svidResponse};
use lanyard_proto::{Selector, TrustDomain};

use crate::cache::Snapshot;
use crate::workload_api::error::ApiError;

/// One message for a caller, what identifies its content, and when it stops being true.
#[derive(Debug)]
pub struct View<K, M> {
    /// Equal keys mean nothing changed for this caller.
    pub key: K,
    pub message: M,
    /// Unix ms at which an SVID in the message expires (the earliest), if any.
    pub expires_ms: Option<i64>,
}

/// The content of an X509 message: the serials served and the bundle's version.
#[derive(Debug, PartialEq, Eq)]
pub struct X509Key {
    pub serials: Vec<String>,
    pub bundle_sequence: u64,
}

/// A caller's X509 view at `now_ms`: `Ok(None)` while its SVIDs are still being signed;
/// [`ApiError::NoIdentity`] when no entry matches or every matching SVID has expired.
pub fn x509_view(
    snapshot: &Snapshot,
    selectors: &[Selector],
    now_ms: i64,
) -> Result<Option<View<X509Key, X509svidResponse>>, ApiError> {
    let mut matched = false;
    let mut pending = false;
    let mut hints = HashSet::new();
    let mut svids = Vec::new();
    let mut serials = Vec::new();
    let mut expires_ms: Option<i64> = None;
    for entry in snapshot.matching(selectors) {
        matched = true;
        let Some(svid) = &entry.svid else {
            pending = true;
            continue;
        };
        let not_after_ms = svid.not_after.saturating_mul(1000);
        if not_after_ms <= now_ms {
            // Expired: dropped from the view, even if the snapshot still holds it.
            continue;
        }
        // A non-empty hint must be unique within a response; the first wins.
        if !entry.hint.is_empty() && !hints.insert(entry.hint.as_str()) {
            continue;
        }
        expires_ms = Some(expires_ms.map_or(not_after_ms, |e| e.min(not_after_ms)));
        serials.push(svid.serial.clone());
        svids.push(X509svid {
            spiffe_id: entry.spiffe_id.to_string(),
            x509_svid: svid.chain.clone(),
            x509_svid_key: svid.key.pkcs8_der().to_vec(),
            bundle: snapshot.bundle.to_vec(),
            hint: entry.hint.clone(),
        });
    }
    if !matched {
        return Err(ApiError::NoIdentity);
    }
    if svids.is_empty() {
        return if pending {
            Ok(None)
        } else {
            Err(ApiError::NoIdentity)
        };
    }
    Ok(Some(View {
        key: X509Key {
            serials,
            bundle_sequence: snapshot.bundle_sequence,
        },
        message: X509svidResponse {
            svids,
            crl: vec![],
            federated_bundles: HashMap::new(),
        },
        expires_ms,
    }))
}

/// A caller's bundle view: its own trust domain's CAs, if it holds any identity.
pub fn bundles_view(
    td: &TrustDomain,
    snapshot: &Snapshot,
    selectors: &[Selector],
) -> Result<Option<View<u64, X509BundlesResponse>>, ApiError> {
    if snapshot.matching(selectors).next().is_none() {
        return Err(ApiError::NoIdentity);
    }
    if snapshot.bundle.is_empty() {
        return Ok(None);
    }
    let bundles = BTreeMap::from([(td.id_string(), snapshot.bundle.to_vec())])
        .into_iter()
        .collect();
    Ok(Some(View {
        key: snapshot.bundle_sequence,
        message: X509BundlesResponse {
            crl: vec![],
            bundles,
        },
        expires_ms: None,
    }))
}
