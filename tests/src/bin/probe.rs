//! `lanyard-probe`: a Workload API client that plays the attacks of the workload
//! attestation tests: it connects and hands its connection to a child, execs another
//! program while a child keeps the connection, or floods the socket with idle
//! connections. Every result is one JSON line on stdout.
//!
//! ```text
//! lanyard-probe fetch SOCKET                 fetch X509-SVIDs on a connection of its own
//! lanyard-probe connect SOCKET [--pause-ms N] [--wait-child] [--exec PROG ARGS...] -- CHILD...
//!     connect, start `lanyard-probe CHILD...` with the connection as its stdin, then wait
//!     N ms, wait for the child, or exec PROG (keeping the connection open across exec)
//! lanyard-probe fetch-stdin [--wait-file F] [--wait-parent-exe PATH]
//!     fetch on the inherited connection (stdin), once F exists / the parent executes PATH
//! lanyard-probe stream-stdin                 open a stream on stdin, print every message
//! lanyard-probe flood SOCKET N SECONDS       hold N idle connections, report which closed
//! lanyard-probe sleep SECONDS
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use lanyard_proto::workload::X509svidRequest;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

type Client = SpiffeWorkloadApiClient<Channel>;

fn usage() -> ExitCode {
    eprintln!("usage: see the doc comment of tests/src/bin/probe.rs");
    ExitCode::from(2)
}

/// A gRPC channel over one already connected stream.
async fn channel_over(stream: std::os::unix::net::UnixStream) -> Result<Channel, String> {
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().map(|mut s| s.take()).ok().flatten();
            async move {
                let stream = taken.ok_or_else(|| std::io::Error::other("used once only"))?;
                tokio::net::UnixStream::from_std(stream).map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))
}

fn request() -> tonic::Request<X509svidRequest> {
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn status_json(status: &tonic::Status) -> Value {
    json!({"ok": false, "code": format!("{:?}", status.code()), "message": status.message()})
}

/// One FetchX509SVID: the IDs of the first message, or the error.
async fn fetch_once(mut client: Client) -> Value {
    let mut stream = match client.fetch_x509svid(request()).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status_json(&status),
    };
    match stream.message().await {
        Ok(Some(msg)) => {
            json!({"ok": true, "ids": msg.svids.iter().map(|s| s.spiffe_id.clone()).collect::<Vec<_>>()})
        }
        Ok(None) => json!({"ok": false, "code": "Eof", "message": "stream ended"}),
        Err(status) => status_json(&status),
    }
}

/// The connection inherited as stdin.
fn stdin_connection() -> Result<std::os::unix::net::UnixStream, String> {
    let fd: OwnedFd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

async fn fetch_stdin(args: &[String]) -> Result<Value, String> {
    let mut rest = args;
    while let Some(flag) = rest.first() {
        match (flag.as_str(), rest) {
            ("--wait-file", [_, file, tail @ ..]) => {
                let file = PathBuf::from(file);
                wait_until(|| file.exists(), "the go file")?;
                rest = tail;
            }
            ("--wait-parent-exe", [_, path, tail @ ..]) => {
                let link =
                    PathBuf::from(format!("/proc/{}/exe", std::os::unix::process::parent_id()));
                let want = PathBuf::from(path);
                wait_until(
                    || std::fs::read_link(&link).is_ok_and(|l| l == want),
                    "the exec",
                )?;
                rest = tail;
            }
            _ => return Err(format!("unexpected argument {flag}")),
        }
    }
    let channel = channel_over(stdin_connection()?).await?;
    Ok(fetch_once(Client::new(channel)).await)
}

async fn stream_stdin() -> Result<(), String> {
    let channel = channel_over(stdin_connection()?).await?;
    let mut client = Client::new(channel);
    let mut stream = match client.fetch_x509svid(request()).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            println!("{}", status_json(&status));
            return Ok(());
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(msg)) => println!(
                "{}",
                json!({"ok": true, "ids": msg.svids.iter().map(|s| s.spiffe_id.clone()).collect::<Vec<_>>()})
            ),
            Ok(None) => {
                println!("{}", json!({"ok": false, "code": "Eof"}));
                return Ok(());
            }
            Err(status) => {
                println!("{}", status_json(&status));
                return Ok(());
            }
        }
    }
}

