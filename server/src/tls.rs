//! TLS 1.3 (rustls, ring) for the agent API, and the limits that keep network callers
//! from exhausting it. The server presents an X509-SVID for `spiffe://<td>/lanyard/server`;
//! client certificates are optional at the handshake (node attestation comes without
//! one), and every call checks the client's SVID itself (see `api::agent`).
//!
//! Limits, all applied before hyper sees a connection:
//! - at most [`Limits::max_handshakes`] TLS handshakes at once, and
//!   [`Limits::max_handshakes_per_ip`] per source address, each within
//!   [`Limits::handshake_timeout`];
//! - a connection whose client presented no agent SVID is unauthenticated: at most
//!   [`Limits::max_unauthenticated`] of those in all and
//!   [`Limits::max_unauthenticated_per_ip`] per source address, each closed after
//!   [`Limits::unauthenticated_lifetime`] (it exists to attest, which takes
//!   milliseconds). Agents with an SVID are not counted there, so a flood of anonymous
//!   connections does not keep them out;
//! - at most [`Limits::max_connections_per_agent`] connections per agent SVID ID;
//! - HTTP/2 keepalive pings close connections whose peer went away.
//!
//! A connection over a limit is closed at once, and the refusal is logged at most once a
//! minute per source address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use lanyard_proto::SpiffeId;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::ca::{Ca, CaError};

/// Connection limits of the agent API.
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    pub unauthenticated_lifetime: Duration,
    pub max_connections_per_agent: usize,
    /// HTTP/2 pings find a peer that went away without closing its connection (a dead
    /// runner, a dropped network path): sent this often on an idle connection ...
    pub keepalive_interval: Duration,
    /// ... and the connection is closed when one is not answered within this.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_ip: 16,
            max_unauthenticated: 1024,
            max_unauthenticated_per_ip: 16,
            unauthenticated_lifetime: Duration::from_secs(30),
            max_connections_per_agent: 8,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The client certificate of a connection, read once at the handshake (rustls has
/// verified its chain to the bundle by then).
#[derive(Debug)]
pub enum ClientCert {
    /// No certificate: the caller may only attest or fetch the bundle.
    None,
    /// A certificate that chains to the bundle but is no agent X509-SVID.
    Invalid(Arc<lanyard_proto::svid::ProfileError>),
    /// An X509-SVID.
    Svid(Svid),
}

/// What the agent API needs of a presented X509-SVID.
#[derive(Debug)]
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// Lowercase hex, as the datastore keeps it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The SubjectPublicKeyInfo bit string contents.
    pub public_key: Vec<u8>,
}

impl ClientCert {
    /// Reads the leaf of a verified chain (leaf first).
    pub fn read(certs: Option<&[CertificateDer<'_>]>) -> ClientCert {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return ClientCert::None;
        };
        let info = match lanyard_proto::svid::check_leaf(leaf, None) {
            Ok(info) => info,
            Err(e) => return ClientCert::Invalid(Arc::new(e)),
        };
        let public_key = match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => cert.public_key().subject_public_key.data.to_vec(),
            Err(e) => {
                return ClientCert::Invalid(Arc::new(lanyard_proto::svid::ProfileError::Der(
                    e.to_string(),
                )));
            }
        };
        ClientCert::Svid(Svid {
            spiffe_id: info.spiffe_id,
            serial: info.serial_hex,
            not_before: info.not_before,
            not_after: info.not_after,
            public_key,
        })
    }
}

/// What the agent API knows about a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    pub client: Arc<ClientCert>,
    /// Set by the first AttestAgent call: one attestation per connection.
    pub attest_called: Arc<AtomicBool>,
}

/// Counts of open connections by kind, for the limits.
#[derive(Debug, Default)]
struct Counts {
    handshakes: usize,
    handshakes_by_ip: HashMap<IpAddr, usize>,
    unauthenticated: usize,
    unauthenticated_by_ip: HashMap<IpAddr, usize>,
    by_agent: HashMap<SpiffeId, usize>,
}

