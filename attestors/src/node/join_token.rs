//! Join tokens: a one-time secret the operator hands to a new node. The agent half sends
//! it as evidence; the server half checks its form here, and the datastore spends it
//! (once, before it expires).
//!
//! The token itself is a secret until it is used, so nothing derived from it may reveal
//! it: the server stores only its SHA-256 digest, and names the agent after the token's
//! ID, the first 32 hex digits of that digest (`spiffe://<td>/lanyard/agent/join_token/<id>`,
//! node selector `join_token:<id>`). Knowing an agent's ID or selector does not help to
//! guess the token.

use lanyard_proto::Selector;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

use super::{NodeAttestError, NodeIdentity};

/// The method name on the wire and in agent IDs.
pub const METHOD: &str = "join_token";

/// Hex digits of a token ID.
pub const ID_LEN: usize = 32;

/// Agent half: the evidence for a token is the token itself.
pub fn evidence(token: &str) -> Vec<u8> {
    token.trim().as_bytes().to_vec()
}

/// What the server keeps of a token: its digest (to find it) and its ID (to name things
/// after it). Neither reveals the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDigest {
    /// SHA-256 of the token, 64 lowercase hex digits.
    pub hash: String,
    /// The first [`ID_LEN`] hex digits of `hash`.
    pub id: String,
}

/// The digest and ID of `token`.
pub fn digest_of(token: &str) -> TokenDigest {
    let hash = hex::encode(digest(&SHA256, token.as_bytes()));
    let id = hash[..ID_LEN].to_string();
    TokenDigest { hash, id }
}

/// A new token: 32 random bytes in hex (256 bits); `None` if the OS has no randomness.
pub fn generate() -> Option<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

/// The agent path and node selectors of the agent that attests with a token of this ID.
pub fn identity(token_id: &str) -> Result<NodeIdentity, lanyard_proto::SelectorError> {
    Ok(NodeIdentity {
        agent_path: format!("/lanyard/agent/{METHOD}/{token_id}"),
        selectors: vec![selector(token_id)?],
    })
}

/// Server half: checks the evidence's form and names the node after the token's ID.
pub fn verify_form(payload: &[u8]) -> Result<(TokenDigest, NodeIdentity), NodeAttestError> {
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
    let digest = digest_of(token);
    let node = identity(&digest.id).map_err(|e| malformed(&e.to_string()))?;
    Ok((digest, node))
}

/// The node selector an agent attested with the token of `token_id` holds; a token's
/// node alias entry is registered with exactly this selector.
pub fn selector(token_id: &str) -> Result<Selector, lanyard_proto::SelectorError> {
    Selector::new(METHOD, token_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_agent_after_the_token_id_and_refuses_bad_forms() {
        let (digest, node) = verify_form(&evidence(" 3f1c-AB_9 \n")).expect("valid");
        assert_eq!(digest, digest_of("3f1c-AB_9"));
        assert_eq!(digest.hash.len(), 64);
        assert_eq!(digest.id, digest.hash[..32]);
        assert_eq!(
            node.agent_path,
            format!("/lanyard/agent/join_token/{}", digest.id)
        );
        assert_eq!(
            node.selectors[0].to_string(),
            format!("join_token:{}", digest.id)
        );
        assert!(!node.agent_path.contains("3f1c"), "the token leaks");
        assert!(verify_form(b"").is_err());
        assert!(verify_form(b"a/../b").is_err());
        assert!(verify_form(&[0xff]).is_err());
        assert!(verify_form("x".repeat(129).as_bytes()).is_err());
    }

    #[test]
    fn digests_are_sha256_and_generated_tokens_are_fresh() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            digest_of("abc").hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = generate().expect("random");
        let b = generate().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        verify_form(a.as_bytes()).expect("a generated token has a valid form");
        let (d, node) = verify_form(a.as_bytes()).expect("form");
        crate::forms::check(crate::forms::Scope::Node, &node.selectors[0])
            .expect("the selector has the registered node form");
        assert_eq!(d.id.len(), ID_LEN);
    }
}
