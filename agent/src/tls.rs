//! TLS 1.3 to the server. The server must present an X509-SVID for
//! `spiffe://<td>/lanyard/server` that chains to the bundle: we check the SPIFFE ID, not
//! a DNS name, since the agent may reach the server by any address. A refusal says
//! which of the two failed ([`ServerCertRefused`]), so a wrong bootstrap bundle or trust
//! domain can be named to the operator instead of being retried as if the server were
//! down.

use std::sync::Arc;

use lanyard_proto::{SpiffeId, svid};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

/// Why the server's certificate was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ServerCertRefused {
    /// Not signed by any CA in the bundle: the wrong bundle, or the wrong server (a CA
    /// of the same name but another key, as another server of the same trust domain
    /// name has, fails the signature check instead of the name lookup).
    #[error("its certificate is not signed by any CA in the trust bundle")]
    UnknownIssuer,
    /// Signed by the bundle, but for another ID: the wrong trust domain.
    #[error("it presented {got}, not {want}")]
    WrongId { got: SpiffeId, want: SpiffeId },
    #[error("its certificate carries no usable SPIFFE ID")]
    NoSpiffeId,
    #[error("its certificate is expired or not yet valid (check this machine's clock)")]
    Validity,
    #[error("its certificate does not verify: {0}")]
    Invalid(webpki::Error),
}

impl ServerCertRefused {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            self,
        ))))
    }

    /// The refusal inside a rustls error, if the error is one.
    pub fn from_rustls(e: &rustls::Error) -> Option<&ServerCertRefused> {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<ServerCertRefused>()
            }
            _ => None,
        }
    }
}

/// Verifies the server's certificate by bundle and SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
    /// First contact with `insecure_bootstrap`: accept any certificate.
    insecure: bool,
}

impl SpiffeServerVerifier {
    pub fn new(roots: &[Vec<u8>], expected: SpiffeId) -> Result<Self, webpki::Error> {
        let roots = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .map(|a| a.to_owned())
            })
            .collect::<Result<_, _>>()?;
        Ok(SpiffeServerVerifier {
            roots,
            expected,
            provider: lanyard_daemon::tls::provider(),
            insecure: false,
        })
    }

    pub fn insecure(expected: SpiffeId) -> Self {
        SpiffeServerVerifier {
            roots: vec![],
            expected,
            provider: lanyard_daemon::tls::provider(),
            insecure: true,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), ServerCertRefused> {
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(ServerCertRefused::Invalid)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                ServerCertRefused::UnknownIssuer
            }
            webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                ServerCertRefused::Validity
            }
            other => ServerCertRefused::Invalid(other),
        })?;
        let id = svid::spiffe_id_of(end_entity).map_err(|_| ServerCertRefused::NoSpiffeId)?;
        if id != self.expected {
            return Err(ServerCertRefused::WrongId {
                got: id,
                want: self.expected.clone(),
            });
        }
        Ok(())
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        self.check(end_entity, intermediates, now)
            .map_err(ServerCertRefused::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("ca");
        (rcgen::Issuer::new(params, key), cert.der().to_vec())
    }

    fn server_cert(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, id: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("uri"))];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.signed_by(&key, issuer).expect("leaf").der().to_vec()
    }

    fn verify(verifier: &SpiffeServerVerifier, der: &[u8]) -> Result<(), rustls::Error> {
        verifier
            .verify_server_cert(
                &CertificateDer::from(der),
                &[],
                &ServerName::try_from("lanyard-server").expect("name"),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn refusals_say_whether_bundle_or_trust_domain_is_wrong() {
        let want = SpiffeId::parse("spiffe://example.org/lanyard/server").expect("id");
        let (issuer, root) = ca();
        let verifier = SpiffeServerVerifier::new(&[root], want.clone()).expect("verifier");
        verify(&verifier, &server_cert(&issuer, want.as_str())).expect("the right server");

        let wrong_td = verify(
            &verifier,
            &server_cert(&issuer, "spiffe://other.org/lanyard/server"),
        )
        .expect_err("another trust domain");
        assert!(
            matches!(ServerCertRefused::from_rustls(&wrong_td), Some(ServerCertRefused::WrongId { got, .. }) if got.as_str() == "spiffe://other.org/lanyard/server"),
            "{wrong_td:?}"
        );

        let (other_issuer, _) = ca();
        let wrong_bundle =
            verify(&verifier, &server_cert(&other_issuer, want.as_str())).expect_err("another CA");
        assert!(
            matches!(
                ServerCertRefused::from_rustls(&wrong_bundle),
                Some(ServerCertRefused::UnknownIssuer)
            ),
            "{wrong_bundle:?}"
        );
        assert!(ServerCertRefused::from_rustls(&rustls::Error::HandshakeNotComplete).is_none());
        // Insecure bootstrap accepts anything, by design (local trials only).
        verify(
            &SpiffeServerVerifier::insecure(want),
            &server_cert(&other_issuer, "spiffe://x/y"),
        )
        .expect("insecure");
    }
}
