//! Workload attestors: the agent's proof of what a local process calling the Workload API is.
//!
//! Every attestor starts from what the kernel says about the socket peer (its credentials) and
//! never from anything the request says about itself.

pub mod unix;

pub use unix::{AttestError, PeerCredentials, UnixAttestor, UnixAttestorConfig};
