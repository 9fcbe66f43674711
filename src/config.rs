//! Configuration: TOML files with commented defaults under `config/`, `deny_unknown_fields`,
//! environment overrides named `HYBROKER_<SECTION>__<KEY>`, and a `validate()` that reports every
//! problem at once. Only this module and `main.rs` read the process environment (invariant 5).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::model::data::{DataUri, Scheme};
use crate::model::duration::HumanDuration;
use crate::model::gpu::{SimulatedGpus, parse_simulated};
use crate::model::price::Cloud;
use crate::model::site::{ResidencyGroup, Site};
use crate::tls::TlsPaths;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path} is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

/// `[metrics]`: the Prometheus endpoint of a service (off by default); served by `metrics::start`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served (plain HTTP), e.g. `127.0.0.1:9464`; port 0 picks one.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Write the bound address to this file once listening (useful with port 0).
    #[serde(default)]
    pub addr_file: Option<PathBuf>,
}

/// `hybroker broker`'s configuration (`config/broker.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub broker: BrokerSection,
    pub tls: TlsPaths,
    pub store: StoreSection,
    /// `[secrets]`: the key file that seals jobs' `secret_env` at rest.
    #[serde(default)]
    pub secrets: SecretsSection,
    #[serde(default)]
    pub leases: LeaseSection,
    #[serde(default)]
    pub limits: LimitSection,
    /// Tenants (`[[tenant]]`). The tenant `default` always exists, for admins' own submits.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// Nodes given to one tenant only (`[[dedicated]]`): they run only that tenant's jobs. An agent
    /// without isolation (`isolation = "none"`) is refused unless it is listed here.
    #[serde(default)]
    pub dedicated: Vec<DedicatedAgent>,
    /// Storage locations for job data (`[[storage]]`).
    #[serde(default, rename = "storage")]
    pub storage: Vec<StorageConfig>,
    #[serde(default)]
    pub staging: StagingSection,
    /// Sites (`[[site]]`): on-prem sites and cloud pools that run work. None: every agent's site
    /// is used by plain first fit, without prices.
    #[serde(default, rename = "site")]
    pub sites: Vec<Site>,
    /// Residency groups (`[[residency]]`): which regions of each cloud, and which on-prem regions,
    /// belong to a group such as `eu`.
    #[serde(default, rename = "residency")]
    pub residency: Vec<ResidencyGroup>,
    #[serde(default)]
    pub placement: PlacementSection,
    #[serde(default)]
    pub prices: PricesSection,
    /// `[metrics]`: Prometheus `/metrics` (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[telemetry]`: OpenTelemetry trace export (off unless an endpoint is configured).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
}

/// Where prices come from (used when sites are configured).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesSection {
    /// The dated offline snapshot: the fallback for whatever the live feeds don't give.
    #[serde(default = "default_snapshot")]
    pub snapshot: PathBuf,
    /// Where the last good merged prices are kept, so a restart starts warm.
    #[serde(default)]
    pub persist: Option<PathBuf>,
    #[serde(default = "default_price_refresh")]
    pub refresh_interval: HumanDuration,
    /// A live feed older than this is flagged stale.
    #[serde(default = "default_feed_max_age")]
    pub max_age: HumanDuration,
    /// The Azure Retail Prices API (no credentials); `azure_url` for a mirror or a test server.
    #[serde(default)]
    pub azure: bool,
    #[serde(default = "default_azure_url")]
    pub azure_url: String,
    /// AWS Price List Query API + EC2 spot price history (credentials from the AWS default chain).
    #[serde(default)]
    pub aws: bool,
    #[serde(default)]
    pub aws_pricing_url: Option<String>,
    #[serde(default)]
    pub aws_ec2_url: Option<String>,
}

fn default_snapshot() -> PathBuf {
    PathBuf::from("config/prices/snapshot.json")
}

fn default_price_refresh() -> HumanDuration {
    Duration::from_secs(30 * 60).into()
}

fn default_feed_max_age() -> HumanDuration {
    Duration::from_secs(3 * 3600).into()
}

fn default_azure_url() -> String {
    "https://prices.azure.com".into()
}

