use super::fake::{Broker, Server, md5_hex};
use super::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::{Digest, Md5};
use std::sync::Mutex;
use std::time::SystemTime;

fn limits() -> StagingLimits {
    StagingLimits {
        concurrency: 4,
        range_size: 64 << 10,
        retries: 3,
        min_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        request_timeout: Duration::from_secs(5),
    }
}

fn client() -> reqwest::Client {
    crate::tls::install_crypto_provider();
    http_client(None).unwrap()
}

/// Deterministic bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn input(path: &str, size: usize) -> InputFile {
    InputFile { path: path.into(), size: size as u64, md5: None }
}

fn no_progress(_: Progress) {}

/// Serves `objects` at `/b/<path>` and stages them in as `<path>`; returns the outcome.
async fn stage_objects(
    server: &Server,
    objects: &[(&str, Vec<u8>)],
    inputs: Vec<InputFile>,
    ttl: i64,
    dir: &Path,
) -> Result<StageStats, StagingError> {
    let keys: Vec<String> = objects.iter().map(|(p, _)| format!("/b/{p}")).collect();
    for ((_, bytes), key) in objects.iter().zip(&keys) {
        server.store().objects.insert(key.clone(), bytes.clone().into());
    }
    let broker = Broker::new(server, &keys.iter().map(String::as_str).collect::<Vec<_>>());
    let initial = keys.iter().map(|k| server.url("GET", k, "", ttl)).collect();
    stage_in(&client(), &broker, dir, &inputs, initial, &limits(), &no_progress).await
}

#[tokio::test]
async fn stage_in_fetches_small_and_ranged_files() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (data(1000, 1), data(300_000, 2));
    let md5 = Some(STANDARD.encode(Md5::digest(&big)));
    let inputs = vec![input("a.txt", 1000), InputFile { md5, ..input("data/sub/big.bin", 300_000) }, input("empty", 0)];
    let objects = [("a.txt", small.clone()), ("data/sub/big.bin", big.clone()), ("empty", vec![])];
    let stats = stage_objects(&server, &objects, inputs, 600, dir.path()).await.unwrap();
    assert_eq!((stats.bytes, stats.files), (301_000, 3));
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), small);
    assert_eq!(std::fs::read(dir.path().join("data/sub/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(dir.path().join("empty")).unwrap(), b"");
    let log = &server.store().log;
    let ranges: Vec<_> =
        log.iter().filter(|(_, p, _, _)| p == "/b/data/sub/big.bin").map(|(_, _, r, _)| r.clone()).collect();
    assert_eq!(ranges.len(), 5, "300 000 bytes in 64 KiB ranges");
    assert!(ranges.contains(&Some("bytes=262144-299999".into())), "{ranges:?}");
    let small_gets = log.iter().filter(|(_, p, r, _)| p == "/b/a.txt" && r.is_none()).count();
    assert_eq!(small_gets, 1);
}

#[tokio::test]
async fn bad_md5_is_an_error_naming_the_file() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    // An S3-style ETag that is not the data's MD5.
    server.store().etags.insert("/b/x.bin".into(), format!("\"{}\"", md5_hex(b"other")));
    let err = stage_objects(&server, &[("x.bin", data(500, 3))], vec![input("x.bin", 500)], 600, dir.path())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("stage-in of x.bin: md5 mismatch: the store's ETag says"), "{text}");

    // The broker's MD5 of a big (ranged) file, and an Azure Content-MD5 of a small one.
    let wrong = Some(STANDARD.encode(Md5::digest(b"other")));
    let inputs = vec![InputFile { md5: wrong, ..input("big.bin", 200_000) }];
    let err = stage_objects(&server, &[("big.bin", data(200_000, 4))], inputs, 600, dir.path()).await.unwrap_err();
    assert!(err.to_string().starts_with("stage-in of big.bin: md5 mismatch: the broker says"), "{err}");
    server.store().etags.insert("/b/az".into(), "\"0x8DC0FFEE\"".into());
    server.store().content_md5.insert("/b/az".into(), STANDARD.encode(Md5::digest(b"other")));
    let err = stage_objects(&server, &[("az", data(10, 5))], vec![input("az", 10)], 600, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("md5 mismatch: the store's Content-MD5 says"), "{err}");
}

