//! Where prices come from (`[prices]`) and how placement decides (`[placement]`), in the broker's
//! configuration; sites and residency groups are checked here too.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::storage::StorageConfig;
use super::tenants::TenantConfig;
use crate::model::catalog::{self, Catalog};
use crate::model::duration::HumanDuration;
use crate::model::site::{ResidencyGroup, Site};

/// Where prices come from (used when sites are configured).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesSection {
    /// The dated offline snapshot: the fallback for whatever the live feeds don't give.
    #[serde(default = "default_snapshot")]
    pub snapshot: PathBuf,
    /// Where the last good merged prices are kept, so a restart starts warm.
    #[serde(default)]
    pub persist: Option<PathBuf>,
    #[serde(default = "default_price_refresh")]
    pub refresh_interval: HumanDuration,
    /// A live feed older than this is flagged stale.
    #[serde(default = "default_feed_max_age")]
    pub max_age: HumanDuration,
    /// The Azure Retail Prices API (no credentials); `azure_url` for a mirror or a test server.
    #[serde(default)]
    pub azure: bool,
    #[serde(default = "default_azure_url")]
    pub azure_url: String,
    /// AWS Price List Query API + EC2 spot price history (credentials from the AWS default chain).
    #[serde(default)]
    pub aws: bool,
    #[serde(default)]
    pub aws_pricing_url: Option<String>,
    #[serde(default)]
    pub aws_ec2_url: Option<String>,
}

fn default_snapshot() -> PathBuf {
    PathBuf::from("config/prices/snapshot.json")
}

fn default_price_refresh() -> HumanDuration {
    Duration::from_secs(30 * 60).into()
}

fn default_feed_max_age() -> HumanDuration {
    Duration::from_secs(3 * 3600).into()
}

fn default_azure_url() -> String {
    "https://prices.azure.com".into()
}

impl Default for PricesSection {
    fn default() -> Self {
        Self {
            snapshot: default_snapshot(),
            persist: None,
            refresh_interval: default_price_refresh(),
            max_age: default_feed_max_age(),
            azure: false,
            azure_url: default_azure_url(),
            aws: false,
            aws_pricing_url: None,
            aws_ec2_url: None,
        }
    }
}

impl PricesSection {
    /// The price book's settings.
    pub fn settings(&self) -> crate::pricing::PricingSettings {
        use crate::pricing::{AwsFeedSettings, AzureFeedSettings};
        let mut aws = AwsFeedSettings::default();
        if let Some(url) = &self.aws_pricing_url {
            aws.pricing_endpoint = url.clone();
        }
        if let Some(url) = &self.aws_ec2_url {
            aws.ec2_endpoint = url.clone();
        }
        crate::pricing::PricingSettings {
            refresh_interval: self.refresh_interval.0,
            max_age: self.max_age.0,
            snapshot_path: Some(self.snapshot.clone()),
            persist_path: self.persist.clone(),
            azure: self.azure.then(|| AzureFeedSettings { base_url: self.azure_url.clone(), ..Default::default() }),
            aws: self.aws.then_some(aws),
        }
    }
}

/// How placement decides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSection {
    /// A job placed at a site that has not started within this time is placed again on fresh
    /// prices and capacity (and this is the default `max_wait` of a job without one).
    #[serde(default = "default_replace_after")]
    pub replace_after: HumanDuration,
    /// Prices older than this are flagged as stale in decisions (the last good ones are still used).
    #[serde(default = "default_price_max_age")]
    pub price_max_age: HumanDuration,
    /// What an hour of waiting costs a job whose tenant and spec say nothing, in dollars: a
    /// candidate costs `compute + egress + storage + wait × delay_usd_per_hour`.
    #[serde(default = "default_delay_usd_per_hour")]
    pub delay_usd_per_hour: f64,
    /// Fair share forgets past usage with this half-life.
    #[serde(default = "default_fair_share_half_life")]
    pub fair_share_half_life: HumanDuration,
    /// A running attempt of a `preemptible: true` job may be preempted (fair share, or a higher
    /// priority of its tenant) only after it ran this long.
    #[serde(default = "default_preempt_min_runtime")]
    pub preempt_min_runtime: HumanDuration,
    /// A job is preempted at most this many times; then it runs to its end.
    #[serde(default = "default_max_preemptions")]
    pub max_preemptions: u32,
    /// The instance catalog file (default: the one built in, `config/catalog/instance-types.json`).
    #[serde(default)]
    pub catalog: Option<PathBuf>,
}

