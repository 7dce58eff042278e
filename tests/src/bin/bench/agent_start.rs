//! Measurement 4: agent start to the first SVID served.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_tests::{TrustDomain, bin, my_uid};
use serde_json::{Value, json};

use crate::TD;
use crate::admin::{admin, create_entry, join_token, uid_selector};
use crate::fetch_latency::x509_request;
use crate::opts::Opts;
use crate::output::{Better, Row, Stats, ms, round3};

/// Log milestones of a spawned agent, in ms after spawn (JSON log lines).
pub(crate) fn milestones(log: &Path, spawned_at: SystemTime) -> Vec<(String, f64)> {
    let start = spawned_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86400.0)
        .unwrap_or(0.0);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let ts = v["timestamp"].as_str()?;
            let (_, clock) = ts.split_once('T')?;
            let clock = clock.trim_end_matches('Z');
            let mut parts = clock.split(':');
            let h: f64 = parts.next()?.parse().ok()?;
            let m: f64 = parts.next()?.parse().ok()?;
            let s: f64 = parts.next()?.parse().ok()?;
            let at = h * 3600.0 + m * 60.0 + s;
            let msg = v["fields"]["message"].as_str()?.to_string();
            Some((msg, (at - start) * 1000.0))
        })
        .collect()
}

pub(crate) struct StartTrial {
    pub(crate) socket_up: Duration,
    pub(crate) first_svid: Duration,
    pub(crate) marks: Vec<(String, f64)>,
}

