//! Measurement 1: FetchX509SVID first-message latency next to a bare tonic server sending the same bytes.

use std::path::Path;
use std::pin::Pin;
use std::time::Instant;

use crate::machine::{child_pid, process_cpu};
use crate::opts::Opts;
use crate::output::{Better, Row, Stats, round3};
use anyhow::{Result, anyhow, bail};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use lanyard_proto::workload::*;
use lanyard_tests::TrustDomain;
use serde_json::json;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// New connection, FetchX509SVID with the security header, first message.
pub(crate) async fn fetch_first(socket: &Path) -> Result<X509svidResponse> {
    let channel = lanyard_daemon::uds::channel(socket.to_path_buf()).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| anyhow!("the stream ended before its first message"))
}

pub(crate) fn x509_request() -> Request<X509svidRequest> {
    let mut req = Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        lanyard_proto::WORKLOAD_SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

pub(crate) type Pinned<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The floor of measurement 1: the Workload API with nothing behind it but a canned
/// response, streamed like the agent streams (first message, then open until dropped).
#[derive(Debug)]
pub(crate) struct CannedWorkloadApi(X509svidResponse);

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
pub(crate) fn start_floor_server(
    socket: &Path,
    canned: X509svidResponse,
) -> Result<tokio::runtime::Runtime> {
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

pub(crate) async fn measure_fetch_latency(
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
