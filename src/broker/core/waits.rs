//! Waiting, from the core's side: queue-wait estimates from the live state (each site that needs
//! room — on-prem, fixed cloud — replayed forward by [`crate::placement::wait`] from its agents'
//! running attempts and the jobs placed there, in their bind order), when a replan moves a waiting
//! job, and when a job cannot be done in time anywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Core;
use super::active_job::ActiveJob;
use crate::model::state::JobState;
use crate::placement::engine::{Decision, NO_ESTIMATE, RejectionKind, Verdict};
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
        runtime: job.spec.estimated_runtime(),
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

/// How often a job waiting at its site is looked at again (a replan).
pub(super) const REPLAN_EVERY: Duration = Duration::from_secs(2);

/// A replan moves a job only when the other site is cheaper (cost + delay) by this fraction of
/// the current one's, and by at least [`MOVE_MARGIN_USD`]: estimates that wobble do not make it
/// flap between sites.
const MOVE_MARGIN: f64 = 0.05;
const MOVE_MARGIN_USD: f64 = 1.0;

/// Whether some candidate was rejected only for want of a queue-wait estimate.
pub(super) fn needs_estimate(decision: &Decision) -> bool {
    decision.candidates.iter().any(|c| matches!(&c.verdict, Verdict::Rejected(r) if r.as_str() == NO_ESTIMATE))
}

/// Whether a replan moves a job waiting at `current`: the site can no longer take it (now every
/// candidate there is rejected) and another can, or another is cheaper by the margin.
pub(super) fn moves(current: Option<&str>, decision: &Decision) -> bool {
    let Some(chosen) = &decision.chosen else { return false };
    if Some(chosen.site.as_str()) == current {
        return false;
    }
    let score = |o: &crate::placement::engine::Offer| o.cost.total_usd + o.cost.delay_usd;
    let here = decision
        .candidates
        .iter()
        .filter(|c| Some(c.site.as_str()) == current)
        .filter_map(|c| match &c.verdict {
            Verdict::Feasible(o) => Some(score(o)),
            Verdict::Rejected(_) => None,
        })
        .reduce(f64::min);
    match here {
        None => true,
        Some(here) => score(&chosen.offer) < here - (here * MOVE_MARGIN).max(MOVE_MARGIN_USD),
    }
}

/// Why the job cannot be done in time anywhere: every candidate is rejected, some for the
/// deadline or `max_wait`, and the others for reasons that waiting does not change (policy,
/// residency, caps); `None` otherwise.
pub(super) fn too_late(decision: &Decision) -> Option<String> {
    use RejectionKind as K;
    if decision.chosen.is_some() {
        return None;
    }
    let mut timing = false;
    let mut reasons = Vec::new();
    for c in &decision.candidates {
        let Verdict::Rejected(why) = &c.verdict else { return None };
        match why.kind {
            K::Deadline | K::MaxWait => timing = true,
            K::NotAllowed | K::Residency | K::Location | K::PriceCap | K::CostCap | K::Spot => {}
            _ => return None,
        }
        let line = format!("{}: {why}", c.site);
        if !reasons.contains(&line) {
            reasons.push(line);
        }
    }
    timing.then(|| reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use crate::placement::engine::{
        Candidate, Chosen, CostBreakdown, Decision, Offer, Rejection, RejectionKind, Verdict,
    };

    fn offer(total: f64, delay: f64) -> Offer {
        Offer {
            instance_type: None,
            instances: 1,
            market: None,
            gpu_model: None,
            wait_s: 0,
            ahead: 0,
            cost: CostBreakdown { total_usd: total, delay_usd: delay, ..CostBreakdown::default() },
        }
    }

    /// A decision choosing `chosen` among candidates (site, verdict).
    fn decision(chosen: Option<(&str, Offer)>, candidates: Vec<(&str, Verdict)>) -> Decision {
        Decision {
            chosen: chosen.map(|(site, offer)| Chosen { site: site.into(), output_locations: Vec::new(), offer }),
            candidates: candidates
                .into_iter()
                .map(|(site, verdict)| Candidate { site: site.into(), output_locations: Vec::new(), verdict })
                .collect(),
            residency: None,
            snapshot_id: "s".into(),
            snapshot_age_ms: 0,
            stale: false,
        }
    }

    fn rejected(kind: RejectionKind, why: &str) -> Verdict {
        Verdict::Rejected(Rejection::new(kind, why))
    }

    #[test]
    fn a_replan_moves_only_by_the_margin_or_when_the_site_cannot_take_the_job() {
        let choice = |lab: f64, cloud: f64| {
            let both =
                vec![("cloud", Verdict::Feasible(offer(cloud, 0.0))), ("lab", Verdict::Feasible(offer(lab, 0.0)))];
            decision(Some(("lab", offer(lab, 0.0))), both)
        };
        // At the cloud ($100): the lab at $94 is 6 % cheaper, at $96 only 4 %: it stays.
        assert!(super::moves(Some("cloud"), &choice(94.0, 100.0)));
        assert!(!super::moves(Some("cloud"), &choice(96.0, 100.0)));
        // Small sums: at least $1 cheaper.
        assert!(!super::moves(Some("cloud"), &choice(9.2, 10.0)));
        assert!(super::moves(Some("cloud"), &choice(8.9, 10.0)));
        // Delay counts: $8 + $5 of delay at the lab is not cheaper than $10 now at the cloud.
        let delayed = decision(
            Some(("lab", offer(8.0, 5.0))),
            vec![("cloud", Verdict::Feasible(offer(10.0, 0.0))), ("lab", Verdict::Feasible(offer(8.0, 5.0)))],
        );
        assert!(!super::moves(Some("cloud"), &delayed));
        // Its own site rejects it now (an estimate slipped past the deadline): it moves.
        let slipped = decision(
            Some(("lab", offer(50.0, 0.0))),
            vec![
                ("cloud", rejected(RejectionKind::Deadline, "deadline")),
                ("lab", Verdict::Feasible(offer(50.0, 0.0))),
            ],
        );
        assert!(super::moves(Some("cloud"), &slipped));
        assert!(!super::moves(Some("lab"), &slipped), "the chosen site is where it waits");
        assert!(!super::moves(Some("cloud"), &decision(None, Vec::new())), "nowhere to go");
    }

    #[test]
    fn a_job_is_too_late_only_when_waiting_cannot_help() {
        let late = decision(
            None,
            vec![
                ("aws", rejected(RejectionKind::Deadline, "deadline: wait 0s + run 2h > 1h 30m")),
                ("azure", rejected(RejectionKind::NotAllowed, "cloud azure not allowed")),
                ("lab", rejected(RejectionKind::Deadline, "deadline: wait 0s + run 2h > 1h 30m")),
            ],
        );
        let why = super::too_late(&late).unwrap();
        assert_eq!(
            why,
            "aws: deadline: wait 0s + run 2h > 1h 30m; azure: cloud azure not allowed; lab: deadline: wait 0s + run 2h > 1h 30m"
        );
        // A site with no agent connected now may have one later: not refused.
        let mut later = late.clone();
        later.candidates[1].verdict = rejected(RejectionKind::Capacity, "no connected agent at site");
        assert_eq!(super::too_late(&later), None);
        // No deadline among the reasons: not a matter of time.
        let policy = decision(None, vec![("aws", rejected(RejectionKind::NotAllowed, "site aws not allowed"))]);
        assert_eq!(super::too_late(&policy), None);
    }
}
