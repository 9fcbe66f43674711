//! The SQLite implementation of the job store.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection, SqlitePool};

use super::schema::MIGRATIONS;
use super::{AgentRecord, AttemptOutput, Batch, JobEvent, JobFilter, JobRecord, KeyRecord, StoreError, Write};
use crate::model::state::JobState;

const JOB_COLUMNS: &str = "id, tenant, name, state, spec_json, priority, attempts, max_attempts, epoch, \
     site, agent, exit_code, reason, idempotency_key, request_sha256, created_at_ms, updated_at_ms";

/// Opens (creating and migrating if needed) the store at `path`.
pub async fn open(path: &Path) -> Result<(Writer, Reader), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    migrate(&mut conn).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.read_only(true))
        .await
        .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    Ok((Writer { conn }, Reader { pool }))
}

async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *conn).await?;
    let version = usize::try_from(version).map_err(|_| StoreError::Corrupt("negative schema version".into()))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is newer than this broker knows ({}); upgrade the broker",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(AssertSqlSafe(*sql)).execute(&mut *tx).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("PRAGMA user_version = {}", i + 1))).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// The single write connection. Owned by the broker core; every write goes through [`Writer::commit`].
pub struct Writer {
    conn: SqliteConnection,
}

impl Writer {
    /// Commits every write of the batch in one transaction; nothing of it is visible before.
    pub async fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.conn.begin().await?;
        for write in &batch.writes {
            match write {
                Write::NewJob(j) => {
                    sqlx::query(
                        "INSERT INTO jobs (id, tenant, name, state, spec_json, priority, attempts, max_attempts, \
                         epoch, site, agent, exit_code, reason, idempotency_key, request_sha256, created_at_ms, \
                         updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&j.id)
                    .bind(&j.tenant)
                    .bind(&j.name)
                    .bind(j.state.as_str())
                    .bind(&j.spec_json)
                    .bind(j.priority)
                    .bind(j.attempts)
                    .bind(j.max_attempts)
                    .bind(j.epoch as i64)
                    .bind(&j.site)
                    .bind(&j.agent)
                    .bind(j.exit_code)
                    .bind(&j.reason)
                    .bind(&j.idempotency_key)
                    .bind(&j.request_sha256)
                    .bind(j.created_at)
                    .bind(j.updated_at)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::UpdateJob(j) => {
                    sqlx::query(
                        "UPDATE jobs SET state = ?, attempts = ?, epoch = ?, site = ?, agent = ?, exit_code = ?, \
                         reason = ?, updated_at_ms = ? WHERE id = ?",
                    )
                    .bind(j.state.as_str())
                    .bind(j.attempts)
                    .bind(j.epoch as i64)
                    .bind(&j.site)
                    .bind(&j.agent)
                    .bind(j.exit_code)
                    .bind(&j.reason)
                    .bind(j.updated_at)
                    .bind(&j.id)
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
                         output_bytes = ?, ended_at_ms = ? WHERE job_id = ? AND attempt = ?",
                    )
                    .bind(a.state.as_str())
                    .bind(a.exit_code)
                    .bind(&a.reason)
                    .bind(&a.output)
                    .bind(a.output_truncated)
                    .bind(a.output_bytes as i64)
                    .bind(a.ended_at)
                    .bind(&a.job_id)
                    .bind(a.attempt)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::Agent(a) => {
                    sqlx::query(
                        "INSERT INTO agents (id, site, node, inventory_json, last_seen_ms, draining) VALUES (?, ?, ?, ?, ?, ?) \
                         ON CONFLICT (id) DO UPDATE SET inventory_json = excluded.inventory_json, \
                         last_seen_ms = excluded.last_seen_ms",
                    )
                    .bind(&a.id)
                    .bind(&a.site)
                    .bind(&a.node)
                    .bind(&a.inventory_json)
                    .bind(a.last_seen)
                    .bind(a.draining)
                    .execute(&mut *tx)
                    .await?;
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
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The job an earlier submit with this idempotency key created, and its request hash.
    pub async fn find_idempotent(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        Ok(sqlx::query_as("SELECT id, request_sha256 FROM jobs WHERE tenant = ? AND idempotency_key = ?")
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut self.conn)
            .await?)
    }

    /// Every agent ever registered (for the broker's start: draining flags, last inventory).
    pub async fn load_agents(&mut self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, site, node, inventory_json, last_seen_ms, draining FROM agents ORDER BY id")
            .fetch_all(&mut self.conn)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AgentRecord {
                    id: r.try_get("id")?,
                    site: r.try_get("site")?,
                    node: r.try_get("node")?,
                    inventory_json: r.try_get("inventory_json")?,
                    last_seen: r.try_get("last_seen_ms")?,
                    draining: r.try_get("draining")?,
                })
            })
            .collect()
    }

    /// Every API key (hashes only).
    pub async fn load_keys(&mut self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, tenant, secret_sha256, created_at_ms, last_used_ms, revoked_at_ms FROM api_keys ORDER BY key_id",
        )
        .fetch_all(&mut self.conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyRecord {
                    key_id: r.try_get("key_id")?,
                    tenant: r.try_get("tenant")?,
                    secret_sha256: r.try_get("secret_sha256")?,
                    created_at: r.try_get("created_at_ms")?,
                    last_used: r.try_get("last_used_ms")?,
                    revoked_at: r.try_get("revoked_at_ms")?,
                })
            })
            .collect()
    }

    /// Every job that is not terminal, oldest first (for the broker's start).
    pub async fn load_active(&mut self) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut self.conn).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The highest event sequence number committed so far.
    pub async fn last_event_seq(&mut self) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM job_events").fetch_one(&mut self.conn).await?;
        Ok(seq.unwrap_or(0) as u64)
    }
}

