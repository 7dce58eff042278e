//! Attacks on the server's agent API from the network, against the real binary: an SVID
//! that expired on a connection that is still open, a stolen superseded SVID, forged
//! CSRs, several attestations on one connection, unbounded method strings, and floods of
//! anonymous connections. Each is refused; legitimate agents keep being served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_proto::agent::{
    AttestAgentRequest, RenewAgentRequest, SignX509SvidsRequest, SvidRequest, SyncEntriesRequest,
};
use lanyard_tests::tls::{
    AgentCreds, SpiffeIdVerifier, agent_api, attest, certs_from_pem, csr, fresh_key,
};
use lanyard_tests::{Server, join_token_agent_id, unix_now};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tonic::Code;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-agent-api")
        .tempdir()
        .expect("tempdir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn bundle(server: &Server) -> Vec<CertificateDer<'static>> {
    certs_from_pem(&server.bundle_pem())
}

/// A CSR without SAN, as the agent sends to renew.
fn agent_csr(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .expect("CSR")
        .der()
        .to_vec()
}

fn not_after(creds: &AgentCreds) -> i64 {
    lanyard_proto::svid::check_leaf(&creds.chain[0], None)
        .expect("agent SVID")
        .not_after
}

/// A P-384 key in a CSR signed with ecdsa-with-SHA256, made by openssl (a missing
/// openssl fails the test).
fn p384_sha256_csr(dir: &std::path::Path, uri: Option<&str>) -> Vec<u8> {
    let key = dir.join("p384.pem");
    let out = dir.join("p384.csr");
    lanyard_tests::ok(std::process::Command::new("openssl").args([
        "ecparam",
        "-name",
        "secp384r1",
        "-genkey",
        "-noout",
        "-out",
        key.to_str().expect("utf-8"),
    ]));
    let mut req = std::process::Command::new("openssl");
    req.args([
        "req",
        "-new",
        "-sha256",
        "-subj",
        "/CN=forged",
        "-outform",
        "DER",
    ])
    .arg("-key")
    .arg(&key)
    .arg("-out")
    .arg(&out);
    if let Some(uri) = uri {
        req.args(["-addext", &format!("subjectAltName=URI:{uri}")]);
    }
    lanyard_tests::ok(&mut req);
    std::fs::read(&out).expect("CSR")
}

#[test]
fn renewal_after_the_agent_svid_expired_is_refused_on_an_open_connection() {
    // The review's finding: a short agent_ttl, and a renewal on a connection opened while
    // the SVID was valid, after its notAfter. It must be refused, and the open entry
    // stream must end, both UNAUTHENTICATED.
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &["--agent-ttl", "10s"]);
    let bundle = bundle(&server);
    let token = server.token(None);
    runtime().block_on(async {
        let creds = attest(&server.address, &bundle, &token)
            .await
            .expect("attest");
        let expires = not_after(&creds);
        assert!(
            expires <= unix_now() + 11,
            "agent_ttl 10s gave notAfter {expires}"
        );
        let mut open = agent_api(&server.address, &bundle, Some(&creds)).await;
        let mut stream = open
            .sync_entries(SyncEntriesRequest {})
            .await
            .expect("sync while valid")
            .into_inner();
        stream
            .message()
            .await
            .expect("first message")
            .expect("a message");
        open.sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
            .await
            .expect("signing works while valid");
        while unix_now() <= expires {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let status = open
            .renew_agent(RenewAgentRequest {
                csr: agent_csr(&fresh_key()),
            })
            .await
            .expect_err("renewal after notAfter on the open connection");
        // UNAUTHENTICATED (not UNAVAILABLE) also shows the call went over the connection
        // that was already open: a new handshake with this SVID would fail.
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("expired at"), "{status:?}");
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the stream ends within seconds of the SVID's expiry")
            .expect_err("the stream ends with an error");
        assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    });
}

