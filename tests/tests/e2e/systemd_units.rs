//! The shipped systemd units (`systemd/*.service`) and example configs
//! (`systemd/*.toml`) are valid and say what the operator documentation promises.
//!
//! The units are checked with `systemd-analyze verify`, which needs no running systemd
//! (it works as root in a container whose PID 1 is not systemd). It only checks that
//! the binaries named in `Exec*=` exist and are executable, so each unit is copied into
//! a temporary directory with its binary paths pointed at stub scripts there; the
//! arguments stay as they are. `systemd-analyze` must be installed: without it these
//! tests fail, they never skip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .join("systemd")
}

fn read_shipped(file: &str) -> String {
    let path = systemd_dir().join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------
// systemd-analyze verify
// ---------------------------------------------------------------------------------

/// What `systemd-analyze verify` said about one unit file.
struct Verdict {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
    /// Output lines about the unit under test (they name its file or our temp dir).
    about_unit: Vec<String>,
    /// Other output lines: about other units of this machine, or general noise.
    other: Vec<String>,
}

impl Verdict {
    fn report(&self) -> String {
        format!(
            "exit status: {}\n--- lines about the unit ---\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.about_unit.join("\n"),
            self.stdout,
            self.stderr
        )
    }
}

/// Points every `Exec*=` command of `unit` at an executable stub in `dir` named like the
/// original binary, keeping systemd's command prefixes (`-`, `@`, `+`, `!`, `:`) and all
/// arguments. Returns the rewritten text and the original binary paths.
fn rewrite_exec_paths(unit: &str, dir: &Path) -> (String, Vec<String>) {
    let mut out = String::with_capacity(unit.len());
    let mut originals = Vec::new();
    for line in unit.lines() {
        let trimmed = line.trim_start();
        let exec = trimmed
            .split_once('=')
            .filter(|(key, _)| key.trim_end().starts_with("Exec"));
        let Some((key, value)) = exec else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let value = value.trim_start();
        let prefix_len = value
            .find(|c: char| !matches!(c, '-' | '@' | '+' | '!' | ':'))
            .unwrap_or(value.len());
        let (prefix, command) = value.split_at(prefix_len);
        let (binary, args) = match command.find(char::is_whitespace) {
            Some(i) => command.split_at(i),
            None => (command, ""),
        };
        assert!(
            binary.starts_with('/'),
            "{key}= must name its binary by absolute path, got {binary:?}"
        );
        let name = Path::new(binary)
            .file_name()
            .unwrap_or_else(|| panic!("{key}= names no file: {binary:?}"));
        let stub = dir.join(name);
        if !stub.exists() {
            fs::write(&stub, "#!/bin/sh\nexit 0\n").expect("write stub binary");
            fs::set_permissions(&stub, fs::Permissions::from_mode(0o755))
                .expect("make stub binary executable");
        }
        originals.push(binary.to_owned());
        writeln!(out, "{}={prefix}{}{args}", key.trim_end(), stub.display())
            .expect("writing to a String cannot fail");
    }
    (out, originals)
}

/// Runs `systemd-analyze verify` on `unit_text` saved as `dir/file_name`.
fn verify(file_name: &str, unit_text: &str, dir: &Path) -> Verdict {
    let unit_path = dir.join(file_name);
    fs::write(&unit_path, unit_text).expect("write unit copy");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        // No man-page lookups for Documentation=: that depends on installed man pages.
        .arg("--man=no")
        .arg(&unit_path)
        // Make sure nothing in the caller's environment silences warnings or adds
        // colour codes to the lines we look at.
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_PAGER", "")
        .env("LC_ALL", "C")
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed, so the systemd units cannot be verified. \
             Install it (Debian/Ubuntu: `apt-get install systemd`) and run the tests again."
        ),
        Err(e) => panic!("could not run systemd-analyze: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let dir_text = dir.display().to_string();
    // Every complaint systemd-analyze makes about a unit names either the unit
    // ("lanyard-agent.service: Command ... is not executable") or its file with a line
    // number ("/tmp/x/lanyard-agent.service:12: Unknown key ..."); complaints about a
    // binary or a path in our copy name the temp dir. Anything else is about other
    // units installed on this machine and is only printed.
    let (about_unit, other): (Vec<String>, Vec<String>) = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .partition(|line| line.contains(file_name) || line.contains(&dir_text));
    Verdict {
        success: output.status.success(),
        status: output.status.to_string(),
        stdout,
        stderr,
        about_unit,
        other,
    }
}

fn assert_unit_verifies(file_name: &str, binary: &str) {
    let original = read_shipped(file_name);
    let dir = tempfile::tempdir().expect("create temp dir");
    let (rewritten, binaries) = rewrite_exec_paths(&original, dir.path());
    assert!(
        binaries.iter().any(|b| b == binary),
        "{file_name} must run {binary} in an Exec*= line, found {binaries:?}"
    );
    let verdict = verify(file_name, &rewritten, dir.path());
    for line in &verdict.other {
        eprintln!("systemd-analyze (not about {file_name}, ignored): {line}");
    }
    assert!(
        verdict.success,
        "systemd-analyze verify {file_name} failed\n{}",
        verdict.report()
    );
    assert!(
        verdict.about_unit.is_empty(),
        "systemd-analyze verify {file_name} warned about the unit\n{}",
        verdict.report()
    );
}

#[test]
fn server_unit_verifies() {
    assert_unit_verifies("lanyard-server.service", "/usr/local/bin/lanyard-server");
}

#[test]
fn agent_unit_verifies() {
    assert_unit_verifies("lanyard-agent.service", "/usr/local/bin/lanyard-agent");
}

/// The harness itself: mistakes in a unit must be reported, not filtered away as noise.
/// systemd-analyze exits 0 for an unknown key or a bad value and only warns, so this is
/// what makes the warning check above meaningful.
#[test]
fn verify_reports_mistakes_in_the_unit() {
    let original = read_shipped("lanyard-server.service");
    let dir = tempfile::tempdir().expect("create temp dir");
    let (rewritten, _) = rewrite_exec_paths(&original, dir.path());

    let typo = rewritten.replacen("ProtectClock=yes", "ProtectClok=yes", 1);
    assert_ne!(typo, rewritten, "the server unit sets ProtectClock=yes");
    let verdict = verify("lanyard-server.service", &typo, dir.path());
    assert!(
        verdict.about_unit.iter().any(|l| l.contains("ProtectClok")),
        "an unknown key was not reported\n{}",
        verdict.report()
    );

    let missing = dir.path().join("no-such-binary");
    let bad_exec = rewritten
        .lines()
        .map(|line| {
            if line.starts_with("ExecStart=") {
                format!("ExecStart={} run", missing.display())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let verdict = verify("lanyard-server.service", &bad_exec, dir.path());
    assert!(
        !verdict.success && !verdict.about_unit.is_empty(),
        "a missing ExecStart= binary was not reported\n{}",
        verdict.report()
    );
}

// ---------------------------------------------------------------------------------
// What the units promise (hardening that must not silently disappear)
// ---------------------------------------------------------------------------------

/// `Key=value` settings of a unit, all values of a key in order (comments skipped).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    settings
}

fn single<'a>(settings: &'a BTreeMap<String, Vec<String>>, unit: &str, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{unit}: expected exactly one {key}=, found {other:?}"),
    }
}

fn words(value: &str) -> Vec<&str> {
    let mut w: Vec<&str> = value.split_whitespace().collect();
    w.sort_unstable();
    w
}

fn assert_common_hardening(unit: &str, s: &BTreeMap<String, Vec<String>>) {
    for (key, want) in [
        ("DynamicUser", "no"),
        ("ConfigurationDirectory", "lanyard"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("DevicePolicy", "closed"),
        ("PrivateMounts", "yes"),
        ("StateDirectoryMode", "0700"),
    ] {
        assert_eq!(single(s, unit, key), want, "{unit}: {key}=");
    }
    // The agent also needs AF_NETLINK (sock_diag) for its connection check.
    let families = words(single(s, unit, "RestrictAddressFamilies"));
    let want: &[&str] = if unit.contains("agent") {
        &["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    } else {
        &["AF_INET", "AF_INET6", "AF_UNIX"]
    };
    assert_eq!(families, want, "{unit}: RestrictAddressFamilies=");
    let filters = s.get("SystemCallFilter").cloned().unwrap_or_default();
    assert!(
        filters.iter().any(|f| f == "@system-service"),
        "{unit}: SystemCallFilter=@system-service missing, found {filters:?}"
    );
    assert!(
        filters
            .iter()
            .any(|f| f.starts_with('~') && words(&f[1..]) == ["@privileged", "@resources"]),
        "{unit}: SystemCallFilter=~@privileged @resources missing, found {filters:?}"
    );
    let after = s.get("After").cloned().unwrap_or_default();
    assert!(
        after
            .iter()
            .any(|a| a.split_whitespace().any(|u| u == "network-online.target")),
        "{unit}: After=network-online.target missing"
    );
}

#[test]
fn server_unit_keeps_its_hardening() {
    let unit = "lanyard-server.service";
    let s = unit_settings(&read_shipped(unit));
    assert_common_hardening(unit, &s);
    assert_eq!(single(&s, unit, "User"), "lanyard-server");
    assert_eq!(single(&s, unit, "RuntimeDirectory"), "lanyard/server");
    assert_eq!(
        single(&s, unit, "RuntimeDirectoryMode"),
        "0700",
        "admin socket dir"
    );
    assert_eq!(single(&s, unit, "StateDirectory"), "lanyard/server");
    assert_eq!(
        single(&s, unit, "CapabilityBoundingSet"),
        "",
        "server needs no capability"
    );
    if let Some(ambient) = s.get("AmbientCapabilities") {
        assert!(
            ambient.iter().all(String::is_empty),
            "server: AmbientCapabilities={ambient:?}"
        );
    }
    assert_eq!(
        single(&s, unit, "ExecStart"),
        "/usr/local/bin/lanyard-server run --config /etc/lanyard/server.toml"
    );
}

#[test]
fn agent_unit_keeps_its_hardening_and_can_see_workloads() {
    let unit = "lanyard-agent.service";
    let s = unit_settings(&read_shipped(unit));
    assert_common_hardening(unit, &s);
    assert_eq!(single(&s, unit, "User"), "lanyard-agent");
    assert_eq!(single(&s, unit, "RuntimeDirectory"), "lanyard/agent");
    assert_eq!(
        single(&s, unit, "RuntimeDirectoryMode"),
        "0755",
        "every user must reach the Workload API socket"
    );
    assert_eq!(single(&s, unit, "StateDirectory"), "lanyard/agent");
    let caps = ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"];
    assert_eq!(words(single(&s, unit, "CapabilityBoundingSet")), caps);
    assert_eq!(words(single(&s, unit, "AmbientCapabilities")), caps);
    // Settings that would hide other users' processes (or neuter the capabilities)
    // would make workload attestation fail for every process not run by the agent.
    for value in s.get("ProtectProc").into_iter().flatten() {
        assert!(
            !matches!(value.as_str(), "invisible" | "noaccess" | "ptraceable"),
            "agent: ProtectProc={value} hides the workloads it must attest"
        );
    }
    for value in s.get("ProcSubset").into_iter().flatten() {
        assert_ne!(value, "pid", "agent: ProcSubset=pid");
    }
    for value in s.get("PrivateUsers").into_iter().flatten() {
        assert!(
            !matches!(value.as_str(), "yes" | "true" | "1" | "self" | "identity"),
            "agent: PrivateUsers={value} takes away its capabilities"
        );
    }
    assert_eq!(
        single(&s, unit, "EnvironmentFile"),
        "-/etc/lanyard/agent.env"
    );
    assert_eq!(
        single(&s, unit, "ExecStart"),
        "/usr/local/bin/lanyard-agent run --config /etc/lanyard/agent.toml"
    );
}

// ---------------------------------------------------------------------------------
// Example configs
// ---------------------------------------------------------------------------------

/// The `key = value` lines of a simple TOML file, by key (`table.key` inside a
/// `[table]`), in order. Panics on any uncommented line that is neither such an
/// assignment nor a table header.
fn config_settings(file: &str, text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{file}:{}: bad table {line}",
                n + 1
            );
            table = format!("{name}.");
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{file}:{}: not a `key = value` line: {line}", n + 1));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{file}:{}: bad key {key:?}",
            n + 1
        );
        let value = value.trim();
        let well_formed = (value.len() >= 2
            && value.starts_with('"')
            && value.ends_with('"')
            && !value[1..value.len() - 1].contains(['"', '\\']))
            || value.parse::<i64>().is_ok()
            || matches!(value, "true" | "false");
        assert!(
            well_formed,
            "{file}:{}: value is not a simple TOML string/integer/bool: {value}",
            n + 1
        );
        settings
            .entry(format!("{table}{key}"))
            .or_default()
            .push(value.to_owned());
    }
    settings
}

