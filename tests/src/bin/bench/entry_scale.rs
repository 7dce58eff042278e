//! Measurement 5: what a registration change costs as the entry count grows. The server
//! keeps an incremental index, so creating an entry should cost the same at 20k entries
//! as at 1k, a new entry should reach its agent in milliseconds, and each entry should
//! cost little memory. Its floor is the same server at 1k entries.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use lanyard_proto::admin::admin_service_client::AdminServiceClient;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_tests::{TrustDomain, my_uid};
use tonic::transport::Channel;

use crate::TD;
use crate::admin::{admin, create_entry, uid_selector};
use crate::fetch_latency::x509_request;
use crate::machine::child_pid;
use crate::opts::Opts;
use crate::output::{Better, Row, Stats};

/// Entries created in parallel while filling the datastore.
const FILL_CONCURRENCY: usize = 8;
/// CreateEntry calls timed at each size.
const SAMPLES: usize = 60;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Adds entries `from..to` for workloads of other (absent) agents, so they weigh on
/// the index but reach no agent of this trust domain.
async fn fill(admin: &AdminServiceClient<Channel>, from: usize, to: usize) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..FILL_CONCURRENCY {
        let mut admin = admin.clone();
        tasks.spawn(async move {
            for i in (from + worker..to).step_by(FILL_CONCURRENCY) {
                let id = format!("spiffe://{TD}/bench/scale/w{i}");
                let parent = format!("spiffe://{TD}/bench/scale/node-{}", i % 500);
                create_entry(&mut admin, &id, &parent, uid_selector(100_000 + i as u32))
                    .await
                    .with_context(|| format!("creating {id}"))?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The latency of single CreateEntry calls at the current size.
async fn create_latency(admin: &AdminServiceClient<Channel>, tag: &str) -> Result<Stats> {
    let mut admin = admin.clone();
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let id = format!("spiffe://{TD}/bench/scale/{tag}-{i}");
        let t = Instant::now();
        create_entry(
            &mut admin,
            &id,
            &format!("spiffe://{TD}/bench/scale/probe"),
            uid_selector(200_000 + i as u32),
        )
        .await?;
        samples.push(t.elapsed());
    }
    Ok(Stats::of(&samples))
}

/// Admin CreateEntry for this process's uid under the agent's alias, to the new SVID on
/// an open FetchX509SVID stream.
async fn propagation(td: &TrustDomain, trials: usize) -> Result<Stats> {
    let channel = lanyard_daemon::uds::channel(td.agent.socket.clone()).await?;
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(x509_request())
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| anyhow!("no first message"))?;
    let mut admin = admin(td).await?;
    let mut samples = Vec::with_capacity(trials);
    for i in 0..trials {
        let id = format!("spiffe://{TD}/bench/scale/mine-{i}");
        let t = Instant::now();
        create_entry(&mut admin, &id, &td.runner, uid_selector(my_uid())).await?;
        let arrived = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let msg = stream
                    .message()
                    .await?
                    .ok_or_else(|| anyhow!("stream ended"))?;
                if msg.svids.iter().any(|s| s.spiffe_id == id) {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
            }
        })
        .await
        .map_err(|_| anyhow!("{id} did not reach the stream within 10 s"))??;
        samples.push(arrived - t);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Stats::of(&samples))
}

pub(crate) async fn measure_entry_scale(opts: &Opts) -> Result<Vec<Row>> {
    let big = opts.scale_entries.max(2000);
    let small = 1000;
    say!("\n[5] registration cost at {small} vs {big} entries (a fresh trust domain)");
    let td = TrustDomain::start();
    td.register_uid(&format!("spiffe://{TD}/bench/scale/base"), my_uid(), &[]);
    let server_pid = child_pid(
        "lanyard-server",
        &td.server.admin_socket.display().to_string(),
    )
    .ok_or_else(|| anyhow!("cannot find the server's pid"))?;
    let admin = admin(&td).await?;

    let t = Instant::now();
    fill(&admin, 0, small).await?;
    say!(
        "  filled to {small} entries in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let at_small = create_latency(&admin, "small").await?;
    let rss_small = rss_kib(server_pid)?;
    let t = Instant::now();
    fill(&admin, small, big).await?;
    say!(
        "  filled to {big} entries in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let at_big = create_latency(&admin, "big").await?;
    let rss_big = rss_kib(server_pid)?;
    let pushed = propagation(&td, opts.push_trials.min(20)).await?;

    let per_entry = (rss_big.saturating_sub(rss_small) * 1024) as f64 / (big - small) as f64;
    say!("  CreateEntry at {small:>6}: {}", at_small.line());
    say!("  CreateEntry at {big:>6}: {}", at_big.line());
    say!("  entry -> SVID on stream at {big}: {}", pushed.line());
    say!(
        "  server RSS {} KiB at {small}, {} KiB at {big}: {per_entry:.0} bytes per entry",
        rss_small,
        rss_big
    );
    let mut details = serde_json::Map::new();
    details.insert("create_small".into(), at_small.json());
    details.insert("create_big".into(), at_big.json());
    details.insert("entries_small".into(), small.into());
    details.insert("entries_big".into(), big.into());
    let rows = vec![
        Row {
            id: "create_entry_flat",
            what: format!("CreateEntry p50 at {big} entries (floor: at {small})"),
            unit: "ms",
            value: at_big.p50,
            floor: Some(at_small.p50),
            ratio: Some(at_big.p50 / at_small.p50),
            goal: "<= 1.5x".into(),
            goal_limit: 1.5,
            better: Better::Lower,
            details,
        },
        Row {
            id: "entry_propagation_big",
            what: format!("entry create -> SVID on stream at {big} entries, p50"),
            unit: "ms",
            value: pushed.p50,
            floor: None,
            ratio: None,
            goal: "< 10 ms".into(),
            goal_limit: 10.0,
            better: Better::Lower,
            details: serde_json::Map::from_iter([("stats".to_string(), pushed.json())]),
        },
        Row {
            id: "server_memory_per_entry",
            what: "server memory per entry".into(),
            unit: "B",
            value: per_entry,
            floor: None,
            ratio: None,
            goal: "< 2048 B".into(),
            goal_limit: 2048.0,
            better: Better::Lower,
            details: serde_json::Map::from_iter([
                ("rss_small_kib".to_string(), rss_small.into()),
                ("rss_big_kib".to_string(), rss_big.into()),
            ]),
        },
    ];
    for r in &rows {
        r.print();
    }
    Ok(rows)
}
