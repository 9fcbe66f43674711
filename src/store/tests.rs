use super::*;
use crate::model::state::JobState;

fn job(id: &str) -> JobRecord {
    let submission = JobSubmission {
        id: id.into(),
        tenant: "acme".into(),
        name: "n".into(),
        spec_json: "{}".into(),
        priority: 50,
        max_attempts: 3,
        idempotency_key: Some(format!("key-{id}")),
        request_sha256: Some("h".into()),
        data_json: None,
        trace_context: Some("{\"traceparent\":\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}".into()),
        secret_env_sealed: Some("aes256gcm:k1:bm9uY2UtY2lwaGVydGV4dA==".into()),
        created_at: 1,
    };
    let status = JobStatus {
        state: JobState::Queued,
        attempts: 0,
        preemptions: 0,
        epoch: 0,
        site: None,
        agent: None,
        exit_code: None,
        reason: String::new(),
        placement_json: None,
        updated_at: 1,
    };
    JobRecord { submission, status }
}

/// The write that inserts `j`.
fn new_job(j: JobRecord) -> Write {
    Write::NewJob { job: std::sync::Arc::new(j.submission), status: j.status }
}

/// The write that updates `j`'s status.
fn update_job(j: JobRecord) -> Write {
    Write::UpdateJob { id: j.submission.id, status: j.status }
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
    batch.push(new_job(job("a")));
    batch.push(event(1, "a", JobState::Queued));
    let mut done = job("b");
    batch.push(new_job(done.clone()));
    done.status.state = JobState::Succeeded;
    batch.push(update_job(done));
    batch.push(event(2, "b", JobState::Succeeded));
    writer.commit(&batch).await.unwrap();

    // A failing batch leaves nothing behind: the second insert of "a" violates the primary key.
    let mut bad = Batch::default();
    bad.push(new_job(job("c")));
    bad.push(new_job(job("a")));
    assert!(writer.commit(&bad).await.is_err());
    assert!(reader.job("c").await.unwrap().is_none());
    drop((writer, reader));

    let (mut writer, reader) = open(&path).await.unwrap();
    let active: Vec<String> = writer.load_active().await.unwrap().into_iter().map(|j| j.submission.id).collect();
    assert_eq!(active, ["a"]);
    let sealed = reader.job("a").await.unwrap().unwrap().submission.secret_env_sealed;
    assert_eq!(sealed, job("a").submission.secret_env_sealed, "sealed secrets survive reopening");
    assert_eq!(writer.last_event_seq().await.unwrap(), 2);
    let keys =
        [("acme".to_string(), "key-a".to_string()), ("acme".into(), "nope".into()), ("other".into(), "key-b".into())];
    let found = writer.find_idempotent(&keys).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[&keys[0]], ("a".to_string(), Some("h".to_string())));
    assert_eq!(reader.events("b", 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_database_its_wal_and_shm_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/store.db");
    let (mut writer, reader) = open(&path).await.unwrap();
    let mut batch = Batch::default();
    batch.push(new_job(job("a")));
    writer.commit(&batch).await.unwrap();
    assert!(reader.job("a").await.unwrap().is_some());
    assert_eq!(mode(&dir.path().join("state")), 0o700, "a directory the store makes is private");
    let files = super::sqlite::store_files(&path);
    for file in &files {
        assert!(file.exists(), "{} exists while the store is open", file.display());
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    drop((writer, reader));

    // A store left world-readable (an older broker, a copy) is narrowed when it is opened.
    for file in &files {
        if file.exists() {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let (_writer, _reader) = open(&path).await.unwrap();
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
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

/// Today's statement-per-write commit, kept verbatim as the reference the folded commit must match.
mod reference {
    use sqlx::{Connection, SqliteConnection};

    use super::super::{Batch, Write};

    pub async fn commit(conn: &mut SqliteConnection, batch: &Batch) -> Result<(), sqlx::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = conn.begin().await?;
        for write in &batch.writes {
            match write {
                Write::NewJob { job: j, status: u } => {
                    sqlx::query(
                        "INSERT INTO jobs (id, tenant, name, state, spec_json, priority, attempts, max_attempts, \
                         epoch, site, agent, exit_code, reason, idempotency_key, request_sha256, data_json, \
                         placement_json, trace_context, secret_env_sealed, created_at_ms, updated_at_ms, preemptions) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&j.id)
                    .bind(&j.tenant)
                    .bind(&j.name)
                    .bind(u.state.as_str())
                    .bind(&j.spec_json)
                    .bind(j.priority)
                    .bind(u.attempts)
                    .bind(j.max_attempts)
                    .bind(u.epoch as i64)
                    .bind(&u.site)
                    .bind(&u.agent)
                    .bind(u.exit_code)
                    .bind(&u.reason)
                    .bind(&j.idempotency_key)
                    .bind(&j.request_sha256)
                    .bind(&j.data_json)
                    .bind(u.placement_json.as_deref())
                    .bind(&j.trace_context)
                    .bind(&j.secret_env_sealed)
                    .bind(j.created_at)
                    .bind(u.updated_at)
                    .bind(u.preemptions)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::UpdateJob { id, status: j } => {
                    sqlx::query(
                        "UPDATE jobs SET state = ?, attempts = ?, epoch = ?, site = ?, agent = ?, exit_code = ?, \
                         reason = ?, placement_json = ?, updated_at_ms = ?, preemptions = ? WHERE id = ?",
                    )
                    .bind(j.state.as_str())
                    .bind(j.attempts)
                    .bind(j.epoch as i64)
                    .bind(&j.site)
                    .bind(&j.agent)
                    .bind(j.exit_code)
                    .bind(&j.reason)
                    .bind(j.placement_json.as_deref())
                    .bind(j.updated_at)
                    .bind(j.preemptions)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::Event(e) => {
                    sqlx::query(
                        "INSERT INTO job_events (seq, job_id, state, attempt, agent, reason, exit_code, at_ms) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(e.seq as i64)
                    .bind(&e.job_id)
                    .bind(e.state.as_str())
                    .bind(e.attempt)
                    .bind(&e.agent)
                    .bind(&e.reason)
                    .bind(e.exit_code)
                    .bind(e.at)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::NewAttempt(a) => {
                    let gpus = a.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                    sqlx::query(
                        "INSERT INTO attempts (job_id, attempt, epoch, agent, gpu_indices, state, started_at_ms) \
                         VALUES (?, ?, ?, ?, ?, 'leased', ?)",
                    )
                    .bind(&a.job_id)
                    .bind(a.attempt)
                    .bind(a.epoch as i64)
                    .bind(&a.agent)
                    .bind(gpus)
                    .bind(a.started_at)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::EndAttempt(a) => {
                    sqlx::query(
                        "UPDATE attempts SET state = ?, exit_code = ?, reason = ?, output = ?, output_truncated = ?, \
                         output_bytes = ?, staging_json = ?, cost_usd = ?, ended_at_ms = ? WHERE job_id = ? AND attempt = ?",
                    )
                    .bind(a.state.as_str())
                    .bind(a.exit_code)
                    .bind(&a.reason)
                    .bind(&a.output)
                    .bind(a.output_truncated)
                    .bind(a.output_bytes as i64)
                    .bind(&a.staging_json)
                    .bind(a.cost_usd)
                    .bind(a.ended_at)
                    .bind(&a.job_id)
                    .bind(a.attempt)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::Agent(a) => {
                    sqlx::query(
                        "INSERT INTO agents (id, site, node, inventory_json, last_seen_ms, draining, cert_not_after_ms) \
                         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET inventory_json = \
                         excluded.inventory_json, last_seen_ms = excluded.last_seen_ms, \
                         cert_not_after_ms = excluded.cert_not_after_ms",
                    )
                    .bind(&a.id)
                    .bind(&a.site)
                    .bind(&a.node)
                    .bind(&a.inventory_json)
                    .bind(a.last_seen)
                    .bind(a.draining)
                    .bind(a.cert_not_after)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::RemoveAgent { id } => {
                    sqlx::query("DELETE FROM agents WHERE id = ?").bind(id).execute(&mut *tx).await?;
                }
                Write::AgentDraining { id, draining } => {
                    sqlx::query("UPDATE agents SET draining = ? WHERE id = ?")
                        .bind(draining)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                Write::NewKey(k) => {
                    sqlx::query(
                        "INSERT INTO api_keys (key_id, tenant, secret_sha256, created_at_ms, last_used_ms, revoked_at_ms) \
                         VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&k.key_id)
                    .bind(&k.tenant)
                    .bind(&k.secret_sha256)
                    .bind(k.created_at)
                    .bind(k.last_used)
                    .bind(k.revoked_at)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::RevokeKey { key_id, at } => {
                    sqlx::query("UPDATE api_keys SET revoked_at_ms = ? WHERE key_id = ?")
                        .bind(at)
                        .bind(key_id)
                        .execute(&mut *tx)
                        .await?;
                }
                Write::KeyUsed { key_id, at } => {
                    sqlx::query("UPDATE api_keys SET last_used_ms = MAX(last_used_ms, ?) WHERE key_id = ?")
                        .bind(at)
                        .bind(key_id)
                        .execute(&mut *tx)
                        .await?;
                }
                // Not folded: the store writes these one by one too.
                Write::Identity(w) => super::sqlite::write_identity(&mut tx, w).await?,
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Every row of every table, rowid included, each value as SQLite's `quote()` writes it (so that
/// types tell apart: `NULL`, `''`, `X''`, `0`).
async fn dump(conn: &mut sqlx::SqliteConnection) -> Vec<(String, Vec<Vec<String>>)> {
    use sqlx::Row;
    let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for table in tables {
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?) ORDER BY cid")
            .bind(&table)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let select = columns.iter().map(|c| format!("quote(\"{c}\")")).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT quote(rowid), {select} FROM \"{table}\" ORDER BY rowid");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await.unwrap();
        let rows = rows.iter().map(|r| (0..=columns.len()).map(|i| r.get::<String, _>(i)).collect()).collect();
        out.push((table, rows));
    }
    out
}

/// Two fresh stores: one written by the reference, one by [`Writer::commit`].
struct Pair {
    _dir: tempfile::TempDir,
    reference: Writer,
    folded: Writer,
}

impl Pair {
    async fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (reference, _) = open(&dir.path().join("reference.db")).await.unwrap();
        let (folded, _) = open(&dir.path().join("folded.db")).await.unwrap();
        Pair { _dir: dir, reference, folded }
    }

    /// Commits the batch to both; returns whether it committed, after checking both agree.
    async fn commit(&mut self, batch: &Batch) -> Result<bool, String> {
        let want = reference::commit(self.reference.conn(), batch).await;
        let got = self.folded.commit(batch).await;
        if want.is_ok() != got.is_ok() {
            return Err(format!("reference: {want:?}, folded: {got:?}\nbatch: {batch:#?}"));
        }
        let (want_rows, got_rows) = (dump(self.reference.conn()).await, dump(self.folded.conn()).await);
        if want_rows != got_rows {
            return Err(format!(
                "tables differ after {}:\nreference: {want_rows:#?}\nfolded: {got_rows:#?}\nbatch: {batch:#?}",
                if want.is_ok() { "a commit" } else { "a failed commit" }
            ));
        }
        Ok(want.is_ok())
    }
}

/// Builds random batches that are mostly valid (the writes the broker makes, in any order, plus
/// writes of rows that do not exist), and now and then one that must fail.
mod model {
    use std::collections::HashMap;

    use super::super::*;
    use crate::model::state::JobState;

    /// What the store holds (as far as the batches so far go).
    #[derive(Clone, Default)]
    pub struct Model {
        jobs: Vec<String>,
        next_job: u32,
        attempts: Vec<(String, u32)>,
        next_attempt: HashMap<String, u32>,
        seq: u64,
        keys: Vec<String>,
        next_key: u32,
    }

    pub const KINDS: u8 = 100;

    fn pick<'a>(rng: &mut fastrand::Rng, from: &'a [String]) -> Option<&'a String> {
        (!from.is_empty()).then(|| &from[rng.usize(..from.len())])
    }

    fn opt<T>(rng: &mut fastrand::Rng, f: impl FnOnce(&mut fastrand::Rng) -> T) -> Option<T> {
        rng.bool().then(|| f(rng))
    }

    fn text(rng: &mut fastrand::Rng) -> String {
        ["", "r", "placed at site a", "ünïcode", "x'); DROP TABLE jobs; --"][rng.usize(..5)].to_string()
    }

    fn state(rng: &mut fastrand::Rng) -> JobState {
        JobState::ALL[rng.usize(..JobState::ALL.len())]
    }

    fn millis(rng: &mut fastrand::Rng) -> UnixMillis {
        [0, 1, 1_700_000_000_000, i64::MAX, -5][rng.usize(..5)]
    }

    fn submission(rng: &mut fastrand::Rng, id: String) -> JobSubmission {
        JobSubmission {
            idempotency_key: rng.bool().then(|| format!("idem-{id}")),
            id,
            tenant: ["acme", "beta"][rng.usize(..2)].into(),
            name: text(rng),
            spec_json: ["{}", "{\"labels\":{\"a\":\"b\"}}"][rng.usize(..2)].into(),
            priority: rng.u32(..100),
            max_attempts: rng.u32(1..4),
            request_sha256: opt(rng, text),
            data_json: opt(rng, text),
            trace_context: opt(rng, text),
            secret_env_sealed: opt(rng, text),
            created_at: millis(rng),
        }
    }

    fn status(rng: &mut fastrand::Rng) -> JobStatus {
        JobStatus {
            state: state(rng),
            attempts: rng.u32(..4),
            preemptions: rng.u32(..3),
            epoch: [0, 1, 7, u64::MAX][rng.usize(..4)],
            site: opt(rng, text),
            agent: opt(rng, text),
            exit_code: opt(rng, |r| [0, 1, -9, i32::MAX][r.usize(..4)]),
            reason: text(rng),
            placement_json: opt(rng, |r| text(r).into()),
            updated_at: millis(rng),
        }
    }

    fn end(rng: &mut fastrand::Rng, job_id: String, attempt: u32) -> AttemptEnd {
        AttemptEnd {
            job_id,
            attempt,
            state: state(rng),
            exit_code: opt(rng, |r| [0, 1, -9][r.usize(..3)]),
            reason: text(rng),
            output: [&b""[..], b"out", b"\0\xff"][rng.usize(..3)].to_vec(),
            output_truncated: rng.bool(),
            output_bytes: [0, 3, u64::MAX][rng.usize(..3)],
            staging_json: opt(rng, text),
            cost_usd: opt(rng, |r| [0.0, 1.5, 1e9][r.usize(..3)]),
            ended_at: millis(rng),
        }
    }

    impl Model {
        /// Turns (kind, seed) pairs into a batch of writes against what the model holds.
        pub fn batch(&mut self, ops: &[(u8, u64)]) -> Batch {
            let mut batch = Batch::default();
            for &(kind, seed) in ops {
                let rng = &mut fastrand::Rng::with_seed(seed);
                // About one write in 64 is one that fails the batch.
                let bad = rng.u8(..64) == 0;
                let write = match kind {
                    0..20 => {
                        let id = match pick(rng, &self.jobs).filter(|_| bad) {
                            Some(id) => id.clone(),
                            None => {
                                self.next_job += 1;
                                let id = format!("job-{}", self.next_job);
                                self.jobs.push(id.clone());
                                id
                            }
                        };
                        let job = std::sync::Arc::new(submission(rng, id));
                        Write::NewJob { job, status: status(rng) }
                    }
                    20..45 => {
                        let id = match rng.u8(..8) {
                            0 => format!("ghost-{}", rng.u8(..3)),
                            1 => format!("job-{}", self.next_job + 1),
                            _ => pick(rng, &self.jobs).cloned().unwrap_or_else(|| "ghost-0".into()),
                        };
                        Write::UpdateJob { id, status: status(rng) }
                    }
                    45..65 => {
                        self.seq += 1;
                        let seq = if bad && self.seq > 1 { self.seq - 1 } else { self.seq };
                        Write::Event(JobEvent {
                            seq,
                            job_id: pick(rng, &self.jobs).cloned().unwrap_or_default(),
                            state: state(rng),
                            attempt: rng.u32(..4),
                            agent: opt(rng, text),
                            reason: text(rng),
                            exit_code: opt(rng, |r| r.i32(-2..2)),
                            at: millis(rng),
                        })
                    }
                    65..75 => {
                        let (job_id, attempt) = if bad {
                            match rng.u8(..3) {
                                0 => (format!("job-{}", self.next_job + 1), 1),
                                1 => ("ghost-9".into(), 1),
                                _ => self.attempts.first().cloned().unwrap_or(("ghost-8".into(), 1)),
                            }
                        } else {
                            let Some(job_id) = pick(rng, &self.jobs).cloned() else { continue };
                            let n = self.next_attempt.entry(job_id.clone()).or_default();
                            *n += 1;
                            self.attempts.push((job_id.clone(), *n));
                            (job_id, *n)
                        };
                        Write::NewAttempt(AttemptRecord {
                            job_id,
                            attempt,
                            epoch: [0, 3, u64::MAX][rng.usize(..3)],
                            agent: text(rng),
                            gpu_indices: (0..rng.u32(..3)).collect(),
                            started_at: millis(rng),
                        })
                    }
                    75..85 => {
                        let (job_id, attempt) = match rng.u8(..6) {
                            0 => ("ghost-1".into(), 1),
                            1 => match pick(rng, &self.jobs) {
                                Some(id) => (id.clone(), self.next_attempt.get(id).copied().unwrap_or(0) + 1),
                                None => ("ghost-2".into(), 2),
                            },
                            _ if !self.attempts.is_empty() => self.attempts[rng.usize(..self.attempts.len())].clone(),
                            _ => ("ghost-3".into(), 1),
                        };
                        Write::EndAttempt(end(rng, job_id, attempt))
                    }
                    85..90 => Write::Agent(AgentRecord {
                        id: format!("agent-{}", rng.u8(..4)),
                        site: text(rng),
                        node: text(rng),
                        inventory_json: text(rng),
                        last_seen: millis(rng),
                        draining: rng.bool(),
                        cert_not_after: millis(rng),
                    }),
                    90..92 => Write::AgentDraining { id: format!("agent-{}", rng.u8(..5)), draining: rng.bool() },
                    92..93 => Write::RemoveAgent { id: format!("agent-{}", rng.u8(..5)) },
                    93..95 => {
                        let key_id = match pick(rng, &self.keys).filter(|_| bad) {
                            Some(id) => id.clone(),
                            None => {
                                self.next_key += 1;
                                let id = format!("key-{}", self.next_key);
                                self.keys.push(id.clone());
                                id
                            }
                        };
                        Write::NewKey(KeyRecord {
                            key_id,
                            tenant: "acme".into(),
                            secret_sha256: text(rng),
                            created_at: millis(rng),
                            last_used: millis(rng),
                            revoked_at: opt(rng, millis),
                        })
                    }
                    _ => {
                        let key_id = match rng.u8(..4) {
                            0 => "key-ghost".into(),
                            1 => format!("key-{}", self.next_key + 1),
                            _ => pick(rng, &self.keys).cloned().unwrap_or_else(|| "key-ghost".into()),
                        };
                        let at = [0, 5, 1_700_000_000_000, -1][rng.usize(..4)];
                        if kind < 97 { Write::RevokeKey { key_id, at } } else { Write::KeyUsed { key_id, at } }
                    }
                };
                batch.push(write);
            }
            batch
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Random sequences of batches leave both stores with identical tables, row for row, and fail
    /// exactly when writing statement by statement fails.
    #[test]
    fn folded_commit_matches_writing_statement_by_statement(
        batches in proptest::collection::vec(
            proptest::collection::vec((0..model::KINDS, proptest::prelude::any::<u64>()), 0..40),
            1..6,
        )
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result: Result<(), String> = rt.block_on(async {
            let mut pair = Pair::new().await;
            let mut model = model::Model::default();
            for ops in &batches {
                let before = model.clone();
                let batch = model.batch(ops);
                if !pair.commit(&batch).await? {
                    model = before;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            return Err(proptest::test_runner::TestCaseError::fail(e));
        }
    }
}

/// A job's whole life as the broker writes it: submit and lease (`stage` 0), run and succeed (1).
fn life(i: u64, stage: u8, out: &mut Batch) {
    let id = format!("0190f5c8-7d3a-7c41-9a6b-{i:012}");
    let mut rec = job(&id);
    rec.submission.spec_json = format!(
        "{{\"name\":\"bench-{i}\",\"command\":[\"/bin/true\"],\"resources\":{{\"cpus\":1,\"memory_gib\":1,\"gpus\":0}},\"labels\":{{\"team\":\"bench\"}}}}"
    );
    rec.submission.idempotency_key = None;
    rec.submission.request_sha256 = Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into());
    let seq = i * 5;
    let ev = |seq: u64, rec: &JobRecord| {
        Write::Event(JobEvent {
            seq,
            job_id: rec.submission.id.clone(),
            state: rec.status.state,
            attempt: rec.status.attempts,
            agent: rec.status.agent.clone(),
            reason: rec.status.reason.clone(),
            exit_code: rec.status.exit_code,
            at: rec.status.updated_at,
        })
    };
    let agent = format!("agent-{}", i % 1000);
    if stage == 0 {
        rec.status.reason = "submitted".into();
        out.push(new_job(rec.clone()));
        out.push(ev(seq + 1, &rec));
        rec.status.state = JobState::Placed;
        rec.status.site = Some("onprem".into());
        rec.status.reason = "placed at site onprem (first fit)".into();
        out.push(update_job(rec.clone()));
        out.push(ev(seq + 2, &rec));
        rec.status.attempts = 1;
        rec.status.epoch = 1;
        rec.status.agent = Some(agent.clone());
        out.push(Write::NewAttempt(AttemptRecord {
            job_id: id.clone(),
            attempt: 1,
            epoch: 1,
            agent: agent.clone(),
            gpu_indices: vec![],
            started_at: 2,
        }));
        rec.status.state = JobState::Leased;
        rec.status.reason = format!("attempt 1 leased to {agent} (gpus [])");
        out.push(update_job(rec.clone()));
        out.push(ev(seq + 3, &rec));
    } else {
        (rec.status.attempts, rec.status.epoch, rec.status.site, rec.status.agent) =
            (1, 1, Some("onprem".into()), Some(agent));
        rec.status.state = JobState::Running;
        rec.status.reason = "running".into();
        out.push(update_job(rec.clone()));
        out.push(ev(seq + 4, &rec));
        out.push(Write::EndAttempt(AttemptEnd {
            job_id: id.clone(),
            attempt: 1,
            state: JobState::Succeeded,
            exit_code: Some(0),
            reason: "exited 0".into(),
            output: b"hello\n".to_vec(),
            output_truncated: false,
            output_bytes: 6,
            staging_json: None,
            cost_usd: None,
            ended_at: 3,
        }));
        rec.status.state = JobState::Succeeded;
        rec.status.exit_code = Some(0);
        rec.status.reason = "exited 0".into();
        out.push(update_job(rec.clone()));
        out.push(ev(seq + 5, &rec));
    }
}

/// Batches of `per_batch` jobs each: `whole` gives each job's whole life in one batch; otherwise
/// each batch submits and leases its jobs and finishes the previous batch's (as under load).
fn lifecycles(jobs: u64, per_batch: u64, whole: bool) -> Vec<Batch> {
    let chunks = jobs.div_ceil(per_batch);
    let mut batches = Vec::new();
    for c in 0..=chunks {
        let mut batch = Batch::default();
        let range = |c: u64| c * per_batch..((c + 1) * per_batch).min(jobs);
        if whole {
            if c == chunks {
                break;
            }
            for i in range(c) {
                life(i, 0, &mut batch);
                life(i, 1, &mut batch);
            }
        } else {
            if c < chunks {
                range(c).for_each(|i| life(i, 0, &mut batch));
            }
            if c > 0 {
                range(c - 1).for_each(|i| life(i, 1, &mut batch));
            }
        }
        batches.push(batch);
    }
    batches
}

#[tokio::test]
async fn large_batches_span_many_statements_and_still_match() {
    let mut pair = Pair::new().await;
    // 700 jobs a batch: several chunk sizes, with their last values folded across chunk edges.
    for batch in lifecycles(1400, 700, false) {
        assert!(pair.commit(&batch).await.unwrap());
    }
    for batch in lifecycles(300, 300, true).iter().map(|b| {
        // The same jobs again, under new ids, whole lives at once.
        let writes = b.writes.iter().cloned().map(|w| match w {
            Write::NewJob { job, status } => {
                let mut job = (*job).clone();
                job.id.push('w');
                Write::NewJob { job: std::sync::Arc::new(job), status }
            }
            Write::UpdateJob { mut id, status } => {
                id.push('w');
                Write::UpdateJob { id, status }
            }
            Write::NewAttempt(mut a) => {
                a.job_id.push('w');
                Write::NewAttempt(a)
            }
            Write::EndAttempt(mut a) => {
                a.job_id.push('w');
                Write::EndAttempt(a)
            }
            Write::Event(mut e) => {
                e.seq += 1_000_000;
                Write::Event(e)
            }
            w => w,
        });
        Batch { writes: writes.collect() }
    }) {
        assert!(pair.commit(&batch).await.unwrap());
    }
}

#[tokio::test]
async fn updates_of_missing_rows_create_nothing() {
    let mut pair = Pair::new().await;
    let mut ghost = job("ghost");
    ghost.status.state = JobState::Running;
    let batch = Batch {
        writes: vec![
            update_job(ghost),
            Write::EndAttempt(AttemptEnd {
                job_id: "ghost".into(),
                attempt: 1,
                state: JobState::Failed,
                exit_code: None,
                reason: String::new(),
                output: vec![],
                output_truncated: false,
                output_bytes: 0,
                staging_json: None,
                cost_usd: None,
                ended_at: 1,
            }),
            Write::AgentDraining { id: "nobody".into(), draining: true },
            Write::RevokeKey { key_id: "nokey".into(), at: 1 },
            Write::KeyUsed { key_id: "nokey".into(), at: 1 },
        ],
    };
    assert!(pair.commit(&batch).await.unwrap());
    let tables = dump(pair.folded.conn()).await;
    assert!(tables.iter().all(|(_, rows)| rows.is_empty()), "{tables:?}");
}

#[tokio::test]
async fn an_attempt_before_its_jobs_creation_fails_the_batch() {
    let mut pair = Pair::new().await;
    let attempt = Write::NewAttempt(AttemptRecord {
        job_id: "a".into(),
        attempt: 1,
        epoch: 1,
        agent: "x".into(),
        gpu_indices: vec![0, 1],
        started_at: 1,
    });
    let batch = Batch { writes: vec![attempt.clone(), new_job(job("a"))] };
    assert!(!pair.commit(&batch).await.unwrap());
    // With the job committed first, the same attempt is fine.
    assert!(pair.commit(&Batch { writes: vec![new_job(job("a"))] }).await.unwrap());
    assert!(pair.commit(&Batch { writes: vec![attempt.clone()] }).await.unwrap());
    // And so is creating it again then: it fails, as the job's second NewJob does.
    assert!(!pair.commit(&Batch { writes: vec![attempt, new_job(job("a"))] }).await.unwrap());
}

#[tokio::test]
async fn batch_updates_use_the_primary_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, _) = open(&dir.path().join("plan.db")).await.unwrap();
    for sql in [
        "EXPLAIN QUERY PLAN UPDATE jobs SET state = v.column2 FROM (VALUES (?, ?), (?, ?)) AS v \
         WHERE jobs.id = v.column1",
        "EXPLAIN QUERY PLAN UPDATE attempts SET state = v.column3 FROM (VALUES (?, ?, ?), (?, ?, ?)) AS v \
         WHERE attempts.job_id = v.column1 AND attempts.attempt = v.column2",
    ] {
        use sqlx::Row;
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(writer.conn()).await.unwrap();
        let plan = rows.iter().map(|r| r.get::<String, _>("detail")).collect::<Vec<_>>().join("\n");
        assert!(plan.contains("SEARCH") && !plan.contains("SCAN jobs") && !plan.contains("SCAN attempts"), "{plan}");
    }
}

/// Commits 100,000 jobs' lives in batches of 1,000 jobs, by statement and folded, and prints jobs/s.
/// `cargo test --release --lib store::tests::bench_commit -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it by hand, in release"]
async fn bench_commit() {
    let jobs: u64 = std::env::var("BENCH_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    for whole in [false, true] {
        let batches = lifecycles(jobs, 1000, whole);
        let writes: usize = batches.iter().map(|b| b.writes.len()).sum();
        for folded in [false, true] {
            let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
            let (mut writer, _) = open(&dir.path().join("bench.db")).await.unwrap();
            let start = std::time::Instant::now();
            for batch in &batches {
                if folded {
                    writer.commit(batch).await.unwrap();
                } else {
                    reference::commit(writer.conn(), batch).await.unwrap();
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{:<9} {:<13} {jobs} jobs, {} commits, {writes} writes: {secs:.2} s, {:.0} jobs/s",
                if folded { "folded" } else { "statement" },
                if whole { "whole lives" } else { "pipelined" },
                batches.len(),
                jobs as f64 / secs,
            );
        }
    }
}
