//! Lanyard's node agent: it attests the node to the server, attests each local process
//! that calls the SPIFFE Workload API, and serves it the SVIDs of its entries,
//! rotating them before they expire.

pub mod attest;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod health;
pub mod identity;
pub mod local_api;
pub mod peer;
pub mod rotation;
pub mod run;
pub mod sync;
pub mod tls;
pub mod workload_api;
