//! A fault-injecting EC2 proxy for the capacity tests: an HTTP server on 127.0.0.1:0 in front of
//! moto's EC2 Query API that adds what moto lacks, controlled from the test:
//! - `ClientToken` idempotency as EC2 has it: a `RunInstances` whose token already launched gets
//!   the first answer again (never a second instance), or `IdempotentParameterMismatch` when its
//!   parameters differ; failed launches do not bind their token;
//! - scripted faults for the next `RunInstances` calls ([`Fault`]): any EC2 error (status, code,
//!   message, in EC2's XML error document), or "forward, then drop the reply" (the instance exists
//!   in moto, the client sees the connection close without an answer; its token is bound);
//! - counters: `RunInstances` received and forwarded to moto, `DescribeInstances` calls;
//! - a page size forced onto `DescribeInstances` (`MaxResults`), so that paging is exercised.
//!
//! Other calls are forwarded unchanged. moto does not check signatures, so rewriting a body is fine.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What the proxy does to one `RunInstances` instead of (or after) forwarding it.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answers with an EC2 error document; moto never sees the call.
    Error { status: u16, code: String, message: String },
    /// Forwards the call (moto makes the instance, the token is bound), then closes the connection
    /// without an answer.
    DropReply,
}

impl Fault {
    pub fn error(status: u16, code: &str) -> Fault {
        Fault::Error { status, code: code.into(), message: format!("scripted {code} from the test proxy") }
    }

    /// `InsufficientInstanceCapacity` as EC2 sends it (HTTP 500).
    pub fn insufficient_capacity() -> Fault {
        Fault::error(500, "InsufficientInstanceCapacity")
    }

    /// `RequestLimitExceeded` as EC2 sends it (HTTP 503).
    pub fn throttled() -> Fault {
        Fault::error(503, "RequestLimitExceeded")
    }
}

/// The proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `RunInstances` calls that arrived.
    pub run_received: u32,
    /// `RunInstances` calls that reached moto (each made an instance there).
    pub run_forwarded: u32,
    pub describe: u32,
}

/// A launch whose token is bound: its parameters and the answer to repeat.
struct Bound {
    params: Vec<(String, String)>,
    status: u16,
    body: String,
}

#[derive(Default)]
struct Inner {
    faults: VecDeque<Fault>,
    tokens: HashMap<String, Bound>,
    counts: Counts,
    page_size: Option<u32>,
    /// The parameters of every `RunInstances` received, in order.
    run_requests: Vec<Vec<(String, String)>>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    inner: Mutex<Inner>,
    /// `RunInstances` calls one at a time, so a token is bound before its repeat is looked at.
    launching: tokio::sync::Mutex<()>,
}

/// The running proxy; it stops when dropped.
pub struct Ec2Proxy {
    port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ec2Proxy {
    /// A proxy in front of `upstream` (`http://127.0.0.1:PORT`, moto).
    pub async fn start(upstream: &str) -> Ec2Proxy {
        hybroker::tls::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http,
            inner: Mutex::new(Inner::default()),
            launching: tokio::sync::Mutex::new(()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(shared.clone(), request));
                    // An error here is a dropped reply (or a client gone): the connection just ends.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ec2Proxy { port, shared, task }
    }

    /// `http://127.0.0.1:PORT`: the `endpoint` of `[site.capacity.aws]`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next `RunInstances` calls get these faults, in order (after any still scripted).
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner().faults.extend(faults);
    }

    /// Faults scripted but not used yet.
    pub fn faults_left(&self) -> usize {
        self.inner().faults.len()
    }

    pub fn counts(&self) -> Counts {
        self.inner().counts
    }

    /// Forces `MaxResults` of every `DescribeInstances` to `size` (moto accepts any).
    pub fn page_size(&self, size: u32) {
        self.inner().page_size = Some(size);
    }

    /// The parameters of every `RunInstances` received so far.
    pub fn run_requests(&self) -> Vec<Vec<(String, String)>> {
        self.inner().run_requests.clone()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }
}

