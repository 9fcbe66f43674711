//! The HTTP side every live feed shares: one rustls (ring) client and a bounded retry loop that
//! backs off on throttling (429, AWS `ThrottlingException`) and server errors, honouring
//! `Retry-After`.

use std::error::Error as _;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::PricingError;

/// How a feed retries a request the provider throttled or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first one included (at least 1).
    pub max_attempts: u32,
    /// The wait before the first retry; doubled before each next one.
    pub initial_backoff: Duration,
    /// The longest wait between tries; also the cap on a server's `Retry-After`.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Six tries over about a minute: the Azure Retail Prices API throttles at a few dozen
    /// requests in flight and asks for seconds to a minute.
    fn default() -> Self {
        Self { max_attempts: 6, initial_backoff: Duration::from_secs(2), max_backoff: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 = the first retry): the server's `Retry-After` when
    /// it sent one, else exponential backoff; never more than `max_backoff`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = retry_after.unwrap_or_else(|| {
            let factor = 2u32.saturating_pow(retry.saturating_sub(1));
            self.initial_backoff.saturating_mul(factor)
        });
        backoff.min(self.max_backoff)
    }
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
    let attempts = policy.max_attempts.max(1);
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
        if attempt >= attempts {
            return Err(error);
        }
        let wait = policy.delay(attempt, retry_after);
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
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// A reqwest error with its causes, which its `Display` leaves out.
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Percent-encodes everything but RFC 3986's unreserved characters (what SigV4 and OData want).
pub(crate) fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3 / 2);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_retry_after_wins_within_it() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        assert_eq!(policy.delay(1, None), Duration::from_millis(100));
        assert_eq!(policy.delay(2, None), Duration::from_millis(200));
        assert_eq!(policy.delay(3, None), Duration::from_millis(350));
        assert_eq!(policy.delay(1, Some(Duration::from_millis(300))), Duration::from_millis(300));
        assert_eq!(policy.delay(1, Some(Duration::from_secs(30))), Duration::from_millis(350));
        assert_eq!(policy.delay(40, None), Duration::from_millis(350), "no overflow on many retries");
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
