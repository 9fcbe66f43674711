//! Placement and binding inside the core. Without `[[site]]`, queued jobs are bound by first fit
//! to any agent with room. With sites (engine placement), queued jobs are placed at the cheapest
//! allowed site on the current prices and capacity (the decision is stored with the job and its
//! summary is the `placed` event), then bound to an agent of that site with room; a job that waits
//! at its site longer than `placement.replace_after` is placed again. Both bind through the one
//! loop of `placement::bind`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Span;

use super::active_job::ActiveJob;
use super::fleet::Alloc;
use super::messages::AgentMessage;
use super::waits::{REPLAN_EVERY, SiteWaits, moves, needs_estimate, too_late};
use super::{Core, Effects, metrics, trace};
use crate::broker::placer::summary;
use crate::broker::tail::Tail;
use crate::error::ApiError;
use crate::model::data::JobData;
use crate::model::job::JobSpec;
use crate::model::state::{Input, JobState};
use crate::placement::bind::{FreeCapacity, Wanted, bind_in_order_within};
use crate::placement::engine::{Decision, RejectionKind, Verdict};
use crate::placement::request::PlacementJob;
use crate::placement::world::World;
use crate::store::{AttemptRecord, Write};

/// How long a job no site can take waits before placement tries it again.
const RETRY_UNPLACED: Duration = Duration::from_secs(1);

impl Core {
    /// Free and total resources, by site, of every connected, non-draining agent that may run
    /// `tenant`'s jobs (a node dedicated to another tenant has no room for it).
    fn capacity(&self, tenant: &str) -> HashMap<&str, (Vec<FreeCapacity>, Vec<FreeCapacity>)> {
        let mut per_site: HashMap<&str, (Vec<FreeCapacity>, Vec<FreeCapacity>)> = HashMap::new();
        for e in self.agents.values().filter(|e| e.takes_work()) {
            let total = e.total();
            if !total.admits(tenant) {
                continue;
            }
            let entry = per_site.entry(e.site.as_str()).or_default();
            entry.0.push(e.free());
            entry.1.push(total);
        }
        per_site
    }

    /// The world `tenant`'s jobs are placed in now without queue-wait estimates: enough for a job
    /// that some node has room for now, or that no busy site could hold (a decision with
    /// [`NO_ESTIMATE`] among its reasons needs [`Core::world`]).
    fn quick_world(&self, tenant: &str) -> World {
        let now = self.now.at;
        self.settings.placer.world(
            &self.capacity(tenant),
            |site| self.cloud.unavailable(site, now),
            |_| None,
            self.now.ms,
        )
    }

    /// The world `tenant`'s jobs are placed in now, and the replay of each site that needs room.
    fn world(&self, tenant: &str) -> (World, HashMap<String, SiteWaits>) {
        let now = self.now.at;
        let mut waits = HashMap::new();
        let orders = self.bind_orders();
        let world = self.settings.placer.world(
            &self.capacity(tenant),
            |site| self.cloud.unavailable(site, now),
            |site| {
                let order = orders.get(&site.name).map_or(&[][..], Vec::as_slice);
                let w = self.site_waits(&site.name, tenant, order);
                let profile = w.profile.clone();
                waits.insert(site.name.clone(), w);
                Some(profile)
            },
            self.now.ms,
        );
        (world, waits)
    }

    /// The decision for a job not yet placed: in the world without queue-wait replays, and again
    /// with them only when some site needs its estimate (as `place_due` does).
    fn decide(&self, tenant: &str, req: &PlacementJob) -> Decision {
        let placer = &self.settings.placer;
        let decision = placer.place(req, &self.quick_world(tenant));
        if needs_estimate(&decision) { placer.place(req, &self.world(tenant).0) } else { decision }
    }

    /// Whether every agent the broker knows (from the store or since) has its stream open.
    fn all_known_agents_connected(&self) -> bool {
        self.agents.values().all(|e| e.conn.is_some())
    }

    /// The tenant's monthly budget left, when it has one.
    pub(super) fn budget_left(&self, tenant: &str) -> Option<f64> {
        let budget = self.settings.placer.budget(tenant)?;
        Some(budget - self.spent.get(tenant).copied().unwrap_or(0.0))
    }

