//! Clean restarts: `kill -TERM` of a broker with agents and running jobs exits within its grace,
//! its agents come back to the next broker on the same port, and no job is lost or run twice; a
//! client that never ends its stream does not hold the broker past its grace; a gateway with an
//! open event stream exits within its own.

use std::path::Path;
use std::time::Duration;

use hybroker::model::identity::Role;
use hybroker::proto::agent_service_client::AgentServiceClient;
use hybroker::proto::{self, agent_message::Msg};
use hybroker::tls;
use reqwest::{Method, StatusCode};

use crate::common::*;
use crate::gateway::{Api, spec};

/// The broker's shutdown grace in these tests; exits are asserted well before `EXIT_DEADLINE`.
const GRACE: &str = "3s";
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

fn with_grace(_: &Path) -> Setup {
    Setup { broker_env: vec![("HYBROKER_BROKER__SHUTDOWN_GRACE".into(), GRACE.into())], ..Setup::default() }
}

async fn connected(admin: &mut proto::job_service_client::JobServiceClient<tonic::transport::Channel>) -> usize {
    let Ok(agents) = admin.list_agents(proto::ListAgentsRequest {}).await else { return 0 };
    agents.into_inner().agents.iter().filter(|a| a.connected).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_broker_exits_in_bound_and_every_agent_and_job_carries_on_with_the_next() {
    let nodes = ["node-a", "node-b", "node-c"];
    let agents: Vec<(&str, &str)> = nodes.iter().map(|n| (*n, "")).collect();
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &agents, with_grace).await;
    let port = cluster.addr.port();
    let mut admin = cluster.admin().await;
    eventually("every agent to connect", || async { (connected(&mut admin.clone()).await == 3).then_some(()) }).await;
    // Each run is one shell on the host with the job's marker in its argv.
    let mut jobs = Vec::new();
    for i in 0..6 {
        let mark = format!("restart-{i}-{}", fastrand::u64(..));
        let spec = format!("name: through-restart\ncommand: [sh, -c, 'echo run; sleep 6; echo done', {mark}]\n");
        jobs.push((submit(&mut admin, &spec).await, mark));
    }
    for (id, mark) in &jobs {
        wait_job(&admin, id, "running", |j| j.state == "running").await;
        eventually("the job's process", || async { (processes_with(mark).len() == 1).then_some(()) }).await;
    }

    let took = cluster.terminate_broker(EXIT_DEADLINE);
    println!("broker exited {took:?} after SIGTERM (grace {GRACE})");
    let log = cluster.broker_log();
    for step in ["broker stopped accepting", "told 3 agents to reconnect", "core drained", "exiting after"] {
        assert!(log.contains(step), "no {step:?} in the broker's log:\n{log}");
    }
    assert!(took < Duration::from_secs(8), "the broker took {took:?} to exit:\n{log}");

    cluster.start_broker(port);
    let mut admin = cluster.admin().await;
    eventually("every agent back", || async { (connected(&mut admin.clone()).await == 3).then_some(()) }).await;
    for node in nodes {
        assert!(cluster.agent_log(node).contains("the broker asked to reconnect"), "{}", cluster.agent_log(node));
    }
    for (id, mark) in &jobs {
        assert!(processes_with(mark).len() <= 1, "job {id} runs twice after the restart");
    }
    for (id, _) in &jobs {
        let events = watch_to_end(&mut admin, id).await;
        assert_eq!(states(&events).last(), Some(&"succeeded"), "job {id}: {events:?}");
        assert_eq!(events.iter().filter(|e| e.state == "succeeded").count(), 1, "job {id}: {events:?}");
        assert_eq!(get(&mut admin, id).await.attempts, 1, "job {id} was run again: {events:?}");
        let logs = admin.logs(proto::LogsRequest { job_id: id.clone(), ..Default::default() }).await.unwrap();
        let logs = logs.into_inner();
        // (The tail the old broker kept in memory, `run`, went with it; the new one has the rest.)
        let output = String::from_utf8_lossy(&logs.output);
        assert_eq!(
            (logs.attempt, output.matches("run").count() <= 1, output.matches("done").count()),
            (1, true, 1),
            "job {id}: {output:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_ends_its_stream_does_not_hold_the_broker_past_its_grace() {
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], with_grace).await;
    let paths = cluster.issue(Role::Agent, "hung", Some("lab"));
    let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap();
    let register = proto::AgentMessage {
        msg: Some(Msg::Register(proto::Register {
            site: "lab".into(),
            node: "hung".into(),
            inventory: Some(proto::Inventory {
                cpus: 1,
                memory_mib: 1024,
                isolation: "sandbox".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    // Registers, then neither reads the broker's messages nor ends its own half.
    let outbound = tokio_stream::StreamExt::chain(tokio_stream::iter([register]), tokio_stream::pending());
    let stream = AgentServiceClient::new(channel).session(outbound).await.unwrap();
    let admin = cluster.admin().await;
    eventually("the hung client to register", || async { (connected(&mut admin.clone()).await == 1).then_some(()) })
        .await;
    let took = cluster.terminate_broker(EXIT_DEADLINE);
    println!("broker with a hung client exited {took:?} after SIGTERM (grace {GRACE})");
    let log = cluster.broker_log();
    assert!(log.contains("connections still open after the shutdown grace"), "{log}");
    assert!(took < Duration::from_secs(10), "the broker took {took:?} to exit:\n{log}");
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_gateway_ends_its_event_streams_and_exits_in_bound() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let mut gateway = cluster.start_gateway_keyed("gateway", false, "shutdown_grace = \"6s\"\n", "");
    crate::gateway::wait_ready(&gateway).await;
    let api = Api::new(&gateway, &cluster.tenant_key("acme"));
    let (status, _, job) = api.post("/v1/jobs", &spec("forever", "sleep 60")).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let mut events = api.request(Method::GET, &format!("/v1/jobs/{id}/events")).send().await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let first = tokio::time::timeout(DEADLINE, events.chunk()).await.expect("an event in time").unwrap();
    assert!(first.is_some());
    let took = gateway.terminate(EXIT_DEADLINE);
    println!("gateway with an open event stream exited {took:?} after SIGTERM (grace 6s)");
    // The event stream is ended at once, so the gateway does not wait out its grace for it.
    assert!(took < Duration::from_secs(5), "the gateway took {took:?} to exit:\n{}", gateway.log());
    assert!(gateway.log().contains("gateway exiting after"), "{}", gateway.log());
    // The stream ended (cleanly or cut), it did not hang.
    let rest =
        tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = events.chunk().await {} }).await;
    assert!(rest.is_ok(), "the event stream stayed open after the gateway exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_agent_ends_its_session_cleanly_and_stops_its_attempts() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    let mark = format!("agent-stop-{}", fastrand::u64(..));
    let id = submit(&mut admin, &format!("name: long\ncommand: [sh, -c, 'sleep 60; :', {mark}]\n")).await;
    wait_job(&admin, &id, "running", |j| j.state == "running").await;
    let pid = nix::unistd::Pid::from_raw(cluster.agent_pid("node-a"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually("the agent to exit", || async { (!alive(pid)).then_some(()) }).await;
    let log = cluster.agent_log("node-a");
    assert!(log.contains("broker session ended: the agent is stopping clean=true"), "{log}");
    // The broker saw the stream end (not a lease running out), and the attempt was stopped.
    eventually("the broker to see the stream end", || async {
        cluster.broker_log().contains("agent stream closed").then_some(())
    })
    .await;
    eventually("the attempt's processes to be gone", || async { processes_with(&mark).is_empty().then_some(()) }).await;
}