/// The shared counters; a [`Slot`] holds one place in them.
#[derive(Debug, Clone)]
struct Gate {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// A place a connection holds in the counts; given back when dropped.
#[derive(Debug)]
enum SlotKind {
    Handshake(IpAddr),
    Unauthenticated(IpAddr),
    Agent(SpiffeId),
}

#[derive(Debug)]
struct Slot {
    kind: SlotKind,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match &self.kind {
            SlotKind::Handshake(ip) => {
                counts.handshakes = counts.handshakes.saturating_sub(1);
                decrement(&mut counts.handshakes_by_ip, ip);
            }
            SlotKind::Unauthenticated(ip) => {
                counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
                decrement(&mut counts.unauthenticated_by_ip, ip);
            }
            SlotKind::Agent(id) => decrement(&mut counts.by_agent, id),
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Unauthenticated,
    UnauthenticatedPerIp,
    Handshakes,
    HandshakesPerIp,
    PerAgent,
}

impl Refusal {
    fn describe(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "too many connections without an agent SVID",
            Refusal::UnauthenticatedPerIp => {
                "too many connections without an agent SVID from this address"
            }
            Refusal::Handshakes => "too many TLS handshakes in progress",
            Refusal::HandshakesPerIp => "too many TLS handshakes in progress from this address",
            Refusal::PerAgent => "too many connections for this agent",
        }
    }
}

impl Gate {
    /// A place among the connections of one kind, counted in all and per address.
    fn take(
        &self,
        ip: IpAddr,
        kind: fn(IpAddr) -> SlotKind,
        pick: fn(&mut Counts) -> (&mut usize, &mut HashMap<IpAddr, usize>),
        (max, max_per_ip): (usize, usize),
        (over, over_per_ip): (Refusal, Refusal),
    ) -> Result<Slot, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, by_ip) = pick(&mut counts);
        if *total >= max {
            return Err(over);
        }
        let per_ip = by_ip.entry(ip).or_default();
        if *per_ip >= max_per_ip {
            return Err(over_per_ip);
        }
        *per_ip += 1;
        *total += 1;
        Ok(Slot {
            kind: kind(ip),
            counts: self.counts.clone(),
        })
    }

    fn handshake(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        self.take(
            ip,
            SlotKind::Handshake,
            |c| (&mut c.handshakes, &mut c.handshakes_by_ip),
            (
                self.limits.max_handshakes,
                self.limits.max_handshakes_per_ip,
            ),
            (Refusal::Handshakes, Refusal::HandshakesPerIp),
        )
    }

    fn unauthenticated(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        self.take(
            ip,
            SlotKind::Unauthenticated,
            |c| (&mut c.unauthenticated, &mut c.unauthenticated_by_ip),
            (
                self.limits.max_unauthenticated,
                self.limits.max_unauthenticated_per_ip,
            ),
            (Refusal::Unauthenticated, Refusal::UnauthenticatedPerIp),
        )
    }

    fn agent(&self, id: &SpiffeId) -> Result<Slot, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.by_agent.entry(id.clone()).or_default();
        if *n >= self.limits.max_connections_per_agent {
            return Err(Refusal::PerAgent);
        }
        *n += 1;
        Ok(Slot {
            kind: SlotKind::Agent(id.clone()),
            counts: self.counts.clone(),
        })
    }
}

/// A server-side TLS connection carrying its [`PeerInfo`] into tonic requests. It holds
/// its place in the limits until hyper drops it; an unauthenticated one reads as closed
/// once its lifetime is over.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    close_at: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Slot,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // hyper always has a read pending, so this wakes when the lifetime ends even on
        // an idle connection; end of stream then makes hyper close it.
        if let Some(close_at) = self.close_at.as_mut()
            && close_at.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server SVID: {0}")]
    Ca(#[from] CaError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("server key: {0}")]
    Key(#[from] rcgen::Error),
}

/// Builds a TLS 1.3-only server config with a fresh server SVID. Returns the config
/// and the SVID's notAfter (Unix seconds) so the caller can schedule its rotation.
pub fn server_config(
    ca: &Ca,
    roots: &[Vec<u8>],
    ttl: Duration,
) -> Result<(rustls::ServerConfig, i64), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let svid = ca.sign_svid(&lanyard_proto::server_id(ca.trust_domain()), &key, ttl, &[])?;
    let chain: Vec<CertificateDer<'static>> =
        svid.chain.into_iter().map(CertificateDer::from).collect();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(CertificateDer::from(root.clone()))?;
    }
    let provider = lanyard_daemon::tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, svid.not_after))
}

