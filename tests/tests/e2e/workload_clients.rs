//! The agent's Workload API seen through clients nobody here wrote, and through the
//! generated gRPC client for the details those libraries hide (spec/spiffe.md §2, §5, §6):
//!
//! - the `spiffe` crate (WorkloadApiClient, X509Source) fetches and validates SVIDs;
//! - `openssl` verifies what `lanyard-agent api fetch x509 --write` writes;
//! - two workloads complete TLS 1.3 mTLS with their SVIDs, through `spiffe-rustls` and
//!   through plain rustls with a hand-written SPIFFE check, and refuse wrong peers;
//! - SVID rotation and entry changes reach open streams; deleting the last entry ends a
//!   stream with PERMISSION_DENIED, agent shutdown with UNAVAILABLE (never OK);
//! - the security header, unregistered callers and unsupported RPCs get the spec'd errors.
//!
//! Every test starts its own server and agent so the tests run in parallel. They need
//! the binaries built (`cargo build --workspace --bins`), `openssl` and `curl` on PATH,
//! and root (to run a client as uid 65534): a missing tool or privilege fails, never skips.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_proto::svid::{LeafInfo, check_ca, check_leaf, spiffe_id_of, split_der_chain};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{
    WitBundlesRequest, WitsvidRequest, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use lanyard_tests::tls::{SpiffeIdVerifier, anchors, provider, verify_path};
use lanyard_tests::{TrustDomain, bin, my_uid, ok, run, unix_now};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use spiffe::x509_source::SvidPicker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const TD: &str = "spiffe://example.org";
const HEADER: &str = "workload.spiffe.io";
const NO_IDENTITY: &str = "no identity issued";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

type WlClient = SpiffeWorkloadApiClient<Channel>;

async fn wl_client(td: &TrustDomain) -> WlClient {
    let channel = lanyard_daemon::uds::channel(&td.agent.socket)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", td.agent.socket.display()));
    SpiffeWorkloadApiClient::new(channel)
}

/// A request carrying `workload.spiffe.io: true`, as every client library sends it.
fn with_header<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(HEADER, MetadataValue::from_static("true"));
    req
}

