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

async fn core(dir: &tempfile::TempDir) -> Core {
    let (writer, _) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    let (events, _) = broadcast::channel(1024);
    let settings = CoreSettings {
        lease_ttl: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(10),
        log_tail_bytes: 1024,
        tenants: HashMap::from([("default".to_string(), TenantConfig::default_tenant())]),
        keys: Arc::new(KeyRing::default()),
        placer: Arc::new(crate::broker::placer::Placer::disabled()),
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
