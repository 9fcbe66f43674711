//! `S3Store` against an in-process `LocalS3Server`, driven like an agent: plain HTTP on presigned URLs.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use md5::{Digest, Md5};
use reqwest::{Client, Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::LocalS3Server;
use crate::storage::s3::{S3Settings, S3Store};
use crate::storage::{CompletedPart, ObjectStore, Presigned, StorageError};

const TTL: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

struct Fixture {
    store: S3Store,
    http: Client,
    endpoint: String,
    credentials: (String, String),
    /// The in-process server; `None` for an external store.
    server: Option<(oneshot::Sender<()>, JoinHandle<()>, tempfile::TempDir)>,
}

async fn start() -> Fixture {
    crate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = LocalS3Server::new(&dir.path().join("store"), listener).unwrap();
    let (id, secret) = server.credentials();
    assert_eq!((id.len(), secret.len()), (20, 40));
    assert!(!format!("{server:?}").contains(secret));
    let credentials = (id.to_string(), secret.to_string());
    let store = server.store("jobdata").await.unwrap();
    assert!(dir.path().join("store/jobdata").is_dir());
    let endpoint = server.endpoint();
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let http = Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    Fixture { store, http, endpoint, credentials, server: Some((stop, server, dir)) }
}

impl Fixture {
    /// Stops the server; `run` must return promptly.
    async fn stop(self) {
        let (stop, server, _dir) = self.server.expect("in-process server");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), server).await.expect("run returns on shutdown").unwrap();
    }

    /// What an agent does: the presigned request plus `Content-MD5` and `Content-Length`.
    async fn upload(&self, p: &Presigned, body: &[u8], md5: &str) -> reqwest::Response {
        assert_eq!(p.method, "PUT");
        let mut req = self.http.put(&p.url).header("content-md5", md5).header("content-length", body.len());
        for (name, value) in &p.headers {
            req = req.header(name, value);
        }
        req.body(body.to_vec()).send().await.unwrap()
    }

    async fn put(&self, key: &str, body: &[u8]) {
        let p = self.store.presign_put(key, TTL).await.unwrap();
        let resp = self.upload(&p, body, &md5_b64(body)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());
    }

    async fn get(&self, url: &str, range: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut req = self.http.get(url);
        if let Some(range) = range {
            req = req.header("range", range);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.bytes().await.unwrap().to_vec())
    }

    async fn status(&self, method: Method, url: &str) -> StatusCode {
        self.http.request(method, url).body("x").send().await.unwrap().status()
    }
}

