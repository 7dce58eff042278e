//! Operating the real server: `/live` and `/ready` over HTTP and the gRPC health service
//! reflect reality (not ready while the CA is expired or the datastore refuses writes,
//! and `healthcheck` says why), systemd readiness notifications, `validate`, and CLI
//! output that survives a closed pipe and shows times as RFC 3339.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanyard_tests::{Server, TrustDomain, bin, free_port, ok, run, unix_now};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-ops")
        .tempdir()
        .expect("tempdir")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `GET path` over HTTP/1.1: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: lanyard\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The gRPC health status of `service` on the admin socket.
fn grpc_health(socket: &Path, service: &str) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let channel = lanyard_daemon::uds::channel(socket.to_path_buf())
            .await
            .expect("admin socket");
        HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    })
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

const ADMIN_SERVICE: &str = "lanyard.admin.v1.AdminService";

/// `healthcheck`: `Ok(stdout)` when healthy, `Err(stderr)` otherwise.
fn healthcheck(server: &Server) -> Result<String, String> {
    let out = run(&mut server.cli(&["healthcheck"]));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn python() -> PathBuf {
    match std::env::var_os("LANYARD_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "LANYARD_PYTHON is not set: run the tests with scripts/test.sh, which exports it"
        ),
    }
}

/// Holds SQLite's write lock on the datastore (as another process could) until stdin
/// closes.
const HOLD_WRITE_LOCK: &str = r#"
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
con.execute("ROLLBACK")
"#;

#[test]
fn readiness_over_http_and_grpc_follows_the_datastore() {
    let dir = tempdir();
    let health = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        dir.path(),
        "example.org",
        &["--health-bind-address", &health],
    );
    let (code, body) = get(&health, "/live");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&health, "/ready");
    assert_eq!(
        (code, json(&body)),
        (200, serde_json::json!({"ready": true, "reasons": []}))
    );
    assert_eq!(
        grpc_health(&server.admin_socket, ""),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        grpc_health(&server.admin_socket, ADMIN_SERVICE),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        healthcheck(&server).expect("healthy").trim(),
        "Server is healthy."
    );

    // Another process takes the datastore's write lock: writes fail, the server says so.
    let mut holder = Command::new(python())
        .args(["-c", HOLD_WRITE_LOCK])
        .arg(server.data_dir.join("datastore.sqlite3"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "locked");
    wait_until("/ready to turn 503", Duration::from_secs(30), || {
        get(&health, "/ready").0 == 503
    });
    let (_, body) = get(&health, "/ready");
    let v = json(&body);
    assert_eq!(v["ready"], false);
    let reason = v["reasons"][0].as_str().expect("reason").to_string();
    assert!(reason.starts_with("the datastore"), "{reason}");
    assert_eq!(get(&health, "/live").0, 200, "still live");
    assert_eq!(
        grpc_health(&server.admin_socket, ""),
        ServingStatus::NotServing as i32
    );
    let why = healthcheck(&server).expect_err("not healthy");
    let lines: Vec<&str> = why.lines().collect();
    assert_eq!(lines.len(), 1, "{why}");
    assert!(
        lines[0].starts_with("lanyard-server: the server is not ready: the datastore"),
        "{why}"
    );

    // The lock goes: ready again.
    drop(holder.stdin.take());
    let _ = holder.wait();
    wait_until("/ready to turn 200 again", Duration::from_secs(30), || {
        get(&health, "/ready").0 == 200
    });
    assert_eq!(
        grpc_health(&server.admin_socket, ADMIN_SERVICE),
        ServingStatus::Serving as i32
    );
    healthcheck(&server).expect("healthy again");
}

#[test]
fn the_server_is_not_ready_once_its_ca_expired() {
    let dir = tempdir();
    let health = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        dir.path(),
        "example.org",
        &[
            "--ca-ttl",
            "20s",
            "--default-x509-svid-ttl",
            "10s",
            "--agent-ttl",
            "10s",
            "--health-bind-address",
            &health,
        ],
    );
    let pem = server.bundle_pem();
    let ca = lanyard_tests::tls::certs_from_pem(&pem);
    let (_, cert) = x509_parser::parse_x509_certificate(ca[0].as_ref()).expect("CA");
    let not_after = cert.validity().not_after.timestamp();
    assert!(not_after <= unix_now() + 21, "ca_ttl 20s");
    healthcheck(&server).expect("healthy while the CA is valid");
    wait_until("the CA to expire", Duration::from_secs(30), || {
        unix_now() > not_after
    });
    wait_until("/ready to turn 503", Duration::from_secs(15), || {
        get(&health, "/ready").0 == 503
    });
    let why = healthcheck(&server).expect_err("an expired CA is not healthy");
    assert!(
        why.contains("the CA expired at") && why.contains('T'),
        "{why}"
    );
    assert_eq!(
        grpc_health(&server.admin_socket, ""),
        ServingStatus::NotServing as i32
    );
}

