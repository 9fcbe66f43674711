//! The routes, their middleware (request log and metrics, body limit, problem responses) and the service
//! endpoints: `/healthz`, `/readyz` and `/openapi.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tracing::Instrument;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::TenantSlot;
use super::openapi::{ApiDoc, NotReady, ServiceErrors};
use super::problem::{self, HttpError};
use super::{AppState, agents, data, jobs, placement, sites, streams};
use crate::proto::job_service_server::SERVICE_NAME as JOB_SERVICE;
use crate::telemetry::{ClientTraces, context};

/// How long `/readyz` waits for the broker's health check.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a `/readyz` answer is reused: `/readyz` needs no key, so a flood of it costs at most
/// one broker health check per this interval.
const READY_REUSE: Duration = Duration::from_secs(1);
/// A body announced larger than the limit is still read (and dropped) up to this many bytes, so
/// the client, still sending, gets the 413 instead of a reset connection.
const DRAIN_LIMIT: u64 = 16 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a whole request body without a `Content-Length`.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The service's routes and its OpenAPI document (which lists exactly these routes).
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (max_body, client_traces) = (state.max_body_bytes(), state.client_traces());
    let (router, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::placement))
        .routes(routes!(placement::plan))
        .routes(routes!(placement::prices))
        .routes(routes!(streams::events))
        .routes(routes!(streams::logs))
        .routes(routes!(data::list_outputs))
        .routes(routes!(data::read_output))
        .routes(routes!(data::list_data))
        .routes(routes!(data::read_data, data::write_data))
        .routes(routes!(data::plan_upload))
        .routes(routes!(data::complete_upload))
        .routes(routes!(agents::list))
        .routes(routes!(agents::get_agent))
        .routes(routes!(agents::drain))
        .routes(routes!(agents::undrain))
        .routes(routes!(sites::list))
        .routes(routes!(sites::get_site))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json))
        .with_state(state)
        .split_for_parts();
    super::openapi::finish(&mut openapi);
    let document = Arc::new(openapi.to_json().expect("the OpenAPI document serialises"));
    let router = router
        .fallback(problem::no_route)
        .method_not_allowed_fallback(problem::wrong_method)
        .layer(Extension(OpenApiJson(document)))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(max_body, refuse_large_bodies))
        .layer(middleware::from_fn(problem::problem_layer))
        .layer(middleware::from_fn_with_state(client_traces, log_requests));
    (router, openapi)
}

/// `/healthz` and a ready `/readyz` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`
    pub status: String,
}

/// Liveness: the gateway process serves requests.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "service", responses((status = 200, description = "Alive", body = Health), ServiceErrors))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Readiness: the broker answers its health check within 2 seconds (checked at most once a second;
/// answers in between reuse the last check).
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "service",
    responses((status = 200, description = "Ready", body = Health), NotReady, ServiceErrors)
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, HttpError> {
    // One check at a time; those waiting for it take its answer.
    let mut last = state.last_ready().lock().await;
    let answer = match &*last {
        Some((at, answer)) if at.elapsed() < READY_REUSE => answer.clone(),
        _ => {
            let answer = check_broker(&state).await;
            *last = Some((Instant::now(), answer.clone()));
            answer
        }
    };
    drop(last);
    answer.map(|()| Json(Health { status: "ok".into() })).map_err(HttpError::Unavailable)
}

/// The broker's health check: `Ok`, or why the gateway is not ready.
async fn check_broker(state: &AppState) -> Result<(), String> {
    let request = HealthCheckRequest { service: JOB_SERVICE.to_string() };
    let checked = tokio::time::timeout(READY_TIMEOUT, state.health().check(request)).await;
    let reason = match checked {
        Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
        Ok(Ok(_)) => "the broker's job service is not serving".to_string(),
        Ok(Err(status)) => crate::tls::explain_status(&status),
        Err(_) => format!("the broker did not answer within {} s", READY_TIMEOUT.as_secs()),
    };
    Err(format!("not ready: {reason}"))
}

/// The served OpenAPI document, serialised once.
#[derive(Clone)]
struct OpenApiJson(Arc<String>);

/// This OpenAPI document (3.1).
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "service",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object), ServiceErrors)
)]
async fn openapi_json(Extension(OpenApiJson(document)): Extension<OpenApiJson>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document.as_str().to_owned())
        .into_response()
}

/// Probes and the document: served, counted and logged, but not traced.
const UNTRACED: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

