//! The core's rules with plain values: commands in, effects out, the clock moved by hand. No
//! database, no protobuf, no task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::broker::keys::KeyRing;
use crate::error::ApiError;
use crate::model::agent::{Isolation, Phase};
use crate::model::state::JobState;

/// Two secrets keys: `k1` seals everything unless a test rotates to `k2` alone.
pub(super) const K1: &str = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub(super) const K2: &str = "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
pub(super) const TTL: Duration = Duration::from_secs(30);

pub(super) fn settings(keys: &str) -> CoreSettings {
    let mut acme = TenantConfig::default_tenant();
    acme.name = "acme".into();
    CoreSettings {
        lease_ttl: TTL,
        heartbeat_interval: Duration::from_secs(10),
        log_tail_bytes: 1024,
        tenants: HashMap::from([("default".to_string(), TenantConfig::default_tenant()), ("acme".to_string(), acme)]),
        keys: Arc::new(KeyRing::default()),
        placer: Arc::new(crate::broker::placer::Placer::disabled()),
        secrets: Arc::new(crate::broker::secrets::SecretKeys::parse(keys).unwrap()),
        dedicated: Arc::new(HashMap::new()),
    }
}

/// A core and its clock.
pub(super) struct Harness {
    pub core: Core,
    pub now: Now,
}

impl Harness {
    pub fn new() -> Self {
        let now = Now::system();
        Self { core: Core::new(settings(K1), now), now }
    }

    /// Applies `cmds` at the current time (no expiry); replies are sent.
    pub fn step(&mut self, cmds: Vec<Cmd>) -> Effects {
        self.step_with(cmds, HashMap::new(), false)
    }

    pub fn step_with(&mut self, cmds: Vec<Cmd>, found: FoundKeys, expire: bool) -> Effects {
        let mut out = self.core.step(cmds, found, expire, self.now);
        for reply in std::mem::take(&mut out.replies) {
            reply();
        }
        out
    }

    /// Moves the clock by `d` and runs lease expiry.
    pub fn expire_after(&mut self, d: Duration) -> Effects {
        self.now = self.now.after(d);
        self.step_with(vec![], HashMap::new(), true)
    }

    /// Agent `lab/<node>` registers on stream `conn` with 8 CPUs, reporting `attempts`.
    pub fn connect(&mut self, node: &str, conn: u64, attempts: Vec<AttemptReport>) -> Effects {
        self.connect_with(node, conn, Inventory { cpus: 8, memory_mib: 65536, ..Default::default() }, attempts)
    }

    pub fn connect_with(
        &mut self,
        node: &str,
        conn: u64,
        inventory: Inventory,
        attempts: Vec<AttemptReport>,
    ) -> Effects {
        let (outbox, _) = mpsc::channel(1);
        let cmd = Cmd::Connected {
            cert_not_after: 0,
            agent: format!("lab/{node}"),
            site: "lab".into(),
            node: node.into(),
            inventory,
            attempts,
            conn: Conn { id: conn, outbox },
        };
        self.step(vec![cmd])
    }

    /// Submits `yaml` for tenant `acme` (with an idempotency key, when given); the reply and effects.
    pub fn submit(&mut self, yaml: &str, key: Option<&str>) -> (Result<(String, bool), ApiError>, Effects) {
        let (cmd, rx) = submit_cmd(yaml, key);
        let out = self.step(vec![cmd]);
        (reply(rx), out)
    }

    /// Submits `yaml` and returns the new job's id.
    pub fn submit_ok(&mut self, yaml: &str) -> (String, Effects) {
        let (result, out) = self.submit(yaml, None);
        (result.unwrap().0, out)
    }

    pub fn report(&mut self, node: &str, conn: u64, report: AttemptReport) -> Effects {
        self.step(vec![Cmd::Report { agent: format!("lab/{node}"), conn, report }])
    }

    pub fn heartbeat(&mut self, node: &str, conn: u64) -> Effects {
        self.step(vec![Cmd::Heartbeat { agent: format!("lab/{node}"), conn, inventory: None }])
    }

