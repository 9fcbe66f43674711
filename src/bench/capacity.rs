//! `hybroker bench capacity`: the two numbers cloud capacity promises that do not need a cloud.
//!
//! - **Packing:** 1,000 queued jobs of mixed shapes (1, 2, 4 or 8 GPUs on `p5.48xlarge`, 1 GPU on
//!   `g6.xlarge`, on-demand and spot) arrive in bursts at one elastic site; after each burst the
//!   scale-up plan runs as the core runs it (every waiting job, the launches so far counted as
//!   empty instances on their way). Printed: instances launched, the fewest per (type, market)
//!   that could hold the jobs (a lower bound), and their ratio (goal ≤ 1.1).
//! - **Scale from zero:** a broker in this process with one elastic site and the `local` provider;
//!   each sample submits a job to the empty site and times submit → launch requested → attempt
//!   leased (the instance's agent started, enrolled with its token and registered) → running, then
//!   waits until the idle instance is retired before the next sample. A real VM adds its boot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{BrokerConfig, LeaseSection, StoreSection, parse_toml};
use crate::model::identity::Role;
use crate::model::price::Market;
use crate::pki::{self, IssueRequest};
use crate::placement::scale::{self, Launching, Room, Want};
use crate::proto::{self, admin_service_client::AdminServiceClient, job_service_client::JobServiceClient};
use crate::tls::{self, TlsPaths};

/// `hybroker bench capacity` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CapacityBenchArgs {
    /// Queued jobs of the packing run.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Bursts they arrive in.
    #[arg(long, default_value_t = 10)]
    pub bursts: usize,
    /// Scale-from-zero samples (0: packing only).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Where the scale-from-zero broker keeps its state (made afresh, removed after).
    #[arg(long, default_value = ".hybroker/bench-capacity")]
    pub state_dir: std::path::PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub async fn run(args: &CapacityBenchArgs) -> anyhow::Result<()> {
    packing(args);
    if args.samples > 0 {
        let result = scale_from_zero(&args.state_dir, args.samples).await;
        let _ = std::fs::remove_dir_all(&args.state_dir);
        result?;
    }
    Ok(())
}

const SHAPES: [(&str, u32, u32, u32); 5] = [
    ("p5.48xlarge", 1, 8, 64),
    ("p5.48xlarge", 2, 16, 128),
    ("p5.48xlarge", 4, 32, 256),
    ("p5.48xlarge", 8, 64, 512),
    ("g6.xlarge", 1, 4, 16),
];

