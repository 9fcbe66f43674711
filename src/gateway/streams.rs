//! The long-lived answers: a job's events as Server-Sent Events (resumable with `Last-Event-ID`)
//! and its output, as a tail or followed while the job runs. Both end when the gateway stops, and
//! each open one holds one of its tenant's stream slots ([`super::limits::StreamSlots`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use super::AppState;
use super::api::{self, JobEvent};
use super::auth::Tenant;
use super::openapi::{BadRequest, NotFound, TenantErrors};
use super::problem::{HttpError, PROBLEM_BASE};
use crate::proto;

/// How often a followed log asks the broker for new output.
const LOG_POLL: Duration = Duration::from_millis(200);
/// SSE keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Follow a job's events (Server-Sent Events).
///
/// A `text/event-stream`: each event has `id` = the event's sequence number, `event` = the job's
/// state and one `data:` line holding a `JobEvent` as JSON (the schema `x-sse-data` names); lines
/// `: keep-alive` come every 15 s. The stream ends after the terminal event. If the broker goes
/// away mid-stream, a last event `error` carries a `Problem` (503). Reconnect with
/// `Last-Event-ID` to resume after the last event seen. Each open stream counts against the
/// tenant's `max_streams_per_tenant` (with followed logs); beyond it, 429.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    operation_id = "job_events",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events, each `data` a `JobEvent` (JSON)", content_type = "text/event-stream",
            body = String, headers(("Cache-Control" = String, description = "no-cache"))),
        BadRequest, NotFound, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| {
            HttpError::BadRequest("last-event-id: must be the id (a number) of an event of this stream".into())
        })?,
    };
    // Held by the forwarding task: freed when the stream ends, the client goes or the gateway stops.
    let slot = state.limits().streams.acquire(&tenant.name)?;
    // The broker resumes after `after_seq`, and ends at once for a job that already finished.
    let request = proto::WatchJobRequest { job_id: id, tenant: tenant.name, after_seq: after };
    let mut watch = state.jobs().watch(request).await?.into_inner();
    let mut stopping = state.stopping();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                _ = stopping.wait_for(|stop| *stop) => return,
                next = watch.next() => next,
            };
            let event = match next {
                None => return,
                Some(Ok(ev)) => {
                    let ev = JobEvent::from(ev);
                    Event::default().id(ev.seq.to_string()).event(ev.state.clone()).json_data(&ev)
                }
                Some(Err(status)) => {
                    let detail = HttpError::from(status).to_string();
                    let problem = api::Problem {
                        kind: format!("{PROBLEM_BASE}unavailable"),
                        title: "Service Unavailable".into(),
                        status: 503,
                        detail: format!("the event stream broke off ({detail}); reconnect with Last-Event-ID"),
                        instance: None,
                    };
                    let _ = tx.send(Ok(Event::default().event("error").json_data(&problem).unwrap_or_default())).await;
                    return;
                }
            };
            let Ok(event) = event else { return };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    let keep_alive = KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive");
    let mut response = Sse::new(ReceiverStream::new(rx)).keep_alive(keep_alive).into_response();
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// `GET /v1/jobs/{id}/logs` options.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the answer open and stream new output until the job ends.
    #[serde(default)]
    pub follow: bool,
    /// An attempt number; default: the latest attempt.
    #[serde(default)]
    pub attempt: u32,
}

/// A job's output: the tail the broker keeps, or followed until the job ends (`follow=true`).
///
/// When a followed job starts a new attempt, a line `--- attempt N ---` separates the outputs. A
/// followed log counts against the tenant's `max_streams_per_tenant` (with event streams) while
/// it is open; beyond it, 429.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/logs",
    operation_id = "job_logs",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id"), LogsQuery),
    responses(
        (status = 200, description = "The output (with `follow=true`, streamed until the job ends)",
            content_type = "text/plain", body = String),
        BadRequest, NotFound, TenantErrors,
    ),
    security(("bearer" = []))
)]
pub async fn logs(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, HttpError> {
    // A followed log holds a stream slot while it is open (a plain tail needs none).
    let slot = if query.follow { Some(state.limits().streams.acquire(&tenant.name)?) } else { None };
    let follower = LogFollower { state, job_id: id, tenant: tenant.name, pinned: query.attempt };
    let first = follower.fetch(query.attempt, 0).await?;
    let body = if !query.follow || first.done {
        Body::from(first.output)
    } else {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
        tokio::spawn(async move {
            let _slot = slot;
            follower.follow(first, tx).await;
        });
        Body::from_stream(ReceiverStream::new(rx))
    };
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    Ok((headers, body).into_response())
}

/// Polls the broker's Logs with offsets for one job of one tenant.
struct LogFollower {
    state: AppState,
    job_id: String,
    tenant: String,
    /// The attempt asked for (0 = always the latest).
    pinned: u32,
}

impl LogFollower {
    /// Output of `attempt` (0 = latest) after `offset`; `done` once the job is over.
    async fn fetch(&self, attempt: u32, offset: u64) -> Result<proto::LogsResponse, HttpError> {
        let request = proto::LogsRequest { job_id: self.job_id.clone(), tenant: self.tenant.clone(), attempt, offset };
        Ok(self.state.jobs().logs(request).await?.into_inner())
    }

    /// Streams new output into `tx` until the job is over, the client goes or the gateway stops.
    async fn follow(self, first: proto::LogsResponse, tx: mpsc::Sender<Result<Bytes, Infallible>>) {
        let mut out = LogOut { tx, at_line_start: true };
        let mut stopping = self.state.stopping();
        let (mut attempt, mut offset) = (first.attempt, first.next_offset);
        if !out.send(first.output).await {
            return;
        }
        loop {
            tokio::select! {
                () = out.tx.closed() => return,
                _ = stopping.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(LOG_POLL) => {}
            }
            let mut next = match self.fetch(self.pinned, offset).await {
                Ok(next) => next,
                Err(e) => {
                    out.note(&format!("log stream interrupted: {e}")).await;
                    return;
                }
            };
            if attempt != 0 && next.attempt != 0 && next.attempt != attempt {
                // A new attempt: first what the old one wrote since the last poll, then the new
                // one's output from its start.
                if let Ok(rest) = self.fetch(attempt, offset).await
                    && !out.send(rest.output).await
                {
                    return;
                }
                (attempt, offset) = (next.attempt, 0);
                if !out.note(&format!("attempt {attempt}")).await {
                    return;
                }
                match self.fetch(attempt, 0).await {
                    Ok(from_start) => next = proto::LogsResponse { done: next.done, ..from_start },
                    Err(e) => {
                        out.note(&format!("log stream interrupted: {e}")).await;
                        return;
                    }
                }
            } else if attempt == 0 {
                attempt = next.attempt;
            }
            if next.truncated && offset > 0 && !out.note("output dropped").await {
                return;
            }
            if !out.send(next.output).await {
                return;
            }
            offset = next.next_offset;
            if next.done {
                return;
            }
        }
    }
}

/// The followed log's side of the answer.
struct LogOut {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    at_line_start: bool,
}

impl LogOut {
    /// Sends output; false once the client is gone.
    async fn send(&mut self, data: Vec<u8>) -> bool {
        let Some(&last) = data.last() else { return true };
        self.at_line_start = last == b'\n';
        self.tx.send(Ok(Bytes::from(data))).await.is_ok()
    }

    /// Sends a line `--- text ---` of its own.
    async fn note(&mut self, text: &str) -> bool {
        let newline = if self.at_line_start { "" } else { "\n" };
        self.send(format!("{newline}--- {text} ---\n").into_bytes()).await
    }
}
