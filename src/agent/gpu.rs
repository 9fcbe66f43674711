//! This node's inventory: GPUs from NVML (plus simulated ones), CPUs and memory.
//!
//! NVML (`libnvidia-ml.so.1`) is loaded at run time, so the same binary runs on a node without a
//! driver: it then reports no real GPUs and still runs CPU jobs. A GPU is unhealthy when it has
//! volatile uncorrected ECC errors or when a query says it is lost (fallen off the bus, needs a
//! reset); a query that is merely not supported on a board leaves the value at 0 and the GPU
//! healthy.
//!
//! [`GpuProbe`] is `Send + Sync`; put it in an `Arc` and call [`GpuProbe::gpus`] from
//! `tokio::task::spawn_blocking`, since NVML calls block (briefly on a sound GPU, longer on a
//! sick one).

use std::collections::BTreeMap;
use std::sync::Mutex;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use crate::model::gpu::{Gpu, SimulatedGpus, canonical_model, simulated_gpus};

/// `MigMode::current` value meaning MIG is enabled (`NVML_DEVICE_MIG_ENABLE`).
const MIG_ENABLED: u32 = 1;

/// What stays true of a real GPU between probes, kept so a GPU that falls off the bus is still
/// reported (as unhealthy) under its UUID and model.
#[derive(Debug, Clone)]
struct Known {
    uuid: String,
    name: String,
    model: String,
    memory_mib: u64,
    /// The driver's minor number: the GPU's node is `/dev/nvidia<minor>` (not the CUDA index).
    minor: Option<u32>,
    /// Health at the last probe, to log changes once instead of at every heartbeat.
    healthy: bool,
}

/// Reads the GPU inventory of this node: real GPUs from NVML, then simulated ones.
pub struct GpuProbe {
    nvml: Option<Nvml>,
    simulated: Vec<SimulatedGpus>,
    node: String,
    known: Mutex<BTreeMap<u32, Known>>,
}

impl std::fmt::Debug for GpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuProbe")
            .field("nvml", &self.nvml.is_some())
            .field("simulated", &self.simulated)
            .field("node", &self.node)
            .finish()
    }
}

impl GpuProbe {
    /// Loads NVML if it can; without it (no driver, no library) it logs once at info and reports
    /// only the simulated GPUs. `node` names the simulated GPUs' UUIDs.
    pub fn new(simulated: Vec<SimulatedGpus>, node: &str) -> Self {
        let nvml = match Nvml::init() {
            Ok(nvml) => {
                let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
                tracing::info!(driver = %driver, "nvml loaded");
                Some(nvml)
            }
            Err(error) => {
                tracing::info!(%error, "nvml not available; reporting no real gpus");
                None
            }
        };
        Self::with_nvml(nvml, simulated, node)
    }

    /// A probe that never loads NVML: only the simulated GPUs (tests, `--simulate-gpus` demos on
    /// a GPU machine).
    pub fn simulated_only(simulated: Vec<SimulatedGpus>, node: &str) -> Self {
        Self::with_nvml(None, simulated, node)
    }

    fn with_nvml(nvml: Option<Nvml>, simulated: Vec<SimulatedGpus>, node: &str) -> Self {
        Self { nvml, simulated, node: node.to_owned(), known: Mutex::new(BTreeMap::new()) }
    }

    /// Whether NVML was loaded.
    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// The GPUs now: real ones by NVML index, then the simulated ones numbered after them.
    pub fn gpus(&self) -> Vec<Gpu> {
        let mut gpus = match &self.nvml {
            Some(nvml) => self.real_gpus(nvml),
            None => Vec::new(),
        };
        let next = gpus.iter().map(|g| g.index + 1).max().unwrap_or(0);
        gpus.extend(simulated_gpus(&self.simulated, next, &self.node));
        gpus
    }

    /// The device node of the real GPU `index`, from its NVML minor number (`/dev/nvidia<minor>`;
    /// the CUDA index may differ). `None` for a simulated or unknown GPU.
    pub fn device_node(&self, index: u32) -> Option<std::path::PathBuf> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let minor = known.get(&index)?.minor?;
        Some(format!("/dev/nvidia{minor}").into())
    }

    fn real_gpus(&self, nvml: &Nvml) -> Vec<Gpu> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match nvml.device_count() {
            Ok(count) => (0..count).filter_map(|index| probe_device(nvml, index, &mut known)).collect(),
            Err(error) => {
                // Without a count, the GPUs seen before are all that can be said: unusable now.
                tracing::warn!(%error, "nvml device count failed");
                known.iter_mut().map(|(&index, k)| lost_gpu(index, k, &error.to_string())).collect()
            }
        }
    }
}