#[test]
fn a_stolen_superseded_svid_cannot_lock_out_the_current_one() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = bundle(&server);
    let token = server.token(None);
    runtime().block_on(async {
        let old = attest(&server.address, &bundle, &token)
            .await
            .expect("attest");
        let mut old_conn = agent_api(&server.address, &bundle, Some(&old)).await;
        let key = fresh_key();
        let chain = old_conn
            .renew_agent(RenewAgentRequest {
                csr: agent_csr(&key),
            })
            .await
            .expect("renew")
            .into_inner()
            .x509_svid_chain;
        let current = AgentCreds::new(chain, &key, bundle.clone());
        let mut current_conn = agent_api(&server.address, &bundle, Some(&current)).await;
        // The agent uses its new SVID once ...
        current_conn
            .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
            .await
            .expect("the current SVID works");
        // ... and from then on a copy of the old one is worthless, even on a connection
        // that was open all along.
        let status = old_conn
            .renew_agent(RenewAgentRequest {
                csr: agent_csr(&fresh_key()),
            })
            .await
            .expect_err("renewal with the superseded SVID");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("superseded"), "{status:?}");
        let status = old_conn
            .sync_entries(SyncEntriesRequest {})
            .await
            .map(|_| ())
            .expect_err("sync with the superseded SVID");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // The current SVID keeps working and renews.
        current_conn
            .renew_agent(RenewAgentRequest {
                csr: agent_csr(&fresh_key()),
            })
            .await
            .expect("the current SVID renews");
    });
}

#[test]
fn attestation_is_once_per_connection_and_methods_are_echoed_short() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = bundle(&server);
    let token = server.token(None);
    let attest_req = |method: &str, token: &str| AttestAgentRequest {
        method: method.into(),
        payload: token.as_bytes().to_vec(),
        csr: agent_csr(&fresh_key()),
    };
    runtime().block_on(async {
        let mut conn = agent_api(&server.address, &bundle, None).await;
        let status = conn
            .attest_agent(attest_req("join_token", "guess-1"))
            .await
            .expect_err("a wrong token");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // Guessing on: refused on this connection whatever the token.
        let status = conn
            .attest_agent(attest_req("join_token", &token))
            .await
            .expect_err("a second attestation on one connection");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("once per connection"),
            "{status:?}"
        );
        let reply = agent_api(&server.address, &bundle, None)
            .await
            .attest_agent(attest_req("join_token", &token))
            .await
            .expect("a new connection attests")
            .into_inner();
        assert_eq!(
            reply.spiffe_id,
            join_token_agent_id("example.org", &token),
            "named after the token's ID"
        );

        let method = format!("\u{1b}[2J\u{1b}]0;pwned\u{7}{}", "m".repeat(200_000));
        let status = agent_api(&server.address, &bundle, None)
            .await
            .attest_agent(attest_req(&method, "x"))
            .await
            .expect_err("unknown method");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let message = status.message();
        assert!(message.len() < 200, "{} bytes echoed", message.len());
        assert!(!message.chars().any(char::is_control), "{message:?}");
        assert!(message.contains("supported: join_token"), "{message}");
    });
    let log = server.log();
    assert!(
        !log.contains(&"m".repeat(100)),
        "the method reached the log unbounded"
    );
    // Three refusals from one address within a minute: audited once, the rest counted.
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("action=\"agent.attest\"") && l.contains("outcome=\"refused\""))
            .count(),
        1,
        "refusals are rate-limited per address:\n{log}"
    );
}

#[test]
fn forged_csrs_are_refused_by_their_key() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = bundle(&server);
    let token = server.token(None);
    let agent_id = join_token_agent_id("example.org", &token);
    let workload = "spiffe://example.org/wl/forged";
    let rt = runtime();
    let creds = rt
        .block_on(attest(&server.address, &bundle, &token))
        .expect("attest");
    let entry = server.create_entry(workload, &agent_id, &["unix:uid:4100"], &[]);
    let forged = p384_sha256_csr(dir.path(), Some(workload));
    let forged_agent = p384_sha256_csr(dir.path(), None);
    rt.block_on(async {
        let mut conn = agent_api(&server.address, &bundle, Some(&creds)).await;
        let results = conn
            .sign_x509_svids(SignX509SvidsRequest {
                requests: vec![
                    SvidRequest {
                        entry_id: entry.clone(),
                        csr: forged,
                    },
                    SvidRequest {
                        entry_id: entry.clone(),
                        csr: csr(&fresh_key(), workload),
                    },
                ],
            })
            .await
            .expect("sign")
            .into_inner()
            .results;
        assert!(results[0].x509_svid_chain.is_empty(), "{:?}", results[0]);
        assert!(
            results[0].error.contains("P-384") && results[0].error.contains("P-256"),
            "{:?}",
            results[0].error
        );
        assert!(results[1].error.is_empty(), "{:?}", results[1].error);
        let status = conn
            .renew_agent(RenewAgentRequest { csr: forged_agent })
            .await
            .expect_err("a forged agent CSR");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("P-384"), "{status:?}");
    });
}

