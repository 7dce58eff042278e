//! The security header, unregistered callers and unsupported RPCs get the errors the
//! SPIFFE Workload API standard specifies; FetchX509Bundles serves the own trust domain.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use lanyard_proto::svid::split_der_chain;
use lanyard_proto::workload::{
    WitBundlesRequest, WitsvidRequest, X509BundlesRequest, X509svidRequest,
};
use lanyard_tests::workload::*;
use lanyard_tests::{bin, ok, run};
use tonic::Code;

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

    // A method the service does not have (the Workload API standard: UNIMPLEMENTED).
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
