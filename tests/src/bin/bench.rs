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
//!
//! It never asserts timing: it prints numbers, goals and whether they are met. On a
//! shared machine wall-clock numbers move with other load, so measurements 1 and 2 also
//! print CPU time per operation (from `/proc/<pid>/task/*/schedstat`), which does not, and
//! the load average is printed before each measurement. `--only 1,3` runs a subset (for
//! profiling); `--help` lists the knobs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use lanyard_proto::admin::admin_service_client::AdminServiceClient;
use lanyard_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest};
use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use lanyard_proto::agent::{SignX509SvidsRequest, SvidRequest};
use lanyard_proto::types;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use lanyard_proto::workload::*;
use lanyard_tests::tls::{AgentCreds, agent_api, csr, fresh_key};
use lanyard_tests::{TrustDomain, bin, my_uid, unix_now};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_prost::prost::Message as _;

const TD: &str = "example.org";

// ---------------------------------------------------------------------------------------
// Output

static JSON_MODE: AtomicBool = AtomicBool::new(false);

/// Human-readable output: stdout, or stderr when `--json` owns stdout.
macro_rules! say {
    ($($t:tt)*) => {{
        let line = format!($($t)*);
        if JSON_MODE.load(Ordering::Relaxed) {
            eprintln!("{line}");
        } else {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    }};
}

/// Whether a larger value is better (throughput) or worse (latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// One row of the summary.
#[derive(Debug, Clone)]
struct Row {
    id: &'static str,
    what: String,
    unit: &'static str,
    value: f64,
    floor: Option<f64>,
    /// value / floor.
    ratio: Option<f64>,
    goal: String,
    /// Goal on the ratio when there is a floor, else on the value.
    goal_limit: f64,
    better: Better,
    details: serde_json::Map<String, Value>,
}

impl Row {
    fn met(&self) -> bool {
        let x = self.ratio.unwrap_or(self.value);
        match self.better {
            Better::Lower => x <= self.goal_limit,
            Better::Higher => x >= self.goal_limit,
        }
    }

    fn print(&self) {
        let floor = match (self.floor, self.ratio) {
            (Some(f), Some(r)) => {
                format!("   floor {} {}   ratio {:.2}x", fmt_num(f), self.unit, r)
            }
            _ => String::new(),
        };
        say!(
            "  => {:<54} {} {}{}   goal {}  [{}]",
            self.what,
            fmt_num(self.value),
            self.unit,
            floor,
            self.goal,
            if self.met() { "MET" } else { "MISSED" }
        );
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "what": self.what,
            "unit": self.unit,
            "value": round3(self.value),
            "floor": self.floor.map(round3),
            "ratio": self.ratio.map(round3),
            "goal": self.goal,
            "met": self.met(),
            "details": self.details,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latency statistics in milliseconds.
#[derive(Debug, Clone)]
struct Stats {
    n: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Stats {
        let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1);
        let pct = |p: f64| {
            v.get(((p * n as f64).ceil() as usize).clamp(1, n) - 1)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Stats {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }

    fn line(&self) -> String {
        format!(
            "n={} min {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3} ms",
            self.n, self.min, self.p50, self.p90, self.p99, self.max, self.mean
        )
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "min_ms": round3(self.min), "p50_ms": round3(self.p50), "p90_ms": round3(self.p90),
               "p99_ms": round3(self.p99), "max_ms": round3(self.max), "mean_ms": round3(self.mean)})
    }
}

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    iterations: usize,
    svids: usize,
    batch: usize,
    concurrency: usize,
    floor_threads: usize,
    sign_entries: usize,
    push_trials: usize,
    start_trials: usize,
    /// Measurements to run (1-4); empty = all.
    only: Vec<u32>,
    json: bool,
}

const USAGE: &str =
    "lanyard-bench [--json] [--iterations N (500)] [--svids N (4000)] [--batch N (100)]
              [--concurrency N (4)] [--floor-threads N (2)] [--entries N (200)]
              [--push-trials N (20)] [--start-trials N (10)] [--only 1,2,3,4]";

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            iterations: 500,
            svids: 4000,
            batch: 100,
            concurrency: 4,
            floor_threads: 2,
            sign_entries: 200,
            push_trials: 20,
            start_trials: 10,
            only: vec![],
            json: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut num = |name: &str| -> Result<usize> {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))?;
                let n: usize = v
                    .parse()
                    .map_err(|_| anyhow!("{name} {v:?} is not a number\n{USAGE}"))?;
                if n == 0 {
                    bail!("{name} must be at least 1");
                }
                Ok(n)
            };
            match a.as_str() {
                "--json" => o.json = true,
                "--iterations" => o.iterations = num(&a)?,
                "--svids" => o.svids = num(&a)?,
                "--batch" => o.batch = num(&a)?,
                "--concurrency" => o.concurrency = num(&a)?,
                "--floor-threads" => o.floor_threads = num(&a)?,
                "--entries" => o.sign_entries = num(&a)?,
                "--push-trials" => o.push_trials = num(&a)?,
                "--start-trials" => o.start_trials = num(&a)?,
                "--only" => {
                    let v = args
                        .next()
                        .ok_or_else(|| anyhow!("--only needs a list like 1,3\n{USAGE}"))?;
                    o.only = v
                        .split(',')
                        .map(|x| x.trim().parse().ok().filter(|n| (1..=4).contains(n)))
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            anyhow!("--only {v:?}: expected numbers 1-4 separated by commas")
                        })?;
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------
// Machine facts

