//! SVID rotation reaches open streams and the `spiffe` crate's X509Source.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use std::time::{Duration, Instant};

use lanyard_proto::svid::check_leaf;
use lanyard_tests::unix_now;
use lanyard_tests::workload::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_svid_rotates_on_the_open_stream_and_in_x509_source() {
    let id = "spiffe://example.org/clients/rotating";
    // The entry was just created, so this SVID was issued moments ago.
    let (td, ready) = serving(id, &["--x509-svid-ttl", "10", "--hint", "rot"]).await;

    let mut client = wl_client(&td).await;
    let asked = Instant::now();
    let (mut stream, first) = svid_stream(&mut client).await;
    let got_first = Instant::now();
    let latency = got_first - asked;
    assert!(
        latency < Duration::from_secs(1),
        "first message took {latency:?} (once cached it must come within 1 s)"
    );
    assert_eq!(ids_of(&first), [id]);
    let first_info = verify_wire_svid(&first.svids[0]);
    assert!(
        first_info.not_after - first_info.not_before <= 10 + 10 + 1,
        "TTL 10 s (plus at most the 10 s backdate) but valid {}..{}",
        first_info.not_before,
        first_info.not_after
    );
    // Timing problems are collected and reported last, so that a premature rotation
    // does not hide whether the rest works.
    let mut problems = Vec::new();
    if first.svids[0].x509_svid != ready.svids[0].x509_svid {
        problems.push(format!(
            "the SVID issued moments ago was already replaced when the stream opened ({:?} later)",
            latency
        ));
    }

    let source = x509_source(&td.agent.endpoint(), None).await;
    let source_first = source.svid().expect("X509Source svid");
    assert_eq!(source_first.spiffe_id().to_string(), id);

    // The same stream must carry a new serial while the old SVID is still valid.
    let deadline = Instant::now() + Duration::from_secs(12);
    let rotated = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no rotation on the stream within 12 s of the first message"
        );
        let msg = next_message(&mut stream, left)
            .await
            .expect("stream broke")
            .expect("stream ended with OK");
        assert_eq!(ids_of(&msg), [id]);
        if msg.svids[0].x509_svid != first.svids[0].x509_svid {
            break msg;
        }
    };
    let rotated_after = got_first.elapsed();
    let now = unix_now();
    let new_info = verify_wire_svid(&rotated.svids[0]);
    assert_ne!(
        new_info.serial_hex, first_info.serial_hex,
        "new certificate, same serial"
    );
    assert!(
        now < first_info.not_after,
        "rotated at {now}, after the old SVID expired at {}",
        first_info.not_after
    );
    assert!(
        new_info.not_after >= first_info.not_after,
        "the new SVID expires before the old one"
    );

    // X509Source (its own stream) follows the rotation.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let current = source.svid().expect("X509Source svid");
        if current.leaf() != source_first.leaf() {
            let before = check_leaf(source_first.leaf().as_bytes(), None).expect("profile");
            let after = check_leaf(current.leaf().as_bytes(), None).expect("profile");
            assert_ne!(after.serial_hex, before.serial_hex);
            assert_eq!(current.spiffe_id().to_string(), id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "X509Source still serves its first SVID 5 s after the stream rotated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source.shutdown().await;

    // A 10 s SVID is renewed at about half its lifetime (4-5 s after issue), so it
    // must not be replaced within 2 s of being served, and a fresh one must not be
    // replaced again within the next second either.
    if rotated_after < Duration::from_secs(2) {
        problems.push(format!(
            "a 10 s SVID was rotated {rotated_after:?} after it was first served (expected about 4-5 s after issue)"
        ));
    }
    let mut more = 0;
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Ok(msg) = tokio::time::timeout_at(quiet_until.into(), stream.message()).await {
        msg.expect("stream broke").expect("stream ended with OK");
        more += 1;
    }
    if more > 0 {
        problems.push(format!(
            "{more} more rotations of the 10 s SVID arrived within the next second"
        ));
    }
    assert!(
        problems.is_empty(),
        "rotation comes too early:\n- {}\n(notBefore {}, notAfter {} of the first SVID)",
        problems.join("\n- "),
        first_info.not_before,
        first_info.not_after
    );
}
