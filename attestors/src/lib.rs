//! Lanyard's attestors: evidence in, selectors out.
//!
//! Workload attestors (`workload`) turn what the kernel says about a local process calling the
//! Workload API into selectors such as `unix:uid:1001`; node attestors prove what the runner an
//! agent runs on is. [`forms`] lists every selector form they produce, so registration can refuse
//! a selector none of them would emit. Nothing a caller says about itself is trusted.

pub mod forms;
pub mod node;
pub mod workload;
