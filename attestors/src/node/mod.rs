//! Node attestation: each method has an agent half (produce evidence) and a server half
//! (verify evidence, name the agent, list its node selectors).

pub mod join_token;

use lanyard_proto::Selector;

/// What the server half concluded about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The agent SVID's path below the trust domain, e.g. `/lanyard/agent/join_token/<t>`.
    pub agent_path: String,
    /// Node selectors; node entries whose selectors are all among these become aliases.
    pub selectors: Vec<Selector>,
}

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAttestError {
    #[error("unsupported node attestation method \"{0}\"")]
    UnknownMethod(String),
    #[error("malformed {method} evidence: {reason}")]
    Malformed {
        method: &'static str,
        reason: String,
    },
}
