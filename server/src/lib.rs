//! Lanyard's signing server: the trust domain's CA. It attests node agents, keeps
//! registration entries, signs X509-SVIDs for the entries authorized for each agent,
//! and pushes entry changes to agents as they happen.

pub mod api;
pub mod ca;
pub mod cli;
pub mod config;
pub mod datastore;
pub mod entries;
pub mod run;
pub mod state;
pub mod tls;
