//! The EC2 Query API as the provider speaks it: a form-encoded `POST /` (`Action`, `Version`, the
//! call's parameters), signed with SigV4 for service `ec2` through `aws-sigv4`, answered in XML.
//! Four calls do not justify `aws-sdk-ec2` (one of the largest crates on crates.io).
//!
//! A failed call becomes a [`ProviderError`] by its EC2 error code ([`classify`]); no call is
//! retried here: the broker retries throttled and transient launches with the same launch id.
//! Request bodies are never logged or put in errors (a launch's holds its user data and join token).

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{Credentials, ProvideCredentials, SharedCredentialsProvider};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::RETRY_AFTER;

use super::reply::parse_error;
use crate::capacity::ProviderError;
use crate::pricing::http::describe;
use crate::pricing::sigv4::{self, SignableRequest};

/// The EC2 API version every call names.
pub(super) const API_VERSION: &str = "2016-11-15";

/// What form encoding leaves alone: RFC 3986's unreserved characters (what SigV4 expects).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// One region's EC2 endpoint with the credentials that sign for it.
#[derive(Clone)]
pub(super) struct Ec2Client {
    http: reqwest::Client,
    url: reqwest::Url,
    region: String,
    credentials: SharedCredentialsProvider,
}

impl Ec2Client {
    pub(super) fn new(
        endpoint: &str,
        region: &str,
        credentials: SharedCredentialsProvider,
    ) -> Result<Self, ProviderError> {
        let invalid = |message: String| ProviderError::Invalid { code: "InvalidEndpoint".into(), message };
        let url = reqwest::Url::parse(endpoint).map_err(|e| invalid(format!("ec2 endpoint {endpoint:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("ec2 endpoint {endpoint:?} is not an http(s) url")));
        }
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("hybroker/", env!("CARGO_PKG_VERSION"), " (capacity)"))
            .build()
            .map_err(|e| ProviderError::Invalid { code: "HttpClient".into(), message: describe(&e) })?;
        Ok(Self { http, url, region: region.to_owned(), credentials })
    }

    /// Calls `action` with `params` and returns the answer's XML, or the error the answer (or its
    /// absence) means.
    pub(super) async fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, ProviderError> {
        let credentials = self.credentials().await?;
        let body = form_body(action, params);
        let headers = [("content-type", FORM)];
        let signed = sign(&self.url, &headers, body.as_bytes(), &credentials, &self.region, SystemTime::now())
            .map_err(|message| ProviderError::Invalid { code: "Signing".into(), message })?;
        let mut request = self.http.post(self.url.clone()).header("content-type", FORM).body(body);
        for (name, value) in &signed {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| ProviderError::Transient {
            message: format!("ec2 {action} at {}: {}", self.url, describe(&e)),
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.map_err(|e| ProviderError::Transient {
            message: format!("ec2 {action}: reading the answer: {}", describe(&e)),
        })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(match parse_error(&text) {
            Some((code, message)) => classify(status, &code, &format!("{action}: {message}"), retry_after),
            None => unparsed(action, status, &text),
        })
    }

    async fn credentials(&self) -> Result<Credentials, ProviderError> {
        self.credentials.provide_credentials().await.map_err(|e| {
            let message = format!("aws credentials: {}", describe(&e));
            match e {
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
                    ProviderError::Invalid { code: "NoCredentials".into(), message }
                }
                _ => ProviderError::Transient { message },
            }
        })
    }
}

/// `Action=…&Version=…&` and the parameters, form encoded.
fn form_body(action: &str, params: &[(String, String)]) -> String {
    let fixed = [("Action", action), ("Version", API_VERSION)];
    let all = fixed.into_iter().chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    all.map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

pub(super) fn encode(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

/// The headers that sign a POST of `body` to `url` for EC2 in `region` at `time`: `x-amz-date`,
/// `x-amz-security-token` (with session credentials) and `authorization`.
pub(super) fn sign(
    url: &reqwest::Url,
    headers: &[(&str, &str)],
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    sigv4::sign(&SignableRequest { method: "POST", url, headers, body }, credentials, region, "ec2", time)
}

/// Error codes of no capacity for the asked type (and market) in that place now: another subnet
/// (availability zone) may have it, and the broker leaves (site, type, market) out for a while.
const CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientFreeAddressesInSubnet",
    "UnfulfillableCapacity",
    "Unsupported",
    "SpotMaxPriceTooLow",
];

/// Account limits: no other subnet helps.
const QUOTA: &[&str] = &["VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"];

const THROTTLE: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"];

/// Credentials and permissions: retrying cannot help.
const AUTH: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "OptInRequired",
    "Blocked",
    "PendingVerification",
    "MissingAuthenticationToken",
];

/// The class of an EC2 error answer (reference note §2): by its code first (EC2 answers
/// `InsufficientInstanceCapacity` with a 500 and `RequestLimitExceeded` with a 503), then by its
/// status: any other 5xx is transient, any other 4xx a bad request.
pub(super) fn classify(status: u16, code: &str, message: &str, retry_after: Option<Duration>) -> ProviderError {
    let (code, message) = (code.trim().to_owned(), message.trim().to_owned());
    let is = |list: &[&str]| list.contains(&code.as_str());
    if is(CAPACITY) {
        ProviderError::Capacity { code, message }
    } else if is(QUOTA) {
        ProviderError::Quota { code, message }
    } else if is(THROTTLE) || status == 429 {
        ProviderError::Throttled { code, retry_after }
    } else if is(AUTH) || code.starts_with("Invalid") || code.starts_with("MissingParameter") {
        ProviderError::Invalid { code, message }
    } else if status >= 500 {
        ProviderError::Transient { message: format!("{code}: {message}") }
    } else {
        ProviderError::Invalid { code, message }
    }
}

/// An error answer without an EC2 error document (a proxy's page, an emulator's crash).
fn unparsed(action: &str, status: u16, body: &str) -> ProviderError {
    let excerpt: String = body.chars().filter(|c| !c.is_control()).take(200).collect();
    let message = format!("ec2 {action}: http {status}: {excerpt}");
    match status {
        429 => ProviderError::Throttled { code: "http-429".into(), retry_after: None },
        500.. => ProviderError::Transient { message },
        _ => ProviderError::Invalid { code: format!("http-{status}"), message },
    }
}
