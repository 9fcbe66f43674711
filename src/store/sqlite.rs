//! The SQLite implementation of the job store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection, SqlitePool};

use super::coalesce::{self, AgentUpsert, NewAttempt, NewJob};
use super::schema::MIGRATIONS;
use super::{
    AdminEventRecord, AgentRecord, AttemptOutput, Batch, IdentityWrite, JobEvent, JobFilter, JobRecord, JobStatus,
    JobSubmission, JoinTokenRecord, KeyRecord, LaunchRecord, RevocationRecord, StoreError,
};
use crate::model::state::JobState;
use crate::private_files;

const JOB_COLUMNS: &str = "id, tenant, name, state, spec_json, priority, attempts, max_attempts, epoch, \
     site, agent, exit_code, reason, idempotency_key, request_sha256, data_json, placement_json, trace_context, \
     secret_env_sealed, created_at_ms, updated_at_ms, preemptions";

/// Opens (creating and migrating if needed) the store at `path`.
/// The database file and SQLite's `-wal` and `-shm` next to it are private (0600, a missing
/// directory is made 0700): SQLite gives the WAL and SHM the database file's mode, so the file is
/// made 0600 before SQLite first opens it, and wider modes found at start are narrowed (logged).
pub async fn open(path: &Path) -> Result<(Writer, Reader), StoreError> {
    let open_error = |e: std::io::Error| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_files::create_dir_all(dir).map_err(open_error)?;
    }
    private_files::create_file(path).map_err(open_error)?;
    for file in store_files(path) {
        private_files::narrow_logged(&file).map_err(open_error)?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    // The writer's statements come in a few chunk sizes each (see `chunks`): keep them all prepared.
    let writer_options = options.clone().statement_cache_capacity(256);
    let mut conn = SqliteConnection::connect_with(&writer_options)
        .await
        .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    migrate(&mut conn).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.read_only(true))
        .await
        .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    // Made by SQLite with the database file's mode; checked all the same.
    for file in store_files(path) {
        private_files::narrow_logged(&file).map_err(open_error)?;
    }
    Ok((Writer { conn }, Reader { pool }))
}

