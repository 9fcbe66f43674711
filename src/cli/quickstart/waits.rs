//! The quickstart's "placement that waits": with the lab's 4-GPU node busy, one job waits for it
//! because that is cheaper than a cloud instance counting the cost of delay, and one with a
//! deadline the lab cannot meet bursts to a cloud.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;

use super::super::client::follow::{self, Progress};
use super::super::client::gateway::Gateway;
use super::super::client::spec;
use crate::gateway::api::{Job, Submitted};
use crate::placement::engine::{Decision, Verdict};

/// The job that fills the lab's H100 node, then the two placed behind it.
pub const SAMPLES: &[(&str, &str)] = &[
    ("examples/pretrain-4xh100.yaml", include_str!("../../../examples/pretrain-4xh100.yaml")),
    ("examples/sweep-4xh100.yaml", include_str!("../../../examples/sweep-4xh100.yaml")),
    ("examples/eval-4xh100-deadline.yaml", include_str!("../../../examples/eval-4xh100-deadline.yaml")),
];

/// Submits a sample through the gateway (idempotently, so a retried quickstart does not double it).
pub async fn submit(gw: &Gateway, path: &str, yaml: &str) -> anyhow::Result<String> {
    let body = spec::yaml_to_json(yaml).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let request = gw
        .request(Method::POST, &["v1", "jobs"], false)
        .header("content-type", "application/json")
        .header("Idempotency-Key", format!("quickstart-{path}"))
        .body(serde_json::to_vec(&body)?);
    let submitted: Submitted = serde_json::from_value(gw.json(request).await.context(path.to_owned())?)?;
    Ok(submitted.id)
}

async fn job(gw: &Gateway, id: &str) -> anyhow::Result<Job> {
    Ok(serde_json::from_value(gw.json(gw.request(Method::GET, &["v1", "jobs", id], false)).await?)?)
}

async fn decision(gw: &Gateway, id: &str) -> anyhow::Result<Decision> {
    let placement = gw.json(gw.request(Method::GET, &["v1", "jobs", id, "placement"], false)).await?;
    serde_json::from_value(placement).context("placement decision")
}

/// Runs the three samples and prints where the two behind the first went and why; whether all
/// succeeded.
pub async fn show(gw: &Gateway, deadline: Duration) -> anyhow::Result<bool> {
    let first = submit(gw, SAMPLES[0].0, SAMPLES[0].1).await?;
    let until = Instant::now() + deadline;
    while job(gw, &first).await?.state != "running" {
        if Instant::now() > until {
            anyhow::bail!("{} did not start within {deadline:?}", SAMPLES[0].0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ids = vec![first];
    for (path, yaml) in &SAMPLES[1..] {
        ids.push(submit(gw, path, yaml).await?);
    }
    println!("placement that waits (pretrain-4xh100 holds the lab's four H100s for an estimated 20 min):");
    println!("{:<16} {:<17} {:<10} {:<10} WHY", "JOB", "SITE", "STATE", "EST. COST");
    let mut all_ok = true;
    for id in &ids {
        tokio::time::timeout(deadline, follow::follow_events(gw, id, &mut Progress::Quiet))
            .await
            .map_err(|_| anyhow::anyhow!("job {id} did not finish within {deadline:?}"))??;
        let job = job(gw, id).await?;
        all_ok &= job.state == "succeeded";
        let decision = decision(gw, id).await?;
        let Some(chosen) = &decision.chosen else { continue };
        let cost = &chosen.offer.cost;
        let why = why(&decision, &chosen.site);
        let site = job.site.unwrap_or_default();
        println!("{:<16} {:<17} {:<10} {:<10} {why}", job.name, site, job.state, format!("${:.2}", cost.total_usd));
    }
    println!();
    Ok(all_ok)
}

/// Why the job went where it did: it waited, and what the cheapest site that would not make it
/// wait would have cost; or why the cheapest site that did not take it was refused.
fn why(decision: &Decision, site: &str) -> String {
    let Some(chosen) = &decision.chosen else { return String::new() };
    let others = decision.candidates.iter().filter(|c| c.site != site);
    if let Some(wait) = chosen.offer.wait_text() {
        let cheapest_now = others
            .filter_map(|c| match &c.verdict {
                Verdict::Feasible(o) if o.wait_s == 0 => Some((o.cost.total_usd, &c.site)),
                _ => None,
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let instead = cheapest_now.map_or_else(String::new, |(usd, s)| format!(", rather than ${usd:.2} at {s} now"));
        return format!("{wait}, worth ${:.2} of delay{instead}", chosen.offer.cost.delay_usd);
    }
    let refused = decision.candidates.iter().find_map(|c| match &c.verdict {
        Verdict::Rejected(r) if c.site != site && r.kind == crate::placement::engine::RejectionKind::Deadline => {
            Some(format!("{}: {r}", c.site))
        }
        _ => None,
    });
    refused.unwrap_or_else(|| "the cheapest site that could start it".into())
}
