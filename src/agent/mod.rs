//! The agent: runs on every GPU node, dials out to the broker (so it works behind NAT), reports its
//! inventory, runs the attempts it is assigned and reports every transition. It keeps running its
//! attempts while the broker is away, and reports them again when it reconnects.

mod attempt;
mod checkpoint;
pub mod enroll;
pub mod executor;
pub mod gpu;
pub mod metadata;
mod renew;
pub mod sandbox;
mod session;
mod spot;
pub mod staging;
mod urls;
mod work_files;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::config::agent::{AgentConfig, AgentStagingSection};
use crate::model::agent::{AttemptReport, Inventory, Phase};
use crate::model::data::StagingStats;
use crate::model::identity::{Identity, Role};
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::tls;
use executor::{Launch, Outcome};
use gpu::GpuProbe;
use metadata::SpotNotice;

/// What an attempt's task tells the agent.
#[derive(Debug)]
enum AttemptEvent {
    Output { job_id: String, epoch: u64, data: Vec<u8> },
    Progress { job_id: String, epoch: u64, progress: staging::Progress },
    Ended { job_id: String, epoch: u64, ended: Ended },
}

/// How an attempt ended: its process's outcome, what staging moved, and why staging failed.
#[derive(Debug)]
struct Ended {
    outcome: Outcome,
    staging: Option<StagingStats>,
    staging_error: Option<String>,
}

impl Ended {
    fn plain(outcome: Outcome) -> Self {
        Self { outcome, staging: None, staging_error: None }
    }

    fn staging_failed(why: String, stats: StagingStats) -> Self {
        Self { outcome: Outcome::StartFailed(why.clone()), staging: Some(stats), staging_error: Some(why) }
    }
}

/// One attempt on this node: running, or ended and not yet acknowledged by the broker.
struct Attempt {
    report: AttemptReport,
    cancel: watch::Sender<bool>,
    /// The broker's order to preempt it (a notice with the grace period as its deadline).
    preempt: watch::Sender<Option<SpotNotice>>,
}

/// The agent's state, kept across broker sessions.
struct Agent {
    config: AgentConfig,
    identity: Identity,
    probe: Arc<GpuProbe>,
    attempts: HashMap<(String, u64), Attempt>,
    events: mpsc::Sender<AttemptEvent>,
    staging: attempt::Staging,
    sandbox: Arc<sandbox::Sandbox>,
    /// The client TLS from the certificate files: `reload_now()` after writing new ones.
    tls: Arc<tls::ReloadingClientTls>,
    /// Renews the certificate on the stream (`renew`).
    renewer: Option<renew::Renewer>,
    /// The spot interruption notice, on a cloud instance (`agent.cloud`).
    spot: Option<spot::Notices>,
}

