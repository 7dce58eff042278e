//! Node attestation, the agent's half: reuse the stored agent SVID, or prove the node to
//! the server with a join token and store the identity it returns.
//!
//! Only an unreachable server is retried (for [`ATTEST_PATIENCE`]). A server whose
//! certificate does not verify against `trust_bundle_path`, or that is not the server
//! of `trust_domain`, ends attestation at once with a sentence naming the setting:
//! retrying cannot fix a wrong configuration. The one-time token is spent only after
//! the data directory has proven it can take the identity files.

use std::path::PathBuf;
use std::time::Duration;

use lanyard_attestors::node::join_token;
use lanyard_proto::agent::AttestAgentRequest;
use lanyard_proto::{SpiffeId, TrustDomain};

use crate::client::CallError;
use crate::config::{AgentConfig, Bootstrap, NoJoinToken};
use crate::identity::{AgentSvid, Bundle, IdentityError, IdentityFiles, key_and_csr};
use crate::rotation::{Clock, retry_delay};
use crate::tls::{ServerCertRefused, SpiffeServerVerifier};

/// How long the agent keeps trying to reach the server for its first attestation.
pub const ATTEST_PATIENCE: Duration = Duration::from_secs(60);

/// A server certificate refused during attestation, described with the setting that
/// most likely is wrong.
#[derive(Debug)]
pub struct NotTrusted {
    pub address: String,
    pub refusal: ServerCertRefused,
    pub bundle_path: Option<PathBuf>,
    pub trust_domain: TrustDomain,
}

impl std::fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let address = &self.address;
        match (&self.refusal, &self.bundle_path) {
            (ServerCertRefused::UnknownIssuer, Some(path)) => write!(
                f,
                "the server at {address} presented a certificate that no CA in trust_bundle_path {} signed; set trust_bundle_path to this trust domain's bundle (lanyard-server bundle show)",
                path.display()
            ),
            (ServerCertRefused::WrongId { got, want }, _) => write!(
                f,
                "the server at {address} is {got}, not {want}; check trust_domain ({}) and server_address",
                self.trust_domain
            ),
            (refusal, _) => write!(f, "the server at {address} is not trusted: {refusal}"),
        }
    }
}

/// What the server returned that cannot be used as the agent's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BadAnswer {
    #[error("it sent no trust bundle")]
    NoBundle,
    #[error("it sent no agent SVID")]
    NoSvid,
    #[error("the agent SVID is not a valid X509-SVID: {0}")]
    Profile(#[from] lanyard_proto::svid::ProfileError),
    #[error("the agent SVID names {got}, which is not an agent of trust domain {trust_domain}")]
    WrongId {
        got: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("the agent SVID does not carry the key the agent sent")]
    WrongKey,
}

