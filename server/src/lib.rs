//! Lanyard's signing server: the trust domain's CA. It attests node agents, keeps
//! registration entries, signs X509-SVIDs for the entries authorized for each agent,
//! and pushes entry changes to agents as they happen.
//!
//! Where the flows live: node attestation (server half) and signing in `api::agent`,
//! entry changes in `api::admin` → `state` (the only writer) → `entries` (the index
//! every agent-facing decision is made from), connection limits in `tls`, start-up and
//! upkeep in `run`.

pub mod api;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datastore;
pub mod entries;
pub mod run;
pub mod state;
pub mod tls;
