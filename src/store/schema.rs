//! Migrations, applied in order and recorded in SQLite's `user_version`.

/// Each entry moves the schema one version up; never edit a released entry, append a new one.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL,
    spec_json       TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    max_attempts    INTEGER NOT NULL,
    epoch           INTEGER NOT NULL,
    site            TEXT,
    agent           TEXT,
    exit_code       INTEGER,
    reason          TEXT NOT NULL,
    idempotency_key TEXT,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant ON jobs (tenant, id);
CREATE INDEX jobs_active ON jobs (state) WHERE state NOT IN ('succeeded', 'failed', 'cancelled');

CREATE TABLE attempts (
    job_id           TEXT NOT NULL REFERENCES jobs (id),
    attempt          INTEGER NOT NULL,
    epoch            INTEGER NOT NULL,
    agent            TEXT NOT NULL,
    gpu_indices      TEXT NOT NULL,
    state            TEXT NOT NULL,
    exit_code        INTEGER,
    reason           TEXT NOT NULL DEFAULT '',
    output           BLOB,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    started_at_ms    INTEGER NOT NULL,
    ended_at_ms      INTEGER,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE agents (
    id             TEXT PRIMARY KEY,
    site           TEXT NOT NULL,
    node           TEXT NOT NULL,
    inventory_json TEXT NOT NULL,
    last_seen_ms   INTEGER NOT NULL
);

CREATE TABLE job_events (
    seq       INTEGER PRIMARY KEY,
    job_id    TEXT NOT NULL,
    state     TEXT NOT NULL,
    attempt   INTEGER NOT NULL,
    agent     TEXT,
    reason    TEXT NOT NULL,
    exit_code INTEGER,
    at_ms     INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, seq);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN request_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN output_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
CREATE TABLE api_keys (
    key_id        TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    last_used_ms  INTEGER NOT NULL DEFAULT 0,
    revoked_at_ms INTEGER
);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN data_json TEXT;
ALTER TABLE attempts ADD COLUMN staging_json TEXT;
"#,
    r#"
ALTER TABLE jobs ADD COLUMN placement_json TEXT;
ALTER TABLE attempts ADD COLUMN cost_usd REAL;
"#,
    r#"
ALTER TABLE jobs ADD COLUMN trace_context TEXT;
"#,
    r#"
ALTER TABLE jobs ADD COLUMN secret_env_sealed TEXT;
"#,
    r#"
ALTER TABLE agents ADD COLUMN cert_not_after_ms INTEGER NOT NULL DEFAULT 0;
CREATE TABLE join_tokens (
    token_id      TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    site          TEXT NOT NULL,
    node          TEXT NOT NULL DEFAULT '',
    created_by    TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE revocations (
    seq           INTEGER PRIMARY KEY,
    identity      TEXT NOT NULL DEFAULT '',
    serial        TEXT NOT NULL DEFAULT '',
    reason        TEXT NOT NULL DEFAULT '',
    revoked_by    TEXT NOT NULL,
    revoked_at_ms INTEGER NOT NULL
);
CREATE TABLE admin_events (
    seq    INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"#,
    r#"
ALTER TABLE join_tokens ADD COLUMN launch_id TEXT NOT NULL DEFAULT '';
CREATE TABLE launches (
    launch_id      TEXT PRIMARY KEY,
    site           TEXT NOT NULL,
    instance_type  TEXT NOT NULL,
    market         TEXT NOT NULL,
    usd_per_hour   REAL NOT NULL,
    token_id       TEXT NOT NULL,
    instance_id    TEXT NOT NULL DEFAULT '',
    state          TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    created_at_ms  INTEGER NOT NULL,
    enrolled_at_ms INTEGER,
    ended_at_ms    INTEGER,
    busy_ms        INTEGER NOT NULL DEFAULT 0
);
"#,
    // 9 (8 is the launch records'): attempts a spot interruption ended, which do not count
    // toward max_attempts.
    r#"
ALTER TABLE jobs ADD COLUMN preemptions INTEGER NOT NULL DEFAULT 0;
"#,
];