/// The database file, its write-ahead log and its shared-memory index.
pub fn store_files(path: &Path) -> [PathBuf; 3] {
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")]
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
    ///
    /// The batch is folded first (`coalesce::fold`: one row write per job, attempt, agent and
    /// key) and written with multi-row statements, a few per table, leaving exactly the rows that
    /// writing it write by write would, and failing exactly when that would.
    pub async fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let f = coalesce::fold(batch);
        let mut tx = self.conn.begin().await?;
        if f.attempts_first {
            insert_attempts(&mut tx, &f.new_attempts).await?;
        }
        for rows in chunks(&f.new_jobs) {
            let mut q = sqlx::query(INSERT_JOBS.sql(rows.len()));
            for NewJob { new: j, last: u } in rows {
                q = q
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
                    .bind(u.preemptions);
            }
            q.execute(&mut *tx).await?;
        }
        for rows in chunks(&f.job_updates) {
            let mut q = sqlx::query(UPDATE_JOBS.sql(rows.len()));
            for (id, j) in rows {
                q = q
                    .bind(*id)
                    .bind(j.state.as_str())
                    .bind(j.attempts)
                    .bind(j.epoch as i64)
                    .bind(&j.site)
                    .bind(&j.agent)
                    .bind(j.exit_code)
                    .bind(&j.reason)
                    .bind(j.placement_json.as_deref())
                    .bind(j.updated_at)
                    .bind(j.preemptions);
            }
            q.execute(&mut *tx).await?;
        }
        if !f.attempts_first {
            insert_attempts(&mut tx, &f.new_attempts).await?;
        }
        for rows in chunks(&f.attempt_ends) {
            let mut q = sqlx::query(UPDATE_ATTEMPTS.sql(rows.len()));
            for a in rows {
                q = q
                    .bind(&a.job_id)
                    .bind(a.attempt)
                    .bind(a.state.as_str())
                    .bind(a.exit_code)
                    .bind(&a.reason)
                    .bind(&a.output)
                    .bind(a.output_truncated)
                    .bind(a.output_bytes as i64)
                    .bind(&a.staging_json)
                    .bind(a.cost_usd)
                    .bind(a.ended_at);
            }
            q.execute(&mut *tx).await?;
        }
        for rows in chunks(&f.events) {
            let mut q = sqlx::query(INSERT_EVENTS.sql(rows.len()));
            for e in rows {
                q = q
                    .bind(e.seq as i64)
                    .bind(&e.job_id)
                    .bind(e.state.as_str())
                    .bind(e.attempt)
                    .bind(&e.agent)
                    .bind(&e.reason)
                    .bind(e.exit_code)
                    .bind(e.at);
            }
            q.execute(&mut *tx).await?;
        }
        // A batch that removes an agent writes its agents one by one, in order.
        for write in &f.agent_writes {
            match write {
                super::Write::Agent(a) => {
                    upsert_agents(&mut tx, &[AgentUpsert { first: a, last: a, draining: a.draining }]).await?;
                }
                super::Write::AgentDraining { id, draining } => {
                    sqlx::query("UPDATE agents SET draining = ? WHERE id = ?")
                        .bind(draining)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                super::Write::RemoveAgent { id } => {
                    sqlx::query("DELETE FROM agents WHERE id = ?").bind(id).execute(&mut *tx).await?;
                }
                _ => unreachable!("only agent writes are kept in order"),
            }
        }
        // Draining first: for agents that existed, the upsert below leaves it as set here.
        for rows in chunks(&f.agent_draining) {
            let mut q = sqlx::query(UPDATE_AGENTS_DRAINING.sql(rows.len()));
            for (id, draining) in rows {
                q = q.bind(*id).bind(*draining);
            }
            q.execute(&mut *tx).await?;
        }
        upsert_agents(&mut tx, &f.agents).await?;
        for rows in chunks(&f.new_keys) {
            let mut q = sqlx::query(INSERT_KEYS.sql(rows.len()));
            for k in rows {
                q = q
                    .bind(&k.new.key_id)
                    .bind(&k.new.tenant)
                    .bind(&k.new.secret_sha256)
                    .bind(k.new.created_at)
                    .bind(k.last_used)
                    .bind(k.revoked_at);
            }
            q.execute(&mut *tx).await?;
        }
        for rows in chunks(&f.key_changes) {
            let mut q = sqlx::query(UPDATE_KEYS.sql(rows.len()));
            for k in rows {
                q = q.bind(k.key_id).bind(k.revoked_at).bind(k.used);
            }
            q.execute(&mut *tx).await?;
        }
        for w in &f.identity {
            write_identity(&mut tx, w).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The jobs earlier submits with these (tenant, idempotency key)s created, with their request
    /// hashes; one query per few hundred keys.
    pub async fn find_idempotent(
        &mut self,
        keys: &[(String, String)],
    ) -> Result<HashMap<(String, String), (String, Option<String>)>, StoreError> {
        let mut found = HashMap::new();
        for chunk in keys.chunks(256) {
            let pairs = vec!["(?, ?)"; chunk.len()].join(", ");
            // A join, so each pair is an index search (an IN over row values scans the table).
            let sql = format!(
                "SELECT j.tenant, j.idempotency_key, j.id, j.request_sha256 FROM (VALUES {pairs}) AS v \
                 JOIN jobs j ON j.tenant = v.column1 AND j.idempotency_key = v.column2 AND j.idempotency_key IS NOT NULL"
            );
            // Not cached: its texts vary with the chunk size and would push out the writer's statements.
            let mut query =
                sqlx::query_as::<_, (String, String, String, Option<String>)>(AssertSqlSafe(sql)).persistent(false);
            for (tenant, key) in chunk {
                query = query.bind(tenant).bind(key);
            }
            for (tenant, key, id, hash) in query.fetch_all(&mut self.conn).await? {
                found.insert((tenant, key), (id, hash));
            }
        }
        Ok(found)
    }

    /// Every agent ever registered (for the broker's start: draining flags, last inventory).
    pub async fn load_agents(&mut self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, site, node, inventory_json, last_seen_ms, draining, cert_not_after_ms FROM agents ORDER BY id",
        )
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
                    cert_not_after: r.try_get("cert_not_after_ms")?,
                })
            })
            .collect()
    }

    /// Every join token (hashes only), used up and expired ones included.
    pub async fn load_join_tokens(&mut self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT token_id, secret_sha256, site, node, created_by, created_at_ms, expires_at_ms, uses_left, \
             revoked_at_ms, launch_id FROM join_tokens ORDER BY created_at_ms, token_id",
        )
        .fetch_all(&mut self.conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JoinTokenRecord {
                    token_id: r.try_get("token_id")?,
                    secret_sha256: r.try_get("secret_sha256")?,
                    site: r.try_get("site")?,
                    node: r.try_get("node")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at_ms")?,
                    expires_at: r.try_get("expires_at_ms")?,
                    uses_left: r.try_get::<i64, _>("uses_left")?.clamp(0, i64::from(u32::MAX)) as u32,
                    revoked_at: r.try_get("revoked_at_ms")?,
                    launch_id: r.try_get("launch_id")?,
                })
            })
            .collect()
    }

    /// Every launch not yet ended, and those that ended since `since` (for the sites' spend).
    pub async fn load_launches(&mut self, since: crate::model::UnixMillis) -> Result<Vec<LaunchRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT launch_id, site, instance_type, market, usd_per_hour, token_id, instance_id, state, reason, \
             created_at_ms, enrolled_at_ms, ended_at_ms, busy_ms FROM launches \
             WHERE ended_at_ms IS NULL OR ended_at_ms >= ?1 ORDER BY created_at_ms, launch_id",
        )
        .bind(since)
        .fetch_all(&mut self.conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LaunchRecord {
                    launch_id: r.try_get("launch_id")?,
                    site: r.try_get("site")?,
                    instance_type: r.try_get("instance_type")?,
                    market: r.try_get("market")?,
                    usd_per_hour: r.try_get("usd_per_hour")?,
                    token_id: r.try_get("token_id")?,
                    instance_id: r.try_get("instance_id")?,
                    state: r.try_get("state")?,
                    reason: r.try_get("reason")?,
                    created_at: r.try_get("created_at_ms")?,
                    enrolled_at: r.try_get("enrolled_at_ms")?,
                    ended_at: r.try_get("ended_at_ms")?,
                    busy_ms: r.try_get("busy_ms")?,
                })
            })
            .collect()
    }

    /// Every revocation, oldest first.
    pub async fn load_revocations(&mut self) -> Result<Vec<RevocationRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT identity, serial, reason, revoked_by, revoked_at_ms FROM revocations ORDER BY seq")
                .fetch_all(&mut self.conn)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(RevocationRecord {
                    identity: r.try_get("identity")?,
                    serial: r.try_get("serial")?,
                    reason: r.try_get("reason")?,
                    revoked_by: r.try_get("revoked_by")?,
                    revoked_at: r.try_get("revoked_at_ms")?,
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

    /// The write connection itself, for tests that compare against writing statement by statement.
    #[cfg(test)]
    pub(super) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Each tenant's spend: the cost of its attempts that ended since `since` (Unix ms).
    pub async fn load_spend(&mut self, since: i64) -> Result<HashMap<String, f64>, StoreError> {
        let rows = sqlx::query(
            "SELECT jobs.tenant AS tenant, SUM(attempts.cost_usd) AS spent FROM attempts JOIN jobs ON jobs.id = attempts.job_id \
             WHERE attempts.cost_usd IS NOT NULL AND attempts.ended_at_ms >= ? GROUP BY jobs.tenant",
        )
        .bind(since)
        .fetch_all(&mut self.conn)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("tenant")?, r.try_get::<f64, _>("spent")?))).collect()
    }

    /// The highest event sequence number committed so far.
    pub async fn last_event_seq(&mut self) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM job_events").fetch_one(&mut self.conn).await?;
        Ok(seq.unwrap_or(0) as u64)
    }
}

