//! Lanyard's shared vocabulary: the standard SPIFFE Workload API, the server's agent and
//! admin APIs, and the identity types they carry. No I/O: the plumbing both binaries
//! share lives in `lanyard-daemon`.

pub mod endpoint;
pub mod selector;
pub mod spiffe_id;
pub mod svid;

pub use selector::{Selector, SelectorError};
pub use spiffe_id::{IdError, SpiffeId, TrustDomain};

/// The SPIFFE Workload API (`/SpiffeWorkloadAPI/*`), wire-exact with the standard.
/// The proto has no package, so prost names the generated file `_.rs`.
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    impl std::fmt::Debug for X509svid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X509svid")
                .field("spiffe_id", &self.spiffe_id)
                .field("x509_svid_len", &self.x509_svid.len())
                .field("x509_svid_key", &"<redacted>")
                .field("bundle_len", &self.bundle.len())
                .field("hint", &self.hint)
                .finish()
        }
    }
}

/// Generated code, nested as the proto packages are so cross-package references resolve.
mod generated {
    pub mod lanyard {
        pub mod types {
            pub mod v1 {
                tonic::include_proto!("lanyard.types.v1");
            }
        }
        pub mod agent {
            pub mod v1 {
                tonic::include_proto!("lanyard.agent.v1");
            }
            pub mod local {
                pub mod v1 {
                    tonic::include_proto!("lanyard.agent.local.v1");
                }
            }
        }
        pub mod admin {
            pub mod v1 {
                tonic::include_proto!("lanyard.admin.v1");
            }
        }
    }
}

/// Types shared by the agent and admin APIs.
pub use generated::lanyard::types::v1 as types;

/// The server's API for node agents.
pub use generated::lanyard::agent::v1 as agent;

/// The agent's local service on the Workload API socket (debug selectors, health).
pub use generated::lanyard::agent::local::v1 as agent_local;

/// The server's administration API.
pub use generated::lanyard::admin::v1 as admin;

/// The SPIFFE ID the server presents to agents: `spiffe://<td>/lanyard/server`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // A constant, valid path: this cannot fail.
    SpiffeId::new(td, "/lanyard/server").unwrap_or_else(|_| unreachable!("constant path"))
}

/// The metadata key every Workload API call must carry with the value `true`.
pub const WORKLOAD_SECURITY_HEADER: &str = "workload.spiffe.io";

/// The message of PERMISSION_DENIED for a caller with no identity; the Rust `spiffe`
/// crate matches this exact text.
pub const NO_IDENTITY_ISSUED: &str = "no identity issued";
