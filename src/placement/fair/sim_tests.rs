//! A deterministic simulation over [`fair_order`]: a pool of GPUs, tenants flooding it with jobs,
//! a clock that ticks by the minute; jobs bound in the fair order while GPUs are free, their
//! usage accrued and decayed as they end. And the order checked against a brute-force version.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const MINUTE: i64 = 60_000;

/// One job of the simulation.
#[derive(Debug, Clone)]
struct SimJob {
    tenant: usize,
    priority: u32,
    submitted: i64,
    minutes: i64,
    started: Option<i64>,
}

/// What a run gave each tenant, and when each job started.
struct Outcome {
    gpu_minutes: Vec<f64>,
    jobs: Vec<SimJob>,
}

/// Runs `jobs` (1 GPU each) on a pool of `gpus` until every job ended or `until`; GPU-minutes
/// are counted only while every tenant still has jobs waiting (a contended pool).
fn simulate(gpus: u32, weights: &[f64], mut jobs: Vec<SimJob>, until: i64) -> Outcome {
    let total = Amount { gpus: f64::from(gpus), cpus: f64::from(gpus) * 8.0, memory_gib: f64::from(gpus) * 64.0 };
    let asks = Amount { gpus: 1.0, cpus: 1.0, memory_gib: 4.0 };
    let half_life = Duration::from_secs(6 * 3600);
    let mut past = vec![PastUsage::default(); weights.len()];
    let mut gpu_minutes = vec![0.0; weights.len()];
    let mut now = 0;
    while now <= until {
        // Attempts that end now release their GPU and add to their tenant's usage.
        let mut holds = vec![Amount::default(); weights.len()];
        for job in jobs.iter_mut().filter(|j| j.started.is_some()) {
            let start = job.started.unwrap();
            if start + job.minutes * MINUTE == now {
                past[job.tenant].add_run(asks, Duration::from_secs(job.minutes as u64 * 60), now, half_life);
            } else if start + job.minutes * MINUTE > now {
                holds[job.tenant] = holds[job.tenant].plus(asks);
            }
        }
        let waiting: Vec<usize> =
            (0..jobs.len()).filter(|&i| jobs[i].started.is_none() && jobs[i].submitted <= now).collect();
        let contended = (0..weights.len()).all(|t| waiting.iter().any(|&i| jobs[i].tenant == t));
        let tenants: Vec<Tenant> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Tenant {
                weight: w,
                holds: holds[i],
                past: past[i].hours(now, half_life),
                ..Tenant::new(&format!("t{i}"))
            })
            .collect();
        let wanted = waiting
            .iter()
            .map(|&i| Waiting {
                key: i,
                tenant: jobs[i].tenant,
                priority: jobs[i].priority,
                age: jobs[i].submitted,
                asks,
            })
            .collect();
        let mut free = gpus - holds.iter().map(|h| h.gpus as u32).sum::<u32>();
        for i in fair_order(total, &tenants, wanted).order {
            if free == 0 {
                break;
            }
            jobs[i].started = Some(now);
            holds[jobs[i].tenant] = holds[jobs[i].tenant].plus(asks);
            free -= 1;
        }
        // On to the next end or submit.
        let ends = jobs.iter().filter_map(|j| Some(j.started? + j.minutes * MINUTE)).filter(|&e| e > now);
        let submits = jobs.iter().filter(|j| j.started.is_none()).map(|j| j.submitted).filter(|&s| s > now);
        let Some(next) = ends.chain(submits).min() else { break };
        if contended {
            for (t, h) in holds.iter().enumerate() {
                gpu_minutes[t] += h.gpus * ((next - now) / MINUTE) as f64;
            }
        }
        now = next;
    }
    Outcome { gpu_minutes, jobs }
}

/// `n` jobs of `tenant` at `priority`, submitted at `at`, of 10 to 60 minutes (a fixed sequence).
fn flood(tenant: usize, priority: u32, n: usize, at: i64, seed: u64) -> Vec<SimJob> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let minutes = 10 + (x >> 33) as i64 % 51;
            SimJob { tenant, priority, submitted: at, minutes, started: None }
        })
        .collect()
}

#[test]
fn weights_two_to_one_give_gpu_hours_two_to_one() {
    let mut jobs = flood(0, 0, 1500, 0, 1);
    jobs.extend(flood(1, 0, 1500, 0, 2));
    let out = simulate(8, &[2.0, 1.0], jobs, 14 * 24 * 60 * MINUTE);
    let ratio = out.gpu_minutes[0] / out.gpu_minutes[1];
    println!(
        "weights 2:1 on 8 GPUs: GPU-hours {:.0} : {:.0} = {ratio:.3}",
        out.gpu_minutes[0] / 60.0,
        out.gpu_minutes[1] / 60.0
    );
    assert!((ratio - 2.0).abs() <= 0.2, "GPU-hours {:?}: ratio {ratio:.3}", out.gpu_minutes);
}

