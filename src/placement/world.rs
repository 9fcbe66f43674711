//! The world placement decides in: sites with their capacity, storage locations and one price
//! snapshot, indexed once by [`World::new`] so that placing a job is arithmetic over small arrays.
//!
//! Transfer rules ($/GB, GB = 10^9 bytes), from where bytes are to where they go:
//! - same cloud and region: free;
//! - cloud → same cloud, other region: the source region's inter-region egress price;
//! - cloud → other cloud or on-prem: the source region's internet egress price (on-prem ingress is free);
//! - on-prem (site or `local://` location) → anywhere but the same on-prem region: the on-prem
//!   uplink $/GB. A `local://` location takes the uplink of the on-prem site in its region (the
//!   first by name; none: free).
//!
//! A missing price is never guessed: the pair gets the reason `no egress price for …` instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::model::UnixMillis;
use crate::model::price::{Cloud, Destination, Market, PriceSnapshot};
use crate::model::site::{InstanceType, Site, SiteKind, StorageLocation, instance_type};
use crate::placement::bind::FreeCapacity;
use crate::placement::rejection::{Rejection, RejectionKind};
pub use crate::placement::shape::NodeShape;
use crate::placement::wait::Profile;

/// What a site's connected agents offer, summarised for placement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteCapacity {
    /// Free resources per node now (distinct shapes; a shape within another is dropped).
    pub free: Vec<NodeShape>,
    /// Total resources per node (the same summary).
    pub total: Vec<NodeShape>,
    /// Estimated wait before a job that fits some node's total but no node's free resources can
    /// start, when given as a fact (what-if planning); `None` = unknown.
    pub queue_wait: Option<Duration>,
    /// The site's replayed future (running attempts' ends, the jobs waiting there): the wait of a
    /// job of any shape, in preference to `queue_wait`. Neither: such a job is not placed here.
    pub profile: Option<Arc<Profile>>,
    /// Cloud: (instance type, market) pools the provider recently could not launch (capacity,
    /// quota, a spot interruption): left out until their backoff ends.
    pub unavailable: Vec<Unavailable>,
}

/// An instance type and market a cloud site cannot launch for now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub instance_type: String,
    pub market: Market,
    /// The provider's error (`InsufficientInstanceCapacity: …`) or `spot interruption`.
    pub reason: String,
    /// When it was found.
    pub since: UnixMillis,
}

impl SiteCapacity {
    /// Summarises agents' free and total resources into distinct, undominated shapes.
    pub fn from_agents(free: &[FreeCapacity], total: &[FreeCapacity], queue_wait: Option<Duration>) -> SiteCapacity {
        SiteCapacity {
            free: frontier(free.iter().map(NodeShape::of).collect()),
            total: frontier(total.iter().map(NodeShape::of).collect()),
            queue_wait,
            profile: None,
            unavailable: Vec::new(),
        }
    }
}

/// Distinct shapes, without those within another one (a job fitting them fits the other too).
pub fn frontier(mut shapes: Vec<NodeShape>) -> Vec<NodeShape> {
    shapes.sort();
    shapes.dedup();
    let keep: Vec<bool> =
        (0..shapes.len()).map(|i| !(0..shapes.len()).any(|j| j != i && shapes[i].within(&shapes[j]))).collect();
    shapes.into_iter().zip(keep).filter_map(|(s, k)| k.then_some(s)).collect()
}

/// One site and its capacity. Elastic cloud sites ignore the capacity: they can always start.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteState {
    pub site: Site,
    pub capacity: SiteCapacity,
}

/// An instance type a cloud site may use, with its prices in the site's region.
#[derive(Debug, Clone)]
pub(crate) struct TypeOffer {
    pub ty: &'static InstanceType,
    pub on_demand: Option<f64>,
    pub spot: Option<f64>,
}

/// Where bytes sit, for transfer pricing.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    Cloud(Cloud, String),
    Onprem { region: String, uplink: f64 },
}

/// $/GB, or why there is no price.
pub(crate) type Rate = Result<f64, Rejection>;

/// Sites, locations and prices, indexed. Build it once per snapshot and place many jobs in it.
#[derive(Debug, Clone)]
pub struct World {
    pub(crate) sites: Vec<SiteState>,
    pub(crate) locations: Vec<StorageLocation>,
    pub(crate) location_index: HashMap<String, usize>,
    /// Per site: its instance types with prices (empty for on-prem).
    pub(crate) offers: Vec<Vec<TypeOffer>>,
    /// `inbound[location][site]`: $/GB from a location to a site.
    pub(crate) inbound: Vec<Vec<Rate>>,
    /// `outbound[site][location]`: $/GB from a site to a location.
    pub(crate) outbound: Vec<Vec<Rate>>,
    /// Per location: $/GB-month of storage (0 on-prem).
    pub(crate) storage: Vec<Rate>,
    pub(crate) snapshot_id: String,
    pub(crate) snapshot_age_ms: i64,
    pub(crate) stale: bool,
    pub(crate) now: UnixMillis,
}

