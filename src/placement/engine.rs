//! The global placement engine (docs/design.md §4): [`place`] one job in a [`World`]. Pure and fast.
//!
//! Candidates are sites × output location choices (only outputs that let placement choose add
//! choices; outputs with the same group share one). Each breaks a rule (its verdict is the first
//! reason, in this order: site and cloud allow-lists, residency, no fitting GPU/instance type/node, no
//! price, queue wait against `max_wait`/deadline, transfer and storage prices, $/hour cap, total cap,
//! budget) or is costed. A reason about the job itself ([`refusal`]: an unknown location, an output
//! going outside the job's residency, explicit or derived from its inputs) rejects every candidate.
//! Costs:
//! - compute: cloud: the cheapest instance type of the site that fits the job on one node (GPU
//!   model and count, vCPUs, memory; multi-node is not supported, so `instances` is 1 and a 1-GPU job
//!   on an 8-GPU type pays the whole instance), at its on-demand price, or its spot price where both
//!   the site and the policy allow spot and it is cheaper (or the only one); on-prem: the site's
//!   $/GPU-hour (per model where given; the highest among the acceptable models the site could
//!   give the job, so caps and budgets hold whichever GPUs bind picks) × GPUs, or `cpu_hour_usd` ×
//!   CPUs for a CPU-only job; × estimated hours.
//! - egress: every input's bytes from its location to the site and every output's bytes from the
//!   site to its location, by the transfer rules of [`super::world`].
//! - storage: the outputs' bytes × their location's $/GB-month × one month (on-prem: free).
//!
//! On-prem sites and non-elastic cloud sites must have a connected agent with room now (wait 0)
//! or one that fits the job once free (wait = the site's queue estimate; unknown: rejected);
//! elastic cloud sites can always start. Queue wait is a constraint, not a cost. The cheapest
//! feasible candidate wins; ties break by site name, then output locations. With `owned_first`, a
//! feasible on-prem candidate that starts now wins whatever the price.

use std::cmp::Ordering;
use std::time::Duration;

pub use super::decision::{Candidate, Chosen, CostBreakdown, Decision, Offer, Verdict};
pub use super::rejection::{Rejection, RejectionKind};
use super::request::{OutputDest, PlacementJob};
use super::wait::Need;
use super::world::{NodeShape, SiteCapacity, Unavailable, World};
use crate::model::job::Spot;
use crate::model::price::Market;
use crate::model::site::SiteKind;

/// The reason of a site whose nodes could hold the job but are busy, when the world has no
/// estimate of the wait.
pub const NO_ESTIMATE: &str = "busy: no node free now and no wait estimate";

/// The job resolved against the world: residency (group, derived?), inputs, output choices, and a
/// reason that rejects every candidate (an unknown location, an output outside the job's residency,
/// explicit or derived from its inputs).
struct Plan {
    residency: Option<(String, bool)>,
    /// Aggregated input bytes per location index.
    inputs: Vec<(usize, u64)>,
    outputs: Vec<OutputPlan>,
    /// Per choice dimension: the candidate location indices.
    choices: Vec<Vec<usize>>,
    global: Option<Rejection>,
    /// What the job needs, for the sites' queue-wait replays (built once, not per site).
    need: Need,
}

/// Where one output goes.
#[derive(Clone, Copy)]
enum OutputPlan {
    /// A fixed location index; `None`: an unknown location (which rejects every candidate).
    Fixed(Option<usize>),
    /// The location picked in this choice dimension.
    Chosen(usize),
}