/// `connect SOCKET [--pause-ms N] [--wait-child] [--exec PROG ARGS...] -- CHILD...`
fn connect(args: &[String]) -> Result<(), String> {
    let [socket, rest @ ..] = args else {
        return Err("connect needs a socket".into());
    };
    let split = rest
        .iter()
        .position(|a| a == "--")
        .ok_or("connect needs -- CHILD...")?;
    let (opts, child) = (&rest[..split], &rest[split + 1..]);
    let conn = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    let mut pause = None;
    let mut wait_child = false;
    let mut exec: Option<&[String]> = None;
    let mut i = 0;
    while i < opts.len() {
        match opts[i].as_str() {
            "--pause-ms" => {
                let ms: u64 = opts
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .ok_or("--pause-ms N")?;
                pause = Some(Duration::from_millis(ms));
                i += 2;
            }
            "--wait-child" => {
                wait_child = true;
                i += 1;
            }
            "--exec" => {
                exec = Some(&opts[i + 1..]);
                i = opts.len();
            }
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    let handed: OwnedFd = conn
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(&me)
        .args(child)
        .stdin(Stdio::from(handed))
        .spawn()
        .map_err(|e| format!("spawning the child: {e}"))?;
    if let Some(pause) = pause {
        std::thread::sleep(pause);
    }
    if wait_child {
        child.wait().map_err(|e| e.to_string())?;
    }
    if let Some([prog, prog_args @ ..]) = exec {
        // Keep the connection open across exec, as a careless (or malicious) program does.
        nix::fcntl::fcntl(
            &conn,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| e.to_string())?;
        let err = std::os::unix::process::CommandExt::exec(Command::new(prog).args(prog_args));
        return Err(format!("exec {prog}: {err}"));
    }
    drop(conn);
    Ok(())
}

/// Holds `n` idle connections for `secs`, then reports how many the agent closed at once
/// (within a second) and how many by the end.
fn flood(socket: &Path, n: usize, secs: u64) -> Value {
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(c) => {
                let _ = c.set_nonblocking(true);
                conns.push(Some(c));
            }
            Err(_) => failed += 1,
        }
    }
    let sweep = |conns: &mut Vec<Option<std::os::unix::net::UnixStream>>| {
        let mut buf = [0u8; 256];
        for slot in conns.iter_mut() {
            if let Some(c) = slot {
                loop {
                    match std::io::Read::read(c, &mut buf) {
                        Ok(0) => {
                            *slot = None;
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            *slot = None;
                            break;
                        }
                    }
                }
            }
        }
        conns.iter().filter(|c| c.is_none()).count()
    };
    std::thread::sleep(Duration::from_secs(1));
    let at_once = sweep(&mut conns);
    println!(
        "{}",
        json!({"phase": "held", "opened": conns.len(), "failed": failed, "closed_at_once": at_once})
    );
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(1)));
    let by_end = sweep(&mut conns);
    json!({"phase": "end", "opened": conns.len(), "failed": failed, "closed_at_once": at_once, "closed_by_end": by_end})
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lanyard-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = match args.first().map(String::as_str) {
        Some("fetch") => match args.get(1) {
            Some(socket) => runtime.block_on(async {
                let channel = lanyard_daemon::uds::channel(socket)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                println!("{}", fetch_once(Client::new(channel)).await);
                Ok(())
            }),
            None => return usage(),
        },
        Some("connect") => connect(&args[1..]),
        Some("fetch-stdin") => runtime.block_on(async {
            let out = fetch_stdin(&args[1..]).await?;
            println!("{out}");
            Ok(())
        }),
        Some("stream-stdin") => runtime.block_on(stream_stdin()),
        Some("flood") => match (args.get(1), args.get(2), args.get(3)) {
            (Some(socket), Some(n), Some(secs)) => match (n.parse(), secs.parse()) {
                (Ok(n), Ok(secs)) => {
                    println!("{}", flood(Path::new(socket), n, secs));
                    Ok(())
                }
                _ => return usage(),
            },
            _ => return usage(),
        },
        Some("sleep") => match args.get(1).and_then(|s| s.parse().ok()) {
            Some(secs) => {
                std::thread::sleep(Duration::from_secs(secs));
                Ok(())
            }
            None => return usage(),
        },
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "code": "ProbeError", "message": e})
            );
            ExitCode::FAILURE
        }
    }
}