fn packing(args: &CapacityBenchArgs) {
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let names: Vec<String> = (0..args.jobs).map(|i| format!("job-{i}")).collect();
    let mut wants: Vec<Want<'_>> = Vec::new();
    let mut launched: Vec<(String, &'static str, Market)> = Vec::new();
    let burst = args.jobs.div_ceil(args.bursts.max(1));
    let started = Instant::now();
    for chunk in names.chunks(burst) {
        for job in chunk {
            let (ty, gpus, cpus, memory_gib) = SHAPES[rng.usize(..SHAPES.len())];
            let market = if rng.bool() { Market::Spot } else { Market::OnDemand };
            wants.push(Want { job, instance_type: ty, market, gpus, cpus, memory_gib });
        }
        let new: Vec<(&'static str, Market)> = {
            let launching: Vec<Launching<'_>> =
                launched.iter().map(|(id, ty, m)| Launching { launch: id, instance_type: ty, market: *m }).collect();
            let room = Room { instances: u32::MAX, pending: u32::MAX, usd_per_hour: None };
            let plan = scale::plan(&wants, &launching, room, |_, _| 1.0);
            let name = |ty: &str| crate::model::site::instance_type(ty).map_or("?", |t| t.name);
            plan.launches.iter().map(|l| (name(l.instance_type), l.market)).collect()
        };
        for (ty, market) in new {
            launched.push((format!("l{}", launched.len()), ty, market));
        }
    }
    let bound = scale::lower_bound(&wants);
    println!("capacity packing: {} jobs of mixed shapes in {} bursts at one site", args.jobs, args.bursts);
    println!("  instances launched   {:>6}", launched.len());
    println!(
        "  fewest possible      {:>6}   (per type and market: the largest of GPUs, vCPUs, memory over one instance)",
        bound
    );
    println!("  ratio                {:>9.3}   (goal <= 1.1)", launched.len() as f64 / f64::from(bound.max(1)));
    println!("  planning time        {:>6.1} ms for all bursts", started.elapsed().as_secs_f64() * 1e3);
}

const TRUST_DOMAIN: &str = "bench.hybroker.local";

async fn scale_from_zero(dir: &Path, samples: usize) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir, TRUST_DOMAIN)?;
    let ca = pki::Ca::load(&pki_dir)?;
    let issue = |role, name: &str| -> anyhow::Result<TlsPaths> {
        let request = IssueRequest {
            role,
            name: name.into(),
            site: None,
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("an IP")],
            days: 1,
        };
        let (cert, key) = ca.issue_to_dir(&pki_dir, &request)?;
        Ok(TlsPaths { ca_cert: pki_dir.join("ca.pem"), cert, key })
    };
    let snapshot = dir.join("prices.json");
    std::fs::write(&snapshot, include_str!("../../config/prices/snapshot.json"))?;
    let broker_tls = issue(Role::Broker, "broker")?;
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nenroll_listen = \"127.0.0.1:0\"\nca_dir = \"{pki}\"\n\
         [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n[store]\npath = \"{db}\"\n\
         [prices]\nsnapshot = \"{snapshot}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\"]\n[site.capacity]\nprovider = \"local\"\nidle_timeout = \"1s\"\n\
         [site.capacity.local]\nisolation = \"none\"\ndir = \"{instances}\"\n\
         [[dedicated]]\nagent = \"aws-us-east-1/*\"\ntenant = \"default\"\n",
        pki = pki_dir.display(),
        ca = broker_tls.ca_cert.display(),
        cert = broker_tls.cert.display(),
        key = broker_tls.key.display(),
        db = dir.join("broker.db").display(),
        snapshot = snapshot.display(),
        instances = dir.join("instances").display(),
    );
    let mut config: BrokerConfig = parse_toml(&text, Path::new("bench.toml"), [])?;
    config.store = StoreSection { path: dir.join("broker.db") };
    config.leases =
        LeaseSection { ttl: Duration::from_secs(10).into(), heartbeat_interval: Duration::from_secs(2).into() };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let broker = tokio::spawn(crate::broker::run(config, listener, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let admin = issue(Role::Admin, "bench-admin")?;
    let client_tls = tls::client_config(&admin, TRUST_DOMAIN, Role::Broker)?;
    let channel = tls::connect(&format!("https://{addr}"), client_tls, None).await?;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut sites = AdminServiceClient::new(channel);
    let (mut to_launch, mut to_leased, mut to_running, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let spec = format!("name: cold-{i}\ncommand: [\"sleep\", \"0.2\"]\nresources: {{gpus: 1}}\n");
        let submitted = Instant::now();
        let req = proto::SubmitRequest {
            spec: spec.into_bytes(),
            format: proto::SpecFormat::Yaml.into(),
            ..Default::default()
        };
        let id = jobs.submit(req).await.context("submit")?.into_inner().job_id;
        let mut events =
            jobs.watch(proto::WatchJobRequest { job_id: id.clone(), ..Default::default() }).await?.into_inner();
        let (mut launch, mut leased, mut running) = (None, None, None);
        while let Some(ev) = events.message().await? {
            let at = submitted.elapsed();
            if ev.reason.starts_with("launching instance") {
                launch.get_or_insert(at);
            }
            if ev.state == "leased" {
                leased.get_or_insert(at);
            }
            if ev.state == "running" {
                running = Some(at);
                break;
            }
            if ["succeeded", "failed", "cancelled"].contains(&ev.state.as_str()) {
                anyhow::bail!("sample {i} ended {} before running: {}", ev.state, ev.reason);
            }
        }
        let (launch, leased, running) =
            (launch.unwrap_or_default(), leased.unwrap_or_default(), running.unwrap_or_default());
        to_launch.push(launch);
        to_leased.push(leased.saturating_sub(launch));
        to_running.push(running.saturating_sub(leased));
        total.push(running);
        // The next sample starts from zero again: wait until the idle instance is retired.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = sites.list_sites(proto::ListSitesRequest::default()).await?.into_inner().sites;
            if listed.iter().all(|s| s.instances.is_empty()) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the idle instance was not retired within 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = broker.await;
    println!("capacity scale from zero (local provider, {samples} samples, each from an empty site):");
    for (what, values) in [
        ("submit -> launch requested", &mut to_launch),
        ("launch -> attempt leased (agent start, enrol, register)", &mut to_leased),
        ("leased -> running", &mut to_running),
        ("submit -> running (goal p99 <= 2 s)", &mut total),
    ] {
        values.sort();
        let pct = |p: f64| values[((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1];
        println!(
            "  {what:<58} p50 {:>7.0} ms   p99 {:>7.0} ms   max {:>7.0} ms",
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            values.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
