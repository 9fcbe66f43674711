//! The per-attempt sandbox: namespaces, a per-attempt UID, a cgroup with limits and a device gate.
//!
//! [`Sandbox::start`] decides at agent start how attempts are isolated ([`Isolation`]): as root,
//! the full sandbox; otherwise unprivileged user namespaces where the kernel allows them; an agent
//! that can do neither refuses to start unless `isolation = "none"`. Each way is proven at start
//! by running a real sandboxed `true`.
//!
//! Per attempt, [`Sandbox::begin`] claims a UID host-wide ([`uids`]), makes the work directory
//! (with its disk cap, [`disk`]) and the cgroup; the executor then re-executes the agent as
//! `hybroker sandbox-init` ([`init`]) in that cgroup, which builds the namespaces and mounts
//! ([`mounts`]) and runs the job. [`AttemptSandbox::after_process`] kills the whole cgroup and
//! turns an OOM kill or a full disk into the attempt's reason; [`AttemptSandbox::finish`] removes
//! the work directory (or keeps a failed one for `sandbox.keep_failed`) and frees the UID.

pub mod cgroup;
pub mod devices;
pub mod disk;
pub mod init;
pub mod mounts;
mod seccomp;
pub mod spec;
pub mod uids;

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::agent::{IsolationSetting, SandboxNetwork, SandboxSection};
pub use crate::model::agent::Isolation;
use cgroup::{AttemptCgroup, CgroupRoot, Limits};
use spec::InitSpec;
use uids::{UidClaim, UidPool};

/// The cloud instance-metadata address, which attempts must not reach (the agent may).
const METADATA_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// How long the end of an attempt waits for its cgroup to empty.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Why the agent cannot isolate attempts.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "cannot sandbox attempts: {0}; fix that, or set isolation = \"none\" in [sandbox] to run jobs \
         unisolated on a node dedicated to one tenant"
    )]
    Unavailable(String),
}

/// What the agent tells the sandbox at start.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub settings: SandboxSection,
    /// The agent's work root: attempts' work directories are made under it; hidden from jobs.
    pub work_root: PathBuf,
    /// Agent files jobs must not see (its config, key, certificate directory).
    pub hide: Vec<PathBuf>,
    /// The agent's name: its cgroup subtree and the sandboxes' hostname.
    pub agent: String,
    /// The `hybroker` binary, re-executed as `sandbox-init`.
    pub init_program: PathBuf,
}

/// The agent's way of isolating attempts, decided once at start.
#[derive(Debug)]
pub struct Sandbox {
    pub isolation: Isolation,
    options: SandboxOptions,
    uids: Option<UidPool>,
    cgroups: Option<CgroupRoot>,
}

/// What a job needs, from its assignment.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptResources {
    pub cpus: u32,
    pub memory_gib: u32,
}

impl Sandbox {
    /// Decides the isolation and proves it by running a sandboxed `true`.
    pub fn start(options: SandboxOptions) -> Result<Arc<Self>, SandboxError> {
        let unavailable = SandboxError::Unavailable;
        if options.settings.isolation == IsolationSetting::None {
            tracing::warn!(
                "sandbox.isolation = \"none\": jobs run unisolated, as the agent's user, with its view of the \
                 node; dedicate this node to one tenant in the broker's config"
            );
            return Ok(Arc::new(Self { isolation: Isolation::None, options, uids: None, cgroups: None }));
        }
        let sandbox = if nix::unistd::geteuid().is_root() {
            let (first, last) = options.settings.uids().map_err(unavailable)?;
            let uids =
                UidPool::new(&options.settings.uid_lock_dir, first, last).map_err(|e| unavailable(e.to_string()))?;
            uids.sweep();
            let cgroups = CgroupRoot::detect(&subtree_name(&options.agent, &options.work_root))
                .map_err(|e| unavailable(e.to_string()))?;
            let swept = cgroups.sweep();
            if swept > 0 {
                tracing::warn!(swept, "killed attempts a previous agent left in its cgroups");
            }
            Self { isolation: Isolation::Sandbox, options, uids: Some(uids), cgroups: Some(cgroups) }
        } else {
            Self { isolation: Isolation::Userns, options, uids: None, cgroups: None }
        };
        sandbox.sweep_work_root();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(sandbox.new_root())
            .map_err(|e| unavailable(format!("{}: {e}", sandbox.new_root().display())))?;
        sandbox.probe().map_err(unavailable)?;
        if sandbox.isolation == Isolation::Userns {
            tracing::warn!(
                "agent is not root: attempts run in unprivileged user namespaces (own PID, mount, IPC and UTS \
                 namespaces, no capabilities, the agent's files hidden) but all as the agent's user, with no \
                 cgroup limits, no device gate and no per-attempt UID; run the agent as root for the full sandbox"
            );
        } else {
            tracing::info!(isolation = %sandbox.isolation, "attempts run sandboxed");
        }
        Ok(Arc::new(sandbox))
    }

