//! Sites (docs/design.md §3): the places that run work, the storage locations job data lives in, the
//! residency groups both belong to, and the cloud instance types of the instance catalog
//! ([`catalog`]) that map each to its GPUs. Pure: no I/O; the broker's config reuses [`Site`] and
//! [`ResidencyGroup`] as they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::capacity::CapacityConfig;
pub use super::catalog::InstanceType;
use super::catalog::{self, Catalog};
use super::gpu::is_known_model;
use super::price::Cloud;

/// What kind of place a site (or a storage location) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// Owned hardware (for storage: a `local://` location on the owned network).
    Onprem,
    Aws,
    Azure,
}

impl SiteKind {
    /// The cloud, `None` for on-prem.
    pub fn cloud(self) -> Option<Cloud> {
        match self {
            SiteKind::Onprem => None,
            SiteKind::Aws => Some(Cloud::Aws),
            SiteKind::Azure => Some(Cloud::Azure),
        }
    }

    /// `onprem`, `aws` or `azure`.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Onprem => "onprem",
            SiteKind::Aws => "aws",
            SiteKind::Azure => "azure",
        }
    }
}

impl From<Cloud> for SiteKind {
    fn from(cloud: Cloud) -> Self {
        match cloud {
            Cloud::Aws => SiteKind::Aws,
            Cloud::Azure => SiteKind::Azure,
        }
    }
}

/// A place that runs work (`[[site]]` in the broker config): an on-prem site or a cloud pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The name agents carry in their certificates (`lab-sto`, `aws-us-east-1`).
    pub name: String,
    pub kind: SiteKind,
    /// The cloud region (`us-east-1`, `westeurope`); for on-prem free text that `local://`
    /// locations in the same place share (`stockholm`).
    pub region: String,
    /// The residency group the site is in (`eu`, `us`).
    #[serde(default)]
    pub residency: String,
    /// On-prem: the marginal cost of one GPU-hour on owned hardware. Never assumed to be 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hour_usd: Option<f64>,
    /// On-prem: per canonical GPU model, overriding `gpu_hour_usd`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_hour_usd_by_model: BTreeMap<String, f64>,
    /// On-prem: the cost of one vCPU-hour of a CPU-only job (0 = owned CPUs are free to use).
    #[serde(default)]
    pub cpu_hour_usd: f64,
    /// On-prem: $/GB for data leaving the owned network (to a cloud or another on-prem site).
    #[serde(default)]
    pub uplink_usd_per_gb: f64,
    /// Cloud: the instance types the site may use (names from [`instance_type`]'s catalog).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_types: Vec<String>,
    /// Cloud: whether spot capacity may be used here.
    #[serde(default)]
    pub spot: bool,
    /// Cloud: the capacity provider that launches the site's instances (`[site.capacity]`). A site
    /// with one is elastic: it takes work before an agent exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub capacity: Option<CapacityConfig>,
}

impl Site {
    /// Whether placement may choose the site before an agent exists (it has a capacity provider).
    pub fn elastic(&self) -> bool {
        self.capacity.is_some()
    }

    /// Every problem with the site against the process-wide catalog, as `field: message`; empty
    /// when it is valid.
    pub fn problems(&self) -> Vec<String> {
        self.problems_in(catalog::current())
    }

    /// Every problem with the site, its instance types checked against `catalog` (known, of the
    /// site's cloud, offered in its region).
    pub fn problems_in(&self, catalog: &Catalog) -> Vec<String> {
        let mut p = Vec::new();
        if !is_name(&self.name) {
            p.push("name: must be 1 to 63 characters of [A-Za-z0-9._-]".to_owned());
        }
        if self.region.trim().is_empty() {
            p.push("region: must be given".to_owned());
        }
        if self.residency.trim().is_empty() {
            p.push("residency: must name a residency group".to_owned());
        }
        match self.kind.cloud() {
            None => self.onprem_problems(&mut p),
            Some(cloud) => self.cloud_problems(cloud, catalog, &mut p),
        }
        p
    }

