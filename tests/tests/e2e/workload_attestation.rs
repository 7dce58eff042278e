//! Workload attestation against the attacks a local user can make, with the real agent
//! and `lanyard-probe` (tests/src/bin/probe.rs) playing the workload:
//!
//! - a connection shared with a child loses `unix:path`/`unix:sha256`;
//! - fork-then-exec: a process connects, hands the connection to a child and execs the
//!   trusted binary; the child is not judged as the trusted binary;
//! - `unix:path` faked from a user + mount namespace (a bind mount over the trusted path);
//! - pid reuse within a uid, steered deterministically in a pid namespace with
//!   `ns_last_pid`: the reused pid runs the trusted binary, the old connection gets
//!   nothing;
//! - the identity of a stream ends when the process that connected exits, although
//!   another process still holds the connection;
//! - `api debug-selectors` shows a process's selectors to its own user (and root) only,
//!   and refusals are logged with pid, uid and selectors.
//!
//! Attackers run as uid 65534 (setpriv). These tests need root, `setpriv`, `unshare`
//! and `nsenter`; a missing one fails, never skips.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanyard_tests::{TrustDomain, bin, my_uid, run};
use serde_json::Value;

const NOBODY: u32 = 65534;
const GONE: &str = "the calling process exited or was replaced during attestation";

fn require_root() {
    assert_eq!(
        my_uid(),
        0,
        "these tests run attackers as uid 65534: run them as root"
    );
}

/// `setpriv` as uid/gid 65534 without supplementary groups, then `program args`.
fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(program)
        .current_dir("/");
    cmd
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Copies of `lanyard-probe` where uid 65534 can run them: `trusted` is the binary
/// entries name; `untrusted` differs by one trailing byte (so its digest differs), at
/// another path.
struct Programs {
    trusted: PathBuf,
    untrusted: PathBuf,
}

impl Programs {
    fn new(td: &TrustDomain) -> Programs {
        let copy = |name: &str, extra: &[u8]| {
            let dir = td.dir.path().join(name);
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            let path = dir.join("lanyard-probe");
            let mut bytes = std::fs::read(bin("lanyard-probe")).expect("probe binary");
            bytes.extend_from_slice(extra);
            std::fs::write(&path, bytes).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        };
        let programs = Programs {
            trusted: copy("trusted", b""),
            untrusted: copy("untrusted", b"\0"),
        };
        assert_ne!(
            sha256_hex(&programs.trusted),
            sha256_hex(&programs.untrusted)
        );
        programs
    }
}

