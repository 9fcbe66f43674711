//! The router in process, without a broker: service routes, problems for unknown routes, wrong
//! methods, missing keys, large bodies and an unreachable broker, and a document that lists
//! every route.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use super::*;
use crate::gateway::{PROBLEM_BASE, PROBLEM_JSON};

/// Every route the gateway serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/openapi.json"),
    ("get", "/readyz"),
    ("get", "/v1/agents"),
    ("get", "/v1/agents/{site}/{node}"),
    ("post", "/v1/agents/{site}/{node}/drain"),
    ("post", "/v1/agents/{site}/{node}/undrain"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("get", "/v1/jobs/{id}/events"),
    ("get", "/v1/jobs/{id}/logs"),
    ("get", "/v1/jobs/{id}/placement"),
    ("post", "/v1/plan"),
    ("get", "/v1/prices"),
    ("get", "/v1/sites"),
    ("get", "/v1/sites/{site}"),
];

fn app() -> (Router, utoipa::openapi::OpenApi) {
    // Nothing listens on port 1: every broker call fails as unavailable.
    let broker = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let (_tx, stopping) = tokio::sync::watch::channel(false);
    router(AppState::new(
        crate::telemetry::grpc::traced(broker, "https://127.0.0.1:1"),
        1024,
        Default::default(),
        stopping,
    ))
}

async fn call(app: &Router, request: axum::http::request::Builder, body: Body) -> (StatusCode, HeaderMap, Value) {
    let response = app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn get(uri: &str) -> axum::http::request::Builder {
    Request::builder().uri(uri)
}

/// Asserts a problem response of `status` and `slug`; returns its detail.
fn problem(status: StatusCode, headers: &HeaderMap, body: &Value, want: StatusCode, slug: &str) -> String {
    assert_eq!(status, want, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
    assert_eq!(body["type"], format!("{PROBLEM_BASE}{slug}"), "{body}");
    assert_eq!(body["status"], want.as_u16());
    assert!(body["title"].is_string() && body["instance"].is_string(), "{body}");
    body["detail"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn service_routes_and_problems_for_everything_else() {
    let (app, _) = app();
    let (status, _, body) = call(&app, get("/healthz"), Body::empty()).await;
    assert_eq!((status, body), (StatusCode::OK, serde_json::json!({"status": "ok"})));

    let (status, headers, body) = call(&app, get("/v2/nothing"), Body::empty()).await;
    let detail = problem(status, &headers, &body, StatusCode::NOT_FOUND, "not-found");
    assert_eq!(detail, "no route for GET /v2/nothing");
    assert_eq!(body["instance"], "/v2/nothing");

    let (status, headers, body) = call(&app, get("/v1/jobs").method(Method::DELETE), Body::empty()).await;
    let detail = problem(status, &headers, &body, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed");
    assert!(detail.contains("DELETE"), "{detail}");

    let (status, headers, body) = call(&app, get("/v1/jobs"), Body::empty()).await;
    let detail = problem(status, &headers, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(detail.contains("Bearer"), "{detail}");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");

    // The broker is down: keys cannot be checked.
    let (status, headers, body) =
        call(&app, get("/v1/jobs").header(header::AUTHORIZATION, "Bearer k"), Body::empty()).await;
    problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let (status, headers, body) = call(&app, get("/readyz"), Body::empty()).await;
    let detail = problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(detail.starts_with("not ready: "), "{detail}");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_problems() {
    let (app, _) = app();
    let post = || get("/v1/jobs").method(Method::POST).header(header::CONTENT_LENGTH, 4096);
    let (status, headers, body) = call(&app, post(), Body::from(vec![b' '; 4096])).await;
    let detail = problem(status, &headers, &body, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large");
    assert_eq!(detail, "request body is larger than the limit of 1024 bytes");
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_lists_every_route() {
    let (app, doc) = app();
    let (status, _, served) = call(&app, get("/openapi.json"), Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, serde_json::to_value(&doc).unwrap());
    assert_eq!(served["openapi"], "3.1.0");
    let mut listed = BTreeSet::new();
    let mut operation_ids = BTreeSet::new();
    for (path, item) in served["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            listed.insert((method.clone(), path.clone()));
            assert!(operation_ids.insert(op["operationId"].as_str().unwrap().to_string()), "{path}: duplicate id");
            let secured = op.get("security").is_some();
            assert_eq!(secured, path.starts_with("/v1/"), "{method} {path}");
            if secured {
                for code in ["401", "429", "503"] {
                    let content = &op["responses"][code]["content"][PROBLEM_JSON];
                    assert!(content.is_object(), "{method} {path} lacks a {code} problem");
                }
            }
        }
    }
    let expected: BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(listed, expected);
    for schema in ["Job", "JobList", "Submitted", "JobEvent", "CancelRequest", "Agent", "AgentList", "Gpu", "Problem"] {
        assert!(served["components"]["schemas"][schema].is_object(), "{schema} missing");
    }
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    // Every listed route is served: none answers "no route" or "wrong method".
    for (method, path) in ROUTES {
        let uri = path.replace("{id}", "j1").replace("{site}", "lab").replace("{node}", "n1");
        let request = get(&uri).method(method.to_uppercase().as_str());
        let (status, _, body) = call(&app, request, Body::empty()).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {body}");
        assert!(!body["detail"].as_str().unwrap_or("").starts_with("no route"), "{method} {path}: {body}");
    }
}

#[tokio::test]
async fn a_flood_of_readyz_costs_at_most_one_broker_check_a_second() {
    // A "broker" that accepts connections and never answers: each check takes its full 2 s timeout.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", black_hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            sockets.push(socket);
        }
    });
    let broker = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect_lazy();
    let (_tx, stopping) = tokio::sync::watch::channel(false);
    let (app, _) =
        router(AppState::new(crate::telemetry::grpc::traced(broker, &url), 1024, Default::default(), stopping));
    let started = std::time::Instant::now();
    let (status, headers, body) = call(&app, get("/readyz"), Body::empty()).await;
    let first = problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(first.contains("did not answer within 2 s"), "{first}");
    assert!(started.elapsed() >= READY_TIMEOUT, "{:?}", started.elapsed());
    // Asked again at once, many times: the last answer, without another 2 s check.
    let again = std::time::Instant::now();
    for _ in 0..20 {
        let (status, headers, body) = call(&app, get("/readyz"), Body::empty()).await;
        assert_eq!(problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE, "unavailable"), first);
    }
    assert!(again.elapsed() < READY_REUSE, "{:?}", again.elapsed());
    held.abort();
}
