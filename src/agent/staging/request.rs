//! What every staging request shares: the retry loop with URL refresh, sending with timeouts,
//! error texts without secrets, and the progress meter.

use std::future::Future;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response};

use super::{Progress, Stage, StagingError, StagingLimits};
use crate::model::presigned::{Presigned, redact_url};

/// A URL expiring within this is refreshed before use, and a 403 on it is taken for expiry.
pub(super) const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// Fresh URLs one request may ask for (each one that still fails counts).
const MAX_REFRESHES: u32 = 3;
/// How much of an error body is read to find the store's code and message.
const ERROR_BODY_BYTES: usize = 4096;
/// Longest store message kept in an error.
const MESSAGE_CHARS: usize = 300;

/// What one try of a request came to, when not success.
pub(super) enum TryError {
    /// Worth another try after a pause: 5xx, 408, 429, timeouts, connection trouble, a body cut
    /// short. `after` is the store's `Retry-After`.
    Transient { reason: String, after: Option<Duration> },
    /// 403: another try helps only with a fresh URL, when this one has expired.
    Denied(String),
    /// Another try would fail the same way (most 4xx, a store that ignores ranges).
    Fatal(String),
    /// Ends the stage as it is (integrity, local I/O).
    Other(StagingError),
}

impl TryError {
    /// A transient failure without a hint when to try again.
    pub(super) fn transient(reason: impl Into<String>) -> TryError {
        TryError::Transient { reason: reason.into(), after: None }
    }
}

/// Where one request's URL comes from, and how to get a fresh one.
#[async_trait]
pub(super) trait UrlSlot: Sync {
    /// The newest URL for the request.
    fn current(&self) -> Presigned;
    /// A fresh URL, replacing `used`; when another request already replaced it, that one.
    async fn refresh(&self, used: &Presigned) -> Result<Presigned, StagingError>;
}

/// What the requests of one stage share.
pub(super) struct Ctx<'a> {
    pub http: &'a reqwest::Client,
    pub limits: &'a StagingLimits,
    pub meter: Meter<'a>,
}

/// Whether `p` expires within `margin` from now.
pub(super) fn expires_within(p: &Presigned, margin: Duration) -> bool {
    p.expires_at <= SystemTime::now() + margin
}

/// Drives the tries of one request: fresh URLs when they expire, jittered exponential backoff
/// after transient failures, at most `retries + 1` tries. The caller loops:
/// `let req = retry.request().await?;` then one try, then `retry.failed(e).await?` on failure.
pub(super) struct Retry<'r> {
    limits: &'r StagingLimits,
    stage: Stage,
    path: &'r str,
    slot: &'r dyn UrlSlot,
    request: Presigned,
    tries: u32,
    refreshes: u32,
}

impl<'r> Retry<'r> {
    pub(super) fn new(ctx: &'r Ctx<'_>, path: &'r str, slot: &'r dyn UrlSlot) -> Retry<'r> {
        let request = slot.current();
        Retry { limits: ctx.limits, stage: ctx.meter.stage, path, slot, request, tries: 0, refreshes: 0 }
    }

    /// The request for the next try; a fresh one when it has expired.
    pub(super) async fn request(&mut self) -> Result<Presigned, StagingError> {
        if expires_within(&self.request, Duration::ZERO) && self.refreshes < MAX_REFRESHES {
            self.refreshes += 1;
            self.request = self.slot.refresh(&self.request).await?;
        }
        self.tries += 1;
        Ok(self.request.clone())
    }

    /// After a failed try: `Ok` when another try is due (after the pause), else the error.
    pub(super) async fn failed(&mut self, error: TryError) -> Result<(), StagingError> {
        let (stage, path, tries) = (self.stage, self.path, self.tries);
        let failed = |reason| StagingError::Failed { stage, path: path.to_owned(), tries, reason };
        match error {
            TryError::Other(e) => Err(e),
            TryError::Fatal(reason) => Err(failed(reason)),
            TryError::Denied(reason) => {
                if !expires_within(&self.request, EXPIRY_MARGIN) || self.refreshes >= MAX_REFRESHES {
                    return Err(failed(reason));
                }
                tracing::debug!(%stage, path, "url expired; asking for a fresh one");
                self.refreshes += 1;
                self.tries -= 1;
                self.request = self.slot.refresh(&self.request).await?;
                Ok(())
            }
            TryError::Transient { reason, after } => {
                if tries > self.limits.retries {
                    return Err(failed(reason));
                }
                let pause = backoff(self.limits, tries, after);
                tracing::debug!(%stage, path, tries, reason, ?pause, "retrying");
                tokio::time::sleep(pause).await;
                self.request = self.slot.current();
                Ok(())
            }
        }
    }
}

