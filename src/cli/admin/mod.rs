//! The operators' CLI, a client of the broker over mutual TLS with an admin certificate:
//! `hybroker admin …` (every tenant's jobs, the agents, the elastic sites' capacity) and
//! `hybroker tenants …` (API keys, in [`keys`]). The tenants use the gateway's HTTP API and [`super::client`] instead.
//!
//! The conventions are the tenants' CLI's: connection flags anywhere on the command line or from
//! the environment (`--broker`/`--ca-cert`/`--cert`/`--key` or `HYBROKER_BROKER`/
//! `HYBROKER_ADMIN_CA_CERT`/`HYBROKER_ADMIN_CERT`/`HYBROKER_ADMIN_KEY`, in [`connection`]),
//! `--output table|json` (JSON in the HTTP API's shapes where it has one), and the exit statuses and
//! `error:`/`hint:` lines of [`super::report`].

mod agents;
mod backup;
mod certs;
mod connection;
mod keys;
mod sites;
mod tokens;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::client::output;
use super::report::{self, EXIT_OK, Output, print_json};
use crate::gateway::api;
use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, SpecFormat};
use connection::{BrokerArgs, status_error};
pub use keys::{TenantsArgs, tenants};

#[derive(Args)]
pub struct AdminArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: AdminCommand,
}

const WAIT_HELP: &str = "Exit status with --wait: 0 when the job succeeded; when it failed, the job's own exit code \
    clamped to 1..=125 (1 when it has none); 1 when it was cancelled; 2 when the command itself failed.";

