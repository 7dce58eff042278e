//! End-to-end tests: one test binary, one module per topic, sharing the harness in
//! `lanyard_tests` (tests/src/lib.rs). They start the real `lanyard-server` and
//! `lanyard-agent` binaries and talk to them with real clients.

mod agent_bootstrap;
mod agent_cli;
mod agent_health;
mod agent_join_token;
mod agent_single_instance;
mod demo_script;
mod python_client;
mod server_agent_api;
mod server_and_cli;
mod server_data_dir;
mod server_operations;
mod server_registration;
mod server_tokens;
mod systemd_units;
mod wl_entry_changes;
mod wl_errors;
mod wl_mtls;
mod wl_openssl_files;
mod wl_rotation;
mod wl_shutdown;
mod wl_spiffe_crate;
mod workload_api_limits;
mod workload_attestation;
