//! The server's data_dir and admin socket attacked as another local user would: a
//! directory owned by someone else or open to others, symlinks planted at the CA key and
//! the datastore, a permissive umask, a second server on the same data_dir or socket,
//! and another uid at the admin socket. Each is refused with one sentence; nothing is
//! followed, created or unlinked on the attacker's behalf.

use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanyard_tests::{Server, bin, free_port, ok, run};

const NOBODY: u32 = 65534;

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("lanyard-datadir")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn mkdir(path: &Path, mode_bits: u32) -> PathBuf {
    std::fs::create_dir_all(path).expect("mkdir");
    chmod(path, mode_bits);
    path.to_path_buf()
}

/// `lanyard-server run` on `data_dir` and `admin_socket` (a fresh port).
fn server_command(data_dir: &Path, admin_socket: &Path) -> Command {
    let mut cmd = Command::new(bin("lanyard-server"));
    cmd.args(["run", "--trust-domain", "example.org", "--bind-address"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-socket")
        .arg(admin_socket)
        .env_remove("LANYARD_SERVER_CONFIG");
    cmd
}

/// Runs a server that must refuse to start: it exits within 15 s, not successfully,
/// without a panic, and says why in one line on stderr that holds every needle.
/// Returns the exit code.
fn refused_start(cmd: &mut Command, needles: &[&str]) -> Option<i32> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lanyard-server");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started although it must refuse: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{cmd:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence on stderr: {stderr}");
    assert!(lines[0].starts_with("lanyard-server: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} lacks {n:?}", lines[0]);
    }
    status.code()
}

#[test]
fn a_data_dir_of_another_user_or_open_to_others_is_refused() {
    let dir = tempdir();
    let admin = dir.path().join("run/admin.sock");
    let theirs = mkdir(&dir.path().join("theirs"), 0o700);
    chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let code = refused_start(
        &mut server_command(&theirs, &admin),
        &["data_dir", "owned by uid 65534"],
    );
    assert_eq!(
        code,
        Some(78),
        "an unsafe data_dir is a configuration error"
    );
    for loose in [0o770, 0o707, 0o750] {
        let open = mkdir(&dir.path().join(format!("open-{loose:o}")), loose);
        refused_start(&mut server_command(&open, &admin), &["chmod 700"]);
        assert_eq!(
            std::fs::read_dir(&open).expect("ls").count(),
            0,
            "nothing was written into a refused data_dir"
        );
    }
    // A parent others may write to (and not sticky) lets them swap the data_dir.
    let shared = mkdir(&dir.path().join("shared"), 0o777);
    refused_start(
        &mut server_command(&shared.join("data"), &admin),
        &["which uid", "other users can write to"],
    );
    // (lanyard-daemon makes the directory before it checks the parents; nothing goes in.)
    assert!(
        std::fs::read_dir(shared.join("data")).map_or(true, |mut d| d.next().is_none()),
        "something was written under an unsafe parent"
    );
}

#[test]
fn symlinks_planted_at_the_ca_key_or_the_datastore_are_refused_never_followed() {
    let dir = tempdir();
    let admin = dir.path().join("run/admin.sock");
    // A fresh data_dir with a link where the CA key will go: the key must not be
    // written through it.
    let fresh = mkdir(&dir.path().join("fresh"), 0o700);
    let target = dir.path().join("attacker-reads-this.key");
    symlink(&target, fresh.join("ca.key")).expect("plant");
    refused_start(
        &mut server_command(&fresh, &admin),
        &["ca.key", "symbolic link"],
    );
    assert!(!target.exists(), "the CA key was written through the link");

    // An existing data_dir: each file in turn replaced by a link to a victim file.
    let mut server = Server::start(dir.path(), "example.org", &[]);
    server.stop();
    let data = server.data_dir.clone();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    for name in [
        "ca.key",
        "datastore.sqlite3",
        "datastore.sqlite3-wal",
        "datastore.sqlite3-shm",
    ] {
        let path = data.join(name);
        let saved = dir.path().join(format!("saved-{name}"));
        let had = path.exists();
        if had {
            std::fs::rename(&path, &saved).expect("save");
        }
        symlink(&victim, &path).expect("plant");
        refused_start(
            &mut server_command(&data, &server.admin_socket),
            &[name, "symbolic link"],
        );
        assert_eq!(
            std::fs::read(&victim).expect("victim"),
            b"precious",
            "{name}"
        );
        std::fs::remove_file(&path).expect("unplant");
        if had {
            std::fs::rename(&saved, &path).expect("restore");
        }
    }
    // With everything restored the server starts on the same data.
    server.restart(&[]);
}