fn assert_config(
    file: &str,
    required: &[(&str, &str)],
    optional: &[&str],
) -> BTreeMap<String, Vec<String>> {
    let settings = config_settings(file, &read_shipped(file));
    for (key, want) in required {
        match settings.get(*key).map(Vec::as_slice) {
            Some([value]) => assert_eq!(value, want, "{file}: {key}"),
            other => panic!("{file}: {key} must be set exactly once, uncommented; found {other:?}"),
        }
    }
    for key in settings.keys() {
        assert!(
            required.iter().any(|(k, _)| k == key) || optional.contains(&key.as_str()),
            "{file}: unexpected key {key}"
        );
    }
    settings
}

fn is_duration(value: &str) -> bool {
    if value.parse::<u64>().is_ok() {
        return true;
    }
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return false;
    };
    let Some(number) = inner.strip_suffix(['s', 'm', 'h', 'd']) else {
        return false;
    };
    !number.is_empty() && number.chars().all(|c| c.is_ascii_digit())
}

#[test]
fn server_example_config_has_every_key() {
    let file = "server.toml";
    let settings = assert_config(
        file,
        &[
            ("trust_domain", "\"example.org\""),
            ("bind_address", "\"0.0.0.0:8081\""),
            ("admin_socket", "\"/run/lanyard/server/admin.sock\""),
            ("data_dir", "\"/var/lib/lanyard/server\""),
            ("ca_ttl", "\"8760h\""),
            ("default_x509_svid_ttl", "\"1h\""),
            ("agent_ttl", "\"1h\""),
            ("log_level", "\"info\""),
            ("log_format", "\"text\""),
        ],
        &[],
    );
    assert!(
        read_shipped(file)
            .lines()
            .any(|l| l.trim() == "# bind_address = \"127.0.0.1:8088\""),
        "{file}: the commented [health] bind_address example is missing"
    );
    for key in ["ca_ttl", "default_x509_svid_ttl", "agent_ttl"] {
        let value = &settings[key][0];
        assert!(
            is_duration(value),
            "{file}: {key} = {value} is not a duration"
        );
    }
}

