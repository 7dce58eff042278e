//! The agent API's connection limits, against a server started in-process with narrow
//! limits (so no test waits for the production timeouts): handshake timeout and caps,
//! the lifetime and caps of connections without an agent SVID, and that agents with one
//! still get in while anonymous connections are at their cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_attestors::node::join_token;
use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use lanyard_proto::agent::{AttestAgentRequest, SignX509SvidsRequest};
use lanyard_server::config::{RunArgs, ServerConfig};
use lanyard_server::datastore::StoredToken;
use lanyard_server::run::Running;
use lanyard_server::tls::Limits;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// These tests are about the server's limits, not about authenticating it.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        lanyard_daemon::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An agent's SVID and key, for mTLS.
struct Creds {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
}

fn connector(creds: Option<&Creds>) -> tokio_rustls::TlsConnector {
    let builder = rustls::ClientConfig::builder_with_provider(lanyard_daemon::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match creds {
        Some(c) => builder
            .with_client_auth_cert(
                c.chain
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone())),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn sni() -> ServerName<'static> {
    ServerName::try_from("lanyard-server").expect("sni")
}

/// A finished TLS handshake, then nothing: an idle connection.
async fn tls(
    addr: SocketAddr,
    creds: Option<&Creds>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    connector(creds)
        .connect(sni(), tcp)
        .await
        .expect("handshake")
}

/// A gRPC client over one connection.
async fn client(addr: SocketAddr, creds: Option<&Creds>) -> AgentServiceClient<Channel> {
    let connector = connector(creds);
    let channel = Endpoint::from_static("http://lanyard-server")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector.connect(sni(), tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("channel");
    AgentServiceClient::new(channel)
}

/// How a connection ended (or did not) within `limit`: `Some(elapsed)` when the server
/// closed it.
async fn closed_within<R: tokio::io::AsyncRead + Unpin>(
    conn: &mut R,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at((started + limit).into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            // Session tickets and the like: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

async fn start(limits: Limits) -> (tempfile::TempDir, Running) {
    let dir = tempfile::Builder::new()
        .prefix("lanyard-limits")
        .tempdir()
        .expect("tmp");
    let args = RunArgs {
        trust_domain: Some("example.org".into()),
        bind_address: Some("127.0.0.1:0".parse().expect("addr")),
        admin_socket: Some(dir.path().join("run/admin.sock")),
        data_dir: Some(dir.path().join("data")),
        ..RunArgs::default()
    };
    let mut config = ServerConfig::load(&args).expect("config");
    config.limits = limits;
    let running = lanyard_server::run::start(&config).await.expect("start");
    (dir, running)
}

/// Attests an agent through the API (over its own anonymous connection).
async fn attest(running: &Running) -> Creds {
    let token = join_token::generate().expect("random");
    let d = join_token::digest_of(&token);
    let now = running.state.now();
    running
        .state
        .create_join_token(
            &StoredToken {
                hash: d.hash,
                id: d.id,
                expires_at: now + 600,
                created_at: now,
            },
            None,
        )
        .await
        .expect("token");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec();
    let reply = client(running.agent_addr, None)
        .await
        .attest_agent(AttestAgentRequest {
            method: join_token::METHOD.into(),
            payload: join_token::evidence(&token),
            csr,
        })
        .await
        .expect("attest")
        .into_inner();
    Creds {
        chain: reply.x509_svid_chain,
        key: key.serialize_der(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_an_agent_svid_are_closed_after_their_lifetime() {
    let (_dir, running) = start(Limits {
        unauthenticated_lifetime: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let creds = attest(&running).await;
    let mut anonymous = tls(running.agent_addr, None).await;
    let mut agent = tls(running.agent_addr, Some(&creds)).await;
    let took = closed_within(&mut anonymous, Duration::from_secs(5))
        .await
        .expect("the anonymous connection is closed");
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    assert_eq!(
        closed_within(&mut agent, Duration::from_secs(1)).await,
        None,
        "a connection with an agent SVID has no such lifetime"
    );
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_time_out_and_are_capped_per_address() {
    let (_dir, running) = start(Limits {
        handshake_timeout: Duration::from_secs(1),
        max_handshakes_per_ip: 2,
        ..Limits::default()
    })
    .await;
    // Two connections that never send a ClientHello hold both handshake places ...
    let mut stalled = vec![];
    for _ in 0..2 {
        stalled.push(TcpStream::connect(running.agent_addr).await.expect("tcp"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... so a third is turned away at once.
    let mut third = TcpStream::connect(running.agent_addr).await.expect("tcp");
    let took = closed_within(&mut third, Duration::from_millis(900))
        .await
        .expect("a handshake over the cap is closed at once");
    assert!(took < Duration::from_millis(900), "{took:?}");
    // The stalled ones are closed by the handshake timeout.
    for conn in &mut stalled {
        closed_within(conn, Duration::from_secs(4))
            .await
            .expect("a stalled handshake times out");
    }
    // Then handshakes work again.
    let mut fine = tls(running.agent_addr, None).await;
    assert_eq!(
        closed_within(&mut fine, Duration::from_millis(300)).await,
        None
    );
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_capped_but_agents_still_get_in() {
    let (_dir, running) = start(Limits {
        max_unauthenticated_per_ip: 2,
        ..Limits::default()
    })
    .await;
    let creds = attest(&running).await;
    let mut idle = vec![
        tls(running.agent_addr, None).await,
        tls(running.agent_addr, None).await,
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tls(running.agent_addr, None).await;
    closed_within(&mut third, Duration::from_secs(2))
        .await
        .expect("a third anonymous connection from one address is closed");
    for conn in &mut idle {
        assert_eq!(
            closed_within(conn, Duration::from_millis(300)).await,
            None,
            "the first two stay open"
        );
    }
    // An agent with its SVID is not an anonymous connection: it is served.
    client(running.agent_addr, Some(&creds))
        .await
        .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
        .await
        .expect("an agent is served while anonymous connections are at their cap");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_agent_are_capped() {
    let (_dir, running) = start(Limits {
        max_connections_per_agent: 2,
        ..Limits::default()
    })
    .await;
    let creds = attest(&running).await;
    let mut open = vec![
        tls(running.agent_addr, Some(&creds)).await,
        tls(running.agent_addr, Some(&creds)).await,
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tls(running.agent_addr, Some(&creds)).await;
    closed_within(&mut third, Duration::from_secs(2))
        .await
        .expect("a third connection of one agent is closed");
    for conn in &mut open {
        assert_eq!(closed_within(conn, Duration::from_millis(300)).await, None);
    }
    running.shutdown().await.expect("shutdown");
}

/// Forwards one connection to `server` until `frozen` is set; then holds both sockets
/// open and silent, as a peer that vanished without closing does.
async fn freezable_proxy(
    server: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept");
        let upstream = TcpStream::connect(server).await.expect("upstream");
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            frozen: Arc<std::sync::atomic::AtomicBool>,
        ) {
            use tokio::io::AsyncWriteExt;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let Ok(n) = from.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                if frozen.load(std::sync::atomic::Ordering::SeqCst) {
                    // Keep both halves, forward nothing, never close.
                    std::future::pending::<()>().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        tokio::join!(pump(cr, uw, frozen.clone()), pump(ur, cw, frozen));
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_connections_whose_agent_went_away() {
    let (_dir, running) = start(Limits {
        max_connections_per_agent: 1,
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let creds = attest(&running).await;
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = freezable_proxy(running.agent_addr, frozen.clone()).await;
    let mut via_proxy = client(proxy, Some(&creds)).await;
    via_proxy
        .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
        .await
        .expect("served through the proxy");
    // The agent's one allowed connection is taken: a second one is refused.
    let mut direct = tls(running.agent_addr, Some(&creds)).await;
    closed_within(&mut direct, Duration::from_secs(2))
        .await
        .expect("over the per-agent cap");
    // The agent vanishes without closing: only keepalive can find out.
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut again = tls(running.agent_addr, Some(&creds)).await;
        if closed_within(&mut again, Duration::from_millis(500))
            .await
            .is_none()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead connection still holds the agent's place"
        );
    }
    running.shutdown().await.expect("shutdown");
}
