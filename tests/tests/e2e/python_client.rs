//! py-spiffe, the Python SPIFFE library, against the real server and agent: a workload
//! written in Python must get its X509-SVID and bundle, be told "no identity issued"
//! when it has none, and see rotations on a watch stream, as the SPIFFE Workload API standard specifies.
//!
//! The interpreter is the venv that `scripts/test.sh` makes with pinned py-spiffe and
//! `cryptography`, passed in `LANYARD_PYTHON`. Without it these tests fail, they never
//! skip. The Python client is the `CLIENT_PY` constant below, written to a temporary
//! directory at run time; it prints one JSON object that the tests check. Every Python
//! run is bounded by a timeout.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lanyard_tests::{TrustDomain, my_uid};
use serde_json::Value;

/// `nobody`: a uid no test registers.
const NOBODY: u32 = 65534;

/// The Python side. `client.py MODE ENDPOINT [SECONDS]`; the last stdout line is JSON.
///
/// py-spiffe 0.3.2's one-shot `fetch_*` calls make one RPC with the given deadline and
/// never retry: a gRPC error comes back at once as `FetchX509SvidError` (or
/// `FetchX509BundleError`) chained to the `grpc.RpcError`. Registration reaches the
/// agent asynchronously, so `wait_for_identity` retries PERMISSION_DENIED and
/// UNAVAILABLE for a while, as the spec tells clients to. Its streaming API retries
/// everything but CANCELLED and INVALID_ARGUMENT internally and silently, and reconnects
/// when a stream ends with OK; the watch mode wraps those two private hooks to count
/// them, because the spec forbids ending a stream with OK.
const CLIENT_PY: &str = r#"
import base64, datetime, json, os, sys, threading, time

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient
from spiffe.workloadapi import workload_api_client as wac


def spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def grpc_error(exc):
    """(code name, details) of the gRPC error behind a py-spiffe exception, if any."""
    e = exc
    while e is not None:
        if isinstance(e, grpc.Call):
            return e.code().name, e.details()
        e = e.__cause__
    return None, None


def error_info(exc):
    code, details = grpc_error(exc)
    return {"type": type(exc).__name__, "message": str(exc), "grpc_code": code, "grpc_details": details}


