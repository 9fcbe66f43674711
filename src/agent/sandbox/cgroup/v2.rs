//! cgroup v2: the unified hierarchy; controllers enabled down the subtree, limits, `cgroup.kill`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{CgroupError, Limits, SUBTREE_DIR, keyed_value, v1, wait_until, write_control, write_if_present};

/// The controllers the attempts' leaves get, where the hierarchy has them.
const WANTED: [&str; 4] = ["memory", "cpu", "pids", "io"];

/// Makes `hybroker/<segment>` under the cgroup2 mount `root`, enabling the wanted controllers in
/// `cgroup.subtree_control` of the root, `hybroker` and the subtree itself, so each attempt's
/// leaf gets them. (A non-root cgroup with controllers enabled for its children holds no
/// processes, so attempts are leaves and the agent itself lives elsewhere.)
pub(super) fn make_subtree(root: &Path, segment: &str) -> Result<PathBuf, CgroupError> {
    let subtree = root.join(SUBTREE_DIR).join(segment);
    std::fs::create_dir_all(&subtree).map_err(|e| CgroupError::new(&subtree, e))?;
    for dir in [root.to_path_buf(), root.join(SUBTREE_DIR), subtree.clone()] {
        enable_controllers(&dir)?;
    }
    Ok(subtree)
}

/// Enables in `dir/cgroup.subtree_control` the wanted controllers `dir/cgroup.controllers` offers.
/// All at once first; one by one if the kernel refuses the set (so one refusal, such as `cpu`
/// beside a real-time task, costs only that controller).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = enabled_controllers(dir);
    let missing: Vec<&str> = WANTED
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c) && !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let control = dir.join("cgroup.subtree_control");
    let all: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    if write_control(&control, &all.join(" ")).is_ok() {
        return Ok(());
    }
    let mut first_error = None;
    for one in &all {
        if let Err(e) = write_control(&control, one) {
            first_error.get_or_insert(e);
        }
    }
    // Nothing enabled at all is an error; a partial set is what the controllers() log shows.
    match first_error {
        Some(e) if enabled_controllers(dir).is_empty() => Err(e),
        _ => Ok(()),
    }
}

/// The controllers `dir` enables for its children.
pub(super) fn enabled_controllers(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    text.split_whitespace().map(|c| c.trim_start_matches('+').to_string()).collect()
}

/// Writes the limits into the attempt's leaf, each only where its file exists (a controller the
/// hierarchy lacks is skipped).
pub(super) fn write_limits(leaf: &Path, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(bytes) = limits.memory_bytes {
        write_if_present(&leaf.join("memory.max"), &bytes.to_string())?;
        write_if_present(&leaf.join("memory.swap.max"), "0")?;
    }
    // The OOM killer takes the attempt as a whole: no half-dead job carries on.
    write_if_present(&leaf.join("memory.oom.group"), "1")?;
    if let Some(millis) = limits.cpu_millis {
        write_if_present(&leaf.join("cpu.max"), &format!("{} 100000", v1::cfs_quota_us(millis)))?;
    }
    if let Some(pids) = limits.pids {
        write_if_present(&leaf.join("pids.max"), &pids.to_string())?;
    }
    Ok(())
}

/// `populated` of `cgroup.events`: a process in the cgroup or below.
pub(super) fn is_populated(leaf: &Path) -> bool {
    keyed_value(&leaf.join("cgroup.events"), "populated").is_some_and(|n| n > 0)
}

/// Writes `1` to `cgroup.kill` (Linux ≥ 5.14): SIGKILL to the whole subtree, forks in flight
/// included. Returns whether the kernel took it.
pub(super) fn write_kill(leaf: &Path) -> bool {
    let kill = leaf.join("cgroup.kill");
    kill.exists() && write_control(&kill, "1").is_ok()
}

/// The fallback without `cgroup.kill`: freeze (`cgroup.freeze`, wait for `frozen 1`), SIGKILL
/// each listed process, thaw.
pub(super) fn freeze_kill_thaw(leaf: &Path, until: Instant) {
    let freeze = leaf.join("cgroup.freeze");
    if write_control(&freeze, "1").is_ok() {
        let events = leaf.join("cgroup.events");
        wait_until(until, || keyed_value(&events, "frozen") == Some(1));
    }
    v1::kill_each(leaf);
    let _ = write_control(&freeze, "0");
}

/// `oom_kill` of `memory.events` (hierarchical count of OOM-killer victims).
pub(super) fn oom_kills(leaf: &Path) -> u64 {
    keyed_value(&leaf.join("memory.events"), "oom_kill").unwrap_or(0)
}
