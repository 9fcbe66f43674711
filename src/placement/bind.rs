//! First-fit binding of jobs to agents' free resources — one loop for plain first fit and for
//! binding jobs placed at a site to that site's agents — and the one place where a node dedicated
//! to a tenant (`[[dedicated]]` in the broker's config) refuses other tenants' jobs.

use std::collections::HashMap;

use super::fair::GpuQuota;
use crate::model::job::Resources;

/// One agent's free resources, as the dispatcher sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeCapacity {
    /// Healthy, unallocated GPUs: (index, canonical model).
    pub gpus: Vec<(u32, String)>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The only tenant whose jobs this agent may run (a dedicated node); `None`: any tenant.
    pub tenant: Option<String>,
}

impl FreeCapacity {
    /// Whether `tenant`'s jobs may run here at all: the tenant filter of dedicated nodes.
    pub fn admits(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// Where a job goes: which agent (index into the slice given) and which of its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub agent: usize,
    pub gpu_indices: Vec<u32>,
}

/// The GPUs of `free` that fit `tenant`'s job needing `req`, or `None` when the agent cannot take
/// the job (too little room, or a node dedicated to another tenant).
pub fn fit(tenant: &str, req: &Resources, free: &FreeCapacity) -> Option<Vec<u32>> {
    if !free.admits(tenant) || req.cpus > free.cpus || u64::from(req.memory_gib) * 1024 > free.memory_mib {
        return None;
    }
    let wanted = req.gpus as usize;
    let gpus: Vec<u32> = free
        .gpus
        .iter()
        .filter(|(_, model)| req.gpu_model.is_empty() || req.gpu_model.contains(model))
        .map(|(index, _)| *index)
        .take(wanted)
        .collect();
    (gpus.len() == wanted).then_some(gpus)
}

/// The first agent (in the given order) that fits `tenant`'s job.
pub fn first_fit(tenant: &str, req: &Resources, agents: &[FreeCapacity]) -> Option<Binding> {
    agents
        .iter()
        .enumerate()
        .find_map(|(agent, free)| fit(tenant, req, free).map(|gpu_indices| Binding { agent, gpu_indices }))
}

/// One job to bind: whose it is, what it needs, and the site it must run at (`None`: any agent).
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub tenant: &'a str,
    pub resources: &'a Resources,
    pub site: Option<&'a str>,
}

