//! The core driven directly, for sequences that are hard to provoke through processes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use super::*;
use crate::broker::keys::KeyRing;
use crate::config::TenantConfig;
use crate::model::agent::Inventory;
use crate::proto::broker_message::Msg;

/// Two secrets keys: `k1` seals everything unless a test rotates to `k2` alone.
const K1: &str = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

async fn core(dir: &tempfile::TempDir) -> Core {
    core_with_keys(dir, K1).await
}

async fn core_with_keys(dir: &tempfile::TempDir, keys: &str) -> Core {
    let (writer, _) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    let (events, _) = broadcast::channel(1024);
    let settings = CoreSettings {
        lease_ttl: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(10),
        log_tail_bytes: 1024,
        tenants: HashMap::from([("default".to_string(), TenantConfig::default_tenant())]),
        keys: Arc::new(KeyRing::default()),
        placer: Arc::new(crate::broker::placer::Placer::disabled()),
        secrets: Arc::new(crate::broker::secrets::SecretKeys::parse(keys).unwrap()),
        dedicated: Arc::new(HashMap::new()),
    };
    Core::load(writer, settings, events).await.unwrap()
}

async fn commit(core: &mut Core, out: Effects) {
    core.writer.commit(&out.batch).await.unwrap();
    core.deliver(out);
}

fn connect(
    core: &mut Core,
    conn: u64,
    out: &mut Effects,
) -> mpsc::Receiver<Result<proto::BrokerMessage, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    let inventory =
        Inventory { gpus: vec![], cpus: 8, memory_mib: 65536, labels: Default::default(), ..Default::default() };
    core.connected("lab/a".into(), "lab".into(), "a".into(), inventory, vec![], Conn { id: conn, tx }, out);
    rx
}

/// Connects agent `lab/<node>` on stream `conn`, reporting `attempts` in its register.
fn connect_as(
    core: &mut Core,
    node: &str,
    conn: u64,
    attempts: Vec<AttemptReport>,
    out: &mut Effects,
) -> mpsc::Receiver<Result<proto::BrokerMessage, tonic::Status>> {
    let inventory = Inventory { cpus: 8, memory_mib: 65536, ..Default::default() };
    connect_with(core, node, conn, inventory, attempts, out)
}

fn connect_with(
    core: &mut Core,
    node: &str,
    conn: u64,
    inventory: Inventory,
    attempts: Vec<AttemptReport>,
    out: &mut Effects,
) -> mpsc::Receiver<Result<proto::BrokerMessage, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    core.connected(format!("lab/{node}"), "lab".into(), node.into(), inventory, attempts, Conn { id: conn, tx }, out);
    rx
}

fn drain(rx: &mut mpsc::Receiver<Result<proto::BrokerMessage, tonic::Status>>) -> Vec<Msg> {
    std::iter::from_fn(|| rx.try_recv().ok()).filter_map(|m| m.unwrap().msg).collect()
}

#[tokio::test]
async fn an_assignment_lost_with_its_stream_is_sent_again_not_counted_as_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(&dir).await;
    let mut out = Effects::default();
    let mut first = connect(&mut core, 1, &mut out);
    let spec = Arc::new(JobSpec::from_yaml(b"name: x\ncommand: [\"true\"]\nmax_attempts: 1\n", 65536).unwrap());
    let (id, _) = core.submit(submitted(spec), &mut out).unwrap();
    core.dispatch(&mut out);
    commit(&mut core, out).await;
    let sent = drain(&mut first);
    assert!(matches!(sent.last(), Some(Msg::Assign(a)) if a.job_id == id && a.epoch == 1), "{sent:?}");

    // The stream breaks before the agent reads the assignment; it registers again without it.
    drop(first);
    let mut out = Effects::default();
    let mut second = connect(&mut core, 2, &mut out);
    commit(&mut core, out).await;
    let sent = drain(&mut second);
    assert!(matches!(sent.last(), Some(Msg::Assign(a)) if a.job_id == id && a.epoch == 1), "{sent:?}");
    let job = &core.jobs[&id];
    assert_eq!((job.life.state, job.life.attempts), (JobState::Leased, 1));
}

#[tokio::test]
async fn after_a_broker_restart_an_undelivered_assignment_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut core1 = core(&dir).await;
    let mut out = Effects::default();
    let _first = connect(&mut core1, 1, &mut out);
    let spec = Arc::new(JobSpec::from_yaml(b"name: x\ncommand: [\"true\"]\nmax_attempts: 1\n", 65536).unwrap());
    let (id, _) = core1.submit(submitted(spec), &mut out).unwrap();
    core1.dispatch(&mut out);
    core1.writer.commit(&out.batch).await.unwrap();
    drop((core1, out)); // the broker dies before delivering the assignment

    let mut core2 = core(&dir).await;
    let mut out = Effects::default();
    let mut again = connect(&mut core2, 1, &mut out);
    commit(&mut core2, out).await;
    let sent = drain(&mut again);
    assert!(matches!(sent.last(), Some(Msg::Assign(a)) if a.job_id == id && a.epoch == 1), "{sent:?}");
    let job = &core2.jobs[&id];
    assert_eq!((job.life.state, job.life.attempts), (JobState::Leased, 1));
}