impl Default for PricesSection {
    fn default() -> Self {
        Self {
            snapshot: default_snapshot(),
            persist: None,
            refresh_interval: default_price_refresh(),
            max_age: default_feed_max_age(),
            azure: false,
            azure_url: default_azure_url(),
            aws: false,
            aws_pricing_url: None,
            aws_ec2_url: None,
        }
    }
}

impl PricesSection {
    /// The price book's settings.
    pub fn settings(&self) -> crate::pricing::PricingSettings {
        use crate::pricing::{AwsFeedSettings, AzureFeedSettings};
        let mut aws = AwsFeedSettings::default();
        if let Some(url) = &self.aws_pricing_url {
            aws.pricing_endpoint = url.clone();
        }
        if let Some(url) = &self.aws_ec2_url {
            aws.ec2_endpoint = url.clone();
        }
        crate::pricing::PricingSettings {
            refresh_interval: self.refresh_interval.0,
            max_age: self.max_age.0,
            snapshot_path: Some(self.snapshot.clone()),
            persist_path: self.persist.clone(),
            azure: self.azure.then(|| AzureFeedSettings { base_url: self.azure_url.clone(), ..Default::default() }),
            aws: self.aws.then_some(aws),
        }
    }
}

/// How placement decides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSection {
    /// A job placed at a site that has not started within this time is placed again on fresh
    /// prices and capacity (and this is the default `max_wait` of a job without one).
    #[serde(default = "default_replace_after")]
    pub replace_after: HumanDuration,
    /// Prices older than this are flagged as stale in decisions (the last good ones are still used).
    #[serde(default = "default_price_max_age")]
    pub price_max_age: HumanDuration,
}

fn default_replace_after() -> HumanDuration {
    Duration::from_secs(10 * 60).into()
}

fn default_price_max_age() -> HumanDuration {
    Duration::from_secs(6 * 3600).into()
}

impl Default for PlacementSection {
    fn default() -> Self {
        Self { replace_after: default_replace_after(), price_max_age: default_price_max_age() }
    }
}

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

/// One tenant: who may submit, and how much.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Admin tenants may see and drain agents through the gateway.
    #[serde(default)]
    pub admin: bool,
    /// Jobs not yet finished (queued or running) the tenant may have at once.
    #[serde(default = "default_max_queued_jobs")]
    pub max_queued_jobs: u32,
    /// Gateway requests per second (token bucket refill rate).
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: f64,
    /// Gateway requests allowed in a burst (token bucket size).
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Data URI prefixes the tenant's jobs may read and write, e.g. `s3://acme-data/acme/`; each
    /// must lie in a configured `[[storage]]` location. Empty: no job data.
    #[serde(default)]
    pub storage: Vec<String>,
    /// Clouds the tenant's jobs may run in (on-prem is always allowed); empty = any.
    #[serde(default)]
    pub clouds: Vec<Cloud>,
    /// Sites the tenant's jobs may run at; empty = any.
    #[serde(default)]
    pub sites: Vec<String>,
    /// A residency group the tenant's jobs must stay in (default: derived from each job's data).
    #[serde(default)]
    pub residency: Option<String>,
    /// Price caps: per hour of a job's compute, and per job in all.
    #[serde(default)]
    pub max_usd_per_hour: Option<f64>,
    #[serde(default)]
    pub max_usd_per_job: Option<f64>,
    /// The tenant's monthly budget: a job whose estimate exceeds what is left is refused.
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
    /// Use owned (on-prem) hardware whenever it has room, whatever the cloud prices.
    #[serde(default)]
    pub owned_first: bool,
}

/// One node dedicated to one tenant (`[[dedicated]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedicatedAgent {
    /// `<site>/<node>`, as in the agent's certificate.
    pub agent: String,
    /// The declared tenant whose jobs alone run there.
    pub tenant: String,
}

fn default_max_queued_jobs() -> u32 {
    1000
}

fn default_requests_per_second() -> f64 {
    20.0
}

fn default_burst() -> u32 {
    40
}

