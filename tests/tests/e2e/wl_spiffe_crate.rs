//! The `spiffe` crate (WorkloadApiClient, X509Source) fetches and validates the X509-SVID.
//!
//! Each test starts its own server and agent, so the tests run in parallel.

use lanyard_tests::workload::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_and_validates_the_x509_svid() {
    let id = "spiffe://example.org/clients/spiffe-crate";
    let (td, _) = serving(id, &["--hint", "crate"]).await;

    let endpoint = td.agent.endpoint();
    assert!(
        endpoint.starts_with("unix:///"),
        "SPIFFE_ENDPOINT_SOCKET form: {endpoint}"
    );
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap_or_else(|e| panic!("spiffe crate cannot connect to {endpoint}: {e}"));
    // The crate parses and validates the response itself (leaf and CA profile, IDs,
    // bundle map keys); any violation is an Err here.
    let ctx = client
        .fetch_x509_context()
        .await
        .expect("spiffe crate accepts FetchX509SVID");
    assert_eq!(ctx.svids().len(), 1);
    let svid = ctx.default_svid().expect("default SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
    assert_eq!(svid.hint(), Some("crate"));
    let td_name = spiffe::TrustDomain::new("example.org").expect("td");
    let bundle = ctx
        .bundle_set()
        .get(&td_name)
        .expect("the context has the example.org bundle");
    let roots: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    verify_svid(&chain, &roots, svid.private_key().as_bytes(), id);

    // The one-shot calls agree with the context.
    let single = client.fetch_x509_svid().await.expect("fetch_x509_svid");
    assert_eq!(single.leaf(), svid.leaf());
    let bundles = client
        .fetch_x509_bundles()
        .await
        .expect("spiffe crate accepts FetchX509Bundles");
    assert_eq!(bundles.len(), 1, "only the own trust domain");
    let own = bundles
        .get(&td_name)
        .expect("FetchX509Bundles has example.org");
    assert_eq!(own.authorities(), bundle.authorities());

    // X509Source: the crate's long-lived watcher.
    let source = x509_source(&endpoint, None).await;
    let from_source = source.svid().expect("X509Source has an SVID");
    assert_eq!(from_source.spiffe_id().to_string(), id);
    assert_eq!(
        from_source.leaf(),
        svid.leaf(),
        "X509Source serves the same SVID"
    );
    let source_bundle = source
        .bundle_set()
        .expect("bundle set")
        .get(&td_name)
        .expect("example.org in X509Source");
    assert_eq!(source_bundle.authorities(), bundle.authorities());
    source.shutdown().await;
}
