//! A small harness for end-to-end tests and benchmarks: start the real `lanyard-server`
//! and `lanyard-agent` binaries in temporary directories, drive their CLIs, and stop
//! them. The binaries must be built first (`cargo build --workspace --bins`; the README's
//! test command does this); a missing binary fails loudly.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary in the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs a command to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout of a command that must succeed.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Sends SIGTERM and waits for the process, killing it if it lingers.
fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    // `kill` from the command line keeps the harness free of unsafe code.
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

/// A running `lanyard-server` with its own data directory and admin socket.
#[derive(Debug)]
pub struct Server {
    pub trust_domain: String,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub address: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// Starts a server for `trust_domain` under `root` (created if needed).
    pub fn start(root: &Path, trust_domain: &str, extra: &[&str]) -> Server {
        let admin_dir = root.join("server-run");
        std::fs::create_dir_all(&admin_dir).expect("admin dir");
        std::fs::set_permissions(
            &admin_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let mut server = Server {
            trust_domain: trust_domain.to_string(),
            data_dir: root.join("server-data"),
            admin_socket: admin_dir.join("admin.sock"),
            address: format!("127.0.0.1:{}", free_port()),
            log: root.join("server.log"),
            child: None,
        };
        server.spawn(extra);
        server
    }

    fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(bin("lanyard-server"))
            .args([
                "run",
                "--trust-domain",
                &self.trust_domain,
                "--bind-address",
                &self.address,
            ])
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lanyard-server");
        self.child = Some(child);
        let admin = self.admin_socket.clone();
        let log = self.log.clone();
        wait_until("the server's admin socket", Duration::from_secs(15), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "lanyard-server exited early ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            run(Command::new(bin("lanyard-server"))
                .arg("healthcheck")
                .arg("--admin-socket")
                .arg(&admin))
            .status
            .success()
        });
    }

    /// Stops the server (SIGTERM) and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| terminate(&mut c))
    }

    /// Starts it again on the same data directory, socket and port.
    pub fn restart(&mut self, extra: &[&str]) {
        self.stop();
        self.spawn(extra);
    }

    /// A `lanyard-server <args> --admin-socket <ours>` command.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("lanyard-server"));
        cmd.args(args).arg("--admin-socket").arg(&self.admin_socket);
        cmd
    }

    /// A join token, optionally with a node alias.
    pub fn token(&self, alias: Option<&str>) -> String {
        let mut args = vec!["token", "generate"];
        if let Some(alias) = alias {
            args.extend(["--spiffe-id", alias]);
        }
        let out = ok(&mut self.cli(&args));
        out.trim()
            .strip_prefix("Token: ")
            .unwrap_or_else(|| panic!("unexpected token output {out:?}"))
            .to_string()
    }

    /// Registers an entry and returns its id.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
            "--output",
            "json",
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        args.extend(extra);
        let out = ok(&mut self.cli(&args));
        let v: serde_json::Value = serde_json::from_str(&out).expect("entry json");
        v["id"].as_str().expect("id").to_string()
    }

    /// The bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        ok(&mut self.cli(&["bundle", "show"]))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `lanyard-agent`.
#[derive(Debug)]
pub struct Agent {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent of `server` under `root`, attesting with `token` if given.
    pub fn start(root: &Path, server: &Server, token: Option<&str>) -> Agent {
        let bundle = root.join("bootstrap.pem");
        std::fs::write(&bundle, server.bundle_pem()).expect("bundle");
        let mut agent = Agent {
            data_dir: root.join("agent-data"),
            socket: root.join("agent-run").join("api.sock"),
            log: root.join("agent.log"),
            args: vec![
                "run".into(),
                "--trust-domain".into(),
                server.trust_domain.clone(),
                "--server-address".into(),
                server.address.clone(),
                "--trust-bundle-path".into(),
                bundle.display().to_string(),
            ],
            child: None,
        };
        agent.spawn(token);
        agent
    }

    /// The agent command line for `run` (without token), for tests that drive it themselves.
    pub fn command(&self, token: Option<&str>) -> Command {
        let mut cmd = Command::new(bin("lanyard-agent"));
        cmd.args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--socket-path")
            .arg(&self.socket);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        cmd
    }

    fn spawn(&mut self, token: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = self
            .command(token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let socket = self.socket.clone();
        let log = self.log.clone();
        wait_until(
            "the agent's Workload API socket",
            Duration::from_secs(15),
            || {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    panic!(
                        "lanyard-agent exited early ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                socket.exists()
                    && run(Command::new(bin("lanyard-agent"))
                        .arg("healthcheck")
                        .arg("--socket-path")
                        .arg(&socket))
                    .status
                    .success()
            },
        );
    }

    /// `unix:///...` for SPIFFE_ENDPOINT_SOCKET and client libraries.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops the agent (SIGTERM) and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| terminate(&mut c))
    }

    /// Starts it again on the same data directory (no token: it reloads its SVID).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(None);
    }

    /// A `lanyard-agent <args> --socket-path <ours>` command.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("lanyard-agent"));
        cmd.args(args).arg("--socket-path").arg(&self.socket);
        cmd
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A server and one join-token agent whose alias is `spiffe://<td>/runner`, the usual
/// starting point of a test. The temporary directory is world-traversable so processes
/// running as other users can reach the Workload API socket.
#[derive(Debug)]
pub struct TrustDomain {
    pub dir: tempfile::TempDir,
    pub server: Server,
    pub agent: Agent,
    /// The agent's node alias, a parent for workload entries.
    pub runner: String,
}

impl TrustDomain {
    pub fn start() -> TrustDomain {
        Self::start_with(&[])
    }

    pub fn start_with(server_args: &[&str]) -> TrustDomain {
        let dir = tempfile::Builder::new()
            .prefix("lanyard-e2e")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let server = Server::start(dir.path(), "example.org", server_args);
        let runner = "spiffe://example.org/runner".to_string();
        let token = server.token(Some(&runner));
        let agent = Agent::start(dir.path(), &server, Some(&token));
        TrustDomain {
            dir,
            server,
            agent,
            runner,
        }
    }

    /// Registers `spiffe_id` for processes of `uid` under this agent; returns the entry id.
    pub fn register_uid(&self, spiffe_id: &str, uid: u32, extra: &[&str]) -> String {
        self.server.create_entry(
            spiffe_id,
            &self.runner,
            &[&format!("unix:uid:{uid}")],
            extra,
        )
    }
}

/// The effective uid of this process (read from /proc so no libc call is needed).
pub fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .expect("uid")
}
