//! `hybroker agent`'s configuration: the broker to dial, staging, the sandbox, reconnects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, check_tls, finish, load_toml};
use crate::model::duration::HumanDuration;
use crate::model::gpu::{SimulatedGpus, parse_simulated};
use crate::tls::TlsPaths;

/// `hybroker agent`'s configuration (`config/agent.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub tls: TlsPaths,
    #[serde(default)]
    pub reconnect: ReconnectSection,
    #[serde(default)]
    pub staging: AgentStagingSection,
    /// `[sandbox]`: how attempts are isolated from each other and from the node.
    #[serde(default)]
    pub sandbox: SandboxSection,
    /// `[metrics]`: Prometheus `/metrics` (off unless `listen` is set).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsSection,
    /// `[telemetry]`: OpenTelemetry trace export (off unless an endpoint is configured).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
    /// The file this was loaded from (hidden from jobs); not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How the agent moves job data (through the presigned URLs the broker hands it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStagingSection {
    /// Requests in flight at once (files and ranges of big files).
    #[serde(default = "default_staging_concurrency")]
    pub concurrency: usize,
    /// Tries of one request on 5xx, timeouts and connection errors, with jittered backoff.
    #[serde(default = "default_staging_retries")]
    pub retries: u32,
    #[serde(default = "default_staging_min_backoff")]
    pub min_backoff: HumanDuration,
    #[serde(default = "default_staging_max_backoff")]
    pub max_backoff: HumanDuration,
    /// One request's limit (a ranged GET or a part PUT of at most a few tens of MiB).
    #[serde(default = "default_staging_request_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_staging_concurrency() -> usize {
    8
}

fn default_staging_retries() -> u32 {
    5
}

fn default_staging_min_backoff() -> HumanDuration {
    Duration::from_millis(200).into()
}

fn default_staging_max_backoff() -> HumanDuration {
    Duration::from_secs(10).into()
}

fn default_staging_request_timeout() -> HumanDuration {
    Duration::from_secs(120).into()
}