const SECRET_JOB: &[u8] =
    b"name: s\ncommand: [env]\nmax_attempts: 2\nenv: {PLAIN: p}\nsecret_env: {TOKEN: tok-3141592}\n";

#[tokio::test]
async fn secrets_are_sealed_in_the_row_and_opened_only_into_the_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(&dir).await;
    let mut out = Effects::default();
    let mut agent = connect(&mut core, 1, &mut out);
    let (id, _) = core.submit(submitted(Arc::new(JobSpec::from_yaml(SECRET_JOB, 65536).unwrap())), &mut out).unwrap();
    let job = &core.jobs[&id];
    assert_eq!(job.spec.secret_env["TOKEN"].expose(), "<redacted>", "the live job holds the names only");
    let sealed = job.rec.secret_env_sealed.clone().expect("sealed");
    assert!(sealed.starts_with("aes256gcm:k1:") && !job.rec.spec_json.contains("tok-3141592"), "{:?}", job.rec);
    core.dispatch(&mut out);
    commit(&mut core, out).await;
    let sent = drain(&mut agent);
    let Some(Msg::Assign(a)) = sent.last() else { panic!("{sent:?}") };
    assert_eq!((a.env["TOKEN"].as_str(), a.env["PLAIN"].as_str()), ("tok-3141592", "p"));
    let (_, reader) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    let stored = reader.job(&id).await.unwrap().unwrap();
    assert_eq!(stored.secret_env_sealed.as_deref(), Some(sealed.as_str()));
    assert!(!format!("{stored:?}").contains("tok-3141592"));
}

#[tokio::test]
async fn a_key_id_gone_from_the_key_file_fails_the_attempt_and_the_job_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let mut core1 = core(&dir).await;
    let mut out = Effects::default();
    let spec = Arc::new(JobSpec::from_yaml(SECRET_JOB, 65536).unwrap());
    // One job leased before the restart (its assignment is sent again at reconnect), one queued.
    let (leased, _) = core1.submit(submitted(spec.clone()), &mut out).unwrap();
    commit(&mut core1, out).await;
    let mut out = Effects::default();
    let _agent = connect(&mut core1, 1, &mut out);
    core1.dispatch(&mut out);
    let (queued, _) = core1.submit(submitted(spec), &mut out).unwrap();
    core1.writer.commit(&out.batch).await.unwrap();
    drop((core1, out));

    // Restarted with a key file that lost k1.
    let mut core2 = core_with_keys(&dir, K2).await;
    let mut out = Effects::default();
    let mut agent = connect(&mut core2, 2, &mut out);
    core2.dispatch(&mut out);
    commit(&mut core2, out).await;
    assert!(!drain(&mut agent).iter().any(|m| matches!(m, Msg::Assign(_))), "nothing is sent without its secrets");
    let (_, reader) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    for id in [leased, queued] {
        let job = reader.job(&id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed, "{job:?}");
        assert!(job.reason.contains("failed: secret key k1 not found"), "{}", job.reason);
    }
    assert!(core2.agents["lab/a"].free().cpus == 8, "the failed attempts hold nothing");
}

fn submitted(spec: Arc<JobSpec>) -> Submitted {
    Submitted {
        tenant: "default".into(),
        spec,
        key: None,
        request_sha256: "h".into(),
        data: None,
        trace_context: None,
        trace_parent: opentelemetry::Context::new(),
    }
}

/// The lease-pinning impostor: another agent's certificate names a running attempt at register and
/// then heartbeats. The adoption is refused (the impostor is told to stop), and its traffic never
/// renews the real agent's lease, which expires on time.
#[tokio::test]
async fn an_agent_cannot_adopt_or_renew_another_agents_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(&dir).await;
    let mut out = Effects::default();
    let mut real = connect_as(&mut core, "a", 1, vec![], &mut out);
    let spec = Arc::new(JobSpec::from_yaml(b"name: x\ncommand: [\"true\"]\nmax_attempts: 2\n", 65536).unwrap());
    let (id, _) = core.submit(submitted(spec), &mut out).unwrap();
    core.dispatch(&mut out);
    commit(&mut core, out).await;
    assert!(drain(&mut real).iter().any(|m| matches!(m, Msg::Assign(a) if a.job_id == id)));
    let running = AttemptReport {
        job_id: id.clone(),
        attempt: 1,
        epoch: 1,
        phase: Phase::Running,
        exit_code: None,
        reason: String::new(),
        gpu_indices: vec![],
        staging: None,
    };
    let mut out = Effects::default();
    core.handle(Cmd::Report { agent: "lab/a".into(), conn: 1, report: running.clone() }, &mut out);
    commit(&mut core, out).await;
    assert_eq!(core.jobs[&id].life.state, JobState::Running);
    let deadline = core.jobs[&id].lease_deadline.expect("a running attempt has a lease");

    // The impostor registers naming the attempt, then reports it and heartbeats.
    let mut out = Effects::default();
    let mut impostor = connect_as(&mut core, "b", 2, vec![running.clone()], &mut out);
    commit(&mut core, out).await;
    let sent = drain(&mut impostor);
    assert!(
        sent.iter().any(|m| matches!(m, Msg::Stop(s) if s.job_id == id && s.epoch == 1)),
        "the impostor is told to stop the attempt: {sent:?}"
    );
    assert_eq!(core.agents["lab/b"].attempts().count(), 0, "nothing adopted");
    let mut out = Effects::default();
    core.handle(Cmd::Heartbeat { agent: "lab/b".into(), conn: 2, inventory: None }, &mut out);
    core.handle(Cmd::Report { agent: "lab/b".into(), conn: 2, report: running }, &mut out);
    commit(&mut core, out).await;
    assert!(drain(&mut impostor).iter().any(|m| matches!(m, Msg::Stop(s) if s.job_id == id)));
    let job = &core.jobs[&id];
    assert_eq!(job.rec.agent.as_deref(), Some("lab/a"), "the attempt stays the real agent's");
    assert_eq!(job.lease_deadline, Some(deadline), "the impostor's traffic does not renew the lease");

    // The real agent falls silent: at its deadline the lease expires and the job is queued again.
    let mut out = Effects::default();
    core.handle(Cmd::Disconnected { agent: "lab/a".into(), conn: 1 }, &mut out);
    core.expire(deadline, &mut out);
    commit(&mut core, out).await;
    let job = &core.jobs[&id];
    assert_eq!((job.life.state, job.life.attempts), (JobState::Queued, 1), "{}", job.rec.reason);
    assert!(job.rec.reason.contains("lease expired"), "{}", job.rec.reason);
}

