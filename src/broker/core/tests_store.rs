//! The core with the store behind it, as the driver runs it: what survives a broker restart, and
//! what the store holds of a job's secrets.

use std::collections::HashMap;

use super::tests::{K1, K2, assigned, settings, submit_cmd};
use super::*;
use crate::model::state::JobState;
use crate::store::Writer;

/// A core loaded from the store in `dir`, as the driver loads it.
async fn load(dir: &tempfile::TempDir, keys: &str) -> (Core, Writer) {
    let (mut writer, _) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    let now = Now::system();
    let stored = driver::stored(&mut writer, now).await.unwrap();
    (Core::restore(settings(keys), stored, now).unwrap(), writer)
}

/// Applies `cmds` and commits their writes; the effects, replies sent.
async fn step(core: &mut Core, writer: &mut Writer, cmds: Vec<Cmd>) -> Effects {
    let mut out = core.step(cmds, HashMap::new(), false, Now::system());
    writer.commit(&out.batch).await.unwrap();
    for reply in std::mem::take(&mut out.replies) {
        reply();
    }
    out
}

fn connect(node: &str, conn: u64) -> Cmd {
    let (outbox, _) = tokio::sync::mpsc::channel(1);
    Cmd::Connected {
        cert_not_after: 0,
        agent: format!("lab/{node}"),
        site: "lab".into(),
        node: node.into(),
        inventory: Inventory { cpus: 8, memory_mib: 65536, ..Default::default() },
        attempts: vec![],
        conn: Conn { id: conn, outbox },
    }
}

async fn submit(core: &mut Core, writer: &mut Writer, yaml: &str) -> String {
    let (cmd, rx) = submit_cmd(yaml, None);
    step(core, writer, vec![cmd]).await;
    super::tests::reply(rx).unwrap().0
}

#[tokio::test]
async fn after_a_broker_restart_an_undelivered_assignment_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut core1, mut writer) = load(&dir, K1).await;
    step(&mut core1, &mut writer, vec![connect("a", 1)]).await;
    let id = submit(&mut core1, &mut writer, "name: x\ncommand: [\"true\"]\nmax_attempts: 1\n").await;
    drop((core1, writer)); // the broker dies before delivering the assignment

    let (mut core2, mut writer) = load(&dir, K1).await;
    let out = step(&mut core2, &mut writer, vec![connect("a", 1)]).await;
    assert_eq!(assigned(&out, "lab/a"), [(id.clone(), 1)]);
    let job = &core2.jobs[&id];
    assert_eq!((job.life.state, job.life.attempts), (JobState::Leased, 1));
}

const SECRET_JOB: &str =
    "name: s\ncommand: [env]\nmax_attempts: 2\nenv: {PLAIN: p}\nsecret_env: {TOKEN: tok-3141592}\n";

#[tokio::test]
async fn secrets_are_sealed_in_the_row_and_opened_only_into_the_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut core, mut writer) = load(&dir, K1).await;
    let id = submit(&mut core, &mut writer, SECRET_JOB).await;
    let job = &core.jobs[&id];
    assert_eq!(job.spec.secret_env["TOKEN"].expose(), "<redacted>", "the live job holds the names only");
    let sealed = job.sub.secret_env_sealed.clone().expect("sealed");
    assert!(sealed.starts_with("aes256gcm:k1:") && !job.sub.spec_json.contains("tok-3141592"), "{:?}", job.sub);
    let out = step(&mut core, &mut writer, vec![connect("a", 1)]).await;
    let Some(AgentMessage::Assign(a)) = out.messages.last().map(|(_, m)| m) else { panic!("{:?}", out.messages) };
    assert_eq!((a.env["TOKEN"].as_str(), a.env["PLAIN"].as_str()), ("tok-3141592", "p"));
    let (_, reader) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    let stored = reader.job(&id).await.unwrap().unwrap();
    assert_eq!(stored.submission.secret_env_sealed.as_deref(), Some(sealed.as_str()));
    assert!(!format!("{stored:?}").contains("tok-3141592"));
}

