//! Registration against the real server and CLI: selectors in forms no attestor
//! produces, DNS names that would match too much, a workload entry that would take a
//! node alias's ID, TTLs written as durations, entries shown and counted by the server,
//! batches that are all-or-nothing, several deletions at once, the bundle in the SPIFFE
//! format, and the agent commands an operator reaches for (show, ban, unban, agent_ttl).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use lanyard_proto::agent::SignX509SvidsRequest;
use lanyard_tests::tls::{AgentCreds, agent_api, attest, certs_from_pem};
use lanyard_tests::{Agent, Server, TrustDomain, bin, join_token_agent_id, ok, run, unix_now};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-registration")
        .tempdir()
        .expect("tempdir")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn entries(server: &Server) -> Vec<serde_json::Value> {
    let v = json(&ok(&mut server.cli(&["entry", "show", "--output", "json"])));
    v["entries"].as_array().expect("entries").clone()
}

fn count(server: &Server) -> u64 {
    json(&ok(&mut server.cli(&["entry", "count", "--output", "json"])))["count"]
        .as_u64()
        .expect("count")
}

/// Runs a command that must fail with exactly one line on stderr, which must start with
/// `lanyard-server: ` (or clap's `error:`) and contain every needle; returns that line.
fn refused(cmd: &mut Command, needles: &[&str]) -> String {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let line = lines
        .iter()
        .find(|l| l.starts_with("lanyard-server: ") || l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no user-facing line: {stderr}"));
    if line.starts_with("lanyard-server: ") {
        assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    }
    for n in needles {
        assert!(line.contains(n), "{line:?} lacks {n:?}");
    }
    line.to_string()
}

const AGENT: &str =
    "spiffe://example.org/lanyard/agent/join_token/0123456789abcdef0123456789abcdef";

#[test]
fn selectors_in_unknown_or_malformed_forms_are_refused_with_the_known_forms() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    for bad in [
        "uid:1002",
        "unix:uuid:1",
        "unix:uid:abc",
        "unix:path:bin/sh",
    ] {
        let line = refused(
            &mut server.entry_create("spiffe://example.org/a", AGENT, &[bad], &[]),
            &[
                bad,
                "unix:uid:<u32>",
                "unix:sha256:<64 lowercase hex>",
                "unix:path:<absolute path>",
            ],
        );
        assert!(line.contains("workload selectors are:"), "{line}");
    }
    // Node entries take node forms.
    refused(
        &mut server.entry_create(
            "spiffe://example.org/runner",
            "spiffe://example.org/lanyard/server",
            &["unix:uid:1"],
            &[],
        ),
        &["unix:uid:1", "node selectors are: join_token:<token id"],
    );
    refused(
        &mut server.entry_create(
            "spiffe://example.org/a",
            AGENT,
            &["join_token:0123456789abcdef0123456789abcdef"],
            &[],
        ),
        &["is a node selector", "workload entry"],
    );
    server.create_entry(
        "spiffe://example.org/ok",
        AGENT,
        &[
            "unix:uid:1002",
            "unix:user:runner",
            "unix:gid:0",
            "unix:group:wheel",
            "unix:supplementary_gid:27",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/python3",
            &format!("unix:sha256:{}", "0f".repeat(32)),
        ],
        &[],
    );
    assert_eq!(count(&server), 1, "refusals stored nothing");
}

#[test]
fn dns_names_that_would_match_too_much_are_refused() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    for (bad, why) in [
        ("*", "wildcard"),
        ("*.com", "at least two labels after it"),
        ("10.1.2.3", "IP address"),
        ("[::1]", "IP address"),
        ("web.123", "all digits"),
    ] {
        refused(
            &mut server.entry_create(
                "spiffe://example.org/web",
                AGENT,
                &["unix:uid:1"],
                &["--dns-name", bad],
            ),
            &[bad, why],
        );
    }
    let id = server.create_entry(
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1"],
        &["--dns-name", "*.web.example.org"],
    );
    let shown = json(&ok(
        &mut server.cli(&["entry", "show", "--id", &id, "--output", "json"])
    ));
    assert_eq!(
        shown["entries"][0]["dns_names"],
        serde_json::json!(["*.web.example.org"])
    );
}