/// Runs the agent until `shutdown` resolves. Attempts still running then are stopped.
pub async fn run(mut config: AgentConfig, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    enroll::ensure_certificate(&config).await?;
    let identity = tls::identity_of_cert_file(&config.tls.cert).context("agent certificate")?;
    if identity.role != Role::Agent {
        anyhow::bail!(
            "{} is a {} certificate; the agent needs an agent certificate",
            config.tls.cert.display(),
            identity.role
        );
    }
    let trust_domain = identity.trust_domain.clone();
    let reloading = tls::ReloadingClientTls::new("agent", &config.tls, move |paths| {
        tls::client_config(paths, &trust_domain, Role::Broker)
    })?;
    let _reloader = AbortOnDrop(reloading.watch(tls::RELOAD_INTERVAL));
    let client_tls = ClientTls::from(reloading.swap());
    let probe = Arc::new(GpuProbe::new(config.simulated_gpus(), &identity.name));
    let scraped = probe.clone();
    let refresh: crate::metrics::Refresh = Arc::new(move |registry| gpu_gauges(registry, &scraped.gpus()));
    crate::metrics::declare_agent_series(crate::metrics::global());
    let _metrics = crate::metrics::start(&config.metrics, Some(refresh)).await?;
    // Reported with the inventory: the broker lists it for Prometheus (`/sd/agents`).
    let metrics_port = _metrics.as_ref().map(|m| m.addr.port().to_string());
    let labels = &mut config.agent.labels;
    match metrics_port {
        Some(port) => labels.insert(crate::model::agent::METRICS_PORT_LABEL.into(), port),
        None => labels.remove(crate::model::agent::METRICS_PORT_LABEL),
    };
    crate::metrics::global().set("hybroker_agent_attempts_running", &[], 0.0);
    std::fs::create_dir_all(&config.agent.work_dir)
        .with_context(|| format!("work directory {}", config.agent.work_dir.display()))?;
    // Traversable, not listable: one attempt's user must not find the others' directories.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.agent.work_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("work directory {}", config.agent.work_dir.display()))?;
    }
    // Absolute, symbolic links resolved: attempts' work directories are named inside sandboxes,
    // whose working directory is not the agent's, and bound there at their real paths.
    config.agent.work_dir = std::fs::canonicalize(&config.agent.work_dir)
        .with_context(|| format!("work directory {}", config.agent.work_dir.display()))?;
    // One agent per work directory: the lock is held for the agent's life (and freed by the kernel
    // when it dies), so what is left in the directory belongs to a dead predecessor.
    let lock_path = config.agent.work_dir.join(".agent.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another agent uses the work directory {}; give each agent its own agent.work_dir",
            config.agent.work_dir.display()
        );
    }
    // Attempts of a killed predecessor would hold GPUs the broker now gives to others.
    executor::kill_leftovers(&config.agent.work_dir);
    if let Some(user) = &config.agent.run_as {
        tracing::warn!(
            user,
            "agent.run_as is deprecated: attempts run as per-attempt UIDs from sandbox.uid_range; it applies only \
             with isolation = \"none\""
        );
    }
    let sandbox = start_sandbox(&config, &identity.name)?;
    let (events, mut event_rx) = mpsc::channel(1024);
    let (url, server_name) = broker_target(&config);
    let staging = attempt::Staging {
        http: staging::http_client(None).context("staging http client")?,
        broker: AgentServiceClient::new(crate::telemetry::grpc::traced(
            tls::connect_lazy(&url, client_tls.clone(), server_name.as_deref())?,
            &url,
        )),
        limits: Arc::new(staging_limits(&config.staging)),
    };
    let renewer = renew::Renewer::load(&config.tls.cert);
    let (spot, _spot_watch) = match (config.agent.cloud, config.agent.spot_poll_or_default()) {
        (Some(cloud), Some(period)) => {
            let url = config.agent.metadata_url.as_deref().unwrap_or(metadata::DEFAULT_METADATA_URL);
            let client = metadata::MetadataClient::new(cloud, url)?;
            let notices = spot::notices();
            let task = tokio::spawn(spot::watch(client, period, notices.clone()));
            (Some(notices), Some(AbortOnDrop(task)))
        }
        _ => (None, None),
    };
    let mut agent = Agent {
        config,
        identity,
        probe,
        attempts: HashMap::new(),
        events,
        staging,
        sandbox,
        tls: reloading,
        renewer,
        spot,
    };
    let cert = agent.tls.paths().cert.display().to_string();
    tracing::info!(agent = agent.identity.agent_id(), gpus = agent.probe.gpus().len(), cert, "agent starting");
    // Ready when it starts dialling, not when the broker answers: attempts run on without the
    // broker, and a unit must not fail to start because the broker is down.
    crate::telemetry::notify::ready(&format!("connecting to the broker at {}", agent.config.agent.broker_url));
    session::run_sessions(&mut agent, client_tls, &mut event_rx, shutdown).await;
    for attempt in agent.attempts.values() {
        let _ = attempt.cancel.send(true);
    }
    drop(lock);
    Ok(())
}