#[tokio::test]
async fn wrong_size_is_an_error() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let err = stage_objects(&server, &[("s", data(100, 6))], vec![input("s", 99)], 600, dir.path()).await.unwrap_err();
    assert_eq!(err.to_string(), "stage-in of s: the object is 100 bytes in the store, 99 were listed");
}

#[tokio::test]
async fn transient_failures_are_retried() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    server.store().fail_first.insert("/b/r".into(), 2);
    server.store().cut_once.insert("/b/big".into());
    let (small, big) = (data(100, 7), data(150_000, 8));
    let inputs = vec![input("r", 100), input("big", 150_000)];
    stage_objects(&server, &[("r", small.clone()), ("big", big.clone())], inputs, 600, dir.path()).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("r")).unwrap(), small);
    assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), big);
    let log = &server.store().log;
    let statuses: Vec<u16> = log.iter().filter(|(_, p, _, _)| p == "/b/r").map(|l| l.3).collect();
    assert_eq!(statuses, [503, 503, 200]);
    assert_eq!(log.iter().filter(|(_, p, _, _)| p == "/b/big").count(), 4, "3 ranges, one cut and fetched again");
}

#[tokio::test]
async fn a_cut_range_resumes_where_it_stopped() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let big = data(3 << 20, 16);
    server.store().objects.insert("/b/big".into(), big.clone().into());
    // The first range (2 MiB) breaks off after 1 MiB, which is on disk by then.
    server.store().cut_once.insert("/b/big".into());
    let broker = Broker::new(&server, &["/b/big"]);
    let initial = vec![server.url("GET", "/b/big", "", 600)];
    let limits = StagingLimits { range_size: 2 << 20, concurrency: 1, ..limits() };
    stage_in(&client(), &broker, dir.path(), &[input("big", 3 << 20)], initial, &limits, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), big);
    let ranges: Vec<_> = server.store().log.iter().map(|l| l.2.clone().unwrap_or_default()).collect();
    assert_eq!(ranges, ["bytes=0-2097151", "bytes=1048576-2097151", "bytes=2097152-3145727"]);
}

/// The CRC32C and CRC64NVME of `data` as S3 sends them.
fn crc_headers(data: &[u8]) -> Vec<(&'static str, String)> {
    use crc_fast::{CrcAlgorithm, checksum};
    let crc32c = STANDARD.encode((checksum(CrcAlgorithm::Crc32Iscsi, data) as u32).to_be_bytes());
    let crc64 = STANDARD.encode(checksum(CrcAlgorithm::Crc64Nvme, data).to_be_bytes());
    vec![("x-amz-checksum-crc32c", crc32c), ("x-amz-checksum-crc64nvme", crc64)]
}

/// Stages `/b/<name>` in as `<name>` with URLs that ask for checksums; the requests' ranges.
async fn stage_checked(server: &Server, name: &str, size: usize, dir: &Path) -> Result<Vec<String>, StagingError> {
    let key = format!("/b/{name}");
    let broker = Broker { checksums: true, ..Broker::new(server, &[key.as_str()]) };
    let initial = vec![server.checked_url("GET", &key, "", 600)];
    let before = server.store().log.len();
    stage_in(&client(), &broker, dir, &[input(name, size)], initial, &limits(), &no_progress).await?;
    let log = &server.store().log[before..];
    Ok(log.iter().map(|l| l.2.clone().unwrap_or_default()).collect())
}

