//! The errors that cross the API edges, and the one mapping from their kind to a gRPC code (the
//! gateway maps the same kinds to HTTP statuses).

use crate::model::job::SpecError;
use crate::store::StoreError;

/// An error a caller of the broker's services sees.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// An idempotency key reused with a different request.
    #[error("{0}")]
    AlreadyExists(String),
    /// A per-tenant limit (rate, queued jobs) was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn job_not_found(id: &str) -> Self {
        ApiError::NotFound(format!("job {id} not found"))
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError::Internal(e.to_string())
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ApiError::AlreadyExists(_) => tonic::Status::already_exists(message),
            ApiError::ResourceExhausted(_) => tonic::Status::resource_exhausted(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

/// The one mapping from an error kind (as a gRPC code) to an HTTP status and its problem type.
pub fn http_status(code: tonic::Code) -> (u16, &'static str) {
    use tonic::Code;
    match code {
        Code::Ok => (200, "ok"),
        Code::InvalidArgument | Code::OutOfRange => (400, "invalid-argument"),
        Code::Unauthenticated => (401, "unauthenticated"),
        Code::PermissionDenied => (403, "permission-denied"),
        Code::NotFound => (404, "not-found"),
        Code::FailedPrecondition | Code::Aborted => (409, "conflict"),
        Code::AlreadyExists => (422, "idempotency-key-reused"),
        Code::ResourceExhausted => (429, "too-many-requests"),
        Code::Unavailable => (503, "unavailable"),
        Code::DeadlineExceeded => (504, "timeout"),
        _ => (500, "internal"),
    }
}
