//! A synthetic world and job mix for measuring [`place`]: decisions per second and latency
//! percentiles (`hybroker bench placement` and the engine's ignored benchmark test use it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bind::FreeCapacity;
use super::engine::place;
use super::request::{OutputDest, PlacementInput, PlacementJob, PlacementOutput, PlacementPolicy};
use super::wait::{Need, Node, Profile};
use super::world::{NodeShape, SiteCapacity, SiteState, World};
use crate::model::UnixMillis;
use crate::model::capacity::{CapacityConfig, ProviderKind};
use crate::model::job::Spot;
use crate::model::price::{
    Cloud, ComputePrice, Destination, EgressPrice, Market, PriceSnapshot, Provenance, StoragePrice,
};
use crate::model::site::{InstanceType, Site, SiteKind, StorageLocation, instance_types};

/// Regions the synthetic cloud sites cycle through: (cloud, region, residency).
pub const REGIONS: [(Cloud, &str, &str); 10] = [
    (Cloud::Aws, "us-east-1", "us"),
    (Cloud::Aws, "us-west-2", "us"),
    (Cloud::Aws, "eu-west-1", "eu"),
    (Cloud::Aws, "eu-central-1", "eu"),
    (Cloud::Aws, "ap-northeast-1", "apac"),
    (Cloud::Azure, "eastus", "us"),
    (Cloud::Azure, "westus2", "us"),
    (Cloud::Azure, "westeurope", "eu"),
    (Cloud::Azure, "northeurope", "eu"),
    (Cloud::Azure, "japaneast", "apac"),
];

const ONPREM_SITES: usize = 4;
const GPU_MODELS: [&str; 5] = ["H100-80GB", "A100-80GB", "L4-24GB", "L40S-48GB", "A10G-24GB"];

