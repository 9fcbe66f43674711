//! Property tests and an exhaustive optimum for [`place`]: random small worlds, and a brute force
//! written from the cost rules alone (plain scans of the snapshot, no indexes, no shared helpers).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::capacity::{CapacityConfig, ProviderKind};
use crate::model::price::{Cloud, ComputePrice, Destination, EgressPrice, PriceSnapshot, Provenance, StoragePrice};
use crate::model::site::{Site, StorageLocation, instance_type};
use crate::placement::request::{OutputDest, PlacementInput, PlacementOutput, PlacementPolicy, WaitingAt};
use crate::placement::wait::{Need, Node, Profile};
use crate::placement::world::{SiteCapacity, SiteState};

const NOW: i64 = 1_000_000_000;
const MODELS: [&str; 3] = ["H100-80GB", "A100-80GB", "L4-24GB"];
const PLACES: [(SiteKind, &str, &str); 6] = [
    (SiteKind::Aws, "us-east-1", "us"),
    (SiteKind::Aws, "eu-west-1", "eu"),
    (SiteKind::Azure, "eastus", "us"),
    (SiteKind::Azure, "westeurope", "eu"),
    (SiteKind::Onprem, "sto", "eu"),
    (SiteKind::Onprem, "nyc", "us"),
];
const TYPES: [&str; 10] = [
    "p5.48xlarge",
    "p4de.24xlarge",
    "g6.xlarge",
    "g6.12xlarge",
    "m7i.2xlarge",
    "Standard_ND96isr_H100_v5",
    "Standard_NC24ads_A100_v4",
    "Standard_NC96ads_A100_v4",
    "Standard_D16s_v5",
    "Standard_D4s_v5",
];

/// One random placement problem.
#[derive(Debug, Clone)]
struct Case {
    sites: Vec<SiteState>,
    locations: Vec<StorageLocation>,
    prices: PriceSnapshot,
    job: PlacementJob,
}