/// Places one job: every candidate with its verdict, and the cheapest feasible one.
pub fn place(job: &PlacementJob, world: &World) -> Decision {
    let plan = plan(job, world);
    let combos: usize = plan.choices.iter().map(Vec::len).product();
    let mut candidates = Vec::with_capacity(world.sites.len() * combos.max(1));
    let mut site_of = Vec::with_capacity(candidates.capacity());
    // The location picked per choice dimension and per output (`None`: no such location).
    let mut choice: Vec<Option<usize>> = vec![None; plan.choices.len()];
    let mut locs: Vec<Option<usize>> = vec![None; job.outputs.len()];
    for (si, state) in world.sites.iter().enumerate() {
        let base = plan.global.clone().map_or_else(|| site_offer(job, world, si, &plan), Err);
        for combo in 0..combos.max(1) {
            let mut rest = combo;
            for (d, options) in plan.choices.iter().enumerate().rev() {
                choice[d] = options.get(rest % options.len().max(1)).copied();
                rest /= options.len().max(1);
            }
            for (o, dest) in plan.outputs.iter().enumerate() {
                locs[o] = match *dest {
                    OutputPlan::Fixed(l) => l,
                    OutputPlan::Chosen(d) => choice[d],
                };
            }
            let verdict = match &base {
                Err(reason) => Verdict::Rejected(reason.clone()),
                Ok((offer, inbound_usd)) => finish(job, world, si, &locs, offer, *inbound_usd),
            };
            let name =
                |l: Option<usize>| l.and_then(|l| world.locations.get(l)).map_or_else(String::new, |x| x.name.clone());
            let output_locations = locs.iter().map(|&l| name(l)).collect();
            candidates.push(Candidate { site: state.site.name.clone(), output_locations, verdict });
            site_of.push(si);
        }
    }
    let chosen = choose(job, world, &candidates, &site_of).map(|i| {
        let c = &candidates[i];
        let Verdict::Feasible(offer) = &c.verdict else { unreachable!("only feasible candidates are chosen") };
        Chosen { site: c.site.clone(), output_locations: c.output_locations.clone(), offer: offer.clone() }
    });
    Decision {
        chosen,
        candidates,
        residency: plan.residency.map(|(r, _)| r),
        snapshot_id: world.snapshot_id.clone(),
        snapshot_age_ms: world.snapshot_age_ms,
        stale: world.stale,
    }
}

/// Why no candidate can take the job whatever the capacity and prices: a reason about the job
/// itself (an unknown storage location, an output outside the job's residency), which rejects
/// every candidate of [`place`]. The broker refuses such a job at submit.
pub fn refusal(job: &PlacementJob, world: &World) -> Option<Rejection> {
    plan(job, world).global
}

/// Resolves the job's locations, its residency and the output choices.
fn plan(job: &PlacementJob, world: &World) -> Plan {
    let mut global = None;
    let mut inputs: Vec<(usize, u64)> = Vec::with_capacity(job.inputs.len());
    for input in &job.inputs {
        match world.location_index.get(&input.location) {
            Some(&l) => match inputs.iter_mut().find(|(i, _)| *i == l) {
                Some((_, b)) => *b += input.bytes,
                None => inputs.push((l, input.bytes)),
            },
            None => {
                global.get_or_insert_with(|| unknown_location(&input.location));
            }
        }
    }
    let residency = match &job.policy.residency {
        Some(r) => Some((r.clone(), false)),
        None => {
            let mut groups = inputs.iter().map(|(l, _)| &world.locations[*l].residency);
            let first = groups.next();
            first.filter(|f| groups.all(|g| g == *f)).map(|f| (f.clone(), true))
        }
    };
    let mut outputs = Vec::with_capacity(job.outputs.len());
    let mut keys: Vec<(&str, &[String])> = Vec::new();
    let mut choices: Vec<Vec<usize>> = Vec::new();
    for (o, output) in job.outputs.iter().enumerate() {
        let group = match &output.dest {
            OutputDest::Location(name) => match world.location_index.get(name) {
                Some(&l) => {
                    outputs.push(OutputPlan::Fixed(Some(l)));
                    Some(world.locations[l].residency.as_str())
                }
                None => {
                    global.get_or_insert_with(|| unknown_location(name));
                    outputs.push(OutputPlan::Fixed(None));
                    None
                }
            },
            OutputDest::Choose { residency: group, among } => {
                let key = (group.as_str(), among.as_slice());
                let d = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    keys.push(key);
                    let options: Vec<usize> = (0..world.locations.len())
                        .filter(|&l| {
                            let loc = &world.locations[l];
                            loc.residency == *group && (among.is_empty() || among.contains(&loc.name))
                        })
                        .collect();
                    if options.is_empty() {
                        global.get_or_insert_with(|| {
                            Rejection::new(
                                RejectionKind::Location,
                                format!("no storage location in {group} for output {o}"),
                            )
                        });
                    }
                    choices.push(options);
                    choices.len() - 1
                });
                outputs.push(OutputPlan::Chosen(d));
                Some(group.as_str())
            }
        };
        if let Some(why) = group.and_then(|g| output_outside(&residency, o, &output.path, g)) {
            global.get_or_insert(why);
        }
    }
    Plan { residency, inputs, outputs, choices, global, need: job.need() }
}