fn machine_facts() -> Value {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "nproc": nproc,
        "cpu_model": field("model name"),
        "cpu_mhz": field("cpu MHz"),
        "kernel": kernel,
        "mem_total_mib": mem_kb / 1024,
        "loadavg_at_start": loadavg(),
        "bench_build": if cfg!(debug_assertions) { "debug (numbers are NOT representative)" } else { "release" },
    })
}

/// CPU time (ns) and run-queue wait (ns) of one task, from its `schedstat`.
fn schedstat(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut f = text
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    schedstat(Path::new("/proc/thread-self/schedstat")).0
}

/// CPU time and run-queue wait (ns) summed over the live threads of `pid` whose name
/// starts with `prefix` (all threads when empty). Threads that exited are not counted;
/// tokio's threads live for the whole measurement.
fn process_cpu(pid: u32, prefix: &str) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|t| schedstat(&t.path().join("schedstat")))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// The pid of our child process named `comm` whose command line mentions `arg`.
fn child_pid(comm: &str, arg: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // pid (comm) state ppid ...
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mentions = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes());
        (ppid == me && name == comm && mentions).then_some(pid)
    })
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages: other work on a shared machine shows here.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// Workload API clients and the floor server

/// New connection, FetchX509SVID with the security header, first message.
async fn fetch_first(socket: &Path) -> Result<X509svidResponse> {
    let channel = lanyard_daemon::uds::channel(socket.to_path_buf()).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| anyhow!("the stream ended before its first message"))
}

fn x509_request() -> Request<X509svidRequest> {
    let mut req = Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        lanyard_proto::WORKLOAD_SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

type Pinned<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The floor of measurement 1: the Workload API with nothing behind it but a canned
/// response, streamed like the agent streams (first message, then open until dropped).
#[derive(Debug)]
struct CannedWorkloadApi(X509svidResponse);

#[tonic::async_trait]
impl SpiffeWorkloadApi for CannedWorkloadApi {
    type FetchX509SVIDStream = Pinned<X509svidResponse>;
    async fn fetch_x509svid(
        &self,
        _req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let first = tokio_stream::once(Ok(self.0.clone()));
        Ok(Response::new(Box::pin(
            first.chain(tokio_stream::pending()),
        )))
    }
    type FetchX509BundlesStream = Pinned<X509BundlesResponse>;
    async fn fetch_x509_bundles(
        &self,
        _req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn fetch_jwtsvid(
        &self,
        _req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    type FetchJWTBundlesStream = Pinned<JwtBundlesResponse>;
    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn validate_jwtsvid(
        &self,
        _req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    type FetchWITSVIDStream = Pinned<WitsvidResponse>;
    async fn fetch_witsvid(
        &self,
        _req: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("floor"))
    }
    type FetchWITBundlesStream = Pinned<WitBundlesResponse>;
    async fn fetch_wit_bundles(
        &self,
        _req: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }
}

/// Starts the floor server on its own runtime (its own worker threads, like a separate
/// process would have) and returns the runtime, which must outlive the measurement.
fn start_floor_server(socket: &Path, canned: X509svidResponse) -> Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("floor-server")
        .enable_all()
        .build()?;
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(socket) })?;
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(CannedWorkloadApi(canned)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    Ok(rt)
}

// ---------------------------------------------------------------------------------------
// Admin API (bulk set-up is done over the admin socket directly: 200 CLI processes
// would only slow the benchmark down)

async fn admin(td: &TrustDomain) -> Result<AdminServiceClient<Channel>> {
    Ok(AdminServiceClient::new(
        lanyard_daemon::uds::channel(td.server.admin_socket.clone()).await?,
    ))
}

fn uid_selector(uid: u32) -> types::Selector {
    types::Selector {
        r#type: "unix".into(),
        value: format!("uid:{uid}"),
    }
}

async fn create_entry(
    admin: &mut AdminServiceClient<Channel>,
    spiffe_id: &str,
    parent_id: &str,
    selector: types::Selector,
) -> Result<String> {
    let entry = types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: vec![selector],
        ..Default::default()
    };
    Ok(admin
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await?
        .into_inner()
        .id)
}