    pub fn job(&self, id: &str) -> &active_job::ActiveJob {
        &self.core.jobs[id]
    }

    /// When the job's lease expires now.
    pub fn deadline(&self, id: &str) -> Option<std::time::Instant> {
        self.core.lease_deadline(self.job(id))
    }
}

/// Where a submit's answer arrives.
pub(super) type SubmitAnswer = oneshot::Receiver<Result<(String, bool), ApiError>>;

pub(super) fn submit_cmd(yaml: &str, key: Option<&str>) -> (Cmd, SubmitAnswer) {
    let (reply, rx) = oneshot::channel();
    let spec = Arc::new(JobSpec::from_yaml(yaml.as_bytes(), 65536).unwrap());
    let cmd = Cmd::Submit(Submit {
        tenant: "acme".into(),
        spec,
        idempotency_key: key.map(str::to_string),
        request_sha256: crate::broker::keys::sha256_hex(yaml.as_bytes()),
        data: None,
        trace_context: None,
        trace_parent: opentelemetry::Context::new(),
        reply,
    });
    (cmd, rx)
}

pub(super) fn reply<T>(mut rx: oneshot::Receiver<Result<T, ApiError>>) -> Result<T, ApiError> {
    rx.try_recv().expect("replied")
}

pub(super) fn report(job_id: &str, epoch: u64, phase: Phase, exit_code: Option<i32>) -> AttemptReport {
    AttemptReport {
        job_id: job_id.into(),
        attempt: epoch as u32,
        epoch,
        phase,
        exit_code,
        reason: String::new(),
        gpu_indices: vec![],
        staging: None,
    }
}

/// The assignments sent to `agent` in these effects: (job, epoch).
pub(super) fn assigned(out: &Effects, agent: &str) -> Vec<(String, u64)> {
    out.messages
        .iter()
        .filter(|(to, _)| to == agent)
        .filter_map(|(_, m)| match m {
            AgentMessage::Assign(a) => Some((a.job_id.clone(), a.epoch)),
            _ => None,
        })
        .collect()
}

/// The stops sent to `agent`: (job, epoch).
pub(super) fn stopped(out: &Effects, agent: &str) -> Vec<(String, u64)> {
    out.messages
        .iter()
        .filter(|(to, _)| to == agent)
        .filter_map(|(_, m)| match m {
            AgentMessage::Stop(s) => Some((s.job_id.clone(), s.epoch)),
            _ => None,
        })
        .collect()
}

fn acked(out: &Effects, agent: &str) -> Vec<(String, u64)> {
    out.messages
        .iter()
        .filter(|(to, _)| to == agent)
        .filter_map(|(_, m)| match m {
            AgentMessage::Ack { job_id, epoch } => Some((job_id.clone(), *epoch)),
            _ => None,
        })
        .collect()
}

/// The states the batch writes for `job`, in order.
fn written_states(out: &Effects, job: &str) -> Vec<JobState> {
    out.batch
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::NewJob { job: j, status } if j.id == job => Some(status.state),
            Write::UpdateJob { id, status } if id == job => Some(status.state),
            _ => None,
        })
        .collect()
}

const ADMIN: &str = "spiffe://test.hybroker.local/admin/ops";
const ONE_CPU: &str = "name: x\ncommand: [\"true\"]\nmax_attempts: 2\nresources: {cpus: 1, memory_gib: 1}\n";
const SIX_CPUS: &str = "name: big\ncommand: [\"true\"]\nresources: {cpus: 6, memory_gib: 1}\n";

