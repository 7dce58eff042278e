//! `lanyard-agent api`: output people and scripts can read (RFC 3339 times in text,
//! numbers in JSON, PEM with LF, quiet on a closed pipe as in `| head`), and
//! `fetch x509 --write DIR` that cannot be turned against the caller: in a directory
//! someone else made or can write to, root's key is not written; a symlink planted at a
//! file name is replaced, never followed; a missing DIR is created 0700; files are 0600.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lanyard_tests::commands::{Finished, assert_refused_one_line, eventually, run_quick};
use lanyard_tests::{TrustDomain, bin, my_uid};

fn serving() -> TrustDomain {
    let td = TrustDomain::start();
    td.register_uid("spiffe://example.org/me", my_uid(), &[]);
    eventually("the SVID", Duration::from_secs(15), || {
        fetch(&td, &[]).code() == 0
    });
    td
}

fn fetch(td: &TrustDomain, extra: &[&str]) -> Finished {
    run_quick(
        Command::new(bin("lanyard-agent"))
            .args(["api", "fetch", "x509", "--socket-path"])
            .arg(&td.agent.socket)
            .args(extra),
    )
}

fn write_to(td: &TrustDomain, dir: &Path) -> Finished {
    fetch(td, &["--write", &dir.display().to_string()])
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("meta").mode() & 0o7777
}

