//! `hybroker sites list|get` (admin tenants, through the gateway) and the tables both it and the
//! operators' `hybroker admin sites` print: per site its provider, instances by state, pending
//! launches and this month's spend; per instance its launch, state, type, market, price, age, idle
//! time and agent; and the pools left out of placement with their reason and age.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use reqwest::Method;

use super::output::{age, short_duration, table};
use super::{GatewayArgs, connect, typed};
use crate::cli::report::{Output, print_json};
use crate::gateway::api::{SiteCapacity, SiteList};

/// Instance states in their lifecycle's order, as the INSTANCES column lists them.
const STATES: [&str; 4] = ["requested", "booting", "enrolled", "retiring"];

#[derive(Args)]
pub struct SitesArgs {
    #[command(subcommand)]
    command: SitesCommand,
    #[command(flatten)]
    gw: GatewayArgs,
}

/// The sites commands, the same through the gateway and with an admin certificate.
#[derive(Subcommand, Clone)]
pub enum SitesCommand {
    /// Every site with a capacity provider: instances by state, pending launches, spend this month.
    List,
    /// One site: each instance (launch, state, type, market, $/h, age, idle, agent) and the
    /// instance types left out of placement after a capacity or quota error, with the reason.
    Get {
        /// The site's name (`[[site]] name`).
        site: String,
    },
}

/// Runs `hybroker sites …` against the gateway.
pub(super) async fn sites(args: SitesArgs) -> anyhow::Result<i32> {
    let gw = connect(&args.gw)?;
    let out = args.gw.output;
    match args.command {
        SitesCommand::List => {
            let value = gw.json(gw.request(Method::GET, &["v1", "sites"], false)).await?;
            match out {
                Output::Json => print_json(&value),
                Output::Table => print!("{}", sites_table(&typed::<SiteList>(value)?.sites)),
            }
        }
        SitesCommand::Get { site } => {
            let value = gw.json(gw.request(Method::GET, &["v1", "sites", &site], false)).await?;
            match out {
                Output::Json => print_json(&value),
                Output::Table => print!("{}", site_details(&typed::<SiteCapacity>(value)?, SystemTime::now())),
            }
        }
    }
    Ok(0)
}

/// US dollars with cents.
fn usd(amount: f64) -> String {
    format!("${amount:.2}")
}

/// `2 enrolled, 1 booting`, in lifecycle order; `none` without instances.
pub fn by_state(site: &SiteCapacity) -> String {
    let known = STATES.iter().filter_map(|s| Some((*s, *site.instances_by_state.get(*s)?)));
    let other = site.instances_by_state.iter().filter(|(s, _)| !STATES.contains(&s.as_str()));
    let parts: Vec<String> = known
        .chain(other.map(|(s, n)| (s.as_str(), *n)))
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

/// SITE, PROVIDER, INSTANCES (by state), PENDING, SPEND, IDLE.
pub fn sites_table(sites: &[SiteCapacity]) -> String {
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            vec![
                s.site.clone(),
                s.provider.clone(),
                by_state(s),
                s.pending_launches.to_string(),
                usd(s.spend_usd),
                usd(s.idle_usd),
            ]
        })
        .collect();
    table(&["SITE", "PROVIDER", "INSTANCES", "PENDING", "SPEND", "IDLE"], &rows)
}