    fn onprem_problems(&self, p: &mut Vec<String>) {
        if self.gpu_hour_usd.is_none() && self.gpu_hour_usd_by_model.is_empty() {
            p.push("gpu_hour_usd: an onprem site needs its marginal $/GPU-hour (owned hardware is never free)".into());
        }
        if self.gpu_hour_usd.is_some_and(|v| !is_positive(v)) {
            p.push("gpu_hour_usd: must be more than 0".to_owned());
        }
        for (model, price) in &self.gpu_hour_usd_by_model {
            if !is_known_model(model) {
                p.push(format!("gpu_hour_usd_by_model.{model}: unknown gpu model"));
            }
            if !is_positive(*price) {
                p.push(format!("gpu_hour_usd_by_model.{model}: must be more than 0"));
            }
        }
        if !(self.cpu_hour_usd.is_finite() && self.cpu_hour_usd >= 0.0) {
            p.push("cpu_hour_usd: must be 0 or more".to_owned());
        }
        if !(self.uplink_usd_per_gb.is_finite() && self.uplink_usd_per_gb >= 0.0) {
            p.push("uplink_usd_per_gb: must be 0 or more".to_owned());
        }
        if !self.instance_types.is_empty() || self.spot || self.capacity.is_some() {
            p.push("instance_types, spot and capacity are for cloud sites".to_owned());
        }
    }

    fn cloud_problems(&self, cloud: Cloud, catalog: &Catalog, p: &mut Vec<String>) {
        if self.gpu_hour_usd.is_some() || !self.gpu_hour_usd_by_model.is_empty() || self.cpu_hour_usd != 0.0 {
            p.push("gpu_hour_usd and cpu_hour_usd are for onprem sites; cloud prices come from the price feed".into());
        }
        if self.uplink_usd_per_gb != 0.0 {
            p.push("uplink_usd_per_gb is for onprem sites; cloud egress comes from the price feed".to_owned());
        }
        if self.instance_types.is_empty() {
            p.push(format!("instance_types: a {} site needs at least one", cloud.as_str()));
        }
        for (i, name) in self.instance_types.iter().enumerate() {
            match catalog.get(name) {
                None => {
                    p.push(format!("instance_types[{i}]: unknown instance type {name:?} (catalog {})", catalog.as_of()))
                }
                Some(t) if t.cloud != cloud => {
                    p.push(format!("instance_types[{i}]: {name} is an {} type", t.cloud.as_str()))
                }
                Some(_) if self.instance_types[..i].contains(name) => {
                    p.push(format!("instance_types[{i}]: {name} is listed twice"))
                }
                Some(_) if !catalog.offered_in(name, &self.region) => p.push(format!(
                    "instance_types[{i}]: {name} is not offered in {} (catalog {}; offered in {})",
                    self.region,
                    catalog.as_of(),
                    catalog.regions(name).join(", ")
                )),
                Some(_) => {}
            }
        }
        if let Some(capacity) = &self.capacity {
            p.extend(capacity.problems(cloud.as_str()).into_iter().map(|m| format!("capacity.{m}")));
        }
    }

    /// Problems between the site and the residency groups: its region must be listed by the group it
    /// claims, and by no other.
    pub fn residency_problems(&self, groups: &[ResidencyGroup]) -> Vec<String> {
        match residency_of(groups, self.kind, &self.region) {
            // An empty name is already reported by `problems`.
            _ if self.residency.is_empty() => Vec::new(),
            Some(group) if group == self.residency => Vec::new(),
            Some(group) => {
                vec![format!("residency: region {} is in group {group}, not {}", self.region, self.residency)]
            }
            None if groups.iter().any(|g| g.name == self.residency) => vec![format!(
                "residency: group {} does not list {} region {}",
                self.residency,
                self.kind.as_str(),
                self.region
            )],
            None => vec![format!("residency: unknown residency group {:?}", self.residency)],
        }
    }
}