/// Traces each request (but [`UNTRACED`]) (a server span continuing the caller's `traceparent`, after the OTel
/// HTTP conventions; the answer names the trace in `traceresponse`), counts it and logs it at info:
/// method, route, status, tenant, latency (never the key).
async fn log_requests(State(client_traces): State<ClientTraces>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map_or("(none)", |m| m.as_str()).to_string();
    let span = if UNTRACED.contains(&route.as_str()) {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        "http",
        otel.name = %if route == "(none)" { method.to_string() } else { format!("{method} {route}") },
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = tracing::field::Empty,
        url.path = %request.uri().path(),
        network.protocol.version = protocol_version(request.version()),
        user_agent.original = request.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or(""),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        hybroker.tenant = tracing::field::Empty,
        )
    };
    if route != "(none)" {
        span.record("http.route", route.as_str());
    }
    let client = context::from_headers(request.headers());
    match client_traces {
        ClientTraces::Continue => context::set_parent(&span, client),
        ClientTraces::Link => context::add_link(&span, &client),
    }
    let slot = TenantSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = next.run(request).instrument(span.clone()).await;
    let _entered = span.enter();
    let tenant = slot.0.get().map_or("-", String::as_str);
    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    span.record("hybroker.tenant", tenant);
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", status.as_str());
    }
    if let Some(value) = context::traceresponse(&span).and_then(|v| HeaderValue::try_from(v).ok()) {
        response.headers_mut().insert("traceresponse", value);
    }
    // Unmatched paths share one label value, so scanners cannot grow the series.
    let label = if route == "(none)" { "unmatched" } else { route.as_str() };
    let metrics = crate::metrics::global();
    let method_label = match method.as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    };
    metrics.inc("hybroker_gateway_requests_total", &[label, method_label, status.as_str()], 1.0);
    metrics.observe("hybroker_gateway_request_duration_seconds", &[label], elapsed);
    let latency_ms = elapsed * 1000.0;
    tracing::info!(%method, route, status = status.as_u16(), tenant, latency_ms, "request");
    response
}

/// `network.protocol.version` of the OTel HTTP conventions.
fn protocol_version(version: axum::http::Version) -> &'static str {
    match version {
        axum::http::Version::HTTP_10 => "1.0",
        axum::http::Version::HTTP_11 => "1.1",
        axum::http::Version::HTTP_2 => "2",
        axum::http::Version::HTTP_3 => "3",
        _ => "",
    }
}

/// Answers 413 to a body larger than the limit, after reading and dropping it (up to
/// [`DRAIN_LIMIT`], so the client gets the answer instead of a reset connection). A body without a
/// `Content-Length` (chunked) is read here, up to the limit, and handed on whole.
async fn refuse_large_bodies(State(max): State<usize>, request: Request, next: Next) -> Response {
    // Streamed uploads have their own limit (the handler's), and are never read whole here.
    if request.extensions().get::<MatchedPath>().is_some_and(|p| p.as_str() == data::UPLOAD_ROUTE) {
        return next.run(request).await;
    }
    let announced =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(length) if length > max as u64 => {
            if length <= DRAIN_LIMIT {
                drain(request.into_body().into_data_stream()).await;
            }
            HttpError::PayloadTooLarge(max).into_response()
        }
        Some(_) => next.run(request).await,
        None => {
            let (parts, body) = request.into_parts();
            let mut stream = body.into_data_stream();
            let mut whole = Vec::new();
            // Read before authentication, so bounded in time too: a slow sender holds no memory long.
            let read = tokio::time::timeout(BODY_TIMEOUT, async {
                while let Some(chunk) = stream.next().await {
                    let Ok(chunk) = chunk else {
                        return Err(HttpError::BadRequest("body: the request body broke off".into()));
                    };
                    whole.extend_from_slice(&chunk);
                    if whole.len() > max {
                        return Err(HttpError::PayloadTooLarge(max));
                    }
                }
                Ok(())
            })
            .await;
            match read {
                Ok(Ok(())) => next.run(Request::from_parts(parts, axum::body::Body::from(whole))).await,
                Ok(Err(e @ HttpError::PayloadTooLarge(_))) => {
                    drain(stream).await;
                    e.into_response()
                }
                Ok(Err(e)) => e.into_response(),
                Err(_) => HttpError::BadRequest(format!("body: not received within {BODY_TIMEOUT:?}")).into_response(),
            }
        }
    }
}

/// Reads and drops what is left of a body, up to [`DRAIN_LIMIT`] bytes and [`DRAIN_TIMEOUT`].
async fn drain(mut body: axum::body::BodyDataStream) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut dropped = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            dropped += chunk.len() as u64;
            if dropped > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
