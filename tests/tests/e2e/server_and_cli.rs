//! End-to-end tests of the server's CLI and agent API against the real binaries: join
//! tokens, what `SignX509Svids` refuses (driven over mTLS with an attested agent's own
//! credentials), persistence across restarts, eviction, and how every kind of bad input
//! is reported. Each test starts its own processes in its own temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lanyard_proto::agent::{SignX509SvidsRequest, SvidRequest, SvidResult};
use lanyard_tests::tls::{AgentCreds, agent_api, anchors, csr, fresh_key, verify_path};
use lanyard_tests::{Agent, Server, TrustDomain, bin, my_uid, ok, run, unix_now};
use rustls_pki_types::{CertificateDer, UnixTime};

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A process that ran to completion (or was killed at its deadline).
#[derive(Debug)]
struct Finished {
    what: String,
    /// `None` when it had to be killed at the deadline.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Finished {
    fn describe(&self) -> String {
        format!(
            "{} ({:?} after {:.1}s)\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd`, killing it if it has not finished within `limit`.
fn run_for(cmd: &mut Command, limit: Duration) -> Finished {
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
fn run_quick(cmd: &mut Command) -> Finished {
    run_for(cmd, Duration::from_secs(20))
}

/// Asserts that a command failed cleanly: it exited (no hang) non-zero, printed no panic
/// or backtrace, and one user-facing line of stderr (clap's `error:` or the binary's own
/// `lanyard-...:` prefix, never a log line) names the cause: it contains every needle,
/// compared case-insensitively. Returns that line.
fn assert_refused(f: &Finished, needles: &[&str]) -> String {
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
    let line = f
        .stderr
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
        });
    line.to_string()
}

/// As [`assert_refused`], and stderr is exactly that one line (admin client errors).
fn assert_refused_one_line(f: &Finished, needles: &[&str]) -> String {
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

/// `lanyard-agent run` for a fresh agent of `server` under `root` (its own data_dir and
/// socket), with the bootstrap bundle written there.
fn fresh_agent_command(root: &Path, server: &Server, token: Option<&str>) -> Command {
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
    .arg(root.join("agent-data"))
    .arg("--socket-path")
    .arg(root.join("agent-run").join("api.sock"))
    .env_remove("LANYARD_JOIN_TOKEN")
    .env_remove("LANYARD_AGENT_CONFIG");
    if let Some(t) = token {
        // From the environment, never the command line (other users read argv).
        cmd.env("LANYARD_JOIN_TOKEN", t);
    }
    cmd
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `entry show --output json`: the entries, sorted by id.
fn entries(server: &Server) -> Vec<serde_json::Value> {
    let v = json(&ok(&mut server.cli(&["entry", "show", "--output", "json"])));
    let mut list = v["entries"].as_array().expect("entries array").clone();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    list
}

/// `agent list --output json`: the agents.
fn agents(server: &Server) -> Vec<serde_json::Value> {
    let v = json(&ok(&mut server.cli(&["agent", "list", "--output", "json"])));
    v["agents"].as_array().expect("agents array").clone()
}

/// The SPIFFE ID of the agent that attested with `token`: named after the token's ID
/// (never the token), and holding the node selector `join_token:<token id>`.
fn agent_id_for_token(server: &Server, token: &str) -> String {
    let id = lanyard_tests::join_token_agent_id(&server.trust_domain, token);
    let selector = format!("join_token:{}", lanyard_tests::join_token_id(token));
    let all = agents(server);
    let agent = all
        .iter()
        .find(|a| a["spiffe_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no agent {id} attested with {token}: {all:?}"));
    assert!(
        agent["selectors"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s.as_str() == Some(selector.as_str()))),
        "agent {id} lacks the selector {selector}: {agent}"
    );
    assert!(!id.contains(token), "the agent ID reveals the token");
    id
}

/// The SPIFFE IDs `lanyard-agent api fetch x509` gets for this process, sorted; `None`
/// when the fetch fails.
fn fetched_ids(agent: &Agent) -> Option<Vec<String>> {
    let out = run(agent
        .cli(&["api", "fetch", "x509", "--output", "json"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET"));
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut ids: Vec<String> = v["svids"]
        .as_array()?
        .iter()
        .filter_map(|s| s["spiffe_id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Some(ids)
}

/// Waits until the fetched IDs are exactly `want`; returns how long it took.
fn wait_for_ids(agent: &Agent, want: &[&str], limit: Duration) -> Duration {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        last = fetched_ids(agent);
        if last.as_ref() == Some(&want) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the agent did not serve {want:?} within {limit:?} (last fetch: {last:?})\nagent log:\n{}",
        agent.log()
    );
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-cli")
        .tempdir()
        .expect("tempdir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn assert_refused_result(what: &str, r: &SvidResult, needles: &[&str]) {
    assert!(
        r.x509_svid_chain.is_empty(),
        "{what}: a certificate was issued although it must be refused: {r:?}"
    );
    assert!(
        !r.error.is_empty(),
        "{what}: refused without a reason: {r:?}"
    );
    let lower = r.error.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "{what}: error {:?} does not mention {n:?}",
            r.error
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Join tokens
// ---------------------------------------------------------------------------------------

#[test]
fn join_token_is_one_time_and_unknown_tokens_are_refused() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(None);
    let first = Agent::start(dir.path(), &server, Some(&token));
    let first_id = agent_id_for_token(&server, &token);
    let before = agents(&server);

    // The same token again, on a different node (its own data_dir and socket).
    let again = run_for(
        &mut fresh_agent_command(&dir.path().join("second"), &server, Some(&token)),
        Duration::from_secs(30),
    );
    assert_refused(&again, &["already used"]);
    assert!(
        again.elapsed < Duration::from_secs(10),
        "a used token must fail at once, not be retried: {}",
        again.describe()
    );

    let unknown = run_for(
        &mut fresh_agent_command(
            &dir.path().join("third"),
            &server,
            Some("no-such-token-0123"),
        ),
        Duration::from_secs(30),
    );
    assert_refused(&unknown, &["unknown"]);
    assert!(
        unknown.elapsed < Duration::from_secs(10),
        "an unknown token must fail at once: {}",
        unknown.describe()
    );

    // Neither refusal recorded an agent, and the first agent keeps its identity.
    let after = agents(&server);
    assert_eq!(
        after.len(),
        before.len(),
        "refused attestations changed the agent list: {after:?}"
    );
    assert!(
        after.iter().any(|a| a["spiffe_id"] == first_id.as_str()),
        "first agent {first_id} is gone: {after:?}"
    );
    assert!(
        !dir.path()
            .join("second")
            .join("agent-data")
            .join("agent_svid.key")
            .exists(),
        "a refused agent stored a key"
    );
    drop(first);

    // The CLI refuses a token lifetime below the minimum before asking the server.
    let short = run_quick(&mut server.cli(&["token", "generate", "--ttl", "5"]));
    let line = assert_refused(&short, &["ttl", "5"]);
    assert!(
        line.contains("10"),
        "the message should name the minimum (10 s): {line}"
    );
}

#[test]
fn expired_join_token_is_refused() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let out = ok(&mut server.cli(&["token", "generate", "--ttl", "10", "--output", "json"]));
    let v = json(&out);
    let token = v["token"].as_str().expect("token").to_string();
    let expires_at = v["expires_at"].as_i64().expect("expires_at");
    assert!(
        expires_at > unix_now() && expires_at <= unix_now() + 11,
        "ttl 10 gave expires_at {expires_at}"
    );
    while unix_now() <= expires_at {
        std::thread::sleep(Duration::from_millis(250));
    }
    let late = run_for(
        &mut fresh_agent_command(&dir.path().join("late"), &server, Some(&token)),
        Duration::from_secs(30),
    );
    assert_refused(&late, &["expired"]);
    assert!(
        late.elapsed < Duration::from_secs(10),
        "an expired token must fail at once: {}",
        late.describe()
    );
    assert!(
        agents(&server).is_empty(),
        "an expired token attested an agent"
    );
}

// ---------------------------------------------------------------------------------------
// 2. SignX509Svids signs only what the calling agent may have
// ---------------------------------------------------------------------------------------

#[test]
fn sign_x509_svids_signs_only_authorized_fresh_matching_csrs() {
    let td = TrustDomain::start();
    // A second agent with its own token and an entry parented to it.
    let other_token = td.server.token(None);
    let other_root = td.dir.path().join("other");
    std::fs::create_dir_all(&other_root).expect("dir");
    let _other = Agent::start(&other_root, &td.server, Some(&other_token));
    let other_id = agent_id_for_token(&td.server, &other_token);

    let mine_id = "spiffe://example.org/wl/mine";
    let theirs_id = "spiffe://example.org/wl/theirs";
    let mine = td.register_uid(mine_id, 4001, &[]);
    let theirs = td
        .server
        .create_entry(theirs_id, &other_id, &["unix:uid:4002"], &[]);
    let alias_entry = entries(&td.server)
        .into_iter()
        .find(|e| e["spiffe_id"] == td.runner.as_str())
        .and_then(|e| e["id"].as_str().map(str::to_string))
        .expect("node alias entry");

    let creds = AgentCreds::load(&td.agent.data_dir);
    let agent_key = rcgen::KeyPair::from_pem(&creds.key_pem).expect("agent key");
    let good_key = fresh_key();
    let good_csr = csr(&good_key, mine_id);
    let mut broken_csr = csr(&fresh_key(), mine_id);
    *broken_csr.last_mut().expect("non-empty") ^= 0x01;

    let requests = vec![
        SvidRequest {
            entry_id: theirs.clone(),
            csr: csr(&fresh_key(), theirs_id),
        },
        SvidRequest {
            entry_id: mine.clone(),
            csr: csr(&fresh_key(), theirs_id),
        },
        SvidRequest {
            entry_id: mine.clone(),
            csr: csr(&agent_key, mine_id),
        },
        SvidRequest {
            entry_id: mine.clone(),
            csr: broken_csr,
        },
        SvidRequest {
            entry_id: mine.clone(),
            csr: good_csr,
        },
        SvidRequest {
            entry_id: alias_entry.clone(),
            csr: csr(&fresh_key(), &td.runner),
        },
        SvidRequest {
            entry_id: "no-such-entry".into(),
            csr: csr(&fresh_key(), mine_id),
        },
    ];
    let rt = runtime();
    let results = rt.block_on(async {
        let mut client = agent_api(&td.server.address, &creds.bundle, Some(&creds)).await;
        client
            .sign_x509_svids(SignX509SvidsRequest {
                requests: requests.clone(),
            })
            .await
            .expect("SignX509Svids")
            .into_inner()
            .results
    });
    assert_eq!(
        results.len(),
        requests.len(),
        "one result per request: {results:?}"
    );
    for (req, res) in requests.iter().zip(&results) {
        assert_eq!(
            req.entry_id, res.entry_id,
            "results must come in request order"
        );
    }

    // (a) another agent's entry.
    assert_refused_result("entry of another agent", &results[0], &["not authorized"]);
    // (b) an authorized entry, but the CSR names a different SPIFFE ID.
    assert_refused_result("CSR for another ID", &results[1], &[theirs_id, mine_id]);
    // (c) the agent's own key is not a fresh workload key.
    assert_refused_result("CSR with the agent's key", &results[2], &["not fresh"]);
    // (d) a CSR whose signature does not verify.
    assert_refused_result("CSR with a broken signature", &results[3], &["signature"]);
    // The node alias entry (parented to the server) is not a workload entry of this agent.
    assert_refused_result("node alias entry", &results[5], &["not authorized"]);
    assert_refused_result("unknown entry", &results[6], &["not authorized"]);

    // (e) a good CSR: a valid X509-SVID for the entry's ID, for the CSR's key, signed by the CA.
    let good = &results[4];
    assert!(good.error.is_empty(), "good CSR refused: {}", good.error);
    let leaf = good
        .x509_svid_chain
        .first()
        .expect("a certificate for the good CSR");
    let info = lanyard_proto::svid::check_leaf(leaf, None)
        .expect("issued certificate follows the X509-SVID profile");
    assert_eq!(info.spiffe_id.as_str(), mine_id);
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).expect("DER");
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        good_key.public_key_raw(),
        "not the CSR's key"
    );
    let intermediates: Vec<CertificateDer<'_>> = good.x509_svid_chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verify_path(
        &anchors(&creds.bundle),
        &CertificateDer::from(leaf.as_slice()),
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("issued SVID chains to the bundle");

    // Without a client certificate the call is UNAUTHENTICATED (and nothing is signed).
    let status = rt.block_on(async {
        let mut anonymous = agent_api(&td.server.address, &creds.bundle, None).await;
        let req = SignX509SvidsRequest {
            requests: vec![SvidRequest {
                entry_id: mine.clone(),
                csr: csr(&fresh_key(), mine_id),
            }],
        };
        anonymous
            .sign_x509_svids(req)
            .await
            .expect_err("SignX509Svids without a client certificate")
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

// ---------------------------------------------------------------------------------------
// 3. Persistence across restarts
// ---------------------------------------------------------------------------------------

#[test]
fn state_survives_server_and_agent_restarts() {
    let mut td = TrustDomain::start();
    let uid = my_uid();
    let one = "spiffe://example.org/wl/one";
    td.register_uid(one, uid, &[]);
    td.register_uid(
        "spiffe://example.org/wl/someone-else",
        uid + 4242,
        &["--x509-svid-ttl", "600", "--hint", "h"],
    );
    wait_for_ids(&td.agent, &[one], Duration::from_secs(15));

    let entries_before = entries(&td.server);
    assert_eq!(
        entries_before.len(),
        3,
        "alias + 2 entries: {entries_before:?}"
    );
    let bundle_before = td.server.bundle_pem();
    assert!(
        bundle_before.contains("BEGIN CERTIFICATE"),
        "{bundle_before}"
    );
    let agents_before = agents(&td.server);
    assert_eq!(agents_before.len(), 1, "{agents_before:?}");

    td.server.restart(&[]);
    assert_eq!(
        entries(&td.server),
        entries_before,
        "entries changed across a server restart"
    );
    assert_eq!(
        td.server.bundle_pem(),
        bundle_before,
        "the CA changed across a server restart"
    );
    let agents_after = agents(&td.server);
    assert_eq!(agents_after.len(), 1, "{agents_after:?}");
    assert_eq!(agents_after[0]["spiffe_id"], agents_before[0]["spiffe_id"]);
    assert_eq!(
        agents_after[0]["x509_svid_serial"],
        agents_before[0]["x509_svid_serial"]
    );
    assert_eq!(
        agents_after[0]["aliases"], agents_before[0]["aliases"],
        "the node alias was lost"
    );

    // The running agent reconnects by itself: an entry created now reaches it.
    assert!(
        fetched_ids(&td.agent).is_some_and(|ids| ids == [one]),
        "the agent stopped serving its cached SVID"
    );
    let two = "spiffe://example.org/wl/two";
    td.register_uid(two, uid, &[]);
    let took = wait_for_ids(&td.agent, &[one, two], Duration::from_secs(15));
    assert!(
        took < Duration::from_secs(10),
        "new entry took {took:?} to reach the reconnected agent"
    );

    // An agent restart without a token reloads its SVID from data_dir.
    td.agent.restart();
    wait_for_ids(&td.agent, &[one, two], Duration::from_secs(10));
    assert_eq!(
        agents(&td.server).len(),
        1,
        "the restarted agent should not be a new agent"
    );

    assert_eq!(
        mode(&td.agent.data_dir.join("agent_svid.key")),
        0o600,
        "agent_svid.key mode"
    );
    assert_eq!(
        mode(&td.server.data_dir.join("ca.key")),
        0o600,
        "ca.key mode"
    );
    assert_eq!(
        mode(&td.agent.data_dir) & 0o077,
        0,
        "agent data_dir must not be open to others"
    );
    assert_eq!(
        mode(&td.server.data_dir) & 0o077,
        0,
        "server data_dir must not be open to others"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Eviction
// ---------------------------------------------------------------------------------------

#[test]
fn evicted_agent_exits_and_needs_a_new_join_token() {
    let mut td = TrustDomain::start();
    let listed = agents(&td.server);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let agent_id = listed[0]["spiffe_id"]
        .as_str()
        .expect("agent id")
        .to_string();
    // Keep a copy of the agent's credentials: they must stop working.
    let creds = AgentCreds::load(&td.agent.data_dir);

    let evict = run_quick(&mut td.server.cli(&["agent", "evict", "--spiffe-id", &agent_id]));
    assert!(
        evict.status.is_some_and(|s| s.success()),
        "evict failed: {}",
        evict.describe()
    );

    wait_until("the evicted agent to stop", Duration::from_secs(10), || {
        td.agent.log().contains("lanyard-agent: ")
    });
    let status = td.agent.stop().expect("agent status");
    assert!(
        !status.success(),
        "an evicted agent must exit non-zero, got {status}\n{}",
        td.agent.log()
    );
    let log = td.agent.log();
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("lanyard-agent: "))
        .expect("final message");
    assert!(
        last.contains("evicted") && last.contains("join token"),
        "unclear eviction message: {last}"
    );
    assert!(!log.contains("panicked"), "{log}");

    assert!(
        agents(&td.server)
            .iter()
            .all(|a| a["spiffe_id"] != agent_id.as_str()),
        "agent list still shows the evicted agent"
    );

    // The old SVID no longer authenticates.
    let status = runtime().block_on(async {
        let mut client = agent_api(&td.server.address, &creds.bundle, Some(&creds)).await;
        client
            .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
            .await
            .expect_err("evicted SVID accepted")
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Without a token it cannot come back.
    let restart = run_quick(
        td.agent
            .command(None)
            .env_remove("LANYARD_JOIN_TOKEN")
            .env_remove("LANYARD_AGENT_CONFIG"),
    );
    assert_refused(&restart, &["join-token"]);
}

// ---------------------------------------------------------------------------------------
// 5. Bad input
// ---------------------------------------------------------------------------------------

#[test]
fn entry_commands_refuse_bad_input_and_write_nothing() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let parent = "spiffe://example.org/runner";
    server.create_entry(
        "spiffe://example.org/existing",
        parent,
        &["unix:uid:1000"],
        &[],
    );
    let before = entries(&server);
    assert_eq!(before.len(), 1);

    let create = |spiffe_id: &str, parent_id: &str, selector: &str, extra: &[&str]| {
        run_quick(&mut server.entry_create(spiffe_id, parent_id, &[selector], extra))
    };
    let cases: Vec<(&str, Finished, Vec<&str>)> = vec![
        (
            "uppercase trust domain",
            create("spiffe://Example.org/x", parent, "unix:uid:1", &[]),
            vec!["spiffe://Example.org/x", "lowercase"],
        ),
        (
            "not spiffe",
            create("http://x/y", parent, "unix:uid:1", &[]),
            vec!["http://x/y", "spiffe://"],
        ),
        (
            "dot-dot segment",
            create("spiffe://example.org/a/../b", parent, "unix:uid:1", &[]),
            vec!["a/../b", ".."],
        ),
        (
            "selector without type",
            create("spiffe://example.org/a", parent, "uid1001", &[]),
            vec!["uid1001", "type"],
        ),
        (
            "parent in another trust domain",
            create(
                "spiffe://example.org/a",
                "spiffe://other.org/p",
                "unix:uid:1",
                &[],
            ),
            vec!["other.org", "trust domain"],
        ),
        (
            "unknown flag",
            create("spiffe://example.org/a", parent, "unix:uid:1", &["--bogus"]),
            vec!["--bogus"],
        ),
        (
            "ttl too short",
            create(
                "spiffe://example.org/a",
                parent,
                "unix:uid:1",
                &["--x509-svid-ttl", "5"],
            ),
            vec!["x509-svid-ttl", "5"],
        ),
        (
            "reserved path",
            create(
                "spiffe://example.org/lanyard/agent/x",
                parent,
                "unix:uid:1",
                &[],
            ),
            vec!["reserved"],
        ),
        (
            "duplicate",
            create(
                "spiffe://example.org/existing",
                parent,
                "unix:uid:1000",
                &[],
            ),
            vec!["already exists"],
        ),
        (
            "delete unknown id",
            run_quick(&mut server.cli(&["entry", "delete", "--id", "nope"])),
            vec!["nope", "no entry"],
        ),
    ];
    for (what, finished, needles) in &cases {
        let line = assert_refused(finished, needles);
        assert!(!line.is_empty(), "{what}");
        if line.starts_with("lanyard-server: ") {
            // Refused by the server: exactly one line.
            assert_refused_one_line(finished, needles);
        }
    }
    assert_eq!(
        entries(&server),
        before,
        "refused commands changed the stored entries"
    );
}

#[test]
fn config_errors_exit_78_and_name_the_cause() {
    let dir = tempdir();
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    };
    let server_run = |config: &Path| {
        let mut cmd = Command::new(bin("lanyard-server"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("LANYARD_SERVER_CONFIG");
        run_quick(&mut cmd)
    };
    let agent_run = |config: &Path| {
        let mut cmd = Command::new(bin("lanyard-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("LANYARD_JOIN_TOKEN")
            .env_remove("LANYARD_AGENT_CONFIG");
        run_quick(&mut cmd)
    };
    let good_server = "trust_domain = \"example.org\"\n";
    let unknown_key = write("unknown.toml", &format!("{good_server}bogus_key = 1\n"));
    let syntax = write("syntax.toml", "trust_domain = \n");
    let bad_td = write("badtd.toml", "trust_domain = \"Example.org\"\n");
    let missing = dir.path().join("does-not-exist.toml");
    let agent_base = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:1\"\n";
    let agent_unknown = write(
        "agent-unknown.toml",
        &format!("{agent_base}insecure_bootstrap = true\nbogus_key = 2\n"),
    );
    let agent_syntax = write("agent-syntax.toml", "trust_domain = [\n");
    let agent_no_bundle = write("agent-nobundle.toml", agent_base);

    let cases: Vec<(&str, Finished, Vec<&str>)> = vec![
        (
            "server: unknown key",
            server_run(&unknown_key),
            vec!["bogus_key"],
        ),
        (
            "server: syntax error",
            server_run(&syntax),
            vec!["syntax.toml", "line 1"],
        ),
        (
            "server: bad trust domain",
            server_run(&bad_td),
            vec!["Example.org", "trust_domain"],
        ),
        (
            "server: missing file",
            server_run(&missing),
            vec!["does-not-exist.toml", "cannot read"],
        ),
        (
            "agent: unknown key",
            agent_run(&agent_unknown),
            vec!["bogus_key"],
        ),
        (
            "agent: syntax error",
            agent_run(&agent_syntax),
            vec!["agent-syntax.toml", "line 1"],
        ),
        (
            "agent: no bootstrap",
            agent_run(&agent_no_bundle),
            vec!["trust_bundle_path", "insecure_bootstrap"],
        ),
    ];
    for (what, finished, needles) in &cases {
        assert_refused_one_line(finished, needles);
        assert_eq!(
            finished.status.and_then(|s| s.code()),
            Some(78),
            "{what}: config errors exit 78: {}",
            finished.describe()
        );
    }

    // The same without a file: flags only, no bundle and no insecure_bootstrap.
    let mut cmd = Command::new(bin("lanyard-agent"));
    cmd.args([
        "run",
        "--trust-domain",
        "example.org",
        "--server-address",
        "127.0.0.1:1",
    ])
    .arg("--data-dir")
    .arg(dir.path().join("agent-data"))
    .env_remove("LANYARD_AGENT_CONFIG");
    let flags = run_quick(&mut cmd);
    assert_refused_one_line(&flags, &["trust_bundle_path", "insecure_bootstrap"]);
    assert_eq!(
        flags.status.and_then(|s| s.code()),
        Some(78),
        "{}",
        flags.describe()
    );
    assert!(
        !dir.path().join("agent-data").exists(),
        "a refused config still created data_dir"
    );
}

#[test]
fn clients_say_when_they_cannot_reach_the_daemon() {
    let fetch = run_quick(
        Command::new(bin("lanyard-agent"))
            .args(["api", "fetch", "x509", "--socket-path", "/nonexistent.sock"])
            .env_remove("SPIFFE_ENDPOINT_SOCKET"),
    );
    assert_refused_one_line(&fetch, &["cannot reach", "/nonexistent.sock"]);

    let dir = tempdir();
    let mut server = Server::start(dir.path(), "example.org", &[]);
    server.stop();
    let commands: Vec<Vec<&str>> = vec![
        vec!["entry", "show"],
        vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/a",
            "--parent-id",
            "spiffe://example.org/p",
            "--selector",
            "unix:uid:1",
        ],
        vec!["entry", "delete", "--id", "x"],
        vec!["token", "generate"],
        vec!["agent", "list"],
        vec![
            "agent",
            "evict",
            "--spiffe-id",
            "spiffe://example.org/lanyard/agent/join_token/x",
        ],
        vec!["bundle", "show"],
        vec!["healthcheck"],
    ];
    for args in &commands {
        let finished = run_quick(server.cli(args).env_remove("LANYARD_ADMIN_SOCKET"));
        assert_refused_one_line(&finished, &["cannot reach the server"]);
    }
}
