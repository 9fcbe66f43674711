//! Storage locations for job data (`[[storage]]`) and how job data moves (`[staging]`), in the
//! broker's configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::model::data::Scheme;
use crate::model::duration::HumanDuration;

/// Which kind of store a location is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageCloud {
    Aws,
    Azure,
    /// The embedded S3-compatible server over a directory (single machine, quickstart).
    Local,
}

/// One storage location: a bucket, a container or a local directory. Job data names it by URI:
/// `s3://<bucket>/…`, `az://<account>/<container>/…` or `local://<name>/…`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub name: String,
    pub cloud: StorageCloud,
    /// The cloud region (`eu-west-1`, `westeurope`); for local, free text.
    #[serde(default)]
    pub region: String,
    /// The residency group the data belongs to (`eu`, `us`).
    #[serde(default)]
    pub residency: String,
    /// aws: the bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// azure: the storage account and container.
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    /// A custom endpoint (emulators, S3-compatible stores); plain `http://` only on loopback.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// aws: a profile of the shared config files; default: the AWS default chain (env, profile,
    /// web identity, instance metadata).
    #[serde(default)]
    pub profile: Option<String>,
    /// azure: the account key, from a file (preferred) or an environment variable named here.
    #[serde(default)]
    pub account_key_file: Option<PathBuf>,
    #[serde(default)]
    pub account_key_env: Option<String>,
    /// local: the directory objects live under (`<dir>/<name>/<key>`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// local: where the embedded S3-compatible server listens (plain HTTP, loopback only).
    #[serde(default = "default_local_listen")]
    pub listen: SocketAddr,
}

fn default_local_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl StorageConfig {
    /// The URI scheme and store part that name this location.
    pub fn uri_store(&self) -> (Scheme, String) {
        match self.cloud {
            StorageCloud::Aws => (Scheme::S3, self.bucket.clone().unwrap_or_default()),
            StorageCloud::Azure => (
                Scheme::Az,
                format!("{}/{}", self.account.as_deref().unwrap_or(""), self.container.as_deref().unwrap_or("")),
            ),
            StorageCloud::Local => (Scheme::Local, self.name.clone()),
        }
    }

    /// The Azure account key, read from its file or environment variable (never logged).
    pub fn account_key(&self) -> Result<String, String> {
        if let Some(path) = &self.account_key_file {
            let key = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            return Ok(key.trim().to_string());
        }
        if let Some(var) = &self.account_key_env {
            return std::env::var(var).map(|k| k.trim().to_string()).map_err(|_| format!("${var} is not set"));
        }
        Err("give account_key_file or account_key_env".into())
    }

    fn problems(&self, i: usize, problems: &mut Vec<String>) {
        let at = format!("storage[{i}] ({})", self.name);
        if let Err(e) = crate::model::identity::validate_name("storage location", &self.name) {
            problems.push(format!("storage[{i}].name: {e}"));
        }
        let need = |field: &str, value: &Option<String>, problems: &mut Vec<String>| {
            if value.as_deref().is_none_or(str::is_empty) {
                problems.push(format!("{at}: cloud {:?} needs `{field}`", self.cloud));
            }
        };
        match self.cloud {
            StorageCloud::Aws => need("bucket", &self.bucket, problems),
            StorageCloud::Azure => {
                need("account", &self.account, problems);
                need("container", &self.container, problems);
                // The key itself is read when the broker starts (a missing one stops it clearly).
                if self.account_key_file.is_none() == self.account_key_env.is_none() {
                    problems.push(format!("{at}: give one of account_key_file or account_key_env"));
                }
            }
            StorageCloud::Local => {
                if self.dir.is_none() {
                    problems.push(format!("{at}: cloud \"local\" needs `dir`"));
                }
                if !self.listen.ip().is_loopback() {
                    problems.push(format!("{at}: the local store serves plain HTTP, so `listen` must be loopback"));
                }
            }
        }
        let (_, store) = self.uri_store();
        if store.split('/').any(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)))
        {
            problems.push(format!("{at}: bucket, account and container names are [A-Za-z0-9._-]"));
        }
        if let Some(endpoint) = &self.endpoint {
            match endpoint_problem(endpoint) {
                Some(p) => problems.push(format!("{at}.endpoint: {p}")),
                None if self.cloud == StorageCloud::Local => {
                    problems.push(format!("{at}: a local store has no endpoint (it is served at `listen`)"))
                }
                None => {}
            }
        }
        let foreign = match self.cloud {
            StorageCloud::Aws => {
                self.account_key_file.is_some() || self.account_key_env.is_some() || self.dir.is_some()
            }
            StorageCloud::Azure => self.profile.is_some() || self.bucket.is_some() || self.dir.is_some(),
            StorageCloud::Local => self.profile.is_some() || self.bucket.is_some() || self.account.is_some(),
        };
        if foreign {
            problems.push(format!("{at}: has keys that belong to another cloud"));
        }
    }
}

