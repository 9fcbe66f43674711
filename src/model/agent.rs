//! What agents report: their inventory and the progress of their attempts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::data::StagingStats;
use super::gpu::Gpu;

/// A node's resources as its agent reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
