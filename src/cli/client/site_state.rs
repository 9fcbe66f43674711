//! `hybroker plan --config … --site-state FILE`: what-if state of sites for an offline plan, and
//! what the plan assumes about the sites the file does not describe.
//!
//! The file is TOML, one table per site of the broker's config:
//!
//! ```toml
//! [site.lab-sto]
//! free_gpus = { "H100-80GB" = 4 }  # free GPUs per canonical model now (each model's on one node)
//! free_cpus = 64                   # optional; default: no limit
//! free_memory_gib = 512            # optional; default: no limit
//! wait = "35m"                     # optional: the queue wait before a job that needs more can start
//! ```
//!
//! A job that fits the free GPUs starts now; one that needs more (up to a node of the site's
//! declared size) starts after `wait`, and without `wait` the site is busy for it. Sites not in
//! the file keep the offline assumption: an on-prem site has one free node of its declared size.
//! Sites with a capacity provider launch on demand and take no state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::model::duration::HumanDuration;
use crate::model::gpu::{is_known_model, known_models};
use crate::model::site::{Site, SiteKind};
use crate::placement::bind::FreeCapacity;

/// The file: `[site.<name>]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteStateFile {
    #[serde(default)]
    pub site: BTreeMap<String, SiteStateEntry>,
}

/// One site's state.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteStateEntry {
    /// Free GPUs per canonical model now.
    #[serde(default)]
    pub free_gpus: BTreeMap<String, u32>,
    pub free_cpus: Option<u32>,
    pub free_memory_gib: Option<u32>,
    /// The queue wait before a job that does not fit the free GPUs can start.
    pub wait: Option<HumanDuration>,
}

/// The capacity a plan uses: per site its free and total nodes, its queue wait, and one sentence
/// per assumption made.
#[derive(Debug, Default)]
pub struct PlannedCapacity {
    pub nodes: HashMap<String, (Vec<FreeCapacity>, Vec<FreeCapacity>)>,
    pub waits: HashMap<String, Duration>,
    pub assumed: Vec<String>,
}

/// Reads and checks a site-state file against the config's sites.
pub fn read(path: &Path, sites: &[Site]) -> anyhow::Result<SiteStateFile> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let file: SiteStateFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let problems = problems(&file, sites);
    if !problems.is_empty() {
        anyhow::bail!("{} is not a valid site state:\n  {}", path.display(), problems.join("\n  "));
    }
    Ok(file)
}

/// Every problem of the file: unknown sites and GPU models, sites that launch on demand.
fn problems(file: &SiteStateFile, sites: &[Site]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, entry) in &file.site {
        let Some(site) = sites.iter().find(|s| &s.name == name) else {
            let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
            out.push(format!("site.{name}: no such site in the config (sites: {})", names.join(", ")));
            continue;
        };
        if site.elastic() {
            out.push(format!(
                "site.{name}: launches instances on demand (it has a capacity provider): no state to give"
            ));
        }
        for model in entry.free_gpus.keys().filter(|m| !is_known_model(m)) {
            out.push(format!("site.{name}.free_gpus: unknown GPU model {model:?}"));
        }
    }
    out
}

/// The capacity of every site whose capacity counts (on-prem, and cloud sites without a capacity
/// provider): from the file where it describes the site, else the offline assumption.
pub fn capacity(sites: &[Site], file: &SiteStateFile) -> PlannedCapacity {
    let mut planned = PlannedCapacity::default();
    for site in sites {
        if site.elastic() {
            planned
                .assumed
                .push(format!("{} can launch an instance now (no launch failures known offline)", site.name));
            continue;
        }
        let room = room(site);
        match (file.site.get(&site.name), site.kind) {
            (Some(entry), _) => {
                let free = free_nodes(entry);
                planned.nodes.insert(site.name.clone(), (free, vec![room]));
                if let Some(wait) = &entry.wait {
                    planned.waits.insert(site.name.clone(), wait.0);
                }
            }
            (None, SiteKind::Onprem) => {
                planned
                    .assumed
                    .push(format!("{} has room now (one free node of its size; not in --site-state)", site.name));
                planned.nodes.insert(site.name.clone(), (vec![room.clone()], vec![room]));
            }
            (None, _) => planned.assumed.push(format!("{} has no agent (not in --site-state)", site.name)),
        }
    }
    planned
}

