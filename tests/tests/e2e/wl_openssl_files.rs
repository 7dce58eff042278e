//! `openssl` verifies what `lanyard-agent api fetch x509 --write` writes.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use lanyard_tests::workload::*;
use lanyard_tests::{bin, ok};

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
