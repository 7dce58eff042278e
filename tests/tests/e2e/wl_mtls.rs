//! Two workloads complete TLS 1.3 mTLS with their SVIDs, through `spiffe-rustls` and
//! through plain rustls with a hand-written SPIFFE check, and refuse wrong peers.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::sync::Arc;
use std::time::Duration;

use lanyard_proto::svid::split_der_chain;
use lanyard_proto::workload::X509svidResponse;
use lanyard_tests::tls::{SpiffeIdVerifier, provider};
use lanyard_tests::workload::*;
use lanyard_tests::{TrustDomain, my_uid};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";

async fn two_workloads() -> TrustDomain {
    let td = TrustDomain::start();
    td.register_uid(WEB, my_uid(), &["--hint", "web"]);
    td.register_uid(DB, my_uid(), &["--hint", "db"]);
    wait_for_ids(&td, &[WEB, DB]).await;
    td
}

/// One round trip over TLS: the client writes a line, the server answers one. Returns
/// (what the server saw as its peer, what the client saw as its peer).
async fn exchange(acceptor: TlsAcceptor, connector: TlsConnector) -> (String, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let peer = peer_id(conn);
        let mut buf = vec![0u8; 64];
        let n = tls.read(&mut buf).await.expect("server read");
        assert_eq!(&buf[..n], b"hello from the client\n");
        tls.write_all(b"hello from the server\n")
            .await
            .expect("server write");
        tls.shutdown().await.expect("server close");
        peer
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("client handshake");
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let client_saw = peer_id(conn);
    tls.write_all(b"hello from the client\n")
        .await
        .expect("client write");
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.expect("client read");
    assert_eq!(got, b"hello from the server\n");
    let server_saw = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server task")
        .expect("server ok");
    (server_saw, client_saw)
}