    /// Removes what a previous agent process left in the work root (its attempts are dead: killed
    /// by the pid files or the cgroup sweep): disk-cap mounts and work directories, except failed
    /// ones kept on purpose.
    fn sweep_work_root(&self) {
        let root = &self.options.work_root;
        let kept = self.uids.as_ref().map(UidPool::kept_dirs).unwrap_or_default();
        // A kept directory keeps its disk cap mounted: its files are what it is kept for.
        let unmounted = disk::unmount_under(root, &kept);
        let mut removed = 0;
        for job in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if job.file_name().to_string_lossy().starts_with('.') || !job.path().is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(job.path()).into_iter().flatten().flatten() {
                let path = entry.path();
                let is_kept = kept.iter().any(|k| path == *k || path == k.with_extension("img"));
                if !is_kept && std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path)).is_ok() {
                    removed += 1;
                }
            }
            let _ = std::fs::remove_dir(job.path());
        }
        if unmounted + removed > 0 {
            tracing::warn!(unmounted, removed, "removed work directories and disk caps a previous agent left");
        }
    }

    /// The mount point of every sandbox's new root (each attempt's mount namespace is private).
    fn new_root(&self) -> PathBuf {
        self.options.work_root.join(".sandbox-root")
    }

    /// Runs `true` in a sandbox like an attempt's, synchronously (at start only).
    fn probe(&self) -> Result<(), String> {
        let dir = self.options.work_root.join(".probe");
        let _ = uids::remove_tree(&dir);
        let attempt = self.begin("probe", 0, &dir, AttemptResources::default(), Vec::new())?;
        let mut spec = attempt.spec.clone();
        spec.argv = vec!["true".into()];
        spec.env = vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())];
        spec.work_dir = dir.clone();
        spec.error_file = self.options.work_root.join(".probe.error");
        let spec_path = self.options.work_root.join(".probe.spec");
        spec.write(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
        let fds = attempt.join_fds()?;
        let mut command = std::process::Command::new(&self.options.init_program);
        command.arg("sandbox-init").arg(&spec_path).env_clear().stdin(std::process::Stdio::null());
        join_before_exec(&mut command, fds);
        let status = command.status().map_err(|e| format!("{}: {e}", self.options.init_program.display()));
        let error = std::fs::read_to_string(&spec.error_file).unwrap_or_default();
        let _ = std::fs::remove_file(&spec.error_file);
        let _ = std::fs::remove_file(&spec_path);
        attempt.finish(true);
        match status? {
            s if s.success() => Ok(()),
            s => Err(if error.is_empty() { format!("a sandboxed `true` ended with {s}") } else { error }),
        }
    }

    /// Prepares one attempt: its UID, work directory (made here, with its cap), cgroup.
    pub fn begin(
        &self,
        job_id: &str,
        number: u32,
        work_dir: &Path,
        resources: AttemptResources,
        devices: Vec<(PathBuf, String)>,
    ) -> Result<AttemptSandbox, String> {
        let settings = &self.options.settings;
        let claim = match &self.uids {
            Some(pool) => Some(pool.claim().map_err(|e| e.to_string())?),
            None => None,
        };
        let owner = claim.as_ref().map(|c| (c.uid, c.uid));
        make_dir(work_dir).map_err(|e| format!("work directory {}: {e}", work_dir.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(work_dir, Some(uid), Some(gid))
                .map_err(|e| format!("work directory {}: {e}", work_dir.display()))?;
        }
        let mut attempt = AttemptSandbox {
            claim,
            cgroup: None,
            disk: None,
            work_dir: work_dir.to_owned(),
            keep_failed: settings.keep_failed.0,
            memory_mib: None,
            spec: InitSpec::default(),
        };
        if self.isolation == Isolation::None {
            return Ok(attempt);
        }
        if let (Some(owner), true) = (owner, settings.disk_mib > 0) {
            attempt.disk =
                Some(disk::DiskCap::mount(&work_dir.with_extension("img"), work_dir, settings.disk_mib, owner)?);
        }
        if let Some(root) = &self.cgroups {
            let limits = self.limits(resources);
            attempt.memory_mib = limits.memory_bytes.map(|b| b >> 20);
            let rules = devices::rules(devices.iter().map(|(host, _)| host.as_path()));
            let name = format!("{job_id}-{number}");
            let cgroup = root.create(&name, &limits, &rules).map_err(|e| e.to_string())?;
            if settings.network == SandboxNetwork::Host
                && let Err(e) = cgroup.block_ipv4(&[METADATA_ADDRESS])
            {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(
                    || tracing::warn!(error = %e, "attempts can reach the instance metadata address 169.254.169.254"),
                );
            }
            attempt.cgroup = Some(cgroup);
        }
        let agent_ids = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        // Resolved on the host: a mount follows an absolute symbolic link against the host's root,
        // so `/var/run/x` (with `/var/run -> /run`) would otherwise be left unhidden.
        let mut hide = vec![resolved(&self.options.work_root)];
        hide.extend(self.options.hide.iter().map(|p| resolved(p)));
        hide.extend(settings.hide.iter().map(|p| resolved(p)));
        attempt.spec = InitSpec {
            hostname: format!("{}-{job_id}", self.options.agent).chars().take(64).collect(),
            user: owner,
            userns: (self.isolation == Isolation::Userns).then_some(agent_ids),
            private_network: settings.network == SandboxNetwork::Private,
            hide,
            read_write: settings.read_write.iter().map(|p| resolved(p)).collect(),
            devices,
            tmp_mib: settings.tmp_mib,
            new_root: self.new_root(),
            ..InitSpec::default()
        };
        Ok(attempt)
    }

    /// The job's limits: its resources, within the operator's maxima.
    fn limits(&self, r: AttemptResources) -> Limits {
        let s = &self.options.settings;
        let cap = |asked: u64, max: u64| match (asked, max) {
            (0, 0) => None,
            (0, max) => Some(max),
            (asked, 0) => Some(asked),
            (asked, max) => Some(asked.min(max)),
        };
        Limits {
            memory_bytes: cap(u64::from(r.memory_gib) * 1024, s.max_memory_mib).map(|mib| mib << 20),
            cpu_millis: cap(u64::from(r.cpus), u64::from(s.max_cpus)).map(|cpus| cpus * 1000),
            pids: Some(s.pids),
        }
    }

    /// The sandbox-init program and whether attempts run in a sandbox at all.
    pub fn init_program(&self) -> Option<&Path> {
        (self.isolation != Isolation::None).then_some(self.options.init_program.as_path())
    }
}

