//! Tenants' data in and out: `/v1/jobs/{id}/outputs` (a succeeded job's output objects) and
//! `/v1/data/…` (objects under the tenant's own storage prefixes), over the broker's
//! `DataService`.
//!
//! Objects in S3 and Azure come with presigned URLs: the tenant's client talks to the store, never
//! seeing its credentials. The embedded local store is loopback-only on the broker, so its bytes
//! stream through the gateway: `GET` routes (with `Range: bytes=N-` to resume) and a `PUT` route
//! whose body goes to the broker as it arrives, under its own size limit
//! ([`MAX_STREAMED_UPLOAD`]) instead of the gateway's request body limit. Each streamed transfer
//! holds one of the tenant's stream slots (`max_streams_per_tenant`, with event streams and
//! followed logs) while it runs.

use std::collections::BTreeMap;
use std::future::ready;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::AppState;
use super::api::{
    CompleteUpload, DataObject, DataObjectList, HttpRequest, JobOutput, JobOutputs, Problem, UploadPlan, UploadRequest,
};
use super::auth::Tenant;
use super::convert::rfc3339;
use super::jobs::json_body;
use super::openapi::{BadRequest, Conflict, Forbidden, NotFound, TenantErrors, UnsupportedMediaType};
use super::problem::HttpError;
use crate::proto::{self, data_service_client::DataServiceClient};
use crate::telemetry::grpc::TracedChannel;

/// The route of streamed uploads; the gateway's body limit does not apply to it.
pub const UPLOAD_ROUTE: &str = "/v1/data/object";
/// Largest body the upload route streams to the local store (S3's largest single PUT).
pub const MAX_STREAMED_UPLOAD: u64 = 5 << 30;
/// Bytes per message of an upload streamed to the broker.
const CHUNK_BYTES: usize = 1 << 20;
/// Escaped in query values: all but unreserved characters (and `/`, kept readable).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

fn data_client(state: &AppState) -> DataServiceClient<TracedChannel> {
    // A listing of 10,000 objects with presigned URLs is a few MiB.
    DataServiceClient::new(state.inner.broker.clone()).max_decoding_message_size(64 << 20)
}

/// `?uri=`: a data URI inside the tenant's storage prefixes.
#[derive(Debug, Deserialize)]
pub struct UriQuery {
    uri: String,
}

/// `?key=`: an object's key relative to the output's prefix.
#[derive(Debug, Deserialize)]
pub struct KeyQuery {
    key: String,
}

