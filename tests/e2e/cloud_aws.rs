//! The broker against moto's EC2 behind the fault-injecting proxy, with the cloud-init harness
//! booting each instance into a real agent: launch, enrolment under the instance id, the job run,
//! the idle instance terminated in moto; a launch whose reply is lost adopted by its tag (one
//! instance, not two); and `kill -9` of the broker in the middle of a launch burst: after the
//! restart no duplicate instance, no orphan, and every job runs once.

use std::sync::Arc;
use std::time::Duration;

use hybroker::proto;

use crate::cloud_init::CloudInit;
use crate::common::{Cluster, Setup, enrolling, eventually, submit, wait_job};
use crate::ec2_proxy::{Ec2Proxy, Fault};
use crate::emulators::{Moto, moto, unique_name};

const TTL: Duration = Duration::from_secs(3);
const IMAGE: &str = "ami-12c6146b";

struct Aws {
    cluster: Cluster,
    proxy: Ec2Proxy,
    broker: String,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Aws {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// A broker whose `aws-us-east-1` site launches through the proxy into moto, and the harness that
/// boots what it launches.
async fn aws(capacity: &str) -> Aws {
    aws_and(capacity, "").await
}

/// [`aws`] with more sites (`[[site]]` tables) after the AWS one.
async fn aws_and(capacity: &str, more_sites: &str) -> Aws {
    let moto = moto().await;
    let proxy = Ec2Proxy::start(&moto.endpoint()).await;
    let subnet = moto.ec2_default_subnets().await.remove(0);
    let broker = unique_name("broker");
    let snapshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let extra = format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nazure = [\"eastus\"]\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"p5.48xlarge\"]\n\
         [site.capacity]\nprovider = \"aws\"\nmax_instances = 16\nmax_pending = 16\n{capacity}\
         [site.capacity.aws]\nimage_id = \"{IMAGE}\"\nsubnets = [\"{subnet}\"]\nendpoint = \"{}\"\n\
         {more_sites}\
         [[dedicated]]\nagent = \"aws-us-east-1/*\"\ntenant = \"default\"\n\
         [[dedicated]]\nagent = \"azure-eastus/*\"\ntenant = \"default\"\n",
        snapshot.display(),
        proxy.endpoint(),
    );
    let name = broker.clone();
    // A fixed enrol port: instances keep the address from their user data across a broker restart.
    let enroll_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cluster = Cluster::start_with(TTL, &[], move |dir| {
        let mut env = enrolling(dir, "1h");
        env.retain(|(k, _)| k != "HYBROKER_BROKER__ENROLL_LISTEN");
        env.extend([
            ("HYBROKER_BROKER__ENROLL_LISTEN".to_string(), format!("127.0.0.1:{enroll_port}")),
            ("AWS_ACCESS_KEY_ID".to_string(), Moto::ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), Moto::SECRET_KEY.to_string()),
            ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
            ("HYBROKER_BROKER__NAME".to_string(), name),
        ]);
        Setup { broker_extra: Some(extra), broker_env: env, ..Setup::default() }
    })
    .await;
    let cloud = CloudInit::new(&cluster.path("instances"));
    let watcher = tokio::spawn(watch(moto, broker.clone(), cloud));
    Aws { cluster, proxy, broker, watcher }
}

/// Boots every new instance of `broker` in moto; kills the agents of those moto ended.
async fn watch(moto: &'static Moto, broker: String, cloud: Arc<CloudInit>) {
    loop {
        let (broker, cloud) = (broker.clone(), cloud.clone());
        // One look at the cloud; a failed call to moto (it panics) is only a missed look.
        let look = tokio::spawn(async move {
            let filters = [
                ("tag:hybroker-broker", broker.as_str()),
                ("instance-state-name", "pending"),
                ("instance-state-name", "running"),
            ];
            let alive = moto.ec2_instances(&filters).await;
            for i in &alive {
                let user_data = moto.ec2_user_data(&i.instance_id).await;
                cloud.boot(&i.instance_id, &i.instance_type, &user_data).await;
            }
            cloud.keep_only(&alive.iter().map(|i| i.instance_id.as_str()).collect::<Vec<_>>());
            cloud.revive();
        });
        if let Err(e) = look.await {
            eprintln!("cloud harness: a look at moto failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// This broker's instances in moto, terminated ones included.
async fn instances(broker: &str) -> Vec<crate::moto_ec2::MotoInstance> {
    moto().await.ec2_instances(&[("tag:hybroker-broker", broker)]).await
}

/// This broker's instances moto has not terminated.
async fn live_instances(broker: &str) -> Vec<crate::moto_ec2::MotoInstance> {
    let filters =
        [("tag:hybroker-broker", broker), ("instance-state-name", "pending"), ("instance-state-name", "running")];
    moto().await.ec2_instances(&filters).await
}

const BIG: &str = "name: big\ncommand: [\"echo\", \"on ec2\"]\nresources: {gpus: 8}\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_launched_ec2_instance_enrols_runs_the_job_and_is_terminated_when_idle() {
    let aws = aws("idle_timeout = \"1s\"\n").await;
    let mut jobs = aws.cluster.admin().await;
    let id = submit(&mut jobs, BIG).await;
    let job = wait_job(&jobs, &id, "the job to succeed on an EC2 instance", |j| j.state == "succeeded").await;
    let launched = instances(&aws.broker).await;
    assert_eq!(launched.len(), 1, "{launched:?}");
    let instance = &launched[0];
    assert_eq!(job.agent, format!("aws-us-east-1/{}", instance.instance_id), "named after the instance id");
    assert_eq!(instance.http_tokens, "required", "IMDSv2 only");
    assert!(instance.tags.get("hybroker-launch").is_some_and(|l| l == &instance.client_token));
    eventually("the idle instance to be terminated in moto", || async {
        let gone = instances(&aws.broker).await.iter().all(|i| i.state == "terminated" || i.state == "shutting-down");
        gone.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_whose_reply_is_lost_is_adopted_by_its_tag_not_launched_twice() {
    let aws = aws("").await;
    aws.proxy.script([Fault::DropReply]);
    let mut jobs = aws.cluster.admin().await;
    let id = submit(&mut jobs, BIG).await;
    wait_job(&jobs, &id, "the job to succeed on the adopted instance", |j| j.state == "succeeded").await;
    let launched = instances(&aws.broker).await;
    assert_eq!(launched.len(), 1, "one instance for one launch: {launched:?}");
    assert_eq!(aws.proxy.counts().run_forwarded, 1, "the lost launch was not sent again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_mid_burst_leaves_no_duplicate_or_orphan_and_runs_every_job_once() {
    kills_mid_burst(1, 6).await;
}

/// The goal's run: 50 `kill -9`s, each in the middle of a burst of launches. Prints its counts.
/// `CI=true cargo test --test e2e fifty_kills -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark run of about 5 minutes; the one-kill test covers the same path"]
async fn fifty_kills_mid_burst_leave_no_duplicate_or_orphan() {
    kills_mid_burst(50, 3).await;
}

/// `kills` rounds of: submit `per_round` 8-GPU jobs (one instance each), `kill -9` the broker as
/// soon as one of the round's launches reached moto, restart it on the same addresses. Then every
/// job succeeds in one attempt, no launch made two instances, and every instance is terminated.
async fn kills_mid_burst(kills: usize, per_round: usize) {
    let mut aws = aws("idle_timeout = \"2s\"\nboot_timeout = \"30s\"\norphan_grace = \"30s\"\n").await;
    let mut ids = Vec::new();
    let started = std::time::Instant::now();
    for round in 0..kills {
        // Each burst starts from no instance, so it must launch.
        eventually("the previous burst's instances to be retired", || async {
            live_instances(&aws.broker).await.is_empty().then_some(())
        })
        .await;
        let mut jobs = aws.cluster.admin().await;
        let before = aws.proxy.counts().run_forwarded;
        for i in 0..per_round {
            let spec = format!("name: burst-{round}-{i}\ncommand: [\"sleep\", \"1\"]\nresources: {{gpus: 8}}\n");
            ids.push(submit(&mut jobs, &spec).await);
        }
        eventually("a launch of this round to reach moto", || async {
            (aws.proxy.counts().run_forwarded > before).then_some(())
        })
        .await;
        aws.cluster.kill_broker();
        // The same addresses: the launched instances' user data names them.
        let port = aws.cluster.addr.port();
        aws.cluster.start_broker(port);
        // The burst finishes before the next one (its instances then idle out).
        let jobs = aws.cluster.admin().await;
        for id in &ids[ids.len() - per_round..] {
            wait_job(&jobs, id, "the burst's jobs to succeed after the restart", |j| j.state == "succeeded").await;
        }
    }
    let jobs = aws.cluster.admin().await;
    for id in &ids {
        let job = wait_job(&jobs, id, "every job to succeed after the restarts", |j| j.state == "succeeded").await;
        assert_eq!(job.attempts, 1, "job {id} ran more than once: {job:?}");
    }
    let launched = instances(&aws.broker).await;
    let mut launch_ids: Vec<&String> = launched.iter().filter_map(|i| i.tags.get("hybroker-launch")).collect();
    launch_ids.sort();
    let total = launch_ids.len();
    launch_ids.dedup();
    let duplicates = total - launch_ids.len();
    assert_eq!(duplicates, 0, "a launch made two instances: {launched:?}");
    eventually("every instance to be terminated (idle or orphan)", || async {
        live_instances(&aws.broker).await.is_empty().then_some(())
    })
    .await;
    eventually("the retired instances' agents to be removed", || {
        let mut jobs = jobs.clone();
        async move { jobs.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents.is_empty().then_some(()) }
    })
    .await;
    // A launch the kill cut off reached moto (the instance exists) but its answer never came back
    // through the proxy: only reconciliation by tag found it.
    let answered = aws.proxy.counts().run_forwarded as usize;
    println!(
        "kill -9 mid-burst: {kills} kills, {} jobs each run once, {} instances launched, {} of them by a launch the \
         kill cut off (adopted by its tag), {duplicates} duplicate launches, 0 orphans left running, {:.0} s",
        ids.len(),
        launched.len(),
        launched.len().saturating_sub(answered),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_capacity_sends_the_job_to_the_next_site_and_explain_says_why() {
    // Azure eastus (local instances) costs more than AWS for 8 × H100: the second choice. The
    // explanation (`hybroker jobs explain`) is the stored decision.
    let azure = "[[site]]\nname = \"azure-eastus\"\nkind = \"azure\"\nregion = \"eastus\"\nresidency = \"us\"\n\
                 instance_types = [\"Standard_ND96isr_H100_v5\"]\n\
                 [site.capacity]\nprovider = \"local\"\n[site.capacity.local]\nisolation = \"none\"\n";
    let aws = aws_and("", azure).await;
    aws.proxy.script([Fault::insufficient_capacity()]);
    let mut jobs = aws.cluster.admin().await;
    let id = submit(&mut jobs, BIG).await;
    let job = wait_job(&jobs, &id, "the job to succeed at the next site", |j| j.state == "succeeded").await;
    assert_eq!(job.site, "azure-eastus", "{job:?}");
    assert!(instances(&aws.broker).await.is_empty(), "no EC2 instance was made");
    let events = crate::common::watch_to_end(&mut jobs, &id).await;
    let placed: Vec<&str> =
        events.iter().map(|e| e.reason.as_str()).filter(|r| r.starts_with("placed at site")).collect();
    assert!(placed.len() == 2 && placed[0].starts_with("placed at site aws-us-east-1"), "{placed:?}");
    let decision: serde_json::Value = serde_json::from_str(&job.placement_json).unwrap();
    let aws_candidate =
        decision["candidates"].as_array().unwrap().iter().find(|c| c["site"] == "aws-us-east-1").unwrap();
    let why = aws_candidate["rejected"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("unavailable: p5.48xlarge on-demand since") && why.contains("InsufficientInstanceCapacity"),
        "{why}"
    );
}
