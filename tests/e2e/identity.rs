//! Who may talk to the broker: every refusal of docs/design.md §6, against the real broker process.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hybroker::model::identity::Role;
use hybroker::pki::{Ca, LeafEku, LeafOptions};
use hybroker::proto::agent_service_client::AgentServiceClient;
use hybroker::proto::job_service_client::JobServiceClient;
use hybroker::proto::{self, agent_message::Msg};
use hybroker::tls::{self, TlsPaths};
use tonic::Code;

use crate::common::*;

async fn list_as(cluster: &Cluster, paths: &TlsPaths) -> Result<(), tonic::Status> {
    let mut client = cluster.client_as(paths).await;
    client.list(proto::ListJobsRequest::default()).await.map(|_| ())
}

/// Writes a custom leaf (signed by `ca`) next to the cluster's PKI.
fn custom(cluster: &Cluster, ca: &Ca, name: &str, opts: LeafOptions) -> TlsPaths {
    let issued = ca.issue_custom(&opts).unwrap();
    let cert = cluster.path(&format!("pki/{name}.pem"));
    let key = cluster.path(&format!("pki/{name}-key.pem"));
    std::fs::write(&cert, issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    TlsPaths { ca_cert: cluster.path("pki/ca.pem"), cert, key }
}

fn admin_uri(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/admin/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_well_formed_certificates_of_the_right_role_get_in() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let admin = cluster.issue(Role::Admin, "ok-admin", None);
    list_as(&cluster, &admin).await.expect("a proper admin certificate works");

    // Chain, validity and shape of the certificate: refused during the handshake.
    let other_ca = Ca::generate(TRUST_DOMAIN).unwrap();
    let now = SystemTime::now();
    let refused = [
        (
            "foreign-ca",
            custom(&cluster, &other_ca, "foreign", LeafOptions { uris: vec![admin_uri("x")], ..Default::default() }),
        ),
        (
            "expired",
            custom(
                &cluster,
                &cluster.ca,
                "expired",
                LeafOptions {
                    uris: vec![admin_uri("x")],
                    not_before: now - Duration::from_secs(7200),
                    not_after: now - Duration::from_secs(3600),
                    ..Default::default()
                },
            ),
        ),
        (
            "no-eku",
            custom(
                &cluster,
                &cluster.ca,
                "no-eku",
                LeafOptions { uris: vec![admin_uri("x")], eku: LeafEku::None, ..Default::default() },
            ),
        ),
        (
            "two-uris",
            custom(
                &cluster,
                &cluster.ca,
                "two-uris",
                LeafOptions { uris: vec![admin_uri("x"), admin_uri("y")], ..Default::default() },
            ),
        ),
        (
            "ca-as-leaf",
            custom(
                &cluster,
                &cluster.ca,
                "ca-leaf",
                LeafOptions { uris: vec![admin_uri("x")], is_ca: true, ..Default::default() },
            ),
        ),
        ("no-uri", custom(&cluster, &cluster.ca, "no-uri", LeafOptions::default())),
        (
            "server-eku-only",
            custom(
                &cluster,
                &cluster.ca,
                "srv-eku",
                LeafOptions { uris: vec![admin_uri("x")], eku: LeafEku::Server, ..Default::default() },
            ),
        ),
    ];
    for (what, paths) in refused {
        let err = list_as(&cluster, &paths).await.expect_err(what);
        assert_ne!(err.code(), Code::Ok, "{what}");
        println!("{what}: {}", tls::explain_status(&err));
    }
    let log = cluster.broker_log();
    for why in ["UnknownIssuer", "expired", "no extended key usage", "2 URI SANs", "0 URI SANs"] {
        assert!(log.contains(why), "the broker logs why ({why}):\n{log}");
    }

    // No client certificate at all.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(cluster.path("pki/ca.pem")).unwrap();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    use rustls_pki_types::pem::PemObject;
    let mut anonymous = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let channel = tls::connect(&format!("https://{}", cluster.addr), Arc::new(anonymous), None).await;
    if let Ok(channel) = channel {
        let err =
            JobServiceClient::new(channel).list(proto::ListJobsRequest::default()).await.expect_err("no client cert");
        println!("no client certificate: {}", tls::explain_status(&err));
    }

    // Right chain, wrong role for the service.
    let agent = cluster.issue(Role::Agent, "node-x", Some("lab"));
    let err = list_as(&cluster, &agent).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let gateway = cluster.issue(Role::Gateway, "gw", None);
    let config = tls::client_config(&gateway, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap();
    let register = proto::AgentMessage { msg: Some(Msg::Register(proto::Register::default())) };
    let err = AgentServiceClient::new(channel).session(tokio_stream::iter([register])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_may_not_claim_another_node() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let paths = cluster.issue(Role::Agent, "node-1", Some("lab"));
    let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap();
    let register = proto::Register { site: "lab".into(), node: "node-2".into(), ..Default::default() };
    let msg = proto::AgentMessage { msg: Some(Msg::Register(register)) };
    let err = AgentServiceClient::new(channel).session(tokio_stream::iter([msg])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("lab/node-1"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_server_that_is_not_a_broker() {
    // A "broker" presenting an agent certificate: the agent's handshake must abort.
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    cluster.kill_broker();
    let impostor = cluster.issue(Role::Agent, "broker", Some("lab"));
    assert_eq!(impostor.cert, cluster.path("pki/broker.pem"), "the impostor replaces the broker's certificate");
    cluster.start_broker(0);
    let paths = cluster.issue(Role::Agent, "node-1", Some("lab"));
    let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
    let result = match tls::connect(&format!("https://{}", cluster.addr), config, None).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => {
            let msg = proto::AgentMessage { msg: Some(Msg::Register(proto::Register::default())) };
            AgentServiceClient::new(channel)
                .session(tokio_stream::iter([msg]))
                .await
                .map(|_| ())
                .map_err(|s| tls::explain_status(&s))
        }
    };
    let err = result.expect_err("an agent must not talk to a non-broker");
    println!("agent vs impostor: {err}");
    // The real agent process refuses it too, says why, and never registers.
    cluster.start_agent("node-2", "");
    let line = eventually("the agent to refuse the impostor", || async {
        cluster.agent_log("node-2").lines().find(|l| l.contains("broker session ended")).map(str::to_string)
    })
    .await;
    assert!(line.contains("role agent") || line.contains("certificate"), "{line}");
    assert!(!cluster.broker_log().contains("agent registered"));
}
