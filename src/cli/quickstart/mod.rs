//! `hybroker quickstart`: a fresh PKI, a broker, two agents with simulated GPUs and the gateway in
//! one process, a demo tenant with an API key, the sample jobs from `examples/` submitted through
//! the gateway's HTTP API, and a summary on stdout. Logs go to stderr and never carry the key.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::client::explain::decision_table;
use super::client::follow::{self, Progress};
use super::client::gateway::Gateway;
use crate::config::{
    AgentConfig, AgentSection, BrokerConfig, BrokerSection, BrokerTarget, DedicatedAgent, GatewayConfig,
    GatewaySection, IsolationSetting, LeaseSection, LimitSection, PricesSection, ReconnectSection, StorageCloud,
    StorageConfig, StoreSection, TenantConfig,
};
use crate::gateway::api::{AgentList, Job};
use crate::metrics::MetricsSection;
use crate::model::capacity::LocalLaunch;
use crate::model::identity::Role;
use crate::pki::{self, IssueRequest};
use crate::placement::engine::Decision;
use crate::proto;
use crate::proto::admin_service_client::AdminServiceClient;
use crate::tls::{self, TlsPaths};
use crate::{agent, broker, gateway};

mod waits;

/// The sample jobs, compiled in so the quickstart works from any directory.
pub const SAMPLES: &[(&str, &str)] = &[
    ("examples/hello.yaml", include_str!("../../../examples/hello.yaml")),
    ("examples/train-h100.yaml", include_str!("../../../examples/train-h100.yaml")),
    ("examples/inference-l4.yaml", include_str!("../../../examples/inference-l4.yaml")),
    ("examples/wordcount.yaml", include_str!("../../../examples/wordcount.yaml")),
    ("examples/finetune-8xh100.yaml", include_str!("../../../examples/finetune-8xh100.yaml")),
];

/// The input objects of `examples/wordcount.yaml`, put into the local store before it starts.
const POEMS: &[(&str, &str)] = &[
    ("fog.txt", "The fog comes\non little cat feet.\n"),
    ("road.txt", "Two roads diverged in a yellow wood,\nAnd sorry I could not travel both\n"),
];

const TRUST_DOMAIN: &str = "quickstart.hybroker.local";
const DEMO_TENANT: &str = "demo";
const SITE: &str = "lab-sto";
/// (site, node, simulated GPUs): the on-prem site's two nodes. The cloud sites start empty: their
/// `local` capacity provider launches an agent process per instance when placement sends work.
const AGENTS: &[(&str, &str, &str)] = &[(SITE, "gpu-node-1", "4xH100-80GB"), (SITE, "gpu-node-2", "2xL4-24GB")];
/// The elastic sites, scaled from zero by the `local` provider.
const CLOUD_SITES: &[&str] = &["aws-us-east-1", "azure-westeurope"];
/// How long the quickstart waits for idle instances to be retired.
const RETIRE_DEADLINE: Duration = Duration::from_secs(60);
/// The sites and residency groups placement chooses among, with the offline price snapshot.
const SITES: &str = r#"
[[residency]]
name = "eu"
aws = ["eu-west-1"]
azure = ["westeurope"]
onprem = ["stockholm"]

[[residency]]
name = "us"
aws = ["us-east-1"]
azure = ["eastus"]

[[site]]
name = "lab-sto"
kind = "onprem"
region = "stockholm"
residency = "eu"
gpu_hour_usd = 2.0
gpu_hour_usd_by_model = { "L4-24GB" = 1.2 }
uplink_usd_per_gb = 0.02

[[site]]
name = "aws-us-east-1"
kind = "aws"
region = "us-east-1"
residency = "us"
instance_types = ["g6.xlarge", "g5.xlarge", "p4de.24xlarge", "p5.48xlarge"]

[site.capacity]
provider = "local"
max_instances = 2
boot_timeout = "30s"
idle_timeout = "3s"

[[site]]
name = "azure-westeurope"
kind = "azure"
region = "westeurope"
residency = "eu"
instance_types = ["Standard_NC24ads_A100_v4", "Standard_ND96isr_H100_v5"]

