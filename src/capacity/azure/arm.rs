//! Resource Manager over HTTPS: authorised requests, throttling (429, and 409 conflicts that ask
//! to come back later) retried after `Retry-After` when the wait is short, long-running operations
//! followed (`Azure-AsyncOperation`, else `Location`) to Succeeded, Failed or Canceled, and the
//! classification of Azure's error codes into [`ProviderError`]s — the same for an error in a
//! direct answer and one that appears only when the operation is polled.

use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::auth::TokenSource;
use super::http::{describe, retry_after};
use crate::capacity::ProviderError;

/// A throttled call is tried this many times in all before [`ProviderError::Throttled`] goes back
/// to the caller.
pub const THROTTLE_TRIES: u32 = 3;
/// A `Retry-After` longer than this is not waited out here: the caller gets `Throttled` with it.
pub const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(60);
/// The wait between polls of an operation when its answer names none.
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(5);
/// Polls wait at most this long, whatever `Retry-After` says.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(60);
/// An operation still running after this long is given up (the caller may repeat the launch).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Failed polls (network, 5xx, 429) in a row before the operation is given up.
const POLL_FAILURES: u32 = 5;

/// Capacity codes: no VM of this size (and priority) can be allocated now.
const CAPACITY_CODES: &[&str] = &[
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
];
/// Quota and SKU codes (`OperationNotAllowed` counts when its message is about a quota).
const QUOTA_CODES: &[&str] = &["QuotaExceeded", "SkuNotAvailable"];
/// 409 codes that mean "busy, come back later".
const CONFLICT_THROTTLE_CODES: &[&str] = &["Conflict", "AnotherOperationInProgress", "RetryableError"];
/// Codes of a failed operation that another try may not meet.
const TRANSIENT_CODES: &[&str] = &[
    "InternalExecutionError",
    "InternalOperationError",
    "InternalServerError",
    "RetryableError",
    "ServerTimeout",
    "OperationPreempted",
    "Canceled",
];

/// An answer of Resource Manager.
pub(super) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub(super) fn json(&self) -> Result<Value, ProviderError> {
        serde_json::from_str(&self.body)
            .map_err(|e| ProviderError::Transient { message: format!("unreadable resource manager answer: {e}") })
    }

    /// The Azure error in this (non-2xx) answer, classified.
    pub(super) fn error(&self) -> ProviderError {
        let error = serde_json::from_str::<ErrorBody>(&self.body).ok().and_then(|b| b.error);
        let (code, message) = match &error {
            Some(e) => e.innermost_known(),
            None => (format!("http_{}", self.status.as_u16()), self.body.chars().take(300).collect()),
        };
        classify(Some(self.status), &code, &message, retry_after(&self.headers))
    }
}

/// `{"error": {"code", "message", "details": [...]}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ArmError>,
}

#[derive(Deserialize, Clone)]
struct ArmError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ArmError>,
}

impl ArmError {
    /// The first code this module knows, depth first (a wrapper such as `DeploymentFailed` holds
    /// the `AllocationFailed` that matters in its details); else the top one.
    fn innermost_known(&self) -> (String, String) {
        fn known(e: &ArmError) -> Option<&ArmError> {
            let listed = [CAPACITY_CODES, QUOTA_CODES, TRANSIENT_CODES].iter().any(|l| l.contains(&e.code.as_str()));
            if listed || (e.code == "OperationNotAllowed" && is_quota_message(&e.message)) {
                return Some(e);
            }
            e.details.iter().find_map(known)
        }
        let e = known(self).unwrap_or(self);
        (e.code.clone(), e.message.clone())
    }
}

/// The body of an `Azure-AsyncOperation` poll.
#[derive(Deserialize)]
struct OperationStatus {
    status: String,
    #[serde(default)]
    error: Option<ArmError>,
}

fn is_quota_message(message: &str) -> bool {
    message.to_ascii_lowercase().contains("quota")
}

