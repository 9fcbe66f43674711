//! `hybroker gateway`'s configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, check_tls, finish, load_toml};
use crate::model::network::IpNetwork;
use crate::tls::TlsPaths;

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
    pub metrics: crate::metrics::MetricsSection,
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
    pub trusted_proxies: Vec<IpNetwork>,
    /// Event streams, followed logs and downloads/uploads streamed through the gateway a tenant may
    /// have open at once (429 beyond).
    #[serde(default = "default_max_streams_per_tenant")]
    pub max_streams_per_tenant: u32,
    /// On SIGTERM: how long open requests may take to finish (event streams end at once) before
    /// the gateway exits anyway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: crate::model::duration::HumanDuration,
}

fn default_shutdown_grace() -> crate::model::duration::HumanDuration {
    std::time::Duration::from_secs(10).into()
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
            shutdown_grace: default_shutdown_grace(),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_toml;

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
}
