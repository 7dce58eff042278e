//! Agent shutdown ends open streams with UNAVAILABLE, never OK.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::path::Path;
use std::time::Duration;

use lanyard_tests::workload::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_ends_open_streams_with_unavailable() {
    let id = "spiffe://example.org/clients/shutdown";
    let (mut td, _) = serving(id, &[]).await;

    let mut client = wl_client(&td).await;
    let (mut svids, first) = svid_stream(&mut client).await;
    assert_eq!(ids_of(&first), [id]);
    let (mut bundles, _) = bundle_stream(&mut client).await;

    let socket = td.agent.socket.clone();
    // SIGTERM, and wait for the exit, off the async workers so the streams keep flowing.
    let (stopped, td) = tokio::task::spawn_blocking(move || {
        let status = td.agent.stop();
        (status, td)
    })
    .await
    .expect("stop task");
    let status = stopped.expect("the agent had been running");
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM; log:\n{}",
        td.agent.log()
    );
    assert!(
        !Path::new(&socket).exists(),
        "the agent left its socket {} behind",
        socket.display()
    );

    for (name, outcome) in [
        (
            "FetchX509SVID",
            next_message(&mut svids, Duration::from_secs(5))
                .await
                .map(|m| m.map(|_| ())),
        ),
        (
            "FetchX509Bundles",
            next_message(&mut bundles, Duration::from_secs(5))
                .await
                .map(|m| m.map(|_| ())),
        ),
    ] {
        match outcome {
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{name} ended with {s:?}"),
            Ok(None) => {
                panic!(
                    "{name} ended with OK on shutdown (the Workload API standard: UNAVAILABLE, never OK)"
                )
            }
            Ok(Some(_)) => panic!("{name} sent another message instead of ending"),
        }
    }
}
