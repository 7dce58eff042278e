//! The README's first command, `scripts/demo.sh`, really brings up a trust domain and
//! hands this process an SVID that `openssl verify` accepts.

use std::process::Command;

#[test]
fn demo_script_serves_an_svid_to_the_invoking_user() {
    let bin_dir = lanyard_tests::bin("lanyard-server")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let out = lanyard_tests::run(
        Command::new("bash")
            .arg(&script)
            .arg("--no-wait")
            .env("LANYARD_BIN_DIR", &bin_dir),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let user = lanyard_tests::ok(Command::new("id").arg("-un"));
    let id = format!("spiffe://example.org/demo/{}", user.trim());
    assert!(
        stdout.contains(&format!("SPIFFE ID        : {id}")),
        "no SVID for {id}:\n{stdout}"
    );
    assert!(
        stdout.contains("svid.0.pem: OK"),
        "openssl did not verify the SVID:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("URI:{id}")),
        "SAN missing:\n{stdout}"
    );
}
