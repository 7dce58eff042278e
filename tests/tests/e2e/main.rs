//! End-to-end tests: one test binary, one module per topic, sharing the harness in
//! `lanyard_tests` (tests/src/lib.rs). They start the real `lanyard-server` and
//! `lanyard-agent` binaries and talk to them with real clients.

mod demo_script;
mod python_client;
mod server_agent_api;
mod server_and_cli;
mod server_data_dir;
mod server_operations;
mod server_registration;
mod server_tokens;
mod systemd_units;
mod workload_clients;
