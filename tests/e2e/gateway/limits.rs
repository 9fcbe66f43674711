//! The gateway's limits in front of the broker, from real sockets: requests without an accepted
//! key per client address (several loopback addresses stand for several clients; a trusted proxy's
//! `X-Forwarded-For`), and open event streams and followed logs per tenant.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use reqwest::{Method, StatusCode};

use super::{Api, problem, send, spec};
use crate::common::*;

const BAD_KEY: &str = "hbk_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000";

/// A client whose connections come from `source` (any 127.0.0.0/8 address is this host's).
fn client_from(source: &str) -> reqwest::Client {
    let source: IpAddr = source.parse().unwrap();
    reqwest::Client::builder().local_address(source).connect_timeout(Duration::from_secs(5)).build().unwrap()
}

/// `GET /v1/jobs` from `client` with `key` (and an `X-Forwarded-For`, if given).
async fn list(gateway: &Gateway, client: &reqwest::Client, key: &str, forwarded: Option<&str>) -> (StatusCode, String) {
    let mut request = client.request(Method::GET, format!("{}/v1/jobs", gateway.url)).bearer_auth(key);
    if let Some(hops) = forwarded {
        request = request.header("x-forwarded-for", hops);
    }
    let (status, headers, body) = send(request).await;
    if status == StatusCode::TOO_MANY_REQUESTS {
        let detail = problem(status, &headers, &body, status);
        let retry: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1, "{retry}");
        return (status, detail);
    }
    (status, body.to_string())
}

