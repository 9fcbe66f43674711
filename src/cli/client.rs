//! The tenants' CLI, a client of the gateway's HTTP API: `hybroker submit`, `hybroker jobs …`,
//! `hybroker agents …` and `hybroker sites …`. Every command takes the gateway's URL, the tenant's
//! API key and, for a gateway whose certificate a private CA signed, that CA (`--gateway`/`--token`/`--ca-cert` or
//! `HYBROKER_GATEWAY`/`HYBROKER_TOKEN`/`HYBROKER_CA_CERT`), and prints tables or, with
//! `--output json`, the API's JSON as it came.
//!
//! Exit status: 0 done; 2 the command failed (bad arguments, a bad spec file, an error answer from
//! the gateway, no connection), with `error: …` on stderr; with `--follow`, the job's result: 0
//! succeeded, a failed job's own exit code clamped to 1..=125 (else 1), 1 cancelled.

pub(crate) mod data;
pub(crate) mod download;
pub(crate) mod explain;
pub(crate) mod follow;
pub(crate) mod gateway;
pub(crate) mod offline_plan;
pub(crate) mod output;
pub(crate) mod outputs;
pub(crate) mod placement;
pub(crate) mod site_state;
pub(crate) mod sites;
pub(crate) mod spec;
mod sse;

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::gateway::api::{Agent, AgentList, CancelRequest, Job, JobList, Submitted};
use crate::model::state::JobState;
use follow::Progress;
use gateway::Gateway;

use super::report::{Output, print_json};

pub use super::report::EXIT_ERROR;

const FOLLOW_HELP: &str = "Exit status with --follow: 0 when the job succeeded; when it failed, the job's own exit code \
    clamped to 1..=125 (1 when it has none, e.g. it could not start or ran past max_runtime); 1 when it was cancelled; \
    2 when the command itself failed (bad spec, error answer, lost connection).";

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Submit a job spec to the gateway (YAML, or JSON for a .json file; see examples/).
    #[command(after_help = FOLLOW_HELP)]
    Submit(SubmitArgs),
    /// List, show, cancel and follow your jobs.
    Jobs(JobsArgs),
    /// Show agents and their GPUs, and drain them (admin tenants).
    Agents(AgentsArgs),
    /// The elastic sites' cloud capacity: instances, pending launches, spend (admin tenants).
    Sites(sites::SitesArgs),
    /// Where a job would run and why, without submitting it (from the gateway, or offline from a
    /// broker config and a price snapshot with --config).
    Plan(placement::PlanArgs),
    /// The current prices per site and instance type, with their source and age.
    Prices(placement::PricesArgs),
    /// Your data in the stores: put files under your storage prefixes, list and get them.
    Data(data::DataArgs),
}

/// How to reach the gateway, and how to print.
#[derive(Args)]
pub struct GatewayArgs {
    /// The gateway's URL.
    #[arg(long, global = true, env = "HYBROKER_GATEWAY", default_value = "http://127.0.0.1:8443")]
    gateway: String,
    /// Your API key (`hybroker tenants add` makes one).
    #[arg(long, global = true, env = "HYBROKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Trust only this CA (PEM) for the gateway's certificate, e.g. a private CA; default: the system's roots.
    #[arg(long, global = true, env = "HYBROKER_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// How to print answers.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The job spec file.
    file: PathBuf,
    /// Show the job's state live until it ends, then exit with its result.
    #[arg(long)]
    follow: bool,
    /// Makes a retried submit safe: the same key and spec give the same job.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    gw: GatewayArgs,
}

#[derive(Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    command: JobsCommand,
    #[command(flatten)]
    gw: GatewayArgs,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List your jobs, newest first.
    List {
        /// Only jobs in these states (repeat, or separate with commas).
        #[arg(long, value_delimiter = ',', value_parser = parse_state)]
        state: Vec<String>,
        /// Only jobs with this label (repeat: all must match).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        label: Vec<String>,
        /// At most this many jobs (per page with --all).
        #[arg(long)]
        limit: Option<u32>,
        /// Start at this page (the `next_cursor` of the previous one).
        #[arg(long, conflicts_with = "all")]
        cursor: Option<String>,
        /// Every page, not just the first.
        #[arg(long)]
        all: bool,
    },
    /// Show one job.
    Get { id: String },
    /// Cancel a job (a running one is killed on its agent).
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print the output of the job's latest attempt.
    #[command(after_help = FOLLOW_HELP)]
    Logs {
        id: String,
        /// Keep printing as output arrives until the job ends, then exit with its result.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print the job's state changes until it ends (with --output json, one event's JSON per line).
    Events { id: String },
    /// A succeeded job's output objects (size, MD5, how to download); with --download DIR, writes
    /// them to DIR/<output path>/<key>: resumed from a .part file, checked against the store's MD5,
    /// skipped when already complete.
    Outputs {
        id: String,
        #[arg(long, value_name = "DIR")]
        download: Option<PathBuf>,
    },
    /// Why the job is where it is: its placement decision, every candidate site with its cost or
    /// the rule that rejected it (with --output json, the decision as the API serves it).
    Explain { id: String },
}

