//! `hybroker plan` (where a job would run, without submitting it) and `hybroker prices`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::{GatewayArgs, Output, connect, print_json, spec, typed};
use crate::broker::placer::Placer;
use crate::config::{BrokerConfig, parse_toml};
use crate::model::data::{DataUri, JobData, OutputTarget};
use crate::model::gpu::known_models;
use crate::model::job::JobSpec;
use crate::model::price::PriceSnapshot;
use crate::model::site::{Site, SiteKind};
use crate::placement::bind::FreeCapacity;
use crate::placement::engine::Decision;

#[derive(Args)]
pub struct PlanArgs {
    /// The job spec file.
    file: PathBuf,
    /// Plan offline from this broker config instead of asking the gateway (sites, policies,
    /// locations; on-prem sites are assumed to have room and input sizes are unknown, so 0).
    #[arg(long, value_name = "BROKER_TOML")]
    config: Option<PathBuf>,
    /// With --config: the price snapshot to use (default: the config's `prices.snapshot`).
    #[arg(long, requires = "config", value_name = "JSON")]
    prices: Option<PathBuf>,
    /// With --config: the tenant whose policy applies.
    #[arg(long, requires = "config", default_value = "default")]
    tenant: String,
    #[command(flatten)]
    gw: GatewayArgs,
}

#[derive(Args)]
pub struct PricesArgs {
    /// Only this site's prices.
    #[arg(long)]
    site: Option<String>,
    #[command(flatten)]
    gw: GatewayArgs,
}

pub async fn plan(args: PlanArgs) -> anyhow::Result<i32> {
    let decision = match &args.config {
        Some(config) => serde_json::to_value(plan_offline(&args.file, config, args.prices.as_deref(), &args.tenant)?)?,
        None => {
            let body = spec::request_body(&args.file)?;
            let gw = connect(&args.gw)?;
            let rb = gw.request(Method::POST, &["v1", "plan"], false).header("content-type", "application/json");
            gw.json(rb.body(body)).await?
        }
    };
    match args.gw.output {
        Output::Json => print_json(&decision),
        Output::Table => print!("{}", super::explain::decision_table(&typed::<Decision>(decision)?)),
    }
    Ok(0)
}

/// The decision from a broker config and a price snapshot alone.
fn plan_offline(
    file: &std::path::Path,
    config_path: &std::path::Path,
    prices: Option<&std::path::Path>,
    tenant: &str,
) -> anyhow::Result<Decision> {
    let text = std::fs::read_to_string(config_path).with_context(|| config_path.display().to_string())?;
    let config: BrokerConfig = parse_toml(&text, config_path, [])?;
    if config.sites.is_empty() {
        anyhow::bail!("{} declares no [[site]]: there is nothing to plan", config_path.display());
    }
    let snapshot_path = prices.map_or_else(|| config.prices.snapshot.clone(), std::path::Path::to_path_buf);
    let snapshot: PriceSnapshot = crate::pricing::read_snapshot(&snapshot_path)?;
    let doc = std::fs::read(file).with_context(|| file.display().to_string())?;
    let spec = JobSpec::from_yaml(&doc, config.limits.max_spec_bytes)?;
    let data = offline_data(&spec, &config)?;
    let (_tx, prices) = tokio::sync::watch::channel(Arc::new(snapshot));
    let placer = Placer::new(&config, prices);
    let now = crate::pricing::now_ms();
    let job = placer.request(tenant, &spec, Some(&data), None, now).map_err(anyhow::Error::msg)?;
    let room: Vec<(String, Vec<FreeCapacity>)> =
        config.sites.iter().filter(|s| s.kind == SiteKind::Onprem).map(|s| (s.name.clone(), vec![room(s)])).collect();
    let capacity: HashMap<&str, (Vec<FreeCapacity>, Vec<FreeCapacity>)> =
        room.iter().map(|(name, free)| (name.as_str(), (free.clone(), free.clone()))).collect();
    Ok(placer.place(&job, &placer.world(&capacity, |_| Vec::new(), |_| None, now)))
}

/// Inputs and outputs mapped to the config's locations (sizes unknown offline: 0).
fn offline_data(spec: &JobSpec, config: &BrokerConfig) -> anyhow::Result<JobData> {
    let location = |field: &str, uri: &str| -> anyhow::Result<(String, DataUri)> {
        let parsed = DataUri::parse(uri).map_err(|e| anyhow::anyhow!("{field}: {e}"))?;
        let found = config.storage.iter().find(|s| s.uri_store() == (parsed.scheme, parsed.store.clone()));
        let found = found.ok_or_else(|| anyhow::anyhow!("{field}: {uri} is in no [[storage]] location"))?;
        Ok((found.name.clone(), parsed))
    };
    let mut data = JobData::default();
    for (i, input) in spec.inputs.iter().enumerate() {
        let (name, uri) = location(&format!("inputs[{i}].uri"), &input.uri)?;
        data.inputs.push(crate::model::data::InputObject {
            location: name,
            key: uri.path,
            path: input.path.clone(),
            size: 0,
            etag: None,
            md5: None,
        });
    }
    for (i, output) in spec.outputs.iter().enumerate() {
        let Some(to) = &output.to else {
            // Given by residency: placement chooses among every location of the group.
            data.outputs.push(OutputTarget {
                path: output.path.clone(),
                location: String::new(),
                to: String::new(),
                prefix: String::new(),
                residency: output.residency.clone(),
                choices: Vec::new(),
            });
            continue;
        };
        let (name, uri) = location(&format!("outputs[{i}].to"), to)?;
        data.outputs.push(OutputTarget {
            path: output.path.clone(),
            location: name,
            to: to.clone(),
            prefix: uri.path,
            residency: None,
            choices: Vec::new(),
        });
    }
    Ok(data)
}

