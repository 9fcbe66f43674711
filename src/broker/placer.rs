//! The broker's side of placement: the configured sites and storage locations,
//! each tenant's policy, and the current prices, turned into the pure engine's inputs
//! ([`crate::placement::engine::place`]). With no `[[site]]` configured, placement is off and the
//! core binds jobs to any agent with room (first fit), as before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{BrokerConfig, StorageCloud, TenantConfig};
use crate::model::UnixMillis;
use crate::model::data::JobData;
use crate::model::job::{JobSpec, Spot};
use crate::model::price::PriceSnapshot;
use crate::model::site::{Site, SiteKind, StorageLocation};
use crate::placement::bind::FreeCapacity;
use crate::placement::engine::{self, Decision};
use crate::placement::fair::FairRules;
use crate::placement::request::{PlacementJob, PlacementPolicy};
use crate::placement::wait::Profile;
use crate::placement::world::{SiteCapacity, SiteState, Unavailable, World};

/// The current prices; the price book replaces them in the background.
pub type Prices = watch::Receiver<Arc<PriceSnapshot>>;

/// Everything placement needs besides the live capacity.
#[derive(Debug)]
pub struct Placer {
    sites: Vec<Site>,
    locations: Vec<StorageLocation>,
    policies: HashMap<String, PlacementPolicy>,
    budgets: HashMap<String, f64>,
    prices: Prices,
    /// The storage locations alone (no sites, no prices): enough to judge what a job asks of its
    /// data, built once rather than per submit.
    data_world: World,
    pub replace_after: Duration,
    price_max_age: Duration,
    /// Fair share and preemption (`[placement]`); they apply with or without sites.
    pub fair: FairRules,
}

impl Placer {
    pub fn new(config: &BrokerConfig, prices: Prices) -> Self {
        let locations: Vec<StorageLocation> = config
            .storage
            .iter()
            .map(|s| StorageLocation {
                name: s.name.clone(),
                kind: match s.cloud {
                    StorageCloud::Aws => SiteKind::Aws,
                    StorageCloud::Azure => SiteKind::Azure,
                    StorageCloud::Local => SiteKind::Onprem,
                },
                region: s.region.clone(),
                residency: s.residency.clone(),
            })
            .collect();
        let mut tenants: Vec<TenantConfig> = config.tenants.clone();
        if !tenants.iter().any(|t| t.name == "default") {
            tenants.push(TenantConfig::default_tenant());
        }
        let policies = tenants.iter().map(|t| (t.name.clone(), policy_of(t, config))).collect();
        let budgets = tenants.iter().filter_map(|t| Some((t.name.clone(), t.monthly_budget_usd?))).collect();
        let data_world = data_world(&locations);
        Self {
            sites: config.sites.clone(),
            locations,
            policies,
            budgets,
            prices,
            data_world,
            replace_after: config.placement.replace_after.0,
            price_max_age: config.placement.price_max_age.0,
            fair: FairRules {
                half_life: config.placement.fair_share_half_life.0,
                preempt_min_runtime: config.placement.preempt_min_runtime.0,
                max_preemptions: config.placement.max_preemptions,
            },
        }
    }

    /// No sites: placement off (plain first fit).
    pub fn disabled() -> Self {
        Self {
            sites: Vec::new(),
            locations: Vec::new(),
            policies: HashMap::new(),
            budgets: HashMap::new(),
            prices: watch::channel(Arc::new(PriceSnapshot::default())).1,
            data_world: data_world(&[]),
            replace_after: Duration::from_secs(600),
            price_max_age: Duration::from_secs(3600),
            fair: FairRules::default(),
        }
    }

    /// Placement is on when sites are configured.
    pub fn enabled(&self) -> bool {
        !self.sites.is_empty()
    }

    pub fn knows_site(&self, site: &str) -> bool {
        self.sites.iter().any(|s| s.name == site)
    }

    /// The configured site of that name.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// The tenant's monthly budget, if it has one.
    pub fn budget(&self, tenant: &str) -> Option<f64> {
        self.budgets.get(tenant).copied()
    }

    /// The job as placement sees it; an error when its policy would widen its tenant's. A
    /// deadline given as a duration counts from `submitted_at`.
    pub fn request(
        &self,
        tenant: &str,
        spec: &JobSpec,
        data: Option<&JobData>,
        budget_left: Option<f64>,
        submitted_at: UnixMillis,
    ) -> Result<PlacementJob, String> {
        let tenant_policy = self.policies.get(tenant).cloned().unwrap_or_default();
        let policy = match &spec.policy {
            Some(p) => tenant_policy.narrow(p, submitted_at)?,
            None => tenant_policy,
        };
        let empty = JobData::default();
        Ok(PlacementJob::from_spec(spec, data.unwrap_or(&empty), policy, budget_left))
    }

