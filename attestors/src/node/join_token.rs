//! Join tokens: a one-time secret the operator hands to a new node. The agent half sends
//! it as evidence; the server half checks its form here, and the datastore spends it
//! (once, before it expires).

use lanyard_proto::Selector;

use super::{NodeAttestError, NodeIdentity};

/// The method name on the wire and in agent IDs.
pub const METHOD: &str = "join_token";

/// Agent half: the evidence for a token is the token itself.
pub fn evidence(token: &str) -> Vec<u8> {
    token.trim().as_bytes().to_vec()
}

/// Server half: checks the evidence's form and names the node. The token becomes a
/// path segment of the agent's SPIFFE ID, so only path-safe characters are allowed.
pub fn verify_form(payload: &[u8]) -> Result<(String, NodeIdentity), NodeAttestError> {
    let malformed = |reason: &str| NodeAttestError::Malformed {
        method: METHOD,
        reason: reason.into(),
    };
    let token = std::str::from_utf8(payload).map_err(|_| malformed("token is not UTF-8"))?;
    if token.is_empty() || token.len() > 128 {
        return Err(malformed("token must be 1 to 128 characters"));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(malformed(
            "token may contain only letters, digits, '-' and '_'",
        ));
    }
    let selector = Selector::new(METHOD, token).map_err(|e| malformed(&e.to_string()))?;
    Ok((
        token.to_string(),
        NodeIdentity {
            agent_path: format!("/lanyard/agent/{METHOD}/{token}"),
            selectors: vec![selector],
        },
    ))
}

/// The node selector an agent attested with `token` holds; a token's node alias entry
/// is registered with exactly this selector.
pub fn selector(token: &str) -> Result<Selector, lanyard_proto::SelectorError> {
    Selector::new(METHOD, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_agent_and_refuses_bad_forms() {
        let (token, node) = verify_form(&evidence(" 3f1c-AB_9 \n")).expect("valid");
        assert_eq!(token, "3f1c-AB_9");
        assert_eq!(node.agent_path, "/lanyard/agent/join_token/3f1c-AB_9");
        assert_eq!(node.selectors[0].to_string(), "join_token:3f1c-AB_9");
        assert!(verify_form(b"").is_err());
        assert!(verify_form(b"a/../b").is_err());
        assert!(verify_form(&[0xff]).is_err());
        assert!(verify_form("x".repeat(129).as_bytes()).is_err());
    }
}
