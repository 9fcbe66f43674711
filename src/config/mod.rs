//! Configuration: TOML files with commented defaults under `config/`, `deny_unknown_fields`,
//! environment overrides named `HYBROKER_<SECTION>__<KEY>`, and a `validate()` that reports every
//! problem at once. Only this module and `main.rs` read the process environment (invariant 5,
//! checked by `tests/layers.rs`).
//!
//! One file per role: [`broker`] (and the sections only the broker reads: [`tenants`], [`storage`],
//! [`placement`]), [`gateway`], [`agent`]. This file holds the loading and the shared checks.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::tls::TlsPaths;

pub mod agent;
pub mod azure_env;
pub mod broker;
pub mod gateway;
pub mod placement;
pub mod quickstart;
pub mod storage;
pub mod tenants;

pub use agent::{
    AgentConfig, AgentSection, AgentStagingSection, IsolationSetting, ReconnectSection, SandboxNetwork, SandboxSection,
};
pub use broker::{BrokerConfig, BrokerSection, LeaseSection, LimitSection, SecretsSection, StoreSection};
pub use gateway::{BrokerTarget, GatewayConfig, GatewaySection};
pub use placement::{PlacementSection, PricesSection};
pub use quickstart::QuickstartConfig;
pub use storage::{StagingSection, StorageCloud, StorageConfig};
pub use tenants::{DedicatedAgent, TenantConfig, dedicated_to};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path} is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

pub(crate) fn check_tls(tls: &TlsPaths, problems: &mut Vec<String>) {
    for (key, path) in [("tls.ca_cert", &tls.ca_cert), ("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if !path.is_file() {
            problems.push(format!("{key}: {} does not exist (make one with `hybroker pki`)", path.display()));
        }
    }
}

pub(crate) fn finish(path: &Path, problems: Vec<String>) -> Result<(), ConfigError> {
    if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid { path: path.display().to_string(), problems }) }
}

/// Where a service's config is: `given` (`--config`, or `HYBROKER_CONFIG` through clap), else
/// `./config/<role>.toml`, else `/etc/hybroker/<role>.toml`; an error names every place looked at.
pub fn find(given: Option<std::path::PathBuf>, role: &str) -> Result<std::path::PathBuf, ConfigError> {
    if let Some(path) = given {
        return Ok(path);
    }
    let candidates =
        [format!("config/{role}.toml"), format!("/etc/hybroker/{role}.toml")].map(std::path::PathBuf::from);
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| ConfigError::Parse {
        path: candidates[0].display().to_string(),
        message: format!(
            "no {role} config: no --config given, HYBROKER_CONFIG is not set, and neither {} nor {} exists",
            candidates[0].display(),
            candidates[1].display()
        ),
    })
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
    use std::time::Duration;

    use super::*;
    use crate::config::broker::BrokerConfig;

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

    /// Every example under `config/` parses as the configuration its name says (their validation,
    /// which needs certificates, is checked end to end in `tests/e2e/product.rs`).
    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut parsed = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|n| n.ends_with(".toml")) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).unwrap();
            let result = match name.split(['-', '.']).next() {
                Some("broker") => parse_toml::<BrokerConfig>(&text, &path, []).map(drop),
                Some("gateway") => parse_toml::<crate::config::GatewayConfig>(&text, &path, []).map(drop),
                Some("agent") => parse_toml::<crate::config::AgentConfig>(&text, &path, []).map(drop),
                Some("quickstart") => parse_toml::<QuickstartConfig>(&text, &path, []).map(drop),
                _ => panic!("{name}: name an example config after its role (broker, gateway, agent, quickstart)"),
            };
            result.unwrap_or_else(|e| panic!("{e}"));
            parsed.push(name.to_string());
        }
        assert!(parsed.len() >= 4, "{parsed:?}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n";
        let err = parse_toml::<BrokerConfig>(text, Path::new("t.toml"), []).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
