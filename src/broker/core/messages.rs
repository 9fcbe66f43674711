//! What the core tells an agent, in its own types. The agent service turns them into `proto`
//! messages at the edge (`broker::agents`), so the core builds no protobuf.

use std::collections::HashMap;
use std::time::Duration;

/// One message for an agent's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    /// The answer to a register: the agent's id and the timings it keeps.
    Registered { agent_id: String, heartbeat_interval: Duration, lease_ttl: Duration },
    /// Run an attempt.
    Assign(Assignment),
    /// Stop an attempt (cancelled, stale, or not this agent's).
    Stop(StopAttempt),
    /// A final report was recorded (or refused for good): the agent may forget the attempt.
    Ack { job_id: String, epoch: u64 },
    /// The broker is going away: end the session and connect again after `after` (to whichever
    /// broker answers then).
    Reconnect { after: Duration, reason: String },
    /// The answer to a renewal (sent by the stream itself, not the core).
    Renewed(RenewedCert),
}

/// A renewed certificate, or why renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenewedCert {
    /// Leaf then issuing CA; empty when refused.
    pub cert_chain_pem: String,
    pub issued_at: i64,
    pub not_after: i64,
    /// Why it was refused; empty when renewed.
    pub error: String,
    /// The current trust bundle.
    pub ca_bundle_pem: String,
}

/// What an agent needs to run one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub job_id: String,
    pub attempt: u32,
    pub epoch: u64,
    pub command: Vec<String>,
    /// `env` and the opened `secret_env` together.
    pub env: HashMap<String, String>,
    pub gpu_indices: Vec<u32>,
    pub max_runtime: Duration,
    pub inputs: Vec<AssignedInput>,
    /// The outputs' paths, in the order of the job's outputs.
    pub outputs: Vec<String>,
    /// The dispatch span's context as carrier entries (empty for a job without a trace).
    pub trace_context: HashMap<String, String>,
    pub cpus: u32,
    pub memory_gib: u32,
    /// The job's checkpoint path, if it has one.
    pub checkpoint_path: Option<String>,
}

/// One input the agent stages in before the command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedInput {
    pub path: String,
    pub size: u64,
    pub md5: Option<String>,
}

/// Stop the attempt of `job_id` at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopAttempt {
    pub job_id: String,
    pub attempt: u32,
    pub epoch: u64,
    pub reason: String,
    /// Preempted (fair share or a higher priority): stopped like a spot notice, checkpoint saved.
    pub preempt: bool,
}
