//! Fair share in the core: the order `bind` takes queued jobs in (per site with placement on, one
//! pool of every agent without), per-tenant GPU quotas, the tenants' decayed usage (accrued as
//! attempts end, plus what running attempts used so far; kept in memory, so a restarted broker
//! starts everyone at 0), why a waiting job
//! waits (its status reason), and preemption of `preemptible: true` attempts for a waiting job.
//! The choices themselves are the pure functions of `placement::fair`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::active_job::ActiveJob;
use super::{Core, Effects};
use crate::model::state::JobState;
use crate::placement::bind::FreeCapacity;
use crate::placement::fair::preempt::{AgentRoom, Running, Wanting, Why, choose_victims};
use crate::placement::fair::{
    Amount, DEFAULT_MAX_PRIORITY, FairOrder, GpuQuota, PastUsage, Standing, Tenant, Waiting, fair_order,
};
use crate::store::Write;

/// How often the reasons of waiting jobs are refreshed while no agent has room.
const EXPLAIN_EVERY: Duration = Duration::from_secs(1);
/// Waiting jobs whose position is told exactly; behind them, "10 or more jobs ahead".
const TOLD_POSITIONS: usize = 10;
/// Waiting jobs per pool and dispatch that may look for attempts to preempt.
const PREEMPT_TRIES: usize = 8;
/// How the reason of a broker's preemption begins (the agent reports it back as the attempt's).
pub(super) const PREEMPTED_BY_BROKER: &str = "by the broker";

/// One pool's queue in fair order: a site (placement on) or every agent (`None`).
pub(super) struct PoolOrder {
    pub site: Option<String>,
    /// The sites of its agents (one, with placement on).
    pub sites: Vec<String>,
    pub total: Amount,
    pub tenants: Vec<Tenant>,
    /// Job ids, first to bind first.
    pub order: Vec<String>,
    pub standings: Vec<Standing>,
}

impl Core {
    /// Adds the ended attempt's run to its tenant's decayed usage.
    pub(super) fn accrue_usage(&mut self, job: &ActiveJob) {
        let Some(started) = job.attempt_started else { return };
        let ran = self.now.at.saturating_duration_since(started);
        let half_life = self.settings.placer.fair.half_life;
        let usage = self.usage.entry(job.tenant().to_string()).or_default();
        usage.add_run(Amount::of(&job.spec.resources), ran, self.now.ms, half_life);
    }

    /// A tenant's weight, priority cap and GPU quota per site.
    fn tenant_rules(&self, tenant: &str) -> (f64, u32, Option<u32>) {
        self.settings.tenants.get(tenant).map_or((1.0, DEFAULT_MAX_PRIORITY, None), |t| {
            (t.weight, t.max_priority.unwrap_or(DEFAULT_MAX_PRIORITY), t.max_gpus_per_site)
        })
    }

    /// Whether `bind` should order the queue now: some agent has a CPU free, or the reasons of
    /// waiting jobs are due for a refresh.
    pub(super) fn fair_due(&mut self, any_free: bool) -> bool {
        if any_free {
            return true;
        }
        let due = self.explained_at.is_none_or(|t| self.now.at.saturating_duration_since(t) >= EXPLAIN_EVERY);
        if due {
            self.explained_at = Some(self.now.at);
        }
        due
    }

