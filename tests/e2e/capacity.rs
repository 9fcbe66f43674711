//! Cloud capacity with the `local` provider (real agent processes started from each launch's
//! cloud-init user data, enrolling with the launch's single-use join token): an elastic site
//! scales from zero for a job, retires the instance once idle (terminated, its agent revoked and
//! removed); a burst of small jobs shares instances; an instance that never enrols is terminated
//! after the boot timeout and its job placed again.

use std::path::Path;
use std::time::Duration;

use hybroker::model::identity::Role;
use hybroker::proto;
use hybroker::proto::admin_service_client::AdminServiceClient;
use hybroker::tls;
use tonic::transport::Channel;

use crate::common::{Cluster, Setup, TRUST_DOMAIN, enrolling, eventually, submit, wait_job};

const TTL: Duration = Duration::from_secs(3);
const BROKER_SECRET: &str = "broker-only-secret-key";

/// An on-prem `lab` without GPUs and an elastic AWS site whose instances are local agents.
fn sites(dir: &Path, capacity: &str) -> String {
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let _ = dir;
    format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\", \"p5.48xlarge\"]\n{capacity}\
         [[dedicated]]\nagent = \"aws-us-east-1/*\"\ntenant = \"default\"\n",
        snapshot.display()
    )
}

fn local(extra: &str) -> String {
    format!(
        "[site.capacity]\nprovider = \"local\"\nmax_instances = 4\nmax_pending = 4\n{extra}\
         [site.capacity.local]\nisolation = \"none\"\n"
    )
}

async fn cluster(capacity: String) -> Cluster {
    Cluster::start_with(TTL, &[], move |dir| {
        let mut broker_env = enrolling(dir, "1h");
        // The broker's own cloud credentials: a launched instance must never get them.
        broker_env.push(("AWS_SECRET_ACCESS_KEY".into(), BROKER_SECRET.into()));
        Setup { broker_extra: Some(sites(dir, &capacity)), broker_env, ..Setup::default() }
    })
    .await
}

async fn admin(cluster: &Cluster) -> AdminServiceClient<Channel> {
    let paths = cluster.issue(Role::Admin, "capacity-admin", None);
    let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
    AdminServiceClient::new(tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap())
}