impl Default for AgentStagingSection {
    fn default() -> Self {
        Self {
            concurrency: default_staging_concurrency(),
            retries: default_staging_retries(),
            min_backoff: default_staging_min_backoff(),
            max_backoff: default_staging_max_backoff(),
            request_timeout: default_staging_request_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// The broker's gRPC address, `https://host:port`.
    pub broker_url: String,
    /// The name to verify in the broker's certificate; default: the URL's host.
    #[serde(default)]
    pub broker_server_name: Option<String>,
    /// Per-attempt work directories are made under this directory.
    pub work_dir: PathBuf,
    /// Deprecated: attempts run as per-attempt UIDs from `sandbox.uid_range`. Still accepted (and
    /// ignored with a WARN at start) so old configs load.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Simulated GPUs for tests and demos, e.g. `4xH100-80GB,2xL4-24GB` (marked simulated everywhere).
    #[serde(default)]
    pub simulate_gpus: String,
    /// CPUs offered to jobs; 0 = all of the host's.
    #[serde(default)]
    pub cpus: u32,
    /// Memory offered to jobs in MiB; 0 = all of the host's.
    #[serde(default)]
    pub memory_mib: u64,
    /// Free-form labels reported with the inventory.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A join file (`hybroker admin agents token create --output-file`): when the node has no
    /// valid certificate at `tls.cert`, the agent makes its key and enrols with the file's token.
    /// `--join-file` sets it too; the token itself is never on the command line.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The node name to enrol as when the join file names none (a multi-use token for a whole
    /// site); on Kubernetes the DaemonSet sets `HYBROKER_AGENT__NODE_NAME` from `spec.nodeName`,
    /// since a pod's host name is the pod's. Default: the instance name with `cloud`, else the
    /// host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `aws` or `azure` on a launched cloud instance: the agent names its node after the instance
    /// id from the instance metadata service and watches it for spot interruption notices.
    #[serde(default)]
    pub cloud: Option<CloudKind>,
    /// The instance metadata service; default `http://169.254.169.254` (tests serve one on loopback).
    #[serde(default)]
    pub metadata_url: Option<String>,
    /// How often the metadata service is asked for a spot interruption notice (with `cloud`);
    /// default 5s on AWS, 1s on Azure.
    #[serde(default)]
    pub spot_poll: Option<HumanDuration>,
}

impl AgentSection {
    /// `spot_poll`, or the cloud's default.
    pub fn spot_poll_or_default(&self) -> Option<Duration> {
        let default = match self.cloud? {
            CloudKind::Aws => Duration::from_secs(5),
            CloudKind::Azure => Duration::from_secs(1),
        };
        Some(self.spot_poll.map_or(default, |p| p.0))
    }
}

/// `agent.cloud`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloudKind {
    Aws,
    Azure,
}

/// `[sandbox]`: the per-attempt sandbox (namespaces, a per-attempt UID, a cgroup, a device gate).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSection {
    /// `auto`: the full sandbox as root, else unprivileged user namespaces; the agent refuses to
    /// start when neither works. `none`: no isolation (the node must be dedicated to one tenant).
    #[serde(default)]
    pub isolation: IsolationSetting,
    /// UIDs (and GIDs) for attempts, `"first-last"`, claimed host-wide one per live attempt.
    #[serde(default = "default_uid_range")]
    pub uid_range: String,
    /// Where UID claims (one locked file per UID) are kept, shared by every agent on the host.
    #[serde(default = "default_uid_lock_dir")]
    pub uid_lock_dir: PathBuf,
    /// `host`: the host's network except 169.254.169.254; `private`: an empty network namespace.
    #[serde(default)]
    pub network: SandboxNetwork,
    /// Memory limit when a job's `memory_gib` is 0, and the most any job gets (MiB; 0 = none).
    #[serde(default)]
    pub max_memory_mib: u64,
    /// The most CPUs any job gets (0 = none; a job gets its `cpus`).
    #[serde(default)]
    pub max_cpus: u32,
    /// Processes (and threads) per attempt.
    #[serde(default = "default_pids")]
    pub pids: u64,
    /// Size of the attempt's private `/tmp` and `/dev/shm` (MiB, each; charged to its memory).
    #[serde(default = "default_tmp_mib")]
    pub tmp_mib: u64,
    /// A cap on each attempt's work directory (MiB; 0 = none): a sparse ext4 image per attempt.
    #[serde(default)]
    pub disk_mib: u64,
    /// How long a failed attempt's work directory is kept (still owned by its UID, which is not
    /// reused meanwhile); `0s` removes it at once, like a successful one's.
    #[serde(default = "default_keep_failed")]
    pub keep_failed: HumanDuration,
    /// Extra host paths hidden from attempts (an empty directory or file in their place).
    #[serde(default)]
    pub hide: Vec<PathBuf>,
    /// Extra host paths attempts may write (everything else of the host is read-only).
    #[serde(default)]
    pub read_write: Vec<PathBuf>,
    /// Device nodes standing in for simulated GPUs, by index (tests and demos):
    /// `["/dev/full", "/dev/kmsg"]` gives simulated GPU 0 the node 1:7, GPU 1 the node 1:11.
    #[serde(default)]
    pub simulated_gpu_devices: Vec<PathBuf>,
}

/// `sandbox.isolation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationSetting {
    #[default]
    Auto,
    None,
}

/// `sandbox.network`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxNetwork {
    #[default]
    Host,
    Private,
}

fn default_uid_range() -> String {
    "2000000-2065535".into()
}

fn default_uid_lock_dir() -> PathBuf {
    "/run/hybroker/uids".into()
}

fn default_pids() -> u64 {
    4096
}

fn default_tmp_mib() -> u64 {
    1024
}

fn default_keep_failed() -> HumanDuration {
    Duration::ZERO.into()
}

