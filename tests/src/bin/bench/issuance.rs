//! Measurement 2: X509-SVID issuance throughput next to in-process signing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use lanyard_proto::agent::agent_service_client::AgentServiceClient;
use lanyard_proto::agent::{SignX509SvidsRequest, SvidRequest};
use lanyard_proto::types;
use lanyard_tests::tls::{AgentCreds, agent_api, csr, fresh_key};
use lanyard_tests::{TrustDomain, unix_now};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use tonic::transport::Channel;

use crate::TD;
use crate::admin::{admin, create_entry};
use crate::machine::{child_pid, process_cpu, thread_cpu_ns};
use crate::opts::Opts;
use crate::output::{Better, Row, Stats, ms, round3};

/// `count` CSRs for `ids` round-robin, made on `threads` threads.
pub(crate) fn make_csrs(
    ids: &[(String, String)],
    count: usize,
    threads: usize,
) -> Result<Vec<SvidRequest>> {
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
pub(crate) fn floor_ca() -> Result<Issuer<'static, KeyPair>> {
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
pub(crate) fn floor_issue_one(
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
pub(crate) fn floor_issue(
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
pub(crate) async fn sign_batches(
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

pub(crate) async fn measure_issuance(
    td: &TrustDomain,
    signer_data: &Path,
    opts: &Opts,
) -> Result<Vec<Row>> {
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
