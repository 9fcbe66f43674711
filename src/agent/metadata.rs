//! The instance metadata service of a launched cloud VM (`agent.cloud`): the instance's own name
//! for enrolment, and spot interruption notices.
//!
//! - AWS (IMDSv2): `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` gives a
//!   token (refreshed before it expires, and at once when the service refuses it), sent as
//!   `X-aws-ec2-metadata-token`; `GET /latest/meta-data/instance-id`;
//!   `GET /latest/meta-data/spot/instance-action` answers 404 (no notice) or
//!   `{"action":"terminate","time":"2026-…Z"}`.
//! - Azure (`Metadata: true`): `GET /metadata/instance/compute/name?api-version=2021-02-01&format=text`
//!   (the VM name, which the Azure provider sets to the launch id);
//!   `GET /metadata/scheduledevents?api-version=2020-07-01`: events of type `Preempt` whose
//!   `Resources` name this VM; acknowledged with `POST` of `{"StartRequests":[{"EventId":"…"}]}`.
//!
//! Requests have short timeouts: the service is on the host's link, but may be slow at boot, so
//! the instance name is tried a few times.

use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::agent::CloudKind;
use crate::model::retry::RetryPolicy;

/// The link-local address of both clouds' metadata services.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";
/// The IMDSv2 token lifetime asked for (the most AWS allows).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(21600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries of the instance name (the service may not answer yet at boot).
const NAME_TRIES: u32 = 6;
const AZURE_EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";
/// When a notice names no time: how long a Preempt leaves at least (Azure: 30 s).
const UNDATED_NOTICE: Duration = Duration::from_secs(30);

/// What went wrong talking to the metadata service.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata service client: {0}")]
    Client(String),
    #[error("metadata service {url}: {message}")]
    Request { url: String, message: String },
    #[error("metadata service {url}: http status {status}")]
    Status { url: String, status: u16 },
    #[error("metadata service {url}: unexpected answer: {why}")]
    Invalid { url: String, why: String },
}

/// A spot interruption notice: the instance goes away at `deadline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotNotice {
    /// `terminate`, `stop`, `hibernate` (AWS) or `preempt` (Azure).
    pub action: String,
    pub deadline: SystemTime,
    /// Azure's event id, to acknowledge.
    pub event_id: Option<String>,
    /// When the agent's poll saw it.
    pub seen_at: Instant,
    /// Set when the broker preempted the attempt (fair share or a higher priority): its reason.
    pub by_broker: Option<String>,
}

impl SpotNotice {
    /// The deadline as RFC 3339 (UTC, seconds), as written to `HYBROKER_PREEMPT_FILE`.
    pub fn deadline_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(self.deadline).to_string()
    }

    /// The reason an attempt it ended reports.
    pub fn reason(&self) -> String {
        match &self.by_broker {
            Some(reason) => reason.clone(),
            None => format!("spot interruption notice: {} at {}", self.action, self.deadline_rfc3339()),
        }
    }

    /// Time left before the deadline, from `now` (zero once it passed).
    pub fn time_left(&self, now: SystemTime) -> Duration {
        self.deadline.duration_since(now).unwrap_or_default()
    }
}

/// A cached IMDSv2 token.
struct ImdsToken {
    value: String,
    refresh_at: Instant,
}

/// The client of one instance's metadata service.
pub struct MetadataClient {
    http: reqwest::Client,
    base: String,
    cloud: CloudKind,
    token_ttl: Duration,
    token: Mutex<Option<ImdsToken>>,
    /// IMDSv2 tokens fetched so far.
    tokens_fetched: std::sync::atomic::AtomicU64,
}

