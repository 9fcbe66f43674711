//! Spot instances: a launched agent (`agent.cloud`) enrols under the instance id its metadata
//! service gives; an interruption notice there stops the attempt (SIGTERM, the deadline in
//! `$HYBROKER_PREEMPT_FILE`), which ends `preempted`; the job is placed again without using up
//! `max_attempts` and runs on another agent. AWS (IMDSv2) and Azure (Scheduled Events,
//! acknowledged once the attempt stopped), against the fixture in `imds.rs`.

use std::time::{Duration, SystemTime};

use hybroker::agent::metadata::MetadataClient;
use hybroker::config::agent::CloudKind;
use hybroker::proto;
use tonic::transport::Channel;

use crate::common::*;
use crate::imds::{EVENT_ID, Imds};

/// Attempt 1 waits to be stopped; its SIGTERM handler prints when it ran and the deadline it
/// found. Later attempts finish.
const SPEC: &str = r#"name: spot
max_attempts: 1
command:
  - sh
  - -c
  - |
    trap 'echo "sigterm at $(date +%s%N) deadline $(cat "$HYBROKER_PREEMPT_FILE")"; exit 143' TERM
    if [ "$HYBROKER_ATTEMPT" = 1 ]; then echo started; while :; do sleep 0.02; done; fi
    echo "attempt $HYBROKER_ATTEMPT ran"
"#;

/// The agent's overrides for a launched instance of `cloud` whose metadata service is `imds`.
fn cloud_env(cloud: &str, imds: &Imds) -> Vec<(String, String)> {
    vec![
        ("HYBROKER_AGENT__CLOUD".into(), cloud.into()),
        ("HYBROKER_AGENT__METADATA_URL".into(), imds.url()),
        ("HYBROKER_AGENT__SPOT_POLL".into(), "200ms".into()),
    ]
}

async fn output(
    admin: &mut hybroker::proto::job_service_client::JobServiceClient<Channel>,
    id: &str,
    n: u32,
) -> String {
    let request = proto::LogsRequest { job_id: id.into(), attempt: n, ..Default::default() };
    let logs = admin.logs(request).await.unwrap().into_inner();
    String::from_utf8_lossy(&logs.output).into_owned()
}

/// Runs the whole story on `cloud`; returns the notice → SIGTERM-handler latency.
async fn preempted_then_resumed(cloud: &str, instance: &str) -> Duration {
    let imds = Imds::start(instance).await;
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |dir| Setup {
        broker_env: enrolling(dir, "24h"),
        ..Setup::default()
    })
    .await;
    let join = cluster.join_file("join-spot.toml", &["--site", "lab"]);
    cluster.start_joining_agent_with_env("spot", "1xH100-80GB", &join, &cloud_env(cloud, &imds));
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, SPEC).await;
    let job = wait_job(&admin, &id, "the job running on the spot instance", |j| j.state == "running").await;
    assert_eq!(job.agent, format!("lab/{instance}"), "the node is named after the instance");
    eventually("the job's handler to be set", || {
        let (mut admin, id) = (admin.clone(), id.clone());
        async move { output(&mut admin, &id, 1).await.contains("started").then_some(()) }
    })
    .await;

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
    if cloud == "azure" {
        eventually("the event acknowledged", || async { (imds.acknowledged() == [EVENT_ID]).then_some(()) }).await;
    } else {
        assert!(imds.tokens() >= 1);
    }
    assert_eq!(imds.refused(), 0, "every request carried its token or header");

    // The spot instance takes no new work; an on-demand agent runs the job, whose one counted
    // attempt is still left.
    cluster.start_agent("od", "1xH100-80GB");
    let job = wait_job(&admin, &id, "the job done on demand", |j| j.state == "succeeded").await;
    assert_eq!((job.agent.as_str(), job.attempts, job.max_attempts), ("lab/od", 2, 1));
    assert!(output(&mut admin, &id, 2).await.contains("attempt 2 ran"));
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
