//! The tenants' HTTP gateway as a real process in front of a real broker (and agent): idempotent
//! submits, tenant isolation on every route, limits, keys, the OpenAPI document, Server-Sent
//! Events and log following, readiness and public TLS.

mod limits;
mod streams;
pub mod text;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

const PROBLEM_JSON: &str = "application/problem+json";

/// Every route the gateway serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/openapi.json"),
    ("get", "/readyz"),
    ("get", "/v1/agents"),
    ("get", "/v1/agents/{site}/{node}"),
    ("post", "/v1/agents/{site}/{node}/drain"),
    ("post", "/v1/agents/{site}/{node}/undrain"),
    ("get", "/v1/data/object"),
    ("put", "/v1/data/object"),
    ("get", "/v1/data/objects"),
    ("post", "/v1/data/uploads"),
    ("post", "/v1/data/uploads/complete"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("get", "/v1/jobs/{id}/events"),
    ("get", "/v1/jobs/{id}/logs"),
    ("get", "/v1/jobs/{id}/outputs"),
    ("get", "/v1/jobs/{id}/outputs/{output}"),
    ("get", "/v1/jobs/{id}/placement"),
    ("post", "/v1/plan"),
    ("get", "/v1/prices"),
    ("get", "/v1/sites"),
    ("get", "/v1/sites/{site}"),
];

