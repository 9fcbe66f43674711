//! Scenarios for [`place`]: the quickstart's decisions and every rejection reason, with plain values.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::model::capacity::{CapacityConfig, ProviderKind};
use crate::model::price::{Cloud, ComputePrice, Destination, EgressPrice, PriceSnapshot, Provenance, StoragePrice};
use crate::model::site::{Site, StorageLocation};
use crate::placement::request::{OutputDest, PlacementInput, PlacementOutput, PlacementPolicy};
use crate::placement::world::{SiteCapacity, SiteState};

pub(super) const HOUR_MS: i64 = 3_600_000;
pub(super) const GB: u64 = 1_000_000_000;

fn provenance() -> Provenance {
    Provenance { source: "test".into(), fetched_at: 0 }
}

pub(super) fn compute(cloud: Cloud, region: &str, ty: &str, market: Market, usd: f64) -> ComputePrice {
    let (region, instance_type) = (region.into(), ty.into());
    ComputePrice { cloud, region, instance_type, market, usd_per_hour: usd, provenance: provenance() }
}

pub(super) fn egress(cloud: Cloud, region: &str, destination: Destination, usd: f64) -> EgressPrice {
    EgressPrice { cloud, region: region.into(), destination, usd_per_gb: usd, provenance: provenance() }
}

pub(super) fn storage(cloud: Cloud, region: &str, usd: f64) -> StoragePrice {
    StoragePrice { cloud, region: region.into(), usd_per_gb_month: usd, provenance: provenance() }
}

pub(super) fn onprem(name: &str, region: &str, residency: &str, gpu_hour: f64) -> Site {
    Site {
        name: name.into(),
        kind: SiteKind::Onprem,
        region: region.into(),
        residency: residency.into(),
        gpu_hour_usd: Some(gpu_hour),
        gpu_hour_usd_by_model: BTreeMap::new(),
        cpu_hour_usd: 0.0,
        uplink_usd_per_gb: 0.01,
        instance_types: Vec::new(),
        spot: false,
        capacity: None,
    }
}

pub(super) fn cloud(name: &str, kind: SiteKind, region: &str, residency: &str, types: &[&str]) -> Site {
    Site {
        kind,
        gpu_hour_usd: None,
        uplink_usd_per_gb: 0.0,
        instance_types: types.iter().map(|t| (*t).to_owned()).collect(),
        capacity: Some(CapacityConfig::new(ProviderKind::Local)),
        ..onprem(name, region, residency, 0.0)
    }
}

pub(super) fn shape(model: &str, gpus: u32, cpus: u32, gib: u64) -> NodeShape {
    let gpus = if gpus == 0 { Vec::new() } else { vec![(model.to_owned(), gpus)] };
    NodeShape { gpus, cpus, memory_mib: gib * 1024 }
}

/// An on-prem capacity: `free` GPUs of `model` free now out of 8 on one node; `wait` when busy.
pub(super) fn lab(model: &str, free: u32, wait: Option<Duration>) -> SiteCapacity {
    SiteCapacity {
        free: vec![shape(model, free, 64, 512)],
        total: vec![shape(model, 8, 64, 512)],
        queue_wait: wait,
        profile: None,
        unavailable: Vec::new(),
    }
}

pub(super) fn elastic(site: Site) -> SiteState {
    SiteState { site, capacity: SiteCapacity::default() }
}

pub(super) fn location(name: &str, kind: SiteKind, region: &str, residency: &str) -> StorageLocation {
    StorageLocation { name: name.into(), kind, region: region.into(), residency: residency.into() }
}

pub(super) fn job(gpus: u32, models: &[&str], hours: u64) -> PlacementJob {
    PlacementJob {
        gpus,
        gpu_models: models.iter().map(|m| (*m).to_owned()).collect(),
        cpus: 8,
        memory_gib: 32,
        runtime: Duration::from_secs(hours * 3600),
        inputs: Vec::new(),
        outputs: Vec::new(),
        policy: PlacementPolicy::default(),
        budget_left_usd: None,
        waiting_at: None,
    }
}