fn escape(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// A broker object as tenants see it; `gateway_path` streams it when the store gave no URL.
fn data_object(o: proto::DataObject, gateway_path: impl FnOnce(&str) -> String) -> DataObject {
    let download = match o.download {
        Some(get) => HttpRequest {
            method: get.method,
            url: get.url,
            via: "store".into(),
            headers: get.headers.into_iter().collect(),
            expires_at: Some(rfc3339(get.expires_at_ms as i64)),
        },
        None => gateway_request("GET", gateway_path(&o.key)),
    };
    DataObject {
        md5: (!o.md5.is_empty()).then_some(o.md5),
        etag: (!o.etag.is_empty()).then_some(o.etag),
        key: o.key,
        uri: o.uri,
        size: o.size,
        download,
    }
}

fn gateway_request(method: &str, path: String) -> HttpRequest {
    HttpRequest { method: method.into(), url: path, via: "gateway".into(), headers: BTreeMap::new(), expires_at: None }
}

fn store_request(p: proto::PresignedRequest) -> HttpRequest {
    HttpRequest {
        method: p.method,
        url: p.url,
        via: "store".into(),
        headers: p.headers.into_iter().collect(),
        expires_at: Some(rfc3339(p.expires_at_ms as i64)),
    }
}

/// A succeeded job's output objects.
///
/// Each object has its size, its MD5 where the store keeps one, and how to download it: a
/// short-lived presigned GET for S3 and Azure, or this gateway's route for the local store. 409
/// until the job has succeeded; another tenant's job is 404.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/outputs",
    operation_id = "list_job_outputs",
    tag = "data",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The succeeded attempt's output objects", body = JobOutputs), NotFound, Conflict, TenantErrors),
    security(("bearer" = []))
)]
pub async fn list_outputs(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<JobOutputs>, HttpError> {
    let request = proto::ListOutputsRequest { job_id: id.clone(), tenant: tenant.name };
    let answer = data_client(&state).list_outputs(request).await?.into_inner();
    let outputs = answer
        .outputs
        .into_iter()
        .map(|o| {
            let index = o.index;
            let path = |key: &str| format!("/v1/jobs/{}/outputs/{index}?key={}", escape(&id), escape(key));
            JobOutput {
                index,
                path: o.path,
                uri: o.uri,
                objects: o.objects.into_iter().map(|obj| data_object(obj, path)).collect(),
            }
        })
        .collect();
    Ok(Json(JobOutputs { job_id: id, attempt: answer.attempt, outputs }))
}

/// One output object's bytes, streamed from the broker (the local store).
///
/// `Range: bytes=N-` sends the object from byte N (206), to resume a download; other range forms
/// get the whole object. S3 and Azure objects are downloaded with their presigned URL instead (409).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/outputs/{output}",
    operation_id = "read_job_output",
    tag = "data",
    params(
        ("id" = String, Path, description = "Job id"),
        ("output" = u32, Path, description = "The output's index"),
        ("key" = String, Query, description = "The object's key relative to the output's prefix"),
        ("Range" = Option<String>, Header, description = "`bytes=N-`: from byte N on"),
    ),
    responses(
        (status = 200, description = "The object", content_type = "application/octet-stream", body = String),
        (status = 206, description = "The object from the requested byte", content_type = "application/octet-stream", body = String),
        (status = 416, description = "The range starts at or past the object's end", content_type = "application/problem+json", body = Problem),
        BadRequest, NotFound, Conflict, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn read_output(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, output)): Path<(String, u32)>,
    Query(KeyQuery { key }): Query<KeyQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let request = proto::ReadObjectRequest { tenant: tenant.name, job_id: id, output, key, ..Default::default() };
    stream_object(&state, request, &headers).await
}

/// The objects at a URI inside the tenant's storage prefixes: one object, or every object under a
/// prefix (a URI that is no object is read as the prefix `URI/`). 403 outside the prefixes.
#[utoipa::path(
    get,
    path = "/v1/data/objects",
    operation_id = "list_data",
    tag = "data",
    params(("uri" = String, Query, description = "`s3://…`, `az://…` or `local://…`")),
    responses((status = 200, description = "The objects", body = DataObjectList), BadRequest, Forbidden, TenantErrors),
    security(("bearer" = []))
)]
pub async fn list_data(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(UriQuery { uri }): Query<UriQuery>,
) -> Result<Json<DataObjectList>, HttpError> {
    let request = proto::ListDataRequest { tenant: tenant.name, uri };
    let answer = data_client(&state).list_data(request).await?.into_inner();
    let objects = answer
        .objects
        .into_iter()
        .map(|o| {
            let uri = o.uri.clone();
            data_object(o, |_| format!("{UPLOAD_ROUTE}?uri={}", escape(&uri)))
        })
        .collect();
    Ok(Json(DataObjectList { objects }))
}

