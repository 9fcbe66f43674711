//! Certificate revocation (issue 14): an agent's live stream is closed and its attempt re-queued; a
//! gateway's or an admin's certificate stops working at once; by identity or by serial; refused at
//! the handshake (`hybroker_tls_handshake_failures_total{reason="revoked"}`) and after a restart.

use std::time::Duration;

use hybroker::model::identity::Role;
use hybroker::proto;
use hybroker::proto::job_service_client::JobServiceClient;
use hybroker::tls::{self, TlsPaths};
use serde_json::Value;

use crate::common::*;
use crate::gateway::{Api, spec, wait_ready};

/// Whether a call with `paths` fails: at connect (the broker refused the handshake) or at the
/// first call on the connection.
async fn refused(cluster: &Cluster, paths: &TlsPaths) -> bool {
    let config = tls::client_config(paths, TRUST_DOMAIN, Role::Broker).unwrap();
    match tls::connect(&format!("https://{}", cluster.addr), config, None).await {
        Err(_) => true,
        Ok(channel) => JobServiceClient::new(channel).list(proto::ListJobsRequest::default()).await.is_err(),
    }
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// A job whose first attempt hangs; later attempts succeed at once.
const FIRST_ATTEMPT_HANGS: &str =
    "name: revoked-node\ncommand: [sh, -c, 'if [ $HYBROKER_ATTEMPT = 1 ]; then exec sleep 60; fi; echo done']\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_its_attempt_runs_elsewhere_and_it_cannot_reconnect() {
    // A lease far longer than the deadline: only the revocation can re-queue the attempt in time.
    let cluster = Cluster::start_with(Duration::from_secs(180), &[("node-a", ""), ("node-b", "")], |dir| Setup {
        broker_extra: Some(tenants_with_metrics(&dir.join("broker-metrics.addr"))),
        ..Setup::default()
    })
    .await;
    let metrics = metrics_addr(&cluster.path("broker-metrics.addr")).await;
    let mut admin = cluster.admin().await;
    eventually("both agents connected", || {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            (agents.iter().filter(|a| a.connected).count() == 2).then_some(())
        }
    })
    .await;
    let id = submit(&mut admin, FIRST_ATTEMPT_HANGS).await;
    let job = wait_job(&admin, &id, "first attempt running", |j| j.state == "running").await;
    let victim = job.agent.clone();

    let started = std::time::Instant::now();
    let (ok, stdout, stderr) =
        cluster.admin_command(&["--output", "json", "agents", "revoke", &victim, "--reason", "stolen laptop"]);
    let answered = started.elapsed();
    assert!(ok, "agents revoke failed: {stdout}{stderr}");
    let revoked = json(&stdout);
    assert_eq!(revoked["identity"], format!("spiffe://{TRUST_DOMAIN}/agent/{victim}"), "{revoked}");
    assert_eq!(revoked["reason"], "stolen laptop");
    assert!(revoked["connections_closed"].as_u64().unwrap() >= 1, "the agent's stream was live: {revoked}");

    // Its attempt is lost at once and runs on the other agent.
    wait_job(&admin, &id, "second attempt leased", |j| j.attempts == 2).await;
    println!(
        "agent revoked: CLI answered in {answered:?} (process start included), attempt re-queued and leased \
         elsewhere {:?} after the command started (lease ttl {:?})",
        started.elapsed(),
        cluster.lease_ttl
    );
    let job = wait_job(&admin, &id, "second attempt", |j| j.attempts == 2 && j.state == "succeeded").await;
    for pid in processes_with(&format!("{id}/attempt-1")) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    assert_ne!(job.agent, victim);
    let events = watch_to_end(&mut admin, &id).await;
    let lost = events.iter().find(|e| e.state == "queued" && e.attempt == 1 && e.seq > 1);
    assert!(
        lost.is_some_and(|e| e.reason.contains("agent certificate revoked")),
        "the attempt was lost to the revocation: {events:?}"
    );

    // The revoked agent keeps trying and is refused at the handshake.
    eventually("a handshake refused as revoked", || async move {
        (metric(metrics, "hybroker_tls_handshake_failures_total{reason=\"revoked\"}").await.unwrap_or(0.0) > 0.0)
            .then_some(())
    })
    .await;
    let agents = admin.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let listed = agents.iter().find(|a| a.id == victim).expect("still listed");
    assert!(!listed.connected, "{listed:?}");
    assert!(cluster.broker_log().contains("closing a revoked connection"), "{}", cluster.broker_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_gateway_certificate_can_no_longer_submit() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    wait_ready(&gateway).await;
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    acme.submit_ok(&spec("before", "true")).await;

    let uri = format!("spiffe://{TRUST_DOMAIN}/gateway/gateway");
    let (ok, stdout, stderr) = cluster.admin_command(&["--output", "json", "certs", "revoke", "--identity", &uri]);
    assert!(ok, "certs revoke failed: {stdout}{stderr}");
    assert!(json(&stdout)["connections_closed"].as_u64().unwrap() >= 1, "the gateway's connection was live: {stdout}");

    let (status, _, body) = acme.submit(&spec("after", "true"), None).await;
    assert!(status.is_server_error(), "a revoked gateway still submits: {status} {body}");
    let (status, _, _) = acme.get("/v1/jobs").await;
    assert!(status.is_server_error(), "a revoked gateway still reads: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certificates_are_revoked_by_serial_or_identity_and_stay_revoked_after_a_restart() {
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let alice = cluster.issue(Role::Admin, "alice", None);
    let bob = cluster.issue(Role::Admin, "bob", None);
    let mut alice_client = cluster.client_as(&alice).await;
    alice_client.list(proto::ListJobsRequest::default()).await.expect("alice's certificate works");

    // By serial, spelled as openssl prints it: alice's live connection is closed at once.
    let serial = tls::PeerCert::from_pem_file(&alice.cert).unwrap().serial_hex;
    let spelled: Vec<String> = format!("{serial:0>width$}", width = serial.len().div_ceil(2) * 2)
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let (ok, stdout, stderr) =
        cluster.admin_command(&["certs", "revoke", "--serial", &spelled.join(":"), "--reason", "left"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("serial {serial}")) && stdout.contains("1 live connection(s) closed"), "{stdout}");
    assert!(alice_client.list(proto::ListJobsRequest::default()).await.is_err(), "alice's connection survived");
    assert!(refused(&cluster, &alice).await, "alice connects again");

    // By identity.
    assert!(!refused(&cluster, &bob).await);
    let uri = format!("spiffe://{TRUST_DOMAIN}/admin/bob");
    let (ok, stdout, stderr) = cluster.admin_command(&["certs", "revoke", "--identity", &uri]);
    assert!(ok, "{stdout}{stderr}");
    assert!(refused(&cluster, &bob).await, "bob connects after the revocation");

    // Not the broker itself, and not both at once.
    let own = format!("spiffe://{TRUST_DOMAIN}/broker/broker");
    let (ok, _, stderr) = cluster.admin_command(&["certs", "revoke", "--identity", &own]);
    assert!(!ok && stderr.contains("cannot revoke itself"), "{stderr}");
    let (ok, _, stderr) = cluster.admin_command(&["certs", "revoke", "--identity", &uri, "--serial", "ab"]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");

    let (ok, stdout, stderr) = cluster.admin_command(&["--output", "json", "certs", "revocations"]);
    assert!(ok, "{stderr}");
    let list = json(&stdout);
    let list = list["revocations"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!((list[0]["serial"].as_str(), list[1]["identity"].as_str()), (Some(serial.as_str()), Some(uri.as_str())));
    assert!(list.iter().all(|r| r["revoked_by"] == format!("spiffe://{TRUST_DOMAIN}/admin/cli-admin")), "{list:?}");

    // A restarted broker loads the deny list.
    let port = cluster.addr.port();
    cluster.kill_broker();
    cluster.start_broker(port);
    assert!(!refused(&cluster, &cluster.issue(Role::Admin, "carol", None)).await, "another admin works");
    assert!(refused(&cluster, &alice).await, "alice's serial is still revoked");
    assert!(refused(&cluster, &bob).await, "bob's identity is still revoked");
}