async fn join_token(admin: &mut AdminServiceClient<Channel>, alias: &str) -> Result<String> {
    let req = CreateJoinTokenRequest {
        ttl: 600,
        spiffe_id: alias.into(),
    };
    Ok(admin.create_join_token(req).await?.into_inner().token)
}

// ---------------------------------------------------------------------------------------
// Measurement 1

async fn measure_fetch_latency(
    td: &TrustDomain,
    floor_socket: &Path,
    opts: &Opts,
    canned_len: usize,
) -> Result<Vec<Row>> {
    say!("\n[1] FetchX509SVID first message on a new connection (warm agent cache)");
    let agent_socket = td.agent.socket.clone();
    let warmup = 50.min(opts.iterations);
    for _ in 0..warmup {
        fetch_first(floor_socket).await?;
        fetch_first(&agent_socket).await?;
    }
    let agent_pid = child_pid("lanyard-agent", &agent_socket.display().to_string())
        .ok_or_else(|| anyhow!("cannot find the lanyard-agent process"))?;
    let me = std::process::id();
    let (agent0, floor0) = (process_cpu(agent_pid, ""), process_cpu(me, "floor-server"));
    let mut lanyard = Vec::with_capacity(opts.iterations);
    let mut floor = Vec::with_capacity(opts.iterations);
    // Interleaved, alternating which goes first, so both see the same machine state.
    for i in 0..opts.iterations {
        for which in [i % 2, 1 - i % 2] {
            let (socket, out) = if which == 0 {
                (floor_socket, &mut floor)
            } else {
                (agent_socket.as_path(), &mut lanyard)
            };
            let t = Instant::now();
            let msg = fetch_first(socket).await?;
            out.push(t.elapsed());
            if msg.svids.is_empty() {
                bail!("a first message without SVIDs");
            }
        }
    }
    let (agent1, floor1) = (process_cpu(agent_pid, ""), process_cpu(me, "floor-server"));
    let n = opts.iterations as f64;
    let agent_cpu_us = agent1.0.saturating_sub(agent0.0) as f64 / 1e3 / n;
    let floor_cpu_us = floor1.0.saturating_sub(floor0.0) as f64 / 1e3 / n;
    let agent_wait_us = agent1.1.saturating_sub(agent0.1) as f64 / 1e3 / n;
    let floor_wait_us = floor1.1.saturating_sub(floor0.1) as f64 / 1e3 / n;
    let l = Stats::of(&lanyard);
    let f = Stats::of(&floor);
    say!(
        "  response size: {canned_len} bytes of protobuf (the floor sends the agent's own response, byte for byte)"
    );
    say!("  lanyard-agent : {}", l.line());
    say!("  floor (tonic) : {}", f.line());
    say!(
        "  floor = a bare tonic SpiffeWorkloadAPI server in this process on its own runtime, same UDS connector,"
    );
    say!(
        "          same request and header, same response bytes; the difference is attestation + matching + stream setup"
    );
    say!(
        "  server-side CPU per request: lanyard-agent {agent_cpu_us:.1} us (runnable-but-waiting {agent_wait_us:.1} us), floor server {floor_cpu_us:.1} us (waiting {floor_wait_us:.1} us) => {:.2}x",
        agent_cpu_us / floor_cpu_us
    );
    say!(
        "  p50 overhead {:.3} ms, p99 overhead {:.3} ms",
        l.p50 - f.p50,
        l.p99 - f.p99
    );
    let mut details = serde_json::Map::new();
    details.insert("lanyard".into(), l.json());
    details.insert("floor".into(), f.json());
    details.insert("response_bytes".into(), json!(canned_len));
    details.insert(
        "agent_cpu_us_per_request".into(),
        json!(round3(agent_cpu_us)),
    );
    details.insert(
        "floor_cpu_us_per_request".into(),
        json!(round3(floor_cpu_us)),
    );
    details.insert(
        "agent_run_queue_wait_us_per_request".into(),
        json!(round3(agent_wait_us)),
    );
    details.insert("p99_ratio".into(), json!(round3(l.p99 / f.p99)));
    let p99 = Row {
        id: "fetch_x509svid_p99",
        what: "FetchX509SVID new-conn first msg p99".into(),
        unit: "ms",
        value: l.p99,
        floor: Some(f.p99),
        ratio: Some(l.p99 / f.p99),
        goal: "ratio <= 1.3x".into(),
        goal_limit: 1.3,
        better: Better::Lower,
        details: serde_json::Map::new(),
    };
    let p50 = Row {
        id: "fetch_x509svid_p50",
        what: "FetchX509SVID new-conn first msg p50".into(),
        unit: "ms",
        value: l.p50,
        floor: Some(f.p50),
        ratio: Some(l.p50 / f.p50),
        goal: "ratio <= 1.3x".into(),
        goal_limit: 1.3,
        better: Better::Lower,
        details,
    };
    p50.print();
    p99.print();
    Ok(vec![p50, p99])
}