/// The one mapping from an Azure error to the broker's classes. `status` is `None` for the error
/// of an operation that failed while it was polled.
pub(super) fn classify(
    status: Option<StatusCode>,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
) -> ProviderError {
    let (code_s, message_s) = (code.to_owned(), message.to_owned());
    if status == Some(StatusCode::TOO_MANY_REQUESTS) {
        let code = if code.is_empty() || code.starts_with("http_") { "TooManyRequests".into() } else { code_s };
        return ProviderError::Throttled { code, retry_after };
    }
    if CAPACITY_CODES.contains(&code) {
        return ProviderError::Capacity { code: code_s, message: message_s };
    }
    if QUOTA_CODES.contains(&code) || (code == "OperationNotAllowed" && is_quota_message(message)) {
        return ProviderError::Quota { code: code_s, message: message_s };
    }
    if status == Some(StatusCode::CONFLICT) && CONFLICT_THROTTLE_CODES.contains(&code) {
        return ProviderError::Throttled { code: code_s, retry_after };
    }
    match status {
        Some(s) if s.is_server_error() => ProviderError::Transient { message: format!("{code}: {message}") },
        None if TRANSIENT_CODES.contains(&code) => ProviderError::Transient { message: format!("{code}: {message}") },
        _ => ProviderError::Invalid { code: code_s, message: message_s },
    }
}

/// Resource Manager at one base URL, with one credential.
pub(super) struct Arm {
    http: reqwest::Client,
    endpoint: String,
    tokens: TokenSource,
}

impl Arm {
    pub(super) fn new(http: reqwest::Client, endpoint: &str, tokens: TokenSource) -> Self {
        Arm { http, endpoint: endpoint.trim_end_matches('/').to_owned(), tokens }
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends an authorised request to `url` (which must be on the endpoint: the token goes only
    /// there) and returns any answer but a throttle, which it waits out up to [`THROTTLE_TRIES`]
    /// times when `Retry-After` is at most [`MAX_THROTTLE_WAIT`]. A refused token is renewed once.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ProviderError> {
        if !self.on_endpoint(url) {
            return Err(ProviderError::Invalid {
                code: "ForeignUrl".into(),
                message: format!("resource manager named {url}, which is not on {}", self.endpoint),
            });
        }
        let mut tries = 0;
        let mut renewed = false;
        loop {
            tries += 1;
            let token = self.tokens.token().await?;
            let mut request = self.http.request(method.clone(), url).header(AUTHORIZATION, token.bearer());
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| ProviderError::Transient {
                message: format!("{method} {}: {}", path_of(url), describe(&e)),
            })?;
            let status = response.status();
            let reply_headers = response.headers().clone();
            let text = response.text().await.map_err(|e| ProviderError::Transient {
                message: format!("{method} {}: reading the answer: {}", path_of(url), describe(&e)),
            })?;
            let reply = Reply { status, headers: reply_headers, body: text };
            if status == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                self.tokens.forget().await;
                continue;
            }
            if let ProviderError::Throttled { code, retry_after } = reply_class(&reply) {
                let wait = retry_after.unwrap_or(Duration::from_secs(1 << tries.min(5)));
                if tries >= THROTTLE_TRIES || wait > MAX_THROTTLE_WAIT {
                    return Err(ProviderError::Throttled { code, retry_after });
                }
                tracing::debug!(%method, path = path_of(url), tries, wait_ms = wait.as_millis() as u64, "throttled: {code}");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Ok(reply);
        }
    }