/// The pause after the `tries`-th failed try: `min_backoff` doubled per try, capped at
/// `max_backoff`, uniformly jittered over its upper half; at least the store's hint (capped).
fn backoff(limits: &StagingLimits, tries: u32, hint: Option<Duration>) -> Duration {
    let policy = crate::model::retry::RetryPolicy::exponential(limits.min_backoff, limits.max_backoff);
    policy.with_jitter(0.5).delay(tries, hint, fastrand::f64())
}

/// A request for `p`: its method, URL and headers.
pub(super) fn request(http: &reqwest::Client, p: &Presigned) -> Result<RequestBuilder, TryError> {
    let method = Method::from_bytes(p.method.as_bytes())
        .map_err(|_| TryError::Fatal(format!("the broker sent an invalid method {:?}", p.method)))?;
    let mut builder = http.request(method, &p.url);
    for (name, value) in &p.headers {
        builder = builder.header(name, value);
    }
    Ok(builder)
}

/// Sends a request whose body is already known, waiting at most `request_timeout` for the
/// response headers; error statuses become [`TryError`]s.
pub(super) async fn send(ctx: &Ctx<'_>, builder: RequestBuilder) -> Result<Response, TryError> {
    let wait = ctx.limits.request_timeout;
    match tokio::time::timeout(wait, builder.send()).await {
        Err(_) => Err(TryError::transient(format!("no response within {}", humantime::format_duration(wait)))),
        Ok(Err(e)) => Err(from_reqwest(e)),
        Ok(Ok(response)) => check_status(ctx, response).await,
    }
}

/// The response when its status is a success, else the failure with the store's error.
pub(super) async fn check_status(ctx: &Ctx<'_>, response: Response) -> Result<Response, TryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let reason = error_text(ctx, response).await;
    Err(match status.as_u16() {
        403 => TryError::Denied(reason),
        408 | 429 | 500..=599 => TryError::Transient { reason, after },
        _ => TryError::Fatal(reason),
    })
}

/// "HTTP 404 Not Found (NoSuchKey: The specified key does not exist.)" from an error response:
/// the store's code and message (S3 and Azure XML, Azure's `x-ms-error-code`), else a snippet.
async fn error_text(ctx: &Ctx<'_>, mut response: Response) -> String {
    let status = response.status();
    let header_code = header(response.headers(), "x-ms-error-code");
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match tokio::time::timeout(ctx.limits.request_timeout, response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    let text = String::from_utf8_lossy(&body);
    let code = xml_element(&text, "Code").or(header_code);
    let message = xml_element(&text, "Message");
    let detail = match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {}", clean(&message)),
        (Some(code), None) => code,
        (None, _) => clean(&text),
    };
    if detail.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status} ({detail})") }
}

/// The text of the first `<name>…</name>` in `xml`.
fn xml_element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..start + end].trim().to_owned()).filter(|s| !s.is_empty())
}

/// One line of at most [`MESSAGE_CHARS`], URLs without their queries and signature-like
/// parameters dropped.
fn clean(text: &str) -> String {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| {
            if word.contains("://") {
                redact_url(word)
            } else if ["sig=", "signature="].iter().any(|s| word.to_ascii_lowercase().contains(s)) {
                "…".to_owned()
            } else {
                word.to_owned()
            }
        })
        .collect();
    let line = words.join(" ");
    match line.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A header's value as text.
pub(super) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// A client error as a transient failure (it is about the network, or a body cut short), or a
/// fatal one when the request could not even be built.
pub(super) fn from_reqwest(e: reqwest::Error) -> TryError {
    if e.is_builder() { TryError::Fatal(describe(e)) } else { TryError::transient(describe(e)) }
}

