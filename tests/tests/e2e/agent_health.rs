//! Health that means something. The review saw the agent serve an SVID 24 s past its
//! notAfter while both healthchecks said healthy. Now, with the server gone, a workload
//! is served its SVID only while it is valid, then nothing; `healthcheck`, `/ready` and
//! the gRPC health service say the agent is not ready and why; when the server returns
//! the agent catches up and says so at info. systemd hears READY=1 once the Workload
//! API serves and STOPPING=1 on shutdown.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lanyard_tests::commands::{
    Spawned, agent_command, agent_healthy, assert_refused_one_line, eventually, http_get, run_quick,
};
use lanyard_tests::{Server, bin, free_port, my_uid, unix_now};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-health")
        .tempdir()
        .expect("tempdir")
}

/// What the standard gRPC health service on the agent's socket says about `service`
/// ("" for the agent as a whole).
fn grpc_health(socket: &Path, service: &str) -> tonic_health::ServingStatus {
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async {
        let channel = lanyard_daemon::uds::channel(socket).await.expect("connect");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    });
    match Wire::try_from(status).expect("a known status") {
        Wire::Serving => tonic_health::ServingStatus::Serving,
        Wire::NotServing => tonic_health::ServingStatus::NotServing,
        Wire::Unknown | Wire::ServiceUnknown => tonic_health::ServingStatus::Unknown,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// The not_after of each SVID `api fetch x509` gets now, or `None` when it gets none.
fn fetched_not_afters(socket: &Path) -> Option<Vec<i64>> {
    let out = run_quick(
        Command::new(bin("lanyard-agent"))
            .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
            .arg(socket),
    );
    if out.code() != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let svids = v["svids"].as_array().expect("svids");
    Some(
        svids
            .iter()
            .map(|s| s["not_after"].as_i64().expect("not_after is a number"))
            .collect(),
    )
}

#[test]
fn without_its_server_the_agent_never_serves_an_expired_svid_and_says_why() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), "example.org", &[]);
    let runner = "spiffe://example.org/runner";
    let token = server.token(Some(runner));
    let health = format!("127.0.0.1:{}", free_port());
    let root = dir.path().join("agent");
    let socket = root.join("agent-run/api.sock");
    let mut agent = Spawned::start(
        agent_command(&root, &server)
            .args(["--health-bind-address", &health])
            .args(["--health-unreachable-grace", "3s"])
            .env("LANYARD_JOIN_TOKEN", &token),
        &root.join("agent.log"),
    );
    eventually("the agent to be ready", Duration::from_secs(20), || {
        agent_healthy(&socket)
    });
    let (live, _) = http_get(&health, "/live");
    assert_eq!(live, 200);
    let (ready, body) = http_get(&health, "/ready");
    assert_eq!(
        (ready, body.as_str()),
        (200, r#"{"ready":true,"reasons":[]}"#)
    );

    server.create_entry(
        "spiffe://example.org/short",
        runner,
        &[&format!("unix:uid:{}", my_uid())],
        &["--x509-svid-ttl", "10"],
    );
    eventually("the SVID", Duration::from_secs(15), || {
        fetched_not_afters(&socket).is_some()
    });

    // The server goes away for good (until restarted below).
    server.stop();
    let mut last_served = 0;
    let mut refused_at = None;
    let deadline = unix_now() + 40;
    while unix_now() < deadline {
        let asked = now_ms();
        match fetched_not_afters(&socket) {
            Some(not_afters) => {
                for not_after in &not_afters {
                    assert!(
                        not_after * 1000 > asked,
                        "served an SVID valid until {not_after} (Unix s) when asked at {asked} (Unix ms)"
                    );
                }
                last_served = not_afters.into_iter().max().unwrap_or(last_served);
            }
            None => {
                refused_at = Some(asked);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused_at = refused_at.expect("the agent kept serving an SVID it could not renew");
    // A valid SVID kept being served while renewal failed (a fetch takes a moment, so
    // one asked just before notAfter may already find it gone).
    assert!(
        refused_at + 2000 >= last_served * 1000,
        "stopped serving at {refused_at} ms, long before the SVID's notAfter {last_served} s"
    );
    // And nothing is served from then on.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fetched_not_afters(&socket), None);
    assert!(
        agent
            .log()
            .contains("dropped workload X509-SVIDs that expired"),
        "{}",
        agent.log()
    );

    // Every health surface says so, and why.
    let check = run_quick(
        Command::new(bin("lanyard-agent"))
            .arg("healthcheck")
            .arg("--socket-path")
            .arg(&socket),
    );
    let line = assert_refused_one_line(&check, &["not ready", "has not answered since"]);
    assert!(line.contains("expired before renewal"), "{line}");
    assert!(line.contains(&server.address), "{line}");
    assert_eq!(check.code(), 1);
    let (ready, body) = http_get(&health, "/ready");
    assert_eq!(ready, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["ready"], false);
    let reasons: Vec<&str> = v["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("expired before renewal")),
        "{reasons:?}"
    );
    let (live, _) = http_get(&health, "/live");
    assert_eq!(live, 200, "the process is alive, just not ready");
    for service in ["", "SpiffeWorkloadAPI"] {
        assert_eq!(
            grpc_health(&socket, service),
            tonic_health::ServingStatus::NotServing,
            "gRPC health of {service:?}"
        );
    }
    assert!(agent.exited().is_none(), "the agent must keep trying");

    // The server returns: the agent catches up by itself and says so at info.
    server.restart(&[]);
    eventually("a fresh SVID", Duration::from_secs(45), || {
        fetched_not_afters(&socket).is_some_and(|n| n.iter().all(|t| *t > unix_now()))
    });
    eventually(
        "the agent to be ready again",
        Duration::from_secs(10),
        || agent_healthy(&socket),
    );
    assert_eq!(http_get(&health, "/ready").0, 200);
    for service in ["", "SpiffeWorkloadAPI"] {
        assert_eq!(
            grpc_health(&socket, service),
            tonic_health::ServingStatus::Serving,
            "gRPC health of {service:?}"
        );
    }
    let log = agent.log();
    let info = |needle: &str| {
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(needle))
    };
    assert!(info("reached the server again"), "{log}");
    assert!(info("signed workload X509-SVIDs"), "{log}");
    assert!(
        !log.lines().any(|l| l.contains("DEBUG")),
        "debug lines at the default level: {log}"
    );
    assert!(
        agent.terminate().is_some_and(|s| s.success()),
        "{}",
        agent.log()
    );
}

/// The datagrams systemd would have received, as text.
fn drain(socket: &UnixDatagram) -> Vec<String> {
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn systemd_hears_ready_once_the_workload_api_serves_and_stopping_on_shutdown() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(None);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let root = dir.path().join("agent");
    let socket = root.join("agent-run/api.sock");
    let mut agent = Spawned::start(
        agent_command(&root, &server)
            .env("LANYARD_JOIN_TOKEN", &token)
            .env("NOTIFY_SOCKET", &notify_path),
        &root.join("agent.log"),
    );
    let mut seen = vec![];
    eventually("READY=1", Duration::from_secs(20), || {
        seen.extend(drain(&notify));
        seen.iter().any(|m| m.lines().any(|l| l == "READY=1"))
    });
    let ready = seen
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .expect("ready");
    assert!(
        ready.contains("STATUS=serving the Workload API at unix://"),
        "{ready:?}"
    );
    // READY=1 came once the socket serves, so a client gets an answer now.
    assert!(
        run_quick(
            Command::new(bin("lanyard-agent"))
                .args(["api", "fetch", "x509", "--socket-path"])
                .arg(&socket)
        )
        .stderr
        .contains("the agent answered"),
        "the Workload API answers"
    );
    let before_ready: Vec<&String> = seen
        .iter()
        .take_while(|m| !m.lines().any(|l| l == "READY=1"))
        .collect();
    assert!(
        before_ready
            .iter()
            .any(|m| m.contains("STATUS=not ready: attesting to the server")),
        "the status line said what the agent was doing: {seen:?}"
    );
    assert!(!seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    assert!(agent.terminate().is_some_and(|s| s.success()));
    let after = drain(&notify);
    assert!(
        after.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{after:?}"
    );
}
