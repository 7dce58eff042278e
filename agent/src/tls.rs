//! TLS 1.3 to the server. The server must present an X509-SVID for
//! `spiffe://<td>/lanyard/server` that chains to the bundle: we check the SPIFFE ID, not
//! a DNS name, since the agent may reach the server by any address.

use std::sync::Arc;

use lanyard_proto::{SpiffeId, svid};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

/// The ring provider, selected explicitly so nothing falls back to aws-lc.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
    pub fn new(roots: &[Vec<u8>], expected: SpiffeId) -> Result<Self, rustls::Error> {
        let roots = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .map(|a| a.to_owned())
                    .map_err(|e| rustls::Error::General(format!("bundle certificate: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(SpiffeServerVerifier {
            roots,
            expected,
            provider: provider(),
            insecure: false,
        })
    }

    pub fn insecure(expected: SpiffeId) -> Self {
        SpiffeServerVerifier {
            roots: vec![],
            expected,
            provider: provider(),
            insecure: true,
        }
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
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
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
            webpki::Error::CertExpired { .. } => {
                rustls::Error::InvalidCertificate(CertificateError::Expired)
            }
            webpki::Error::UnknownIssuer => {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            }
            other => rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(other)),
            )),
        })?;
        let id = svid::spiffe_id_of(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
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