#[tokio::test]
async fn big_files_are_checked_against_the_stores_crc_over_parallel_ranges() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let big = data(200_000, 18);
    let sums = crc_headers(&big);
    {
        let mut store = server.store();
        store.objects.insert("/b/crc".into(), big.clone().into());
        // An ETag that is not the data's MD5: a file checked by its CRC never looks at it.
        store.etags.insert("/b/crc".into(), format!("\"{}\"", md5_hex(b"other")));
        store.checksums.insert("/b/crc".into(), sums[..1].to_vec());
    }
    let mut ranges = stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("crc")).unwrap(), big);
    ranges.sort();
    // The first range is a whole GET (where the store reports the CRC), read up to its end.
    assert_eq!(ranges, ["", "bytes=131072-196607", "bytes=196608-199999", "bytes=65536-131071"]);
    server.store().checksums.insert("/b/crc".into(), sums.clone());
    stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap();

    // A range damaged on the way, with either CRC, and a CRC that is not the data's.
    server.store().corrupt.insert("/b/crc".into(), 150_000);
    let err = stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("stage-in of crc: crc64nvme mismatch: the store's x-amz-checksum-crc64nvme says"),
        "{text}"
    );
    server.store().checksums.insert("/b/crc".into(), sums[..1].to_vec());
    let err = stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap_err();
    assert!(err.to_string().starts_with("stage-in of crc: crc32c mismatch: the store's x-amz-checksum-crc32c"));
    server.store().corrupt.clear();
    server.store().checksums.insert("/b/crc".into(), crc_headers(b"other"));
    let err = stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("crc64nvme mismatch"), "{err}");

    // A composite checksum (of the parts' checksums) is not the data's: the ETag's MD5 is checked.
    server.store().checksums.insert("/b/crc".into(), vec![("x-amz-checksum-crc32c", "AAAAAA==-2".into())]);
    let err = stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("md5 mismatch: the store's ETag says"), "{err}");
    server.store().etags.remove("/b/crc");
    stage_checked(&server, "crc", 200_000, dir.path()).await.unwrap();

    // A small file: its one GET checked against the CRC.
    let small = data(1000, 19);
    server.store().objects.insert("/b/small".into(), small.clone().into());
    server.store().checksums.insert("/b/small".into(), crc_headers(&small));
    assert_eq!(stage_checked(&server, "small", 1000, dir.path()).await.unwrap(), [""]);
    server.store().corrupt.insert("/b/small".into(), 999);
    let err = stage_checked(&server, "small", 1000, dir.path()).await.unwrap_err();
    assert!(err.to_string().starts_with("stage-in of small: crc64nvme mismatch"), "{err}");
}

#[tokio::test]
async fn a_cut_first_range_of_a_checked_file_resumes_as_a_range() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let big = data(3 << 20, 20);
    {
        let mut store = server.store();
        store.checksums.insert("/b/big".into(), crc_headers(&big)[..1].to_vec());
        store.objects.insert("/b/big".into(), big.clone().into());
        // The whole GET of the first range breaks off after 1.5 MiB, 1 MiB of it on disk by then.
        store.cut_once.insert("/b/big".into());
    }
    let broker = Broker { checksums: true, ..Broker::new(&server, &["/b/big"]) };
    let initial = vec![server.checked_url("GET", "/b/big", "", 600)];
    let limits = StagingLimits { range_size: 2 << 20, concurrency: 1, ..limits() };
    stage_in(&client(), &broker, dir.path(), &[input("big", 3 << 20)], initial, &limits, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), big);
    let ranges: Vec<_> = server.store().log.iter().map(|l| l.2.clone().unwrap_or_default()).collect();
    assert_eq!((ranges.len(), ranges[0].as_str(), ranges[2].as_str()), (3, "", "bytes=2097152-3145727"), "{ranges:?}");
    // Resumed where the flushed bytes end: at least 1 MiB, at most the 1.5 MiB that came.
    let resumed: u64 = ranges[1].strip_prefix("bytes=").unwrap().strip_suffix("-2097151").unwrap().parse().unwrap();
    assert!((1 << 20..=3 << 19).contains(&resumed), "{ranges:?}");
}

