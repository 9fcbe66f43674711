//! The bench's PKI and the broker's configuration.
//!
//! The CAs are an issuing-CA layout (`pki init`'s, in `<state>/pki`) so the broker signs
//! renewals; every client identity lives in memory, and only what the broker child reads (the CA
//! directory, its own certificate and key, its config) is written to the state directory. Agent
//! certificates (`spiffe://<td>/agent/bench/node-<i>`) are issued on all cores at once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::ClientConfig;

use super::sites::{SiteLayout, TENANT_MAX_USD_PER_HOUR};
use crate::model::identity::Role;
use crate::pki::{self, Ca, IssueRequest};
use crate::tls;

/// The trust domain of a bench PKI.
pub const TRUST_DOMAIN: &str = "bench.hybroker.local";
/// The site every simulated agent belongs to (without `--sites`).
pub const SITE: &str = "bench";
/// The tenant the jobs are submitted for.
pub const TENANT: &str = "bench";
/// How long the agents' first certificates are valid.
const ISSUED_DAYS: u32 = 1;
/// How long the broker's renewals are valid: longer than [`ISSUED_DAYS`], so the broker's view of
/// an agent's certificate tells a renewed one from its first.
pub const RENEWED_LIFETIME: Duration = Duration::from_secs(48 * 3600);

/// What the bench's clients need: one TLS configuration per identity.
pub struct Pki {
    /// The admin's configuration (submits, lists, health checks).
    pub admin: Arc<ClientConfig>,
    /// Agent `i`'s configuration, for node `node-<i>`.
    pub agents: Vec<Arc<ClientConfig>>,
    /// The trust bundle (the root), PEM: what renewed agent certificates are loaded with.
    pub ca_pem: String,
    /// How long issuing took.
    pub elapsed: Duration,
}

/// The node name of agent `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// The directory of the root and issuing CA inside the state directory (the broker's `ca_dir`).
pub fn ca_dir(dir: &Path) -> PathBuf {
    dir.join("pki")
}

/// Makes a root and an issuing CA in [`ca_dir`], writes the trust bundle and the broker's
/// certificate into `dir`, and issues an admin and `agents` agent certificates in memory, in
/// parallel on all cores (agent `i` at site `site_of(i)`).
pub fn make_pki(dir: &Path, agents: usize, site_of: &(dyn Fn(usize) -> String + Sync)) -> anyhow::Result<Pki> {
    let started = Instant::now();
    pki::init_ca(&ca_dir(dir), TRUST_DOMAIN)?;
    let ca = Ca::load(&ca_dir(dir))?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).context("writing ca.pem")?;
    let broker = IssueRequest {
        role: Role::Broker,
        name: "broker".into(),
        site: None,
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("an ip address")],
        days: 1,
    };
    ca.issue_to_dir(dir, &broker)?;
    let admin = client(&ca, Role::Admin, "bench-admin", None)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(agents.max(1));
    let mut issued: Vec<Option<Arc<ClientConfig>>> = vec![None; agents];
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let ca = &ca;
                scope.spawn(move || {
                    (t..agents)
                        .step_by(threads)
                        .map(|i| Ok((i, client(ca, Role::Agent, &node_name(i), Some(&site_of(i)))?)))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        for worker in workers {
            for (i, config) in worker.join().expect("a certificate worker panicked")? {
                issued[i] = Some(config);
            }
        }
        Ok(())
    })?;
    let agents = issued.into_iter().map(|c| c.expect("every agent was issued")).collect();
    Ok(Pki { admin, agents, ca_pem: ca.cert_pem().to_owned(), elapsed: started.elapsed() })
}

/// Issues a client certificate and builds its TLS configuration, trusting only broker servers.
fn client(ca: &Ca, role: Role, name: &str, site: Option<&str>) -> anyhow::Result<Arc<ClientConfig>> {
    let request = IssueRequest {
        role,
        name: name.into(),
        site: site.map(Into::into),
        dns: vec![],
        ips: vec![],
        days: ISSUED_DAYS,
    };
    let issued = ca.issue(&request)?;
    let config = tls::client_config_from_pem(
        ca.cert_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        TRUST_DOMAIN,
        Role::Broker,
    )?;
    Ok(config)
}

