//! Spot instances: a launched agent (`agent.cloud`) enrols under the instance id its metadata
//! service gives; an interruption notice there stops the attempt (SIGTERM, the deadline in
//! `$HYBROKER_PREEMPT_FILE`), which ends `preempted`; the job is placed again without using up
//! `max_attempts` and runs on another agent. AWS (IMDSv2) and Azure (Scheduled Events,
//! acknowledged once the attempt stopped), against the fixture in `imds.rs`. The job's checkpoint
//! is saved when it asks and at the notice (only what changed), under the attempt's own prefix;
//! the next attempt resumes from it; a zombie of the preempted attempt gets no URL.

use std::time::{Duration, SystemTime};

use hybroker::agent::metadata::MetadataClient;
use hybroker::config::agent::CloudKind;
use hybroker::model::identity::Role;
use hybroker::proto::{self, agent_service_client::AgentServiceClient, job_service_client::JobServiceClient};
use hybroker::tls;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;
use crate::data::submit_as;
use crate::imds::{EVENT_ID, Imds};

/// Attempt 1 saves a checkpoint (asking for it and waiting until the agent took the request),
/// then waits to be stopped; its SIGTERM handler prints when it ran and the deadline it found and
/// updates one checkpoint file. A later attempt finds the checkpoint and says so.
const SPEC: &str = r#"name: spot
max_attempts: 1
checkpoint: {path: ckpt/, to: 'local://lab/acme/ckpt/'}
command:
  - sh
  - -c
  - |
    trap 'echo step-2 > ckpt/state; echo "sigterm at $(date +%s%N) deadline $(cat "$HYBROKER_PREEMPT_FILE")"; exit 143' TERM
    if [ -f ckpt/state ]; then echo "resumed from $(cat ckpt/state), $(cat ckpt/model.bin)"; echo "attempt $HYBROKER_ATTEMPT ran"; sleep 2; exit 0; fi
    mkdir -p ckpt/sub; echo step-1 > ckpt/state; echo weights > ckpt/model.bin; echo 1 > ckpt/sub/n
    touch "$HYBROKER_CHECKPOINT_REQUEST"; while [ -e "$HYBROKER_CHECKPOINT_REQUEST" ]; do sleep 0.02; done
    echo started; while :; do sleep 0.02; done
"#;

/// The agent's overrides for a launched instance of `cloud` whose metadata service is `imds`.
fn cloud_env(cloud: &str, imds: &Imds) -> Vec<(String, String)> {
    vec![
        ("HYBROKER_AGENT__CLOUD".into(), cloud.into()),
        ("HYBROKER_AGENT__METADATA_URL".into(), imds.url()),
        ("HYBROKER_AGENT__SPOT_POLL".into(), "200ms".into()),
    ]
}

async fn output(admin: &mut JobServiceClient<Channel>, id: &str, n: u32) -> String {
    let request = proto::LogsRequest { job_id: id.into(), attempt: n, ..Default::default() };
    let logs = admin.logs(request).await.unwrap().into_inner();
    String::from_utf8_lossy(&logs.output).into_owned()
}

/// An agent service client with the spot instance's own identity: what a zombie of its attempt
/// would use.
async fn zombie(cluster: &Cluster, instance: &str) -> AgentServiceClient<Channel> {
    let paths = cluster.issue(Role::Agent, instance, Some("lab"));
    let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
    AgentServiceClient::new(tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap())
}

/// The zombie's attempts to write into the checkpoint prefix or read it, as epoch `epoch`.
async fn zombie_refused(client: &mut AgentServiceClient<Channel>, id: &str, epoch: u64) {
    let file = proto::OutputFile { output: u32::MAX, path: "files/state".into(), size: 4 };
    let plan = proto::PlanOutputsRequest { job_id: id.into(), epoch, files: vec![file] };
    let refused = client.plan_outputs(plan).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let read =
        proto::CheckpointUrlsRequest { job_id: id.into(), epoch, attempt: 1, paths: vec!["complete.json".into()] };
    assert_eq!(client.checkpoint_urls(read).await.unwrap_err().code(), Code::FailedPrecondition);
}