impl World {
    /// Indexes a snapshot. Sites and locations are sorted by name (the tie-break order); a site's
    /// instance type that is not in the catalog is ignored (config validation refuses it). The
    /// snapshot is stale when older than `max_price_age` at `now`.
    pub fn new(
        mut sites: Vec<SiteState>,
        mut locations: Vec<StorageLocation>,
        prices: &PriceSnapshot,
        now: UnixMillis,
        max_price_age: Duration,
    ) -> World {
        sites.sort_by(|a, b| a.site.name.cmp(&b.site.name));
        locations.sort_by(|a, b| a.name.cmp(&b.name));
        let mut compute: HashMap<(Cloud, &str, &str, Market), f64> = HashMap::new();
        for p in &prices.compute {
            compute.entry((p.cloud, &p.region, &p.instance_type, p.market)).or_insert(p.usd_per_hour);
        }
        let offers = sites
            .iter()
            .map(|s| {
                let Some(cloud) = s.site.kind.cloud() else { return Vec::new() };
                let region = s.site.region.as_str();
                let price = |name: &str, market| compute.get(&(cloud, region, name, market)).copied();
                s.site
                    .instance_types
                    .iter()
                    .filter_map(|name| instance_type(name).filter(|t| t.cloud == cloud))
                    .map(|ty| TypeOffer {
                        ty,
                        on_demand: price(ty.name, Market::OnDemand),
                        spot: price(ty.name, Market::Spot),
                    })
                    .collect()
            })
            .collect();
        let site_places: Vec<Place> = sites.iter().map(|s| site_place(&s.site)).collect();
        let loc_places: Vec<Place> = locations.iter().map(|l| location_place(l, &sites)).collect();
        let inbound = loc_places.iter().map(|l| site_places.iter().map(|s| rate(l, s, prices)).collect()).collect();
        let outbound = site_places.iter().map(|s| loc_places.iter().map(|l| rate(s, l, prices)).collect()).collect();
        let storage = loc_places
            .iter()
            .map(|place| match place {
                Place::Onprem { .. } => Ok(0.0),
                Place::Cloud(cloud, region) => {
                    prices.storage(*cloud, region).map(|p| p.usd_per_gb_month).ok_or_else(|| {
                        Rejection::new(
                            RejectionKind::NoPrice,
                            format!("no storage price for {} {region}", cloud.as_str()),
                        )
                    })
                }
            })
            .collect();
        let location_index = locations.iter().enumerate().map(|(i, l)| (l.name.clone(), i)).collect();
        let age = now.saturating_sub(prices.fetched_at);
        World {
            sites,
            locations,
            location_index,
            offers,
            inbound,
            outbound,
            storage,
            snapshot_id: prices.id.clone(),
            snapshot_age_ms: age,
            stale: age > max_price_age.as_millis() as i64,
            now,
        }
    }

    /// The sites, sorted by name.
    pub fn sites(&self) -> &[SiteState] {
        &self.sites
    }

    /// The storage locations, sorted by name.
    pub fn locations(&self) -> &[StorageLocation] {
        &self.locations
    }
}

fn site_place(site: &Site) -> Place {
    match site.kind.cloud() {
        Some(cloud) => Place::Cloud(cloud, site.region.clone()),
        None => Place::Onprem { region: site.region.clone(), uplink: site.uplink_usd_per_gb },
    }
}

fn location_place(location: &StorageLocation, sites: &[SiteState]) -> Place {
    match location.kind.cloud() {
        Some(cloud) => Place::Cloud(cloud, location.region.clone()),
        None => {
            let uplink = sites
                .iter()
                .find(|s| s.site.kind == SiteKind::Onprem && s.site.region == location.region)
                .map_or(0.0, |s| s.site.uplink_usd_per_gb);
            Place::Onprem { region: location.region.clone(), uplink }
        }
    }
}

/// $/GB of moving bytes from `from` to `to` (the module's transfer rules).
fn rate(from: &Place, to: &Place, prices: &PriceSnapshot) -> Rate {
    let (cloud, region, destination) = match (from, to) {
        (Place::Cloud(c, r), Place::Cloud(c2, r2)) if c == c2 && r == r2 => return Ok(0.0),
        (Place::Cloud(c, r), Place::Cloud(c2, _)) if c == c2 => (*c, r, Destination::InterRegion),
        (Place::Cloud(c, r), _) => (*c, r, Destination::Internet),
        (Place::Onprem { region, .. }, Place::Onprem { region: r2, .. }) if region == r2 => return Ok(0.0),
        (Place::Onprem { uplink, .. }, _) => return Ok(*uplink),
    };
    prices.egress(cloud, region, destination).map(|p| p.usd_per_gb).ok_or_else(|| {
        let what = if destination == Destination::Internet { "internet" } else { "inter-region" };
        Rejection::new(RejectionKind::NoPrice, format!("no egress price for {} {region} ({what})", cloud.as_str()))
    })
}
