//! `hybroker admin …`: an operator's client of the broker's job service, over mutual TLS with an
//! admin certificate. (Tenants use the gateway's HTTP API and its CLI, which arrive with their own
//! issue.)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::client::output;
use crate::model::identity::Role;
use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, SpecFormat};
use crate::tls::{self, TlsPaths};

#[derive(Args)]
pub struct AdminArgs {
    #[command(flatten)]
    conn: BrokerConn,
    #[command(subcommand)]
    command: AdminCommand,
}

/// How an operator reaches the broker: its address and an admin certificate.
#[derive(Args)]
pub struct BrokerConn {
    /// The broker's gRPC address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    broker: String,
    /// CA certificate that signed the broker's certificate.
    #[arg(long, default_value = "pki/ca.pem")]
    ca_cert: PathBuf,
    /// An admin-role certificate and its key.
    #[arg(long, default_value = "pki/admin.pem")]
    cert: PathBuf,
    #[arg(long, default_value = "pki/admin-key.pem")]
    key: PathBuf,
}

impl BrokerConn {
    async fn channel(self) -> anyhow::Result<Channel> {
        tls::install_crypto_provider();
        let paths = TlsPaths { ca_cert: self.ca_cert, cert: self.cert, key: self.key };
        let me = tls::identity_of_cert_file(&paths.cert)?;
        let config = tls::client_config(&paths, &me.trust_domain, Role::Broker)?;
        Ok(tls::connect(&self.broker, config, None).await?)
    }
}

#[derive(Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    conn: BrokerConn,
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Make a new API key for a tenant declared in the broker config; the key is printed once.
    Add { tenant: String },
    /// List keys (id, tenant, created, last used, revoked); never the keys themselves.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Revoke a key: it fails from the next request on.
    Revoke { key_id: String },
}

pub async fn tenants(args: TenantsArgs) -> anyhow::Result<i32> {
    let mut client = AdminServiceClient::new(args.conn.channel().await?);
    let explain = |s: tonic::Status| anyhow::anyhow!(tls::explain_status(&s));
    match args.command {
        TenantsCommand::Add { tenant } => {
            let added = client.add_key(proto::AddKeyRequest { tenant }).await.map_err(explain)?.into_inner();
            let info = added.info.unwrap_or_default();
            println!("tenant:  {}", info.tenant);
            println!("key id:  {}", info.key_id);
            println!("key:     {}", added.key);
            eprintln!("the key is shown only now; give it to the tenant (HYBROKER_TOKEN) and keep it secret");
        }
        TenantsCommand::List { tenant } => {
            let keys = client.list_keys(proto::ListKeysRequest { tenant }).await.map_err(explain)?.into_inner().keys;
            println!("{:<26} {:<16} {:<22} {:<22} STATUS", "KEY ID", "TENANT", "CREATED", "LAST USED");
            for k in keys {
                println!(
                    "{:<26} {:<16} {:<22} {:<22} {}",
                    k.key_id,
                    k.tenant,
                    rfc3339(k.created_at_ms),
                    if k.last_used_ms == 0 { "never".to_string() } else { rfc3339(k.last_used_ms) },
                    if k.revoked { "revoked" } else { "active" }
                );
            }
        }
        TenantsCommand::Revoke { key_id } => {
            let k = client.revoke_key(proto::RevokeKeyRequest { key_id }).await.map_err(explain)?.into_inner();
            println!("revoked key {} of tenant {}", k.key_id, k.tenant);
        }
    }
    Ok(0)
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Submit a job spec (YAML or JSON); with --wait, follow it and exit with its result.
    Submit {
        file: PathBuf,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Show one job.
    Get { id: String },
    /// List jobs, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job (kills its process group on the agent).
    Cancel { id: String },
    /// Print the output tail the broker keeps for the job's latest attempt.
    Logs { id: String },
    /// Show connected agents and their GPUs.
    Agents,
}

pub async fn run(args: AdminArgs) -> anyhow::Result<i32> {
    let mut client = JobServiceClient::new(args.conn.channel().await?);
    let explain = |s: tonic::Status| anyhow::anyhow!(tls::explain_status(&s));
    match args.command {
        AdminCommand::Submit { file, wait, tenant, idempotency_key } => {
            let spec = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let format =
                if file.extension().is_some_and(|e| e == "json") { SpecFormat::Json } else { SpecFormat::Yaml };
            let request = proto::SubmitRequest { spec, format: format.into(), idempotency_key, tenant };
            let id = client.submit(request).await.map_err(explain)?.into_inner().job_id;
            println!("submitted {id}");
            if wait {
                let job = follow(&mut client, &id).await?;
                print_job(&job);
                return Ok(if job.state == "succeeded" { 0 } else { 1 });
            }
        }
        AdminCommand::Get { id } => {
            let job = client.get(proto::GetJobRequest { job_id: id, tenant: String::new() }).await.map_err(explain)?;
            print_job(&job.into_inner());
        }
        AdminCommand::List { limit } => {
            let jobs = client.list(proto::ListJobsRequest { limit, ..Default::default() }).await.map_err(explain)?;
            println!("{:<38} {:<24} {:<10} {:<10} AGENT", "ID", "NAME", "STATE", "TENANT");
            for j in jobs.into_inner().jobs {
                println!("{:<38} {:<24} {:<10} {:<10} {}", j.id, j.name, j.state, j.tenant, j.agent);
            }
        }
        AdminCommand::Cancel { id } => {
            let job =
                client.cancel(proto::CancelJobRequest { job_id: id, ..Default::default() }).await.map_err(explain)?;
            print_job(&job.into_inner());
        }
        AdminCommand::Logs { id } => {
            let logs = client.logs(proto::LogsRequest { job_id: id, ..Default::default() }).await.map_err(explain)?;
            let logs = logs.into_inner();
            if logs.truncated {
                eprintln!("(older output was dropped; the agent's work directory keeps all of it)");
            }
            print!("{}", String::from_utf8_lossy(&logs.output));
        }
        AdminCommand::Agents => {
            let agents = client.list_agents(proto::ListAgentsRequest {}).await.map_err(explain)?.into_inner().agents;
            for agent in agents {
                println!("{}", output::agent_details(&agent.into()));
            }
        }
    }
    Ok(0)
}

/// Prints each event until the job ends; returns the final job.
async fn follow(client: &mut JobServiceClient<Channel>, id: &str) -> anyhow::Result<proto::Job> {
    let request = proto::WatchJobRequest { job_id: id.to_string(), tenant: String::new(), after_seq: 0 };
    let mut events = client.watch(request).await?.into_inner();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|s| anyhow::anyhow!(tls::explain_status(&s)))?;
        println!("  {:<10} {}", ev.state, ev.reason);
    }
    let job = client.get(proto::GetJobRequest { job_id: id.to_string(), tenant: String::new() }).await?.into_inner();
    if !["succeeded", "failed", "cancelled"].contains(&job.state.as_str()) {
        bail!("the watch of job {id} ended while it is {}", job.state);
    }
    Ok(job)
}

fn print_job(j: &proto::Job) {
    let exit = j.exit_code.map_or("-".to_string(), |c| c.to_string());
    println!("job {} ({})", j.id, j.name);
    println!("  state {}  attempts {}/{}  exit code {exit}", j.state, j.attempts, j.max_attempts);
    println!("  tenant {}  site {}  agent {}", j.tenant, j.site, j.agent);
    println!("  why: {}", j.reason);
    let updated = std::time::UNIX_EPOCH + Duration::from_millis(j.updated_at_ms.max(0) as u64);
    println!("  updated {}", humantime::format_rfc3339_seconds(updated));
}