fn input(location: &str, bytes: u64) -> PlacementInput {
    PlacementInput { location: location.into(), bytes }
}

/// Sites in both clouds and a lab, with prices for H100s, A100s, L4s and CPUs in us and eu.
fn world(lab_capacity: SiteCapacity, compute_prices: Vec<ComputePrice>) -> World {
    let sites = vec![
        SiteState { site: onprem("lab-sto", "stockholm", "eu", 2.5), capacity: lab_capacity },
        elastic(cloud("aws-use1", SiteKind::Aws, "us-east-1", "us", &["p5.48xlarge", "g6.xlarge", "m7i.2xlarge"])),
        elastic(cloud("aws-euw1", SiteKind::Aws, "eu-west-1", "eu", &["p5.48xlarge", "m7i.2xlarge"])),
        elastic(cloud(
            "azure-weu",
            SiteKind::Azure,
            "westeurope",
            "eu",
            &["Standard_ND96isr_H100_v5", "Standard_D16s_v5"],
        )),
    ];
    let locations = vec![
        location("s3-euw1", SiteKind::Aws, "eu-west-1", "eu"),
        location("s3-use1", SiteKind::Aws, "us-east-1", "us"),
        location("az-weu", SiteKind::Azure, "westeurope", "eu"),
        location("lab", SiteKind::Onprem, "stockholm", "eu"),
    ];
    let mut prices =
        PriceSnapshot { id: "snap-1".into(), fetched_at: 0, compute: compute_prices, ..Default::default() };
    for (c, r) in [(Cloud::Aws, "us-east-1"), (Cloud::Aws, "eu-west-1"), (Cloud::Azure, "westeurope")] {
        prices.egress.push(egress(c, r, Destination::Internet, 0.09));
        prices.egress.push(egress(c, r, Destination::InterRegion, 0.02));
        prices.storage.push(storage(c, r, 0.023));
    }
    World::new(sites, locations, &prices, 10 * 60_000, Duration::from_secs(3600))
}

fn standard_prices(aws_p5: f64, azure_nd: f64) -> Vec<ComputePrice> {
    vec![
        compute(Cloud::Aws, "us-east-1", "p5.48xlarge", Market::OnDemand, aws_p5 * 0.9),
        compute(Cloud::Aws, "us-east-1", "g6.xlarge", Market::OnDemand, 0.80),
        compute(Cloud::Aws, "us-east-1", "m7i.2xlarge", Market::OnDemand, 0.40),
        compute(Cloud::Aws, "eu-west-1", "p5.48xlarge", Market::OnDemand, aws_p5),
        compute(Cloud::Aws, "eu-west-1", "m7i.2xlarge", Market::OnDemand, 0.45),
        compute(Cloud::Azure, "westeurope", "Standard_ND96isr_H100_v5", Market::OnDemand, azure_nd),
        compute(Cloud::Azure, "westeurope", "Standard_D16s_v5", Market::OnDemand, 0.90),
    ]
}

fn rejection<'a>(d: &'a Decision, site: &str) -> &'a str {
    let c = d.candidates.iter().find(|c| c.site == site).unwrap_or_else(|| panic!("no candidate {site}"));
    match &c.verdict {
        Verdict::Rejected(r) => r.as_str(),
        Verdict::Feasible(o) => panic!("{site} is feasible: {o:?}"),
    }
}

fn chosen(d: &Decision) -> &Chosen {
    d.chosen.as_ref().unwrap_or_else(|| panic!("nothing chosen: {:#?}", d.candidates))
}

#[test]
fn gpu_job_goes_on_prem_when_it_fits() {
    let w = world(lab("H100-80GB", 8, None), standard_prices(98.0, 99.0));
    let d = place(&job(2, &["H100-80GB"], 3), &w);
    let c = chosen(&d);
    assert_eq!(
        (c.site.as_str(), c.offer.gpu_model.as_deref(), c.offer.instance_type.as_deref()),
        ("lab-sto", Some("H100-80GB"), None)
    );
    assert_eq!(c.offer.cost.compute_usd, 2.5 * 2.0 * 3.0);
    assert_eq!(c.offer.cost.usd_per_hour, 5.0);
    assert_eq!(d.candidates.len(), 4);
    assert!(d.candidates.iter().all(|c| matches!(c.verdict, Verdict::Feasible(_))), "{:#?}", d.candidates);
}