    /// Admission: a job whose policy widens its tenant's is invalid, so is one every site rejects
    /// for a reason about the job itself (an output outside its residency); with a budget, a job
    /// every site would refuse for the budget is refused now, with the numbers.
    pub(super) fn admit(&self, tenant: &str, spec: &JobSpec, data: Option<&JobData>) -> Result<(), ApiError> {
        let placer = &self.settings.placer;
        if !placer.enabled() {
            if data.is_some_and(|d| !d.outputs_resolved()) {
                return Err(ApiError::InvalidArgument(
                    "outputs: an output with `residency` needs placement to choose its location, and this broker \
                     has no [[site]] configured; give `to`"
                        .into(),
                ));
            }
            if spec.policy.is_some() {
                return Err(ApiError::InvalidArgument(
                    "policy: this broker places jobs by first fit (no [[site]] configured), so it cannot enforce \
                     a placement policy"
                        .into(),
                ));
            }
            return Ok(());
        }
        let budget_left = self.budget_left(tenant);
        let req = placer.request(tenant, spec, data, budget_left, self.now.ms).map_err(ApiError::InvalidArgument)?;
        // A reason about the job itself (an output leaving its residency) rejects every site, now
        // and later: refused now with that reason rather than queued for ever.
        if !req.outputs.is_empty()
            && let Some(why) = placer.refusal(&req)
        {
            return Err(ApiError::InvalidArgument(format!("no site can take this job: {why}")));
        }
        let timed = req.policy.deadline.is_some() || req.policy.max_wait.is_some();
        if budget_left.is_none() && !timed {
            return Ok(());
        }
        let decision = self.decide(tenant, &req);
        if let Some(why) = too_late(&decision) {
            return Err(ApiError::InvalidArgument(format!("no site can finish this job in time: {why}")));
        }
        let budget = decision.candidates.iter().find_map(|c| match &c.verdict {
            Verdict::Rejected(why) if why.kind == RejectionKind::Budget => Some(why.clone()),
            _ => None,
        });
        match (&decision.chosen, budget) {
            (None, Some(why)) => {
                Err(ApiError::ResourceExhausted(format!("tenant {tenant} cannot afford this job this month: {why}")))
            }
            _ => Ok(()),
        }
    }

    /// The decision placement would take for this job now (a dry run).
    pub(super) fn plan(&self, tenant: &str, spec: &JobSpec, data: Option<&JobData>) -> Result<Decision, ApiError> {
        let placer = &self.settings.placer;
        if !placer.enabled() {
            return Err(ApiError::FailedPrecondition(
                "this broker places jobs by first fit: no [[site]] is configured, so there is nothing to plan".into(),
            ));
        }
        let req = placer
            .request(tenant, spec, data, self.budget_left(tenant), self.now.ms)
            .map_err(ApiError::InvalidArgument)?;
        Ok(self.decide(tenant, &req))
    }

    /// Places queued jobs (engine placement) and binds them to agents with room.
    pub(super) fn dispatch(&mut self, out: &mut Effects) {
        if self.queue.is_empty() {
            return;
        }
        if self.settings.placer.enabled() {
            self.place_due(out);
        }
        self.bind(out);
    }