/// The value of `key` in a form's parameters.
pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Why a connection is closed without an answer.
#[derive(Debug)]
struct DroppedReply;

impl std::fmt::Display for DroppedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reply dropped by the test proxy")
    }
}

impl std::error::Error for DroppedReply {}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, DroppedReply> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(Body::new(body), 1 << 20).await.map_err(|_| DroppedReply)?;
    let mut params = form(&body);
    let action = param(&params, "Action").unwrap_or_default().to_owned();
    match action.as_str() {
        "RunInstances" => return run_instances(&shared, &parts, params).await,
        "DescribeInstances" => {
            let mut inner = shared.inner.lock().unwrap();
            inner.counts.describe += 1;
            if let Some(size) = inner.page_size {
                params.retain(|(k, _)| k != "MaxResults");
                params.push(("MaxResults".into(), size.to_string()));
            }
        }
        _ => {}
    }
    let (status, body) = forward(&shared, &parts, &params).await;
    Ok(answer(status, body))
}

async fn run_instances(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    params: Vec<(String, String)>,
) -> Result<Response<Body>, DroppedReply> {
    let _one_at_a_time = shared.launching.lock().await;
    let token = param(&params, "ClientToken").map(str::to_owned);
    let fault = {
        let mut inner = shared.inner.lock().unwrap();
        inner.counts.run_received += 1;
        inner.run_requests.push(params.clone());
        if let Some(bound) = token.as_ref().and_then(|t| inner.tokens.get(t)) {
            return Ok(if same_launch(&bound.params, &params) {
                answer(bound.status, bound.body.clone())
            } else {
                error_answer(
                    400,
                    "IdempotentParameterMismatch",
                    "The client token you have provided is associated with a resource that is already deleted or has different parameters",
                )
            });
        }
        inner.faults.pop_front()
    };
    if let Some(Fault::Error { status, code, message }) = &fault {
        return Ok(error_answer(*status, code, message));
    }
    let (status, body) = forward(shared, parts, &params).await;
    {
        let mut inner = shared.inner.lock().unwrap();
        inner.counts.run_forwarded += 1;
        if let Some(token) = token
            && (200..300).contains(&status)
        {
            inner.tokens.insert(token, Bound { params, status, body: body.clone() });
        }
    }
    match fault {
        Some(Fault::DropReply) => Err(DroppedReply),
        _ => Ok(answer(status, body)),
    }
}

/// Whether two `RunInstances` ask for the same launch (EC2 compares every parameter).
fn same_launch(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let sorted = |p: &[(String, String)]| {
        let mut p = p.to_vec();
        p.sort();
        p
    };
    sorted(a) == sorted(b)
}

/// Sends the call on to moto with the client's headers (its signature included); a failure to
/// reach moto is a 502.
async fn forward(shared: &Shared, parts: &hyper::http::request::Parts, params: &[(String, String)]) -> (u16, String) {
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = shared.http.post(format!("{}{path}", shared.upstream)).body(encode_form(params));
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    match request.send().await {
        Ok(response) => (response.status().as_u16(), response.text().await.unwrap_or_default()),
        Err(e) => (502, format!("test proxy: moto unreachable: {e}")),
    }
}

fn answer(status: u16, body: String) -> Response<Body> {
    Response::builder().status(status).header("content-type", "text/xml;charset=UTF-8").body(Body::from(body)).unwrap()
}

/// EC2's error document.
fn error_answer(status: u16, code: &str, message: &str) -> Response<Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{}</Message>\
         </Error></Errors><RequestID>00000000-0000-4000-8000-000000000000</RequestID></Response>",
        message.replace('&', "&amp;").replace('<', "&lt;").replace('\'', "&apos;")
    );
    answer(status, body)
}

/// A form body's parameters, decoded.
fn form(body: &[u8]) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&format!("http://form/?{}", String::from_utf8_lossy(body))).unwrap();
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn encode_form(params: &[(String, String)]) -> String {
    let mut url = reqwest::Url::parse("http://form/").unwrap();
    url.query_pairs_mut().extend_pairs(params);
    url.query().unwrap_or_default().to_owned()
}