impl MetadataClient {
    /// A client for `cloud`'s service at `base` (no trailing slash needed).
    pub fn new(cloud: CloudKind, base: &str) -> Result<Self, MetadataError> {
        let http = reqwest::Client::builder()
            .http1_only()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| MetadataError::Client(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            cloud,
            token_ttl: DEFAULT_TOKEN_TTL,
            token: Mutex::new(None),
            tokens_fetched: Default::default(),
        })
    }

    /// The IMDSv2 token lifetime to ask for (at least 1 s).
    pub fn with_token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    pub fn cloud(&self) -> CloudKind {
        self.cloud
    }

    /// IMDSv2 tokens fetched so far.
    pub fn tokens_fetched(&self) -> u64 {
        self.tokens_fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The instance's name: the EC2 instance id, or the Azure VM name. Tried a few times with
    /// backoff (the service may not answer yet at boot).
    pub async fn instance_name(&self) -> Result<String, MetadataError> {
        let policy = RetryPolicy::exponential(Duration::from_millis(200), Duration::from_secs(2)).with_jitter(0.3);
        let mut tries = 0;
        loop {
            tries += 1;
            match self.instance_name_once().await {
                Ok(name) => return Ok(name),
                Err(e) if tries < NAME_TRIES => {
                    tracing::warn!(tries, "instance metadata service: {e}; trying again");
                    tokio::time::sleep(policy.delay(tries, None, fastrand::f64())).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn instance_name_once(&self) -> Result<String, MetadataError> {
        let (url, text) = match self.cloud {
            CloudKind::Aws => {
                let url = format!("{}/latest/meta-data/instance-id", self.base);
                let text = self.aws_get(&url).await?.ok_or_else(|| status(&url, 404))?;
                (url, text)
            }
            CloudKind::Azure => {
                let url = format!("{}/metadata/instance/compute/name?api-version=2021-02-01&format=text", self.base);
                let resp = self.send(self.http.get(&url).header("Metadata", "true"), &url).await?;
                let text = ok_text(resp, &url).await?;
                (url, text)
            }
        };
        let name = text.trim().to_string();
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            return Err(MetadataError::Invalid { url, why: format!("{name:?} is not an instance name") });
        }
        Ok(name)
    }

    /// The current spot interruption notice for this instance (`vm_name`: the Azure VM), if any.
    pub async fn spot_notice(&self, vm_name: &str) -> Result<Option<SpotNotice>, MetadataError> {
        match self.cloud {
            CloudKind::Aws => {
                let url = format!("{}/latest/meta-data/spot/instance-action", self.base);
                let Some(text) = self.aws_get(&url).await? else { return Ok(None) };
                #[derive(Deserialize)]
                struct Action {
                    action: String,
                    time: String,
                }
                let a: Action = serde_json::from_str(&text)
                    .map_err(|e| MetadataError::Invalid { url: url.clone(), why: e.to_string() })?;
                let deadline = humantime::parse_rfc3339_weak(a.time.trim())
                    .map_err(|e| MetadataError::Invalid { url, why: format!("time {:?}: {e}", a.time) })?;
                Ok(Some(SpotNotice {
                    action: a.action,
                    deadline,
                    event_id: None,
                    seen_at: Instant::now(),
                    by_broker: None,
                }))
            }
            CloudKind::Azure => {
                let url = format!("{}{AZURE_EVENTS}", self.base);
                let resp = self.send(self.http.get(&url).header("Metadata", "true"), &url).await?;
                let text = ok_text(resp, &url).await?;
                let doc: ScheduledEvents = serde_json::from_str(&text)
                    .map_err(|e| MetadataError::Invalid { url: url.clone(), why: e.to_string() })?;
                Ok(doc.preempt_of(vm_name))
            }
        }
    }

    /// Azure: acknowledges the notice's event (the VM may go at once). AWS has nothing to say.
    pub async fn acknowledge(&self, notice: &SpotNotice) -> Result<(), MetadataError> {
        let (CloudKind::Azure, Some(id)) = (self.cloud, &notice.event_id) else { return Ok(()) };
        let url = format!("{}{AZURE_EVENTS}", self.base);
        let body = serde_json::json!({ "StartRequests": [{ "EventId": id }] });
        let resp = self.send(self.http.post(&url).header("Metadata", "true").json(&body), &url).await?;
        ok_text(resp, &url).await.map(drop)
    }

    /// An IMDSv2 GET: `None` on 404; a refused token (401) is fetched again once.
    async fn aws_get(&self, url: &str) -> Result<Option<String>, MetadataError> {
        for fresh in [false, true] {
            let token = self.aws_token(fresh).await?;
            let resp = self.send(self.http.get(url).header("X-aws-ec2-metadata-token", token), url).await?;
            match resp.status().as_u16() {
                404 => return Ok(None),
                401 if !fresh => continue,
                _ => return ok_text(resp, url).await.map(Some),
            }
        }
        unreachable!("the second pass returns")
    }

    /// The cached token, or a new one when it is near its end (at 80% of its lifetime) or `fresh`.
    async fn aws_token(&self, fresh: bool) -> Result<String, MetadataError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| !fresh && Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let url = format!("{}/latest/api/token", self.base);
        let asked = Instant::now();
        let request =
            self.http.put(&url).header("X-aws-ec2-metadata-token-ttl-seconds", self.token_ttl.as_secs().to_string());
        let value = ok_text(self.send(request, &url).await?, &url).await?;
        self.tokens_fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *cached = Some(ImdsToken { value: value.clone(), refresh_at: asked + self.token_ttl.mul_f64(0.8) });
        Ok(value)
    }

    async fn send(&self, request: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, MetadataError> {
        request.send().await.map_err(|e| MetadataError::Request { url: url.to_string(), message: describe(&e) })
    }
}

fn status(url: &str, status: u16) -> MetadataError {
    MetadataError::Status { url: url.to_string(), status }
}

async fn ok_text(resp: reqwest::Response, url: &str) -> Result<String, MetadataError> {
    if !resp.status().is_success() {
        return Err(status(url, resp.status().as_u16()));
    }
    resp.text().await.map_err(|e| MetadataError::Request { url: url.to_string(), message: describe(&e) })
}

/// An error with its causes (reqwest's own text is only the outermost).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Azure's Scheduled Events document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduledEvents {
    #[serde(default)]
    events: Vec<ScheduledEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduledEvent {
    event_id: String,
    event_type: String,
    #[serde(default)]
    resources: Vec<String>,
    /// RFC 1123 (`Mon, 19 Sep 2016 18:29:47 GMT`); empty once the event started.
    #[serde(default)]
    not_before: String,
}

impl ScheduledEvents {
    /// The first `Preempt` event naming `vm_name`, as a notice.
    fn preempt_of(&self, vm_name: &str) -> Option<SpotNotice> {
        let e = self.events.iter().find(|e| {
            e.event_type.eq_ignore_ascii_case("preempt") && e.resources.iter().any(|r| r.eq_ignore_ascii_case(vm_name))
        })?;
        let now = SystemTime::now();
        let deadline = httpdate::parse_http_date(e.not_before.trim()).unwrap_or(now + UNDATED_NOTICE);
        Some(SpotNotice {
            action: "preempt".into(),
            deadline,
            event_id: Some(e.event_id.clone()),
            seen_at: Instant::now(),
            by_broker: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_preempt_names_this_vm_only() {
        let doc: ScheduledEvents = serde_json::from_str(
            r#"{"DocumentIncarnation":2,"Events":[
                {"EventId":"A","EventType":"Reboot","Resources":["vm-1"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"},
                {"EventId":"B","EventType":"Preempt","Resources":["vm-2"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"},
                {"EventId":"C","EventType":"Preempt","Resources":["vm-1"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"}]}"#,
        )
        .unwrap();
        let notice = doc.preempt_of("vm-1").unwrap();
        assert_eq!(notice.event_id.as_deref(), Some("C"));
        assert_eq!(notice.reason(), "spot interruption notice: preempt at 2016-09-19T18:29:47Z");
        assert!(doc.preempt_of("vm-3").is_none());
    }

    #[test]
    fn time_left_stops_at_zero() {
        let notice = SpotNotice {
            action: "terminate".into(),
            deadline: SystemTime::UNIX_EPOCH + Duration::from_secs(100),
            event_id: None,
            seen_at: Instant::now(),
            by_broker: None,
        };
        assert_eq!(notice.time_left(SystemTime::UNIX_EPOCH + Duration::from_secs(40)), Duration::from_secs(60));
        assert_eq!(notice.time_left(SystemTime::UNIX_EPOCH + Duration::from_secs(400)), Duration::ZERO);
    }
}
