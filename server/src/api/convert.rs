//! Conversions between stored records and their protobuf forms, and the validation of
//! what admins send. Every rejection is one sentence naming the field.

use lanyard_proto::types;
use lanyard_proto::{Selector, SpiffeId, TrustDomain};
use tonic::Status;

use crate::datastore::{AgentRecord, Entry};

pub fn entry_to_proto(e: &Entry) -> types::Entry {
    types::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(types::Selector::from).collect(),
        x509_svid_ttl: i32::try_from(e.x509_svid_ttl).unwrap_or(i32::MAX),
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        created_at: e.created_at,
        revision_number: e.revision_number,
    }
}

pub fn agent_to_proto(a: &AgentRecord, aliases: Vec<SpiffeId>) -> types::Agent {
    types::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        selectors: a.selectors.iter().map(types::Selector::from).collect(),
        x509_svid_serial: a.serial.clone(),
        x509_svid_expires_at: a.expires_at,
        attested_at: a.attested_at,
        aliases: aliases.iter().map(ToString::to_string).collect(),
    }
}

/// Parses an ID field, which must be in our trust domain.
pub fn member_id(field: &str, raw: &str, td: &TrustDomain) -> Result<SpiffeId, Status> {
    let id = SpiffeId::parse(raw)
        .map_err(|e| Status::invalid_argument(format!("{field} \"{raw}\" is invalid: {e}")))?;
    if !id.is_member_of(td) {
        return Err(Status::invalid_argument(format!(
            "{field} {id} is not in trust domain {td}"
        )));
    }
    Ok(id)
}

/// An ID a workload or node alias may hold: in the trust domain, with a path, and not
/// under `/lanyard/`, which is reserved for the server and its agents.
pub fn workload_id(field: &str, raw: &str, td: &TrustDomain) -> Result<SpiffeId, Status> {
    let id = member_id(field, raw, td)?;
    if id.is_root() {
        return Err(Status::invalid_argument(format!(
            "{field} {id} has no path; an SVID's ID needs one"
        )));
    }
    if id.path() == "/lanyard" || id.path().starts_with("/lanyard/") {
        return Err(Status::invalid_argument(format!(
            "{field} {id} is under /lanyard/, which is reserved"
        )));
    }
    Ok(id)
}

pub fn selectors(raw: &[types::Selector]) -> Result<Vec<Selector>, Status> {
    let mut out = raw
        .iter()
        .map(|s| {
            Selector::try_from(s)
                .map_err(|e| Status::invalid_argument(format!("selector is invalid: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn dns_name(name: &str) -> Result<String, Status> {
    let bad = || Status::invalid_argument(format!("DNS name \"{name}\" is invalid"));
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || lower.len() > 253 {
        return Err(bad());
    }
    for (i, label) in lower.split('.').enumerate() {
        let wildcard = i == 0 && label == "*";
        let ok = wildcard
            || (!label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-'));
        if !ok {
            return Err(bad());
        }
    }
    Ok(lower)
}

/// The smallest TTL an entry may ask for; shorter SVIDs would rotate faster than an
/// agent can usefully renew them.
pub const MIN_TTL_SECS: i32 = 10;

/// Validates an entry from an admin, filling server-owned fields from `id`/`created_at`.
pub fn entry_from_proto(
    raw: &types::Entry,
    td: &TrustDomain,
    id: String,
    created_at: i64,
) -> Result<Entry, Status> {
    let spiffe_id = workload_id("spiffe_id", &raw.spiffe_id, td)?;
    let parent_id = member_id("parent_id", &raw.parent_id, td)?;
    if parent_id == spiffe_id {
        return Err(Status::invalid_argument(
            "an entry cannot be its own parent",
        ));
    }
    let selectors = selectors(&raw.selectors)?;
    if selectors.is_empty() {
        return Err(Status::invalid_argument(
            "an entry needs at least one selector",
        ));
    }
    if raw.x509_svid_ttl != 0 && raw.x509_svid_ttl < MIN_TTL_SECS {
        return Err(Status::invalid_argument(format!(
            "x509_svid_ttl must be at least {MIN_TTL_SECS} seconds (or 0 for the default), got {}",
            raw.x509_svid_ttl
        )));
    }
    let mut dns_names = raw
        .dns_names
        .iter()
        .map(|d| dns_name(d))
        .collect::<Result<Vec<_>, _>>()?;
    dns_names.sort();
    dns_names.dedup();
    if raw.hint.len() > 1024 || raw.hint.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "hint must be at most 1024 bytes of printable text",
        ));
    }
    Ok(Entry {
        id,
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl: u32::try_from(raw.x509_svid_ttl).unwrap_or(0),
        dns_names,
        hint: raw.hint.clone(),
        created_at,
        revision_number: 0,
    })
}
