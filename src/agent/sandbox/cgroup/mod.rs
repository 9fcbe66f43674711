//! One cgroup per attempt, on cgroup v1 or v2: resource limits, a device gate, a kill that nothing
//! in the attempt survives, and the OOM-kill count.
//!
//! Layout: the agent owns a subtree (`<mount>/hybroker/<agent>` on v2; the same path in each v1
//! controller hierarchy it uses); each attempt gets a leaf `<subtree>/<attempt>` in it. The child
//! joins its cgroup itself, between fork and exec, by writing `0` to `cgroup.procs` files opened
//! before the fork ([`AttemptCgroup::join_fds`]).
//!
//! On a v1 host that also mounts a controller-less cgroup2 hierarchy (hybrid, at
//! `/sys/fs/cgroup/unified`), the attempt gets a leaf there as well: it holds no limits, but it
//! gives `cgroup.kill` and a place to attach BPF socket programs ([`AttemptCgroup::block_ipv4`]).
//!
//! Device gate: v1 `devices.deny`/`devices.allow`; v2 a hand-built `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program (`bpf.rs`).

mod bpf;
mod files;
mod v1;
mod v2;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use files::{is_cgroup2, keyed_value, path_segment, remove_tree, wait_until, write_control, write_if_present};

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
    /// [`Device::ANY_MINOR`] stands for every minor of the major (`c 136:*`).
    pub minor: u32,
}

impl Device {
    /// The minor that stands for all minors of a major.
    pub const ANY_MINOR: u32 = u32::MAX;

    /// A character device.
    pub const fn char(major: u32, minor: u32) -> Self {
        Device { kind: 'c', major, minor }
    }
}

/// The device gate: every device is denied except these (read, write, mknod).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRules {
    pub allow: Vec<Device>,
}

impl DeviceRules {
    /// The nodes every process expects: null, zero, full, random, urandom, tty, ptmx and the
    /// pseudo-terminals (`/dev/pts/*`). Add the attempt's GPU nodes to these.
    pub fn basic() -> Self {
        let allow = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, Device::ANY_MINOR)];
        DeviceRules { allow: allow.into_iter().map(|(major, minor)| Device::char(major, minor)).collect() }
    }
}

/// An error from the cgroup file system, with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl CgroupError {
    fn new(path: &Path, source: std::io::Error) -> Self {
        CgroupError { path: path.to_path_buf(), source }
    }

    fn other(path: &Path, kind: std::io::ErrorKind, message: String) -> Self {
        CgroupError::new(path, std::io::Error::new(kind, message))
    }
}

/// The directory under each hierarchy's root that holds the agents' subtrees.
const SUBTREE_DIR: &str = "hybroker";
/// How long [`AttemptCgroup::remove`] waits for the cgroup to empty.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// The agent's subtree, under which attempts' cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    layout: Layout,
    /// v1: the subtree in each controller hierarchy used.
    v1: Vec<(v1::Controller, PathBuf)>,
    /// The subtree in the cgroup2 hierarchy: the v2 layout's, or on v1 the hybrid mount's.
    unified: Option<PathBuf>,
}

impl CgroupRoot {
    /// Detects the host's layout (`/sys/fs/cgroup` is cgroup2 ⇒ v2, else v1) and makes (or reuses)
    /// the agent's subtree `hybroker/<agent>` in it.
    pub fn detect(agent: &str) -> Result<Self, CgroupError> {
        let root = PathBuf::from("/sys/fs/cgroup");
        let layout = if is_cgroup2(&root) { Layout::V2 { root } } else { Layout::V1 { root } };
        Self::new(layout, agent)
    }