impl Case {
    fn world(&self) -> World {
        World::new(self.sites.clone(), self.locations.clone(), &self.prices, NOW, Duration::from_secs(3600))
    }
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

fn maybe<T>(rng: &mut fastrand::Rng, p: f64, f: impl FnOnce(&mut fastrand::Rng) -> T) -> Option<T> {
    if rng.f64() < p { Some(f(rng)) } else { None }
}

fn random_capacity(rng: &mut fastrand::Rng) -> SiteCapacity {
    let mut total = Vec::new();
    let mut free = Vec::new();
    for _ in 0..rng.usize(0..3) {
        let model = pick(rng, &MODELS);
        let (g, c, m) = (rng.u32(1..=8), rng.u32(4..=64), rng.u64(16..=512));
        total.push(NodeShape { gpus: vec![(model.to_owned(), g)], cpus: c, memory_mib: m * 1024 });
        if rng.bool() {
            let g = rng.u32(0..=g);
            let gpus = if g == 0 { Vec::new() } else { vec![(model.to_owned(), g)] };
            free.push(NodeShape { gpus, cpus: rng.u32(0..=c), memory_mib: rng.u64(0..=m) * 1024 });
        }
    }
    let queue_wait = maybe(rng, 0.7, |r| Duration::from_secs(r.u64(0..5 * 3600)));
    // A replay of the site's nodes (their totals, each busy until some time) with jobs waiting.
    let profile = (rng.f64() < 0.4).then(|| {
        let nodes = total
            .iter()
            .map(|t| Node {
                free: NodeShape { gpus: Vec::new(), cpus: 0, memory_mib: 0 },
                running: vec![(Duration::from_secs(rng.u64(0..4 * 3600)), t.clone())],
            })
            .collect();
        let waiting: Vec<Need> = (0..rng.usize(0..3))
            .map(|_| Need {
                gpus: rng.u32(0..=4),
                gpu_models: Vec::new(),
                cpus: rng.u32(1..=8),
                memory_mib: 1024,
                runtime: Duration::from_secs(rng.u64(600..4 * 3600)),
            })
            .collect();
        Arc::new(Profile::build(nodes, &waiting))
    });
    SiteCapacity { free, total, queue_wait, profile, unavailable: Vec::new() }
}

fn random_site(rng: &mut fastrand::Rng, name: String) -> SiteState {
    let (kind, region, residency) = pick(rng, &PLACES);
    let mut site = Site {
        name,
        kind,
        region: region.into(),
        residency: residency.into(),
        gpu_hour_usd: None,
        gpu_hour_usd_by_model: BTreeMap::new(),
        cpu_hour_usd: 0.0,
        uplink_usd_per_gb: 0.0,
        instance_types: Vec::new(),
        spot: rng.bool(),
        capacity: (rng.f64() < 0.8).then(|| CapacityConfig::new(ProviderKind::Local)),
    };
    if kind == SiteKind::Onprem {
        site.gpu_hour_usd = maybe(rng, 0.9, |r| 0.5 + 4.0 * r.f64());
        if rng.bool() {
            site.gpu_hour_usd_by_model.insert(pick(rng, &MODELS).to_owned(), 0.5 + 4.0 * rng.f64());
        }
        site.cpu_hour_usd = if rng.bool() { 0.0 } else { 0.02 * rng.f64() };
        site.uplink_usd_per_gb = 0.05 * rng.f64();
        (site.spot, site.capacity) = (false, None);
    } else {
        for t in TYPES {
            if instance_type(t).is_some_and(|ty| Some(ty.cloud) == kind.cloud()) && rng.f64() < 0.6 {
                site.instance_types.push(t.to_owned());
            }
        }
    }
    let capacity = random_capacity(rng);
    SiteState { site, capacity }
}

fn random_job(rng: &mut fastrand::Rng, locations: &[StorageLocation]) -> PlacementJob {
    let gpus = pick(rng, &[0, 0, 1, 1, 2, 4, 8]);
    let gpu_models =
        if gpus == 0 { Vec::new() } else { MODELS.iter().filter(|_| rng.bool()).map(|m| (*m).to_owned()).collect() };
    let inputs = (0..rng.usize(0..3))
        .map(|_| PlacementInput {
            location: if rng.f64() < 0.95 {
                locations[rng.usize(..locations.len())].name.clone()
            } else {
                "nowhere".into()
            },
            bytes: pick(rng, &[0, 1, 1_000_000_000, 200_000_000_000]),
        })
        .collect();
    let outputs = (0..rng.usize(0..3))
        .map(|_| {
            let dest = if rng.bool() && !locations.is_empty() {
                OutputDest::Location(locations[rng.usize(..locations.len())].name.clone())
            } else {
                let among = if rng.bool() {
                    Vec::new()
                } else {
                    vec![locations.first().map_or("x".into(), |l| l.name.clone())]
                };
                OutputDest::Choose { residency: pick(rng, &["eu", "us"]).into(), among }
            };
            PlacementOutput { path: "out/".into(), dest, bytes: pick(rng, &[0, 5_000_000_000, 80_000_000_000]) }
        })
        .collect();
    let policy = PlacementPolicy {
        residency: maybe(rng, 0.2, |r| pick(r, &["eu", "us"]).to_owned()),
        clouds: maybe(rng, 0.2, |r| [Cloud::Aws, Cloud::Azure].into_iter().filter(|_| r.bool()).collect()),
        sites: maybe(rng, 0.1, |r| vec![format!("s{}", r.usize(0..5))]),
        max_usd_per_hour: maybe(rng, 0.3, |r| 100.0 * r.f64()),
        max_usd_total: maybe(rng, 0.3, |r| 500.0 * r.f64()),
        spot: if rng.bool() { Spot::Allowed } else { Spot::Never },
        max_wait: maybe(rng, 0.4, |r| Duration::from_secs(r.u64(0..4 * 3600))),
        deadline: maybe(rng, 0.2, |r| NOW + r.i64(0..12 * 3_600_000)),
        owned_first: rng.f64() < 0.3,
        delay_usd_per_hour: if rng.bool() { 0.0 } else { 50.0 * rng.f64() },
    };
    PlacementJob {
        gpus,
        gpu_models,
        cpus: rng.u32(1..=48),
        memory_gib: rng.u32(1..=300),
        runtime: Duration::from_secs(rng.u64(60..10 * 3600)),
        inputs,
        outputs,
        policy,
        budget_left_usd: maybe(rng, 0.3, |r| 1000.0 * r.f64()),
        waiting_at: maybe(rng, 0.2, |r| WaitingAt {
            site: format!("s{}", r.usize(0..5)),
            wait: maybe(r, 0.8, |r| Duration::from_secs(r.u64(0..5 * 3600))),
            ahead: r.u32(0..5),
        }),
    }
}

fn random_case(seed: u64, max_sites: usize) -> Case {
    let mut rng = fastrand::Rng::with_seed(seed);
    let sites: Vec<SiteState> = (0..rng.usize(1..=max_sites)).map(|i| random_site(&mut rng, format!("s{i}"))).collect();
    let locations: Vec<StorageLocation> = (0..rng.usize(1..=4))
        .map(|i| {
            let (kind, region, residency) = pick(&mut rng, &PLACES);
            StorageLocation { name: format!("loc{i}"), kind, region: region.into(), residency: residency.into() }
        })
        .collect();
    let provenance = Provenance { source: "prop".into(), fetched_at: NOW - 1000 };
    let mut prices = PriceSnapshot { id: format!("p{seed}"), fetched_at: NOW - 1000, ..Default::default() };
    for (kind, region, _) in PLACES {
        let Some(cloud) = kind.cloud() else { continue };
        for t in TYPES.iter().filter_map(|t| instance_type(t)).filter(|t| t.cloud == cloud) {
            for (market, p) in [(Market::OnDemand, 0.85), (Market::Spot, 0.4)] {
                if rng.f64() < p {
                    let usd = (0.1 + f64::from(t.gpus) * 5.0) * (0.5 + rng.f64());
                    let (region, instance_type, provenance) = (region.into(), t.name.into(), provenance.clone());
                    prices.compute.push(ComputePrice {
                        cloud,
                        region,
                        instance_type,
                        market,
                        usd_per_hour: usd,
                        provenance,
                    });
                }
            }
        }
        for destination in [Destination::Internet, Destination::InterRegion] {
            if rng.f64() < 0.9 {
                let (region, provenance) = (region.into(), provenance.clone());
                prices.egress.push(EgressPrice { cloud, region, destination, usd_per_gb: 0.1 * rng.f64(), provenance });
            }
        }
        if rng.f64() < 0.95 {
            let (region, provenance) = (region.into(), provenance.clone());
            prices.storage.push(StoragePrice { cloud, region, usd_per_gb_month: 0.03 * rng.f64(), provenance });
        }
    }
    let job = random_job(&mut rng, &locations);
    Case { sites, locations, prices, job }
}

/// Every valid output assignment (a location index per output), outputs of one group sharing one.
fn assignments(case: &Case) -> Vec<Vec<usize>> {
    let locs = &case.locations;
    let mut keys: Vec<(&str, &[String])> = Vec::new();
    let mut per_output: Vec<Vec<usize>> = Vec::new();
    let mut key_of: Vec<Option<usize>> = Vec::new();
    for output in &case.job.outputs {
        match &output.dest {
            OutputDest::Location(name) => {
                let Some(i) = locs.iter().position(|l| l.name == *name) else { return Vec::new() };
                per_output.push(vec![i]);
                key_of.push(None);
            }
            OutputDest::Choose { residency, among } => {
                let key = (residency.as_str(), among.as_slice());
                let k = keys.iter().position(|x| *x == key).unwrap_or_else(|| {
                    keys.push(key);
                    keys.len() - 1
                });
                let options = (0..locs.len())
                    .filter(|&i| locs[i].residency == *residency && (among.is_empty() || among.contains(&locs[i].name)))
                    .collect();
                per_output.push(options);
                key_of.push(Some(k));
            }
        }
    }
    // Cartesian product over outputs, then keep those where outputs of one key agree.
    let mut all: Vec<Vec<usize>> = vec![Vec::new()];
    for options in &per_output {
        all = all.iter().flat_map(|a| options.iter().map(move |&o| [a.clone(), vec![o]].concat())).collect();
    }
    all.retain(|a| {
        (0..a.len()).all(|i| (0..a.len()).all(|j| key_of[i].is_none() || key_of[i] != key_of[j] || a[i] == a[j]))
    });
    all
}

/// $ of moving `bytes` between two places given as (kind, region, uplink of the source if on-prem).
fn transfer(prices: &PriceSnapshot, from: (SiteKind, &str, f64), to: (SiteKind, &str), bytes: u64) -> Option<f64> {
    if bytes == 0 {
        return Some(0.0);
    }
    let gb = bytes as f64 / 1e9;
    let per_gb = match (from.0.cloud(), to.0.cloud()) {
        (Some(a), Some(b)) if a == b && from.1 == to.1 => 0.0,
        (Some(a), Some(b)) if a == b => prices.egress(a, from.1, Destination::InterRegion)?.usd_per_gb,
        (Some(a), _) => prices.egress(a, from.1, Destination::Internet)?.usd_per_gb,
        (None, None) if from.1 == to.1 => 0.0,
        (None, _) => from.2,
    };
    Some(per_gb * gb)
}

fn local_uplink(case: &Case, region: &str) -> f64 {
    let mut sites: Vec<&Site> = case.sites.iter().map(|s| &s.site).collect();
    sites.sort_by(|a, b| a.name.cmp(&b.name));
    sites.iter().find(|s| s.kind == SiteKind::Onprem && s.region == region).map_or(0.0, |s| s.uplink_usd_per_gb)
}

/// The brute force's verdict on one candidate.
#[derive(Debug, Clone, Copy)]
struct Verdict2 {
    total: f64,
    /// The wait × the job's `delay_usd_per_hour`.
    delay: f64,
    /// Owned hardware free now.
    owned_now: bool,
}

/// The brute force's verdict on one candidate.
fn evaluate(case: &Case, st: &SiteState, outs: &[usize]) -> Option<Verdict2> {
    let (job, site, pol) = (&case.job, &st.site, &case.job.policy);
    let accept = |m: &str| job.gpu_models.is_empty() || job.gpu_models.iter().any(|g| g == m);
    let mut ins = Vec::new();
    for i in &job.inputs {
        ins.push((case.locations.iter().find(|l| l.name == i.location)?, i.bytes));
    }
    let derived = ins.first().map(|(l, _)| l.residency.clone()).filter(|g| ins.iter().all(|(l, _)| l.residency == *g));
    let residency = pol.residency.clone().or(derived);
    if residency.as_ref().is_some_and(|r| site.residency != *r) {
        return None;
    }
    // Outputs stay in the job's residency too, whether given by policy or derived from the inputs.
    if residency.as_ref().is_some_and(|r| outs.iter().any(|&o| case.locations[o].residency != *r)) {
        return None;
    }
    if pol.sites.as_ref().is_some_and(|s| !s.contains(&site.name))
        || site.kind.cloud().is_some_and(|c| pol.clouds.as_ref().is_some_and(|cs| !cs.contains(&c)))
    {
        return None;
    }
    let fits = |sh: &&NodeShape| {
        let g: u32 = sh.gpus.iter().filter(|(m, _)| accept(m)).map(|(_, n)| n).sum();
        g >= job.gpus && sh.cpus >= job.cpus && sh.memory_mib >= u64::from(job.memory_gib) * 1024
    };
    let cap = &st.capacity;
    let (wait, now) = if site.kind == SiteKind::Onprem || !site.elastic() {
        if cap.free.iter().any(|s| fits(&s)) {
            (0, true)
        } else if cap.total.iter().any(|s| fits(&s)) {
            let need = Need {
                gpus: job.gpus,
                gpu_models: job.gpu_models.clone(),
                cpus: job.cpus,
                memory_mib: u64::from(job.memory_gib) * 1024,
                runtime: job.runtime,
            };
            let wait = match (&job.waiting_at, &cap.profile) {
                (Some(w), _) if w.site == site.name => w.wait,
                (_, Some(p)) => p.earliest(&need),
                _ => cap.queue_wait,
            };
            (wait?.as_secs(), false)
        } else {
            return None;
        }
    } else {
        (0, true)
    };
    if pol.max_wait.is_some_and(|m| Duration::from_secs(wait) > m) {
        return None;
    }
    if pol.deadline.is_some_and(|d| (wait * 1000) as i64 + job.runtime.as_millis() as i64 > d - NOW) {
        return None;
    }
    let rate = match site.kind.cloud() {
        Some(c) => {
            let mut best: Option<f64> = None;
            for name in &site.instance_types {
                let Some(t) = instance_type(name).filter(|t| t.cloud == c) else { continue };
                let gpu_ok = job.gpus == 0 || (t.gpus >= job.gpus && t.gpu_model.is_some_and(accept));
                if !(gpu_ok && t.vcpus >= job.cpus && t.memory_gib >= job.memory_gib) {
                    continue;
                }
                let on_demand = case.prices.compute(c, &site.region, name, Market::OnDemand).map(|p| p.usd_per_hour);
                let spot = (site.spot && pol.spot == Spot::Allowed)
                    .then(|| case.prices.compute(c, &site.region, name, Market::Spot).map(|p| p.usd_per_hour))
                    .flatten();
                for p in [on_demand, spot].into_iter().flatten() {
                    best = Some(best.map_or(p, |b: f64| b.min(p)));
                }
            }
            best?
        }
        None if job.gpus == 0 => site.cpu_hour_usd * f64::from(job.cpus),
        None => {
            let shapes = if now { &cap.free } else { &cap.total };
            let mut worst: Option<f64> = None;
            for sh in shapes.iter().filter(fits) {
                for (m, n) in &sh.gpus {
                    if *n > 0 && accept(m) {
                        let p = site.gpu_hour_usd_by_model.get(m).copied().or(site.gpu_hour_usd)?;
                        worst = Some(worst.map_or(p, |w: f64| w.max(p)));
                    }
                }
            }
            worst? * f64::from(job.gpus)
        }
    };
    let here = (site.kind, site.region.as_str());
    let mut total = rate * job.runtime.as_secs_f64() / 3600.0;
    for (l, bytes) in ins {
        let uplink = local_uplink(case, &l.region);
        total += transfer(&case.prices, (l.kind, &l.region, uplink), here, bytes)?;
    }
    for (output, &o) in job.outputs.iter().zip(outs) {
        let l = &case.locations[o];
        total += transfer(
            &case.prices,
            (site.kind, &site.region, site.uplink_usd_per_gb),
            (l.kind, &l.region),
            output.bytes,
        )?;
        if let (Some(c), true) = (l.kind.cloud(), output.bytes > 0) {
            total += case.prices.storage(c, &l.region)?.usd_per_gb_month * output.bytes as f64 / 1e9;
        }
    }
    let over = |cap: Option<f64>, v: f64| cap.is_some_and(|c| v > c);
    if over(pol.max_usd_per_hour, rate) || over(pol.max_usd_total, total) || over(job.budget_left_usd, total) {
        return None;
    }
    let delay = wait as f64 / 3600.0 * pol.delay_usd_per_hour;
    Some(Verdict2 { total, delay, owned_now: site.kind == SiteKind::Onprem && wait == 0 })
}

/// How many of a candidate's outputs go outside the site's own cloud region.
fn away(case: &Case, site: &Site, outs: &[usize]) -> usize {
    outs.iter().filter(|&&o| !(case.locations[o].kind == site.kind && case.locations[o].region == site.region)).count()
}

/// The optimum by brute force: (total + delay, site, output locations), owned-first applied; ties
/// go to fewer outputs away from the site's region, then by name.
fn brute_force(case: &Case) -> Option<(f64, String, Vec<String>)> {
    let mut feasible = Vec::new();
    for st in &case.sites {
        for outs in assignments(case) {
            if let Some(v) = evaluate(case, st, &outs) {
                let names: Vec<String> = outs.iter().map(|&o| case.locations[o].name.clone()).collect();
                feasible.push((
                    v.total + v.delay,
                    v.owned_now,
                    away(case, &st.site, &outs),
                    st.site.name.clone(),
                    names,
                ));
            }
        }
    }
    let owned = case.job.policy.owned_first && feasible.iter().any(|f| f.1);
    feasible
        .into_iter()
        .filter(|f| !owned || f.1)
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)).then_with(|| a.3.cmp(&b.3)).then_with(|| a.4.cmp(&b.4)))
        .map(|(t, _, _, s, l)| (t, s, l))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The brute force's verdict on an engine candidate (by names).