/// `https://host[:port][/path]`, or `http://` on a loopback host.
fn endpoint_problem(endpoint: &str) -> Option<String> {
    let (scheme, rest) = endpoint.split_once("://")?;
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
    match scheme {
        "https" => None,
        "http" if loopback => None,
        "http" => Some(format!("{endpoint:?}: plain http is allowed only on loopback (emulators)")),
        _ => Some(format!("{endpoint:?} must start with https://")),
    }
    .or_else(|| host.is_empty().then(|| format!("{endpoint:?} has no host")))
}

/// How job data moves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagingSection {
    /// How long a presigned URL is valid; at most 15 minutes. Agents ask for fresh ones.
    #[serde(default = "default_url_ttl")]
    pub url_ttl: HumanDuration,
    /// Most objects one job may read (all of its inputs' prefixes together).
    #[serde(default = "default_max_input_objects")]
    pub max_input_objects: usize,
    /// Output files larger than this are uploaded in parts.
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold_mib: u64,
    /// The size of one part (at least 5 MiB, S3's minimum).
    #[serde(default = "default_part_size")]
    pub part_size_mib: u64,
}

fn default_url_ttl() -> HumanDuration {
    Duration::from_secs(15 * 60).into()
}

fn default_max_input_objects() -> usize {
    10_000
}

fn default_multipart_threshold() -> u64 {
    64
}

fn default_part_size() -> u64 {
    16
}

impl Default for StagingSection {
    fn default() -> Self {
        Self {
            url_ttl: default_url_ttl(),
            max_input_objects: default_max_input_objects(),
            multipart_threshold_mib: default_multipart_threshold(),
            part_size_mib: default_part_size(),
        }
    }
}

/// Problems of the `[[storage]]` locations and the `[staging]` section.
pub(super) fn storage_problems(storage: &[StorageConfig], staging: &StagingSection, problems: &mut Vec<String>) {
    let mut names = std::collections::HashSet::new();
    let mut stores = std::collections::HashMap::new();
    for (i, s) in storage.iter().enumerate() {
        s.problems(i, problems);
        if !names.insert(s.name.as_str()) {
            problems.push(format!("storage[{i}].name: {:?} is declared twice", s.name));
        }
        let (scheme, store) = s.uri_store();
        if let Some(other) = stores.insert((scheme, store.clone()), &s.name) {
            problems.push(format!(
                    "storage[{i}] ({}): {}://{store} is already location {other:?}; a data URI must resolve to exactly one location",
                    s.name,
                    scheme.as_str()
                ));
        }
    }
    let st = staging;
    let ttl = st.url_ttl.0;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(15 * 60) {
        problems.push("staging.url_ttl must be 1s to 15m".into());
    }
    if st.max_input_objects == 0 || st.max_input_objects > 1_000_000 {
        problems.push("staging.max_input_objects must be 1 to 1000000".into());
    }
    if !(5..=5 * 1024).contains(&st.part_size_mib) {
        problems.push("staging.part_size_mib must be 5 to 5120 (S3's part limits)".into());
    }
    if st.multipart_threshold_mib < st.part_size_mib {
        problems.push("staging.multipart_threshold_mib must be at least staging.part_size_mib".into());
    }
}
