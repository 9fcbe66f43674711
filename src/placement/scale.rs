//! Scale-up: which instances to launch for the jobs placed at an elastic cloud site that no
//! connected agent can take. Pure and deterministic.
//!
//! Each job names the (instance type, market) its placement decision chose. Jobs of one
//! (type, market) are packed first-fit-decreasing (largest first, by GPUs, then CPUs, then memory)
//! into that pool's launches that have not enrolled yet (counted as empty instances: a burst of 100
//! small jobs waits for the instances already launching instead of launching 100), then into new
//! launches. Pools are served in the order of their first job (the caller passes jobs by priority,
//! then age), and new launches stop at the site's limits: instances alive, launches pending, and
//! dollars per hour. A job that fits no instance of its type (it cannot happen for a decision the
//! engine took) is left out.

use crate::model::price::Market;
use crate::model::site::instance_type;

/// A job waiting for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want<'a> {
    pub job: &'a str,
    pub instance_type: &'a str,
    pub market: Market,
    pub gpus: u32,
    pub cpus: u32,
    pub memory_gib: u32,
}

/// A launch that has not enrolled yet: an empty instance on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launching<'a> {
    pub launch: &'a str,
    pub instance_type: &'a str,
    pub market: Market,
}

/// What the site may still add.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    /// `max_instances` minus the instances alive (launching, booting, enrolled).
    pub instances: u32,
    /// `max_pending` minus the launches not enrolled yet.
    pub pending: u32,
    /// `max_usd_per_hour` minus the $/h of the instances alive; `None`: no cap.
    pub usd_per_hour: Option<f64>,
}

/// One instance to launch and the jobs packed onto it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLaunch<'a> {
    pub instance_type: &'a str,
    pub market: Market,
    pub usd_per_hour: f64,
    pub jobs: Vec<&'a str>,
}

/// The plan: new launches, jobs that wait for a launch already on its way, and jobs the limits
/// leave without an instance for now (with the limit that stopped them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScalePlan<'a> {
    pub launches: Vec<NewLaunch<'a>>,
    pub waiting: Vec<(&'a str, &'a str)>,
    pub blocked: Vec<(&'a str, &'static str)>,
}

/// Free resources of one bin.
#[derive(Debug, Clone, Copy)]
struct Free {
    gpus: u32,
    cpus: u32,
    memory_gib: u32,
}

impl Free {
    fn take(&mut self, w: &Want<'_>) -> bool {
        let fits = w.gpus <= self.gpus && w.cpus <= self.cpus && w.memory_gib <= self.memory_gib;
        if fits {
            self.gpus -= w.gpus;
            self.cpus -= w.cpus;
            self.memory_gib -= w.memory_gib;
        }
        fits
    }
}

