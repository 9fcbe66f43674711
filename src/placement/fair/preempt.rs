//! Which running attempts a waiting job may preempt, when no agent has room for it.
//!
//! A victim is `preemptible: true`, has run at least `preempt_min_runtime`, was preempted fewer
//! than `max_preemptions` times (so nothing flaps and nothing starves), and either (a) belongs to
//! the waiting job's tenant with a lower (capped) priority, or (b) belongs to another tenant that
//! is over its fair share while the waiting job's tenant is under its own, and the swap does not
//! turn the order round: after it the waiting job's tenant still has no more weighted share than
//! the victim's. The victims are taken on one agent, fewest first, lowest priority and shortest
//! run first, and only those needed for the job to fit.

use std::time::Duration;

use super::{Amount, FairRules, Tenant, standings};
use crate::model::job::Resources;
use crate::placement::bind::{FreeCapacity, fit};

/// One running attempt that might be preempted.
#[derive(Debug, Clone)]
pub struct Running<K> {
    pub key: K,
    /// Index into the tenants given with it.
    pub tenant: usize,
    /// As submitted (capped by its tenant's `max_priority` here).
    pub priority: u32,
    pub preemptible: bool,
    /// How long the attempt has run.
    pub ran: Duration,
    /// How often the job was preempted before.
    pub preemptions: u32,
    /// What it holds on its agent.
    pub holds: FreeCapacity,
}

/// One agent: its free room and its running attempts.
#[derive(Debug, Clone)]
pub struct AgentRoom<K> {
    pub free: FreeCapacity,
    pub running: Vec<Running<K>>,
}

/// The waiting job.
#[derive(Debug, Clone, Copy)]
pub struct Wanting<'a> {
    pub tenant: usize,
    pub priority: u32,
    pub resources: &'a Resources,
}

/// Why a victim may be preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A higher-priority job of its own tenant waits.
    Priority,
    /// Its tenant is over its fair share and the waiting job's tenant under.
    FairShare,
}

/// The attempts to preempt on one agent (an index into those given).
#[derive(Debug, Clone, PartialEq)]
pub struct Victims<K> {
    pub agent: usize,
    pub victims: Vec<(K, Why)>,
}

/// The fewest running attempts to preempt, all on one agent, so that `job` fits there; `None`
/// when no such set exists. `total` is the pool's resources (for shares).
pub fn choose_victims<K: Clone>(
    job: Wanting<'_>,
    total: Amount,
    tenants: &[Tenant],
    agents: &[AgentRoom<K>],
    rules: &FairRules,
) -> Option<Victims<K>> {
    let me = tenants.get(job.tenant)?;
    let capped = |tenant: usize, p: u32| p.min(tenants.get(tenant).map_or(0, |t| t.max_priority));
    let standing = standings(total, tenants, |i| i == job.tenant);
    let under = standing[job.tenant].share < standing[job.tenant].fair;
    let mine_after = me.holds.plus(me.past).plus(Amount::of(job.resources)).dominant_share(total) / me.weight;
    // The best so far, with the GPUs it frees.
    let mut best: Option<(Victims<K>, u32)> = None;
    for (agent, room) in agents.iter().enumerate() {
        let mut eligible: Vec<(&Running<K>, Why)> = room
            .running
            .iter()
            .filter(|r| r.preemptible && r.ran >= rules.preempt_min_runtime && r.preemptions < rules.max_preemptions)
            .filter_map(|r| {
                if r.tenant == job.tenant {
                    (capped(job.tenant, job.priority) > capped(r.tenant, r.priority)).then_some((r, Why::Priority))
                } else {
                    let over = standing.get(r.tenant).is_some_and(|s| s.over());
                    (under && over).then_some((r, Why::FairShare))
                }
            })
            .collect();
        eligible.sort_by_key(|(r, _)| (capped(r.tenant, r.priority), r.ran));
        // Greedy, then drop every victim not needed; the fair-share victims of one tenant must
        // leave it with at least the waiting tenant's weighted share.
        let mut taken: Vec<(&Running<K>, Why)> = Vec::new();
        let mut found = false;
        for v in eligible {
            if v.1 == Why::FairShare && !keeps_order(&taken, v.0, tenants, total, mine_after) {
                continue;
            }
            taken.push(v);
            if fits(tenants, job, &room.free, &taken) {
                found = true;
                break;
            }
        }
        if !found {
            continue;
        }
        let mut i = taken.len();
        while i > 0 {
            i -= 1;
            let without: Vec<(&Running<K>, Why)> =
                taken.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, v)| *v).collect();
            if fits(tenants, job, &room.free, &without) {
                taken = without;
            }
        }
        let gpus: u32 = taken.iter().map(|(r, _)| r.holds.gpus.len() as u32).sum();
        let better = best.as_ref().is_none_or(|(v, g)| (taken.len(), gpus) < (v.victims.len(), *g));
        if better {
            let victims = taken.iter().map(|(r, why)| (r.key.clone(), *why)).collect();
            best = Some((Victims { agent, victims }, gpus));
        }
    }
    best.map(|(victims, _)| victims)
}