/// A residency group (`[[residency]]`): the regions of each cloud, and the on-prem regions, it contains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidencyGroup {
    /// `eu`, `us`.
    pub name: String,
    #[serde(default)]
    pub aws: Vec<String>,
    #[serde(default)]
    pub azure: Vec<String>,
    /// On-prem site and `local://` location regions.
    #[serde(default)]
    pub onprem: Vec<String>,
}

impl ResidencyGroup {
    /// The regions of one kind of place.
    pub fn regions(&self, kind: SiteKind) -> &[String] {
        match kind {
            SiteKind::Onprem => &self.onprem,
            SiteKind::Aws => &self.aws,
            SiteKind::Azure => &self.azure,
        }
    }
}

/// The group listing `region` of `kind` (the first, when several do).
pub fn residency_of<'a>(groups: &'a [ResidencyGroup], kind: SiteKind, region: &str) -> Option<&'a str> {
    groups.iter().find(|g| g.regions(kind).iter().any(|r| r == region)).map(|g| g.name.as_str())
}

/// A storage location as placement sees it: where its bytes are, and under which residency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageLocation {
    /// The configured location's name.
    pub name: String,
    /// `aws`/`azure` for buckets and containers, `onprem` for `local://` locations.
    pub kind: SiteKind,
    /// The cloud region; for `onprem` the region of the on-prem site(s) it sits with.
    pub region: String,
    pub residency: String,
}

/// The catalog entry of an instance type in the process-wide catalog (exact, case-sensitive name;
/// see [`catalog::current`]).
pub fn instance_type(name: &str) -> Option<&'static InstanceType> {
    catalog::current().get(name)
}

/// The whole process-wide catalog.
pub fn instance_types() -> &'static [InstanceType] {
    catalog::current().types()
}

fn is_positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

