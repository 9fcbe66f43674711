//! What agents report: their inventory and the progress of their attempts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::data::StagingStats;
use super::gpu::Gpu;

/// The inventory label with the port of the agent's `/metrics` (`[metrics] listen`, as bound): the
/// broker joins it to the address the agent's stream comes from for Prometheus service discovery.
pub const METRICS_PORT_LABEL: &str = "hybroker.metrics_port";

/// A node's resources as its agent reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How the agent isolates its attempts from each other and from the node.
    #[serde(default)]
    pub isolation: Isolation,
}

/// How an agent isolates attempts (reported by the agent; the broker's config decides what a
/// node without isolation may run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces, a per-attempt UID, a cgroup with limits and a device gate (a root agent).
    #[default]
    Sandbox,
    /// Namespaces in an unprivileged user namespace (a non-root agent): no per-attempt UID, no
    /// device gate, cgroup limits only where delegated.
    Userns,
    /// No isolation (`isolation = "none"`): the node must be dedicated to one tenant.
    None,
}

impl Isolation {
    /// The name used in config, the API and the inventory.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Sandbox => "sandbox",
            Isolation::Userns => "userns",
            Isolation::None => "none",
        }
    }

    /// Parses [`Isolation::as_str`]. An empty text (an agent older than the field) reads as
    /// `None`, the unsafe reading: an old agent is treated as unisolated.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "sandbox" => Some(Isolation::Sandbox),
            "userns" => Some(Isolation::Userns),
            "none" | "" => Some(Isolation::None),
            _ => None,
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far an attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The process started.
    Running,
    /// The process ended with `exit_code`.
    Exited,
    /// It could not start, or was killed (max runtime, cancel); `reason` says why.
    Failed,
    /// Stage-in or stage-out failed; `reason` says why. The job may be tried again.
    StagingFailed,
    /// Stopped by a spot interruption notice (`reason`: `spot interruption notice: <action> at
    /// <deadline>`). The job is placed again; the attempt does not count toward `max_attempts`.
    Preempted,
}

/// One agent report about one attempt, fenced by its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    pub job_id: String,
    pub attempt: u32,
    pub epoch: u64,
    pub phase: Phase,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub gpu_indices: Vec<u32>,
    /// What staging moved, on final reports of attempts with job data.
    pub staging: Option<StagingStats>,
}

impl AttemptReport {
    /// The attempt is over; the agent keeps the report until the broker acknowledges it.
    pub fn is_final(&self) -> bool {
        self.phase != Phase::Running
    }
}
