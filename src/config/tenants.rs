//! Tenants (`[[tenant]]`) and nodes dedicated to one of them (`[[dedicated]]`), in the broker's
//! configuration.

use serde::Deserialize;

use crate::model::price::Cloud;

/// One tenant: who may submit, and how much.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Admin tenants may see and drain agents through the gateway.
    #[serde(default)]
    pub admin: bool,
    /// Jobs not yet finished (queued or running) the tenant may have at once.
    #[serde(default = "default_max_queued_jobs")]
    pub max_queued_jobs: u32,
    /// Gateway requests per second (token bucket refill rate).
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: f64,
    /// Gateway requests allowed in a burst (token bucket size).
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Data URI prefixes the tenant's jobs may read and write, e.g. `s3://acme-data/acme/`; each
    /// must lie in a configured `[[storage]]` location. Empty: no job data.
    #[serde(default)]
    pub storage: Vec<String>,
    /// Clouds the tenant's jobs may run in (on-prem is always allowed); empty = any.
    #[serde(default)]
    pub clouds: Vec<Cloud>,
    /// Sites the tenant's jobs may run at; empty = any.
    #[serde(default)]
    pub sites: Vec<String>,
    /// A residency group the tenant's jobs must stay in (default: derived from each job's data).
    #[serde(default)]
    pub residency: Option<String>,
    /// Price caps: per hour of a job's compute, and per job in all.
    #[serde(default)]
    pub max_usd_per_hour: Option<f64>,
    #[serde(default)]
    pub max_usd_per_job: Option<f64>,
    /// The tenant's monthly budget: a job whose estimate exceeds what is left is refused.
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
    /// Use owned (on-prem) hardware whenever it has room, whatever the cloud prices.
    #[serde(default)]
    pub owned_first: bool,
    /// The tenant's weight in fair share between tenants on a site (default 1).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The highest `priority` the tenant's jobs get (higher values are lowered to it); default 100.
    #[serde(default)]
    pub max_priority: Option<u32>,
    /// The most GPUs the tenant's jobs may hold at once on one site.
    #[serde(default)]
    pub max_gpus_per_site: Option<u32>,
    /// What an hour of waiting costs the tenant's jobs (default: `placement.delay_usd_per_hour`).
    #[serde(default)]
    pub delay_usd_per_hour: Option<f64>,
}

fn default_weight() -> f64 {
    1.0
}

/// One node dedicated to one tenant (`[[dedicated]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedicatedAgent {
    /// `<site>/<node>`, as in the agent's certificate.
    pub agent: String,
    /// The declared tenant whose jobs alone run there.
    pub tenant: String,
}

fn default_max_queued_jobs() -> u32 {
    1000
}

fn default_requests_per_second() -> f64 {
    20.0
}

fn default_burst() -> u32 {
    40
}

impl TenantConfig {
    /// The implicit tenant of admins' submits that name none.
    pub fn default_tenant() -> Self {
        Self {
            name: "default".into(),
            admin: true,
            max_queued_jobs: 100_000,
            requests_per_second: default_requests_per_second(),
            burst: default_burst(),
            storage: Vec::new(),
            clouds: Vec::new(),
            sites: Vec::new(),
            residency: None,
            max_usd_per_hour: None,
            max_usd_per_job: None,
            monthly_budget_usd: None,
            owned_first: false,
            weight: default_weight(),
            max_priority: None,
            max_gpus_per_site: None,
            delay_usd_per_hour: None,
        }
    }
}

/// Problems of the `[[dedicated]]` nodes: each names a node once, and a declared tenant.
/// The tenant an agent (`site/node`) is dedicated to: its own `[[dedicated]]` entry, else its
/// site's `site/*` entry (every node of the site, e.g. the instances a provider launches).
pub fn dedicated_to<'a>(dedicated: &'a std::collections::HashMap<String, String>, agent: &str) -> Option<&'a String> {
    dedicated.get(agent).or_else(|| dedicated.get(&format!("{}/*", agent.split_once('/')?.0)))
}

pub(super) fn dedicated_problems(dedicated: &[DedicatedAgent], tenants: &[TenantConfig], problems: &mut Vec<String>) {
    let mut agents = std::collections::HashSet::new();
    for (i, d) in dedicated.iter().enumerate() {
        let valid = d.agent.split_once('/').is_some_and(|(site, node)| {
            crate::model::identity::validate_name("site", site).is_ok()
                && (node == "*" || crate::model::identity::validate_name("node", node).is_ok())
        });
        if !valid {
            problems.push(format!("dedicated[{i}].agent: {:?} is not <site>/<node> or <site>/*", d.agent));
        }
        if d.tenant != "default" && !tenants.iter().any(|t| t.name == d.tenant) {
            problems.push(format!("dedicated[{i}].tenant: {:?} is not a declared [[tenant]]", d.tenant));
        }
        if !agents.insert(d.agent.as_str()) {
            problems.push(format!("dedicated[{i}].agent: {:?} is dedicated twice", d.agent));
        }
    }
}