/// A world of `cloud_sites` cloud sites (each with 4–8 instance types of its cloud, all priced,
/// spot on half of them), 4 on-prem sites whose capacity summarises `agents` agents (8 GPUs each,
/// about half busy for up to 4 h more) each with 250 jobs waiting (its queue-wait replay), 6 storage
/// locations, and 1,000 jobs to place (a quarter CPU-only; GPU jobs of 1–8 GPUs; most with inputs
/// of up to 2 TB; a third with a $/hour cap; some with an output placement chooses). Also gives
/// the mean time to build one site's replay.
pub fn bench_world(cloud_sites: usize, agents: usize, seed: u64) -> (World, Vec<PlacementJob>, Duration) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut replay = Duration::ZERO;
    let prices = synthetic_prices(&mut rng, seed, 0);
    let mut sites: Vec<SiteState> = (0..cloud_sites)
        .map(|i| SiteState { site: synthetic_cloud_site(&mut rng, i), capacity: SiteCapacity::default() })
        .collect();
    for i in 0..ONPREM_SITES {
        let per_site = agents / ONPREM_SITES + usize::from(i < agents % ONPREM_SITES);
        let (mut free, mut total) = (Vec::with_capacity(per_site), Vec::with_capacity(per_site));
        let mut nodes = Vec::with_capacity(per_site);
        let mut models = Vec::new();
        for _ in 0..per_site {
            let model = GPU_MODELS[rng.usize(..GPU_MODELS.len())].to_owned();
            let node = |gpus: u32, cpus, gib: u64| FreeCapacity {
                gpus: (0..gpus).map(|g| (g, model.clone())).collect(),
                cpus,
                memory_mib: gib * 1024,
                tenant: None,
            };
            total.push(node(8, 96, 1024));
            let busy = rng.u32(0..=8);
            let idle = node(8 - busy, 96 - busy * 12, 1024 - u64::from(busy) * 128);
            // What the busy part holds, until 0–4 h from now.
            let held = NodeShape {
                gpus: vec![(model.clone(), busy)],
                cpus: busy * 12,
                memory_mib: u64::from(busy) * 128 * 1024,
            };
            let running = if busy == 0 { Vec::new() } else { vec![(Duration::from_secs(rng.u64(0..4 * 3600)), held)] };
            nodes.push(Node { free: NodeShape::of(&idle), running });
            free.push(idle);
            if !models.contains(&model) {
                models.push(model);
            }
        }
        // A quarter of the 1,000 queued jobs wait at each site: 1–8 GPUs of its models, 1–10 h.
        let waiting: Vec<Need> = (0..250)
            .map(|_| {
                let gpus = rng.u32(1..=8);
                Need {
                    gpus,
                    gpu_models: vec![models[rng.usize(..models.len())].clone()],
                    cpus: gpus * 8,
                    memory_mib: u64::from(gpus) * 64 * 1024,
                    runtime: Duration::from_secs(rng.u64(3600..10 * 3600)),
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let profile = Profile::build(nodes, &waiting);
        replay += started.elapsed();
        let site = Site {
            name: format!("lab-{i}"),
            kind: SiteKind::Onprem,
            region: if i % 2 == 0 { "stockholm".into() } else { "virginia".into() },
            residency: if i % 2 == 0 { "eu".into() } else { "us".into() },
            gpu_hour_usd: Some(1.5 + rng.f64()),
            gpu_hour_usd_by_model: BTreeMap::from([("H100-80GB".to_owned(), 2.8)]),
            cpu_hour_usd: 0.01,
            uplink_usd_per_gb: 0.01,
            instance_types: Vec::new(),
            spot: false,
            capacity: None,
        };
        let mut capacity = SiteCapacity::from_agents(&free, &total, None);
        capacity.profile = Some(Arc::new(profile));
        sites.push(SiteState { site, capacity });
    }
    let loc = |name: &str, kind, region: &str, residency: &str| StorageLocation {
        name: name.into(),
        kind,
        region: region.into(),
        residency: residency.into(),
    };
    let locations = vec![
        loc("s3-use1", SiteKind::Aws, "us-east-1", "us"),
        loc("s3-euw1", SiteKind::Aws, "eu-west-1", "eu"),
        loc("az-weu", SiteKind::Azure, "westeurope", "eu"),
        loc("az-eus", SiteKind::Azure, "eastus", "us"),
        loc("lab-eu", SiteKind::Onprem, "stockholm", "eu"),
        loc("lab-us", SiteKind::Onprem, "virginia", "us"),
    ];
    let jobs = (0..1000).map(|_| bench_job(&mut rng, &locations)).collect();
    (World::new(sites, locations, &prices, 60_000, Duration::from_secs(3600)), jobs, replay / ONPREM_SITES as u32)
}

/// A snapshot fetched at `fetched_at` with every region of [`REGIONS`] priced: internet and
/// inter-region egress, storage, and every catalog instance type of the region's cloud on demand
/// (about $0.05 per vCPU-hour plus $4 per GPU-hour, ±20 %) and spot (40 % of on demand).
pub fn synthetic_prices(rng: &mut fastrand::Rng, seed: u64, fetched_at: UnixMillis) -> PriceSnapshot {
    let provenance = Provenance { source: "synthetic".into(), fetched_at };
    let mut prices = PriceSnapshot {
        id: format!("synthetic-{seed}"),
        fetched_at,
        sources: vec!["synthetic".into()],
        ..Default::default()
    };
    for (cloud, region, _) in REGIONS {
        for (destination, usd) in [(Destination::Internet, 0.09), (Destination::InterRegion, 0.02)] {
            let (region, provenance) = (region.to_owned(), provenance.clone());
            prices.egress.push(EgressPrice { cloud, region, destination, usd_per_gb: usd, provenance });
        }
        let (r, p) = (region.to_owned(), provenance.clone());
        prices.storage.push(StoragePrice { cloud, region: r, usd_per_gb_month: 0.02, provenance: p });
        for t in instance_types().iter().filter(|t| t.cloud == cloud) {
            let base = 0.05 * f64::from(t.vcpus) + 4.0 * f64::from(t.gpus);
            let on_demand = base * (0.8 + 0.4 * rng.f64());
            for (market, usd) in [(Market::OnDemand, on_demand), (Market::Spot, on_demand * 0.4)] {
                prices.compute.push(ComputePrice {
                    cloud,
                    region: region.to_owned(),
                    instance_type: t.name.to_owned(),
                    market,
                    usd_per_hour: usd,
                    provenance: provenance.clone(),
                });
            }
        }
    }
    prices
}

/// Cloud site `i`: the `i`-th region of [`REGIONS`] (cycling), 4–8 instance types of its cloud
/// offered there,
/// spot on even sites, elastic. Named `<cloud>-<region>-<i>`.
pub fn synthetic_cloud_site(rng: &mut fastrand::Rng, i: usize) -> Site {
    let (cloud, region, residency) = REGIONS[i % REGIONS.len()];
    let catalog = crate::model::catalog::current();
    let offered = |t: &&InstanceType| t.cloud == cloud && catalog.offered_in(t.name, region);
    let mut types: Vec<String> = instance_types().iter().filter(offered).map(|t| t.name.to_owned()).collect();
    rng.shuffle(&mut types);
    types.truncate(rng.usize(4..=8));
    Site {
        name: format!("{}-{region}-{i}", cloud.as_str()),
        kind: SiteKind::from(cloud),
        region: region.into(),
        residency: residency.into(),
        gpu_hour_usd: None,
        gpu_hour_usd_by_model: BTreeMap::new(),
        cpu_hour_usd: 0.0,
        uplink_usd_per_gb: 0.0,
        instance_types: types,
        spot: i.is_multiple_of(2),
        capacity: Some(CapacityConfig::new(ProviderKind::Local)),
    }
}

fn bench_job(rng: &mut fastrand::Rng, locations: &[StorageLocation]) -> PlacementJob {
    let gpus = if rng.u8(..4) == 0 { 0 } else { [1, 1, 2, 4, 8][rng.usize(..5)] };
    let gpu_models = match (gpus, rng.u8(..3)) {
        (0, _) | (_, 0) => Vec::new(),
        _ => vec![GPU_MODELS[rng.usize(..GPU_MODELS.len())].to_owned()],
    };
    let inputs: Vec<PlacementInput> = (0..rng.usize(0..3))
        .map(|_| PlacementInput {
            location: locations[rng.usize(..locations.len())].name.clone(),
            bytes: rng.u64(0..2_000_000_000_000),
        })
        .collect();
    // Outputs stay in the inputs' residency (a job's outputs may not leave it): the fixed one goes
    // where the first input is.
    let first = inputs.first().and_then(|i| locations.iter().find(|l| l.name == i.location));
    let fixed = first.map_or("s3-use1", |l| l.name.as_str()).to_owned();
    let mut outputs =
        vec![PlacementOutput { path: "out/".into(), dest: OutputDest::Location(fixed), bytes: rng.u64(0..1 << 30) }];
    if rng.bool() {
        let residency = first.map_or(if rng.bool() { "eu" } else { "us" }, |l| l.residency.as_str());
        outputs.push(PlacementOutput {
            path: "checkpoints/".into(),
            dest: OutputDest::Choose { residency: residency.into(), among: Vec::new() },
            bytes: rng.u64(0..50_000_000_000),
        });
    }
    let policy = PlacementPolicy {
        max_usd_per_hour: (rng.u8(..3) == 0).then(|| 10.0 + 30.0 * rng.f64()),
        spot: if rng.bool() { Spot::Allowed } else { Spot::Never },
        max_wait: rng.bool().then(|| Duration::from_secs(rng.u64(0..7200))),
        owned_first: rng.u8(..4) == 0,
        ..PlacementPolicy::default()
    };
    PlacementJob {
        gpus,
        gpu_models,
        cpus: rng.u32(1..=32),
        memory_gib: rng.u32(1..=256),
        runtime: Duration::from_secs(rng.u64(600..48 * 3600)),
        inputs,
        outputs,
        policy,
        budget_left_usd: rng.bool().then(|| rng.f64() * 2000.0),
        waiting_at: None,
    }
}

/// What [`bench`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub jobs: usize,
    pub sites: usize,
    pub decisions_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Jobs that found a feasible candidate.
    pub placed: usize,
}

/// Places every job `rounds` times (the first round warms up and is not counted) and reports the
/// throughput and latency percentiles of one decision.
pub fn bench(world: &World, jobs: &[PlacementJob], rounds: usize) -> BenchReport {
    let mut samples = Vec::with_capacity(jobs.len() * rounds);
    let mut placed = 0;
    let mut busy = Duration::ZERO;
    for round in 0..=rounds {
        for job in jobs {
            let start = Instant::now();
            let decision = place(job, world);
            let took = start.elapsed();
            if round > 0 {
                samples.push(took);
                busy += took;
                placed += usize::from(decision.chosen.is_some());
            }
        }
    }
    samples.sort();
    let pct = |p: f64| samples.get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)));
    let us = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    BenchReport {
        jobs: jobs.len(),
        sites: world.sites().len(),
        decisions_per_s: samples.len() as f64 / busy.as_secs_f64().max(1e-9),
        p50_us: us(pct(0.50)),
        p99_us: us(pct(0.99)),
        max_us: us(samples.last()),
        placed: placed / rounds.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_cloud_sites_are_valid_against_the_catalog() {
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..3 * REGIONS.len() {
            let site = synthetic_cloud_site(&mut rng, i);
            assert!(site.instance_types.len() >= 4, "{site:?}");
            assert_eq!(site.problems(), Vec::<String>::new(), "{}", site.name);
        }
    }
}