fn unknown_location(name: &str) -> Rejection {
    Rejection::new(RejectionKind::Location, format!("unknown storage location {name}"))
}

/// Why an output going to residency group `group` would leave the job's residency (explicit, or
/// derived from its inputs), e.g. `residency: output out/ goes to us, data in eu`.
fn output_outside(residency: &Option<(String, bool)>, o: usize, path: &str, group: &str) -> Option<Rejection> {
    let (required, derived) = residency.as_ref()?;
    if required == group {
        return None;
    }
    let whose = if *derived { "data" } else { "policy" };
    let output = if path.is_empty() { format!("#{o}") } else { path.to_owned() };
    Some(Rejection::new(
        RejectionKind::Residency,
        format!("residency: output {output} goes to {group}, {whose} in {required}"),
    ))
}

/// The site-level part of a candidate: allow-lists, residency, compute, wait and input transfer.
/// Gives the offer (cost so far: compute) and the input egress in dollars.
fn site_offer(job: &PlacementJob, world: &World, si: usize, plan: &Plan) -> Result<(Offer, f64), Rejection> {
    let state = &world.sites[si];
    let site = &state.site;
    let policy = &job.policy;
    if policy.sites.as_ref().is_some_and(|s| !s.contains(&site.name)) {
        return Err(Rejection::new(RejectionKind::NotAllowed, format!("site {} not allowed", site.name)));
    }
    if let Some(cloud) = site.kind.cloud()
        && policy.clouds.as_ref().is_some_and(|c| !c.contains(&cloud))
    {
        return Err(Rejection::new(RejectionKind::NotAllowed, format!("cloud {} not allowed", cloud.as_str())));
    }
    if let Some((group, derived)) = &plan.residency
        && site.residency != *group
    {
        let whose = if *derived { "data" } else { "policy" };
        let why = format!("residency: {whose} in {group}, site in {}", site.residency);
        return Err(Rejection::new(RejectionKind::Residency, why));
    }
    let hours = job.hours();
    let needs_capacity = site.kind == SiteKind::Onprem || !site.elastic();
    let (wait, now, ahead) = if needs_capacity {
        capacity_wait(job, &plan.need, &site.name, &state.capacity)?
    } else {
        (Some(Duration::ZERO), true, 0)
    };
    let mut offer = match site.kind.cloud() {
        Some(_) => cloud_compute(job, world, si)?,
        None => onprem_compute(job, world, si, now)?,
    };
    let wait = wait.ok_or_else(|| Rejection::new(RejectionKind::Capacity, NO_ESTIMATE))?;
    check_time(job, world, wait)?;
    offer.wait_s = wait.as_secs();
    offer.ahead = ahead;
    offer.cost.hours = hours;
    offer.cost.compute_usd = offer.cost.usd_per_hour * hours;
    offer.cost.delay_usd = wait.as_secs_f64() / 3600.0 * policy.delay_usd_per_hour;
    let mut inbound = 0.0;
    for &(l, bytes) in &plan.inputs {
        if bytes > 0 {
            inbound += gb(bytes) * world.inbound[l][si].clone()?;
        }
    }
    Ok((offer, inbound))
}