/// Writes one identity-table write (see [`IdentityWrite`]).
pub(super) async fn write_identity(conn: &mut SqliteConnection, w: &IdentityWrite) -> Result<(), sqlx::Error> {
    let q = match w {
        IdentityWrite::NewJoinToken(t) => sqlx::query(
            "INSERT INTO join_tokens (token_id, secret_sha256, site, node, created_by, created_at_ms, expires_at_ms, \
             uses_left, revoked_at_ms, launch_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .bind(&t.token_id)
        .bind(&t.secret_sha256)
        .bind(&t.site)
        .bind(&t.node)
        .bind(&t.created_by)
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(i64::from(t.uses_left))
        .bind(t.revoked_at)
        .bind(&t.launch_id),
        IdentityWrite::JoinTokenUsed { token_id } => {
            sqlx::query("UPDATE join_tokens SET uses_left = MAX(uses_left - 1, 0) WHERE token_id = ?1").bind(token_id)
        }
        IdentityWrite::RevokeJoinToken { token_id, at } => {
            sqlx::query("UPDATE join_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE token_id = ?1")
                .bind(token_id)
                .bind(*at)
        }
        IdentityWrite::Revocation(r) => sqlx::query(
            "INSERT INTO revocations (identity, serial, reason, revoked_by, revoked_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&r.identity)
        .bind(&r.serial)
        .bind(&r.reason)
        .bind(&r.revoked_by)
        .bind(r.revoked_at),
        IdentityWrite::BindJoinToken { token_id, node } => {
            sqlx::query("UPDATE join_tokens SET node = ?2 WHERE token_id = ?1").bind(token_id).bind(node)
        }
        IdentityWrite::Launch(l) => sqlx::query(
            "INSERT OR REPLACE INTO launches (launch_id, site, instance_type, market, usd_per_hour, token_id, \
             instance_id, state, reason, created_at_ms, enrolled_at_ms, ended_at_ms, busy_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .bind(&l.launch_id)
        .bind(&l.site)
        .bind(&l.instance_type)
        .bind(&l.market)
        .bind(l.usd_per_hour)
        .bind(&l.token_id)
        .bind(&l.instance_id)
        .bind(&l.state)
        .bind(&l.reason)
        .bind(l.created_at)
        .bind(l.enrolled_at)
        .bind(l.ended_at)
        .bind(l.busy_ms),
        IdentityWrite::AdminEvent(e) => {
            sqlx::query("INSERT INTO admin_events (at_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)")
                .bind(e.at)
                .bind(&e.actor)
                .bind(&e.action)
                .bind(&e.target)
                .bind(&e.detail)
        }
    };
    q.execute(conn).await?;
    Ok(())
}

/// Upserts agents, a few hundred per statement (the one place the agents' columns are bound).
async fn upsert_agents(conn: &mut SqliteConnection, agents: &[AgentUpsert<'_>]) -> Result<(), StoreError> {
    for rows in chunks(agents) {
        let mut q = sqlx::query(UPSERT_AGENTS.sql(rows.len()));
        for AgentUpsert { first, last, draining } in rows {
            q = q
                .bind(&first.id)
                .bind(&first.site)
                .bind(&first.node)
                .bind(&last.inventory_json)
                .bind(last.last_seen)
                .bind(*draining)
                .bind(last.cert_not_after);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_attempts(conn: &mut SqliteConnection, attempts: &[NewAttempt<'_>]) -> Result<(), StoreError> {
    for rows in chunks(attempts) {
        let mut q = sqlx::query(INSERT_ATTEMPTS.sql(rows.len()));
        for NewAttempt { new: a, end } in rows {
            let gpus = a.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            q = q.bind(&a.job_id).bind(a.attempt).bind(a.epoch as i64).bind(&a.agent).bind(gpus);
            q = match end {
                Some(e) => q
                    .bind(e.state.as_str())
                    .bind(e.exit_code)
                    .bind(&e.reason)
                    .bind(&e.output)
                    .bind(e.output_truncated)
                    .bind(e.output_bytes as i64)
                    .bind(&e.staging_json)
                    .bind(e.cost_usd),
                // The columns' defaults, as an insert that names only the others leaves them.
                None => q
                    .bind(JobState::Leased.as_str())
                    .bind(None::<i32>)
                    .bind("")
                    .bind(None::<Vec<u8>>)
                    .bind(false)
                    .bind(0_i64)
                    .bind(None::<String>)
                    .bind(None::<f64>),
            };
            q = q.bind(a.started_at).bind(end.map(|e| e.ended_at));
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Rows per statement at most: 256 rows of the widest (19 columns) bind 4,864 parameters, well
/// under SQLite's 32,766 (bundled 3.51; the limit is only 999 before 3.32).
const MAX_ROWS: usize = 256;

/// Splits rows into chunks of power-of-two sizes (all of [`MAX_ROWS`], then the rest by its binary
/// digits), so that a few statement texts, each prepared once and cached, serve any batch.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = if rows.len() >= MAX_ROWS { MAX_ROWS } else { 1 << rows.len().ilog2() };
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

/// Chunk sizes: 1, 2, 4 … [`MAX_ROWS`].
const SIZES: usize = MAX_ROWS.ilog2() as usize + 1;

/// A statement with a multi-row `VALUES` list, its text built once per chunk size.
struct MultiRow {
    head: &'static str,
    /// Parameters per row.
    width: usize,
    tail: &'static str,
    texts: [OnceLock<String>; SIZES],
}

impl MultiRow {
    const fn new(head: &'static str, width: usize, tail: &'static str) -> MultiRow {
        MultiRow { head, width, tail, texts: [const { OnceLock::new() }; SIZES] }
    }

    /// The statement for `rows` rows, a power of two up to [`MAX_ROWS`].
    fn sql(&'static self, rows: usize) -> &'static str {
        debug_assert!(rows.is_power_of_two() && rows <= MAX_ROWS);
        self.texts[rows.ilog2() as usize].get_or_init(|| {
            let row = format!("({})", vec!["?"; self.width].join(", "));
            format!("{} VALUES {}{}", self.head, vec![row; rows].join(", "), self.tail)
        })
    }
}

static INSERT_JOBS: MultiRow = MultiRow::new(
    "INSERT INTO jobs (id, tenant, name, state, spec_json, priority, attempts, max_attempts, epoch, site, agent, \
     exit_code, reason, idempotency_key, request_sha256, data_json, placement_json, trace_context, secret_env_sealed, \
     created_at_ms, updated_at_ms, preemptions)",
    22,
    "",
);

/// `UPDATE … FROM (VALUES …)` touches only jobs that exist, as `UPDATE … WHERE id = ?` does (an
/// upsert would create the missing ones).
static UPDATE_JOBS: MultiRow = MultiRow::new(
    "UPDATE jobs SET state = v.column2, attempts = v.column3, epoch = v.column4, site = v.column5, \
     agent = v.column6, exit_code = v.column7, reason = v.column8, placement_json = v.column9, \
     updated_at_ms = v.column10, preemptions = v.column11 FROM (",
    11,
    ") AS v WHERE jobs.id = v.column1",
);

static INSERT_EVENTS: MultiRow =
    MultiRow::new("INSERT INTO job_events (seq, job_id, state, attempt, agent, reason, exit_code, at_ms)", 8, "");

static INSERT_ATTEMPTS: MultiRow = MultiRow::new(
    "INSERT INTO attempts (job_id, attempt, epoch, agent, gpu_indices, state, exit_code, reason, output, \
     output_truncated, output_bytes, staging_json, cost_usd, started_at_ms, ended_at_ms)",
    15,
    "",
);

static UPDATE_ATTEMPTS: MultiRow = MultiRow::new(
    "UPDATE attempts SET state = v.column3, exit_code = v.column4, reason = v.column5, output = v.column6, \
     output_truncated = v.column7, output_bytes = v.column8, staging_json = v.column9, cost_usd = v.column10, \
     ended_at_ms = v.column11 FROM (",
    11,
    ") AS v WHERE attempts.job_id = v.column1 AND attempts.attempt = v.column2",
);

static UPDATE_AGENTS_DRAINING: MultiRow =
    MultiRow::new("UPDATE agents SET draining = v.column2 FROM (", 2, ") AS v WHERE agents.id = v.column1");

static UPSERT_AGENTS: MultiRow = MultiRow::new(
    "INSERT INTO agents (id, site, node, inventory_json, last_seen_ms, draining, cert_not_after_ms)",
    7,
    " ON CONFLICT (id) DO UPDATE SET inventory_json = excluded.inventory_json, last_seen_ms = excluded.last_seen_ms, \
     cert_not_after_ms = excluded.cert_not_after_ms",
);

static INSERT_KEYS: MultiRow = MultiRow::new(
    "INSERT INTO api_keys (key_id, tenant, secret_sha256, created_at_ms, last_used_ms, revoked_at_ms)",
    6,
    "",
);

static UPDATE_KEYS: MultiRow = MultiRow::new(
    "UPDATE api_keys SET revoked_at_ms = COALESCE(v.column2, revoked_at_ms), \
     last_used_ms = MAX(last_used_ms, COALESCE(v.column3, last_used_ms)) FROM (",
    3,
    ") AS v WHERE api_keys.key_id = v.column1",
);

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
    /// The newest `limit` admin events, newest first.
    pub async fn admin_events(&self, limit: u32) -> Result<Vec<AdminEventRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT at_ms, actor, action, target, detail FROM admin_events ORDER BY seq DESC LIMIT ?1")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(AdminEventRecord {
                    at: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

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
    let submission = JobSubmission {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        spec_json: r.try_get("spec_json")?,
        priority: r.try_get("priority")?,
        max_attempts: r.try_get("max_attempts")?,
        idempotency_key: r.try_get("idempotency_key")?,
        request_sha256: r.try_get("request_sha256")?,
        data_json: r.try_get("data_json")?,
        trace_context: r.try_get("trace_context")?,
        secret_env_sealed: r.try_get("secret_env_sealed")?,
        created_at: r.try_get("created_at_ms")?,
    };
    let status = JobStatus {
        state: state_of(r.try_get("state")?)?,
        attempts: r.try_get("attempts")?,
        preemptions: r.try_get("preemptions")?,
        epoch: r.try_get::<i64, _>("epoch")? as u64,
        site: r.try_get("site")?,
        agent: r.try_get("agent")?,
        exit_code: r.try_get("exit_code")?,
        reason: r.try_get("reason")?,
        placement_json: r.try_get::<Option<String>, _>("placement_json")?.map(Arc::from),
        updated_at: r.try_get("updated_at_ms")?,
    };
    Ok(JobRecord { submission, status })
}