/// A request with the given `workload.spiffe.io` values (none, wrong ones, or several).
fn with_values<T>(msg: T, values: &[&'static str]) -> Request<T> {
    let mut req = Request::new(msg);
    for v in values {
        req.metadata_mut()
            .append(HEADER, MetadataValue::from_static(v));
    }
    req
}

fn ids_of(msg: &X509svidResponse) -> Vec<&str> {
    msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect()
}

/// Waits until this process is served exactly `ids` (in that order) and returns that
/// message. Entries reach the agent within milliseconds but are signed a little later,
/// so an early call may see PERMISSION_DENIED or fewer SVIDs.
async fn wait_for_ids(td: &TrustDomain, ids: &[&str]) -> X509svidResponse {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut client = wl_client(td).await;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.fetch_x509svid(with_header(X509svidRequest {})).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, stream.message()).await {
                        Ok(Ok(Some(msg))) if ids_of(&msg) == ids => return msg,
                        Ok(Ok(Some(msg))) => last = format!("message with {:?}", ids_of(&msg)),
                        Ok(Ok(None)) => {
                            last = "stream ended with OK".into();
                            break;
                        }
                        Ok(Err(status)) => {
                            last = format!("stream status {status:?}");
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(status) => last = format!("call status {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the Workload API never served {ids:?}; last: {last}\nagent log:\n{}",
        td.agent.log()
    );
}

/// Asserts that a call was refused with `code`.
fn assert_code<T>(result: Result<T, Status>, code: Code, what: &str) {
    match result {
        Ok(_) => panic!("{what}: answered although it must be refused with {code:?}"),
        Err(s) => assert_eq!(s.code(), code, "{what}: {s:?}"),
    }
}

/// A trust domain whose agent already serves this process `id` (an entry for our uid
/// with `extra` flags), and the message that serves it.
async fn serving(id: &str, extra: &[&str]) -> (TrustDomain, X509svidResponse) {
    let td = TrustDomain::start();
    td.register_uid(id, my_uid(), extra);
    let msg = wait_for_ids(&td, &[id]).await;
    (td, msg)
}

/// The next stream message or status, failing after `within`.
async fn next_message<T>(stream: &mut Streaming<T>, within: Duration) -> Result<Option<T>, Status> {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("no stream message or status within {within:?}"))
}

/// The stream a streaming call opened, with its first message, which must come within
/// 5 s.
async fn opened<T>(
    call: impl Future<Output = Result<tonic::Response<Streaming<T>>, Status>>,
    what: &str,
) -> (Streaming<T>, T) {
    let mut stream = call
        .await
        .unwrap_or_else(|s| panic!("{what}: {s:?}"))
        .into_inner();
    let first = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap_or_else(|s| panic!("{what}, first message: {s:?}"))
        .unwrap_or_else(|| panic!("{what} ended with OK before its first message"));
    (stream, first)
}

/// A FetchX509SVID stream (with the header) and its first message.
async fn svid_stream(client: &mut WlClient) -> (Streaming<X509svidResponse>, X509svidResponse) {
    opened(
        client.fetch_x509svid(with_header(X509svidRequest {})),
        "FetchX509SVID",
    )
    .await
}

/// A FetchX509Bundles stream (with the header) and its first message.
async fn bundle_stream(
    client: &mut WlClient,
) -> (Streaming<X509BundlesResponse>, X509BundlesResponse) {
    opened(
        client.fetch_x509_bundles(with_header(X509BundlesRequest {})),
        "FetchX509Bundles",
    )
    .await
}

/// Checks the CAs of a bundle (spec §2) and returns the earliest notAfter.
fn check_bundle(bundle_der: &[&[u8]]) -> i64 {
    assert!(!bundle_der.is_empty(), "empty bundle");
    bundle_der
        .iter()
        .map(|ca| check_ca(ca).unwrap_or_else(|e| panic!("bundle CA breaks the profile: {e}")))
        .min()
        .expect("one CA")
}

/// The DER certificates in a PEM text.
fn der_of(pem_text: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .map(|c| c.expect("PEM certificate").to_vec())
        .collect()
}

/// Everything a relying party checks on an X509-SVID, with tools that are not the
/// agent's: the §2 profile of leaf and CAs, an RFC 5280 path from the leaf to the bundle
/// (webpki, for both serverAuth and clientAuth), the ID, and a signature made with the
/// private key that verifies with the leaf's public key. Returns the leaf's profile.
fn verify_svid(chain: &[&[u8]], bundle: &[&[u8]], pkcs8_key: &[u8], want_id: &str) -> LeafInfo {
    let ca_not_after = check_bundle(bundle);
    let leaf = *chain.first().expect("non-empty chain");
    let info = check_leaf(leaf, Some(ca_not_after))
        .unwrap_or_else(|e| panic!("leaf breaks the X509-SVID profile: {e}"));
    assert_eq!(info.spiffe_id.as_str(), want_id, "URI SAN");
    assert!(
        info.not_before <= unix_now() && unix_now() < info.not_after,
        "SVID not valid now: {info:?}"
    );
    for ca in &chain[1..] {
        check_ca(ca).unwrap_or_else(|e| panic!("intermediate breaks the profile: {e}"));
    }

    let (roots, intermediates) = (anchors(&ders(bundle)), ders(&chain[1..]));
    let leaf_der = CertificateDer::from(leaf);
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        verify_path(&roots, &leaf_der, &intermediates, UnixTime::now(), usage).unwrap_or_else(
            |e| panic!("chain does not verify against the bundle ({usage:?}): {e:?}"),
        );
    }

    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8_key,
        &rng,
    )
    .expect("the private key is an unencrypted PKCS#8 P-256 key");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("leaf parses");
    assert_eq!(
        ring::signature::KeyPair::public_key(&key).as_ref(),
        cert.public_key().subject_public_key.data.as_ref(),
        "private key does not match the leaf's public key"
    );
    let ee = webpki::EndEntityCert::try_from(&leaf_der).expect("webpki parses the leaf");
    let msg = b"proof of possession";
    let sig = key.sign(&rng, msg).expect("sign");
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, sig.as_ref())
        .expect("a signature by the private key verifies with the leaf");
    info
}

/// Certificates as rustls takes them.
fn ders<'a>(certs: &[&'a [u8]]) -> Vec<CertificateDer<'a>> {
    certs.iter().map(|c| CertificateDer::from(*c)).collect()
}

