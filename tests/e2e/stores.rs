//! The stores' own round trips against the emulators the test command starts: `AzureBlobStore` on
//! Azurite and `S3Store` on moto, driven as an agent drives them (plain HTTP on presigned requests).
//! They ran by hand before (`#[ignore]`, with an endpoint in an environment variable); like every
//! emulator test they now fail when the emulator is not installed.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hybroker::storage::azure::{AzureBlobStore, AzureSettings};
use hybroker::storage::{CompletedPart, ObjectStore, Presigned, StorageError};
use md5::{Digest, Md5};
use reqwest::StatusCode;

use crate::common::DEADLINE;
use crate::emulators::{self, unique_name};

const TTL: Duration = Duration::from_secs(300);
const MIB: usize = 1024 * 1024;

fn md5_b64(data: &[u8]) -> String {
    B64.encode(Md5::digest(data))
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn http() -> reqwest::Client {
    hybroker::tls::install_crypto_provider();
    reqwest::Client::builder().timeout(DEADLINE).build().unwrap()
}

/// What an agent does: the presigned request's headers plus `Content-MD5` and `Content-Length`.
async fn upload(http: &reqwest::Client, p: &Presigned, body: &[u8], md5: &str) -> reqwest::Response {
    let mut req = http.put(&p.url).header("content-md5", md5).header("content-length", body.len());
    for (name, value) in &p.headers {
        req = req.header(name, value);
    }
    req.body(body.to_vec()).send().await.unwrap()
}

async fn fetch(http: &reqwest::Client, p: &Presigned, range: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut req = http.get(&p.url);
    for (name, value) in p.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).chain(range.map(|r| ("range", r))) {
        req = req.header(name, value);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.bytes().await.unwrap().to_vec())
}

