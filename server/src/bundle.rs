//! The trust bundle in the SPIFFE format: a JWK Set as the SPIFFE Trust Domain and
//! Bundle standard defines it. Each X.509 authority is one key with `use` `x509-svid`,
//! its public key as JWK members (`kty`, `crv`, `x`, `y`) and exactly one `x5c` entry,
//! the certificate (standard base64 of its DER); no `kid` (X.509 authorities have none).
//! `spiffe_sequence` and `spiffe_refresh_hint` sit beside `keys`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};

/// How often (seconds) a consumer of the bundle should fetch it again.
pub const REFRESH_HINT_SECS: u64 = 300;

/// Why a bundle certificate cannot be written as a JWK.
#[derive(Debug, thiserror::Error)]
pub enum JwkError {
    #[error("bundle certificate is not valid DER: {0}")]
    Der(String),
    #[error("bundle certificate's key is not an EC key on P-256 or P-384")]
    Key,
}

/// One X.509 authority as a JWK.
pub fn x509_authority_jwk(der: &[u8]) -> Result<Value, JwkError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| JwkError::Der(e.to_string()))?;
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(JwkError::Key);
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or(JwkError::Key)?;
    let (crv, len) = if curve == OID_EC_P256 {
        ("P-256", 32)
    } else if curve == OID_NIST_EC_P384 {
        ("P-384", 48)
    } else {
        return Err(JwkError::Key);
    };
    let point = &spki.subject_public_key.data;
    if point.len() != 1 + 2 * len || point[0] != 0x04 {
        return Err(JwkError::Key);
    }
    Ok(json!({
        "use": "x509-svid",
        "kty": "EC",
        "crv": crv,
        "x": URL_SAFE_NO_PAD.encode(&point[1..=len]),
        "y": URL_SAFE_NO_PAD.encode(&point[1 + len..]),
        "x5c": [STANDARD.encode(der)],
    }))
}

/// The bundle as a SPIFFE bundle (JWK Set).
pub fn spiffe_bundle(x509_authorities: &[Vec<u8>], sequence: u64) -> Result<Value, JwkError> {
    let keys = x509_authorities
        .iter()
        .map(|der| x509_authority_jwk(der))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": REFRESH_HINT_SECS,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use crate::clock::ManualClock;

    #[test]
    fn jwks_carries_the_ca_key_and_certificate() {
        let td = lanyard_proto::TrustDomain::new("example.org").expect("td");
        let ca = Ca::create(
            &td,
            std::time::Duration::from_secs(3600),
            ManualClock::starting_now(),
        )
        .expect("ca");
        let bundle = spiffe_bundle(&[ca.cert_der().to_vec()], 7).expect("jwks");
        assert_eq!(bundle["spiffe_sequence"], 7);
        assert_eq!(bundle["spiffe_refresh_hint"], REFRESH_HINT_SECS);
        let keys = bundle["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1);
        let key = &keys[0];
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert!(key.get("kid").is_none(), "X.509 authorities have no kid");
        let x5c = key["x5c"].as_array().expect("x5c");
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD
                .decode(x5c[0].as_str().expect("b64"))
                .expect("base64"),
            ca.cert_der()
        );
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("cert");
        let point = &cert.public_key().subject_public_key.data;
        let x = URL_SAFE_NO_PAD
            .decode(key["x"].as_str().expect("x"))
            .expect("x");
        let y = URL_SAFE_NO_PAD
            .decode(key["y"].as_str().expect("y"))
            .expect("y");
        assert_eq!([&[4u8][..], &x, &y].concat(), point.to_vec());
        assert!(x509_authority_jwk(b"junk").is_err());
    }
}
