//! The agent's edge to the server's agent API (TLS 1.3, mTLS once attested).
//!
//! The sync worker reaches the server only through [`AgentServer`] (renewal, the entry
//! stream, batch signing), so its logic is tested against a fake server; [`GrpcServer`]
//! is the real one. Node attestation, the one call made without a client certificate,
//! is [`attest_agent`]. Every failure is sorted once, in [`CallError::from`], into what
//! the agent does about it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use lanyard_proto::agent::{
    AttestAgentRequest, AttestAgentResponse, RenewAgentRequest, SignX509SvidsRequest, SvidRequest,
    SvidResult, SyncEntriesRequest, SyncEntriesResponse,
};
use lanyard_proto::{SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_stream::Stream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::identity::AgentSvid;
use crate::tls::{ServerCertRefused, SpiffeServerVerifier};

/// How long one attempt to reach the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A call to the server that did not succeed, sorted by what the agent does about it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server does not (or no longer) accept this agent: stop.
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    /// The server's certificate does not verify against our bundle and trust domain:
    /// retrying cannot help until the configuration (or the server) changes.
    #[error("the server is not trusted: {0}")]
    NotTrusted(ServerCertRefused),
    /// Anything else: the server is unreachable or failed; try again later.
    #[error("{}", .0.message())]
    Failed(tonic::Status),
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        if let Some(refused) = server_cert_refusal(&status) {
            return CallError::NotTrusted(refused);
        }
        match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => CallError::Refused(status),
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::InvalidArgument
            | Code::DeadlineExceeded
            | Code::NotFound
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => CallError::Failed(status),
        }
    }
}