/// Whether `job` fits in `free` plus what `victims` hold.
fn fits<K>(tenants: &[Tenant], job: Wanting<'_>, free: &FreeCapacity, victims: &[(&Running<K>, Why)]) -> bool {
    let mut room = free.clone();
    for (v, _) in victims {
        room.gpus.extend(v.holds.gpus.iter().cloned());
        room.cpus += v.holds.cpus;
        room.memory_mib += v.holds.memory_mib;
    }
    room.gpus.sort();
    fit(&tenants[job.tenant].name, job.resources, &room).is_some()
}

/// Whether the victim's tenant, without `victim` and the victims already taken from it, still
/// has at least `mine_after` (the waiting tenant's weighted share once its job runs).
fn keeps_order<K>(
    taken: &[(&Running<K>, Why)],
    victim: &Running<K>,
    tenants: &[Tenant],
    total: Amount,
    mine_after: f64,
) -> bool {
    let t = &tenants[victim.tenant];
    let lost = taken
        .iter()
        .map(|(r, _)| r)
        .filter(|r| r.tenant == victim.tenant)
        .chain(std::iter::once(&victim))
        .fold(Amount::default(), |sum, r| sum.plus(holding(&r.holds)));
    let theirs_after = t.holds.minus(lost).plus(t.past).dominant_share(total) / t.weight;
    mine_after <= theirs_after
}

