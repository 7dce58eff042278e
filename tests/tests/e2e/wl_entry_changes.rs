//! Entry changes reach open streams; deleting the last entry ends a stream with
//! PERMISSION_DENIED.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::time::{Duration, Instant};

use lanyard_tests::workload::*;
use lanyard_tests::{TrustDomain, my_uid, ok};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_update_the_open_stream() {
    let td = TrustDomain::start();
    let first_id = "spiffe://example.org/clients/first";
    let second_id = "spiffe://example.org/clients/second";
    let first_entry = td.register_uid(first_id, my_uid(), &["--hint", "first"]);
    wait_for_ids(&td, &[first_id]).await;

    let mut client = wl_client(&td).await;
    let (mut stream, first) = svid_stream(&mut client).await;
    assert_eq!(ids_of(&first), [first_id]);
    let first_serial = serial_of(&first.svids[0]);

    let second_entry = td.register_uid(second_id, my_uid(), &["--hint", "second"]);
    let both = loop {
        let msg = next_message(&mut stream, Duration::from_secs(10))
            .await
            .expect("stream broke")
            .expect("stream ended with OK");
        // Every message is the complete state and keeps the default identity first.
        assert_eq!(
            msg.svids[0].spiffe_id,
            first_id,
            "svids[0] changed: {:?}",
            ids_of(&msg)
        );
        if msg.svids.len() == 2 {
            break msg;
        }
    };
    assert_eq!(ids_of(&both), [first_id, second_id]);
    assert_eq!(
        serial_of(&both.svids[0]),
        first_serial,
        "svids[0] was re-issued by adding another entry"
    );
    assert_eq!(both.svids[0].x509_svid, first.svids[0].x509_svid);
    assert_eq!(
        [both.svids[0].hint.as_str(), both.svids[1].hint.as_str()],
        ["first", "second"]
    );
    for svid in &both.svids {
        verify_wire_svid(svid);
    }

    // Deleting every entry of the caller ends the stream with PERMISSION_DENIED.
    for entry in [&first_entry, &second_entry] {
        ok(&mut td.server.cli(&["entry", "delete", "--id", entry.as_str()]));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_message(&mut stream, left).await {
            Ok(Some(msg)) => assert!(
                !msg.svids.is_empty(),
                "a message with no SVIDs instead of PERMISSION_DENIED"
            ),
            Ok(None) => panic!(
                "the stream ended with OK after the entries were deleted (the Workload API standard: never OK)"
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), NO_IDENTITY);
}