#[test]
fn a_queued_job_is_bound_to_the_first_agent_with_room_and_its_assignment_is_an_effect() {
    let mut h = Harness::new();
    let small = Inventory { cpus: 4, memory_mib: 65536, ..Default::default() };
    h.connect_with("a", 1, small, vec![]);
    h.connect("b", 2, vec![]);
    let (big, out) = h.submit_ok(SIX_CPUS);
    assert_eq!(written_states(&out, &big), [JobState::Queued, JobState::Placed, JobState::Leased]);
    assert!(out.batch.writes.iter().any(|w| matches!(w, Write::NewAttempt(a) if a.job_id == big && a.epoch == 1)));
    assert_eq!(assigned(&out, "lab/a"), []);
    assert_eq!(assigned(&out, "lab/b"), [(big.clone(), 1)], "lab/a has too few CPUs");
    let job = h.job(&big);
    assert_eq!(
        (job.life.state, job.agent.as_deref(), job.site.as_deref()),
        (JobState::Leased, Some("lab/b"), Some("lab"))
    );
    assert_eq!(job.lease_deadline, Some(h.now.at + TTL));
    // lab/b has 2 CPUs left: a one-CPU job fits lab/a, the first agent with room.
    let (small_job, out) = h.submit_ok(ONE_CPU);
    assert_eq!(assigned(&out, "lab/a"), [(small_job, 1)]);
    // What no agent has room for stays queued, and nothing is sent.
    let (waiting, out) = h.submit_ok(SIX_CPUS);
    assert!(out.messages.is_empty(), "{:?}", out.messages);
    assert_eq!(h.job(&waiting).life.state, JobState::Queued);
}

#[test]
fn a_lease_expires_at_its_deadline_and_the_job_is_tried_again_until_no_attempts_are_left() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, _) = h.submit_ok(ONE_CPU); // max_attempts 2
    let out = h.expire_after(TTL - Duration::from_millis(1));
    assert!(out.batch.is_empty() && out.closed.is_empty(), "nothing expires before the deadline");
    // Past the deadline the silent agent's stream is dropped and the attempt is lost; the job is
    // queued again and waits (no agent is connected).
    let out = h.expire_after(Duration::from_millis(2));
    assert_eq!(out.closed, [("lab/a".to_string(), 1)]);
    assert_eq!(written_states(&out, &id), [JobState::Queued]);
    assert!(
        out.batch.writes.iter().any(
            |w| matches!(w, Write::EndAttempt(e) if e.job_id == id && e.attempt == 1 && e.state == JobState::Failed)
        )
    );
    let job = h.job(&id);
    assert_eq!((job.life.state, job.life.attempts, job.lease_deadline), (JobState::Queued, 1, None));
    assert!(job.reason.contains("lost on lab/a: lease expired"), "{}", job.reason);

    // The second attempt expires too: no attempts left.
    h.connect("a", 2, vec![]);
    assert_eq!(h.job(&id).life.epoch, 2);
    let out = h.expire_after(TTL);
    assert_eq!(written_states(&out, &id), [JobState::Failed]);
    assert!(!h.core.jobs.contains_key(&id), "a failed job leaves the live state");
}

#[test]
fn the_owners_heartbeat_renews_its_leases() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, _) = h.submit_ok(ONE_CPU);
    h.now = h.now.after(Duration::from_secs(20));
    h.heartbeat("a", 1);
    assert_eq!(h.deadline(&id), Some(h.now.at + TTL));
    // Past the first deadline, within the renewed one: nothing expires.
    let out = h.expire_after(Duration::from_secs(20));
    assert!(out.batch.is_empty(), "{:?}", out.batch);
    // A heartbeat on a stream that is no longer the agent's renews nothing.
    let deadline = h.deadline(&id);
    h.now = h.now.after(Duration::from_secs(1));
    h.heartbeat("a", 99);
    assert_eq!(h.deadline(&id), deadline);
}

