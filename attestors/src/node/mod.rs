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

/// The methods a server knows, for messages.
pub const METHODS: &[&str] = &[join_token::METHOD];

/// Longest method name echoed back in an error, in characters.
const MAX_ECHOED_METHOD: usize = 64;

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAttestError {
    /// The method as the caller sent it, made safe to echo: control characters dropped
    /// and cut to 64 characters (build it with [`NodeAttestError::unknown_method`]).
    #[error("unsupported node attestation method \"{0}\" (supported: join_token)")]
    UnknownMethod(String),
    #[error("malformed {method} evidence: {reason}")]
    Malformed {
        method: &'static str,
        reason: String,
    },
}

impl NodeAttestError {
    /// An unknown method, echoed without control characters and at most 64 characters
    /// long: whatever a caller sends must not end up unbounded in errors and logs.
    pub fn unknown_method(raw: &str) -> Self {
        let mut clean: String = raw.chars().filter(|c| !c.is_control()).collect();
        if let Some((cut, _)) = clean.char_indices().nth(MAX_ECHOED_METHOD) {
            clean.truncate(cut);
            clean.push_str("...");
        }
        NodeAttestError::UnknownMethod(clean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_echoed_short_and_clean() {
        let long = format!("{}\u{1b}[2J\n{}", "x".repeat(60), "y".repeat(10_000));
        let NodeAttestError::UnknownMethod(echo) = NodeAttestError::unknown_method(&long) else {
            panic!("variant");
        };
        // ESC and the newline are dropped, the rest cut after 64 characters.
        assert_eq!(echo, format!("{}[2Jy...", "x".repeat(60)));
        assert!(!echo.chars().any(char::is_control), "{echo:?}");
        let text = NodeAttestError::unknown_method("tpm").to_string();
        assert_eq!(
            text,
            "unsupported node attestation method \"tpm\" (supported: join_token)"
        );
        assert_eq!(METHODS, ["join_token"]);
    }
}