#[test]
fn eu_data_never_leaves_the_eu() {
    // The US site is by far the cheapest, but the data is in the EU.
    let mut prices = standard_prices(98.0, 99.0);
    prices[0].usd_per_hour = 10.0;
    let w = world(lab("H100-80GB", 0, None), prices);
    let mut j = job(8, &["H100-80GB"], 2);
    j.inputs = vec![input("s3-euw1", 100 * GB)];
    let d = place(&j, &w);
    assert_eq!(d.residency.as_deref(), Some("eu"));
    assert_eq!(rejection(&d, "aws-use1"), "residency: data in eu, site in us");
    let c = chosen(&d);
    assert_eq!(c.site, "aws-euw1");
    assert_eq!(c.offer.cost.egress_usd, 0.0, "same region: free");
    // An explicit policy is named as such.
    j.policy.residency = Some("eu".into());
    assert_eq!(rejection(&place(&j, &w), "aws-use1"), "residency: policy in eu, site in us");
    // Mixed inputs derive no constraint.
    j.policy.residency = None;
    j.inputs.push(input("s3-use1", GB));
    assert_eq!(place(&j, &w).residency, None);
}

#[test]
fn cpu_job_on_a_big_dataset_goes_to_the_data() {
    let w = world(lab("H100-80GB", 8, None), standard_prices(98.0, 99.0));
    let mut j = job(0, &[], 4);
    j.inputs = vec![input("az-weu", 5_000 * GB)];
    let d = place(&j, &w);
    let c = chosen(&d);
    assert_eq!((c.site.as_str(), c.offer.instance_type.as_deref()), ("azure-weu", Some("Standard_D16s_v5")));
    assert_eq!(c.offer.cost.egress_usd, 0.0);
    let Verdict::Feasible(lab) = &d.candidates.iter().find(|c| c.site == "lab-sto").unwrap().verdict else { panic!() };
    assert_eq!(lab.cost.compute_usd, 0.0, "owned CPUs cost cpu_hour_usd = 0");
    assert!((lab.cost.egress_usd - 450.0).abs() < 1e-6, "azure internet egress: {lab:?}");
}

#[test]
fn busy_on_prem_spills_to_the_cheapest_cloud() {
    let w = world(lab("H100-80GB", 0, Some(Duration::from_secs(3 * 3600))), standard_prices(98.0, 97.5));
    let mut j = job(8, &["H100-80GB"], 2);
    j.policy.residency = Some("eu".into());
    j.policy.max_wait = Some(Duration::from_secs(30 * 60));
    let d = place(&j, &w);
    assert_eq!(rejection(&d, "lab-sto"), "max wait: wait 3h > 30m");
    assert_eq!(chosen(&d).site, "azure-weu");
    // Without max_wait the lab is worth waiting for; with a deadline it is not.
    j.policy.max_wait = None;
    assert_eq!(chosen(&place(&j, &w)).offer.wait_s, 3 * 3600);
    j.policy.deadline = Some(w.now + 4 * HOUR_MS);
    let d = place(&j, &w);
    assert_eq!(rejection(&d, "lab-sto"), "deadline: wait 3h + run 2h > 4h");
    assert_eq!(chosen(&d).site, "azure-weu");
    // An unknown wait is not placed on.
    let w = world(lab("H100-80GB", 0, None), standard_prices(98.0, 97.5));
    assert_eq!(rejection(&place(&j, &w), "lab-sto"), "busy: no node free now and no wait estimate");
}

#[test]
fn prices_alone_flip_aws_and_azure() {
    let mut j = job(8, &["H100-80GB"], 2);
    j.policy.residency = Some("eu".into());
    let busy = || lab("H100-80GB", 0, None);
    assert_eq!(chosen(&place(&j, &world(busy(), standard_prices(98.0, 99.0)))).site, "aws-euw1");
    assert_eq!(chosen(&place(&j, &world(busy(), standard_prices(99.0, 98.0)))).site, "azure-weu");
}

