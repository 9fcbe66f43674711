//! Following a job: its Server-Sent Events, resumed with `Last-Event-ID` when the stream drops, shown
//! as one updating spinner line on a terminal or one line per event otherwise; and its output.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use tokio_stream::StreamExt;

use super::gateway::{ClientError, Gateway};
use super::output::{event_line, is_terminal, short_duration};
use super::sse::{SseEvent, SseParser};
use crate::gateway::api::{JobEvent, Problem};
use crate::model::retry::{RetryLimit, RetryPolicy};

/// Reconnects to a job's event stream: 200 ms doubling to 3.2 s, a little jitter, 5 retries in a row.
fn reconnect_policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(200), Duration::from_millis(3200))
        .with_jitter(0.25)
        .with_limit(RetryLimit::Tries(6))
}
const SPINNER_TICK: Duration = Duration::from_millis(100);
const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// How a followed job's events are shown.
pub enum Progress {
    /// One line on stderr, redrawn in place: `⠋ train-h100  running on lab/node-a  12s`.
    Spinner { name: String, status: String, started: Instant, frame: usize },
    /// One line per event on stderr: `12:00:01 running    lab/node-a           started`.
    Lines,
    /// The events are the command's output (`jobs events`): lines, or each event's JSON, on stdout.
    Stdout { json: bool },
    /// Nothing shown (the quickstart prints its own summary).
    Quiet,
}

impl Progress {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    pub fn live(name: &str) -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Spinner { name: name.into(), status: "waiting".into(), started: Instant::now(), frame: 0 }
        } else {
            Progress::Lines
        }
    }

    fn event(&mut self, event: &JobEvent, raw: &str) {
        match self {
            Progress::Spinner { status, .. } => {
                *status = match event.agent.as_deref().filter(|a| !a.is_empty()) {
                    Some(agent) => format!("{} on {agent}", event.state),
                    None => event.state.clone(),
                };
                self.tick();
            }
            Progress::Lines => eprintln!("{}", event_line(event)),
            Progress::Stdout { json: true } => println!("{raw}"),
            Progress::Stdout { json: false } => println!("{}", event_line(event)),
            Progress::Quiet => {}
        }
    }

    /// A transient message (a reconnect).
    fn note(&mut self, message: &str) {
        match self {
            Progress::Spinner { status, .. } => {
                *status = message.to_string();
                self.tick();
            }
            _ => eprintln!("{}", crate::model::text::escape(message)),
        }
    }

    fn tick(&mut self) {
        if let Progress::Spinner { name, status, started, frame } = self {
            *frame = (*frame + 1) % FRAMES.len();
            let elapsed = short_duration(started.elapsed());
            let (name, status) = (crate::model::text::escape(name), crate::model::text::escape(status));
            let line: String = format!("{} {name}  {status}  {elapsed}", FRAMES[*frame]).chars().take(100).collect();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    }

    /// Clears the spinner line.
    fn finish(&mut self) {
        if let Progress::Spinner { .. } = self {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }

    fn animated(&self) -> bool {
        matches!(self, Progress::Spinner { .. })
    }
}

/// Shows the job's events until its terminal one; reconnects with `Last-Event-ID` when the stream
/// drops or the gateway fails (5xx), up to five times in a row ([`reconnect_policy`]).
pub async fn follow_events(gw: &Gateway, id: &str, progress: &mut Progress) -> anyhow::Result<JobEvent> {
    let result = follow(gw, id, progress).await;
    progress.finish();
    result
}

async fn follow(gw: &Gateway, id: &str, progress: &mut Progress) -> anyhow::Result<JobEvent> {
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    let mut ticker = tokio::time::interval(SPINNER_TICK);
    loop {
        let mut rb = gw.request(Method::GET, &["v1", "jobs", id, "events"], true).header(ACCEPT, "text/event-stream");
        if let Some(last) = &last_id {
            rb = rb.header("Last-Event-ID", last.as_str());
        }
        let why = match gw.send(rb).await {
            Ok(resp) => {
                let mut stream = resp.bytes_stream();
                let mut parser = SseParser::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = stream.next() => chunk,
                        _ = ticker.tick(), if progress.animated() => {
                            progress.tick();
                            continue;
                        }
                    };
                    let bytes = match chunk {
                        Some(Ok(bytes)) => bytes,
                        Some(Err(e)) => break gw.transport_error(&e),
                        None => break anyhow::anyhow!("the stream ended before the job did"),
                    };
                    let before = last_id.clone();
                    match handle(parser.feed(&bytes), &mut last_id, progress) {
                        Ok(Some(end)) => return Ok(end),
                        Ok(None) if last_id != before => failures = 0,
                        Ok(None) => {}
                        Err(e) if retryable(&e) => break e,
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if retryable(&e) => e,
            Err(e) => return Err(e),
        };
        failures += 1;
        let Some(pause) = reconnect_policy().next_delay(failures, Duration::ZERO, None, fastrand::f64()) else {
            return Err(why.context(format!("lost the event stream of job {id}")));
        };
        progress.note(&format!("reconnecting to the event stream ({why:#})"));
        tokio::time::sleep(pause).await;
    }
}

/// Shows the events; returns the terminal one if it came. An `error` event (the gateway lost its
/// own stream) is a problem details document and fails like an error answer.
fn handle(
    events: Vec<SseEvent>,
    last_id: &mut Option<String>,
    progress: &mut Progress,
) -> anyhow::Result<Option<JobEvent>> {
    for sse in events {
        if sse.event == "error" {
            let status = serde_json::from_str::<Problem>(&sse.data).map_or(502, |p| p.status);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(ClientError::from_answer(status, sse.data.as_bytes(), None).into());
        }
        // The event's name is the job's state; its data says the same.
        let event: JobEvent = serde_json::from_str(&sse.data)
            .with_context(|| format!("unexpected event from the gateway: {}", sse.data))?;
        *last_id = Some(sse.id.unwrap_or_else(|| event.seq.to_string()));
        progress.event(&event, &sse.data);
        if is_terminal(&event.state) {
            return Ok(Some(event));
        }
    }
    Ok(None)
}

/// Transport failures and the gateway's own failures are worth a retry; a refusal (4xx) is not.
fn retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError { status: Some(status), .. }) => *status >= 500 || *status == 429,
        Some(_) => true,
        None => false,
    }
}

