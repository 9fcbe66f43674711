//! `hybroker bench`: a broker on the embedded store as a child process (so it can be killed), N
//! simulated agents over real mutual-TLS streams (one certificate and one connection each), and M
//! jobs through the real job service, flat out or at an offered rate. It measures sustained
//! submit→complete throughput, submit→agent latency, the broker's CPU and memory, the bench's
//! memory per agent, and optionally a reconnect storm, a `kill -9` of the broker mid-load, and
//! certificate renewal of the whole fleet, spread over a window or all at once (`renew`).
//!
//! [`run`] goes step by step: PKI and broker, the fleet, a renewal storm, the jobs (and the kill,
//! and spread renewals), the storm, the check against the job service, the report. `setup` makes
//! the PKI (an issuing CA, so the broker signs renewals) and the broker config,
//! `process` runs the broker child and reads its `/proc` figures, `agents` simulates the fleet,
//! `driver` submits the jobs, `record` gathers what agents and driver saw (over one channel, no
//! shared lock) and `report` turns it into the table and the JSON.

mod agents;
pub mod capacity;
mod driver;
pub mod placement;
mod process;
mod record;
mod renew;
mod report;
mod setup;
mod sites;
pub mod staging;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::model::duration::HumanDuration;
use crate::proto::{self, job_service_client::JobServiceClient};
use crate::tls;
use agents::Fleet;
use driver::{Plan, Trouble};
use process::{Broker, own_stats};
use record::{Event, Events, Record};
use renew::RenewKit;
use report::{Baseline, BrokerUsage, Kill, Latency, Report, Storm};
use sites::SiteLayout;

/// `hybroker bench`'s flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Another benchmark instead of the broker's.
    #[command(subcommand)]
    pub other: Option<BenchCommand>,
    /// Simulated agents, each with its own certificate and TLS connection.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Jobs to submit.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Offered load in jobs per second; 0 submits flat out.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Jobs per SubmitBatch call.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Sites, with placement on: the first 4 on-prem (the agents spread over them), the rest
    /// elastic cloud sites priced from a snapshot the bench writes (`--sites 54`: 4 on-prem, 50
    /// cloud). 0: no sites, agents are bound by first fit.
    #[arg(long, default_value_t = 0)]
    pub sites: usize,
    /// CPUs each agent reports; every job asks for 1 CPU and no GPU.
    #[arg(long, default_value_t = 64)]
    pub cpus_per_agent: u32,
    /// After the run, every agent drops its connection at once and reconnects.
    #[arg(long)]
    pub storm: bool,
    /// `kill -9` the broker when half the jobs are acknowledged, restart it on the same port.
    #[arg(long, conflicts_with = "restart_broker")]
    pub kill_broker: bool,
    /// `kill -TERM` the broker when half the jobs are acknowledged (a clean stop: agents are told
    /// to reconnect), restart it on the same port; reports the time to exit and until all agents
    /// are back.
    #[arg(long)]
    pub restart_broker: bool,
    /// Where the PKI, config, database, logs and result go; default: a fresh temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The JSON result; default: `bench-result.json` in the state directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The broker's lease TTL (agents heartbeat every third of it).
    #[arg(long, default_value = "30s", value_parser = HumanDuration::parse)]
    pub lease_ttl: HumanDuration,
    /// Give up (and exit 1) when the jobs have not all completed this long after the first submit.
    #[arg(long, default_value = "10m", value_parser = HumanDuration::parse)]
    pub deadline: HumanDuration,
    /// Every agent renews its certificate once on its stream, at a uniformly random point of
    /// `--renew-window` from when the jobs start, while they run.
    #[arg(long, conflicts_with = "renew_storm")]
    pub renew: bool,
    /// The window `--renew` spreads the renewals over.
    #[arg(long, default_value = "10m", value_parser = HumanDuration::parse, requires = "renew")]
    pub renew_window: HumanDuration,
    /// Every agent renews its certificate at once, after the fleet registered and before the jobs.
    #[arg(long)]
    pub renew_storm: bool,
    /// An earlier result (`bench-result.json`, best a run without renewals on the same machine):
    /// the report compares this run's jobs/s with its.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