#[test]
fn caps_and_budget_reject_with_numbers() {
    let w = world(lab("H100-80GB", 0, None), standard_prices(86.25, 120.0));
    let mut j = job(8, &["H100-80GB"], 8);
    j.policy.residency = Some("eu".into());
    j.budget_left_usd = Some(412.0);
    let d = place(&j, &w);
    assert_eq!(rejection(&d, "aws-euw1"), "budget: $412 left, estimate $690");
    assert!(d.chosen.is_none());
    j.budget_left_usd = None;
    j.policy.max_usd_total = Some(500.0);
    assert_eq!(rejection(&place(&j, &w), "aws-euw1"), "cost cap: $690 > $500");
    let w = world(lab("H100-80GB", 0, None), standard_prices(31.2, 120.0));
    j.policy.max_usd_per_hour = Some(20.0);
    assert_eq!(rejection(&place(&j, &w), "aws-euw1"), "price cap: $31.20/h > $20/h");
}

#[test]
fn a_missing_price_rejects_and_is_never_guessed() {
    let mut prices = standard_prices(98.0, 99.0);
    prices.retain(|p| p.instance_type != "p5.48xlarge");
    let w = world(lab("H100-80GB", 0, None), prices);
    let d = place(&job(8, &["H100-80GB"], 1), &w);
    assert_eq!(rejection(&d, "aws-use1"), "no price for p5.48xlarge in us-east-1");
    assert_eq!(chosen(&d).site, "azure-weu");
    // A spot-only price is usable only where spot is allowed.
    let mut prices = standard_prices(98.0, 99.0);
    prices.iter_mut().filter(|p| p.instance_type == "p5.48xlarge").for_each(|p| p.market = Market::Spot);
    let w = world(lab("H100-80GB", 0, None), prices);
    assert_eq!(
        rejection(&place(&job(8, &[], 1), &w), "aws-euw1"),
        "spot: only a spot price for p5.48xlarge in eu-west-1, and the site says no spot"
    );
    // Moving data needs an egress price.
    let mut j = job(0, &[], 1);
    j.inputs = vec![input("s3-euw1", GB)];
    let sites = vec![elastic(cloud("aws-euc1", SiteKind::Aws, "eu-central-1", "eu", &["m7i.2xlarge"]))];
    let prices = PriceSnapshot {
        compute: vec![compute(Cloud::Aws, "eu-central-1", "m7i.2xlarge", Market::OnDemand, 0.4)],
        ..Default::default()
    };
    let w = World::new(sites, vec![location("s3-euw1", SiteKind::Aws, "eu-west-1", "eu")], &prices, 0, Duration::ZERO);
    assert_eq!(rejection(&place(&j, &w), "aws-euc1"), "no egress price for aws eu-west-1 (inter-region)");
}

#[test]
fn one_gpu_on_an_eight_gpu_type_pays_the_whole_instance() {
    let w = world(lab("H100-80GB", 0, None), standard_prices(98.0, 99.0));
    let mut j = job(1, &["H100-80GB"], 2);
    j.policy.clouds = Some(vec![Cloud::Aws]);
    j.policy.residency = Some("eu".into());
    let d = place(&j, &w);
    assert_eq!(rejection(&d, "azure-weu"), "cloud azure not allowed");
    let c = chosen(&d);
    assert_eq!(
        (c.site.as_str(), c.offer.instance_type.as_deref(), c.offer.instances),
        ("aws-euw1", Some("p5.48xlarge"), 1)
    );
    assert_eq!(c.offer.cost.compute_usd, 98.0 * 2.0);
    // The cheapest type that fits wins: a 1×L4 job takes g6.xlarge, not p5.
    let mut j = job(1, &["L4-24GB"], 1);
    j.cpus = 4;
    j.memory_gib = 16;
    let d = place(&j, &w);
    assert_eq!(chosen(&d).offer.instance_type.as_deref(), Some("g6.xlarge"));
    assert_eq!(rejection(&d, "aws-euw1"), "no L4-24GB at site");
    assert_eq!(rejection(&d, "lab-sto"), "no L4-24GB at site");
    // Single node only: 16 GPUs fit nowhere.
    let d = place(&job(16, &["H100-80GB"], 1), &w);
    assert_eq!(rejection(&d, "aws-use1"), "no instance type fits 16×H100-80GB, 8 cpus, 32 GiB");
    assert_eq!(rejection(&d, "lab-sto"), "no node fits 16×H100-80GB, 8 cpus, 32 GiB");
}