/// Binds jobs, in the order given, each to the first agent (in the order given, of its site when
/// it names one) with room; what a job takes is booked before the next one is bound. `agents` are
/// (site, free capacity); a binding's `agent` indexes them. Stops early once no agent has a CPU left.
pub fn bind_in_order<'a, K>(
    agents: Vec<(&'a str, FreeCapacity)>,
    jobs: impl IntoIterator<Item = (K, Wanted<'a>)>,
) -> Vec<(K, Binding)> {
    bind_in_order_within(agents, jobs, &mut GpuQuota::none())
}

/// [`bind_in_order`] where no tenant takes more GPUs at a site than its quota allows; what is
/// bound is held in `quota` too.
pub fn bind_in_order_within<'a, K>(
    agents: Vec<(&'a str, FreeCapacity)>,
    jobs: impl IntoIterator<Item = (K, Wanted<'a>)>,
    quota: &mut GpuQuota,
) -> Vec<(K, Binding)> {
    let (sites, mut free): (Vec<&str>, Vec<FreeCapacity>) = agents.into_iter().unzip();
    // Agents by site, built when the first job names a site (plain first fit never does).
    let mut by_site: Option<HashMap<&str, Vec<usize>>> = None;
    let everyone: Vec<usize> = (0..free.len()).collect();
    let mut with_cpus = free.iter().filter(|f| f.cpus > 0).count();
    let mut bound = Vec::new();
    for (key, wanted) in jobs {
        if with_cpus == 0 {
            break;
        }
        let candidates = match wanted.site {
            None => everyone.as_slice(),
            Some(site) => {
                let by_site = by_site.get_or_insert_with(|| {
                    let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
                    for (i, site) in sites.iter().enumerate() {
                        map.entry(*site).or_default().push(i);
                    }
                    map
                });
                by_site.get(site).map_or(&[][..], Vec::as_slice)
            }
        };
        let gpus = wanted.resources.gpus;
        let found = candidates
            .iter()
            .filter(|&&i| quota.allows(wanted.tenant, sites[i], gpus))
            .find_map(|&i| fit(wanted.tenant, wanted.resources, &free[i]).map(|gpus| (i, gpus)));
        let Some((agent, gpu_indices)) = found else { continue };
        quota.hold(wanted.tenant, sites[agent], gpus);
        let f = &mut free[agent];
        let had_cpus = f.cpus > 0;
        book(f, wanted.resources, &gpu_indices);
        if had_cpus && f.cpus == 0 {
            with_cpus -= 1;
        }
        bound.push((key, Binding { agent, gpu_indices }));
    }
    bound
}

/// Takes what a job bound to `free` with `gpus` needs out of it.
fn book(free: &mut FreeCapacity, req: &Resources, gpus: &[u32]) {
    free.cpus -= req.cpus;
    free.memory_mib -= u64::from(req.memory_gib) * 1024;
    free.gpus.retain(|(i, _)| !gpus.contains(i));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn agent(gpus: &[(u32, &str)], cpus: u32, memory_gib: u64) -> FreeCapacity {
        FreeCapacity {
            gpus: gpus.iter().map(|(i, m)| (*i, (*m).to_string())).collect(),
            cpus,
            memory_mib: memory_gib * 1024,
            tenant: None,
        }
    }

    fn job(gpus: u32, models: &[&str], cpus: u32, memory_gib: u32) -> Resources {
        Resources { gpus, gpu_model: models.iter().map(|m| m.to_string()).collect(), cpus, memory_gib }
    }

    #[test]
    fn picks_first_agent_with_matching_gpus() {
        let agents = [agent(&[(0, "L4-24GB")], 8, 32), agent(&[(0, "H100-80GB"), (1, "H100-80GB")], 8, 32)];
        let b = first_fit("acme", &job(2, &["H100-80GB", "A100-80GB"], 4, 16), &agents).unwrap();
        assert_eq!(b, Binding { agent: 1, gpu_indices: vec![0, 1] });
        assert_eq!(first_fit("acme", &job(1, &[], 1, 1), &agents).unwrap().agent, 0);
    }

    #[test]
    fn refuses_when_cpu_memory_or_gpus_short() {
        let agents = [agent(&[(0, "H100-80GB")], 4, 8)];
        assert_eq!(first_fit("acme", &job(2, &[], 1, 1), &agents), None);
        assert_eq!(first_fit("acme", &job(0, &[], 5, 1), &agents), None);
        assert_eq!(first_fit("acme", &job(0, &[], 1, 9), &agents), None);
        assert_eq!(first_fit("acme", &job(1, &["A100-80GB"], 1, 1), &agents), None);
    }

    #[test]
    fn a_dedicated_agent_takes_only_its_tenants_jobs() {
        let dedicated = FreeCapacity { tenant: Some("acme".into()), ..agent(&[(0, "H100-80GB")], 8, 32) };
        let shared = agent(&[(0, "L4-24GB")], 8, 32);
        let gpu_job = job(1, &[], 1, 1);
        assert_eq!(fit("acme", &gpu_job, &dedicated), Some(vec![0]));
        assert_eq!(fit("globex", &gpu_job, &dedicated), None, "another tenant's job never fits a dedicated node");
        assert_eq!(fit("globex", &gpu_job, &shared), Some(vec![0]), "a shared node takes any tenant");
        // First fit skips the dedicated node for other tenants, whatever its room.
        let agents = [dedicated, shared];
        assert_eq!(first_fit("acme", &gpu_job, &agents).unwrap().agent, 0);
        assert_eq!(first_fit("globex", &gpu_job, &agents).unwrap().agent, 1);
        assert_eq!(first_fit("globex", &gpu_job, &agents[..1]), None);
    }

    #[test]
    fn jobs_are_bound_in_order_to_their_sites_agents_and_booked() {
        let agents = vec![
            ("lab", agent(&[(0, "H100-80GB")], 4, 16)),
            ("cloud", agent(&[(0, "H100-80GB"), (1, "H100-80GB")], 8, 32)),
            ("lab", agent(&[], 2, 4)),
        ];
        let gpu = job(1, &[], 2, 4);
        let small = job(0, &[], 2, 4);
        let wanted = |resources, site| Wanted { tenant: "acme", resources, site };
        let jobs = [
            ("a", wanted(&gpu, Some("lab"))),
            ("b", wanted(&gpu, Some("lab"))), // lab's only GPU is taken by a
            ("c", wanted(&small, None)),      // any agent: the first with room
            ("d", wanted(&small, Some("lab"))),
            ("e", wanted(&gpu, Some("mars"))), // no such site
        ];
        let bound: Vec<(&str, usize, Vec<u32>)> =
            bind_in_order(agents, jobs).into_iter().map(|(k, b)| (k, b.agent, b.gpu_indices)).collect();
        assert_eq!(bound, [("a", 0, vec![0]), ("c", 0, vec![]), ("d", 2, vec![])]);
    }

    #[test]
    fn binding_stops_once_no_agent_has_a_cpu_left() {
        let one = job(0, &[], 1, 1);
        let jobs = (0..5).map(|i| (i, Wanted { tenant: "acme", resources: &one, site: None }));
        let bound = bind_in_order(vec![("lab", agent(&[], 2, 8))], jobs);
        assert_eq!(bound.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn a_tenant_at_its_quota_gets_no_more_gpus_at_that_site() {
        let agents = vec![
            ("lab", agent(&[(0, "H100-80GB"), (1, "H100-80GB")], 8, 32)),
            ("cloud", agent(&[(0, "H100-80GB")], 8, 32)),
        ];
        let gpu = job(1, &[], 1, 1);
        let mut quota = GpuQuota::none();
        quota.limit("acme", 1);
        let jobs = [("a1", "acme"), ("a2", "acme"), ("g1", "globex")]
            .map(|(k, tenant)| (k, Wanted { tenant, resources: &gpu, site: None }));
        let bound: Vec<(&str, usize)> =
            bind_in_order_within(agents, jobs, &mut quota).into_iter().map(|(k, b)| (k, b.agent)).collect();
        // acme's second job goes to the next site; globex has no quota.
        assert_eq!(bound, [("a1", 0), ("a2", 1), ("g1", 0)]);
        assert_eq!(quota.of("acme", "lab"), (1, Some(1)));
    }

    proptest! {
        /// A binding never hands out more than is free, nor a GPU of an unwanted model.
        #[test]
        fn binding_respects_capacity(
            free_gpus in 0u32..8, cpus in 0u32..32, mem in 0u64..64,
            want_gpus in 0u32..8, want_cpus in 1u32..32, want_mem in 1u32..64,
        ) {
            let gpus: Vec<(u32, &str)> = (0..free_gpus).map(|i| (i, if i % 2 == 0 { "H100-80GB" } else { "L4-24GB" })).collect();
            let agents = [agent(&gpus, cpus, mem)];
            let req = job(want_gpus, &["H100-80GB"], want_cpus, want_mem);
            if let Some(b) = first_fit("acme", &req, &agents) {
                prop_assert_eq!(b.gpu_indices.len() as u32, want_gpus);
                prop_assert!(b.gpu_indices.iter().all(|i| i % 2 == 0));
                prop_assert!(want_cpus <= cpus && u64::from(want_mem) <= mem);
            } else {
                prop_assert!(want_cpus > cpus || u64::from(want_mem) > mem || want_gpus > free_gpus.div_ceil(2));
            }
        }
    }
}
