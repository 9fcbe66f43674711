//! Stand-ins for the staging tests: a presigned-URL endpoint on 127.0.0.1 (GET with ranges,
//! PUT checking `Content-Length` and `Content-MD5`, injectable faults) and a broker that mints
//! URLs for it.
//!
//! A URL is `http://127.0.0.1:<port><path>?[<params>&]exp=<unix seconds>&sig=secret`; the server
//! answers 403 once `exp` has passed, like a store whose signature expired.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::{Digest, Md5};

use super::{CompletedUpload, FoundFile, UploadPlan, UrlSource};
use crate::model::presigned::Presigned;

/// What the server holds, does and saw.
#[derive(Default)]
pub(super) struct Store {
    /// Objects to serve, by path.
    pub objects: HashMap<String, Bytes>,
    /// ETag to send instead of the object's MD5, by path.
    pub etags: HashMap<String, String>,
    /// `Content-MD5` to send on whole GETs, by path.
    pub content_md5: HashMap<String, String>,
    /// So many of the next requests for a path answer 503.
    pub fail_first: HashMap<String, u32>,
    /// Paths that always answer 500.
    pub always_500: HashSet<String>,
    /// Paths whose next GET sends half its body, then drops the connection.
    pub cut_once: HashSet<String>,
    /// Bodies PUT, by path and the query without `exp` and `sig`.
    pub uploaded: HashMap<String, Vec<u8>>,
    /// Every request: method, path and query without `exp`/`sig`, `Range`, status.
    pub log: Vec<(Method, String, Option<String>, u16)>,
}

/// A running server.
pub(super) struct Server {
    pub base: String,
    store: Arc<Mutex<Store>>,
}

impl Server {
    pub async fn start() -> Server {
        let store = Arc::new(Mutex::new(Store::default()));
        let app = axum::Router::new().fallback(handle).layer(DefaultBodyLimit::disable()).with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { base, store }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap()
    }

    /// A presigned request for `path` (with `params` before the signature), valid for `ttl`
    /// seconds (negative: expired).
    pub fn url(&self, method: &str, path: &str, params: &str, ttl: i64) -> Presigned {
        let now = SystemTime::now();
        let expires_at =
            if ttl >= 0 { now + Duration::from_secs(ttl as u64) } else { now - Duration::from_secs((-ttl) as u64) };
        let exp = expires_at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let sep = if params.is_empty() { "" } else { "&" };
        let url = format!("{}{path}?{params}{sep}exp={exp}&sig=secret", self.base);
        Presigned { method: method.into(), url, headers: vec![("x-test".into(), "1".into())], expires_at }
    }
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>");
    Response::builder().status(status).body(Body::from(body)).unwrap()
}

pub(super) fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