/// The agent's cgroup subtree: its name and a hash of its work root. The work root is unique
/// among live agents (its lock) and stable across restarts, so a restarted agent sweeps exactly
/// its predecessor's attempts, never those of another agent with the same name on the host.
fn subtree_name(agent: &str, work_root: &Path) -> String {
    let hash = work_root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let name: String = agent.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{name}-{:08x}", hash as u32)
}

/// `path` with every symbolic link resolved, when it exists.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Makes a directory 0700 (the job's directory above it 0711).
fn make_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        // The job's directory (which holds its sandbox's spec, pid and disk image): traversable,
        // not listable.
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// Makes `command`'s child join a cgroup (writing `0` to each `cgroup.procs`) before it execs.
pub fn join_before_exec(command: &mut std::process::Command, fds: Vec<OwnedFd>) {
    use std::os::unix::process::CommandExt;
    if fds.is_empty() {
        return;
    }
    // SAFETY: between fork and exec the closure only calls write(2) on descriptors opened before.
    unsafe {
        command.pre_exec(move || cgroup::join(&fds));
    }
}

/// One attempt's sandbox, from before stage-in to after stage-out.
#[derive(Debug)]
pub struct AttemptSandbox {
    claim: Option<UidClaim>,
    cgroup: Option<AttemptCgroup>,
    disk: Option<disk::DiskCap>,
    work_dir: PathBuf,
    keep_failed: Duration,
    memory_mib: Option<u64>,
    /// The spec without the command, its environment and files (the executor adds them).
    pub spec: InitSpec,
}

impl AttemptSandbox {
    /// A descriptor of the UID claim for the sandbox's init to hold (see [`UidClaim::share`]).
    pub fn claim_fd(&self) -> Result<Option<OwnedFd>, String> {
        self.claim.as_ref().map(|c| c.share().map_err(|e| format!("uid claim: {e}"))).transpose()
    }