/// Adds the outputs' transfer and storage to a site offer and applies the caps and the budget.
/// The offer is cloned only when feasible.
fn finish(
    job: &PlacementJob,
    world: &World,
    si: usize,
    locs: &[Option<usize>],
    offer: &Offer,
    inbound: f64,
) -> Verdict {
    let mut egress = inbound;
    let mut storage = 0.0;
    for (output, &l) in job.outputs.iter().zip(locs) {
        if output.bytes == 0 {
            continue;
        }
        // Unreachable: a job with an output of no known location is rejected before (`Plan::global`).
        let Some(l) = l else {
            return Verdict::Rejected(Rejection::new(RejectionKind::Location, "an output has no storage location"));
        };
        let (out, keep) = (&world.outbound[si][l], &world.storage[l]);
        match (out, keep) {
            (Ok(out), Ok(keep)) => {
                egress += gb(output.bytes) * out;
                storage += gb(output.bytes) * keep;
            }
            (Err(e), _) | (_, Err(e)) => return Verdict::Rejected(e.clone()),
        }
    }
    let mut c = offer.cost;
    c.egress_usd = egress;
    c.storage_usd = storage;
    c.total_usd = c.compute_usd + egress + storage;
    let policy = &job.policy;
    let reject = |kind, why| Verdict::Rejected(Rejection::new(kind, why));
    if let Some(cap) = policy.max_usd_per_hour
        && c.usd_per_hour > cap
    {
        return reject(RejectionKind::PriceCap, format!("price cap: {}/h > {}/h", usd(c.usd_per_hour), usd(cap)));
    }
    if let Some(cap) = policy.max_usd_total
        && c.total_usd > cap
    {
        return reject(RejectionKind::CostCap, format!("cost cap: {} > {}", usd(c.total_usd), usd(cap)));
    }
    if let Some(left) = job.budget_left_usd
        && c.total_usd > left
    {
        return reject(RejectionKind::Budget, format!("budget: {} left, estimate {}", usd(left), usd(c.total_usd)));
    }
    Verdict::Feasible(Offer { cost: c, ..offer.clone() })
}

/// The wait before the job could start at a site whose capacity counts (`None`: unknown), whether
/// a node has room now and how many jobs wait ahead of it, or why no node of the site could ever
/// take it. The wait is the job's own estimate where it already waits, else the site's replay
/// ([`super::wait`]), else the site's given `queue_wait`.
fn capacity_wait(
    job: &PlacementJob,
    need: &Need,
    site: &str,
    capacity: &SiteCapacity,
) -> Result<(Option<Duration>, bool, u32), Rejection> {
    if capacity.free.iter().any(|s| fits(job, s)) {
        return Ok((Some(Duration::ZERO), true, 0));
    }
    if !capacity.total.iter().any(|s| fits(job, s)) {
        if capacity.total.is_empty() {
            return Err(Rejection::new(RejectionKind::Capacity, "no connected agent at site"));
        }
        return Err(no_fit(job, "node", capacity.total.iter().flat_map(|s| s.gpus.iter().map(|(m, _)| m.as_str()))));
    }
    if let Some(w) = job.waiting_at.as_ref().filter(|w| w.site == site) {
        return Ok((w.wait, false, w.ahead));
    }
    match &capacity.profile {
        Some(p) => Ok((p.earliest(need), false, u32::try_from(p.waiting()).unwrap_or(u32::MAX))),
        None => Ok((capacity.queue_wait, false, 0)),
    }
}

/// Whether the job fits a node shape.
pub(crate) fn fits(job: &PlacementJob, shape: &NodeShape) -> bool {
    let gpus: u32 = shape.gpus.iter().filter(|(m, _)| job.accepts(m)).map(|(_, n)| n).sum();
    gpus >= job.gpus && shape.cpus >= job.cpus && shape.memory_mib >= u64::from(job.memory_gib) * 1024
}

/// The reason nothing fits: the GPU model is missing altogether, or nothing is large enough.
fn no_fit<'a>(job: &PlacementJob, what: &str, mut models: impl Iterator<Item = &'a str>) -> Rejection {
    let reject = |why| Rejection::new(RejectionKind::Capacity, why);
    if job.gpus > 0 && !models.any(|m| job.accepts(m)) {
        return reject(if job.gpu_models.is_empty() {
            "no gpu at site".to_owned()
        } else {
            format!("no {} at site", job.gpu_models.join(" or "))
        });
    }
    let gpus = match (job.gpus, job.gpu_models.as_slice()) {
        (0, _) => String::new(),
        (n, []) => format!("{n} gpus, "),
        (n, models) => format!("{n}×{}, ", models.join("/")),
    };
    reject(format!("no {what} fits {gpus}{} cpus, {} GiB", job.cpus, job.memory_gib))
}

