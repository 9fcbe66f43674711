//! Queue-wait estimates from the core's live state: each site that needs room (on-prem, fixed
//! cloud) replayed forward ([`crate::placement::wait`]) from its agents' running attempts and the
//! jobs placed there that wait, in queue order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Core;
use super::active_job::ActiveJob;
use crate::model::state::JobState;
use crate::placement::request::WaitingAt;
use crate::placement::shape::{NodeShape, gpu_counts};
use crate::placement::wait::{Need, Node, Profile, time_left};

/// A site's replay, and each waiting job's place in it.
pub(super) struct SiteWaits {
    pub profile: Arc<Profile>,
    /// Job id → its index among the site's waiting jobs.
    index: HashMap<String, usize>,
}

impl SiteWaits {
    /// A job's own estimate at the site it waits at.
    pub fn of(&self, site: &str, job_id: &str) -> Option<WaitingAt> {
        let &i = self.index.get(job_id)?;
        Some(WaitingAt {
            site: site.to_owned(),
            wait: self.profile.starts[i],
            ahead: u32::try_from(i).unwrap_or(u32::MAX),
        })
    }
}

/// What a job needs, as the replay sees it.
fn need(job: &ActiveJob) -> Need {
    let r = &job.spec.resources;
    Need {
        gpus: r.gpus,
        gpu_models: r.gpu_model.clone(),
        cpus: r.cpus,
        memory_mib: u64::from(r.memory_gib) * 1024,
        runtime: job.spec.expected_runtime.map_or_else(|| job.spec.max_runtime(), |d| d.0),
    }
}

impl Core {
    /// The order jobs placed at each site would bind in now (fair share between tenants, then
    /// priority and age).
    pub(super) fn bind_orders(&self) -> HashMap<String, Vec<String>> {
        let placer = &self.settings.placer;
        let agents: Vec<(&str, &str)> = self
            .agents
            .values()
            .filter(|e| e.takes_work() && placer.knows_site(&e.site))
            .map(|e| (e.id.as_str(), e.site.as_str()))
            .collect();
        self.fair_pools(true, &agents).into_iter().filter_map(|p| Some((p.site?, p.order))).collect()
    }

    /// The replay of `site` for `tenant`'s world: the site's agents that take work and may run
    /// the tenant's jobs, and every job placed there and not yet leased, in `order` (the site's
    /// bind order).
    pub(super) fn site_waits(&self, site: &str, tenant: &str, order: &[String]) -> SiteWaits {
        let now = self.now.at;
        let nodes = self
            .agents
            .values()
            .filter(|e| e.site == site && e.takes_work() && e.total().admits(tenant))
            .map(|e| {
                let model = |index: &u32| e.inventory.gpus.iter().find(|g| g.index == *index && g.healthy);
                let running = e
                    .allocs()
                    .map(|((job_id, _), alloc)| {
                        let left = self.jobs.get(job_id).map_or(Duration::ZERO, |job| {
                            let ran = job.attempt_started.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                            time_left(ran, job.spec.expected_runtime.map(|d| d.0), job.spec.max_runtime())
                        });
                        let gpus = gpu_counts(alloc.gpus.iter().filter_map(model).map(|g| g.model.as_str()));
                        (left, NodeShape { gpus, cpus: alloc.cpus, memory_mib: alloc.memory_mib })
                    })
                    .collect();
                Node { free: NodeShape::of(&e.free()), running }
            })
            .collect();
        let mut index = HashMap::new();
        let mut waiting = Vec::new();
        for job_id in order {
            let Some(job) = self.jobs.get(job_id) else { continue };
            if job.life.state == JobState::Placed && job.site.as_deref() == Some(site) {
                index.insert(job_id.clone(), waiting.len());
                waiting.push(need(job));
            }
        }
        SiteWaits { profile: Arc::new(Profile::build(nodes, &waiting)), index }
    }
}