/// One object's bytes, streamed from the broker (the local store); `Range: bytes=N-` resumes.
#[utoipa::path(
    get,
    path = "/v1/data/object",
    operation_id = "read_data",
    tag = "data",
    params(
        ("uri" = String, Query, description = "The object's URI"),
        ("Range" = Option<String>, Header, description = "`bytes=N-`: from byte N on"),
    ),
    responses(
        (status = 200, description = "The object", content_type = "application/octet-stream", body = String),
        (status = 206, description = "The object from the requested byte", content_type = "application/octet-stream", body = String),
        (status = 416, description = "The range starts at or past the object's end", content_type = "application/problem+json", body = Problem),
        BadRequest, Forbidden, NotFound, Conflict, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn read_data(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(UriQuery { uri }): Query<UriQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let request = proto::ReadObjectRequest { tenant: tenant.name, uri, ..Default::default() };
    stream_object(&state, request, &headers).await
}

/// Upload one object to the local store, the body streamed to the broker as it arrives.
///
/// `Content-Length` is required (at most 5 GiB, else 413); a `Content-MD5` is checked by the store
/// (a mismatch stores nothing: 400). S3 and Azure take uploads at the URLs of `POST
/// /v1/data/uploads` instead (409 here).
#[utoipa::path(
    put,
    path = "/v1/data/object",
    operation_id = "write_data",
    tag = "data",
    params(
        ("uri" = String, Query, description = "The object's URI"),
        ("Content-MD5" = Option<String>, Header, description = "The body's MD5, base64"),
    ),
    request_body(content = String, content_type = "application/octet-stream", description = "The object's bytes"),
    responses(
        (status = 201, description = "Stored", body = DataObject),
        BadRequest, Forbidden, Conflict, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn write_data(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(UriQuery { uri }): Query<UriQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| HttpError::BadRequest("Content-Length: required for an upload".into()))?;
    if size > MAX_STREAMED_UPLOAD {
        return Err(HttpError::PayloadTooLarge(MAX_STREAMED_UPLOAD as usize));
    }
    let content_md5 = headers.get("content-md5").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    // Held until the upload ends: a stalled or endless body holds one of the tenant's slots.
    let _slot = state.limits().streams.acquire(&tenant.name)?;
    let first = proto::WriteObjectChunk { tenant: tenant.name, uri: uri.clone(), size, content_md5, data: Vec::new() };
    // A body that breaks off ends the stream early; the broker's store then refuses the short
    // upload. Frames are gathered into messages of about CHUNK_BYTES (fewer, larger messages).
    let frames = body.into_data_stream().take_while(|chunk| ready(chunk.is_ok())).filter_map(|chunk| ready(chunk.ok()));
    let rest = futures::stream::unfold(Box::pin(frames), |mut frames| async move {
        let mut data = Vec::new();
        while data.len() < CHUNK_BYTES {
            match frames.next().await {
                Some(frame) => data.extend_from_slice(&frame),
                None => break,
            }
        }
        (!data.is_empty()).then(|| (proto::WriteObjectChunk { data, ..Default::default() }, frames))
    });
    let chunks = futures::stream::iter([first]).chain(rest);
    let stored = data_client(&state).write_object(chunks).await?.into_inner();
    let object = data_object(stored, |_| format!("{UPLOAD_ROUTE}?uri={}", escape(&uri)));
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

/// Plan the upload of one object inside the tenant's storage prefixes: a presigned PUT, the
/// parts of a multipart upload (big files, S3 and Azure) or the gateway's streaming route (the
/// local store). 403 outside the prefixes.
#[utoipa::path(
    post,
    path = "/v1/data/uploads",
    operation_id = "plan_data_upload",
    tag = "data",
    request_body = UploadRequest,
    responses(
        (status = 200, description = "How to upload it", body = UploadPlan),
        BadRequest, Forbidden, UnsupportedMediaType, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn plan_upload(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<UploadPlan>, HttpError> {
    let UploadRequest { uri, size } = json_body(body, &headers, &state)?;
    let call = proto::PlanUploadRequest { tenant: tenant.name, uri: uri.clone(), size };
    let answer = data_client(&state).plan_upload(call).await?.into_inner();
    let plan = match answer.plan {
        _ if answer.stream => UploadPlan {
            put: Some(gateway_request("PUT", format!("{UPLOAD_ROUTE}?uri={}", escape(&uri)))),
            uri,
            kind: "gateway".into(),
            upload_id: None,
            part_size: None,
            parts: Vec::new(),
        },
        Some(plan) if plan.upload_id.is_empty() => UploadPlan {
            uri,
            kind: "single".into(),
            put: plan.put.map(store_request),
            upload_id: None,
            part_size: None,
            parts: Vec::new(),
        },
        Some(plan) => UploadPlan {
            uri,
            kind: "multipart".into(),
            put: None,
            upload_id: Some(plan.upload_id),
            part_size: Some(plan.part_size),
            parts: plan.parts.into_iter().map(store_request).collect(),
        },
        None => return Err(HttpError::Unavailable("the broker answered no upload plan".into())),
    };
    Ok(Json(plan))
}

/// Complete a multipart upload with its parts' ETags (in part order). The local store has none
/// (409): it takes uploads whole at `PUT /v1/data/object`.
#[utoipa::path(
    post,
    path = "/v1/data/uploads/complete",
    operation_id = "complete_data_upload",
    tag = "data",
    request_body = CompleteUpload,
    responses(
        (status = 204, description = "The object is stored"),
        BadRequest, Forbidden, Conflict, UnsupportedMediaType, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn complete_upload(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, HttpError> {
    let request: CompleteUpload = json_body(body, &headers, &state)?;
    let parts = request.parts.into_iter().map(|p| proto::UploadedPart { number: p.number, etag: p.etag }).collect();
    let call =
        proto::CompleteUploadRequest { tenant: tenant.name, uri: request.uri, upload_id: request.upload_id, parts };
    data_client(&state).complete_upload(call).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `Range: bytes=N-` → `Some(N)`; no range, or another form (served whole, as RFC 9110 allows) → `None`.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    value.trim().strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

/// Streams one object from the broker: 200, or 206 from the requested byte.
async fn stream_object(
    state: &AppState,
    mut request: proto::ReadObjectRequest,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let start = range_start(headers);
    // Held by the body until it is sent or the client goes: a slow reader holds one of the
    // tenant's slots.
    let slot = state.limits().streams.acquire(&request.tenant)?;
    request.offset = start.unwrap_or(0);
    let mut chunks = match data_client(state).read_object(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) if status.code() == tonic::Code::OutOfRange => {
            return Ok(unsatisfiable(status.message().to_string(), None));
        }
        Err(status) => return Err(status.into()),
    };
    let first = chunks
        .message()
        .await?
        .ok_or_else(|| HttpError::Unavailable("the broker ended the object's stream before it began".into()))?;
    let size = first.size;
    let offset = start.unwrap_or(0);
    if start.is_some() && offset >= size {
        return Ok(unsatisfiable(format!("the object has {size} bytes: nothing from byte {offset} on"), Some(size)));
    }
    let rest = chunks.map(move |chunk| {
        let _held = &slot;
        chunk.map(|c| Bytes::from(c.data)).map_err(|status| std::io::Error::other(status.message().to_string()))
    });
    let body = Body::from_stream(futures::stream::iter([Ok(Bytes::from(first.data))]).chain(rest));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size - offset));
    if start.is_some() {
        let range = format!("bytes {offset}-{}/{size}", size - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).expect("digits"));
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

/// 416 with the object's size where known.
fn unsatisfiable(detail: String, size: Option<u64>) -> Response {
    let mut response = (StatusCode::RANGE_NOT_SATISFIABLE, detail).into_response();
    if let Some(size) = size {
        let value = HeaderValue::from_str(&format!("bytes */{size}")).expect("digits");
        response.headers_mut().insert(header::CONTENT_RANGE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_open_ended_byte_range_resumes() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, v.parse().unwrap());
            range_start(&h)
        };
        assert_eq!(with("bytes=100-"), Some(100));
        assert_eq!(with("bytes=0-"), Some(0));
        assert_eq!(with("bytes=0-99"), None);
        assert_eq!(with("bytes=-5"), None);
        assert_eq!(with("items=1-"), None);
        assert_eq!(range_start(&HeaderMap::new()), None);
    }

    #[test]
    fn query_values_are_escaped_but_keep_slashes() {
        assert_eq!(escape("local://lab/a b/c&d.bin"), "local%3A//lab/a%20b/c%26d.bin");
    }
}
