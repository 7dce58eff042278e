//! Conversions between stored records and their protobuf forms, and the validation of
//! what admins send. Every refusal is an [`InputError`]: one sentence naming the field.

use std::net::{Ipv4Addr, Ipv6Addr};

use lanyard_attestors::forms::{self, FormError, Scope};
use lanyard_proto::types;
use lanyard_proto::{IdError, Selector, SelectorError, SpiffeId, TrustDomain};

use crate::datastore::{AgentRecord, Entry};

/// Why an admin's input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} \"{raw}\" is invalid: {source}")]
    BadId {
        field: &'static str,
        raw: String,
        source: IdError,
    },
    #[error("{field} {id} is not in trust domain {td}")]
    ForeignId {
        field: &'static str,
        id: SpiffeId,
        td: TrustDomain,
    },
    #[error("{field} {id} has no path; an SVID's ID needs one")]
    RootId { field: &'static str, id: SpiffeId },
    #[error("{field} {id} is under /lanyard/, which is reserved for the server and its agents")]
    Reserved { field: &'static str, id: SpiffeId },
    #[error("selector is invalid: {0}")]
    Selector(#[from] SelectorError),
    #[error(transparent)]
    Form(#[from] FormError),
    #[error("an entry needs at least one selector")]
    NoSelectors,
    #[error("an entry cannot be its own parent")]
    OwnParent,
    #[error(
        "x509_svid_ttl must be at least {MIN_TTL_SECS} seconds (or 0 for the default), got {0}"
    )]
    SvidTtl(i32),
    #[error("token ttl must be at least {MIN_TTL_SECS} seconds, got {0}")]
    TokenTtl(i32),
    #[error("DNS name \"{name}\" is invalid: {reason}")]
    DnsName { name: String, reason: &'static str },
    #[error("hint must be at most 1024 bytes of printable text")]
    Hint,
}

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
pub fn member_id(field: &'static str, raw: &str, td: &TrustDomain) -> Result<SpiffeId, InputError> {
    if raw.is_empty() {
        return Err(InputError::Missing(field));
    }
    let id = SpiffeId::parse(raw).map_err(|source| InputError::BadId {
        field,
        raw: raw.to_string(),
        source,
    })?;
    if !id.is_member_of(td) {
        return Err(InputError::ForeignId {
            field,
            id,
            td: td.clone(),
        });
    }
    Ok(id)
}

/// An ID a workload or node alias may hold: in the trust domain, with a path, and not
/// under `/lanyard/`, which is reserved for the server and its agents.
pub fn workload_id(
    field: &'static str,
    raw: &str,
    td: &TrustDomain,
) -> Result<SpiffeId, InputError> {
    let id = member_id(field, raw, td)?;
    if id.is_root() {
        return Err(InputError::RootId { field, id });
    }
    if id.path() == "/lanyard" || id.path().starts_with("/lanyard/") {
        return Err(InputError::Reserved { field, id });
    }
    Ok(id)
}

/// Parses selectors (sorted, without duplicates), without checking their forms: filters
/// may name anything.
pub fn selectors(raw: &[types::Selector]) -> Result<Vec<Selector>, InputError> {
    let mut out = raw
        .iter()
        .map(Selector::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// A DNS name for an X509-SVID's SAN, lowercased. Refuses what no certificate verifier
/// should match by accident: a bare or too wide wildcard (`*`, `*.com`), IP literals
/// (they belong in IP SANs), and names whose top label is all digits (not a host name,
/// and easily confused with an address).
pub fn dns_name(name: &str) -> Result<String, InputError> {
    let bad = |reason: &'static str| InputError::DnsName {
        name: name.to_string(),
        reason,
    };
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || lower.len() > 253 {
        return Err(bad("it must be 1 to 253 characters"));
    }
    let unbracketed = lower.trim_start_matches('[').trim_end_matches(']');
    if lower.parse::<Ipv4Addr>().is_ok() || unbracketed.parse::<Ipv6Addr>().is_ok() {
        return Err(bad("it is an IP address, not a DNS name"));
    }
    let labels: Vec<&str> = lower.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if i == 0 && *label == "*" {
            // A wildcard covers one label of a registered name: `*.example.com`, never
            // `*.com` or `*`.
            if labels.len() < 3 {
                return Err(bad(
                    "a wildcard needs at least two labels after it, as in *.example.com",
                ));
            }
            continue;
        }
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad(
                "each label must be 1 to 63 letters, digits or '-' (not at either end), and only the first may be '*'",
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|top| top.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad("its top-level label is all digits"));
    }
    Ok(lower)
}

/// The smallest TTL an entry or token may ask for; shorter SVIDs would rotate faster than
/// an agent can usefully renew them.
pub const MIN_TTL_SECS: i32 = 10;

/// Validates an entry from an admin, filling server-owned fields from `id`/`created_at`.
/// Node entries (parented to `server_id`) take node selectors, workload entries workload
/// selectors, each in a form some attestor produces.
pub fn entry_from_proto(
    raw: &types::Entry,
    td: &TrustDomain,
    server_id: &SpiffeId,
    id: String,
    created_at: i64,
) -> Result<Entry, InputError> {
    let spiffe_id = workload_id("spiffe_id", &raw.spiffe_id, td)?;
    let parent_id = member_id("parent_id", &raw.parent_id, td)?;
    if parent_id == spiffe_id {
        return Err(InputError::OwnParent);
    }
    let selectors = selectors(&raw.selectors)?;
    if selectors.is_empty() {
        return Err(InputError::NoSelectors);
    }
    let scope = if parent_id == *server_id {
        Scope::Node
    } else {
        Scope::Workload
    };
    for s in &selectors {
        forms::check(scope, s)?;
    }
    if raw.x509_svid_ttl != 0 && raw.x509_svid_ttl < MIN_TTL_SECS {
        return Err(InputError::SvidTtl(raw.x509_svid_ttl));
    }
    let mut dns_names = raw
        .dns_names
        .iter()
        .map(|d| dns_name(d))
        .collect::<Result<Vec<_>, _>>()?;
    dns_names.sort();
    dns_names.dedup();
    if raw.hint.len() > 1024 || raw.hint.chars().any(char::is_control) {
        return Err(InputError::Hint);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").expect("td")
    }

    fn raw(spiffe: &str, parent: &str, selectors: &[&str]) -> types::Entry {
        types::Entry {
            spiffe_id: spiffe.into(),
            parent_id: parent.into(),
            selectors: selectors
                .iter()
                .map(|s| types::Selector::from(Selector::parse(s).expect("selector")))
                .collect(),
            ..Default::default()
        }
    }

    fn check(e: &types::Entry) -> Result<Entry, InputError> {
        let td = td();
        entry_from_proto(e, &td, &lanyard_proto::server_id(&td), "id".into(), 1)
    }

    #[test]
    fn dns_names_refuse_wide_wildcards_addresses_and_numeric_tops() {
        for good in ["web.example.org", "*.example.org", "a-b.c", "X.Example.ORG"] {
            dns_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        assert_eq!(dns_name("X.Example.ORG").expect("ok"), "x.example.org");
        for (bad, why) in [
            ("*", "wildcard"),
            ("*.com", "wildcard"),
            ("a.*.example.org", "label"),
            ("10.0.0.1", "IP address"),
            ("::1", "IP address"),
            ("[::1]", "IP address"),
            ("web.123", "all digits"),
            ("1.2.3", "all digits"),
            ("-a.example.org", "label"),
            ("a..b", "label"),
            ("example.org.", "label"),
            ("", "1 to 253"),
        ] {
            let err = dns_name(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn selectors_must_have_a_known_form_for_the_entry_kind() {
        let agent = "spiffe://example.org/lanyard/agent/join_token/x";
        check(&raw("spiffe://example.org/a", agent, &["unix:uid:1002"])).expect("workload");
        for bad in ["uid:1002", "unix:uuid:1", "unix:uid:abc"] {
            let err = check(&raw("spiffe://example.org/a", agent, &[bad])).expect_err(bad);
            let text = err.to_string();
            assert!(
                text.contains(bad) && text.contains("unix:uid:<u32>"),
                "{text}"
            );
        }
        let server = "spiffe://example.org/lanyard/server";
        let token_sel = "join_token:0123456789abcdef0123456789abcdef";
        check(&raw("spiffe://example.org/runner", server, &[token_sel])).expect("node entry");
        let err = check(&raw("spiffe://example.org/runner", server, &["unix:uid:1"]))
            .expect_err("workload selector in a node entry");
        assert!(err.to_string().contains("join_token:<token id"), "{err}");
        let err = check(&raw("spiffe://example.org/a", agent, &[token_sel]))
            .expect_err("node selector in a workload entry");
        assert!(err.to_string().contains("node selector"), "{err}");
    }

    #[test]
    fn ids_and_fields_are_checked() {
        let agent = "spiffe://example.org/lanyard/agent/join_token/x";
        let cases: Vec<(types::Entry, &str)> = vec![
            (raw("", agent, &["unix:uid:1"]), "spiffe_id is required"),
            (
                raw("spiffe://example.org/lanyard/x", agent, &["unix:uid:1"]),
                "reserved",
            ),
            (
                raw("spiffe://example.org", agent, &["unix:uid:1"]),
                "no path",
            ),
            (
                raw("spiffe://other.org/a", agent, &["unix:uid:1"]),
                "not in trust domain",
            ),
            (
                raw("spiffe://example.org/a", agent, &[]),
                "at least one selector",
            ),
            (
                raw(
                    "spiffe://example.org/a",
                    "spiffe://example.org/a",
                    &["unix:uid:1"],
                ),
                "own parent",
            ),
        ];
        for (e, needle) in cases {
            let err = check(&e).expect_err(needle);
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let mut short = raw("spiffe://example.org/a", agent, &["unix:uid:1"]);
        short.x509_svid_ttl = 5;
        assert_eq!(check(&short), Err(InputError::SvidTtl(5)));
        let mut hint = raw("spiffe://example.org/a", agent, &["unix:uid:1"]);
        hint.hint = "a\nb".into();
        assert_eq!(check(&hint), Err(InputError::Hint));
    }
}