#[test]
fn spot_is_used_where_site_and_policy_allow_it() {
    let mut prices = standard_prices(98.0, 99.0);
    prices.push(compute(Cloud::Aws, "eu-west-1", "p5.48xlarge", Market::Spot, 40.0));
    let mut sites = vec![elastic(cloud("aws-euw1", SiteKind::Aws, "eu-west-1", "eu", &["p5.48xlarge"]))];
    sites[0].site.spot = true;
    let snapshot = PriceSnapshot { compute: prices, ..Default::default() };
    let w = World::new(sites, Vec::new(), &snapshot, 0, Duration::ZERO);
    let mut j = job(8, &[], 1);
    let offer = chosen(&place(&j, &w)).offer.clone();
    assert_eq!((offer.market, offer.cost.usd_per_hour), (Some(Market::Spot), 40.0));
    j.policy.spot = Spot::Never;
    let offer = chosen(&place(&j, &w)).offer.clone();
    assert_eq!((offer.market, offer.cost.usd_per_hour), (Some(Market::OnDemand), 98.0));
}

#[test]
fn owned_first_prefers_a_free_lab_whatever_the_price() {
    let mut cap = lab("H100-80GB", 8, None);
    let w = |cap: SiteCapacity| {
        let mut w = world(cap, standard_prices(1.0, 1.0));
        w.sites.iter_mut().find(|s| s.site.name == "lab-sto").unwrap().site.gpu_hour_usd = Some(50.0);
        w
    };
    let mut j = job(8, &["H100-80GB"], 1);
    assert_ne!(chosen(&place(&j, &w(cap.clone()))).site, "lab-sto");
    j.policy.owned_first = true;
    assert_eq!(chosen(&place(&j, &w(cap.clone()))).site, "lab-sto");
    // Owned-first means "when it has room": a busy lab is not waited for.
    cap.free.clear();
    cap.queue_wait = Some(Duration::from_secs(60));
    assert_ne!(chosen(&place(&j, &w(cap))).site, "lab-sto");
}

#[test]
fn placement_chooses_output_locations() {
    let w = world(lab("H100-80GB", 0, None), standard_prices(98.0, 99.0));
    let mut j = job(0, &[], 1);
    // Inputs in both groups: no residency derived, so an output may go to the US.
    j.inputs = vec![input("az-weu", 10 * GB), input("s3-use1", 0)];
    j.outputs = vec![output("out/", OutputDest::Location("s3-use1".into()), GB), choose("ckpt/", "eu", 100 * GB)];
    let d = place(&j, &w);
    // 4 sites × 3 eu locations.
    assert_eq!(d.candidates.len(), 12);
    // The lab (free CPUs) keeps the chosen output at home: no egress, no storage bill.
    let c = chosen(&d);
    assert_eq!(
        (c.site.as_str(), c.output_locations.as_slice()),
        ("lab-sto", &["s3-use1".to_owned(), "lab".to_owned()][..])
    );
    assert!((c.offer.cost.storage_usd - 0.023).abs() < 1e-9, "{:?}", c.offer.cost);
    assert!((c.offer.cost.egress_usd - (0.9 + 0.01)).abs() < 1e-9, "{:?}", c.offer.cost);
    // At the Azure site the same output stays in its region.
    let azure = d.candidates.iter().filter(|c| c.site == "azure-weu");
    let best = azure
        .filter_map(|c| match &c.verdict {
            Verdict::Feasible(o) => Some((o.cost.total_usd, c.output_locations[1].as_str())),
            Verdict::Rejected(_) => None,
        })
        .min_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(best.map(|b| b.1), Some("az-weu"));
    // An output group outside the policy's residency rejects everything.
    j.policy.residency = Some("eu".into());
    j.outputs.remove(1);
    let d = place(&j, &w);
    assert!(d.chosen.is_none());
    assert_eq!(rejection(&d, "azure-weu"), "residency: output out/ goes to us, policy in eu");
}