/// The benchmarks other than the broker's (`hybroker bench` alone).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// The agent's stage-in of one big object from the local store against curl of the same URL.
    Staging(staging::StagingArgs),
    /// Decisions per second and decision latency of the placement engine on a synthetic fleet.
    Placement(placement::PlacementBenchArgs),
    /// Cloud capacity: instances launched for 1,000 mixed jobs against the fewest possible, and
    /// submit → running on an empty elastic site with the local provider.
    Capacity(capacity::CapacityBenchArgs),
}

impl BenchArgs {
    /// Refuses flag values the run cannot honour.
    fn validate(&self) -> anyhow::Result<()> {
        if self.agents == 0 || self.jobs == 0 {
            anyhow::bail!("--agents and --jobs must be at least 1");
        }
        if !(1..=10_000).contains(&self.batch) {
            anyhow::bail!("--batch must be 1 to 10000 (the broker's limit per call)");
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            anyhow::bail!("--rate must be 0 (flat out) or a positive number of jobs per second");
        }
        if self.cpus_per_agent == 0 {
            anyhow::bail!("--cpus-per-agent must be at least 1");
        }
        if self.lease_ttl.0 < Duration::from_millis(300) {
            anyhow::bail!("--lease-ttl must be at least 300ms");
        }
        if self.renew && self.renew_window.0 < Duration::from_secs(1) {
            anyhow::bail!("--renew-window must be at least 1s");
        }
        Ok(())
    }
}