#[derive(Subcommand)]
enum AdminCommand {
    /// Submit a job spec (YAML or JSON); with --wait, follow it and exit with its result.
    #[command(after_help = WAIT_HELP)]
    Submit {
        /// The job spec file.
        file: PathBuf,
        /// Print the job's events until it ends, then exit with its result.
        #[arg(long)]
        wait: bool,
        /// Submit for this tenant (a declared one; default: `default`).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Makes a retried submit safe: the same key and spec give the same job.
        #[arg(long, default_value = "", value_name = "KEY")]
        idempotency_key: String,
    },
    /// Show one job.
    Get { id: String },
    /// List jobs, newest first.
    List {
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job (kills its process group on the agent).
    Cancel { id: String },
    /// Print the output tail the broker keeps for the job's latest attempt.
    Logs { id: String },
    /// The agents: list them (the default), revoke one, or remove one that is gone.
    Agents(agents::AgentsArgs),
    /// Certificates: revoke (by identity or serial), list revocations.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Stop giving an agent new work; its running jobs finish (kept across broker restarts).
    Drain {
        #[arg(value_name = "SITE/NODE")]
        id: String,
    },
    /// Give a drained agent new work again.
    Undrain {
        #[arg(value_name = "SITE/NODE")]
        id: String,
    },
    /// The elastic sites' cloud capacity: list them (the default), or get one's instances and
    /// unavailable pools.
    Sites {
        #[command(subcommand)]
        command: Option<super::client::sites::SitesCommand>,
    },
    /// Back up what the broker cannot rebuild (an online database snapshot, the secrets key, the
    /// issuing CA) into a new directory; run on the broker's host, while it runs.
    Backup(backup::BackupArgs),
    /// Put a backup back where the broker's config says (the broker stopped, its database moved
    /// away); every file is checked against the backup's manifest first.
    Restore(backup::BackupArgs),
    /// The audit trail of admin actions (drain, undrain, remove, tokens, revocations), newest first.
    Events {
        /// At most this many events (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// `admin logs` as JSON.
#[derive(Serialize)]
struct Logs {
    job_id: String,
    attempt: u32,
    /// The kept tail of the attempt's output (invalid UTF-8 replaced).
    output: String,
    /// Older output was dropped (the agent's work directory keeps all of it).
    truncated: bool,
}

/// Runs an `admin` command; returns the exit status (errors printed as `error:`/`hint:`).
pub async fn run(args: AdminArgs) -> i32 {
    report::finish(admin(args).await)
}

async fn admin(args: AdminArgs) -> anyhow::Result<i32> {
    if let AdminCommand::Agents(agents::AgentsArgs { command: Some(agents::AgentsCommand::Token(command)) }) =
        args.command
    {
        return tokens::run(&args.broker, command).await;
    }
    let out = args.broker.output;
    let command = match args.command {
        AdminCommand::Backup(backup) => return backup::backup(backup, out).await,
        AdminCommand::Restore(backup) => return backup::restore(backup, out).await,
        command => command,
    };
    let channel = args.broker.channel().await?;
    let mut client = JobServiceClient::new(channel.clone());
    match command {
        AdminCommand::Certs { command } => certs::certs(channel, out, command).await?,
        AdminCommand::Submit { file, wait, tenant, idempotency_key } => {
            let spec = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let format =
                if file.extension().is_some_and(|e| e == "json") { SpecFormat::Json } else { SpecFormat::Yaml };
            let request = proto::SubmitRequest { spec, format: format.into(), idempotency_key, tenant };
            let id = client.submit(request).await.map_err(status_error)?.into_inner().job_id;
            if !wait {
                match out {
                    Output::Json => print_json(&api::Submitted { url: format!("/v1/jobs/{id}"), id }),
                    Output::Table => println!("submitted {id}"),
                }
                return Ok(EXIT_OK);
            }
            if out == Output::Table {
                println!("submitted {id}");
            }
            let job = follow(&mut client, &id, out).await?;
            print_job(out, &job);
            return Ok(output::exit_status(&job));
        }
        AdminCommand::Get { id } => {
            let job = client.get(proto::GetJobRequest { job_id: id, tenant: String::new() }).await;
            print_job(out, &job.map_err(status_error)?.into_inner().into());
        }
        AdminCommand::List { limit } => {
            let list = client.list(proto::ListJobsRequest { limit, ..Default::default() }).await;
            let list = list.map_err(status_error)?.into_inner();
            let list = api::JobList {
                jobs: list.jobs.into_iter().map(api::Job::from).collect(),
                next_cursor: (!list.next_cursor.is_empty()).then_some(list.next_cursor),
            };
            match out {
                Output::Json => print_json(&list),
                Output::Table => print!("{}", jobs_table(&list.jobs)),
            }
        }
        AdminCommand::Cancel { id } => {
            let job = client.cancel(proto::CancelJobRequest { job_id: id, ..Default::default() }).await;
            print_job(out, &job.map_err(status_error)?.into_inner().into());
        }
        AdminCommand::Logs { id } => {
            let logs = client.logs(proto::LogsRequest { job_id: id.clone(), ..Default::default() }).await;
            let logs = logs.map_err(status_error)?.into_inner();
            let output = String::from_utf8_lossy(&logs.output).into_owned();
            match out {
                Output::Json => {
                    print_json(&Logs { job_id: id, attempt: logs.attempt, output, truncated: logs.truncated })
                }
                Output::Table => {
                    if logs.truncated {
                        eprintln!("(older output was dropped; the agent's work directory keeps all of it)");
                    }
                    print!("{output}");
                }
            }
        }
        AdminCommand::Backup(_) | AdminCommand::Restore(_) => unreachable!("local commands, handled above"),
        AdminCommand::Agents(args) => agents::agents(channel, args, out).await?,
        AdminCommand::Events { limit } => agents::events(channel, limit, out).await?,
        AdminCommand::Sites { command } => sites::sites(channel, command, out).await?,
        AdminCommand::Drain { id } => {
            let agent = client
                .drain_agent(proto::DrainAgentRequest { agent_id: id, tenant: String::new() })
                .await
                .map_err(status_error)?;
            let agent = api::Agent::from(agent.into_inner());
            match out {
                Output::Json => print_json(&agent),
                Output::Table => print!("{}", output::agent_details(&agent)),
            }
        }
        AdminCommand::Undrain { id } => {
            let request = proto::DrainAgentRequest { agent_id: id, tenant: String::new() };
            let agent = client.undrain_agent(request).await.map_err(status_error)?;
            let agent = api::Agent::from(agent.into_inner());
            match out {
                Output::Json => print_json(&agent),
                Output::Table => print!("{}", output::agent_details(&agent)),
            }
        }
    }
    Ok(EXIT_OK)
}

/// Prints each event until the job ends (on stdout for a table, on stderr beside JSON, so that
/// stdout stays one document); returns the final job.
async fn follow(client: &mut JobServiceClient<Channel>, id: &str, out: Output) -> anyhow::Result<api::Job> {
    let request = proto::WatchJobRequest { job_id: id.to_string(), tenant: String::new(), after_seq: 0 };
    let mut events = client.watch(request).await.map_err(status_error)?.into_inner();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(status_error)?;
        let line = format!("  {:<10} {}", ev.state, crate::model::text::escape(&ev.reason));
        match out {
            Output::Table => println!("{line}"),
            Output::Json => eprintln!("{line}"),
        }
    }
    let job = client.get(proto::GetJobRequest { job_id: id.to_string(), tenant: String::new() }).await;
    let job = api::Job::from(job.map_err(status_error)?.into_inner());
    if !output::is_terminal(&job.state) {
        bail!("the watch of job {id} ended while it is {}", job.state);
    }
    Ok(job)
}

fn jobs_table(jobs: &[api::Job]) -> String {
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| vec![j.id.clone(), j.name.clone(), j.state.clone(), j.tenant.clone(), dash(&j.agent)])
        .collect();
    output::table(&["ID", "NAME", "STATE", "TENANT", "AGENT"], &rows)
}

fn print_job(out: Output, j: &api::Job) {
    if out == Output::Json {
        return print_json(j);
    }
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let exit = j.exit_code.map_or("-".to_string(), |c| c.to_string());
    let escape = crate::model::text::escape;
    println!("job {} ({})", j.id, escape(&j.name));
    println!("  state {}  attempts {}/{}  exit code {exit}", j.state, j.attempts, j.max_attempts);
    println!("  tenant {}  site {}  agent {}", j.tenant, dash(&j.site), dash(&j.agent));
    println!("  why: {}", escape(&j.reason));
    println!("  updated {}", j.updated_at);
}