/// Read-only queries over a small connection pool.
#[derive(Clone)]
pub struct Reader {
    pool: SqlitePool,
}

impl Reader {
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs newest first, filtered; `before` pages by id (ids are time ordered).
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
        if filter.tenant.is_some() {
            sql.push_str(" AND tenant = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND id < ?");
        }
        if !filter.states.is_empty() {
            let marks = vec!["?"; filter.states.len()].join(", ");
            sql.push_str(&format!(" AND state IN ({marks})"));
        }
        for _ in &filter.labels {
            sql.push_str(" AND json_extract(spec_json, ?) = ?");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(tenant) = &filter.tenant {
            query = query.bind(tenant);
        }
        if let Some(before) = &filter.before {
            query = query.bind(before);
        }
        for state in &filter.states {
            query = query.bind(state.as_str());
        }
        for (key, value) in &filter.labels {
            // Label keys are [A-Za-z0-9._-/]: safe inside a quoted JSON path member.
            query = query.bind(format!("$.labels.\"{key}\"")).bind(value);
        }
        let rows = query.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The job's events with `seq > after`, in order.
    pub async fn events(&self, job_id: &str, after: u64) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, job_id, state, attempt, agent, reason, exit_code, at_ms FROM job_events \
             WHERE job_id = ? AND seq > ? ORDER BY seq",
        )
        .bind(job_id)
        .bind(after as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    job_id: r.try_get("job_id")?,
                    state: state_of(r.try_get("state")?)?,
                    attempt: r.try_get("attempt")?,
                    agent: r.try_get("agent")?,
                    reason: r.try_get("reason")?,
                    exit_code: r.try_get("exit_code")?,
                    at: r.try_get("at_ms")?,
                })
            })
            .collect()
    }

    /// The stored output tail of an attempt (0 = the latest attempt that has one).
    pub async fn attempt_output(&self, job_id: &str, attempt: u32) -> Result<Option<AttemptOutput>, StoreError> {
        let row = sqlx::query(
            "SELECT attempt, output, output_truncated, output_bytes FROM attempts WHERE job_id = ? AND (? = 0 OR attempt = ?) \
             ORDER BY attempt DESC LIMIT 1",
        )
        .bind(job_id)
        .bind(attempt)
        .bind(attempt)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AttemptOutput {
                attempt: r.try_get("attempt")?,
                output: r.try_get::<Option<Vec<u8>>, _>("output")?.unwrap_or_default(),
                truncated: r.try_get("output_truncated")?,
                total: r.try_get::<i64, _>("output_bytes")? as u64,
            })
        })
        .transpose()
    }
}

fn state_of(s: String) -> Result<JobState, StoreError> {
    JobState::from_str(&s).map_err(StoreError::Corrupt)
}

fn job_from_row(r: &SqliteRow) -> Result<JobRecord, StoreError> {
    Ok(JobRecord {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        state: state_of(r.try_get("state")?)?,
        spec_json: r.try_get("spec_json")?,
        priority: r.try_get("priority")?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        epoch: r.try_get::<i64, _>("epoch")? as u64,
        site: r.try_get("site")?,
        agent: r.try_get("agent")?,
        exit_code: r.try_get("exit_code")?,
        reason: r.try_get("reason")?,
        idempotency_key: r.try_get("idempotency_key")?,
        request_sha256: r.try_get("request_sha256")?,
        created_at: r.try_get("created_at_ms")?,
        updated_at: r.try_get("updated_at_ms")?,
    })
}
