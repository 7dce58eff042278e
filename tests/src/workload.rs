//! Helpers for end-to-end tests of the agent's Workload API: a generated gRPC client
//! with the security header, waiting for what a caller is served, and everything a
//! relying party checks on an X509-SVID, done with tools that are not the agent's
//! (webpki path validation, ring signatures, the X509-SVID profile checks).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_proto::svid::{LeafInfo, check_ca, check_leaf, spiffe_id_of, split_der_chain};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use spiffe::x509_source::SvidPicker;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::tls::{anchors, verify_path};
use crate::{TrustDomain, my_uid, unix_now};

pub const TD: &str = "spiffe://example.org";
pub const HEADER: &str = "workload.spiffe.io";
pub const NO_IDENTITY: &str = "no identity issued";

pub type WlClient = SpiffeWorkloadApiClient<Channel>;

pub async fn wl_client(td: &TrustDomain) -> WlClient {
    let channel = lanyard_daemon::uds::channel(&td.agent.socket)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", td.agent.socket.display()));
    SpiffeWorkloadApiClient::new(channel)
}

/// A request carrying `workload.spiffe.io: true`, as every client library sends it.
pub fn with_header<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(HEADER, MetadataValue::from_static("true"));
    req
}

/// A request with the given `workload.spiffe.io` values (none, wrong ones, or several).
pub fn with_values<T>(msg: T, values: &[&'static str]) -> Request<T> {
    let mut req = Request::new(msg);
    for v in values {
        req.metadata_mut()
            .append(HEADER, MetadataValue::from_static(v));
    }
    req
}

pub fn ids_of(msg: &X509svidResponse) -> Vec<&str> {
    msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect()
}

/// Waits until this process is served exactly `ids` (in that order) and returns that
/// message. Entries reach the agent within milliseconds but are signed a little later,
/// so an early call may see PERMISSION_DENIED or fewer SVIDs.
pub async fn wait_for_ids(td: &TrustDomain, ids: &[&str]) -> X509svidResponse {
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
pub fn assert_code<T>(result: Result<T, Status>, code: Code, what: &str) {
    match result {
        Ok(_) => panic!("{what}: answered although it must be refused with {code:?}"),
        Err(s) => assert_eq!(s.code(), code, "{what}: {s:?}"),
    }
}

/// A trust domain whose agent already serves this process `id` (an entry for our uid
/// with `extra` flags), and the message that serves it.
pub async fn serving(id: &str, extra: &[&str]) -> (TrustDomain, X509svidResponse) {
    let td = TrustDomain::start();
    td.register_uid(id, my_uid(), extra);
    let msg = wait_for_ids(&td, &[id]).await;
    (td, msg)
}

/// The next stream message or status, failing after `within`.
pub async fn next_message<T>(
    stream: &mut Streaming<T>,
    within: Duration,
) -> Result<Option<T>, Status> {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("no stream message or status within {within:?}"))
}

/// The stream a streaming call opened, with its first message, which must come within
/// 5 s.
pub async fn opened<T>(
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
pub async fn svid_stream(client: &mut WlClient) -> (Streaming<X509svidResponse>, X509svidResponse) {
    opened(
        client.fetch_x509svid(with_header(X509svidRequest {})),
        "FetchX509SVID",
    )
    .await
}

/// A FetchX509Bundles stream (with the header) and its first message.
pub async fn bundle_stream(
    client: &mut WlClient,
) -> (Streaming<X509BundlesResponse>, X509BundlesResponse) {
    opened(
        client.fetch_x509_bundles(with_header(X509BundlesRequest {})),
        "FetchX509Bundles",
    )
    .await
}

/// Checks the CAs of a bundle (the X509-SVID standard) and returns the earliest notAfter.
pub fn check_bundle(bundle_der: &[&[u8]]) -> i64 {
    assert!(!bundle_der.is_empty(), "empty bundle");
    bundle_der
        .iter()
        .map(|ca| check_ca(ca).unwrap_or_else(|e| panic!("bundle CA breaks the profile: {e}")))
        .min()
        .expect("one CA")
}

/// The DER certificates in a PEM text.
pub fn der_of(pem_text: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .map(|c| c.expect("PEM certificate").to_vec())
        .collect()
}

/// Everything a relying party checks on an X509-SVID, with tools that are not the
/// agent's: the §2 profile of leaf and CAs, an RFC 5280 path from the leaf to the bundle
/// (webpki, for both serverAuth and clientAuth), the ID, and a signature made with the
/// private key that verifies with the leaf's public key. Returns the leaf's profile.
pub fn verify_svid(chain: &[&[u8]], bundle: &[&[u8]], pkcs8_key: &[u8], want_id: &str) -> LeafInfo {
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
pub fn ders<'a>(certs: &[&'a [u8]]) -> Vec<CertificateDer<'a>> {
    certs.iter().map(|c| CertificateDer::from(*c)).collect()
}

/// `verify_svid` on one Workload API X509SVID message entry.
pub fn verify_wire_svid(svid: &X509svid) -> LeafInfo {
    let chain = split_der_chain(&svid.x509_svid).expect("x509_svid is concatenated DER");
    let bundle = split_der_chain(&svid.bundle).expect("bundle is concatenated DER");
    verify_svid(&chain, &bundle, &svid.x509_svid_key, &svid.spiffe_id)
}

pub fn serial_of(svid: &X509svid) -> String {
    let chain = split_der_chain(&svid.x509_svid).expect("chain");
    check_leaf(chain[0], None).expect("leaf").serial_hex
}

pub fn require_root(why: &str) {
    assert_eq!(
        my_uid(),
        0,
        "this test must run as root ({why}); it never skips. Run the suite as root, as CI does."
    );
}

/// Runs an external tool that must exist; a missing tool fails the test loudly.
pub fn tool(name: &str) -> Command {
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
pub struct HintPicker(pub &'static str);

impl SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

pub async fn x509_source(endpoint: &str, hint: Option<&'static str>) -> spiffe::X509Source {
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

pub fn peer_id(conn: &rustls::CommonState) -> String {
    let certs = conn
        .peer_certificates()
        .expect("the peer presented a certificate");
    spiffe_id_of(&certs[0])
        .expect("peer certificate has one SPIFFE ID")
        .to_string()
}
