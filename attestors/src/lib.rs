//! Lanyard's attestors: evidence in, selectors out.
//!
//! Workload attestors (`workload`) turn what the kernel says about a local process calling the
//! Workload API into selectors such as `unix:uid:1001`; node attestors prove what the runner an
//! agent runs on is. Nothing a caller says about itself is trusted.

pub mod node;
pub mod workload;
