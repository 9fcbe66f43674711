use super::*;
use crate::model::state::JobState;

fn job(id: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: "acme".into(),
        name: "n".into(),
        state: JobState::Queued,
        spec_json: "{}".into(),
        priority: 50,
        attempts: 0,
        max_attempts: 3,
        epoch: 0,
        site: None,
        agent: None,
        exit_code: None,
        reason: String::new(),
        idempotency_key: Some(format!("key-{id}")),
        request_sha256: Some("h".into()),
        created_at: 1,
        updated_at: 1,
    }
}

fn event(seq: u64, id: &str, state: JobState) -> Write {
    Write::Event(JobEvent {
        seq,
        job_id: id.into(),
        state,
        attempt: 0,
        agent: None,
        reason: String::new(),
        exit_code: None,
        at: 1,
    })
}

#[tokio::test]
async fn batches_commit_atomically_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (mut writer, reader) = open(&path).await.unwrap();
    let mut batch = Batch::default();
    batch.push(Write::NewJob(job("a")));
    batch.push(event(1, "a", JobState::Queued));
    let mut done = job("b");
    batch.push(Write::NewJob(done.clone()));
    done.state = JobState::Succeeded;
    batch.push(Write::UpdateJob(done));
    batch.push(event(2, "b", JobState::Succeeded));
    writer.commit(&batch).await.unwrap();

    // A failing batch leaves nothing behind: the second insert of "a" violates the primary key.
    let mut bad = Batch::default();
    bad.push(Write::NewJob(job("c")));
    bad.push(Write::NewJob(job("a")));
    assert!(writer.commit(&bad).await.is_err());
    assert!(reader.job("c").await.unwrap().is_none());
    drop((writer, reader));

    let (mut writer, reader) = open(&path).await.unwrap();
    let active: Vec<String> = writer.load_active().await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(active, ["a"]);
    assert_eq!(writer.last_event_seq().await.unwrap(), 2);
    assert_eq!(writer.find_idempotent("acme", "key-a").await.unwrap().map(|(_, h)| h), Some(Some("h".into())));
    assert_eq!(reader.events("b", 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_store_from_a_newer_broker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (mut writer, _) = open(&path).await.unwrap();
    writer.commit(&Batch::default()).await.unwrap();
    drop(writer);
    {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
        sqlx::raw_sql("PRAGMA user_version = 99").execute(&mut c).await.unwrap();
    }
    let err = open(&path).await.err().expect("refused").to_string();
    assert!(err.contains("newer"), "{err}");
}