/// Cloud compute: the cheapest priced instance type that fits.
fn cloud_compute(job: &PlacementJob, world: &World, si: usize) -> Result<Offer, Rejection> {
    let site = &world.sites[si].site;
    let spot_ok = site.spot && job.policy.spot == Spot::Allowed;
    let unavailable = &world.sites[si].capacity.unavailable;
    let gone = |name: &str, market| unavailable.iter().find(|u| u.instance_type == name && u.market == market);
    let mut left_out: Option<&Unavailable> = None;
    let mut best: Option<(f64, &str, Market, Option<&str>)> = None;
    let mut unpriced: Option<&str> = None;
    let mut spot_only: Option<&str> = None;
    let mut any_fit = false;
    for offer in &world.offers[si] {
        let t = offer.ty;
        let model_ok = job.gpus == 0 || t.gpu_model.is_some_and(|m| job.accepts(m));
        if !(model_ok && t.gpus >= job.gpus && t.vcpus >= job.cpus && t.memory_gib >= job.memory_gib) {
            continue;
        }
        any_fit = true;
        let spot = offer.spot.filter(|_| spot_ok);
        let (on_demand, spot) = (
            offer.on_demand.filter(|_| gone(t.name, Market::OnDemand).is_none()),
            spot.filter(|_| gone(t.name, Market::Spot).is_none()),
        );
        if on_demand.is_none() && spot.is_none() {
            let priced = [(offer.on_demand, Market::OnDemand), (offer.spot.filter(|_| spot_ok), Market::Spot)];
            if let Some(u) = priced.iter().find_map(|(p, m)| p.and_then(|_| gone(t.name, *m))) {
                left_out = left_out.or(Some(u));
                continue;
            }
        }
        let price = match (on_demand, spot) {
            (Some(d), Some(s)) if s < d => Some((s, Market::Spot)),
            (Some(d), _) => Some((d, Market::OnDemand)),
            (None, Some(s)) => Some((s, Market::Spot)),
            (None, None) => None,
        };
        match price {
            Some((p, market)) => {
                if best.is_none_or(|(bp, bn, ..)| p < bp || (p == bp && t.name < bn)) {
                    best = Some((p, t.name, market, t.gpu_model));
                }
            }
            None if offer.spot.is_some() => spot_only = spot_only.or(Some(t.name)),
            None => unpriced = unpriced.or(Some(t.name)),
        }
    }
    if !any_fit {
        let models = world.offers[si].iter().filter_map(|o| o.ty.gpu_model);
        return Err(no_fit(job, "instance type", models));
    }
    let Some((price, name, market, model)) = best else {
        if let Some(u) = left_out {
            let age = Duration::from_millis(u64::try_from(world.now.saturating_sub(u.since)).unwrap_or(0));
            let why = format!(
                "unavailable: {} {} since {} ago: {}",
                u.instance_type,
                u.market.as_str(),
                dur(Duration::from_secs(age.as_secs())),
                u.reason
            );
            return Err(Rejection::new(RejectionKind::Capacity, why));
        }
        if let Some(name) = spot_only {
            let who = if site.spot { "policy" } else { "site" };
            let why = format!("spot: only a spot price for {name} in {}, and the {who} says no spot", site.region);
            return Err(Rejection::new(RejectionKind::Spot, why));
        }
        let why = format!("no price for {} in {}", unpriced.unwrap_or("?"), site.region);
        return Err(Rejection::new(RejectionKind::NoPrice, why));
    };
    Ok(Offer {
        instance_type: Some(name.to_owned()),
        instances: 1,
        market: Some(market),
        gpu_model: model.map(str::to_owned),
        wait_s: 0,
        ahead: 0,
        cost: CostBreakdown { usd_per_hour: price, ..CostBreakdown::default() },
    })
}

