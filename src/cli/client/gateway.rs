//! The gateway's HTTP API as the CLI sees it: one reqwest client that carries the tenant's key, URLs
//! built from escaped path segments, and failures (problem details, refused connections, untrusted
//! certificates) turned into errors a person can act on.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{Certificate, Client, Method, RequestBuilder, Response, StatusCode, Url};

use crate::gateway::api::Problem;

/// How long a plain (not streamed) request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure the CLI reports as `error: <message>`, with an optional `hint: …` line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub message: String,
    /// The HTTP status, when the gateway answered.
    pub status: Option<u16>,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn new(message: impl Into<String>, hint: Option<String>) -> Self {
        Self { message: message.into(), status: None, hint }
    }

    /// An error answer: `<detail> (<status>)`, with a hint for the statuses a person can fix.
    pub fn from_answer(status: StatusCode, body: &[u8], retry_after: Option<&str>) -> Self {
        let detail = match serde_json::from_slice::<Problem>(body) {
            Ok(problem) if !problem.detail.is_empty() => problem.detail,
            Ok(problem) => problem.title,
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
                if text.is_empty() { reason } else { format!("{reason}: {}", truncate(text, 200)) }
            }
        };
        let hint = match status {
            StatusCode::UNAUTHORIZED => Some(
                "the gateway did not accept the API key: pass a valid one with --token or HYBROKER_TOKEN \
                 (an operator makes one with `hybroker tenants add TENANT`)"
                    .to_string(),
            ),
            StatusCode::FORBIDDEN => Some("this needs an admin tenant's API key".to_string()),
            StatusCode::TOO_MANY_REQUESTS => retry_after.map(|s| format!("try again in {s} s")),
            _ => None,
        };
        Self { message: format!("{detail} ({})", status.as_u16()), status: Some(status.as_u16()), hint }
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A connection to the gateway with one tenant's key.
pub struct Gateway {
    http: Client,
    base: Url,
    token: HeaderValue,
}

impl Gateway {
    /// A client for `url` (http or https). With `ca_cert`, only that CA bundle is trusted for the
    /// gateway's certificate; without it, the system's roots are.
    pub fn new(url: &str, token: Option<&str>, ca_cert: Option<&Path>) -> anyhow::Result<Self> {
        let base = Url::parse(url).with_context(|| format!("invalid gateway url {url:?}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            anyhow::bail!("invalid gateway url {url:?}: expected http(s)://host[:port]");
        }
        let token = match token.map(str::trim) {
            Some(t) if !t.is_empty() => t,
            _ => {
                return Err(ClientError::new(
                    "no API key given",
                    Some("pass --token KEY or set HYBROKER_TOKEN".into()),
                )
                .into());
            }
        };
        let mut token = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| anyhow::anyhow!("the API key holds characters that cannot be sent in a header"))?;
        token.set_sensitive(true);
        if base.scheme() == "http" && !is_loopback(&base) {
            eprintln!("warning: sending the API key in clear text over http to {}", base.host_str().unwrap_or(""));
        }

        crate::tls::install_crypto_provider();
        let builder = Client::builder()
            .user_agent(concat!("hybroker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        let builder = match ca_cert {
            Some(path) => builder.tls_certs_only(load_ca(path)?),
            // Plain http needs no roots; loading the system's would fail on machines without any.
            None if base.scheme() == "http" => builder.tls_certs_only([]),
            None => builder,
        };
        let http = builder.build().map_err(|e| {
            ClientError::new(
                format!("cannot set up https: {}", chain(&e)),
                Some("pass --ca-cert (HYBROKER_CA_CERT) with the CA that signed the gateway's certificate".into()),
            )
        })?;
        Ok(Self { http, base, token })
    }

    /// The URL of `/` + segments (each escaped), below the base URL's own path.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) urls have paths").pop_if_empty().extend(segments);
        url
    }

    /// A request with the tenant's key; plain requests get a timeout, streams none.
    pub fn request(&self, method: Method, segments: &[&str], streamed: bool) -> RequestBuilder {
        let rb = self.http.request(method, self.url(segments)).header(AUTHORIZATION, self.token.clone());
        if streamed { rb } else { rb.timeout(REQUEST_TIMEOUT) }
    }

