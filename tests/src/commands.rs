//! Commands as the end-to-end tests run and judge them: run one with a deadline and
//! check that it failed the way a user must see it fail (one clear line, no panic);
//! start a daemon that is not expected to come up (or is watched from outside) and kill
//! it when the test ends; a fresh agent's `run` command line; plain HTTP GETs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Server, bin};

/// A finished (or killed) command and what it printed.
#[derive(Debug)]
pub struct Finished {
    pub what: String,
    /// `None` when it had to be killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?} after {:.1}s)\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// The exit code, failing loudly if it was killed or died by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .and_then(|s| s.code())
            .unwrap_or_else(|| panic!("no exit code: {}", self.describe()))
    }
}

/// Runs `cmd`, killing it if it has not finished within `limit`.
pub fn run_for(cmd: &mut Command, limit: Duration) -> Finished {
    let what = format!("{cmd:?}");
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let (output, timed_out) = match rx.recv_timeout(limit) {
        Ok(out) => (out, false),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            (rx.recv().expect("waiter thread"), true)
        }
    };
    let output = output.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    Finished {
        what,
        status: (!timed_out).then_some(output.status),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Runs a command that must finish promptly.
pub fn run_quick(cmd: &mut Command) -> Finished {
    run_for(cmd, Duration::from_secs(20))
}

/// Asserts that a command failed cleanly: it exited (no hang) non-zero, printed no panic
/// or backtrace, and one user-facing line of stderr (clap's `error:` or the binary's own
/// `lanyard-...:` prefix, never a log line) names the cause: it contains every needle,
/// compared case-insensitively. Returns that line.
pub fn assert_refused(f: &Finished, needles: &[&str]) -> String {
    let status = f
        .status
        .unwrap_or_else(|| panic!("did not exit within its deadline: {}", f.describe()));
    assert!(
        !status.success(),
        "succeeded although it should have been refused: {}",
        f.describe()
    );
    assert!(
        status.code().is_some(),
        "died by a signal instead of exiting: {}",
        f.describe()
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(
            !f.stderr.contains(bad),
            "stderr shows a panic or stack trace ({bad}): {}",
            f.describe()
        );
    }
    f.stderr
        .lines()
        .filter(|l| {
            l.starts_with("error:")
                || l.starts_with("lanyard-server: ")
                || l.starts_with("lanyard-agent: ")
        })
        .find(|l| {
            let lower = l.to_lowercase();
            needles.iter().all(|n| lower.contains(&n.to_lowercase()))
        })
        .unwrap_or_else(|| {
            panic!(
                "no user-facing stderr line names the cause {needles:?}: {}",
                f.describe()
            )
        })
        .to_string()
}

/// As [`assert_refused`], and stderr is exactly that one line.
pub fn assert_refused_one_line(f: &Finished, needles: &[&str]) -> String {
    let line = assert_refused(f, needles);
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines,
        vec![line.as_str()],
        "expected exactly one line on stderr: {}",
        f.describe()
    );
    line
}

/// A process a test started itself, stderr appended to `log`; killed when dropped.
#[derive(Debug)]
pub struct Spawned {
    pub log: PathBuf,
    child: Option<Child>,
}

impl Spawned {
    pub fn start(cmd: &mut Command, log: &Path) -> Spawned {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Spawned {
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("still running")
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for it to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then waits for it (killing it after 10 s).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `check` holds, failing the test after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// `lanyard-agent run` for a fresh agent of `server` under `root`: its own data_dir
/// (`root/agent-data`) and socket (`root/agent-run/api.sock`), the bootstrap bundle
/// written to `root/bootstrap.pem`, and nothing inherited from the test's environment
/// (no token, no config file, no NOTIFY_SOCKET).
pub fn agent_command(root: &Path, server: &Server) -> Command {
    agent_command_at(
        root,
        server,
        &root.join("agent-data"),
        &root.join("agent-run").join("api.sock"),
    )
}

/// As [`agent_command`], with the given data_dir and socket.
pub fn agent_command_at(root: &Path, server: &Server, data_dir: &Path, socket: &Path) -> Command {
    std::fs::create_dir_all(root).expect("agent root");
    let bundle = root.join("bootstrap.pem");
    std::fs::write(&bundle, server.bundle_pem()).expect("bundle");
    let mut cmd = Command::new(bin("lanyard-agent"));
    cmd.args([
        "run",
        "--trust-domain",
        &server.trust_domain,
        "--server-address",
        &server.address,
    ])
    .arg("--trust-bundle-path")
    .arg(&bundle)
    .arg("--data-dir")
    .arg(data_dir)
    .arg("--socket-path")
    .arg(socket)
    .env_remove("LANYARD_JOIN_TOKEN")
    .env_remove("LANYARD_AGENT_CONFIG")
    .env_remove("NOTIFY_SOCKET");
    cmd
}

/// `lanyard-agent healthcheck` succeeds on `socket`.
pub fn agent_healthy(socket: &Path) -> bool {
    crate::run(
        Command::new(bin("lanyard-agent"))
            .arg("healthcheck")
            .arg("--socket-path")
            .arg(socket),
    )
    .status
    .success()
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).expect("read");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}