/// A client error for people, without its URL: "connection refused", "error sending request:
/// connection closed before message completed".
pub(super) fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut root: Option<&(dyn std::error::Error + 'static)> = None;
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io_text(io);
        }
        root = Some(s);
        source = s.source();
    }
    match root {
        _ if timeout => "timed out".to_owned(),
        Some(root) => clean(&format!("{e}: {root}")),
        None => clean(&e.to_string()),
    }
}

/// "connection refused" for "Connection refused (os error 111)".
pub(super) fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.rfind(" (os error ").map_or(text.as_str(), |cut| &text[..cut]);
    // A leading capital is lowered, unless it starts an acronym ("TLS …").
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            first.to_lowercase().chain(text[first.len_utf8()..].chars()).collect()
        }
        _ => text.to_owned(),
    }
}

/// When an upload last made progress, and how much of its body went out.
pub(super) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    sent: AtomicU64,
    /// A local error while reading the body (which the client reports only as a body error).
    pub local_error: Mutex<Option<std::io::Error>>,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            local_error: Mutex::default(),
        }
    }

    /// Records progress now, `bytes` more sent.
    pub(super) fn touch(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        let now = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Bytes of the body handed to the client so far.
    pub(super) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn idle(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Runs `fut` while it makes progress: `None` once nothing moved for `idle`. `on_tick` runs
    /// about once a second meanwhile.
    pub(super) async fn watch<F: Future>(
        &self,
        idle: Duration,
        fut: F,
        mut on_tick: impl FnMut(),
    ) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let tick = idle.min(Duration::from_secs(1)).max(Duration::from_millis(10));
        loop {
            match tokio::time::timeout(tick, &mut fut).await {
                Ok(out) => return Some(out),
                Err(_) => {
                    on_tick();
                    if self.idle() >= idle {
                        return None;
                    }
                }
            }
        }
    }
}

/// Counts a stage's progress and reports it: at start, at most once a second, at the end.
pub(super) struct Meter<'a> {
    pub stage: Stage,
    bytes_total: u64,
    files_total: u32,
    bytes: AtomicU64,
    files: AtomicU32,
    last: Mutex<Instant>,
    sink: &'a (dyn Fn(Progress) + Send + Sync),
}

impl<'a> Meter<'a> {
    /// A meter at zero; reports that at once.
    pub(super) fn start(
        stage: Stage,
        bytes_total: u64,
        files_total: u32,
        sink: &'a (dyn Fn(Progress) + Send + Sync),
    ) -> Meter<'a> {
        let meter = Meter {
            stage,
            bytes_total,
            files_total,
            bytes: AtomicU64::new(0),
            files: AtomicU32::new(0),
            last: Mutex::new(Instant::now()),
            sink,
        };
        (meter.sink)(meter.now());
        meter
    }

    fn now(&self) -> Progress {
        Progress {
            stage: self.stage,
            bytes_done: self.bytes.load(Ordering::Relaxed).min(self.bytes_total),
            bytes_total: self.bytes_total,
            files_done: self.files.load(Ordering::Relaxed),
            files_total: self.files_total,
        }
    }

    /// Counts `n` more bytes.
    pub(super) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.maybe_report();
    }

    /// Counts one more file.
    pub(super) fn add_file(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.maybe_report();
    }

    fn maybe_report(&self) {
        let due = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= Duration::from_secs(1);
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            (self.sink)(self.now());
        }
    }

    /// Reports the end (everything moved).
    pub(super) fn finish(&self) {
        self.bytes.store(self.bytes_total, Ordering::Relaxed);
        self.files.store(self.files_total, Ordering::Relaxed);
        (self.sink)(self.now());
    }
}

/// Credits the bytes of one request to the meter, once each: a retry that goes over the same
/// bytes again does not count them again.
#[derive(Default)]
pub(super) struct Credit(u64);

impl Credit {
    /// `done` bytes of the request are now moved.
    pub(super) fn to(&mut self, meter: &Meter<'_>, done: u64) {
        if done > self.0 {
            meter.add_bytes(done - self.0);
            self.0 = done;
        }
    }
}