def wait_for_identity(client, seconds):
    deadline = time.monotonic() + seconds
    attempts = 0
    while True:
        attempts += 1
        try:
            return client.fetch_x509_svid(timeout=5), attempts
        except Exception as exc:
            code, _ = grpc_error(exc)
            if code not in ("PERMISSION_DENIED", "UNAVAILABLE") or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def signed_by(cert, issuer, tbs=None):
    """Whether issuer's ECDSA P-256 key verifies cert's SHA-256 signature."""
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        return False
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA256):
        return False
    try:
        key.verify(cert.signature, tbs if tbs is not None else cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def expires_in(cert):
    return (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def fetch(endpoint):
    with WorkloadApiClient(socket_path=endpoint, default_timeout=5) as client:
        svid, attempts = wait_for_identity(client, 15)
        bundles = client.fetch_x509_bundles()
        ctx = client.fetch_x509_context()
    leaf, chain = svid.leaf, svid.cert_chain
    td = svid.spiffe_id.trust_domain
    own = bundles.get_bundle_for_trust_domain(td)
    cas = list(own.x509_authorities) if own else []
    ctx_own = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Each chain certificate is signed by the next one, the last by a CA of the bundle.
    links = [signed_by(c, n) for c, n in zip(chain, chain[1:])]
    top_signer = [ca for ca in cas if signed_by(chain[-1], ca)]
    return {
        "attempts": attempts,
        "spiffe_id": str(svid.spiffe_id),
        "uri_sans": sans.get_values_for_type(x509.UniformResourceIdentifier),
        "serial": format(leaf.serial_number, "x"),
        "cert_count": len(chain),
        "leaf_signature_oid": leaf.signature_algorithm_oid.dotted_string,
        "leaf_key_curve": getattr(getattr(leaf.public_key(), "curve", None), "name", None),
        "key_matches": spki(svid.private_key.public_key()) == spki(leaf.public_key()),
        "expires_in": expires_in(leaf),
        "bundle_trust_domains": sorted(b.trust_domain.name for b in bundles.bundles),
        "bundle_authorities_b64": sorted(base64.b64encode(ca.public_bytes(serialization.Encoding.DER)).decode() for ca in cas),
        "chain_links_verify": all(links),
        "chain_verifies_with_bundle": all(links) and bool(top_signer),
        "tampered_rejected": bool(top_signer) and not signed_by(chain[-1], top_signer[0], chain[-1].tbs_certificate_bytes + b"x"),
        "context_spiffe_ids": [str(s.spiffe_id) for s in ctx.x509_svids],
        "context_trust_domains": sorted(b.trust_domain.name for b in ctx.x509_bundle_set.bundles),
        "context_bundle_equal": ctx_own is not None and ctx_own == own,
    }


def denied(endpoint):
    out = {"uid": os.getuid()}
    with WorkloadApiClient(socket_path=endpoint, default_timeout=5) as client:
        for name, call, show in (
            ("x509_svid", client.fetch_x509_svid, lambda s: str(s.spiffe_id)),
            ("x509_bundles", client.fetch_x509_bundles, lambda b: sorted(x.trust_domain.name for x in b.bundles)),
        ):
            try:
                out[name] = {"ok": True, "value": show(call())}
            except Exception as exc:
                out[name] = {"ok": False, **error_info(exc)}
    return out


def watch(endpoint, seconds):
    t0 = time.monotonic()
    stream_ends, rpc_errors, updates, errors = [], [], [], []
    end_hook = wac.WorkloadApiClient._reconnect_after_stream_end
    retry_hook = wac.RetryHandler.should_retry

    def on_stream_end(cancel_handler, *rest):
        if not cancel_handler.is_cancelled():  # our own cancel() at the end is no stream end
            stream_ends.append(round(time.monotonic() - t0, 3))
        return end_hook(cancel_handler, *rest)

    def on_rpc_error(self, code):
        rpc_errors.append({"t": round(time.monotonic() - t0, 3), "code": code.name})
        return retry_hook(self, code)

    wac.WorkloadApiClient._reconnect_after_stream_end = staticmethod(on_stream_end)
    wac.RetryHandler.should_retry = on_rpc_error
    done = threading.Event()
    with WorkloadApiClient(socket_path=endpoint, default_timeout=5) as client:
        _, attempts = wait_for_identity(client, 15)
        t0 = time.monotonic()

        def on_success(ctx):
            leaf = ctx.default_svid.leaf
            updates.append({
                "t": round(time.monotonic() - t0, 3),
                "spiffe_id": str(ctx.default_svid.spiffe_id),
                "serial": format(leaf.serial_number, "x"),
                "expires_in": expires_in(leaf),
            })
            if len({u["serial"] for u in updates}) >= 2:
                done.set()

        def on_error(exc):
            errors.append({"t": round(time.monotonic() - t0, 3), **error_info(exc)})
            done.set()

        handle = client.stream_x509_contexts(on_success, on_error)
        done.wait(seconds)
        handle.cancel()
    return {"attempts": attempts, "window": seconds, "updates": updates, "errors": errors,
            "stream_ends": stream_ends, "rpc_errors": rpc_errors}


mode, endpoint = sys.argv[1], sys.argv[2]
if mode == "fetch":
    result = fetch(endpoint)
elif mode == "denied":
    result = denied(endpoint)
elif mode == "watch":
    result = watch(endpoint, float(sys.argv[3]))
else:
    sys.exit(f"unknown mode {mode}")
print(json.dumps(result), flush=True)
"#;

fn python() -> PathBuf {
    match std::env::var_os("LANYARD_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "LANYARD_PYTHON is not set: run the tests with scripts/test.sh, which makes .venv \
             with the pinned py-spiffe and exports LANYARD_PYTHON=<repo>/.venv/bin/python"
        ),
    }
}

/// The client script in its own world-readable temporary directory, so that a process
/// of another uid can read it (and use the directory as its cwd and HOME).
struct Client {
    dir: tempfile::TempDir,
    script: PathBuf,
}

impl Client {
    fn new() -> Client {
        python(); // fail before starting anything when LANYARD_PYTHON is missing
        let dir = tempfile::Builder::new()
            .prefix("lanyard-py")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let script = dir.path().join("client.py");
        std::fs::write(&script, CLIENT_PY).expect("write client.py");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))
            .expect("chmod script");
        Client { dir, script }
    }

    /// The venv's python in a clean environment, as `uid` (and its gid) if given.
    fn command(&self, uid: Option<u32>) -> Command {
        let mut cmd = Command::new(python());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            .env("PYTHONNOUSERSITE", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(self.dir.path());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    /// Runs `client.py args...` and returns its JSON; panics with everything on failure.
    fn run(&self, td: &TrustDomain, args: &[&str], uid: Option<u32>, limit: Duration) -> Value {
        let mut cmd = self.command(uid);
        cmd.arg(&self.script).args(args);
        let out = run_bounded(&mut cmd, limit);
        let json = out
            .status
            .filter(ExitStatus::success)
            .and_then(|_| out.stdout.lines().rev().find(|l| !l.trim().is_empty()))
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        json.unwrap_or_else(|| {
            // A known interop failure, named so that nobody has to rediscover it.
            let hint = if out.stderr.contains("RST_STREAM") {
                "\nhint: grpcio >= 1.58 sends the percent-encoded socket path as :authority on unix sockets \
                 (grpc/grpc#38142) and h2 resets such a stream with PROTOCOL_ERROR; the SPIFFE Workload Endpoint standard says the \
                 agent must accept any :authority"
            } else {
                ""
            };
            panic!(
                "py-spiffe client {args:?} (uid {uid:?}) failed: {}{hint}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- agent log ---\n{}",
                out.describe(),
                out.stdout,
                out.stderr,
                td.agent.log()
            )
        })
    }
}

struct Finished {
    /// None when the process was killed at the time limit.
    status: Option<ExitStatus>,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn describe(&self) -> String {
        match self.status {
            Some(s) => format!("{s} after {:.1?}", self.elapsed),
            None => format!("killed after the {:.1?} time limit", self.elapsed),
        }
    }
}

/// Runs a command with piped output, killing it if it outlives `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        elapsed: start.elapsed(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The first directory above `path` (or above what it links to) that other users
/// cannot enter, if any.
fn untraversable_dir(path: &Path) -> Option<PathBuf> {
    let mut paths = vec![path.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(path) {
        paths.push(real);
    }
    paths
        .iter()
        .flat_map(|p| p.ancestors().skip(1))
        .find_map(|dir| {
            let mode = std::fs::metadata(dir).ok()?.permissions().mode();
            (mode & 0o001 == 0).then(|| dir.to_path_buf())
        })
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

/// The base64 DER of each certificate in a PEM text, sorted.
fn pem_bodies(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        if line == "-----BEGIN CERTIFICATE-----" {
            cur = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            out.extend(cur.take());
        } else if let Some(body) = cur.as_mut() {
            body.push_str(line);
        }
    }
    out.sort();
    out
}

#[test]
fn py_spiffe_fetches_svid_and_bundle() {
    let client = Client::new();
    let td = TrustDomain::start();
    let id = "spiffe://example.org/py/fetcher";
    td.register_uid(id, my_uid(), &[]);
    let endpoint = td.agent.endpoint();

    let v = client.run(&td, &["fetch", &endpoint], None, Duration::from_secs(60));
    let report = format!("py-spiffe saw: {v:#}");

    // fetch_x509_svid
    assert_eq!(s(&v, "spiffe_id"), id, "{report}");
    assert_eq!(
        v["uri_sans"],
        serde_json::json!([id]),
        "the leaf's only URI SAN is the ID; {report}"
    );
    assert!(v["cert_count"].as_u64().unwrap_or(0) >= 1, "{report}");
    assert!(!s(&v, "serial").is_empty(), "{report}");
    assert_eq!(
        v["key_matches"], true,
        "the private key belongs to the leaf; {report}"
    );
    assert_eq!(
        s(&v, "leaf_signature_oid"),
        "1.2.840.10045.4.3.2",
        "ecdsa-with-SHA256; {report}"
    );
    assert!(
        v["expires_in"].as_f64().unwrap_or(0.0) > 0.0,
        "the leaf is still valid; {report}"
    );

    // fetch_x509_bundles: exactly the own trust domain (no federation configured), and
    // the same CA certificates as the server's `bundle show`.
    assert_eq!(
        v["bundle_trust_domains"],
        serde_json::json!(["example.org"]),
        "{report}"
    );
    let served: Vec<String> =
        serde_json::from_value(v["bundle_authorities_b64"].clone()).expect("authorities");
    assert!(!served.is_empty(), "{report}");
    assert_eq!(
        served,
        pem_bodies(&td.server.bundle_pem()),
        "Workload API bundle vs `bundle show`; {report}"
    );

    // The chain verifies with cryptography: each link, and the top with a bundle CA
    // (ECDSA P-256, SHA-256); a tampered TBS is rejected, so the check is not vacuous.
    assert_eq!(v["chain_links_verify"], true, "{report}");
    assert_eq!(
        v["chain_verifies_with_bundle"], true,
        "the SVID is signed by a CA of the bundle; {report}"
    );
    assert_eq!(v["tampered_rejected"], true, "{report}");

    // fetch_x509_context agrees.
    assert_eq!(v["context_spiffe_ids"], serde_json::json!([id]), "{report}");
    assert_eq!(
        v["context_trust_domains"],
        serde_json::json!(["example.org"]),
        "{report}"
    );
    assert_eq!(
        v["context_bundle_equal"], true,
        "X509Context bundle == fetch_x509_bundles; {report}"
    );
}

#[test]
fn py_spiffe_unregistered_uid_gets_no_identity_issued() {
    let client = Client::new();
    let td = TrustDomain::start();
    // Someone else (root) does have an identity, so the agent is synced and serving.
    td.register_uid("spiffe://example.org/py/root", my_uid(), &[]);
    let endpoint = td.agent.endpoint();
    let root = client.run(&td, &["fetch", &endpoint], None, Duration::from_secs(60));
    assert_eq!(s(&root, "spiffe_id"), "spiffe://example.org/py/root");

    // uid 65534 must be able to run the venv at all, or the check below means nothing.
    let python = python();
    let probe = run_bounded(
        client
            .command(Some(NOBODY))
            .args(["-c", "import spiffe, cryptography, grpc"]),
        Duration::from_secs(30),
    );
    assert!(
        probe.status.is_some_and(|s| s.success()),
        "uid {NOBODY} cannot run {} ({}): the venv, the interpreter it links to and every directory above \
         them must be readable and enterable by other users. scripts/test.sh builds .venv from Debian's \
         /usr/bin/python3.11 (pyenv's lives under /root, mode 0700) for this; a checkout under a 0700 \
         directory cannot work. First directory others cannot enter: {:?}\nstderr:\n{}",
        python.display(),
        probe.describe(),
        untraversable_dir(&python),
        probe.stderr
    );

    let v = client.run(
        &td,
        &["denied", &endpoint],
        Some(NOBODY),
        Duration::from_secs(60),
    );
    let report = format!("py-spiffe saw: {v:#}");
    assert_eq!(v["uid"], NOBODY, "{report}");
    for call in ["x509_svid", "x509_bundles"] {
        let r = &v[call];
        assert_eq!(
            r["ok"], false,
            "{call}: an unregistered workload got an answer; {report}"
        );
        assert_eq!(r["grpc_code"], "PERMISSION_DENIED", "{call}; {report}");
        assert_eq!(r["grpc_details"], "no identity issued", "{call}; {report}");
        let expected_type = if call == "x509_svid" {
            "FetchX509SvidError"
        } else {
            "FetchX509BundleError"
        };
        assert_eq!(r["type"], expected_type, "{call}; {report}");
        assert!(
            s(r, "message").contains("no identity issued"),
            "{call}; {report}"
        );
    }
}

#[test]
fn py_spiffe_stream_sees_rotation() {
    let client = Client::new();
    let td = TrustDomain::start();
    let id = "spiffe://example.org/py/watcher";
    td.register_uid(id, my_uid(), &["--x509-svid-ttl", "10"]);
    let endpoint = td.agent.endpoint();

    // The script stops as soon as it has seen two serials, or after 14 s.
    let v = client.run(
        &td,
        &["watch", &endpoint, "14"],
        None,
        Duration::from_secs(60),
    );
    let report = format!("py-spiffe saw: {v:#}");
    assert_eq!(
        v["errors"],
        serde_json::json!([]),
        "on_error was called; {report}"
    );
    assert_eq!(
        v["stream_ends"],
        serde_json::json!([]),
        "the FetchX509SVID stream ended with OK, which the spec forbids (§5.4); {report}"
    );
    assert_eq!(
        v["rpc_errors"],
        serde_json::json!([]),
        "the stream failed and py-spiffe retried; {report}"
    );

    let updates = v["updates"].as_array().expect("updates");
    assert!(!updates.is_empty(), "no update at all; {report}");
    assert!(
        updates[0]["t"].as_f64().unwrap_or(f64::MAX) < 2.0,
        "the first message came late; {report}"
    );
    for u in updates {
        assert_eq!(s(u, "spiffe_id"), id, "{report}");
        let left = u["expires_in"].as_f64().unwrap_or(f64::MAX);
        assert!(
            left <= 11.0,
            "an SVID outlives --x509-svid-ttl 10 ({left:.1} s left); {report}"
        );
    }
    // The first new serial must be a rotation: the SVID it replaces had lived a fair part
    // of its 10 s (renewal at about half-life), not a re-issue seconds early.
    let expiry =
        |u: &Value| u["t"].as_f64().unwrap_or(0.0) + u["expires_in"].as_f64().unwrap_or(0.0);
    let i = updates
        .iter()
        .position(|u| u["serial"] != updates[0]["serial"]);
    let Some(i) = i else {
        panic!("no rotated SVID (new serial) within 14 s of watching a 10 s SVID; {report}")
    };
    let (old, new) = (&updates[i - 1], &updates[i]);
    let at = new["t"].as_f64().unwrap_or(f64::MAX);
    assert!(
        at <= 12.0,
        "the first rotation came {at:.1} s into the watch, later than 12 s; {report}"
    );
    let left = expiry(old) - at;
    assert!(
        (0.0..=7.5).contains(&left),
        "an SVID with a 10 s lifetime was replaced {left:.2} s before it expired (expected about half-life, \
         4-6 s): premature re-issue; {report}"
    );
    assert!(
        expiry(new) > expiry(old) + 2.0,
        "the new SVID does not outlive the old one; {report}"
    );
}