fn output(path: &str, dest: OutputDest, bytes: u64) -> PlacementOutput {
    PlacementOutput { path: path.into(), dest, bytes }
}

fn choose(path: &str, residency: &str, bytes: u64) -> PlacementOutput {
    output(path, OutputDest::Choose { residency: residency.into(), among: Vec::new() }, bytes)
}

#[test]
fn outputs_of_eu_data_never_leave_the_eu() {
    let w = world(lab("H100-80GB", 8, None), standard_prices(98.0, 99.0));
    let mut j = job(0, &[], 1);
    j.inputs = vec![input("s3-euw1", GB)];
    // Fixed to a US location: every candidate is rejected, the EU ones included, and why.
    j.outputs = vec![
        output("logs/", OutputDest::Location("lab".into()), GB),
        output("out/", OutputDest::Location("s3-use1".into()), GB),
    ];
    let d = place(&j, &w);
    assert_eq!(d.residency.as_deref(), Some("eu"));
    assert!(d.chosen.is_none(), "{:?}", d.chosen);
    for c in &d.candidates {
        let why = Rejection::new(RejectionKind::Residency, "residency: output out/ goes to us, data in eu");
        assert_eq!(c.verdict, Verdict::Rejected(why), "{}", c.site);
    }
    assert_eq!(
        refusal(&j, &w).map(|r| r.to_string()).as_deref(),
        Some("residency: output out/ goes to us, data in eu")
    );
    // An output asking placement for a US location is refused the same way.
    j.outputs = vec![choose("ckpt/", "us", GB)];
    assert_eq!(
        refusal(&j, &w).map(|r| r.to_string()).as_deref(),
        Some("residency: output ckpt/ goes to us, data in eu")
    );
    assert!(place(&j, &w).chosen.is_none());
    // An output given by residency only gets EU locations: every candidate is in the group.
    j.outputs = vec![choose("ckpt/", "eu", GB)];
    let d = place(&j, &w);
    assert_eq!(refusal(&j, &w), None);
    let eu = ["az-weu", "lab", "s3-euw1"];
    assert_eq!(d.candidates.len(), 4 * eu.len());
    assert!(d.candidates.iter().all(|c| eu.contains(&c.output_locations[0].as_str())), "{:#?}", d.candidates);
    assert!(eu.contains(&chosen(&d).output_locations[0].as_str()));
    // The same EU output with US data is refused; an EU output with EU data is placed.
    j.inputs = vec![input("s3-use1", GB)];
    assert_eq!(
        refusal(&j, &w).map(|r| r.to_string()).as_deref(),
        Some("residency: output ckpt/ goes to eu, data in us")
    );
    j.inputs = vec![input("lab", GB)];
    j.outputs = vec![output("out/", OutputDest::Location("s3-euw1".into()), GB)];
    assert_eq!(chosen(&place(&j, &w)).output_locations, ["s3-euw1"]);
    // Without inputs nor policy there is no residency to keep.
    j.inputs.clear();
    j.outputs = vec![output("out/", OutputDest::Location("s3-use1".into()), GB)];
    assert_eq!((refusal(&j, &w), place(&j, &w).residency), (None, None));
}

