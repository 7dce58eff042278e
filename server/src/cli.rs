//! The `lanyard-server` command line: `run` starts the daemon, `validate` checks its
//! configuration; everything else is a client of the admin socket. All output goes
//! through `lanyard_daemon::output` (a closed pipe ends quietly); text shows times as
//! RFC 3339 UTC, JSON keeps Unix seconds.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lanyard_daemon::outln;
use lanyard_daemon::output::{rfc3339, write_str};
use lanyard_proto::admin::admin_service_client::AdminServiceClient;
use lanyard_proto::admin::*;
use lanyard_proto::types;
use lanyard_proto::{Selector, SpiffeId};
use serde_json::json;
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
    /// Check the configuration (and the data_dir, if it exists) without starting.
    Validate(RunArgs),
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
    /// Check that the server is ready; prints why not and exits non-zero otherwise.
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

/// The smallest TTL a flag accepts, in seconds.
const MIN_TTL_SECS: u64 = 10;

/// A TTL flag: seconds or a duration with a unit (`90`, `15m`, `1h`), at least 10 s.
fn ttl_flag(raw: &str) -> Result<i32, String> {
    let d: lanyard_daemon::config::Duration = raw.parse()?;
    if d.as_secs() < MIN_TTL_SECS {
        return Err(format!(
            "must be at least {MIN_TTL_SECS} seconds, got {}s",
            d.as_secs()
        ));
    }
    i32::try_from(d.as_secs()).map_err(|_| format!("\"{raw}\" is too long"))
}

/// Filters `entry show` and `entry count` share.
#[derive(Debug, Args)]
pub struct EntryFilterArgs {
    #[arg(long)]
    pub spiffe_id: Option<SpiffeId>,
    #[arg(long)]
    pub parent_id: Option<SpiffeId>,
    /// Only entries that have this selector (repeatable; all must match).
    #[arg(long = "selector")]
    pub selectors: Vec<Selector>,
}