/// Whether an error says the GPU itself is in trouble (as opposed to "not supported here").
fn is_gpu_failure(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::GpuLost
            | NvmlError::ResetRequired
            | NvmlError::IrqIssue
            | NvmlError::InsufficientPower
            | NvmlError::CorruptedInfoROM
    )
}

/// Whether an error only says that a query is not available on this board, driver or user.
fn is_unsupported(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::NotSupported
            | NvmlError::NoPermission
            | NvmlError::NoData
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
    )
}

/// Collects query results for one GPU, turning failures into 0 values and a health verdict.
struct Queries {
    index: u32,
    failure: Option<String>,
}

impl Queries {
    /// `identity` queries (handle, UUID, memory) also count an unexplained error as a failure:
    /// "Unknown Error" is how NVML usually reports a GPU that is gone.
    fn check<T>(&mut self, what: &str, identity: bool, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) if is_unsupported(&error) => None,
            Err(error) => {
                if is_gpu_failure(&error) || (identity && matches!(error, NvmlError::Unknown)) {
                    self.failure.get_or_insert_with(|| format!("{what}: {error}"));
                } else {
                    tracing::debug!(index = self.index, %error, "nvml {what} failed");
                }
                None
            }
        }
    }
}

/// Probes one GPU; `None` for a device this process may not use (it is then not reported).
fn probe_device(nvml: &Nvml, index: u32, known: &mut BTreeMap<u32, Known>) -> Option<Gpu> {
    let mut q = Queries { index, failure: None };
    let Some(device) = q.check("device handle", true, nvml.device_by_index(index)) else {
        return handle_failed(index, q.failure, known);
    };
    let uuid = q.check("uuid", true, device.uuid());
    let name = q.check("name", false, device.name());
    let memory_info = q.check("memory", true, device.memory_info());
    let memory = memory_info.as_ref().map(|m| m.total / (1024 * 1024));
    let utilization = q.check("utilization", false, device.utilization_rates());
    let temperature = q.check("temperature", false, device.temperature(TemperatureSensor::Gpu));
    let power = q.check("power", false, device.power_usage());
    let ecc = q.check("ecc errors", false, device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
    let mig = q.check("mig mode", false, device.mig_mode());
    let minor = q.check("minor number", false, device.minor_number());

    let ecc_errors = ecc.unwrap_or(0);
    if ecc_errors > 0 {
        q.failure.get_or_insert_with(|| format!("{ecc_errors} volatile uncorrected ecc errors"));
    }
    let previous = known.get(&index);
    let uuid = uuid.or_else(|| previous.map(|k| k.uuid.clone())).unwrap_or_else(|| format!("GPU-unknown-{index}"));
    let name = name.or_else(|| previous.map(|k| k.name.clone())).unwrap_or_default();
    let memory_mib = memory.or_else(|| previous.map(|k| k.memory_mib)).unwrap_or(0);
    let model = canonical_model(&name, memory_mib);
    let healthy = q.failure.is_none();
    log_health_change(index, &uuid, previous.is_none_or(|k| k.healthy), healthy, q.failure.as_deref());
    let minor = minor.or_else(|| previous.and_then(|k| k.minor));
    known.insert(
        index,
        Known { uuid: uuid.clone(), name: name.clone(), model: model.clone(), memory_mib, minor, healthy },
    );
    Some(Gpu {
        index,
        uuid,
        model,
        name,
        memory_mib,
        memory_used_mib: memory_info.map_or(0, |m| m.used / (1024 * 1024)),
        healthy,
        simulated: false,
        utilization_pct: utilization.map_or(0, |u| u.gpu),
        temperature_c: temperature.unwrap_or(0),
        power_mw: power.unwrap_or(0),
        ecc_errors,
        mig_enabled: mig.is_some_and(|m| m.current == MIG_ENABLED),
    })
}

/// A device whose handle cannot be had: unhealthy if it was seen before or the error says it
/// failed; otherwise (no permission, say) not this agent's to report.
fn handle_failed(index: u32, failure: Option<String>, known: &mut BTreeMap<u32, Known>) -> Option<Gpu> {
    let reason = match (&failure, known.contains_key(&index)) {
        (Some(reason), _) => reason.clone(),
        (None, true) => "device handle unavailable".to_owned(),
        (None, false) => {
            tracing::debug!(index, "gpu not usable by this agent; not reported");
            return None;
        }
    };
    let k = known.entry(index).or_insert_with(|| Known {
        uuid: format!("GPU-unknown-{index}"),
        name: String::new(),
        model: canonical_model("", 0),
        memory_mib: 0,
        minor: None,
        healthy: true,
    });
    Some(lost_gpu(index, k, &reason))
}

/// A GPU seen before that cannot be queried now: reported unhealthy under its last identity.
fn lost_gpu(index: u32, k: &mut Known, reason: &str) -> Gpu {
    log_health_change(index, &k.uuid, k.healthy, false, Some(reason));
    k.healthy = false;
    Gpu {
        index,
        uuid: k.uuid.clone(),
        model: k.model.clone(),
        name: k.name.clone(),
        memory_mib: k.memory_mib,
        memory_used_mib: 0,
        healthy: false,
        simulated: false,
        utilization_pct: 0,
        temperature_c: 0,
        power_mw: 0,
        ecc_errors: 0,
        mig_enabled: false,
    }
}

/// Logs a GPU turning unhealthy (warn, with the reason) or healthy again (info), once per change.
fn log_health_change(index: u32, uuid: &str, was: bool, now: bool, reason: Option<&str>) {
    match (was, now) {
        (true, false) => {
            let reason = reason.unwrap_or("unknown");
            tracing::warn!(index, uuid, reason, "gpu unhealthy");
        }
        (false, true) => tracing::info!(index, uuid, "gpu healthy again"),
        _ => {}
    }
}

/// CPUs this process may use (affinity and cgroup quota respected), at least 1.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)).unwrap_or(1)
}

