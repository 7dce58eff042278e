//! The agent's connection to the server's agent API (TLS 1.3, mTLS once attested).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use crate::identity::AgentSvid;
use crate::tls::{SpiffeServerVerifier, provider};

/// How long one attempt to reach the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a gRPC client for the server at `address` (host:port). With `svid`, the agent
/// presents it as its client certificate.
pub fn connect(
    address: &str,
    verifier: SpiffeServerVerifier,
    svid: Option<&AgentSvid>,
) -> Result<AgentServiceClient<Channel>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
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
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(sni, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }));
    Ok(AgentServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}