#[tokio::test]
async fn persistent_failures_fail_after_the_retries() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    server.store().always_500.insert("/b/bad".into());
    let err =
        stage_objects(&server, &[("bad", data(10, 9))], vec![input("bad", 10)], 600, dir.path()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage-in of bad failed after 4 tries: HTTP 500 Internal Server Error (InternalError: We encountered an \
         internal error.)"
    );
    assert_eq!(server.store().log.len(), 4);

    // Nothing listens: a connection error, without the URL.
    let broker = Broker::new(&server, &["/x"]);
    let url = Presigned { url: "http://127.0.0.1:1/x?sig=secret".into(), ..server.url("GET", "/x", "", 600) };
    let err = stage_in(&client(), &broker, dir.path(), &[input("x", 1)], vec![url], &limits(), &no_progress)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("stage-in of x failed after 4 tries: "), "{text}");
    assert!(text.contains("connection refused") || text.contains("connect"), "{text}");
    assert!(!text.contains("secret") && !text.contains("127.0.0.1:1"), "{text}");

    // Other 4xx fail at once.
    let broker = Broker::new(&server, &["/b/none"]);
    let url = server.url("GET", "/b/none", "", 600);
    let err = stage_in(&client(), &broker, dir.path(), &[input("none", 1)], vec![url], &limits(), &no_progress)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage-in of none failed: HTTP 404 Not Found (NoSuchKey: The specified key does not exist.)"
    );
}

#[tokio::test]
async fn expired_urls_are_refreshed() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (data(100, 10), data(200_000, 11));
    // Expired before use: fresh URLs for both inputs in one call, before any request.
    let objects = [("a", a.clone()), ("b", b.clone())];
    stage_objects(&server, &objects, vec![input("a", 100), input("b", 200_000)], -10, dir.path()).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b);
    assert!(server.store().log.iter().all(|l| l.3 != 403));

    // The store says expired (403) while the URL expires within seconds: refreshed too.
    let broker = Broker::new(&server, &["/b/a"]);
    let mut url = server.url("GET", "/b/a", "", -10);
    url.expires_at = SystemTime::now() + Duration::from_secs(2);
    stage_in(&client(), &broker, dir.path(), &[input("a", 100)], vec![url], &limits(), &no_progress).await.unwrap();
    assert_eq!(broker.calls().input_urls, [vec![0]]);

    // A 403 on a URL far from expiry is a plain denial.
    let mut url = server.url("GET", "/b/a", "", -10);
    url.expires_at = SystemTime::now() + Duration::from_secs(600);
    let err = stage_in(&client(), &broker, dir.path(), &[input("a", 100)], vec![url], &limits(), &no_progress)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "stage-in of a failed: HTTP 403 Forbidden (AccessDenied: Request has expired)");
}

#[tokio::test]
async fn bad_input_paths_are_refused() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (path, why) in [("../x", "goes up with .."), ("/etc/x", "is absolute"), ("a/../../x", "goes up with ..")] {
        let err = stage_objects(&server, &[("x", vec![1])], vec![input(path, 1)], 600, dir.path()).await.unwrap_err();
        assert_eq!(err.to_string(), format!("input path {path:?} is not allowed: it {why}"));
    }
    assert!(server.store().log.is_empty());
}

/// A work dir with `out/` (nested files, one multipart-sized) and `model.pt`.
fn outputs_dir() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("out/sub/deep")).unwrap();
    std::fs::write(root.join("out/a.txt"), b"hello").unwrap();
    std::fs::write(root.join("out/sub/deep/c.bin"), data(3000, 12)).unwrap();
    let big = data(250_000, 13);
    std::fs::write(root.join("out/big.bin"), &big).unwrap();
    std::fs::write(root.join("model.pt"), b"weights").unwrap();
    (dir, big)
}

