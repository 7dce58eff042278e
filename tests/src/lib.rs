//! A small harness for end-to-end tests and benchmarks: start the real `lanyard-server`
//! and `lanyard-agent` binaries in temporary directories, drive their CLIs, and stop
//! them. The binaries must be built first (`cargo build --workspace --bins`; the README's
//! test command does this); a missing binary fails loudly.

pub mod commands;
pub mod workload;

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

/// A daemon the harness started: stdout to /dev/null, stderr appended to `log`; killed
/// when dropped.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn new(name: &'static str, log: PathBuf) -> Daemon {
        Daemon {
            name,
            log,
            child: None,
        }
    }

    /// Starts `cmd` and waits until `ready` says `what` is up; fails at once, with the
    /// log, if the process exits first.
    fn start(&mut self, cmd: &mut Command, what: &str, mut ready: impl FnMut() -> bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.name));
        self.child = Some(child);
        wait_until(what, Duration::from_secs(15), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{} exited early ({status}):\n{}", self.name, self.log());
            }
            ready()
        });
    }

    /// Stops it (SIGTERM) and returns its exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| terminate(&mut c))
    }

    /// Its log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `lanyard-server` with its own data directory and admin socket.
#[derive(Debug)]
pub struct Server {
    pub trust_domain: String,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub address: String,
    pub log: PathBuf,
    daemon: Daemon,
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
        let log = root.join("server.log");
        let mut server = Server {
            trust_domain: trust_domain.to_string(),
            data_dir: root.join("server-data"),
            admin_socket: admin_dir.join("admin.sock"),
            address: format!("127.0.0.1:{}", free_port()),
            log: log.clone(),
            daemon: Daemon::new("lanyard-server", log),
        };
        server.spawn(extra);
        server
    }

    fn spawn(&mut self, extra: &[&str]) {
        let mut cmd = Command::new(bin("lanyard-server"));
        cmd.args([
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
        .args(extra);
        let admin = &self.admin_socket;
        self.daemon
            .start(&mut cmd, "the server's admin socket", || {
                run(Command::new(bin("lanyard-server"))
                    .arg("healthcheck")
                    .arg("--admin-socket")
                    .arg(admin))
                .status
                .success()
            });
    }

    /// Stops the server (SIGTERM) and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.stop()
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
        out.lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .unwrap_or_else(|| panic!("unexpected token output {out:?}"))
            .trim()
            .to_string()
    }

    /// An `entry create` command (not yet run) for `spiffe_id` under `parent_id` with
    /// `selectors` and `extra` flags.
    pub fn entry_create(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
        ]);
        for s in selectors {
            cmd.args(["--selector", s]);
        }
        cmd.args(extra);
        cmd
    }

    /// Registers an entry and returns its id.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> String {
        let out = ok(self
            .entry_create(spiffe_id, parent_id, selectors, extra)
            .args(["--output", "json"]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("entry json");
        v["id"].as_str().expect("id").to_string()
    }

    /// The bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        ok(&mut self.cli(&["bundle", "show"]))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// A running `lanyard-agent`.
#[derive(Debug)]
pub struct Agent {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// A command the agent runs under (e.g. `unshare --pid --fork`), if any.
    wrapper: Vec<String>,
    daemon: Daemon,
}

impl Agent {
    /// Starts an agent of `server` under `root`, attesting with `token` if given.
    pub fn start(root: &Path, server: &Server, token: Option<&str>) -> Agent {
        Self::start_wrapped(root, server, token, &[])
    }

    /// Like [`start`](Self::start), with the agent run under `wrapper` (a command and
    /// its arguments, e.g. `unshare --pid --fork --mount-proc --kill-child --`).
    pub fn start_wrapped(
        root: &Path,
        server: &Server,
        token: Option<&str>,
        wrapper: &[&str],
    ) -> Agent {
        let bundle = root.join("bootstrap.pem");
        std::fs::write(&bundle, server.bundle_pem()).expect("bundle");
        let log = root.join("agent.log");
        let mut agent = Agent {
            data_dir: root.join("agent-data"),
            socket: root.join("agent-run").join("api.sock"),
            log: log.clone(),
            args: vec![
                "run".into(),
                "--trust-domain".into(),
                server.trust_domain.clone(),
                "--server-address".into(),
                server.address.clone(),
                "--trust-bundle-path".into(),
                bundle.display().to_string(),
            ],
            wrapper: wrapper.iter().map(ToString::to_string).collect(),
            daemon: Daemon::new("lanyard-agent", log),
        };
        agent.spawn(token);
        agent
    }

    /// The agent command line for `run` (without token), for tests that drive it themselves.
    pub fn command(&self, token: Option<&str>) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("lanyard-agent"));
                cmd
            }
            None => Command::new(bin("lanyard-agent")),
        };
        cmd.args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--socket-path")
            .arg(&self.socket);
        if let Some(t) = token {
            // From the environment, never the command line (other users read argv).
            cmd.env("LANYARD_JOIN_TOKEN", t);
        }
        cmd
    }

    fn spawn(&mut self, token: Option<&str>) {
        let mut cmd = self.command(token);
        let socket = &self.socket;
        self.daemon
            .start(&mut cmd, "the agent's Workload API socket", || {
                socket.exists()
                    && run(Command::new(bin("lanyard-agent"))
                        .arg("healthcheck")
                        .arg("--socket-path")
                        .arg(socket))
                    .status
                    .success()
            });
    }

    /// `unix:///...` for SPIFFE_ENDPOINT_SOCKET and client libraries.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops the agent (SIGTERM) and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.stop()
    }

    /// The pid of the process the harness started (the wrapper's, when there is one).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.child.as_ref().map(Child::id)
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
        self.daemon.log()
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
        Self::start_wrapped(server_args, &[])
    }

    /// Like [`start_with`](Self::start_with), with the agent run under `wrapper` (see
    /// [`Agent::start_wrapped`]).
    pub fn start_wrapped(server_args: &[&str], wrapper: &[&str]) -> TrustDomain {
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
        let agent = Agent::start_wrapped(dir.path(), &server, Some(&token), wrapper);
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

/// The ID of a join token as the server derives it: the first 32 hex digits of the
/// token's SHA-256 (the token itself never appears in IDs, selectors or the datastore).
pub fn join_token_id(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SPIFFE ID of the agent that attests with `token` in `trust_domain`.
pub fn join_token_agent_id(trust_domain: &str, token: &str) -> String {
    format!(
        "spiffe://{trust_domain}/lanyard/agent/join_token/{}",
        join_token_id(token)
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// TLS as the tests and the benchmark speak it: a SPIFFE check of a server's certificate
/// for rustls, an agent's stored credentials, an mTLS client of the server's agent API,
/// and CSRs as the agent makes them.
pub mod tls {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use lanyard_proto::agent::agent_service_client::AgentServiceClient;
    use lanyard_proto::svid::spiffe_id_of;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
    use tonic::transport::{Channel, Endpoint};

    /// The ID the server's TLS certificate must carry, and nothing else (the harness's
    /// trust domain is `example.org`).
    pub const SERVER_ID: &str = "spiffe://example.org/lanyard/server";

    /// The ring provider, selected explicitly so nothing falls back to aws-lc.
    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The trust anchors of a bundle; a certificate that cannot be one fails loudly.
    pub fn anchors(bundle: &[CertificateDer<'_>]) -> Vec<TrustAnchor<'static>> {
        bundle
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .expect("bundle CA is a usable trust anchor")
                    .to_owned()
            })
            .collect()
    }

    /// RFC 5280 path validation (webpki, the ring provider's algorithms) of `leaf` and
    /// `intermediates` to `roots`, for `usage`.
    pub fn verify_path(
        roots: &[TrustAnchor<'_>],
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), webpki::Error> {
        webpki::EndEntityCert::try_from(leaf)?
            .verify_for_usage(
                provider().signature_verification_algorithms.all,
                roots,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
    }

    /// A rustls server-certificate check for SPIFFE: path validation against the bundle
    /// (serverAuth), then the certificate's only URI SAN must be exactly the expected ID;
    /// another ID is `ApplicationVerificationFailure`. The TLS server name is ignored, as
    /// SPIFFE authenticates by ID (and the agent may reach the server by any address).
    #[derive(Debug)]
    pub struct SpiffeIdVerifier {
        roots: Vec<TrustAnchor<'static>>,
        expected: String,
        provider: Arc<CryptoProvider>,
    }

    impl SpiffeIdVerifier {
        /// Accepts servers that chain to `bundle` and present `expected`.
        pub fn new(bundle: &[CertificateDer<'_>], expected: &str) -> SpiffeIdVerifier {
            SpiffeIdVerifier {
                roots: anchors(bundle),
                expected: expected.to_string(),
                provider: provider(),
            }
        }
    }

    impl ServerCertVerifier for SpiffeIdVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            verify_path(
                &self.roots,
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map_err(|e| {
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(e),
                )))
            })?;
            let id = spiffe_id_of(end_entity).map_err(|e| {
                rustls::Error::General(format!("server certificate is no SVID: {e}"))
            })?;
            if id.as_str() != self.expected {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// An attested agent's credentials as it keeps them in its data_dir.
    #[derive(Debug, Clone)]
    pub struct AgentCreds {
        /// `agent_svid.pem`.
        pub chain: Vec<CertificateDer<'static>>,
        /// `agent_svid.key`.
        pub key_pem: String,
        /// `bundle.pem`.
        pub bundle: Vec<CertificateDer<'static>>,
    }

    impl AgentCreds {
        /// Credentials from an SVID chain (DER, leaf first), its key and a bundle.
        pub fn new(
            chain: Vec<Vec<u8>>,
            key: &rcgen::KeyPair,
            bundle: Vec<CertificateDer<'static>>,
        ) -> AgentCreds {
            AgentCreds {
                chain: chain.into_iter().map(CertificateDer::from).collect(),
                key_pem: key.serialize_pem(),
                bundle,
            }
        }

        /// Reads them from `data_dir`; missing or empty files fail loudly.
        pub fn load(data_dir: &Path) -> AgentCreds {
            let read = |name: &str| {
                let path = data_dir.join(name);
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            };
            let certs = |bytes: &[u8]| {
                CertificateDer::pem_slice_iter(bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .expect("PEM certificates")
            };
            let creds = AgentCreds {
                chain: certs(&read("agent_svid.pem")),
                key_pem: String::from_utf8(read("agent_svid.key")).expect("key PEM"),
                bundle: certs(&read("bundle.pem")),
            };
            assert!(
                !creds.chain.is_empty() && !creds.bundle.is_empty(),
                "agent files in {} are empty",
                data_dir.display()
            );
            creds
        }

        /// The agent's private key.
        pub fn key(&self) -> PrivateKeyDer<'static> {
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("agent key PEM")
        }
    }

    /// A client of the server's agent API at `address` over TLS 1.3 (ALPN h2), that
    /// authenticates the server by `bundle` and [`SERVER_ID`] and presents `client`'s SVID
    /// when given (without it, the server sees an anonymous caller).
    pub async fn agent_api(
        address: &str,
        bundle: &[CertificateDer<'_>],
        client: Option<&AgentCreds>,
    ) -> AgentServiceClient<Channel> {
        let verifier = SpiffeIdVerifier::new(bundle, SERVER_ID);
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match client {
            Some(creds) => builder
                .with_client_auth_cert(creds.chain.clone(), creds.key())
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let address = address.to_string();
        let sni = ServerName::try_from("lanyard-server").expect("sni");
        let channel = Endpoint::from_static("http://lanyard-server")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_| {
                let (connector, address, sni) = (connector.clone(), address.clone(), sni.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(&address).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(sni, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .expect("connect to the agent API");
        AgentServiceClient::new(channel)
    }

    /// The certificates in PEM text (a bundle as `bundle show` prints it).
    pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM certificates")
    }

    /// Attests at the agent API at `address` with `token` as an agent does (anonymous
    /// connection, fresh key, CSR without SAN) and returns the agent's credentials.
    pub async fn attest(
        address: &str,
        bundle: &[CertificateDer<'_>],
        token: &str,
    ) -> Result<AgentCreds, tonic::Status> {
        let key = fresh_key();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("CSR")
            .der()
            .to_vec();
        let reply = agent_api(address, bundle, None)
            .await
            .attest_agent(lanyard_proto::agent::AttestAgentRequest {
                method: "join_token".into(),
                payload: token.as_bytes().to_vec(),
                csr,
            })
            .await?
            .into_inner();
        let roots = reply
            .bundle
            .map(|b| {
                b.x509_authorities
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(AgentCreds::new(reply.x509_svid_chain, &key, roots))
    }

    /// A fresh P-256 key, as the agent makes one for every workload SVID.
    pub fn fresh_key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
    }

    /// A PKCS#10 CSR (DER) for `key` as the agent makes it: empty subject, the single URI
    /// SAN `uri`.
    pub fn csr(key: &rcgen::KeyPair, uri: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("URI"))];
        params.serialize_request(key).expect("CSR").der().to_vec()
    }
}
