//! Agents and their attempts: registration and reconnect reconciliation (adopt, send again, or
//! lose), reports fenced by epoch, leases renewed only by their own agent, and expiry.

use std::time::Instant;

use super::active_job::ActiveJob;
use super::fair::preempted_by_broker;
use super::fleet::{AgentEntry, Alloc};
use super::jobs::staged;
use super::messages::{AgentMessage, StopAttempt};
use super::{Core, Effects, trace};
use crate::broker::secrets::SecretsError;
use crate::broker::tail::Tail;
use crate::model::agent::{AttemptReport, Inventory, Isolation, Phase};
use crate::model::state::{Input, JobState};
use crate::placement::bind::fit;
use crate::store::Write;

/// Who registered: the agent's id, where it runs, and its inventory.
pub(super) struct Registration {
    pub agent: String,
    pub site: String,
    pub node: String,
    pub inventory: Inventory,
    pub cert_not_after: crate::model::UnixMillis,
}

impl Core {
    /// A message arrived on the agent's current stream: it is alive, and so are its leases, the
    /// current attempts that are its own (an attempt it holds resources for but that is leased to
    /// another agent is never renewed by it). The leases are renewed lazily: see [`Core::lease_deadline`].
    pub(super) fn touch(&mut self, agent: &str, conn: u64) -> bool {
        let Some(entry) = self.agents.get_mut(agent).filter(|e| e.conn == Some(conn)) else {
            return false;
        };
        entry.last_seen = self.now.at;
        true
    }

    /// When the job's lease expires: a lease runs for one TTL from when it was granted, and from
    /// each message on its own agent's current stream (computed here rather than written into
    /// every job the agent holds on every message).
    pub(super) fn lease_deadline(&self, job: &ActiveJob) -> Option<Instant> {
        let granted = job.lease_deadline?;
        let renewed = self.renewed(job).map_or(granted, |r| r.max(granted));
        Some(renewed)
    }

    /// The deadline the job's own agent's last message gives its lease, when that agent holds it.
    fn renewed(&self, job: &ActiveJob) -> Option<Instant> {
        let entry = self.agents.get(job.agent.as_deref()?)?;
        entry.holds(&job.sub.id, job.life.epoch).then(|| entry.last_seen + self.settings.lease_ttl)
    }

    /// An agent registered on stream `conn`, reporting the attempts it holds.
    pub(super) fn connected(
        &mut self,
        registration: Registration,
        reports: Vec<AttemptReport>,
        conn: u64,
        out: &mut Effects,
    ) {
        let Registration { agent, site, node, inventory, cert_not_after } = registration;
        tracing::info!(agent, gpus = inventory.gpus.len(), attempts = reports.len(), "agent registered");
        let now = self.now;
        let entry = self.agents.entry(agent.clone()).or_insert_with(|| AgentEntry::new(&agent, &site, &node, now.at));
        entry.dedicated = crate::config::dedicated_to(&self.settings.dedicated, &agent).cloned();
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
        entry.cert_not_after = cert_not_after;
        if let Some(old) = entry.conn.replace(conn) {
            out.closed.push((agent.clone(), old));
        }
        entry.last_seen = now.at;
        out.send(
            &agent,
            AgentMessage::Registered {
                agent_id: agent.clone(),
                heartbeat_interval: self.settings.heartbeat_interval,
                lease_ttl: self.settings.lease_ttl,
            },
        );
        out.batch.push(Write::Agent(entry.record(now.ms)));
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
                j.life.epoch == r.epoch && j.life.state.has_attempt() && j.agent.as_deref() == Some(agent.as_str())
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
            .filter(|j| j.life.state.has_attempt() && j.agent.as_deref() == Some(agent.as_str()))
            .map(|j| (j.sub.id.clone(), j.life.epoch))
            .filter(|key| !reports.iter().any(|r| (&r.job_id, r.epoch) == (&key.0, key.1)))
            .collect();
        for (job_id, epoch) in held {
            // An assignment the agent never received (its stream broke first) is sent again, with
            // the same epoch; an attempt it had started and no longer has is lost.
            let mut alloc = previous.remove(&(job_id.clone(), epoch));
            if let Some(job) = self.jobs.get(&job_id).filter(|j| alloc.is_none() && j.life.state == JobState::Leased) {
                // After a broker restart nothing is booked yet: book the job's needs afresh.
                let r = &job.spec.resources;
                alloc = fit(job.tenant(), r, &self.agents[&agent].free()).map(|gpus| Alloc {
                    gpus,
                    cpus: r.cpus,
                    memory_mib: u64::from(r.memory_gib) * 1024,
                });
            }
            match (self.jobs.get(&job_id), alloc) {
                (Some(job), Some(alloc)) if job.life.state == JobState::Leased => {
                    let (trace_context, _) = trace::dispatch(job, &agent, &self.agents[&agent].site);
                    let assign = job.assignment(&alloc.gpus, trace_context, &self.settings.secrets);
                    self.agents.get_mut(&agent).expect("entry inserted above").allocate(&job_id, epoch, alloc);
                    match assign {
                        Ok(assign) => {
                            tracing::info!(job = job_id, agent, epoch, "assignment sent again after a reconnect");
                            out.send(&agent, AgentMessage::Assign(assign));
                        }
                        Err(e) => self.unassignable(&job_id, epoch, &e, out),
                    }
                }
                _ => self.lease_lost(&job_id, epoch, "the agent reconnected without the attempt", out),
            }
        }
        self.touch(&agent, conn);
        for r in reports {
            self.report(&agent, r, out);
        }
    }