#[tokio::test]
async fn a_key_id_gone_from_the_key_file_fails_the_attempt_and_the_job_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let (mut core1, mut writer) = load(&dir, K1).await;
    // One job leased before the restart (its assignment is sent again at reconnect), one queued.
    let leased = submit(&mut core1, &mut writer, SECRET_JOB).await;
    step(&mut core1, &mut writer, vec![connect("a", 1)]).await;
    assert_eq!(core1.jobs[&leased].life.state, JobState::Leased);
    // The agent shrinks to the one CPU the leased job holds: the next job waits.
    let shrunk = Cmd::Heartbeat {
        agent: "lab/a".into(),
        conn: 1,
        inventory: Some(Inventory { cpus: 1, memory_mib: 65536, ..Default::default() }),
    };
    let (queued_cmd, rx) = submit_cmd(SECRET_JOB, None);
    step(&mut core1, &mut writer, vec![shrunk, queued_cmd]).await;
    let queued = super::tests::reply(rx).unwrap().0;
    assert_eq!(core1.jobs[&queued].life.state, JobState::Queued);
    drop((core1, writer));

    // Restarted with a key file that lost k1.
    let (mut core2, mut writer) = load(&dir, K2).await;
    let out = step(&mut core2, &mut writer, vec![connect("a", 2)]).await;
    assert!(
        !out.messages.iter().any(|(_, m)| matches!(m, AgentMessage::Assign(_))),
        "nothing is sent without its secrets"
    );
    let (_, reader) = crate::store::open(&dir.path().join("store.db")).await.unwrap();
    for id in [leased, queued] {
        let job = reader.job(&id).await.unwrap().unwrap();
        assert_eq!(job.status.state, JobState::Failed, "{job:?}");
        assert!(job.status.reason.contains("failed: secret key k1 not found"), "{}", job.status.reason);
    }
    assert!(core2.agents["lab/a"].free().cpus == 8, "the failed attempts hold nothing");
}

/// Invariant 6 through the driver: a batch whose commit fails releases none of its effects. The
/// submitter gets no acknowledgement, the agent neither its registration nor the assignment,
/// watchers no event; the driver stops with the store's error (crash-only).
#[tokio::test]
async fn a_batch_whose_commit_fails_releases_nothing() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (writer, _reader) = crate::store::open(&path).await.unwrap();
    let (events, mut watcher) = tokio::sync::broadcast::channel(16);
    let driver = driver::Driver::load(writer, settings(K1), events).await.unwrap();
    // Every insert of a job now fails inside the batch's transaction.
    let mut sql = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    sqlx::raw_sql("CREATE TRIGGER refuse BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        .execute(&mut sql)
        .await
        .unwrap();
    sql.close().await.unwrap();

    let (outbox, mut agent) = tokio::sync::mpsc::channel(16);
    let connected = Cmd::Connected {
        cert_not_after: 0,
        agent: "lab/n1".into(),
        site: "lab".into(),
        node: "n1".into(),
        inventory: Inventory { cpus: 8, memory_mib: 65536, ..Default::default() },
        attempts: vec![],
        conn: Conn { id: 1, outbox },
    };
    let (submit, answer) = submit_cmd("name: x\ncommand: [\"true\"]\nresources: {cpus: 1, memory_gib: 1}\n", None);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(connected).await.unwrap();
    tx.send(submit).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), driver.run(rx)).await.expect("the driver stops");
    let err = stopped.expect_err("the commit fails");
    assert!(err.to_string().contains("refused by the test"), "{err}");
    assert!(answer.await.is_err(), "the submit was acknowledged although its commit failed");
    assert!(agent.try_recv().is_err(), "the agent got a message of an uncommitted batch");
    assert!(watcher.try_recv().is_err(), "a watcher saw an event of an uncommitted batch");
    drop(tx);
}
