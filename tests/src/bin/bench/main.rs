//! `lanyard-bench`: end-to-end performance numbers for Lanyard, each printed next to a
//! floor measured in the same run on the same machine, and the ratio between them.
//!
//! Build and run (release):
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p lanyard-tests --bin lanyard-bench [-- --json]
//! ```
//!
//! Measurements:
//! 1. FetchX509SVID first-message latency on a new Unix-socket connection, warm agent
//!    cache; floor: a bare tonic server-streaming SpiffeWorkloadAPI in this process that
//!    sends a canned response of the same bytes.
//! 2. X509-SVID issuance throughput through `SignX509Svids` (TLS 1.3, mTLS as an agent);
//!    floor: the same CSR parse+verify and leaf signing with rcgen+ring in-process.
//! 3. `entry create` to the new SVID on an already-open FetchX509SVID stream.
//! 4. Agent start (fresh join token, and restart from the stored SVID) to the first SVID.
//! 5. Registration at scale: CreateEntry latency at 20k entries next to 1k, entry create
//!    to the new SVID on an open stream at 20k entries, and server memory per entry.
//!
//! It never asserts timing: it prints numbers, goals and whether they are met. On a
//! shared machine wall-clock numbers move with other load, so measurements 1 and 2 also
//! print CPU time per operation (from `/proc/<pid>/task/*/schedstat`), which does not, and
//! the load average is printed before each measurement. `--only 1,3` runs a subset (for
//! profiling); `--help` lists the knobs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use lanyard_tests::{TrustDomain, bin, my_uid};
use serde_json::json;
use tonic_prost::prost::Message as _;

use crate::agent_start::measure_agent_start;
use crate::entry_scale::measure_entry_scale;
use crate::fetch_latency::{fetch_first, measure_fetch_latency, start_floor_server};
use crate::issuance::measure_issuance;
use crate::machine::{loadavg, machine_facts};
use crate::opts::Opts;
use crate::output::{Row, fmt_num, ms, round3};
use crate::push::measure_push;

const TD: &str = "example.org";

static JSON_MODE: AtomicBool = AtomicBool::new(false);

/// Human-readable output: stdout, or stderr when `--json` owns stdout.
macro_rules! say {
    ($($t:tt)*) => {{
        let line = format!($($t)*);
        if $crate::JSON_MODE.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("{line}");
        } else {
            println!("{line}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
    }};
}

mod admin;
mod agent_start;
mod entry_scale;
mod fetch_latency;
mod issuance;
mod machine;
mod opts;
mod output;
mod push;

/// A second agent under its own alias whose stored credentials measurement 2 uses. It is
/// stopped once attested so it neither competes for the CPU nor pulls the 200 entries.
fn signer_agent(td: &TrustDomain) -> Result<PathBuf> {
    let root = td.dir.path().join("signer");
    std::fs::create_dir_all(&root)?;
    let token = td
        .server
        .token(Some(&format!("spiffe://{TD}/bench-signer")));
    let mut agent = lanyard_tests::Agent::start(&root, &td.server, Some(&token));
    agent.stop();
    Ok(agent.data_dir.clone())
}

fn summary(rows: &[Row]) {
    say!("\n== Summary ==");
    say!(
        "{:<54} {:>14} {:>10} {:>7}  {:<15} {}",
        "measurement",
        "value",
        "floor",
        "ratio",
        "goal",
        "status"
    );
    for r in rows {
        let floor = r
            .floor
            .map(|f| format!("{} ", fmt_num(f)))
            .unwrap_or_else(|| "-".into());
        let ratio = r
            .ratio
            .map(|x| format!("{x:.2}x"))
            .unwrap_or_else(|| "-".into());
        say!(
            "{:<54} {:>14} {:>10} {:>7}  {:<15} {}",
            r.what,
            format!("{} {}", fmt_num(r.value), r.unit),
            floor,
            ratio,
            r.goal,
            if r.met() { "MET" } else { "MISSED" }
        );
    }
}

fn main() -> Result<()> {
    let opts = Opts::parse()?;
    if opts.help {
        println!("{}", crate::opts::USAGE);
        return Ok(());
    }
    JSON_MODE.store(opts.json, Ordering::Relaxed);
    let started = Instant::now();
    let facts = machine_facts();
    say!("lanyard-bench");
    say!(
        "machine: nproc {}, CPU {} ({} MHz), kernel {}, {} MiB RAM, bench build: {}",
        facts["nproc"],
        facts["cpu_model"].as_str().unwrap_or("?"),
        facts["cpu_mhz"].as_str().unwrap_or("?"),
        facts["kernel"].as_str().unwrap_or("?"),
        facts["mem_total_mib"],
        facts["bench_build"].as_str().unwrap_or("?")
    );
    say!(
        "binaries: {}",
        bin("lanyard-agent")
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );

    let t = Instant::now();
    let td = TrustDomain::start();
    let uid = my_uid();
    td.register_uid(&format!("spiffe://{TD}/bench/workload"), uid, &[]);
    say!(
        "trust domain up in {:.0} ms (server {}, agent socket {})",
        ms(t.elapsed()),
        td.server.address,
        td.agent.socket.display()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The agent's own first response, to be replayed byte for byte by the floor server.
    let run = |n: u32| {
        let yes = opts.only.is_empty() || opts.only.contains(&n);
        if yes {
            say!("\n(load average before [{n}]: {})", loadavg());
        }
        yes
    };
    let mut rows = vec![];
    if run(1) {
        // The agent's own first response, replayed byte for byte by the floor server.
        let canned = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match fetch_first(&td.agent.socket).await {
                    Ok(m) if !m.svids.is_empty() => return Ok(m),
                    r if Instant::now() > deadline => {
                        return Err(anyhow!("no SVID from the agent: {:?}", r.err()));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })?;
        let canned_len = canned.encoded_len();
        let floor_socket = td.dir.path().join("floor.sock");
        let floor_rt = start_floor_server(&floor_socket, canned)?;
        rows.extend(rt.block_on(measure_fetch_latency(&td, &floor_socket, &opts, canned_len))?);
        floor_rt.shutdown_background();
    }
    if run(2) {
        let signer = signer_agent(&td)?;
        rows.extend(rt.block_on(measure_issuance(&td, &signer, &opts))?);
    }
    if run(3) {
        rows.extend(rt.block_on(measure_push(&td, &opts))?);
    }
    if run(4) {
        rows.extend(rt.block_on(measure_agent_start(&td, &opts))?);
    }
    if run(5) {
        rows.extend(rt.block_on(measure_entry_scale(&opts))?);
    }

    summary(&rows);
    let total = started.elapsed();
    say!("load average at the end: {}", loadavg());
    say!(
        "\nmet {}/{} goals; total bench time {:.1} s",
        rows.iter().filter(|r| r.met()).count(),
        rows.len(),
        total.as_secs_f64()
    );
    if opts.json {
        let doc = json!({
            "machine": facts,
            "options": {
                "iterations": opts.iterations, "svids": opts.svids, "batch": opts.batch, "concurrency": opts.concurrency,
                "floor_threads": opts.floor_threads, "entries": opts.sign_entries, "push_trials": opts.push_trials,
                "start_trials": opts.start_trials, "scale_entries": opts.scale_entries,
            },
            "measurements": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "total_seconds": round3(total.as_secs_f64()),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