/// Accepts TCP connections, completes TLS handshakes off the accept loop (a slow
/// client cannot stall others) within the [`Limits`], and yields the finished
/// connections.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let gate = Gate {
        limits,
        counts: Arc::default(),
    };
    let refusals = Arc::new(lanyard_daemon::logging::RateLimit::new(
        Duration::from_secs(60),
        1024,
    ));
    let refused = move |remote: SocketAddr, agent: Option<&SpiffeId>, why: Refusal| {
        if let Some(held_back) = refusals.check(&remote.ip()) {
            tracing::warn!(%remote, agent = ?agent.map(SpiffeId::as_str), reason = why.describe(),
                held_back, "agent API connection refused");
        }
    };
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let handshake_slot = match gate.handshake(remote.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    refused(remote, None, why);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // Dead peers are found by HTTP/2 pings; TCP keepalive also covers a peer
            // that vanished mid-handshake.
            let _ = nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::KeepAlive, &true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let conn_tx = tx.clone();
            let gate = gate.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(gate.limits.handshake_timeout, acceptor.accept(tcp)).await;
                drop(handshake_slot);
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let client = ClientCert::read(stream.get_ref().1.peer_certificates());
                let taken = match &client {
                    ClientCert::Svid(svid) => gate
                        .agent(&svid.spiffe_id)
                        .map(|slot| (slot, None))
                        .map_err(|why| (Some(svid.spiffe_id.clone()), why)),
                    ClientCert::None | ClientCert::Invalid(_) => gate
                        .unauthenticated(remote.ip())
                        .map(|slot| {
                            let lifetime = gate.limits.unauthenticated_lifetime;
                            (slot, Some(Box::pin(tokio::time::sleep(lifetime))))
                        })
                        .map_err(|why| (None, why)),
                };
                let (slot, close_at) = match taken {
                    Ok(taken) => taken,
                    Err((agent, why)) => {
                        refused(remote, agent.as_ref(), why);
                        return;
                    }
                };
                let conn = TlsConn {
                    stream,
                    info: PeerInfo {
                        remote,
                        client: Arc::new(client),
                        attest_called: Arc::new(AtomicBool::new(false)),
                    },
                    close_at,
                    _slot: slot,
                };
                let _ = conn_tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: Limits) -> Gate {
        Gate {
            limits,
            counts: Arc::default(),
        }
    }

    #[test]
    fn unauthenticated_slots_are_capped_globally_and_per_address() {
        let g = gate(Limits {
            max_unauthenticated: 3,
            max_unauthenticated_per_ip: 2,
            ..Limits::default()
        });
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let first = g.unauthenticated(a).expect("1");
        let _second = g.unauthenticated(a).expect("2");
        assert_eq!(
            g.unauthenticated(a).expect_err("per ip"),
            Refusal::UnauthenticatedPerIp
        );
        let _third = g.unauthenticated(b).expect("other address");
        assert_eq!(
            g.unauthenticated(b).expect_err("global"),
            Refusal::Unauthenticated
        );
        // A closed connection gives its place back.
        drop(first);
        g.unauthenticated(a).expect("freed");
    }

    #[test]
    fn handshakes_are_capped_globally_and_per_address() {
        let g = gate(Limits {
            max_handshakes: 2,
            max_handshakes_per_ip: 1,
            ..Limits::default()
        });
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let c: IpAddr = "192.0.2.3".parse().expect("ip");
        let first = g.handshake(a).expect("1");
        assert_eq!(
            g.handshake(a).expect_err("per ip"),
            Refusal::HandshakesPerIp
        );
        let _second = g.handshake(b).expect("2");
        assert_eq!(g.handshake(c).expect_err("global"), Refusal::Handshakes);
        // Handshakes and unauthenticated connections are counted apart.
        let _unauth = g.unauthenticated(c).expect("not a handshake");
        drop(first);
        g.handshake(c).expect("freed");
    }

    #[test]
    fn agent_connections_are_capped_per_id() {
        let g = gate(Limits {
            max_connections_per_agent: 2,
            ..Limits::default()
        });
        let id = SpiffeId::parse("spiffe://td/lanyard/agent/join_token/a").expect("id");
        let other = SpiffeId::parse("spiffe://td/lanyard/agent/join_token/b").expect("id");
        let one = g.agent(&id).expect("1");
        let _two = g.agent(&id).expect("2");
        assert_eq!(g.agent(&id).expect_err("3"), Refusal::PerAgent);
        g.agent(&other).expect("another agent is not affected");
        drop(one);
        let _three = g.agent(&id).expect("freed");
        let counts = g.counts.lock().expect("lock");
        assert_eq!(counts.by_agent.get(&id), Some(&2));
    }
}