fn default_delay_usd_per_hour() -> f64 {
    10.0
}

fn default_fair_share_half_life() -> HumanDuration {
    Duration::from_secs(24 * 3600).into()
}

fn default_preempt_min_runtime() -> HumanDuration {
    Duration::from_secs(10 * 60).into()
}

fn default_max_preemptions() -> u32 {
    3
}

fn default_replace_after() -> HumanDuration {
    Duration::from_secs(10 * 60).into()
}

fn default_price_max_age() -> HumanDuration {
    Duration::from_secs(6 * 3600).into()
}

impl PlacementSection {
    /// The catalog `catalog` names, read and checked; `None` when the built-in one is meant.
    pub fn load_catalog(&self) -> Result<Option<Catalog>, String> {
        let Some(path) = &self.catalog else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Catalog::parse(&text).map(Some).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Makes the configured catalog the process's (at start, before the first placement); the
    /// one in use after.
    pub fn install_catalog(&self) -> Result<&'static Catalog, String> {
        match self.load_catalog()? {
            Some(c) => catalog::install(c).map_err(|e| e.to_string()),
            None => Ok(catalog::current()),
        }
    }
}

impl Default for PlacementSection {
    fn default() -> Self {
        Self {
            replace_after: default_replace_after(),
            price_max_age: default_price_max_age(),
            delay_usd_per_hour: default_delay_usd_per_hour(),
            fair_share_half_life: default_fair_share_half_life(),
            preempt_min_runtime: default_preempt_min_runtime(),
            max_preemptions: default_max_preemptions(),
            catalog: None,
        }
    }
}