/// A tenant's view of a gateway.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(gateway: &Gateway, key: &str) -> Api {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap();
        Api { url: gateway.url.clone(), key: key.to_string(), http }
    }

    pub fn as_key(&self, key: &str) -> Api {
        Api { key: key.to_string(), ..self.clone() }
    }

    /// A request with the tenant's key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Value) {
        send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
        send(self.request(Method::POST, path).json(body)).await
    }

    /// Submits a job spec, with an idempotency key if given.
    pub async fn submit(&self, spec: &Value, idempotency_key: Option<&str>) -> (StatusCode, HeaderMap, Value) {
        let mut request = self.request(Method::POST, "/v1/jobs").json(spec);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        send(request).await
    }

    /// Submits a job spec that must be accepted; returns its id.
    pub async fn submit_ok(&self, spec: &Value) -> String {
        let (status, _, body) = self.submit(spec, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// The ids of the tenant's jobs with the given query.
    pub async fn job_ids(&self, query: &str) -> Vec<String> {
        let (status, _, body) = self.get(&format!("/v1/jobs{query}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
    }
}

/// Sends a request; returns the status, headers and the body as JSON (`Null` when it is not).
pub async fn send(request: RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let response = request.timeout(DEADLINE).send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.bytes().await.unwrap();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Asserts an RFC 9457 problem with `want` status; returns its detail.
pub fn problem(status: StatusCode, headers: &HeaderMap, body: &Value, want: StatusCode) -> String {
    assert_eq!(status, want, "{body}");
    assert_eq!(headers["content-type"], PROBLEM_JSON, "{body}");
    assert!(body["type"].as_str().unwrap().starts_with("https://hybroker.dev/problems/"), "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    assert!(body["title"].is_string(), "{body}");
    body["detail"].as_str().unwrap().to_string()
}

pub fn spec(name: &str, command: &str) -> Value {
    json!({"name": name, "command": ["sh", "-c", command]})
}

/// Waits until the gateway can reach the broker.
pub async fn wait_ready(gateway: &Gateway) {
    let url = format!("{}/readyz", gateway.url);
    eventually("the gateway to be ready", || {
        let url = url.clone();
        async move { reqwest::get(url).await.ok().filter(|r| r.status() == StatusCode::OK) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_are_idempotent_per_tenant_key_and_body() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let globex = acme.as_key(&cluster.tenant_key("globex"));
    let job = spec("idem", "true");

    // Same key, same body: the same job and the same answer.
    let (status, headers, first) = acme.submit(&job, Some("order-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first, json!({"id": id, "url": format!("/v1/jobs/{id}")}));
    assert_eq!(headers[LOCATION], format!("/v1/jobs/{id}"));
    let (status, headers, again) = acme.submit(&job, Some("order-1")).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &first));
    assert_eq!(headers[LOCATION], format!("/v1/jobs/{id}"));

    // Same key, different body: refused, nothing made.
    let (status, headers, body) = acme.submit(&spec("idem", "false"), Some("order-1")).await;
    let detail = problem(status, &headers, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("order-1") && detail.contains("different"), "{detail}");
    assert_eq!(acme.job_ids("").await, std::slice::from_ref(&id));

    // Keys are per tenant: another tenant's same key and body is its own job.
    let (status, _, theirs) = globex.submit(&job, Some("order-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);

    // A bad key is refused before anything reaches the broker.
    for bad in ["has space", &"k".repeat(129)] {
        let (status, headers, body) = acme.submit(&job, Some(bad)).await;
        assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("idempotency-key"));
    }

    // 50 concurrent submits with one key: one job. Requests over acme's rate (burst 40) are
    // refused with 429 before reaching the broker and retried after Retry-After, as a client does.
    let concurrent = json!({"name": "concurrent", "command": ["true"], "labels": {"batch": "concurrent"}});
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (acme, concurrent) = (acme.clone(), concurrent.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let (status, headers, body) = acme.submit(&concurrent, Some("burst-key")).await;
                match status {
                    StatusCode::CREATED => return Some(body["id"].as_str().unwrap().to_string()),
                    StatusCode::CONFLICT => return None,
                    StatusCode::TOO_MANY_REQUESTS => {
                        let wait: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
                        assert!(wait >= 1, "{body}");
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }));
    }
    let mut ids = BTreeSet::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let listed = acme.job_ids("?label=batch=concurrent").await;
    assert_eq!(listed, ids.into_iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_jobs_and_only_admins_see_agents() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "1xL4-24GB")]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let globex = acme.as_key(&cluster.tenant_key("globex"));
    let ops = acme.as_key(&cluster.tenant_key("ops"));
    let mut waiting = spec("waits", "sleep 30");
    waiting["labels"] = json!({"team": "vision"});
    let a = acme.submit_ok(&waiting).await;
    let g = globex.submit_ok(&spec("theirs", "true")).await;

    // The owner sees its job, without internal fields.
    let (status, _, job) = acme.get(&format!("/v1/jobs/{a}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let fields: BTreeSet<_> = job.as_object().unwrap().keys().map(String::as_str).collect();
    let expected = "agent attempts created_at exit_code id input_bytes input_objects labels max_attempts name outputs reason site \
         spec state tenant trace_id updated_at";
    assert_eq!(fields, expected.split(' ').collect());
    assert_eq!((job["tenant"].as_str(), job["labels"]["team"].as_str()), (Some("acme"), Some("vision")));
    assert!(humantime::parse_rfc3339(job["created_at"].as_str().unwrap()).is_ok(), "{job}");

    // Every route with the other tenant's id is "not found", like an unknown id.
    for (who, id) in [(&globex, &a), (&acme, &g), (&acme, &"no-such-job".to_string())] {
        for (method, path) in [
            (Method::GET, format!("/v1/jobs/{id}")),
            (Method::POST, format!("/v1/jobs/{id}/cancel")),
            (Method::GET, format!("/v1/jobs/{id}/events")),
            (Method::GET, format!("/v1/jobs/{id}/logs")),
            (Method::GET, format!("/v1/jobs/{id}/logs?follow=true")),
        ] {
            let (status, headers, body) = send(who.request(method.clone(), &path)).await;
            let detail = problem(status, &headers, &body, StatusCode::NOT_FOUND);
            assert!(detail.contains(id.as_str()) && !detail.starts_with("no route"), "{method} {path}: {detail}");
        }
    }

    // Lists never mix, whatever the filters.
    assert_eq!(acme.job_ids("").await, std::slice::from_ref(&a));
    assert_eq!(globex.job_ids("").await, std::slice::from_ref(&g));
    let unfinished = "?label=team=vision&state=queued&state=placed&state=leased&state=running";
    assert_eq!(acme.job_ids(unfinished).await, std::slice::from_ref(&a));
    assert!(globex.job_ids("?label=team=vision").await.is_empty());
    let (status, headers, body) = acme.get("/v1/jobs?state=sleeping").await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).starts_with("state:"));

    // Agents are for admin tenants.
    for path in ["/v1/agents", "/v1/agents/lab/node-a"] {
        let (status, headers, body) = acme.get(path).await;
        problem(status, &headers, &body, StatusCode::FORBIDDEN);
    }
    let (status, headers, body) = send(acme.request(Method::POST, "/v1/agents/lab/node-a/drain")).await;
    problem(status, &headers, &body, StatusCode::FORBIDDEN);
    let agents = eventually("node-a to register", || async {
        let (_, _, body) = ops.get("/v1/agents").await;
        body["agents"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!(agents[0]["id"], "lab/node-a");
    assert_eq!(agents[0]["gpus"][0]["model"], "L4-24GB");
    let (status, headers, body) = ops.get("/v1/agents/lab/nowhere").await;
    problem(status, &headers, &body, StatusCode::NOT_FOUND);
    let (status, _, drained) = send(ops.request(Method::POST, "/v1/agents/lab/node-a/drain")).await;
    assert_eq!((status, &drained["draining"]), (StatusCode::OK, &json!(true)), "{drained}");
    let (_, _, agent) = ops.get("/v1/agents/lab/node-a").await;
    assert_eq!(agent["draining"], true, "{agent}");
    let (status, headers, body) = send(acme.request(Method::POST, "/v1/agents/lab/node-a/undrain")).await;
    problem(status, &headers, &body, StatusCode::FORBIDDEN);
    let (status, _, undrained) = send(ops.request(Method::POST, "/v1/agents/lab/node-a/undrain")).await;
    assert_eq!((status, &undrained["draining"]), (StatusCode::OK, &json!(false)), "{undrained}");
    let (_, _, agent) = ops.get("/v1/agents/lab/node-a").await;
    assert_eq!(agent["draining"], false, "{agent}");
    // The audit trail names the admin tenant the gateway acted for.
    let (ok, events, err) = cluster.admin_command(&["events"]);
    assert!(ok && events.contains("agent.undrain") && events.contains("(tenant ops)"), "{events}{err}");
    send(ops.request(Method::POST, "/v1/agents/lab/node-a/drain")).await;

    // The owner cancels; a second cancel is a conflict.
    let (status, _, job) = acme.post(&format!("/v1/jobs/{a}/cancel"), &json!({"reason": "changed my mind"})).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{job}");
    let (status, headers, body) = send(acme.request(Method::POST, &format!("/v1/jobs/{a}/cancel"))).await;
    problem(status, &headers, &body, StatusCode::CONFLICT);
    let (status, headers, body) = acme.post(&format!("/v1/jobs/{a}/cancel"), &json!({"why": "x"})).await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("why"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_fields_rates_and_queued_jobs_are_limited() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let globex = acme.as_key(&cluster.tenant_key("globex"));

    // A 2 MiB body: 413, as a problem.
    let big = send(
        acme.request(Method::POST, "/v1/jobs").header("content-type", "application/json").body(vec![b' '; 2 << 20]),
    );
    let (status, headers, body) = big.await;
    assert!(problem(status, &headers, &body, StatusCode::PAYLOAD_TOO_LARGE).contains("1048576"));
    // The same without a Content-Length (chunked): cut off at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..32).map(|_| Ok(vec![b' '; 64 << 10])).collect();
    let chunked = reqwest::Body::wrap_stream(tokio_stream::iter(chunks));
    let (status, headers, body) = send(acme.request(Method::POST, "/v1/jobs").body(chunked)).await;
    assert!(problem(status, &headers, &body, StatusCode::PAYLOAD_TOO_LARGE).contains("1048576"));
    // Unknown fields are refused, naming the field; so are bad values.
    let (status, headers, body) = acme.submit(&json!({"name": "x", "command": ["true"], "colour": "red"}), None).await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("colour"));
    let (status, headers, body) = acme.submit(&json!({"name": "x", "command": ["true"], "priority": 101}), None).await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("priority"));
    let (status, headers, body) = acme.get("/v1/jobs?colour=red").await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("colour"));
    assert!(acme.job_ids("").await.is_empty(), "nothing stored");

    // globex may have 5 unfinished jobs (no agent runs them).
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(globex.submit_ok(&spec(&format!("q{i}"), "true")).await);
    }
    let (status, headers, body) = globex.submit(&spec("q5", "true"), Some("sixth")).await;
    let detail = problem(status, &headers, &body, StatusCode::TOO_MANY_REQUESTS);
    assert!(detail.contains("max_queued_jobs 5"), "{detail}");
    assert!(headers.contains_key(RETRY_AFTER));
    assert_eq!(globex.job_ids("").await.len(), 5, "nothing half-created");
    // The refused key was not used up: after a cancel the same submit goes through.
    let (status, _, body) = globex.post(&format!("/v1/jobs/{}/cancel", ids[0]), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = globex.submit(&spec("q5", "true"), Some("sixth")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // globex's rate: 5/s, burst 10. A quick burst of 20 gets 429s with Retry-After.
    let burst: Vec<_> = (0..20).map(|_| tokio::spawn(send(globex.request(Method::GET, "/v1/jobs")))).collect();
    let mut limited = 0;
    for answer in burst {
        let (status, headers, body) = answer.await.unwrap();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let detail = problem(status, &headers, &body, StatusCode::TOO_MANY_REQUESTS);
            assert!(detail.contains("rate limit"), "{detail}");
            let retry_after: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
            assert!(retry_after >= 1, "{retry_after}");
            limited += 1;
        } else {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    assert!(limited >= 5, "only {limited} of 20 were limited");
    // Other tenants have their own bucket.
    assert_eq!(acme.get("/v1/jobs").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_on_every_request_and_revoked_keys_fail_at_once() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let (key, key_id) = cluster.tenant_key_with_id("acme");
    let acme = Api::new(&gateway, &key);
    assert_eq!(acme.get("/v1/jobs").await.0, StatusCode::OK);

    let (ok, stdout, stderr) = cluster.tenants_command(&["revoke", &key_id]);
    assert!(ok, "{stdout}{stderr}");
    let (status, headers, body) = acme.get("/v1/jobs").await;
    problem(status, &headers, &body, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[WWW_AUTHENTICATE], "Bearer");
    for bad in [acme.as_key("hbk_not-a-key"), acme.as_key("")] {
        let (status, headers, body) = bad.get("/v1/jobs").await;
        problem(status, &headers, &body, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, body) = send(acme.http.get(format!("{}/v1/jobs", gateway.url))).await;
    assert!(problem(status, &headers, &body, StatusCode::UNAUTHORIZED).contains("Bearer"));
    assert!(!gateway.log().contains(&key), "the gateway never logs keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_3_1_and_lists_every_served_route() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    let text = reqwest::get(format!("{}/openapi.json", gateway.url)).await.unwrap().text().await.unwrap();
    let doc = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    assert!(doc.openapi.starts_with("3.1."), "{}", doc.openapi);

    let mut listed = BTreeSet::new();
    for (path, method, op) in doc.operations() {
        listed.insert((method.as_str().to_lowercase(), path.clone()));
        op.parameters(&doc).expect("parameters resolve");
        op.request_body(&doc).expect("request body resolves");
        for (code, response) in op.responses(&doc) {
            for media in response.content.values() {
                if let Some(schema) = &media.schema {
                    schema.resolve(&doc).unwrap_or_else(|e| panic!("{method} {path} {code}: {e}"));
                }
            }
            if code.starts_with('4') || code.starts_with('5') {
                assert!(response.content.contains_key(PROBLEM_JSON), "{method} {path} {code} is not a problem");
            }
        }
    }
    let expected: BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(listed, expected);

    // Each documented operation is served: none answers "no route" or 405.
    for (method, path) in ROUTES {
        let uri = path.replace("{id}", "j1").replace("{site}", "lab").replace("{node}", "n1").replace("{output}", "0");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, _, body) = send(acme.request(method.clone(), &uri)).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}: {body}");
        assert!(!body["detail"].as_str().unwrap_or("").starts_with("no route"), "{method} {uri}: {body}");
    }
    let (status, headers, body) = acme.get("/v1/nothing").await;
    assert!(problem(status, &headers, &body, StatusCode::NOT_FOUND).starts_with("no route"));
    let (status, headers, body) = send(acme.request(Method::DELETE, "/v1/jobs")).await;
    problem(status, &headers, &body, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_while_the_broker_answers_and_public_tls_speaks_h2_and_http1() {
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway_named("tls-gateway", true);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(cluster.path("pki/ca.pem")).unwrap()).unwrap();
    for http1 in [false, true] {
        let mut builder = reqwest::Client::builder().tls_certs_only([ca.clone()]);
        if http1 {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let response = client.get(format!("{}/healthz", gateway.url)).send().await.unwrap();
        let version = if http1 { reqwest::Version::HTTP_11 } else { reqwest::Version::HTTP_2 };
        assert_eq!((response.status(), response.version()), (StatusCode::OK, version));
    }
    drop(gateway);

    let gateway = cluster.start_gateway();
    let acme = Api::new(&gateway, &cluster.tenant_key("acme"));
    wait_ready(&gateway).await;
    cluster.kill_broker();
    // A readiness answer is reused for up to a second (a flood of /readyz costs at most one broker
    // check a second), so "not ready" comes within about a second.
    let url = format!("{}/readyz", gateway.url);
    let gone = std::time::Instant::now();
    let (status, headers, body) = eventually("readyz to say not ready", || async {
        Some(send(acme.http.get(&url)).await).filter(|(status, _, _)| *status != StatusCode::OK)
    })
    .await;
    assert!(gone.elapsed() < Duration::from_secs(10), "{:?}", gone.elapsed());
    assert!(problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE).starts_with("not ready"));
    let (status, _, body) = send(acme.http.get(format!("{}/healthz", gateway.url))).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, headers, body) = acme.get("/v1/jobs").await;
    problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE);

    // The broker comes back on its port; the gateway reconnects by itself.
    let port = cluster.addr.port();
    cluster.start_broker(port);
    wait_ready(&gateway).await;
    assert_eq!(acme.get("/v1/jobs").await.0, StatusCode::OK);
}
