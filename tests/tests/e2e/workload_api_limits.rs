//! The Workload API under a local user's exhaustion attack: uid 65534 opens thousands of
//! idle connections. The agent keeps at most its per-uid cap of them (the rest are closed
//! at once), closes the kept ones after its idle timeout, keeps serving other users
//! promptly, does not spin (its CPU time over the attack is measured from
//! /proc/<pid>/stat) and does not flood its log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanyard_tests::{TrustDomain, bin, my_uid, ok};
use serde_json::Value;

/// The agent's defaults (agent/src/peer.rs `Limits::default`).
const CONNECTIONS_PER_UID: u64 = 256;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const FLOOD: u64 = 3000;

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 overall; field 3 is the first after the name.
    fields[14 - 3].parse::<u64>().expect("utime") + fields[15 - 3].parse::<u64>().expect("stime")
}

fn clock_ticks_per_second() -> u64 {
    let out = ok(Command::new("getconf").arg("CLK_TCK"));
    out.trim().parse().expect("CLK_TCK")
}

#[test]
fn thousands_of_idle_connections_from_one_uid_do_not_starve_others() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs the attacker as uid 65534: run it as root"
    );
    let td = TrustDomain::start();
    let id = "spiffe://example.org/root-workload";
    td.register_uid(id, 0, &[]);
    let socket = td.agent.socket.display().to_string();
    let fetch = || {
        let started = Instant::now();
        let out = ok(Command::new(bin("lanyard-agent")).args([
            "api",
            "fetch",
            "x509",
            "--socket-path",
            &socket,
        ]));
        (out, started.elapsed())
    };
    // Registered and served before the attack.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(bin("lanyard-agent"))
            .args(["api", "fetch", "x509", "--socket-path", &socket])
            .output()
            .expect("fetch");
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id) {
            break;
        }
        assert!(Instant::now() < deadline, "never served before the attack");
        std::thread::sleep(Duration::from_millis(200));
    }

    let agent = td.agent.pid().expect("agent pid");
    let cpu_before = cpu_ticks(agent);
    let log_before = td.agent.log().len();
    let attack_started = Instant::now();
    let hold = IDLE_TIMEOUT + Duration::from_secs(10);
    let mut flood = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin("lanyard-probe"))
        .args([
            "flood",
            &socket,
            &FLOOD.to_string(),
            &hold.as_secs().to_string(),
        ])
        .current_dir("/")
        .stdout(Stdio::piped())
        .spawn()
        .expect("flood");
    let mut lines = BufReader::new(flood.stdout.take().expect("stdout")).lines();
    let held: Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
    assert_eq!(held["opened"], FLOOD, "{held}");
    assert_eq!(
        held["closed_at_once"],
        FLOOD - CONNECTIONS_PER_UID,
        "all but the per-uid cap are closed at once: {held}"
    );

    // Another user is served promptly while uid 65534 holds its connections.
    for _ in 0..3 {
        let (out, took) = fetch();
        assert!(out.contains(id), "{out}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }

    let end: Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
    let _ = flood.wait();
    assert_eq!(
        end["closed_by_end"], FLOOD,
        "idle connections are closed: {end}"
    );

    let wall = attack_started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(agent) - cpu_before) as f64 / clock_ticks_per_second() as f64;
    assert!(
        cpu < wall * 0.1,
        "the agent used {cpu:.2}s of CPU over {wall:.1}s of attack: it must not spin"
    );
    let logged = td.agent.log().len() - log_before;
    eprintln!("agent CPU {cpu:.2}s over {wall:.1}s of attack; its log grew {logged} bytes");
    assert!(
        logged < 16 * 1024,
        "the agent logged {logged} bytes during the attack:\n{}",
        td.agent.log()
    );
    // The refusals were logged, once.
    assert!(
        td.agent
            .log()
            .contains("closed a Workload API connection: this uid holds as many as one user may"),
        "{}",
        td.agent.log()
    );
}