#[tokio::test]
async fn stage_out_uploads_directories_files_and_multipart() {
    let server = Server::start().await;
    let (dir, big) = outputs_dir();
    let broker = Broker { stale_parts: true, ..Broker::new(&server, &[]) };
    server.store().fail_first.insert("/out/0/a.txt".into(), 2);
    let outputs = ["out/".to_owned(), "model.pt".to_owned()];
    let stats = stage_out(&client(), &broker, dir.path(), &outputs, &limits(), &no_progress).await.unwrap();
    assert_eq!((stats.files, stats.bytes), (4, 5 + 3000 + 250_000 + 7));
    assert!(stats.skipped.is_empty());
    let store = server.store();
    assert_eq!(store.uploaded["/out/0/a.txt"], b"hello");
    assert_eq!(store.uploaded["/out/0/sub/deep/c.bin"], data(3000, 12));
    assert_eq!(store.uploaded["/out/1/"], b"weights");
    let calls = broker.calls();
    let planned: Vec<_> = calls.plans[0].iter().map(|f| (f.output, f.path.as_str(), f.size)).collect();
    assert_eq!(planned, [(0, "a.txt", 5), (0, "big.bin", 250_000), (0, "sub/deep/c.bin", 3000), (1, "", 7)]);
    // The first part URLs had expired: fresh ones for all four parts in one call.
    assert_eq!(calls.part_urls.len(), 1);
    assert_eq!(calls.part_urls[0].len(), 4);
    assert_eq!(calls.completed.len(), 1);
    let done = &calls.completed[0];
    assert_eq!((done.output, done.key.as_str(), done.upload_id.as_str()), (0, "/out/0/big.bin", "up1"));
    let expected: Vec<CompletedPart> = big
        .chunks(64 << 10)
        .enumerate()
        .map(|(i, chunk)| CompletedPart { number: i as u32 + 1, etag: format!("\"{}\"", md5_hex(chunk)) })
        .collect();
    assert_eq!(done.parts, expected);
    for (i, chunk) in big.chunks(64 << 10).enumerate() {
        assert_eq!(store.uploaded[&format!("/out/0/big.bin?partNumber={}&uploadId=up1", i + 1)], chunk);
    }
}

#[tokio::test]
async fn stage_out_of_a_missing_output_is_an_error() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::new(&server, &[]);
    for spec in ["out/", "out/x/y.bin"] {
        let err = stage_out(&client(), &broker, dir.path(), &[spec.into()], &limits(), &no_progress).await.unwrap_err();
        assert_eq!(err.to_string(), format!("output {spec} does not exist"));
    }
    let err = stage_out(&client(), &broker, dir.path(), &["../etc".into()], &limits(), &no_progress).await.unwrap_err();
    assert_eq!(err.to_string(), "output path \"../etc\" is not allowed: it goes up with ..");
}

#[tokio::test]
async fn stage_out_never_follows_symlinks() {
    let server = Server::start().await;
    let (dir, _) = outputs_dir();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("shadow"), b"TOP SECRET").unwrap();
    let root = dir.path();
    std::os::unix::fs::symlink(outside.path().join("shadow"), root.join("out/link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("out/sub/dirlink")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("lnk")).unwrap();
    let broker = Broker::new(&server, &[]);
    let stats = stage_out(&client(), &broker, root, &["out".into()], &limits(), &no_progress).await.unwrap();
    assert_eq!(stats.skipped, ["out/link: a symbolic link", "out/sub/dirlink: a symbolic link"]);
    assert_eq!(stats.files, 3);
    {
        let store = server.store();
        assert!(store.uploaded.values().all(|body| body.as_slice() != b"TOP SECRET"));
        assert!(!store.uploaded.keys().any(|k| k.contains("link")));
    }

    for (spec, path) in
        [("out/link", "out/link"), ("lnk/shadow", "lnk"), ("lnk", "lnk"), ("out/sub/dirlink/", "out/sub/dirlink")]
    {
        let err = stage_out(&client(), &broker, root, &[spec.into()], &limits(), &no_progress).await.unwrap_err();
        let want = format!("output {path} is a symbolic link; only regular files and directories are uploaded");
        assert_eq!(err.to_string(), want);
    }
}

#[tokio::test]
async fn progress_is_reported_and_ends_at_the_total() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Mutex::new(Vec::new());
    let record = |p: Progress| seen.lock().unwrap().push(p);
    let (a, b) = (data(1000, 14), data(300_000, 15));
    for (key, bytes) in [("/b/a", &a), ("/b/b", &b)] {
        server.store().objects.insert(key.into(), bytes.clone().into());
    }
    let broker = Broker::new(&server, &["/b/a", "/b/b"]);
    let initial = vec![server.url("GET", "/b/a", "", 600), server.url("GET", "/b/b", "", 600)];
    let inputs = [input("a", 1000), input("b", 300_000)];
    stage_in(&client(), &broker, dir.path(), &inputs, initial, &limits(), &record).await.unwrap();
    let outputs = ["a".to_owned(), "b".to_owned()];
    stage_out(&client(), &broker, dir.path(), &outputs, &limits(), &record).await.unwrap();

    let seen = seen.into_inner().unwrap();
    for stage in [Stage::In, Stage::Out] {
        let reports: Vec<&Progress> = seen.iter().filter(|p| p.stage == stage).collect();
        assert!(reports.len() >= 2, "{stage}: {reports:?}");
        let (first, last) = (reports[0], reports[reports.len() - 1]);
        assert_eq!((first.bytes_done, first.files_done, first.bytes_total, first.files_total), (0, 0, 301_000, 2));
        assert_eq!((last.bytes_done, last.files_done), (301_000, 2));
        assert!(reports.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done), "{reports:?}");
    }
}