/// One site: a summary line, its instances, and its unavailable pools (ages from `now`).
pub fn site_details(s: &SiteCapacity, now: SystemTime) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(out, "site {} (provider {})", crate::model::text::escape(&s.site), s.provider);
    let _ = writeln!(
        out,
        "  instances {}  pending launches {}  spend this month {} (idle {})",
        by_state(s),
        s.pending_launches,
        usd(s.spend_usd),
        usd(s.idle_usd)
    );
    out.push('\n');
    if s.instances.is_empty() {
        out.push_str("no instances\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .instances
            .iter()
            .map(|i| {
                vec![
                    i.launch_id.clone(),
                    dash(&i.instance_id),
                    i.state.clone(),
                    i.instance_type.clone(),
                    i.market.clone(),
                    format!("${:.3}", i.usd_per_hour),
                    short_duration(Duration::from_secs(i.age_s)),
                    if i.idle_s == 0 { "-".into() } else { short_duration(Duration::from_secs(i.idle_s)) },
                    dash(&i.agent),
                    dash(&i.reason),
                ]
            })
            .collect();
        let headers = ["LAUNCH", "INSTANCE", "STATE", "TYPE", "MARKET", "$/H", "AGE", "IDLE", "AGENT", "REASON"];
        out.push_str(&table(&headers, &rows));
    }
    out.push('\n');
    if s.unavailable.is_empty() {
        out.push_str("no unavailable pools\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .unavailable
            .iter()
            .map(|u| vec![u.instance_type.clone(), u.market.clone(), age(&u.since, now), u.reason.clone()])
            .collect();
        out.push_str("unavailable pools (left out of placement):\n");
        out.push_str(&table(&["TYPE", "MARKET", "AGE", "REASON"], &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::gateway::api::{Instance, UnavailablePool};

    fn site() -> SiteCapacity {
        let instance = |id: Option<&str>, state: &str, idle_s: u64| Instance {
            launch_id: format!("hbl-{state}"),
            instance_id: id.map(Into::into),
            state: state.into(),
            instance_type: "p5.48xlarge".into(),
            market: "spot".into(),
            usd_per_hour: 12.5,
            age_s: 125,
            idle_s,
            agent: id.map(|id| format!("aws-us-east-1/{id}")),
            reason: None,
        };
        SiteCapacity {
            site: "aws-us-east-1".into(),
            provider: "aws".into(),
            instances_by_state: BTreeMap::from([("booting".into(), 1), ("enrolled".into(), 2)]),
            instances: vec![instance(Some("i-0a"), "enrolled", 0), instance(None, "booting", 0)],
            pending_launches: 1,
            spend_usd: 12.345,
            idle_usd: 1.2,
            unavailable: vec![UnavailablePool {
                instance_type: "g6.xlarge".into(),
                market: "on-demand".into(),
                reason: "InsufficientInstanceCapacity\u{202e}".into(),
                since: "2026-01-01T00:00:00Z".into(),
            }],
        }
    }

    #[test]
    fn the_list_shows_instances_by_state_in_lifecycle_order_and_spend_in_dollars() {
        let table = sites_table(&[site()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "SITE           PROVIDER  INSTANCES              PENDING  SPEND   IDLE");
        assert_eq!(lines[1], "aws-us-east-1  aws       1 booting, 2 enrolled  1        $12.35  $1.20");
        let empty = SiteCapacity { instances_by_state: BTreeMap::new(), ..site() };
        assert!(sites_table(&[empty]).lines().nth(1).unwrap().contains(" none "));
    }

    #[test]
    fn details_list_each_instance_and_the_unavailable_pools_with_their_age() {
        let now = humantime::parse_rfc3339("2026-01-01T00:05:00Z").unwrap();
        let text = site_details(&site(), now);
        assert!(text.starts_with("site aws-us-east-1 (provider aws)\n"), "{text}");
        assert!(
            text.contains("LAUNCH        INSTANCE  STATE     TYPE         MARKET  $/H      AGE  IDLE  AGENT"),
            "{text}"
        );
        assert!(
            text.contains(
                "hbl-enrolled  i-0a      enrolled  p5.48xlarge  spot    $12.500  2m   -     aws-us-east-1/i-0a  -"
            ),
            "{text}"
        );
        assert!(text.contains("hbl-booting   -         booting"), "{text}");
        // The cloud's reason is shown escaped, its age from `since`.
        assert!(text.contains("g6.xlarge  on-demand  5m   InsufficientInstanceCapacity\\u{202e}"), "{text}");
        let bare = SiteCapacity { instances: vec![], unavailable: vec![], ..site() };
        let text = site_details(&bare, now);
        assert!(text.contains("no instances\n") && text.contains("no unavailable pools\n"), "{text}");
    }
}