/// An agent that claimed a future epoch of a job (a stale attempt: it is told to stop, and holds
/// what it reported until it says the attempt ended) must not renew that epoch's lease once the
/// job's next attempt is leased to another agent with it.
#[tokio::test]
async fn only_an_attempts_own_agent_renews_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(&dir).await;
    let mut out = Effects::default();
    let _a = connect_as(&mut core, "a", 1, vec![], &mut out);
    let spec = Arc::new(JobSpec::from_yaml(b"name: x\ncommand: [\"true\"]\nmax_attempts: 3\n", 65536).unwrap());
    let (id, _) = core.submit(submitted(spec), &mut out).unwrap();
    core.dispatch(&mut out);
    commit(&mut core, out).await;
    let future = AttemptReport {
        job_id: id.clone(),
        attempt: 2,
        epoch: 2,
        phase: Phase::Running,
        exit_code: None,
        reason: String::new(),
        gpu_indices: vec![],
        staging: None,
    };
    let mut out = Effects::default();
    let no_room = Inventory { cpus: 0, memory_mib: 0, ..Default::default() };
    let mut b = connect_with(&mut core, "b", 2, no_room, vec![future], &mut out);
    commit(&mut core, out).await;
    assert!(drain(&mut b).iter().any(|m| matches!(m, Msg::Stop(s) if s.job_id == id && s.epoch == 2)));
    assert_eq!(core.agents["lab/b"].attempts().count(), 1, "a stale attempt holds what it reported");

    // Agent a is lost; the job's second attempt (epoch 2) goes to agent c.
    let mut out = Effects::default();
    core.handle(Cmd::Disconnected { agent: "lab/a".into(), conn: 1 }, &mut out);
    let a_deadline = core.jobs[&id].lease_deadline.unwrap();
    core.expire(a_deadline, &mut out);
    let _c = connect_as(&mut core, "c", 3, vec![], &mut out);
    core.dispatch(&mut out);
    commit(&mut core, out).await;
    let job = &core.jobs[&id];
    assert_eq!((job.rec.agent.as_deref(), job.life.epoch), (Some("lab/c"), 2));
    let deadline = job.lease_deadline.unwrap();

    let mut out = Effects::default();
    core.handle(Cmd::Heartbeat { agent: "lab/b".into(), conn: 2, inventory: None }, &mut out);
    commit(&mut core, out).await;
    assert_eq!(core.jobs[&id].lease_deadline, Some(deadline), "agent b's heartbeat does not renew c's lease");
    let mut out = Effects::default();
    core.handle(Cmd::Heartbeat { agent: "lab/c".into(), conn: 3, inventory: None }, &mut out);
    assert!(core.jobs[&id].lease_deadline > Some(deadline), "agent c's own heartbeat does");
}

/// Isolation is checked at register; a heartbeat cannot turn a sandboxed agent into one without
/// isolation (nor the reverse).
#[tokio::test]
async fn a_heartbeat_cannot_change_an_agents_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(&dir).await;
    let mut out = Effects::default();
    let _a = connect_as(&mut core, "a", 1, vec![], &mut out);
    let unisolated = Inventory { cpus: 16, isolation: Isolation::None, ..Default::default() };
    core.handle(Cmd::Heartbeat { agent: "lab/a".into(), conn: 1, inventory: Some(unisolated) }, &mut out);
    let inventory = &core.agents["lab/a"].inventory;
    assert_eq!((inventory.isolation, inventory.cpus), (Isolation::Sandbox, 16), "the rest of the inventory is fresh");
}
