//! Fair share between tenants on one pool of agents (a site, or every agent under plain first
//! fit): the order in which waiting jobs are bound, per-tenant GPU quotas per site, and (in
//! [`preempt`]) which running attempts a waiting job may preempt. Pure and deterministic.
//!
//! A tenant's **share** of a pool is dominant-resource (DRF): the largest of its fractions of the
//! pool's GPUs, CPUs and memory, counting what it holds there now plus its decayed past usage in
//! resource-hours (an hour of a GPU used, decayed with `fair_share_half_life`, counts like a GPU
//! held: past usage outweighs the holdings of the moment, so over time the tenants' GPU-hours
//! follow their weights even where GPUs do not divide evenly), divided by its weight. The order takes, again and again, the tenant with the lowest share, gives it its next
//! job (by `min(priority, max_priority)`, then age) and books that job's resources to it, so one
//! order costs O(jobs × log tenants).

pub mod preempt;
mod usage;

#[cfg(test)]
mod sim_tests;

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use crate::model::job::Resources;

pub use usage::PastUsage;

/// The priority cap of a tenant without `max_priority`.
pub const DEFAULT_MAX_PRIORITY: u32 = 100;

/// GPUs, CPUs and memory (GiB): what a job asks, what a tenant holds, what a pool has.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Amount {
    pub gpus: f64,
    pub cpus: f64,
    pub memory_gib: f64,
}

impl Amount {
    /// What a job asks.
    pub fn of(r: &Resources) -> Self {
        Self { gpus: f64::from(r.gpus), cpus: f64::from(r.cpus), memory_gib: f64::from(r.memory_gib) }
    }

    pub fn plus(self, o: Amount) -> Self {
        Self { gpus: self.gpus + o.gpus, cpus: self.cpus + o.cpus, memory_gib: self.memory_gib + o.memory_gib }
    }

    /// `self - o`, never below 0.
    pub fn minus(self, o: Amount) -> Self {
        Self {
            gpus: (self.gpus - o.gpus).max(0.0),
            cpus: (self.cpus - o.cpus).max(0.0),
            memory_gib: (self.memory_gib - o.memory_gib).max(0.0),
        }
    }

    pub fn scaled(self, f: f64) -> Self {
        Self { gpus: self.gpus * f, cpus: self.cpus * f, memory_gib: self.memory_gib * f }
    }

    /// The largest fraction of `total` this is, over the resources `total` has (DRF).
    pub fn dominant_share(self, total: Amount) -> f64 {
        let frac = |x: f64, t: f64| if t > 0.0 { x / t } else { 0.0 };
        frac(self.gpus, total.gpus).max(frac(self.cpus, total.cpus)).max(frac(self.memory_gib, total.memory_gib))
    }
}

/// How fair share and preemption behave (`[placement]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairRules {
    /// Past usage counts half as much after this long (`fair_share_half_life`).
    pub half_life: Duration,
    /// An attempt runs at least this long before it may be preempted (`preempt_min_runtime`).
    pub preempt_min_runtime: Duration,
    /// A job is preempted at most this many times; then it runs to its end (`max_preemptions`).
    pub max_preemptions: u32,
}

impl Default for FairRules {
    fn default() -> Self {
        Self {
            half_life: Duration::from_secs(24 * 3600),
            preempt_min_runtime: Duration::from_secs(600),
            max_preemptions: 3,
        }
    }
}

/// One tenant as fair share sees it in a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    /// `weight` (default 1, always > 0).
    pub weight: f64,
    /// `max_priority` (default [`DEFAULT_MAX_PRIORITY`]).
    pub max_priority: u32,
    /// What its attempts hold in the pool now.
    pub holds: Amount,
    /// Its decayed past usage in resource-hours ([`PastUsage::hours`]).
    pub past: Amount,
}

impl Tenant {
    /// A tenant with weight 1, the default cap, holding nothing.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            weight: 1.0,
            max_priority: DEFAULT_MAX_PRIORITY,
            holds: Amount::default(),
            past: Amount::default(),
        }
    }

    /// Its dominant share of `total` (holdings and past), not divided by weight.
    pub fn share(&self, total: Amount) -> f64 {
        self.holds.plus(self.past).dominant_share(total)
    }

    /// Its share divided by its weight: fair share gives the next job to the lowest.
    pub fn weighted_share(&self, total: Amount) -> f64 {
        self.share(total) / self.weight
    }
}

/// One waiting job.
#[derive(Debug, Clone)]
pub struct Waiting<K> {
    pub key: K,
    /// Index into the tenants given with it.
    pub tenant: usize,
    /// As submitted; capped by the tenant's `max_priority` here.
    pub priority: u32,
    /// Lower is older (submit time, say): age breaks priority ties.
    pub age: i64,
    pub asks: Amount,
}

/// A tenant's place in a pool, for explanations and preemption.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    /// Its part of the usage (holdings and past, dominant share) of the tenants present.
    pub share: f64,
    /// The part its weight entitles it to among the tenants present (holding or waiting).
    pub fair: f64,
}