#[test]
fn the_server_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempdir();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let admin = dir.path().join("run/admin.sock");
    let mut child = Command::new(bin("lanyard-server"))
        .args(["run", "--trust-domain", "example.org", "--bind-address"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-socket")
        .arg(&admin)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 1024];
    let n = notify.recv(&mut buf).expect("READY within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // READY means serving: the admin API answers at once.
    ok(Command::new(bin("lanyard-server"))
        .arg("healthcheck")
        .arg("--admin-socket")
        .arg(&admin));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let n = notify.recv(&mut buf).expect("STOPPING");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    let status = child.wait().expect("exit");
    assert!(status.success(), "{status}");
}

#[test]
fn validate_checks_the_configuration_and_data_dir_without_starting() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let validate = |config: &Path, extra: &[&str]| {
        run(Command::new(bin("lanyard-server"))
            .arg("validate")
            .arg("--config")
            .arg(config)
            .args(extra)
            .env_remove("LANYARD_SERVER_CONFIG"))
    };
    let good = write(
        "good.toml",
        &format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\nagent_ttl = \"30m\"\n\n[health]\nbind_address = \"127.0.0.1:0\"\n",
            data.display(),
            dir.path().join("run/admin.sock").display()
        ),
    );
    let out = validate(&good, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("configuration is valid: trust domain example.org"),
        "{stdout}"
    );
    assert!(!data.exists(), "validate created the data_dir");
    assert!(
        !dir.path().join("run").exists(),
        "validate created the socket directory"
    );

    let failing = |out: std::process::Output, needles: &[&str]| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        for n in needles {
            assert!(lines[0].contains(n), "{stderr} lacks {n}");
        }
    };
    let syntax = write(
        "syntax.toml",
        "trust_domain = \"example.org\"\nagent_ttl = \n",
    );
    failing(validate(&syntax, &[]), &["syntax.toml", "line 2, column"]);
    let unknown = write(
        "unknown.toml",
        "trust_domain = \"example.org\"\n[health]\nport = 80\n",
    );
    failing(validate(&unknown, &[]), &["unknown.toml", "line 3", "port"]);
    // Flags override the file, and are checked the same way.
    failing(
        validate(&good, &["--agent-ttl", "3s"]),
        &["agent_ttl", "at least 10"],
    );
    // An existing data_dir is checked like `run` would.
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    failing(validate(&good, &[]), &["data_dir", "chmod 700"]);
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    std::os::unix::fs::symlink("/etc/passwd", data.join("ca.key")).expect("plant");
    failing(validate(&good, &[]), &["ca.key", "symbolic link"]);
}

#[test]
fn cli_output_survives_a_closed_pipe_and_shows_rfc3339_times() {
    let td = TrustDomain::start();
    let server = &td.server;
    // Enough entries that `entry show` writes more than a pipe holds.
    let file = td.dir.path().join("many.json");
    let entries: Vec<serde_json::Value> = (0..400)
        .map(|n| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/many/{n}"),
                "parent_id": td.runner,
                "selectors": [format!("unix:uid:{}", 10_000 + n)],
                "dns_names": [format!("host-{n}.example.org")],
            })
        })
        .collect();
    std::fs::write(&file, serde_json::json!({ "entries": entries }).to_string()).expect("write");
    ok(&mut server.cli(&[
        "entry",
        "create",
        "--data",
        file.to_str().expect("utf-8"),
        "--output",
        "json",
    ]));
    // As an operator types it.
    let command = format!(
        "'{}' entry show --admin-socket '{}' | head -1",
        bin("lanyard-server").display(),
        server.admin_socket.display()
    );
    let out = run(Command::new("bash").args(["-o", "pipefail", "-c", &command]));
    assert!(
        out.status.success(),
        "`entry show | head -1` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Found 401 entries"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same with the reader gone after one line, checked on the CLI process itself.
    for args in [
        &["entry", "show"][..],
        &["entry", "show", "--output", "json"][..],
    ] {
        let mut child = server
            .cli(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut first = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut first).expect("first line");
        drop(stdout);
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Times: RFC 3339 UTC in text, Unix seconds in JSON.
    let rfc3339 = |s: &str| {
        s.len() == 20
            && s.ends_with('Z')
            && s.as_bytes()[4] == b'-'
            && s.as_bytes()[10] == b'T'
            && s.as_bytes()[13] == b':'
    };
    let text = ok(&mut server.cli(&[
        "entry",
        "show",
        "--spiffe-id",
        "spiffe://example.org/many/7",
    ]));
    let created = text
        .lines()
        .find_map(|l| l.strip_prefix("Created at       : "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(rfc3339(created), "{created}");
    let v = json(&ok(&mut server.cli(&[
        "entry",
        "show",
        "--spiffe-id",
        "spiffe://example.org/many/7",
        "--output",
        "json",
    ])));
    assert!(
        v["entries"][0]["created_at"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000)
    );
    let agents = ok(&mut server.cli(&["agent", "list"]));
    for label in ["Attested at      : ", "SVID expires at  : "] {
        let at = agents
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("{label}: {agents}"));
        assert!(rfc3339(at), "{label}{at}");
    }
    let pem = server.bundle_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n") && !pem.contains('\r'));
    assert_eq!(
        ok(&mut server.cli(&["entry", "count"])).trim(),
        "401 entries"
    );
}
