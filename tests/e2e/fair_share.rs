//! Fair share between tenants and preemption, through the real broker, agent, gateway and CLI:
//! tenants weighted 2:1 share an agent's GPUs 2:1 whatever priorities they give their jobs, the
//! jobs left waiting say where they stand, and a higher-priority job of a tenant preempts its
//! `preemptible: true` job, which is stopped like a spot notice (SIGTERM, checkpoint saved) and
//! resumes from its checkpoint once the GPU is free again.

use std::time::Duration;

use hybroker::gateway::api::Job;
use hybroker::proto;
use tonic::transport::Channel;

use crate::common::*;
use crate::data::submit_as;

/// `hybroker ARGS` as tenant `key`'s user runs it, against `gateway`: its stdout, once it succeeded.
async fn cli(gateway: &Gateway, key: &str, args: &[&str]) -> String {
    let (code, out, err) = crate::gateway::text::cli(gateway, key, args).await;
    assert_eq!(code, 0, "hybroker {args:?}: {err}");
    out
}

/// Submits `spec` with the CLI; returns the job's id.
async fn submit_cli(cluster: &Cluster, gateway: &Gateway, key: &str, name: &str, spec: &str) -> String {
    let path = cluster.path(&format!("{name}.yaml"));
    std::fs::write(&path, spec).unwrap();
    let text = cli(gateway, key, &["submit", path.to_str().unwrap()]).await;
    text.lines().next().and_then(|l| l.strip_prefix("submitted ")).expect("a `submitted ID` line").to_string()
}

/// The job as the CLI shows it (`jobs get --output json`).
async fn get_cli(gateway: &Gateway, key: &str, id: &str) -> Job {
    let out = cli(gateway, key, &["jobs", "get", id, "--output", "json"]).await;
    serde_json::from_str(&out).unwrap()
}

/// A 1-GPU job that runs until it is cancelled.
fn long_job(name: &str, priority: u32) -> String {
    format!("name: {name}\npriority: {priority}\nresources: {{gpus: 1}}\nmax_runtime: 5m\ncommand: [sleep, '300']\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_weighted_two_to_one_get_gpus_two_to_one_and_waiting_jobs_say_why() {
    let tenants = "[[tenant]]\nname = \"acme\"\nweight = 2\n\n[[tenant]]\nname = \"globex\"\n";
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |_| Setup {
        broker_extra: Some(tenants.into()),
        ..Setup::default()
    })
    .await;
    let gateway = cluster.start_gateway();
    let (acme, globex) = (cluster.tenant_key("acme"), cluster.tenant_key("globex"));
    // globex first and at priority 100: neither its age nor its priority beats acme's weight.
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(("globex", submit_cli(&cluster, &gateway, &globex, &format!("g{i}"), &long_job("g", 100)).await));
    }
    for i in 1..=3 {
        ids.push(("acme", submit_cli(&cluster, &gateway, &acme, &format!("a{i}"), &long_job("a", 0)).await));
    }
    // Three GPUs appear at once: they are shared 2:1 in one go.
    cluster.start_agent("node-a", "3xH100-80GB");
    let admin = cluster.admin().await;
    let started = eventually("three jobs leased", || {
        let (admin, ids) = (admin.clone(), ids.clone());
        async move {
            let mut started = Vec::new();
            for (tenant, id) in &ids {
                let job = get(&mut admin.clone(), id).await;
                if job.state == "leased" || job.state == "running" {
                    started.push(*tenant);
                }
            }
            (started.len() == 3).then_some(started)
        }
    })
    .await;
    assert_eq!(started.iter().filter(|t| **t == "acme").count(), 2, "acme (weight 2) got two GPUs: {started:?}");
    assert_eq!(started.iter().filter(|t| **t == "globex").count(), 1, "globex got one: {started:?}");
    // The oldest job of globex went first (an equal share: the older job).
    assert!(["leased", "running"].contains(&get(&mut admin.clone(), &ids[0].1).await.state.as_str()));

    // Those still waiting say where they stand, as the CLI shows them.
    let mut positions = Vec::new();
    for (tenant, id) in &ids {
        let key = if *tenant == "acme" { &acme } else { &globex };
        let job = get_cli(&gateway, key, id).await;
        if job.state == "queued" {
            assert!(job.reason.starts_with("waiting: ") && job.reason.contains(" in line"), "{}", job.reason);
            positions.push(job.reason.split(' ').nth(1).unwrap().to_string());
        }
    }
    positions.sort();
    assert_eq!(positions, ["1st", "2nd", "3rd"]);
    for (_, id) in &ids {
        let _ = admin
            .clone()
            .cancel(proto::CancelJobRequest { job_id: id.clone(), reason: "done".into(), tenant: String::new() })
            .await;
    }
}