/// Writes the broker's config into `dir` and returns its path: listen on any loopback port, the
/// issuing CA of [`ca_dir`] (it signs renewals), the SQLite store in `dir` (its default
/// `synchronous=FULL`), the lease TTL, heartbeats every third of it, and a `bench` tenant allowed
/// `max_unfinished` unfinished jobs; with `sites`, placement on (see [`super::sites`]).
pub fn write_broker_config(
    dir: &Path,
    lease_ttl: Duration,
    max_unfinished: usize,
    sites: Option<SiteLayout>,
) -> anyhow::Result<PathBuf> {
    let quote = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    let heartbeat = (lease_ttl / 3).max(Duration::from_millis(100));
    let mut config = String::new();
    writeln!(config, "[broker]\nlisten = \"127.0.0.1:0\"\nca_dir = {}", quote(ca_dir(dir)))?;
    if sites.is_some() {
        // The cloud sites are elastic (a `local` provider), which needs the enrol listener; the
        // bench tenant's cap keeps every job off them, so nothing is ever launched.
        writeln!(config, "enroll_listen = \"127.0.0.1:0\"")?;
    }
    writeln!(config, "agent_cert_lifetime = \"{}h\"\n", RENEWED_LIFETIME.as_secs() / 3600)?;
    writeln!(config, "[tls]\nca_cert = {}", quote(dir.join("ca.pem")))?;
    writeln!(config, "cert = {}\nkey = {}\n", quote(dir.join("broker.pem")), quote(dir.join("broker-key.pem")))?;
    writeln!(config, "[store]\npath = {}\n", quote(dir.join("broker.db")))?;
    writeln!(
        config,
        "[leases]\nttl = \"{}ms\"\nheartbeat_interval = \"{}ms\"\n",
        lease_ttl.as_millis(),
        heartbeat.as_millis()
    )?;
    let cap = u32::try_from(max_unfinished.max(1000)).unwrap_or(u32::MAX);
    if let Some(sites) = sites {
        sites.write(dir, &mut config)?;
    }
    writeln!(config, "[[tenant]]\nname = \"{TENANT}\"\nmax_queued_jobs = {cap}")?;
    if sites.is_some() {
        writeln!(config, "max_usd_per_hour = {TENANT_MAX_USD_PER_HOUR}")?;
    }
    let path = dir.join("broker.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The state directory: `given` (which must not hold an earlier run), or a fresh temporary one.
pub fn state_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => {
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            std::env::temp_dir().join(format!("hybroker-bench-{}-{}", std::process::id(), stamp.as_millis()))
        }
    };
    if dir.join("broker.db").exists() || dir.join("ca.pem").exists() {
        anyhow::bail!("{} already holds a bench run; give a fresh --state-dir", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::sites::ONPREM_CPU_HOUR_USD;
    use super::*;

    #[test]
    fn the_written_config_loads_and_every_cloud_price_is_above_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let layout = SiteLayout::new(14);
        let path = write_broker_config(dir.path(), Duration::from_secs(30), 10, layout).unwrap();
        // Validation wants the TLS files to exist (the bench writes them with its PKI).
        for file in ["ca.pem", "broker.pem", "broker-key.pem"] {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        let parsed: crate::config::BrokerConfig = crate::config::load_toml(&path, []).unwrap();
        parsed.validate(&path).unwrap();
        assert_eq!(parsed.sites.len(), 14);
        let bench = parsed.tenants.iter().find(|t| t.name == TENANT).unwrap();
        assert_eq!(bench.max_usd_per_hour, Some(TENANT_MAX_USD_PER_HOUR));
        let prices = crate::pricing::read_snapshot(&dir.path().join("prices.json")).unwrap();
        let cheapest = prices.compute.iter().map(|p| p.usd_per_hour).fold(f64::INFINITY, f64::min);
        assert!(cheapest > TENANT_MAX_USD_PER_HOUR && ONPREM_CPU_HOUR_USD < TENANT_MAX_USD_PER_HOUR, "{cheapest}");
    }
}