/// Copies the job's output to stdout as it arrives (until the job ends, with `follow`). Returns
/// false when stdout was closed first (`| head`).
pub async fn stream_logs(gw: &Gateway, id: &str, follow: bool) -> anyhow::Result<bool> {
    let mut rb = gw.request(Method::GET, &["v1", "jobs", id, "logs"], follow);
    if follow {
        rb = rb.query(&[("follow", "true")]);
    }
    let mut stream = gw.send(rb).await?.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| gw.transport_error(&e))?;
        let mut out = std::io::stdout().lock();
        match out.write_all(&chunk).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(false),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sse(seq: u64, state: &str) -> String {
        let data = format!(
            r#"{{"seq":{seq},"job_id":"j1","state":"{state}","attempt":1,"agent":null,"reason":"","exit_code":null,"at":"2026-01-01T12:00:0{seq}.000Z"}}"#
        );
        format!("id: {seq}\nevent: {state}\ndata: {data}\n\n")
    }

    #[test]
    fn refusals_are_final_and_failures_are_retried() {
        let status = |s: u16| anyhow::Error::from(ClientError { message: "x".into(), status: Some(s), hint: None });
        assert!(!retryable(&status(404)));
        assert!(!retryable(&status(401)));
        assert!(retryable(&status(503)));
        assert!(retryable(&status(429)));
        assert!(retryable(&ClientError::new("connection refused", None).into()));
        assert!(!retryable(&anyhow::anyhow!("bad event")));
    }

    #[test]
    fn events_move_the_resume_point_and_an_error_event_is_retried() {
        let mut parser = SseParser::new();
        let mut last = None;
        let stream = format!(": keep-alive\n\n{}{}", sse(1, "queued"), sse(2, "running"));
        assert_eq!(handle(parser.feed(stream.as_bytes()), &mut last, &mut Progress::Lines).unwrap(), None);
        assert_eq!(last.as_deref(), Some("2"));
        let end = handle(parser.feed(sse(3, "succeeded").as_bytes()), &mut last, &mut Progress::Lines).unwrap();
        assert_eq!(end.map(|e| e.seq), Some(3));
        let error = "event: error\ndata: {\"type\":\"x\",\"title\":\"t\",\"status\":503,\"detail\":\"broke off\"}\n\n";
        let e = handle(parser.feed(error.as_bytes()), &mut last, &mut Progress::Lines).unwrap_err();
        assert!(retryable(&e) && e.to_string() == "broke off (503)", "{e}");
        let e = handle(parser.feed(b"data: nonsense\n\n"), &mut last, &mut Progress::Lines).unwrap_err();
        assert!(!retryable(&e), "{e}");
    }

    /// Serves one canned answer per connection and records each request's head.
    async fn serve(answers: Vec<String>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut heads = Vec::new();
            for answer in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    conn.read_exact(&mut byte).await.unwrap();
                    head.push(byte[0]);
                }
                heads.push(String::from_utf8(head).unwrap().to_lowercase());
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
            heads
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_dropped_stream_resumes_after_the_last_event_seen() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        let answers = vec![
            format!("{ok}{}{}data: {{\"cut off", sse(1, "queued"), sse(2, "running")),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
            format!("{ok}{}", sse(3, "failed")),
        ];
        let (url, server) = serve(answers).await;
        let gw = Gateway::new(&url, Some("k"), None).unwrap();
        let end = follow_events(&gw, "j1", &mut Progress::Lines).await.unwrap();
        assert_eq!((end.seq, end.state.as_str()), (3, "failed"));
        let heads = server.await.unwrap();
        assert!(heads[0].starts_with("get /v1/jobs/j1/events ") && !heads[0].contains("last-event-id"), "{}", heads[0]);
        assert!(heads[0].contains("authorization: bearer k\r\n"), "{}", heads[0]);
        assert!(heads[1].contains("last-event-id: 2\r\n"), "{}", heads[1]);
        assert!(heads[2].contains("last-event-id: 2\r\n"), "{}", heads[2]);
    }

    #[tokio::test]
    async fn a_refusal_is_not_retried() {
        let body = r#"{"type":"x","title":"Not Found","status":404,"detail":"job j1 not found"}"#;
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (url, _server) = serve(vec![answer]).await;
        let gw = Gateway::new(&url, Some("k"), None).unwrap();
        let e = follow_events(&gw, "j1", &mut Progress::Lines).await.unwrap_err();
        assert_eq!(e.to_string(), "job j1 not found (404)");
    }
}
