//! The server's gRPC services.

pub mod admin;
pub mod agent;
mod convert;