/// Refilled at 1 per 100 s: nothing refills while a test runs.
const SLOW: &str = "unauthenticated_per_second = 0.01\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_keys_gets_429_per_address_without_reaching_the_broker() {
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway_keyed("limited", false, &format!("{SLOW}unauthenticated_burst = 5"), "");
    let key = cluster.tenant_key("acme");
    let (attacker, neighbour) = (client_from("127.0.0.2"), client_from("127.0.0.3"));

    for i in 0..5 {
        assert_eq!(list(&gateway, &attacker, BAD_KEY, None).await.0, StatusCode::UNAUTHORIZED, "bad key {i}");
    }
    let (status, detail) = list(&gateway, &attacker, BAD_KEY, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{detail}");
    assert!(detail.contains("too many unauthenticated requests from 127.0.0.2"), "{detail}");
    // While the address is over its limit, even a good key from it waits (it is not checked).
    assert_eq!(list(&gateway, &attacker, &key, None).await.0, StatusCode::TOO_MANY_REQUESTS);
    // Another address is served, and its accepted keys never spend its allowance.
    for _ in 0..8 {
        assert_eq!(list(&gateway, &neighbour, &key, None).await.0, StatusCode::OK);
    }
    assert_eq!(list(&gateway, &neighbour, BAD_KEY, None).await.0, StatusCode::UNAUTHORIZED);

    // The refusals never asked the broker: with the broker gone, the flooding address still gets
    // 429, while a fresh address's bad key is passed on (and finds no broker: 503).
    cluster.kill_broker();
    assert_eq!(list(&gateway, &attacker, BAD_KEY, None).await.0, StatusCode::TOO_MANY_REQUESTS);
    let (status, body) = list(&gateway, &client_from("127.0.0.4"), BAD_KEY, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_client_address_is_believed_only_from_a_trusted_proxy() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let keys = format!(
        "{SLOW}unauthenticated_burst = 2\ntrusted_proxy_header = \"x-forwarded-for\"\ntrusted_proxies = [\"127.0.0.2\"]"
    );
    let gateway = cluster.start_gateway_keyed("proxied", false, &keys, "");
    let (proxy, direct) = (client_from("127.0.0.2"), client_from("127.0.0.3"));

    // Through the proxy: the client is the hop the proxy added.
    for _ in 0..2 {
        assert_eq!(list(&gateway, &proxy, BAD_KEY, Some("203.0.113.7")).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, detail) = list(&gateway, &proxy, BAD_KEY, Some("203.0.113.7")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{detail}");
    assert!(detail.contains("from 203.0.113.7"), "{detail}");
    // A client writing its own hops in front does not escape: the right-most untrusted hop counts.
    let (status, detail) = list(&gateway, &proxy, BAD_KEY, Some("198.51.100.1, 203.0.113.7")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{detail}");
    // Other clients behind the same proxy, and the proxy's own requests, have their own allowance.
    assert_eq!(list(&gateway, &proxy, BAD_KEY, Some("203.0.113.8")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(list(&gateway, &proxy, BAD_KEY, None).await.0, StatusCode::UNAUTHORIZED);

    // From a peer that is not a trusted proxy, the header is ignored: a new "address" per request
    // does not help, the peer's own address runs out.
    for i in 0..2 {
        let hop = format!("192.0.2.{i}");
        assert_eq!(list(&gateway, &direct, BAD_KEY, Some(&hop)).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, detail) = list(&gateway, &direct, BAD_KEY, Some("192.0.2.99")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{detail}");
    assert!(detail.contains("from 127.0.0.3"), "{detail}");
}

/// Opens a job's event stream; returns the status and, when it opened, the response.
async fn open_events(api: &Api, job: &str) -> (StatusCode, Option<reqwest::Response>, String) {
    let response = api.request(Method::GET, &format!("/v1/jobs/{job}/events")).send().await.unwrap();
    let status = response.status();
    if status == StatusCode::OK {
        return (status, Some(response), String::new());
    }
    let (headers, body) = (response.headers().clone(), response.bytes().await.unwrap());
    let body = serde_json::from_slice(&body).unwrap_or_default();
    (status, None, problem(status, &headers, &body, status))
}

/// Opens a followed log of a job.
async fn follow_logs(api: &Api, job: &str) -> (StatusCode, Option<reqwest::Response>) {
    let response = api.request(Method::GET, &format!("/v1/jobs/{job}/logs?follow=true")).send().await.unwrap();
    let status = response.status();
    (status, (status == StatusCode::OK).then_some(response))
}

/// Waits until one more stream of `api`'s tenant opens (a slot was freed); returns it.
async fn next_stream(api: &Api, job: &str) -> reqwest::Response {
    eventually("a stream slot to be freed", || async {
        let (_, response, _) = open_events(api, job).await;
        response
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_open_streams_are_capped_and_a_slot_frees_when_a_stream_ends_or_its_client_goes() {
    // No agent: jobs stay queued and their streams stay open.
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway_keyed("streams", false, "max_streams_per_tenant = 2", "");
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let globex = acme.as_key(&cluster.tenant_key("globex"));
    let (first, second) =
        (acme.submit_ok(&spec("waits-1", "true")).await, acme.submit_ok(&spec("waits-2", "true")).await);

    let (status, events, _) = open_events(&acme, &first).await;
    assert_eq!(status, StatusCode::OK);
    let mut events = events.unwrap();
    let (status, followed) = follow_logs(&acme, &second).await;
    assert_eq!(status, StatusCode::OK);
    // The third stream of the tenant, of either kind, is refused with a clear problem.
    let (status, _, detail) = open_events(&acme, &second).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(detail.contains("tenant acme has 2 event streams and followed logs open"), "{detail}");
    assert_eq!(follow_logs(&acme, &first).await.0, StatusCode::TOO_MANY_REQUESTS);
    // A plain log tail is no stream; another tenant's streams are its own.
    let (status, _, _) = send(acme.request(Method::GET, &format!("/v1/jobs/{first}/logs"))).await;
    assert_eq!(status, StatusCode::OK);
    let theirs = globex.submit_ok(&spec("theirs", "true")).await;
    let (status, _, detail) = open_events(&globex, &theirs).await;
    assert_eq!(status, StatusCode::OK, "{detail}");

    // The client of the followed log goes: its slot is freed.
    drop(followed);
    let replacement = next_stream(&acme, &second).await;
    assert_eq!(open_events(&acme, &second).await.0, StatusCode::TOO_MANY_REQUESTS);

    // A stream that ends (the job is cancelled: its terminal event ends it) frees its slot too.
    let (status, _, body) = acme.post(&format!("/v1/jobs/{first}/cancel"), &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, events.chunk()).await.expect("the stream ends").unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: cancelled"), "{text}");
    let _another = next_stream(&acme, &second).await;
    // The client of an event stream goes: its slot is freed as well.
    drop(replacement);
    let _last = next_stream(&acme, &second).await;
    assert_eq!(open_events(&acme, &second).await.0, StatusCode::TOO_MANY_REQUESTS);
}