/// Stage-in of one big object from the in-process server against `curl` of the same URL.
/// `cargo test --release --lib agent::staging::tests::throughput -- --ignored --nocapture`;
/// `STAGING_BENCH_MIB` sets the size (default 1024).
#[test]
#[ignore = "benchmark"]
fn throughput_against_curl() {
    let size = std::env::var("STAGING_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024usize) << 20;
    let mut object = vec![0u8; size];
    fastrand::Rng::with_seed(17).fill(&mut object);
    let start = std::time::Instant::now();
    let etag = format!("\"{}\"", md5_hex(&object));
    println!("md5 on one core: {:.0} MB/s", size as f64 / 1e6 / start.elapsed().as_secs_f64());
    // The server has its own runtime and threads, as a store on the same machine would.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            tx.send(Server::start().await).unwrap();
            std::future::pending::<()>().await
        })
    });
    let server = rx.recv().unwrap();
    server.store().objects.insert("/b/big".into(), object.into());
    server.store().etags.insert("/b/big".into(), etag);
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let url = server.url("GET", "/b/big", "", 3600);
    let rate = |start: std::time::Instant| size as f64 / 1e6 / start.elapsed().as_secs_f64();
    let file = dir.path().join("curl.bin");
    for target in [Path::new("/dev/null"), file.as_path(), Path::new("/dev/null"), file.as_path()] {
        let start = std::time::Instant::now();
        let status = std::process::Command::new("curl").arg("-sfo").arg(target).arg(&url.url).status().unwrap();
        assert!(status.success());
        println!("curl -o {}: {:.0} MB/s", target.display(), rate(start));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (broker, http) = (Broker::new(&server, &["/b/big"]), client());
    let runs = [(StagingLimits::default(), true), (StagingLimits { concurrency: 4, ..Default::default() }, true)];
    for (limits, md5) in runs.into_iter().chain([(StagingLimits::default(), false)]) {
        if !md5 {
            // A multipart ETag: nothing to check the whole file against.
            server.store().etags.insert("/b/big".into(), "\"0123-2\"".into());
        }
        for _ in 0..2 {
            let _ = std::fs::remove_file(dir.path().join("big"));
            let start = std::time::Instant::now();
            let inputs = [input("big", size)];
            let staged = stage_in(&http, &broker, dir.path(), &inputs, vec![url.clone()], &limits, &no_progress);
            rt.block_on(staged).unwrap();
            let checked = if md5 { "md5 checked" } else { "no md5 known" };
            println!("stage_in (concurrency {}, {checked}): {:.0} MB/s", limits.concurrency, rate(start));
        }
    }
}