/// `verify_svid` on one Workload API X509SVID message entry.
fn verify_wire_svid(svid: &X509svid) -> LeafInfo {
    let chain = split_der_chain(&svid.x509_svid).expect("x509_svid is concatenated DER");
    let bundle = split_der_chain(&svid.bundle).expect("bundle is concatenated DER");
    verify_svid(&chain, &bundle, &svid.x509_svid_key, &svid.spiffe_id)
}

fn serial_of(svid: &X509svid) -> String {
    let chain = split_der_chain(&svid.x509_svid).expect("chain");
    check_leaf(chain[0], None).expect("leaf").serial_hex
}

fn require_root(why: &str) {
    assert_eq!(
        my_uid(),
        0,
        "this test must run as root ({why}); it never skips. Run the suite as root, as CI does."
    );
}

/// Runs an external tool that must exist; a missing tool fails the test loudly.
fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed (not on PATH); this test needs it and never skips"
    );
    Command::new(name)
}

/// Picks the SVID with a given hint, as a workload that shares a uid with others does.
#[derive(Debug)]
struct HintPicker(&'static str);

impl SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

async fn x509_source(endpoint: &str, hint: Option<&'static str>) -> spiffe::X509Source {
    let mut builder = spiffe::X509Source::builder()
        .endpoint(endpoint)
        .initial_sync_timeout(Duration::from_secs(10));
    if let Some(hint) = hint {
        builder = builder.picker(HintPicker(hint));
    }
    builder
        .build()
        .await
        .unwrap_or_else(|e| panic!("X509Source for {endpoint} (hint {hint:?}): {e}"))
}

fn peer_id(conn: &rustls::CommonState) -> String {
    let certs = conn
        .peer_certificates()
        .expect("the peer presented a certificate");
    spiffe_id_of(&certs[0])
        .expect("peer certificate has one SPIFFE ID")
        .to_string()
}

// ---------------------------------------------------------------------------------
// 1. The `spiffe` crate
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_and_validates_the_x509_svid() {
    let id = "spiffe://example.org/clients/spiffe-crate";
    let (td, _) = serving(id, &["--hint", "crate"]).await;

    let endpoint = td.agent.endpoint();
    assert!(
        endpoint.starts_with("unix:///"),
        "SPIFFE_ENDPOINT_SOCKET form: {endpoint}"
    );
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap_or_else(|e| panic!("spiffe crate cannot connect to {endpoint}: {e}"));
    // The crate parses and validates the response itself (leaf and CA profile, IDs,
    // bundle map keys); any violation is an Err here.
    let ctx = client
        .fetch_x509_context()
        .await
        .expect("spiffe crate accepts FetchX509SVID");
    assert_eq!(ctx.svids().len(), 1);
    let svid = ctx.default_svid().expect("default SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
    assert_eq!(svid.hint(), Some("crate"));
    let td_name = spiffe::TrustDomain::new("example.org").expect("td");
    let bundle = ctx
        .bundle_set()
        .get(&td_name)
        .expect("the context has the example.org bundle");
    let roots: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    verify_svid(&chain, &roots, svid.private_key().as_bytes(), id);

    // The one-shot calls agree with the context.
    let single = client.fetch_x509_svid().await.expect("fetch_x509_svid");
    assert_eq!(single.leaf(), svid.leaf());
    let bundles = client
        .fetch_x509_bundles()
        .await
        .expect("spiffe crate accepts FetchX509Bundles");
    assert_eq!(bundles.len(), 1, "only the own trust domain");
    let own = bundles
        .get(&td_name)
        .expect("FetchX509Bundles has example.org");
    assert_eq!(own.authorities(), bundle.authorities());

    // X509Source: the crate's long-lived watcher.
    let source = x509_source(&endpoint, None).await;
    let from_source = source.svid().expect("X509Source has an SVID");
    assert_eq!(from_source.spiffe_id().to_string(), id);
    assert_eq!(
        from_source.leaf(),
        svid.leaf(),
        "X509Source serves the same SVID"
    );
    let source_bundle = source
        .bundle_set()
        .expect("bundle set")
        .get(&td_name)
        .expect("example.org in X509Source");
    assert_eq!(source_bundle.authorities(), bundle.authorities());
    source.shutdown().await;
}

// ---------------------------------------------------------------------------------
// 2. openssl on the files the CLI writes
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_accepts_the_files_written_by_fetch_x509() {
    let id = "spiffe://example.org/clients/openssl";
    let (td, _) = serving(id, &["--hint", "ossl"]).await;

    let out_dir = td.dir.path().join("written");
    let socket = td.agent.socket.display().to_string();
    let json = ok(Command::new(bin("lanyard-agent"))
        .args([
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &socket,
            "--output",
            "json",
            "--write",
        ])
        .arg(&out_dir));
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("json output {json:?}: {e}"));
    assert_eq!(v["svids"][0]["spiffe_id"], id, "{json}");
    assert_eq!(v["svids"][0]["hint"], "ossl", "{json}");

    let svid = out_dir.join("svid.0.pem");
    let key = out_dir.join("svid.0.key");
    let bundle = out_dir.join("bundle.0.pem");
    for f in [&svid, &key, &bundle] {
        assert!(f.is_file(), "{} was not written", f.display());
    }
    let mode = std::fs::metadata(&key)
        .expect("key metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "svid.0.key has mode {mode:o}");

    let openssl = |args: &[&str]| {
        let mut cmd = tool("openssl");
        cmd.args(args);
        ok(&mut cmd)
    };
    let (svid_s, key_s, bundle_s) = (
        svid.to_str().expect("utf8"),
        key.to_str().expect("utf8"),
        bundle.to_str().expect("utf8"),
    );

    let verified = openssl(&["verify", "-CAfile", bundle_s, svid_s]);
    assert!(
        verified.trim_end().ends_with(": OK"),
        "openssl verify: {verified}"
    );
    for purpose in ["sslclient", "sslserver"] {
        let verified = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            bundle_s,
            svid_s,
        ]);
        assert!(
            verified.trim_end().ends_with(": OK"),
            "openssl verify -purpose {purpose}: {verified}"
        );
    }

    let text = openssl(&["x509", "-in", svid_s, "-noout", "-text"]);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let after = |header: &str| -> &str {
        let i = lines
            .iter()
            .position(|l| l.starts_with(header))
            .unwrap_or_else(|| panic!("no {header} in openssl x509 -text:\n{text}"));
        lines.get(i + 1).copied().unwrap_or("")
    };
    let san = after("X509v3 Subject Alternative Name");
    let uris: Vec<&str> = san
        .split(", ")
        .filter_map(|n| n.strip_prefix("URI:"))
        .collect();
    assert_eq!(uris, [id], "URI SANs: {san}");
    assert_eq!(after("X509v3 Basic Constraints"), "CA:FALSE");
    let ku_header = lines
        .iter()
        .find(|l| l.starts_with("X509v3 Key Usage"))
        .expect("key usage");
    assert!(
        ku_header.contains("critical"),
        "keyUsage must be critical: {ku_header}"
    );
    let ku = after("X509v3 Key Usage");
    assert!(ku.contains("Digital Signature"), "key usage: {ku}");
    assert!(
        !ku.contains("Certificate Sign") && !ku.contains("CRL Sign"),
        "leaf can sign: {ku}"
    );
    assert_eq!(
        after("X509v3 Extended Key Usage"),
        "TLS Web Server Authentication, TLS Web Client Authentication"
    );

    let key_pub = openssl(&["pkey", "-in", key_s, "-pubout"]);
    let cert_pub = openssl(&["x509", "-in", svid_s, "-noout", "-pubkey"]);
    assert!(
        key_pub.contains("BEGIN PUBLIC KEY"),
        "openssl pkey: {key_pub}"
    );
    assert_eq!(
        key_pub, cert_pub,
        "svid.0.key does not belong to svid.0.pem"
    );

    // The written bundle is the trust domain's bundle.
    let written = der_of(&std::fs::read_to_string(&bundle).expect("bundle"));
    assert_eq!(
        written,
        der_of(&td.server.bundle_pem()),
        "bundle.0.pem differs from `bundle show`"
    );
}