#[test]
fn reports_about_a_stale_epoch_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, _) = h.submit_ok("name: x\ncommand: [\"true\"]\nmax_attempts: 3\n");
    // Epoch 1's lease is lost; epoch 2 goes to lab/b.
    h.step(vec![Cmd::Disconnected { agent: "lab/a".into(), conn: 1 }]);
    h.expire_after(TTL);
    let out = h.connect("b", 2, vec![]);
    assert_eq!(assigned(&out, "lab/b"), [(id.clone(), 2)]);

    // lab/a comes back and says epoch 1 is running, then that it succeeded.
    h.connect("a", 3, vec![]);
    let out = h.report("a", 3, report(&id, 1, Phase::Running, None));
    assert_eq!(stopped(&out, "lab/a"), [(id.clone(), 1)], "a stale running attempt is told to stop");
    assert!(out.batch.is_empty());
    let out = h.report("a", 3, report(&id, 1, Phase::Exited, Some(0)));
    assert_eq!(acked(&out, "lab/a"), [(id.clone(), 1)], "a stale final report is acknowledged, not applied");
    assert!(out.batch.is_empty());
    let job = h.job(&id);
    assert_eq!((job.life.state, job.life.epoch, job.agent.as_deref()), (JobState::Leased, 2, Some("lab/b")));

    // The current epoch's report applies.
    h.report("b", 2, report(&id, 2, Phase::Running, None));
    let out = h.report("b", 2, report(&id, 2, Phase::Exited, Some(0)));
    assert_eq!(written_states(&out, &id), [JobState::Succeeded]);
    assert_eq!(acked(&out, "lab/b"), [(id, 2)]);
}

#[test]
fn a_preempted_attempt_is_placed_again_without_using_up_max_attempts() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, _) = h.submit_ok("name: x\ncommand: [\"true\"]\nmax_attempts: 1\n");
    h.report("a", 1, report(&id, 1, Phase::Running, None));
    let mut preempted = report(&id, 1, Phase::Preempted, None);
    preempted.reason = "spot interruption notice: terminate at 2026-12-06T20:00:00Z".into();
    let out = h.report("a", 1, preempted.clone());
    // Acknowledged and queued again; the agent, whose instance is going away, takes no new work.
    assert_eq!(acked(&out, "lab/a"), [(id.clone(), 1)]);
    assert_eq!(written_states(&out, &id), [JobState::Queued]);
    assert!(assigned(&out, "lab/a").is_empty());
    assert!(out.batch.writes.iter().any(|w| matches!(w, Write::AgentDraining { id, draining: true } if id == "lab/a")));
    assert!(
        out.events().any(|e| e.job_id == id
            && e.reason.starts_with("preempted: spot interruption notice: terminate at 2026-12-06T20:00:00Z")),
        "{:?}",
        out.events().map(|e| &e.reason).collect::<Vec<_>>()
    );
    let job = h.job(&id);
    assert_eq!((job.life.attempts, job.life.preemptions, job.life.counted_attempts()), (1, 1, 0));
    assert_eq!(job.status().preemptions, 1, "durable with the job's status");
    // Another agent takes it: attempt 2, epoch 2, though max_attempts is 1.
    let out = h.connect("b", 2, vec![]);
    assert_eq!(assigned(&out, "lab/b"), [(id.clone(), 2)]);
    assert_eq!((h.job(&id).life.attempts, h.job(&id).life.max_attempts), (2, 1));
    // A zombie's late notice about epoch 1 changes nothing.
    let out = h.report("a", 1, preempted);
    assert!(out.batch.is_empty());
    assert_eq!(h.job(&id).life.preemptions, 1);
    // The second attempt is the one counted: a failed staging now fails the job.
    h.report("b", 2, report(&id, 2, Phase::Running, None));
    let out = h.report("b", 2, report(&id, 2, Phase::StagingFailed, None));
    assert_eq!(written_states(&out, &id), [JobState::Failed]);
}