/// Raises this process's soft limit on open files to its hard limit (a broker or bench holding
/// thousands of connections needs one descriptor each); returns the new soft limit.
pub fn raise_open_file_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// How long `--restart-broker` waits for the broker to exit after SIGTERM (its grace is 10 s).
const TERM_PATIENCE: Duration = Duration::from_secs(30);
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Longest the fleet may take to (re)connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the benchmark; returns whether every job completed and none was lost. Needs a
/// multi-threaded tokio runtime (certificates are issued on blocking threads).
pub async fn run(args: BenchArgs) -> anyhow::Result<bool> {
    args.validate()?;
    tls::install_crypto_provider();
    let open_files = raise_open_file_limit()?;
    if open_files < args.agents as u64 + 1024 {
        tracing::warn!(open_files, agents = args.agents, "the open-file limit may be too low for this many agents");
    }
    let dir = setup::state_dir(args.state_dir.as_deref())?;
    println!("state directory: {}", dir.display());
    let layout = SiteLayout::new(args.sites);
    let site_of = |i: usize| layout.map_or_else(|| setup::SITE.to_owned(), |l| l.agent_site(i));
    let pki = tokio::task::block_in_place(|| setup::make_pki(&dir, args.agents, &site_of))?;
    println!("issued {} agent certificates in {:.3} s", args.agents, pki.elapsed.as_secs_f64());
    let baseline = args.baseline.as_deref().map(Baseline::read).transpose()?;
    let renewing = args.renew || args.renew_storm;
    let csr_started = Instant::now();
    let csrs = if renewing { tokio::task::block_in_place(|| renew::make_csrs(args.agents, &site_of))? } else { vec![] };
    let csr_seconds = csr_started.elapsed().as_secs_f64();
    if renewing {
        println!("made {} renewal keys and CSRs (the agents' side) in {csr_seconds:.3} s", args.agents);
    }
    let config = setup::write_broker_config(&dir, args.lease_ttl.0, args.jobs, layout)?;
    if let Some(l) = layout {
        println!("placement on: {} on-prem sites (the agents), {} cloud sites", l.onprem, l.cloud);
    }
    let mut broker = Broker::start(&dir, config, &pki.admin).await?;
    let log = dir.join("broker.log");
    println!("broker pid {} listening on {} (log: {})", broker.pid(), broker.addr, log.display());

    let (events, rx) = mpsc::unbounded_channel();
    let mut watch = Watch { rx, rec: Record::default() };
    let rss_before = own_stats().rss_kib;
    let started = Instant::now();
    let kit = RenewKit { ca_pem: pki.ca_pem.clone(), csrs };
    let fleet = Fleet::spawn(broker.url(), pki.agents, &site_of, args.cpus_per_agent, events.clone(), kit);
    let connected = watch.until_registered(args.agents).await;
    let connect_seconds = started.elapsed().as_secs_f64();
    let bench_kib_per_agent = own_stats().rss_kib.saturating_sub(rss_before) as f64 / args.agents as f64;
    println!("{} agents registered in {connect_seconds:.2} s", watch.rec.registered());
    connected?;

    let channel = tls::connect(&broker.url(), pki.admin.clone(), None).await?;
    let mut run = Run { args: &args, broker: &mut broker, fleet: &fleet, admin: &pki.admin, watch: &mut watch };
    let mut renewal = None;
    if args.renew_storm {
        println!("renewal storm: {} agents renew at once", args.agents);
        let started = run.start_renewals(Duration::ZERO);
        renewal = Some(run.finish_renewals(started, csr_seconds, channel.clone()).await?);
    }
    let spread = args.renew.then(|| run.start_renewals(args.renew_window.0));
    let driven = run.drive(channel.clone(), events).await?;
    if let Some(started) = spread {
        println!("waiting for the renewals spread over {}", args.renew_window);
        renewal = Some(run.finish_renewals(started, csr_seconds, channel.clone()).await?);
    }
    let mut storm = if args.storm { Some(run.storm().await?) } else { None };
    if let Some(s) = &mut storm
        && renewal.is_some()
    {
        s.on_renewed_certificates = Some(renew::agents_on_renewed_certificates(channel.clone()).await?);
    }
    // An agent's completion can be a stale attempt's (acknowledged, then refused); give requeued
    // jobs up to a lease and some to finish before counting what never succeeded.
    // Agents' acknowledgements keep arriving meanwhile: fold them in, so `completed` counts them.
    let settle = Instant::now() + args.lease_ttl.0 + Duration::from_secs(10);
    let succeeded = loop {
        while let Ok(event) = watch.rx.try_recv() {
            watch.rec.apply(event);
        }
        let succeeded = succeeded_jobs(channel.clone()).await?;
        let all_succeeded = watch.rec.submitted_ids().all(|id| succeeded.contains_key(id));
        if (all_succeeded && watch.rec.completed() >= watch.rec.submitted()) || Instant::now() >= settle {
            break succeeded;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rec = &watch.rec;
    let lost = rec.submitted_ids().filter(|id| !succeeded.contains_key(*id)).count();
    let mut jobs_per_site = BTreeMap::new();
    for job in succeeded.values() {
        *jobs_per_site.entry(job.site.clone()).or_default() += 1;
    }
    let placed_by_engine = succeeded.values().filter(|j| j.placed).count();
    // More succeeded jobs than acknowledged ones would mean a retried submit made a second job.
    let extra_jobs = succeeded.len().saturating_sub(rec.submitted());
    let mut kill = driven.kill;
    if let Some(k) = &mut kill {
        (k.acknowledged, k.lost, k.completed_twice) = (rec.submitted(), lost, rec.completed_twice());
    }
    let run_seconds = driven.run_seconds;
    let cpu_seconds = driven.cpu_seconds;
    let broker_usage = BrokerUsage {
        cpu_seconds,
        avg_cores: if run_seconds > 0.0 { cpu_seconds / run_seconds } else { 0.0 },
        peak_rss_mib: broker.peak_rss_kib() as f64 / 1024.0,
        rss_after_run_mib: driven.rss_after_run_mib,
    };
    fleet.stop().await;
    broker.stop().await?;

    let completed = rec.completed();
    let latencies = rec.latencies_ms();
    let sustained_jobs_per_second = if run_seconds > 0.0 { completed as f64 / run_seconds } else { 0.0 };
    let baseline = baseline.map(|b| b.compared_with(sustained_jobs_per_second));
    let renewed = renewal.as_ref().is_none_or(|r| r.ok);
    let report = Report {
        agents: args.agents,
        jobs: args.jobs,
        offered_rate: args.rate,
        batch: args.batch,
        cpus_per_agent: args.cpus_per_agent,
        sites: args.sites,
        jobs_per_site,
        placed_by_engine,
        pki_seconds: pki.elapsed.as_secs_f64(),
        connect_seconds,
        bench_kib_per_agent,
        submitted: rec.submitted(),
        completed,
        run_seconds,
        sustained_jobs_per_second,
        latency_ms: Latency::of(&latencies),
        broker: broker_usage,
        failed_submit_calls: driven.trouble.failed_calls.load(Ordering::Relaxed),
        refused_submits: driven.trouble.refused_jobs.load(Ordering::Relaxed),
        lost,
        extra_jobs,
        storm,
        kill,
        renewal,
        baseline,
        ok: lost == 0 && extra_jobs == 0 && completed == args.jobs && renewed,
    };
    report.print();
    let out = args.out.clone().unwrap_or_else(|| dir.join("bench-result.json"));
    report.write(&out)?;
    println!("result: {}", out.display());
    Ok(report.ok)
}

/// The event channel and the record it fills.
struct Watch {
    rx: mpsc::UnboundedReceiver<Event>,
    rec: Record,
}

impl Watch {
    /// Applies events until `n` agents have registered (since the last reset).
    async fn until_registered(&mut self, n: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.reset();
        while self.rec.registered() < n {
            tokio::select! {
                Some(event) = self.rx.recv() => self.rec.apply(event),
                _ = progress.tick() => println!("  {} of {n} agents registered", self.rec.registered()),
                () = tokio::time::sleep_until(deadline) => {
                    anyhow::bail!("only {} of {n} agents registered within {CONNECT_TIMEOUT:?}", self.rec.registered());
                }
            }
        }
        Ok(())
    }
}

/// What the job phase measured.
struct Driven {
    run_seconds: f64,
    cpu_seconds: f64,
    rss_after_run_mib: f64,
    kill: Option<Kill>,
    trouble: Arc<Trouble>,
}

/// The phases that run against a connected fleet.
struct Run<'a> {
    args: &'a BenchArgs,
    broker: &'a mut Broker,
    fleet: &'a Fleet,
    admin: &'a Arc<ClientConfig>,
    watch: &'a mut Watch,
}

impl Run<'_> {
    /// Submits every job and waits until all completed (or the deadline passed), killing and
    /// restarting the broker halfway when asked to.
    async fn drive(&mut self, channel: Channel, events: Events) -> anyhow::Result<Driven> {
        let args = self.args;
        let deadline = Instant::now() + args.deadline.0;
        let run_id = format!("{:x}", fastrand::u64(..));
        let plan = Plan { jobs: args.jobs, rate: args.rate, batch: args.batch, run_id, deadline };
        let trouble = Arc::new(Trouble::default());
        let cpu_start = self.broker.cpu_seconds();
        let mut driver = tokio::spawn(driver::run(plan, channel, events, trouble.clone()));
        let mut driver_done = false;
        let mut kill: Option<(Kill, Instant, u64)> = None;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.reset();
        loop {
            tokio::select! {
                Some(event) = self.watch.rx.recv() => self.watch.rec.apply(event),
                done = &mut driver, if !driver_done => {
                    done?;
                    driver_done = true;
                }
                _ = progress.tick() => {
                    println!("  {} submitted, {} completed", self.watch.rec.submitted(), self.watch.rec.completed());
                }
            }
            let rec = &self.watch.rec;
            if (args.kill_broker || args.restart_broker) && kill.is_none() && rec.submitted() >= args.jobs.div_ceil(2) {
                kill = Some(self.kill(args.restart_broker).await?);
            }
            if let Some((k, at, failures)) = &mut kill
                && k.reregistered_seconds.is_none()
                && self.watch.rec.registered() >= args.agents
            {
                k.reregistered_seconds = Some(at.elapsed().as_secs_f64());
                k.failed_connects = self.fleet.failures() - *failures;
            }
            let rec = &self.watch.rec;
            if driver_done && rec.completed() >= rec.submitted() || Instant::now() > deadline {
                break;
            }
        }
        // The jobs may all be done before every agent is back (they return spread over the
        // broker's reconnect jitter): the time until all are back is still measured.
        if let Some((k, at, failures)) = &mut kill
            && k.reregistered_seconds.is_none()
        {
            self.watch.until_registered(args.agents).await?;
            k.reregistered_seconds = Some(at.elapsed().as_secs_f64());
            k.failed_connects = self.fleet.failures() - *failures;
        }
        let rec = &self.watch.rec;
        let run_seconds = rec.window().map_or(0.0, |(first, last)| last.duration_since(first).as_secs_f64());
        println!("{} of {} jobs completed in {run_seconds:.2} s", rec.completed(), args.jobs);
        Ok(Driven {
            run_seconds,
            cpu_seconds: self.broker.cpu_seconds() - cpu_start,
            rss_after_run_mib: self.broker.stats().rss_kib as f64 / 1024.0,
            kill: kill.map(|(k, _, _)| k),
            trouble,
        })
    }

    /// `kill -9`s the broker (with `graceful`, SIGTERM and its exit awaited), restarts it and waits
    /// until it serves; returns the record so far, when it was stopped and the fleet's failure
    /// count then.
    async fn kill(&mut self, graceful: bool) -> anyhow::Result<(Kill, Instant, u64)> {
        let acknowledged_at_kill = self.watch.rec.submitted();
        let signal = if graceful { "SIGTERM" } else { "kill -9" };
        println!("stopping the broker ({signal}) with {acknowledged_at_kill} jobs acknowledged");
        let failures = self.fleet.failures();
        let at = Instant::now();
        self.watch.rec.reset_registered();
        let exit_seconds = if graceful {
            let exited = self.broker.terminate_and_restart(TERM_PATIENCE).await?;
            println!("broker exited {:.2} s after SIGTERM", exited.as_secs_f64());
            Some(exited.as_secs_f64())
        } else {
            self.broker.kill_and_restart().await?;
            None
        };
        self.broker.wait_serving(self.admin).await?;
        let restart_seconds = at.elapsed().as_secs_f64();
        println!("broker (pid {}) serving again after {restart_seconds:.2} s", self.broker.pid());
        let kill = Kill {
            signal,
            exit_seconds,
            acknowledged_at_kill,
            acknowledged: 0,
            lost: 0,
            completed_twice: 0,
            restart_seconds,
            reregistered_seconds: None,
            failed_connects: 0,
        };
        Ok((kill, at, failures))
    }

    /// Every agent drops its connection at once and reconnects; measures until all are back.
    async fn storm(&mut self) -> anyhow::Result<Storm> {
        let n = self.args.agents;
        println!("reconnect storm: {n} agents drop their connections at once");
        let failures = self.fleet.failures();
        self.watch.rec.reset_registered();
        let at = Instant::now();
        self.fleet.storm();
        self.watch.until_registered(n).await?;
        let reregistered_seconds = at.elapsed().as_secs_f64();
        println!("all {n} agents registered again after {reregistered_seconds:.2} s");
        let failed_connects = self.fleet.failures() - failures;
        Ok(Storm { reregistered_seconds, failed_connects, on_renewed_certificates: None })
    }
}