/// Why a connection could not be made; the TLS case keeps rustls's error so a
/// certificate refusal can be found again in a failed call's source chain.
#[derive(Debug, thiserror::Error)]
enum ConnectFailure {
    #[error("cannot connect: {0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

impl ConnectFailure {
    fn refusal(&self) -> Option<&ServerCertRefused> {
        match self {
            ConnectFailure::Tcp(_) => None,
            ConnectFailure::Tls(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .and_then(ServerCertRefused::from_rustls),
        }
    }
}

/// The certificate refusal that made `status` fail, if one did.
fn server_cert_refusal(status: &tonic::Status) -> Option<ServerCertRefused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(err) = source {
        if let Some(refusal) = err
            .downcast_ref::<ConnectFailure>()
            .and_then(ConnectFailure::refusal)
        {
            return Some(refusal.clone());
        }
        source = err.source();
    }
    None
}

/// Builds a gRPC client for the server at `address` (host:port). With `svid`, the agent
/// presents it as its client certificate.
pub fn connect(
    address: &str,
    verifier: SpiffeServerVerifier,
    svid: Option<&AgentSvid>,
) -> Result<AgentServiceClient<Channel>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(lanyard_daemon::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match svid {
        Some(svid) => builder.with_client_auth_cert(
            svid.chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.pkcs8_der().to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let address = address.to_string();
    // The name is only for SNI; the verifier checks the SPIFFE ID instead.
    let sni = ServerName::try_from("lanyard-server")
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let channel = Endpoint::from_static("http://lanyard-server")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            let address = address.clone();
            let sni = sni.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&address)
                    .await
                    .map_err(ConnectFailure::Tcp)?;
                tcp.set_nodelay(true).map_err(ConnectFailure::Tcp)?;
                let tls = connector
                    .connect(sni, tcp)
                    .await
                    .map_err(ConnectFailure::Tls)?;
                Ok::<_, ConnectFailure>(TokioIo::new(tls))
            }
        }));
    Ok(AgentServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Node attestation: one call without a client certificate, the server authenticated
/// by `verifier`.
pub async fn attest_agent(
    address: &str,
    verifier: SpiffeServerVerifier,
    request: AttestAgentRequest,
) -> Result<AttestAgentResponse, CallError> {
    let mut client = connect(address, verifier, None).map_err(|e| {
        CallError::Failed(tonic::Status::internal(format!("TLS configuration: {e}")))
    })?;
    Ok(client.attest_agent(request).await?.into_inner())
}

/// What the sync worker needs from the server, once the agent is attested.
pub trait AgentServer: Send + 'static {
    /// The server-push stream of authorized entries and the bundle.
    type Entries: Stream<Item = Result<SyncEntriesResponse, tonic::Status>> + Send + Unpin;

    fn sync_entries(&mut self) -> impl Future<Output = Result<Self::Entries, CallError>> + Send;

    /// Renews the agent's own SVID for the key in `csr`; returns the chain, leaf first.
    fn renew_agent(
        &mut self,
        csr: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, CallError>> + Send;

    /// Signs workload CSRs; one result per request, in order.
    fn sign_x509_svids(
        &mut self,
        requests: Vec<SvidRequest>,
    ) -> impl Future<Output = Result<Vec<SvidResult>, CallError>> + Send;

    /// Uses `agent` as the client certificate and `roots` to authenticate the server from
    /// now on (after a renewal or a bundle change).
    fn authenticate(&mut self, agent: &AgentSvid, roots: &[Vec<u8>]) -> Result<(), TlsSetupError>;
}

/// The agent's credentials or the bundle cannot be turned into a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("a trust bundle certificate cannot be a trust anchor: {0}")]
    Anchor(#[from] webpki::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The real server, over mTLS.
#[derive(Debug, Clone)]
pub struct GrpcServer {
    address: String,
    server_id: SpiffeId,
    client: AgentServiceClient<Channel>,
}

impl GrpcServer {
    pub fn new(
        trust_domain: &TrustDomain,
        address: &str,
        agent: &AgentSvid,
        roots: &[Vec<u8>],
    ) -> Result<Self, TlsSetupError> {
        let server_id = lanyard_proto::server_id(trust_domain);
        let verifier = SpiffeServerVerifier::new(roots, server_id.clone())?;
        Ok(GrpcServer {
            address: address.to_string(),
            client: connect(address, verifier, Some(agent))?,
            server_id,
        })
    }
}

impl AgentServer for GrpcServer {
    type Entries = tonic::Streaming<SyncEntriesResponse>;

    async fn sync_entries(&mut self) -> Result<Self::Entries, CallError> {
        Ok(self
            .client
            .sync_entries(SyncEntriesRequest {})
            .await?
            .into_inner())
    }

    async fn renew_agent(&mut self, csr: Vec<u8>) -> Result<Vec<Vec<u8>>, CallError> {
        Ok(self
            .client
            .renew_agent(RenewAgentRequest { csr })
            .await?
            .into_inner()
            .x509_svid_chain)
    }

    async fn sign_x509_svids(
        &mut self,
        requests: Vec<SvidRequest>,
    ) -> Result<Vec<SvidResult>, CallError> {
        Ok(self
            .client
            .sign_x509_svids(SignX509SvidsRequest { requests })
            .await?
            .into_inner()
            .results)
    }

    fn authenticate(&mut self, agent: &AgentSvid, roots: &[Vec<u8>]) -> Result<(), TlsSetupError> {
        let verifier = SpiffeServerVerifier::new(roots, self.server_id.clone())?;
        self.client = connect(&self.address, verifier, Some(agent))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_what_the_agent_does() {
        assert!(matches!(
            CallError::from(tonic::Status::permission_denied("evicted")),
            CallError::Refused(_)
        ));
        assert!(matches!(
            CallError::from(tonic::Status::unauthenticated("no cert")),
            CallError::Refused(_)
        ));
        for status in [
            tonic::Status::unavailable("down"),
            tonic::Status::internal("db"),
            tonic::Status::unknown("h2"),
        ] {
            assert!(matches!(CallError::from(status), CallError::Failed(_)));
        }
    }

    #[tokio::test]
    async fn a_refused_server_certificate_is_found_in_the_failed_call() {
        // A TLS server whose certificate no CA of our bundle signed.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/lanyard/server"
                .try_into()
                .expect("uri"),
        )];
        let cert = params.self_signed(&key).expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(lanyard_daemon::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let (_, other_root) = {
            let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let c = p.self_signed(&k).expect("ca");
            ((), c.der().to_vec())
        };
        let td = TrustDomain::new("example.org").expect("td");
        let verifier =
            SpiffeServerVerifier::new(&[other_root], lanyard_proto::server_id(&td)).expect("v");
        let err = attest_agent(&address, verifier, AttestAgentRequest::default())
            .await
            .expect_err("untrusted server");
        assert!(
            matches!(err, CallError::NotTrusted(ServerCertRefused::UnknownIssuer)),
            "{err:?}"
        );

        // Nobody listening is a failure to retry, not a trust problem.
        let closed = format!("127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        });
        let verifier = SpiffeServerVerifier::insecure(lanyard_proto::server_id(&td));
        let err = attest_agent(&closed, verifier, AttestAgentRequest::default())
            .await
            .expect_err("nobody there");
        assert!(
            matches!(err, CallError::Failed(ref s) if s.code() == Code::Unavailable),
            "{err:?}"
        );
    }
}
