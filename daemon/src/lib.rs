//! Plumbing both Lanyard binaries share, written once: nothing here knows about SPIFFE.
//!
//! - [`logging`]: the log subscriber (text or flat JSON) and rate-limited logging;
//! - [`config`]: TOML config files with `line:column` errors, and durations as operators
//!   write them (`3600`, `"15m"`);
//! - [`shutdown`]: SIGINT/SIGTERM into a [`shutdown::Shutdown`] every task can wait on;
//! - [`fs`]: private directories and files (owner and mode checked, no symlinks followed,
//!   atomic 0600 writes through the directory's fd) and the process umask;
//! - [`lock`]: one running instance per data directory and per socket;
//! - [`uds`]: Unix-socket listeners and gRPC channels;
//! - [`health`]: readiness with reasons, served as `/live` and `/ready` over HTTP;
//! - [`notify`]: systemd `Type=notify` readiness;
//! - [`output`]: CLI output (broken pipes end quietly, RFC 3339 times, PEM with LF);
//! - [`tls`]: the one rustls crypto provider (ring) both binaries use.

pub mod config;
pub mod fs;
pub mod health;
pub mod lock;
pub mod logging;
pub mod notify;
pub mod output;
pub mod shutdown;
pub mod tls;
pub mod uds;

/// Exit status for configuration errors (EX_CONFIG in sysexits.h); the systemd units
/// do not restart a daemon that exits with it (`RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: u8 = 78;