[site.capacity]
provider = "local"
max_instances = 2
boot_timeout = "30s"
idle_timeout = "3s"
"#;

/// Sites, residency groups and prices, as a broker config's `[[site]]`, `[[residency]]` and `[prices]`.
#[derive(serde::Deserialize)]
struct Sites {
    site: Vec<crate::model::site::Site>,
    residency: Vec<crate::model::site::ResidencyGroup>,
}
const SAMPLE_DEADLINE: Duration = Duration::from_secs(120);
/// The embedded local store's location name (`local://lab/...`).
const LOCATION: &str = "lab";

/// The embedded S3-compatible store over `<state>/objects` on a free loopback port.
fn local_store(dir: &Path) -> StorageConfig {
    StorageConfig {
        name: LOCATION.into(),
        cloud: StorageCloud::Local,
        region: "onprem".into(),
        residency: "eu".into(),
        bucket: None,
        account: None,
        container: None,
        endpoint: None,
        profile: None,
        account_key_file: None,
        account_key_env: None,
        dir: Some(dir.to_path_buf()),
        listen: "127.0.0.1:0".parse().expect("an address"),
    }
}

/// Runs the quickstart; returns whether every sample job succeeded.
/// Runs the quickstart in `state_dir` (made afresh); `metrics` is the `[metrics]` of its
/// `--config`: one endpoint for all its services, which share the process's registry.
pub async fn run(state_dir: &Path, once: bool, mut metrics: MetricsSection) -> anyhow::Result<bool> {
    tls::install_crypto_provider();
    let _lock = lock_state(state_dir)?;
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

    let objects = state_dir.join("objects");
    let poems = objects.join(LOCATION).join(DEMO_TENANT).join("datasets/poems");
    std::fs::create_dir_all(&poems)?;
    for (name, text) in POEMS {
        std::fs::write(poems.join(name), text)?;
    }

    let mut sites: Sites = toml::from_str(SITES).expect("the quickstart's sites parse");
    let prices_file = state_dir.join("prices-snapshot.json");
    std::fs::write(&prices_file, include_str!("../../../config/prices/snapshot.json"))?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Without a sandbox the agents run unisolated, which the broker accepts only for nodes its config
    // dedicates to one tenant: here, the demo tenant.
    let isolation = quickstart_isolation(state_dir);
    let dedicated = match isolation {
        IsolationSetting::None => AGENTS
            .iter()
            .map(|(site, node, _)| format!("{site}/{node}"))
            .chain(CLOUD_SITES.iter().map(|site| format!("{site}/*")))
            .map(|agent| DedicatedAgent { agent, tenant: DEMO_TENANT.into() })
            .collect(),
        _ => Vec::new(),
    };
    for site in &mut sites.site {
        if let Some(capacity) = &mut site.capacity {
            capacity.local = Some(LocalLaunch {
                binary: None,
                dir: Some(state_dir.join("instances")),
                isolation: if isolation == IsolationSetting::None { "none" } else { "auto" }.into(),
            });
        }
    }
    let metrics_addr_file =
        metrics.listen.map(|_| metrics.addr_file.get_or_insert(state_dir.join("metrics.addr")).clone());
    let mut broker_section = BrokerSection::listening_on(addr);
    broker_section.enroll_listen = Some("127.0.0.1:0".parse().expect("an address"));
    broker_section.ca_dir = Some(pki_dir.clone());
    let broker_config = BrokerConfig {
        broker: broker_section,
        tls: issue(Role::Broker, "broker", None)?,
        store: StoreSection { path: state_dir.join("broker.db") },
        secrets: Default::default(),
        leases: LeaseSection { ttl: Duration::from_secs(10).into(), heartbeat_interval: Duration::from_secs(2).into() },
        limits: LimitSection::default(),
        tenants: vec![TenantConfig {
            name: DEMO_TENANT.into(),
            admin: true,
            storage: vec![format!("local://{LOCATION}/{DEMO_TENANT}/")],
            ..TenantConfig::default_tenant()
        }],
        dedicated,
        storage: vec![local_store(&objects)],
        staging: Default::default(),
        sites: sites.site,
        residency: sites.residency,
        placement: Default::default(),
        prices: PricesSection { snapshot: prices_file, ..PricesSection::default() },
        metrics,
        telemetry: Default::default(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let broker_task = tokio::spawn(broker::run(broker_config, listener, stopped(stop_rx.clone())));
    let mut agent_tasks = Vec::new();
    for (site, node, gpus) in AGENTS {
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
                join_token_file: None,
                node_name: None,
                cloud: None,
                metadata_url: None,
                spot_poll: None,
            },
            tls: issue(Role::Agent, node, Some(site))?,
            reconnect: ReconnectSection::default(),
            staging: Default::default(),
            sandbox: crate::config::SandboxSection { isolation, ..Default::default() },
            metrics: Default::default(),
            telemetry: Default::default(),
            source: None,
        };
        agent_tasks.push(tokio::spawn(agent::run(config, stopped(stop_rx.clone()))));
    }

    let admin = issue(Role::Admin, "quickstart-admin", None)?;
    let client_tls = tls::client_config(&admin, TRUST_DOMAIN, Role::Broker)?;
    let channel = tls::connect(&format!("https://{addr}"), client_tls, None).await?;
    let mut demo_admin = AdminServiceClient::new(channel);
    let demo = demo_admin
        .add_key(proto::AddKeyRequest { tenant: DEMO_TENANT.into() })
        .await
        .map_err(|s| anyhow::anyhow!("making the demo key: {}", tls::explain_status(&s)))?
        .into_inner()
        .key;

    let gateway_listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway_url = format!("http://{}", gateway_listener.local_addr()?);
    let gateway_config = GatewayConfig {
        gateway: GatewaySection {
            listen: gateway_listener.local_addr()?,
            public_cert: None,
            public_key: None,
            plain_http: true,
            max_body_bytes: 1 << 20,
            client_traces: Default::default(),
            ..Default::default()
        },
        broker: BrokerTarget { url: format!("https://{addr}"), server_name: None },
        tls: issue(Role::Gateway, "gateway", None)?,
        metrics: Default::default(),
        telemetry: Default::default(),
    };
    let gateway_task = tokio::spawn(gateway::run(gateway_config, gateway_listener, stopped(stop_rx.clone())));
    let gw = Gateway::new(&gateway_url, Some(&demo), None)?;
    // Placement sees only connected agents: wait for all of them, so the samples' decisions are the
    // same on every run.
    let registered = async {
        loop {
            let answer = gw.json(gw.request(Method::GET, &["v1", "agents"], false)).await;
            if let Ok(list) = answer.and_then(|v| Ok(serde_json::from_value::<AgentList>(v)?))
                && list.agents.iter().filter(|a| a.connected).count() == AGENTS.len()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(SAMPLE_DEADLINE, registered)
        .await
        .map_err(|_| anyhow::anyhow!("the quickstart's agents did not all connect within {SAMPLE_DEADLINE:?}"))?;

    println!("hybroker quickstart");
    println!("  gateway (HTTP API):  {gateway_url}   (OpenAPI: {gateway_url}/openapi.json)");
    println!("  demo tenant key:     {demo}");
    println!("  broker (gRPC, mTLS): https://{addr}");
    println!("  state directory:     {}", state_dir.display());
    println!("  jobs run:            {}", isolation_line(isolation));
    println!(
        "  agents:              {}",
        AGENTS.iter().map(|(s, n, g)| format!("{s}/{n} ({g}, simulated)")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  cloud sites:         {} (no agents yet: the local capacity provider launches one per instance on \
         demand, as a VM would enrol, and retires it after 3s idle)",
        CLOUD_SITES.join(", ")
    );
    println!();

    let mut ids = Vec::new();
    for (path, yaml) in SAMPLES {
        ids.push(waits::submit(&gw, path, yaml).await?);
    }
    let mut all_ok = true;
    let mut outputs = Vec::new();
    let mut explanations = Vec::new();
    println!("{:<16} {:<17} {:<10} {:<10} {:<38} WHY", "JOB", "SITE", "STATE", "EST. COST", "ID");
    for id in &ids {
        tokio::time::timeout(SAMPLE_DEADLINE, follow::follow_events(&gw, id, &mut Progress::Quiet))
            .await
            .map_err(|_| anyhow::anyhow!("job {id} did not finish within {SAMPLE_DEADLINE:?}"))??;
        let job: Job = serde_json::from_value(gw.json(gw.request(Method::GET, &["v1", "jobs", id], false)).await?)?;
        all_ok &= job.state == "succeeded";
        outputs.extend(job.outputs.iter().map(|uri| (job.name.clone(), job.id.clone(), uri.clone())));
        let site = job.site.clone().unwrap_or_default();
        let placement = gw.json(gw.request(Method::GET, &["v1", "jobs", id, "placement"], false)).await?;
        let decision: Decision = serde_json::from_value(placement).context("placement decision")?;
        let cost = decision.chosen.as_ref().map_or("-".into(), |c| format!("${:.4}", c.offer.cost.total_usd));
        println!("{:<16} {:<17} {:<10} {:<10} {:<38} {}", job.name, site, job.state, cost, job.id, job.reason);
        explanations.push((job.name, decision));
    }
    println!();
    all_ok &= waits::show(&gw, SAMPLE_DEADLINE).await?;
    let mut admin = demo_admin;
    print_capacity(&mut admin).await?;
    println!();
    for (name, decision) in &explanations {
        println!("why {name} ran where it did (hybroker jobs explain):");
        for line in decision_table(decision).lines() {
            println!("  {line}");
        }
        println!();
    }
    println!();
    let logs = gw.send(gw.request(Method::GET, &["v1", "jobs", &ids[0], "logs"], false)).await?.text().await?;
    println!("output of {}:", SAMPLES[0].0);
    for line in logs.lines() {
        println!("  {line}");
    }
    println!();
    for (name, id, uri) in &outputs {
        // local://lab/<key prefix> is <state>/objects/lab/<key prefix> on disk.
        let on_disk = objects.join(uri.strip_prefix("local://").unwrap_or(uri));
        println!("outputs of {name} ({id}):");
        println!("  {uri}");
        println!("  on disk: {}", on_disk.display());
        if let Ok(text) = std::fs::read_to_string(on_disk.join("counts.txt")) {
            for line in text.lines() {
                println!("    counts.txt: {line}");
            }
        }
    }
    println!("  (inputs were local://{LOCATION}/{DEMO_TENANT}/datasets/poems/ = {})", poems.display());
    println!();
    println!("try next (in another terminal, while this one serves; `hybroker` is target/release/hybroker,");
    println!("or on your PATH after `cargo install --locked --path .`):");
    println!("  export HYBROKER_GATEWAY={gateway_url} HYBROKER_TOKEN={demo}");
    println!("  hybroker jobs list");
    println!("  hybroker jobs events {}       # every transition, where it ran and why", ids[1]);
    println!("  hybroker jobs explain {}      # the placement decision: every site, its cost or why not", ids[2]);
    println!("  hybroker submit examples/train-h100.yaml --follow");
    println!("  hybroker jobs logs {}", ids[1]);
    if let Some((name, id, _)) = outputs.first() {
        println!("  hybroker jobs outputs {id} --download {name}-results   # the outputs, checked (MD5), resumable");
    }
    println!("  hybroker data ls local://{LOCATION}/{DEMO_TENANT}/datasets/   # your data; data put|get move it");
    println!("  hybroker agents list");
    println!("  curl -H \"Authorization: Bearer $HYBROKER_TOKEN\" $HYBROKER_GATEWAY/v1/jobs");
    println!("(prices: the offline snapshot config/prices/snapshot.json; turn on live feeds with [prices] azure/aws)");

    if let Some(path) = &metrics_addr_file {
        let addr =
            std::fs::read_to_string(path).with_context(|| format!("the metrics address in {}", path.display()))?;
        println!(
            "metrics: http://{addr}/metrics (broker, gateway and agents; Prometheus service discovery at /sd/agents)"
        );
    }
    if !once {
        println!();
        println!("serving; press Ctrl-C to stop");
        crate::cli::shutdown_signal().await;
    }
    let _ = stop_tx.send(true);
    gateway_task.await??;
    for task in agent_tasks {
        task.await??;
    }
    broker_task.await??;
    Ok(all_ok)
}

/// Holds `<state dir>.lock`, beside the state directory, for the quickstart's life: a second
/// quickstart on the same state directory refuses, rather than wiping a running one's state.
fn lock_state(state_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let name = state_dir.file_name().map_or_else(|| "quickstart".into(), |n| n.to_string_lossy().into_owned());
    let path = state_dir.with_file_name(format!("{name}.lock"));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "{} is in use by another quickstart (it holds {}: {e}); stop that one first, or give this one another \
             --state-dir",
            state_dir.display(),
            path.display()
        )
    })
}

