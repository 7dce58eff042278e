//! One agent per data dir and per socket. The review saw a second agent unlink a live
//! agent's socket; now the second is refused with one sentence before it spends its join
//! token, and the first keeps serving. A socket left behind by an agent killed with
//! SIGKILL is stale (nobody holds its lock) and is replaced on restart.

use std::process::Command;
use std::time::Duration;

use lanyard_tests::commands::{
    Spawned, agent_command, agent_command_at, agent_healthy, assert_refused_one_line, eventually,
    run_quick,
};
use lanyard_tests::{Agent, TrustDomain, bin, my_uid, ok};

fn agents(td: &TrustDomain) -> usize {
    let out = ok(&mut td.server.cli(&["agent", "list", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["agents"].as_array().map_or(0, Vec::len)
}

/// The SPIFFE IDs the agent serves this process.
fn fetch_ok(agent: &Agent) -> bool {
    run_quick(
        Command::new(bin("lanyard-agent"))
            .args(["api", "fetch", "x509", "--socket-path"])
            .arg(&agent.socket),
    )
    .code()
        == 0
}

fn serving_td() -> TrustDomain {
    let td = TrustDomain::start();
    td.register_uid("spiffe://example.org/me", my_uid(), &[]);
    eventually("the first agent to serve", Duration::from_secs(15), || {
        fetch_ok(&td.agent)
    });
    td
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused_and_the_first_keeps_serving() {
    let td = serving_td();
    let token = td.server.token(None);
    let root = td.dir.path().join("second");
    let second = run_quick(
        agent_command_at(
            &root,
            &td.server,
            &root.join("agent-data"),
            &td.agent.socket,
        )
        .env("LANYARD_JOIN_TOKEN", &token),
    );
    let line = assert_refused_one_line(
        &second,
        &[
            "another process already uses Workload API socket",
            "stop it first",
        ],
    );
    assert!(
        line.contains(&td.agent.socket.display().to_string()),
        "{line}"
    );
    assert_eq!(second.code(), 78);
    // The first is untouched: same socket file, still serving.
    assert!(td.agent.socket.exists());
    assert!(fetch_ok(&td.agent), "the first agent stopped serving");
    assert!(agent_healthy(&td.agent.socket));
    // The second was refused before it attested: its token is unspent.
    assert_eq!(agents(&td), 1);
    let mut third = Spawned::start(
        agent_command(&root, &td.server).env("LANYARD_JOIN_TOKEN", &token),
        &root.join("agent.log"),
    );
    eventually(
        "the token to attest elsewhere",
        Duration::from_secs(20),
        || agent_healthy(&root.join("agent-run/api.sock")),
    );
    assert_eq!(agents(&td), 2);
    third.terminate();
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused_and_the_first_keeps_serving() {
    let td = serving_td();
    let root = td.dir.path().join("second");
    let second = run_quick(&mut agent_command_at(
        &root,
        &td.server,
        &td.agent.data_dir,
        &root.join("agent-run/api.sock"),
    ));
    let line = assert_refused_one_line(&second, &["another process already uses data_dir"]);
    assert!(
        line.contains(&td.agent.data_dir.display().to_string()),
        "{line}"
    );
    assert_eq!(second.code(), 78);
    assert!(
        !root.join("agent-run/api.sock").exists(),
        "the refused agent bound a socket"
    );
    assert!(fetch_ok(&td.agent), "the first agent stopped serving");
}

#[test]
fn a_stale_socket_left_by_a_killed_agent_is_replaced_on_restart() {
    let mut td = serving_td();
    let pid = td.agent.pid().expect("pid").to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill")
            .success()
    );
    eventually("the agent to die", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(
        td.agent.socket.exists(),
        "SIGKILL leaves the socket file behind; this test needs it"
    );
    assert!(!fetch_ok(&td.agent), "nobody serves on the stale socket");
    td.agent.restart();
    assert!(
        fetch_ok(&td.agent),
        "the restarted agent serves on the same path"
    );
    assert_eq!(agents(&td), 1, "the restart reused its identity");
}