/// What an attempt's holding amounts to.
pub fn holding(h: &FreeCapacity) -> Amount {
    Amount { gpus: h.gpus.len() as f64, cpus: f64::from(h.cpus), memory_gib: h.memory_mib as f64 / 1024.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(600);

    fn gpu(i: u32) -> (u32, String) {
        (i, "H100-80GB".to_string())
    }

    fn cap(gpus: &[u32], cpus: u32) -> FreeCapacity {
        FreeCapacity {
            gpus: gpus.iter().map(|&i| gpu(i)).collect(),
            cpus,
            memory_mib: u64::from(cpus) * 1024,
            tenant: None,
        }
    }

    fn running(key: &'static str, tenant: usize, priority: u32, gpus: &[u32]) -> Running<&'static str> {
        Running { key, tenant, priority, preemptible: true, ran: MIN, preemptions: 0, holds: cap(gpus, 1) }
    }

    fn one_gpu() -> Resources {
        Resources { gpus: 1, gpu_model: vec![], cpus: 1, memory_gib: 1 }
    }

    fn tenants(holds: &[f64]) -> Vec<Tenant> {
        let names = ["acme", "globex", "initech"];
        holds
            .iter()
            .zip(names)
            .map(|(&h, n)| Tenant { holds: Amount { gpus: h, cpus: h, memory_gib: h }, ..Tenant::new(n) })
            .collect()
    }

    const TOTAL: Amount = Amount { gpus: 2.0, cpus: 16.0, memory_gib: 16.0 };

    fn choose(
        job: Wanting<'_>,
        tenants: &[Tenant],
        agents: &[AgentRoom<&'static str>],
    ) -> Option<Victims<&'static str>> {
        choose_victims(job, TOTAL, tenants, agents, &FairRules::default())
    }

    #[test]
    fn a_higher_priority_job_preempts_its_own_tenants_lower_one() {
        let r = one_gpu();
        let agents =
            [AgentRoom { free: cap(&[], 14), running: vec![running("low", 0, 1, &[0]), running("mid", 0, 5, &[1])] }];
        let t = tenants(&[2.0]);
        let urgent = Wanting { tenant: 0, priority: 9, resources: &r };
        assert_eq!(choose(urgent, &t, &agents), Some(Victims { agent: 0, victims: vec![("low", Why::Priority)] }));
        let equal = Wanting { tenant: 0, priority: 1, resources: &r };
        assert_eq!(choose(equal, &t, &agents), None, "an equal priority preempts nothing");
    }

    #[test]
    fn priority_is_capped_before_it_preempts() {
        let r = one_gpu();
        let agents = [AgentRoom { free: cap(&[], 14), running: vec![running("low", 0, 5, &[0, 1])] }];
        let mut t = tenants(&[2.0]);
        t[0].max_priority = 5;
        assert_eq!(choose(Wanting { tenant: 0, priority: 100, resources: &r }, &t, &agents), None);
    }

    #[test]
    fn a_tenant_under_its_share_preempts_one_over_it() {
        let r = one_gpu();
        let agents =
            [AgentRoom { free: cap(&[], 14), running: vec![running("g1", 1, 0, &[0]), running("g2", 1, 0, &[1])] }];
        // globex holds both GPUs; acme holds nothing: one GPU goes to acme.
        let t = tenants(&[0.0, 2.0]);
        let got = choose(Wanting { tenant: 0, priority: 0, resources: &r }, &t, &agents).unwrap();
        assert_eq!(got.victims.len(), 1);
        assert_eq!(got.victims[0].1, Why::FairShare);
        // At 1:1 nobody is over its share: nothing is preempted (no flapping back).
        let agents =
            [AgentRoom { free: cap(&[], 14), running: vec![running("g1", 1, 0, &[0]), running("a1", 0, 0, &[1])] }];
        let t = tenants(&[1.0, 1.0]);
        assert_eq!(choose(Wanting { tenant: 0, priority: 0, resources: &r }, &t, &agents), None);
        assert_eq!(choose(Wanting { tenant: 1, priority: 0, resources: &r }, &t, &agents), None);
    }

    #[test]
    fn only_preemptible_attempts_that_ran_long_enough_and_were_not_preempted_too_often() {
        let r = one_gpu();
        let t = tenants(&[2.0]);
        let urgent = Wanting { tenant: 0, priority: 9, resources: &r };
        let with = |f: fn(&mut Running<&'static str>)| {
            let mut v = running("v", 0, 1, &[0, 1]);
            f(&mut v);
            [AgentRoom { free: cap(&[], 14), running: vec![v] }]
        };
        assert!(choose(urgent, &t, &with(|_| {})).is_some());
        assert!(choose(urgent, &t, &with(|v| v.preemptible = false)).is_none());
        assert!(choose(urgent, &t, &with(|v| v.ran = MIN - Duration::from_secs(1))).is_none());
        assert!(choose(urgent, &t, &with(|v| v.preemptions = 3)).is_none());
    }

    #[test]
    fn the_fewest_victims_on_one_agent_and_only_those_needed() {
        let two = Resources { gpus: 2, ..one_gpu() };
        let t = tenants(&[4.0]);
        let agents = [
            AgentRoom { free: cap(&[], 8), running: vec![running("a", 0, 0, &[0]), running("b", 0, 0, &[1])] },
            AgentRoom { free: cap(&[], 8), running: vec![running("cpu", 0, 0, &[]), running("c", 0, 1, &[0, 1])] },
        ];
        let got = choose(Wanting { tenant: 0, priority: 9, resources: &two }, &t, &agents).unwrap();
        assert_eq!(got, Victims { agent: 1, victims: vec![("c", Why::Priority)] }, "the CPU-only job is not needed");
        // Split across agents, nothing fits.
        let agents = [
            AgentRoom { free: cap(&[], 8), running: vec![running("a", 0, 0, &[0])] },
            AgentRoom { free: cap(&[], 8), running: vec![running("b", 0, 0, &[0])] },
        ];
        assert_eq!(choose(Wanting { tenant: 0, priority: 9, resources: &two }, &t, &agents), None);
    }
}