/// On-prem compute: the highest $/GPU-hour among the acceptable models of the nodes that fit.
fn onprem_compute(job: &PlacementJob, world: &World, si: usize, now: bool) -> Result<Offer, Rejection> {
    let state = &world.sites[si];
    let site = &state.site;
    let per_hour;
    let mut model = None;
    if job.gpus == 0 {
        per_hour = site.cpu_hour_usd * f64::from(job.cpus);
    } else {
        let shapes = if now { &state.capacity.free } else { &state.capacity.total };
        let mut worst: Option<(f64, &str)> = None;
        for shape in shapes.iter().filter(|s| fits(job, s)) {
            for (m, _) in shape.gpus.iter().filter(|(m, n)| *n > 0 && job.accepts(m)) {
                let p = site.gpu_hour_usd_by_model.get(m).copied().or(site.gpu_hour_usd).ok_or_else(|| {
                    Rejection::new(RejectionKind::NoPrice, format!("no gpu-hour price for {m} at site"))
                })?;
                if worst.is_none_or(|(wp, wm)| p > wp || (p == wp && m.as_str() < wm)) {
                    worst = Some((p, m));
                }
            }
        }
        let (p, m) = worst.ok_or_else(|| no_fit(job, "node", std::iter::empty()))?;
        per_hour = p * f64::from(job.gpus);
        model = Some(m.to_owned());
    }
    Ok(Offer {
        instance_type: None,
        instances: 1,
        market: None,
        gpu_model: model,
        wait_s: 0,
        ahead: 0,
        cost: CostBreakdown { usd_per_hour: per_hour, ..CostBreakdown::default() },
    })
}

/// `max_wait` and the deadline (wait + estimated runtime must end by it).
fn check_time(job: &PlacementJob, world: &World, wait: Duration) -> Result<(), Rejection> {
    if let Some(max) = job.policy.max_wait
        && wait > max
    {
        return Err(Rejection::new(RejectionKind::MaxWait, format!("max wait: wait {} > {}", dur(wait), dur(max))));
    }
    if let Some(deadline) = job.policy.deadline {
        let left = Duration::from_millis(u64::try_from(deadline.saturating_sub(world.now)).unwrap_or(0));
        if wait + job.runtime > left {
            let why = format!("deadline: wait {} + run {} > {}", dur(wait), dur(job.runtime), dur(left));
            return Err(Rejection::new(RejectionKind::Deadline, why));
        }
    }
    Ok(())
}

/// The index of the chosen candidate: owned-first, else the cheapest counting the cost of delay
/// (`total_usd + delay_usd`); ties go to the candidate with more outputs in the site's own cloud
/// region (a 0-byte estimate makes every location cost the same), then by candidate order.
fn choose(job: &PlacementJob, world: &World, candidates: &[Candidate], site_of: &[usize]) -> Option<usize> {
    let feasible = candidates.iter().enumerate().filter_map(|(i, c)| match &c.verdict {
        Verdict::Feasible(o) => Some((i, o)),
        Verdict::Rejected(_) => None,
    });
    let away = |i: usize| {
        let site = &world.sites[site_of[i]].site;
        let here = |name: &String| {
            world.location_index.get(name).is_some_and(|&l| {
                let loc = &world.locations[l];
                loc.kind == site.kind && loc.region == site.region
            })
        };
        candidates[i].output_locations.iter().filter(|l| !here(l)).count()
    };
    let cheapest = |it: &mut dyn Iterator<Item = (usize, &Offer)>| {
        it.fold(None::<(usize, f64, usize)>, |best, (i, o)| {
            let score = o.cost.total_usd + o.cost.delay_usd;
            match best {
                Some((_, b, _)) if score.total_cmp(&b) == Ordering::Greater => best,
                Some((_, b, a)) if score.total_cmp(&b) == Ordering::Equal && away(i) >= a => best,
                _ => Some((i, score, away(i))),
            }
        })
        .map(|(i, ..)| i)
    };
    if job.policy.owned_first {
        let owned = |&(i, o): &(usize, &Offer)| o.wait_s == 0 && world.sites[site_of[i]].site.kind == SiteKind::Onprem;
        if let Some(i) = cheapest(&mut feasible.clone().filter(owned)) {
            return Some(i);
        }
    }
    cheapest(&mut feasible.into_iter())
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Dollars as people write them: `$412`, `$31.20`.
pub fn usd(v: f64) -> String {
    let cents = (v * 100.0).round();
    if cents % 100.0 == 0.0 { format!("${:.0}", cents / 100.0) } else { format!("${v:.2}") }
}

/// A duration as people write it: `3h`, `2h 30m`, `45s`, `500ms`.
pub fn dur(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return if d.is_zero() { "0s".to_owned() } else { format!("{}ms", d.as_millis()) };
    }
    let parts = [(secs / 3600, "h"), (secs % 3600 / 60, "m"), (secs % 60, "s")];
    parts.iter().filter(|(n, _)| *n > 0).map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "engine_props.rs"]
mod props;
