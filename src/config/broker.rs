//! `hybroker broker`'s configuration: the listener, store, secrets, leases and limits, and the
//! whole file's validation (tenants, storage and placement add their own checks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::placement::{PlacementSection, PricesSection, placement_problems};
use super::storage::{StagingSection, StorageConfig, storage_problems};
use super::tenants::{DedicatedAgent, TenantConfig, dedicated_problems};
use super::{ConfigError, check_tls, finish, load_toml};
use crate::model::data::DataUri;
use crate::model::duration::HumanDuration;
use crate::model::site::{ResidencyGroup, Site};
use crate::tls::TlsPaths;

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
    pub metrics: crate::metrics::MetricsSection,
    /// `[telemetry]`: OpenTelemetry trace export (off unless an endpoint is configured).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
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
    /// On SIGTERM: how long the broker waits for agents to hang up and in-flight calls to finish
    /// before it exits anyway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Where agents enrol with a join token (server-authenticated TLS, the enrol call only); off
    /// when unset. Needs `ca_dir`.
    #[serde(default)]
    pub enroll_listen: Option<SocketAddr>,
    /// The PKI directory holding the issuing CA (`issuing-ca.pem`, `issuing-ca-key.pem`, `ca.pem`,
    /// `trust-domain`) that signs agents' certificates at enrolment and renewal. The root's key
    /// need not be there.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// How long an agent certificate signed here is valid; agents renew at 70-90 % of it.
    #[serde(default = "default_agent_cert_lifetime")]
    pub agent_cert_lifetime: HumanDuration,
    /// The value of the `hybroker-broker` tag on the instances this broker launches; brokers sharing
    /// a cloud account need different names.
    #[serde(default = "default_broker_name")]
    pub name: String,
    /// The gRPC address launched instances dial (`https://host:port`); default: `listen` as bound.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// The enrol address launched instances use; default: `enroll_listen` as bound.
    #[serde(default)]
    pub advertise_enroll_url: Option<String>,
    /// The name launched instances verify in the broker's certificate, when it is not the
    /// advertised URLs' host.
    #[serde(default)]
    pub advertise_server_name: Option<String>,
}

fn default_broker_name() -> String {
    "hybroker".into()
}

fn default_agent_cert_lifetime() -> HumanDuration {
    Duration::from_secs(24 * 3600).into()
}

fn default_shutdown_grace() -> HumanDuration {
    Duration::from_secs(10).into()
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
            shutdown_grace: default_shutdown_grace(),
            enroll_listen: None,
            ca_dir: None,
            agent_cert_lifetime: default_agent_cert_lifetime(),
            name: default_broker_name(),
            advertise_url: None,
            advertise_enroll_url: None,
            advertise_server_name: None,
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
        self.check(path, true)
    }

    /// Reads the file like [`BrokerConfig::load`] (environment overrides included) and checks it
    /// like the broker does at start, except for the files of the broker's host (TLS): what
    /// `hybroker plan --config` refuses, with the broker's messages.
    pub fn load_for_planning(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_toml(path, std::env::vars())?;
        config.check(path, false)?;
        Ok(config)
    }

    /// [`BrokerConfig::validate`]; `host_files`: whether the TLS files must exist here.
    fn check(&self, path: &Path, host_files: bool) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if host_files {
            check_tls(&self.tls, &mut problems);
        }
        if self.secrets.key_file.as_ref().is_some_and(|p| p.as_os_str().is_empty() || p.ends_with("..")) {
            problems.push("secrets.key_file must name a file".into());
        }
        self.telemetry.check(&mut problems);
        self.broker.check_handshake_limits(&mut problems);
        if self.sites.iter().any(|s| s.capacity.is_some())
            && (self.broker.enroll_listen.is_none() || self.broker.ca_dir.is_none())
        {
            problems.push(
                "site.capacity: sites with a capacity provider need broker.enroll_listen and broker.ca_dir (launched \
                 instances enrol with a join token)"
                    .into(),
            );
        }
        if self.broker.enroll_listen.is_some() && self.broker.ca_dir.is_none() {
            problems.push(
                "broker.enroll_listen needs broker.ca_dir (the issuing CA that signs agents' certificates)".into(),
            );
        }
        let lifetime = self.broker.agent_cert_lifetime.0;
        if lifetime < Duration::from_secs(10) || lifetime > Duration::from_secs(366 * 24 * 3600) {
            problems.push(format!("broker.agent_cert_lifetime ({lifetime:?}) must be 10s to 366 days"));
        }
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
        storage_problems(&self.storage, &self.staging, &mut problems);
        let (sites, residency, tenants) = (&self.sites, &self.residency, &self.tenants);
        placement_problems(sites, residency, tenants, &self.storage, &self.placement, &mut problems);
        dedicated_problems(&self.dedicated, &self.tenants, &mut problems);
        finish(path, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_toml;

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
    fn every_capacity_problem_is_reported_at_once_with_its_key() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"/nope/a\"\ncert = \"/nope/b\"\nkey = \"/nope/c\"\n\
                    [store]\npath = \"x.db\"\n[[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\n\
                    [[site]]\nname = \"aws-use1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
                    instance_types = [\"p5.48xlarge\", \"p9.mega\"]\n\
                    [site.capacity]\nprovider = \"aws\"\nmax_instances = 0\nmax_usd_per_hour = -5.0\n\
                    [site.capacity.aws]\nsubnets = [\"subnet-1\"]\n";
        let c: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
        let ConfigError::Invalid { problems, .. } = c.validate(Path::new("t.toml")).unwrap_err() else { panic!() };
        for want in [
            "instance_types[1]: unknown instance type \"p9.mega\"",
            "capacity.max_instances: must be more than 0",
            "capacity.max_usd_per_hour: must be more than 0",
            "capacity.aws.image_id: give an image",
            "site.capacity: sites with a capacity provider need broker.enroll_listen and broker.ca_dir",
        ] {
            assert!(problems.iter().any(|p| p.contains(want)), "{want:?} not in {problems:?}");
        }
        assert!(problems.iter().any(|p| p.starts_with("site[0] (aws-use1): capacity.aws.image_id")), "{problems:?}");
    }
}
