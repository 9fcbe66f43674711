//! Jobs through real broker and agent processes: success, failure, lost agents, zombies, and a
//! broker killed under load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hybroker::proto;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

const HELLO: &str =
    "name: hello\ncommand: [sh, -c, 'echo hello $HYBROKER_JOB_ID; echo gpus=[$CUDA_VISIBLE_DEVICES]']\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_agents_and_every_transition_is_watched_in_order() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "2xH100-80GB"), ("node-b", "1xL4-24GB")]).await;
    let mut admin = cluster.admin().await;
    let hello = submit(&mut admin, HELLO).await;
    let gpu = submit(
        &mut admin,
        "name: gpu\ncommand: [sh, -c, 'echo on [$CUDA_VISIBLE_DEVICES]']\nresources: {gpus: 1, gpu_model: [L4-24GB]}\n",
    )
    .await;
    let failing = submit(&mut admin, "name: failing\ncommand: [sh, -c, 'echo oops >&2; exit 3']\n").await;

    for id in [&hello, &gpu] {
        let events = watch_to_end(&mut admin, id).await;
        assert_eq!(states(&events), ["queued", "placed", "leased", "running", "succeeded"], "{events:?}");
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "events in commit order");
        assert_eq!(events.last().unwrap().exit_code, Some(0));
    }
    let events = watch_to_end(&mut admin, &failing).await;
    assert_eq!(states(&events).last(), Some(&"failed"));
    let job = get(&mut admin, &failing).await;
    assert_eq!((job.state.as_str(), job.exit_code, job.attempts), ("failed", Some(3), 1), "{job:?}");
    assert!(job.reason.contains("exited with code 3"), "{}", job.reason);

    // The GPU job got the L4 on node-b, and the output reached the store.
    let job = get(&mut admin, &gpu).await;
    assert_eq!(job.agent, "lab/node-b");
    let logs = admin
        .logs(proto::LogsRequest { job_id: gpu.clone(), tenant: String::new(), attempt: 0, offset: 0 })
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&logs.into_inner().output).trim(), "on [0]");
    let logs =
        admin.logs(proto::LogsRequest { job_id: failing, tenant: String::new(), attempt: 0, offset: 0 }).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&logs.into_inner().output).trim(), "oops");

    // Watching a finished job from its last event on ends at once.
    let last = watch_to_end(&mut admin, &hello).await.last().unwrap().seq;
    let request = proto::WatchJobRequest { job_id: hello.clone(), tenant: String::new(), after_seq: last };
    let mut rest = admin.watch(request).await.unwrap().into_inner();
    let next = tokio::time::timeout(DEADLINE, tokio_stream::StreamExt::next(&mut rest)).await.unwrap();
    assert!(next.is_none(), "{next:?}");

    // Agents and their (simulated) inventory are visible.
    // node-a may join after the jobs that node-b ran have ended: wait for it.
    let a = eventually("node-a registered", || {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.into_iter().find(|a| a.id == "lab/node-a" && a.inventory.is_some())
        }
    })
    .await;
    let gpus = &a.inventory.as_ref().unwrap().gpus;
    assert_eq!(gpus.len(), 2);
    assert!(gpus.iter().all(|g| g.simulated && g.model == "H100-80GB"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_submit_returns_the_same_job() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let mut admin = cluster.admin().await;
    let first = submit_keyed(&mut admin, HELLO, "key-1").await.unwrap();
    let again = submit_keyed(&mut admin, HELLO, "key-1").await.unwrap();
    let other = submit_keyed(&mut admin, HELLO, "key-2").await.unwrap();
    assert_eq!(first, again);
    assert_ne!(first, other);
}

/// A job whose first attempt hangs (its pid saved for cleanup) and whose later attempts succeed.
const FIRST_ATTEMPT_HANGS: &str = "name: flaky-node\ncommand: [sh, -c, 'echo $$ > pid; if [ $HYBROKER_ATTEMPT = 1 ]; then exec sleep 60; fi; echo done']\n";

/// Ends the job's hanging first attempt left by a killed agent: its sandbox's process group (the
/// sandbox's init names the job in its command line; the job's own pids are its namespace's).
fn kill_saved_pid(_cluster: &Cluster, _node: &str, job: &str) {
    for pid in processes_with(&format!("{job}/attempt-1")) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_job_runs_again_on_the_other_agent() {
    let mut cluster = Cluster::start(Duration::from_millis(1500), &[("node-a", ""), ("node-b", "")]).await;
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, FIRST_ATTEMPT_HANGS).await;
    let job = wait_job(&admin, &id, "first attempt running", |j| j.state == "running").await;
    let victim = job.agent.strip_prefix("lab/").unwrap().to_string();
    let killed_at = Instant::now();
    cluster.kill_agent(&victim);
    let job = wait_job(&admin, &id, "second attempt leased", |j| j.attempts == 2).await;
    let redispatch = killed_at.elapsed();
    println!("re-dispatch after agent kill -9: {redispatch:?} (lease ttl {:?})", cluster.lease_ttl);
    assert_ne!(job.agent, format!("lab/{victim}"));
    let events = watch_to_end(&mut admin, &id).await;
    kill_saved_pid(&cluster, &victim, &id);
    assert_eq!(
        states(&events),
        ["queued", "placed", "leased", "running", "queued", "placed", "leased", "running", "succeeded"],
        "{events:?}"
    );
    assert!(events[4].reason.contains("lease expired"), "{}", events[4].reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_agents_late_reports_are_refused() {
    let cluster = Cluster::start(Duration::from_millis(1500), &[("node-a", ""), ("node-b", "")]).await;
    let mut admin = cluster.admin().await;
    // Attempt 1 ends on its own shortly after its agent is frozen; attempt 2 succeeds at once.
    let spec = "name: zombie\ncommand: [sh, -c, 'if [ $HYBROKER_ATTEMPT = 1 ]; then while [ ! -f release ]; do sleep 0.05; done; fi; echo ok']\n";
    let id = submit(&mut admin, spec).await;
    // The agent of attempt 1 (on a loaded machine its lease may already have run out, and the
    // job moved on: that agent is the zombie all the same).
    let request = proto::WatchJobRequest { job_id: id.clone(), tenant: String::new(), after_seq: 0 };
    let mut stream = admin.watch(request).await.unwrap().into_inner();
    let first_running = async {
        loop {
            let ev = tokio_stream::StreamExt::next(&mut stream).await.unwrap().unwrap();
            if ev.state == "running" && ev.attempt == 1 {
                return ev.agent;
            }
        }
    };
    let agent = tokio::time::timeout(DEADLINE, first_running).await.expect("attempt 1 runs");
    drop(stream);
    let zombie = agent.strip_prefix("lab/").unwrap().to_string();
    let pid = Pid::from_raw(cluster.agent_pid(&zombie));
    kill(pid, Signal::SIGSTOP).unwrap();
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(states(&events).last(), Some(&"succeeded"));
    // Let the frozen agent's attempt succeed too, then thaw the agent: its report must be refused.
    std::fs::write(cluster.work_dir(&zombie).join(&id).join("attempt-1/release"), "").unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    eventually("the zombie's report to be refused", || async {
        cluster.broker_log().contains("refused report about a stale or unknown attempt").then_some(())
    })
    .await;
    let job = get(&mut admin, &id).await;
    assert_eq!((job.state.as_str(), job.attempts), ("succeeded", 2));
    let request = proto::WatchJobRequest { job_id: id.clone(), tenant: String::new(), after_seq: 0 };
    let mut all = Vec::new();
    let mut stream = admin.watch(request).await.unwrap().into_inner();
    while let Some(ev) = tokio_stream::StreamExt::next(&mut stream).await {
        all.push(ev.unwrap());
    }
    assert_eq!(all.iter().filter(|e| e.state == "succeeded").count(), 1, "{all:?}");
    assert_eq!(all.iter().find(|e| e.state == "succeeded").unwrap().attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_under_submits_loses_no_acknowledged_job() {
    let mut cluster = Cluster::start(Duration::from_secs(2), &[("node-a", ""), ("node-b", "")]).await;
    let port = cluster.addr.port();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let submitter = {
        let admin = cluster.admin().await;
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut admin = admin;
            for i in 0..100_000 {
                let spec = format!("name: load-{i}\ncommand: [sh, -c, 'echo {i}']\n");
                match submit_keyed(&mut admin, &spec, &format!("load-{i}")).await {
                    Ok(id) => acked.lock().unwrap().push(id),
                    Err(_) => return i,
                }
            }
            unreachable!("the broker is killed long before")
        })
    };
    eventually("some acknowledged submits", || async { (acked.lock().unwrap().len() >= 40).then_some(()) }).await;
    cluster.kill_broker();
    let failed_at = submitter.await.unwrap();
    cluster.start_broker(port);
    let mut admin = cluster.admin().await;
    // The submit that failed is retried with its key: it exists at most once.
    let retried = submit_keyed(
        &mut admin,
        &format!("name: load-{failed_at}\ncommand: [sh, -c, 'echo {failed_at}']\n"),
        &format!("load-{failed_at}"),
    )
    .await
    .unwrap();
    let mut ids = acked.lock().unwrap().clone();
    ids.push(retried);
    println!("acknowledged before the kill: {}", ids.len() - 1);
    for id in &ids {
        let events = watch_to_end(&mut admin, id).await;
        assert_eq!(states(&events).last(), Some(&"succeeded"), "job {id}: {events:?}");
        assert_eq!(events.iter().filter(|e| e.state == "succeeded").count(), 1, "job {id}: {events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_process_group_and_max_runtime_is_enforced() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    // The job's shell and its background child, found on the host by a marker in their argv
    // (inside the sandbox their pids are their namespace's).
    let mark = format!("forever-{}", fastrand::u64(..));
    let spec = format!("name: forever\ncommand: [sh, -c, 'sh -c \"sleep 60; :\" child-$0 & wait', {mark}]\n");
    let id = submit(&mut admin, &spec).await;
    wait_job(&admin, &id, "running", |j| j.state == "running").await;
    let pids: Vec<Pid> = eventually("the job's shell and its child", || async {
        let pids = processes_with(&mark);
        (pids.len() == 2).then(|| pids.into_iter().map(Pid::from_raw).collect())
    })
    .await;
    let job = admin
        .cancel(proto::CancelJobRequest { job_id: id.clone(), tenant: String::new(), reason: "test".into() })
        .await
        .unwrap();
    assert_eq!(job.into_inner().state, "cancelled");
    eventually("the job's process group to be gone", || async { pids.iter().all(|p| !alive(*p)).then_some(()) }).await;
    let err = admin.cancel(proto::CancelJobRequest { job_id: id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    let id = submit(&mut admin, "name: slow\ncommand: [sleep, '30']\nmax_runtime: 1s\n").await;
    let events = watch_to_end(&mut admin, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.state, "failed");
    assert!(last.reason.contains("max runtime"), "{}", last.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_are_never_double_booked() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "2xA100-80GB")]).await;
    let mut admin = cluster.admin().await;
    let spec = "name: both-gpus\ncommand: [sh, -c, 'echo [$CUDA_VISIBLE_DEVICES]; sleep 0.3']\nresources: {gpus: 2}\n";
    let first = submit(&mut admin, spec).await;
    let second = submit(&mut admin, spec).await;
    let a = watch_to_end(&mut admin, &first).await;
    let b = watch_to_end(&mut admin, &second).await;
    let a_done = a.iter().find(|e| e.state == "succeeded").unwrap().seq;
    let b_leased = b.iter().find(|e| e.state == "leased").unwrap().seq;
    assert!(b_leased > a_done, "the second job waited for the GPUs: {a:?} {b:?}");
    let logs = admin.logs(proto::LogsRequest { job_id: second, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(String::from_utf8_lossy(&logs.output).trim(), "[0,1]");
    // A job no agent can ever fit stays queued.
    let id = submit(&mut admin, "name: too-big\ncommand: [true]\nresources: {gpus: 3}\n").await;
    assert_eq!(get(&mut admin, &id).await.state, "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_with_one_key_make_one_job() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let admin = cluster.admin().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut admin = admin.clone();
        tasks.push(tokio::spawn(async move { submit_keyed(&mut admin, HELLO, "same-key").await.unwrap() }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_ends_the_attempts_its_killed_predecessor_left_running() {
    let mut cluster = Cluster::start(Duration::from_secs(30), &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    let mark = format!("orphan-{}", fastrand::u64(..));
    let id = submit(&mut admin, &format!("name: orphan\ncommand: [sh, -c, 'sleep 60; :', {mark}]\n")).await;
    wait_job(&admin, &id, "running", |j| j.state == "running").await;
    let pid =
        eventually("the job's process", || async { processes_with(&mark).first().copied().map(Pid::from_raw) }).await;
    cluster.kill_agent("node-a");
    assert!(alive(pid), "the job outlives its agent's kill -9");
    cluster.start_agent("node-a", "");
    eventually("the orphaned attempt to be killed", || async { (!alive(pid)).then_some(()) }).await;
    // A second agent on the same work directory refuses to start (it would kill live attempts).
    let mut twin = std::process::Command::new(BIN)
        .args(["agent", "--config", cluster.path("agent-node-a.toml").to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually("the twin agent to exit", || {
        let status = twin.try_wait().unwrap();
        async move { status }
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(twin.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success() && stderr.contains("another agent uses the work directory"), "{stderr}");
    // The broker learns the attempt is gone from the new agent's register and runs the job again.
    wait_job(&admin, &id, "a second attempt", |j| j.attempts == 2).await;
    for pid in processes_with(&mark) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
