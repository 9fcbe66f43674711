//! Undrain, remove and the audit trail: `hybroker agents undrain` (tenants' CLI, admin tenant),
//! `hybroker admin undrain`, `hybroker admin agents remove [--force]` (refused while connected,
//! attempts re-queued when forced; the agent gone from `admin agents` and from `/metrics`) and
//! `hybroker admin events`, which names the admin identity that acted.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use hybroker::gateway::api::{Agent, AgentList};
use hybroker::model::identity::Role;
use hybroker::tls::TlsPaths;
use serde_json::Value;

use crate::common::*;

struct Fleet {
    cluster: Cluster,
    admin: TlsPaths,
}

impl Fleet {
    /// `hybroker admin ARGS --output json` with the admin certificate.
    async fn admin(&self, args: &[&str]) -> Output {
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let mut command = tokio::process::Command::new(BIN);
        command
            .arg("admin")
            .args(args)
            .args(["--output", "json", "--broker", &format!("https://{}", self.cluster.addr)])
            .args(["--ca-cert", &path(&self.admin.ca_cert), "--cert", &path(&self.admin.cert)])
            .args(["--key", &path(&self.admin.key)])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(DEADLINE, command.output()).await.expect("admin command in time").unwrap()
    }

    async fn agents(&self) -> Vec<Agent> {
        let out = self.admin(&["agents"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<AgentList>(&out.stdout).unwrap().agents
    }
}

fn json<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    assert!(
        out.status.success(),
        "stdout {}\nstderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn metrics(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_undrained_and_removed_and_every_action_is_in_the_audit_trail() {
    let metrics_file = std::env::temp_dir().join(format!("fleet-admin-{}.addr", fastrand::u64(..)));
    let metrics_section = tenants_with_metrics(&metrics_file);
    let setup = |_: &std::path::Path| Setup { broker_extra: Some(metrics_section), ..Setup::default() };
    let cluster = Cluster::start_with(Duration::from_secs(4), &[("node-a", "")], setup).await;
    let admin = cluster.issue(Role::Admin, "fleet-admin", None);
    let gateway = cluster.start_gateway();
    let ops_key = cluster.tenant_key("ops");
    let fleet = Fleet { cluster, admin };
    let metrics_addr = metrics_addr(&metrics_file).await;
    let _ = std::fs::remove_file(&metrics_file);
    eventually("node-a connected", || async {
        fleet.agents().await.iter().any(|a| a.id == "lab/node-a" && a.connected).then_some(())
    })
    .await;

    let series = "hybroker_agents_connected{site=\"lab\"} 1";
    eventually("the site's series on /metrics", || async {
        metrics(metrics_addr).await.contains(series).then_some(())
    })
    .await;

    // Drain and undrain: the admin CLI, then the tenants' CLI through the gateway (admin tenant).
    assert!(json::<Agent>(&fleet.admin(&["drain", "lab/node-a"]).await).draining);
    assert!(!json::<Agent>(&fleet.admin(&["undrain", "lab/node-a"]).await).draining);
    assert!(json::<Agent>(&fleet.admin(&["drain", "lab/node-a"]).await).draining);
    let tenant_cli = tokio::process::Command::new(BIN)
        .args(["agents", "undrain", "lab/node-a", "--output", "json"])
        .env("HYBROKER_GATEWAY", &gateway.url)
        .env("HYBROKER_TOKEN", &ops_key)
        .env_remove("HYBROKER_CA_CERT")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!json::<Agent>(&tenant_cli).draining);
    // Undrained, it takes work again.
    let mut client = fleet.cluster.admin().await;
    let job = submit(&mut client, "name: long\ncommand: [sleep, '60']\n").await;
    wait_job(&client, &job, "running on node-a", |j| j.state == "running").await;

    // Removing a connected agent is refused; --force closes its stream and re-queues its attempt.
    let refused = fleet.admin(&["agents", "remove", "lab/node-a"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("agent lab/node-a is connected") && stderr.contains("--force"), "{stderr}");
    let removed: Agent = json(&fleet.admin(&["agents", "remove", "lab/node-a", "--force"]).await);
    assert_eq!(removed.id, "lab/node-a");
    let events = watch_until(&mut client, &job, |e| e.reason.contains("the agent was removed")).await;
    assert!(events.iter().any(|e| e.state == "queued"), "{events:?}");
    client
        .cancel(hybroker::proto::CancelJobRequest { job_id: job.clone(), tenant: String::new(), reason: "done".into() })
        .await
        .unwrap();

    // The agent still runs: it reconnects and is known again.
    eventually("node-a back", || async {
        fleet.agents().await.iter().any(|a| a.id == "lab/node-a" && a.connected).then_some(())
    })
    .await;

    // Gone for good: the agent stopped, then removed without --force; no longer listed, and its
    // site's series leaves /metrics.
    let mut cluster = fleet.cluster;
    cluster.kill_agent("node-a");
    let fleet = Fleet { cluster, admin: fleet.admin };
    eventually("node-a disconnected", || async {
        fleet.agents().await.iter().all(|a| a.id != "lab/node-a" || !a.connected).then_some(())
    })
    .await;
    json::<Agent>(&fleet.admin(&["agents", "remove", "lab/node-a"]).await);
    assert!(fleet.agents().await.is_empty());
    eventually("the site's series to leave /metrics", || async {
        (!metrics(metrics_addr).await.contains("hybroker_agents_connected{site=\"lab\"")).then_some(())
    })
    .await;

    // Forgotten by the store too: a restarted broker does not know it.
    let mut fleet = fleet;
    let port = fleet.cluster.addr.port();
    fleet.cluster.kill_broker();
    fleet.cluster.start_broker(port);
    assert!(fleet.agents().await.is_empty());

    // The audit trail: newest first, each action with the identity that acted.
    let trail: Value = json(&fleet.admin(&["events", "--limit", "10"]).await);
    let rows: Vec<(String, String, String)> = trail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["target"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    let admin_uri = format!("spiffe://{TRUST_DOMAIN}/admin/fleet-admin");
    // The gateway acts for an admin tenant: both are named.
    let gateway_uri = format!("spiffe://{TRUST_DOMAIN}/gateway/gateway (tenant ops)");
    let expected = [
        ("agent.remove", &admin_uri),
        ("agent.remove", &admin_uri),
        ("agent.undrain", &gateway_uri),
        ("agent.drain", &admin_uri),
        ("agent.undrain", &admin_uri),
        ("agent.drain", &admin_uri),
    ];
    let got: Vec<(&str, &String)> = rows.iter().map(|(a, _, who)| (a.as_str(), who)).collect();
    assert_eq!(got, expected, "{trail}");
    assert!(rows.iter().all(|(_, target, _)| target == "lab/node-a"), "{trail}");
}

/// Watches a job's events until one matches (or it ends); returns those seen.
async fn watch_until(
    client: &mut hybroker::proto::job_service_client::JobServiceClient<tonic::transport::Channel>,
    id: &str,
    found: impl Fn(&hybroker::proto::JobEvent) -> bool,
) -> Vec<hybroker::proto::JobEvent> {
    let request = hybroker::proto::WatchJobRequest { job_id: id.to_string(), tenant: String::new(), after_seq: 0 };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let mut seen = Vec::new();
    let watched = tokio::time::timeout(DEADLINE, async {
        while let Some(ev) = tokio_stream::StreamExt::next(&mut stream).await {
            let ev = ev.unwrap();
            let hit = found(&ev);
            seen.push(ev);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(watched, Ok(true), "{seen:?}");
    seen
}
