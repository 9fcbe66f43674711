//! Placement that knows when to wait: with the lab's one GPU busy for two hours, a job waits for
//! it when that is cheaper than a cloud GPU counting the cost of delay, bursts to a cloud when its
//! deadline or its delay cost says so, and comes back on-prem when the lab frees early. A job no
//! site can finish by its deadline is refused at submit with the numbers.

use hybroker::proto;
use tonic::Code;

use crate::common::{get, wait_job, watch_to_end};
use crate::data::submit_as;
use crate::placement::{cluster, decision, shipped_snapshot, verdict};

/// Holds the lab's GPU "for two hours" (its estimate) until cancelled.
const BLOCKER: &str =
    "name: blocker\ncommand: [sleep, \"3600\"]\nexpected_runtime: 2h\nresources: {gpus: 1, gpu_model: [H100-80GB]}\n";

/// A one-hour H100 job with extra lines (a policy).
fn h100(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {{gpus: 1, gpu_model: [H100-80GB]}}\n{extra}"
    )
}

async fn cancel(cluster: &crate::common::Cluster, id: &str) {
    let request = proto::CancelJobRequest { job_id: id.into(), tenant: String::new(), reason: "test".into() };
    cluster.admin().await.cancel(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waits_for_the_lab_when_cheaper_and_bursts_for_its_deadline_or_delay_cost() {
    let cluster = cluster(shipped_snapshot()).await;
    let mut admin = cluster.admin().await;

    // Two hours of run in a 90-minute deadline: no site can, and the submit says why.
    let too_late =
        h100("too-late", "policy: {deadline: 90m}\n").replace("expected_runtime: 1h", "expected_runtime: 2h");
    let err = submit_as(&cluster, "acme", &too_late).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("no site can finish this job in time: "), "{}", err.message());
    assert!(err.message().contains("lab: deadline: wait 0s + run 2h > 1h 30m"), "{}", err.message());

    let blocker = submit_as(&cluster, "acme", BLOCKER).await.unwrap();
    wait_job(&admin, &blocker, "the blocker running", |j| j.state == "running").await;

    // Waiting ~2 h at $10/h of delay ($20) plus the lab's $1.50 beats an 8-GPU cloud instance.
    let patient = submit_as(&cluster, "acme", &h100("patient", "")).await.unwrap();
    let placed = wait_job(&admin, &patient, "patient placed", |j| j.state == "placed").await;
    assert_eq!(placed.site, "lab", "{}", placed.reason);
    assert!(placed.reason.starts_with("placed at site lab, wait ~2.0 h: est. $1.50"), "{}", placed.reason);
    let d = decision(&placed);
    let delay = d["chosen"]["cost"]["delay_usd"].as_f64().unwrap();
    assert!((19.0..=20.01).contains(&delay), "{d}");

    // At $1,000 an hour of delay, the cloud is cheaper than two hours of waiting.
    let hurried = submit_as(&cluster, "acme", &h100("hurried", "policy: {delay_usd_per_hour: 1000}\n")).await.unwrap();
    let placed = wait_job(&admin, &hurried, "hurried placed", |j| j.state == "placed").await;
    assert_ne!(placed.site, "lab", "{}", placed.reason);
    let lab = verdict(&decision(&placed), "lab")["feasible"].clone();
    assert!(lab["wait_s"].as_u64().unwrap() > 3 * 3600 - 60, "behind the blocker and patient: {lab}");
    assert_eq!(lab["ahead"], 1, "{lab}");

    // A 90-minute deadline rules the lab out: two hours of wait and one of run.
    let due = submit_as(&cluster, "acme", &h100("due", "policy: {deadline: 90m}\n")).await.unwrap();
    let placed = wait_job(&admin, &due, "due placed", |j| j.state == "placed").await;
    assert_ne!(placed.site, "lab", "{}", placed.reason);
    let lab = verdict(&decision(&placed), "lab")["rejected"].as_str().unwrap().to_owned();
    // (Seconds pass between the steps: ~3 h of wait, ~1 h 30 m left.)
    let wait_ok = lab.starts_with("deadline: wait 2h 59m") || lab.starts_with("deadline: wait 3h +");
    assert!(wait_ok && (lab.ends_with("+ run 1h > 1h 30m") || lab.contains("+ run 1h > 1h 29m")), "{lab}");

    // The blocker ends early: the patient job that waited at the lab runs there.
    for id in [&hurried, &due, &blocker] {
        cancel(&cluster, id).await;
    }
    watch_to_end(&mut admin, &patient).await;
    let done = get(&mut admin, &patient).await;
    assert_eq!((done.state.as_str(), done.site.as_str()), ("succeeded", "lab"), "{}", done.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waiting_at_a_cloud_site_comes_back_on_prem_when_the_lab_frees_early() {
    let cluster = cluster(shipped_snapshot()).await;
    let mut admin = cluster.admin().await;
    let blocker = submit_as(&cluster, "acme", BLOCKER).await.unwrap();
    wait_job(&admin, &blocker, "the blocker running", |j| j.state == "running").await;
    // Its deadline sends it to a cloud site, where its instance never boots (`no_boot_capacity`).
    let due = submit_as(&cluster, "acme", &h100("due", "policy: {deadline: 90m}\n")).await.unwrap();
    let placed = wait_job(&admin, &due, "due placed", |j| j.state == "placed").await;
    let cloud = placed.site.clone();
    assert_ne!(cloud, "lab", "{}", placed.reason);

    cancel(&cluster, &blocker).await;
    let events = watch_to_end(&mut admin, &due).await;
    let done = get(&mut admin, &due).await;
    assert_eq!((done.state.as_str(), done.site.as_str()), ("succeeded", "lab"), "{}", done.reason);
    let placements: Vec<&str> =
        events.iter().filter(|e| e.reason.starts_with("placed at site")).map(|e| e.reason.as_str()).collect();
    assert!(placements.len() >= 2, "{placements:?}");
    assert!(placements[0].starts_with(&format!("placed at site {cloud}:")), "{placements:?}");
    assert!(placements.last().unwrap().starts_with("placed at site lab:"), "{placements:?}");
}
