//! Enrolment with join tokens: an agent with no certificate makes its key, enrols once and runs
//! jobs; refused enrolments (reused, expired, wrong site or node, tampered, revoked token, bad CSR)
//! say why and are counted; the enrol listener serves nothing else and the mutual-TLS listener
//! still refuses clients without a certificate; no token text reaches a log.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hybroker::pki;
use hybroker::proto::{self, enroll_service_client::EnrollServiceClient, job_service_client::JobServiceClient};
use hybroker::tls;
use tonic::Code;

use crate::common::*;

/// A `[metrics]` section writing its bound address to `file`, after the test tenants.
async fn enrolling_cluster() -> Cluster {
    Cluster::start_with(Duration::from_secs(5), &[], |dir| Setup {
        broker_extra: Some(tenants_with_metrics(&dir.join("broker.metrics"))),
        broker_env: enrolling(dir, "24h"),
        ..Setup::default()
    })
    .await
}

/// `hybroker_enrollments_total{result}` as the broker's `/metrics` says now.
async fn enrollments(cluster: &Cluster, result: &str) -> f64 {
    let addr = metrics_addr(&cluster.path("broker.metrics")).await;
    metric(addr, &format!("hybroker_enrollments_total{{result=\"{result}\"}} ")).await.unwrap_or(0.0)
}