#[test]
fn a_reconnect_adopts_what_the_agent_holds_resends_what_it_never_got_and_loses_the_rest() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (adopted, _) = h.submit_ok(ONE_CPU);
    let (resent, _) = h.submit_ok(ONE_CPU);
    let (lost, _) = h.submit_ok(ONE_CPU);
    for id in [&adopted, &lost] {
        h.report("a", 1, report(id, 1, Phase::Running, None));
    }
    // The stream breaks; the agent registers again holding only `adopted` (it never got `resent`,
    // and `lost` died with it).
    let out = h.connect("a", 2, vec![report(&adopted, 1, Phase::Running, None)]);
    assert_eq!(out.closed, [("lab/a".to_string(), 1)], "the old stream is closed");
    assert!(matches!(out.messages.first(), Some((to, AgentMessage::Registered { .. })) if to == "lab/a"));
    assert_eq!(h.job(&adopted).life.state, JobState::Running, "adopted as it was");
    assert!(written_states(&out, &adopted).is_empty());
    let sent = assigned(&out, "lab/a");
    assert!(sent.contains(&(resent.clone(), 1)), "sent again with the same epoch: {sent:?}");
    assert_eq!((h.job(&resent).life.state, h.job(&resent).life.attempts), (JobState::Leased, 1));
    // `lost` fails its attempt, is queued again and, the agent having room, leased again at epoch 2.
    assert_eq!(written_states(&out, &lost), [JobState::Queued, JobState::Placed, JobState::Leased]);
    assert!(sent.contains(&(lost.clone(), 2)), "{sent:?}");
    assert!(out.events().any(|e| e.job_id == lost && e.reason.contains("reconnected without the attempt")));
    assert_eq!(h.core.agents["lab/a"].attempts().count(), 3);
}

#[test]
fn a_draining_agent_takes_no_new_work_and_its_attempts_finish() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (running, _) = h.submit_ok(ONE_CPU);
    h.report("a", 1, report(&running, 1, Phase::Running, None));
    let (tx, rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Drain { agent: "lab/a".into(), actor: ADMIN.into(), reply: tx }]);
    assert!(reply(rx).unwrap().draining);
    assert!(out.batch.writes.iter().any(|w| matches!(w, Write::AgentDraining { id, draining: true } if id == "lab/a")));
    let (waiting, out) = h.submit_ok(ONE_CPU);
    assert!(assigned(&out, "lab/a").is_empty(), "no new work for a draining agent");
    let out = h.report("a", 1, report(&running, 1, Phase::Exited, Some(0)));
    assert_eq!(written_states(&out, &running), [JobState::Succeeded]);
    let out = h.connect("b", 2, vec![]);
    assert_eq!(assigned(&out, "lab/b"), [(waiting, 1)], "the waiting job goes to another agent");
    let (tx, rx) = oneshot::channel();
    h.step(vec![Cmd::Drain { agent: "lab/nobody".into(), actor: ADMIN.into(), reply: tx }]);
    assert!(matches!(reply(rx), Err(ApiError::NotFound(_))));
}

#[test]
fn cancel_stops_a_running_attempt_and_ends_the_job() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (running, _) = h.submit_ok(ONE_CPU);
    h.report("a", 1, report(&running, 1, Phase::Running, None));
    let cancel = |job_id: &str, tenant: Option<&str>| {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Cancel { job_id: job_id.into(), tenant: tenant.map(Into::into), reason: "no".into(), reply: tx };
        (cmd, rx)
    };
    // Another tenant's job is not found, and nothing happens to it.
    let (cmd, rx) = cancel(&running, Some("globex"));
    let out = h.step(vec![cmd]);
    assert!(matches!(reply(rx), Err(ApiError::NotFound(_))));
    assert!(out.batch.is_empty());

    let (cmd, rx) = cancel(&running, Some("acme"));
    let out = h.step(vec![cmd]);
    reply(rx).unwrap();
    assert_eq!(stopped(&out, "lab/a"), [(running.clone(), 1)]);
    assert_eq!(written_states(&out, &running), [JobState::Cancelled]);
    assert!(out.batch.writes.iter().any(|w| matches!(w, Write::EndAttempt(e) if e.state == JobState::Cancelled)));
    assert!(!h.core.jobs.contains_key(&running));
    // Its agent's room is not freed until the agent says the attempt ended.
    assert_eq!(h.core.agents["lab/a"].free().cpus, 7);

    // A queued job is cancelled without any message; a finished one cannot be.
    let full = Inventory { cpus: 0, ..Default::default() };
    h.connect_with("a", 2, full, vec![]);
    let (queued, _) = h.submit_ok(ONE_CPU);
    let (cmd, rx) = cancel(&queued, None);
    let out = h.step(vec![cmd]);
    reply(rx).unwrap();
    assert!(out.messages.is_empty());
    let (cmd, rx) = cancel(&queued, None);
    h.step(vec![cmd]);
    assert!(matches!(reply(rx), Err(ApiError::FailedPrecondition(_))));
}

