//! Certificates, keys and CA bundles reloaded without a restart (issue 14): new handshakes get the
//! new files, live connections stay; on SIGHUP; a broken file keeps the old ones; a CA bundle with
//! two roots (rollover) accepts leaves of both.

use std::net::SocketAddr;
use std::time::Duration;

use hybroker::model::identity::Role;
use hybroker::pki::{self, Ca, IssueRequest};
use hybroker::proto;
use hybroker::proto::job_service_client::JobServiceClient;
use hybroker::tls::{self, PeerCert, TlsPaths};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::common::*;

/// The serial of the certificate the broker serves to a new handshake.
async fn served_serial(cluster: &Cluster, client: &TlsPaths) -> String {
    served_serial_at(cluster.addr, client).await
}

/// The serial of the certificate the server at `addr` presents (a certificate of our CA with a
/// broker identity: the broker's, or the test gateway's public one).
async fn served_serial_at(addr: SocketAddr, client: &TlsPaths) -> String {
    let config = tls::client_config(client, TRUST_DOMAIN, Role::Broker).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    PeerCert::from_der(&leaf).unwrap().serial_hex
}

async fn works(cluster: &Cluster, paths: &TlsPaths) -> bool {
    let config = tls::client_config(paths, TRUST_DOMAIN, Role::Broker).unwrap();
    match tls::connect(&format!("https://{}", cluster.addr), config, None).await {
        Err(_) => false,
        Ok(channel) => JobServiceClient::new(channel).list(proto::ListJobsRequest::default()).await.is_ok(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_broker_certificate_is_served_to_new_handshakes_while_agents_stay_connected() {
    let cluster = Cluster::start_with(Duration::from_secs(5), &[("node-a", "")], |dir| Setup {
        broker_extra: Some(tenants_with_metrics(&dir.join("broker-metrics.addr"))),
        ..Setup::default()
    })
    .await;
    let metrics = metrics_addr(&cluster.path("broker-metrics.addr")).await;
    let admin_paths = cluster.issue(Role::Admin, "ops", None);
    let mut admin = cluster.client_as(&admin_paths).await;
    eventually("the agent registered", || {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.connected).then_some(())
        }
    })
    .await;
    let old = served_serial(&cluster, &admin_paths).await;
    let expiry = format!(
        "hybroker_cert_expiry_timestamp_seconds{{role=\"broker\",identity=\"spiffe://{TRUST_DOMAIN}/broker/broker\"}}"
    );
    assert!(metric(metrics, &expiry).await.is_some(), "the broker's certificate expiry is exported");

    // Replace the broker's certificate and key on disk, as a renewal or an operator would.
    let replaced = cluster.issue(Role::Broker, "broker", None);
    let new = PeerCert::from_pem_file(&replaced.cert).unwrap();
    assert_ne!(new.serial_hex, old);
    eventually("new handshakes get the new certificate", || {
        let (cluster, admin_paths, want) = (&cluster, &admin_paths, new.serial_hex.clone());
        async move { (served_serial(cluster, admin_paths).await == want).then_some(()) }
    })
    .await;
    let want = (new.not_after / 1000) as f64;
    eventually("the expiry metric follows the reload", || {
        let expiry = expiry.clone();
        async move { (metric(metrics, &expiry).await == Some(want)).then_some(()) }
    })
    .await;

    // The live connections stayed: the admin's channel and the agent's session.
    admin.list(proto::ListJobsRequest::default()).await.expect("the live admin connection still works");
    let id = submit(&mut admin, "name: after-reload\ncommand: [sh, -c, 'echo ok']\n").await;
    wait_job(&admin, &id, "a job on the agent after the reload", |j| j.state == "succeeded").await;
    let log = cluster.agent_log("node-a");
    assert_eq!(log.matches("registered with the broker").count(), 1, "the agent reconnected:\n{log}");
    assert!(!log.contains("broker session ended"), "the agent's session ended:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_file_keeps_the_previous_certificate() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let admin_paths = cluster.issue(Role::Admin, "ops", None);
    let pid = nix::unistd::Pid::from_raw(cluster.broker_pid());

    // A broken key file: reported, and the previous certificate and key go on serving.
    let served = served_serial(&cluster, &admin_paths).await;
    let key = cluster.path("pki/broker-key.pem");
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("the reload error logged", || async {
        cluster.broker_log().contains("tls reload failed").then_some(())
    })
    .await;
    assert!(cluster.broker_log().contains("SIGHUP"), "{}", cluster.broker_log());
    assert_eq!(served_serial(&cluster, &admin_paths).await, served, "the previous certificate is served");
    assert!(works(&cluster, &admin_paths).await, "new connections still work");

    // Another role's certificate and key copied over the broker's: refused, the previous served.
    let gateway = cluster.issue(Role::Gateway, "gw-copied", None);
    let cert = cluster.path("pki/broker.pem");
    let good_cert = std::fs::read(&cert).unwrap();
    std::fs::copy(&gateway.cert, &cert).unwrap();
    std::fs::copy(&gateway.key, &key).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("the wrong role refused", || async {
        cluster.broker_log().contains("the certificate is for role gateway, not broker").then_some(())
    })
    .await;
    assert_eq!(served_serial(&cluster, &admin_paths).await, served, "the previous certificate is served");
    std::fs::write(&cert, good_cert).unwrap();

    // Repaired (a new certificate and key): SIGHUP loads them.
    std::fs::write(&key, good_key).unwrap();
    let replaced = cluster.issue(Role::Broker, "broker", None);
    let new = PeerCert::from_pem_file(&replaced.cert).unwrap().serial_hex;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("the new certificate served", || {
        let (cluster, admin_paths, new) = (&cluster, &admin_paths, new.clone());
        async move { (served_serial(cluster, admin_paths).await == new).then_some(()) }
    })
    .await;
    assert!(nix::sys::signal::kill(pid, None).is_ok(), "SIGHUP does not stop the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_bundle_with_two_roots_accepts_leaves_of_both() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let old_admin = cluster.issue(Role::Admin, "old-root-admin", None);
    // A second CA, as in a rollover: its leaves are refused until the broker trusts it.
    let new_dir = cluster.path("pki-new");
    pki::init_ca(&new_dir, TRUST_DOMAIN).unwrap();
    let new_ca = Ca::load(&new_dir).unwrap();
    let request = IssueRequest {
        role: Role::Admin,
        name: "new-root-admin".into(),
        site: None,
        dns: vec![],
        ips: vec![],
        days: 1,
    };
    let (cert, key) = new_ca.issue_to_dir(&new_dir, &request).unwrap();
    let old_ca = std::fs::read_to_string(cluster.path("pki/ca.pem")).unwrap();
    let both = format!("{old_ca}{}", std::fs::read_to_string(new_dir.join("ca.pem")).unwrap());
    let bundle = cluster.path("bundle.pem");
    std::fs::write(&bundle, &both).unwrap();
    // The new admin trusts both roots too (the broker's certificate is still from the old one).
    let new_admin = TlsPaths { ca_cert: bundle, cert, key };
    assert!(!works(&cluster, &new_admin).await, "a leaf of an untrusted root is refused");

    std::fs::write(cluster.path("pki/ca.pem"), both).unwrap();
    eventually("the broker trusts the new root", || {
        let (cluster, new_admin) = (&cluster, new_admin.clone());
        async move { works(cluster, &new_admin).await.then_some(()) }
    })
    .await;
    assert!(works(&cluster, &old_admin).await, "leaves of the old root still work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_dials_with_its_replaced_certificate_once_the_old_one_is_revoked() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let metrics_file = cluster.path("gateway-metrics.addr");
    let extra = format!("[metrics]\nlisten = \"127.0.0.1:0\"\naddr_file = \"{}\"\n", metrics_file.display());
    let gateway = cluster.start_gateway_with("gateway", false, &extra);
    crate::gateway::wait_ready(&gateway).await;
    let metrics = eventually("the gateway's metrics address", || {
        let file = metrics_file.clone();
        async move { std::fs::read_to_string(file).ok()?.trim().parse::<SocketAddr>().ok() }
    })
    .await;
    let acme = crate::gateway::Api::new(&gateway, &cluster.tenant_key("acme"));
    acme.submit_ok(&crate::gateway::spec("before", "true")).await;
    let old = PeerCert::from_pem_file(&cluster.path("pki/gateway.pem")).unwrap();

    // Replaced on disk: the gateway reloads it (its expiry metric follows) and keeps its connection.
    let replaced = PeerCert::from_pem_file(&cluster.issue(Role::Gateway, "gateway", None).cert).unwrap();
    let expiry = format!(
        "hybroker_cert_expiry_timestamp_seconds{{role=\"gateway\",identity=\"spiffe://{TRUST_DOMAIN}/gateway/gateway\"}}"
    );
    let want = (replaced.not_after / 1000) as f64;
    eventually("the gateway reloaded its certificate", || {
        let expiry = expiry.clone();
        async move { (metric(metrics, &expiry).await == Some(want)).then_some(()) }
    })
    .await;

    // Revoking the old certificate closes the gateway's connection; it dials again with the new one.
    let (ok, stdout, stderr) = cluster.admin_command(&["certs", "revoke", "--serial", &old.serial_hex]);
    assert!(ok && stdout.contains("1 live connection(s) closed"), "{stdout}{stderr}");
    eventually("a submit through the gateway's new connection", || {
        let acme = acme.clone();
        async move {
            let (status, _, _) = acme.submit(&crate::gateway::spec("after", "true"), None).await;
            (status == reqwest::StatusCode::CREATED).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reconnects_with_its_replaced_certificate_once_the_old_one_is_revoked() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    let connected = |admin: &JobServiceClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.id == "lab/node-a" && a.connected).then_some(())
        }
    };
    eventually("the agent registered", || connected(&admin)).await;
    let old = PeerCert::from_pem_file(&cluster.path("pki/node-a.pem")).unwrap();
    cluster.issue(Role::Agent, "node-a", Some("lab"));
    eventually("the agent reloaded its certificate", || async {
        cluster.agent_log("node-a").contains("tls certificate, key and ca bundle reloaded").then_some(())
    })
    .await;

    let (ok, stdout, stderr) = cluster.admin_command(&["certs", "revoke", "--serial", &old.serial_hex]);
    assert!(ok && stdout.contains("1 live connection(s) closed"), "{stdout}{stderr}");
    eventually("the agent registered again with its new certificate", || async {
        (cluster.agent_log("node-a").matches("registered with the broker").count() == 2).then_some(())
    })
    .await;
    eventually("the agent connected", || connected(&admin)).await;
    let id = submit(&mut admin, "name: after-renewal\ncommand: [sh, -c, 'echo ok']\n").await;
    wait_job(&admin, &id, "a job on the agent", |j| j.state == "succeeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_public_certificate_is_reloaded() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway_named("gw", true);
    let port: u16 = gateway.url.rsplit(':').next().unwrap().parse().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let client = cluster.issue(Role::Admin, "ops", None);
    let served = served_serial_at(addr, &client).await;
    // The public certificate replaced on disk (the test's public certificates come from its CA):
    // SIGHUP, and new handshakes get the new one.
    let replaced = cluster.issue(Role::Broker, "gw-public", None);
    let new = PeerCert::from_pem_file(&replaced.cert).unwrap().serial_hex;
    assert_ne!(new, served);
    let pid = nix::unistd::Pid::from_raw(gateway.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("the gateway to serve its new public certificate", || {
        let (client, new) = (&client, new.clone());
        async move { (served_serial_at(addr, client).await == new).then_some(()) }
    })
    .await;
}