    /// Follows the long-running operation `reply` started, if any, to its end: `Ok` when it
    /// succeeded (or there was none), its classified error when it failed or was canceled.
    pub(super) async fn follow(&self, reply: &Reply) -> Result<(), ProviderError> {
        let header = |name: &str| reply.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (url, async_operation) = match (header("azure-asyncoperation"), header("location")) {
            (Some(url), _) => (url, true),
            (None, Some(url)) if reply.status == StatusCode::ACCEPTED || reply.status == StatusCode::CREATED => {
                (url, false)
            }
            _ => return Ok(()),
        };
        let started = Instant::now();
        let mut wait = retry_after(&reply.headers).unwrap_or(DEFAULT_POLL_WAIT);
        let mut failures = 0;
        loop {
            if started.elapsed() > OPERATION_TIMEOUT {
                return Err(ProviderError::Transient {
                    message: format!("operation {} still running after {OPERATION_TIMEOUT:?}", path_of(&url)),
                });
            }
            tokio::time::sleep(wait.min(MAX_POLL_WAIT)).await;
            let poll = match self.send(Method::GET, &url, None, &[]).await {
                Ok(poll) if !poll.status.is_server_error() => poll,
                Ok(poll) => {
                    failures += 1;
                    if failures >= POLL_FAILURES {
                        return Err(poll.error());
                    }
                    continue;
                }
                Err(e) if e.retryable() && failures + 1 < POLL_FAILURES => {
                    failures += 1;
                    if let ProviderError::Throttled { retry_after: Some(after), .. } = e {
                        wait = after;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            failures = 0;
            wait = retry_after(&poll.headers).unwrap_or(DEFAULT_POLL_WAIT);
            if async_operation {
                if !poll.status.is_success() {
                    return Err(poll.error());
                }
                let status: OperationStatus = serde_json::from_str(&poll.body)
                    .map_err(|e| ProviderError::Transient { message: format!("unreadable operation status: {e}") })?;
                match status.status.as_str() {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" => {
                        let (code, message) = match status.error {
                            Some(e) => e.innermost_known(),
                            None => (status.status.clone(), format!("the operation ended {}", status.status)),
                        };
                        return Err(classify(None, &code, &message, None));
                    }
                    _ => {}
                }
            } else {
                match poll.status {
                    StatusCode::ACCEPTED => {}
                    s if s.is_success() => return Ok(()),
                    _ => return Err(poll.error()),
                }
            }
        }
    }

    fn on_endpoint(&self, url: &str) -> bool {
        url.strip_prefix(&self.endpoint).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// The class of a non-2xx answer, only to spot throttles (`Invalid` for everything else).
fn reply_class(reply: &Reply) -> ProviderError {
    if reply.status == StatusCode::TOO_MANY_REQUESTS || reply.status == StatusCode::CONFLICT {
        reply.error()
    } else {
        ProviderError::Invalid { code: String::new(), message: String::new() }
    }
}

/// The path of a URL, for messages (no query: it may carry a skip token).
fn path_of(url: &str) -> &str {
    let without_query = url.split('?').next().unwrap_or(url);
    without_query
        .find("://")
        .and_then(|i| without_query[i + 3..].find('/').map(|j| &without_query[i + 3 + j..]))
        .unwrap_or(without_query)
}

#[cfg(test)]
mod tests {
    use reqwest::header::RETRY_AFTER;

    use super::*;

    fn class(status: Option<u16>, code: &str, message: &str) -> &'static str {
        classify(status.map(|s| StatusCode::from_u16(s).unwrap()), code, message, None).class()
    }

    #[test]
    fn azure_codes_fall_into_the_brokers_classes() {
        assert_eq!(class(Some(429), "", ""), "throttled");
        assert_eq!(class(Some(409), "Conflict", "busy"), "throttled");
        assert_eq!(class(None, "AllocationFailed", "no capacity"), "capacity");
        assert_eq!(class(Some(200), "ZonalAllocationFailed", ""), "capacity");
        assert_eq!(class(None, "OverconstrainedAllocationRequest", ""), "capacity");
        let quota = "Operation could not be completed as it results in exceeding approved Total Regional Cores quota.";
        assert_eq!(class(Some(409), "OperationNotAllowed", quota), "quota");
        assert_eq!(class(Some(409), "OperationNotAllowed", "the vm is being deleted"), "invalid");
        assert_eq!(class(Some(400), "QuotaExceeded", ""), "quota");
        assert_eq!(class(Some(409), "SkuNotAvailable", ""), "quota");
        for code in ["InvalidParameter", "AuthorizationFailed", "InvalidTemplate", "ImageNotFound"] {
            assert_eq!(class(Some(400), code, ""), "invalid", "{code}");
        }
        assert_eq!(class(Some(403), "AuthorizationFailed", ""), "invalid");
        assert_eq!(class(Some(503), "ServiceUnavailable", ""), "transient");
        assert_eq!(class(None, "InternalExecutionError", ""), "transient");
        assert_eq!(class(None, "OSProvisioningClientError", ""), "invalid");
    }

    #[test]
    fn a_wrapped_allocation_failure_is_found_in_the_details() {
        let body = r#"{"error":{"code":"DeploymentFailed","message":"see details",
            "details":[{"code":"Conflict","message":"x","details":[{"code":"AllocationFailed","message":"no room"}]}]}}"#;
        let reply = Reply { status: StatusCode::BAD_REQUEST, headers: HeaderMap::new(), body: body.into() };
        assert_eq!(
            reply.error(),
            ProviderError::Capacity { code: "AllocationFailed".into(), message: "no room".into() }
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "17".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(17)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(path_of("https://h:1/subscriptions/s?x=1"), "/subscriptions/s");
    }
}
