//! The operators' view of cloud capacity end to end: a broker with an on-prem site and an elastic
//! site whose capacity provider is `local` (agent processes on this machine, enrolling like VMs).
//! `hybroker sites list|get` through the gateway (admin tenants only) and `hybroker admin sites`
//! with an admin certificate show the site, its instances and spend; the broker's metrics count
//! its instances by state; `/sd/agents` on its metrics listener lists every agent's metrics
//! address, a launched instance's included, in Prometheus' HTTP SD format.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use hybroker::gateway::api::{SiteCapacity, SiteList};
use serde_json::Value;

use crate::common::*;

const ELASTIC: &str = "aws-local";

/// A cluster with a lab agent (1 GPU, metrics on), the elastic site `aws-local` (p5.48xlarge, the
/// local provider), broker metrics written to `broker-metrics.addr`, and a gateway.
struct Sites {
    gateway: Gateway,
    cluster: Cluster,
}

impl Sites {
    async fn start() -> Sites {
        let cluster = Cluster::start_with(Duration::from_secs(5), &[("n1", "1xH100-80GB")], |dir| Setup {
            broker_extra: Some(broker_config(dir)),
            broker_env: enrolling(dir, "1h"),
            agent_extra: "[metrics]\nlisten = \"127.0.0.1:0\"\n".into(),
        })
        .await;
        let gateway = cluster.start_gateway();
        Sites { gateway, cluster }
    }

    /// Runs `hybroker ARGS` against the gateway with `key`, as a tenant would.
    async fn tenant(&self, key: &str, args: &[&str]) -> Output {
        crate::common::tenant_cli(&self.gateway, key, args).await
    }

    async fn metrics(&self) -> SocketAddr {
        metrics_addr(&self.cluster.path("broker-metrics.addr")).await
    }
}

