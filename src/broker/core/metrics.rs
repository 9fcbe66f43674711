//! The core's metrics: gauges of its live state published on each tick (one walk of the unfinished
//! jobs, as lease expiry does), and counters and histograms recorded where their events happen.

use std::collections::BTreeMap;

use super::active_job::ActiveJob;
use super::{Core, now_ms};
use crate::metrics::global;
use crate::model::data::StagingStats;
use crate::model::state::JobState;

/// The site label of a job: where it is placed or ran, `none` while only queued.
fn site(job: &ActiveJob) -> &str {
    match job.site.as_deref() {
        Some(site) if job.life.state != JobState::Queued && !site.is_empty() => site,
        _ => "none",
    }
}

impl Core {
    /// Publishes the gauges of jobs, queues, budgets and agents.
    pub(super) fn publish_gauges(&self) {
        let now = now_ms();
        let mut jobs: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for job in self.jobs.values() {
            *jobs.entry((job.life.state.as_str(), site(job))).or_default() += 1.0;
        }
        let mut depth: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for (_, id) in &self.queue {
            let Some(job) = self.jobs.get(id) else { continue };
            let entry = depth.entry(site(job)).or_default();
            entry.0 += 1.0;
            entry.1 = entry.1.max(now.saturating_sub(job.sub.created_at).max(0) as f64 / 1000.0);
        }
        let mut agents: BTreeMap<&str, f64> = BTreeMap::new();
        for entry in self.agents.values() {
            *agents.entry(entry.site.as_str()).or_default() += f64::from(u8::from(entry.conn.is_some()));
        }
        // Every site an agent is known at reads 0 where nothing is (the configured sites, the
        // tenants and `none` are declared at start: `metrics::declare_broker_series`).
        for &site in agents.keys() {
            for state in JobState::ALL.into_iter().filter(|s| !s.is_terminal() && *s != JobState::Queued) {
                jobs.entry((state.as_str(), site)).or_default();
            }
            depth.entry(site).or_default();
        }
        let budgets = self.settings.tenants.keys().filter_map(|tenant| {
            let budget = self.settings.placer.budget(tenant).filter(|b| *b > 0.0)?;
            Some((vec![tenant.clone()], self.spent.get(tenant).copied().unwrap_or(0.0) / budget))
        });
        let r = global();
        r.set_family("hybroker_jobs", jobs.into_iter().map(|((st, si), n)| (vec![st.into(), si.into()], n)));
        r.set_family("hybroker_queue_depth", depth.iter().map(|(s, d)| (vec![s.to_string()], d.0)));
        r.set_family("hybroker_queue_oldest_wait_seconds", depth.iter().map(|(s, d)| (vec![s.to_string()], d.1)));
        r.set_family("hybroker_agents_connected", agents.into_iter().map(|(s, n)| (vec![s.into()], n)));
        r.set_family("hybroker_tenant_budget_used_ratio", budgets);
        self.publish_capacity_gauges();
    }

    /// Each elastic site's live instances by state and its spend this month, used and idle (the
    /// view `hybroker sites` shows; declared at start, so a site without instances reads 0). The
    /// spend is a counter set from the launch records: it only grows within a month.
    fn publish_capacity_gauges(&self) {
        let views = self.site_views();
        let mut instances: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for view in &views {
            for i in &view.instances {
                *instances.entry((view.site.as_str(), i.state.as_str())).or_default() += 1.0;
            }
        }
        let spend = views.iter().flat_map(|v| {
            let used = (v.spend_usd - v.idle_usd).max(0.0);
            [(vec![v.site.clone(), "used".into()], used), (vec![v.site.clone(), "idle".into()], v.idle_usd)]
        });
        let r = global();
        r.set_family(
            "hybroker_capacity_instances",
            instances.into_iter().map(|((site, state), n)| (vec![site.into(), state.into()], n)),
        );
        r.set_family("hybroker_capacity_usd_total", spend);
    }
}

/// A job reached a terminal state.
pub(super) fn finished(job: &ActiveJob, state: JobState) {
    let site = job.site.as_deref().filter(|s| !s.is_empty()).unwrap_or("none");
    global().inc("hybroker_jobs_finished_total", &[state.as_str(), site], 1.0);
}

/// An attempt ended: its cost and what it staged.
pub(super) fn attempt_ended(job: &ActiveJob, cost_usd: Option<f64>, staging: Option<&StagingStats>) {
    let site = job.site.as_deref().filter(|s| !s.is_empty()).unwrap_or("none");
    let r = global();
    if let Some(cost) = cost_usd {
        r.inc("hybroker_cost_actual_usd_total", &[&job.sub.tenant, site], cost);
    }
    if let Some(s) = staging {
        for (direction, files, bytes, ms) in
            [("in", s.in_files, s.in_bytes, s.in_ms), ("out", s.out_files, s.out_bytes, s.out_ms)]
        {
            if files > 0 {
                r.inc("hybroker_staging_bytes_total", &[direction, site], bytes as f64);
                r.observe("hybroker_staging_duration_seconds", &[direction], ms as f64 / 1000.0);
            }
        }
    }
}

/// An attempt was dispatched: the first one's wait since submit, and the estimate of the decision
/// it runs on (counted per attempt started, like actual cost, not per decision: a job placed
/// again while it waits is estimated once).
/// `waited`: since the job was placed (engine placement), for the estimate's error.
pub(super) fn dispatched(job: &ActiveJob, now: crate::model::UnixMillis, waited: Option<std::time::Duration>) {
    if job.life.attempts == 1 {
        let waited = now.saturating_sub(job.sub.created_at).max(0) as f64 / 1000.0;
        global().observe("hybroker_submit_to_dispatch_seconds", &[], waited);
    }
    if let Some(chosen) = job.decision.as_ref().and_then(|d| d.chosen.as_ref()) {
        if let Some(waited) = waited {
            global().observe("hybroker_placement_wait_seconds", &["estimated"], chosen.offer.wait_s as f64);
            global().observe("hybroker_placement_wait_seconds", &["actual"], waited.as_secs_f64());
        }
        global().inc(
            "hybroker_cost_estimated_usd_total",
            &[&job.sub.tenant, &chosen.site],
            chosen.offer.cost.total_usd,
        );
    }
}

/// One engine decision's time.
pub(super) fn decision_time(elapsed: std::time::Duration) {
    global().observe("hybroker_placement_duration_seconds", &[], elapsed.as_secs_f64());
}