#[test]
fn a_tenant_marking_everything_priority_100_gets_only_its_share() {
    let mut jobs = flood(0, 100, 1500, 0, 3);
    jobs.extend(flood(1, 0, 1500, 0, 4));
    let out = simulate(8, &[1.0, 1.0], jobs, 14 * 24 * 60 * MINUTE);
    let ratio = out.gpu_minutes[0] / out.gpu_minutes[1];
    println!("priority 100 vs 0, weights 1:1: GPU-hours ratio {ratio:.3}");
    assert!((ratio - 1.0).abs() <= 0.1, "GPU-hours {:?}: ratio {ratio:.3}", out.gpu_minutes);
}

#[test]
fn nothing_starves() {
    // A heavy tenant floods the pool at priority 100 with weight 4; a light one submits a few
    // jobs later. Every job starts, and the light tenant's within a few job lengths.
    let mut jobs = flood(0, 100, 1000, 0, 5);
    jobs.extend(flood(1, 0, 20, 6 * 60 * MINUTE, 6));
    let out = simulate(4, &[4.0, 1.0], jobs, 60 * 24 * 60 * MINUTE);
    assert!(out.jobs.iter().all(|j| j.started.is_some()), "every job was bound");
    let light_first = out.jobs.iter().filter(|j| j.tenant == 1).filter_map(|j| j.started).min().unwrap();
    assert!(
        light_first - 6 * 60 * MINUTE <= 60 * MINUTE,
        "the light tenant waited {} min",
        (light_first - 360 * MINUTE) / MINUTE
    );
}

/// The order, the slow way: each time, every tenant's weighted share recomputed from scratch.
fn brute_force(total: Amount, tenants: &[Tenant], jobs: &[Waiting<usize>]) -> Vec<usize> {
    let mut left: Vec<&Waiting<usize>> = jobs.iter().filter(|j| j.tenant < tenants.len()).collect();
    let mut extra = vec![Amount::default(); tenants.len()];
    let mut order = Vec::new();
    while !left.is_empty() {
        let best = |t: usize| {
            left.iter()
                .enumerate()
                .filter(|(_, j)| j.tenant == t)
                .max_by_key(|(_, j)| (j.priority.min(tenants[t].max_priority), Reverse(j.age)))
                .map(|(i, j)| (i, j.age))
        };
        let (pick, _) = (0..tenants.len())
            .filter_map(|t| best(t).map(|(i, age)| (i, (t, age))))
            .min_by(|(_, (a, age_a)), (_, (b, age_b))| {
                let share = |t: usize| {
                    tenants[t].holds.plus(extra[t]).plus(tenants[t].past).dominant_share(total) / tenants[t].weight
                };
                share(*a).total_cmp(&share(*b)).then(age_a.cmp(age_b)).then(a.cmp(b))
            })
            .unwrap();
        let job = left.remove(pick);
        extra[job.tenant] = extra[job.tenant].plus(job.asks);
        order.push(job.key);
    }
    order
}

proptest! {
    #[test]
    fn the_order_is_the_brute_force_order(
        tenants in prop::collection::vec((1u32..4, 0u32..4, 0u32..8, 0u32..101), 1..4),
        jobs in prop::collection::vec((0usize..4, 0u32..101, 0i64..50, 0u32..3, 1u32..8), 0..40),
    ) {
        let total = Amount { gpus: 8.0, cpus: 64.0, memory_gib: 256.0 };
        let tenants: Vec<Tenant> = tenants
            .iter()
            .enumerate()
            .map(|(i, &(w, held, past, cap))| Tenant {
                weight: f64::from(w),
                max_priority: cap,
                holds: Amount { gpus: f64::from(held), cpus: 2.0, memory_gib: 8.0 },
                past: Amount { gpus: f64::from(past) / 2.0, ..Amount::default() },
                ..Tenant::new(&format!("t{i}"))
            })
            .collect();
        let jobs: Vec<Waiting<usize>> = jobs
            .iter()
            .enumerate()
            .map(|(key, &(tenant, priority, age, gpus, cpus))| Waiting {
                key, tenant, priority, age,
                asks: Amount { gpus: f64::from(gpus), cpus: f64::from(cpus), memory_gib: 4.0 },
            })
            .collect();
        let fast = fair_order(total, &tenants, jobs.clone()).order;
        prop_assert_eq!(fast, brute_force(total, &tenants, &jobs));
    }
}
