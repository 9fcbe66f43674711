//! cgroup v1: one directory per controller hierarchy; limits, the `devices` gate, freezer kills.

use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{CgroupError, Device, DeviceRules, Limits, SUBTREE_DIR, wait_until, write_control, write_if_present};

/// A v1 controller hierarchy the attempts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Controller {
    Memory,
    Cpu,
    Pids,
    Devices,
    Freezer,
}

impl Controller {
    /// blkio is left out: v1 throttles only direct I/O, and joining a hierarchy costs a migration.
    const ALL: [Controller; 5] =
        [Controller::Memory, Controller::Cpu, Controller::Pids, Controller::Devices, Controller::Freezer];

    /// The controller's name, which is also its mount directory under the v1 root.
    pub(super) fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Devices => "devices",
            Controller::Freezer => "freezer",
        }
    }
}

/// The CFS period written with every quota, in microseconds.
const CFS_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel takes, in microseconds.
const CFS_MIN_QUOTA_US: u64 = 1_000;

/// Makes `hybroker/<segment>` in every mounted controller hierarchy under `root`. The devices
/// hierarchy is required: without it there is no device gate.
pub(super) fn make_subtrees(root: &Path, segment: &str) -> Result<Vec<(Controller, PathBuf)>, CgroupError> {
    let mut subtrees = Vec::new();
    for controller in Controller::ALL {
        let mount = root.join(controller.name());
        if !mount.join("cgroup.procs").exists() {
            continue;
        }
        let subtree = mount.join(SUBTREE_DIR).join(segment);
        std::fs::create_dir_all(&subtree).map_err(|e| CgroupError::new(&subtree, e))?;
        subtrees.push((controller, subtree));
    }
    if !subtrees.iter().any(|(c, _)| *c == Controller::Devices) {
        let devices = root.join(Controller::Devices.name());
        let message = "the cgroup v1 devices controller is not mounted here (no device gate without it)";
        return Err(CgroupError::other(&devices, std::io::ErrorKind::NotFound, message.into()));
    }
    Ok(subtrees)
}

/// Writes the limits and the device gate into the attempt's fresh leaves.
pub(super) fn apply(
    leaves: &[(Controller, PathBuf)],
    limits: &Limits,
    devices: &DeviceRules,
) -> Result<(), CgroupError> {
    for (controller, dir) in leaves {
        match controller {
            Controller::Memory => {
                if let Some(bytes) = limits.memory_bytes {
                    write_control(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write_control(&memsw, &bytes.to_string())?;
                    } else {
                        write_if_present(&dir.join("memory.swappiness"), "0")?;
                    }
                }
            }
            Controller::Cpu => {
                if let Some(millis) = limits.cpu_millis {
                    write_control(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write_control(&dir.join("cpu.cfs_quota_us"), &cfs_quota_us(millis).to_string())?;
                }
            }
            Controller::Pids => {
                if let Some(pids) = limits.pids {
                    write_control(&dir.join("pids.max"), &pids.to_string())?;
                }
            }
            Controller::Devices => {
                write_control(&dir.join("devices.deny"), "a")?;
                for device in &devices.allow {
                    write_control(&dir.join("devices.allow"), &device_rule(device))?;
                }
            }
            Controller::Freezer => {}
        }
    }
    Ok(())
}

/// The CFS quota for `millis` thousandths of a CPU per [`CFS_PERIOD_US`].
pub(super) fn cfs_quota_us(millis: u64) -> u64 {
    millis.saturating_mul(CFS_PERIOD_US / 1000).max(CFS_MIN_QUOTA_US)
}

/// A `devices.allow` line: `c 195:0 rwm`, `c 136:* rwm`.
pub(super) fn device_rule(device: &Device) -> String {
    let minor = if device.minor == Device::ANY_MINOR { "*".to_string() } else { device.minor.to_string() };
    format!("{} {}:{minor} rwm", device.kind, device.major)
}

/// The process ids in the cgroup (not its descendants).
pub(super) fn procs(dir: &Path) -> Vec<i32> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    text.lines().filter_map(|line| line.trim().parse().ok()).collect()
}

/// SIGKILLs every process listed in the cgroup (they may fork meanwhile: see [`freeze_kill_thaw`]).
pub(super) fn kill_each(dir: &Path) {
    for pid in procs(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Freezes the cgroup so nothing in it can fork, SIGKILLs every process in it, thaws it so the
/// signals are delivered. A freeze not done by `until` is given up on (the kill still happens).
pub(super) fn freeze_kill_thaw(dir: &Path, until: Instant) {
    if procs(dir).is_empty() {
        return;
    }
    let state = dir.join("freezer.state");
    if write_control(&state, "FROZEN").is_ok() {
        wait_until(until, || std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN"));
    }
    kill_each(dir);
    let _ = write_control(&state, "THAWED");
}

/// `oom_kill` of `memory.oom_control` (victims of the OOM killer in this cgroup).
pub(super) fn oom_kills(dir: &Path) -> u64 {
    super::keyed_value(&dir.join("memory.oom_control"), "oom_kill").unwrap_or(0)
}