/// Why the agent has no identity to run with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    #[error(transparent)]
    NoToken(#[from] NoJoinToken),
    #[error(
        "the stored agent SVID expired at {}; give the agent a new join token (--join-token-file or LANYARD_JOIN_TOKEN)",
        lanyard_daemon::output::rfc3339(*.not_after)
    )]
    Expired { not_after: i64 },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    NotTrusted(NotTrusted),
    #[error("the server refused attestation: {}", .0.message())]
    Refused(tonic::Status),
    #[error("the server failed to attest this agent: {}", .0.message())]
    ServerFailed(tonic::Status),
    #[error("cannot reach the server at {address} (tried for {}): {}", lanyard_daemon::config::Duration(ATTEST_PATIENCE), .status.message())]
    Unreachable {
        address: String,
        status: tonic::Status,
    },
    #[error("the server's answer to attestation is unusable: {0}")]
    BadAnswer(#[from] BadAnswer),
    #[error("trust_bundle_path: {0}")]
    Bundle(#[from] webpki::Error),
    #[error("cannot make the agent key: {0}")]
    Keys(#[from] rcgen::Error),
}

impl AttestError {
    /// Whether restarting the agent as it is cannot help (the configuration, the token
    /// or the data directory must change first).
    pub fn is_config(&self) -> bool {
        match self {
            AttestError::NoToken(_)
            | AttestError::Expired { .. }
            | AttestError::NotTrusted(_)
            | AttestError::Refused(_)
            | AttestError::Bundle(_) => true,
            AttestError::Identity(_)
            | AttestError::ServerFailed(_)
            | AttestError::Unreachable { .. }
            | AttestError::BadAnswer(_)
            | AttestError::Keys(_) => false,
        }
    }
}

/// The stored identity, or a new one from attesting with the join token.
pub async fn identity(
    config: &AgentConfig,
    files: &IdentityFiles,
    clock: &dyn Clock,
) -> Result<(AgentSvid, Bundle), AttestError> {
    match files.load()? {
        Some((svid, bundle)) if svid.not_after * 1000 > clock.now_ms() => {
            tracing::info!(spiffe_id = %svid.spiffe_id, not_after = %lanyard_daemon::output::rfc3339(svid.not_after), "loaded the stored agent SVID");
            return Ok((svid, bundle));
        }
        Some((svid, _)) if config.join_token.token().is_err() => {
            return Err(AttestError::Expired {
                not_after: svid.not_after,
            });
        }
        _ => {}
    }
    let token = config.join_token.token()?;
    // A token spent into a directory that cannot keep the identity is lost for good.
    files.check_writable()?;
    let (svid, bundle) = attest(config, token.expose()).await?;
    files.store(&svid, &bundle)?;
    Ok((svid, bundle))
}

/// Attests with a join token; returns the new identity and bundle.
async fn attest(config: &AgentConfig, token: &str) -> Result<(AgentSvid, Bundle), AttestError> {
    let server_id = lanyard_proto::server_id(&config.trust_domain);
    let (key, csr) = key_and_csr(None)?;
    let request = AttestAgentRequest {
        method: join_token::METHOD.into(),
        payload: join_token::evidence(token),
        csr,
    };
    let (bundle_path, roots) = match &config.bootstrap {
        Bootstrap::Bundle { path, roots } => (Some(path.clone()), roots.clone()),
        Bootstrap::Insecure => {
            tracing::warn!(
                "INSECURE BOOTSTRAP: trusting whatever answers at {} for attestation; use trust_bundle_path outside local trials",
                config.server_address
            );
            (None, vec![])
        }
    };
    let deadline = tokio::time::Instant::now() + ATTEST_PATIENCE;
    let mut failures = 0;
    let response = loop {
        let verifier = match &bundle_path {
            Some(_) => SpiffeServerVerifier::new(&roots, server_id.clone())?,
            None => SpiffeServerVerifier::insecure(server_id.clone()),
        };
        match crate::client::attest_agent(&config.server_address, verifier, request.clone()).await {
            Ok(r) => break r,
            Err(CallError::NotTrusted(refusal)) => {
                return Err(AttestError::NotTrusted(NotTrusted {
                    address: config.server_address.clone(),
                    refusal,
                    bundle_path,
                    trust_domain: config.trust_domain.clone(),
                }));
            }
            Err(CallError::Refused(status)) => return Err(AttestError::Refused(status)),
            Err(CallError::Failed(status)) if is_unreachable(&status) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(AttestError::Unreachable {
                        address: config.server_address.clone(),
                        status,
                    });
                }
                let delay = retry_delay(failures.min(3));
                failures += 1;
                tracing::warn!(error = %status.message(), retry_in = ?delay, "the server is not reachable yet");
                tokio::time::sleep(delay).await;
            }
            // Reachable, but it says the evidence is no good.
            Err(CallError::Failed(status)) if status.code() == tonic::Code::InvalidArgument => {
                return Err(AttestError::Refused(status));
            }
            Err(CallError::Failed(status)) => return Err(AttestError::ServerFailed(status)),
        }
    };
    let bundle = response
        .bundle
        .map(|b| b.x509_authorities)
        .unwrap_or_default();
    if bundle.is_empty() {
        return Err(BadAnswer::NoBundle.into());
    }
    let leaf = response.x509_svid_chain.first().ok_or(BadAnswer::NoSvid)?;
    let info = lanyard_proto::svid::check_leaf(leaf, None).map_err(BadAnswer::Profile)?;
    if info.spiffe_id.as_str() != response.spiffe_id
        || !info.spiffe_id.is_member_of(&config.trust_domain)
    {
        return Err(BadAnswer::WrongId {
            got: info.spiffe_id,
            trust_domain: config.trust_domain.clone(),
        }
        .into());
    }
    let our_key = rcgen::KeyPair::try_from(key.pkcs8_der())?;
    let carried = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
        .map_err(|_| BadAnswer::WrongKey)?;
    if carried != our_key.public_key_raw() {
        return Err(BadAnswer::WrongKey.into());
    }
    tracing::info!(spiffe_id = %info.spiffe_id, "attested to the server");
    Ok((
        AgentSvid {
            spiffe_id: info.spiffe_id,
            chain: response.x509_svid_chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        },
        bundle,
    ))
}

/// Whether a failed call means the server could not be reached (worth waiting for)
/// rather than that it answered with an error.
fn is_unreachable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::Unauthenticated
        | Code::DataLoss => false,
    }
}
