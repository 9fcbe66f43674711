//! Durable jobs, attempts, agents and the append-only job event log.
//!
//! SQLite through sqlx: WAL, `synchronous=FULL`. One [`Writer`] connection, owned by the broker's
//! core task, commits a [`Batch`] of many transitions in one transaction (group commit); a
//! [`Reader`] pool serves queries. PostgreSQL arrives with its own issue behind the same calls.

mod coalesce;
mod schema;
pub mod snapshot;
mod sqlite;

pub use sqlite::{Reader, Writer, open, store_files};

#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::model::UnixMillis;
use crate::model::state::JobState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("job store: {0}")]
    Corrupt(String),
    #[error("job store {path}: {message}")]
    Open { path: String, message: String },
}

/// A job as submitted: written once, at submit, and never changed.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSubmission {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub spec_json: String,
    pub priority: u32,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of the submitted document, to tell a retry from a reused key.
    pub request_sha256: Option<String>,
    /// The job's data plan (`model::data::JobData` as JSON): input objects with sizes, output targets.
    pub data_json: Option<String>,
    /// The submission's W3C trace context (`{"traceparent": …}` as JSON): placement and dispatch,
    /// however much later, continue that trace.
    pub trace_context: Option<String>,
    /// The job's `secret_env`, sealed (`broker::secrets`: AES-256-GCM, key id recorded); never
    /// the clear values.
    pub secret_env_sealed: Option<String>,
    pub created_at: UnixMillis,
}

/// Where a job stands: the columns every transition writes, and only those.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub state: JobState,
    pub attempts: u32,
    /// Attempts a spot interruption ended (not counted toward `max_attempts`).
    pub preemptions: u32,
    pub epoch: u64,
    pub site: Option<String>,
    pub agent: Option<String>,
    pub exit_code: Option<i32>,
    pub reason: String,
    /// The latest placement decision (`placement::engine::Decision` as JSON), once placed by the
    /// engine; shared, not copied, by the transitions that keep it.
    pub placement_json: Option<Arc<str>>,
    pub updated_at: UnixMillis,
}

/// A job as stored: its submission and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub submission: JobSubmission,
    pub status: JobStatus,
}

impl JobRecord {
    /// The job's data plan as stored, with the output locations its stored placement decision
    /// chose filled in (outputs given by residency group name none until placement chooses).
    pub fn effective_data(&self) -> crate::model::data::JobData {
        let data: crate::model::data::JobData =
            self.submission.data_json.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
        if data.outputs_resolved() {
            return data;
        }
        let chosen = self
            .status
            .placement_json
            .as_deref()
            .and_then(|d| serde_json::from_str::<crate::placement::engine::Decision>(d).ok())
            .and_then(|d| d.chosen);
        match chosen {
            Some(chosen) => data.with_chosen_outputs(&chosen.output_locations),
            None => data,
        }
    }
}

/// One entry of the append-only job event log; `seq` is global and strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub seq: u64,
    pub job_id: String,
    pub state: JobState,
    pub attempt: u32,
    pub agent: Option<String>,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub at: UnixMillis,
}

/// One try of a job on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub job_id: String,
    pub attempt: u32,
    pub epoch: u64,
    pub agent: String,
    pub gpu_indices: Vec<u32>,
    pub started_at: UnixMillis,
}

/// How an attempt ended, with the bounded tail of its output.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    pub job_id: String,
    pub attempt: u32,
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub output: Vec<u8>,
    pub output_truncated: bool,
    /// The attempt's whole output in bytes (the tail is the last `output.len()` of them).
    pub output_bytes: u64,
    /// Staging statistics (`model::data::StagingStats` as JSON), when the attempt moved data.
    pub staging_json: Option<String>,
    /// What the attempt cost (its runtime at the hourly price it was placed on), when placed by the engine.
    pub cost_usd: Option<f64>,
    pub ended_at: UnixMillis,
}

/// An agent as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub site: String,
    pub node: String,
    pub inventory_json: String,
    pub last_seen: UnixMillis,
    pub draining: bool,
    /// The NotAfter of the certificate it last connected with (0: unknown).
    pub cert_not_after: UnixMillis,
}

/// The tail of one attempt's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutput {
    pub attempt: u32,
    pub output: Vec<u8>,
    pub truncated: bool,
    /// The attempt's whole output so far, in bytes.
    pub total: u64,
}

