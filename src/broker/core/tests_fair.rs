//! Fair share in the core with plain values: GPU quotas held at bind and told in the waiting
//! job's reason, and a higher-priority job preempting a preemptible one of its tenant (after the
//! minimum runtime, with a stop the agent handles like a spot notice, the agent not drained).

use std::time::Duration;

use super::tests::{Harness, K1, assigned, report, settings};
use super::*;
use crate::model::agent::Phase;
use crate::model::gpu::{parse_simulated, simulated_gpus};
use crate::model::state::JobState;

fn gpus(n: u32) -> Inventory {
    let gpus = simulated_gpus(&parse_simulated(&format!("{n}xH100-80GB")).unwrap(), 0, "a");
    Inventory { gpus, cpus: 8, memory_mib: 65536, ..Default::default() }
}

fn one_gpu_job(name: &str, priority: u32, preemptible: bool) -> String {
    format!(
        "name: {name}\ncommand: [\"true\"]\npriority: {priority}\npreemptible: {preemptible}\nresources: {{gpus: 1}}\n"
    )
}

/// The preempting stops sent to `agent`: (job, epoch, reason).
fn preempted(out: &Effects, agent: &str) -> Vec<(String, u64, String)> {
    out.messages
        .iter()
        .filter(|(to, _)| to == agent)
        .filter_map(|(_, m)| match m {
            AgentMessage::Stop(s) if s.preempt => Some((s.job_id.clone(), s.epoch, s.reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_tenant_at_its_gpu_quota_waits_and_is_told_why() {
    let mut s = settings(K1);
    s.tenants.get_mut("acme").unwrap().max_gpus_per_site = Some(1);
    let now = Now::system();
    let mut h = Harness { core: Core::new(s, now), now };
    h.connect_with("a", 1, gpus(2), vec![]);
    let (first, out) = h.submit_ok(&one_gpu_job("one", 0, false));
    assert_eq!(assigned(&out, "lab/a"), [(first, 1)]);
    let (second, out) = h.submit_ok(&one_gpu_job("two", 0, false));
    assert!(assigned(&out, "lab/a").is_empty(), "a free GPU, but acme holds its quota");
    assert_eq!(h.job(&second).reason, "waiting: 1st in line; quota: acme holds 1 of max 1 GPUs at lab");
    assert!(
        out.batch.writes.iter().any(|w| matches!(w, Write::UpdateJob { id, .. } if *id == second)),
        "the reason is written with the job's status"
    );
    // Told once: the same reason is not written again.
    let out = h.heartbeat("a", 1);
    assert!(!out.batch.writes.iter().any(|w| matches!(w, Write::UpdateJob { id, .. } if *id == second)));
}

#[test]
fn a_higher_priority_job_preempts_a_preemptible_one_after_its_minimum_runtime() {
    let mut h = Harness::new();
    h.connect_with("a", 1, gpus(1), vec![]);
    let (low, _) = h.submit_ok(&one_gpu_job("low", 1, true));
    h.report("a", 1, report(&low, 1, Phase::Running, None));
    let (urgent, out) = h.submit_ok(&one_gpu_job("urgent", 9, false));
    assert!(preempted(&out, "lab/a").is_empty(), "not before placement.preempt_min_runtime (10 min)");
    h.now = h.now.after(Duration::from_secs(11 * 60));
    let out = h.heartbeat("a", 1);
    let stops = preempted(&out, "lab/a");
    let why = format!("by the broker for job {urgent}: job {urgent} of acme has a higher priority (9)");
    assert_eq!(stops, [(low.clone(), 1, why.clone())]);
    // Only once while it stops.
    assert!(preempted(&h.heartbeat("a", 1), "lab/a").is_empty());
    // The agent reports it preempted: queued again (not counted), and the urgent job takes the GPU.
    let mut ended = report(&low, 1, Phase::Preempted, None);
    ended.reason = why;
    let out = h.report("a", 1, ended);
    assert_eq!(assigned(&out, "lab/a"), [(urgent, 1)]);
    assert_eq!(h.job(&low).life.state, JobState::Queued);
    assert_eq!(h.job(&low).life.counted_attempts(), 0);
    assert!(!h.core.agents["lab/a"].draining, "a preemption by the broker does not drain the agent");
}

#[test]
fn a_job_that_is_not_preemptible_or_of_equal_priority_is_never_preempted() {
    let mut h = Harness::new();
    h.connect_with("a", 1, gpus(1), vec![]);
    let (low, _) = h.submit_ok(&one_gpu_job("low", 1, false));
    h.report("a", 1, report(&low, 1, Phase::Running, None));
    h.submit_ok(&one_gpu_job("urgent", 9, false));
    let (_, _) = h.submit_ok(&one_gpu_job("same", 1, true));
    h.now = h.now.after(Duration::from_secs(3600));
    assert!(preempted(&h.heartbeat("a", 1), "lab/a").is_empty());
}

/// Submits `yaml` for `tenant`; the new job's id.
fn submit_as(h: &mut Harness, tenant: &str, yaml: &str) -> String {
    let (cmd, rx) = super::tests::submit_cmd(yaml, None);
    let Cmd::Submit(mut submit) = cmd else { unreachable!() };
    submit.tenant = tenant.into();
    h.step(vec![Cmd::Submit(submit)]);
    super::tests::reply(rx).unwrap().0
}

#[test]
fn a_tenant_under_its_share_preempts_one_that_used_the_pool_for_hours() {
    let mut s = settings(K1);
    let mut globex = s.tenants["acme"].clone();
    globex.name = "globex".into();
    s.tenants.insert("globex".into(), globex);
    let now = Now::system();
    let mut h = Harness { core: Core::new(s, now), now };
    h.connect_with("a", 1, gpus(1), vec![]);
    let hog = submit_as(&mut h, "globex", &one_gpu_job("hog", 0, true));
    h.report("a", 1, report(&hog, 1, Phase::Running, None));
    let waiting = submit_as(&mut h, "acme", &one_gpu_job("fair", 0, false));
    // After the minimum runtime, one GPU-hour-ish of globex's is not yet worth swapping for.
    h.now = h.now.after(Duration::from_secs(11 * 60));
    assert!(preempted(&h.heartbeat("a", 1), "lab/a").is_empty(), "the swap would turn the order round");
    assert!(h.job(&waiting).reason.contains("1st in line"), "{}", h.job(&waiting).reason);
    // Hours later globex has used far more than acme: its job is preempted for acme's.
    h.now = h.now.after(Duration::from_secs(3 * 3600));
    let stops = preempted(&h.heartbeat("a", 1), "lab/a");
    // Globex is told why, without acme's name or job.
    let why = "by the broker: tenant globex is over its fair share and another tenant under its own".to_owned();
    assert_eq!(stops, [(hog.clone(), 1, why)]);
    let told = &h.job(&hog).reason;
    assert!(told.starts_with("preempting: tenant globex is over") && !told.contains("acme"), "{told}");
    assert!(!told.contains(&waiting), "{told}");
}