    /// Sites with their capacity (from the agents' free and total resources per site, the replay
    /// of each site that needs room — on-prem and fixed cloud sites — and the instance pools a
    /// provider cannot launch now), locations and the current prices.
    pub fn world(
        &self,
        capacity: &HashMap<&str, (Vec<FreeCapacity>, Vec<FreeCapacity>)>,
        unavailable: impl Fn(&str) -> Vec<Unavailable>,
        mut profile: impl FnMut(&Site) -> Option<Arc<Profile>>,
        now: UnixMillis,
    ) -> World {
        let sites = self
            .sites
            .iter()
            .map(|site| {
                let (free, total) = capacity.get(site.name.as_str()).map(|(f, t)| (&f[..], &t[..])).unwrap_or_default();
                let mut capacity = SiteCapacity::from_agents(free, total, None);
                if site.elastic() {
                    capacity.unavailable = unavailable(&site.name);
                } else {
                    capacity.profile = profile(site);
                }
                SiteState { site: site.clone(), capacity }
            })
            .collect();
        let prices = self.prices.borrow().clone();
        World::new(sites, self.locations.clone(), &prices, now, self.price_max_age)
    }

    /// [`Placer::world`] with the queue wait of the sites `waits` gives one for (a what-if plan's
    /// site state); the others keep theirs.
    pub fn world_with_waits(
        &self,
        capacity: &HashMap<&str, (Vec<FreeCapacity>, Vec<FreeCapacity>)>,
        waits: impl Fn(&str) -> Option<Duration>,
        unavailable: impl Fn(&str) -> Vec<Unavailable>,
        now: UnixMillis,
    ) -> World {
        let mut world = self.world(capacity, unavailable, |_| None, now);
        for state in &mut world.sites {
            if let Some(wait) = waits(&state.site.name) {
                state.capacity.queue_wait = Some(wait);
            }
        }
        world
    }

    /// Why no site could ever take the job, whatever the capacity and prices (an output leaving
    /// its residency, an unknown location).
    pub fn refusal(&self, job: &PlacementJob) -> Option<engine::Rejection> {
        engine::refusal(job, &self.data_world)
    }

    pub fn place(&self, job: &PlacementJob, world: &World) -> Decision {
        engine::place(job, world)
    }
}

/// A world of storage locations only, for [`Placer::refusal`].
fn data_world(locations: &[StorageLocation]) -> World {
    World::new(Vec::new(), locations.to_vec(), &PriceSnapshot::default(), 0, Duration::ZERO)
}

/// A tenant's placement policy from its config: no longest wait (waiting is priced by
/// `delay_usd_per_hour`), the tenant's delay cost else the broker's.
fn policy_of(t: &TenantConfig, config: &BrokerConfig) -> PlacementPolicy {
    PlacementPolicy {
        residency: t.residency.clone(),
        clouds: (!t.clouds.is_empty()).then(|| t.clouds.clone()),
        sites: (!t.sites.is_empty()).then(|| t.sites.clone()),
        max_usd_per_hour: t.max_usd_per_hour,
        max_usd_total: t.max_usd_per_job,
        spot: Spot::Allowed,
        max_wait: None,
        deadline: None,
        owned_first: t.owned_first,
        delay_usd_per_hour: t.delay_usd_per_hour.unwrap_or(config.placement.delay_usd_per_hour),
    }
}

/// A one-line summary of a decision for the job's event.
pub fn summary(d: &Decision) -> String {
    match &d.chosen {
        Some(c) => {
            let feasible = d.candidates.iter().filter(|c| matches!(c.verdict, engine::Verdict::Feasible(_))).count();
            let stale = if d.stale { ", prices stale" } else { "" };
            let wait = c.offer.wait_text().map_or_else(String::new, |w| format!(", {w}"));
            format!(
                "placed at site {}{wait}: est. ${:.2} (compute ${:.2}, egress ${:.2}, storage ${:.2}); {} of {} candidates feasible{stale}",
                c.site,
                c.offer.cost.total_usd,
                c.offer.cost.compute_usd,
                c.offer.cost.egress_usd,
                c.offer.cost.storage_usd,
                feasible,
                d.candidates.len()
            )
        }
        None => {
            let reasons: Vec<String> = d
                .candidates
                .iter()
                .filter_map(|c| match &c.verdict {
                    engine::Verdict::Rejected(why) => Some(format!("{}: {why}", c.site)),
                    engine::Verdict::Feasible(_) => None,
                })
                .take(4)
                .collect();
            format!("not placed: no site can take it now ({})", reasons.join("; "))
        }
    }
}
