//! A misconfigured agent fails fast and names the setting: a bootstrap bundle of another
//! CA or a trust domain the server does not serve ends attestation at once (the review
//! saw both retried for 60 s), a trust bundle that is not CA certificates is refused at
//! load, and `lanyard-agent validate` checks all of it without starting anything. Only an
//! unreachable server is waited for (see agent_join_token). None of these spends the
//! join token.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use lanyard_tests::commands::{
    Spawned, agent_command, agent_healthy, assert_refused_one_line, eventually, run_for, run_quick,
};
use lanyard_tests::{Server, bin, ok};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-bootstrap")
        .tempdir()
        .expect("tempdir")
}

fn agents(server: &Server) -> usize {
    let out = ok(&mut server.cli(&["agent", "list", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["agents"].as_array().map_or(0, Vec::len)
}

/// `cmd` (an `agent_command`) with its `--trust-domain` replaced by `td`.
fn with_trust_domain(cmd: Command, td: &str) -> Command {
    let mut args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--trust-domain")
        .expect("--trust-domain");
    args[at + 1] = td.to_string();
    let mut out = Command::new(cmd.get_program());
    out.args(args)
        .env_remove("LANYARD_JOIN_TOKEN")
        .env_remove("LANYARD_AGENT_CONFIG");
    out
}

/// How long a refused attestation may take at most: far below the 60 s the agent waits
/// for an unreachable server, so a refusal that is retried fails this.
const AT_ONCE: Duration = Duration::from_secs(15);

#[test]
fn a_wrong_bootstrap_bundle_or_trust_domain_ends_attestation_at_once_naming_the_setting() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("a"), "example.org", &[]);
    // Another server of the same trust domain name: its CA has the same name but
    // another key, as a bundle copied from the wrong host would.
    let other = Server::start(&dir.path().join("b"), "example.org", &[]);
    let token = server.token(None);
    let root = dir.path().join("agent");
    let mut cmd = agent_command(&root, &server);
    std::fs::write(root.join("bootstrap.pem"), other.bundle_pem()).expect("bundle");
    cmd.env("LANYARD_JOIN_TOKEN", &token);
    let bundle = run_for(&mut cmd, Duration::from_secs(70));
    let line = assert_refused_one_line(&bundle, &["trust_bundle_path", "no ca"]);
    assert!(line.contains("bootstrap.pem"), "names the file: {line}");
    assert!(line.contains(&server.address), "names the server: {line}");
    assert!(bundle.elapsed < AT_ONCE, "retried: {}", bundle.describe());
    assert_eq!(bundle.code(), 78, "{}", bundle.describe());

    let mut cmd = with_trust_domain(agent_command(&root, &server), "other.org");
    cmd.env("LANYARD_JOIN_TOKEN", &token);
    let td = run_for(&mut cmd, Duration::from_secs(70));
    let line = assert_refused_one_line(
        &td,
        &[
            "trust_domain",
            "spiffe://example.org/lanyard/server",
            "spiffe://other.org/lanyard/server",
        ],
    );
    assert!(line.contains("other.org"), "{line}");
    assert!(td.elapsed < AT_ONCE, "retried: {}", td.describe());
    assert_eq!(td.code(), 78);

    // The token never left the agent (the TLS handshake failed first): it still works.
    assert_eq!(agents(&server), 0);
    let mut agent = Spawned::start(
        agent_command(&root, &server).env("LANYARD_JOIN_TOKEN", &token),
        &root.join("agent.log"),
    );
    eventually("the agent to attest", Duration::from_secs(20), || {
        agent_healthy(&root.join("agent-run/api.sock"))
    });
    assert_eq!(agents(&server), 1);
    agent.terminate();
}

/// A self-signed certificate that is not a CA (openssl, as an operator might make one).
fn leaf_pem(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("leaf.key");
    let cert = dir.join("leaf.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=not-a-ca", "-days", "1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{made:?}");
    cert
}

#[test]
fn trust_bundles_that_are_not_ca_certificates_are_refused_at_load() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let root = dir.path().join("agent");
    let leaf = std::fs::read_to_string(leaf_pem(dir.path())).expect("leaf");
    let cases: [(Option<&str>, &str); 4] = [
        (None, "cannot read"),
        (Some("hello\n"), "no certificate"),
        (
            Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "cannot be parsed",
        ),
        (Some(&leaf), "not a ca certificate"),
    ];
    for (content, needle) in cases {
        let mut cmd = agent_command(&root, &server);
        let path = root.join("bootstrap.pem");
        match content {
            Some(text) => std::fs::write(&path, text).expect("write"),
            None => std::fs::remove_file(&path).expect("rm"),
        }
        let f = run_quick(&mut cmd);
        assert_refused_one_line(&f, &["trust_bundle_path", "bootstrap.pem", needle]);
        assert_eq!(f.code(), 78, "{}", f.describe());
    }
    assert!(
        !root.join("agent-data").exists(),
        "a refused config created data_dir"
    );
}

#[test]
fn validate_checks_the_configuration_without_starting() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let root = dir.path().join("agent");
    // `validate` takes the same flags as `run`.
    let validate_td = |td: &str, extra: &[&str], token: Option<&str>| {
        let run = with_trust_domain(agent_command(&root, &server), td);
        let mut cmd = Command::new(bin("lanyard-agent"));
        cmd.arg("validate")
            .args(run.get_args().skip(1))
            .args(extra)
            .env_remove("LANYARD_JOIN_TOKEN")
            .env_remove("LANYARD_AGENT_CONFIG");
        if let Some(t) = token {
            cmd.env("LANYARD_JOIN_TOKEN", t);
        }
        run_quick(&mut cmd)
    };
    let validate = |extra: &[&str], token: Option<&str>| validate_td("example.org", extra, token);

    let good = validate(&[], Some("some-token"));
    assert_eq!(good.code(), 0, "{}", good.describe());
    let lines: Vec<&str> = good.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", good.describe());
    assert!(
        lines[0].starts_with("the configuration is valid"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("example.org") && lines[0].contains("LANYARD_JOIN_TOKEN"));
    assert!(good.stderr.is_empty(), "{}", good.describe());
    assert!(
        !root.join("agent-data").exists() && !root.join("agent-run").exists(),
        "validate created the agent's directories"
    );

    let no_token = validate(&[], None);
    assert_refused_one_line(&no_token, &["no stored identity", "LANYARD_JOIN_TOKEN"]);
    assert_eq!(no_token.code(), 78);

    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "log_level = \"info\"\n\n  bogus = 1\n").expect("config");
    let bad_key = validate(&["--config", &config.display().to_string()], Some("t"));
    assert_refused_one_line(&bad_key, &["agent.toml", "line 3, column 3", "bogus"]);
    assert_eq!(bad_key.code(), 78);

    let bad_td = validate_td("Example.org", &[], Some("t"));
    assert_refused_one_line(&bad_td, &["trust_domain", "Example.org"]);

    // A data_dir others can read is named with the fix.
    std::fs::create_dir_all(root.join("agent-data")).expect("mkdir");
    std::fs::set_permissions(
        root.join("agent-data"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let loose = validate(&[], Some("t"));
    assert_refused_one_line(&loose, &["agent-data", "chmod 700"]);
    assert_eq!(loose.code(), 78);
    std::fs::set_permissions(
        root.join("agent-data"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
    let fine = validate(&[], Some("t"));
    assert_eq!(fine.code(), 0, "{}", fine.describe());
}
