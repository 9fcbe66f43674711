//! The broker's core: one task that owns the live state of every unfinished job and every agent,
//! applies commands in batches and commits each batch's transitions in one transaction (group
//! commit). Replies, agent messages and watch events go out only after the commit, so nothing is
//! acknowledged or dispatched that a crash could lose. A failed commit stops the core (crash-only:
//! a restarted broker reloads from the store).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};

use super::agents::{AgentEntry, AgentView, Alloc, Conn};
use super::keys::{self, KeyRing, KeyView};
use super::placer::Placer;
use super::secrets::{SecretKeys, SecretsError};
use super::tail::Tail;
use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::model::UnixMillis;
use crate::model::agent::{AttemptReport, Inventory, Isolation, Phase};
use crate::model::data::{JobData, StagingStats};
use crate::model::job::JobSpec;
use crate::model::state::{Input, JobState, Lifecycle};
use crate::placement::bind::{first_fit, fit};
use crate::placement::engine::Decision;
use crate::proto;
use crate::store::{
    AgentRecord, AttemptEnd, AttemptOutput, AttemptRecord, Batch, JobEvent, JobRecord, StoreError, Write, Writer,
};

/// An idempotency key's job and the hash of the request that created it.
type KeyedJob = (String, Option<String>);

/// Most commands applied in one batch (one transaction).
const MAX_BATCH: usize = 4096;
/// Lease expiry waits out a backlog for at most this many ticks (a tick is a quarter lease).
const MAX_DEFERRED_TICKS: u32 = 2;

/// Timings and limits the core needs.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub log_tail_bytes: usize,
    /// Declared tenants (`default` included).
    pub tenants: HashMap<String, TenantConfig>,
    /// Shared with the services, which verify keys without asking the core.
    pub keys: Arc<KeyRing>,
    /// Sites, policies and prices; placement is off (plain first fit) without sites.
    pub placer: Arc<Placer>,
    /// Seal jobs' `secret_env` at submit; open it for the assignment.
    pub secrets: Arc<SecretKeys>,
    /// Agent id (`site/node`) → the only tenant whose jobs it runs (`[[dedicated]]`).
    pub dedicated: Arc<HashMap<String, String>>,
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// What the services ask of the core.
pub enum Cmd {
    Submit {
        tenant: String,
        spec: Arc<JobSpec>,
        idempotency_key: Option<String>,
        /// SHA-256 (hex) of the submitted document.
        request_sha256: String,
        /// The job's data as resolved (inputs listed, outputs' locations), when it has any.
        data: Option<Arc<JobData>>,
        /// The submission's trace context: as JSON (stored with the job) and as the parent of the
        /// job's spans.
        trace_context: Option<String>,
        trace_parent: opentelemetry::Context,
        reply: Reply<(String, bool)>,
    },
    /// Where a job would be placed now, without submitting it.
    Plan {
        tenant: String,
        spec: Arc<JobSpec>,
        data: Option<Arc<JobData>>,
        reply: Reply<Decision>,
    },
    /// A staging agent's progress: recorded as a job event.
    Progress {
        agent: String,
        conn: u64,
        job_id: String,
        epoch: u64,
        text: String,
    },
    /// The data of an attempt, for minting its URLs; only for the agent holding that attempt.
    AttemptData {
        agent: String,
        job_id: String,
        epoch: u64,
        reply: Reply<AttemptData>,
    },
    Cancel {
        job_id: String,
        tenant: Option<String>,
        reason: String,
        reply: Reply<()>,
    },
    Connected {
        agent: String,
        site: String,
        node: String,
        inventory: Inventory,
        attempts: Vec<AttemptReport>,
        conn: Conn,
    },
    Disconnected {
        agent: String,
        conn: u64,
    },
    Heartbeat {
        agent: String,
        conn: u64,
        inventory: Option<Inventory>,
    },
    Report {
        agent: String,
        conn: u64,
        report: AttemptReport,
    },
    Output {
        agent: String,
        conn: u64,
        job_id: String,
        epoch: u64,
        data: Vec<u8>,
    },
    Logs {
        job_id: String,
        reply: oneshot::Sender<Option<AttemptOutput>>,
    },
    Agents {
        reply: oneshot::Sender<Vec<AgentView>>,
    },
    Drain {
        agent: String,
        reply: Reply<AgentView>,
    },
    AddKey {
        tenant: String,
        reply: Reply<(KeyView, String)>,
    },
    RevokeKey {
        key_id: String,
        reply: Reply<KeyView>,
    },
}

/// What an attempt's URLs are minted from.
#[derive(Debug, Clone)]
pub struct AttemptData {
    pub tenant: String,
    pub attempt: u32,
    pub data: Arc<JobData>,
}

struct ActiveJob {
    rec: JobRecord,
    life: Lifecycle,
    spec: Arc<JobSpec>,
    data: Option<Arc<JobData>>,
    lease_deadline: Option<Instant>,
    tail: Tail,
    /// The placement decision the job is placed on (engine placement only).
    decision: Option<Arc<Decision>>,
    /// When it was placed (to place it again when it waits too long) and when its attempt began.
    placed_at: Option<Instant>,
    attempt_started: Option<Instant>,
    /// Engine placement: not before this (a job no site can take is retried now and then).
    next_placement: Option<Instant>,
    /// The submission's trace context (`rec.trace_context`, parsed once): the parent of the job's
    /// placement and dispatch spans.
    trace: opentelemetry::Context,
    /// The current attempt's dispatch span: the parent of the attempt's end.
    dispatched: opentelemetry::Context,
}

