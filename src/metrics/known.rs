//! The label sets a service knows before anything happens (its configured sites and tenants, the
//! job states, the staging directions), declared at start so they read 0 rather than nothing:
//! "no agents at site X" or "no jobs finished at site X" is then a 0 a query or alert can see.

use super::Registry;
use crate::model::site::Site;
use crate::model::state::JobState;

/// Staging directions, as the `direction` label spells them.
const DIRECTIONS: [&str; 2] = ["in", "out"];
/// An elastic site's live instance states (`hybroker_capacity_instances{state}`).
pub const INSTANCE_STATES: [&str; 4] = ["requested", "booting", "enrolled", "retiring"];
/// The launch results declared at 0 (`hybroker_capacity_launches_total{result}`): an alert on
/// `increase(…{result="boot_timeout"}[1h])` then sees the first timeout (an error class appears
/// when it first happens).
const LAUNCH_RESULTS: [&str; 5] = ["requested", "launched", "enrolled", "boot_timeout", "terminated"];

/// The broker's series for its configured `sites` and `tenants`: each site's kind and elasticity
/// (`hybroker_site_info`, 1), agents connected, jobs per unfinished state, waiting jobs, finished
/// jobs per terminal state, staging bytes and costs; for sites with a capacity provider, instances
/// per state, spend (used and idle) and launch results. Queued jobs have no site yet (`none`), nor
/// do jobs that finish before placement.
pub fn declare_broker_series(registry: &Registry, sites: &[Site], tenants: &[&str]) {
    for site in sites {
        let elastic = if site.elastic() { "true" } else { "false" };
        registry.set("hybroker_site_info", &[&site.name, site.kind.as_str(), elastic], 1.0);
        if site.capacity.is_some() {
            for state in INSTANCE_STATES {
                registry.declare("hybroker_capacity_instances", &[&site.name, state]);
            }
            for part in ["used", "idle"] {
                registry.declare("hybroker_capacity_usd_total", &[&site.name, part]);
            }
            for result in LAUNCH_RESULTS {
                registry.declare("hybroker_capacity_launches_total", &[&site.name, result]);
            }
        }
    }
    let sites: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
    let (finished, unfinished): (Vec<JobState>, Vec<JobState>) =
        JobState::ALL.into_iter().partition(|s| s.is_terminal());
    registry.declare("hybroker_jobs", &[JobState::Queued.as_str(), "none"]);
    for site in sites.iter().copied().chain(["none"]) {
        registry.declare("hybroker_queue_depth", &[site]);
        registry.declare("hybroker_queue_oldest_wait_seconds", &[site]);
        for state in &finished {
            registry.declare("hybroker_jobs_finished_total", &[state.as_str(), site]);
        }
    }
    for &site in &sites {
        registry.declare("hybroker_agents_connected", &[site]);
        for state in unfinished.iter().filter(|s| **s != JobState::Queued) {
            registry.declare("hybroker_jobs", &[state.as_str(), site]);
        }
        for direction in DIRECTIONS {
            registry.declare("hybroker_staging_bytes_total", &[direction, site]);
        }
        for &tenant in tenants {
            registry.declare("hybroker_cost_estimated_usd_total", &[tenant, site]);
            registry.declare("hybroker_cost_actual_usd_total", &[tenant, site]);
        }
    }
}

/// An agent's series: bytes staged in each direction.
pub fn declare_agent_series(registry: &Registry) {
    for direction in DIRECTIONS {
        registry.declare("hybroker_agent_staging_bytes_total", &[direction]);
    }
}

/// The TLS reload outcomes of a service that reloads its certificate files (broker, gateway,
/// agent), at 0 until the first reload: an alert on `increase(...{result="error"})` then sees a
/// series from the start.
pub fn declare_tls_series(registry: &Registry) {
    for result in ["ok", "error"] {
        registry.declare("hybroker_tls_reload_total", &[result]);
    }
}
