//! The join token never reaches another local user: not on the agent's command line
//! (every user reads `/proc/<pid>/cmdline`), not in agent.toml (config files are world
//! readable), only in `LANYARD_JOIN_TOKEN` (`/proc/<pid>/environ` is the agent user's
//! alone) or in a `join_token_file` as private as an ssh key. A refused or misplaced
//! token is never spent, and neither is one offered to a data dir that cannot keep the
//! identity. The attacker runs as uid 65534 (setpriv).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lanyard_tests::commands::{
    Spawned, agent_command, agent_healthy, assert_refused, assert_refused_one_line, eventually,
    run_quick,
};
use lanyard_tests::{Server, my_uid, ok};

const NOBODY: &str = "65534";

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("lanyard-token")
        .tempdir()
        .expect("tempdir");
    // Other users (the attacker) may traverse it, as on a real host.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `cmd` run as uid 65534.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("setpriv")
}

fn agents(server: &Server) -> Vec<serde_json::Value> {
    let out = ok(&mut server.cli(&["agent", "list", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("agent list json");
    v["agents"].as_array().cloned().unwrap_or_default()
}

/// Starts an agent with `token` given as `how` while its server is down, and checks what
/// another user can see of it while it waits; then brings the server up and checks the
/// same token attests.
fn token_stays_private_while_waiting(how: &str) {
    assert_eq!(
        my_uid(),
        0,
        "this test reads /proc as uid 65534: run it as root"
    );
    let dir = tempdir();
    let mut server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(Some("spiffe://example.org/runner"));
    let root = dir.path().join("agent");
    // Written while the server is up (it reads the bundle), started once it is down.
    let mut cmd = agent_command(&root, &server);
    server.stop();
    match how {
        "environment" => {
            cmd.env("LANYARD_JOIN_TOKEN", &token);
        }
        "file" => {
            let file = dir.path().join("join-token");
            std::fs::write(&file, format!("{token}\n")).expect("token file");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            cmd.arg("--join-token-file").arg(&file);
        }
        other => panic!("unknown way {other}"),
    }
    let mut agent = Spawned::start(&mut cmd, &root.join("agent.log"));
    eventually(
        "the agent to wait for its server",
        Duration::from_secs(15),
        || agent.log().contains("not reachable yet"),
    );
    assert!(agent.exited().is_none(), "{}", agent.log());
    let pid = agent.pid().to_string();

    // What the review's attacker read: the command line, which every user can.
    let cmdline = as_nobody(&["cat", &format!("/proc/{pid}/cmdline")]);
    assert!(
        cmdline.status.success(),
        "uid 65534 should be able to read a command line, or this check proves nothing: {cmdline:?}"
    );
    assert!(
        !String::from_utf8_lossy(&cmdline.stdout).contains(&token),
        "the token is on the agent's command line"
    );
    assert!(
        !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .expect("cmdline")
            .contains(&token)
    );
    // The environment is the agent user's alone.
    let environ = as_nobody(&["cat", &format!("/proc/{pid}/environ")]);
    assert!(
        !environ.status.success() && environ.stdout.is_empty(),
        "uid 65534 read the agent's environment: {environ:?}"
    );
    assert!(
        String::from_utf8_lossy(&environ.stderr).contains("Permission denied"),
        "{environ:?}"
    );
    assert!(!agent.log().contains(&token), "the token is in the log");

    // The server comes up: the waiting agent attests with that same token.
    server.restart(&[]);
    let socket = root.join("agent-run/api.sock");
    eventually("the agent to attest", Duration::from_secs(30), || {
        agent_healthy(&socket)
    });
    assert_eq!(agents(&server).len(), 1);
    // Once spent, the token names the agent (spiffe://…/join_token/<token>, as in
    // SPIRE); nowhere else does it appear.
    let log = agent
        .log()
        .replace(&format!("join_token/{token}"), "join_token/…");
    assert!(!log.contains(&token), "the token is in the log: {log}");
    assert!(
        agent.terminate().is_some_and(|s| s.success()),
        "{}",
        agent.log()
    );
}

#[test]
fn a_token_from_the_environment_is_not_readable_by_other_users_while_the_agent_waits() {
    token_stays_private_while_waiting("environment");
}

#[test]
fn a_token_from_a_file_is_not_readable_by_other_users_while_the_agent_waits() {
    token_stays_private_while_waiting("file");
}

#[test]
fn a_token_on_the_command_line_or_in_agent_toml_is_refused_and_not_spent() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(None);
    let root = dir.path().join("agent");

    let flag = run_quick(agent_command(&root, &server).args(["--join-token", &token]));
    let line = assert_refused_one_line(&flag, &["--join-token", "/proc/<pid>/cmdline"]);
    assert!(
        line.contains("LANYARD_JOIN_TOKEN") && line.contains("--join-token-file"),
        "the refusal names the alternatives: {line}"
    );
    assert!(
        !flag.stderr.contains(&token),
        "the refusal echoes the token"
    );
    assert_eq!(flag.code(), 78, "{}", flag.describe());
    // `--join-token` alone (the value forgotten) gets the same sentence, not clap's.
    let bare = run_quick(agent_command(&root, &server).arg("--join-token"));
    assert_refused_one_line(&bare, &["/proc/<pid>/cmdline", "LANYARD_JOIN_TOKEN"]);

    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("join_token = \"{token}\"\n")).expect("config");
    let file = run_quick(agent_command(&root, &server).arg("--config").arg(&config));
    let line = assert_refused_one_line(&file, &["join_token", "join_token_file"]);
    assert!(line.contains("agent.toml"), "{line}");
    assert!(!file.stderr.contains(&token));
    assert_eq!(file.code(), 78);
    assert!(
        !root.join("agent-data").exists(),
        "a refused start created data_dir"
    );

    // Neither spent it.
    assert!(agents(&server).is_empty());
    let mut agent = Spawned::start(
        agent_command(&root, &server).env("LANYARD_JOIN_TOKEN", &token),
        &root.join("agent.log"),
    );
    eventually("the agent to attest", Duration::from_secs(20), || {
        agent_healthy(&root.join("agent-run/api.sock"))
    });
    assert_eq!(agents(&server).len(), 1);
    agent.terminate();
}

#[test]
fn token_files_another_user_could_read_or_plant_are_refused_and_not_spent() {
    assert_eq!(
        my_uid(),
        0,
        "this test chowns files to uid 65534: run it as root"
    );
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(None);
    let root = dir.path().join("agent");
    let real = dir.path().join("token");
    let write_real = |mode: u32| {
        std::fs::write(&real, &token).expect("write");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let start_with = |file: &Path| {
        run_quick(
            agent_command(&root, &server)
                .arg("--join-token-file")
                .arg(file),
        )
    };

    write_real(0o644);
    let loose = start_with(&real);
    assert_refused_one_line(&loose, &["join_token_file", "mode 0644", "chmod 600"]);
    write_real(0o640);
    assert_refused_one_line(&start_with(&real), &["mode 0640"]);

    write_real(0o600);
    let link = dir.path().join("token-link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    assert_refused_one_line(&start_with(&link), &["join_token_file", "symbolic link"]);

    std::os::unix::fs::chown(&real, Some(65534), Some(65534)).expect("chown");
    let foreign = start_with(&real);
    assert_refused_one_line(&foreign, &["owned by uid 65534", "root"]);
    std::os::unix::fs::chown(&real, Some(0), Some(0)).expect("chown");

    let fifo = dir.path().join("token-fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let planted = start_with(&fifo);
    assert_refused_one_line(&planted, &["not a regular file"]);

    let both = run_quick(
        agent_command(&root, &server)
            .arg("--join-token-file")
            .arg(&real)
            .env("LANYARD_JOIN_TOKEN", &token),
    );
    assert_refused_one_line(&both, &["join_token_file", "LANYARD_JOIN_TOKEN", "one way"]);

    for refused in [&loose, &foreign, &planted, &both] {
        assert_eq!(refused.code(), 78, "{}", refused.describe());
        assert!(!refused.stderr.contains(&token));
    }
    assert!(agents(&server).is_empty(), "a refused token file was spent");

    // A 0600 file of root's (or the agent user's) own attests.
    let mut agent = Spawned::start(
        agent_command(&root, &server)
            .arg("--join-token-file")
            .arg(&real),
        &root.join("agent.log"),
    );
    eventually("the agent to attest", Duration::from_secs(20), || {
        agent_healthy(&root.join("agent-run/api.sock"))
    });
    assert_eq!(agents(&server).len(), 1);
    agent.terminate();
    // Once attested, the spent token's file may go: the agent restarts without it.
    std::fs::remove_file(&real).expect("rm");
    let mut again = Spawned::start(
        agent_command(&root, &server)
            .arg("--join-token-file")
            .arg(&real),
        &root.join("agent.log"),
    );
    eventually("the agent to restart", Duration::from_secs(20), || {
        agent_healthy(&root.join("agent-run/api.sock"))
    });
    assert_eq!(agents(&server).len(), 1, "a restart is not a new agent");
    again.terminate();
}

/// Runs the agent with its data_dir on a tmpfs of its own mount namespace, prepared by
/// `prepare` (a shell snippet run on "$D" after mounting).
fn agent_on_tmpfs(
    root: &Path,
    server: &Server,
    token: &str,
    prepare: &str,
) -> lanyard_tests::commands::Finished {
    let plain = agent_command(root, server);
    let args: Vec<String> = plain
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let data_dir = root.join("agent-data");
    std::fs::create_dir_all(&data_dir).expect("mount point");
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let script = format!(
        "set -e; mount -t tmpfs -o size=64k,mode=0700 tmpfs \"$D\"; {prepare}; exec \"$@\""
    );
    run_quick(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .arg(plain.get_program())
            .args(&args)
            .env("D", &data_dir)
            .env("LANYARD_JOIN_TOKEN", token)
            .env_remove("LANYARD_AGENT_CONFIG"),
    )
}

#[test]
fn a_read_only_or_full_data_dir_does_not_burn_the_token() {
    assert_eq!(my_uid(), 0, "this test mounts a tmpfs: run it as root");
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let token = server.token(None);
    let root = dir.path().join("agent");

    let read_only = agent_on_tmpfs(&root, &server, &token, "mount -o remount,ro \"$D\"");
    assert_refused(&read_only, &["read-only"]);
    let full = agent_on_tmpfs(
        &root,
        &server,
        &token,
        "dd if=/dev/zero of=\"$D/fill\" bs=4096 2>/dev/null || true",
    );
    assert_refused(&full, &["no space left"]);
    for refused in [&read_only, &full] {
        assert!(!refused.stderr.contains(&token));
        assert!(
            !refused.stderr.contains("attested"),
            "{}",
            refused.describe()
        );
    }
    assert!(
        agents(&server).is_empty(),
        "the token was spent on a data_dir that could not keep the identity"
    );

    // With room to store the identity, the same token works.
    let mut agent = Spawned::start(
        agent_command(&root, &server).env("LANYARD_JOIN_TOKEN", &token),
        &root.join("agent.log"),
    );
    eventually("the agent to attest", Duration::from_secs(20), || {
        agent_healthy(&root.join("agent-run/api.sock"))
    });
    assert_eq!(agents(&server).len(), 1);
    agent.terminate();
}

#[test]
fn an_expired_stored_identity_asks_for_a_new_join_token() {
    let dir = tempdir();
    // Agent SVIDs of 10 s, so the stored one expires while the agent is stopped.
    let server = Server::start(dir.path(), "example.org", &["--agent-ttl", "10s"]);
    let root = dir.path().join("agent");
    let socket = root.join("agent-run/api.sock");
    let first = server.token(None);
    let mut agent = Spawned::start(
        agent_command(&root, &server).env("LANYARD_JOIN_TOKEN", &first),
        &root.join("agent.log"),
    );
    eventually("the agent to attest", Duration::from_secs(20), || {
        agent_healthy(&socket)
    });
    assert!(agent.terminate().is_some_and(|s| s.success()));
    std::thread::sleep(Duration::from_secs(11));

    let expired = run_quick(&mut agent_command(&root, &server));
    let line = assert_refused_one_line(
        &expired,
        &["stored agent SVID expired at", "new join token"],
    );
    assert!(
        line.contains('T') && line.contains("Z;"),
        "an RFC 3339 time: {line}"
    );
    assert_eq!(expired.code(), 78, "{}", expired.describe());

    let second = server.token(None);
    let mut again = Spawned::start(
        agent_command(&root, &server).env("LANYARD_JOIN_TOKEN", &second),
        &root.join("agent.log"),
    );
    eventually("the agent to attest anew", Duration::from_secs(20), || {
        agent_healthy(&socket)
    });
    assert_eq!(agents(&server).len(), 2, "a new agent, with the new token");
    again.terminate();
}