impl Standing {
    pub fn over(&self) -> bool {
        self.share > self.fair
    }
}

/// The order to bind a pool's waiting jobs in, and each tenant's standing.
#[derive(Debug, Clone)]
pub struct FairOrder<K> {
    /// Job keys, first to bind first.
    pub order: Vec<K>,
    /// By tenant index.
    pub standings: Vec<Standing>,
}

/// The order in which `jobs` are bound in a pool of `total` resources: weighted DRF between
/// `tenants`, then capped priority, then age within a tenant. A job whose tenant index is out of
/// range is left out.
pub fn fair_order<K>(total: Amount, tenants: &[Tenant], jobs: Vec<Waiting<K>>) -> FairOrder<K> {
    let mut queues: Vec<Vec<Waiting<K>>> = tenants.iter().map(|_| Vec::new()).collect();
    for job in jobs {
        if let Some(q) = queues.get_mut(job.tenant) {
            q.push(job);
        }
    }
    for (queue, tenant) in queues.iter_mut().zip(tenants) {
        // Popped from the back: the first to bind last.
        queue.sort_by_key(|j| (j.priority.min(tenant.max_priority), Reverse(j.age)));
    }
    let standings = standings(total, tenants, |i| !queues[i].is_empty());
    let mut holds: Vec<Amount> = tenants.iter().map(|t| t.holds).collect();
    let mut heap: BinaryHeap<Reverse<Turn>> = BinaryHeap::with_capacity(tenants.len());
    let turn = |i: usize, holds: &[Amount], queues: &[Vec<Waiting<K>>]| {
        let t = &tenants[i];
        let share = holds[i].plus(t.past).dominant_share(total) / t.weight;
        let head = queues[i].last().map_or(i64::MAX, |j| j.age);
        Reverse(Turn { share, head, tenant: i })
    };
    for i in (0..tenants.len()).filter(|&i| !queues[i].is_empty()) {
        heap.push(turn(i, &holds, &queues));
    }
    let mut order = Vec::with_capacity(queues.iter().map(Vec::len).sum());
    while let Some(Reverse(Turn { tenant, .. })) = heap.pop() {
        let Some(job) = queues[tenant].pop() else { continue };
        holds[tenant] = holds[tenant].plus(job.asks);
        order.push(job.key);
        if !queues[tenant].is_empty() {
            heap.push(turn(tenant, &holds, &queues));
        }
    }
    FairOrder { order, standings }
}

/// Each tenant's part of the usage and its fair part in a pool, among the tenants present: those
/// that hold something there or for which `waiting` says so (the others: share 0, fair 0).
pub fn standings(total: Amount, tenants: &[Tenant], waiting: impl Fn(usize) -> bool) -> Vec<Standing> {
    let present: Vec<bool> =
        tenants.iter().enumerate().map(|(i, t)| waiting(i) || t.holds.dominant_share(total) > 0.0).collect();
    let sum = |f: &dyn Fn(&Tenant) -> f64| -> f64 {
        tenants.iter().zip(&present).filter(|(_, p)| **p).map(|(t, _)| f(t)).sum()
    };
    let (weights, usage) = (sum(&|t| t.weight), sum(&|t| t.share(total)));
    let part = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    tenants
        .iter()
        .zip(&present)
        .map(|(t, &p)| match p {
            true => Standing { share: part(t.share(total), usage), fair: part(t.weight, weights) },
            false => Standing { share: 0.0, fair: 0.0 },
        })
        .collect()
}

/// A tenant's turn in the order: lowest weighted share first, then the oldest next job, then
/// the tenant's index.
#[derive(Debug, Clone, Copy)]
struct Turn {
    share: f64,
    head: i64,
    tenant: usize,
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        self.share.total_cmp(&other.share).then(self.head.cmp(&other.head)).then(self.tenant.cmp(&other.tenant))
    }
}

/// Per-tenant GPU quotas per site (`max_gpus_per_site`): what each tenant holds at each site,
/// and whether one more job fits under its quota.
#[derive(Debug, Clone, Default)]
pub struct GpuQuota {
    max: HashMap<String, u32>,
    held: HashMap<String, HashMap<String, u32>>,
}

impl GpuQuota {
    /// No quota for anyone.
    pub fn none() -> Self {
        Self::default()
    }

    /// `tenant` may hold at most `max` GPUs at any one site.
    pub fn limit(&mut self, tenant: &str, max: u32) {
        self.max.insert(tenant.to_string(), max);
    }

    /// Whether any tenant has a quota.
    pub fn is_empty(&self) -> bool {
        self.max.is_empty()
    }

    /// `tenant` holds `gpus` more at `site`.
    pub fn hold(&mut self, tenant: &str, site: &str, gpus: u32) {
        if gpus == 0 || !self.max.contains_key(tenant) {
            return;
        }
        *self.held.entry(tenant.to_string()).or_default().entry(site.to_string()).or_default() += gpus;
    }

    /// What `tenant` holds at `site`, and its quota there (if any).
    pub fn of(&self, tenant: &str, site: &str) -> (u32, Option<u32>) {
        let held = self.held.get(tenant).and_then(|s| s.get(site)).copied().unwrap_or(0);
        (held, self.max.get(tenant).copied())
    }