#[test]
fn agent_example_config_has_every_key() {
    let file = "agent.toml";
    assert_config(
        file,
        &[
            ("trust_domain", "\"example.org\""),
            ("server_address", "\"lanyard-server.example.org:8081\""),
            ("trust_bundle_path", "\"/etc/lanyard/bootstrap-bundle.pem\""),
            ("data_dir", "\"/var/lib/lanyard/agent\""),
            ("socket_path", "\"/run/lanyard/agent/api.sock\""),
            ("log_level", "\"info\""),
            ("log_format", "\"text\""),
            ("health.unreachable_grace", "\"60s\""),
            ("workload_api.connections_per_uid", "256"),
            ("workload_api.streams_per_uid", "256"),
            ("workload_api.max_connections", "16384"),
            ("workload_api.idle_timeout", "\"30s\""),
        ],
        &[],
    );
    let text = read_shipped(file);
    // Documented, but must stay commented out in the example.
    for commented in [
        "# insecure_bootstrap = false",
        "# join_token_file = \"/etc/lanyard/join-token\"",
        "# bind_address = \"127.0.0.1:8089\"",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == commented),
            "{file}: the commented `{commented}` example is missing"
        );
    }
}

/// The paths in the configs are the directories the units create and own.
#[test]
fn configs_match_unit_directories() {
    for (unit, config, keys) in [
        (
            "lanyard-server.service",
            "server.toml",
            &["admin_socket", "data_dir"][..],
        ),
        (
            "lanyard-agent.service",
            "agent.toml",
            &["socket_path", "data_dir"][..],
        ),
    ] {
        let u = unit_settings(&read_shipped(unit));
        let c = config_settings(config, &read_shipped(config));
        let runtime = format!("/run/{}/", single(&u, unit, "RuntimeDirectory"));
        let state = format!("/var/lib/{}", single(&u, unit, "StateDirectory"));
        let socket = c[keys[0]][0].trim_matches('"');
        let data_dir = c[keys[1]][0].trim_matches('"');
        assert!(
            socket.starts_with(&runtime),
            "{config}: {} not under {runtime}",
            keys[0]
        );
        assert_eq!(
            data_dir, state,
            "{config}: data_dir vs {unit} StateDirectory="
        );
        let exec = single(&u, unit, "ExecStart");
        let config_dir = format!("/etc/{}/", single(&u, unit, "ConfigurationDirectory"));
        assert!(
            exec.ends_with(&format!("--config {config_dir}{config}")),
            "{unit}: ExecStart= does not read {config_dir}{config}: {exec}"
        );
    }
}

