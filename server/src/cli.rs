//! The `lanyard-server` command line: `run` starts the daemon; everything else is a
//! client of the admin socket.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lanyard_proto::admin::admin_service_client::AdminServiceClient;
use lanyard_proto::admin::*;
use lanyard_proto::types;
use lanyard_proto::{Selector, SpiffeId};
use tonic::transport::Channel;

use crate::config::{DEFAULT_ADMIN_SOCKET, RunArgs};

#[derive(Debug, Parser)]
#[command(
    name = "lanyard-server",
    version,
    about = "Lanyard signing server: the trust domain's CA"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run(RunArgs),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Show the trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Check that the server answers on its admin socket.
    Healthcheck(ClientArgs),
}

/// Options every admin client command takes.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The server's admin socket.
    #[arg(long, env = "LANYARD_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Register an entry; prints its id.
    Create {
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List entries, optionally filtered.
    Show {
        /// Only the entry with this id.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
        #[arg(long)]
        parent_id: Option<SpiffeId>,
        /// Only entries that have this selector (repeatable; all must match).
        #[arg(long = "selector")]
        selectors: Vec<Selector>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change an entry: given fields replace the stored ones, others stay.
    Update {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: EntryUpdateFields,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an entry.
    Delete {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the entry grants.
    #[arg(long)]
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) whose workloads may receive it.
    #[arg(long)]
    pub parent_id: SpiffeId,
    /// A selector the workload must have, type:value, e.g. unix:uid:1001 (repeatable).
    #[arg(long = "selector", required = true)]
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime in seconds (at least 10; default: the server's).
    #[arg(long, value_parser = clap::value_parser!(i32).range(10..))]
    pub x509_svid_ttl: Option<i32>,
    /// A DNS name to add to the SVID (repeatable).
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// A hint that tells a workload's SVIDs apart.
    #[arg(long)]
    pub hint: Option<String>,
}

#[derive(Debug, Args)]
pub struct EntryUpdateFields {
    #[arg(long)]
    pub spiffe_id: Option<SpiffeId>,
    #[arg(long)]
    pub parent_id: Option<SpiffeId>,
    /// Replaces all selectors when given (repeatable).
    #[arg(long = "selector")]
    pub selectors: Vec<Selector>,
    #[arg(long, value_parser = clap::value_parser!(i32).range(10..))]
    pub x509_svid_ttl: Option<i32>,
    /// Replaces all DNS names when given (repeatable).
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    #[arg(long)]
    pub hint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token for a new agent; prints `Token: <token>`.
    Generate {
        /// Also know the agent by this ID (a node alias workload entries can name as parent).
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(i32).range(10..))]
        ttl: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List(ClientArgs),
    /// Forget an agent: its SVID stops working and it must attest again.
    Evict {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's CA certificates as PEM.
    Show(ClientArgs),
}

/// A client command's failure: one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("{0}")]
    Server(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Server(format!("server refused: {}", s.message()))
    }
}

async fn connect(args: &ClientArgs) -> Result<AdminServiceClient<Channel>, ClientError> {
    let channel = lanyard_daemon::uds::channel(&args.admin_socket)
        .await
        .map_err(|e| ClientError::Connect {
            path: args.admin_socket.clone(),
            reason: std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
        })?;
    Ok(AdminServiceClient::new(channel))
}

fn selectors_to_proto(s: &[Selector]) -> Vec<types::Selector> {
    s.iter().map(types::Selector::from).collect()
}

fn entry_json(e: &types::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "created_at": e.created_at,
        "revision_number": e.revision_number,
    })
}

fn entry_text(e: &types::Entry) -> String {
    let mut out = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\n",
        e.id, e.spiffe_id, e.parent_id, e.revision_number
    );
    let ttl = if e.x509_svid_ttl == 0 {
        "default".to_string()
    } else {
        e.x509_svid_ttl.to_string()
    };
    out += &format!("X509-SVID TTL    : {ttl}\n");
    for s in &e.selectors {
        out += &format!("Selector         : {}:{}\n", s.r#type, s.value);
    }
    for d in &e.dns_names {
        out += &format!("DNS name         : {d}\n");
    }
    if !e.hint.is_empty() {
        out += &format!("Hint             : {}\n", e.hint);
    }
    out
}

fn print_entries(entries: &[types::Entry], output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "entries": entries.iter().map(entry_json).collect::<Vec<_>>() })
        ),
        Output::Text => {
            println!(
                "Found {} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                println!("\n{}", entry_text(e).trim_end());
            }
        }
    }
}