#[test]
fn a_workload_entry_may_not_take_a_node_alias_id_nor_the_reverse() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let runner = "spiffe://example.org/runner";
    server.token(Some(runner));
    // Parented to another agent, this entry would give that agent every entry parented
    // to the alias.
    refused(
        &mut server.entry_create(runner, AGENT, &["unix:uid:1"], &[]),
        &[
            runner,
            "node entry",
            "would hand the entries parented to it to other agents",
        ],
    );
    let job = "spiffe://example.org/job";
    server.create_entry(job, AGENT, &["unix:uid:1"], &[]);
    refused(
        &mut server.cli(&["token", "generate", "--spiffe-id", job]),
        &[job, "workload entry"],
    );
    refused(
        &mut server.entry_create(
            job,
            "spiffe://example.org/lanyard/server",
            &["join_token:0123456789abcdef0123456789abcdef"],
            &[],
        ),
        &[job, "workload entry"],
    );
    assert_eq!(count(&server), 2, "alias + job");
}

#[test]
fn ttl_flags_take_durations_and_entries_are_shown_counted_and_deleted_by_the_server() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let a = server.create_entry(
        "spiffe://example.org/a",
        AGENT,
        &["unix:uid:1"],
        &["--x509-svid-ttl", "15m"],
    );
    let b = server.create_entry("spiffe://example.org/b", AGENT, &["unix:uid:2"], &[]);
    let c = server.create_entry(
        "spiffe://example.org/c",
        "spiffe://example.org/elsewhere",
        &["unix:uid:3"],
        &[],
    );
    refused(
        &mut server.entry_create(
            "spiffe://example.org/d",
            AGENT,
            &["unix:uid:4"],
            &["--x509-svid-ttl", "5s"],
        ),
        &["--x509-svid-ttl", "at least 10 seconds"],
    );
    let shown = json(&ok(
        &mut server.cli(&["entry", "show", "--id", &a, "--output", "json"])
    ));
    assert_eq!(shown["entries"][0]["x509_svid_ttl"], 900);
    let text = ok(&mut server.cli(&["entry", "show", "--id", &a]));
    assert!(text.contains("X509-SVID TTL    : 15m"), "{text}");
    // Asked of the server: an unknown id is NOT_FOUND, not an empty list.
    refused(
        &mut server.cli(&["entry", "show", "--id", "no-such-id"]),
        &["no entry with id no-such-id"],
    );
    assert_eq!(count(&server), 3);
    let under_agent = json(&ok(&mut server.cli(&[
        "entry",
        "count",
        "--parent-id",
        AGENT,
        "--output",
        "json",
    ])));
    assert_eq!(under_agent["count"], 2);
    assert_eq!(ok(&mut server.cli(&["entry", "count"])).trim(), "3 entries");
    // Several at once, all or nothing.
    refused(
        &mut server.cli(&["entry", "delete", "--id", &a, "--id", "missing", "--id", &b]),
        &["no entry with id missing"],
    );
    assert_eq!(count(&server), 3, "a failed multi-delete deleted nothing");
    let out = json(&ok(&mut server.cli(&[
        "entry", "delete", "--id", &a, "--id", &b, "--output", "json",
    ])));
    assert_eq!(out["deleted"], serde_json::json!([a, b]));
    let left = entries(&server);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], c.as_str());
}