fn etag(resp: &reqwest::Response) -> String {
    resp.headers()["etag"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_store_round_trip_on_azurite() {
    let azurite = emulators::azurite().await;
    let container = unique_name("roundtrip");
    let s = AzureBlobStore::new(azurite.settings(&container)).await.unwrap();
    s.ensure_container().await.unwrap();
    s.ensure_container().await.unwrap(); // 409 is fine
    let h = http();
    let status = |r: reqwest::Response| r.status().as_u16();

    let put = s.presign_put("t1/in/a.txt", TTL).await.unwrap();
    assert_eq!(status(upload(&h, &put, b"hello azure", &md5_b64(b"hello azure")).await), 201);
    assert_eq!(status(upload(&h, &put, b"hello azure", &md5_b64(b"other")).await), 400, "wrong content-md5");
    let m = s.head("t1/in/a.txt").await.unwrap().unwrap();
    assert_eq!((m.size, m.content_md5.as_deref()), (11, Some(md5_b64(b"hello azure").as_str())));
    assert!(m.etag.as_ref().is_some_and(|e| !e.contains('"')), "{m:?}");
    assert_eq!(s.head("t1/in/missing").await.unwrap(), None);

    let get = s.presign_get("t1/in/a.txt", TTL).await.unwrap();
    assert_eq!(fetch(&h, &get, Some("bytes=6-10")).await, (StatusCode::PARTIAL_CONTENT, b"azure".to_vec()));
    let other = s.presign_put("t1/in/b.txt", TTL).await.unwrap();
    assert_eq!(status(upload(&h, &other, b"b", &md5_b64(b"b")).await), 201);
    let cross = get.url.replace("/t1/in/a.txt?", "/t1/in/b.txt?");
    assert_eq!(status(h.get(&cross).send().await.unwrap()), 403, "sas of a on b");
    let as_put = Presigned { headers: put.headers.clone(), ..get.clone() };
    assert_eq!(status(upload(&h, &as_put, b"x", &md5_b64(b"x")).await), 403, "get sas used to put");
    assert_eq!(status(h.get(&put.url).send().await.unwrap()), 403, "put sas used to get");
    let expired = s.presign_get("t1/in/a.txt", Duration::ZERO).await.unwrap();
    // SAS times have whole seconds: wait until the expiry has passed, then the URL is refused.
    while SystemTime::now() <= expired.expires_at + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(h.get(&expired.url).send().await.unwrap()), 403, "expired sas");

    let id = s.create_multipart("t1/out.bin").await.unwrap();
    let (p1, p2) = (&[1u8; 1000][..], &b"tail"[..]);
    let (u2, u1) = (
        s.presign_part("t1/out.bin", &id, 2, TTL).await.unwrap(),
        s.presign_part("t1/out.bin", &id, 1, TTL).await.unwrap(),
    );
    assert_eq!(status(upload(&h, &u2, p2, &md5_b64(b"nope")).await), 400, "wrong block md5");
    assert_eq!(status(upload(&h, &u2, p2, &md5_b64(p2)).await), 201);
    assert_eq!(status(upload(&h, &u1, p1, &md5_b64(p1)).await), 201);
    let parts = [2, 1].map(|number| CompletedPart { number, etag: String::new() });
    s.complete_multipart("t1/out.bin", &id, &parts).await.unwrap();
    let (_, body) = fetch(&h, &s.presign_get("t1/out.bin", TTL).await.unwrap(), None).await;
    assert_eq!(body.len(), 1004);
    s.abort_multipart("t1/out.bin", &id).await.unwrap();
    assert_eq!(s.head("t1/out.bin").await.unwrap().unwrap().content_md5, None, "no md5 for block lists");
    let bad = [CompletedPart { number: 7, etag: String::new() }];
    assert!(matches!(s.complete_multipart("t1/out.bin", &id, &bad).await, Err(StorageError::Request(_))));
    let nope = AzureBlobStore::new(AzureSettings { container: "nope".into(), ..azurite.settings(&container) }).await;
    assert!(matches!(nope.unwrap().head("x").await, Err(StorageError::NotFound(_))), "missing container");

    let keys: Vec<String> = s.list("t1/", 10).await.unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, ["t1/in/a.txt", "t1/in/b.txt", "t1/out.bin"]);
    assert!(matches!(s.list("t1/", 2).await, Err(StorageError::TooMany { limit: 2, .. })));
    for k in ["t1/in/a.txt", "t1/in/b.txt", "t1/out.bin", "t1/out.bin"] {
        s.delete(k).await.unwrap();
    }
    assert!(s.list("t1/", 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_store_round_trip_on_moto() {
    let moto = emulators::moto().await;
    let bucket = unique_name("roundtrip");
    moto.create_bucket(&bucket).await;
    let store = moto.store(&bucket).await;
    let h = http();
    assert_eq!(store.head("in/a.bin").await.unwrap(), None);

    let put = store.presign_put("in/a.bin", TTL).await.unwrap();
    assert!(put.headers.is_empty(), "{:?}", put.headers);
    let now = SystemTime::now();
    assert!(put.expires_at <= now + TTL && put.expires_at > now + TTL - Duration::from_secs(2));
    assert!(!format!("{put:?}").contains("X-Amz-Signature"));
    let body = b"hello world, this is a";
    let resp = upload(&h, &put, body, &md5_b64(body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(etag(&resp), format!("\"{}\"", md5_hex(body)));
    let meta = store.head("in/a.bin").await.unwrap().expect("object exists");
    assert_eq!((meta.key.as_str(), meta.size, meta.etag), ("in/a.bin", body.len() as u64, Some(md5_hex(body))));

    for (key, data) in [("in/c/d.bin", &b"dd"[..]), ("in/b.bin", b"bbb"), ("out/x.bin", b"x")] {
        let resp = upload(&h, &store.presign_put(key, TTL).await.unwrap(), data, &md5_b64(data)).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let listed = store.list("in/", 3).await.unwrap();
    let keys: Vec<_> = listed.iter().map(|m| (m.key.as_str(), m.size)).collect();
    assert_eq!(keys, [("in/a.bin", body.len() as u64), ("in/b.bin", 3), ("in/c/d.bin", 2)]);
    assert!(matches!(store.list("in/", 2).await, Err(StorageError::TooMany { limit: 2, .. })));

    let get = store.presign_get("in/a.bin", TTL).await.unwrap();
    assert_eq!(get.headers, [("x-amz-checksum-mode".to_owned(), "ENABLED".to_owned())]);
    assert_eq!(fetch(&h, &get, None).await, (StatusCode::OK, body.to_vec()));
    assert_eq!(fetch(&h, &get, Some("bytes=6-10")).await, (StatusCode::PARTIAL_CONTENT, b"world".to_vec()));
    assert_eq!(fetch(&h, &get, Some("bytes=-1")).await, (StatusCode::PARTIAL_CONTENT, b"a".to_vec()));
    store.delete("in/a.bin").await.unwrap();
    assert_eq!(store.head("in/a.bin").await.unwrap(), None);
    assert_eq!(fetch(&h, &get, None).await.0, StatusCode::NOT_FOUND);
    store.delete("in/a.bin").await.unwrap();

    // Multipart: parts in any order; the ETag of the whole is the parts' (`-2`).
    let key = "out/big.bin";
    let id = store.create_multipart(key).await.unwrap();
    let (first, last) = ((0..5 * MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>(), b"tail".to_vec());
    let mut parts = Vec::new();
    for (number, data) in [(2, &last), (1, &first)] {
        let p = store.presign_part(key, &id, number, TTL).await.unwrap();
        assert!(p.headers.is_empty(), "{:?}", p.headers);
        let resp = upload(&h, &p, data, &md5_b64(data)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(etag(&resp), format!("\"{}\"", md5_hex(data)));
        parts.push(CompletedPart { number, etag: etag(&resp) });
    }
    assert!(matches!(store.presign_part(key, &id, 0, TTL).await, Err(StorageError::Config(_))));
    assert_eq!(store.head(key).await.unwrap(), None);
    store.complete_multipart(key, &id, &parts).await.unwrap();
    let meta = store.head(key).await.unwrap().expect("completed object");
    assert_eq!(meta.size, (5 * MIB + 4) as u64);
    assert!(meta.etag.as_deref().is_some_and(|e| e.ends_with("-2")), "{:?}", meta.etag);
    let range = format!("bytes={}-{}", 5 * MIB - 2, 5 * MIB + 1);
    let (status, got) = fetch(&h, &store.presign_get(key, TTL).await.unwrap(), Some(&range)).await;
    assert_eq!((status, got), (StatusCode::PARTIAL_CONTENT, [&first[5 * MIB - 2..], &b"ta"[..]].concat()));

    // An aborted upload leaves nothing (moto answers a part of it with 500, S3 with NoSuchUpload).
    let id = store.create_multipart("out/dropped.bin").await.unwrap();
    let p = store.presign_part("out/dropped.bin", &id, 1, TTL).await.unwrap();
    assert_eq!(upload(&h, &p, b"part", &md5_b64(b"part")).await.status(), StatusCode::OK);
    store.abort_multipart("out/dropped.bin", &id).await.unwrap();
    store.abort_multipart("out/dropped.bin", &id).await.unwrap();
    assert!(!upload(&h, &p, b"part", &md5_b64(b"part")).await.status().is_success());
    let parts = [CompletedPart { number: 1, etag: md5_hex(b"part") }];
    assert!(store.complete_multipart("out/dropped.bin", &id, &parts).await.is_err());
    assert_eq!(store.head("out/dropped.bin").await.unwrap(), None);
}
