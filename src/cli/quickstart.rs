//! `hybroker quickstart`: a fresh PKI, a broker and two agents with simulated GPUs in one process,
//! the sample jobs from `examples/` submitted through the real mTLS job service, and a summary on
//! stdout. Logs go to stderr.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::config::{
    AgentConfig, AgentSection, BrokerConfig, BrokerSection, LeaseSection, LimitSection, ReconnectSection, StoreSection,
    TenantConfig,
};
use crate::model::identity::Role;
use crate::pki::{self, IssueRequest};
use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, SpecFormat};
use crate::tls::{self, TlsPaths};
use crate::{agent, broker};

/// The sample jobs, compiled in so the quickstart works from any directory.
pub const SAMPLES: &[(&str, &str)] = &[
    ("examples/hello.yaml", include_str!("../../examples/hello.yaml")),
    ("examples/train-h100.yaml", include_str!("../../examples/train-h100.yaml")),
    ("examples/inference-l4.yaml", include_str!("../../examples/inference-l4.yaml")),
];

const TRUST_DOMAIN: &str = "quickstart.hybroker.local";
const DEMO_TENANT: &str = "demo";
const SITE: &str = "lab-sto";
const AGENTS: &[(&str, &str)] = &[("gpu-node-1", "4xH100-80GB"), ("gpu-node-2", "2xL4-24GB")];
const SAMPLE_DEADLINE: Duration = Duration::from_secs(120);

/// Runs the quickstart; returns whether every sample job succeeded.
pub async fn run(state_dir: &Path, once: bool) -> anyhow::Result<bool> {
    tls::install_crypto_provider();
    if state_dir.exists() {
        std::fs::remove_dir_all(state_dir).with_context(|| format!("clearing {}", state_dir.display()))?;
    }
    let pki_dir = state_dir.join("pki");
    pki::init_ca(&pki_dir, TRUST_DOMAIN)?;
    let ca = pki::Ca::load(&pki_dir)?;
    let issue = |role, name: &str, site: Option<&str>| -> anyhow::Result<TlsPaths> {
        let request = IssueRequest {
            role,
            name: name.to_string(),
            site: site.map(str::to_string),
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("an IP")],
            days: 30,
        };
        let (cert, key) = ca.issue_to_dir(&pki_dir, &request)?;
        Ok(TlsPaths { ca_cert: pki_dir.join("ca.pem"), cert, key })
    };

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let broker_config = BrokerConfig {
        broker: BrokerSection { listen: addr },
        tls: issue(Role::Broker, "broker", None)?,
        store: StoreSection { path: state_dir.join("broker.db") },
        leases: LeaseSection { ttl: Duration::from_secs(10).into(), heartbeat_interval: Duration::from_secs(2).into() },
        limits: LimitSection::default(),
        tenants: vec![TenantConfig { name: DEMO_TENANT.into(), admin: true, ..TenantConfig::default_tenant() }],
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let broker_task = tokio::spawn(broker::run(broker_config, listener, stopped(stop_rx.clone())));
    let mut agent_tasks = Vec::new();
    for (node, gpus) in AGENTS {
        let config = AgentConfig {
            agent: AgentSection {
                broker_url: format!("https://{addr}"),
                broker_server_name: None,
                work_dir: state_dir.join("work").join(node),
                run_as: None,
                simulate_gpus: (*gpus).to_string(),
                cpus: 8,
                memory_mib: 32 * 1024,
                labels: Default::default(),
            },
            tls: issue(Role::Agent, node, Some(SITE))?,
            reconnect: ReconnectSection::default(),
        };
        agent_tasks.push(tokio::spawn(agent::run(config, stopped(stop_rx.clone()))));
    }

    let admin = issue(Role::Admin, "quickstart-admin", None)?;
    let client_tls = tls::client_config(&admin, TRUST_DOMAIN, Role::Broker)?;
    let channel = tls::connect(&format!("https://{addr}"), client_tls, None).await?;
    let mut jobs = JobServiceClient::new(channel);

    println!("hybroker quickstart");
    println!("  broker (gRPC, mTLS): https://{addr}");
    println!("  gateway (HTTP API):  not part of this release yet");
    println!("  state directory:     {}", state_dir.display());
    println!("  admin certificate:   {}", admin.cert.display());
    println!(
        "  agents:              {}",
        AGENTS.iter().map(|(n, g)| format!("{SITE}/{n} ({g}, simulated)")).collect::<Vec<_>>().join(", ")
    );
    println!();

    let mut ids = Vec::new();
    for (path, spec) in SAMPLES {
        let request = proto::SubmitRequest {
            spec: spec.as_bytes().to_vec(),
            format: SpecFormat::Yaml.into(),
            idempotency_key: format!("quickstart-{path}"),
            tenant: DEMO_TENANT.into(),
        };
        let response = jobs
            .submit(request)
            .await
            .map_err(|s| anyhow::anyhow!("submitting {path}: {}", tls::explain_status(&s)))?;
        ids.push(response.into_inner().job_id);
    }
    let mut all_ok = true;
    println!("{:<24} {:<8} {:<11} {:<10} {:<38} WHY", "JOB", "SITE", "STATE", "EST. COST", "ID");
    for id in &ids {
        let job = wait_terminal(&mut jobs, id).await?;
        all_ok &= job.state == "succeeded";
        println!("{:<24} {:<8} {:<11} {:<10} {:<38} {}", job.name, job.site, job.state, "n/a", job.id, job.reason);
    }
    println!();
    println!("output of the first job:");
    let logs =
        jobs.logs(proto::LogsRequest { job_id: ids[0].clone(), tenant: String::new(), attempt: 0, offset: 0 }).await?;
    print!("  {}", String::from_utf8_lossy(&logs.into_inner().output).replace('\n', "\n  "));
    println!();
    println!("next steps:");
    println!(
        "  hybroker pki init --dir pki && hybroker pki issue --dir pki --role broker --name broker --dns localhost --ip 127.0.0.1"
    );
    println!("  hybroker broker --config config/broker.toml      # a broker of your own");
    println!("  hybroker agent --config config/agent.toml --simulate-gpus 2xA100-80GB");
    println!("  estimated costs arrive with price-aware placement; `n/a` until then");

    if !once {
        println!();
        println!("serving; press Ctrl-C to stop");
        crate::cli::shutdown_signal().await;
    }
    let _ = stop_tx.send(true);
    for task in agent_tasks {
        task.await??;
    }
    broker_task.await??;
    Ok(all_ok)
}

/// Follows the job's events until it ends; returns the final job.
async fn wait_terminal(jobs: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> anyhow::Result<proto::Job> {
    let request = proto::WatchJobRequest { job_id: id.to_string(), tenant: String::new(), after_seq: 0 };
    let mut events = jobs.watch(request).await?.into_inner();
    let followed = tokio::time::timeout(SAMPLE_DEADLINE, async {
        while let Some(ev) = events.next().await {
            let ev = ev?;
            if ["succeeded", "failed", "cancelled"].contains(&ev.state.as_str()) {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("the watch of job {id} ended early")
    })
    .await;
    match followed {
        Ok(result) => result?,
        Err(_) => bail!("job {id} did not finish within {SAMPLE_DEADLINE:?}"),
    }
    let get = proto::GetJobRequest { job_id: id.to_string(), tenant: String::new() };
    Ok(jobs.get(get).await?.into_inner())
}