#[test]
fn the_datastore_and_every_file_the_server_makes_are_private_whatever_the_umask() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let admin_dir = dir.path().join("run");
    let admin = admin_dir.join("admin.sock");
    // umask 000 in the shell that starts it: a careless init script.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(bin("lanyard-server"))
        .args(server_command(&data, &admin).get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(bin("lanyard-server"));
        cmd.args(args).arg("--admin-socket").arg(&admin);
        cmd
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run(&mut cli(&["healthcheck"])).status.success() {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes make SQLite create its WAL and shared-memory files.
    for n in 0..5 {
        ok(&mut cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/w{n}"),
            "--parent-id",
            "spiffe://example.org/p",
            "--selector",
            "unix:uid:1",
        ]));
    }
    ok(&mut cli(&["token", "generate"]));
    let files: Vec<PathBuf> = std::fs::read_dir(&data)
        .expect("ls")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    for must in [
        "datastore.sqlite3",
        "datastore.sqlite3-wal",
        "datastore.sqlite3-shm",
        "ca.key",
        "ca.pem",
    ] {
        assert!(
            files.contains(&data.join(must)),
            "{must} missing: {files:?}"
        );
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{} under umask 000", f.display());
    }
    assert_eq!(mode(&data), 0o700, "data_dir");
    assert_eq!(mode(&admin_dir), 0o700, "admin socket directory");
    assert_eq!(mode(&admin) & 0o077, 0, "admin socket");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[test]
fn a_second_server_on_the_same_data_dir_or_admin_socket_is_refused() {
    let dir = tempdir();
    let first = Server::start(dir.path(), "example.org", &[]);
    let other_admin = dir.path().join("other-run/admin.sock");
    refused_start(
        &mut server_command(&first.data_dir, &other_admin),
        &["another process already uses data_dir"],
    );
    let other_data = dir.path().join("other-data");
    refused_start(
        &mut server_command(&other_data, &first.admin_socket),
        &["another process already uses admin socket"],
    );
    assert!(
        !other_data.exists(),
        "the refused server created a data_dir (and a CA) before checking the socket"
    );
    // The first server keeps serving on its socket, which nobody unlinked.
    assert!(first.admin_socket.exists());
    ok(&mut first.cli(&["healthcheck"]));
    first.create_entry(
        "spiffe://example.org/still",
        "spiffe://example.org/p",
        &["unix:uid:1"],
        &[],
    );
}

#[test]
fn an_admin_socket_directory_of_another_user_or_open_to_others_is_refused() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let theirs = mkdir(&dir.path().join("theirs"), 0o700);
    chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let code = refused_start(
        &mut server_command(&data, &theirs.join("admin.sock")),
        &["admin socket", "owned by uid 65534"],
    );
    assert_eq!(code, Some(78));
    let open = mkdir(&dir.path().join("open"), 0o755);
    refused_start(
        &mut server_command(&data, &open.join("admin.sock")),
        &["admin socket", "chmod 700"],
    );
    assert!(!open.join("admin.sock").exists());
}

#[test]
fn another_uid_cannot_use_the_admin_socket() {
    let dir = tempdir();
    let server = Server::start(dir.path(), "example.org", &[]);
    let out = run(Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin("lanyard-server"))
        .args(["entry", "show", "--admin-socket"])
        .arg(&server.admin_socket));
    assert!(!out.status.success(), "uid 65534 used the admin API");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("lanyard-server: cannot reach the server")
            && stderr.contains("ermission denied"),
        "{stderr}"
    );
}
