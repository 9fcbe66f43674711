//! One conformance suite for every `ObjectStore`: moto (`S3Store`), Azurite (`AzureBlobStore`) and the
//! embedded local store (`LocalS3Server`), using the presigned requests with plain HTTP as an agent
//! does. The scope suite runs only where the store checks signatures: Azurite (SAS) and the local
//! store (s3s); moto accepts any signature, so a wrong-scope URL would get 200 there. moto (5.2) does
//! not check `Content-MD5` either, so the wrong-digest PUT is checked on the other two (S3 checks it).

use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use hybroker::storage::local::LocalS3Server;
use hybroker::storage::s3::S3Store;
use hybroker::storage::{CompletedPart, ObjectStore, Presigned, StorageError};
use md5::{Digest, Md5};

use crate::common::{DEADLINE, alive};
use crate::emulators::{self, azurite, moto, own_azurite, own_moto, unique_name};

const TTL: Duration = Duration::from_secs(600);
const MIB: usize = 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Moto,
    Azure,
    Local,
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_moto() {
    let moto = moto().await;
    let bucket = unique_name("conformance");
    moto.create_bucket(&bucket).await;
    suite(&moto.store(&bucket).await, Flavor::Moto).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_azurite() {
    let azurite = azurite().await;
    let container = unique_name("conformance");
    azurite.create_container(&container).await;
    suite(&azurite.store(&container).await, Flavor::Azure).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_local() {
    let local = Local::start().await;
    suite(&local.store, Flavor::Local).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_azurite_scope() {
    let azurite = azurite().await;
    let container = unique_name("scope");
    azurite.create_container(&container).await;
    scope(&azurite.store(&container).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_local_scope() {
    let local = Local::start().await;
    scope(&local.store).await;
}

/// Everything a store must do, through the trait and the presigned requests.
async fn suite(store: &dyn ObjectStore, flavor: Flavor) {
    let http = client();
    assert_eq!(store.head("missing/key").await.unwrap(), None, "head of a missing key");

    // One PUT, then HEAD and GET.
    let key = "data/one.bin";
    let data = pattern(100_000, 1);
    let url = store.presign_put(key, TTL).await.unwrap();
    assert_eq!(url.method, "PUT");
    let expected_expiry = SystemTime::now() + TTL;
    let skew = Duration::from_secs(60);
    assert!(url.expires_at > expected_expiry - skew && url.expires_at < expected_expiry + skew, "{url:?}");
    let (status, body) = put(&http, &url, &data).await;
    assert!(matches!(status, 200 | 201), "PUT {key}: {status} {}", text(&body));
    let meta = store.head(key).await.unwrap().expect("the object after PUT");
    assert_eq!((meta.key.as_str(), meta.size), (key, data.len() as u64), "{meta:?}");
    match flavor {
        Flavor::Moto | Flavor::Local => assert_eq!(meta.etag.as_deref(), Some(md5_hex(&data).as_str()), "{meta:?}"),
        Flavor::Azure => assert_eq!(meta.content_md5.as_deref(), Some(md5_b64(&data).as_str()), "{meta:?}"),
    }
    assert!(meta.etag.is_some(), "{meta:?}");
    let get_url = store.presign_get(key, TTL).await.unwrap();
    assert_eq!(get_url.method, "GET");
    assert_object(&http, &get_url, &data).await;

    // A range.
    let (status, body) = call(&http, "GET", &get_url.url, &get_url.headers, None, Some("bytes=1000-1999")).await;
    assert_eq!(status, 206, "ranged GET: {}", text(&body));
    same("ranged GET", &body, &data[1000..2000]);

    // A PUT whose Content-MD5 does not match its body is refused and changes nothing (moto takes it).
    if flavor != Flavor::Moto {
        let other = pattern(5000, 2);
        let wrong = md5_b64(b"something else");
        let (status, body) = call(&http, "PUT", &url.url, &url.headers, Some((&other, &wrong)), None).await;
        assert_eq!(status, 400, "PUT with a wrong Content-MD5: {}", text(&body));
        assert_object(&http, &get_url, &data).await;
    }

    // Listing: only the prefix, in key order, and too many is an error.
    for k in ["list/b/c", "list/a", "listing", "other/x", "list/c"] {
        let (status, body) = put(&http, &store.presign_put(k, TTL).await.unwrap(), k.as_bytes()).await;
        assert!(matches!(status, 200 | 201), "PUT {k}: {status} {}", text(&body));
    }
    let listed = store.list("list/", 3).await.unwrap();
    let listed: Vec<(&str, u64)> = listed.iter().map(|m| (m.key.as_str(), m.size)).collect();
    assert_eq!(listed, [("list/a", 6), ("list/b/c", 8), ("list/c", 6)]);
    match store.list("list/", 2).await {
        Err(StorageError::TooMany { prefix, limit }) => assert_eq!((prefix.as_str(), limit), ("list/", 2)),
        other => panic!("list past the limit: {other:?}"),
    }
    assert_eq!(store.list("nothing/", 10).await.unwrap(), vec![]);

    // Multipart: parts uploaded out of order, completed in number order.
    let key = "data/multi.bin";
    let parts = [pattern(5 * MIB, 3), pattern(5 * MIB, 4), pattern(1024, 5)];
    let upload = store.create_multipart(key).await.unwrap();
    let mut completed = Vec::new();
    for number in [2u32, 3, 1] {
        let part = &parts[number as usize - 1];
        let url = store.presign_part(key, &upload, number, TTL).await.unwrap();
        assert_eq!(url.method, "PUT");
        let response = send(&http, "PUT", &url.url, &url.headers, Some((part, &md5_b64(part))), None).await;
        let etag = response.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
        let (status, body) = (response.status().as_u16(), response.bytes().await.unwrap());
        assert!(matches!(status, 200 | 201), "PUT part {number}: {status} {}", text(&body));
        assert!(flavor == Flavor::Azure || etag.is_some(), "part {number} has no ETag");
        completed.push(CompletedPart { number, etag: etag.unwrap_or_default() });
    }
    assert_eq!(store.head(key).await.unwrap(), None, "the object before complete");
    store.complete_multipart(key, &upload, &completed).await.unwrap();
    let whole = parts.concat();
    let meta = store.head(key).await.unwrap().expect("the object after complete");
    assert_eq!(meta.size, whole.len() as u64, "{meta:?}");
    assert_object(&http, &store.presign_get(key, TTL).await.unwrap(), &whole).await;

    // An aborted upload leaves no object.
    let aborted = "data/aborted.bin";
    let upload = store.create_multipart(aborted).await.unwrap();
    let url = store.presign_part(aborted, &upload, 1, TTL).await.unwrap();
    let (status, body) = put(&http, &url, &parts[2]).await;
    assert!(matches!(status, 200 | 201), "PUT part of the aborted upload: {status} {}", text(&body));
    store.abort_multipart(aborted, &upload).await.unwrap();
    assert_eq!(store.head(aborted).await.unwrap(), None, "the aborted object");

    // Delete, twice, and of a key that never was.
    store.delete(key).await.unwrap();
    assert_eq!(store.head(key).await.unwrap(), None, "the deleted object");
    let (status, _) = get(&http, &store.presign_get(key, TTL).await.unwrap()).await;
    assert_eq!(status, 404, "GET of the deleted object");
    store.delete(key).await.unwrap();
    store.delete("never/was").await.unwrap();
    assert_eq!(store.list("data/", 10).await.unwrap().len(), 1, "data/one.bin remains");
}

/// A presigned URL opens exactly one object, with one method, until it expires.
async fn scope(store: &dyn ObjectStore) {
    let http = client();
    let (a, b, c) = ("scope/a.bin", "scope/b.bin", "scope/c.bin");
    let (data_a, data_b) = (pattern(3000, 6), pattern(3000, 7));
    for (key, data) in [(a, &data_a), (b, &data_b)] {
        let (status, body) = put(&http, &store.presign_put(key, TTL).await.unwrap(), data).await;
        assert!(matches!(status, 200 | 201), "PUT {key}: {status} {}", text(&body));
    }
    let get_a = store.presign_get(a, TTL).await.unwrap();
    let put_a = store.presign_put(a, TTL).await.unwrap();

    // A's GET URL on B.
    let (status, body) = call(&http, "GET", &other_key(&get_a.url, "a.bin", "b.bin"), &get_a.headers, None, None).await;
    assert_eq!(status, 403, "A's GET URL used on B: {}", text(&body));
    assert!(!body.windows(100).any(|w| w == &data_b[..100]), "B's bytes served with A's URL");

    // A's GET URL used to PUT (with the headers a real PUT sends).
    let new = pattern(2000, 8);
    let (status, body) = call(&http, "PUT", &get_a.url, &put_a.headers, Some((&new, &md5_b64(&new))), None).await;
    assert_eq!(status, 403, "A's GET URL used with PUT: {}", text(&body));
    assert_object(&http, &get_a, &data_a).await;

    // A's PUT URL on another key.
    let url = other_key(&put_a.url, "a.bin", "c.bin");
    let (status, body) = call(&http, "PUT", &url, &put_a.headers, Some((&new, &md5_b64(&new))), None).await;
    assert_eq!(status, 403, "A's PUT URL used on C: {}", text(&body));
    assert_eq!(store.head(c).await.unwrap(), None, "C made with A's URL");

    // An expired URL: served until it expires, then refused.
    let short = store.presign_get(a, Duration::from_secs(2)).await.unwrap();
    assert!(short.expires_at <= SystemTime::now() + Duration::from_secs(3), "{short:?}");
    let started = Instant::now();
    loop {
        let (status, body) = get(&http, &short).await;
        if status == 403 {
            break;
        }
        assert_eq!(status, 200, "GET before expiry: {}", text(&body));
        same("GET before expiry", &body, &data_a);
        assert!(started.elapsed() < DEADLINE, "a 2 s URL still works after {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(SystemTime::now() + Duration::from_secs(1) >= short.expires_at, "refused well before expiry");
}

/// The emulators start, serve the independent clients, outlive the test thread that asked for
/// them, and die when killed; the shared ones are started once.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_emulators_harness() {
    assert!(std::ptr::eq(moto().await, moto().await));
    assert!(std::ptr::eq(azurite().await, azurite().await));

    // Asked for by a thread that then ends: PR_SET_PDEATHSIG must not fire.
    let (moto, tid) = std::thread::spawn(|| {
        let moto = tokio::runtime::Runtime::new().unwrap().block_on(own_moto());
        (moto, nix::unistd::gettid())
    })
    .join()
    .unwrap();
    crate::common::eventually("the asking thread to be gone", || async {
        (!std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()).then_some(())
    })
    .await;
    assert!(alive(moto.pid()), "moto died with the thread that started it:\n{}", moto.log());
    moto.create_bucket("harness").await;
    let put = moto.client().put_object().bucket("harness").key("k").body(b"moto bytes".to_vec().into());
    put.send().await.unwrap();
    assert_eq!(emulators::s3_get(&moto, "harness", "k").await, b"moto bytes");

    let azurite = own_azurite().await;
    assert!(alive(azurite.pid()), "{}", azurite.log());
    azurite.create_container("harness").await;
    let blob = azurite.client().container_client("harness").blob_client("k");
    blob.put_block_blob(b"azure bytes".to_vec()).await.unwrap();
    assert_eq!(emulators::azure_get(&azurite, "harness", "k").await, b"azure bytes");

    let (moto_pid, azurite_pid, endpoint) = (moto.pid(), azurite.pid(), moto.endpoint());
    moto.kill();
    azurite.kill();
    assert!(!alive(moto_pid) && !alive(azurite_pid));
    assert!(client().get(&endpoint).send().await.is_err(), "killed moto still answers");
    drop((moto, azurite));
}

/// A test binary that is killed takes its emulators with it.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_emulators_die_with_the_test_binary() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "conformance::conformance_hold_emulators", "--ignored", "--nocapture"])
        .env("HYBROKER_HOLD_EMULATORS", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = tokio::task::spawn_blocking(move || {
        stdout.lines().map_while(Result::ok).find(|l| l.starts_with("EMULATOR PIDS"))
    });
    let line = tokio::time::timeout(DEADLINE, line).await.unwrap().unwrap().expect("the child printed its pids");
    let pids: Vec<nix::unistd::Pid> =
        line.split_whitespace().skip(2).map(|p| nix::unistd::Pid::from_raw(p.parse().unwrap())).collect();
    assert_eq!(pids.len(), 2, "{line}");
    assert!(pids.iter().all(|&p| alive(p)), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    for pid in pids {
        crate::common::eventually("the emulator to die with the test binary", || async { (!alive(pid)).then_some(()) })
            .await;
    }
}

/// Run only by the test above: starts the shared emulators, prints their pids, waits to be killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a child process of conformance_emulators_die_with_the_test_binary"]
async fn conformance_hold_emulators() {
    if std::env::var_os("HYBROKER_HOLD_EMULATORS").is_none() {
        return;
    }
    println!("EMULATOR PIDS {} {}", moto().await.pid(), azurite().await.pid());
    std::future::pending::<()>().await;
}

/// The embedded store on port 0, served in this test's runtime until dropped.
struct Local {
    store: S3Store,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Local {
    async fn start() -> Local {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = LocalS3Server::new(dir.path(), listener).unwrap();
        let store = server.store(&unique_name("conformance")).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Local { store, _stop: stop, _dir: dir }
    }
}

fn client() -> reqwest::Client {
    hybroker::tls::install_crypto_provider();
    reqwest::Client::builder().timeout(DEADLINE).build().unwrap()
}

/// Sends a request as an agent does: the presigned headers, plus `Content-MD5` and `Content-Length`
/// with a body.
async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<(&[u8], &str)>,
    range: Option<&str>,
) -> reqwest::Response {
    let mut request = http.request(method.parse().unwrap(), url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    if let Some((body, md5)) = body {
        request = request.header("content-md5", md5).header("content-length", body.len()).body(body.to_vec());
    }
    if let Some(range) = range {
        request = request.header("range", range);
    }
    request.send().await.unwrap_or_else(|e| panic!("{method} {}: {e}", hybroker::storage::redact_url(url)))
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<(&[u8], &str)>,
    range: Option<&str>,
) -> (u16, Vec<u8>) {
    let response = send(http, method, url, headers, body, range).await;
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

async fn put(http: &reqwest::Client, url: &Presigned, data: &[u8]) -> (u16, Vec<u8>) {
    call(http, &url.method, &url.url, &url.headers, Some((data, &md5_b64(data))), None).await
}

async fn get(http: &reqwest::Client, url: &Presigned) -> (u16, Vec<u8>) {
    call(http, &url.method, &url.url, &url.headers, None, None).await
}

async fn assert_object(http: &reqwest::Client, url: &Presigned, want: &[u8]) {
    let (status, body) = get(http, url).await;
    assert_eq!(status, 200, "GET {url:?}: {}", text(&body));
    same("GET", &body, want);
}

/// Byte-for-byte equality without printing megabytes.
fn same(what: &str, got: &[u8], want: &[u8]) {
    let first_difference = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        got.len() == want.len() && first_difference.is_none(),
        "{what}: got {} bytes, want {}; first difference at {first_difference:?}",
        got.len(),
        want.len()
    );
}

/// The URL with the key's last characters `from` replaced by `to`, the signature kept.
fn other_key(url: &str, from: &str, to: &str) -> String {
    let (base, query) = url.split_once('?').expect("a signed query");
    let base = base.strip_suffix(from).unwrap_or_else(|| panic!("{} does not end with {from}", redact_url(url)));
    format!("{base}{to}?{query}")
}

fn redact_url(url: &str) -> String {
    hybroker::storage::redact_url(url)
}

/// Bytes that differ with `seed` and along the buffer.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u64).map(|i| ((i ^ u64::from(seed) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect()
}

fn md5_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(data))
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned()
}