/// A tenant's API key as stored: only a hash of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant: String,
    pub secret_sha256: String,
    pub created_at: UnixMillis,
    pub last_used: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

/// A join token as stored: only a hash of its secret, its scope, expiry and remaining uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub token_id: String,
    pub secret_sha256: String,
    pub site: String,
    /// Empty: the node name comes from the agent's CSR.
    pub node: String,
    /// The admin identity that created it.
    pub created_by: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub uses_left: u32,
    pub revoked_at: Option<UnixMillis>,
    /// The launch it was made for (empty: made by an admin); such a token enrols only the
    /// launch's instance, once the launch has answered with its id.
    pub launch_id: String,
}

/// One instance launch of a capacity provider, from the intent (written before the cloud is
/// called) to the termination the cloud confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRecord {
    /// `hbl-<16 hex>`: the cloud call's idempotency key and the instance's launch tag.
    pub launch_id: String,
    pub site: String,
    pub instance_type: String,
    /// `on_demand` or `spot`.
    pub market: String,
    pub usd_per_hour: f64,
    /// The launch's join token.
    pub token_id: String,
    /// The cloud's instance id once known (empty before).
    pub instance_id: String,
    /// `requested`, `booting`, `enrolled`, `retiring`, `terminated`, `failed`.
    pub state: String,
    /// Why it is retiring, terminated or failed.
    pub reason: String,
    pub created_at: UnixMillis,
    pub enrolled_at: Option<UnixMillis>,
    pub ended_at: Option<UnixMillis>,
    /// Time it ran at least one attempt (the rest of its life was idle).
    pub busy_ms: i64,
}

/// A deny entry: an identity (every certificate issued for it before `revoked_at`) or one
/// certificate serial (hex), of any role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The SPIFFE URI; empty when by serial.
    pub identity: String,
    /// Lower-case hex; empty when by identity.
    pub serial: String,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at: UnixMillis,
}

/// One admin action in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminEventRecord {
    pub at: UnixMillis,
    /// The admin (or gateway) identity that acted.
    pub actor: String,
    /// `token.create`, `token.revoke`, `cert.revoke`, `agent.remove`, `agent.undrain`, `agent.drain`.
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// Rare writes to the identity tables (join tokens, revocations, the admin audit trail, launches). No other
/// write touches these tables, so they run one by one, in batch order, after the folded writes.
#[derive(Debug, Clone)]
pub enum IdentityWrite {
    NewJoinToken(JoinTokenRecord),
    /// One use of the token spent (`uses_left` down by one).
    JoinTokenUsed {
        token_id: String,
    },
    RevokeJoinToken {
        token_id: String,
        at: UnixMillis,
    },
    Revocation(RevocationRecord),
    AdminEvent(AdminEventRecord),
    /// The token now enrols only this node (a launch's instance id).
    BindJoinToken {
        token_id: String,
        node: String,
    },
    /// Inserts or replaces a launch.
    Launch(LaunchRecord),
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Inserts a job: its submission (shared with the core, not copied) and its first status.
    NewJob {
        job: Arc<JobSubmission>,
        status: JobStatus,
    },
    /// Updates the job's status columns (state, attempts, epoch, site, agent, exit code, reason,
    /// placement).
    UpdateJob {
        id: String,
        status: JobStatus,
    },
    Event(JobEvent),
    NewAttempt(AttemptRecord),
    EndAttempt(AttemptEnd),
    /// Inserts or refreshes an agent (its inventory and last seen; `draining` only on insert).
    Agent(AgentRecord),
    AgentDraining {
        id: String,
        draining: bool,
    },
    /// Deletes the agent's row (an agent removed by an admin); nothing when there is none.
    RemoveAgent {
        id: String,
    },
    NewKey(KeyRecord),
    RevokeKey {
        key_id: String,
        at: UnixMillis,
    },
    KeyUsed {
        key_id: String,
        at: UnixMillis,
    },
    Identity(IdentityWrite),
}

/// Writes committed together, in order, in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub writes: Vec<Write>,
}

impl Batch {
    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// Filter for listing jobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub tenant: Option<String>,
    pub states: Vec<JobState>,
    /// (key, value) pairs that must all be among the job's labels.
    pub labels: Vec<(String, String)>,
    pub before: Option<String>,
    pub limit: u32,
}
