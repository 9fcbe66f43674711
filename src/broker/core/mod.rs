//! The broker's core: a state machine that owns the live state of every unfinished job and every
//! agent. It takes commands in batches, with the clock passed in, and returns each batch's effects
//! (store writes, replies, agent messages, job events); it does no I/O. The [`Driver`] around it
//! reads the store at start, commits each batch's writes in one transaction (group commit) and
//! only then releases that batch's replies, messages and events, so nothing is acknowledged or
//! dispatched that a crash could lose. A failed commit stops the driver (crash-only: a restarted
//! broker reloads from the store).
//!
//! The parts: `fleet` (agents and what their attempts hold), `jobs` (live jobs: submit, cancel,
//! transitions), `attempts` (agents' reports, leases, fencing, reconnects), `place` (placement and
//! binding), `trace` and `metrics`, `driver` (the loop around the store). The services talk to it
//! through [`Cmd`] and hear from it through [`AgentMessage`]; `proto` stays at their edge.

mod active_job;
mod attempts;
mod capacity;
mod driver;
mod fair;
mod fleet;
mod jobs;
mod messages;
mod metrics;
mod place;
mod renewals;
mod revocations;
mod shutdown;
mod tokens;
mod trace;
mod waits;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_capacity;
#[cfg(test)]
mod tests_fair;
#[cfg(test)]
mod tests_fleet;
#[cfg(test)]
mod tests_store;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

pub use capacity::{Call, CallResult, CapacityCmd, InstanceView, LaunchState, SiteView, StepReply};
pub use driver::Driver;
pub use fleet::{AgentEntry, AgentView, Alloc};
pub use messages::{AgentMessage, AssignedInput, Assignment, RenewedCert, StopAttempt};
pub use revocations::Revoke;
pub use tokens::{JoinToken, Refusal, Scope, TokenCmd, TokenView};

use super::keys::{self, KeyRing, KeyView};
use super::placer::Placer;
use super::secrets::SecretKeys;
use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::model::UnixMillis;
use crate::model::agent::{AttemptReport, Inventory};
use crate::model::data::JobData;
use crate::model::job::JobSpec;
use crate::placement::engine::Decision;
use crate::store::{AgentRecord, AttemptOutput, Batch, JobEvent, JobRecord, KeyRecord, StoreError, Write};
use active_job::ActiveJob;

/// An idempotency key's job and the hash of the request that created it.
pub type KeyedJob = (String, Option<String>);
/// Idempotency keys found in the store: (tenant, key) → job.
pub type FoundKeys = HashMap<(String, String), KeyedJob>;

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

/// Where the driver sends one agent's messages (its stream).
pub type Outbox = mpsc::Sender<AgentMessage>;

/// One open stream to an agent: its id, and where its messages go (kept by the driver).
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: u64,
    pub outbox: Outbox,
}

/// What the services ask of the core.
pub enum Cmd {
    Submit(Submit),
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
        /// The NotAfter of the stream's certificate (0: unknown).
        cert_not_after: UnixMillis,
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
    /// The stream's certificate was renewed on it: valid until `not_after` now.
    CertRenewed {
        agent: String,
        conn: u64,
        not_after: UnixMillis,
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
    /// No new work for the agent; `actor` (an identity URI) is kept in the audit trail.
    Drain {
        agent: String,
        actor: String,
        reply: Reply<AgentView>,
    },
    /// The agent takes new work again.
    Undrain {
        agent: String,
        actor: String,
        reply: Reply<AgentView>,
    },
    /// Forget an agent that is gone: refused while it is connected unless `force` (then its
    /// stream is closed and its attempts are lost and queued again).
    RemoveAgent {
        agent: String,
        force: bool,
        actor: String,
        reply: Reply<AgentView>,
    },
    /// The broker is stopping: every connected agent is told to reconnect (after a pause drawn
    /// below `jitter` from `seed`) and its stream ends; the reply (after the commit of every
    /// command queued before) says how many were told.
    Shutdown {
        jitter: Duration,
        seed: u64,
        reply: oneshot::Sender<usize>,
    },
    AddKey {
        tenant: String,
        reply: Reply<(KeyView, String)>,
    },
    RevokeKey {
        key_id: String,
        reply: Reply<KeyView>,
    },
    /// A certificate revocation (by identity or serial); an agent's stream ends, its attempts are lost.
    Revoke(Revoke),
    /// Join tokens: create, list, revoke, check and spend (`tokens`).
    Token(TokenCmd),
    /// Cloud capacity: the controller's steps, the sites' view (`capacity`).
    Capacity(CapacityCmd),
}

/// A submit as the core takes it.
pub struct Submit {
    pub tenant: String,
    pub spec: Arc<JobSpec>,
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of the submitted document.
    pub request_sha256: String,
    /// The job's data as resolved (inputs listed, outputs' locations), when it has any.
    pub data: Option<Arc<JobData>>,
    /// The submission's trace context: as JSON (stored with the job) and as the parent of the
    /// job's spans.
    pub trace_context: Option<String>,
    pub trace_parent: opentelemetry::Context,
    /// The job's id and whether an earlier submit with the same key made it.
    pub reply: Reply<(String, bool)>,
}

impl Cmd {
    /// The idempotency key of a submit that has one: (tenant, key).
    pub fn idempotency_key(&self) -> Option<(String, String)> {
        match self {
            Cmd::Submit(Submit { tenant, idempotency_key: Some(key), .. }) => Some((tenant.clone(), key.clone())),
            _ => None,
        }
    }
}

/// What an attempt's URLs are minted from.
#[derive(Debug, Clone)]
pub struct AttemptData {
    pub tenant: String,
    pub attempt: u32,
    pub data: Arc<JobData>,
}

/// The core's clock: a monotonic instant for leases and waits, and wall-clock milliseconds for
/// what is stored.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub ms: UnixMillis,
}

