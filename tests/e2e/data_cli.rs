//! `hybroker data put|ls|get` as a tenant runs it: files into the tenant's own prefixes (the
//! local store through the gateway; S3 and Azure with presigned URLs, big files in parts), a job
//! reading them as inputs, refusals outside the prefixes and above the upload limit.

use std::path::Path;

use hybroker::gateway::api::DataObjectList;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::emulators::{self, Azurite};
use crate::outputs::{DataCluster, md5_hex, text};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// A directory `in/` with `a.txt` and `sub/b.bin` (`b` bytes).
fn inputs(dir: &Path, b: &[u8]) -> std::path::PathBuf {
    let root = dir.join("in");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), "hello ").unwrap();
    std::fs::write(root.join("sub/b.bin"), b).unwrap();
    root
}

async fn ls(dc: &DataCluster, uri: &str) -> DataObjectList {
    serde_json::from_str(&dc.ok(&["data", "ls", uri, "--output", "json"]).await).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn data_put_into_the_local_store_feeds_a_job_whose_output_comes_back() {
    let dc = DataCluster::start(None).await;
    let b = random_bytes(2 << 20, 7);
    let local = inputs(dc.cluster.dir.path(), &b);
    let put = dc.ok(&["data", "put", local.to_str().unwrap(), "local://lab/acme/in/"]).await;
    assert!(put.contains("local://lab/acme/in/sub/b.bin") && put.contains(&md5_hex(&b)), "{put}");
    assert_eq!(std::fs::read(dc.objects.join("lab/acme/in/sub/b.bin")).unwrap(), b, "stored as sent");

    let listed = ls(&dc, "local://lab/acme/in/").await;
    let got: Vec<(&str, u64, Option<&str>)> =
        listed.objects.iter().map(|o| (o.key.as_str(), o.size, o.md5.as_deref())).collect();
    let (md5_a, md5_b) = (md5_hex(b"hello "), md5_hex(&b));
    assert_eq!(got, [("a.txt", 6, Some(md5_a.as_str())), ("sub/b.bin", 2 << 20, Some(md5_b.as_str()))]);

    // A job reads them as inputs; its output comes back with the CLI.
    let id = dc
        .run_job(
            "name: join\ncommand: [\"sh\", \"-c\", \"mkdir out && cat data/a.txt data/sub/b.bin > out/joined.bin\"]\n\
             inputs: [{uri: 'local://lab/acme/in/', path: data/}]\noutputs: [{path: out/, to: 'local://lab/acme/results/'}]\n",
        )
        .await;
    let dir = dc.cluster.path("results");
    dc.ok(&["jobs", "outputs", &id, "--download", dir.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(dir.join("out/joined.bin")).unwrap(), [&b"hello "[..], &b].concat());

    // data get: a prefix into a directory, one object to a file.
    let got_dir = dc.cluster.path("got");
    dc.ok(&["data", "get", "local://lab/acme/in/", got_dir.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(got_dir.join("sub/b.bin")).unwrap(), b);
    assert_eq!(std::fs::read(got_dir.join("a.txt")).unwrap(), b"hello ");
    let one = dc.cluster.path("one.bin");
    dc.ok(&["data", "get", "local://lab/acme/in/sub/b.bin", one.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(&one).unwrap(), b);

    // Outside the tenant's prefixes: 403 naming them; nothing stored.
    let out = dc.cli(&["data", "put", local.join("a.txt").to_str().unwrap(), "local://lab/globex/a.txt"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "tenant acme may not use local://lab/globex/a.txt (its allowed storage prefixes: local://lab/acme/) (403)"
        ),
        "{stderr}"
    );
    assert!(!dc.objects.join("lab/globex/a.txt").exists());
    let out = dc.cli(&["data", "ls", "local://lab/globex/"]).await;
    assert!(text(&out.stderr).contains("(403)"), "{}", text(&out.stderr));

    // A body that does not match its Content-MD5 is refused by the store and nothing is stored.
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/v1/data/object?uri=local://lab/acme/bad.bin", dc.gateway.url))
        .bearer_auth(&dc.acme)
        .header("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")
        .body("not those bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::BAD_REQUEST);
    let problem = put.text().await.unwrap();
    assert!(problem.contains("content-md5 does not match the bytes of local://lab/acme/bad.bin"), "{problem}");
    assert!(!dc.objects.join("lab/acme/bad.bin").exists());

    // Over the streamed upload limit: 413 from the announced length, before any byte is sent.
    let addr = dc.gateway.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "PUT /v1/data/object?uri=local://lab/acme/huge.bin HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        dc.acme,
        6u64 << 30
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 2048];
    let n = tcp.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the limit of 5368709120 bytes"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn data_put_and_get_with_s3_and_azure_in_parts() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (emulators::unique_name("data"), emulators::unique_name("data"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    let dc = DataCluster::start(Some((moto, &bucket, azurite, &container))).await;
    // 12 MiB: over the 8 MiB multipart threshold, so it goes up in 5 MiB parts.
    let b = random_bytes(12 << 20, 8);
    let local = inputs(dc.cluster.dir.path(), &b);
    let az_prefix = format!("az://{}/{container}/acme/in/", Azurite::ACCOUNT);
    for prefix in [format!("s3://{bucket}/acme/in/"), az_prefix] {
        dc.ok(&["data", "put", local.to_str().unwrap(), &prefix]).await;
        let listed = ls(&dc, &prefix).await;
        let sizes: Vec<(&str, u64)> = listed.objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
        assert_eq!(sizes, [("a.txt", 6), ("sub/b.bin", 12 << 20)], "{prefix}");
        assert!(listed.objects.iter().all(|o| o.download.via == "store"));
        let dir = dc.cluster.path(&format!("got-{}", fastrand::u32(..)));
        let out = dc.cli(&["data", "get", &prefix, dir.to_str().unwrap()]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(std::fs::read(dir.join("sub/b.bin")).unwrap(), b, "{prefix}");
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello ");
    }
    // Read with the emulators' own clients too.
    let key = "acme/in/sub/b.bin";
    assert_eq!(md5_hex(&emulators::s3_get(moto, &bucket, key).await), md5_hex(&b));
    assert_eq!(md5_hex(&emulators::azure_get(azurite, &container, key).await), md5_hex(&b));
    // A job reads the S3 upload as its input.
    let id = dc
        .run_job(&format!(
            "name: size\ncommand: [\"sh\", \"-c\", \"mkdir out && md5sum data/b.bin | cut -c1-32 > out/md5\"]\n\
             inputs: [{{uri: 's3://{bucket}/{key}', path: data/b.bin}}]\noutputs: [{{path: out/, to: 'local://lab/acme/sums/'}}]\n"
        ))
        .await;
    let dir = dc.cluster.path("sums");
    dc.ok(&["jobs", "outputs", &id, "--download", dir.to_str().unwrap()]).await;
    assert_eq!(std::fs::read_to_string(dir.join("out/md5")).unwrap().trim(), md5_hex(&b));
}