/// A node big enough for any job, with the GPU models the on-prem site prices.
fn room(site: &Site) -> FreeCapacity {
    let models: Vec<String> = if site.gpu_hour_usd_by_model.is_empty() {
        known_models().iter().map(|m| m.to_string()).collect()
    } else {
        site.gpu_hour_usd_by_model.keys().cloned().collect()
    };
    let gpus = models.iter().flat_map(|m| (0..64).map(move |_| m.clone())).enumerate();
    FreeCapacity { gpus: gpus.map(|(i, m)| (i as u32, m)).collect(), cpus: 4096, memory_mib: 64 << 20, tenant: None }
}

pub async fn prices(args: PricesArgs) -> anyhow::Result<i32> {
    let gw = connect(&args.gw)?;
    let value = gw.json(gw.request(Method::GET, &["v1", "prices"], false)).await?;
    match args.gw.output {
        Output::Json => print_json(&value),
        Output::Table => print!("{}", prices_table(&value, args.site.as_deref())?),
    }
    Ok(0)
}

/// One row per site and instance type (with its price, source and age), then the site's egress.
fn prices_table(value: &Value, only: Option<&str>) -> anyhow::Result<String> {
    let snapshot: PriceSnapshot = typed(value["snapshot"].clone())?;
    let sites: Vec<Site> = typed(value["sites"].clone())?;
    let now = value["now_ms"].as_i64().unwrap_or_default();
    let age = |at: i64| format!("{:.1} h", (now - at).max(0) as f64 / 3_600_000.0);
    let stale = if value["stale"].as_bool() == Some(true) { " (STALE)" } else { "" };
    let mut out = format!("snapshot {} from {}{stale}\n", snapshot.id, age(snapshot.fetched_at));
    out.push_str(&format!(
        "{:<18} {:<26} {:<9} {:>10}  {:<7} SOURCE\n",
        "SITE", "INSTANCE TYPE", "MARKET", "$/H", "AGE"
    ));
    for site in sites.iter().filter(|s| only.is_none_or(|o| o == s.name)) {
        let Some(cloud) = site.kind.cloud() else {
            let price = site.gpu_hour_usd.map_or("-".into(), |p| format!("{p:.4}"));
            out.push_str(&format!(
                "{:<18} {:<26} {:<9} {:>10}  {:<7} config\n",
                site.name, "owned GPU", "-", price, "-"
            ));
            continue;
        };
        for t in &site.instance_types {
            let rows: Vec<_> = snapshot
                .compute
                .iter()
                .filter(|p| p.cloud == cloud && p.region == site.region && &p.instance_type == t)
                .collect();
            if rows.is_empty() {
                out.push_str(&format!("{:<18} {:<26} {:<9} {:>10}  {:<7} no price\n", site.name, t, "-", "-", "-"));
            }
            for p in rows {
                let market = serde_json::to_value(p.market)?.as_str().unwrap_or_default().to_string();
                out.push_str(&format!(
                    "{:<18} {:<26} {:<9} {:>10.4}  {:<7} {}\n",
                    site.name,
                    t,
                    market,
                    p.usd_per_hour,
                    age(p.provenance.fetched_at),
                    p.provenance.source
                ));
            }
        }
    }
    if let Some(o) = only.filter(|o| !sites.iter().any(|s| s.name == *o)) {
        anyhow::bail!("no site {o}; sites: {}", sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::engine::{Rejection, RejectionKind, Verdict};

    /// Plans `yaml` offline against the shipped hybrid config and price snapshot.
    fn plan(yaml: &str) -> Decision {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.yaml");
        std::fs::write(&file, yaml).unwrap();
        // The config's relative snapshot path is the repository's.
        let prices = root.join("config/prices/snapshot.json");
        plan_offline(&file, &root.join("config/broker-hybrid.toml"), Some(&prices), "acme").unwrap()
    }

    #[test]
    fn offline_plans_keep_outputs_in_the_residency_of_the_inputs() {
        let job = "name: x\ncommand: [\"true\"]\ninputs: [{uri: s3://acme-datasets-eu/acme/in/, path: in/}]\n";
        let to_us = format!("{job}outputs: [{{path: out/, to: s3://acme-datasets-us/acme/r/}}]\n");
        let d = plan(&to_us);
        assert_eq!(d.residency.as_deref(), Some("eu"));
        assert!(d.chosen.is_none());
        for c in &d.candidates {
            let why = "residency: output out/ goes to us, data in eu";
            assert_eq!(c.verdict, Verdict::Rejected(Rejection::new(RejectionKind::Residency, why)), "{}", c.site);
        }
        // An output given by residency is planned too (next to one given by `to`), in the group.
        let mixed = format!(
            "{job}outputs: [{{path: out/, to: s3://acme-datasets-eu/acme/r/}}, {{path: ckpt/, residency: eu}}]\n"
        );
        let d = plan(&mixed);
        let eu = ["datasets-eu", "results-eu", "scratch"];
        assert!(d.chosen.is_some(), "{:#?}", d.candidates);
        for c in &d.candidates {
            assert_eq!(c.output_locations.len(), 2, "{c:?}");
            assert!(eu.contains(&c.output_locations[1].as_str()), "{c:?}");
        }
    }
}