    /// The subtree `hybroker/<agent>` under an explicit layout (tests use a cgroup2 mount they made).
    pub fn new(layout: Layout, agent: &str) -> Result<Self, CgroupError> {
        let segment = path_segment(agent);
        match &layout {
            Layout::V2 { root } => {
                let subtree = v2::make_subtree(root, &segment)?;
                Ok(CgroupRoot { layout, v1: Vec::new(), unified: Some(subtree) })
            }
            Layout::V1 { root } => {
                let v1 = v1::make_subtrees(root, &segment)?;
                let hybrid = root.join("unified");
                let unified = if is_cgroup2(&hybrid) {
                    let subtree = hybrid.join(SUBTREE_DIR).join(&segment);
                    std::fs::create_dir_all(&subtree).map_err(|e| CgroupError::new(&subtree, e))?;
                    Some(subtree)
                } else {
                    None
                };
                Ok(CgroupRoot { layout, v1, unified })
            }
        }
    }

    /// The layout this subtree lives in.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether attempts get a cgroup2 leaf (always on v2; on v1 only with a hybrid cgroup2 mount),
    /// which [`AttemptCgroup::block_ipv4`] needs. `false` deserves a WARN: the instance-metadata
    /// address stays reachable from jobs.
    pub fn has_cgroup2(&self) -> bool {
        self.unified.is_some()
    }

    /// The controllers attempts get (for the agent's start-up log): v1 the mounted hierarchies
    /// used, v2 what the subtree enables for its children plus the BPF device gate.
    pub fn controllers(&self) -> Vec<String> {
        match (&self.layout, &self.unified) {
            (Layout::V2 { .. }, Some(subtree)) => {
                let mut names = v2::enabled_controllers(subtree);
                names.push("devices".into());
                names
            }
            _ => self.v1.iter().map(|(c, _)| c.name().to_string()).collect(),
        }
    }