/// Writes a checkpoint when it starts, updates it on SIGTERM; a later attempt resumes from it.
const PREEMPTIBLE: &str = r#"name: low
preemptible: true
priority: 1
max_attempts: 1
resources: {gpus: 1}
checkpoint: {path: ckpt/, to: 'local://lab/acme/ckpt/'}
command:
  - sh
  - -c
  - |
    trap 'echo step-2 > ckpt/state; echo "sigterm"; exit 143' TERM
    if [ -f ckpt/state ]; then echo "resumed from $(cat ckpt/state)"; exit 0; fi
    mkdir -p ckpt; echo step-1 > ckpt/state
    echo started; while :; do sleep 0.05; done
"#;

const URGENT: &str = "name: urgent\npriority: 9\nresources: {gpus: 1}\ncommand: [sh, -c, 'echo urgent ran']\n";

/// Attempt `n`'s output so far.
async fn output(admin: &mut proto::job_service_client::JobServiceClient<Channel>, id: &str, n: u32) -> String {
    let request = proto::LogsRequest { job_id: id.into(), attempt: n, ..Default::default() };
    // Before the attempt starts there are no logs: nothing yet.
    admin.logs(request).await.map_or(String::new(), |l| String::from_utf8_lossy(&l.into_inner().output).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_job_preempts_a_preemptible_one_which_resumes_from_its_checkpoint() {
    let mut objects = std::path::PathBuf::new();
    let cluster = Cluster::start_with(Duration::from_secs(5), &[("node-a", "1xH100-80GB")], |dir| {
        objects = dir.join("objects");
        let broker_extra = format!(
            "[[tenant]]\nname = \"acme\"\nstorage = [\"local://lab/acme/\"]\n\
             [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{}\"\n\
             [placement]\npreempt_min_runtime = \"500ms\"\n",
            objects.display()
        );
        Setup { broker_extra: Some(broker_extra), ..Setup::default() }
    })
    .await;
    let mut admin = cluster.admin().await;
    let low = submit_as(&cluster, "acme", PREEMPTIBLE).await.unwrap();
    eventually("the preemptible job running and its checkpoint written", || {
        let (mut admin, low) = (admin.clone(), low.clone());
        async move { output(&mut admin, &low, 1).await.contains("started").then_some(()) }
    })
    .await;
    let urgent = submit_as(&cluster, "acme", URGENT).await.unwrap();

    let events = watch_to_end(&mut admin, &urgent).await;
    assert_eq!(states(&events).last(), Some(&"succeeded"), "{events:?}");
    let events = watch_to_end(&mut admin, &low).await;
    assert_eq!(states(&events).last(), Some(&"succeeded"), "{events:?}");
    let preempted = events.iter().find(|e| e.state == "queued" && e.reason.starts_with("preempted: "));
    let preempted = preempted.unwrap_or_else(|| panic!("{events:?}"));
    assert!(
        preempted
            .reason
            .contains(&format!("by the broker for job {urgent}: job {urgent} of acme has a higher priority (9)")),
        "{}",
        preempted.reason
    );
    assert!(preempted.reason.contains("attempt 1 not counted"), "{}", preempted.reason);
    // SIGTERM reached the job, its checkpoint went up, and attempt 2 resumed from it.
    assert!(output(&mut admin, &low, 1).await.contains("sigterm"));
    assert!(output(&mut admin, &low, 2).await.contains("resumed from step-2"), "{}", output(&mut admin, &low, 2).await);
    let job = get(&mut admin, &low).await;
    assert_eq!((job.attempts, job.preemptions), (2, 1), "{job:?}");
    // The one agent ran all three attempts: a preemption by the broker does not drain it (a spot
    // notice does).
    assert_eq!(job.agent, "lab/node-a");
    assert_eq!(get(&mut admin, &urgent).await.agent, "lab/node-a");
}