pub(crate) async fn agent_start_trial(
    mut cmd: Command,
    socket: &Path,
    log: &Path,
) -> Result<(StartTrial, Child)> {
    let logfile = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logfile);
    let wall = SystemTime::now();
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("spawn lanyard-agent")?;
    let mut socket_up = None;
    loop {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!(
                "no SVID within 20 s; agent log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "lanyard-agent exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let Ok(channel) = lanyard_daemon::uds::channel(socket.to_path_buf()).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        socket_up.get_or_insert_with(|| t0.elapsed());
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let first = async {
            let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
            stream
                .message()
                .await?
                .ok_or_else(|| anyhow!("stream ended"))
        };
        match first.await {
            Ok(msg) if !msg.svids.is_empty() => {
                let first_svid = t0.elapsed();
                let marks = milestones(log, wall);
                return Ok((
                    StartTrial {
                        socket_up: socket_up.unwrap_or(first_svid),
                        first_svid,
                        marks,
                    },
                    child,
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

pub(crate) fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn agent_command(
    td: &TrustDomain,
    bundle: &Path,
    data_dir: &Path,
    socket: &Path,
    token: Option<&str>,
) -> Command {
    let mut cmd = Command::new(bin("lanyard-agent"));
    cmd.args([
        "run",
        "--trust-domain",
        TD,
        "--server-address",
        &td.server.address,
        "--log-format",
        "json",
    ])
    .arg("--trust-bundle-path")
    .arg(bundle)
    .arg("--data-dir")
    .arg(data_dir)
    .arg("--socket-path")
    .arg(socket);
    if let Some(t) = token {
        // From the environment, never the command line (other users read argv).
        cmd.env("LANYARD_JOIN_TOKEN", t);
    }
    // One extra debug line ("X509-SVID updated") marks when the agent holds the SVID.
    cmd.env(
        "RUST_LOG",
        "info,lanyard_agent::sync=debug,h2=warn,hyper=warn,sqlx=warn",
    );
    cmd
}

/// How long SHA-256 of this benchmark's own executable takes (64 KiB reads, ring), which
/// a fresh agent computes on this process's first Workload API call (`unix:sha256`).
pub(crate) fn own_exe_hash_time() -> Result<(u64, Duration)> {
    use std::io::Read as _;
    let path = std::env::current_exe()?;
    let t = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    std::hint::black_box(ctx.finish());
    Ok((size, t.elapsed()))
}

/// Median of each milestone over the trials (first occurrence per trial).
pub(crate) fn milestone_medians(trials: &[StartTrial]) -> Vec<(String, f64)> {
    let mut names: Vec<String> = vec![];
    for t in trials {
        for (m, _) in &t.marks {
            if !names.contains(m) {
                names.push(m.clone());
            }
        }
    }
    let mut out: Vec<(String, f64)> = names
        .into_iter()
        .filter_map(|name| {
            let v: Vec<Duration> = trials
                .iter()
                .filter_map(|t| {
                    t.marks
                        .iter()
                        .find(|(m, _)| *m == name)
                        .map(|(_, at)| Duration::from_secs_f64(at.max(0.0) / 1000.0))
                })
                .collect();
            (!v.is_empty()).then(|| (name, Stats::of(&v).p50))
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

pub(crate) async fn measure_agent_start(td: &TrustDomain, opts: &Opts) -> Result<Vec<Row>> {
    say!("\n[4] agent start -> first SVID served (poll: connect + FetchX509SVID every 1 ms)");
    let mut admin = admin(td).await?;
    let alias = format!("spiffe://{TD}/bench-start");
    create_entry(
        &mut admin,
        &format!("spiffe://{TD}/bench/start"),
        &alias,
        uid_selector(my_uid()),
    )
    .await?;
    // Best of three: the first read may come from disk rather than the page cache.
    let (exe_size, exe_hash) = tokio::task::spawn_blocking(|| -> Result<(u64, Duration)> {
        let mut best = own_exe_hash_time()?;
        for _ in 0..2 {
            let next = own_exe_hash_time()?;
            best.1 = best.1.min(next.1);
        }
        Ok(best)
    })
    .await??;
    say!(
        "  context: SHA-256 of this bench's executable ({:.1} MB) takes {:.1} ms here; a new agent process does it on",
        exe_size as f64 / 1e6,
        ms(exe_hash)
    );
    say!(
        "           this process's first call (unix:sha256 selector), inside the time to first SVID"
    );
    let bundle = td.dir.path().join("bootstrap.pem");
    let mut tokens = vec![];
    for _ in 0..opts.start_trials {
        tokens.push(join_token(&mut admin, &alias).await?);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fresh = vec![];
    let mut last_dir = None;
    for (i, token) in tokens.iter().enumerate() {
        let root = td.dir.path().join(format!("start-{i}"));
        std::fs::create_dir_all(&root)?;
        let (data, socket) = (root.join("data"), root.join("run").join("api.sock"));
        let cmd = agent_command(td, &bundle, &data, &socket, Some(token));
        let (trial, child) = agent_start_trial(cmd, &socket, &root.join("agent.log")).await?;
        kill(child);
        fresh.push(trial);
        last_dir = Some((root, data, socket));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (root, data, socket) = last_dir.ok_or_else(|| anyhow!("no trials"))?;
    let mut restart = vec![];
    for i in 0..opts.start_trials {
        let cmd = agent_command(td, &bundle, &data, &socket, None);
        let (trial, child) =
            agent_start_trial(cmd, &socket, &root.join(format!("restart-{i}.log"))).await?;
        kill(child);
        restart.push(trial);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rows = vec![];
    for (id, label, trials) in [
        ("agent_start_fresh", "fresh join token", &fresh),
        ("agent_start_restart", "restart, stored SVID", &restart),
    ] {
        let first = Stats::of(&trials.iter().map(|t| t.first_svid).collect::<Vec<_>>());
        let up = Stats::of(&trials.iter().map(|t| t.socket_up).collect::<Vec<_>>());
        say!("  {label}:");
        say!("    spawn -> first SVID     : {}", first.line());
        say!("    spawn -> socket accepts : {}", up.line());
        let marks = milestone_medians(trials);
        for (m, at) in &marks {
            say!("    median log milestone at {at:>8.1} ms: {m}");
        }
        let mut details = serde_json::Map::new();
        details.insert("caller_exe_bytes".into(), json!(exe_size));
        details.insert("caller_exe_sha256_ms".into(), json!(round3(ms(exe_hash))));
        details.insert("first_svid".into(), first.json());
        details.insert("socket_accepts".into(), up.json());
        details.insert(
            "log_milestones_median_ms".into(),
            Value::Array(
                marks
                    .iter()
                    .map(|(m, at)| json!({"message": m, "at_ms": round3(*at)}))
                    .collect(),
            ),
        );
        let row = Row {
            id,
            what: format!("agent start ({label}) -> first SVID, median"),
            unit: "ms",
            value: first.p50,
            floor: None,
            ratio: None,
            goal: "< 300 ms".into(),
            goal_limit: 300.0,
            better: Better::Lower,
            details,
        };
        row.print();
        rows.push(row);
    }
    Ok(rows)
}