/// Packs the wanted jobs onto launching instances and new ones, within `room`; `price` gives
/// the $/h of a (type, market).
pub fn plan<'a>(
    wants: &[Want<'a>],
    launching: &[Launching<'a>],
    mut room: Room,
    price: impl Fn(&str, Market) -> f64,
) -> ScalePlan<'a> {
    let mut pools: Vec<(&'a str, Market)> = Vec::new();
    for w in wants {
        if !pools.contains(&(w.instance_type, w.market)) {
            pools.push((w.instance_type, w.market));
        }
    }
    let mut out = ScalePlan::default();
    for (ty, market) in pools {
        let Some(shape) = instance_type(ty) else {
            out.blocked
                .extend(wants.iter().filter(|w| w.instance_type == ty).map(|w| (w.job, "unknown instance type")));
            continue;
        };
        let empty = Free { gpus: shape.gpus, cpus: shape.vcpus, memory_gib: shape.memory_gib };
        let mut jobs: Vec<&Want<'a>> = wants.iter().filter(|w| w.instance_type == ty && w.market == market).collect();
        // Largest first (stable: equal jobs keep the caller's priority order).
        jobs.sort_by_key(|w| std::cmp::Reverse((w.gpus, w.cpus, w.memory_gib)));
        let mut bins: Vec<(Option<&'a str>, Free, Vec<&'a str>)> = launching
            .iter()
            .filter(|l| l.instance_type == ty && l.market == market)
            .map(|l| (Some(l.launch), empty, Vec::new()))
            .collect();
        let usd = price(ty, market);
        for w in jobs {
            if let Some(bin) = bins.iter_mut().find_map(|b| b.1.take(w).then_some(&mut b.2)) {
                bin.push(w.job);
                continue;
            }
            let mut fresh = empty;
            if !fresh.take(w) {
                out.blocked.push((w.job, "larger than its instance type"));
                continue;
            }
            let stop = if room.instances == 0 {
                Some("max_instances")
            } else if room.pending == 0 {
                Some("max_pending")
            } else if room.usd_per_hour.is_some_and(|left| usd > left + 1e-9) {
                Some("max_usd_per_hour")
            } else {
                None
            };
            if let Some(limit) = stop {
                out.blocked.push((w.job, limit));
                continue;
            }
            room.instances -= 1;
            room.pending -= 1;
            room.usd_per_hour = room.usd_per_hour.map(|left| left - usd);
            bins.push((None, fresh, vec![w.job]));
        }
        for (launch, _, jobs) in bins {
            match launch {
                Some(launch) => out.waiting.extend(jobs.into_iter().map(|j| (j, launch))),
                None => out.launches.push(NewLaunch { instance_type: ty, market, usd_per_hour: usd, jobs }),
            }
        }
    }
    out
}

/// The fewest instances of each (type, market) that could hold the jobs, by the largest of the
/// GPU, CPU and memory totals over one instance's (a lower bound on any packing): for the bench's
/// ratio of instances launched to the fewest possible.
pub fn lower_bound(wants: &[Want<'_>]) -> u32 {
    let mut pools: Vec<(&str, Market, u64, u64, u64)> = Vec::new();
    for w in wants {
        match pools.iter_mut().find(|p| p.0 == w.instance_type && p.1 == w.market) {
            Some(p) => {
                p.2 += u64::from(w.gpus);
                p.3 += u64::from(w.cpus);
                p.4 += u64::from(w.memory_gib);
            }
            None => pools.push((w.instance_type, w.market, w.gpus.into(), w.cpus.into(), w.memory_gib.into())),
        }
    }
    pools
        .iter()
        .filter_map(|(ty, _, g, c, m)| {
            let t = instance_type(ty)?;
            let need = |total: u64, per: u32| if per == 0 { 0 } else { total.div_ceil(u64::from(per)) };
            Some(need(*g, t.gpus).max(need(*c, t.vcpus)).max(need(*m, t.memory_gib)).max(1) as u32)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const OPEN: Room = Room { instances: u32::MAX, pending: u32::MAX, usd_per_hour: None };

    fn want(job: &str, ty: &'static str, market: Market, gpus: u32) -> Want<'static> {
        let job: &'static str = Box::leak(job.to_owned().into_boxed_str());
        Want { job, instance_type: ty, market, gpus, cpus: gpus, memory_gib: 8 * gpus }
    }

    #[test]
    fn a_burst_of_small_jobs_shares_instances() {
        let wants: Vec<Want> = (0..100).map(|i| want(&format!("j{i}"), "p5.48xlarge", Market::OnDemand, 1)).collect();
        let plan = plan(&wants, &[], OPEN, |_, _| 98.0);
        assert_eq!(plan.launches.len(), 13, "8 GPUs per p5: ceil(100 / 8)");
        assert_eq!(plan.launches.iter().map(|l| l.jobs.len()).sum::<usize>(), 100);
        assert_eq!(lower_bound(&wants), 13);
    }

    #[test]
    fn launching_instances_count_as_capacity() {
        let wants = [want("a", "p5.48xlarge", Market::Spot, 4), want("b", "p5.48xlarge", Market::Spot, 4)];
        let on_the_way = [Launching { launch: "hbl-1", instance_type: "p5.48xlarge", market: Market::Spot }];
        let plan = plan(&wants, &on_the_way, OPEN, |_, _| 30.0);
        assert!(plan.launches.is_empty(), "{plan:?}");
        assert_eq!(plan.waiting, [("a", "hbl-1"), ("b", "hbl-1")]);
        // Another market is another pool: the on-demand job gets its own instance.
        let od = [want("c", "p5.48xlarge", Market::OnDemand, 1)];
        assert_eq!(super::plan(&od, &on_the_way, OPEN, |_, _| 98.0).launches.len(), 1);
    }

    #[test]
    fn limits_stop_new_launches_and_say_which() {
        let wants: Vec<Want> = (0..4).map(|i| want(&format!("j{i}"), "g6.xlarge", Market::OnDemand, 1)).collect();
        let room = Room { instances: 3, pending: 2, usd_per_hour: None };
        let p = plan(&wants, &[], room, |_, _| 0.8);
        assert_eq!((p.launches.len(), p.blocked.len()), (2, 2));
        assert_eq!(p.blocked[0].1, "max_pending");
        let room = Room { instances: 9, pending: 9, usd_per_hour: Some(2.0) };
        let p = plan(&wants, &[], room, |_, _| 0.8);
        assert_eq!((p.launches.len(), p.blocked[0].1), (2, "max_usd_per_hour"));
    }

    proptest! {
        /// Every job is placed exactly once; no instance is over-full; a new launch is never made
        /// for a job that fit an earlier bin of its pool (first fit); and the count is at least the
        /// lower bound and at most what one job per instance would need.
        #[test]
        fn packing_is_sound(gpus in prop::collection::vec(prop::sample::select(vec![1u32, 2, 4, 8]), 0..60),
                            spot in prop::collection::vec(any::<bool>(), 60), launching in 0usize..3) {
            let wants: Vec<Want> = gpus.iter().enumerate().map(|(i, &g)| {
                let market = if spot[i] { Market::Spot } else { Market::OnDemand };
                want(&format!("j{i}"), "p5.48xlarge", market, g)
            }).collect();
            let ids = ["hbl-a", "hbl-b", "hbl-c"];
            let on_the_way: Vec<Launching> = ids[..launching].iter()
                .map(|l| Launching { launch: l, instance_type: "p5.48xlarge", market: Market::Spot }).collect();
            let p = plan(&wants, &on_the_way, OPEN, |_, _| 1.0);
            let mut seen: Vec<&str> = p.launches.iter().flat_map(|l| l.jobs.iter().copied()).collect();
            seen.extend(p.waiting.iter().map(|(j, _)| *j));
            seen.sort();
            let mut all: Vec<&str> = wants.iter().map(|w| w.job).collect();
            all.sort();
            prop_assert_eq!(seen, all);
            let gpus_of = |j: &str| wants.iter().find(|w| w.job == j).unwrap().gpus;
            for l in &p.launches {
                prop_assert!(l.jobs.iter().map(|j| gpus_of(j)).sum::<u32>() <= 8);
            }
            for id in &ids[..launching] {
                prop_assert!(p.waiting.iter().filter(|(_, l)| l == id).map(|(j, _)| gpus_of(j)).sum::<u32>() <= 8);
            }
            // Powers of two, largest first: first fit is optimal per pool, so no more than the bound
            // (minus the launching instances that took jobs).
            let bound = lower_bound(&wants) as usize;
            prop_assert!(p.launches.len() <= bound, "{} > {}", p.launches.len(), bound);
            prop_assert!(p.launches.len() + launching >= bound.min(wants.len()) || wants.is_empty());
        }
    }
}