/// A handshake that must fail; returns (client error, server error) as text.
async fn refused(
    acceptor: TlsAcceptor,
    connector: TlsConnector,
) -> (Option<String>, Option<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        match acceptor.accept(tcp).await {
            Err(e) => Some(e.to_string()),
            Ok(mut tls) => {
                // TLS 1.3: the client's certificate may be judged only now.
                let mut buf = [0u8; 16];
                match tls.read(&mut buf).await {
                    Err(e) => Some(e.to_string()),
                    Ok(_) => None,
                }
            }
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let client_err = match connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
    {
        Err(e) => Some(e.to_string()),
        Ok(mut tls) => {
            let _ = tls.write_all(b"should not be accepted\n").await;
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf).await {
                Err(e) => Some(e.to_string()),
                Ok(_) if buf.is_empty() => None,
                Ok(_) => panic!("the server answered a peer it should have refused"),
            }
        }
    };
    let server_err = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server task")
        .expect("server ok");
    (client_err, server_err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_between_two_workloads_with_spiffe_rustls() {
    let td = two_workloads().await;
    let endpoint = td.agent.endpoint();
    let web = x509_source(&endpoint, Some("web")).await;
    let db = x509_source(&endpoint, Some("db")).await;
    assert_eq!(web.svid().expect("web svid").spiffe_id().to_string(), WEB);
    assert_eq!(db.svid().expect("db svid").spiffe_id().to_string(), DB);
    let local = || spiffe_rustls::LocalOnly("example.org".try_into().expect("td"));

    let server_cfg = |allowed: &str| {
        spiffe_rustls::mtls_server(db.clone())
            .authorize(spiffe_rustls::exact([allowed]).expect("authorizer"))
            .trust_domain_policy(local())
            .build()
            .expect("server config")
    };
    let client_cfg = |source: &spiffe::X509Source, allowed: &str| {
        spiffe_rustls::mtls_client(source.clone())
            .authorize(spiffe_rustls::exact([allowed]).expect("authorizer"))
            .trust_domain_policy(local())
            .build()
            .expect("client config")
    };

    // web (client) -> db (server), each authorizing exactly the other.
    let (server_saw, client_saw) = exchange(
        TlsAcceptor::from(Arc::new(server_cfg(WEB))),
        TlsConnector::from(Arc::new(client_cfg(&web, DB))),
    )
    .await;
    assert_eq!(server_saw, WEB, "db's peer");
    assert_eq!(client_saw, DB, "web's peer");

    // A client expecting another service refuses db.
    let (client_err, _) = refused(
        TlsAcceptor::from(Arc::new(server_cfg(WEB))),
        TlsConnector::from(Arc::new(client_cfg(&web, "spiffe://example.org/not-db"))),
    )
    .await;
    let client_err = client_err.expect("the client accepted a server with the wrong SPIFFE ID");
    assert!(
        client_err.contains("not authorized") && client_err.contains(DB),
        "the client refused db for another reason: {client_err}"
    );

    // A server that only admits web refuses db as a client.
    let (_, server_err) = refused(
        TlsAcceptor::from(Arc::new(server_cfg(WEB))),
        TlsConnector::from(Arc::new(client_cfg(&db, DB))),
    )
    .await;
    let server_err = server_err.expect("the server admitted a client it does not authorize");
    assert!(
        server_err.contains("not authorized") && server_err.contains(DB),
        "the server refused db for another reason: {server_err}"
    );

    web.shutdown().await;
    db.shutdown().await;
}

/// (chain, key, bundle) of the SVID with `hint`, straight from the Workload API message.
fn material(
    msg: &X509svidResponse,
    hint: &str,
) -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    Vec<CertificateDer<'static>>,
) {
    let svid = msg
        .svids
        .iter()
        .find(|s| s.hint == hint)
        .unwrap_or_else(|| panic!("no SVID with hint {hint}"));
    verify_wire_svid(svid);
    let certs = |der: &[u8]| -> Vec<CertificateDer<'static>> {
        split_der_chain(der)
            .expect("der")
            .into_iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect()
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));
    (certs(&svid.x509_svid), key, certs(&svid.bundle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_between_two_workloads_with_plain_rustls() {
    let td = two_workloads().await;
    let msg = wait_for_ids(&td, &[WEB, DB]).await;
    let (web_chain, web_key, bundle) = material(&msg, "web");
    let (db_chain, db_key, db_bundle) = material(&msg, "db");
    assert_eq!(
        bundle, db_bundle,
        "both SVIDs carry the same trust domain bundle"
    );
    let provider = provider();

    let mut roots = RootCertStore::empty();
    for ca in &bundle {
        roots.add(ca.clone()).expect("bundle CA");
    }
    let server_cfg = |require_client: bool| {
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13");
        let builder = if require_client {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots.clone()),
                provider.clone(),
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(
            builder
                .with_single_cert(db_chain.clone(), db_key.clone_key())
                .expect("db's SVID as server certificate"),
        )
    };
    let client_cfg = |expected: &str, present_svid: bool| {
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeIdVerifier::new(&bundle, expected)));
        let cfg = if present_svid {
            builder
                .with_client_auth_cert(web_chain.clone(), web_key.clone_key())
                .expect("web's SVID as client certificate")
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(cfg)
    };

    let (server_saw, client_saw) = exchange(
        TlsAcceptor::from(server_cfg(true)),
        TlsConnector::from(client_cfg(DB, true)),
    )
    .await;
    assert_eq!(server_saw, WEB);
    assert_eq!(client_saw, DB);

    // The client refuses a server whose SPIFFE ID is not the one it expects.
    let (client_err, _) = refused(
        TlsAcceptor::from(server_cfg(true)),
        TlsConnector::from(client_cfg("spiffe://example.org/not-db", true)),
    )
    .await;
    let client_err = client_err.expect("the client accepted a server with the wrong SPIFFE ID");
    assert!(
        client_err.contains("ApplicationVerificationFailure"),
        "{client_err}"
    );

    // The server requires a client SVID.
    let (_, server_err) = refused(
        TlsAcceptor::from(server_cfg(true)),
        TlsConnector::from(client_cfg(DB, false)),
    )
    .await;
    assert!(
        server_err.is_some(),
        "the server admitted a client without a certificate"
    );
}
