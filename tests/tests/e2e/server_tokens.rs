//! Join tokens against the real server: shown once and never stored (the datastore file
//! and the log are searched for the token's bytes), agents and selectors named after the
//! token's ID, and node-alias entries that go with their token when it expires unused or
//! when the agent that used it is evicted or banned.

use std::path::Path;
use std::time::{Duration, Instant};

use lanyard_tests::tls::{attest, certs_from_pem};
use lanyard_tests::{Server, join_token_agent_id, join_token_id, ok, unix_now};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lanyard-tokens")
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

fn entry_with_id<'a>(
    entries: &'a [serde_json::Value],
    spiffe_id: &str,
) -> Option<&'a serde_json::Value> {
    entries.iter().find(|e| e["spiffe_id"] == spiffe_id)
}

/// Every byte of every file in `dir`.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_join_token_is_shown_once_and_never_stored_or_logged() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), "example.org", &[]);
    let alias = "spiffe://example.org/runner";
    let text = ok(&mut server.cli(&["token", "generate", "--spiffe-id", alias]));
    let lines: Vec<&str> = text.lines().collect();
    let token = lines[0]
        .strip_prefix("Token: ")
        .unwrap_or_else(|| panic!("first line is `Token: <token>`: {text}"));
    let id = join_token_id(token);
    let agent_id = join_token_agent_id("example.org", token);
    assert_eq!(lines[1], format!("Token ID  : {id}"), "{text}");
    assert_eq!(lines[2], format!("Agent ID  : {agent_id}"), "{text}");
    assert_eq!(lines[3], format!("Node alias: {alias}"), "{text}");
    let expires = lines[4]
        .strip_prefix("Expires at: ")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        expires.len() == 20 && expires.ends_with('Z') && expires.as_bytes()[10] == b'T',
        "RFC 3339 UTC: {expires}"
    );
    assert!(!agent_id.contains(token), "the agent ID reveals the token");

    let v =
        json(&ok(&mut server.cli(&[
            "token", "generate", "--output", "json", "--ttl", "15m",
        ])));
    let unused = v["token"].as_str().expect("token").to_string();
    assert_eq!(v["token_id"], join_token_id(&unused).as_str());
    assert_eq!(
        v["agent_id"],
        join_token_agent_id("example.org", &unused).as_str()
    );
    let expires_at = v["expires_at"].as_i64().expect("Unix seconds in JSON");
    assert!(
        (unix_now() + 890..=unix_now() + 901).contains(&expires_at),
        "--ttl 15m gave {expires_at}"
    );

    // The alias entry is a node entry whose selector names the token's ID, not the token.
    let all = entries(&server);
    let alias_entry = entry_with_id(&all, alias).expect("alias entry");
    assert_eq!(
        alias_entry["parent_id"],
        "spiffe://example.org/lanyard/server"
    );
    assert_eq!(
        alias_entry["selectors"],
        serde_json::json!([format!("join_token:{id}")])
    );

    // Neither unused token is anywhere in the data_dir (database, WAL, shared memory)
    // nor in the log, while the server runs and after it stopped.
    for stage in ["running", "stopped"] {
        for (name, bytes) in all_bytes(&server.data_dir) {
            for t in [token, unused.as_str()] {
                assert!(
                    !contains(&bytes, t.as_bytes()),
                    "{stage}: the token is in {name}"
                );
            }
        }
        assert!(!server.log().contains(token) && !server.log().contains(&unused));
        server.stop();
    }
    // Digests are there: the server can still tell the token once it is presented.
    server.restart(&[]);
    let rt = runtime();
    let bundle = certs_from_pem(&server.bundle_pem());
    let creds = rt
        .block_on(attest(&server.address, &bundle, &unused))
        .expect("the stored digest accepts the token after a restart");
    let svid = lanyard_proto::svid::check_leaf(&creds.chain[0], None).expect("SVID");
    assert_eq!(
        svid.spiffe_id.as_str(),
        join_token_agent_id("example.org", &unused)
    );
    assert!(
        !server.log().contains(&unused),
        "attestation logged the token"
    );
}

#[test]
fn alias_entries_go_with_tokens_that_expire_unused() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let expiring = "spiffe://example.org/expiring";
    let kept = "spiffe://example.org/kept";
    let v = json(&ok(&mut server.cli(&[
        "token",
        "generate",
        "--ttl",
        "10s",
        "--spiffe-id",
        expiring,
        "--output",
        "json",
    ])));
    let expires_at = v["expires_at"].as_i64().expect("expires_at");
    let long = server.token(Some(kept));
    assert!(entry_with_id(&entries(&server), expiring).is_some());
    // Pruning runs every 10 s after the token expired.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let all = entries(&server);
        if entry_with_id(&all, expiring).is_none() {
            assert!(
                unix_now() >= expires_at,
                "the alias went before its token expired"
            );
            assert!(
                entry_with_id(&all, kept).is_some(),
                "the alias of an unexpired token went too"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alias entry of an expired unused token is still there: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The unexpired token still attests, and its agent holds the alias.
    let bundle = certs_from_pem(&server.bundle_pem());
    runtime()
        .block_on(attest(&server.address, &bundle, &long))
        .expect("attest");
    let agents = json(&ok(&mut server.cli(&["agent", "list", "--output", "json"])));
    assert_eq!(agents["agents"][0]["aliases"], serde_json::json!([kept]));
}

#[test]
fn alias_entries_go_when_their_agent_is_evicted_or_banned() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let bundle = certs_from_pem(&server.bundle_pem());
    let (a, b, c) = (
        "spiffe://example.org/runner-a",
        "spiffe://example.org/runner-b",
        "spiffe://example.org/runner-c",
    );
    let tokens = [
        server.token(Some(a)),
        server.token(Some(b)),
        server.token(Some(c)),
    ];
    let rt = runtime();
    for t in &tokens {
        rt.block_on(attest(&server.address, &bundle, t))
            .expect("attest");
    }
    let ids: Vec<String> = tokens
        .iter()
        .map(|t| join_token_agent_id("example.org", t))
        .collect();
    ok(&mut server.cli(&["agent", "evict", "--spiffe-id", &ids[0]]));
    let all = entries(&server);
    assert!(
        entry_with_id(&all, a).is_none(),
        "evicted agent's alias stays: {all:?}"
    );
    assert!(entry_with_id(&all, b).is_some() && entry_with_id(&all, c).is_some());
    ok(&mut server.cli(&["agent", "ban", "--spiffe-id", &ids[1]]));
    let all = entries(&server);
    assert!(
        entry_with_id(&all, b).is_none(),
        "banned agent's alias stays: {all:?}"
    );
    assert!(
        entry_with_id(&all, c).is_some(),
        "another agent's alias went"
    );
}