async fn site(admin: &AdminServiceClient<Channel>) -> proto::SiteCapacityInfo {
    let mut admin = admin.clone();
    let req = proto::ListSitesRequest { site: "aws-us-east-1".into() };
    admin.list_sites(req).await.unwrap().into_inner().sites.remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_elastic_site_scales_from_zero_and_retires_the_idle_instance() {
    let cluster = cluster(local("idle_timeout = \"1s\"\n")).await;
    let admin = admin(&cluster).await;
    let mut jobs = cluster.admin().await;
    assert!(site(&admin).await.instances.is_empty(), "no instance before any job");
    let id =
        submit(&mut jobs, "name: big\ncommand: [\"echo\", \"on a launched instance\"]\nresources: {gpus: 8}\n").await;
    let job = wait_job(&jobs, &id, "the job to succeed on a launched p5", |j| j.state == "succeeded").await;
    let agent = job.agent.clone();
    assert!(agent.starts_with("aws-us-east-1/local-"), "ran on {agent}");
    // The instance's agent starts as on a fresh VM: nothing of the broker's environment.
    let pids = crate::common::processes_with(agent.split_once('/').unwrap().1);
    assert!(!pids.is_empty(), "the instance's agent runs");
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains(BROKER_SECRET) && !environ.contains("HYBROKER_BROKER__"), "{environ}");
    }
    let events = crate::common::watch_to_end(&mut jobs, &id).await;
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("launching instance hbl-") && r.contains("p5.48xlarge, on-demand")),
        "{reasons:?}"
    );
    // Idle for 1s: drained, terminated (the process is gone), revoked, removed.
    let node = agent.split_once('/').unwrap().1.to_string();
    eventually("the idle instance to be retired", || {
        let admin = admin.clone();
        async move { site(&admin).await.instances.is_empty().then_some(()) }
    })
    .await;
    assert!(crate::common::processes_with(&node).is_empty(), "the instance's agent still runs");
    let (ok, revocations, _) = cluster.admin_command(&["certs", "revocations"]);
    assert!(ok && revocations.contains(&node), "{revocations}");
    eventually("the retired agent to be removed", || {
        let mut jobs = jobs.clone();
        let agent = agent.clone();
        async move {
            let agents = jobs.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            (!agents.iter().any(|a| a.id == agent)).then_some(())
        }
    })
    .await;
    let info = site(&admin).await;
    assert!(info.spend_usd > 0.0 && info.idle_usd > 0.0 && info.idle_usd < info.spend_usd, "{info:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_small_jobs_shares_launched_instances() {
    // The boot never finishes: the launches stay pending, and what counts is how many there are.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/no-boot.sh");
    let capacity = format!(
        "[site.capacity]\nprovider = \"local\"\nmax_instances = 10\nmax_pending = 10\n\
         [site.capacity.local]\nisolation = \"none\"\nbinary = \"{}\"\n",
        script.display()
    );
    let cluster = cluster(capacity).await;
    let admin = admin(&cluster).await;
    let mut jobs = cluster.admin().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // Placed on g6.xlarge? No: 2 GPUs only fit the p5 (8 GPUs): four jobs per instance.
        ids.push(submit(&mut jobs, &format!("name: small-{i}\ncommand: [\"true\"]\nresources: {{gpus: 2}}\n")).await);
    }
    for id in &ids {
        wait_job(&jobs, id, "the job to be placed at the elastic site", |j| j.state == "placed").await;
    }
    let launched = eventually("the launches for 20 jobs", || {
        let admin = admin.clone();
        async move {
            let s = site(&admin).await;
            (s.instances.len() >= 5).then_some(s)
        }
    })
    .await;
    assert_eq!(launched.instances.len(), 5, "20 × 2 GPUs on 8-GPU instances: {launched:?}");
    assert!(launched.instances.iter().all(|i| i.instance_type == "p5.48xlarge"), "{launched:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_never_enrols_is_terminated_and_its_job_placed_again() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/no-boot.sh");
    let capacity = format!(
        "[site.capacity]\nprovider = \"local\"\nboot_timeout = \"2s\"\norphan_grace = \"2s\"\n\
         [site.capacity.local]\nisolation = \"none\"\nbinary = \"{}\"\n",
        script.display()
    );
    let cluster = cluster(capacity).await;
    let mut jobs = cluster.admin().await;
    let id = submit(&mut jobs, "name: stuck\ncommand: [\"true\"]\nresources: {gpus: 1}\n").await;
    let events = eventually("a second launch after the boot timeout", || {
        let jobs = jobs.clone();
        let id = id.clone();
        async move {
            let mut jobs = jobs;
            let req = proto::WatchJobRequest { job_id: id, ..Default::default() };
            let mut stream = jobs.watch(req).await.ok()?.into_inner();
            // The job never ends: the events so far are those the stream sends at once.
            let mut reasons = Vec::new();
            while let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                reasons.push(ev.reason);
            }
            (reasons.iter().filter(|r| r.starts_with("launching instance")).count() >= 2).then_some(reasons)
        }
    })
    .await;
    let launches: Vec<&String> = events.iter().filter(|r| r.starts_with("launching instance")).collect();
    assert_ne!(launches[0], launches[1], "a new launch, not the same one: {events:?}");
    assert!(events.iter().filter(|r| r.starts_with("placed at site aws-us-east-1")).count() >= 2, "{events:?}");
    // The first launch's instance was terminated: its process is gone.
    let first = launches[0].split_whitespace().nth(2).unwrap().strip_prefix("hbl-").unwrap().to_string();
    eventually("the timed-out instance's process to end", || {
        let first = format!("local-{first}");
        async move { crate::common::processes_with(&first).is_empty().then_some(()) }
    })
    .await;
}