    /// The queued jobs that may bind now, by pool, each pool in fair order. `sites`: the pool of
    /// each agent that takes work (its site with placement on).
    pub(super) fn fair_pools(&self, placed: bool, agents: &[(&str, &str)]) -> Vec<PoolOrder> {
        let mut queued: BTreeMap<Option<&str>, Vec<&ActiveJob>> = BTreeMap::new();
        for (_, job_id) in &self.queue {
            let job = &self.jobs[job_id];
            let pool = if placed {
                match job.site.as_deref().filter(|_| job.life.state == JobState::Placed) {
                    Some(site) => Some(site),
                    None => continue,
                }
            } else {
                None
            };
            queued.entry(pool).or_default().push(job);
        }
        let mut pools = Vec::with_capacity(queued.len());
        for (pool, jobs) in queued {
            let in_pool = |site: &str| pool.is_none_or(|p| p == site);
            let mut total = Amount::default();
            let mut sites: Vec<String> = Vec::new();
            for (id, site) in agents.iter().filter(|(_, s)| in_pool(s)) {
                total = total.plus(holding(&self.agents[*id].total()));
                if !sites.iter().any(|s| s == site) {
                    sites.push(site.to_string());
                }
            }
            let mut names: Vec<&str> = jobs.iter().map(|j| j.tenant()).collect();
            // What each tenant holds in the pool, and the usage of its running attempts so far:
            // only worth the walk where tenants wait for it together, or where an attempt might
            // be preempted (by a tenant under its share).
            let half_life = self.settings.placer.fair.half_life;
            let mut holds: HashMap<&str, (Amount, Amount)> = HashMap::new();
            if self.preemptible_jobs > 0 || names.iter().any(|n| *n != names[0]) {
                for entry in self.agents.values().filter(|e| in_pool(&e.site)) {
                    for ((job_id, _), alloc) in entry.allocations() {
                        let Some(job) = self.jobs.get(job_id) else { continue };
                        let held = Amount {
                            gpus: alloc.gpus.len() as f64,
                            cpus: f64::from(alloc.cpus),
                            memory_gib: alloc.memory_mib as f64 / 1024.0,
                        };
                        let ran =
                            job.attempt_started.map_or(Duration::ZERO, |t| self.now.at.saturating_duration_since(t));
                        let mut running = PastUsage::default();
                        running.add_run(held, ran, self.now.ms, half_life);
                        let (sum, used) = holds.entry(job.tenant()).or_default();
                        *sum = sum.plus(held);
                        *used = used.plus(running.hours(self.now.ms, half_life));
                    }
                }
            }
            names.extend(holds.keys());
            names.sort_unstable();
            names.dedup();
            let tenants: Vec<Tenant> = names
                .iter()
                .map(|name| {
                    let (weight, max_priority, _) = self.tenant_rules(name);
                    let past = self.usage.get(*name).map_or(Amount::default(), |u| u.hours(self.now.ms, half_life));
                    let (holds, running) = holds.get(name).copied().unwrap_or_default();
                    Tenant { weight, max_priority, holds, past: past.plus(running), ..Tenant::new(name) }
                })
                .collect();
            let waiting = jobs
                .iter()
                .map(|j| Waiting {
                    key: j.sub.id.clone(),
                    tenant: names.binary_search(&j.tenant()).expect("named above"),
                    priority: j.sub.priority,
                    age: j.sub.created_at,
                    asks: Amount::of(&j.spec.resources),
                })
                .collect();
            let FairOrder { order, standings } = fair_order(total, &tenants, waiting);
            pools.push(PoolOrder { site: pool.map(str::to_string), sites, total, tenants, order, standings });
        }
        pools
    }

    /// GPU quotas, with what their tenants' attempts hold at each site.
    pub(super) fn gpu_quota(&self) -> GpuQuota {
        let mut quota = GpuQuota::none();
        for (name, t) in &self.settings.tenants {
            if let Some(max) = t.max_gpus_per_site {
                quota.limit(name, max);
            }
        }
        if quota.is_empty() {
            return quota;
        }
        for entry in self.agents.values() {
            for ((job_id, _), alloc) in entry.allocations() {
                if let Some(job) = self.jobs.get(job_id) {
                    quota.hold(job.tenant(), &entry.site, alloc.gpus.len() as u32);
                }
            }
        }
        quota
    }

    /// Tells each job still waiting in a pool that tenants share (or held back by its quota)
    /// where it stands: its status reason (no event), written only when it changed. A pool of one
    /// tenant keeps the reasons it had (the last transition's).
    pub(super) fn explain_waiting(&mut self, pools: &[PoolOrder], quota: &GpuQuota, out: &mut Effects) {
        self.explained_at = Some(self.now.at);
        for pool in pools {
            let shared = pool.tenants.len() > 1;
            if !shared && quota.is_empty() {
                continue;
            }
            let at = pool.site.as_deref().map_or(String::new(), |s| format!(" at {s}"));
            let behind = format!("waiting{at}: {TOLD_POSITIONS} or more jobs ahead");
            let mut position = 0;
            for job_id in &pool.order {
                let Some(job) = self.jobs.get(job_id).filter(|j| !j.life.state.has_attempt()) else { continue };
                position += 1;
                let (tenant, gpus) = (job.tenant(), job.spec.resources.gpus);
                // Held back by its quota at every site of the pool: the first says by how much.
                let held_back = !pool.sites.is_empty() && pool.sites.iter().all(|s| !quota.allows(tenant, s, gpus));
                if !shared && !held_back {
                    continue;
                }
                let why = if position > TOLD_POSITIONS && !held_back {
                    behind.clone()
                } else {
                    let site = pool.sites.first().map_or("", String::as_str);
                    let (held, max) = quota.of(tenant, site);
                    let mut why = format!("waiting{at}: {} in line", ordinal(position));
                    if let (Some(max), true) = (max, held_back) {
                        why = format!("{why}; quota: {tenant} holds {held} of max {max} GPUs at {site}");
                    } else if let Some((s, weight)) = pool
                        .tenants
                        .iter()
                        .position(|t| t.name == tenant)
                        .map(|i| (&pool.standings[i], pool.tenants[i].weight))
                        .filter(|(s, _)| shared && s.over())
                    {
                        why = format!(
                            "{why}; tenant {tenant} over its fair share ({:.2} of the usage, fair {:.2} for weight {weight})",
                            s.share, s.fair
                        );
                    }
                    why
                };
                if job.reason != why {
                    let job = self.jobs.get_mut(job_id).expect("checked above");
                    job.reason = why;
                    out.batch.push(Write::UpdateJob { id: job_id.clone(), status: job.status() });
                }
            }
        }
    }

