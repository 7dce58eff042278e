//! X509-SVID profile checks (spec/spiffe.md §2). The agent runs these on every
//! certificate it receives before serving it, and the tests run them on what the
//! Workload API hands out: a certificate that fails here would be refused by some
//! SPIFFE client library, so it must never reach one.

use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe_id::{IdError, SpiffeId};

/// Why a certificate does not follow the X509-SVID profile.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("certificate is not valid DER: {0}")]
    Der(String),
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    SpiffeId(#[from] IdError),
    #[error("leaf SPIFFE ID {0} has no path")]
    RootLeafId(String),
    #[error("CA certificate's SPIFFE ID {0} must have no path")]
    CaIdWithPath(String),
    #[error("basicConstraints extension is missing")]
    BasicConstraintsMissing,
    #[error("leaf basicConstraints must be exactly 30 00 (cA false, DER default omitted)")]
    LeafBasicConstraints,
    #[error("CA certificate does not have cA=true")]
    NotCa,
    #[error("keyUsage extension is missing or not critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf keyUsage has keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("CA keyUsage lacks keyCertSign")]
    NoKeyCertSign,
    #[error("extKeyUsage lacks serverAuth or clientAuth")]
    ExtKeyUsage,
    #[error("serial number must be positive and at most 20 octets")]
    Serial,
    #[error("leaf expires after its issuer")]
    OutlivesIssuer,
}

/// What the profile check learned about a valid leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Serial number, lowercase hex without leading zeros stripped.
    pub serial_hex: String,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, ProfileError> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        Ok(_) => Err(ProfileError::Der(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(ProfileError::Der(e.to_string())),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, ProfileError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| ProfileError::Der(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID in a certificate's single URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, ProfileError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    match uris.as_slice() {
        [uri] => Ok(SpiffeId::parse(uri)?),
        other => Err(ProfileError::UriSanCount(other.len())),
    }
}

fn check_serial(cert: &X509Certificate<'_>) -> Result<(), ProfileError> {
    let raw = cert.raw_serial();
    // DER INTEGER content: a leading 0x00 is allowed only to keep the value positive.
    let positive = raw.first().is_some_and(|b| b & 0x80 == 0) && raw.iter().any(|b| *b != 0);
    if !positive || raw.len() > 21 || (raw.len() == 21 && raw[0] != 0) {
        return Err(ProfileError::Serial);
    }
    Ok(())
}

/// Checks a leaf X509-SVID against spec §2, optionally against its issuer's expiry.
pub fn check_leaf(der: &[u8], issuer_not_after: Option<i64>) -> Result<LeafInfo, ProfileError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    let id = match uris.as_slice() {
        [uri] => SpiffeId::parse(uri)?,
        other => return Err(ProfileError::UriSanCount(other.len())),
    };
    if id.is_root() {
        return Err(ProfileError::RootLeafId(id.to_string()));
    }
    let bc = cert
        .extensions()
        .iter()
        .find(|e| e.oid == OID_X509_EXT_BASIC_CONSTRAINTS)
        .ok_or(ProfileError::BasicConstraintsMissing)?;
    if bc.value != [0x30, 0x00] {
        return Err(ProfileError::LeafBasicConstraints);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| ProfileError::Der(e.to_string()))?
        .filter(|ku| ku.critical)
        .ok_or(ProfileError::KeyUsageNotCritical)?;
    if !ku.value.digital_signature() {
        return Err(ProfileError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(ProfileError::LeafCanSign);
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| ProfileError::Der(e.to_string()))?
        .ok_or(ProfileError::ExtKeyUsage)?;
    if !(eku.value.server_auth && eku.value.client_auth) {
        return Err(ProfileError::ExtKeyUsage);
    }
    check_serial(&cert)?;
    let not_after = cert.validity().not_after.timestamp();
    if issuer_not_after.is_some_and(|limit| not_after > limit) {
        return Err(ProfileError::OutlivesIssuer);
    }
    Ok(LeafInfo {
        spiffe_id: id,
        not_before: cert.validity().not_before.timestamp(),
        not_after,
        serial_hex: hex_lower(cert.raw_serial()),
    })
}

/// Checks a signing (CA) certificate against spec §2. Returns its notAfter.
pub fn check_ca(der: &[u8]) -> Result<i64, ProfileError> {
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| ProfileError::Der(e.to_string()))?
        .ok_or(ProfileError::BasicConstraintsMissing)?;
    if !bc.value.ca {
        return Err(ProfileError::NotCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| ProfileError::Der(e.to_string()))?
        .filter(|ku| ku.critical)
        .ok_or(ProfileError::KeyUsageNotCritical)?;
    if !ku.value.key_cert_sign() {
        return Err(ProfileError::NoKeyCertSign);
    }
    for uri in uri_sans(&cert)? {
        let id = SpiffeId::parse(uri)?;
        if !id.is_root() {
            return Err(ProfileError::CaIdWithPath(id.to_string()));
        }
    }
    check_serial(&cert)?;
    Ok(cert.validity().not_after.timestamp())
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let trimmed = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => &bytes[bytes.len().saturating_sub(1)..],
    };
    trimmed.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Splits concatenated DER certificates (as the Workload API carries them) into one
/// slice per certificate.
pub fn split_der_chain(mut bytes: &[u8]) -> Result<Vec<&[u8]>, ProfileError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(bytes).map_err(|e| ProfileError::Der(e.to_string()))?;
        let len = bytes.len() - rest.len();
        out.push(&bytes[..len]);
        bytes = rest;
    }
    Ok(out)
}
