//! The core's stop (agents told to reconnect), undrain and remove, with their audit events.

use std::time::Duration;

use tokio::sync::oneshot;

use super::tests::{Harness, assigned, reply, report};
use super::*;
use crate::model::agent::Phase;
use crate::model::state::JobState;
use crate::store::IdentityWrite;

const ADMIN: &str = "spiffe://test.hybroker.local/admin/ops";
const ONE_CPU: &str = "name: x\ncommand: [\"true\"]\nmax_attempts: 2\nresources: {cpus: 1, memory_gib: 1}\n";

fn reconnects(out: &Effects) -> Vec<(String, Duration)> {
    let told = out.messages.iter().filter_map(|(agent, msg)| match msg {
        AgentMessage::Reconnect { after, reason } if reason == shutdown::SHUTDOWN_REASON => {
            Some((agent.clone(), *after))
        }
        _ => None,
    });
    told.collect()
}

fn audit(out: &Effects) -> Vec<(String, String, String)> {
    let events = out.batch.writes.iter().filter_map(|w| match w {
        Write::Identity(IdentityWrite::AdminEvent(e)) => Some((e.action.clone(), e.target.clone(), e.actor.clone())),
        _ => None,
    });
    events.collect()
}

#[test]
fn a_stop_tells_every_connected_agent_to_reconnect_within_the_jitter_and_ends_its_stream() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    h.connect("b", 2, vec![]);
    let (running, _) = h.submit_ok(ONE_CPU);
    h.report("a", 1, report(&running, 1, Phase::Running, None));
    let (tx, mut rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Shutdown { jitter: Duration::from_secs(2), seed: 7, reply: tx }]);
    assert_eq!(rx.try_recv(), Ok(2));
    let told = reconnects(&out);
    assert_eq!(told.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), ["lab/a", "lab/b"]);
    assert!(told.iter().all(|(_, after)| *after < Duration::from_secs(2)), "{told:?}");
    assert_ne!(told[0].1, told[1].1, "each agent gets its own pause");
    assert_eq!(out.ended, [("lab/a".to_string(), 1), ("lab/b".to_string(), 2)]);
    // Its attempt is left to the next broker; no new work goes out while stopping.
    assert_eq!(h.job(&running).life.state, JobState::Running);
    let (_, out) = h.submit_ok(ONE_CPU);
    assert!(assigned(&out, "lab/a").is_empty() && assigned(&out, "lab/b").is_empty());
    // Leases are not judged while stopping: the agents went to the next broker.
    let out = h.expire_after(Duration::from_secs(3600));
    assert!(out.batch.writes.is_empty(), "nothing expires while stopping");
    assert_eq!(h.job(&running).life.state, JobState::Running);
    // An agent that registers while the broker stops is sent away at once.
    let out = h.connect("c", 3, vec![]);
    assert_eq!(reconnects(&out).len(), 1);
    assert_eq!(out.ended, [("lab/c".to_string(), 3)]);
    assert!(assigned(&out, "lab/c").is_empty());
}

#[test]
fn an_undrained_agent_takes_work_again_and_both_changes_are_audited() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (tx, rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Drain { agent: "lab/a".into(), actor: ADMIN.into(), reply: tx }]);
    assert!(reply(rx).unwrap().draining);
    assert_eq!(audit(&out), [("agent.drain".into(), "lab/a".into(), ADMIN.into())]);
    let (waiting, _) = h.submit_ok(ONE_CPU);
    let (tx, rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Undrain { agent: "lab/a".into(), actor: ADMIN.into(), reply: tx }]);
    assert!(!reply(rx).unwrap().draining);
    assert!(
        out.batch.writes.iter().any(|w| matches!(w, Write::AgentDraining { id, draining: false } if id == "lab/a"))
    );
    assert_eq!(audit(&out), [("agent.undrain".into(), "lab/a".into(), ADMIN.into())]);
    assert_eq!(assigned(&out, "lab/a"), [(waiting, 1)], "the waiting job goes to the undrained agent");
    // Undraining an agent that takes work changes (and audits) nothing.
    let (tx, rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Undrain { agent: "lab/a".into(), actor: ADMIN.into(), reply: tx }]);
    assert!(reply(rx).is_ok() && audit(&out).is_empty());
}

#[test]
fn a_connected_agent_is_removed_only_with_force_and_its_attempts_are_queued_again() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (running, _) = h.submit_ok(ONE_CPU);
    h.report("a", 1, report(&running, 1, Phase::Running, None));
    let remove = |force| {
        let (tx, rx) = oneshot::channel();
        (Cmd::RemoveAgent { agent: "lab/a".into(), force, actor: ADMIN.into(), reply: tx }, rx)
    };
    let (cmd, rx) = remove(false);
    let out = h.step(vec![cmd]);
    assert!(matches!(reply(rx), Err(ApiError::FailedPrecondition(m)) if m.contains("--force")));
    assert!(out.batch.writes.is_empty());
    let (cmd, rx) = remove(true);
    let out = h.step(vec![cmd]);
    assert_eq!(reply(rx).unwrap().id, "lab/a");
    assert_eq!(out.closed, [("lab/a".to_string(), 1)]);
    assert!(out.batch.writes.iter().any(|w| matches!(w, Write::RemoveAgent { id } if id == "lab/a")));
    assert_eq!(audit(&out), [("agent.remove".into(), "lab/a".into(), ADMIN.into())]);
    assert!(out.events().any(|e| e.job_id == running && e.reason.contains("the agent was removed")));
    assert_eq!(h.job(&running).life.state, JobState::Queued);
    assert!(!h.core.agents.contains_key("lab/a"));
    let (cmd, rx) = remove(false);
    h.step(vec![cmd]);
    assert!(matches!(reply(rx), Err(ApiError::NotFound(_))));
    // It comes back as a new agent when it connects again, and takes the queued attempt.
    let out = h.connect("a", 2, vec![]);
    assert_eq!(assigned(&out, "lab/a"), [(running, 2)]);
}