    /// Descriptors the child writes `0` to, to join the attempt's cgroup.
    pub fn join_fds(&self) -> Result<Vec<OwnedFd>, String> {
        match &self.cgroup {
            Some(cgroup) => cgroup.join_fds().map_err(|e| e.to_string()),
            None => Ok(Vec::new()),
        }
    }

    /// Kills everything left of the attempt and removes its cgroup; an OOM kill or a full disk
    /// becomes the outcome.
    pub fn after_process(&mut self, outcome: super::executor::Outcome) -> super::executor::Outcome {
        use super::executor::Outcome;
        let mut outcome = outcome;
        if let Some(cgroup) = self.cgroup.take() {
            if !cgroup.kill_all(KILL_WAIT) {
                tracing::warn!(dir = %self.work_dir.display(), "processes of an attempt survive the cgroup kill");
            }
            let kills = cgroup.oom_kills();
            if kills > 0 && !outcome.succeeded() && !matches!(outcome, Outcome::Cancelled | Outcome::TimedOut(_)) {
                let limit = self.memory_mib.map_or("its".to_owned(), |m| format!("{m} MiB"));
                outcome = Outcome::LimitReached(format!(
                    "out of memory: the job reached its memory limit of {limit}; the OOM killer killed {kills} process{} ({})",
                    if kills == 1 { "" } else { "es" },
                    outcome.reason()
                ));
            }
            if let Err(e) = cgroup.remove() {
                tracing::warn!(error = %e, "cannot remove an attempt's cgroup");
            }
        }
        if let Some(disk) = &self.disk
            && !outcome.succeeded()
            && disk.is_full()
        {
            outcome = Outcome::LimitReached(format!("disk cap of {} MiB reached ({})", disk.mib, outcome.reason()));
        }
        outcome
    }

    /// Removes the work directory (or keeps a failed attempt's for `sandbox.keep_failed`, its UID
    /// reserved meanwhile) and frees the UID.
    pub fn finish(mut self, succeeded: bool) {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.kill_all(KILL_WAIT);
            let _ = cgroup.remove();
        }
        if !succeeded && !self.keep_failed.is_zero() {
            if let Some(claim) = &mut self.claim {
                claim.keep(&self.work_dir, self.keep_failed);
            }
            return;
        }
        if let Some(disk) = self.disk.take() {
            disk.remove();
        }
        if let Err(e) = uids::remove_tree(&self.work_dir) {
            tracing::warn!(dir = %self.work_dir.display(), error = %e, "cannot remove a work directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(settings: SandboxSection) -> Sandbox {
        let options = SandboxOptions {
            settings,
            work_root: "/var/lib/hybroker/work".into(),
            hide: Vec::new(),
            agent: "node-a".into(),
            init_program: "hybroker".into(),
        };
        Sandbox { isolation: Isolation::Sandbox, options, uids: None, cgroups: None }
    }

    #[test]
    fn limits_are_the_jobs_resources_within_the_operators_maxima() {
        let open = sandbox(SandboxSection::default());
        let limits = open.limits(AttemptResources { cpus: 2, memory_gib: 3 });
        assert_eq!(limits.memory_bytes, Some(3 << 30));
        assert_eq!(limits.cpu_millis, Some(2000));
        assert_eq!(limits.pids, Some(4096));
        let capped = sandbox(SandboxSection { max_memory_mib: 512, max_cpus: 1, pids: 64, ..Default::default() });
        let limits = capped.limits(AttemptResources { cpus: 4, memory_gib: 3 });
        assert_eq!((limits.memory_bytes, limits.cpu_millis, limits.pids), (Some(512 << 20), Some(1000), Some(64)));
        let unasked = capped.limits(AttemptResources::default());
        assert_eq!(unasked.memory_bytes, Some(512 << 20), "no memory asked: the operator's maximum");
    }

    #[test]
    fn cgroup_subtrees_differ_by_work_root_and_stay_put_across_restarts() {
        let a = subtree_name("node-a", Path::new("/tmp/one/work-node-a"));
        assert_eq!(a, subtree_name("node-a", Path::new("/tmp/one/work-node-a")));
        assert_ne!(a, subtree_name("node-a", Path::new("/tmp/two/work-node-a")));
        assert!(a.starts_with("node-a-") && !a.contains('/'), "{a}");
    }
}