/// A join token made through the CLI (JSON output): (token id, token).
fn token(cluster: &Cluster, args: &[&str]) -> (String, String) {
    let mut all = vec!["--output", "json", "agents", "token", "create"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = cluster.admin_command(&all);
    assert!(ok, "token create failed: {stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    (json["token_id"].as_str().unwrap().to_string(), json["token"].as_str().unwrap().to_string())
}

/// One enrol call as an agent would make it: (the answer, or the refusal's code and message).
async fn enrol(
    cluster: &Cluster,
    token: &str,
    site: &str,
    node: &str,
) -> Result<proto::EnrollResponse, (Code, String)> {
    let (_, csr_der) = pki::agent_csr(TRUST_DOMAIN, site, node).unwrap();
    enrol_csr(cluster, token, csr_der).await
}

async fn enrol_csr(cluster: &Cluster, token: &str, csr_der: Vec<u8>) -> Result<proto::EnrollResponse, (Code, String)> {
    let config = tls::enroll_client_config(cluster.ca.cert_pem().as_bytes(), TRUST_DOMAIN).unwrap();
    let channel = tls::connect(&cluster.enroll_url(), config, None).await.unwrap();
    let request = proto::EnrollRequest { token: token.to_string(), csr_der };
    let answer = EnrollServiceClient::new(channel).enroll(request).await;
    answer.map(tonic::Response::into_inner).map_err(|s| (s.code(), s.message().to_string()))
}

#[tokio::test]
async fn an_agent_enrols_with_a_join_token_once_and_runs_a_job() {
    let mut cluster = enrolling_cluster().await;
    let join = cluster.join_file("join-n1.toml", &["--site", "lab", "--node", "n1"]);
    assert_eq!(std::fs::metadata(&join).unwrap().permissions().mode() & 0o777, 0o600);
    let token_text = std::fs::read_to_string(&join).unwrap();
    let token_text = token_text.lines().find_map(|l| l.strip_prefix("token = ")).unwrap().trim_matches('"').to_string();
    cluster.start_joining_agent("n1", "1xH100-80GB", &join);
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, "name: enrolled\ncommand: [sh, -c, 'echo hi']\n").await;
    let job = wait_job(&admin, &id, "the job on the enrolled agent", |j| j.state == "succeeded").await;
    assert_eq!(job.agent, "lab/n1");

    // The key was made on the node: 0600 there, and neither the broker's store nor its log holds it.
    let tls = cluster.joined_tls("n1");
    assert_eq!(std::fs::metadata(&tls.key).unwrap().permissions().mode() & 0o777, 0o600);
    let key_pem = std::fs::read_to_string(&tls.key).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    let db = std::fs::read(cluster.path("broker.db")).unwrap();
    assert!(!db.windows(key_line.len()).any(|w| w == key_line.as_bytes()));
    assert!(!cluster.broker_log().contains(key_line));
    // The chain was written: leaf, then the issuing CA; and the CA bundle beside it.
    let chain = std::fs::read_to_string(&tls.cert).unwrap();
    assert!(chain.ends_with(cluster.ca.issuing_cert_pem()));
    assert_eq!(std::fs::read_to_string(&tls.ca_cert).unwrap(), cluster.ca.cert_pem());
    assert_eq!(enrollments(&cluster, "ok").await, 1.0);
    // The broker recorded the certificate's expiry on connect; `admin agents` shows it.
    let (ok, agents, _) = cluster.admin_command(&["agents"]);
    assert!(ok && agents.contains("cert:      expires "), "{agents}");

    // Used up: listed so, and a second node with the same file is refused with the reason.
    let (ok, listed, _) = cluster.admin_command(&["agents", "token", "list"]);
    assert!(ok && listed.contains("used up"), "{listed}");
    cluster.start_joining_agent("n2", "1xH100-80GB", &join);
    let status = eventually("the second agent to give up", || {
        let status = cluster.agent_exited("n2");
        async move { status }
    })
    .await;
    assert!(!status.success());
    let log = cluster.agent_log("n2");
    assert!(log.contains("is used up"), "{log}");
    assert_eq!(enrollments(&cluster, "used_up").await, 1.0);

    // A node with a valid certificate does not enrol again: n1 restarts with its used-up file.
    cluster.kill_agent("n1");
    cluster.start_joining_agent("n1", "1xH100-80GB", &join);
    let id = submit(&mut admin, "name: again\ncommand: [sh, -c, 'echo again']\n").await;
    wait_job(&admin, &id, "a job after the restart", |j| j.state == "succeeded").await;
    assert_eq!(cluster.agent_log("n1").matches("enrolled with the join token").count(), 1);

    // The token text never reached a log.
    let secret = &token_text[21..];
    for log in [cluster.broker_log(), cluster.agent_log("n1"), cluster.agent_log("n2")] {
        assert!(!log.contains(secret), "a log holds the token");
    }
}

#[tokio::test]
async fn refused_enrolments_say_why_and_are_counted() {
    let cluster = enrolling_cluster().await;
    // Reuse: one use, then used up.
    let (_, once) = token(&cluster, &["--site", "lab"]);
    let first = enrol(&cluster, &once, "lab", "a1").await.unwrap();
    assert_eq!(first.agent_id, "lab/a1");
    assert!(first.cert_chain_pem.ends_with(cluster.ca.issuing_cert_pem()));
    let (code, message) = enrol(&cluster, &once, "lab", "a2").await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("used up"), "{message}");

    // Wrong site, and a node-scoped token asked for another node: nothing spent.
    let (_, scoped) = token(&cluster, &["--site", "lab", "--node", "n1"]);
    let (code, message) = enrol(&cluster, &scoped, "cloud", "n1").await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("agent cloud/n1") && message.contains("agent lab/n1"), "{message}");
    let (_, message) = enrol(&cluster, &scoped, "lab", "n9").await.unwrap_err();
    assert!(message.contains("agent lab/n9"), "{message}");
    // A bad CSR is refused and spends nothing either: the token still enrols n1.
    let (code, _) = enrol_csr(&cluster, &scoped, b"not a csr".to_vec()).await.unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(enrol(&cluster, &scoped, "lab", "n1").await.unwrap().agent_id, "lab/n1");

    // Tampered: the secret's last digit changed.
    let (_, good) = token(&cluster, &["--site", "lab"]);
    let mut tampered = good.clone();
    let last = if good.ends_with('0') { "1" } else { "0" };
    tampered.replace_range(good.len() - 1.., last);
    let (code, message) = enrol(&cluster, &tampered, "lab", "t1").await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("unknown join token"), "{message}");
    let (code, _) = enrol(&cluster, "not-a-token", "lab", "t1").await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated);

    // Revoked.
    let (revoked_id, revoked) = token(&cluster, &["--site", "lab"]);
    let (ok, out, err) = cluster.admin_command(&["agents", "token", "revoke", &revoked_id]);
    assert!(ok, "{out}{err}");
    let (_, message) = enrol(&cluster, &revoked, "lab", "r1").await.unwrap_err();
    assert!(message.contains("was revoked"), "{message}");

    // Expired: a one-second token, tried once the list says it expired.
    let (_, short) = token(&cluster, &["--site", "lab", "--ttl", "1s"]);
    eventually("the short token to expire", || {
        let (_, listed, _) = cluster.admin_command(&["agents", "token", "list"]);
        async move { listed.contains("expired").then_some(()) }
    })
    .await;
    let (_, message) = enrol(&cluster, &short, "lab", "e1").await.unwrap_err();
    assert!(message.contains("has expired"), "{message}");

    for (result, count) in [
        ("ok", 2.0),
        ("used_up", 1.0),
        ("wrong_site", 2.0),
        ("bad_csr", 1.0),
        ("unknown", 2.0),
        ("revoked", 1.0),
        ("expired", 1.0),
    ] {
        assert_eq!(enrollments(&cluster, result).await, count, "{result}");
    }
    // Every admin action is in the audit trail's log with its actor; no token text is.
    let log = cluster.broker_log();
    assert!(log.contains("join token created") && log.contains("spiffe://test.hybroker.local/admin/cli-admin"));
    for t in [&once, &scoped, &good, &revoked, &short] {
        assert!(!log.contains(&t[21..]), "the broker log holds a token");
    }
    // Site names are checked: an invalid one is refused with its reason.
    let (ok, _, err) = cluster.admin_command(&["agents", "token", "create", "--site", "no such site"]);
    assert!(!ok && err.contains("invalid site"), "{err}");
}

