//! `hybroker bench --sites N`: the bench broker with placement on, so that every job goes through
//! the placement engine and per-site binding (the broker core's `dispatch_placed`).
//!
//! The split: the first 4 sites are on-prem (`lab-0` … `lab-3`, fewer when N < 4) and the rest
//! are elastic cloud sites (`aws-us-east-1-0`, `azure-westeurope-7`, …) cycling through ten AWS and
//! Azure regions, each with 4–8 instance types of its cloud; `--sites 54` is 4 on-prem and 50 cloud.
//! Prices come from an offline snapshot the bench writes (`prices.json` in the state directory,
//! synthetic, fetched now). The simulated agents are spread round-robin over the on-prem sites (agent
//! `i` at `lab-<i mod 4>`, its certificate naming that site). The bench tenant's `max_usd_per_hour`
//! ($0.05) is above the on-prem CPU price ($0.01 per CPU-hour) and below every cloud price, so the
//! engine costs every cloud site and rejects it for the cap, and every job runs on an agent.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::model::price::Cloud;
use crate::placement::synthetic::{REGIONS, synthetic_cloud_site, synthetic_prices};

/// Most on-prem sites of a layout; the other sites are cloud sites.
pub const MAX_ONPREM: usize = 4;
/// The on-prem price of one CPU-hour.
pub const ONPREM_CPU_HOUR_USD: f64 = 0.01;
/// The bench tenant's cap, between the on-prem CPU price and the cheapest cloud price (a 4-vCPU
/// type at spot: at least $0.064/h in the synthetic snapshot).
pub const TENANT_MAX_USD_PER_HOUR: f64 = 0.05;
/// The seed of the synthetic prices and cloud sites (the same every run).
const SEED: u64 = 54;

/// How many sites of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteLayout {
    pub onprem: usize,
    pub cloud: usize,
}

impl SiteLayout {
    /// `sites` split into on-prem (up to [`MAX_ONPREM`]) and cloud sites; `None` for 0 (placement off).
    pub fn new(sites: usize) -> Option<SiteLayout> {
        (sites > 0).then(|| {
            let onprem = sites.min(MAX_ONPREM);
            SiteLayout { onprem, cloud: sites - onprem }
        })
    }

    /// The on-prem site agent `i` belongs to.
    pub fn agent_site(&self, i: usize) -> String {
        onprem_name(i % self.onprem)
    }

    /// Writes the price snapshot into `dir` and appends the residency groups, the sites, the
    /// `[prices]` section and the bench tenant's cap to `config`.
    pub fn write(&self, dir: &Path, config: &mut String) -> anyhow::Result<()> {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let prices = synthetic_prices(&mut rng, SEED, now);
        let snapshot = dir.join("prices.json");
        let json = serde_json::to_string_pretty(&prices)?;
        std::fs::write(&snapshot, json).with_context(|| format!("writing {}", snapshot.display()))?;
        for group in ["eu", "us", "apac"] {
            let regions = |cloud: Cloud| -> Vec<&str> {
                REGIONS.iter().filter(|(c, _, g)| *c == cloud && *g == group).map(|(_, r, _)| *r).collect()
            };
            let onprem: Vec<&str> = ONPREM_REGIONS.iter().filter(|(_, g)| *g == group).map(|(r, _)| *r).collect();
            writeln!(config, "[[residency]]\nname = \"{group}\"")?;
            writeln!(
                config,
                "aws = {}\nazure = {}",
                toml_list(&regions(Cloud::Aws)),
                toml_list(&regions(Cloud::Azure))
            )?;
            writeln!(config, "onprem = {}\n", toml_list(&onprem))?;
        }
        for i in 0..self.onprem {
            let (region, residency) = ONPREM_REGIONS[i % ONPREM_REGIONS.len()];
            writeln!(config, "[[site]]\nname = \"{}\"\nkind = \"onprem\"", onprem_name(i))?;
            writeln!(config, "region = \"{region}\"\nresidency = \"{residency}\"")?;
            writeln!(config, "gpu_hour_usd = 2.0\ncpu_hour_usd = {ONPREM_CPU_HOUR_USD}\nuplink_usd_per_gb = 0.01\n")?;
        }
        for i in 0..self.cloud {
            let site = synthetic_cloud_site(&mut rng, i);
            writeln!(config, "[[site]]\nname = \"{}\"\nkind = \"{}\"", site.name, site.kind.as_str())?;
            writeln!(config, "region = \"{}\"\nresidency = \"{}\"", site.region, site.residency)?;
            let types: Vec<&str> = site.instance_types.iter().map(String::as_str).collect();
            writeln!(config, "instance_types = {}\nspot = {}", toml_list(&types), site.spot)?;
            writeln!(config, "[site.capacity]\nprovider = \"local\"\n")?;
        }
        let snapshot = toml::Value::String(snapshot.to_string_lossy().into_owned());
        writeln!(config, "[prices]\nsnapshot = {snapshot}\n")?;
        Ok(())
    }
}

/// On-prem regions and their residency groups, taken in turn by the on-prem sites.
const ONPREM_REGIONS: [(&str, &str); 2] = [("stockholm", "eu"), ("virginia", "us")];

fn onprem_name(i: usize) -> String {
    format!("lab-{i}")
}

fn toml_list(items: &[&str]) -> String {
    toml::Value::Array(items.iter().map(|s| toml::Value::String((*s).to_owned())).collect()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_split_into_at_most_four_onprem_and_the_rest_cloud() {
        assert_eq!(SiteLayout::new(0), None);
        assert_eq!(SiteLayout::new(2), Some(SiteLayout { onprem: 2, cloud: 0 }));
        assert_eq!(SiteLayout::new(54), Some(SiteLayout { onprem: 4, cloud: 50 }));
        let layout = SiteLayout::new(54).unwrap();
        assert_eq!((layout.agent_site(0), layout.agent_site(5)), ("lab-0".to_owned(), "lab-1".to_owned()));
    }
}