    /// Places queued jobs (and jobs waiting too long at their site).
    fn place_due(&mut self, out: &mut Effects) {
        let now = self.now.at;
        let placer = self.settings.placer.clone();
        // Capacity and the world are built only when some job is due (not on every batch); with
        // dedicated nodes, once per tenant (each sees only the nodes that may run its jobs).
        // The replays (queue-wait estimates) only when a job needs one: most jobs find room now.
        let mut quick: HashMap<String, World> = HashMap::new();
        let mut worlds: HashMap<String, (World, HashMap<String, SiteWaits>)> = HashMap::new();
        let per_tenant = self.agents.values().any(|e| e.dedicated.is_some());
        let mut decisions: Vec<(String, Decided)> = Vec::new();
        let mut unplaced: Vec<(String, String, Option<Decided>)> = Vec::new();
        let mut stay: Vec<String> = Vec::new();
        let held = self.placement_hold_until.is_some_and(|t| now < t && !self.all_known_agents_connected());
        // Replans come in rounds, at most one per REPLAN_EVERY, so that a long queue costs one
        // world (and one replay per busy site) every round, not one per job.
        let replan = self.next_replan.is_none_or(|t| now >= t);
        for (_, job_id) in &self.queue {
            let job = &self.jobs[job_id];
            // Placed again after `replace_after`, or at once when its site's launch failed
            // (forced); looked at again now and then while it waits, and moved when another
            // site has become clearly better (a replan).
            let forced = job.life.state == JobState::Placed
                && (job.placed_at.is_some_and(|t| now.duration_since(t) >= placer.replace_after)
                    || job.next_placement.is_some_and(|t| t <= now));
            let due = match job.life.state {
                JobState::Queued => !held && job.next_placement.is_none_or(|t| t <= now),
                JobState::Placed => forced || (replan && job.replan_at.is_some_and(|t| t <= now)),
                _ => false,
            };
            if !due {
                continue;
            }
            let budget_left = self.budget_left(job.tenant());
            let mut req =
                match placer.request(job.tenant(), &job.spec, job.data.as_deref(), budget_left, job.sub.created_at) {
                    Ok(req) => req,
                    Err(why) => {
                        unplaced.push((job_id.clone(), format!("not placed: {why}"), None));
                        continue;
                    }
                };
            let key = if per_tenant { job.tenant() } else { "" };
            // A job retried after "no site can take it" gets a span only when the answer changes.
            let span = job.next_placement.is_none().then(|| trace::place_span(job));
            let started = std::time::Instant::now();
            let decision = {
                let _entered = span.as_ref().map(Span::enter);
                let first = (job.life.state == JobState::Queued).then(|| {
                    let world = quick.entry(key.to_string()).or_insert_with(|| self.quick_world(job.tenant()));
                    placer.place(&req, world)
                });
                match first.filter(|d| !needs_estimate(d)) {
                    Some(decision) => decision,
                    None => {
                        let (world, waits) = worlds.entry(key.to_string()).or_insert_with(|| self.world(job.tenant()));
                        if let Some(site) = job.site.as_deref().filter(|_| job.life.state == JobState::Placed) {
                            req.waiting_at = waits.get(site).and_then(|w| w.of(site, job_id));
                        }
                        placer.place(&req, world)
                    }
                }
            };
            metrics::decision_time(started.elapsed());
            if job.life.state == JobState::Placed && !forced && !moves(job.site.as_deref(), &decision) {
                stay.push(job_id.clone());
            } else if decision.chosen.is_some() {
                decisions.push((job_id.clone(), Decided { decision, span }));
            } else {
                unplaced.push((job_id.clone(), summary(&decision), Some(Decided { decision, span })));
            }
        }
        if replan {
            self.next_replan = Some(now + REPLAN_EVERY);
        }
        for job_id in stay {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.replan_at = Some(now + REPLAN_EVERY);
            }
        }
        for (job_id, Decided { decision, span }) in decisions {
            self.placed(&job_id, decision, span, out);
        }
        for (job_id, why, decision) in unplaced {
            let mut job = self.jobs.remove(&job_id).expect("queued jobs are active");
            job.next_placement = Some(now + RETRY_UNPLACED);
            if job.reason != why {
                if let Some(Decided { decision, span }) = decision {
                    let span = span.unwrap_or_else(|| trace::place_span(&job));
                    trace::record_decision(&span, &decision);
                }
                self.event(&mut job, why, false, out);
            }
            self.jobs.insert(job_id, job);
        }
    }

    /// Records a decision: the job is placed at the chosen site (again, if it was already placed).
    fn placed(&mut self, job_id: &str, decision: Decision, span: Option<Span>, out: &mut Effects) {
        let Some(chosen) = &decision.chosen else { return };
        let mut job = self.jobs.remove(job_id).expect("queued jobs are active");
        let span = span.unwrap_or_else(|| trace::place_span(&job));
        trace::record_decision(&span, &decision);
        if job.life.state == JobState::Queued {
            job.life.apply(&Input::Place).expect("queued jobs can be placed");
        }
        let reason = summary(&decision);
        job.site = Some(chosen.site.clone());
        job.agent = None;
        job.updated_at = self.now.ms;
        job.placement_json = Some(serde_json::to_string(&decision).expect("decisions serialise").into());
        job.decision = Some(Arc::new(decision));
        job.placed_at = Some(self.now.at);
        job.next_placement = None;
        job.replan_at = Some(self.now.at + REPLAN_EVERY);
        self.event(&mut job, reason, true, out);
        self.jobs.insert(job_id.to_string(), job);
    }

    /// Binds jobs to agents with room (first fit), in fair order (`fair`: weighted fair share
    /// between tenants, then capped priority and age within a tenant) and within GPU quotas:
    /// without sites, queued jobs to any connected agent that takes work (one pool); with sites,
    /// placed jobs to their site's agents (a pool per site). Jobs left waiting are told why, and
    /// may preempt running `preemptible` attempts.
    fn bind(&mut self, out: &mut Effects) {
        let placed = self.settings.placer.enabled();
        let placer = self.settings.placer.clone();
        let takes = |e: &&super::AgentEntry| e.takes_work() && (!placed || placer.knows_site(&e.site));
        let any_free = self.agents.values().filter(takes).any(|e| e.free().cpus > 0);
        if !self.fair_due(any_free) {
            return;
        }
        let (pools, quota, bound) = {
            let agents: Vec<(&str, &str)> =
                self.agents.values().filter(takes).map(|e| (e.id.as_str(), e.site.as_str())).collect();
            if agents.is_empty() {
                return;
            }
            let pools = self.fair_pools(placed, &agents);
            let mut quota = self.gpu_quota();
            let free: Vec<(&str, FreeCapacity)> =
                agents.iter().map(|(id, site)| (*site, self.agents[*id].free())).collect();
            let jobs = pools.iter().flat_map(|p| &p.order).map(|job_id| {
                let job = &self.jobs[job_id];
                let site = if placed { job.site.as_deref() } else { None };
                (job_id.as_str(), Wanted { tenant: job.tenant(), resources: &job.spec.resources, site })
            });
            let bound: Vec<(String, String, Vec<u32>)> = bind_in_order_within(free, jobs, &mut quota)
                .into_iter()
                .map(|(job_id, b)| (job_id.to_string(), agents[b.agent].0.to_string(), b.gpu_indices))
                .collect();
            (pools, quota, bound)
        };
        for (job_id, agent, gpus) in bound {
            self.lease(&job_id, &agent, gpus, out);
        }
        self.explain_waiting(&pools, &quota, out);
        self.preempt_for_waiting(&pools, out);
    }

    /// Leases the job's next attempt to `agent` on `gpus` (placing it at the agent's site first,
    /// under first fit) and sends the assignment.
    fn lease(&mut self, job_id: &str, agent: &str, gpus: Vec<u32>, out: &mut Effects) {
        let mut job = self.jobs.remove(job_id).expect("queued jobs are active");
        self.queue.remove(&job.queue_key());
        let site = self.agents[agent].site.clone();
        if job.life.state == JobState::Queued {
            job.life.apply(&Input::Place).expect("queued jobs can be placed");
            job.site = Some(site.clone());
            job.agent = None;
            job.updated_at = self.now.ms;
            self.event(&mut job, format!("placed at site {site} (first fit)"), true, out);
        }
        job.life.apply(&Input::Lease).expect("placed jobs with attempts left can be leased");
        job.agent = Some(agent.to_string());
        job.lease_deadline = Some(self.now.at + self.settings.lease_ttl);
        job.attempt_started = Some(self.now.at);
        job.preempting = false;
        job.tail = Tail::new(self.settings.log_tail_bytes);
        let (epoch, attempt) = (job.life.epoch, job.life.attempts);
        let resources = &job.spec.resources;
        let alloc =
            Alloc { gpus: gpus.clone(), cpus: resources.cpus, memory_mib: u64::from(resources.memory_gib) * 1024 };
        self.agents.get_mut(agent).expect("agent exists").allocate(job_id, epoch, alloc);
        let (trace_context, dispatched) = trace::dispatch(&job, agent, &site);
        job.dispatched = dispatched;
        let assign = job.assignment(&gpus, trace_context, &self.settings.secrets);
        let waited = job.placed_at.map(|t| self.now.at.saturating_duration_since(t));
        metrics::dispatched(&job, self.now.ms, waited);
        let reason = format!("attempt {attempt} leased to {agent} (gpus {gpus:?})");
        out.batch.push(Write::NewAttempt(AttemptRecord {
            job_id: job_id.to_string(),
            attempt,
            epoch,
            agent: agent.to_string(),
            gpu_indices: gpus,
            started_at: self.now.ms,
        }));
        self.transition(job, reason, None, out);
        match assign {
            Ok(assign) => out.send(agent, AgentMessage::Assign(assign)),
            Err(e) => self.unassignable(job_id, epoch, &e, out),
        }
    }

    /// What an ended attempt cost: its runtime at the hourly price it was placed on; added to
    /// the tenant's spend.
    pub(super) fn accrue(&mut self, job: &ActiveJob) -> Option<f64> {
        let decision = job.decision.as_ref()?;
        let chosen = decision.chosen.as_ref()?;
        let ran = self.now.at.saturating_duration_since(job.attempt_started?);
        if let Some(agent) = &job.agent {
            self.instance_busy(agent, ran);
        }
        let hours = ran.as_secs_f64() / 3600.0;
        let cost = chosen.offer.cost.usd_per_hour * hours;
        *self.spent.entry(job.sub.tenant.clone()).or_default() += cost;
        Some(cost)
    }
}

/// The first millisecond of the current month (UTC), from which spend counts against budgets.
pub(super) fn month_start(now: crate::model::UnixMillis) -> crate::model::UnixMillis {
    let days = now.div_euclid(86_400_000);
    // Civil from days (Howard Hinnant's algorithm), then back to the 1st of that month.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day_of_month = doy - (153 * mp + 2) / 5; // 0-based
    (days - day_of_month) * 86_400_000
}

/// A decision taken this round, with the span opened before it (none for a job retried after
/// "no site can take it", whose span opens only when the answer changes).
struct Decided {
    decision: Decision,
    span: Option<Span>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn months_start_on_the_first() {
        // 2026-11-27T14:00:00Z → 2026-11-01T00:00:00Z; 2024-02-29 → 2024-02-01; 2026-01-01 itself.
        assert_eq!(super::month_start(1_795_788_000_000), 1_793_491_200_000);
        assert_eq!(super::month_start(1_709_208_000_000), 1_706_745_600_000);
        assert_eq!(super::month_start(1_767_225_600_000), 1_767_225_600_000);
    }
}