#[test]
fn a_submit_with_a_known_idempotency_key_gets_the_first_job() {
    let mut h = Harness::new();
    // Two submits with one key in one batch: one job.
    let (first, rx1) = submit_cmd(ONE_CPU, Some("k"));
    let (second, rx2) = submit_cmd(ONE_CPU, Some("k"));
    let out = h.step(vec![first, second]);
    let (id, duplicate) = reply(rx1).unwrap();
    assert!(!duplicate);
    assert_eq!(reply(rx2).unwrap(), (id.clone(), true));
    assert_eq!(out.batch.writes.iter().filter(|w| matches!(w, Write::NewJob { .. })).count(), 1);
    // A key the store knows (from an earlier batch) answers with its job; a different document
    // under the same key is refused.
    let found = FoundKeys::from([(
        ("acme".into(), "k".into()),
        (id.clone(), Some(crate::broker::keys::sha256_hex(ONE_CPU.as_bytes()))),
    )]);
    let (again, rx) = submit_cmd(ONE_CPU, Some("k"));
    let (other, rx_other) = submit_cmd(SIX_CPUS, Some("k"));
    let out = h.step_with(vec![again, other], found, false);
    assert_eq!(reply(rx).unwrap(), (id, true));
    assert!(matches!(reply(rx_other), Err(ApiError::AlreadyExists(_))));
    assert!(out.batch.is_empty());
}

#[test]
fn a_transition_writes_the_status_and_shares_the_submission() {
    let mut h = Harness::new();
    let (id, out) = h.submit_ok(ONE_CPU);
    let Some(Write::NewJob { job, .. }) = out.batch.writes.first() else { panic!("{:?}", out.batch) };
    assert!(Arc::ptr_eq(job, &h.job(&id).sub), "the store's write shares the live job's submission");
    let out = h.connect("a", 1, vec![]);
    let leased = out.batch.writes.iter().rev().find_map(|w| match w {
        Write::UpdateJob { id: j, status } if *j == id => Some(status),
        _ => None,
    });
    let leased = leased.expect("an update");
    assert_eq!(
        (leased.state, leased.attempts, leased.epoch, leased.agent.as_deref()),
        (JobState::Leased, 1, 1, Some("lab/a"))
    );
}

/// The lease-pinning impostor: another agent's certificate names a running attempt at register and
/// then heartbeats. The adoption is refused (the impostor is told to stop), and its traffic never
/// renews the real agent's lease, which expires on time.
#[test]
fn an_agent_cannot_adopt_or_renew_another_agents_attempt() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, out) = h.submit_ok("name: x\ncommand: [\"true\"]\nmax_attempts: 2\n");
    assert_eq!(assigned(&out, "lab/a"), [(id.clone(), 1)]);
    let running = report(&id, 1, Phase::Running, None);
    h.report("a", 1, running.clone());
    assert_eq!(h.job(&id).life.state, JobState::Running);
    let deadline = h.deadline(&id).expect("a running attempt has a lease");

    // The impostor (with no room of its own) registers naming the attempt, then reports it and
    // heartbeats.
    h.now = h.now.after(Duration::from_secs(1));
    let no_room = Inventory { cpus: 0, memory_mib: 0, ..Default::default() };
    let out = h.connect_with("b", 2, no_room, vec![running.clone()]);
    assert_eq!(stopped(&out, "lab/b"), [(id.clone(), 1)], "the impostor is told to stop the attempt");
    assert_eq!(h.core.agents["lab/b"].attempts().count(), 0, "nothing adopted");
    h.heartbeat("b", 2);
    let out = h.report("b", 2, running);
    assert_eq!(stopped(&out, "lab/b"), [(id.clone(), 1)]);
    let job = h.job(&id);
    assert_eq!(job.agent.as_deref(), Some("lab/a"), "the attempt stays the real agent's");
    assert_eq!(h.deadline(&id), Some(deadline), "the impostor's traffic does not renew the lease");

    // The real agent falls silent: at its deadline the lease expires and the job is queued again.
    h.step(vec![Cmd::Disconnected { agent: "lab/a".into(), conn: 1 }]);
    h.now.at = deadline - Duration::from_secs(1);
    h.expire_after(Duration::from_secs(1));
    let job = h.job(&id);
    assert_eq!((job.life.state, job.life.attempts), (JobState::Queued, 1), "{}", job.reason);
    assert!(job.reason.contains("lease expired"), "{}", job.reason);
}

