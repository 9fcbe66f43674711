//! The HTTP side every live feed shares: one rustls (ring) client and a bounded retry loop that
//! backs off on throttling (429, AWS `ThrottlingException`) and server errors as the feed's
//! [`RetryPolicy`] says, honouring `Retry-After`.

use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::PricingError;
use crate::model::retry::{RetryLimit, RetryPolicy};

/// What percent-encoding leaves alone: RFC 3986's unreserved characters (what SigV4 and OData
/// want).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// How a feed retries a request the provider throttled or failed, unless its settings say
/// otherwise: six tries over about a minute, doubling from 2 s, since the Azure Retail Prices API
/// throttles at a few dozen requests in flight and asks for seconds to a minute.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(2), Duration::from_secs(60)).with_limit(RetryLimit::Tries(6))
}

/// The client the feeds use: rustls with the ring provider, a total timeout per request, no
/// cookies, redirects followed (a price API may move).
pub(crate) fn client() -> Result<reqwest::Client, PricingError> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(120))
        .user_agent(concat!("hybroker/", env!("CARGO_PKG_VERSION"), " (price feeds)"))
        .build()
        .map_err(|e| PricingError::Config(format!("http client: {}", describe(&e))))
}

/// Sends the request `build` makes (again for each try) until it succeeds, fails for good or runs
/// out of tries; returns the body of a 2xx answer.
pub(crate) async fn send_with_retries<F>(policy: &RetryPolicy, what: &str, build: F) -> Result<String, PricingError>
where
    F: Fn() -> Result<reqwest::RequestBuilder, PricingError>,
{
    let started = Instant::now();
    let mut attempt = 1;
    loop {
        let (error, retry_after) = match build()?.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = retry_after(response.headers());
                let body = response.text().await.map_err(|e| PricingError::Http {
                    what: what.to_string(),
                    message: format!("reading the answer: {}", describe(&e)),
                });
                match body {
                    Ok(body) if status.is_success() => return Ok(body),
                    Ok(body) if retryable(status, &body) => {
                        (PricingError::Status { what: what.to_string(), status: status.as_u16(), body }, retry_after)
                    }
                    Ok(body) => {
                        return Err(PricingError::Status { what: what.to_string(), status: status.as_u16(), body });
                    }
                    Err(e) => (e, retry_after),
                }
            }
            Err(e) if e.is_builder() => {
                return Err(PricingError::Http { what: what.to_string(), message: describe(&e) });
            }
            Err(e) => (PricingError::Http { what: what.to_string(), message: describe(&e) }, None),
        };
        let Some(wait) = policy.next_delay(attempt, started.elapsed(), retry_after, fastrand::f64()) else {
            return Err(error);
        };
        tracing::debug!(what, attempt, wait_ms = wait.as_millis() as u64, "retrying: {error}");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Throttling and server errors are worth another try. AWS's JSON protocols answer throttling
/// with a 400 and `ThrottlingException`; EC2 with a 503 `RequestLimitExceeded`.
fn retryable(status: StatusCode, body: &str) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || (status == StatusCode::BAD_REQUEST && (body.contains("ThrottlingException") || body.contains("Throttling")))
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: backoff applies).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// An error with its causes, which the `Display` of reqwest's (and the AWS credential chain's)
/// errors leaves out.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(crate) fn percent_encode(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_try_six_times_over_about_a_minute_by_default() {
        let policy = default_retry_policy();
        let pauses: Vec<Duration> =
            (1..).map_while(|tries| policy.next_delay(tries, Duration::ZERO, None, 0.0)).collect();
        let secs: Vec<u64> = pauses.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32], "five retries after the first try");
        assert_eq!(policy.delay(9, Some(Duration::from_secs(600)), 0.0), Duration::from_secs(60), "capped");
    }

    #[test]
    fn retry_after_is_read_in_seconds_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn throttling_and_server_errors_are_retried_client_errors_are_not() {
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS, ""));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE, "<Code>RequestLimitExceeded</Code>"));
        assert!(retryable(StatusCode::BAD_REQUEST, r#"{"__type":"ThrottlingException","message":"rate"}"#));
        assert!(!retryable(StatusCode::BAD_REQUEST, r#"{"__type":"InvalidParameterException"}"#));
        assert!(!retryable(StatusCode::FORBIDDEN, ""));
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("armSkuName eq 'A_b-1.2~'"), "armSkuName%20eq%20%27A_b-1.2~%27");
        assert_eq!(percent_encode("Linux/UNIX"), "Linux%2FUNIX");
        assert_eq!(percent_encode("ሴ"), "%E1%88%B4");
    }
}