fn md5_b64(data: &[u8]) -> String {
    B64.encode(Md5::digest(data))
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn etag(resp: &reqwest::Response) -> String {
    resp.headers()["etag"].to_str().unwrap().to_string()
}

/// The URL with one character of its signature changed.
fn tamper_signature(url: &str) -> String {
    let at = url.find("X-Amz-Signature=").expect("sigv4 query") + "X-Amz-Signature=".len();
    let flipped = if &url[at..=at] == "0" { "1" } else { "0" };
    format!("{}{flipped}{}", &url[..at], &url[at + 1..])
}

#[tokio::test]
async fn objects_round_trip_through_presigned_urls() {
    let f = start().await;
    round_trip(&f).await;
    f.stop().await;
}

async fn round_trip(f: &Fixture) {
    assert_eq!(f.store.head("in/a.bin").await.unwrap(), None);

    let put = f.store.presign_put("in/a.bin", TTL).await.unwrap();
    assert!(put.headers.is_empty(), "{:?}", put.headers);
    let now = SystemTime::now();
    assert!(put.expires_at <= now + TTL && put.expires_at > now + TTL - Duration::from_secs(2));
    assert!(!format!("{put:?}").contains("X-Amz-Signature"));
    let body = b"hello world, this is a";
    let resp = f.upload(&put, body, &md5_b64(body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(etag(&resp), format!("\"{}\"", md5_hex(body)));

    let meta = f.store.head("in/a.bin").await.unwrap().expect("object exists");
    assert_eq!((meta.key.as_str(), meta.size), ("in/a.bin", body.len() as u64));
    assert_eq!(meta.etag, Some(md5_hex(body)));

    f.put("in/c/d.bin", b"dd").await;
    f.put("in/b.bin", b"bbb").await;
    f.put("out/x.bin", b"x").await;
    let listed = f.store.list("in/", 3).await.unwrap();
    let keys: Vec<_> = listed.iter().map(|m| (m.key.as_str(), m.size)).collect();
    assert_eq!(keys, [("in/a.bin", body.len() as u64), ("in/b.bin", 3), ("in/c/d.bin", 2)]);
    match f.store.list("in/", 2).await {
        Err(StorageError::TooMany { prefix, limit }) => assert_eq!((prefix.as_str(), limit), ("in/", 2)),
        other => panic!("expected too many, got {other:?}"),
    }
    assert!(f.store.list("none/", 0).await.unwrap().is_empty());

    let get = f.store.presign_get("in/a.bin", TTL).await.unwrap();
    // Asks for the object's checksums; presigning leaves that header unsigned, so a GET without it
    // is served too (without checksums).
    assert_eq!(get.method, "GET");
    assert_eq!(get.headers, [("x-amz-checksum-mode".to_owned(), "ENABLED".to_owned())]);
    assert!(get.url.contains("X-Amz-SignedHeaders=host&"), "{get:?}");
    assert_eq!(f.get(&get.url, None).await, (StatusCode::OK, body.to_vec()));
    assert_eq!(f.get(&get.url, Some("bytes=6-10")).await, (StatusCode::PARTIAL_CONTENT, b"world".to_vec()));
    assert_eq!(f.get(&get.url, Some("bytes=-1")).await, (StatusCode::PARTIAL_CONTENT, b"a".to_vec()));

    f.store.delete("in/a.bin").await.unwrap();
    assert_eq!(f.store.head("in/a.bin").await.unwrap(), None);
    assert_eq!(f.get(&get.url, None).await.0, StatusCode::NOT_FOUND);
    f.store.delete("in/a.bin").await.unwrap();
}

#[tokio::test]
async fn multipart_upload_through_presigned_parts() {
    let f = start().await;
    multipart(&f).await;
    f.stop().await;
}

async fn multipart(f: &Fixture) {
    let key = "out/big.bin";
    let id = f.store.create_multipart(key).await.unwrap();
    let first: Vec<u8> = (0..5 * MIB).map(|i| (i % 251) as u8).collect();
    let last = b"tail".to_vec();
    let mut parts = Vec::new();
    // Agents upload parts in any order, in parallel.
    for (number, body) in [(2, &last), (1, &first)] {
        let p = f.store.presign_part(key, &id, number, TTL).await.unwrap();
        assert!(p.headers.is_empty(), "{:?}", p.headers);
        let resp = f.upload(&p, body, &md5_b64(body)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(etag(&resp), format!("\"{}\"", md5_hex(body)));
        parts.push(CompletedPart { number, etag: etag(&resp) });
    }
    if f.server.is_some() {
        // S3 and the local store check Content-MD5 on parts; moto does not.
        let bad = f.store.presign_part(key, &id, 3, TTL).await.unwrap();
        assert_eq!(f.upload(&bad, b"corrupt", &md5_b64(b"other")).await.status(), StatusCode::BAD_REQUEST);
    }
    assert!(matches!(f.store.presign_part(key, &id, 0, TTL).await, Err(StorageError::Config(_))));
    assert_eq!(f.store.head(key).await.unwrap(), None);

    f.store.complete_multipart(key, &id, &parts).await.unwrap();
    let meta = f.store.head(key).await.unwrap().expect("completed object");
    assert_eq!(meta.size, (5 * MIB + 4) as u64);
    assert!(meta.etag.as_deref().is_some_and(|e| e.ends_with("-2")), "{:?}", meta.etag);
    let get = f.store.presign_get(key, TTL).await.unwrap();
    let range = format!("bytes={}-{}", 5 * MIB - 2, 5 * MIB + 1);
    let (status, got) = f.get(&get.url, Some(&range)).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(got, [&first[5 * MIB - 2..], &b"ta"[..]].concat());
    if f.server.is_some() {
        // S3 itself may answer a repeated completion with success.
        assert!(matches!(f.store.complete_multipart(key, &id, &parts).await, Err(StorageError::NotFound(_))));
    }

    let id = f.store.create_multipart("out/dropped.bin").await.unwrap();
    let p = f.store.presign_part("out/dropped.bin", &id, 1, TTL).await.unwrap();
    assert_eq!(f.upload(&p, b"part", &md5_b64(b"part")).await.status(), StatusCode::OK);
    f.store.abort_multipart("out/dropped.bin", &id).await.unwrap();
    f.store.abort_multipart("out/dropped.bin", &id).await.unwrap();
    let status = f.upload(&p, b"part", &md5_b64(b"part")).await.status();
    // moto answers 500 here, S3 and the local store NoSuchUpload.
    assert!(status == StatusCode::NOT_FOUND || (f.server.is_none() && !status.is_success()), "{status}");
    let parts = [CompletedPart { number: 1, etag: md5_hex(b"part") }];
    let completed = f.store.complete_multipart("out/dropped.bin", &id, &parts).await;
    assert!(matches!(completed, Err(StorageError::NotFound(_))) || (f.server.is_none() && completed.is_err()));
    assert_eq!(f.store.head("out/dropped.bin").await.unwrap(), None);
}

fn crc32c_b64(data: &[u8]) -> String {
    B64.encode((crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32).to_be_bytes())
}

/// The checksum headers of a GET of `get` (with its headers) and its body.
async fn checked_get(f: &Fixture, get: &Presigned, range: Option<&str>) -> (Option<String>, Vec<u8>) {
    let mut req = f.http.get(&get.url);
    for (name, value) in get.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).chain(range.map(|r| ("range", r))) {
        req = req.header(name, value);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let crc = resp.headers().get("x-amz-checksum-crc32c").map(|v| v.to_str().unwrap().to_owned());
    (crc, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn every_object_gets_a_crc32c_that_whole_gets_report() {
    let f = start().await;
    // One PUT: the store sums the body as it streams in (the client sent only Content-MD5).
    let body: Vec<u8> = (0..3 * MIB + 5).map(|i| (i % 253) as u8).collect();
    let put = f.store.presign_put("in/one.bin", TTL).await.unwrap();
    let resp = f.upload(&put, &body, &md5_b64(&body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-amz-checksum-crc32c"].to_str().unwrap(), crc32c_b64(&body));
    let get = f.store.presign_get("in/one.bin", TTL).await.unwrap();
    assert_eq!(checked_get(&f, &get, None).await, (Some(crc32c_b64(&body)), body.clone()));
    // Not on a range (as S3), and read in big chunks from any offset.
    let range = format!("bytes={}-{}", MIB - 3, 2 * MIB + 7);
    assert_eq!(checked_get(&f, &get, Some(&range)).await, (None, body[MIB - 3..2 * MIB + 8].to_vec()));

    // A multipart upload over the same key: the assembled object's CRC replaces the old one.
    let id = f.store.create_multipart("in/one.bin").await.unwrap();
    let (first, last) = (vec![7u8; 5 * MIB], b"tail".to_vec());
    let mut parts = Vec::new();
    for (number, part) in [(1, &first), (2, &last)] {
        let p = f.store.presign_part("in/one.bin", &id, number, TTL).await.unwrap();
        let resp = f.upload(&p, part, &md5_b64(part)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        parts.push(CompletedPart { number, etag: etag(&resp) });
    }
    f.store.complete_multipart("in/one.bin", &id, &parts).await.unwrap();
    let whole = [first, last].concat();
    assert_eq!(checked_get(&f, &get, None).await, (Some(crc32c_b64(&whole)), whole));
    f.stop().await;
}

#[tokio::test]
async fn presigned_urls_are_scoped() {
    let f = start().await;
    f.put("a.txt", b"object a").await;
    f.put("b.txt", b"object b").await;
    let get = f.store.presign_get("a.txt", TTL).await.unwrap();
    assert_eq!(f.get(&get.url, None).await, (StatusCode::OK, b"object a".to_vec()));
    assert_eq!(f.get(&get.url.replace("/a.txt?", "/b.txt?"), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(f.status(Method::PUT, &get.url).await, StatusCode::FORBIDDEN);
    assert_eq!(f.status(Method::DELETE, &get.url).await, StatusCode::FORBIDDEN);
    assert_eq!(f.get(&tamper_signature(&get.url), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(f.get(&format!("{}/jobdata/a.txt", f.endpoint), None).await.0, StatusCode::FORBIDDEN);

    let put = f.store.presign_put("a.txt", TTL).await.unwrap();
    let other = Presigned { url: put.url.replace("/a.txt?", "/b.txt?"), ..put.clone() };
    assert_eq!(f.upload(&other, b"evil", &md5_b64(b"evil")).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(f.upload(&put, b"corrupt", &md5_b64(b"other")).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(f.upload(&put, b"corrupt", "not base64!").await.status(), StatusCode::BAD_REQUEST);
    // A refused body stores nothing: the object is as it was.
    assert_eq!(f.get(&get.url, None).await, (StatusCode::OK, b"object a".to_vec()));
    assert_eq!(f.get(&f.store.presign_get("b.txt", TTL).await.unwrap().url, None).await.1, b"object b");

    let id = f.store.create_multipart("c.bin").await.unwrap();
    let other_id = f.store.create_multipart("c.bin").await.unwrap();
    let part = f.store.presign_part("c.bin", &id, 1, TTL).await.unwrap();
    let moved = Presigned { url: part.url.replace(&id, &other_id), ..part.clone() };
    assert_eq!(f.upload(&moved, b"p", &md5_b64(b"p")).await.status(), StatusCode::FORBIDDEN);
    let renumbered = Presigned { url: part.url.replace("partNumber=1", "partNumber=2"), ..part.clone() };
    assert_eq!(f.upload(&renumbered, b"p", &md5_b64(b"p")).await.status(), StatusCode::FORBIDDEN);
    f.stop().await;
}

#[tokio::test]
async fn expired_url_is_refused() {
    let f = start().await;
    f.put("a.txt", b"object a").await;
    let get = f.store.presign_get("a.txt", Duration::from_secs(1)).await.unwrap();
    let now = SystemTime::now();
    assert!(get.expires_at <= now + Duration::from_secs(1) && get.expires_at > now - Duration::from_secs(1));
    // S3 dates have whole seconds: the URL dies within about a second; poll for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        match f.get(&get.url, None).await.0 {
            StatusCode::FORBIDDEN => break,
            StatusCode::OK => {
                assert!(SystemTime::now() <= get.expires_at + Duration::from_millis(100), "served after expires_at");
                assert!(Instant::now() < deadline, "url still valid after its ttl");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(SystemTime::now() > get.expires_at, "refused before expires_at");
    f.stop().await;
}

#[tokio::test]
async fn store_errors_are_mapped_without_secrets() {
    let f = start().await;
    let settings = |bucket: &str, secret: &str| S3Settings {
        bucket: bucket.into(),
        region: "us-east-1".into(),
        endpoint: Some(f.endpoint.clone()),
        profile: None,
        static_credentials: Some((f.credentials.0.clone(), secret.into())),
    };
    let wrong = S3Store::new(settings("jobdata", "wrong-secret-0123456789")).await.unwrap();
    for result in [wrong.list("in/", 10).await.map(|_| ()), wrong.head("in/a.bin").await.map(|_| ())] {
        match result {
            Err(StorageError::Denied(message)) => {
                assert!(message.contains("s3://jobdata/in/"), "{message}");
                assert!(!message.contains("wrong-secret") && !message.contains(&f.credentials.1), "{message}");
            }
            other => panic!("expected denied, got {other:?}"),
        }
    }
    assert!(!format!("{:?}", settings("b", "wrong-secret")).contains("wrong-secret"));
    let missing = S3Store::new(settings("missing", &f.credentials.1)).await.unwrap();
    assert!(matches!(missing.list("", 10).await, Err(StorageError::NotFound(_))));
    let bad = S3Settings { endpoint: Some("127.0.0.1:9".into()), ..settings("jobdata", "x") };
    assert!(matches!(S3Store::new(bad).await, Err(StorageError::Config(_))));
    f.stop().await;
}

#[tokio::test]
async fn bucket_names_are_checked() {
    crate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = LocalS3Server::new(dir.path(), listener).unwrap();
    for bad in ["", "ab", "../up", "a/b", "Upper", ".hidden", "x..y"] {
        assert!(matches!(server.store(bad).await, Err(StorageError::Config(_))), "{bad:?} accepted");
    }
    assert_eq!(server.store("ok-bucket.1").await.unwrap().bucket(), "ok-bucket.1");
}

/// Every file and directory under `root` with its mode.
fn modes(root: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        found.push((path, meta.permissions().mode() & 0o777));
    }
    found
}

#[tokio::test]
async fn stored_objects_and_their_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let f = start().await;
    let root = f.server.as_ref().unwrap().2.path().join("store");
    f.put("in/c/d.bin", b"dd").await;
    let id = f.store.create_multipart("out/deep/big.bin").await.unwrap();
    let p = f.store.presign_part("out/deep/big.bin", &id, 1, TTL).await.unwrap();
    let resp = f.upload(&p, b"part", &md5_b64(b"part")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let parts = [CompletedPart { number: 1, etag: etag(&resp) }];
    f.store.complete_multipart("out/deep/big.bin", &id, &parts).await.unwrap();
    let found = modes(&root);
    assert!(found.iter().any(|(p, _)| p.ends_with("jobdata/in/c/d.bin")), "{found:?}");
    assert!(found.iter().any(|(p, _)| p.ends_with("jobdata/out/deep/big.bin")), "{found:?}");
    for (path, mode) in &found {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:04o}", path.display());
    }
    let (stop, task, _dir) = f.server.expect("in-process server");
    stop.send(()).unwrap();
    task.await.unwrap();

    // A store left world-readable is narrowed when a server opens it again.
    let object = root.join("jobdata/in/c/d.bin");
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(root.join("jobdata/in"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _server = LocalS3Server::new(&root, listener).unwrap();
    for (path, mode) in modes(&root) {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:04o}", path.display());
    }
}