/// What a batch produced, released only after its commit.
#[derive(Default)]
struct Effects {
    batch: Batch,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    messages: Vec<(String, proto::broker_message::Msg)>,
    events: Vec<JobEvent>,
    /// Idempotency keys submitted in this batch: (tenant, key) → job.
    keys: HashMap<(String, String), KeyedJob>,
}

impl Effects {
    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: Result<T, ApiError>) {
        self.after_commit.push(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    fn send(&mut self, agent: &str, msg: proto::broker_message::Msg) {
        self.messages.push((agent.to_string(), msg));
    }
}

pub struct Core {
    writer: Writer,
    settings: CoreSettings,
    jobs: HashMap<String, ActiveJob>,
    queue: BTreeSet<(Reverse<u32>, String)>,
    /// By id, so first fit walks them in a stable order.
    agents: BTreeMap<String, AgentEntry>,
    /// Unfinished jobs per tenant (for `max_queued_jobs`).
    unfinished: HashMap<String, u32>,
    next_seq: u64,
    events: broadcast::Sender<JobEvent>,
    /// Each tenant's spend this month (actual cost of ended attempts), for budgets.
    spent: HashMap<String, f64>,
    /// After a restart, agents the store knows get one lease period to reconnect before engine
    /// placement runs: until then their sites would look empty and jobs would spill to the cloud.
    placement_hold_until: Option<Instant>,
}

/// The broker's clock for stored timestamps.
pub(super) fn now_ms() -> UnixMillis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Core {
    /// Loads every unfinished job. Attempts in flight get one lease period for their agents to
    /// reconnect and report them.
    pub async fn load(
        mut writer: Writer,
        settings: CoreSettings,
        events: broadcast::Sender<JobEvent>,
    ) -> Result<Self, StoreError> {
        let next_seq = writer.last_event_seq().await? + 1;
        let mut core = Core {
            writer,
            settings,
            jobs: HashMap::new(),
            queue: BTreeSet::new(),
            agents: BTreeMap::new(),
            unfinished: HashMap::new(),
            next_seq,
            events,
            spent: HashMap::new(),
            placement_hold_until: None,
        };
        let month_start = place::month_start(now_ms());
        core.spent = core.writer.load_spend(month_start).await?;
        for key in core.writer.load_keys().await? {
            core.settings.keys.insert(key);
        }
        for a in core.writer.load_agents().await? {
            let mut entry = AgentEntry::new(&a.id, &a.site, &a.node);
            entry.dedicated = core.settings.dedicated.get(&a.id).cloned();
            entry.inventory = serde_json::from_str(&a.inventory_json).unwrap_or_default();
            entry.draining = a.draining;
            let age = Duration::from_millis(now_ms().saturating_sub(a.last_seen).max(0) as u64);
            entry.last_seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            core.agents.insert(a.id, entry);
        }
        let deadline = Instant::now() + core.settings.lease_ttl;
        for rec in core.writer.load_active().await? {
            let spec = match JobSpec::from_json(rec.spec_json.as_bytes(), usize::MAX) {
                Ok(spec) => Arc::new(spec),
                Err(e) => return Err(StoreError::Corrupt(format!("job {}: stored spec: {e}", rec.id))),
            };
            let life = Lifecycle {
                state: rec.state,
                attempts: rec.attempts,
                max_attempts: rec.max_attempts,
                epoch: rec.epoch,
            };
            let lease_deadline = rec.state.has_attempt().then_some(deadline);
            if !rec.state.has_attempt() {
                core.queue.insert((Reverse(rec.priority), rec.id.clone()));
            }
            let data = match rec.data_json.as_deref().map(serde_json::from_str::<JobData>) {
                None => None,
                Some(Ok(data)) => Some(Arc::new(data)),
                Some(Err(e)) => return Err(StoreError::Corrupt(format!("job {}: stored data: {e}", rec.id))),
            };
            let tail = Tail::new(core.settings.log_tail_bytes);
            *core.unfinished.entry(rec.tenant.clone()).or_default() += 1;
            let decision = rec.placement_json.as_deref().and_then(|d| serde_json::from_str(d).ok()).map(Arc::new);
            let rec_trace = rec.trace_context.clone();
            let job = ActiveJob {
                rec,
                life,
                spec,
                data,
                lease_deadline,
                tail,
                decision,
                placed_at: None,
                attempt_started: None,
                next_placement: None,
                trace: crate::telemetry::context::from_json(rec_trace.as_deref()),
                dispatched: opentelemetry::Context::new(),
            };
            core.jobs.insert(job.rec.id.clone(), job);
        }
        if !core.agents.is_empty() && core.settings.placer.enabled() {
            core.placement_hold_until = Some(Instant::now() + core.settings.lease_ttl);
        }
        tracing::info!(active_jobs = core.jobs.len(), "job store loaded");
        Ok(core)
    }

    /// Runs until every command sender is gone, or a commit fails.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval((self.settings.lease_ttl / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cmds = Vec::with_capacity(MAX_BATCH);
        let mut expiry_due = false;
        let mut ticks_deferred = 0;
        let mut gauges_due = false;
        loop {
            // Leases are checked on the tick only: walking every job per batch would cost more
            // than the batch itself under load.
            tokio::select! {
                n = rx.recv_many(&mut cmds, MAX_BATCH) => if n == 0 { return Ok(()) },
                _ = tick.tick() => {
                    ticks_deferred += u32::from(expiry_due);
                    expiry_due = true;
                    gauges_due = true;
                }
            }
            let mut out = Effects::default();
            // Every idempotency key of the batch is looked up in one query.
            let keys: Vec<(String, String)> = cmds
                .iter()
                .filter_map(|c| match c {
                    Cmd::Submit { tenant, idempotency_key: Some(key), .. } => Some((tenant.clone(), key.clone())),
                    _ => None,
                })
                .collect();
            if !keys.is_empty() {
                out.keys = self.writer.find_idempotent(&keys).await?;
            }
            for cmd in cmds.drain(..) {
                self.handle(cmd, &mut out);
            }
            // Not while a backlog waits (a heartbeat queued behind it must not count as silence),
            // but a lasting overload must not starve expiry either: after a few ticks it runs anyway.
            if expiry_due && (rx.len() < MAX_BATCH || ticks_deferred >= MAX_DEFERRED_TICKS) {
                self.expire(Instant::now(), &mut out);
                expiry_due = false;
                ticks_deferred = 0;
            }
            self.dispatch(&mut out);
            for (key_id, at) in self.settings.keys.take_unpersisted_uses() {
                out.batch.push(Write::KeyUsed { key_id, at });
            }
            self.writer.commit(&out.batch).await?;
            self.deliver(out);
            if std::mem::take(&mut gauges_due) {
                self.publish_gauges();
            }
        }
    }

    fn deliver(&mut self, out: Effects) {
        for f in out.after_commit {
            f();
        }
        for (agent, msg) in out.messages {
            if let Some(entry) = self.agents.get_mut(&agent) {
                entry.send(msg);
            }
        }
        for ev in out.events {
            let _ = self.events.send(ev);
        }
    }

    fn handle(&mut self, cmd: Cmd, out: &mut Effects) {
        match cmd {
            Cmd::Submit { tenant, spec, idempotency_key, request_sha256, data, trace_context, trace_parent, reply } => {
                let key = idempotency_key;
                let submitted = Submitted { tenant, spec, key, request_sha256, data, trace_context, trace_parent };
                let result = self.submit(submitted, out);
                out.reply(reply, result);
            }
            Cmd::Plan { tenant, spec, data, reply } => {
                let _ = reply.send(self.plan(&tenant, &spec, data.as_deref()));
            }
            Cmd::Progress { agent, conn, job_id, epoch, text } => {
                if self.touch(&agent, conn)
                    && let Some(mut job) = self.jobs.remove(&job_id)
                {
                    if job.life.epoch == epoch && job.rec.agent.as_deref() == Some(agent.as_str()) {
                        self.event(&mut job, text, false, out);
                    }
                    self.jobs.insert(job_id, job);
                }
            }
            Cmd::AttemptData { agent, job_id, epoch, reply } => {
                let found = self.jobs.get(&job_id).filter(|j| {
                    j.life.epoch == epoch
                        && j.life.state.has_attempt()
                        && j.rec.agent.as_deref() == Some(agent.as_str())
                });
                let result = match found {
                    Some(j) => Ok(AttemptData {
                        tenant: j.rec.tenant.clone(),
                        attempt: j.life.attempts,
                        data: place::effective_data(j),
                    }),
                    None => Err(ApiError::FailedPrecondition(format!(
                        "job {job_id} epoch {epoch} is not an attempt of agent {agent} (stale, finished or unknown)"
                    ))),
                };
                let _ = reply.send(result);
            }
            Cmd::Drain { agent, reply } => {
                let result = match self.agents.get_mut(&agent) {
                    Some(entry) => {
                        if !entry.draining {
                            tracing::info!(agent, "agent draining: no new work");
                            entry.draining = true;
                            out.batch.push(Write::AgentDraining { id: agent.clone(), draining: true });
                        }
                        Ok(entry.view())
                    }
                    None => Err(ApiError::NotFound(format!("agent {agent} not found"))),
                };
                out.reply(reply, result);
            }
            Cmd::AddKey { tenant, reply } => {
                let (record, key) = keys::generate(&tenant, now_ms());
                out.batch.push(Write::NewKey(record.clone()));
                let ring = self.settings.keys.clone();
                out.after_commit.push(Box::new(move || {
                    let key_id = record.key_id.clone();
                    ring.insert(record);
                    let view = ring.view(&key_id).expect("just inserted");
                    let _ = reply.send(Ok((view, key)));
                }));
            }
            Cmd::RevokeKey { key_id, reply } => {
                if self.settings.keys.view(&key_id).is_none() {
                    out.reply(reply, Err(ApiError::NotFound(format!("key {key_id} not found"))));
                } else {
                    out.batch.push(Write::RevokeKey { key_id: key_id.clone(), at: now_ms() });
                    let ring = self.settings.keys.clone();
                    out.after_commit.push(Box::new(move || {
                        ring.revoke(&key_id);
                        let _ = reply.send(Ok(ring.view(&key_id).expect("exists")));
                    }));
                }
            }
            Cmd::Cancel { job_id, tenant, reason, reply } => {
                let result = self.cancel(&job_id, tenant.as_deref(), reason, out);
                out.reply(reply, result);
            }
            Cmd::Connected { agent, site, node, inventory, attempts, conn } => {
                self.connected(agent, site, node, inventory, attempts, conn, out);
            }
            Cmd::Disconnected { agent, conn } => {
                if let Some(entry) = self.agents.get_mut(&agent).filter(|e| e.conn_id() == Some(conn)) {
                    tracing::info!(agent, "agent stream closed");
                    entry.conn = None;
                }
            }
            Cmd::Heartbeat { agent, conn, inventory } => {
                if self.touch(&agent, conn)
                    && let (Some(mut inventory), Some(entry)) = (inventory, self.agents.get_mut(&agent))
                {
                    // Isolation is what the agent registered with (checked then); it cannot change
                    // on a live stream.
                    if inventory.isolation != entry.inventory.isolation {
                        tracing::warn!(
                            agent,
                            registered = %entry.inventory.isolation,
                            reported = %inventory.isolation,
                            "ignored a change of isolation in a heartbeat"
                        );
                        inventory.isolation = entry.inventory.isolation;
                    }
                    entry.inventory = inventory;
                }
            }
            Cmd::Report { agent, conn, report } => {
                if self.touch(&agent, conn) {
                    self.report(&agent, report, out);
                }
            }
            Cmd::Output { agent, conn, job_id, epoch, data } => {
                if self.touch(&agent, conn)
                    && let Some(job) = self
                        .jobs
                        .get_mut(&job_id)
                        .filter(|j| j.life.epoch == epoch && j.rec.agent.as_deref() == Some(agent.as_str()))
                {
                    job.tail.push(&data);
                }
            }
            Cmd::Logs { job_id, reply } => {
                let live = self.jobs.get(&job_id).filter(|j| j.life.state.has_attempt()).map(|j| AttemptOutput {
                    attempt: j.life.attempts,
                    output: j.tail.bytes(),
                    truncated: j.tail.truncated(),
                    total: j.tail.total(),
                });
                // After the commit: a job that ends in this batch must already be in the store.
                out.after_commit.push(Box::new(move || {
                    let _ = reply.send(live);
                }));
            }
            Cmd::Agents { reply } => {
                let _ = reply.send(self.agents.values().map(AgentEntry::view).collect());
            }
        }
    }

    /// A new job, or the one an earlier submit with the same idempotency key and document made.
    /// `out.keys` holds the batch's idempotency keys found in the store, and those of this batch.
    fn submit(&mut self, submitted: Submitted, out: &mut Effects) -> Result<(String, bool), ApiError> {
        let Submitted { tenant, spec, key, request_sha256, data, trace_context, trace_parent } = submitted;
        if let Some(key) = &key
            && let Some((id, hash)) = out.keys.get(&(tenant.clone(), key.clone()))
        {
            if hash.as_ref().is_some_and(|h| *h != request_sha256) {
                return Err(ApiError::AlreadyExists(format!(
                    "Idempotency-Key {key:?} was already used for a different job spec (job {id})"
                )));
            }
            return Ok((id.clone(), true));
        }
        let cap = self.settings.tenants.get(&tenant).map_or(0, |t| t.max_queued_jobs);
        let unfinished = self.unfinished.get(&tenant).copied().unwrap_or(0);
        if unfinished >= cap {
            return Err(ApiError::ResourceExhausted(format!(
                "tenant {tenant} has {unfinished} unfinished jobs, its limit (max_queued_jobs {cap}); \
                 wait for some to finish"
            )));
        }
        self.admit(&tenant, &place::ActiveJobParts { spec: &spec, data: data.as_deref() })?;
        let now = now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        // Sealed for this job id; from here on the job holds the names only.
        let (spec, secret_env_sealed) = if spec.secret_env.is_empty() {
            (spec, None)
        } else {
            let sealed =
                self.settings.secrets.seal(&id, &spec.secret_env).map_err(|e| ApiError::Internal(e.to_string()))?;
            (Arc::new(spec.without_secret_values()), Some(sealed))
        };
        let rec = JobRecord {
            id,
            tenant,
            name: spec.name.clone(),
            state: JobState::Queued,
            spec_json: spec.to_json(),
            priority: spec.priority,
            attempts: 0,
            max_attempts: spec.max_attempts,
            epoch: 0,
            site: None,
            agent: None,
            exit_code: None,
            reason: String::new(),
            idempotency_key: key,
            request_sha256: Some(request_sha256),
            data_json: data.as_ref().map(|d| serde_json::to_string(&**d).expect("job data serialises")),
            placement_json: None,
            trace_context,
            secret_env_sealed,
            created_at: now,
            updated_at: now,
        };
        let id = rec.id.clone();
        if let Some(key) = &rec.idempotency_key {
            out.keys.insert((rec.tenant.clone(), key.clone()), (id.clone(), rec.request_sha256.clone()));
        }
        *self.unfinished.entry(rec.tenant.clone()).or_default() += 1;
        out.batch.push(Write::NewJob(rec.clone()));
        let mut job = ActiveJob {
            life: Lifecycle::new(rec.max_attempts),
            rec,
            spec,
            lease_deadline: None,
            tail: Tail::new(self.settings.log_tail_bytes),
            data,
            decision: None,
            placed_at: None,
            attempt_started: None,
            next_placement: None,
            trace: trace_parent,
            dispatched: opentelemetry::Context::new(),
        };
        let submitted = match &job.data {
            Some(d) if !d.inputs.is_empty() => {
                format!("submitted ({} input objects, {} bytes)", d.inputs.len(), d.input_bytes())
            }
            _ => "submitted".to_string(),
        };
        self.event(&mut job, submitted, false, out);
        self.queue.insert((Reverse(job.rec.priority), id.clone()));
        self.jobs.insert(id.clone(), job);
        Ok((id, false))
    }

    fn cancel(
        &mut self,
        job_id: &str,
        tenant: Option<&str>,
        reason: String,
        out: &mut Effects,
    ) -> Result<(), ApiError> {
        let Some(mut job) = self.jobs.remove(job_id) else {
            return Err(ApiError::FailedPrecondition(format!(
                "job {job_id} is not active (already finished, or unknown)"
            )));
        };
        if tenant.is_some_and(|t| t != job.rec.tenant) {
            self.jobs.insert(job_id.to_string(), job);
            return Err(ApiError::job_not_found(job_id));
        }
        let had_attempt = job.life.state.has_attempt();
        job.life.apply(&Input::Cancel).expect("an active job can always be cancelled");
        self.queue.remove(&(Reverse(job.rec.priority), job.rec.id.clone()));
        let reason = if reason.is_empty() { "cancelled".to_string() } else { format!("cancelled: {reason}") };
        if had_attempt {
            let agent = job.rec.agent.clone().unwrap_or_default();
            out.send(&agent, proto::broker_message::Msg::Stop(stop(&job, &reason)));
            self.end_attempt(&job, JobState::Cancelled, None, &reason, None, out);
        }
        self.transition(job, JobState::Cancelled, reason, None, out);
        Ok(())
    }

    /// Records the job's new state (row + event). Terminal jobs leave the live state.
    fn transition(
        &mut self,
        mut job: ActiveJob,
        state: JobState,
        reason: String,
        exit_code: Option<i32>,
        out: &mut Effects,
    ) {
        job.rec.state = state;
        job.rec.attempts = job.life.attempts;
        job.rec.epoch = job.life.epoch;
        job.rec.exit_code = exit_code;
        job.rec.updated_at = now_ms();
        self.event(&mut job, reason, true, out);
        if state.is_terminal() {
            metrics::finished(&job, state);
            if let Some(n) = self.unfinished.get_mut(&job.rec.tenant) {
                *n = n.saturating_sub(1);
            }
            return;
        }
        if state == JobState::Queued {
            job.lease_deadline = None;
            self.queue.insert((Reverse(job.rec.priority), job.rec.id.clone()));
        }
        self.jobs.insert(job.rec.id.clone(), job);
    }

    /// Appends the job's event; with `row`, also writes the job's changed row.
    fn event(&mut self, job: &mut ActiveJob, reason: String, row: bool, out: &mut Effects) {
        job.rec.reason = reason.clone();
        if row {
            out.batch.push(Write::UpdateJob(job.rec.clone()));
        }
        let ev = JobEvent {
            seq: self.next_seq,
            job_id: job.rec.id.clone(),
            state: job.rec.state,
            attempt: job.life.attempts,
            agent: job.rec.agent.clone(),
            reason,
            exit_code: job.rec.exit_code,
            at: job.rec.updated_at,
        };
        self.next_seq += 1;
        out.batch.push(Write::Event(ev.clone()));
        out.events.push(ev);
    }

    fn end_attempt(
        &mut self,
        job: &ActiveJob,
        state: JobState,
        exit_code: Option<i32>,
        reason: &str,
        staging: Option<&StagingStats>,
        out: &mut Effects,
    ) {
        let cost_usd = self.accrue(job);
        metrics::attempt_ended(job, cost_usd, staging);
        trace::attempt_ended(job, state, exit_code, reason, cost_usd);
        out.batch.push(Write::EndAttempt(AttemptEnd {
            job_id: job.rec.id.clone(),
            attempt: job.life.attempts,
            state,
            exit_code,
            reason: reason.to_string(),
            output: job.tail.bytes(),
            output_truncated: job.tail.truncated(),
            output_bytes: job.tail.total(),
            staging_json: staging.map(|s| serde_json::to_string(s).expect("stats serialise")),
            cost_usd,
            ended_at: now_ms(),
        }));
    }

    /// A message arrived on the agent's current stream: it is alive, and so are its leases, the
    /// current attempts that are its own (an attempt it holds resources for but that is leased to
    /// another agent is never renewed by it).
    fn touch(&mut self, agent: &str, conn: u64) -> bool {
        let Some(entry) = self.agents.get_mut(agent).filter(|e| e.conn_id() == Some(conn)) else {
            return false;
        };
        entry.last_seen = Instant::now();
        let deadline = entry.last_seen + self.settings.lease_ttl;
        for (job_id, epoch) in entry.attempts() {
            if let Some(job) =
                self.jobs.get_mut(job_id).filter(|j| j.life.epoch == *epoch && j.rec.agent.as_deref() == Some(agent))
            {
                job.lease_deadline = Some(deadline);
            }
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn connected(
        &mut self,
        agent: String,
        site: String,
        node: String,
        inventory: Inventory,
        reports: Vec<AttemptReport>,
        conn: Conn,
        out: &mut Effects,
    ) {
        tracing::info!(agent, gpus = inventory.gpus.len(), attempts = reports.len(), "agent registered");
        let conn_id = conn.id;
        let entry = self.agents.entry(agent.clone()).or_insert_with(|| AgentEntry::new(&agent, &site, &node));
        entry.dedicated = self.settings.dedicated.get(&agent).cloned();
        match (&entry.dedicated, inventory.isolation) {
            (Some(tenant), Isolation::None) => {
                tracing::warn!(agent, tenant, "agent without isolation: it runs only its dedicated tenant's jobs")
            }
            (Some(tenant), isolation) => {
                tracing::info!(agent, tenant, %isolation, "agent dedicated to one tenant: it runs only its jobs")
            }
            (None, _) => {}
        }
        entry.inventory = inventory;
        entry.conn = Some(conn);
        entry.last_seen = Instant::now();
        entry.send(proto::broker_message::Msg::Registered(proto::Registered {
            agent_id: agent.clone(),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u32,
            lease_ttl_ms: self.settings.lease_ttl.as_millis() as u32,
        }));
        out.batch.push(Write::Agent(AgentRecord {
            id: agent.clone(),
            site,
            node,
            inventory_json: serde_json::to_string(&entry.inventory).unwrap_or_default(),
            last_seen: now_ms(),
            draining: entry.draining,
        }));
        // Reconcile: what the agent still holds is adopted (if current) or stopped; what the broker
        // thinks it holds but the agent does not report is lost.
        let mut previous = entry.take_allocs();
        let mut adopted = Vec::with_capacity(reports.len());
        for r in reports {
            // Another agent's current attempt is never adopted: its lease stays its owner's.
            if let Some(owner) = self.owner_if_foreign(&agent, &r) {
                tracing::warn!(
                    agent,
                    job = r.job_id,
                    epoch = r.epoch,
                    owner,
                    "refused to adopt another agent's attempt at register; told to stop it"
                );
                self.refuse_foreign(&agent, r, out);
                continue;
            }
            adopted.push(r);
        }
        let reports = adopted;
        for r in &reports {
            let current = self.jobs.get(&r.job_id).filter(|j| {
                j.life.epoch == r.epoch && j.life.state.has_attempt() && j.rec.agent.as_deref() == Some(agent.as_str())
            });
            // A stale attempt still running holds its GPUs until it ends (it is told to stop);
            // its CPU and memory are not known any more and not counted.
            let (cpus, memory_mib) = match current {
                Some(job) => (job.spec.resources.cpus, u64::from(job.spec.resources.memory_gib) * 1024),
                None if !r.is_final() => (0, 0),
                None => continue,
            };
            let entry = self.agents.get_mut(&agent).expect("entry inserted above");
            entry.allocate(&r.job_id, r.epoch, Alloc { gpus: r.gpu_indices.clone(), cpus, memory_mib });
        }
        let held: Vec<(String, u64)> = self
            .jobs
            .values()
            .filter(|j| j.life.state.has_attempt() && j.rec.agent.as_deref() == Some(agent.as_str()))
            .map(|j| (j.rec.id.clone(), j.life.epoch))
            .filter(|key| !reports.iter().any(|r| (&r.job_id, r.epoch) == (&key.0, key.1)))
            .collect();
        for (job_id, epoch) in held {
            // An assignment the agent never received (its stream broke first) is sent again, with
            // the same epoch; an attempt it had started and no longer has is lost.
            let mut alloc = previous.remove(&(job_id.clone(), epoch));
            if let Some(job) = self.jobs.get(&job_id).filter(|j| alloc.is_none() && j.life.state == JobState::Leased) {
                // After a broker restart nothing is booked yet: book the job's needs afresh.
                let r = &job.spec.resources;
                alloc = fit(&job.rec.tenant, r, &self.agents[&agent].free()).map(|gpus| Alloc {
                    gpus,
                    cpus: r.cpus,
                    memory_mib: u64::from(r.memory_gib) * 1024,
                });
            }
            match (self.jobs.get(&job_id), alloc) {
                (Some(job), Some(alloc)) if job.life.state == JobState::Leased => {
                    let (trace_context, _) = trace::dispatch(job, &agent, &self.agents[&agent].site);
                    let assign = assignment(job, &alloc.gpus, trace_context, &self.settings.secrets);
                    self.agents.get_mut(&agent).expect("entry inserted above").allocate(&job_id, epoch, alloc);
                    match assign {
                        Ok(assign) => {
                            tracing::info!(job = job_id, agent, epoch, "assignment sent again after a reconnect");
                            out.send(&agent, proto::broker_message::Msg::Assign(assign));
                        }
                        Err(e) => self.unassignable(&job_id, epoch, &e, out),
                    }
                }
                _ => self.lease_lost(&job_id, epoch, "the agent reconnected without the attempt", out),
            }
        }
        self.touch(&agent, conn_id);
        for r in reports {
            self.report(&agent, r, out);
        }
    }

    /// Applies one report from `agent`'s current stream.
    fn report(&mut self, agent: &str, r: AttemptReport, out: &mut Effects) {
        use proto::broker_message::Msg;
        let current = self.jobs.get(&r.job_id).is_some_and(|j| j.life.epoch == r.epoch && j.life.state.has_attempt());
        if !current {
            // Stale (a newer attempt exists), cancelled or unknown: refuse and tell the agent.
            tracing::warn!(agent, job = r.job_id, epoch = r.epoch, "refused report about a stale or unknown attempt");
            if r.is_final() {
                self.free(agent, &r.job_id, r.epoch);
                out.send(agent, Msg::Ack(proto::Ack { job_id: r.job_id, epoch: r.epoch }));
            } else {
                out.send(
                    agent,
                    Msg::Stop(proto::StopAttempt {
                        job_id: r.job_id,
                        attempt: r.attempt,
                        epoch: r.epoch,
                        reason: "stale attempt: the job moved on".into(),
                    }),
                );
            }
            return;
        }
        if let Some(owner) = self.owner_if_foreign(agent, &r) {
            tracing::warn!(agent, job = r.job_id, owner, "refused report about another agent's attempt");
            self.refuse_foreign(agent, r, out);
            return;
        }
        let mut job = self.jobs.remove(&r.job_id).expect("checked above");
        let input = match r.phase {
            Phase::Running => Input::Started { epoch: r.epoch },
            Phase::Exited => Input::Exited { epoch: r.epoch, exit_code: r.exit_code.unwrap_or(-1) },
            Phase::Failed => Input::AttemptFailed { epoch: r.epoch },
            Phase::StagingFailed => Input::StagingFailed { epoch: r.epoch },
        };
        match job.life.apply(&input) {
            Ok(state) => {
                let mut reason = match (r.phase, r.exit_code) {
                    (Phase::Running, _) => "started".to_string(),
                    (Phase::Exited, Some(code)) if r.reason.is_empty() => format!("exited with code {code}"),
                    _ => r.reason.clone(),
                };
                if let Some(s) = r.staging.as_ref().filter(|s| s.in_files + s.out_files > 0) {
                    reason = format!("{reason}; {}", staged(s));
                }
                if r.is_final() {
                    let attempt_state = if state == JobState::Queued { JobState::Failed } else { state };
                    self.end_attempt(&job, attempt_state, r.exit_code, &reason, r.staging.as_ref(), out);
                    self.free(agent, &r.job_id, r.epoch);
                    out.send(agent, Msg::Ack(proto::Ack { job_id: r.job_id.clone(), epoch: r.epoch }));
                }
                let reason = if state == JobState::Queued {
                    job.tail = Tail::new(self.settings.log_tail_bytes);
                    format!("attempt {} failed: {reason}; trying again", job.life.attempts)
                } else if state == JobState::Failed && r.phase == Phase::StagingFailed {
                    format!("{reason}; no attempts left (max_attempts {})", job.life.max_attempts)
                } else {
                    reason
                };
                self.transition(job, state, reason, r.exit_code, out);
            }
            Err(refusal) => {
                // A repeated report (e.g. `running` again after a reconnect) changes nothing.
                tracing::debug!(agent, job = r.job_id, %refusal, "report ignored");
                self.jobs.insert(r.job_id.clone(), job);
            }
        }
    }

    /// The agent that holds the reported attempt, when it is current and held by another agent.
    fn owner_if_foreign(&self, agent: &str, r: &AttemptReport) -> Option<String> {
        let job = self.jobs.get(&r.job_id).filter(|j| j.life.epoch == r.epoch && j.life.state.has_attempt())?;
        let owner = job.rec.agent.as_deref().unwrap_or("");
        (owner != agent).then(|| owner.to_string())
    }

    /// Refuses a report about another agent's attempt: the reporter is told to stop it (or, for a
    /// final report, that it may forget it); the owner's attempt and lease are not touched.
    fn refuse_foreign(&mut self, agent: &str, r: AttemptReport, out: &mut Effects) {
        use proto::broker_message::Msg;
        self.free(agent, &r.job_id, r.epoch);
        if r.is_final() {
            out.send(agent, Msg::Ack(proto::Ack { job_id: r.job_id, epoch: r.epoch }));
        } else {
            let reason = "not this agent's attempt: it is leased to another agent".to_string();
            let stop = proto::StopAttempt { job_id: r.job_id, attempt: r.attempt, epoch: r.epoch, reason };
            out.send(agent, Msg::Stop(stop));
        }
    }

    fn free(&mut self, agent: &str, job_id: &str, epoch: u64) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.release(job_id, epoch);
        }
    }

    fn lease_lost(&mut self, job_id: &str, epoch: u64, why: &str, out: &mut Effects) {
        let Some(mut job) = self.jobs.remove(job_id) else { return };
        let agent = job.rec.agent.clone().unwrap_or_default();
        match job.life.apply(&Input::LeaseLost { epoch }) {
            Ok(state) => {
                tracing::warn!(job = job_id, agent, epoch, "lease lost: {why}");
                self.free(&agent, job_id, epoch);
                let reason = format!("attempt {} lost on {agent}: {why}", job.life.attempts);
                self.end_attempt(&job, JobState::Failed, None, &reason, None, out);
                job.tail = Tail::new(self.settings.log_tail_bytes);
                let reason = if state == JobState::Failed {
                    format!("{reason}; no attempts left (max_attempts {})", job.life.max_attempts)
                } else {
                    reason
                };
                self.transition(job, state, reason, None, out);
            }
            Err(_) => {
                self.jobs.insert(job_id.to_string(), job);
            }
        }
    }

    /// Agents silent past the lease TTL are dropped; attempts whose lease expired are lost.
    fn expire(&mut self, now: Instant, out: &mut Effects) {
        for entry in self.agents.values_mut() {
            if entry.conn.is_some() && now.duration_since(entry.last_seen) > self.settings.lease_ttl {
                tracing::warn!(agent = entry.id, "agent lost: silent for longer than the lease");
                entry.conn = None;
            }
        }
        let expired: Vec<(String, u64)> = self
            .jobs
            .values()
            .filter(|j| j.lease_deadline.is_some_and(|d| d <= now))
            .map(|j| (j.rec.id.clone(), j.life.epoch))
            .collect();
        for (job_id, epoch) in expired {
            self.lease_lost(&job_id, epoch, "lease expired", out);
        }
    }

    /// Binds queued jobs, by priority then age, to connected agents with room (first fit).
    fn dispatch(&mut self, out: &mut Effects) {
        if self.queue.is_empty() {
            return;
        }
        if self.settings.placer.enabled() {
            return self.dispatch_placed(out);
        }
        let ids: Vec<String> =
            self.agents.iter().filter(|(_, e)| e.conn.is_some() && !e.draining).map(|(id, _)| id.clone()).collect();
        if ids.is_empty() {
            return;
        }
        let mut free: Vec<_> = ids.iter().map(|id| self.agents[id].free()).collect();
        let mut bound = Vec::new();
        for (_, job_id) in &self.queue {
            if free.iter().all(|f| f.cpus == 0) {
                break;
            }
            let job = &self.jobs[job_id];
            let req = &job.spec.resources;
            if let Some(b) = first_fit(&job.rec.tenant, req, &free) {
                let f = &mut free[b.agent];
                f.cpus -= req.cpus;
                f.memory_mib -= u64::from(req.memory_gib) * 1024;
                f.gpus.retain(|(i, _)| !b.gpu_indices.contains(i));
                bound.push((job_id.clone(), ids[b.agent].clone(), b.gpu_indices));
            }
        }
        for (job_id, agent, gpus) in bound {
            self.lease(&job_id, &agent, gpus, out);
        }
    }

    fn lease(&mut self, job_id: &str, agent: &str, gpus: Vec<u32>, out: &mut Effects) {
        let mut job = self.jobs.remove(job_id).expect("queued jobs are active");
        self.queue.remove(&(Reverse(job.rec.priority), job.rec.id.clone()));
        let entry = &self.agents[agent];
        let site = entry.site.clone();
        if job.life.state == JobState::Queued {
            job.life.apply(&Input::Place).expect("queued jobs can be placed");
            job.rec.site = Some(site.clone());
            job.rec.agent = None;
            job.rec.state = JobState::Placed;
            job.rec.updated_at = now_ms();
            self.event(&mut job, format!("placed at site {site} (first fit)"), true, out);
        }
        job.life.apply(&Input::Lease).expect("placed jobs with attempts left can be leased");
        job.rec.agent = Some(agent.to_string());
        job.lease_deadline = Some(Instant::now() + self.settings.lease_ttl);
        job.attempt_started = Some(Instant::now());
        job.tail = Tail::new(self.settings.log_tail_bytes);
        let (epoch, attempt) = (job.life.epoch, job.life.attempts);
        let alloc = Alloc {
            gpus: gpus.clone(),
            cpus: job.spec.resources.cpus,
            memory_mib: u64::from(job.spec.resources.memory_gib) * 1024,
        };
        self.agents.get_mut(agent).expect("agent exists").allocate(job_id, epoch, alloc);
        out.batch.push(Write::NewAttempt(AttemptRecord {
            job_id: job_id.to_string(),
            attempt,
            epoch,
            agent: agent.to_string(),
            gpu_indices: gpus.clone(),
            started_at: now_ms(),
        }));
        let (trace_context, dispatched) = trace::dispatch(&job, agent, &site);
        job.dispatched = dispatched;
        let assign = assignment(&job, &gpus, trace_context, &self.settings.secrets);
        metrics::dispatched(&job);
        let reason = format!("attempt {attempt} leased to {agent} (gpus {gpus:?})");
        self.transition(job, JobState::Leased, reason, None, out);
        match assign {
            Ok(assign) => out.send(agent, proto::broker_message::Msg::Assign(assign)),
            Err(e) => self.unassignable(job_id, epoch, &e, out),
        }
    }

    /// An attempt whose secrets do not open (a key id no longer in the key file, a tampered row)
    /// is never sent: it fails, and with it the job (trying again would not help).
    fn unassignable(&mut self, job_id: &str, epoch: u64, why: &SecretsError, out: &mut Effects) {
        let Some(mut job) = self.jobs.remove(job_id) else { return };
        let agent = job.rec.agent.clone().unwrap_or_default();
        match job.life.apply(&Input::AttemptFailed { epoch }) {
            Ok(state) => {
                tracing::warn!(job = job_id, agent, epoch, "attempt not sent: {why}");
                self.free(&agent, job_id, epoch);
                let reason = format!("attempt {} failed: {why}", job.life.attempts);
                self.end_attempt(&job, JobState::Failed, None, &reason, None, out);
                self.transition(job, state, reason, None, out);
            }
            Err(_) => {
                self.jobs.insert(job_id.to_string(), job);
            }
        }
    }
}

