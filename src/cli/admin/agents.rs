//! `hybroker admin agents [list|token|revoke|remove]` (a group: with no subcommand it lists, as it always did)
//! and `hybroker admin events`, the audit trail of admin actions.

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;

use super::connection::status_error;
use super::keys::rfc3339;
use crate::cli::client::output::{self, table};
use crate::cli::report::{Output, print_json};
use crate::gateway::api;
use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, admin_service_client::AdminServiceClient};

#[derive(Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub(super) command: Option<AgentsCommand>,
}

#[derive(Subcommand)]
pub(super) enum AgentsCommand {
    /// Show the agents and their GPUs (the default).
    List,
    /// Join tokens that let a node enrol (`hybroker agent --join-file`): create, list, revoke.
    #[command(subcommand)]
    Token(super::tokens::TokenCommand),
    /// Revoke an agent's certificates: its stream is closed at once, its running attempts are
    /// re-queued, and it cannot connect again until it enrols with a new join token.
    Revoke {
        #[arg(value_name = "SITE/NODE")]
        id: String,
        /// Why (kept with the revocation and in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Forget an agent that is gone for good: its row, its capacity and its metric series.
    /// Refused while it is connected, unless --force.
    Remove {
        #[arg(value_name = "SITE/NODE")]
        id: String,
        /// Remove it even while connected: its stream is closed and its running attempts are
        /// lost and queued again.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `admin agents …`.
pub(super) async fn agents(channel: Channel, args: AgentsArgs, out: Output) -> anyhow::Result<()> {
    match args.command.unwrap_or(AgentsCommand::List) {
        AgentsCommand::List => {
            let mut client = JobServiceClient::new(channel);
            let agents = client.list_agents(proto::ListAgentsRequest {}).await.map_err(status_error)?;
            let agents =
                api::AgentList { agents: agents.into_inner().agents.into_iter().map(api::Agent::from).collect() };
            match out {
                Output::Json => print_json(&agents),
                Output::Table => {
                    for agent in &agents.agents {
                        println!("{}", output::agent_details(agent));
                    }
                }
            }
        }
        // Run by `tokens::run` before a channel is opened (it needs the broker's arguments).
        AgentsCommand::Token(_) => unreachable!("admin agents token is dispatched before"),
        AgentsCommand::Revoke { id, reason } => super::certs::revoke(channel, out, id, String::new(), reason).await?,
        AgentsCommand::Remove { id, force } => {
            let mut client = AdminServiceClient::new(channel);
            let request = proto::RemoveAgentRequest { agent_id: id, force };
            let agent = api::Agent::from(client.remove_agent(request).await.map_err(status_error)?.into_inner());
            match out {
                Output::Json => print_json(&agent),
                Output::Table => println!("removed agent {}", agent.id),
            }
        }
    }
    Ok(())
}

/// One audit-trail entry as `admin events` prints it (as JSON: the table's columns).
#[derive(Serialize)]
struct EventRow {
    /// RFC 3339.
    at: String,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

#[derive(Serialize)]
struct EventList {
    events: Vec<EventRow>,
}

/// Runs `admin events`: the newest `limit` admin actions, newest first.
pub(super) async fn events(channel: Channel, limit: u32, out: Output) -> anyhow::Result<()> {
    let mut client = AdminServiceClient::new(channel);
    let events = client.list_admin_events(proto::ListAdminEventsRequest { limit }).await.map_err(status_error)?;
    let events = events.into_inner().events.into_iter().map(|e| EventRow {
        at: rfc3339(e.at_ms),
        actor: e.actor,
        action: e.action,
        target: e.target,
        detail: e.detail,
    });
    let list = EventList { events: events.collect() };
    match out {
        Output::Json => print_json(&list),
        Output::Table => {
            let rows: Vec<Vec<String>> = list
                .events
                .iter()
                .map(|e| vec![e.at.clone(), e.action.clone(), e.target.clone(), e.actor.clone(), e.detail.clone()])
                .collect();
            print!("{}", table(&["AT", "ACTION", "TARGET", "ACTOR", "DETAIL"], &rows));
        }
    }
    Ok(())
}