    /// A request to a URL the gateway handed out: its own route (a path starting with `/`; the
    /// key is sent) or a store's presigned URL (absolute; sent as is, never with the key). No
    /// overall timeout: bodies may be large.
    pub fn handed_out(&self, method: Method, url: &str) -> anyhow::Result<RequestBuilder> {
        if url.starts_with('/') {
            let joined = format!("{}{url}", self.base.as_str().trim_end_matches('/'));
            let url = Url::parse(&joined).with_context(|| format!("the gateway handed out a bad path {url:?}"))?;
            return Ok(self.http.request(method, url).header(AUTHORIZATION, self.token.clone()));
        }
        let parsed = Url::parse(url).map_err(|_| anyhow::anyhow!("the gateway handed out a bad url"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            anyhow::bail!("the gateway handed out a url with scheme {:?}", parsed.scheme());
        }
        Ok(self.store_client(parsed.scheme() == "https")?.request(method, parsed))
    }

    /// The client for stores' presigned URLs: the system's roots for https (not `--ca-cert`,
    /// which is the gateway's CA), none for plain http.
    fn store_client(&self, https: bool) -> anyhow::Result<Client> {
        let builder = Client::builder()
            .user_agent(concat!("hybroker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        let builder = if https { builder } else { builder.tls_certs_only([]) };
        builder
            .build()
            .map_err(|e| ClientError::new(format!("cannot set up https to the store: {}", chain(&e)), None).into())
    }

    /// Sends; a transport failure or an error status becomes a [`ClientError`].
    pub async fn send(&self, rb: RequestBuilder) -> anyhow::Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.bytes().await.unwrap_or_default();
        Err(ClientError::from_answer(status, &body, retry_after.as_deref()).into())
    }

    /// Sends and reads the JSON answer as it came.
    pub async fn json(&self, rb: RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let resp = self.send(rb).await?;
        let body = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        serde_json::from_slice(&body).context("the gateway's answer is not valid JSON")
    }

    /// Explains a failure to talk to the gateway.
    pub fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let why = chain(e);
        let lower = why.to_lowercase();
        let hint = if lower.contains("unknownissuer") || lower.contains("invalid peer certificate") {
            Some("the gateway's certificate is not trusted: pass --ca-cert (HYBROKER_CA_CERT) with its CA".into())
        } else if e.is_connect() {
            Some("is the gateway running? set its url with --gateway or HYBROKER_GATEWAY".into())
        } else {
            None
        };
        let what = if e.is_timeout() { "timed out talking to" } else { "cannot talk to" };
        ClientError::new(format!("{what} the gateway at {}: {why}", self.base), hint).into()
    }
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn load_ca(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read CA certificate {}", path.display()))?;
    let certs = Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("invalid pem in CA certificate {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in CA certificate {}", path.display());
    }
    Ok(certs)
}

/// An error and its causes, `a: b: c`, without repeats (reqwest's messages often nest the same text).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        // reqwest's outer layers only say what the caller already knows (the request and its URL).
        let noise = s.starts_with("error sending request") || s.starts_with("client error (");
        if !noise && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_answer_reads_detail_and_status_with_a_hint_for_401() {
        let body = br#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"invalid api key"}"#;
        let e = ClientError::from_answer(StatusCode::UNAUTHORIZED, body, None);
        assert_eq!(e.to_string(), "invalid api key (401)");
        assert!(e.hint.unwrap().contains("HYBROKER_TOKEN"));
    }

    #[test]
    fn a_non_problem_answer_is_still_readable() {
        let e = ClientError::from_answer(StatusCode::BAD_GATEWAY, b"upstream down\n", None);
        assert_eq!(e.to_string(), "bad gateway: upstream down (502)");
        let e = ClientError::from_answer(StatusCode::NOT_FOUND, b"", None);
        assert_eq!(e.to_string(), "not found (404)");
        let e = ClientError::from_answer(StatusCode::TOO_MANY_REQUESTS, b"", Some("3"));
        assert_eq!(e.hint.as_deref(), Some("try again in 3 s"));
    }

    #[test]
    fn urls_escape_segments_and_keep_the_base_path() {
        let gw = Gateway::new("http://127.0.0.1:8443/api/", Some("k"), None).unwrap();
        assert_eq!(
            gw.url(&["v1", "agents", "lab", "node a"]).as_str(),
            "http://127.0.0.1:8443/api/v1/agents/lab/node%20a"
        );
        let gw = Gateway::new("http://127.0.0.1:8443", Some("k"), None).unwrap();
        assert_eq!(gw.url(&["v1", "jobs", "../x"]).as_str(), "http://127.0.0.1:8443/v1/jobs/..%2Fx");
    }

    #[test]
    fn a_missing_key_or_a_bad_url_is_refused_before_any_request() {
        let e = Gateway::new("http://127.0.0.1:8443", None, None).err().unwrap();
        assert!(e.downcast_ref::<ClientError>().unwrap().hint.as_deref().unwrap().contains("HYBROKER_TOKEN"));
        assert!(Gateway::new("ftp://x", Some("k"), None).is_err());
        assert!(Gateway::new("not a url", Some("k"), None).is_err());
    }
}