/// Runs a client subcommand.
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Run(_) => Ok(()),
        Command::Entry(EntryCommand::Create { fields, client }) => {
            let entry = types::Entry {
                spiffe_id: fields.spiffe_id.to_string(),
                parent_id: fields.parent_id.to_string(),
                selectors: selectors_to_proto(&fields.selectors),
                x509_svid_ttl: fields.x509_svid_ttl.unwrap_or(0),
                dns_names: fields.dns_names,
                hint: fields.hint.unwrap_or_default(),
                ..Default::default()
            };
            let created = connect(&client)
                .await?
                .create_entry(CreateEntryRequest { entry: Some(entry) })
                .await?;
            let e = created.into_inner();
            match client.output {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => print!("{}", entry_text(&e)),
            }
            Ok(())
        }
        Command::Entry(EntryCommand::Show {
            id,
            spiffe_id,
            parent_id,
            selectors,
            client,
        }) => {
            let req = ListEntriesRequest {
                spiffe_id: spiffe_id.map(|i| i.to_string()).unwrap_or_default(),
                parent_id: parent_id.map(|i| i.to_string()).unwrap_or_default(),
                selectors: selectors_to_proto(&selectors),
            };
            let mut entries = connect(&client)
                .await?
                .list_entries(req)
                .await?
                .into_inner()
                .entries;
            if let Some(id) = id {
                entries.retain(|e| e.id == id);
            }
            print_entries(&entries, client.output);
            Ok(())
        }
        Command::Entry(EntryCommand::Update { id, fields, client }) => {
            let mut admin = connect(&client).await?;
            let current = admin
                .list_entries(ListEntriesRequest::default())
                .await?
                .into_inner()
                .entries
                .into_iter()
                .find(|e| e.id == id)
                .ok_or_else(|| ClientError::Server(format!("no entry with id {id}")))?;
            let entry = types::Entry {
                spiffe_id: fields
                    .spiffe_id
                    .map(|i| i.to_string())
                    .unwrap_or(current.spiffe_id),
                parent_id: fields
                    .parent_id
                    .map(|i| i.to_string())
                    .unwrap_or(current.parent_id),
                selectors: if fields.selectors.is_empty() {
                    current.selectors
                } else {
                    selectors_to_proto(&fields.selectors)
                },
                x509_svid_ttl: fields.x509_svid_ttl.unwrap_or(current.x509_svid_ttl),
                dns_names: if fields.dns_names.is_empty() {
                    current.dns_names
                } else {
                    fields.dns_names
                },
                hint: fields.hint.unwrap_or(current.hint),
                ..current
            };
            let e = admin
                .update_entry(UpdateEntryRequest { entry: Some(entry) })
                .await?
                .into_inner();
            match client.output {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => print!("{}", entry_text(&e)),
            }
            Ok(())
        }
        Command::Entry(EntryCommand::Delete { id, client }) => {
            connect(&client)
                .await?
                .delete_entry(DeleteEntryRequest { id: id.clone() })
                .await?;
            match client.output {
                Output::Json => println!("{}", serde_json::json!({ "deleted": id })),
                Output::Text => println!("Deleted entry {id}"),
            }
            Ok(())
        }
        Command::Token(TokenCommand::Generate {
            spiffe_id,
            ttl,
            client,
        }) => {
            let req = CreateJoinTokenRequest {
                ttl,
                spiffe_id: spiffe_id.map(|i| i.to_string()).unwrap_or_default(),
            };
            let t = connect(&client)
                .await?
                .create_join_token(req)
                .await?
                .into_inner();
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "token": t.token, "expires_at": t.expires_at, "spiffe_id": t.spiffe_id })
                ),
                Output::Text => println!("Token: {}", t.token),
            }
            Ok(())
        }
        Command::Agent(AgentCommand::List(client)) => {
            let agents = connect(&client)
                .await?
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "agents": agents.iter().map(|a| serde_json::json!({
                        "spiffe_id": a.spiffe_id,
                        "attestation_type": a.attestation_type,
                        "selectors": a.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
                        "x509_svid_serial": a.x509_svid_serial,
                        "x509_svid_expires_at": a.x509_svid_expires_at,
                        "attested_at": a.attested_at,
                        "aliases": a.aliases,
                    })).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    println!(
                        "Found {} attested agent{}",
                        agents.len(),
                        if agents.len() == 1 { "" } else { "s" }
                    );
                    for a in &agents {
                        println!("\nSPIFFE ID        : {}", a.spiffe_id);
                        println!("Attestation type : {}", a.attestation_type);
                        println!("SVID serial      : {}", a.x509_svid_serial);
                        println!("SVID expires at  : {}", a.x509_svid_expires_at);
                        for alias in &a.aliases {
                            println!("Alias            : {alias}");
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Agent(AgentCommand::Evict { spiffe_id, client }) => {
            connect(&client)
                .await?
                .evict_agent(EvictAgentRequest {
                    spiffe_id: spiffe_id.to_string(),
                })
                .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "evicted": spiffe_id.to_string() })
                ),
                Output::Text => println!("Evicted agent {spiffe_id}"),
            }
            Ok(())
        }
        Command::Bundle(BundleCommand::Show(client)) => {
            let bundle = connect(&client)
                .await?
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            let pems: Vec<String> = bundle
                .x509_authorities
                .iter()
                .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
                .collect();
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "trust_domain": bundle.trust_domain, "sequence": bundle.sequence, "x509_authorities_pem": pems })
                ),
                Output::Text => print!("{}", pems.concat()),
            }
            Ok(())
        }
        Command::Healthcheck(client) => {
            let channel = lanyard_daemon::uds::channel(&client.admin_socket)
                .await
                .map_err(|e| ClientError::Connect {
                    path: client.admin_socket.clone(),
                    reason: std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_else(|| e.to_string()),
                })?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner()
                .status;
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                return Err(ClientError::Server("server is not serving".into()));
            }
            println!("Server is healthy.");
            Ok(())
        }
    }
}