async fn handle(
    State(store): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default();
    let exp: u64 = query.split('&').find_map(|kv| kv.strip_prefix("exp=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let params: Vec<&str> = query.split('&').filter(|kv| !kv.starts_with("exp=") && !kv.starts_with("sig=")).collect();
    let name = if params.is_empty() { path.clone() } else { format!("{path}?{}", params.join("&")) };
    let range = headers.get("range").map(|v| v.to_str().unwrap().to_owned());
    let mut store = store.lock().unwrap();
    let response = answer(&mut store, &method, &path, &name, exp, range.as_deref(), &headers, body);
    store.log.push((method, name, range, response.status().as_u16()));
    response
}

#[allow(clippy::too_many_arguments)]
fn answer(
    store: &mut Store,
    method: &Method,
    path: &str,
    name: &str,
    exp: u64,
    range: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    if exp < SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() {
        return xml_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired");
    }
    if store.always_500.contains(path) {
        return xml_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "We encountered an internal error.");
    }
    if let Some(left) = store.fail_first.get_mut(path).filter(|n| **n > 0) {
        *left -= 1;
        return xml_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate.");
    }
    if *method == Method::PUT {
        let length = headers.get("content-length").and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if length != Some(body.len()) {
            return xml_error(StatusCode::LENGTH_REQUIRED, "MissingContentLength", "no or wrong Content-Length");
        }
        let md5 = STANDARD.encode(Md5::digest(&body));
        if headers.get("content-md5").and_then(|v| v.to_str().ok()) != Some(md5.as_str()) {
            return xml_error(StatusCode::BAD_REQUEST, "BadDigest", "The Content-MD5 you specified did not match.");
        }
        let etag = format!("\"{}\"", md5_hex(&body));
        store.uploaded.insert(name.to_owned(), body.to_vec());
        return Response::builder().header("etag", etag).body(Body::empty()).unwrap();
    }
    let Some(object) = store.objects.get(path).cloned() else {
        return xml_error(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist.");
    };
    let etag = store.etags.get(path).cloned().unwrap_or_else(|| format!("\"{}\"", md5_hex(&object)));
    let mut response = Response::builder().header("etag", etag);
    let (status, part) = match range.and_then(|r| r.strip_prefix("bytes=")?.split_once('-')) {
        Some((first, last)) => {
            let (first, last): (usize, usize) = (first.parse().unwrap(), last.parse().unwrap());
            let total = object.len();
            response = response.header("content-range", format!("bytes {first}-{last}/{total}"));
            (StatusCode::PARTIAL_CONTENT, object.slice(first..=last.min(total - 1)))
        }
        None => {
            if let Some(md5) = store.content_md5.get(path) {
                response = response.header("content-md5", md5);
            }
            (StatusCode::OK, object)
        }
    };
    response = response.status(status).header("content-length", part.len());
    if store.cut_once.remove(path) {
        let half = part.slice(..part.len() / 2);
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(half), Err(std::io::Error::other("cut"))];
        return response.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
    }
    response.body(Body::from(part)).unwrap()
}

/// What the fake broker was asked.
#[derive(Default, Debug)]
pub(super) struct Calls {
    pub input_urls: Vec<Vec<u32>>,
    pub plans: Vec<Vec<FoundFile>>,
    pub part_urls: Vec<Vec<u32>>,
    pub completed: Vec<CompletedUpload>,
}

/// A broker minting URLs for a [`Server`]: input `i` is the object `inputs[i]`; output files go
/// to `/out/<output>/<path>`, as multipart uploads (`part_size`) when bigger than `part_size`.
pub(super) struct Broker<'s> {
    pub server: &'s Server,
    pub inputs: Vec<String>,
    pub part_size: u64,
    /// The first plan's part URLs have expired already.
    pub stale_parts: bool,
    pub calls: Mutex<Calls>,
}

impl<'s> Broker<'s> {
    pub fn new(server: &'s Server, inputs: &[&str]) -> Self {
        let inputs = inputs.iter().map(|s| (*s).to_owned()).collect();
        Broker { server, inputs, part_size: 64 << 10, stale_parts: false, calls: Mutex::default() }
    }

    pub fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap()
    }

    fn part(&self, key: &str, number: u32, ttl: i64) -> Presigned {
        self.server.url("PUT", key, &format!("partNumber={number}&uploadId=up1"), ttl)
    }
}

#[async_trait]
impl UrlSource for Broker<'_> {
    async fn input_urls(&self, indices: &[u32]) -> Result<Vec<Presigned>, String> {
        self.calls().input_urls.push(indices.to_vec());
        Ok(indices.iter().map(|i| self.server.url("GET", &self.inputs[*i as usize], "", 600)).collect())
    }

    async fn plan_outputs(&self, files: &[FoundFile]) -> Result<Vec<UploadPlan>, String> {
        let first = {
            let mut calls = self.calls();
            calls.plans.push(files.to_vec());
            calls.plans.len() == 1
        };
        let ttl = if first && self.stale_parts { -10 } else { 600 };
        let plan = |f: &FoundFile| {
            let key = format!("/out/{}/{}", f.output, f.path);
            if f.size <= self.part_size {
                return UploadPlan::Single { put: self.server.url("PUT", &key, "", 600), key };
            }
            let parts = (1..=f.size.div_ceil(self.part_size) as u32).map(|n| self.part(&key, n, ttl)).collect();
            UploadPlan::Multipart { key, upload_id: "up1".into(), part_size: self.part_size, parts }
        };
        Ok(files.iter().map(plan).collect())
    }

    async fn part_urls(
        &self,
        _output: u32,
        key: &str,
        upload_id: &str,
        numbers: &[u32],
    ) -> Result<Vec<Presigned>, String> {
        assert_eq!(upload_id, "up1");
        self.calls().part_urls.push(numbers.to_vec());
        Ok(numbers.iter().map(|n| self.part(key, *n, 600)).collect())
    }

    async fn complete_outputs(&self, uploads: Vec<CompletedUpload>) -> Result<(), String> {
        self.calls().completed.extend(uploads);
        Ok(())
    }
}