#[test]
fn a_batch_from_a_file_is_created_all_or_nothing() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    server.create_entry("spiffe://example.org/existing", AGENT, &["unix:uid:9"], &[]);
    let file = dir.path().join("entries.json");
    let entry = |n: u32, selector: &str| {
        serde_json::json!({
            "spiffe_id": format!("spiffe://example.org/batch/{n}"),
            "parent_id": AGENT,
            "selectors": [selector],
            "x509_svid_ttl": "1h",
        })
    };
    let write = |entries: Vec<serde_json::Value>| {
        std::fs::write(&file, serde_json::json!({ "entries": entries }).to_string())
            .expect("write");
    };
    let create = || server.cli(&["entry", "create", "--data", file.to_str().expect("utf-8")]);
    // The third entry has a selector no attestor produces: nothing is created.
    write(vec![
        entry(1, "unix:uid:1"),
        entry(2, "unix:uid:2"),
        entry(3, "unix:uuid:3"),
    ]);
    refused(&mut create(), &["entry 3 of the batch", "unix:uuid:3"]);
    assert_eq!(count(&server), 1);
    // The second duplicates a stored entry: nothing is created, and it is named.
    let mut dup = entry(2, "unix:uid:9");
    dup["spiffe_id"] = "spiffe://example.org/existing".into();
    write(vec![entry(1, "unix:uid:1"), dup]);
    refused(
        &mut create(),
        &[
            "entry 2 of the batch",
            "spiffe://example.org/existing",
            "already exists",
        ],
    );
    assert_eq!(count(&server), 1);
    // Broken JSON names the file, line and column.
    std::fs::write(&file, "{\"entries\": [\n  {\"spiffe_id\": }\n]}").expect("write");
    refused(&mut create(), &["entries.json", "line 2"]);
    write(
        (1..=3)
            .map(|n| entry(n, &format!("unix:uid:{n}")))
            .collect(),
    );
    let out = ok(create().args(["--output", "json"]));
    let created = json(&out)["entries"].as_array().expect("entries").clone();
    assert_eq!(created.len(), 3);
    assert!(created.iter().all(|e| e["x509_svid_ttl"] == 3600));
    assert_eq!(count(&server), 4);
}