fn broker_config(dir: &Path) -> String {
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    format!(
        "{TENANTS}\n[metrics]\nlisten = \"127.0.0.1:0\"\naddr_file = \"{metrics}\"\n\
         [prices]\nsnapshot = \"{snapshot}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"{ELASTIC}\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"p5.48xlarge\"]\n[site.capacity]\nprovider = \"local\"\n\
         [site.capacity.local]\nisolation = \"none\"\n[[dedicated]]\nagent = \"{ELASTIC}/*\"\ntenant = \"default\"\n",
        metrics = dir.join("broker-metrics.addr").display(),
        snapshot = snapshot.display(),
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn show(out: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", out.status, stdout(out), String::from_utf8_lossy(&out.stderr))
}

fn json<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    assert!(out.status.success(), "{}", show(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(out)))
}

/// The body of `GET path` on `addr` (plain HTTP/1.0).
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// The target groups `/sd/agents` serves.
async fn discovered(metrics: SocketAddr) -> Vec<Value> {
    let body = http_get(metrics, "/sd/agents").await;
    serde_json::from_str::<Value>(&body).unwrap_or_else(|e| panic!("{e}: {body}")).as_array().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_are_listed_for_admins_through_the_gateway_and_with_an_admin_certificate() {
    let sites = Sites::start().await;
    let ops = sites.cluster.tenant_key("ops");

    // Admin tenants, through the gateway: a table row and the API's JSON.
    let list = sites.tenant(&ops, &["sites", "list"]).await;
    assert!(list.status.success(), "{}", show(&list));
    let text = stdout(&list);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["SITE", "PROVIDER", "INSTANCES", "PENDING", "SPEND", "IDLE"], "{text}");
    let row: Vec<&str> = lines.next().expect("a row per elastic site").split_whitespace().collect();
    assert_eq!(row, [ELASTIC, "local", "none", "0", "$0.00", "$0.00"], "{text}");
    assert_eq!(lines.next(), None, "the on-prem site has no provider: {text}");
    let listed: SiteList = json(&sites.tenant(&ops, &["sites", "list", "--output", "json"]).await);
    assert_eq!(listed.sites.len(), 1);
    assert_eq!((listed.sites[0].site.as_str(), listed.sites[0].provider.as_str()), (ELASTIC, "local"));
    assert!(listed.sites[0].instances.is_empty() && listed.sites[0].unavailable.is_empty());

    let get = sites.tenant(&ops, &["sites", "get", ELASTIC]).await;
    assert!(get.status.success(), "{}", show(&get));
    assert!(stdout(&get).starts_with(&format!("site {ELASTIC} (provider local)\n")), "{}", show(&get));
    assert!(stdout(&get).contains("no instances\n") && stdout(&get).contains("no unavailable pools\n"));
    let site: SiteCapacity = json(&sites.tenant(&ops, &["sites", "get", ELASTIC, "--output", "json"]).await);
    assert_eq!(site, listed.sites[0]);

    // Not found: a site without a provider, and no site at all; other tenants are refused.
    for missing in ["lab", "nowhere"] {
        let out = sites.tenant(&ops, &["sites", "get", missing]).await;
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no capacity provider"), "{}", show(&out));
    }
    let acme = sites.cluster.tenant_key("acme");
    let denied = sites.tenant(&acme, &["sites", "list"]).await;
    assert_eq!(denied.status.code(), Some(2), "{}", show(&denied));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not an admin tenant"), "{}", show(&denied));
    let api = reqwest::Client::new();
    let answer = api.get(format!("{}/v1/sites/{ELASTIC}", sites.gateway.url)).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::FORBIDDEN);

    // Operators, with an admin certificate: the same shapes.
    let (ok, out, err) = sites.cluster.admin_command(&["sites"]);
    assert!(ok, "{out}{err}");
    assert_eq!(out, text, "admin sites prints the gateway's table");
    let (ok, out, err) = sites.cluster.admin_command(&["--output", "json", "sites", "get", ELASTIC]);
    assert!(ok, "{out}{err}");
    assert_eq!(serde_json::from_str::<SiteCapacity>(&out).unwrap(), site);
    let (ok, out, err) = sites.cluster.admin_command(&["sites", "get", "lab"]);
    assert!(!ok && err.contains("no capacity provider"), "{out}{err}");

    // The elastic site's series are there from the start, at 0.
    let metrics = sites.metrics().await;
    for state in ["requested", "booting", "enrolled", "retiring"] {
        let series = format!("hybroker_capacity_instances{{site=\"{ELASTIC}\",state=\"{state}\"}}");
        assert_eq!(metric(metrics, &series).await, Some(0.0), "{series}");
    }
    for part in ["used", "idle"] {
        let series = format!("hybroker_capacity_usd_total{{site=\"{ELASTIC}\",part=\"{part}\"}}");
        assert_eq!(metric(metrics, &series).await, Some(0.0), "{series}");
    }
    let timeouts = format!("hybroker_capacity_launches_total{{site=\"{ELASTIC}\",result=\"boot_timeout\"}}");
    assert_eq!(metric(metrics, &timeouts).await, Some(0.0));
    let scrape = http_get(metrics, "/metrics").await;
    assert!(scrape.contains(&format!("hybroker_capacity_instances{{site=\"{ELASTIC}\"")), "{scrape}");
    assert!(!scrape.contains("hybroker_capacity_instances{site=\"lab\""), "lab has no provider: {scrape}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_instance_is_listed_counted_and_discovered_for_prometheus() {
    let mut sites = Sites::start().await;
    let metrics = sites.metrics().await;
    // The lab agent is discovered at the address its stream comes from, with its metrics port.
    let lab = eventually("the lab agent in /sd/agents", || async {
        discovered(metrics).await.into_iter().find(|g| g["labels"]["node"] == "n1")
    })
    .await;
    assert_eq!(lab["labels"]["site"], "lab", "{lab}");

    // Eight H100s: only the elastic site's p5.48xlarge holds them, so the broker launches one.
    let mut admin = sites.cluster.admin().await;
    let spec = "name: big\ncommand: [\"true\"]\nexpected_runtime: 10m\nresources: {gpus: 8, gpu_model: [H100-80GB]}\n";
    let id = submit(&mut admin, spec).await;
    let job = wait_job(&admin, &id, "the job to succeed on a launched instance", |j| j.state == "succeeded").await;
    assert_eq!(job.site, ELASTIC, "{job:?}");

    let ops = sites.cluster.tenant_key("ops");
    let site: SiteCapacity = json(&sites.tenant(&ops, &["sites", "get", ELASTIC, "--output", "json"]).await);
    assert_eq!(site.instances.len(), 1, "{site:?}");
    let instance = &site.instances[0];
    assert_eq!((instance.state.as_str(), instance.instance_type.as_str()), ("enrolled", "p5.48xlarge"), "{site:?}");
    let node = instance.instance_id.clone().expect("the instance id");
    assert_eq!(instance.agent.as_deref(), Some(format!("{ELASTIC}/{node}").as_str()), "{site:?}");
    assert!(instance.launch_id.starts_with("hbl-") && instance.usd_per_hour > 0.0, "{site:?}");
    assert_eq!((site.pending_launches, site.instances_by_state.get("enrolled")), (0, Some(&1)), "{site:?}");
    assert!(site.spend_usd > 0.0 && site.idle_usd <= site.spend_usd, "{site:?}");
    let table = stdout(&sites.tenant(&ops, &["sites", "list"]).await);
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..5], [ELASTIC, "local", "1", "enrolled", "0"], "{table}");
    let details = stdout(&sites.tenant(&ops, &["sites", "get", ELASTIC]).await);
    assert!(details.contains(&instance.launch_id) && details.contains(&node), "{details}");

    // The broker's gauges count it; its spend grows.
    let enrolled = format!("hybroker_capacity_instances{{site=\"{ELASTIC}\",state=\"enrolled\"}}");
    eventually("the enrolled instance counted", || async {
        (metric(metrics, &enrolled).await == Some(1.0)).then_some(())
    })
    .await;
    let idle = format!("hybroker_capacity_usd_total{{site=\"{ELASTIC}\",part=\"idle\"}}");
    eventually("idle spend counted", || async { (metric(metrics, &idle).await? > 0.0).then_some(()) }).await;

    // Discovered too, labelled with its site and node; its target serves the agent's metrics.
    let group = eventually("the launched agent in /sd/agents", || async {
        discovered(metrics).await.into_iter().find(|g| g["labels"]["node"] == node.as_str())
    })
    .await;
    assert_eq!(group["labels"]["site"], ELASTIC, "{group}");
    let target: SocketAddr = group["targets"][0].as_str().unwrap().parse().unwrap();
    assert!(target.ip().is_loopback(), "a local instance connects over loopback: {target}");
    assert!(http_get(target, "/metrics").await.contains("hybroker_agent_attempts_running"), "{target}");

    // An agent that disconnects stays listed (Prometheus sees it down); once removed, it is gone.
    sites.cluster.kill_agent("n1");
    let jobs = sites.cluster.admin().await;
    eventually("lab/n1 disconnected", || {
        let mut jobs = jobs.clone();
        async move {
            let agents = jobs.list_agents(hybroker::proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.id == "lab/n1" && !a.connected).then_some(())
        }
    })
    .await;
    let nodes = |groups: Vec<Value>| groups.iter().map(|g| g["labels"]["node"].to_string()).collect::<Vec<_>>();
    assert!(nodes(discovered(metrics).await).contains(&"\"n1\"".to_string()), "a disconnected agent stays listed");
    let (ok, out, err) = sites.cluster.admin_command(&["agents", "remove", "lab/n1"]);
    assert!(ok, "{out}{err}");
    let left = nodes(discovered(metrics).await);
    assert_eq!(left, [format!("\"{node}\"")], "a removed agent is not listed");
}
