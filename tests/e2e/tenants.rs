//! Tenants on the broker: API keys through `hybroker tenants`, per-tenant caps, draining agents,
//! label filters and cursors, following logs by offset.

use std::process::Command;
use std::time::Duration;

use hybroker::model::identity::Role;
use hybroker::proto::{self, SpecFormat};
use hybroker::tls::{self, TlsPaths};
use tonic::Code;

use crate::common::*;

/// Runs `hybroker tenants ARGS` with the given certificate; returns (success, stdout, stderr).
fn tenants_cli(cluster: &Cluster, cert: &TlsPaths, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("tenants")
        .args(["--broker", &format!("https://{}", cluster.addr)])
        .args(["--ca-cert", cert.ca_cert.to_str().unwrap()])
        .args(["--cert", cert.cert.to_str().unwrap(), "--key", cert.key.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn authenticate(cluster: &Cluster, key: &str) -> Result<proto::TenantInfo, tonic::Status> {
    let gateway = cluster.issue(Role::Gateway, "gw", None);
    let config = tls::client_config(&gateway, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap();
    let mut client = proto::job_service_client::JobServiceClient::new(channel);
    client.authenticate(proto::AuthenticateRequest { key: key.into() }).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_added_listed_used_and_revoked() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let admin = cluster.issue(Role::Admin, "keys-admin", None);
    let (ok, stdout, stderr) = tenants_cli(&cluster, &admin, &["add", "acme"]);
    assert!(ok, "{stdout}{stderr}");
    let field =
        |name: &str| stdout.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).expect("printed");
    let (key, key_id) = (field("key:"), field("key id:"));
    assert!(key.starts_with("hbk_"), "{stdout}");

    let info = authenticate(&cluster, &key).await.unwrap();
    assert_eq!((info.tenant.as_str(), info.key_id.as_str(), info.admin), ("acme", key_id.as_str(), false));
    let (_, listed, _) = tenants_cli(&cluster, &admin, &["list"]);
    let row = listed.lines().find(|l| l.starts_with(&key_id)).expect("listed");
    assert!(row.contains("acme") && row.contains("active") && !row.contains("never"), "{row}");
    assert!(!listed.contains(&key), "the key itself is never shown again");

    // Only admins manage keys; only declared tenants get them.
    let gateway = cluster.issue(Role::Gateway, "gw2", None);
    let (ok, _, stderr) = tenants_cli(&cluster, &gateway, &["add", "acme"]);
    assert!(!ok && stderr.contains("role gateway"), "{stderr}");
    let (ok, _, stderr) = tenants_cli(&cluster, &admin, &["add", "initech"]);
    assert!(!ok && stderr.contains("not declared"), "{stderr}");

    let (ok, stdout, stderr) = tenants_cli(&cluster, &admin, &["revoke", &key_id]);
    assert!(ok, "{stdout}{stderr}");
    let err = authenticate(&cluster, &key).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let (_, listed, _) = tenants_cli(&cluster, &admin, &["list", "--tenant", "acme"]);
    assert!(listed.lines().any(|l| l.starts_with(&key_id) && l.contains("revoked")), "{listed}");
    assert_eq!(authenticate(&cluster, "hbk_0000_ffff").await.unwrap_err().code(), Code::Unauthenticated);
}

fn job_for(tenant: &str, spec: &str) -> proto::SubmitRequest {
    proto::SubmitRequest {
        spec: spec.as_bytes().to_vec(),
        format: SpecFormat::Yaml.into(),
        idempotency_key: String::new(),
        tenant: tenant.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_exceed_its_unfinished_job_cap() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await; // no agents: jobs stay queued
    let mut admin = cluster.admin().await;
    for i in 0..5 {
        admin.submit(job_for("globex", &format!("name: j{i}\ncommand: [true]\n"))).await.unwrap();
    }
    let err = admin.submit(job_for("globex", "name: one-too-many\ncommand: [true]\n")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_queued_jobs 5"), "{}", err.message());
    // Other tenants are not affected, and nothing of the refused job was stored.
    admin.submit(job_for("acme", "name: fine\ncommand: [true]\n")).await.unwrap();
    let list = admin.list(proto::ListJobsRequest { tenant: "globex".into(), ..Default::default() }).await.unwrap();
    assert_eq!(list.into_inner().jobs.len(), 5);
    let err = admin.submit(job_for("initech", "name: x\ncommand: [true]\n")).await.unwrap_err();
    assert!(err.message().contains("not declared"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_takes_no_new_work_even_after_a_broker_restart() {
    let mut cluster = Cluster::start(Duration::from_secs(5), &[("node-a", ""), ("node-b", "")]).await;
    let mut admin = cluster.admin().await;
    eventually("both agents registered", || {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            (agents.iter().filter(|a| a.connected).count() == 2).then_some(())
        }
    })
    .await;
    let drained = admin
        .drain_agent(proto::DrainAgentRequest { agent_id: "lab/node-a".into(), ..Default::default() })
        .await
        .unwrap();
    assert!(drained.into_inner().draining);
    let err = admin
        .drain_agent(proto::DrainAgentRequest { agent_id: "lab/nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    cluster.kill_broker();
    cluster.start_broker(cluster.addr.port());
    let mut admin = cluster.admin().await;
    let agent = admin.get_agent(proto::GetAgentRequest { agent_id: "lab/node-a".into() }).await.unwrap().into_inner();
    assert!(agent.draining);
    for i in 0..4 {
        let id = submit(&mut admin, &format!("name: d{i}\ncommand: [true]\n")).await;
        watch_to_end(&mut admin, &id).await;
        assert_eq!(get(&mut admin, &id).await.agent, "lab/node-b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_by_label_page_by_page_and_logs_follow_by_offset() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    for i in 0..5 {
        let team = if i % 2 == 0 { "vision" } else { "search" };
        submit(&mut admin, &format!("name: l{i}\ncommand: [true]\nlabels: {{team: {team}}}\n")).await;
    }
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let request = proto::ListJobsRequest {
            labels: vec!["team=vision".into()],
            limit: 2,
            before: cursor.clone(),
            ..Default::default()
        };
        let page = admin.list(request).await.unwrap().into_inner();
        assert!(page.jobs.iter().all(|j| j.labels.get("team").map(String::as_str) == Some("vision")));
        seen.extend(page.jobs.into_iter().map(|j| j.name));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(seen, ["l4", "l2", "l0"]);

    let id = submit(&mut admin, "name: counting\ncommand: [sh, -c, 'for i in 1 2 3; do echo line $i; done']\n").await;
    watch_to_end(&mut admin, &id).await;
    let logs = |offset| proto::LogsRequest { job_id: id.clone(), offset, ..Default::default() };
    let all = admin.logs(logs(0)).await.unwrap().into_inner();
    assert_eq!(all.output, b"line 1\nline 2\nline 3\n");
    assert!(all.done && all.next_offset == 21);
    let rest = admin.logs(logs(7)).await.unwrap().into_inner();
    assert_eq!(rest.output, b"line 2\nline 3\n");
    assert!(admin.logs(logs(21)).await.unwrap().into_inner().output.is_empty());
}
