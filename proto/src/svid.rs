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

#[cfg(test)]
mod tests {
    //! One certificate per rejection rule of the X509-SVID profile, made with rcgen, and
    //! the valid leaf and CA they are variations of.

    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };

    use super::*;

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().expect("URI"))
    }

    /// A valid leaf X509-SVID for `spiffe://example.org/workload`.
    fn leaf_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![uri("spiffe://example.org/workload")];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(SerialNumber::from(vec![0x01, 0x02, 0x03]));
        p
    }

    /// A valid signing certificate for the trust domain.
    fn ca_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![uri("spiffe://example.org")];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(SerialNumber::from(vec![0x42]));
        p
    }

    fn der(params: CertificateParams) -> Vec<u8> {
        params
            .self_signed(&key())
            .expect("certificate")
            .der()
            .to_vec()
    }

    fn leaf(change: impl FnOnce(&mut CertificateParams)) -> Result<LeafInfo, ProfileError> {
        let mut p = leaf_params();
        change(&mut p);
        check_leaf(&der(p), None)
    }

    fn ca(change: impl FnOnce(&mut CertificateParams)) -> Result<i64, ProfileError> {
        let mut p = ca_params();
        change(&mut p);
        check_ca(&der(p))
    }

    #[test]
    fn a_valid_leaf_and_ca_pass() {
        let info = leaf(|_| {}).expect("valid leaf");
        assert_eq!(info.spiffe_id.as_str(), "spiffe://example.org/workload");
        assert_eq!(info.serial_hex, "010203");
        assert!(info.not_after > info.not_before);
        ca(|_| {}).expect("valid CA");
        // A leaf signed by the CA, as the server issues them, splits back from a chain.
        let ca_key = key();
        let ca_cert = ca_params().self_signed(&ca_key).expect("ca");
        let ca_p = ca_params();
        let issuer = Issuer::from_params(&ca_p, &ca_key);
        let leaf_cert = leaf_params().signed_by(&key(), &issuer).expect("leaf");
        let chain = [leaf_cert.der().to_vec(), ca_cert.der().to_vec()].concat();
        let parts = split_der_chain(&chain).expect("chain");
        assert_eq!(parts.len(), 2);
        check_leaf(parts[0], Some(check_ca(parts[1]).expect("ca"))).expect("leaf in chain");
    }

    #[test]
    fn der_garbage_and_trailing_bytes() {
        assert!(matches!(
            check_leaf(b"not a certificate", None),
            Err(ProfileError::Der(_))
        ));
        let mut with_tail = der(leaf_params());
        with_tail.push(0);
        assert_eq!(
            check_leaf(&with_tail, None),
            Err(ProfileError::Der(
                "trailing bytes after the certificate".into()
            ))
        );
        assert!(matches!(
            split_der_chain(b"\x30\x03\x01"),
            Err(ProfileError::Der(_))
        ));
    }

    #[test]
    fn exactly_one_uri_san() {
        assert_eq!(
            leaf(|p| p.subject_alt_names.clear()),
            Err(ProfileError::UriSanCount(0))
        );
        assert_eq!(
            leaf(|p| p.subject_alt_names.push(uri("spiffe://example.org/other"))),
            Err(ProfileError::UriSanCount(2))
        );
        assert_eq!(
            spiffe_id_of(&der({
                let mut p = leaf_params();
                p.subject_alt_names.clear();
                p
            })),
            Err(ProfileError::UriSanCount(0))
        );
    }

    #[test]
    fn the_uri_san_must_be_a_spiffe_id() {
        assert!(matches!(
            leaf(|p| p.subject_alt_names = vec![uri("https://example.org/workload")]),
            Err(ProfileError::SpiffeId(_))
        ));
    }

    #[test]
    fn a_leaf_id_has_a_path() {
        assert_eq!(
            leaf(|p| p.subject_alt_names = vec![uri("spiffe://example.org")]),
            Err(ProfileError::RootLeafId("spiffe://example.org".into()))
        );
    }

    #[test]
    fn a_ca_id_has_no_path() {
        assert_eq!(
            ca(|p| p.subject_alt_names = vec![uri("spiffe://example.org/ca")]),
            Err(ProfileError::CaIdWithPath("spiffe://example.org/ca".into()))
        );
    }

    #[test]
    fn basic_constraints_must_be_present() {
        assert_eq!(
            leaf(|p| p.is_ca = IsCa::NoCa),
            Err(ProfileError::BasicConstraintsMissing)
        );
        assert_eq!(
            ca(|p| p.is_ca = IsCa::NoCa),
            Err(ProfileError::BasicConstraintsMissing)
        );
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        assert_eq!(
            leaf(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            Err(ProfileError::LeafBasicConstraints)
        );
    }

    #[test]
    fn a_signing_certificate_is_a_ca() {
        assert_eq!(
            ca(|p| p.is_ca = IsCa::ExplicitNoCa),
            Err(ProfileError::NotCa)
        );
    }

    #[test]
    fn key_usage_must_be_present_and_critical() {
        assert_eq!(
            leaf(|p| p.key_usages.clear()),
            Err(ProfileError::KeyUsageNotCritical)
        );
        // digitalSignature, in a keyUsage extension not marked critical.
        let mut non_critical =
            CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        non_critical.set_criticality(false);
        assert_eq!(
            leaf(|p| {
                p.key_usages.clear();
                p.custom_extensions = vec![non_critical];
            }),
            Err(ProfileError::KeyUsageNotCritical)
        );
        assert_eq!(
            ca(|p| p.key_usages.clear()),
            Err(ProfileError::KeyUsageNotCritical)
        );
    }

    #[test]
    fn a_leaf_signs_digitally() {
        assert_eq!(
            leaf(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
            Err(ProfileError::NoDigitalSignature)
        );
    }

    #[test]
    fn a_leaf_cannot_sign_certificates_or_crls() {
        for extra in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
            assert_eq!(
                leaf(|p| p.key_usages.push(extra)),
                Err(ProfileError::LeafCanSign)
            );
        }
    }

    #[test]
    fn a_ca_signs_certificates() {
        assert_eq!(
            ca(|p| p.key_usages =
                vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature]),
            Err(ProfileError::NoKeyCertSign)
        );
    }

    #[test]
    fn a_leaf_is_for_servers_and_clients() {
        assert_eq!(
            leaf(|p| p.extended_key_usages.clear()),
            Err(ProfileError::ExtKeyUsage)
        );
        assert_eq!(
            leaf(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            Err(ProfileError::ExtKeyUsage)
        );
        assert_eq!(
            leaf(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]),
            Err(ProfileError::ExtKeyUsage)
        );
    }

    #[test]
    fn serials_are_positive_and_at_most_20_octets() {
        assert_eq!(
            leaf(|p| p.serial_number = Some(SerialNumber::from(vec![0x00]))),
            Err(ProfileError::Serial),
            "zero"
        );
        assert_eq!(
            leaf(|p| p.serial_number = Some(SerialNumber::from(vec![0x7f; 21]))),
            Err(ProfileError::Serial),
            "21 octets"
        );
        // 20 octets with the high bit set take a leading zero in DER: still allowed.
        leaf(|p| p.serial_number = Some(SerialNumber::from(vec![0xff; 20]))).expect("20 octets");
        assert_eq!(
            ca(|p| p.serial_number = Some(SerialNumber::from(vec![0x00]))),
            Err(ProfileError::Serial)
        );
    }

    #[test]
    fn a_leaf_does_not_outlive_its_issuer() {
        let info = leaf(|_| {}).expect("valid");
        let p = leaf_params();
        let d = der(p);
        assert_eq!(
            check_leaf(&d, Some(info.not_after - 1)),
            Err(ProfileError::OutlivesIssuer)
        );
        check_leaf(&d, Some(info.not_after)).expect("same notAfter is fine");
    }
}