    /// Kills and removes every attempt cgroup left in the subtree by a previous agent process.
    /// Returns how many there were.
    pub fn sweep(&self) -> usize {
        let mut names = BTreeSet::new();
        for dir in self.v1.iter().map(|(_, d)| d).chain(&self.unified) {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name());
                }
            }
        }
        for name in &names {
            let name = name.to_string_lossy();
            if let Err(e) = self.attempt(&name).remove() {
                tracing::warn!(error = %e, "could not remove a leftover attempt cgroup");
            }
        }
        names.len()
    }

    /// Makes the attempt's cgroup `<subtree>/<name>` with these limits and this device gate.
    pub fn create(&self, name: &str, limits: &Limits, devices: &DeviceRules) -> Result<AttemptCgroup, CgroupError> {
        let attempt = self.attempt(&path_segment(name));
        let mut made = Vec::new();
        let result = (|| {
            for dir in attempt.dirs() {
                std::fs::create_dir(dir).map_err(|e| CgroupError::new(dir, e))?;
                made.push(dir.to_path_buf());
            }
            v1::apply(&attempt.v1, limits, devices)?;
            if let (true, Some(leaf)) = (attempt.unified_controls, &attempt.unified) {
                v2::write_limits(leaf, limits)?;
                bpf::attach_device_gate(leaf, devices)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for dir in made.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
        Ok(attempt)
    }

    /// The attempt cgroup's paths (nothing is made).
    fn attempt(&self, segment: &str) -> AttemptCgroup {
        AttemptCgroup {
            v1: self.v1.iter().map(|(c, d)| (*c, d.join(segment))).collect(),
            unified: self.unified.as_ref().map(|d| d.join(segment)),
            unified_controls: matches!(self.layout, Layout::V2 { .. }),
        }
    }
}

/// One attempt's cgroup (on v1: its directory in each hierarchy used).
#[derive(Debug)]
pub struct AttemptCgroup {
    v1: Vec<(v1::Controller, PathBuf)>,
    unified: Option<PathBuf>,
    /// Whether the cgroup2 leaf holds the limits and the device gate (v2), or only the processes
    /// and socket programs (hybrid v1).
    unified_controls: bool,
}

/// Moves the calling process into the cgroups whose `cgroup.procs` are `fds` (from
/// [`AttemptCgroup::join_fds`]) by writing `0` to each. Async-signal-safe (only write(2)), so a
/// child calls it between fork and exec.
pub fn join(fds: &[OwnedFd]) -> std::io::Result<()> {
    for fd in fds {
        nix::unistd::write(fd, b"0")?;
    }
    Ok(())
}

impl AttemptCgroup {
    /// `cgroup.procs` of every hierarchy, opened write-only and close-on-exec. The child writes
    /// `0` to each between fork and exec (async-signal-safe), so it and all it forks are inside.
    pub fn join_fds(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                // std opens with O_CLOEXEC; write-only without create or truncate is O_WRONLY.
                let file = std::fs::OpenOptions::new().write(true).open(&procs);
                file.map(OwnedFd::from).map_err(|e| CgroupError::new(&procs, e))
            })
            .collect()
    }

    /// Refuses the attempt's TCP connects and UDP sends to these IPv4 addresses (also as
    /// IPv4-mapped IPv6 addresses) with `EPERM`: BPF socket-address programs on the cgroup2 leaf.
    /// Call it before the child joins. Fails when the host has no cgroup2 hierarchy (a v1 host
    /// without the hybrid mount: see [`CgroupRoot::has_cgroup2`]) or BPF is unavailable.
    pub fn block_ipv4(&self, addrs: &[Ipv4Addr]) -> Result<(), CgroupError> {
        match &self.unified {
            Some(leaf) => bpf::attach_ipv4_block(leaf, addrs),
            None => Err(CgroupError::other(
                self.dirs().next().unwrap_or(Path::new("/sys/fs/cgroup")),
                std::io::ErrorKind::Unsupported,
                "no cgroup2 hierarchy is mounted, so addresses cannot be blocked for the attempt".into(),
            )),
        }
    }

    /// Kills every process in the cgroup, including ones racing to fork (v2 `cgroup.kill`; else
    /// freeze, kill each, thaw), and waits until it is empty, at most `wait`. Returns whether it is
    /// empty.
    pub fn kill_all(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut round = 0;
        loop {
            if !self.is_populated() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let slice_end = deadline.min(Instant::now() + Duration::from_millis(50));
            let killed_whole = self.unified.as_deref().is_some_and(v2::write_kill);
            // cgroup.kill takes the whole tree at once; the freeze-and-kill rounds are the fallback,
            // and the second line of defence should something stay.
            if !killed_whole || round > 0 {
                if let (Some(leaf), true, false) = (&self.unified, self.unified_controls, killed_whole) {
                    v2::freeze_kill_thaw(leaf, slice_end);
                }
                let freezer = self.v1.iter().find(|(c, _)| *c == v1::Controller::Freezer).map(|(_, d)| d);
                match freezer {
                    Some(dir) => v1::freeze_kill_thaw(dir, slice_end),
                    None => self.v1.iter().for_each(|(_, dir)| v1::kill_each(dir)),
                }
            }
            round += 1;
            wait_until(slice_end, || !self.is_populated());
        }
    }

    /// Whether any process is still in the cgroup.
    pub fn is_populated(&self) -> bool {
        self.v1.iter().any(|(_, dir)| !v1::procs(dir).is_empty())
            || self.unified.as_deref().is_some_and(v2::is_populated)
    }

    /// How many processes the OOM killer killed in this cgroup (v2 `memory.events` `oom_kill`;
    /// v1 `memory.oom_control` `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        let v1_memory = self.v1.iter().find(|(c, _)| *c == v1::Controller::Memory);
        let v1_kills = v1_memory.map_or(0, |(_, dir)| v1::oom_kills(dir));
        let v2_kills = match (&self.unified, self.unified_controls) {
            (Some(leaf), true) => v2::oom_kills(leaf),
            _ => 0,
        };
        v1_kills + v2_kills
    }

    /// Kills what is left and removes the cgroup.
    pub fn remove(self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_WAIT;
        self.kill_all(REMOVE_WAIT);
        let mut first_error = None;
        for dir in self.dirs() {
            if let Err(e) = remove_tree(dir, deadline) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The attempt's directory in every hierarchy.
    fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.v1.iter().map(|(_, d)| d.as_path()).chain(self.unified.as_deref())
    }
}