/// Runs `pipeline` (bash, `$AGENT` and `$SOCK` set) and returns the agent's exit
/// status (the first command of the pipeline) and stderr.
fn piped(td: &TrustDomain, pipeline: &str) -> (i32, String) {
    let out = Command::new("bash")
        .args(["-c", &format!("{pipeline}; exit ${{PIPESTATUS[0]}}")])
        .env("AGENT", bin("lanyard-agent"))
        .env("SOCK", &td.agent.socket)
        .output()
        .expect("bash");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fetch_output_is_readable_and_a_closed_pipe_ends_it_quietly() {
    let td = serving();
    let text = fetch(&td, &[]);
    assert_eq!(text.code(), 0, "{}", text.describe());
    let valid = text
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Valid until      : "))
        .unwrap_or_else(|| panic!("no Valid until line: {}", text.stdout));
    // 2026-12-03T17:15:51Z
    let b = valid.as_bytes();
    assert!(
        valid.len() == 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && valid.ends_with('Z'),
        "not RFC 3339 UTC: {valid}"
    );
    assert!(
        text.stdout
            .contains("SPIFFE ID        : spiffe://example.org/me")
    );

    let json = fetch(&td, &["--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    let svid = &v["svids"][0];
    assert!(svid["not_after"].is_i64(), "not_after is a number: {svid}");
    assert_eq!(svid["spiffe_id"], "spiffe://example.org/me");

    // The reader goes away before or while the agent writes: exit 0, no panic.
    for pipeline in [
        "\"$AGENT\" api fetch x509 --socket-path \"$SOCK\" | head -n 1 >/dev/null",
        "\"$AGENT\" api fetch x509 --socket-path \"$SOCK\" | true",
        "\"$AGENT\" api fetch x509 --output json --socket-path \"$SOCK\" | true",
        "\"$AGENT\" api watch --socket-path \"$SOCK\" | true",
        "\"$AGENT\" healthcheck --socket-path \"$SOCK\" | true",
    ] {
        let (code, stderr) = piped(&td, pipeline);
        assert_eq!(code, 0, "{pipeline}: {stderr}");
        assert!(!stderr.contains("panicked"), "{pipeline}: {stderr}");
        assert!(stderr.is_empty(), "{pipeline}: {stderr}");
    }
}

#[test]
fn write_creates_a_private_directory_with_private_lf_pem_files() {
    let td = serving();
    let dir = td.dir.path().join("out/svids");
    let f = write_to(&td, &dir);
    assert_eq!(f.code(), 0, "{}", f.describe());
    assert_eq!(mode(&dir), 0o700, "a missing DIR is created 0700");
    for name in ["svid.0.pem", "svid.0.key", "bundle.0.pem"] {
        let path = dir.join(name);
        assert_eq!(mode(&path), 0o600, "{name}");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains('\r'), "{name} has CRLF line endings");
        assert!(text.starts_with("-----BEGIN "), "{name}");
    }
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.0.pem"))
        .arg(dir.join("svid.0.pem"))
        .output()
        .expect("openssl");
    assert!(verify.status.success(), "{verify:?}");
    let key = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(dir.join("svid.0.key"))
        .output()
        .expect("openssl");
    assert!(key.status.success(), "{key:?}");
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");

    // The agent's own files are PEM with LF too.
    for name in ["agent_svid.pem", "agent_svid.key", "bundle.pem"] {
        let text = std::fs::read_to_string(td.agent.data_dir.join(name)).expect(name);
        assert!(!text.contains('\r'), "{name} has CRLF line endings");
    }

    // An existing directory of the caller's own, searchable by others, is fine too.
    let own = td.dir.path().join("own");
    std::fs::create_dir(&own).expect("mkdir");
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(write_to(&td, &own).code(), 0);
    assert_eq!(mode(&own.join("svid.0.key")), 0o600);
}

#[test]
fn write_refuses_directories_another_user_made_or_can_write() {
    assert_eq!(my_uid(), 0, "this test chowns to uid 65534: run it as root");
    let td = serving();

    // The README's own example target: a shared directory, like /tmp itself.
    let shared = tempfile::Builder::new()
        .prefix("lanyard-shared")
        .tempdir()
        .expect("tmp");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    let f = write_to(&td, shared.path());
    assert_refused_one_line(
        &f,
        &["cannot write the SVID files", "writable by group or others"],
    );
    assert!(
        !shared.path().join("svid.0.key").exists(),
        "root's key was written"
    );

    // A directory another user made for us.
    let foreign = td.dir.path().join("made-by-nobody");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
    let f = write_to(&td, &foreign);
    assert_refused_one_line(&f, &["owned by uid 65534"]);
    assert!(!foreign.join("svid.0.key").exists());

    // A new directory inside it: the owner could swap it for another, so it is refused,
    // and nothing is left behind.
    let inside = foreign.join("svids");
    let f = write_to(&td, &inside);
    assert_refused_one_line(&f, &["made-by-nobody", "other users can write"]);
    assert!(!inside.exists(), "the refused directory was left behind");

    // DIR itself a symlink (to a directory root owns).
    let real = td.dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let link = td.dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let f = write_to(&td, &link);
    assert_refused_one_line(&f, &["symbolic link"]);
    assert!(!real.join("svid.0.key").exists());
}

#[test]
fn write_never_follows_a_symlink_planted_at_a_file_name() {
    let td = serving();
    let dir = td.dir.path().join("svids");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // Root-owned files an attacker would like overwritten.
    let victims: Vec<_> = ["svid.0.key", "svid.0.pem", "bundle.0.pem"]
        .iter()
        .map(|name| {
            let victim = td.dir.path().join(format!("victim-{name}"));
            std::fs::write(&victim, b"precious\n").expect("victim");
            std::os::unix::fs::symlink(&victim, dir.join(name)).expect("plant");
            victim
        })
        .collect();
    let f = write_to(&td, &dir);
    assert_eq!(f.code(), 0, "{}", f.describe());
    for victim in &victims {
        assert_eq!(
            std::fs::read(victim).expect("victim"),
            b"precious\n",
            "{} was overwritten through the link",
            victim.display()
        );
    }
    for name in ["svid.0.key", "svid.0.pem", "bundle.0.pem"] {
        let meta = std::fs::symlink_metadata(dir.join(name)).expect("meta");
        assert!(meta.is_file(), "{name} is still a link");
        assert_eq!(meta.mode() & 0o777, 0o600, "{name}");
    }
}