/// Problems of the sites, residency groups and `[placement]`, and of what tenants and storage
/// locations say about them.
pub(super) fn placement_problems(
    sites: &[Site],
    residency: &[ResidencyGroup],
    tenants: &[TenantConfig],
    storage: &[StorageConfig],
    placement: &PlacementSection,
    problems: &mut Vec<String>,
) {
    let loaded = placement.load_catalog().unwrap_or_else(|e| {
        problems.push(format!("placement.catalog: {e}"));
        None
    });
    let catalog = loaded.as_ref().unwrap_or_else(|| catalog::current());
    let mut names = std::collections::HashSet::new();
    for (i, site) in sites.iter().enumerate() {
        for p in site.problems_in(catalog).into_iter().chain(site.residency_problems(residency)) {
            problems.push(format!("site[{i}] ({}): {p}", site.name));
        }
        if !names.insert(site.name.as_str()) {
            problems.push(format!("site[{i}].name: {:?} is declared twice", site.name));
        }
    }
    let mut groups = std::collections::HashSet::new();
    for (i, g) in residency.iter().enumerate() {
        if !groups.insert(g.name.as_str()) {
            problems.push(format!("residency[{i}].name: {:?} is declared twice", g.name));
        }
    }
    for (i, t) in tenants.iter().enumerate() {
        for s in &t.sites {
            if !names.contains(s.as_str()) {
                problems.push(format!("tenant[{i}].sites: {s:?} is not a declared [[site]]"));
            }
        }
        if let Some(r) = &t.residency
            && !groups.contains(r.as_str())
        {
            problems.push(format!("tenant[{i}].residency: {r:?} is not a declared [[residency]] group"));
        }
        for (k, v) in [("max_usd_per_hour", t.max_usd_per_hour), ("max_usd_per_job", t.max_usd_per_job)]
            .into_iter()
            .chain([("monthly_budget_usd", t.monthly_budget_usd)])
        {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                problems.push(format!("tenant[{i}].{k} must be a positive number"));
            }
        }
        if !(t.weight.is_finite() && t.weight > 0.0) {
            problems.push(format!("tenant[{i}].weight must be a positive number"));
        }
        if t.max_priority.is_some_and(|p| p > 100) {
            problems.push(format!("tenant[{i}].max_priority must be 0 to 100"));
        }
        if t.max_gpus_per_site == Some(0) {
            problems.push(format!("tenant[{i}].max_gpus_per_site must be at least 1"));
        }
        if t.delay_usd_per_hour.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            problems.push(format!("tenant[{i}].delay_usd_per_hour must be a number 0 or more"));
        }
    }
    for (i, s) in storage.iter().enumerate() {
        if !sites.is_empty() && !s.residency.is_empty() && !groups.contains(s.residency.as_str()) {
            problems.push(format!("storage[{i}].residency: {:?} is not a declared [[residency]] group", s.residency));
        }
    }
    if placement.replace_after.0.is_zero() || placement.price_max_age.0.is_zero() {
        problems.push("placement.replace_after and price_max_age must be more than 0".into());
    }
    if !(placement.delay_usd_per_hour.is_finite() && placement.delay_usd_per_hour >= 0.0) {
        problems.push("placement.delay_usd_per_hour must be a number 0 or more".into());
    }
    if placement.fair_share_half_life.0.is_zero() {
        problems.push("placement.fair_share_half_life must be more than 0".into());
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{BrokerConfig, ConfigError, parse_toml};

    const BASE: &str = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"/nope/a\"\ncert = \"/nope/b\"\nkey = \"/nope/c\"\n\
                        [store]\npath = \"x.db\"\n[[residency]]\nname = \"eu\"\naws = [\"eu-north-1\", \"eu-west-1\"]\n";

    fn problems(text: &str) -> Vec<String> {
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("t.toml")).unwrap_err() else { panic!() };
        problems.into_iter().filter(|p| !p.starts_with("tls.")).collect()
    }

    fn site(region: &str, types: &str) -> String {
        format!(
            "[[site]]\nname = \"aws-eu\"\nkind = \"aws\"\nregion = \"{region}\"\nresidency = \"eu\"\ninstance_types = [{types}]\n"
        )
    }

    #[test]
    fn a_type_not_offered_in_the_region_is_refused_with_its_key() {
        let p = problems(&format!("{BASE}{}", site("eu-west-1", "\"g5.xlarge\", \"p5.48xlarge\"")));
        let as_of = crate::model::catalog::current().as_of();
        let want =
            format!("site[0] (aws-eu): instance_types[1]: p5.48xlarge is not offered in eu-west-1 (catalog {as_of}; ");
        assert!(p.len() == 1 && p[0].starts_with(&want), "{p:?}");
        assert!(problems(&format!("{BASE}{}", site("eu-north-1", "\"p5.48xlarge\""))).is_empty());
    }

    #[test]
    fn a_configured_catalog_decides_and_a_broken_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("catalog.json");
        std::fs::write(
            &file,
            r#"{"as_of": "2031-02-03", "instance_types": [{"cloud": "aws", "name": "p9.mega", "gpus": 8,
                "gpu_model": "B200-180GB", "vcpus": 192, "memory_gib": 2048, "regions": ["eu-west-1"]}]}"#,
        )
        .unwrap();
        let with = |path: &Path, types: &str| {
            format!("{BASE}[placement]\ncatalog = \"{}\"\n{}", path.display(), site("eu-west-1", types))
        };
        assert!(problems(&with(&file, "\"p9.mega\"")).is_empty());
        let p = problems(&with(&file, "\"g5.xlarge\""));
        assert_eq!(
            p,
            ["site[0] (aws-eu): instance_types[0]: unknown instance type \"g5.xlarge\" (catalog 2031-02-03)"]
        );
        std::fs::write(&file, r#"{"as_of": "soon", "instance_types": []}"#).unwrap();
        let p = problems(&with(&file, "\"g5.xlarge\""));
        assert!(p.len() == 1 && p[0].starts_with("placement.catalog: ") && p[0].contains("as_of: \"soon\""), "{p:?}");
        let p = problems(&with(&dir.path().join("missing.json"), "\"g5.xlarge\""));
        assert!(p.len() == 1 && p[0].starts_with("placement.catalog: cannot read "), "{p:?}");
    }
}