/// One node per GPU model with that model's free GPUs (a site without free GPUs: one GPU-less node).
fn free_nodes(entry: &SiteStateEntry) -> Vec<FreeCapacity> {
    let cpus = entry.free_cpus.unwrap_or(4096);
    let memory_mib = entry.free_memory_gib.map_or(64 << 20, |g| u64::from(g) * 1024);
    let node = |gpus: Vec<(u32, String)>| FreeCapacity { gpus, cpus, memory_mib, tenant: None };
    let nodes: Vec<FreeCapacity> = (entry.free_gpus.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(model, n)| node((0..*n).map(|i| (i, model.clone())).collect()))
        .collect();
    if nodes.is_empty() { vec![node(Vec::new())] } else { nodes }
}

/// A node big enough for any job, with the GPU models the site prices (every known model when it
/// gives one price for all).
pub fn room(site: &Site) -> FreeCapacity {
    let models: Vec<String> = if site.gpu_hour_usd_by_model.is_empty() {
        known_models().iter().map(|m| m.to_string()).collect()
    } else {
        site.gpu_hour_usd_by_model.keys().cloned().collect()
    };
    let gpus = models.iter().flat_map(|m| (0..64).map(move |_| m.clone())).enumerate();
    FreeCapacity { gpus: gpus.map(|(i, m)| (i as u32, m)).collect(), cpus: 4096, memory_mib: 64 << 20, tenant: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites() -> Vec<Site> {
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/broker-hybrid.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let c: crate::config::BrokerConfig = crate::config::parse_toml(&text, &config, []).unwrap();
        c.sites
    }

    fn parse(text: &str) -> SiteStateFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_described_site_has_its_free_gpus_and_wait_and_the_others_are_assumed() {
        let sites = sites();
        let onprem: Vec<&Site> = sites.iter().filter(|s| s.kind == SiteKind::Onprem).collect();
        let lab = &onprem[0].name;
        let file = parse(&format!("[site.{lab}]\nfree_gpus = {{ \"H100-80GB\" = 2 }}\nwait = \"35m\"\n"));
        assert!(problems(&file, &sites).is_empty());
        let planned = capacity(&sites, &file);
        let (free, total) = &planned.nodes[lab];
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].gpus.len(), 2);
        assert_eq!(total[0], room(onprem[0]));
        assert_eq!(planned.waits[lab], Duration::from_secs(35 * 60));
        assert!(!planned.assumed.iter().any(|a| a.starts_with(lab.as_str())), "{:?}", planned.assumed);
        for other in onprem.iter().skip(1) {
            let said = format!("{} has room now (one free node of its size; not in --site-state)", other.name);
            assert!(planned.assumed.contains(&said), "{:?}", planned.assumed);
        }
        // Without the file every on-prem site is assumed to have room.
        let blind = capacity(&sites, &SiteStateFile::default());
        assert!(blind.assumed.iter().any(|a| a.starts_with(&format!("{lab} has room now"))));
        assert_eq!(blind.nodes[lab].0, vec![room(onprem[0])]);
    }

    #[test]
    fn unknown_sites_and_models_are_refused_with_every_problem() {
        let sites = sites();
        let file = parse("[site.nowhere]\nwait = \"1h\"\n[site.lab-sto]\nfree_gpus = { \"H900\" = 1 }\n");
        let found = problems(&file, &sites);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("site.lab-sto.free_gpus: unknown GPU model \"H900\""), "{found:?}");
        assert!(found[1].starts_with("site.nowhere: no such site in the config (sites: "), "{found:?}");
        assert!(toml::from_str::<SiteStateFile>("[site.x]\nfree = 1\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn a_site_with_no_free_gpus_has_a_gpu_less_node() {
        let entry = SiteStateEntry { free_cpus: Some(8), ..SiteStateEntry::default() };
        let nodes = free_nodes(&entry);
        assert_eq!(nodes.len(), 1);
        assert!(nodes[0].gpus.is_empty());
        assert_eq!(nodes[0].cpus, 8);
    }
}