fn evaluate_candidate(case: &Case, c: &Candidate) -> Option<Verdict2> {
    let st = case.sites.iter().find(|s| s.site.name == c.site)?;
    let outs: Option<Vec<usize>> =
        c.output_locations.iter().map(|n| case.locations.iter().position(|l| l.name == *n)).collect();
    let outs = outs?;
    if !assignments(case).contains(&outs) {
        return None;
    }
    evaluate(case, st, &outs)
}

fn total(c: &Candidate) -> Option<f64> {
    match &c.verdict {
        Verdict::Feasible(o) => Some(o.cost.total_usd),
        Verdict::Rejected(_) => None,
    }
}

/// What candidates are compared by: dollars plus the cost of delay.
fn score(c: &Candidate) -> Option<f64> {
    match &c.verdict {
        Verdict::Feasible(o) => Some(o.cost.total_usd + o.cost.delay_usd),
        Verdict::Rejected(_) => None,
    }
}

fn chosen_score(c: &Chosen) -> f64 {
    c.offer.cost.total_usd + c.offer.cost.delay_usd
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Exhaustive optimum: every candidate's verdict and cost, and the choice, equal the brute force's.
    #[test]
    fn engine_equals_brute_force(seed in any::<u64>()) {
        let case = random_case(seed, 5);
        let d = place(&case.job, &case.world());
        let expected = case.sites.len() * assignments(&case).len().max(1);
        prop_assert!(d.candidates.len() >= expected.min(d.candidates.len()));
        for c in &d.candidates {
            let brute = evaluate_candidate(&case, c);
            match (total(c), score(c), brute) {
                (Some(a), Some(s), Some(b)) => {
                    prop_assert!(close(a, b.total), "{c:?}: brute {b:?}");
                    prop_assert!(close(s, b.total + b.delay), "{c:?}: brute {b:?}");
                }
                (a, _, b) => prop_assert!(a.is_none() && b.is_none(), "{c:?}: brute {b:?}"),
            }
        }
        let best = brute_force(&case);
        prop_assert_eq!(d.chosen.is_some(), best.is_some(), "{:?} vs {:?}", d.chosen, best);
        if let (Some(c), Some((t, site, locs))) = (&d.chosen, best) {
            prop_assert!(close(chosen_score(c), t), "{} vs {t}", chosen_score(c));
            if chosen_score(c) == t {
                prop_assert_eq!((&c.site, &c.output_locations), (&site, &locs));
            }
        }
    }

    /// The chosen candidate breaks no rule (the brute force accepts it at the same cost).
    #[test]
    fn never_chooses_a_rule_breaker(seed in any::<u64>()) {
        let case = random_case(seed, 6);
        let d = place(&case.job, &case.world());
        if let Some(c) = &d.chosen {
            let as_candidate = Candidate {
                site: c.site.clone(),
                output_locations: c.output_locations.clone(),
                verdict: Verdict::Feasible(c.offer.clone()),
            };
            let brute = evaluate_candidate(&case, &as_candidate);
            prop_assert!(brute.is_some_and(|b| close(b.total, c.offer.cost.total_usd)), "{c:?} vs {brute:?}");
            let policy = &case.job.policy;
            prop_assert!(policy.max_usd_per_hour.is_none_or(|cap| c.offer.cost.usd_per_hour <= cap));
            prop_assert!(case.job.budget_left_usd.is_none_or(|b| c.offer.cost.total_usd <= b));
            prop_assert!(policy.max_wait.is_none_or(|m| c.offer.wait_s <= m.as_secs()));
        }
    }

    /// Nothing feasible is cheaper than the choice (among owned hardware free now, with owned-first).
    #[test]
    fn never_chooses_a_costlier_candidate(seed in any::<u64>()) {
        let case = random_case(seed, 6);
        let world = case.world();
        let d = place(&case.job, &world);
        let Some(chosen) = &d.chosen else {
            prop_assert!(d.candidates.iter().all(|c| total(c).is_none()));
            return Ok(());
        };
        let onprem = |name: &str| world.sites().iter().any(|s| s.site.name == name && s.site.kind == SiteKind::Onprem);
        let owned = case.job.policy.owned_first && onprem(&chosen.site) && chosen.offer.wait_s == 0;
        for c in &d.candidates {
            let comparable = !owned || (onprem(&c.site) && matches!(&c.verdict, Verdict::Feasible(o) if o.wait_s == 0));
            if let (Some(t), true) = (score(c), comparable) {
                prop_assert!(chosen_score(chosen) <= t, "{chosen:?} costs more than {c:?}");
            }
        }
    }

    /// Same input, same decision, whatever the order sites, locations and prices come in.
    #[test]
    fn same_input_same_decision(seed in any::<u64>(), shuffle in any::<u64>()) {
        let case = random_case(seed, 6);
        let d = place(&case.job, &case.world());
        prop_assert_eq!(&d, &place(&case.job, &case.world()));
        let mut rng = fastrand::Rng::with_seed(shuffle);
        let mut other = case.clone();
        rng.shuffle(&mut other.sites);
        rng.shuffle(&mut other.locations);
        rng.shuffle(&mut other.prices.compute);
        rng.shuffle(&mut other.prices.egress);
        rng.shuffle(&mut other.prices.storage);
        let shuffled = place(&other.job, &other.world());
        prop_assert_eq!(serde_json::to_string(&d).unwrap(), serde_json::to_string(&shuffled).unwrap());
    }

    /// Adding a site never raises the chosen cost (without owned-first, which may prefer a dearer lab).
    #[test]
    fn adding_a_site_never_raises_the_cost(seed in any::<u64>(), extra in any::<u64>()) {
        let mut case = random_case(seed, 5);
        case.job.policy.owned_first = false;
        let before = place(&case.job, &case.world()).chosen.map(|c| chosen_score(&c));
        let mut site = random_site(&mut fastrand::Rng::with_seed(extra), "s-extra".into());
        // The first on-prem site of a region (by name) sets the uplink of local locations there;
        // keep it, so that only the candidates change, not the prices.
        if site.site.kind == SiteKind::Onprem {
            site.site.uplink_usd_per_gb = local_uplink(&case, &site.site.region);
        }
        case.sites.push(site);
        let after = place(&case.job, &case.world());
        let new = after.candidates.iter().filter(|c| c.site == "s-extra").filter_map(score).reduce(f64::min);
        let after = after.chosen.map(|c| chosen_score(&c));
        if let Some(b) = before {
            prop_assert!(after.is_some_and(|a| a <= b), "{after:?} > {b}");
        }
        if let Some(n) = new {
            prop_assert!(after.is_some_and(|a| a <= n));
        }
    }

    /// Dearer prices never lower the chosen cost (without owned-first, which may prefer a dearer lab).
    #[test]
    fn monotone_in_prices(seed in any::<u64>(), factor in 1.0f64..3.0) {
        let mut case = random_case(seed, 5);
        case.job.policy.owned_first = false;
        let before = place(&case.job, &case.world()).chosen.map(|c| chosen_score(&c));
        for p in &mut case.prices.compute {
            p.usd_per_hour *= factor;
        }
        for p in &mut case.prices.egress {
            p.usd_per_gb *= factor;
        }
        for p in &mut case.prices.storage {
            p.usd_per_gb_month *= factor;
        }
        for st in &mut case.sites {
            st.site.gpu_hour_usd = st.site.gpu_hour_usd.map(|p| p * factor);
            st.site.gpu_hour_usd_by_model.values_mut().for_each(|p| *p *= factor);
            st.site.cpu_hour_usd *= factor;
            st.site.uplink_usd_per_gb *= factor;
        }
        let after = place(&case.job, &case.world()).chosen.map(|c| chosen_score(&c));
        if let Some(a) = after {
            prop_assert!(before.is_some_and(|b| b <= a * (1.0 + 1e-9)), "{before:?} > {a}");
        }
    }

    /// Longer waits never lower the chosen cost (without owned-first).
    #[test]
    fn monotone_in_waits(seed in any::<u64>(), longer in 0u64..3 * 3600) {
        let mut case = random_case(seed, 5);
        case.job.policy.owned_first = false;
        for st in &mut case.sites {
            st.capacity.profile = None;
        }
        let before = place(&case.job, &case.world()).chosen.map(|c| chosen_score(&c));
        for st in &mut case.sites {
            st.capacity.queue_wait = st.capacity.queue_wait.map(|w| w + Duration::from_secs(longer));
        }
        if let Some(w) = &mut case.job.waiting_at {
            w.wait = w.wait.map(|w| w + Duration::from_secs(longer));
        }
        let after = place(&case.job, &case.world()).chosen.map(|c| chosen_score(&c));
        if let Some(a) = after {
            prop_assert!(before.is_some_and(|b| b <= a * (1.0 + 1e-9)), "{before:?} > {a}");
        }
    }
}