/// An agent that claimed a future epoch of a job (a stale attempt: it is told to stop, and holds
/// what it reported until it says the attempt ended) must not renew that epoch's lease once the
/// job's next attempt is leased to another agent with it.
#[test]
fn only_an_attempts_own_agent_renews_its_lease() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, _) = h.submit_ok("name: x\ncommand: [\"true\"]\nmax_attempts: 3\n");
    let future = report(&id, 2, Phase::Running, None);
    let no_room = Inventory { cpus: 0, memory_mib: 0, ..Default::default() };
    let out = h.connect_with("b", 2, no_room, vec![future]);
    assert_eq!(stopped(&out, "lab/b"), [(id.clone(), 2)]);
    assert_eq!(h.core.agents["lab/b"].attempts().count(), 1, "a stale attempt holds what it reported");

    // Agent a is lost; the job's second attempt (epoch 2) goes to agent c.
    h.step(vec![Cmd::Disconnected { agent: "lab/a".into(), conn: 1 }]);
    h.expire_after(TTL);
    h.connect("c", 3, vec![]);
    let job = h.job(&id);
    assert_eq!((job.agent.as_deref(), job.life.epoch), (Some("lab/c"), 2));
    let deadline = h.deadline(&id).unwrap();

    h.now = h.now.after(Duration::from_secs(1));
    h.heartbeat("b", 2);
    assert_eq!(h.deadline(&id), Some(deadline), "agent b's heartbeat does not renew c's lease");
    h.heartbeat("c", 3);
    assert!(h.deadline(&id) > Some(deadline), "agent c's own heartbeat does");
}

/// Isolation is checked at register; a heartbeat cannot turn a sandboxed agent into one without
/// isolation (nor the reverse).
#[test]
fn a_heartbeat_cannot_change_an_agents_isolation() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let unisolated = Inventory { cpus: 16, isolation: Isolation::None, ..Default::default() };
    h.step(vec![Cmd::Heartbeat { agent: "lab/a".into(), conn: 1, inventory: Some(unisolated) }]);
    let inventory = &h.core.agents["lab/a"].inventory;
    assert_eq!((inventory.isolation, inventory.cpus), (Isolation::Sandbox, 16), "the rest of the inventory is fresh");
}

/// An assignment lost with its stream (the agent never read it) is sent again on the next stream
/// with the same epoch: it does not count as another attempt.
#[test]
fn an_assignment_lost_with_its_stream_is_sent_again_not_counted_as_an_attempt() {
    let mut h = Harness::new();
    h.connect("a", 1, vec![]);
    let (id, out) = h.submit_ok("name: x\ncommand: [\"true\"]\nmax_attempts: 1\n");
    assert_eq!(assigned(&out, "lab/a"), [(id.clone(), 1)]);
    let out = h.connect("a", 2, vec![]);
    assert_eq!(assigned(&out, "lab/a"), [(id.clone(), 1)]);
    let job = h.job(&id);
    assert_eq!((job.life.state, job.life.attempts), (JobState::Leased, 1));
}