fn is_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onprem() -> Site {
        Site {
            name: "lab-sto".into(),
            kind: SiteKind::Onprem,
            region: "stockholm".into(),
            residency: "eu".into(),
            gpu_hour_usd: Some(1.2),
            gpu_hour_usd_by_model: BTreeMap::new(),
            cpu_hour_usd: 0.0,
            uplink_usd_per_gb: 0.01,
            instance_types: Vec::new(),
            spot: false,
            capacity: None,
        }
    }

    #[test]
    fn catalog_uses_canonical_models_and_unique_names() {
        let all = instance_types();
        for (i, t) in all.iter().enumerate() {
            assert_eq!(t.gpus == 0, t.gpu_model.is_none(), "{}", t.name);
            assert!(t.gpu_model.is_none_or(is_known_model), "{}", t.name);
            assert!(all[..i].iter().all(|o| o.name != t.name), "{} twice", t.name);
        }
        let p5 = instance_type("p5.48xlarge").unwrap();
        assert_eq!((p5.gpus, p5.gpu_model, p5.vcpus, p5.memory_gib), (8, Some("H100-80GB"), 192, 2048));
        assert_eq!(instance_type("Standard_NC24ads_A100_v4").unwrap().cloud, Cloud::Azure);
        assert!(instance_type("p5.48XLARGE").is_none());
    }

    #[test]
    fn sites_parse_from_toml_with_defaults() {
        let site: Site = toml::from_str(
            "name = \"aws-use1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
             instance_types = [\"p5.48xlarge\", \"g6.xlarge\"]\n[capacity]\nprovider = \"local\"\n",
        )
        .unwrap();
        assert_eq!((site.kind, site.spot, site.elastic(), site.uplink_usd_per_gb), (SiteKind::Aws, false, true, 0.0));
        assert_eq!(site.problems(), Vec::<String>::new());
        assert!(toml::from_str::<Site>("name = \"x\"\nkind = \"aws\"\nregion = \"r\"\nprice = 1\n").is_err());
    }

    #[test]
    fn problems_are_all_reported() {
        assert_eq!(onprem().problems(), Vec::<String>::new());
        let free = Site { gpu_hour_usd: None, ..onprem() };
        assert!(free.problems()[0].contains("never free"), "{:?}", free.problems());
        let zero = Site { gpu_hour_usd: Some(0.0), instance_types: vec!["g5.xlarge".into()], ..onprem() };
        assert_eq!(zero.problems().len(), 2, "{:?}", zero.problems());
        let cloud = Site {
            kind: SiteKind::Azure,
            gpu_hour_usd: None,
            uplink_usd_per_gb: 0.0,
            instance_types: vec!["p5.48xlarge".into(), "Standard_X".into(), "Standard_D4s_v5".into()],
            region: "westeurope".into(),
            ..onprem()
        };
        let p = cloud.problems();
        assert!(p.iter().any(|m| m == "instance_types[0]: p5.48xlarge is an aws type"), "{p:?}");
        assert!(p.iter().any(|m| m.contains("unknown instance type \"Standard_X\"")), "{p:?}");
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn an_instance_type_not_offered_in_the_sites_region_is_refused() {
        let site = Site {
            name: "aws-eun1".into(),
            kind: SiteKind::Aws,
            region: "eu-west-1".into(),
            gpu_hour_usd: None,
            uplink_usd_per_gb: 0.0,
            instance_types: vec!["g5.xlarge".into(), "p4de.24xlarge".into()],
            ..onprem()
        };
        let as_of = catalog::current().as_of();
        let p = site.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        let want =
            format!("instance_types[1]: p4de.24xlarge is not offered in eu-west-1 (catalog {as_of}; offered in ");
        assert!(p[0].starts_with(&want) && p[0].contains("us-east-1"), "{p:?}");
        // Against another catalog: what it says decides.
        let other = Catalog::parse(
            r#"{"as_of": "2030-01-01", "instance_types": [
                {"cloud": "aws", "name": "g5.xlarge", "gpus": 1, "gpu_model": "A10G-24GB", "vcpus": 4, "memory_gib": 16, "regions": ["eu-west-1"]},
                {"cloud": "aws", "name": "p4de.24xlarge", "gpus": 8, "gpu_model": "A100-80GB", "vcpus": 96, "memory_gib": 1152, "regions": ["eu-west-1"]}]}"#,
        )
        .unwrap();
        assert_eq!(site.problems_in(&other), Vec::<String>::new());
        let typo = Site { instance_types: vec!["p5.4xlarge".into()], ..site };
        assert_eq!(
            typo.problems_in(&other),
            ["instance_types[0]: unknown instance type \"p5.4xlarge\" (catalog 2030-01-01)"]
        );
    }

    #[test]
    fn residency_groups_name_regions() {
        let groups = [
            ResidencyGroup {
                name: "eu".into(),
                aws: vec!["eu-west-1".into()],
                onprem: vec!["stockholm".into()],
                ..Default::default()
            },
            ResidencyGroup {
                name: "us".into(),
                aws: vec!["us-east-1".into()],
                azure: vec!["eastus".into()],
                ..Default::default()
            },
        ];
        assert_eq!(residency_of(&groups, SiteKind::Azure, "eastus"), Some("us"));
        assert_eq!(residency_of(&groups, SiteKind::Aws, "eastus"), None);
        assert!(onprem().residency_problems(&groups).is_empty());
        let wrong = Site { residency: "us".into(), ..onprem() };
        assert_eq!(wrong.residency_problems(&groups), ["residency: region stockholm is in group eu, not us"]);
        let unlisted = Site { region: "oslo".into(), ..onprem() };
        assert_eq!(unlisted.residency_problems(&groups), ["residency: group eu does not list onprem region oslo"]);
    }
}