    /// For the first waiting jobs of each pool (in fair order), preempts running attempts that
    /// let one of them start, when `placement::fair::preempt` allows; one preemption at a time
    /// per pool (none while an earlier one is still stopping).
    pub(super) fn preempt_for_waiting(&mut self, pools: &[PoolOrder], out: &mut Effects) {
        let rules = self.settings.placer.fair;
        if self.preemptible_jobs == 0 {
            return;
        }
        for pool in pools {
            if pool.order.is_empty() {
                continue;
            }
            let in_pool = |site: &str| pool.site.as_deref().is_none_or(|p| p == site);
            let mut rooms: Vec<(String, AgentRoom<String>)> = Vec::new();
            let mut stopping = false;
            for entry in self.agents.values().filter(|e| e.takes_work() && in_pool(&e.site)) {
                let mut running = Vec::new();
                let models: HashMap<u32, &str> =
                    entry.inventory.gpus.iter().map(|g| (g.index, g.model.as_str())).collect();
                for ((job_id, epoch), alloc) in entry.allocations() {
                    let Some(job) = self.jobs.get(job_id).filter(|j| j.life.epoch == *epoch) else { continue };
                    stopping |= job.preempting;
                    let Some(tenant) = pool.tenants.iter().position(|t| t.name == job.tenant()) else { continue };
                    running.push(Running {
                        key: job_id.clone(),
                        tenant,
                        priority: job.sub.priority,
                        preemptible: job.spec.preemptible && job.life.state.has_attempt(),
                        ran: job.attempt_started.map_or(Duration::ZERO, |t| self.now.at.saturating_duration_since(t)),
                        preemptions: job.life.preemptions,
                        holds: FreeCapacity {
                            gpus: alloc.gpus.iter().map(|i| (*i, models.get(i).unwrap_or(&"").to_string())).collect(),
                            cpus: alloc.cpus,
                            memory_mib: alloc.memory_mib,
                            tenant: entry.dedicated.clone(),
                        },
                    });
                }
                rooms.push((entry.id.clone(), AgentRoom { free: entry.free(), running }));
            }
            if stopping || !rooms.iter().any(|(_, r)| r.running.iter().any(|v| v.preemptible)) {
                continue;
            }
            let (ids, rooms): (Vec<String>, Vec<AgentRoom<String>>) = rooms.into_iter().unzip();
            let waiting = pool.order.iter().filter_map(|id| self.jobs.get(id)).filter(|j| !j.life.state.has_attempt());
            let mut chosen = None;
            for job in waiting.take(PREEMPT_TRIES) {
                let Some(tenant) = pool.tenants.iter().position(|t| t.name == job.tenant()) else { continue };
                let wanting = Wanting { tenant, priority: job.sub.priority, resources: &job.spec.resources };
                if let Some(v) = choose_victims(wanting, pool.total, &pool.tenants, &rooms, &rules) {
                    chosen = Some((job.sub.id.clone(), job.tenant().to_string(), job.sub.priority, v));
                    break;
                }
            }
            let Some((for_job, tenant, priority, victims)) = chosen else { continue };
            let agent = &ids[victims.agent];
            for (victim, why) in victims.victims {
                let Some(mut job) = self.jobs.remove(&victim) else { continue };
                // The victim's tenant reads the reason: another tenant's name and job stay out of it
                // (the operators' log has them).
                let reason = match why {
                    Why::Priority => format!(
                        "{PREEMPTED_BY_BROKER} for job {for_job}: job {for_job} of {tenant} has a higher priority ({priority})"
                    ),
                    Why::FairShare => format!(
                        "{PREEMPTED_BY_BROKER}: tenant {} is over its fair share and another tenant under its own",
                        job.tenant()
                    ),
                };
                let because = reason.split_once(": ").map_or(reason.as_str(), |(_, b)| b).to_owned();
                tracing::info!(job = victim, agent, for_job, for_tenant = tenant, "preempting: {because}");
                out.send(agent, job.preempt(&reason));
                job.preempting = true;
                self.event(&mut job, format!("preempting: {because}"), false, out);
                self.jobs.insert(victim, job);
            }
        }
    }
}

/// What a capacity amounts to.
fn holding(c: &FreeCapacity) -> Amount {
    crate::placement::fair::preempt::holding(c)
}

/// 1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, …, 21st.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Whether an attempt reported `preempted` with this reason was preempted by the broker (not a
/// spot notice): the agent that ran it keeps taking work.
pub(super) fn preempted_by_broker(reason: &str) -> bool {
    reason.starts_with(PREEMPTED_BY_BROKER)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111].into_iter().map(super::ordinal).collect();
        assert_eq!(got, ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]);
    }
}