/// A self-signed CA certificate as PEM, to stand in for a trust domain's bundle.
fn some_ca_pem() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.self_signed(&key).expect("CA").pem()
}

/// The shipped example configs are what the real binaries accept: `validate` reads each
/// with only the paths that point into /etc and /var redirected to a temporary tree.
#[test]
fn example_configs_pass_validate() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path();
    let server = lanyard_tests::run(
        Command::new(lanyard_tests::bin("lanyard-server"))
            .args(["validate", "--config"])
            .arg(systemd_dir().join("server.toml"))
            .arg("--data-dir")
            .arg(root.join("server-data"))
            .arg("--admin-socket")
            .arg(root.join("server-run/admin.sock")),
    );
    assert!(
        server.status.success(),
        "lanyard-server validate refused the shipped server.toml: {}",
        String::from_utf8_lossy(&server.stderr)
    );
    let bundle = root.join("bundle.pem");
    fs::write(&bundle, some_ca_pem()).expect("bundle");
    let agent = lanyard_tests::run(
        Command::new(lanyard_tests::bin("lanyard-agent"))
            .args(["validate", "--config"])
            .arg(systemd_dir().join("agent.toml"))
            .arg("--trust-bundle-path")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(root.join("agent-data"))
            .arg("--socket-path")
            .arg(root.join("agent-run/api.sock"))
            .env("LANYARD_JOIN_TOKEN", "0123456789abcdef0123456789abcdef"),
    );
    assert!(
        agent.status.success(),
        "lanyard-agent validate refused the shipped agent.toml: {}",
        String::from_utf8_lossy(&agent.stderr)
    );
    assert!(
        !root.join("server-data").exists() && !root.join("agent-data").exists(),
        "validate must not create anything"
    );
}