/// What the cloud sites launched for the samples, then their retirement once idle.
async fn print_capacity(admin: &mut AdminServiceClient<tonic::transport::Channel>) -> anyhow::Result<()> {
    let list = |admin: &mut AdminServiceClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        async move {
            let sites = admin.list_sites(proto::ListSitesRequest::default()).await;
            sites
                .map(|r| r.into_inner().sites)
                .map_err(|s| anyhow::anyhow!("listing sites: {}", tls::explain_status(&s)))
        }
    };
    println!("cloud capacity (hybroker sites list):");
    let mut launched = Vec::new();
    for site in list(admin).await? {
        for i in &site.instances {
            println!(
                "  {:<17} {} {:<22} {:<14} {:<9} {:<9} ${:.2}/h  agent {}",
                site.site, i.launch_id, i.instance_id, i.instance_type, i.market, i.state, i.usd_per_hour, i.agent
            );
            launched.push(i.launch_id.clone());
        }
    }
    if launched.is_empty() {
        println!("  (no instance was launched: every sample ran on-prem)");
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        let alive: usize = list(admin).await?.iter().map(|s| s.instances.len()).sum();
        if alive == 0 {
            println!(
                "  retired: {} instance(s) idle past idle_timeout were drained, terminated, revoked and removed ({:.1}s)",
                launched.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > RETIRE_DEADLINE {
            anyhow::bail!("the launched instances were not retired within {RETIRE_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the quickstart's agents can sandbox their attempts (root: the full sandbox; else user
/// namespaces); `none` when neither works here.
fn quickstart_isolation(state_dir: &Path) -> IsolationSetting {
    let probe_root = state_dir.join("work").join(".isolation-probe");
    let options = crate::agent::sandbox::SandboxOptions {
        settings: crate::config::SandboxSection::default(),
        work_root: probe_root.clone(),
        hide: Vec::new(),
        agent: "quickstart-probe".into(),
        init_program: std::env::current_exe().unwrap_or_else(|_| "hybroker".into()),
    };
    let started = tokio::task::block_in_place(|| crate::agent::sandbox::Sandbox::start(options));
    let _ = std::fs::remove_dir_all(&probe_root);
    match started {
        Ok(_) => IsolationSetting::Auto,
        Err(e) => {
            tracing::debug!(error = %e, "no sandbox for the quickstart's jobs");
            IsolationSetting::None
        }
    }
}

fn isolation_line(isolation: IsolationSetting) -> &'static str {
    match isolation {
        IsolationSetting::Auto if nix::unistd::geteuid().is_root() => {
            "sandboxed (own UID, namespaces, cgroup limits, device gate)"
        }
        IsolationSetting::Auto => "sandboxed in user namespaces (not root: no per-job UID, no cgroup limits)",
        IsolationSetting::None => {
            "UNISOLATED (isolation = \"none\": no sandbox possible here; the agents are for the demo tenant only)"
        }
    }
}