/// Memory of this host in MiB: `MemTotal` of `/proc/meminfo`, lowered to the cgroup v2 limit
/// (`/sys/fs/cgroup/memory.max`) when one is set, as in a container. 0 when unknown.
pub fn host_memory_mib() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo_total_mib(&s)).unwrap_or(0);
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| parse_cgroup_limit_mib(&s));
    match limit {
        Some(limit) if total == 0 || limit < total => limit,
        _ => total,
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
fn parse_meminfo_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

/// A cgroup v2 `memory.max` value in MiB; `None` for `max` (no limit) or garbage.
fn parse_cgroup_limit_mib(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().map(|bytes| bytes / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpu::parse_simulated;

    #[test]
    fn probe_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<GpuProbe>();
    }

    #[test]
    fn simulated_gpus_follow_real_ones() {
        let probe = GpuProbe::simulated_only(parse_simulated("2xH100-80GB").unwrap(), "n1");
        assert!(!probe.has_nvml());
        let gpus = probe.gpus();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert_eq!(gpus[1].uuid, "GPU-sim-n1-1");
        assert!(gpus.iter().all(|g| g.simulated && g.healthy));
    }

    /// Works with and without a driver: every real GPU comes first, then the simulated ones.
    #[test]
    fn probe_reports_real_then_simulated() {
        let probe = GpuProbe::new(parse_simulated("1xL4-24GB").unwrap(), "n1");
        let gpus = probe.gpus();
        let real: Vec<_> = gpus.iter().filter(|g| !g.simulated).collect();
        assert_eq!(gpus.len(), real.len() + 1);
        assert!(gpus.last().unwrap().simulated);
        for g in &real {
            assert!(g.uuid.starts_with("GPU-"), "{g:?}");
            assert!(g.memory_mib > 0, "{g:?}");
            eprintln!("real gpu: {g:?}");
        }
        if !probe.has_nvml() {
            assert!(real.is_empty());
        }
    }

    #[test]
    fn error_classes() {
        assert!(is_gpu_failure(&NvmlError::GpuLost));
        assert!(is_gpu_failure(&NvmlError::ResetRequired));
        assert!(!is_gpu_failure(&NvmlError::NotSupported));
        assert!(is_unsupported(&NvmlError::NotSupported));
        let mut q = Queries { index: 0, failure: None };
        assert_eq!(q.check::<u32>("power", false, Err(NvmlError::NotSupported)), None);
        assert_eq!(q.check::<u32>("power", false, Err(NvmlError::Unknown)), None);
        assert!(q.failure.is_none());
        assert_eq!(q.check::<u32>("uuid", true, Err(NvmlError::Unknown)), None);
        assert!(q.failure.is_some());
        let mut q = Queries { index: 0, failure: None };
        assert_eq!(q.check::<u32>("temperature", false, Err(NvmlError::GpuLost)), None);
        assert_eq!(
            q.failure.as_deref(),
            Some("temperature: device fell off the bus or has otherwise become inacessible")
        );
    }

    #[test]
    fn host_resources() {
        assert!(host_cpus() >= 1);
        let meminfo = "MemTotal:       131072000 kB\nMemFree:         1024 kB\n";
        assert_eq!(parse_meminfo_total_mib(meminfo), Some(128_000));
        assert_eq!(parse_meminfo_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_cgroup_limit_mib("max\n"), None);
        assert_eq!(parse_cgroup_limit_mib("8589934592\n"), Some(8192));
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(host_memory_mib() > 0);
        }
    }
}