    /// Whether `tenant` may take `gpus` more at `site`.
    pub fn allows(&self, tenant: &str, site: &str, gpus: u32) -> bool {
        match self.of(tenant, site) {
            (_, None) => true,
            (held, Some(max)) => gpus == 0 || held + gpus <= max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: f64) -> Amount {
        Amount { gpus: n, cpus: n, memory_gib: n }
    }

    fn job(key: &'static str, tenant: usize, priority: u32, age: i64) -> Waiting<&'static str> {
        Waiting { key, tenant, priority, age, asks: gpus(1.0) }
    }

    #[test]
    fn the_dominant_share_is_the_largest_fraction() {
        let total = Amount { gpus: 8.0, cpus: 64.0, memory_gib: 512.0 };
        let a = Amount { gpus: 1.0, cpus: 32.0, memory_gib: 16.0 };
        assert_eq!(a.dominant_share(total), 0.5);
        assert_eq!(Amount { gpus: 2.0, ..Amount::default() }.dominant_share(total), 0.25);
        assert_eq!(a.dominant_share(Amount::default()), 0.0, "an empty pool has no fractions");
    }

    #[test]
    fn tenants_take_turns_by_weighted_share() {
        let mut acme = Tenant::new("acme");
        acme.weight = 2.0;
        let tenants = [acme, Tenant::new("globex")];
        let jobs =
            vec![job("a1", 0, 0, 1), job("a2", 0, 0, 2), job("a3", 0, 0, 3), job("g1", 1, 0, 4), job("g2", 1, 0, 5)];
        let order = fair_order(gpus(8.0), &tenants, jobs).order;
        // acme (weight 2) gets two jobs for each of globex's.
        assert_eq!(order, ["a1", "g1", "a2", "a3", "g2"]);
    }

    #[test]
    fn a_tenant_holding_more_waits_behind_one_holding_less() {
        let mut acme = Tenant::new("acme");
        acme.holds = gpus(4.0);
        let mut globex = Tenant::new("globex");
        globex.past = gpus(1.0);
        let order = fair_order(gpus(8.0), &[acme, globex], vec![job("a1", 0, 0, 1), job("g1", 1, 0, 9)]).order;
        assert_eq!(order, ["g1", "a1"], "older does not beat a lower share");
    }

    #[test]
    fn priority_orders_a_tenants_own_jobs_capped_by_its_max_priority() {
        let mut acme = Tenant::new("acme");
        acme.max_priority = 10;
        let jobs = vec![job("old", 0, 5, 1), job("urgent", 0, 100, 2), job("capped", 0, 10, 0), job("low", 0, 0, 0)];
        let order = fair_order(gpus(8.0), &[acme], jobs).order;
        // 100 is capped at 10: then age decides between the two at 10.
        assert_eq!(order, ["capped", "urgent", "old", "low"]);
    }

    #[test]
    fn priority_does_not_cross_tenants() {
        let jobs = vec![job("a1", 0, 100, 1), job("a2", 0, 100, 2), job("g1", 1, 0, 3)];
        let order = fair_order(gpus(8.0), &[Tenant::new("acme"), Tenant::new("globex")], jobs).order;
        assert_eq!(order, ["a1", "g1", "a2"]);
    }

    #[test]
    fn standings_split_the_pool_by_weight_among_tenants_present() {
        let mut acme = Tenant::new("acme");
        acme.holds = gpus(6.0);
        acme.weight = 3.0;
        let idle = Tenant::new("idle");
        let globex = Tenant::new("globex");
        let mut globex = globex;
        globex.holds = gpus(2.0);
        let s = standings(gpus(8.0), &[acme, idle, globex], |i| i == 2);
        assert_eq!(s[0], Standing { share: 0.75, fair: 0.75 });
        assert_eq!(s[1], Standing { share: 0.0, fair: 0.0 }, "an idle tenant takes no part");
        assert_eq!(s[2], Standing { share: 0.25, fair: 0.25 });
        assert!(!s[0].over() && !s[2].over());
        let s = standings(gpus(8.0), &[Tenant { holds: gpus(6.0), ..Tenant::new("acme") }, Tenant::new("b")], |_| true);
        assert!(s[0].over() && !s[1].over());
    }

    #[test]
    fn a_quota_caps_gpus_per_tenant_and_site() {
        let mut quota = GpuQuota::none();
        assert!(quota.allows("acme", "lab", 100));
        quota.limit("acme", 8);
        quota.hold("acme", "lab", 6);
        quota.hold("globex", "lab", 6);
        assert!(quota.allows("acme", "lab", 2));
        assert!(!quota.allows("acme", "lab", 3));
        assert!(quota.allows("acme", "cloud", 8), "the quota is per site");
        assert!(quota.allows("acme", "lab", 0), "CPU-only jobs are not held by a GPU quota");
        assert!(quota.allows("globex", "lab", 100));
        assert_eq!(quota.of("acme", "lab"), (6, Some(8)));
    }
}