// ---------------------------------------------------------------------------------------
// Measurement 2

/// `count` CSRs for `ids` round-robin, made on `threads` threads.
fn make_csrs(ids: &[(String, String)], count: usize, threads: usize) -> Result<Vec<SvidRequest>> {
    let per = count.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(count))
                        .map(|i| {
                            let (entry_id, spiffe_id) = &ids[i % ids.len()];
                            SvidRequest {
                                entry_id: entry_id.clone(),
                                csr: csr(&fresh_key(), spiffe_id),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(count);
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow!("CSR thread panicked"))?);
        }
        Ok(all)
    })
}

/// The floor's CA: a P-256 self-signed root like the server's.
fn floor_ca() -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "Lanyard");
    dn.push(DnType::CommonName, format!("Lanyard CA {TD}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").as_str().try_into()?)];
    params.self_signed(&key)?;
    Ok(Issuer::new(params, key))
}

/// The floor's work per SVID: parse + verify the CSR, then sign a leaf with the profile
/// of server/src/ca.rs `sign_svid` (same extensions, random 128-bit serial, AKI, times).
fn floor_issue_one(
    der: &[u8],
    issuer: &Issuer<'static, KeyPair>,
    rng: &SystemRandom,
) -> Result<Vec<u8>> {
    let csr = CertificateSigningRequestParams::from_der(&der.into())?;
    let uri = csr
        .params
        .subject_alt_names
        .iter()
        .find_map(|s| match s {
            SanType::URI(u) => Some(u.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("CSR without URI SAN"))?;
    let now = unix_now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "Lanyard");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.use_authority_key_identifier_extension = true;
    params.not_before = x509_parser::time::ASN1Time::from_timestamp(now - 10)?.to_datetime();
    params.not_after = x509_parser::time::ASN1Time::from_timestamp(now + 3600)?.to_datetime();
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(|_| anyhow!("rng"))?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params.signed_by(&csr.public_key, issuer)?.der().to_vec())
}

/// Issues every CSR in-process on `threads` threads; returns the wall time.
fn floor_issue(
    csrs: &[SvidRequest],
    threads: usize,
    issuer: &Issuer<'static, KeyPair>,
) -> Result<(Duration, u64)> {
    let per = csrs.len().div_ceil(threads);
    let t = Instant::now();
    let cpu = std::thread::scope(|s| {
        let handles: Vec<_> = csrs
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    let before = thread_cpu_ns();
                    let rng = SystemRandom::new();
                    for r in chunk {
                        std::hint::black_box(floor_issue_one(&r.csr, issuer, &rng)?);
                    }
                    Ok::<_, anyhow::Error>(thread_cpu_ns().saturating_sub(before))
                })
            })
            .collect();
        let mut cpu = 0;
        for h in handles {
            cpu += h.join().map_err(|_| anyhow!("floor thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(cpu)
    })?;
    Ok((t.elapsed(), cpu))
}

