//! Measurement 3: `entry create` to the new SVID on an open stream.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_tests::{TrustDomain, my_uid};

use crate::TD;
use crate::admin::{admin, create_entry, uid_selector};
use crate::fetch_latency::x509_request;
use crate::opts::Opts;
use crate::output::{Better, Row, Stats};

pub(crate) async fn measure_push(td: &TrustDomain, opts: &Opts) -> Result<Vec<Row>> {
    say!("\n[3] entry create -> new SVID on an already-open FetchX509SVID stream");
    let uid = my_uid();
    let channel = lanyard_daemon::uds::channel(td.agent.socket.clone()).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| anyhow!("no first message"))?;
    say!(
        "  stream open; the caller holds {} SVID(s)",
        first.svids.len()
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<String>)>();
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let ids = m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
            if tx.send((Instant::now(), ids)).is_err() {
                break;
            }
        }
    });
    /// When the first message naming `id` arrived (within 10 s).
    async fn wait_for(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Vec<String>)>,
        id: String,
    ) -> Result<Result<Instant>, tokio::time::error::Elapsed> {
        let fut = async move {
            loop {
                let (t, ids) = rx.recv().await.ok_or_else(|| anyhow!("the stream ended"))?;
                if ids.contains(&id) {
                    return Ok::<_, anyhow::Error>(t);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut).await
    }

    let mut e2e = vec![];
    let mut cli = vec![];
    let mut after_cli = vec![];
    let selector = format!("unix:uid:{uid}");
    for i in 0..opts.push_trials {
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(30)).await;
        let id = format!("spiffe://{TD}/bench/push/cli-{i}");
        let mut cmd = td.server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &td.runner,
            "--selector",
            &selector,
        ]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(cmd);
        let t0 = Instant::now();
        let child = cmd.spawn().context("spawn lanyard-server entry create")?;
        let run = async {
            let out = child.wait_with_output().await;
            (Instant::now(), out)
        };
        let ((cli_done, out), arrived) = tokio::join!(run, wait_for(&mut rx, id.clone()));
        let out = out?;
        if !out.status.success() {
            bail!(
                "entry create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let arrived =
            arrived.map_err(|_| anyhow!("the SVID for {id} did not arrive within 10 s"))??;
        e2e.push(arrived - t0);
        cli.push(cli_done - t0);
        after_cli.push(arrived.saturating_duration_since(cli_done));
    }
    // The same through the admin API directly, which separates the CLI process's cost.
    let admin = admin(td).await?;
    let mut api_e2e = vec![];
    let mut api_rpc = vec![];
    for i in 0..(opts.push_trials / 2).max(1) {
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(30)).await;
        let id = format!("spiffe://{TD}/bench/push/api-{i}");
        let t0 = Instant::now();
        let sel = uid_selector(uid);
        let mut a = admin.clone();
        let (rpc, arrived) = tokio::join!(
            async {
                let r = create_entry(&mut a, &id, &td.runner, sel).await;
                (Instant::now(), r)
            },
            wait_for(&mut rx, id.clone())
        );
        rpc.1?;
        let arrived =
            arrived.map_err(|_| anyhow!("the SVID for {id} did not arrive within 10 s"))??;
        api_e2e.push(arrived - t0);
        api_rpc.push(rpc.0 - t0);
    }
    reader.abort();
    let e = Stats::of(&e2e);
    let c = Stats::of(&cli);
    let a = Stats::of(&after_cli);
    let ae = Stats::of(&api_e2e);
    let ar = Stats::of(&api_rpc);
    say!("  CLI start -> SVID on stream : {}", e.line());
    say!("  CLI process runtime         : {}", c.line());
    say!("  CLI exit -> SVID on stream  : {}", a.line());
    say!("  admin API (no CLI) -> SVID  : {}", ae.line());
    say!("  admin CreateEntry RPC alone : {}", ar.line());
    say!("  (no floor: the goal is absolute; CLI runtime and the RPC alone are the context)");
    let mut details = serde_json::Map::new();
    details.insert("cli_start_to_svid".into(), e.json());
    details.insert("cli_runtime".into(), c.json());
    details.insert("cli_exit_to_svid".into(), a.json());
    details.insert("admin_api_to_svid".into(), ae.json());
    details.insert("admin_create_entry_rpc".into(), ar.json());
    let median = Row {
        id: "entry_create_to_svid_median",
        what: "entry create (CLI) -> SVID on stream, median".into(),
        unit: "ms",
        value: e.p50,
        floor: None,
        ratio: None,
        goal: "< 100 ms".into(),
        goal_limit: 100.0,
        better: Better::Lower,
        details,
    };
    let max = Row {
        id: "entry_create_to_svid_max",
        what: "entry create (CLI) -> SVID on stream, max".into(),
        unit: "ms",
        value: e.max,
        floor: None,
        ratio: None,
        goal: "< 100 ms".into(),
        goal_limit: 100.0,
        better: Better::Lower,
        details: serde_json::Map::new(),
    };
    median.print();
    max.print();
    Ok(vec![median, max])
}
