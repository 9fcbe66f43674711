//! `/v1/jobs`: submit, list, get and cancel. The tenant always comes from the key; the broker
//! answers "not found" for other tenants' jobs, so every route keeps tenants apart.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::api::{CancelRequest, Decision, Job, JobList, JobSpec, Submitted};
use super::auth::Tenant;
use super::convert::job_url;
use super::openapi::{
    BadRequest, Conflict, Forbidden, IdempotencyKeyReused, NotFound, TenantErrors, UnsupportedMediaType,
};
use super::problem::HttpError;
use crate::model::state::JobState;
use crate::proto::{self, SpecFormat};

/// The `Idempotency-Key` request header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Jobs per page unless `limit` says otherwise, and the most a page holds.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;

/// Submit a job.
///
/// The body is a job spec: JSON, or the YAML of a job file with `Content-Type: application/yaml`
/// (a problem in it is reported at its YAML line and column). With an `Idempotency-Key`,
/// a retried submit with the same body returns the same job and the same answer; the same key
/// with a different body is refused (422). Keys are per tenant. Names and label values with
/// control or bidirectional formatting characters (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F,
/// U+061C, C0/C1 controls) are refused (400 naming the field), and so is a job whose outputs would
/// leave its residency (explicit, or derived from its inputs' locations).
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "submit_job",
    tag = "jobs",
    params((
        "Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,128}$",
        description = "1 to 128 printable ASCII characters (no spaces)"
    )),
    request_body(
        content((JobSpec = "application/json"), (JobSpec = "application/yaml")),
        description = "A job spec (JSON, or a YAML job file)"
    ),
    responses(
        (status = 201, description = "Submitted (or the earlier job of the same idempotency key)", body = Submitted,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        BadRequest, Forbidden, Conflict, UnsupportedMediaType, IdempotencyKeyReused, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = read_body(body, &state)?;
    let format = spec_format(&headers)?;
    let idempotency_key = idempotency_key(&headers)?;
    let request =
        proto::SubmitRequest { spec: body.to_vec(), format: format.into(), idempotency_key, tenant: tenant.name };
    let submitted = state.jobs().submit(request).await?.into_inner();
    let url = job_url(&submitted.job_id);
    let location =
        HeaderValue::from_str(&url).map_err(|_| HttpError::Unavailable("the broker returned a bad job id".into()))?;
    let body = Submitted { id: submitted.job_id, url };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response())
}

/// List the tenant's jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(
        ("state" = Option<Vec<JobState>>, Query, description = "Only jobs in these states (repeat for several, or \
            separate them with commas)"),
        ("label" = Option<Vec<String>>, Query, pattern = "^(\\s*[^=\\s][^=]*=.*)?$", description = "`key=value`; repeat: \
            all must match. An empty value filters nothing (as an empty `state`)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Jobs per page (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, description = "One page of jobs", body = JobList), BadRequest, TenantErrors),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<JobList>, HttpError> {
    let mut request = list_request(params)?;
    request.tenant = tenant.name;
    let page = state.jobs().list(request).await?.into_inner();
    let next_cursor = (!page.next_cursor.is_empty()).then_some(page.next_cursor);
    Ok(Json(JobList { jobs: page.jobs.into_iter().map(Job::from).collect(), next_cursor }))
}

/// Get a job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "get_job",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = Job), NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Job>, HttpError> {
    let job = state.jobs().get(proto::GetJobRequest { job_id: id, tenant: tenant.name }).await?.into_inner();
    Ok(Json(job.into()))
}

/// Why the job is where it is: the placement decision (chosen site and storage, the estimated cost
/// and its parts, the price snapshot and its age, and every candidate with its cost or the rule
/// that rejected it: `rejected` (the reason as text) and `kind` (`budget`, `price_cap`,
/// `capacity`, …; `other` for decisions stored before kinds). 404 while the job has none (not
/// placed yet, or placement is off).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/placement",
    operation_id = "get_job_placement",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The placement decision", body = Decision), NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn placement(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let job = state.jobs().get(proto::GetJobRequest { job_id: id.clone(), tenant: tenant.name }).await?.into_inner();
    if job.placement_json.is_empty() {
        return Err(HttpError::NotFound(format!(
            "job {id} has no placement decision (not placed yet, or no sites are configured)"
        )));
    }
    let decision = serde_json::from_str(&job.placement_json)
        .map_err(|e| HttpError::Broker(tonic::Status::internal(format!("stored placement decision: {e}"))))?;
    Ok(Json(decision))
}

/// Cancel a job: an unfinished job ends `cancelled` (a running attempt is stopped).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancel_job",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body(
        content = Option<CancelRequest>, content_type = "application/json",
        description = "Optional: no body, `null` or `{}` cancel without a reason"
    ),
    responses(
        (status = 200, description = "The job after the cancel", body = Job),
        BadRequest, NotFound, Conflict, UnsupportedMediaType, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Job>, HttpError> {
    let body = read_body(body, &state)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        check_json_content_type(&headers)?;
        let request = serde_json::from_slice::<Option<CancelRequest>>(&body)
            .map_err(|e| HttpError::BadRequest(format!("body: {e}")))?;
        request.unwrap_or_default().reason
    };
    let request = proto::CancelJobRequest { job_id: id, tenant: tenant.name, reason };
    Ok(Json(state.jobs().cancel(request).await?.into_inner().into()))
}