impl TenantConfig {
    /// The implicit tenant of admins' submits that name none.
    pub fn default_tenant() -> Self {
        Self {
            name: "default".into(),
            admin: true,
            max_queued_jobs: 100_000,
            requests_per_second: default_requests_per_second(),
            burst: default_burst(),
            storage: Vec::new(),
            clouds: Vec::new(),
            sites: Vec::new(),
            residency: None,
            max_usd_per_hour: None,
            max_usd_per_job: None,
            monthly_budget_usd: None,
            owned_first: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Where the gRPC server listens (agents and the gateway dial it).
    pub listen: SocketAddr,
    /// Unfinished TLS handshakes allowed from one source address (IPv4, or IPv6 /64); sockets
    /// over it are closed at once. Sized for a whole site behind one NAT address.
    #[serde(default = "default_unfinished_per_source")]
    pub max_unfinished_handshakes_per_source: usize,
    /// Unfinished TLS handshakes allowed from all sources together.
    #[serde(default = "default_unfinished_total")]
    pub max_unfinished_handshakes: usize,
    /// How long a new connection may take to send its ClientHello.
    #[serde(default = "default_client_hello_timeout")]
    pub client_hello_timeout: HumanDuration,
}

fn default_unfinished_per_source() -> usize {
    crate::tls::HandshakeLimits::default().per_source
}

fn default_unfinished_total() -> usize {
    crate::tls::HandshakeLimits::default().total
}

fn default_client_hello_timeout() -> HumanDuration {
    crate::tls::HandshakeLimits::default().client_hello_timeout.into()
}

impl BrokerSection {
    /// Listening on `listen`, with the default handshake limits.
    pub fn listening_on(listen: SocketAddr) -> Self {
        BrokerSection {
            listen,
            max_unfinished_handshakes_per_source: default_unfinished_per_source(),
            max_unfinished_handshakes: default_unfinished_total(),
            client_hello_timeout: default_client_hello_timeout(),
        }
    }

    /// The gRPC listener's limits on TLS handshakes.
    pub fn handshake_limits(&self) -> crate::tls::HandshakeLimits {
        crate::tls::HandshakeLimits {
            client_hello_timeout: self.client_hello_timeout.0,
            per_source: self.max_unfinished_handshakes_per_source,
            total: self.max_unfinished_handshakes,
            ..crate::tls::HandshakeLimits::default()
        }
    }

    /// Reports bad handshake limits.
    fn check_handshake_limits(&self, problems: &mut Vec<String>) {
        let (per_source, total) = (self.max_unfinished_handshakes_per_source, self.max_unfinished_handshakes);
        if per_source == 0 || total < per_source {
            problems.push(format!(
                "broker.max_unfinished_handshakes_per_source ({per_source}) must be more than 0 and at most \
                 broker.max_unfinished_handshakes ({total})"
            ));
        }
        let (hello, whole) = (self.client_hello_timeout.0, self.handshake_limits().handshake_timeout);
        if hello.is_zero() || hello > whole {
            problems.push(format!("broker.client_hello_timeout must be more than 0 and at most {whole:?}"));
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The SQLite database file.
    pub path: PathBuf,
}

/// Job secrets at rest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSection {
    /// The AES-256 key file (`<id> <base64 key>` lines, the first current); made with a fresh key
    /// (mode 0600) when missing. Default: `secrets.key` in the database's directory.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Lease and heartbeat timings; short in tests, seconds in production.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSection {
    /// An attempt whose agent is silent this long is lost, and the job is queued again.
    #[serde(default = "default_lease_ttl")]
    pub ttl: HumanDuration,
    /// How often agents send a heartbeat (told to them when they register).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: HumanDuration,
}

fn default_lease_ttl() -> HumanDuration {
    Duration::from_secs(30).into()
}

fn default_heartbeat() -> HumanDuration {
    Duration::from_secs(10).into()
}

impl Default for LeaseSection {
    fn default() -> Self {
        Self { ttl: default_lease_ttl(), heartbeat_interval: default_heartbeat() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSection {
    /// Largest accepted job spec document, in bytes.
    #[serde(default = "default_max_spec_bytes")]
    pub max_spec_bytes: usize,
    /// Output kept per attempt by the broker (the tail), in bytes.
    #[serde(default = "default_log_tail_bytes")]
    pub log_tail_bytes: usize,
}

fn default_max_spec_bytes() -> usize {
    64 * 1024
}

fn default_log_tail_bytes() -> usize {
    64 * 1024
}

impl Default for LimitSection {
    fn default() -> Self {
        Self { max_spec_bytes: default_max_spec_bytes(), log_tail_bytes: default_log_tail_bytes() }
    }
}

/// `hybroker gateway`'s configuration (`config/gateway.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub gateway: GatewaySection,
    pub broker: BrokerTarget,
    /// The gateway's own mTLS identity towards the broker (role gateway).
    pub tls: TlsPaths,
    /// `[metrics]`: Prometheus `/metrics` (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[telemetry]`: OpenTelemetry trace export (off unless an endpoint is configured).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Where tenants reach the HTTP API.
    pub listen: SocketAddr,
    /// The public HTTPS certificate and key (any CA; separate from the internal PKI).
    #[serde(default)]
    pub public_cert: Option<PathBuf>,
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// Serve plain HTTP; allowed only when `listen` is a loopback address.
    #[serde(default)]
    pub plain_http: bool,
    /// Largest accepted request body, in bytes (413 beyond).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A client's `traceparent`: `continue` its trace, or `link` to it from a new one.
    #[serde(default)]
    pub client_traces: crate::telemetry::ClientTraces,
    /// Requests without an accepted key, per client address: refilled at this many per second
    /// (429 with `Retry-After` beyond, before the broker is asked).
    #[serde(default = "default_unauthenticated_per_second")]
    pub unauthenticated_per_second: f64,
    /// ... and this many at once.
    #[serde(default = "default_unauthenticated_burst")]
    pub unauthenticated_burst: u32,
    /// Client addresses remembered for that limit (the least recently seen are forgotten).
    #[serde(default = "default_max_client_addresses")]
    pub max_client_addresses: usize,
    /// A header in which a reverse proxy names the client (`x-forwarded-for`), believed only from
    /// `trusted_proxies`; the client is the right-most hop that is not a trusted proxy.
    #[serde(default)]
    pub trusted_proxy_header: Option<String>,
    /// The reverse proxies' addresses or networks (`10.0.0.0/8`).
    #[serde(default)]
    pub trusted_proxies: Vec<crate::gateway::client_address::IpNetwork>,
    /// Event streams and followed logs a tenant may have open at once (429 beyond).
    #[serde(default = "default_max_streams_per_tenant")]
    pub max_streams_per_tenant: u32,
}

fn default_max_body_bytes() -> usize {
    1 << 20
}

fn default_unauthenticated_per_second() -> f64 {
    5.0
}

fn default_unauthenticated_burst() -> u32 {
    50
}

fn default_max_client_addresses() -> usize {
    65_536
}

fn default_max_streams_per_tenant() -> u32 {
    32
}

impl Default for GatewaySection {
    /// Plain HTTP on `127.0.0.1:8443` with every limit at its default.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            public_cert: None,
            public_key: None,
            plain_http: true,
            max_body_bytes: default_max_body_bytes(),
            client_traces: Default::default(),
            unauthenticated_per_second: default_unauthenticated_per_second(),
            unauthenticated_burst: default_unauthenticated_burst(),
            max_client_addresses: default_max_client_addresses(),
            trusted_proxy_header: None,
            trusted_proxies: Vec::new(),
            max_streams_per_tenant: default_max_streams_per_tenant(),
        }
    }
}

/// Where the broker is, for clients of it (the gateway).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTarget {
    /// `https://host:port`
    pub url: String,
    /// The name to verify in the broker's certificate; default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_toml(path, std::env::vars())?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_tls(&self.tls, &mut problems);
        self.telemetry.check(&mut problems);
        let g = &self.gateway;
        match (&g.public_cert, &g.public_key, g.plain_http) {
            (Some(cert), Some(key), false) => {
                for (k, p) in [("gateway.public_cert", cert), ("gateway.public_key", key)] {
                    if !p.is_file() {
                        problems.push(format!("{k}: {} does not exist", p.display()));
                    }
                }
            }
            (None, None, true) if g.listen.ip().is_loopback() => {}
            (None, None, true) => problems.push(format!(
                "gateway.plain_http is allowed only on a loopback address, not {}; give public_cert and public_key",
                g.listen
            )),
            (None, None, false) => {
                problems.push("gateway: give public_cert and public_key, or plain_http = true on loopback".into())
            }
            _ => problems.push("gateway: give both public_cert and public_key, and not plain_http with them".into()),
        }
        if g.max_body_bytes < 1024 {
            problems.push("gateway.max_body_bytes must be at least 1 KiB".into());
        }
        g.limit_problems(&mut problems);
        if !self.broker.url.starts_with("https://") {
            problems.push(format!("broker.url {:?} must start with https://", self.broker.url));
        }
        finish(path, problems)
    }
}

impl GatewaySection {
    fn limit_problems(&self, problems: &mut Vec<String>) {
        if !(self.unauthenticated_per_second.is_finite() && self.unauthenticated_per_second > 0.0) {
            problems.push("gateway.unauthenticated_per_second must be a number above 0".into());
        }
        if self.unauthenticated_burst == 0 {
            problems.push("gateway.unauthenticated_burst must be at least 1".into());
        }
        if self.max_client_addresses == 0 {
            problems.push("gateway.max_client_addresses must be at least 1".into());
        }
        if self.max_streams_per_tenant == 0 {
            problems.push("gateway.max_streams_per_tenant must be at least 1".into());
        }
        match (&self.trusted_proxy_header, self.trusted_proxies.is_empty()) {
            (Some(h), _) if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                problems.push(format!("gateway.trusted_proxy_header: {h:?} is not an HTTP header name"));
            }
            (Some(_), true) => problems.push(
                "gateway.trusted_proxy_header needs trusted_proxies: the proxies whose header is believed".into(),
            ),
            (None, false) => {
                problems.push("gateway.trusted_proxies needs trusted_proxy_header: the header the proxies set".into())
            }
            _ => {}
        }
    }
}

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
    pub metrics: MetricsSection,
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