impl EntryFilterArgs {
    fn request(&self) -> ListEntriesRequest {
        ListEntriesRequest {
            spiffe_id: self
                .spiffe_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            parent_id: self
                .parent_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            selectors: selectors_to_proto(&self.selectors),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Register an entry (or, with --data, a batch of them in one transaction).
    Create {
        #[command(flatten)]
        fields: EntryFields,
        /// A JSON file {"entries": [...]} to create all at once: all of them or none.
        #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "dns_names", "hint"])]
        data: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show entries: one by --id, or all that match the filters.
    Show {
        /// Only the entry with this id (the server answers; an unknown id is an error).
        #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selectors"])]
        id: Option<String>,
        #[command(flatten)]
        filter: EntryFilterArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Count entries, optionally filtered.
    Count {
        #[command(flatten)]
        filter: EntryFilterArgs,
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
    /// Delete entries (repeat --id for several; all of them or none).
    Delete {
        #[arg(long = "id", required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the entry grants.
    #[arg(long, required_unless_present = "data")]
    pub spiffe_id: Option<SpiffeId>,
    /// The agent (or node alias) whose workloads may receive it.
    #[arg(long, required_unless_present = "data")]
    pub parent_id: Option<SpiffeId>,
    /// A selector the workload must have, type:value, e.g. unix:uid:1001 (repeatable).
    #[arg(long = "selector", required_unless_present = "data")]
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime: seconds or 15m, 1h ... (at least 10 s; default: the server's).
    #[arg(long, value_parser = ttl_flag)]
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
    /// X509-SVID lifetime: seconds or 15m, 1h ... (at least 10 s).
    #[arg(long, value_parser = ttl_flag)]
    pub x509_svid_ttl: Option<i32>,
    /// Replaces all DNS names when given (repeatable).
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    #[arg(long)]
    pub hint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token for a new agent; prints `Token: <token>` (shown only
    /// this once: the server keeps only its digest).
    Generate {
        /// Also know the agent by this ID (a node alias workload entries can name as parent).
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
        /// Lifetime: seconds or 10m, 1h ... (at least 10 s).
        #[arg(long, default_value = "600", value_parser = ttl_flag)]
        ttl: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List(ClientArgs),
    /// Show one attested agent.
    Show {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget an agent: its SVID stops working and it must attest again.
    Evict {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Evict an agent and refuse every later attestation that would give its ID.
    Ban {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lift a ban.
    Unban {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List banned agent IDs.
    Bans(ClientArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// The CA certificates as PEM.
    Pem,
    /// A SPIFFE bundle: a JWK Set with `spiffe_sequence` and `spiffe_refresh_hint`.
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's CA certificates.
    Show {
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A client command's failure: one sentence for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the server at {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("server refused: {0}")]
    Server(String),
    #[error("the server is not ready: {}", .0.join("; "))]
    NotReady(Vec<String>),
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("{0}")]
    Bundle(#[from] crate::bundle::JwkError),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Server(s.message().to_string())
    }
}

async fn channel(args: &ClientArgs) -> Result<Channel, ClientError> {
    lanyard_daemon::uds::channel(&args.admin_socket)
        .await
        .map_err(|e| ClientError::Connect {
            path: args.admin_socket.clone(),
            reason: std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
        })
}

async fn connect(args: &ClientArgs) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(channel(args).await?))
}

fn selectors_to_proto(s: &[Selector]) -> Vec<types::Selector> {
    s.iter().map(types::Selector::from).collect()
}

fn selector_text(s: &types::Selector) -> String {
    format!("{}:{}", s.r#type, s.value)
}

fn entry_json(e: &types::Entry) -> serde_json::Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(selector_text).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "created_at": e.created_at,
        "revision_number": e.revision_number,
    })
}

fn entry_text(e: &types::Entry) -> String {
    let ttl = match u64::try_from(e.x509_svid_ttl) {
        Ok(0) | Err(_) => "default".to_string(),
        Ok(secs) => lanyard_daemon::config::Duration::from_secs(secs).to_string(),
    };
    let mut out = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\nCreated at       : {}\nX509-SVID TTL    : {ttl}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision_number,
        rfc3339(e.created_at)
    );
    for s in &e.selectors {
        out += &format!("Selector         : {}\n", selector_text(s));
    }
    for d in &e.dns_names {
        out += &format!("DNS name         : {d}\n");
    }
    if !e.hint.is_empty() {
        out += &format!("Hint             : {}\n", e.hint);
    }
    out
}

fn print_entry(e: &types::Entry, output: Output) {
    match output {
        Output::Json => outln!("{}", entry_json(e)),
        Output::Text => write_str(&entry_text(e)),
    }
}

fn print_entries(entries: &[types::Entry], output: Output) {
    match output {
        Output::Json => outln!(
            "{}",
            json!({ "entries": entries.iter().map(entry_json).collect::<Vec<_>>() })
        ),
        Output::Text => {
            outln!(
                "Found {} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                outln!("\n{}", entry_text(e).trim_end());
            }
        }
    }
}

fn agent_json(a: &types::Agent) -> serde_json::Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": a.selectors.iter().map(selector_text).collect::<Vec<_>>(),
        "x509_svid_serial": a.x509_svid_serial,
        "x509_svid_expires_at": a.x509_svid_expires_at,
        "attested_at": a.attested_at,
        "aliases": a.aliases,
    })
}

fn agent_text(a: &types::Agent) -> String {
    let mut out = format!(
        "SPIFFE ID        : {}\nAttestation type : {}\nAttested at      : {}\nSVID serial      : {}\nSVID expires at  : {}\n",
        a.spiffe_id,
        a.attestation_type,
        rfc3339(a.attested_at),
        a.x509_svid_serial,
        rfc3339(a.x509_svid_expires_at)
    );
    for s in &a.selectors {
        out += &format!("Selector         : {}\n", selector_text(s));
    }
    for alias in &a.aliases {
        out += &format!("Alias            : {alias}\n");
    }
    out
}

/// An entry of an `entry create --data` file. Selectors are `"type:value"` strings (as
/// `entry show --output json` prints them) or `{"type": .., "value": ..}` objects (as
/// SPIRE writes them); the TTL is seconds or a duration such as `"15m"`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataEntry {
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<DataSelector>,
    #[serde(default)]
    x509_svid_ttl: Option<lanyard_daemon::config::Duration>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    hint: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum DataSelector {
    Text(String),
    Parts { r#type: String, value: String },
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    entries: Vec<DataEntry>,
}

/// Reads an `entry create --data` file into entries to send. Each problem names the file
/// and (1-based) the entry.
fn read_data(path: &Path) -> Result<Vec<types::Entry>, ClientError> {
    let bad = |reason: String| ClientError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let file: DataFile = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "line {}, column {}: {}",
            e.line(),
            e.column(),
            e.to_string()
                .split(" at line ")
                .next()
                .unwrap_or("invalid JSON")
        ))
    })?;
    file.entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let selectors = e
                .selectors
                .iter()
                .map(|s| {
                    let parsed = match s {
                        DataSelector::Text(t) => Selector::parse(t),
                        DataSelector::Parts { r#type, value } => {
                            Selector::new(r#type.as_str(), value.as_str())
                        }
                    };
                    parsed
                        .map(types::Selector::from)
                        .map_err(|err| bad(format!("entry {}: {err}", i + 1)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ttl = match e.x509_svid_ttl {
                None => 0,
                Some(d) => ttl_flag(&d.as_secs().to_string())
                    .map_err(|err| bad(format!("entry {}: x509_svid_ttl {err}", i + 1)))?,
            };
            Ok(types::Entry {
                spiffe_id: e.spiffe_id,
                parent_id: e.parent_id,
                selectors,
                x509_svid_ttl: ttl,
                dns_names: e.dns_names,
                hint: e.hint,
                ..Default::default()
            })
        })
        .collect()
}

async fn entry_command(command: EntryCommand) -> Result<(), ClientError> {
    match command {
        EntryCommand::Create {
            data: Some(path),
            client,
            ..
        } => {
            let entries = read_data(&path)?;
            let created = connect(&client)
                .await?
                .batch_create_entries(BatchCreateEntriesRequest { entries })
                .await?
                .into_inner()
                .entries;
            match client.output {
                Output::Json => print_entries(&created, Output::Json),
                Output::Text => {
                    outln!(
                        "Created {} entr{}",
                        created.len(),
                        if created.len() == 1 { "y" } else { "ies" }
                    );
                    for e in &created {
                        outln!("\n{}", entry_text(e).trim_end());
                    }
                }
            }
        }
        EntryCommand::Create {
            fields,
            data: None,
            client,
        } => {
            let entry = types::Entry {
                spiffe_id: fields.spiffe_id.map(|i| i.to_string()).unwrap_or_default(),
                parent_id: fields.parent_id.map(|i| i.to_string()).unwrap_or_default(),
                selectors: selectors_to_proto(&fields.selectors),
                x509_svid_ttl: fields.x509_svid_ttl.unwrap_or(0),
                dns_names: fields.dns_names,
                hint: fields.hint.unwrap_or_default(),
                ..Default::default()
            };
            let e = connect(&client)
                .await?
                .create_entry(CreateEntryRequest { entry: Some(entry) })
                .await?
                .into_inner();
            print_entry(&e, client.output);
        }
        EntryCommand::Show {
            id: Some(id),
            client,
            ..
        } => {
            let e = connect(&client)
                .await?
                .get_entry(GetEntryRequest { id })
                .await?
                .into_inner();
            print_entries(&[e], client.output);
        }
        EntryCommand::Show {
            id: None,
            filter,
            client,
        } => {
            let entries = connect(&client)
                .await?
                .list_entries(filter.request())
                .await?
                .into_inner()
                .entries;
            print_entries(&entries, client.output);
        }
        EntryCommand::Count { filter, client } => {
            let count = connect(&client)
                .await?
                .count_entries(filter.request())
                .await?
                .into_inner()
                .count;
            match client.output {
                Output::Json => outln!("{}", json!({ "count": count })),
                Output::Text => outln!("{count} entr{}", if count == 1 { "y" } else { "ies" }),
            }
        }
        EntryCommand::Update { id, fields, client } => {
            let mut admin = connect(&client).await?;
            let current = admin.get_entry(GetEntryRequest { id }).await?.into_inner();
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
            print_entry(&e, client.output);
        }
        EntryCommand::Delete { ids, client } => {
            let deleted = connect(&client)
                .await?
                .delete_entry(DeleteEntryRequest {
                    id: String::new(),
                    ids,
                })
                .await?
                .into_inner()
                .deleted;
            match client.output {
                Output::Json => outln!("{}", json!({ "deleted": deleted })),
                Output::Text => {
                    for id in &deleted {
                        outln!("Deleted entry {id}");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn agent_command(command: AgentCommand) -> Result<(), ClientError> {
    match command {
        AgentCommand::List(client) => {
            let agents = connect(&client)
                .await?
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            match client.output {
                Output::Json => outln!(
                    "{}",
                    json!({ "agents": agents.iter().map(agent_json).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    outln!(
                        "Found {} attested agent{}",
                        agents.len(),
                        if agents.len() == 1 { "" } else { "s" }
                    );
                    for a in &agents {
                        outln!("\n{}", agent_text(a).trim_end());
                    }
                }
            }
        }
        AgentCommand::Show { spiffe_id, client } => {
            let a = connect(&client)
                .await?
                .get_agent(GetAgentRequest {
                    spiffe_id: spiffe_id.to_string(),
                })
                .await?
                .into_inner();
            match client.output {
                Output::Json => outln!("{}", agent_json(&a)),
                Output::Text => write_str(&agent_text(&a)),
            }
        }
        AgentCommand::Evict { spiffe_id, client } => {
            connect(&client)
                .await?
                .evict_agent(EvictAgentRequest {
                    spiffe_id: spiffe_id.to_string(),
                })
                .await?;
            match client.output {
                Output::Json => outln!("{}", json!({ "evicted": spiffe_id.to_string() })),
                Output::Text => outln!("Evicted agent {spiffe_id}"),
            }
        }
        AgentCommand::Ban { spiffe_id, client } => {
            let r = connect(&client)
                .await?
                .ban_agent(BanAgentRequest {
                    spiffe_id: spiffe_id.to_string(),
                })
                .await?
                .into_inner();
            match client.output {
                Output::Json => outln!(
                    "{}",
                    json!({ "banned": spiffe_id.to_string(), "was_attested": r.was_attested, "already_banned": r.already_banned })
                ),
                Output::Text if r.already_banned => outln!("Agent {spiffe_id} was banned already"),
                Output::Text if r.was_attested => {
                    outln!("Banned agent {spiffe_id} (evicted; it may not attest again)")
                }
                Output::Text => {
                    outln!("Banned agent {spiffe_id} (not attested now; it may not attest)")
                }
            }
        }
        AgentCommand::Unban { spiffe_id, client } => {
            connect(&client)
                .await?
                .unban_agent(UnbanAgentRequest {
                    spiffe_id: spiffe_id.to_string(),
                })
                .await?;
            match client.output {
                Output::Json => outln!("{}", json!({ "unbanned": spiffe_id.to_string() })),
                Output::Text => outln!("Unbanned agent {spiffe_id}"),
            }
        }
        AgentCommand::Bans(client) => {
            let bans = connect(&client)
                .await?
                .list_bans(ListBansRequest {})
                .await?
                .into_inner()
                .bans;
            match client.output {
                Output::Json => outln!(
                    "{}",
                    json!({ "bans": bans.iter().map(|b| json!({ "spiffe_id": b.spiffe_id, "banned_at": b.banned_at })).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    outln!(
                        "Found {} banned agent{}",
                        bans.len(),
                        if bans.len() == 1 { "" } else { "s" }
                    );
                    for b in &bans {
                        outln!(
                            "\nSPIFFE ID        : {}\nBanned at        : {}",
                            b.spiffe_id,
                            rfc3339(b.banned_at)
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs a client subcommand.
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Run(_) | Command::Validate(_) => Ok(()),
        Command::Entry(entry) => entry_command(entry).await,
        Command::Agent(agent) => agent_command(agent).await,
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
                Output::Json => outln!(
                    "{}",
                    json!({ "token": t.token, "token_id": t.token_id, "agent_id": t.agent_id,
                        "expires_at": t.expires_at, "spiffe_id": t.spiffe_id })
                ),
                Output::Text => {
                    let mut text = format!(
                        "Token: {}\nToken ID  : {}\nAgent ID  : {}\n",
                        t.token, t.token_id, t.agent_id
                    );
                    if !t.spiffe_id.is_empty() {
                        text += &format!("Node alias: {}\n", t.spiffe_id);
                    }
                    text += &format!("Expires at: {}\n", rfc3339(t.expires_at));
                    write_str(&text);
                }
            }
            Ok(())
        }
        Command::Bundle(BundleCommand::Show { format, client }) => {
            let bundle = connect(&client)
                .await?
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            match format {
                BundleFormat::Spiffe => {
                    let jwks =
                        crate::bundle::spiffe_bundle(&bundle.x509_authorities, bundle.sequence)?;
                    match client.output {
                        Output::Json => outln!("{jwks}"),
                        Output::Text => outln!(
                            "{}",
                            serde_json::to_string_pretty(&jwks)
                                .unwrap_or_else(|_| jwks.to_string())
                        ),
                    }
                }
                BundleFormat::Pem => {
                    let pems: Vec<String> = bundle
                        .x509_authorities
                        .iter()
                        .map(|der| lanyard_daemon::output::pem("CERTIFICATE", der))
                        .collect();
                    match client.output {
                        Output::Json => outln!(
                            "{}",
                            json!({ "trust_domain": bundle.trust_domain, "sequence": bundle.sequence, "x509_authorities_pem": pems })
                        ),
                        Output::Text => write_str(&pems.concat()),
                    }
                }
            }
            Ok(())
        }
        Command::Healthcheck(client) => {
            let reasons = connect(&client)
                .await?
                .get_health(GetHealthRequest {})
                .await?
                .into_inner()
                .reasons;
            if !reasons.is_empty() {
                return Err(ClientError::NotReady(reasons));
            }
            match client.output {
                Output::Json => outln!("{}", json!({ "ready": true, "reasons": [] })),
                Output::Text => outln!("Server is healthy."),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_flags_take_units_and_a_floor() {
        assert_eq!(ttl_flag("90"), Ok(90));
        assert_eq!(ttl_flag("15m"), Ok(900));
        assert_eq!(ttl_flag("1h 30m"), Ok(5400));
        assert!(ttl_flag("5").expect_err("short").contains("at least 10"));
        assert!(ttl_flag("9s").is_err());
        assert!(ttl_flag("soon").expect_err("junk").contains("soon"));
        assert!(ttl_flag("1000000000000").is_err(), "beyond i32 seconds");
    }

    #[test]
    fn data_files_take_both_selector_forms_and_name_problems() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("entries.json");
        std::fs::write(
            &path,
            r#"{"entries": [
                {"spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/p",
                 "selectors": ["unix:uid:1"], "x509_svid_ttl": "15m"},
                {"spiffe_id": "spiffe://example.org/b", "parent_id": "spiffe://example.org/p",
                 "selectors": [{"type": "unix", "value": "uid:2"}], "dns_names": ["b.example.org"]}
            ]}"#,
        )
        .expect("write");
        let entries = read_data(&path).expect("read");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].x509_svid_ttl, 900);
        assert_eq!(entries[1].selectors[0].value, "uid:2");
        std::fs::write(
            &path,
            r#"{"entries": [{"spiffe_id": "spiffe://example.org/a", "parent_id": "x", "selectors": ["nocolon"]}]}"#,
        )
        .expect("write");
        let err = read_data(&path).expect_err("bad selector").to_string();
        assert!(err.contains("entry 1") && err.contains("nocolon"), "{err}");
        std::fs::write(&path, "{\"entries\": [\n  {\"spiffe_id\": 1}\n]}").expect("write");
        let err = read_data(&path).expect_err("bad json").to_string();
        assert!(
            err.contains("entries.json") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(&path, r#"{"entries": [], "extra": 1}"#).expect("write");
        assert!(
            read_data(&path)
                .expect_err("unknown key")
                .to_string()
                .contains("extra")
        );
    }
}
