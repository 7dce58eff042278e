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
mod server_and_cli;
mod systemd_units;
mod workload_api_limits;
mod workload_attestation;
mod workload_clients;