// ---------------------------------------------------------------------------------
// 3. mTLS between two workloads
// ---------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------
// 4. Rotation
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_svid_rotates_on_the_open_stream_and_in_x509_source() {
    let id = "spiffe://example.org/clients/rotating";
    // The entry was just created, so this SVID was issued moments ago.
    let (td, ready) = serving(id, &["--x509-svid-ttl", "10", "--hint", "rot"]).await;

    let mut client = wl_client(&td).await;
    let asked = Instant::now();
    let (mut stream, first) = svid_stream(&mut client).await;
    let got_first = Instant::now();
    let latency = got_first - asked;
    assert!(
        latency < Duration::from_secs(1),
        "first message took {latency:?} (spec §6.13: < 1 s once cached)"
    );
    assert_eq!(ids_of(&first), [id]);
    let first_info = verify_wire_svid(&first.svids[0]);
    assert!(
        first_info.not_after - first_info.not_before <= 10 + 10 + 1,
        "TTL 10 s (plus at most the 10 s backdate) but valid {}..{}",
        first_info.not_before,
        first_info.not_after
    );
    // Timing problems are collected and reported last, so that a premature rotation
    // does not hide whether the rest works.
    let mut problems = Vec::new();
    if first.svids[0].x509_svid != ready.svids[0].x509_svid {
        problems.push(format!(
            "the SVID issued moments ago was already replaced when the stream opened ({:?} later)",
            latency
        ));
    }

    let source = x509_source(&td.agent.endpoint(), None).await;
    let source_first = source.svid().expect("X509Source svid");
    assert_eq!(source_first.spiffe_id().to_string(), id);

    // The same stream must carry a new serial while the old SVID is still valid.
    let deadline = Instant::now() + Duration::from_secs(12);
    let rotated = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no rotation on the stream within 12 s of the first message"
        );
        let msg = next_message(&mut stream, left)
            .await
            .expect("stream broke")
            .expect("stream ended with OK");
        assert_eq!(ids_of(&msg), [id]);
        if msg.svids[0].x509_svid != first.svids[0].x509_svid {
            break msg;
        }
    };
    let rotated_after = got_first.elapsed();
    let now = unix_now();
    let new_info = verify_wire_svid(&rotated.svids[0]);
    assert_ne!(
        new_info.serial_hex, first_info.serial_hex,
        "new certificate, same serial"
    );
    assert!(
        now < first_info.not_after,
        "rotated at {now}, after the old SVID expired at {}",
        first_info.not_after
    );
    assert!(
        new_info.not_after >= first_info.not_after,
        "the new SVID expires before the old one"
    );

    // X509Source (its own stream) follows the rotation.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let current = source.svid().expect("X509Source svid");
        if current.leaf() != source_first.leaf() {
            let before = check_leaf(source_first.leaf().as_bytes(), None).expect("profile");
            let after = check_leaf(current.leaf().as_bytes(), None).expect("profile");
            assert_ne!(after.serial_hex, before.serial_hex);
            assert_eq!(current.spiffe_id().to_string(), id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "X509Source still serves its first SVID 5 s after the stream rotated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source.shutdown().await;

    // A 10 s SVID is renewed at about half its lifetime (4-5 s after issue), so it
    // must not be replaced within 2 s of being served, and a fresh one must not be
    // replaced again within the next second either.
    if rotated_after < Duration::from_secs(2) {
        problems.push(format!(
            "a 10 s SVID was rotated {rotated_after:?} after it was first served (expected about 4-5 s after issue)"
        ));
    }
    let mut more = 0;
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Ok(msg) = tokio::time::timeout_at(quiet_until.into(), stream.message()).await {
        msg.expect("stream broke").expect("stream ended with OK");
        more += 1;
    }
    if more > 0 {
        problems.push(format!(
            "{more} more rotations of the 10 s SVID arrived within the next second"
        ));
    }
    assert!(
        problems.is_empty(),
        "rotation comes too early:\n- {}\n(notBefore {}, notAfter {} of the first SVID)",
        problems.join("\n- "),
        first_info.not_before,
        first_info.not_after
    );
}

// ---------------------------------------------------------------------------------
// 5. Stream updates on entry changes
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_update_the_open_stream() {
    let td = TrustDomain::start();
    let first_id = "spiffe://example.org/clients/first";
    let second_id = "spiffe://example.org/clients/second";
    let first_entry = td.register_uid(first_id, my_uid(), &["--hint", "first"]);
    wait_for_ids(&td, &[first_id]).await;

    let mut client = wl_client(&td).await;
    let (mut stream, first) = svid_stream(&mut client).await;
    assert_eq!(ids_of(&first), [first_id]);
    let first_serial = serial_of(&first.svids[0]);

    let second_entry = td.register_uid(second_id, my_uid(), &["--hint", "second"]);
    let both = loop {
        let msg = next_message(&mut stream, Duration::from_secs(10))
            .await
            .expect("stream broke")
            .expect("stream ended with OK");
        // Every message is the complete state and keeps the default identity first.
        assert_eq!(
            msg.svids[0].spiffe_id,
            first_id,
            "svids[0] changed: {:?}",
            ids_of(&msg)
        );
        if msg.svids.len() == 2 {
            break msg;
        }
    };
    assert_eq!(ids_of(&both), [first_id, second_id]);
    assert_eq!(
        serial_of(&both.svids[0]),
        first_serial,
        "svids[0] was re-issued by adding another entry"
    );
    assert_eq!(both.svids[0].x509_svid, first.svids[0].x509_svid);
    assert_eq!(
        [both.svids[0].hint.as_str(), both.svids[1].hint.as_str()],
        ["first", "second"]
    );
    for svid in &both.svids {
        verify_wire_svid(svid);
    }

    // Deleting every entry of the caller ends the stream with PERMISSION_DENIED.
    for entry in [&first_entry, &second_entry] {
        ok(&mut td.server.cli(&["entry", "delete", "--id", entry.as_str()]));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_message(&mut stream, left).await {
            Ok(Some(msg)) => assert!(
                !msg.svids.is_empty(),
                "a message with no SVIDs instead of PERMISSION_DENIED"
            ),
            Ok(None) => panic!(
                "the stream ended with OK after the entries were deleted (spec §5.4: never OK)"
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), NO_IDENTITY);
}

// ---------------------------------------------------------------------------------
// 6. Errors
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_exact_security_header_are_invalid_argument() {
    let id = "spiffe://example.org/clients/header";
    let (td, _) = serving(id, &[]).await;
    let mut client = wl_client(&td).await;

    let variants: [(&str, Vec<&'static str>); 5] = [
        ("missing", vec![]),
        ("True", vec!["True"]),
        ("false", vec!["false"]),
        ("TRUE", vec!["TRUE"]),
        ("twice", vec!["true", "true"]),
    ];
    for (what, values) in &variants {
        let svids = client.fetch_x509svid(with_values(X509svidRequest {}, values));
        let svids = svids.await.map(drop);
        let bundles = client.fetch_x509_bundles(with_values(X509BundlesRequest {}, values));
        let bundles = bundles.await.map(drop);
        for (rpc, result) in [("FetchX509SVID", svids), ("FetchX509Bundles", bundles)] {
            assert_code(
                result,
                Code::InvalidArgument,
                &format!("{rpc}, header {what}"),
            );
        }
    }
    // The same caller with the right header is served (so the refusals were the header's).
    let (_, msg) = svid_stream(&mut client).await;
    assert_eq!(ids_of(&msg), [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_uid_gets_permission_denied_no_identity_issued() {
    require_root("it runs Workload API clients as uid 65534");
    // Registered: us. Not registered: nobody (65534).
    let (td, _) = serving("spiffe://example.org/clients/root-only", &[]).await;
    let socket = td.agent.socket.display().to_string();

    let out = run(Command::new(bin("lanyard-agent"))
        .args(["api", "fetch", "x509", "--socket-path", &socket])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .current_dir("/")
        .uid(65534)
        .gid(65534));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "uid 65534 got an SVID: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(NO_IDENTITY),
        "stderr of fetch x509 as uid 65534: {stderr}"
    );

    // FetchX509Bundles as uid 65534, by hand over HTTP/2 (curl): an empty gRPC message
    // is a 5-byte frame of zeroes. The answer is trailers-only: grpc-status 7.
    let body = td.dir.path().join("empty-grpc-message");
    std::fs::write(&body, [0u8; 5]).expect("body");
    std::fs::set_permissions(&body, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let curl = |method: &str| {
        let mut cmd = tool("curl");
        cmd.args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "--unix-socket",
            &socket,
        ])
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            "workload.spiffe.io: true",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .args(["-D", "-", "-o", "/dev/null"])
        .arg(format!("http://localhost/SpiffeWorkloadAPI/{method}"))
        .current_dir("/")
        .uid(65534)
        .gid(65534);
        ok(&mut cmd).to_ascii_lowercase()
    };
    for method in ["FetchX509Bundles", "FetchX509SVID"] {
        let headers = curl(method);
        assert!(
            headers.contains("grpc-status: 7"),
            "{method} as uid 65534, response headers:\n{headers}"
        );
        assert!(
            headers.contains("grpc-message: no%20identity%20issued"),
            "{method} as uid 65534:\n{headers}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_rpcs_are_unimplemented() {
    let (td, _) = serving("spiffe://example.org/clients/wit", &[]).await;
    let mut client = wl_client(&td).await;

    let wit_svid = client
        .fetch_witsvid(with_header(WitsvidRequest {
            spiffe_id: String::new(),
        }))
        .await;
    assert_code(wit_svid, Code::Unimplemented, "FetchWITSVID");
    let wit_bundles = client
        .fetch_wit_bundles(with_header(WitBundlesRequest {}))
        .await;
    assert_code(wit_bundles, Code::Unimplemented, "FetchWITBundles");

    // A method the service does not have (spec §6.18).
    let channel = lanyard_daemon::uds::channel(&td.agent.socket)
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let unknown = grpc
        .unary(
            with_header(()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/NoSuchMethod"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_code(unknown, Code::Unimplemented, "unknown method");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_x509_bundles_serves_the_own_trust_domain() {
    let (td, svids) = serving("spiffe://example.org/clients/bundles", &[]).await;
    let mut client = wl_client(&td).await;

    let (_, msg) = bundle_stream(&mut client).await;
    let keys: Vec<&String> = msg.bundles.keys().collect();
    assert_eq!(keys, [TD], "bundle map keys");
    let der = &msg.bundles[TD];
    let cas = split_der_chain(der).expect("concatenated DER");
    check_bundle(&cas);
    let expected: Vec<Vec<u8>> = der_of(&td.server.bundle_pem());
    assert_eq!(
        cas.iter().map(|c| c.to_vec()).collect::<Vec<_>>(),
        expected,
        "differs from `bundle show`"
    );
    assert_eq!(der, &svids.svids[0].bundle, "differs from X509SVID.bundle");
    assert!(
        !svids.federated_bundles.contains_key(TD),
        "own trust domain in federated_bundles"
    );
}

// ---------------------------------------------------------------------------------
// 7. Shutdown
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_ends_open_streams_with_unavailable() {
    let id = "spiffe://example.org/clients/shutdown";
    let (mut td, _) = serving(id, &[]).await;

    let mut client = wl_client(&td).await;
    let (mut svids, first) = svid_stream(&mut client).await;
    assert_eq!(ids_of(&first), [id]);
    let (mut bundles, _) = bundle_stream(&mut client).await;

    let socket = td.agent.socket.clone();
    // SIGTERM, and wait for the exit, off the async workers so the streams keep flowing.
    let (stopped, td) = tokio::task::spawn_blocking(move || {
        let status = td.agent.stop();
        (status, td)
    })
    .await
    .expect("stop task");
    let status = stopped.expect("the agent had been running");
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM; log:\n{}",
        td.agent.log()
    );
    assert!(
        !Path::new(&socket).exists(),
        "the agent left its socket {} behind",
        socket.display()
    );

    for (name, outcome) in [
        (
            "FetchX509SVID",
            next_message(&mut svids, Duration::from_secs(5))
                .await
                .map(|m| m.map(|_| ())),
        ),
        (
            "FetchX509Bundles",
            next_message(&mut bundles, Duration::from_secs(5))
                .await
                .map(|m| m.map(|_| ())),
        ),
    ] {
        match outcome {
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{name} ended with {s:?}"),
            Ok(None) => {
                panic!("{name} ended with OK on shutdown (spec §5.4: UNAVAILABLE, never OK)")
            }
            Ok(Some(_)) => panic!("{name} sent another message instead of ending"),
        }
    }
}
