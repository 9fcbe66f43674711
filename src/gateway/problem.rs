//! Every error the gateway answers is one JSON shape: RFC 9457 problem details
//! (`application/problem+json`, [`Problem`]). Broker errors map through
//! [`crate::error::http_status`]; errors axum produces on its own (a body over the limit, a method
//! the route does not take, a malformed query) are rewritten into the same shape on the way out.

use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::Code;

use super::api::Problem;
use crate::error::http_status;

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Problem types are `PROBLEM_BASE` + a slug, e.g. `https://hybroker.dev/problems/not-found`.
pub const PROBLEM_BASE: &str = "https://hybroker.dev/problems/";
/// `Retry-After` of a refusal by a per-tenant cap of the broker (unfinished jobs): a hint, since
/// only the tenant's jobs finishing frees room.
const CAP_RETRY_AFTER_S: u64 = 5;
/// Longest plain error body (from axum's own rejections) carried into a problem's detail.
const MAX_PLAIN_DETAIL: usize = 4096;

/// An error answered to a tenant; its `Display` is the problem's `detail`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A malformed request: a bad header, query parameter or body, naming it.
    #[error("{0}")]
    BadRequest(String),
    /// No key, or a key the broker does not know (or has revoked).
    #[error("{0}")]
    Unauthenticated(String),
    /// The tenant may not do this (agents are for admin tenants).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The tenant's token bucket is empty; retry after this many whole seconds.
    #[error("rate limit of {rate} requests per second (burst {burst}) exceeded; retry in {retry_after} s")]
    RateLimited { rate: f64, burst: u32, retry_after: u64 },
    /// Too many requests without an accepted key from one client address; checked before the
    /// broker is asked about the key.
    #[error(
        "too many unauthenticated requests from {client} (at most {rate} per second, burst {burst}); retry in {retry_after} s"
    )]
    TooManyUnauthenticated { client: std::net::IpAddr, rate: f64, burst: u32, retry_after: u64 },
    /// The tenant has as many event streams, followed logs and streamed transfers open as it may.
    #[error(
        "tenant {tenant} has {limit} event streams and followed logs open (downloads and uploads through the gateway count too), its limit (max_streams_per_tenant); close one first"
    )]
    TooManyStreams { tenant: String, limit: u32 },
    /// The broker could not be reached or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// The broker answered an error status.
    #[error("{}", .0.message())]
    Broker(tonic::Status),
}

impl HttpError {
    /// The HTTP status and the problem type slug.
    fn status_and_slug(&self) -> (StatusCode, &'static str) {
        let via_code = |code: Code| {
            let (status, slug) = http_status(code);
            (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), slug)
        };
        match self {
            HttpError::BadRequest(_) => via_code(Code::InvalidArgument),
            HttpError::Unauthenticated(_) => via_code(Code::Unauthenticated),
            HttpError::Forbidden(_) => via_code(Code::PermissionDenied),
            HttpError::NotFound(_) => via_code(Code::NotFound),
            HttpError::RateLimited { .. }
            | HttpError::TooManyUnauthenticated { .. }
            | HttpError::TooManyStreams { .. } => via_code(Code::ResourceExhausted),
            HttpError::Unavailable(_) => via_code(Code::Unavailable),
            HttpError::Broker(status) => via_code(status.code()),
            HttpError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            HttpError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            HttpError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type"),
        }
    }
}

impl From<tonic::Status> for HttpError {
    /// Transport failures (no answer from the broker) become 503 and are logged with their cause;
    /// the broker's own statuses keep their code and message.
    fn from(status: tonic::Status) -> Self {
        if std::error::Error::source(&status).is_some() || status.code() == Code::Unavailable {
            tracing::warn!(reason = %crate::tls::explain_status(&status), "broker call failed");
            return HttpError::Unavailable("the broker is unavailable; try again later".into());
        }
        if matches!(status.code(), Code::Internal | Code::Unknown | Code::Unimplemented) {
            tracing::error!(code = ?status.code(), message = status.message(), "broker error");
        }
        HttpError::Broker(status)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, slug) = self.status_and_slug();
        let mut response = problem_response(status, slug, self.to_string());
        let headers = response.headers_mut();
        match &self {
            HttpError::Unauthenticated(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            HttpError::RateLimited { retry_after, .. } | HttpError::TooManyUnauthenticated { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            HttpError::Broker(status) if status.code() == Code::ResourceExhausted => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(CAP_RETRY_AFTER_S));
            }
            _ => {}
        }
        response
    }
}

/// A problem response; [`problem_layer`] fills in `instance` from the request path.
fn problem_response(status: StatusCode, slug: &str, detail: String) -> Response {
    let problem = Problem {
        kind: format!("{PROBLEM_BASE}{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
        instance: None,
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// Unknown routes.
pub async fn no_route(method: Method, OriginalUri(uri): OriginalUri) -> HttpError {
    HttpError::NotFound(format!("no route for {method} {}", uri.path()))
}

/// Known routes, other methods.
pub async fn wrong_method(method: Method, OriginalUri(uri): OriginalUri) -> HttpError {
    HttpError::MethodNotAllowed(format!("{} does not take {method}", uri.path()))
}

/// Outermost middleware: every error response leaves as a problem with its `instance` set.
///
/// Errors axum produces itself (a 413 from the body limit, query rejections) are plain text; they
/// are rewritten into problems carrying that text as the detail, keeping their status and headers.
pub async fn problem_layer(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_PLAIN_DETAIL * 4).await.unwrap_or_default();
    let mut problem = match serde_json::from_slice::<Problem>(&bytes) {
        Ok(problem) if is_problem => problem,
        _ => Problem {
            kind: format!("{PROBLEM_BASE}{}", plain_slug(status)),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: plain_detail(status, &bytes),
            instance: None,
        },
    };
    problem.instance.get_or_insert(path);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(serde_json::to_vec(&problem).unwrap_or_default()))
}

/// The slug of an error axum answered on its own.
fn plain_slug(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid-argument",
        StatusCode::NOT_FOUND => "not-found",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// The detail of an error axum answered on its own: its text, lowercased at the start.
fn plain_detail(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_PLAIN_DETAIL)]).trim().to_string();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    let mut chars = text.chars();
    let first = chars.next().map(|c| c.to_lowercase().to_string()).unwrap_or_default();
    let rest = chars.as_str().trim_end_matches('.');
    format!("{first}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_codes_keep_their_message_and_map_through_the_one_table() {
        let e = HttpError::from(tonic::Status::invalid_argument("spec.resources.gpus: must be at most 64"));
        assert_eq!(e.status_and_slug(), (StatusCode::BAD_REQUEST, "invalid-argument"));
        assert_eq!(e.to_string(), "spec.resources.gpus: must be at most 64");
        let e = HttpError::from(tonic::Status::already_exists("idempotency key reused"));
        assert_eq!(e.status_and_slug().0, StatusCode::UNPROCESSABLE_ENTITY);
        let e = HttpError::from(tonic::Status::unavailable("connection refused"));
        assert_eq!(e.status_and_slug().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn plain_errors_become_lowercase_details() {
        assert_eq!(
            plain_detail(StatusCode::PAYLOAD_TOO_LARGE, b"Failed to buffer the request body."),
            "failed to buffer the request body"
        );
        assert_eq!(plain_detail(StatusCode::METHOD_NOT_ALLOWED, b""), "method not allowed");
    }
}
