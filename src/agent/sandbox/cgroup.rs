//! One cgroup per attempt, on cgroup v1 or v2: resource limits, a device gate, a kill that nothing
//! in the attempt survives, and the OOM-kill count.
//!
//! Layout: the agent owns a subtree (`<mount>/hybroker/<agent>` on v2; the same path in each v1
//! controller hierarchy it uses); each attempt gets a leaf `<subtree>/<attempt>` in it. The child
//! joins its cgroup itself, between fork and exec, by writing `0` to `cgroup.procs` files opened
//! before the fork ([`AttemptCgroup::join_fds`]).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

/// Which cgroup version, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Controllers each mounted at `<root>/<controller>` (`/sys/fs/cgroup/memory`, …).
    V1 { root: PathBuf },
    /// The unified hierarchy mounted at `root` (`/sys/fs/cgroup`, or a mount a test makes).
    V2 { root: PathBuf },
}

/// Limits for one attempt; `None` means no limit of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.max / memory.limit_in_bytes (swap off for the attempt where the kernel allows).
    pub memory_bytes: Option<u64>,
    /// CPU quota in thousandths of a CPU (`cpus × 1000`).
    pub cpu_millis: Option<u64>,
    /// pids.max.
    pub pids: Option<u64>,
}

/// A character or block device node, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// `'c'` or `'b'`.
    pub kind: char,
    pub major: u32,
    pub minor: u32,
}

/// The device gate: every device is denied except these (read, write, mknod).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRules {
    pub allow: Vec<Device>,
}

/// An error from the cgroup file system, with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The agent's subtree, under which attempts' cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    _layout: Layout,
    _subtree: PathBuf,
}

impl CgroupRoot {
    /// Detects the host's layout (`/sys/fs/cgroup` is cgroup2 ⇒ v2, else v1) and makes (or reuses)
    /// the agent's subtree `hybroker/<agent>` in it.
    pub fn detect(_agent: &str) -> Result<Self, CgroupError> {
        todo!()
    }

    /// The subtree `hybroker/<agent>` under an explicit layout (tests use a cgroup2 mount they made).
    pub fn new(_layout: Layout, _agent: &str) -> Result<Self, CgroupError> {
        todo!()
    }

    /// Kills and removes every attempt cgroup left in the subtree by a previous agent process.
    /// Returns how many there were.
    pub fn sweep(&self) -> usize {
        todo!()
    }

    /// Makes the attempt's cgroup `<subtree>/<name>` with these limits and this device gate.
    pub fn create(&self, _name: &str, _limits: &Limits, _devices: &DeviceRules) -> Result<AttemptCgroup, CgroupError> {
        todo!()
    }
}

/// One attempt's cgroup (on v1: its directory in each hierarchy used).
#[derive(Debug)]
pub struct AttemptCgroup {
    _dirs: Vec<PathBuf>,
}

impl AttemptCgroup {
    /// `cgroup.procs` of every hierarchy, opened write-only and close-on-exec. The child writes
    /// `0` to each between fork and exec (async-signal-safe), so it and all it forks are inside.
    pub fn join_fds(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        todo!()
    }

    /// Kills every process in the cgroup, including ones racing to fork (v2 `cgroup.kill`; else
    /// freeze, kill each, thaw), and waits until it is empty, at most `wait`. Returns whether it is
    /// empty.
    pub fn kill_all(&self, _wait: Duration) -> bool {
        todo!()
    }

    /// Whether any process is still in the cgroup.
    pub fn is_populated(&self) -> bool {
        todo!()
    }

    /// How many processes the OOM killer killed in this cgroup (v2 `memory.events` `oom_kill`;
    /// v1 `memory.oom_control` `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        todo!()
    }

    /// Kills what is left and removes the cgroup.
    pub fn remove(self) -> Result<(), CgroupError> {
        todo!()
    }
}