/// Sends all batches with `concurrency` calls in flight; returns wall time, SVIDs issued
/// and per-call latencies.
async fn sign_batches(
    client: &AgentServiceClient<Channel>,
    batches: &Arc<Vec<SignX509SvidsRequest>>,
    concurrency: usize,
) -> Result<(Duration, usize, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, batches, next) =
                (client.clone(), Arc::clone(batches), Arc::clone(&next));
            tokio::spawn(async move {
                let mut issued = 0;
                let mut lat = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(i) else { break };
                    let t = Instant::now();
                    let resp = client.sign_x509_svids(batch.clone()).await?.into_inner();
                    lat.push(t.elapsed());
                    for r in &resp.results {
                        if !r.error.is_empty() || r.x509_svid_chain.is_empty() {
                            bail!("the server refused entry {}: {}", r.entry_id, r.error);
                        }
                    }
                    issued += resp.results.len();
                }
                Ok::<_, anyhow::Error>((issued, lat))
            })
        })
        .collect();
    let mut issued = 0;
    let mut lat = vec![];
    for task in tasks {
        let (n, l) = task.await??;
        issued += n;
        lat.extend(l);
    }
    Ok((t.elapsed(), issued, lat))
}

async fn measure_issuance(td: &TrustDomain, signer_data: &Path, opts: &Opts) -> Result<Vec<Row>> {
    say!("\n[2] X509-SVID issuance throughput over gRPC (SignX509Svids, TLS 1.3 mTLS as an agent)");
    let mut admin = admin(td).await?;
    let alias = format!("spiffe://{TD}/bench-signer");
    // A selector no process has: the entries exist only to be signed for.
    let nobody = types::Selector {
        r#type: "unix".into(),
        value: "uid:4000000".into(),
    };
    let mut ids = Vec::with_capacity(opts.sign_entries);
    for i in 0..opts.sign_entries {
        let spiffe_id = format!("spiffe://{TD}/bench/sign/{i}");
        let id = create_entry(&mut admin, &spiffe_id, &alias, nobody.clone()).await?;
        ids.push((id, spiffe_id));
    }
    let threads = opts.floor_threads;
    let t = Instant::now();
    let (ids2, count) = (ids.clone(), opts.svids);
    let csrs = tokio::task::spawn_blocking(move || make_csrs(&ids2, count, threads)).await??;
    say!(
        "  set-up: {} entries under {alias}; {} CSRs (fresh P-256 key each) made in {:.0} ms outside the timed region",
        ids.len(),
        csrs.len(),
        ms(t.elapsed())
    );
    let batches: Arc<Vec<SignX509SvidsRequest>> = Arc::new(
        csrs.chunks(opts.batch)
            .map(|c| SignX509SvidsRequest {
                requests: c.to_vec(),
            })
            .collect(),
    );
    let creds = AgentCreds::load(signer_data);
    let client = agent_api(&td.server.address, &creds.bundle, Some(&creds))
        .await
        .max_decoding_message_size(64 * 1024 * 1024);
    // Warm-up: the connection, the server's caches, the blocking pool.
    let warm = Arc::new(
        batches
            .iter()
            .take(opts.concurrency)
            .cloned()
            .collect::<Vec<_>>(),
    );
    sign_batches(&client, &warm, opts.concurrency).await?;
    // Sanity: what comes back is an SVID for the entry asked for.
    let mut c = client.clone();
    let sample = c
        .sign_x509_svids(SignX509SvidsRequest {
            requests: vec![csrs[0].clone()],
        })
        .await?
        .into_inner();
    let leaf = sample
        .results
        .first()
        .and_then(|r| r.x509_svid_chain.first())
        .ok_or_else(|| anyhow!("no SVID"))?;
    let info =
        lanyard_proto::svid::check_leaf(leaf, None).map_err(|e| anyhow!("sample SVID: {e}"))?;
    if info.spiffe_id.as_str() != ids[0].1 {
        bail!(
            "sample SVID names {}, expected {}",
            info.spiffe_id,
            ids[0].1
        );
    }

    // Interleaved rounds (server with N in flight, floor, server with 1 in flight) so all
    // three see the same machine state: on a shared machine, other work shifts them alike.
    let issuer = Arc::new(floor_ca()?);
    {
        let (warm, issuer) = (csrs[..csrs.len().min(200)].to_vec(), Arc::clone(&issuer));
        tokio::task::spawn_blocking(move || floor_issue(&warm, threads, &issuer)).await??;
    }
    let rounds = batches.len().clamp(1, 4);
    let per_round = batches.len().div_ceil(rounds);
    let (mut wall, mut issued, mut lat) = (Duration::ZERO, 0, vec![]);
    let (mut wall1, mut issued1, mut lat1) = (Duration::ZERO, 0, vec![]);
    let (mut floor_wall, mut floor_n, mut floor_cpu) = (Duration::ZERO, 0, 0u64);
    let (mut server_cpu, mut server_wait) = (0u64, 0u64);
    let server_pid = child_pid(
        "lanyard-server",
        &td.server.admin_socket.display().to_string(),
    )
    .ok_or_else(|| anyhow!("cannot find the lanyard-server process"))?;
    let mut round_ratios = vec![];
    for r in 0..rounds {
        let part: Arc<Vec<SignX509SvidsRequest>> =
            Arc::new(batches[r * per_round..((r + 1) * per_round).min(batches.len())].to_vec());
        let before = process_cpu(server_pid, "");
        let (w, n, l) = sign_batches(&client, &part, opts.concurrency).await?;
        let after = process_cpu(server_pid, "");
        server_cpu += after.0.saturating_sub(before.0);
        server_wait += after.1.saturating_sub(before.1);
        let reqs: Vec<SvidRequest> = part
            .iter()
            .flat_map(|b| b.requests.iter().cloned())
            .collect();
        let fn_ = reqs.len();
        let i = Arc::clone(&issuer);
        let (fw, fcpu) =
            tokio::task::spawn_blocking(move || floor_issue(&reqs, threads, &i)).await??;
        let (w1, n1, l1) = sign_batches(&client, &part, 1).await?;
        round_ratios.push((n as f64 / w.as_secs_f64()) / (fn_ as f64 / fw.as_secs_f64()));
        (wall, issued) = (wall + w, issued + n);
        lat.extend(l);
        (wall1, issued1) = (wall1 + w1, issued1 + n1);
        lat1.extend(l1);
        (floor_wall, floor_n, floor_cpu) = (floor_wall + fw, floor_n + fn_, floor_cpu + fcpu);
    }
    let rate = issued as f64 / wall.as_secs_f64();
    let call = Stats::of(&lat);
    // The agent itself sends one batch at a time; that is its ceiling per agent.
    let rate1 = issued1 as f64 / wall1.as_secs_f64();
    let call1 = Stats::of(&lat1);
    let floor_rate = floor_n as f64 / floor_wall.as_secs_f64();

    // Component costs of the floor, one thread, for the analysis.
    let csrs = Arc::new(csrs);
    let (csrs2, issuer2) = (Arc::clone(&csrs), Arc::clone(&issuer));
    let (parse_us, sign_us) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
        // Thread CPU time, not wall time: other load on the machine does not count.
        let n = csrs2.len().min(1000);
        let t = thread_cpu_ns();
        for r in &csrs2[..n] {
            std::hint::black_box(CertificateSigningRequestParams::from_der(
                &r.csr.as_slice().into(),
            )?);
        }
        let parse_us = thread_cpu_ns().saturating_sub(t) as f64 / 1e3 / n as f64;
        let rng = SystemRandom::new();
        let t = thread_cpu_ns();
        for r in &csrs2[..n] {
            std::hint::black_box(floor_issue_one(&r.csr, &issuer2, &rng)?);
        }
        let both_us = thread_cpu_ns().saturating_sub(t) as f64 / 1e3 / n as f64;
        Ok((parse_us, both_us - parse_us))
    })
    .await??;
    say!(
        "  lanyard-server: {issued} SVIDs in {:.0} ms = {rate:.0} SVIDs/s  ({} per call, {} calls in flight, one HTTP/2 connection)",
        ms(wall),
        opts.batch,
        opts.concurrency
    );
    say!("      per-call latency: {}", call.line());
    say!(
        "  lanyard-server, 1 call in flight (how the agent calls it): {rate1:.0} SVIDs/s, ratio {:.2}x of floor; per call {}",
        rate1 / floor_rate,
        call1.line()
    );
    say!(
        "  floor: {floor_n} SVIDs in {:.0} ms = {floor_rate:.0} SVIDs/s on {threads} threads",
        ms(floor_wall)
    );
    say!(
        "  floor = in-process rcgen+ring on {threads} threads, per SVID: CertificateSigningRequestParams::from_der"
    );
    say!(
        "          (parses AND verifies the CSR signature) + signing a leaf with the sign_svid profile by a P-256 CA;"
    );
    say!("          no gRPC, TLS, protobuf, authorization, datastore or audit logging");
    say!(
        "  floor components (1 thread, CPU time): CSR parse+verify {parse_us:.1} us, leaf sign {sign_us:.1} us = {:.1} us/SVID",
        parse_us + sign_us
    );
    let server_cpu_us = server_cpu as f64 / 1e3 / issued.max(1) as f64;
    let floor_cpu_us = floor_cpu as f64 / 1e3 / floor_n.max(1) as f64;
    say!(
        "  CPU per SVID (robust to other load): lanyard-server {server_cpu_us:.1} us (all its threads; it also waited {:.0} ms runnable), floor {floor_cpu_us:.1} us => {:.2}x",
        server_wait as f64 / 1e6,
        server_cpu_us / floor_cpu_us
    );
    say!(
        "  per-round ratio (server/floor, interleaved): {}",
        round_ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut details = serde_json::Map::new();
    details.insert(
        "round_ratios".into(),
        json!(round_ratios.iter().copied().map(round3).collect::<Vec<_>>()),
    );
    details.insert("svids".into(), json!(issued));
    details.insert(
        "server_cpu_us_per_svid".into(),
        json!(round3(server_cpu_us)),
    );
    details.insert("floor_cpu_us_per_svid".into(), json!(round3(floor_cpu_us)));
    details.insert(
        "server_run_queue_wait_ms".into(),
        json!(round3(server_wait as f64 / 1e6)),
    );
    details.insert("batch".into(), json!(opts.batch));
    details.insert("concurrency".into(), json!(opts.concurrency));
    details.insert("wall_ms".into(), json!(round3(ms(wall))));
    details.insert("per_call".into(), call.json());
    details.insert("svids_per_s_concurrency_1".into(), json!(round3(rate1)));
    details.insert("per_call_concurrency_1".into(), call1.json());
    details.insert("floor_threads".into(), json!(threads));
    details.insert("floor_csr_parse_verify_us".into(), json!(round3(parse_us)));
    details.insert("floor_leaf_sign_us".into(), json!(round3(sign_us)));
    details.insert(
        "floor_definition".into(),
        json!("in-process rcgen+ring: CertificateSigningRequestParams::from_der (parse+verify) + leaf signing with the sign_svid profile by a P-256 CA, same thread count"),
    );
    let row = Row {
        id: "issuance_throughput",
        what: format!(
            "SignX509Svids throughput ({}x{} in flight)",
            opts.batch, opts.concurrency
        ),
        unit: "SVIDs/s",
        value: rate,
        floor: Some(floor_rate),
        ratio: Some(rate / floor_rate),
        goal: "ratio >= 0.7x".into(),
        goal_limit: 0.7,
        better: Better::Higher,
        details,
    };
    let cpu_row = Row {
        id: "issuance_cpu_per_svid",
        what: "SignX509Svids CPU per SVID (server vs floor)".into(),
        unit: "us",
        value: server_cpu_us,
        floor: Some(floor_cpu_us),
        ratio: Some(server_cpu_us / floor_cpu_us),
        goal: "ratio <= 1.43x".into(),
        goal_limit: 1.0 / 0.7,
        better: Better::Lower,
        details: serde_json::Map::new(),
    };
    row.print();
    cpu_row.print();
    Ok(vec![row, cpu_row])
}

// ---------------------------------------------------------------------------------------
// Measurement 3

async fn measure_push(td: &TrustDomain, opts: &Opts) -> Result<Vec<Row>> {
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

// ---------------------------------------------------------------------------------------
// Measurement 4

/// Log milestones of a spawned agent, in ms after spawn (JSON log lines).
fn milestones(log: &Path, spawned_at: SystemTime) -> Vec<(String, f64)> {
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

struct StartTrial {
    socket_up: Duration,
    first_svid: Duration,
    marks: Vec<(String, f64)>,
}

async fn agent_start_trial(
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

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn agent_command(
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
fn own_exe_hash_time() -> Result<(u64, Duration)> {
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
fn milestone_medians(trials: &[StartTrial]) -> Vec<(String, f64)> {
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

async fn measure_agent_start(td: &TrustDomain, opts: &Opts) -> Result<Vec<Row>> {
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

// ---------------------------------------------------------------------------------------

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
                "start_trials": opts.start_trials,
            },
            "measurements": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "total_seconds": round3(total.as_secs_f64()),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