impl Default for SandboxSection {
    fn default() -> Self {
        Self {
            isolation: IsolationSetting::Auto,
            uid_range: default_uid_range(),
            uid_lock_dir: default_uid_lock_dir(),
            network: SandboxNetwork::Host,
            max_memory_mib: 0,
            max_cpus: 0,
            pids: default_pids(),
            tmp_mib: default_tmp_mib(),
            disk_mib: 0,
            keep_failed: default_keep_failed(),
            hide: Vec::new(),
            read_write: Vec::new(),
            simulated_gpu_devices: Vec::new(),
        }
    }
}

impl SandboxSection {
    /// `uid_range` as `(first, last)`, inclusive.
    pub fn uids(&self) -> Result<(u32, u32), String> {
        let (a, b) = self.uid_range.split_once('-').ok_or("expected \"first-last\"")?;
        let first: u32 = a.trim().parse().map_err(|_| format!("{a:?} is not a uid"))?;
        let last: u32 = b.trim().parse().map_err(|_| format!("{b:?} is not a uid"))?;
        if first < 1000 || last < first || last >= 1 << 31 {
            return Err("must be first-last with 1000 <= first <= last < 2^31".into());
        }
        Ok((first, last))
    }

    fn check(&self, problems: &mut Vec<String>) {
        if let Err(e) = self.uids() {
            problems.push(format!("sandbox.uid_range {:?}: {e}", self.uid_range));
        }
        if self.pids < 16 {
            problems.push("sandbox.pids must be at least 16".into());
        }
        if self.tmp_mib == 0 {
            problems.push("sandbox.tmp_mib must be more than 0".into());
        }
        if self.disk_mib != 0 && self.disk_mib < 16 {
            problems.push("sandbox.disk_mib must be 0 (no cap) or at least 16".into());
        }
        for (key, paths) in [("hide", &self.hide), ("read_write", &self.read_write)] {
            for p in paths.iter().filter(|p| !p.is_absolute() || p == &Path::new("/")) {
                problems.push(format!("sandbox.{key}: {} must be an absolute path other than /", p.display()));
            }
        }
        for p in self.simulated_gpu_devices.iter().filter(|p| !p.is_absolute()) {
            problems.push(format!("sandbox.simulated_gpu_devices: {} must be an absolute path", p.display()));
        }
    }
}

/// Backoff between reconnects: doubles from `min` to `max`, with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectSection {
    #[serde(default = "default_backoff_min")]
    pub min_backoff: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub max_backoff: HumanDuration,
}

fn default_backoff_min() -> HumanDuration {
    Duration::from_millis(200).into()
}

fn default_backoff_max() -> HumanDuration {
    Duration::from_secs(10).into()
}

impl Default for ReconnectSection {
    fn default() -> Self {
        Self { min_backoff: default_backoff_min(), max_backoff: default_backoff_max() }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_joining(path, None)
    }