impl AgentStagingSection {
    pub fn limits(&self) -> crate::agent::staging::StagingLimits {
        crate::agent::staging::StagingLimits {
            concurrency: self.concurrency,
            retries: self.retries,
            min_backoff: self.min_backoff.0,
            max_backoff: self.max_backoff.0,
            request_timeout: self.request_timeout.0,
            ..Default::default()
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

impl BrokerConfig {
    /// The tenant's settings (`default` is always declared).
    pub fn tenant(&self, name: &str) -> Option<TenantConfig> {
        self.tenants
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .or_else(|| (name == "default").then(TenantConfig::default_tenant))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_toml(path, std::env::vars())?;
        config.validate(path)?;
        Ok(config)
    }

    /// `[secrets] key_file`, or `secrets.key` next to the database.
    pub fn secrets_key_file(&self) -> PathBuf {
        match &self.secrets.key_file {
            Some(path) => path.clone(),
            None => self.store.path.with_file_name("secrets.key"),
        }
    }

    /// Every problem at once.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_tls(&self.tls, &mut problems);
        if self.secrets.key_file.as_ref().is_some_and(|p| p.as_os_str().is_empty() || p.ends_with("..")) {
            problems.push("secrets.key_file must name a file".into());
        }
        self.telemetry.check(&mut problems);
        self.broker.check_handshake_limits(&mut problems);
        let (ttl, hb) = (self.leases.ttl.0, self.leases.heartbeat_interval.0);
        if hb.is_zero() || hb >= ttl {
            problems.push(format!(
                "leases.heartbeat_interval ({hb:?}) must be more than 0 and less than leases.ttl ({ttl:?})"
            ));
        }
        if hb > Duration::from_secs(50) {
            problems.push("leases.heartbeat_interval must be at most 50s (gRPC keepalive needs traffic < 60s)".into());
        }
        if self.limits.max_spec_bytes < 1024 || self.limits.max_spec_bytes > 4 << 20 {
            problems.push("limits.max_spec_bytes must be 1 KiB to 4 MiB".into());
        }
        if self.limits.log_tail_bytes > 16 << 20 {
            problems.push("limits.log_tail_bytes must be at most 16 MiB".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if let Err(e) = crate::model::identity::validate_name("tenant", &t.name) {
                problems.push(format!("tenant[{i}].name: {e}"));
            }
            if !seen.insert(t.name.as_str()) {
                problems.push(format!("tenant[{i}].name: {:?} is declared twice", t.name));
            }
            if !(t.requests_per_second.is_finite() && t.requests_per_second > 0.0) || t.burst == 0 {
                problems.push(format!("tenant[{i}]: requests_per_second and burst must be more than 0"));
            }
            if t.max_queued_jobs == 0 {
                problems.push(format!("tenant[{i}].max_queued_jobs must be more than 0"));
            }
            for (j, prefix) in t.storage.iter().enumerate() {
                match DataUri::parse(prefix) {
                    Err(e) => problems.push(format!("tenant[{i}].storage[{j}]: {e}")),
                    Ok(uri) if !self.storage.iter().any(|s| s.uri_store() == (uri.scheme, uri.store.clone())) => {
                        problems.push(format!("tenant[{i}].storage[{j}]: {prefix:?} is in no [[storage]] location"))
                    }
                    Ok(_) => {}
                }
            }
        }
        self.storage_problems(&mut problems);
        self.placement_problems(&mut problems);
        self.dedicated_problems(&mut problems);
        finish(path, problems)
    }
}

impl BrokerConfig {
    fn dedicated_problems(&self, problems: &mut Vec<String>) {
        let mut agents = std::collections::HashSet::new();
        for (i, d) in self.dedicated.iter().enumerate() {
            let valid = d.agent.split_once('/').is_some_and(|(site, node)| {
                crate::model::identity::validate_name("site", site).is_ok()
                    && crate::model::identity::validate_name("node", node).is_ok()
            });
            if !valid {
                problems.push(format!("dedicated[{i}].agent: {:?} is not <site>/<node>", d.agent));
            }
            if self.tenant(&d.tenant).is_none() {
                problems.push(format!("dedicated[{i}].tenant: {:?} is not a declared [[tenant]]", d.tenant));
            }
            if !agents.insert(d.agent.as_str()) {
                problems.push(format!("dedicated[{i}].agent: {:?} is dedicated twice", d.agent));
            }
        }
    }

    fn placement_problems(&self, problems: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for (i, site) in self.sites.iter().enumerate() {
            for p in site.problems().into_iter().chain(site.residency_problems(&self.residency)) {
                problems.push(format!("site[{i}] ({}): {p}", site.name));
            }
            if !names.insert(site.name.as_str()) {
                problems.push(format!("site[{i}].name: {:?} is declared twice", site.name));
            }
        }
        let mut groups = std::collections::HashSet::new();
        for (i, g) in self.residency.iter().enumerate() {
            if !groups.insert(g.name.as_str()) {
                problems.push(format!("residency[{i}].name: {:?} is declared twice", g.name));
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            for s in &t.sites {
                if !names.contains(s.as_str()) {
                    problems.push(format!("tenant[{i}].sites: {s:?} is not a declared [[site]]"));
                }
            }
            if let Some(r) = &t.residency
                && !groups.contains(r.as_str())
            {
                problems.push(format!("tenant[{i}].residency: {r:?} is not a declared [[residency]] group"));
            }
            for (k, v) in [("max_usd_per_hour", t.max_usd_per_hour), ("max_usd_per_job", t.max_usd_per_job)]
                .into_iter()
                .chain([("monthly_budget_usd", t.monthly_budget_usd)])
            {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    problems.push(format!("tenant[{i}].{k} must be a positive number"));
                }
            }
        }
        for (i, s) in self.storage.iter().enumerate() {
            if !self.sites.is_empty() && !s.residency.is_empty() && !groups.contains(s.residency.as_str()) {
                problems
                    .push(format!("storage[{i}].residency: {:?} is not a declared [[residency]] group", s.residency));
            }
        }
        if self.placement.replace_after.0.is_zero() || self.placement.price_max_age.0.is_zero() {
            problems.push("placement.replace_after and price_max_age must be more than 0".into());
        }
    }

    fn storage_problems(&self, problems: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        let mut stores = std::collections::HashMap::new();
        for (i, s) in self.storage.iter().enumerate() {
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
        let st = &self.staging;
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
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = load_toml(path, std::env::vars())?;
        config.validate(path)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    pub fn simulated_gpus(&self) -> Vec<SimulatedGpus> {
        parse_simulated(&self.agent.simulate_gpus).unwrap_or_default()
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_tls(&self.tls, &mut problems);
        self.telemetry.check(&mut problems);
        if !self.agent.broker_url.starts_with("https://") {
            problems.push(format!("agent.broker_url {:?} must start with https://", self.agent.broker_url));
        }
        if let Err(e) = parse_simulated(&self.agent.simulate_gpus) {
            problems.push(format!("agent.simulate_gpus: {e}"));
        }
        if self.agent.run_as.as_deref().is_some_and(|u| u.is_empty() || u == "root") {
            problems.push("agent.run_as must name an unprivileged user".into());
        }
        self.sandbox.check(&mut problems);
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

fn check_tls(tls: &TlsPaths, problems: &mut Vec<String>) {
    for (key, path) in [("tls.ca_cert", &tls.ca_cert), ("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if !path.is_file() {
            problems.push(format!("{key}: {} does not exist (make one with `hybroker pki`)", path.display()));
        }
    }
}

fn finish(path: &Path, problems: Vec<String>) -> Result<(), ConfigError> {
    if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid { path: path.display().to_string(), problems }) }
}

/// Reads a TOML file, applies `HYBROKER_<SECTION>__<KEY>` overrides from `vars`, and deserialises.
/// Relative paths in the file stay relative to the working directory.
pub fn load_toml<T: DeserializeOwned>(
    path: &Path,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse_toml(&text, path, vars)
}

/// [`load_toml`] on text already read.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let parse_err = |message: String| ConfigError::Parse { path: path.display().to_string(), message };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
    for (name, value) in vars {
        // Other HYBROKER_* names (HYBROKER_TOKEN, a job's HYBROKER_JOB_ID) are not config.
        let Some((section, key)) = name.strip_prefix("HYBROKER_").and_then(|rest| rest.split_once("__")) else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(parse_err(format!("{name}: [{section}] is not a section")));
        };
        section_table.insert(key, value);
    }
    let de = toml::Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        parse_err(if at == "." { e.inner().to_string() } else { format!("{at}: {}", e.inner()) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_replace_and_add_keys() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\npath = \"x.db\"\n";
        let vars = [
            ("HYBROKER_BROKER__LISTEN".to_string(), "127.0.0.1:9".to_string()),
            ("HYBROKER_LEASES__TTL".to_string(), "5s".to_string()),
            ("HYBROKER_TOKEN".to_string(), "not-config".to_string()),
        ];
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), vars).unwrap();
        assert_eq!(c.broker.listen.port(), 9);
        assert_eq!(c.leases.ttl.0, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n";
        let err = parse_toml::<BrokerConfig>(text, Path::new("t.toml"), []).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn the_secrets_key_file_defaults_to_the_database_directory() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\npath = \"st/x.db\"\n";
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        assert_eq!(c.secrets_key_file(), Path::new("st/secrets.key"));
        let vars = [("HYBROKER_SECRETS__KEY_FILE".to_string(), "/etc/hybroker/k".to_string())];
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), vars).unwrap();
        assert_eq!(c.secrets_key_file(), Path::new("/etc/hybroker/k"));
    }

    #[test]
    fn validate_reports_every_problem() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"/nope/a\"\ncert = \"/nope/b\"\nkey = \"/nope/c\"\n\
                    [store]\npath = \"x.db\"\n[leases]\nttl = \"1s\"\nheartbeat_interval = \"2s\"\n";
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("t.toml")).unwrap_err() else { panic!() };
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn dedicated_agents_name_a_declared_tenant_once() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"/nope/a\"\ncert = \"/nope/b\"\nkey = \"/nope/c\"\n\
                    [store]\npath = \"x.db\"\n[[tenant]]\nname = \"acme\"\n\
                    [[dedicated]]\nagent = \"lab/gpu-9\"\ntenant = \"acme\"\n\
                    [[dedicated]]\nagent = \"lab/gpu-9\"\ntenant = \"globex\"\n\
                    [[dedicated]]\nagent = \"gpu-7\"\ntenant = \"default\"\n";
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        assert_eq!(c.dedicated.len(), 3);
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("t.toml")).unwrap_err() else { panic!() };
        let dedicated: Vec<&String> = problems.iter().filter(|p| p.starts_with("dedicated")).collect();
        assert_eq!(dedicated.len(), 3, "{problems:?}");
        assert!(dedicated.iter().any(|p| p.contains("\"globex\" is not a declared [[tenant]]")), "{problems:?}");
        assert!(dedicated.iter().any(|p| p.contains("\"lab/gpu-9\" is dedicated twice")), "{problems:?}");
        assert!(dedicated.iter().any(|p| p.contains("\"gpu-7\" is not <site>/<node>")), "{problems:?}");
    }

    #[test]
    fn the_gateway_example_loads_with_its_documented_limits_and_bad_limits_are_named() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c: GatewayConfig = parse_toml(&text, &path, []).unwrap();
        let d = GatewaySection::default();
        let g = &c.gateway;
        assert_eq!(
            (g.unauthenticated_per_second, g.unauthenticated_burst, g.max_client_addresses, g.max_streams_per_tenant),
            (d.unauthenticated_per_second, d.unauthenticated_burst, d.max_client_addresses, d.max_streams_per_tenant)
        );
        assert!(g.trusted_proxy_header.is_none() && g.trusted_proxies.is_empty());
        let base = "[broker]\nurl = \"https://b:1\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let bad = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nplain_http = true\nunauthenticated_per_second = 0\n\
             unauthenticated_burst = 0\nmax_streams_per_tenant = 0\ntrusted_proxy_header = \"x forwarded\"\n{base}"
        );
        let c: GatewayConfig = parse_toml(&bad, Path::new("g.toml"), []).unwrap();
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("g.toml")).unwrap_err() else { panic!() };
        for key in
            ["unauthenticated_per_second", "unauthenticated_burst", "max_streams_per_tenant", "trusted_proxy_header"]
        {
            assert!(problems.iter().any(|p| p.contains(key)), "{key}: {problems:?}");
        }
        let proxies = format!("[gateway]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n{base}");
        let err = parse_toml::<GatewayConfig>(&proxies, Path::new("g.toml"), []).unwrap_err().to_string();
        assert!(err.contains("trusted_proxies") && err.contains("10.0.0.0/33"), "{err}");
        let lonely =
            format!("[gateway]\nlisten = \"127.0.0.1:0\"\nplain_http = true\ntrusted_proxies = [\"10.0.0.1\"]\n{base}");
        let c: GatewayConfig = parse_toml(&lonely, Path::new("g.toml"), []).unwrap();
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("g.toml")).unwrap_err() else { panic!() };
        assert!(problems.iter().any(|p| p.contains("needs trusted_proxy_header")), "{problems:?}");
    }

    #[test]
    fn handshake_limits_default_and_are_checked() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\npath = \"x.db\"\n";
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        assert_eq!(c.broker.handshake_limits(), crate::tls::HandshakeLimits::default());
        assert!(c.broker.handshake_limits().per_source >= 1000);
        let vars = [
            ("HYBROKER_BROKER__MAX_UNFINISHED_HANDSHAKES_PER_SOURCE".to_string(), "20".to_string()),
            ("HYBROKER_BROKER__MAX_UNFINISHED_HANDSHAKES".to_string(), "10".to_string()),
            ("HYBROKER_BROKER__CLIENT_HELLO_TIMEOUT".to_string(), "0s".to_string()),
        ];
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), vars).unwrap();
        let mut problems = Vec::new();
        c.broker.check_handshake_limits(&mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("at most broker.max_unfinished_handshakes (10)"), "{problems:?}");
    }
}