#[tokio::test]
async fn the_enrol_listener_serves_nothing_else_and_mtls_still_wants_a_certificate() {
    let cluster = enrolling_cluster().await;
    let enroll_tls = tls::enroll_client_config(cluster.ca.cert_pem().as_bytes(), TRUST_DOMAIN).unwrap();
    // Another service on the enrol listener: unimplemented there.
    let channel = tls::connect(&cluster.enroll_url(), enroll_tls.clone(), None).await.unwrap();
    let listed = JobServiceClient::new(channel).list(proto::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(listed.code(), Code::Unimplemented, "{listed:?}");
    // The mutual-TLS listener refuses a client without a certificate, also for the enrol call.
    let url = format!("https://{}", cluster.addr);
    let refused = match tls::connect(&url, enroll_tls, None).await {
        Err(_) => true,
        Ok(channel) => {
            let request = proto::EnrollRequest { token: "hbj_x_y".into(), csr_der: vec![] };
            EnrollServiceClient::new(channel).enroll(request).await.is_err()
        }
    };
    assert!(refused);
    let log = cluster.broker_log();
    assert!(!log.contains("agent enrolled"), "{log}");
}

#[tokio::test]
async fn an_agent_whose_certificate_expired_says_so_and_enrols_again_only_with_a_new_token() {
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |dir| Setup {
        broker_env: enrolling(dir, "10s"),
        ..Setup::default()
    })
    .await;
    let join = cluster.join_file("join-x1.toml", &["--site", "lab", "--node", "x1"]);
    cluster.start_joining_agent("x1", "1xH100-80GB", &join);
    eventually("x1 to enrol", || {
        let log = cluster.agent_log("x1");
        async move { log.contains("registered with the broker").then_some(()) }
    })
    .await;
    // The agent is stopped (as if its node were off) until its certificate has expired.
    cluster.kill_agent("x1");
    let cert = cluster.joined_tls("x1").cert;
    eventually("the certificate to expire", || {
        let expired = hybroker::agent::enroll::cert_not_after(&cert).is_some_and(|at| at <= now_ms());
        async move { expired.then_some(()) }
    })
    .await;
    let (_, agents, _) = cluster.admin_command(&["agents"]);
    assert!(agents.contains("EXPIRED at"), "{agents}");
    // Started again with its used-up join file: it says its certificate expired, and is refused.
    cluster.start_joining_agent("x1", "1xH100-80GB", &join);
    eventually("x1 to give up", || {
        let status = cluster.agent_exited("x1");
        async move { status }
    })
    .await;
    let log = cluster.agent_log("x1");
    assert!(log.contains("the agent certificate expired") && log.contains("is used up"), "{log}");
    // A new token enrols it again.
    cluster.kill_agent("x1");
    let fresh = cluster.join_file("join-x1b.toml", &["--site", "lab", "--node", "x1"]);
    cluster.start_joining_agent("x1", "1xH100-80GB", &fresh);
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, "name: back\ncommand: [sh, -c, 'echo back']\n").await;
    let job = wait_job(&admin, &id, "a job after re-enrolment", |j| j.state == "succeeded").await;
    assert_eq!(job.agent, "lab/x1");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn a_site_token_cannot_take_a_known_node_and_a_revoked_node_needs_a_token_made_after() {
    let mut cluster = enrolling_cluster().await;
    let join = cluster.join_file("join-k1.toml", &["--site", "lab", "--node", "k1"]);
    cluster.start_joining_agent("k1", "1xH100-80GB", &join);
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, "name: known\ncommand: [sh, -c, 'echo hi']\n").await;
    wait_job(&admin, &id, "a job on the enrolled agent", |j| j.state == "succeeded").await;

    // A token for any node of the site cannot mint the live node's identity.
    let (_, site_wide) = token(&cluster, &["--site", "lab", "--uses", "2"]);
    let (code, message) = enrol(&cluster, &site_wide, "lab", "k1").await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("already enrolled"), "{message}");
    assert_eq!(enrollments(&cluster, "node_known").await, 1.0);
    assert_eq!(enrol(&cluster, &site_wide, "lab", "k2").await.unwrap().agent_id, "lab/k2");

    // A node revoked after its token was made is not enrolled with that token (a stolen node
    // keeps its join file); a token made after the revocation enrols it afresh.
    let (_, before) = token(&cluster, &["--site", "lab", "--node", "k1"]);
    let (ok, out, err) = cluster.admin_command(&["agents", "revoke", "lab/k1", "--reason", "stolen"]);
    assert!(ok, "{out}{err}");
    let (code, message) = enrol(&cluster, &before, "lab", "k1").await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("was revoked after join token"), "{message}");
    assert_eq!(enrollments(&cluster, "revoked").await, 1.0);
    let (_, after) = token(&cluster, &["--site", "lab", "--node", "k1"]);
    assert_eq!(enrol(&cluster, &after, "lab", "k1").await.unwrap().agent_id, "lab/k1");
}