    /// Applies one report from `agent`'s current stream.
    pub(super) fn report(&mut self, agent: &str, r: AttemptReport, out: &mut Effects) {
        let current = self.jobs.get(&r.job_id).is_some_and(|j| j.life.epoch == r.epoch && j.life.state.has_attempt());
        if !current {
            // Stale (a newer attempt exists), cancelled or unknown: refuse and tell the agent.
            tracing::warn!(agent, job = r.job_id, epoch = r.epoch, "refused report about a stale or unknown attempt");
            if r.is_final() {
                self.free(agent, &r.job_id, r.epoch);
                out.send(agent, AgentMessage::Ack { job_id: r.job_id, epoch: r.epoch });
            } else {
                let reason = "stale attempt: the job moved on".to_string();
                let stop = StopAttempt { job_id: r.job_id, attempt: r.attempt, epoch: r.epoch, reason, preempt: false };
                out.send(agent, AgentMessage::Stop(stop));
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
            Phase::Preempted => Input::Preempted { epoch: r.epoch },
        };
        match job.life.apply(&input) {
            Ok(state) => {
                let mut reason = match (r.phase, r.exit_code) {
                    (Phase::Running, _) => "started".to_string(),
                    (Phase::Exited, Some(code)) if r.reason.is_empty() => format!("exited with code {code}"),
                    (Phase::Preempted, _) => format!("preempted: {}", r.reason),
                    _ => r.reason.clone(),
                };
                if let Some(s) = r.staging.as_ref().filter(|s| s.in_files + s.out_files > 0) {
                    reason = format!("{reason}; {}", staged(s));
                }
                if r.is_final() {
                    let attempt_state = if state == JobState::Queued { JobState::Failed } else { state };
                    self.end_attempt(&job, attempt_state, r.exit_code, &reason, r.staging.as_ref(), out);
                    self.free(agent, &r.job_id, r.epoch);
                    out.send(agent, AgentMessage::Ack { job_id: r.job_id.clone(), epoch: r.epoch });
                }
                let reason = if r.phase == Phase::Preempted {
                    if !job.preempting && !preempted_by_broker(&r.reason) {
                        // The instance is going away: no new work for its agent.
                        let _ = self.set_draining(agent, true, "spot interruption notice", out);
                        // Its pool is left out for a while: the job goes on-demand or elsewhere.
                        if let Some(chosen) = job.decision.as_ref().and_then(|d| d.chosen.clone()) {
                            self.pool_interrupted(&chosen.site, &chosen.offer);
                        }
                    }
                    job.preempting = false;
                    job.tail = Tail::new(self.settings.log_tail_bytes);
                    format!(
                        "{reason}; placed again (attempt {} not counted: {} of max_attempts {} used)",
                        job.life.attempts,
                        job.life.counted_attempts(),
                        job.life.max_attempts
                    )
                } else if state == JobState::Queued {
                    job.tail = Tail::new(self.settings.log_tail_bytes);
                    format!("attempt {} failed: {reason}; trying again", job.life.attempts)
                } else if state == JobState::Failed && r.phase == Phase::StagingFailed {
                    format!("{reason}; no attempts left (max_attempts {})", job.life.max_attempts)
                } else {
                    reason
                };
                self.transition(job, reason, r.exit_code, out);
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
        let owner = job.agent.as_deref().unwrap_or("");
        (owner != agent).then(|| owner.to_string())
    }

    /// Refuses a report about another agent's attempt: the reporter is told to stop it (or, for a
    /// final report, that it may forget it); the owner's attempt and lease are not touched.
    fn refuse_foreign(&mut self, agent: &str, r: AttemptReport, out: &mut Effects) {
        self.free(agent, &r.job_id, r.epoch);
        if r.is_final() {
            out.send(agent, AgentMessage::Ack { job_id: r.job_id, epoch: r.epoch });
        } else {
            let reason = "not this agent's attempt: it is leased to another agent".to_string();
            let stop = StopAttempt { job_id: r.job_id, attempt: r.attempt, epoch: r.epoch, reason, preempt: false };
            out.send(agent, AgentMessage::Stop(stop));
        }
    }

    pub(super) fn free(&mut self, agent: &str, job_id: &str, epoch: u64) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.release(job_id, epoch);
        }
    }

    pub(super) fn lease_lost(&mut self, job_id: &str, epoch: u64, why: &str, out: &mut Effects) {
        let Some(mut job) = self.jobs.remove(job_id) else { return };
        let agent = job.agent.clone().unwrap_or_default();
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
                self.transition(job, reason, None, out);
            }
            Err(_) => {
                self.jobs.insert(job_id.to_string(), job);
            }
        }
    }

    /// Agents silent past the lease TTL are dropped; attempts whose lease expired by `now` are lost.
    pub(super) fn expire(&mut self, now: Instant, out: &mut Effects) {
        for entry in self.agents.values_mut() {
            if let Some(conn) = entry.conn
                && now.saturating_duration_since(entry.last_seen) > self.settings.lease_ttl
            {
                tracing::warn!(agent = entry.id, "agent lost: silent for longer than the lease");
                entry.conn = None;
                out.closed.push((entry.id.clone(), conn));
            }
        }
        let mut expired: Vec<(String, u64)> = Vec::new();
        let mut renewed: Vec<(String, Instant)> = Vec::new();
        for job in self.jobs.values().filter(|j| j.lease_deadline.is_some_and(|d| d <= now)) {
            match self.lease_deadline(job) {
                Some(deadline) if deadline > now => renewed.push((job.sub.id.clone(), deadline)),
                _ => expired.push((job.sub.id.clone(), job.life.epoch)),
            }
        }
        for (job_id, deadline) in renewed {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.lease_deadline = Some(deadline);
            }
        }
        for (job_id, epoch) in expired {
            self.lease_lost(&job_id, epoch, "lease expired", out);
        }
    }

    /// An attempt whose secrets do not open (a key id no longer in the key file, a tampered row)
    /// is never sent: it fails, and with it the job (trying again would not help).
    pub(super) fn unassignable(&mut self, job_id: &str, epoch: u64, why: &SecretsError, out: &mut Effects) {
        let Some(mut job) = self.jobs.remove(job_id) else { return };
        let agent = job.agent.clone().unwrap_or_default();
        match job.life.apply(&Input::AttemptFailed { epoch }) {
            Ok(_) => {
                tracing::warn!(job = job_id, agent, epoch, "attempt not sent: {why}");
                self.free(&agent, job_id, epoch);
                let reason = format!("attempt {} failed: {why}", job.life.attempts);
                self.end_attempt(&job, JobState::Failed, None, &reason, None, out);
                self.transition(job, reason, None, out);
            }
            Err(_) => {
                self.jobs.insert(job_id.to_string(), job);
            }
        }
    }
}
