//! Workload attestors: the agent's proof of what a local process calling the Workload API is.
//!
//! Every attestor starts from what the kernel says about the socket peer (its credentials
//! and a pidfd taken when the connection was accepted, see [`process`]) and never from
//! anything the request says about itself. [`sharing`] tells whether a connection is held
//! by its peer alone, which binary selectors depend on.

pub mod process;
pub mod sharing;
pub mod unix;

pub use process::{FileId, PeerCredentials, PidfdSource, Process, peer_credentials, pidfd_support};
pub use sharing::Holders;
pub use unix::{AttestError, Attestation, Digest, UnixAttestor, UnixAttestorConfig};