impl Agent {
    fn inventory(&self) -> Inventory {
        let cfg = &self.config.agent;
        Inventory {
            gpus: self.probe.gpus(),
            cpus: if cfg.cpus == 0 { gpu::host_cpus() } else { cfg.cpus },
            memory_mib: if cfg.memory_mib == 0 { gpu::host_memory_mib() } else { cfg.memory_mib },
            labels: cfg.labels.clone(),
            isolation: self.sandbox.isolation,
        }
    }

    fn register(&self) -> proto::Register {
        proto::Register {
            site: self.identity.site.clone().unwrap_or_default(),
            node: self.identity.name.clone(),
            inventory: Some(self.inventory().into()),
            attempts: self.attempts.values().map(|a| a.report.clone().into()).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Starts an assigned attempt; returns the first report to send (running, or failed).
    fn start(&mut self, a: proto::Assignment) -> Option<AttemptReport> {
        let key = (a.job_id.clone(), a.epoch);
        if self.attempts.contains_key(&key) {
            return None; // a repeated assignment
        }
        let mut report = AttemptReport {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            epoch: a.epoch,
            phase: Phase::Running,
            exit_code: None,
            reason: String::new(),
            gpu_indices: a.gpu_indices.clone(),
            staging: None,
        };
        let (cancel, cancel_rx) = watch::channel(false);
        let (preempt, preempt_rx) = watch::channel(None);
        // One NVML probe per assignment, for both the devices' names and their nodes.
        let gpus = self.probe.gpus();
        match self.cuda_devices(&gpus, &a.gpu_indices) {
            Ok(devices) => {
                let nodes = self.gpu_nodes(&gpus, &a.gpu_indices);
                self.spawn(a, devices, nodes, cancel_rx, preempt_rx)
            }
            Err(reason) => {
                report.phase = Phase::Failed;
                report.reason = reason;
            }
        }
        self.attempts.insert(key, Attempt { report: report.clone(), cancel, preempt });
        self.publish_running();
        Some(report)
    }

    /// `CUDA_VISIBLE_DEVICES` for the given GPUs (UUIDs for real ones), refusing double-booking.
    fn cuda_devices(&self, gpus: &[crate::model::gpu::Gpu], indices: &[u32]) -> Result<String, String> {
        let mut devices = Vec::new();
        for index in indices {
            let Some(g) = gpus.iter().find(|g| g.index == *index) else {
                return Err(format!("gpu {index} does not exist on this node"));
            };
            let busy = self
                .attempts
                .values()
                .any(|a| a.report.phase == Phase::Running && a.report.gpu_indices.contains(index));
            if busy {
                return Err(format!("gpu {index} is already in use on this node"));
            }
            devices.push(if g.simulated { index.to_string() } else { g.uuid.clone() });
        }
        Ok(devices.join(","))
    }

    /// The device nodes of these GPUs: NVML's minor for real ones, the configured stand-ins for
    /// simulated ones (none configured: no node).
    fn gpu_nodes(&self, gpus: &[crate::model::gpu::Gpu], indices: &[u32]) -> Vec<(u32, PathBuf)> {
        let stand_ins = &self.config.sandbox.simulated_gpu_devices;
        indices
            .iter()
            .filter_map(|&index| {
                let gpu = gpus.iter().find(|g| g.index == index)?;
                let node = if gpu.simulated {
                    let nth = gpus.iter().filter(|g| g.simulated && g.index < index).count();
                    stand_ins.get(nth).cloned()?
                } else {
                    self.probe.device_node(index)?
                };
                Some((index, node))
            })
            .collect()
    }

    fn spawn(
        &self,
        a: proto::Assignment,
        cuda_visible_devices: String,
        gpu_nodes: Vec<(u32, PathBuf)>,
        cancel: watch::Receiver<bool>,
        preempt_order: watch::Receiver<Option<SpotNotice>>,
    ) {
        let work_dir: PathBuf = self.config.agent.work_dir.join(&a.job_id).join(format!("attempt-{}", a.attempt));
        let data = attempt::AttemptData::from_assignment(&a);
        let mut env: std::collections::BTreeMap<String, String> = a.env.into_iter().collect();
        if data.checkpoint.is_some() {
            let request = work_dir.join(checkpoint::REQUEST_FILE);
            env.insert(checkpoint::REQUEST_ENV.to_string(), request.to_string_lossy().into_owned());
        }
        let plan = attempt::SandboxPlan {
            sandbox: self.sandbox.clone(),
            resources: sandbox::AttemptResources { cpus: a.cpus, memory_gib: a.memory_gib },
            gpu_nodes,
        };
        let launch = Launch {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            command: a.command,
            env,
            cuda_visible_devices,
            max_runtime: Duration::from_millis(a.max_runtime_ms),
            work_dir,
            run_as: self.config.agent.run_as.clone().filter(|_| self.sandbox.init_program().is_none()),
            grace: executor::DEFAULT_GRACE,
            sandbox: None,
            preempt: self.spot.as_ref().map(|notices| notices.subscribe()),
            preempt_order: Some(preempt_order),
        };
        let (staging, events) = (self.staging.clone(), self.events.clone());
        tokio::spawn(async move {
            attempt::run(launch, a.epoch, plan, data, staging, events, cancel, &a.trace_context).await
        });
    }

    /// Applies an attempt event; returns what to tell the broker.
    fn on_event(&mut self, ev: AttemptEvent) -> Option<proto::agent_message::Msg> {
        match ev {
            AttemptEvent::Output { job_id, epoch, data } => {
                let attempt = self.attempts.get(&(job_id.clone(), epoch))?.report.attempt;
                Some(proto::agent_message::Msg::Output(proto::OutputChunk { job_id, attempt, epoch, data }))
            }
            AttemptEvent::Progress { job_id, epoch, progress: p } => {
                self.attempts.get(&(job_id.clone(), epoch))?;
                Some(proto::agent_message::Msg::Progress(proto::StagingProgress {
                    job_id,
                    epoch,
                    stage: attempt::stage_name(p.stage).to_string(),
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    files_done: p.files_done,
                    files_total: p.files_total,
                }))
            }
            AttemptEvent::Ended { job_id, epoch, ended } => {
                let attempt = self.attempts.get_mut(&(job_id, epoch))?;
                let report = &mut attempt.report;
                let outcome = ended.outcome;
                report.exit_code = outcome.exit_code();
                report.staging = ended.staging;
                (report.phase, report.reason) = match ended.staging_error {
                    Some(why) => (Phase::StagingFailed, why),
                    None if matches!(outcome, Outcome::Preempted(_)) => (Phase::Preempted, outcome.reason()),
                    None if matches!(outcome, Outcome::Exited(_)) => (Phase::Exited, outcome.reason()),
                    None => (Phase::Failed, outcome.reason()),
                };
                tracing::info!(job = report.job_id, epoch, outcome = report.reason, "attempt ended");
                if let Some(s) = &report.staging {
                    let metrics = crate::metrics::global();
                    metrics.inc("hybroker_agent_staging_bytes_total", &["in"], s.in_bytes as f64);
                    metrics.inc("hybroker_agent_staging_bytes_total", &["out"], s.out_bytes as f64);
                }
                let update = proto::agent_message::Msg::Update(report.clone().into());
                self.publish_running();
                Some(update)
            }
        }
    }

    /// The running-attempts gauge.
    fn publish_running(&self) {
        let running = self.attempts.values().filter(|a| a.report.phase == Phase::Running).count();
        crate::metrics::global().set("hybroker_agent_attempts_running", &[], running as f64);
    }

    fn stop(&mut self, s: &proto::StopAttempt) {
        if let Some(a) = self.attempts.get(&(s.job_id.clone(), s.epoch)) {
            if s.preempt {
                // Like a spot notice: SIGTERM, the grace period, the checkpoint saved, `preempted`.
                tracing::info!(job = s.job_id, epoch = s.epoch, reason = s.reason, "preempting attempt");
                let notice = SpotNotice {
                    action: "preempt".into(),
                    deadline: std::time::SystemTime::now() + executor::DEFAULT_GRACE,
                    event_id: None,
                    seen_at: std::time::Instant::now(),
                    by_broker: Some(s.reason.clone()),
                };
                a.preempt.send_replace(Some(notice));
            } else {
                tracing::info!(job = s.job_id, epoch = s.epoch, reason = s.reason, "stopping attempt");
                let _ = a.cancel.send(true);
            }
        }
    }

    fn ack(&mut self, ack: &proto::Ack) {
        let key = (ack.job_id.clone(), ack.epoch);
        if self.attempts.get(&key).is_some_and(|a| a.report.is_final()) {
            self.attempts.remove(&key);
        }
    }
}

/// Per-GPU gauges, from a probe at scrape time.
fn gpu_gauges(registry: &crate::metrics::Registry, gpus: &[crate::model::gpu::Gpu]) {
    const MIB: f64 = 1024.0 * 1024.0;
    let each = |value: &dyn Fn(&crate::model::gpu::Gpu) -> f64| {
        gpus.iter().map(|g| (vec![g.index.to_string(), g.model.clone()], value(g))).collect::<Vec<_>>()
    };
    registry.set_family("hybroker_gpu_utilization_ratio", each(&|g| f64::from(g.utilization_pct) / 100.0));
    registry.set_family("hybroker_gpu_memory_used_bytes", each(&|g| g.memory_used_mib as f64 * MIB));
    registry.set_family("hybroker_gpu_memory_total_bytes", each(&|g| g.memory_mib as f64 * MIB));
    registry.set_family("hybroker_gpu_temperature_celsius", each(&|g| f64::from(g.temperature_c)));
    registry.set_family("hybroker_gpu_power_watts", each(&|g| f64::from(g.power_mw) / 1000.0));
    registry.set_family("hybroker_gpu_ecc_errors_total", each(&|g| g.ecc_errors as f64));
    registry.set_family("hybroker_gpu_healthy", each(&|g| f64::from(u8::from(g.healthy))));
}

/// Decides how attempts are isolated (refusing to start when they cannot be, unless
/// `isolation = "none"`), hiding the agent's config and keys from jobs.
fn start_sandbox(config: &AgentConfig, name: &str) -> anyhow::Result<Arc<sandbox::Sandbox>> {
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut hide: Vec<PathBuf> = vec![absolute(&config.tls.key)];
    hide.extend(config.source.as_deref().map(absolute));
    // The key's directory often holds more (a CA key in a development PKI).
    if let Some(dir) = absolute(&config.tls.key).parent().filter(|d| d.parent().is_some()) {
        hide.push(dir.to_owned());
    }
    let options = sandbox::SandboxOptions {
        settings: config.sandbox.clone(),
        work_root: absolute(&config.agent.work_dir),
        hide,
        agent: name.to_owned(),
        init_program: std::env::current_exe().context("the agent's own executable")?,
    };
    let sandbox = tokio::task::block_in_place(|| sandbox::Sandbox::start(options))?;
    Ok(sandbox)
}

/// The staging engine's limits from `[staging]`.
fn staging_limits(section: &AgentStagingSection) -> staging::StagingLimits {
    staging::StagingLimits {
        concurrency: section.concurrency,
        retries: section.retries,
        min_backoff: section.min_backoff.0,
        max_backoff: section.max_backoff.0,
        request_timeout: section.request_timeout.0,
        ..Default::default()
    }
}

/// The broker's URL and the name to verify in its certificate.
fn broker_target(config: &AgentConfig) -> (String, Option<String>) {
    (config.agent.broker_url.clone(), config.agent.broker_server_name.clone())
}

/// Shared by the session loop for its TLS configuration (the current one for each connection).
type ClientTls = tls::ClientTls;

/// Stops a background task when the agent stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