/// What an attempt's staging moved, for its final event.
fn staged(s: &StagingStats) -> String {
    let size = |bytes: u64| match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    };
    format!(
        "staged in {} files ({}, {:.1} s), out {} files ({}, {:.1} s)",
        s.in_files,
        size(s.in_bytes),
        s.in_ms as f64 / 1000.0,
        s.out_files,
        size(s.out_bytes),
        s.out_ms as f64 / 1000.0
    )
}

/// What the agent needs to run the job's current attempt on the given GPUs. The job's secrets are
/// opened here, and only here: they travel in the assignment's `env` (over mutual TLS).
fn assignment(
    job: &ActiveJob,
    gpus: &[u32],
    trace_context: HashMap<String, String>,
    secrets: &SecretKeys,
) -> Result<proto::Assignment, SecretsError> {
    let mut env: HashMap<String, String> = job.spec.env.clone().into_iter().collect();
    if let Some(sealed) = &job.rec.secret_env_sealed {
        env.extend(secrets.open(&job.rec.id, sealed)?.into_iter().map(|(k, v)| (k, v.expose().to_string())));
    }
    Ok(proto::Assignment {
        job_id: job.rec.id.clone(),
        attempt: job.life.attempts,
        epoch: job.life.epoch,
        command: job.spec.command.clone(),
        env,
        gpu_indices: gpus.to_vec(),
        max_runtime_ms: job.spec.max_runtime().as_millis() as u64,
        inputs: job
            .data
            .iter()
            .flat_map(|d| &d.inputs)
            .map(|i| proto::AssignedInput {
                path: i.path.clone(),
                size: i.size,
                md5: i.md5.clone().unwrap_or_default(),
            })
            .collect(),
        outputs: job.data.iter().flat_map(|d| &d.outputs).map(|o| o.path.clone()).collect(),
        trace_context,
        cpus: job.spec.resources.cpus,
        memory_gib: job.spec.resources.memory_gib,
    })
}

/// A submit as the core takes it.
struct Submitted {
    tenant: String,
    spec: Arc<JobSpec>,
    key: Option<String>,
    request_sha256: String,
    data: Option<Arc<JobData>>,
    trace_context: Option<String>,
    trace_parent: opentelemetry::Context,
}

fn stop(job: &ActiveJob, reason: &str) -> proto::StopAttempt {
    proto::StopAttempt {
        job_id: job.rec.id.clone(),
        attempt: job.life.attempts,
        epoch: job.life.epoch,
        reason: reason.to_string(),
    }
}

#[path = "core_place.rs"]
mod place;

#[path = "core_metrics.rs"]
mod metrics;

#[path = "core_trace.rs"]
mod trace;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
