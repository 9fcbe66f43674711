//! The standard `process_*` metrics, read from `/proc/self` at scrape time (Linux; elsewhere they
//! are left out), and `hybroker_build_info`.

use std::path::Path;

use super::Registry;

/// Clock ticks per second of `/proc`'s CPU times: `USER_HZ`, 100 on every Linux architecture
/// (the kernel converts to it whatever its own tick rate).
const USER_HZ: f64 = 100.0;

/// The process's own numbers, as read from procfs.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ProcessStats {
    pub cpu_seconds: f64,
    pub virtual_bytes: f64,
    pub threads: f64,
    /// Seconds since boot at which the process started.
    pub started_after_boot: f64,
}

/// Parses `/proc/<pid>/stat` (fields per proc(5); the command name may hold spaces and
/// parentheses, so fields are counted after its last `)`).
pub(super) fn parse_stat(stat: &str) -> Option<ProcessStats> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) / USER_HZ,
        threads: field(20)?,
        started_after_boot: field(22)? / USER_HZ,
        virtual_bytes: field(23)?,
    })
}

/// The `VmRSS` line of `/proc/<pid>/status` (in kB there), in bytes.
pub(super) fn parse_resident_bytes(status: &str) -> Option<f64> {
    let kb = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?;
    Some(kb.trim().parse::<f64>().ok()? * 1024.0)
}

/// The `btime` line of `/proc/stat`: when the machine booted, in seconds since the epoch.
pub(super) fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

/// Publishes the `process_*` gauges of this process; leaves out what cannot be read.
pub(super) fn publish(registry: &Registry) {
    let proc = Path::new("/proc/self");
    if let Some(stats) = std::fs::read_to_string(proc.join("stat")).ok().as_deref().and_then(parse_stat) {
        registry.set("process_cpu_seconds_total", &[], stats.cpu_seconds);
        registry.set("process_virtual_memory_bytes", &[], stats.virtual_bytes);
        registry.set("process_threads", &[], stats.threads);
        if let Some(boot) = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_boot_time) {
            registry.set("process_start_time_seconds", &[], boot + stats.started_after_boot);
        }
    }
    if let Some(bytes) = std::fs::read_to_string(proc.join("status")).ok().as_deref().and_then(parse_resident_bytes) {
        registry.set("process_resident_memory_bytes", &[], bytes);
    }
    if let Ok(fds) = std::fs::read_dir(proc.join("fd")) {
        // The directory listing itself holds one descriptor while it is read: not counted.
        registry.set("process_open_fds", &[], fds.count().saturating_sub(1) as f64);
    }
    if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        registry.set("process_max_fds", &[], soft as f64);
    }
}

/// The commit this binary was built from, when the build was given one (`HYBROKER_COMMIT` set
/// while compiling); no build script looks it up.
const COMMIT: Option<&str> = option_env!("HYBROKER_COMMIT");

/// `hybroker_build_info{version, commit} 1` (`commit` empty when unknown).
pub(super) fn publish_build_info(registry: &Registry) {
    registry.set("hybroker_build_info", &[env!("CARGO_PKG_VERSION"), COMMIT.unwrap_or("")], 1.0);
}