#[test]
fn decisions_serialise_to_the_documented_json() {
    let w = world(lab("H100-80GB", 8, None), standard_prices(98.0, 99.0));
    let d = place(&job(2, &["H100-80GB"], 1), &w);
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["chosen"]["site"], "lab-sto");
    assert_eq!(v["chosen"]["cost"]["total_usd"], 5.0);
    for key in ["compute_usd", "egress_usd", "storage_usd", "total_usd", "usd_per_hour", "hours"] {
        assert!(v["chosen"]["cost"].get(key).is_some(), "{key}");
    }
    assert_eq!(v["candidates"][0]["site"], "aws-euw1");
    assert_eq!(v["candidates"][0]["feasible"]["instance_type"], "p5.48xlarge");
    assert_eq!(v["snapshot_id"], "snap-1");
    assert_eq!((v["snapshot_age_ms"].as_i64(), v["stale"].as_bool()), (Some(600_000), Some(false)));
    let j = job(2, &["L4-24GB"], 1);
    let v = serde_json::to_value(place(&j, &w)).unwrap();
    assert_eq!(v["candidates"][0]["rejected"], "no L4-24GB at site");
    let back: Decision = serde_json::from_value(v).unwrap();
    assert_eq!(back, place(&j, &w));
}

#[test]
fn money_and_durations_read_like_the_issue() {
    assert_eq!(
        (usd(412.0), usd(31.2), usd(690.004), usd(0.0)),
        ("$412".into(), "$31.20".into(), "$690".into(), "$0".into())
    );
    let d = |s| dur(Duration::from_secs(s));
    assert_eq!((d(3 * 3600), d(5400), d(45), d(0)), ("3h".into(), "1h 30m".into(), "45s".into(), "0s".into()));
}

#[test]
fn policies_only_narrow() {
    let tenant = PlacementPolicy {
        residency: Some("eu".into()),
        clouds: Some(vec![Cloud::Aws]),
        max_usd_per_hour: Some(40.0),
        ..Default::default()
    };
    let job: crate::model::job::Policy = serde_json::from_str(
        r#"{"clouds":["azure","aws"],"max_usd_per_hour":60,"max_usd_total":200,"spot":"never",
            "max_wait":"30m","deadline":"2026-12-01T18:00:00Z"}"#,
    )
    .unwrap();
    let p = tenant.narrow(&job, 0).unwrap();
    assert_eq!(p.clouds, Some(vec![Cloud::Aws]));
    assert_eq!((p.max_usd_per_hour, p.max_usd_total, p.spot), (Some(40.0), Some(200.0), Spot::Never));
    assert_eq!(p.max_wait, Some(Duration::from_secs(1800)));
    assert_eq!(p.deadline, Some(1_796_148_000_000));
    let us: crate::model::job::Policy = serde_json::from_str(r#"{"residency":"us"}"#).unwrap();
    assert!(tenant.narrow(&us, 0).unwrap_err().contains("outside the tenant's residency eu"));
}

#[test]
fn stale_snapshots_are_flagged() {
    let prices = PriceSnapshot { id: "old".into(), fetched_at: 0, ..Default::default() };
    let w = World::new(Vec::new(), Vec::new(), &prices, 2 * HOUR_MS, Duration::from_secs(3600));
    let d = place(&job(0, &[], 1), &w);
    assert!(d.stale && d.chosen.is_none() && d.candidates.is_empty());
    assert_eq!(d.snapshot_age_ms, 2 * HOUR_MS);
}

/// `cargo test --release --lib placement::engine::tests::bench_placement -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run with --release"]
fn bench_placement() {
    let (world, jobs, _) = crate::placement::synthetic::bench_world(50, 10_000, 7);
    let report = crate::placement::synthetic::bench(&world, &jobs, 5);
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert!(report.placed > 0);
}

fn kind(d: &Decision, site: &str) -> RejectionKind {
    let c = d.candidates.iter().find(|c| c.site == site).unwrap_or_else(|| panic!("no candidate {site}"));
    match &c.verdict {
        Verdict::Rejected(r) => r.kind,
        Verdict::Feasible(o) => panic!("{site} is feasible: {o:?}"),
    }
}

