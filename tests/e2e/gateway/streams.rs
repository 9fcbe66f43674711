//! Server-Sent Events and followed logs through the gateway: events in order, resumed with
//! `Last-Event-ID` without gaps, the stream ending after the terminal event; logs followed while
//! a job runs, across a lost attempt.

use std::time::Duration;

use hybroker::config::GatewayConfig;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Api, problem, send, spec};
use crate::common::*;

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: String,
    event: String,
    data: Value,
}

/// An open event stream.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(api: &Api, job: &str, last_event_id: Option<&str>) -> Events {
        let mut request = api.request(Method::GET, &format!("/v1/jobs/{job}/events"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events { response, buffer: String::new() }
    }

    /// The next event, or `None` when the stream ends (keep-alive comments are skipped).
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
                let Some(data) = field("data:") else { continue };
                let data = serde_json::from_str(&data).unwrap();
                return Some(SseEvent { id: field("id:").unwrap(), event: field("event:").unwrap(), data });
            }
            let chunk = tokio::time::timeout(DEADLINE, self.response.chunk()).await.expect("an event in time");
            self.buffer.push_str(std::str::from_utf8(&chunk.unwrap()?).unwrap());
        }
    }

    async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn states(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// Reads a followed log until it contains `text`; returns everything read so far.
async fn read_until(response: &mut reqwest::Response, so_far: &mut String, text: &str) {
    while !so_far.contains(text) {
        let chunk = tokio::time::timeout(DEADLINE, response.chunk()).await.expect("output in time").unwrap();
        let chunk = chunk.unwrap_or_else(|| panic!("the log ended before {text:?}: {so_far:?}"));
        so_far.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn read_to_end(mut response: reqwest::Response, so_far: &mut String) {
    while let Some(chunk) = tokio::time::timeout(DEADLINE, response.chunk()).await.expect("the end in time").unwrap() {
        so_far.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_and_resume_after_the_last_event_id() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let id =
        acme.submit_ok(&spec("waits-for-go", "echo first; while [ ! -f go ]; do sleep 0.05; done; echo second")).await;

    // Up to `running`, then the client goes away.
    let mut stream = Events::open(&acme, &id, None).await;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|e: &SseEvent| e.event != "running") {
        seen.push(stream.next().await.expect("events until running"));
    }
    drop(stream);

    // The output so far, followed.
    let mut follow = acme.request(Method::GET, &format!("/v1/jobs/{id}/logs?follow=true")).send().await.unwrap();
    assert_eq!(follow.headers()["content-type"], "text/plain; charset=utf-8");
    let mut followed = String::new();
    read_until(&mut follow, &mut followed, "first\n").await;

    // The job goes on; a reconnect with Last-Event-ID gets exactly what came after.
    std::fs::write(cluster.work_dir("node-a").join(&id).join("attempt-1/go"), "").unwrap();
    let resumed = Events::open(&acme, &id, Some(&seen.last().unwrap().id)).await.rest().await;
    assert_eq!(states(&resumed), ["succeeded"], "{resumed:?}");
    let mut all = seen.clone();
    all.extend(resumed.clone());
    assert_eq!(states(&all), ["queued", "placed", "leased", "running", "succeeded"]);
    let replay = Events::open(&acme, &id, None).await.rest().await;
    assert_eq!(replay, all, "a fresh stream replays the same events");
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            (e.id.clone(), &e.event),
            (e.data["seq"].to_string(), &e.data["state"].as_str().unwrap().to_string())
        );
        assert_eq!(e.data["job_id"], json!(id));
        assert!(i == 0 || all[i - 1].data["seq"].as_u64() < e.data["seq"].as_u64(), "in order: {all:?}");
        assert!(humantime::parse_rfc3339(e.data["at"].as_str().unwrap()).is_ok(), "{e:?}");
    }
    assert_eq!(all[4].data["exit_code"], 0);

    // After the terminal event there is nothing more; the stream ends at once.
    assert!(Events::open(&acme, &id, Some(&all[4].id)).await.rest().await.is_empty());
    let (status, headers, body) =
        send(acme.request(Method::GET, &format!("/v1/jobs/{id}/events")).header("last-event-id", "x")).await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("last-event-id"));

    // The followed log ends with the job; the tail has all of it.
    read_to_end(follow, &mut followed).await;
    assert_eq!(followed, "first\nsecond\n");
    let tail = acme.request(Method::GET, &format!("/v1/jobs/{id}/logs")).send().await.unwrap();
    assert_eq!(tail.text().await.unwrap(), "first\nsecond\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_marks_a_new_attempt_after_a_lost_agent() {
    let mut cluster = Cluster::start(Duration::from_millis(1500), &[("node-a", ""), ("node-b", "")]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let command = "echo attempt $HYBROKER_ATTEMPT; echo $$ > pid; if [ $HYBROKER_ATTEMPT = 1 ]; then exec sleep 60; fi";
    let id = acme.submit_ok(&spec("flaky-node", command)).await;
    let mut follow = acme.request(Method::GET, &format!("/v1/jobs/{id}/logs?follow=true")).send().await.unwrap();
    let mut followed = String::new();
    read_until(&mut follow, &mut followed, "attempt 1\n").await;

    let (_, _, job) = acme.get(&format!("/v1/jobs/{id}")).await;
    let victim = job["agent"].as_str().unwrap().strip_prefix("lab/").unwrap().to_string();
    cluster.kill_agent(&victim);
    read_to_end(follow, &mut followed).await;
    // The orphaned first attempt: its sandbox's process group (its init names the job).
    for pid in crate::common::processes_with(&format!("{id}/attempt-1")) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    assert_eq!(followed, "attempt 1\n--- attempt 2 ---\nattempt 2\n");
    let (_, _, job) = acme.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((job["state"].as_str(), job["attempts"].as_u64()), (Some("succeeded"), Some(2)), "{job}");
    // Each attempt's output stays readable.
    for attempt in [1, 2] {
        let response =
            acme.request(Method::GET, &format!("/v1/jobs/{id}/logs?attempt={attempt}")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), format!("attempt {attempt}\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_in_process_and_stops_with_streams_open() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let config = GatewayConfig::load(&cluster.plain_gateway_config("in-process")).unwrap();
    let listener = tokio::net::TcpListener::bind(config.gateway.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hybroker::gateway::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let acme = Api { url: url.clone(), key: cluster.tenant_key("acme"), http: reqwest::Client::new() };

    // No agent: the job stays queued, its event stream and followed log stay open.
    let id = acme.submit_ok(&spec("stays-queued", "true")).await;
    let mut events = Events::open(&acme, &id, None).await;
    assert_eq!(events.next().await.unwrap().event, "queued");
    let follow = acme.request(Method::GET, &format!("/v1/jobs/{id}/logs?follow=true")).send().await.unwrap();
    assert_eq!(follow.status(), StatusCode::OK);

    // Shutdown ends both streams and returns well before the connection drain timeout (10 s).
    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(8), server).await.expect("the gateway stops promptly");
    stopped.unwrap().unwrap();
    assert_eq!(events.next().await, None);
    let mut rest = String::new();
    read_to_end(follow, &mut rest).await;
    assert!(reqwest::get(format!("{url}/healthz")).await.is_err(), "no longer listening");
}
