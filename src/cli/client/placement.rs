//! `hybroker plan` (where a job would run, without submitting it) and `hybroker prices`.

use std::path::PathBuf;

use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::offline_plan::{OfflineRequest, plan_offline, plan_table};
use super::{GatewayArgs, Output, connect, print_json, spec, typed};
use crate::model::price::PriceSnapshot;
use crate::model::site::Site;
use crate::placement::engine::Decision;

#[derive(Args)]
pub struct PlanArgs {
    /// The job spec file.
    file: PathBuf,
    /// Plan offline from this broker config instead of asking the gateway: the config is checked
    /// like the broker checks it, input sizes are read from the stores with the broker's
    /// credentials (else `size_hint`, else 0), on-prem sites are assumed to have room unless
    /// --site-state says otherwise, and the plan lists what it assumed.
    #[arg(long, value_name = "BROKER_TOML")]
    config: Option<PathBuf>,
    /// With --config: the state of sites to plan in (TOML: `[site.NAME]` with `free_gpus = {
    /// "H100-80GB" = 4 }`, optional `free_cpus`, `free_memory_gib`, and `wait = "35m"`).
    #[arg(long, requires = "config", value_name = "TOML")]
    site_state: Option<PathBuf>,
    /// With --config: do not ask the stores for input sizes (each input is its `size_hint`, else 0).
    #[arg(long, requires = "config")]
    no_store_reads: bool,
    /// With --config: the price snapshot to use (default: the config's `prices.snapshot`).
    #[arg(long, requires = "config", value_name = "JSON")]
    prices: Option<PathBuf>,
    /// With --config: the tenant whose policy and allowed storage prefixes apply.
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
        Some(config) => {
            let request = OfflineRequest {
                file: &args.file,
                config,
                prices: args.prices.as_deref(),
                tenant: &args.tenant,
                site_state: args.site_state.as_deref(),
                read_stores: !args.no_store_reads,
            };
            let plan = plan_offline(&request).await?;
            match args.gw.output {
                Output::Json => print_json(&serde_json::to_value(&plan)?),
                Output::Table => print!("{}", plan_table(&plan)),
            }
            return Ok(0);
        }
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