#[test]
fn rejections_carry_their_kind() {
    let w = world(lab("H100-80GB", 0, None), standard_prices(86.25, 120.0));
    let mut j = job(8, &["H100-80GB"], 8);
    j.policy.residency = Some("eu".into());
    j.budget_left_usd = Some(412.0);
    let d = place(&j, &w);
    assert_eq!((kind(&d, "aws-euw1"), kind(&d, "aws-use1")), (RejectionKind::Budget, RejectionKind::Residency));
    j.budget_left_usd = None;
    j.policy.max_usd_total = Some(500.0);
    assert_eq!(kind(&place(&j, &w), "aws-euw1"), RejectionKind::CostCap);
    j.policy.max_usd_per_hour = Some(20.0);
    assert_eq!(kind(&place(&j, &w), "aws-euw1"), RejectionKind::PriceCap);
    j.policy.sites = Some(vec!["lab-sto".into()]);
    assert_eq!(kind(&place(&j, &w), "aws-euw1"), RejectionKind::NotAllowed);
    // Capacity: the lab has no free GPU now and no wait estimate; no L4 anywhere.
    let d = place(&job(8, &["H100-80GB"], 1), &w);
    assert_eq!(kind(&d, "lab-sto"), RejectionKind::Capacity);
    assert_eq!(kind(&place(&job(1, &["L4-24GB"], 1), &w), "azure-weu"), RejectionKind::Capacity);
    let mut prices = standard_prices(98.0, 99.0);
    prices.retain(|p| p.instance_type != "p5.48xlarge");
    let d = place(&job(8, &["H100-80GB"], 1), &world(lab("H100-80GB", 0, None), prices));
    assert_eq!(kind(&d, "aws-use1"), RejectionKind::NoPrice);
    let mut prices = standard_prices(98.0, 99.0);
    prices.iter_mut().filter(|p| p.instance_type == "p5.48xlarge").for_each(|p| p.market = Market::Spot);
    let d = place(&job(8, &[], 1), &world(lab("H100-80GB", 0, None), prices));
    assert_eq!(kind(&d, "aws-euw1"), RejectionKind::Spot);
    let mut j = job(0, &[], 1);
    j.outputs = vec![output("out/", OutputDest::Location("nowhere".into()), GB)];
    let d = place(&j, &w);
    assert!(
        d.candidates.iter().all(|c| matches!(&c.verdict, Verdict::Rejected(r) if r.kind == RejectionKind::Location))
    );
    assert_eq!(
        refusal(&j, &w).map(|r| (r.kind, r.to_string())),
        Some((RejectionKind::Location, "unknown storage location nowhere".into()))
    );
}

#[test]
fn rejection_kinds_travel_in_the_json_and_older_decisions_still_read() {
    let w = world(lab("H100-80GB", 8, None), standard_prices(98.0, 99.0));
    let d = place(&job(2, &["L4-24GB"], 1), &w);
    let v = serde_json::to_value(&d).unwrap();
    let first = &v["candidates"][0];
    assert_eq!((first["rejected"].as_str(), first["kind"].as_str()), (Some("no L4-24GB at site"), Some("capacity")));
    assert!(first.get("feasible").is_none(), "{first}");
    let feasible = serde_json::to_value(place(&job(2, &["H100-80GB"], 1), &w)).unwrap();
    assert!(feasible["candidates"][0].get("kind").is_none() && feasible["candidates"][0].get("rejected").is_none());
    // A decision stored before kinds (no `kind`), or with a kind this version does not know.
    for extra in ["", r#","kind":"quota""#] {
        let text =
            format!(r#"{{"site":"lab","output_locations":[],"rejected":"budget: $1 left, estimate $2"{extra}}}"#);
        let c: Candidate = serde_json::from_str(&text).unwrap();
        assert_eq!(c.verdict, Verdict::Rejected(Rejection::new(RejectionKind::Other, "budget: $1 left, estimate $2")));
    }
    // Neither, or both.
    assert!(serde_json::from_str::<Candidate>(r#"{"site":"lab","output_locations":[]}"#).is_err());
    let both = r#"{"site":"lab","output_locations":[],"rejected":"x","feasible":{"instance_type":null,"instances":1,"market":null,"gpu_model":null,"wait_s":0,"cost":{"compute_usd":0,"egress_usd":0,"storage_usd":0,"total_usd":0,"usd_per_hour":0,"hours":0}}}"#;
    assert!(serde_json::from_str::<Candidate>(both).is_err());
}