impl Now {
    pub fn system() -> Self {
        Self { at: Instant::now(), ms: now_ms() }
    }

    /// `d` later, on both clocks.
    pub fn after(self, d: Duration) -> Self {
        Self { at: self.at + d, ms: self.ms + d.as_millis() as i64 }
    }
}

/// What a batch produced: its writes (job events among them), and what the driver releases only
/// after their commit.
#[derive(Default)]
pub struct Effects {
    pub batch: Batch,
    /// Replies to send, in order.
    pub replies: Vec<Box<dyn FnOnce() + Send>>,
    /// Messages for agents' current streams.
    pub messages: Vec<(String, AgentMessage)>,
    /// Streams to close: (agent, stream id); a stream that is no longer the agent's stays.
    pub closed: Vec<(String, u64)>,
    /// Streams to end after this batch's messages were sent on them: (agent, stream id).
    pub ended: Vec<(String, u64)>,
    /// Idempotency keys found in the store, and those submitted in this batch.
    keys: FoundKeys,
}

impl Effects {
    /// The batch's job events (for watchers, once committed), in order.
    pub fn events(&self) -> impl Iterator<Item = &JobEvent> {
        self.batch.writes.iter().filter_map(|w| match w {
            Write::Event(ev) => Some(ev),
            _ => None,
        })
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: Result<T, ApiError>) {
        self.after_commit(move || {
            let _ = reply.send(value);
        });
    }

    fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.replies.push(Box::new(f));
    }

    fn send(&mut self, agent: &str, msg: AgentMessage) {
        self.messages.push((agent.to_string(), msg));
    }
}

/// What the store holds for the core at start.
pub struct Stored {
    pub last_event_seq: u64,
    /// Each tenant's spend this month.
    pub spent: HashMap<String, f64>,
    pub keys: Vec<KeyRecord>,
    pub agents: Vec<AgentRecord>,
    /// Every join token (hashes only).
    pub join_tokens: Vec<crate::store::JoinTokenRecord>,
    /// Launches not ended, and those ended this month.
    pub launches: Vec<crate::store::LaunchRecord>,
    /// Every unfinished job.
    pub jobs: Vec<JobRecord>,
}

pub struct Core {
    settings: CoreSettings,
    jobs: HashMap<String, ActiveJob>,
    /// Queued and placed jobs, by priority then age (ids are time ordered).
    queue: BTreeSet<(Reverse<u32>, String)>,
    /// By id, so first fit walks them in a stable order.
    agents: BTreeMap<String, AgentEntry>,
    /// Unfinished jobs per tenant (for `max_queued_jobs`).
    unfinished: HashMap<String, u32>,
    next_seq: u64,
    /// Each tenant's spend this month (actual cost of ended attempts), for budgets.
    spent: HashMap<String, f64>,
    /// After a restart, agents the store knows get one lease period to reconnect before engine
    /// placement runs: until then their sites would look empty and jobs would spill to the cloud.
    placement_hold_until: Option<Instant>,
    /// When waiting jobs are next looked at again (replans come in rounds, one world each).
    next_replan: Option<Instant>,
    /// The clock of the batch being applied.
    now: Now,
    /// Set by [`Cmd::Shutdown`] (its jitter and seed): agents that register are told to reconnect.
    stopping: Option<(Duration, u64)>,
    /// Join tokens (`tokens`).
    tokens: tokens::Tokens,
    /// Launches of capacity providers and pools left out of placement (`capacity`).
    cloud: capacity::Capacity,
    /// Each tenant's decayed usage, for fair share (`fair`); in memory only.
    usage: HashMap<String, crate::placement::fair::PastUsage>,
    /// When the reasons of waiting jobs were last refreshed (`fair`).
    explained_at: Option<Instant>,
    /// Unfinished `preemptible: true` jobs: while there are none, fair share needs no holdings
    /// of tenants with nothing waiting.
    preemptible_jobs: usize,
}