/// The largest page of jobs the bench reads.
const LIST_PAGE_MAX_BYTES: usize = 256 << 20;

/// Where a succeeded job ran.
struct Succeeded {
    site: String,
    /// Whether it has a placement decision (placement on).
    placed: bool,
}

/// Every succeeded job of the bench tenant by id, from the job service.
async fn succeeded_jobs(channel: Channel) -> anyhow::Result<HashMap<String, Succeeded>> {
    // With placement on, each job carries its decision (every candidate): a page of 1,000 is
    // several MiB, above tonic's default limit of 4 MiB.
    let mut client = JobServiceClient::new(channel).max_decoding_message_size(LIST_PAGE_MAX_BYTES);
    let mut ids = HashMap::new();
    let mut before = String::new();
    loop {
        let request = proto::ListJobsRequest {
            tenant: setup::TENANT.into(),
            states: vec!["succeeded".into()],
            limit: 1000,
            before: before.clone(),
            labels: vec![],
        };
        let page = client.list(request).await?.into_inner();
        ids.extend(
            page.jobs.into_iter().map(|j| (j.id, Succeeded { site: j.site, placed: !j.placement_json.is_empty() })),
        );
        if page.next_cursor.is_empty() {
            return Ok(ids);
        }
        before = page.next_cursor;
    }
}