/// Runs the whole story on `cloud`; returns the notice → SIGTERM-handler latency.
async fn preempted_then_resumed(cloud: &str, instance: &str) -> Duration {
    let imds = Imds::start(instance).await;
    let mut objects = std::path::PathBuf::new();
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |dir| {
        objects = dir.join("objects");
        let broker_extra = format!(
            "[[tenant]]\nname = \"acme\"\nstorage = [\"local://lab/acme/\"]\n\
             [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{}\"\n",
            objects.display()
        );
        Setup { broker_extra: Some(broker_extra), broker_env: enrolling(dir, "24h"), ..Setup::default() }
    })
    .await;
    let join = cluster.join_file("join-spot.toml", &["--site", "lab"]);
    cluster.start_joining_agent_with_env("spot", "1xH100-80GB", &join, &cloud_env(cloud, &imds));
    let mut admin = cluster.admin().await;
    let id = submit_as(&cluster, "acme", SPEC).await.unwrap();
    let job = wait_job(&admin, &id, "the job running on the spot instance", |j| j.state == "running").await;
    assert_eq!(job.agent, format!("lab/{instance}"), "the node is named after the instance");
    eventually("the job's checkpoint saved and its handler set", || {
        let (mut admin, id) = (admin.clone(), id.clone());
        async move { output(&mut admin, &id, 1).await.contains("started").then_some(()) }
    })
    .await;
    // Saved when asked, marker last, under the attempt's own prefix.
    let saved = objects.join(format!("lab/acme/ckpt/acme/{id}/attempt-1/checkpoint"));
    let marker = std::fs::read_to_string(saved.join("complete.json")).unwrap();
    assert!(marker.contains("\"complete\":true") && marker.contains("sub/n"), "{marker}");
    assert_eq!(std::fs::read_to_string(saved.join("files/state")).unwrap(), "step-1\n");
    let model_written = std::fs::metadata(saved.join("files/model.bin")).unwrap().modified().unwrap();

    let deadline = SystemTime::now() + Duration::from_secs(40);
    let deadline_text = humantime::format_rfc3339_seconds(deadline).to_string();
    imds.announce(if cloud == "aws" { "terminate" } else { "preempt" }, deadline);
    let job = wait_job(&admin, &id, "the job queued again", |j| j.state == "queued" && j.attempts == 1).await;
    let action = if cloud == "aws" { "terminate" } else { "preempt" };
    let expected = format!("preempted: spot interruption notice: {action} at {deadline_text}");
    assert!(job.reason.starts_with(&expected), "{}", job.reason);
    let log = output(&mut admin, &id, 1).await;
    let line = log.lines().find(|l| l.starts_with("sigterm at ")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.ends_with(&format!("deadline {deadline_text}")), "the deadline reached the job: {line}");
    let handled_ns: u128 = line.split(' ').nth(2).unwrap().parse().unwrap();
    let served = imds.first_served().unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    let latency = Duration::from_nanos(handled_ns.saturating_sub(served) as u64);
    // At the notice only what changed went up again.
    assert_eq!(std::fs::read_to_string(saved.join("files/state")).unwrap(), "step-2\n");
    assert_eq!(std::fs::metadata(saved.join("files/model.bin")).unwrap().modified().unwrap(), model_written);
    if cloud == "azure" {
        eventually("the event acknowledged", || async { (imds.acknowledged() == [EVENT_ID]).then_some(()) }).await;
    } else {
        assert!(imds.tokens() >= 1);
        // A zombie of the preempted attempt gets no URL for its old epoch.
        zombie_refused(&mut zombie(&cluster, instance).await, &id, 1).await;
    }
    assert_eq!(imds.refused(), 0, "every request carried its token or header");

    // The spot instance takes no new work; an on-demand agent runs the job, whose one counted
    // attempt is still left, from the checkpoint.
    cluster.start_agent("od", "1xH100-80GB");
    let job = wait_job(&admin, &id, "the job running on demand", |j| j.state == "running").await;
    if cloud == "aws" {
        // Nor for the new attempt's epoch: it is not the zombie's attempt.
        zombie_refused(&mut zombie(&cluster, instance).await, &id, 2).await;
    }
    assert_eq!((job.agent.as_str(), job.attempts, job.max_attempts), ("lab/od", 2, 1));
    let job = wait_job(&admin, &id, "the job done on demand", |j| j.state == "succeeded").await;
    assert_eq!((job.attempts, job.preemptions, job.max_attempts), (2, 1, 1));
    let log = output(&mut admin, &id, 2).await;
    assert!(log.contains("resumed from step-2, weights") && log.contains("attempt 2 ran"), "{log}");
    let events = watch_to_end(&mut admin, &id).await;
    assert!(events.iter().any(|e| e.state == "queued" && e.reason.starts_with(&expected)), "{events:?}");
    latency
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_spot_notice_preempts_the_attempt_and_the_job_runs_again_without_using_an_attempt() {
    let latency = preempted_then_resumed("aws", "i-0abc123def4567890").await;
    eprintln!("aws: notice served -> job's SIGTERM handler ran: {} ms", latency.as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_preempt_event_preempts_the_attempt_and_is_acknowledged_once_it_stopped() {
    let latency = preempted_then_resumed("azure", "hb-launch-7f3a").await;
    eprintln!("azure: notice served -> job's SIGTERM handler ran: {} ms", latency.as_millis());
}

#[tokio::test]
async fn the_metadata_client_refreshes_imdsv2_tokens_and_reads_notices() {
    hybroker::tls::install_crypto_provider();
    let imds = Imds::start("i-0fedcba9876543210").await;
    let aws = MetadataClient::new(CloudKind::Aws, &imds.url()).unwrap().with_token_ttl(Duration::from_secs(1));
    assert_eq!(aws.instance_name().await.unwrap(), "i-0fedcba9876543210");
    assert_eq!(aws.spot_notice("").await.unwrap(), None);
    assert_eq!(imds.tokens(), 1, "the token is reused");
    // Past 80% of its lifetime the token is fetched again before the service would refuse it.
    eventually("a fresh token", || async {
        aws.spot_notice("").await.unwrap();
        (imds.tokens() >= 2).then_some(())
    })
    .await;
    assert_eq!(imds.refused(), 0);
    let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    imds.announce("stop", deadline);
    let notice = aws.spot_notice("").await.unwrap().unwrap();
    assert_eq!(notice.reason(), "spot interruption notice: stop at 2027-01-15T08:00:00Z");

    let azure = MetadataClient::new(CloudKind::Azure, &imds.url()).unwrap();
    assert_eq!(azure.instance_name().await.unwrap(), "i-0fedcba9876543210");
    assert_eq!(azure.spot_notice("another-vm").await.unwrap(), None, "an event for other VMs only");
    let notice = azure.spot_notice("i-0fedcba9876543210").await.unwrap().unwrap();
    assert_eq!((notice.action.as_str(), notice.event_id.as_deref()), ("preempt", Some(EVENT_ID)));
    assert_eq!(notice.deadline, deadline);
    azure.acknowledge(&notice).await.unwrap();
    assert_eq!(imds.acknowledged(), [EVENT_ID]);
    assert_eq!(azure.spot_notice("i-0fedcba9876543210").await.unwrap(), None, "gone once acknowledged");
}

#[tokio::test]
async fn a_checkpoint_is_refused_where_an_output_would_be() {
    let cluster = Cluster::start_with(Duration::from_secs(5), &[], |dir| {
        let broker_extra = format!(
            "[[tenant]]\nname = \"acme\"\nstorage = [\"local://lab/acme/\"]\n\
             [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{}\"\n",
            dir.join("objects").display()
        );
        Setup { broker_extra: Some(broker_extra), ..Setup::default() }
    })
    .await;
    let outside = "name: x\ncommand: [true]\ncheckpoint: {path: ckpt/, to: 'local://lab/globex/'}\n";
    let refused = submit_as(&cluster, "acme", outside).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("checkpoint.to: tenant acme may not use local://lab/globex/"), "{refused:?}");
    let unknown = "name: x\ncommand: [true]\ncheckpoint: {path: ckpt/, to: 's3://nowhere/x/'}\n";
    let refused = submit_as(&cluster, "acme", unknown).await.unwrap_err();
    assert!(
        refused.message().contains("checkpoint.to: s3://nowhere is not a configured storage location"),
        "{refused:?}"
    );
}