/// The broker's clock for stored timestamps.
pub(super) fn now_ms() -> UnixMillis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Core {
    /// A core with nothing yet: no jobs, no agents.
    pub fn new(settings: CoreSettings, now: Now) -> Self {
        Core {
            settings,
            jobs: HashMap::new(),
            queue: BTreeSet::new(),
            agents: BTreeMap::new(),
            unfinished: HashMap::new(),
            next_seq: 1,
            spent: HashMap::new(),
            placement_hold_until: None,
            next_replan: None,
            now,
            stopping: None,
            tokens: tokens::Tokens::default(),
            cloud: capacity::Capacity::default(),
            usage: HashMap::new(),
            explained_at: None,
            preemptible_jobs: 0,
        }
    }

    /// A core holding what the store holds. Attempts in flight get one lease period for their
    /// agents to reconnect and report them.
    pub fn restore(settings: CoreSettings, stored: Stored, now: Now) -> Result<Self, StoreError> {
        let mut core = Core::new(settings, now);
        core.next_seq = stored.last_event_seq + 1;
        core.spent = stored.spent;
        core.tokens = tokens::Tokens::load(stored.join_tokens);
        core.cloud = capacity::Capacity::load(stored.launches, now);
        for key in stored.keys {
            core.settings.keys.insert(key);
        }
        for a in stored.agents {
            let age = Duration::from_millis(now.ms.saturating_sub(a.last_seen).max(0) as u64);
            let mut entry = AgentEntry::new(&a.id, &a.site, &a.node, now.at.checked_sub(age).unwrap_or(now.at));
            entry.dedicated = crate::config::dedicated_to(&core.settings.dedicated, &a.id).cloned();
            entry.inventory = serde_json::from_str(&a.inventory_json).unwrap_or_default();
            entry.draining = a.draining;
            entry.cert_not_after = a.cert_not_after;
            core.agents.insert(a.id, entry);
        }
        for rec in stored.jobs {
            let job = ActiveJob::restore(rec, &core.settings, now)?;
            if !job.life.state.has_attempt() {
                core.queue.insert((Reverse(job.sub.priority), job.sub.id.clone()));
            }
            *core.unfinished.entry(job.sub.tenant.clone()).or_default() += 1;
            core.preemptible_jobs += usize::from(job.spec.preemptible);
            core.jobs.insert(job.sub.id.clone(), job);
        }
        if !core.agents.is_empty() && core.settings.placer.enabled() {
            core.placement_hold_until = Some(now.at + core.settings.lease_ttl);
        }
        tracing::info!(active_jobs = core.jobs.len(), "job store loaded");
        Ok(core)
    }

    /// Applies a batch of commands at `now`: `found` holds the batch's idempotency keys that the
    /// store knows; with `expire`, lease expiry runs too. Queued jobs are then placed and bound.
    /// The effects are for the driver to commit and release.
    pub fn step(&mut self, cmds: impl IntoIterator<Item = Cmd>, found: FoundKeys, expire: bool, now: Now) -> Effects {
        self.now = now;
        let mut out = Effects { keys: found, ..Effects::default() };
        for cmd in cmds {
            self.handle(cmd, &mut out);
        }
        // A stopping broker has sent its agents to the next one: their leases are for that one to
        // judge, not lost here.
        if expire && self.stopping.is_none() {
            self.expire(now.at, &mut out);
        }
        self.dispatch(&mut out);
        for (key_id, at) in self.settings.keys.take_unpersisted_uses() {
            out.batch.push(Write::KeyUsed { key_id, at });
        }
        out
    }

    /// The agent's stream `conn` broke (its outbox is full or gone): it counts as disconnected.
    pub fn stream_lost(&mut self, agent: &str, conn: u64) {
        if let Some(entry) = self.agents.get_mut(agent).filter(|e| e.conn == Some(conn)) {
            tracing::warn!(agent, "agent stream is full or closed; dropping it");
            entry.conn = None;
        }
    }

    fn handle(&mut self, cmd: Cmd, out: &mut Effects) {
        match cmd {
            Cmd::Submit(submit) => {
                let reply = submit.reply;
                let submit = jobs::Submitted {
                    tenant: submit.tenant,
                    spec: submit.spec,
                    key: submit.idempotency_key,
                    request_sha256: submit.request_sha256,
                    data: submit.data,
                    trace_context: submit.trace_context,
                    trace_parent: submit.trace_parent,
                };
                let result = self.submit(submit, out);
                out.reply(reply, result);
            }
            Cmd::Plan { tenant, spec, data, reply } => {
                let _ = reply.send(self.plan(&tenant, &spec, data.as_deref()));
            }
            Cmd::Progress { agent, conn, job_id, epoch, text } => {
                if self.touch(&agent, conn)
                    && let Some(mut job) = self.jobs.remove(&job_id)
                {
                    if job.life.epoch == epoch && job.agent.as_deref() == Some(agent.as_str()) {
                        self.event(&mut job, text, false, out);
                    }
                    self.jobs.insert(job_id, job);
                }
            }
            Cmd::AttemptData { agent, job_id, epoch, reply } => {
                let _ = reply.send(self.attempt_data(&agent, &job_id, epoch));
            }
            Cmd::Drain { agent, actor, reply } => {
                let result = self.set_draining(&agent, true, &actor, out);
                out.reply(reply, result);
            }
            Cmd::Undrain { agent, actor, reply } => {
                let result = self.set_draining(&agent, false, &actor, out);
                out.reply(reply, result);
            }
            Cmd::RemoveAgent { agent, force, actor, reply } => {
                let result = self.remove_agent(&agent, force, &actor, out);
                out.reply(reply, result);
            }
            Cmd::Shutdown { jitter, seed, reply } => {
                let told = self.shutdown(jitter, seed, out);
                out.after_commit(move || {
                    let _ = reply.send(told);
                });
            }
            Cmd::AddKey { tenant, reply } => {
                let (record, key) = keys::generate(&tenant, self.now.ms);
                out.batch.push(Write::NewKey(record.clone()));
                let ring = self.settings.keys.clone();
                out.after_commit(move || {
                    let key_id = record.key_id.clone();
                    ring.insert(record);
                    let view = ring.view(&key_id).expect("just inserted");
                    let _ = reply.send(Ok((view, key)));
                });
            }
            Cmd::RevokeKey { key_id, reply } => {
                if self.settings.keys.view(&key_id).is_none() {
                    out.reply(reply, Err(ApiError::NotFound(format!("key {key_id} not found"))));
                } else {
                    out.batch.push(Write::RevokeKey { key_id: key_id.clone(), at: self.now.ms });
                    let ring = self.settings.keys.clone();
                    out.after_commit(move || {
                        ring.revoke(&key_id);
                        let _ = reply.send(Ok(ring.view(&key_id).expect("exists")));
                    });
                }
            }
            Cmd::Token(cmd) => self.token_cmd(cmd, out),
            Cmd::Capacity(cmd) => self.capacity_cmd(cmd, out),
            Cmd::Cancel { job_id, tenant, reason, reply } => {
                let result = self.cancel(&job_id, tenant.as_deref(), reason, out);
                out.reply(reply, result);
            }
            Cmd::Connected { agent, site, node, cert_not_after, inventory, attempts, conn } => {
                self.capacity_enrolled(&agent, &site, &node, out);
                let registration = attempts::Registration { agent, site, node, inventory, cert_not_after };
                self.connected(registration, attempts, conn.id, out);
                self.refuse_while_stopping(out);
            }
            Cmd::Disconnected { agent, conn } => {
                if let Some(entry) = self.agents.get_mut(&agent).filter(|e| e.conn == Some(conn)) {
                    tracing::info!(agent, "agent stream closed");
                    entry.conn = None;
                    out.closed.push((agent, conn));
                }
            }
            Cmd::CertRenewed { agent, conn, not_after } => self.cert_renewed(&agent, conn, not_after, out),
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
                        .filter(|j| j.life.epoch == epoch && j.agent.as_deref() == Some(agent.as_str()))
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
                out.after_commit(move || {
                    let _ = reply.send(live);
                });
            }
            Cmd::Agents { reply } => {
                let _ = reply.send(self.agents.values().map(|e| e.view(self.now.at)).collect());
            }
            Cmd::Revoke(revoke) => self.revoke(revoke, out),
        }
    }

    /// The data of the attempt `agent` holds of `job_id` at `epoch`.
    fn attempt_data(&self, agent: &str, job_id: &str, epoch: u64) -> Result<AttemptData, ApiError> {
        let found = self
            .jobs
            .get(job_id)
            .filter(|j| j.life.epoch == epoch && j.life.state.has_attempt() && j.agent.as_deref() == Some(agent));
        match found {
            Some(j) => {
                Ok(AttemptData { tenant: j.sub.tenant.clone(), attempt: j.life.attempts, data: j.effective_data() })
            }
            None => Err(ApiError::FailedPrecondition(format!(
                "job {job_id} epoch {epoch} is not an attempt of agent {agent} (stale, finished or unknown)"
            ))),
        }
    }
}
