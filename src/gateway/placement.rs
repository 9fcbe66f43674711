//! Placement without submitting (`POST /v1/plan`) and the current prices (`GET /v1/prices`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;

use super::AppState;
use super::api::{Decision, JobSpec, Prices};
use super::auth::Tenant;
use super::jobs::{read_body, spec_format};
use super::openapi::{BadRequest, Conflict, Forbidden, TenantErrors, UnsupportedMediaType};
use super::problem::HttpError;
use crate::model::site::Site;
use crate::proto;

/// Where a job would run and why, without submitting it: the same checks as a submit (spec,
/// data, policy, budget) and the decision placement would take now, in the JSON of
/// `GET /v1/jobs/{id}/placement`. 409 when the broker has no sites (placement is off).
#[utoipa::path(
    post,
    path = "/v1/plan",
    operation_id = "plan_job",
    tag = "placement",
    request_body(
        content((JobSpec = "application/json"), (JobSpec = "application/yaml")),
        description = "A job spec (JSON, or a YAML job file)"
    ),
    responses(
        (status = 200, description = "The placement decision", body = Decision),
        BadRequest, Forbidden, Conflict, UnsupportedMediaType, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn plan(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let body = read_body(body, &state)?;
    let format = spec_format(&headers)?;
    let request = proto::SubmitRequest {
        spec: body.to_vec(),
        format: format.into(),
        idempotency_key: String::new(),
        tenant: tenant.name,
    };
    let planned = state.jobs().plan(request).await?.into_inner();
    let decision = serde_json::from_str(&planned.decision_json)
        .map_err(|e| HttpError::Broker(tonic::Status::internal(format!("placement decision: {e}"))))?;
    Ok(Json(decision))
}

/// The broker's current prices: `snapshot` (every compute, egress and storage price with its
/// source and fetch time), whether it is `stale`, the broker's clock `now_ms`, and the configured
/// `sites` (to read prices per site and instance type).
#[utoipa::path(
    get,
    path = "/v1/prices",
    operation_id = "get_prices",
    tag = "placement",
    responses((status = 200, description = "The current price snapshot", body = Prices), TenantErrors),
    security(("bearer" = []))
)]
pub async fn prices(State(state): State<AppState>, _tenant: Tenant) -> Result<Json<Prices>, HttpError> {
    let prices = state.jobs().prices(proto::PricesRequest {}).await?.into_inner();
    let internal =
        |what: &str, e: serde_json::Error| HttpError::Broker(tonic::Status::internal(format!("{what}: {e}")));
    let snapshot = serde_json::from_str(&prices.snapshot_json).map_err(|e| internal("price snapshot", e))?;
    let mut sites: Vec<Site> = serde_json::from_str(&prices.sites_json).map_err(|e| internal("sites", e))?;
    // A capacity provider's launch settings (accounts, subnets, images) are the operator's.
    sites.iter_mut().for_each(|site| site.capacity = None);
    Ok(Json(Prices { stale: prices.stale, now_ms: prices.now_ms, snapshot, sites }))
}