    /// [`AgentConfig::load`], with `join_file` (from `--join-file`) replacing `agent.join_token_file`.
    pub fn load_joining(path: &Path, join_file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let mut config: Self = load_toml(path, std::env::vars())?;
        if join_file.is_some() {
            config.agent.join_token_file = join_file;
        }
        config.validate(path)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    pub fn simulated_gpus(&self) -> Vec<SimulatedGpus> {
        parse_simulated(&self.agent.simulate_gpus).unwrap_or_default()
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        match &self.agent.join_token_file {
            // The enrolment writes the certificate, key and CA bundle.
            Some(join) if !join.is_file() => {
                problems.push(format!("agent.join_token_file: {} does not exist", join.display()));
            }
            Some(_) => {}
            None => check_tls(&self.tls, &mut problems),
        }
        self.telemetry.check(&mut problems);
        if !self.agent.broker_url.starts_with("https://") {
            problems.push(format!("agent.broker_url {:?} must start with https://", self.agent.broker_url));
        }
        if let Some(Err(e)) = self.agent.node_name.as_deref().map(|n| crate::model::identity::validate_name("node", n))
        {
            problems.push(format!("agent.node_name: {e}"));
        }
        if let Err(e) = parse_simulated(&self.agent.simulate_gpus) {
            problems.push(format!("agent.simulate_gpus: {e}"));
        }
        if self.agent.run_as.as_deref().is_some_and(|u| u.is_empty() || u == "root") {
            problems.push("agent.run_as must name an unprivileged user".into());
        }
        self.sandbox.check(&mut problems);
        if self.agent.spot_poll.is_some_and(|p| p.0 < Duration::from_millis(50) || p.0 > Duration::from_secs(60)) {
            problems.push("agent.spot_poll must be 50ms to 60s".into());
        }
        if let Some(url) = &self.agent.metadata_url
            && !url.starts_with("http://")
        {
            problems.push(format!("agent.metadata_url {url:?} must start with http://"));
        }
        let (min, max) = (self.reconnect.min_backoff.0, self.reconnect.max_backoff.0);
        if min.is_zero() || min > max {
            problems.push("reconnect.min_backoff must be more than 0 and at most reconnect.max_backoff".into());
        }
        let st = &self.staging;
        if !(1..=256).contains(&st.concurrency) {
            problems.push("staging.concurrency must be 1 to 256".into());
        }
        if st.retries == 0 || st.retries > 100 {
            problems.push("staging.retries must be 1 to 100".into());
        }
        if st.min_backoff.0.is_zero() || st.min_backoff.0 > st.max_backoff.0 || st.request_timeout.0.is_zero() {
            problems.push(
                "staging: min_backoff must be more than 0 and at most max_backoff; request_timeout more than 0".into(),
            );
        }
        finish(path, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[agent]\nbroker_url = \"https://b:1\"\nwork_dir = \"w\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n";

    fn parse(extra: &str, vars: &[(&str, &str)]) -> AgentConfig {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        super::super::parse_toml(&format!("{BASE}{extra}"), Path::new("agent.toml"), vars).unwrap()
    }

    #[test]
    fn spot_polling_defaults_by_cloud_and_is_overridable() {
        assert_eq!(parse("", &[]).agent.spot_poll_or_default(), None, "no cloud, no watch");
        let aws = parse("", &[("HYBROKER_AGENT__CLOUD", "aws")]);
        assert_eq!(aws.agent.spot_poll_or_default(), Some(Duration::from_secs(5)));
        let azure = parse("", &[("HYBROKER_AGENT__CLOUD", "azure")]);
        assert_eq!(azure.agent.spot_poll_or_default(), Some(Duration::from_secs(1)));
        let fast = parse("", &[("HYBROKER_AGENT__CLOUD", "azure"), ("HYBROKER_AGENT__SPOT_POLL", "200ms")]);
        assert_eq!(fast.agent.spot_poll_or_default(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn the_node_name_comes_from_the_environment_and_must_be_a_valid_name() {
        assert_eq!(parse("", &[]).agent.node_name, None);
        let named = parse("", &[("HYBROKER_AGENT__NODE_NAME", "ip-10-0-1-23.eu-west-1.compute.internal")]);
        assert_eq!(named.agent.node_name.as_deref(), Some("ip-10-0-1-23.eu-west-1.compute.internal"));
        let bad = parse("", &[("HYBROKER_AGENT__NODE_NAME", "node/7")]);
        let err = bad.validate(Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("agent.node_name: "), "{err}");
    }

    #[test]
    fn bad_spot_settings_are_reported_together() {
        let c = parse("", &[("HYBROKER_AGENT__SPOT_POLL", "1ms"), ("HYBROKER_AGENT__METADATA_URL", "https://imds")]);
        let err = c.validate(Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("agent.spot_poll must be 50ms to 60s"), "{err}");
        assert!(err.contains("agent.metadata_url \"https://imds\" must start with http://"), "{err}");
    }
}
