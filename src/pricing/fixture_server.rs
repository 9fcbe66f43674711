//! A local HTTP server for the feed tests: it answers each request with the next scripted reply
//! of the first route that matches it (the last reply repeats), serves fixtures from
//! `tests/fixtures/prices/` with `{base}` replaced by its own address (so `NextPageLink`s lead back
//! to it), and records every request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: String,
}

impl Recorded {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    /// 200 with the fixture `tests/fixtures/prices/{name}`.
    pub fn fixture(name: &str) -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prices").join(name);
        let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { status: 200, headers: Vec::new(), body }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self { status, headers: Vec::new(), body: body.to_string() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Matcher = Box<dyn Fn(&Recorded) -> bool + Send + Sync>;

struct Route {
    matches: Matcher,
    replies: VecDeque<Reply>,
}

#[derive(Clone)]
struct Shared {
    base: String,
    routes: Arc<Mutex<Vec<Route>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

/// The running server; it stops when dropped.
pub(crate) struct FixtureServer {
    pub base: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl FixtureServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shared = Shared { base: base.clone(), routes: Arc::default(), requests: Arc::default() };
        let router = Router::new().fallback(answer).with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self { base, shared, task }
    }

    /// Requests `matches` accepts get `replies` in turn, the last one from then on.
    pub fn route(&self, matches: impl Fn(&Recorded) -> bool + Send + Sync + 'static, replies: Vec<Reply>) {
        assert!(!replies.is_empty());
        let route = Route { matches: Box::new(matches), replies: replies.into() };
        self.shared.routes.lock().unwrap().push(route);
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let request = Recorded { method, path: uri.path().to_string(), query, headers, body };
    shared.requests.lock().unwrap().push(request.clone());
    let reply = {
        let mut routes = shared.routes.lock().unwrap();
        routes.iter_mut().find(|r| (r.matches)(&request)).map(|route| {
            if route.replies.len() > 1 { route.replies.pop_front().unwrap() } else { route.replies[0].clone() }
        })
    };
    let Some(reply) = reply else {
        return (StatusCode::NOT_FOUND, format!("no fixture for {} {}", request.method, request.path)).into_response();
    };
    let mut response =
        (StatusCode::from_u16(reply.status).unwrap(), reply.body.replace("{base}", &shared.base)).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}