#[derive(Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    command: AgentsCommand,
    #[command(flatten)]
    gw: GatewayArgs,
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// List agents: connection, draining, GPUs, running jobs.
    List,
    /// Show one agent's inventory and health.
    Get {
        #[arg(value_name = "SITE/NODE", value_parser = parse_agent_id)]
        id: String,
    },
    /// Stop giving the agent new work; its running jobs finish.
    Drain {
        #[arg(value_name = "SITE/NODE", value_parser = parse_agent_id)]
        id: String,
    },
    /// Give a drained agent new work again.
    Undrain {
        #[arg(value_name = "SITE/NODE", value_parser = parse_agent_id)]
        id: String,
    },
}

fn parse_state(s: &str) -> Result<String, String> {
    s.parse::<JobState>().map(|st| st.as_str().to_string())
}

fn parse_label(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(s.to_string()),
        _ => Err(format!("expected KEY=VALUE, not {s:?}")),
    }
}

fn parse_agent_id(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((site, node)) if !site.is_empty() && !node.is_empty() && !node.contains('/') => Ok(s.to_string()),
        _ => Err(format!("expected SITE/NODE, e.g. lab/node-a, not {s:?}")),
    }
}

/// Runs a client command; returns the process exit status. Errors are printed here, as `error: …`
/// with a `hint: …` where one helps, and give [`EXIT_ERROR`].
pub async fn run(cmd: ClientCommand) -> anyhow::Result<i32> {
    let result = match cmd {
        ClientCommand::Submit(args) => submit(args).await,
        ClientCommand::Jobs(args) => jobs(args).await,
        ClientCommand::Agents(args) => agents(args).await,
        ClientCommand::Sites(args) => sites::sites(args).await,
        ClientCommand::Plan(args) => placement::plan(args).await,
        ClientCommand::Prices(args) => placement::prices(args).await,
        ClientCommand::Data(args) => data::data(args).await,
    };
    // Problem details may quote what a tenant wrote: shown escaped, like every table.
    Ok(super::report::finish(result))
}

fn connect(args: &GatewayArgs) -> anyhow::Result<Gateway> {
    Gateway::new(&args.gateway, args.token.as_deref(), args.ca_cert.as_deref())
}

fn typed<T: DeserializeOwned>(value: Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("unexpected answer from the gateway")
}

async fn submit(args: SubmitArgs) -> anyhow::Result<i32> {
    let body = spec::request_body(&args.file)?;
    let gw = connect(&args.gw)?;
    let mut rb = gw.request(Method::POST, &["v1", "jobs"], false).header("content-type", "application/json");
    if let Some(key) = &args.idempotency_key {
        rb = rb.header("Idempotency-Key", key.as_str());
    }
    let answer = gw.json(rb.body(body)).await?;
    let submitted: Submitted = typed(answer.clone())?;
    if !args.follow {
        match args.gw.output {
            Output::Json => print_json(&answer),
            Output::Table => println!("submitted {}", submitted.id),
        }
        return Ok(0);
    }
    if args.gw.output == Output::Table {
        println!("submitted {}", submitted.id);
    }
    let name = get_job(&gw, &submitted.id).await?.1.name;
    follow::follow_events(&gw, &submitted.id, &mut Progress::live(&name)).await?;
    finish(&gw, &submitted.id, args.gw.output).await
}

async fn get_job(gw: &Gateway, id: &str) -> anyhow::Result<(Value, Job)> {
    let value = gw.json(gw.request(Method::GET, &["v1", "jobs", id], false)).await?;
    Ok((value.clone(), typed(value)?))
}

/// Prints the ended job and returns its exit status.
async fn finish(gw: &Gateway, id: &str, output: Output) -> anyhow::Result<i32> {
    let (value, job) = get_job(gw, id).await?;
    match output {
        Output::Json => print_json(&value),
        Output::Table => println!("{}", output::final_line(&job)),
    }
    if !output::is_terminal(&job.state) {
        anyhow::bail!("job {id} has not ended (state {})", job.state);
    }
    Ok(output::exit_status(&job))
}