/// Runs `cmd` and parses the last JSON line of its stdout. A copy just written may be
/// busy for exec for a moment (another test thread forking meanwhile): retried.
fn json_of(cmd: &mut Command) -> Value {
    for _ in 0..50 {
        let out = run(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Text file busy") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().rev().find(|l| l.starts_with('{'));
        return serde_json::from_str(
            last.unwrap_or_else(|| panic!("{cmd:?} printed no JSON: {stdout}\nstderr: {stderr}")),
        )
        .expect("JSON");
    }
    panic!("{cmd:?}: text file stayed busy");
}

/// Fetches as `cmd` until it gets `id` (registration reaches the agent asynchronously).
fn wait_for_id(cmd: &mut Command, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = json_of(cmd);
        if got["ok"] == true
            && got["ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i == id))
        {
            return got;
        }
        assert!(Instant::now() < deadline, "{cmd:?} never got {id}: {got}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_identity(got: &Value, what: &str) {
    assert_eq!(got["ok"], false, "{what}: {got}");
    assert_eq!(got["code"], "PermissionDenied", "{what}: {got}");
    assert_eq!(got["message"], "no identity issued", "{what}: {got}");
}

fn wait_for_log(td: &TrustDomain, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = td.agent.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "agent log lacks {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn socket(td: &TrustDomain) -> String {
    td.agent.socket.display().to_string()
}

/// An entry for uid 65534 running exactly the trusted binary, by digest and path.
fn register_trusted(td: &TrustDomain, programs: &Programs, id: &str) {
    let uid = format!("unix:uid:{NOBODY}");
    let sha = format!("unix:sha256:{}", sha256_hex(&programs.trusted));
    let path = format!("unix:path:{}", programs.trusted.display());
    td.server
        .create_entry(id, &td.runner, &[&uid, &sha, &path], &[]);
}

#[test]
fn a_connection_shared_with_another_process_loses_binary_selectors() {
    require_root();
    let td = TrustDomain::start();
    let programs = Programs::new(&td);
    let id = "spiffe://example.org/trusted";
    register_trusted(&td, &programs, id);
    let sock = socket(&td);

    // The trusted binary on its own connection: served.
    wait_for_id(as_nobody(&programs.trusted).args(["fetch", &sock]), id);

    // The same binary connects and lets a child (same binary, same uid) use the
    // connection while it still holds it: the connection is shared, no binary selectors.
    let shared = json_of(as_nobody(&programs.trusted).args([
        "connect",
        &sock,
        "--wait-child",
        "--",
        "fetch-stdin",
    ]));
    assert_no_identity(&shared, "a request on a shared connection");
    let log = wait_for_log(&td, "refused a Workload API caller");
    assert!(log.contains("holds the connection too"), "{log}");
    assert!(
        log.contains(&format!("uid={NOBODY}")) || log.contains(&format!("uid: {NOBODY}")),
        "{log}"
    );
}

#[test]
fn fork_then_exec_into_the_trusted_binary_is_refused() {
    require_root();
    let td = TrustDomain::start();
    let programs = Programs::new(&td);
    let id = "spiffe://example.org/trusted";
    register_trusted(&td, &programs, id);
    let sock = socket(&td);
    wait_for_id(as_nobody(&programs.trusted).args(["fetch", &sock]), id);

    // The untrusted program connects, starts a child that keeps the connection, and
    // execs the trusted binary; the child asks once its parent runs the trusted binary.
    let trusted = programs.trusted.display().to_string();
    let mut attack = as_nobody(&programs.untrusted);
    attack
        .args(["connect", &sock, "--exec", &trusted, "sleep", "20", "--"])
        .args(["fetch-stdin", "--wait-parent-exe", &trusted])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = attack.spawn().expect("attack");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the child's answer");
    let _ = child.kill();
    let _ = child.wait();
    let got: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_no_identity(
        &got,
        "the forked child after its parent exec'd the trusted binary",
    );
    let log = wait_for_log(&td, "executed another program after it connected");
    assert!(log.contains("refused a Workload API caller"), "{log}");
}

#[test]
fn unix_path_faked_from_a_user_and_mount_namespace_is_refused() {
    require_root();
    let td = TrustDomain::start();
    let programs = Programs::new(&td);
    let id = "spiffe://example.org/by-path";
    let uid = format!("unix:uid:{NOBODY}");
    let path = format!("unix:path:{}", programs.trusted.display());
    td.server.create_entry(id, &td.runner, &[&uid, &path], &[]);
    let sock = socket(&td);
    let trusted = programs.trusted.display().to_string();
    let untrusted = programs.untrusted.display().to_string();
    let in_namespace = |script: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args([
                "unshare", "-Urm", "sh", "-c", script, "sh", &trusted, &untrusted, &sock,
            ])
            .current_dir("/");
        cmd
    };
    // Control: the trusted binary run from inside such a namespace is served.
    wait_for_id(&mut in_namespace(r#"exec "$1" fetch "$3""#), id);
    // The attack: bind-mount another program over the trusted path in the namespace and
    // run it by that path. /proc shows the trusted path; it is another file.
    let got = json_of(&mut in_namespace(
        r#"mount --bind "$2" "$1" || exit 99; exec "$1" fetch "$3""#,
    ));
    assert_no_identity(&got, "a bind mount over the trusted path");
}

/// The pid of the (only) child of `pid`.
fn only_child(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().expect("pid");
        }
        assert!(Instant::now() < deadline, "process {pid} has no child");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The driver of the pid-reuse attack, run as root inside the agent's pid namespace.
/// `$1` trusted, `$2` untrusted, `$3` socket, `$4` scratch directory.
const PID_REUSE: &str = r#"
set -eu
T_BIN=$1; U_BIN=$2; SOCK=$3; DIR=$4
# A word list, not a function: `$NOBODY prog &` forks once and execs, so $! is the
# program's own pid.
NOBODY="setpriv --reuid 65534 --regid 65534 --clear-groups"
# A (the untrusted program) connects, hands the connection to its child B, lingers so
# the agent pins it while alive, and exits. B asks once "go" exists.
$NOBODY "$U_BIN" connect "$SOCK" --pause-ms 500 -- fetch-stdin --wait-file "$DIR/go" > "$DIR/answer" &
A=$!
wait "$A"
# Steer the next pid to A's and start the trusted binary there, same uid.
T=0
for i in $(seq 1 50); do
  echo $((A - 1)) > /proc/sys/kernel/ns_last_pid
  $NOBODY "$T_BIN" sleep 30 &
  T=$!
  [ "$T" -eq "$A" ] && break
  kill "$T"; wait "$T" 2>/dev/null || true
done
sleep 0.2
echo "reused=$([ "$T" -eq "$A" ] && echo yes || echo no) a=$A t=$T t_exe=$(readlink /proc/$T/exe)"
touch "$DIR/go"
for i in $(seq 1 200); do [ -s "$DIR/answer" ] && break; sleep 0.05; done
echo "answer=$(cat "$DIR/answer")"
kill "$T"
"#;

#[test]
fn pid_reuse_within_a_uid_is_refused() {
    require_root();
    let td = TrustDomain::start_wrapped(
        &[],
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
        ],
    );
    let programs = Programs::new(&td);
    let id = "spiffe://example.org/trusted";
    register_trusted(&td, &programs, id);
    let agent = only_child(td.agent.pid().expect("agent running"));
    let sock = socket(&td);
    let trusted = programs.trusted.display().to_string();
    let untrusted = programs.untrusted.display().to_string();
    let scratch = td.dir.path().join("reuse");
    std::fs::create_dir(&scratch).expect("scratch");
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let inside = |args: &[&str]| {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &agent.to_string(), "-p", "-m", "--"])
            .args(args);
        cmd
    };
    // Control, from inside the namespace: the trusted binary on its own connection.
    wait_for_id(
        &mut inside(&[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            &trusted,
            "fetch",
            &sock,
        ]),
        id,
    );
    let out = run(&mut inside(&[
        "bash",
        "-c",
        PID_REUSE,
        "bash",
        &trusted,
        &untrusted,
        &sock,
        &scratch.display().to_string(),
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "driver failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("reused=yes") && stdout.contains(&format!("t_exe={trusted}")),
        "the trusted binary must run under the connecting process's pid:\n{stdout}\n{stderr}"
    );
    let answer = stdout
        .lines()
        .find_map(|l| l.strip_prefix("answer="))
        .unwrap_or_else(|| panic!("no answer:\n{stdout}"));
    let got: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{answer}: {e}"));
    assert_eq!(got["ok"], false, "{got}");
    assert_eq!(got["code"], "PermissionDenied", "{got}");
    assert_eq!(got["message"], GONE, "{got}");
}

#[test]
fn a_streams_identity_ends_when_the_connecting_process_exits() {
    require_root();
    let td = TrustDomain::start();
    let id = "spiffe://example.org/nobody";
    td.register_uid(id, NOBODY, &[]);
    let probe = bin("lanyard-probe");
    let sock = socket(&td);
    wait_for_id(as_nobody(&probe).args(["fetch", &sock]), id);
    // A connects and lets its child B open a stream on the connection; A exits after
    // 1.5 s while B keeps the connection open.
    let mut cmd = as_nobody(&probe);
    cmd.args(["connect", &sock, "--pause-ms", "1500", "--", "stream-stdin"])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let lines: Vec<String> = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map(|l| l.expect("line"))
        .collect();
    let _ = child.wait();
    let msgs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(msgs.len(), 2, "{lines:?}");
    assert_eq!(msgs[0]["ok"], true, "{lines:?}");
    assert_eq!(msgs[1]["code"], "PermissionDenied", "{lines:?}");
    assert_eq!(msgs[1]["message"], GONE, "{lines:?}");
}

#[test]
fn debug_selectors_shows_a_process_to_its_own_user_and_refusals_are_logged() {
    require_root();
    let td = TrustDomain::start();
    let id = "spiffe://example.org/nobody";
    td.register_uid(id, NOBODY, &[]);
    let sock = socket(&td);
    wait_for_id(as_nobody(&bin("lanyard-probe")).args(["fetch", &sock]), id);

    let mut sleeper = as_nobody(Path::new("/bin/sleep"))
        .arg("30")
        .spawn()
        .expect("sleep");
    let pid = sleeper.id().to_string();
    let debug = |cmd: &mut Command| {
        let out = run(cmd
            .args([
                "api",
                "debug-selectors",
                "--pid",
                &pid,
                "--output",
                "json",
                "--socket-path",
                &sock,
            ])
            .current_dir("/"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Its own user sees its selectors, with the binary ones marked, and the IDs they earn.
    let (ok, stdout, stderr) = debug(&mut as_nobody(&bin("lanyard-agent")));
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["uid"], NOBODY);
    let selectors = v["selectors"].as_array().expect("selectors");
    let find = |prefix: &str| {
        selectors
            .iter()
            .find(|s| {
                s["selector"]
                    .as_str()
                    .is_some_and(|x| x.starts_with(prefix))
            })
            .cloned()
    };
    assert_eq!(
        find("unix:uid:").expect("uid")["selector"],
        format!("unix:uid:{NOBODY}")
    );
    assert_eq!(find("unix:uid:").expect("uid")["conditional"], false);
    let path = find("unix:path:").expect("path");
    assert!(
        path["selector"]
            .as_str()
            .is_some_and(|p| p.ends_with("/sleep")),
        "{path}"
    );
    assert_eq!(path["conditional"], true);
    assert_eq!(v["identities"][0]["spiffe_id"], id);
    // Root may look too; another user may not.
    let (ok, _, stderr) = debug(&mut Command::new(bin("lanyard-agent")));
    assert!(ok, "root: {stderr}");
    let mut other = Command::new("setpriv");
    other
        .args(["--reuid", "65533", "--regid", "65533", "--clear-groups"])
        .arg(bin("lanyard-agent"));
    let (ok, _, stderr) = debug(&mut other);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "process {pid} runs as uid {NOBODY}; only its own user or root may see its selectors"
        )),
        "{stderr}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // A caller with no entry is refused, and the log says who it was.
    let out = run(Command::new("setpriv")
        .args(["--reuid", "65533", "--regid", "65533", "--clear-groups"])
        .arg(bin("lanyard-probe"))
        .args(["fetch", &sock])
        .current_dir("/"));
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_no_identity(&got, "uid 65533");
    let log = wait_for_log(&td, "unix:uid:65533");
    let line = log
        .lines()
        .find(|l| l.contains("unix:uid:65533"))
        .expect("refusal line");
    assert!(line.contains("refused a Workload API caller"), "{line}");
    assert!(line.contains("uid=65533"), "{line}");
    assert!(line.contains("pid="), "{line}");
}