/// The request body, or the problem reading it (over the limit: 413).
pub(super) fn read_body(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Bytes, HttpError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => HttpError::PayloadTooLarge(state.max_body_bytes()),
        _ => HttpError::BadRequest(format!("body: {}", rejection.body_text().to_lowercase())),
    })
}

/// A JSON request body as `T`: over the limit 413, declared as another media type 415, not `T` 400
/// (the problem names the field), as every route of this API answers; never axum's 422.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
    state: &AppState,
) -> Result<T, HttpError> {
    let body = read_body(body, state)?;
    check_json_content_type(headers)?;
    serde_json::from_slice(&body).map_err(|e| HttpError::BadRequest(format!("body: {e}")))
}

/// Refuses bodies that say they are not JSON (no `Content-Type` is taken as JSON).
pub(super) fn check_json_content_type(headers: &HeaderMap) -> Result<(), HttpError> {
    match media_type(headers) {
        Some(media) if !is_json(&media) => {
            Err(HttpError::UnsupportedMediaType(format!("content-type: expected application/json, not {media:?}")))
        }
        _ => Ok(()),
    }
}

/// A job spec body's format: JSON (also without a `Content-Type`), or YAML (`application/yaml`,
/// `application/x-yaml`, `text/yaml`).
pub(super) fn spec_format(headers: &HeaderMap) -> Result<SpecFormat, HttpError> {
    match media_type(headers) {
        None => Ok(SpecFormat::Json),
        Some(media) if is_json(&media) => Ok(SpecFormat::Json),
        Some(media) if matches!(media.as_str(), "application/yaml" | "application/x-yaml" | "text/yaml") => {
            Ok(SpecFormat::Yaml)
        }
        Some(media) => Err(HttpError::UnsupportedMediaType(format!(
            "content-type: expected application/json or application/yaml, not {media:?}"
        ))),
    }
}

/// The `Content-Type`'s media type, lowercase without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?;
    Some(value.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// The `Idempotency-Key` header: absent, or 1 to 128 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<String, HttpError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else { return Ok(String::new()) };
    let bad = || {
        HttpError::BadRequest(format!(
            "idempotency-key: must be 1 to {MAX_IDEMPOTENCY_KEY} printable ascii characters, no spaces"
        ))
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(bad());
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// The broker request of `GET /v1/jobs`'s query (the tenant is filled in by the caller).
fn list_request(params: Vec<(String, String)>) -> Result<proto::ListJobsRequest, HttpError> {
    let mut request = proto::ListJobsRequest { limit: DEFAULT_LIMIT, ..Default::default() };
    for (name, value) in params {
        match name.as_str() {
            "state" => {
                for state in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let known = state.parse::<JobState>().is_ok_and(|s| s.to_string() == state);
                    if !known {
                        return Err(HttpError::BadRequest(format!(
                            "state: unknown state {state:?} (one of queued, placed, leased, running, succeeded, failed, cancelled)"
                        )));
                    }
                    request.states.push(state.to_string());
                }
            }
            "label" if value.trim().is_empty() => {}
            "label" => {
                let valid = value.split_once('=').is_some_and(|(k, _)| !k.trim().is_empty());
                if !valid {
                    return Err(HttpError::BadRequest(format!("label: expected key=value, got {value:?}")));
                }
                request.labels.push(value);
            }
            "limit" => {
                request.limit =
                    value.parse::<u32>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                        HttpError::BadRequest(format!("limit: must be a number from 1 to {MAX_LIMIT}"))
                    })?;
            }
            "cursor" => request.before = value,
            other => {
                return Err(HttpError::BadRequest(format!(
                    "unknown query parameter {other:?} (expected state, label, limit or cursor)"
                )));
            }
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn list_queries_are_checked_and_name_the_parameter() {
        let r = list_request(params(&[
            ("state", "running"),
            ("state", "queued"),
            ("label", "team=vision"),
            ("limit", "5"),
        ]))
        .unwrap();
        assert_eq!(r.states, ["running", "queued"]);
        assert_eq!((r.labels, r.limit), (vec!["team=vision".to_string()], 5));
        assert_eq!(list_request(vec![]).unwrap().limit, DEFAULT_LIMIT);
        // Empty filters filter nothing.
        let r = list_request(params(&[("label", ""), ("state", "")])).unwrap();
        assert!(r.labels.is_empty() && r.states.is_empty());
        for (bad, field) in [
            (("state", "sleeping"), "state:"),
            (("label", "novalue"), "label:"),
            (("label", "=value"), "label:"),
            (("limit", "0"), "limit:"),
            (("limit", "x"), "limit:"),
            (("colour", "red"), "\"colour\""),
        ] {
            let e = list_request(params(&[bad])).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn idempotency_keys_are_short_printable_ascii() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
            idempotency_key(&h)
        };
        assert_eq!(with(b"retry-1:abc").unwrap(), "retry-1:abc");
        assert!(with(b"retry 1").is_err());
        assert!(with(&[b'k'; 128]).is_ok());
        assert!(with(&[b'k'; 129]).is_err());
        assert!(with(b"caf\xc3\xa9").is_err());
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), "");
    }
}