/// A TLS connection (with `creds` as client certificate, if given) that completes the
/// handshake and then says nothing.
async fn idle_tls(
    address: &str,
    bundle: &[CertificateDer<'_>],
    creds: Option<&AgentCreds>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let verifier = SpiffeIdVerifier::new(bundle, lanyard_tests::tls::SERVER_ID);
    let builder = rustls::ClientConfig::builder_with_provider(lanyard_tests::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match creds {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key())
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("lanyard-server").expect("sni"), tcp)
        .await
        .expect("handshake")
}

/// Whether the server closes `conn` within `limit`.
async fn closed_within<R: tokio::io::AsyncRead + Unpin>(conn: &mut R, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[test]
fn a_flood_of_anonymous_connections_is_capped_and_agents_are_still_served() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = bundle(&server);
    let token = server.token(None);
    let agent_id = join_token_agent_id("example.org", &token);
    let rt = runtime();
    let creds = rt
        .block_on(attest(&server.address, &bundle, &token))
        .expect("attest");
    let entry = server.create_entry(
        "spiffe://example.org/wl/during-flood",
        &agent_id,
        &["unix:uid:4200"],
        &[],
    );
    rt.block_on(async {
        // The default cap is 16 anonymous connections per source address.
        let mut flood = Vec::new();
        for _ in 0..16 {
            flood.push(idle_tls(&server.address, &bundle, None).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut over = idle_tls(&server.address, &bundle, None).await;
        assert!(
            closed_within(&mut over, Duration::from_secs(3)).await,
            "the 17th anonymous connection from one address stays open"
        );
        for conn in flood.iter_mut().take(3) {
            assert!(
                !closed_within(conn, Duration::from_millis(200)).await,
                "connections within the cap are served"
            );
        }
        // An agent (a new connection, same address) is served throughout.
        let results = agent_api(&server.address, &bundle, Some(&creds))
            .await
            .sign_x509_svids(SignX509SvidsRequest {
                requests: vec![SvidRequest {
                    entry_id: entry.clone(),
                    csr: csr(&fresh_key(), "spiffe://example.org/wl/during-flood"),
                }],
            })
            .await
            .expect("an agent is served during the flood")
            .into_inner()
            .results;
        assert!(results[0].error.is_empty(), "{:?}", results[0]);
    });
    assert!(
        server.log().contains("agent API connection refused"),
        "the refusal is logged:\n{}",
        server.log()
    );
}

#[test]
fn connections_per_agent_are_capped() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = bundle(&server);
    let token = server.token(None);
    runtime().block_on(async {
        let creds = attest(&server.address, &bundle, &token)
            .await
            .expect("attest");
        // The default cap is 8 connections per agent SVID.
        let mut open = Vec::new();
        for _ in 0..8 {
            open.push(idle_tls(&server.address, &bundle, Some(&creds)).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ninth = idle_tls(&server.address, &bundle, Some(&creds)).await;
        assert!(
            closed_within(&mut ninth, Duration::from_secs(3)).await,
            "a ninth connection of one agent stays open"
        );
        assert!(!closed_within(&mut open[0], Duration::from_millis(200)).await);
        // Another agent is not affected.
        let other = attest(&server.address, &bundle, &server.token(None))
            .await
            .expect("attest");
        agent_api(&server.address, &bundle, Some(&other))
            .await
            .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
            .await
            .expect("another agent is served");
    });
}
