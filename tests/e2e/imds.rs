//! An instance metadata service fixture on 127.0.0.1:0, in the real wire formats: AWS IMDSv2
//! (token, instance id, `spot/instance-action`) and Azure IMDS (compute name, Scheduled Events
//! with their acknowledgements recorded). The test announces an interruption with
//! [`Imds::announce`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};

/// What the fixture serves and what it saw.
#[derive(Default)]
struct Served {
    instance_id: String,
    /// `(action, deadline)` once announced.
    notice: Option<(String, SystemTime)>,
    /// When a poll first got the notice.
    first_served: Option<SystemTime>,
    /// Tokens handed out, with their ends.
    tokens: Vec<(String, Instant)>,
    /// Requests refused for a missing, unknown or expired token or a missing `Metadata: true`.
    refused: u32,
    /// Azure event ids acknowledged, in order.
    acknowledged: Vec<String>,
}

pub struct Imds {
    pub addr: SocketAddr,
    served: Arc<Mutex<Served>>,
    task: tokio::task::JoinHandle<()>,
}

/// The Azure event id of an announced preemption.
pub const EVENT_ID: &str = "A123BC45-1234-5678-AB90-ABCDEF123456";

impl Imds {
    /// Serves `instance_id` (the EC2 instance id, and the Azure VM name).
    pub async fn start(instance_id: &str) -> Imds {
        let served = Arc::new(Mutex::new(Served { instance_id: instance_id.into(), ..Served::default() }));
        let app = Router::new()
            .route("/latest/api/token", put(aws_token))
            .route("/latest/meta-data/instance-id", get(aws_instance_id))
            .route("/latest/meta-data/spot/instance-action", get(aws_instance_action))
            .route("/metadata/instance/compute/name", get(azure_name))
            .route("/metadata/scheduledevents", get(azure_events).post(azure_ack))
            .with_state(served.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Imds { addr, served, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, polls see an interruption: `action` (AWS) / a `Preempt` event (Azure) at `deadline`.
    pub fn announce(&self, action: &str, deadline: SystemTime) {
        self.served.lock().unwrap().notice = Some((action.into(), deadline));
    }

    /// When a poll first got the notice.
    pub fn first_served(&self) -> Option<SystemTime> {
        self.served.lock().unwrap().first_served
    }

    /// IMDSv2 tokens handed out so far.
    pub fn tokens(&self) -> usize {
        self.served.lock().unwrap().tokens.len()
    }

    /// Requests refused (no valid token, no `Metadata: true`).
    pub fn refused(&self) -> u32 {
        self.served.lock().unwrap().refused
    }

    /// Azure event ids acknowledged so far.
    pub fn acknowledged(&self) -> Vec<String> {
        self.served.lock().unwrap().acknowledged.clone()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = State<Arc<Mutex<Served>>>;

async fn aws_token(State(s): Shared, headers: HeaderMap) -> Response {
    let ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
        s.lock().unwrap().refused += 1;
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = format!("AQAEA{}", fastrand::u64(..));
    s.lock().unwrap().tokens.push((token.clone(), Instant::now() + Duration::from_secs(ttl)));
    token.into_response()
}

/// 401 unless the request carries a live token.
fn check_token(s: &mut Served, headers: &HeaderMap) -> Result<(), StatusCode> {
    let token = headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if s.tokens.iter().any(|(t, end)| t == token && Instant::now() < *end) {
        Ok(())
    } else {
        s.refused += 1;
        Err(StatusCode::UNAUTHORIZED)
    }
}

async fn aws_instance_id(State(s): Shared, headers: HeaderMap) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refused) = check_token(&mut s, &headers) {
        return refused.into_response();
    }
    s.instance_id.clone().into_response()
}

async fn aws_instance_action(State(s): Shared, headers: HeaderMap) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refused) = check_token(&mut s, &headers) {
        return refused.into_response();
    }
    let Some((action, deadline)) = s.notice.clone() else { return StatusCode::NOT_FOUND.into_response() };
    s.first_served.get_or_insert_with(SystemTime::now);
    let time = humantime::format_rfc3339_seconds(deadline).to_string();
    Json(serde_json::json!({ "action": action, "time": time })).into_response()
}

/// 400 without `Metadata: true`, as Azure answers.
fn check_metadata_header(s: &mut Served, headers: &HeaderMap) -> Result<(), StatusCode> {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) == Some("true") {
        Ok(())
    } else {
        s.refused += 1;
        Err(StatusCode::BAD_REQUEST)
    }
}

#[derive(serde::Deserialize)]
struct AzureQuery {
    #[serde(rename = "api-version")]
    api_version: String,
    format: Option<String>,
}

async fn azure_name(State(s): Shared, Query(q): Query<AzureQuery>, headers: HeaderMap) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refused) = check_metadata_header(&mut s, &headers) {
        return refused.into_response();
    }
    if q.api_version != "2021-02-01" || q.format.as_deref() != Some("text") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    s.instance_id.clone().into_response()
}

async fn azure_events(State(s): Shared, Query(q): Query<AzureQuery>, headers: HeaderMap) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refused) = check_metadata_header(&mut s, &headers) {
        return refused.into_response();
    }
    if q.api_version != "2020-07-01" {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut events = vec![serde_json::json!({
        "EventId": "F0000000-0000-0000-0000-000000000001", "EventStatus": "Scheduled", "EventType": "Freeze",
        "ResourceType": "VirtualMachine", "Resources": ["some-other-vm"], "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
        "Description": "", "EventSource": "Platform", "DurationInSeconds": 9
    })];
    let acked = s.acknowledged.iter().any(|id| id == EVENT_ID);
    if let Some((_, deadline)) = s.notice.clone().filter(|_| !acked) {
        s.first_served.get_or_insert_with(SystemTime::now);
        events.push(serde_json::json!({
            "EventId": EVENT_ID, "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType": "VirtualMachine",
            "Resources": [s.instance_id], "NotBefore": httpdate::fmt_http_date(deadline), "Description": "",
            "EventSource": "Platform", "DurationInSeconds": -1
        }));
    }
    Json(serde_json::json!({ "DocumentIncarnation": 1 + events.len(), "Events": events })).into_response()
}

async fn azure_ack(State(s): Shared, headers: HeaderMap, Json(body): Json<serde_json::Value>) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refused) = check_metadata_header(&mut s, &headers) {
        return refused.into_response();
    }
    let ids = body["StartRequests"].as_array().cloned().unwrap_or_default();
    for id in ids.iter().filter_map(|r| r["EventId"].as_str()) {
        s.acknowledged.push(id.to_string());
    }
    StatusCode::OK.into_response()
}