#[test]
fn the_bundle_in_the_spiffe_format_is_a_jwk_set_of_the_ca() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let pem_bundle = certs_from_pem(&server.bundle_pem());
    assert_eq!(pem_bundle.len(), 1);
    let text = ok(&mut server.cli(&["bundle", "show", "--format", "spiffe"]));
    let jwks = json(&text);
    assert_eq!(
        json(&ok(&mut server.cli(&[
            "bundle", "show", "--format", "spiffe", "--output", "json"
        ]))),
        jwks
    );
    assert!(jwks["spiffe_sequence"].as_u64().is_some(), "{jwks}");
    assert!(
        jwks["spiffe_refresh_hint"].as_u64().is_some_and(|h| h > 0),
        "{jwks}"
    );
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{jwks}");
    let key = keys[0].as_object().expect("key object");
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert!(
        !key.contains_key("kid"),
        "X.509 authorities carry no kid: {jwks}"
    );
    let x5c = key["x5c"].as_array().expect("x5c");
    assert_eq!(x5c.len(), 1, "exactly one certificate per key");
    let der = base64::engine::general_purpose::STANDARD
        .decode(x5c[0].as_str().expect("string"))
        .expect("standard base64");
    assert_eq!(der, pem_bundle[0].as_ref(), "x5c is the CA certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    let point = &cert.public_key().subject_public_key.data;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let x = b64
        .decode(key["x"].as_str().expect("x"))
        .expect("base64url x");
    let y = b64
        .decode(key["y"].as_str().expect("y"))
        .expect("base64url y");
    assert_eq!(
        [&[4u8][..], &x, &y].concat(),
        point.to_vec(),
        "x and y are the CA's key"
    );
    refused(
        &mut server.cli(&["bundle", "show", "--format", "jwks"]),
        &["jwks"],
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

#[test]
fn agents_are_shown_banned_and_unbanned() {
    let mut td = TrustDomain::start();
    let agents = json(&ok(&mut td
        .server
        .cli(&["agent", "list", "--output", "json"])));
    let id = agents["agents"][0]["spiffe_id"]
        .as_str()
        .expect("id")
        .to_string();
    let text = ok(&mut td.server.cli(&["agent", "show", "--spiffe-id", &id]));
    assert!(text.contains(&format!("SPIFFE ID        : {id}")), "{text}");
    assert!(
        text.contains("Alias            : spiffe://example.org/runner"),
        "{text}"
    );
    let expires = text
        .lines()
        .find_map(|l| l.strip_prefix("SVID expires at  : "))
        .expect("expiry line");
    assert!(expires.ends_with('Z') && expires.contains('T'), "{expires}");
    let shown = json(&ok(&mut td.server.cli(&[
        "agent",
        "show",
        "--spiffe-id",
        &id,
        "--output",
        "json",
    ])));
    assert!(shown["x509_svid_expires_at"].as_i64().is_some(), "{shown}");
    let creds = AgentCreds::load(&td.agent.data_dir);

    ok(&mut td.server.cli(&["agent", "ban", "--spiffe-id", &id]));
    wait_until("the banned agent to stop", Duration::from_secs(10), || {
        td.agent.log().contains("lanyard-agent: ")
    });
    let status = td.agent.stop().expect("status");
    assert!(!status.success(), "a banned agent exits non-zero");
    refused(
        &mut td.server.cli(&["agent", "show", "--spiffe-id", &id]),
        &["no attested agent", "banned since"],
    );
    let bans = json(&ok(&mut td
        .server
        .cli(&["agent", "bans", "--output", "json"])));
    assert_eq!(bans["bans"][0]["spiffe_id"], id.as_str());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async {
        agent_api(&td.server.address, &creds.bundle, Some(&creds))
            .await
            .sign_x509_svids(SignX509SvidsRequest { requests: vec![] })
            .await
            .expect_err("a banned agent's SVID")
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("banned"), "{status:?}");

    // A ban also holds for an agent that has not attested yet: the ID a token will give.
    let token_out = ok(&mut td.server.cli(&["token", "generate", "--output", "json"]));
    let token = json(&token_out)["token"]
        .as_str()
        .expect("token")
        .to_string();
    let future = join_token_agent_id("example.org", &token);
    let banned = ok(&mut td.server.cli(&["agent", "ban", "--spiffe-id", &future]));
    assert!(banned.contains("not attested now"), "{banned}");
    let bundle = certs_from_pem(&td.server.bundle_pem());
    let status = rt
        .block_on(attest(&td.server.address, &bundle, &token))
        .expect_err("attestation as a banned ID");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("is banned since"), "{status:?}");
    // Unbanned, the (unspent) token attests a real agent.
    ok(&mut td.server.cli(&["agent", "unban", "--spiffe-id", &future]));
    refused(
        &mut td.server.cli(&["agent", "unban", "--spiffe-id", &future]),
        &["is not banned"],
    );
    let root = td.dir.path().join("second");
    std::fs::create_dir_all(&root).expect("dir");
    let _second = Agent::start(&root, &td.server, Some(&token));
    let listed = json(&ok(&mut td
        .server
        .cli(&["agent", "list", "--output", "json"])));
    assert!(
        listed["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .any(|a| a["spiffe_id"] == future.as_str()),
        "{listed}"
    );
}

#[test]
fn agent_ttl_sets_the_agent_svid_lifetime_apart_from_workloads() {
    let dir = tempdir();
    let server = Server::start(
        dir.path(),
        "example.org",
        &["--agent-ttl", "15m", "--default-x509-svid-ttl", "2h"],
    );
    let bundle = certs_from_pem(&server.bundle_pem());
    let token = server.token(None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let creds = rt
        .block_on(attest(&server.address, &bundle, &token))
        .expect("attest");
    let agent = lanyard_proto::svid::check_leaf(&creds.chain[0], None).expect("leaf");
    // notBefore is backdated 10 s.
    assert_eq!(agent.not_after - agent.not_before, 900 + 10, "{agent:?}");
    assert!((unix_now() + 890..=unix_now() + 901).contains(&agent.not_after));
    let workload = "spiffe://example.org/wl/ttl";
    let entry = server.create_entry(
        workload,
        &join_token_agent_id("example.org", &token),
        &["unix:uid:1"],
        &[],
    );
    let results = rt.block_on(async {
        agent_api(&server.address, &bundle, Some(&creds))
            .await
            .sign_x509_svids(SignX509SvidsRequest {
                requests: vec![lanyard_proto::agent::SvidRequest {
                    entry_id: entry,
                    csr: lanyard_tests::tls::csr(&lanyard_tests::tls::fresh_key(), workload),
                }],
            })
            .await
            .expect("sign")
            .into_inner()
            .results
    });
    let leaf = lanyard_proto::svid::check_leaf(&results[0].x509_svid_chain[0], None).expect("leaf");
    assert_eq!(leaf.not_after - leaf.not_before, 7200 + 10);
    // The flag's key is in the file too; and it may not outlive the CA.
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "trust_domain = \"example.org\"\nca_ttl = \"1h\"\nagent_ttl = \"2h\"\ndefault_x509_svid_ttl = 60\n")
        .expect("write");
    let out = run(Command::new(bin("lanyard-server"))
        .arg("validate")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped()));
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("agent_ttl (2h) must be shorter than ca_ttl (1h)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