async fn jobs(args: JobsArgs) -> anyhow::Result<i32> {
    let gw = connect(&args.gw)?;
    let out = args.gw.output;
    match args.command {
        JobsCommand::List { state, label, limit, cursor, all } => {
            let mut query: Vec<(&str, String)> = state.into_iter().map(|s| ("state", s)).collect();
            query.extend(label.into_iter().map(|l| ("label", l)));
            query.extend(limit.map(|n| ("limit", n.to_string())));
            list_jobs(&gw, query, cursor, all, out).await?;
        }
        JobsCommand::Get { id } => {
            let (value, job) = get_job(&gw, &id).await?;
            print_job(out, &value, &job);
        }
        JobsCommand::Cancel { id, reason } => {
            let mut rb = gw.request(Method::POST, &["v1", "jobs", &id, "cancel"], false);
            if let Some(reason) = reason {
                rb = rb.json(&CancelRequest { reason });
            }
            let value = gw.json(rb).await?;
            let job: Job = typed(value.clone())?;
            print_job(out, &value, &job);
        }
        JobsCommand::Logs { id, follow } => {
            let complete = follow::stream_logs(&gw, &id, follow).await?;
            if follow && complete {
                let job = get_job(&gw, &id).await?.1;
                if !output::is_terminal(&job.state) {
                    anyhow::bail!("the output stream of job {id} ended before the job did (state {})", job.state);
                }
                return Ok(output::exit_status(&job));
            }
        }
        JobsCommand::Explain { id } => {
            let value = gw.json(gw.request(Method::GET, &["v1", "jobs", &id, "placement"], false)).await?;
            match out {
                Output::Json => print_json(&value),
                Output::Table => {
                    let decision: crate::placement::engine::Decision = typed(value)?;
                    print!("{}", explain::decision_table(&decision));
                }
            }
        }
        JobsCommand::Outputs { id, download } => outputs::outputs(&gw, &id, download, out).await?,
        JobsCommand::Events { id } => {
            follow::follow_events(&gw, &id, &mut Progress::Stdout { json: out == Output::Json }).await?;
        }
    }
    Ok(0)
}

/// One page of jobs from `cursor` on, or every page with `all` (printed as one list).
async fn list_jobs(
    gw: &Gateway,
    query: Vec<(&str, String)>,
    mut cursor: Option<String>,
    all: bool,
    out: Output,
) -> anyhow::Result<()> {
    let mut pages: Vec<Value> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        let mut q = query.clone();
        q.extend(cursor.clone().map(|c| ("cursor", c)));
        let page = gw.json(gw.request(Method::GET, &["v1", "jobs"], false).query(&q)).await?;
        let list: JobList = typed(page.clone())?;
        jobs.extend(list.jobs);
        pages.push(page);
        let next = list.next_cursor.filter(|c| !c.is_empty());
        if next.is_some() && next == cursor {
            anyhow::bail!("the gateway returned the same page cursor twice");
        }
        cursor = next;
        if !all || cursor.is_none() {
            break;
        }
    }
    match out {
        Output::Json if pages.len() == 1 => print_json(&pages[0]),
        Output::Json => {
            let jobs: Vec<Value> = pages
                .into_iter()
                .flat_map(|mut page| match page["jobs"].take() {
                    Value::Array(jobs) => jobs,
                    _ => Vec::new(),
                })
                .collect();
            print_json(&serde_json::json!({ "jobs": jobs, "next_cursor": null }));
        }
        Output::Table => {
            print!("{}", output::jobs_table(&jobs, SystemTime::now()));
            if let Some(next) = cursor {
                eprintln!("more jobs: --cursor {next}, or --all");
            }
        }
    }
    Ok(())
}

fn print_job(out: Output, value: &Value, job: &Job) {
    match out {
        Output::Json => print_json(value),
        Output::Table => print!("{}", output::job_details(job)),
    }
}

async fn agents(args: AgentsArgs) -> anyhow::Result<i32> {
    let gw = connect(&args.gw)?;
    let out = args.gw.output;
    let (value, agent) = match &args.command {
        AgentsCommand::List => {
            let value = gw.json(gw.request(Method::GET, &["v1", "agents"], false)).await?;
            match out {
                Output::Json => print_json(&value),
                Output::Table => print!("{}", output::agents_table(&typed::<AgentList>(value)?.agents)),
            }
            return Ok(0);
        }
        AgentsCommand::Get { id } => {
            let (site, node) = id.split_once('/').expect("checked by the parser");
            let value = gw.json(gw.request(Method::GET, &["v1", "agents", site, node], false)).await?;
            (value.clone(), typed::<Agent>(value)?)
        }
        AgentsCommand::Drain { id } | AgentsCommand::Undrain { id } => {
            let action = if matches!(args.command, AgentsCommand::Drain { .. }) { "drain" } else { "undrain" };
            let (site, node) = id.split_once('/').expect("checked by the parser");
            let value = gw.json(gw.request(Method::POST, &["v1", "agents", site, node, action], false)).await?;
            (value.clone(), typed::<Agent>(value)?)
        }
    };
    match out {
        Output::Json => print_json(&value),
        Output::Table => print!("{}", output::agent_details(&agent)),
    }
    Ok(0)
}
