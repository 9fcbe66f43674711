//! Short-lived agent certificates that renew themselves on the stream: with a 20 s lifetime,
//! enrolled agents renew several times while running jobs, at 70–90 % of each certificate's
//! lifetime, without losing or repeating an attempt and without reconnecting.

use std::time::Duration;

use hybroker::proto;

use crate::common::*;

/// The `lifetime_used=` values an agent logged when it sent its renewals.
fn renewal_points(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("renewing the agent certificate"))
        .filter_map(|l| l.split("lifetime_used=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn agents_renew_twenty_second_certificates_while_running_jobs() {
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |dir| Setup {
        broker_env: enrolling(dir, "20s"),
        ..Setup::default()
    })
    .await;
    for node in ["r1", "r2"] {
        let join = cluster.join_file(&format!("join-{node}.toml"), &["--site", "lab", "--node", node]);
        cluster.start_joining_agent(node, "2xH100-80GB", &join);
    }
    let mut admin = cluster.admin().await;
    // Jobs keep running across the renewals: a new one every half second, each a few seconds
    // long, until both agents renewed twice (a 20 s certificate renews every 14-18 s).
    let renewed = |node: &str| cluster.agent_log(node).matches("agent certificate renewed;").count();
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    while renewed("r1") < 2 || renewed("r2") < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "agents did not renew twice in 120 s");
        let i = ids.len();
        ids.push(submit(&mut admin, &format!("name: r{i}\ncommand: [sh, -c, 'sleep 3; echo {i}']\n")).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &ids {
        let job =
            wait_job(&admin, id, "a job across renewals", |j| j.state == "succeeded" || j.state == "failed").await;
        assert_eq!(job.state, "succeeded", "{job:?}");
        assert_eq!(job.attempts, 1, "no attempt lost or repeated: {job:?}");
    }
    for node in ["r1", "r2"] {
        let log = cluster.agent_log(node);
        // One session all along: no reconnect, no stream ended for an expired certificate.
        assert_eq!(log.matches("registered with the broker").count(), 1, "{log}");
        assert!(!log.contains("broker session ended"), "{log}");
        // Sent at 70-90 % of the lifetime counted from the issue time (generous slack for a busy machine).
        let points = renewal_points(&log);
        assert!(points.len() >= 2, "{log}");
        assert!(points.iter().all(|p| (0.68..=0.95).contains(p)), "{points:?}");
    }
    // The broker shows each agent's current certificate expiry, the renewed one's.
    for node in ["r1", "r2"] {
        eventually("the broker to show the renewed certificate's expiry", || {
            let mut admin = admin.clone();
            let cert = std::fs::read(cluster.joined_tls(node).cert).unwrap();
            async move {
                let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).ok()?;
                let on_disk = hybroker::pki::not_after(&pem.contents).ok()?;
                let request = proto::GetAgentRequest { agent_id: format!("lab/{node}") };
                let shown = admin.get_agent(request).await.ok()?.into_inner().cert_not_after_ms;
                (shown == on_disk).then_some(())
            }
        })
        .await;
    }
    let broker = cluster.broker_log();
    assert!(broker.matches("agent certificate renewed").count() >= 4, "{broker}");
    assert!(!broker.contains("expired on a live stream"), "{broker}");
}
