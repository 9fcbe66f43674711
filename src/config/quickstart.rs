//! `hybroker quickstart --config FILE`: what an all-in-one quickstart takes from a file. Everything
//! else is embedded; only how it is watched can be set: `[metrics]` (one `/metrics` endpoint for the
//! broker, the gateway and the agents, which share the process, with the broker's Prometheus
//! service discovery beside it) and `[telemetry]` (trace export), as in the services' configs.

use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, finish, load_toml};

/// The quickstart's optional config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickstartConfig {
    #[serde(default)]
    pub metrics: crate::metrics::MetricsSection,
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
}

impl QuickstartConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_toml(path, std::env::vars())?;
        let mut problems = Vec::new();
        config.telemetry.check(&mut problems);
        finish(path, problems)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_toml;

    #[test]
    fn only_metrics_and_telemetry_are_read() {
        let path = Path::new("quickstart.toml");
        let text = "[metrics]\nlisten = \"127.0.0.1:9464\"\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n";
        let config: QuickstartConfig = parse_toml(text, path, []).unwrap();
        assert_eq!(config.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let err = parse_toml::<QuickstartConfig>("[broker]\nlisten = \"x\"\n", path, []).unwrap_err();
        assert!(err.to_string().contains("unknown field `broker`"), "{err}");
    }
}
