//! Job data end to end: inputs in one cloud's store, outputs in the other's, moved by a real agent
//! through presigned URLs against real emulators (moto for S3, Azurite for Azure Blob), checked
//! with clients built in the test; refused inputs; faults; a large object; checksums: inputs are
//! checked against the store's full-object CRC where it keeps one, so damage is refused.

use std::path::Path;
use std::time::Duration;

use hybroker::proto::{self, SpecFormat};
use md5::{Digest, Md5};
use tonic::Code;

use crate::common::{Cluster, DEADLINE, Setup, eventually, get, processes_with, states, watch_to_end};
use crate::emulators::{self, Azurite, Moto, unique_name};

const TTL: Duration = Duration::from_secs(3);
/// Short agent retries, so fault tests end in seconds.
const AGENT_STAGING: &str =
    "[staging]\nretries = 2\nmin_backoff = \"50ms\"\nmax_backoff = \"200ms\"\nrequest_timeout = \"10s\"\n";

/// A broker with an S3 location on moto and an Azure location on Azurite; tenant `acme` may use
/// both, tenant `globex` only its own prefix of the bucket.
fn setup(dir: &Path, moto: &Moto, bucket: &str, azurite: &Azurite, container: &str) -> Setup {
    let key_file = dir.join("azure.key");
    std::fs::write(&key_file, Azurite::KEY).unwrap();
    let broker_extra = format!(
        "[staging]\nmultipart_threshold_mib = 8\npart_size_mib = 5\n\
         [[tenant]]\nname = \"acme\"\nstorage = [\"s3://{bucket}/\", \"az://{account}/{container}/\"]\n\
         [[tenant]]\nname = \"globex\"\nstorage = [\"s3://{bucket}/globex/\"]\n\
         [[storage]]\nname = \"s3data\"\ncloud = \"aws\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\nendpoint = \"{s3}\"\nresidency = \"us\"\n\
         [[storage]]\nname = \"azdata\"\ncloud = \"azure\"\nregion = \"westeurope\"\naccount = \"{account}\"\ncontainer = \"{container}\"\n\
         endpoint = \"{az}\"\naccount_key_file = \"{key}\"\nresidency = \"eu\"\n",
        account = Azurite::ACCOUNT,
        s3 = moto.endpoint(),
        az = azurite.endpoint(),
        key = key_file.display(),
    );
    Setup { broker_extra: Some(broker_extra), broker_env: aws_env(), agent_extra: AGENT_STAGING.into() }
}

/// The broker's AWS credentials come from the default chain (here: the environment), and only
/// the broker process gets them.
pub fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", Moto::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", Moto::SECRET_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub async fn submit_as(cluster: &Cluster, tenant: &str, yaml: &str) -> Result<String, tonic::Status> {
    let request = proto::SubmitRequest {
        spec: yaml.as_bytes().to_vec(),
        format: SpecFormat::Yaml.into(),
        idempotency_key: String::new(),
        tenant: tenant.into(),
    };
    Ok(cluster.admin().await.submit(request).await?.into_inner().job_id)
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn put_s3(moto: &Moto, bucket: &str, key: &str, body: Vec<u8>) {
    let put = moto.client().put_object().bucket(bucket).key(key).body(body.into()).send().await;
    put.unwrap_or_else(|e| panic!("seeding s3://{bucket}/{key}: {e:?}"));
}

async fn put_azure(azurite: &Azurite, container: &str, blob: &str, body: Vec<u8>) {
    let client = azurite.client().container_client(container).blob_client(blob);
    client.put_block_blob(body).await.unwrap_or_else(|e| panic!("seeding {container}/{blob}: {e}"));
}

/// The command every data job runs: joins its inputs and records their checksums.
const JOIN: &str = r#"["sh", "-c", "mkdir -p out/sums && cat data/a.txt data/sub/b.bin > out/joined.bin && md5sum data/sub/b.bin > out/sums/b.md5"]"#;

#[tokio::test(flavor = "multi_thread")]
async fn s3_inputs_become_azure_outputs() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("in"), unique_name("out"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    let b = random_bytes(3 << 20, 1);
    put_s3(moto, &bucket, "ds/a.txt", b"hello ".to_vec()).await;
    put_s3(moto, &bucket, "ds/sub/b.bin", b.clone()).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, moto, &bucket, azurite, &container)).await;

    let yaml = format!(
        "name: s3-to-azure\ncommand: {JOIN}\ninputs: [{{uri: 's3://{bucket}/ds/', path: data/}}]\n\
         outputs: [{{path: out/, to: 'az://{account}/{container}/results/'}}]\n",
        account = Azurite::ACCOUNT
    );
    let id = submit_as(&cluster, "acme", &yaml).await.unwrap();
    let events = watch_to_end(&mut cluster.admin().await, &id).await;
    let job = get(&mut cluster.admin().await, &id).await;
    assert_eq!(job.state, "succeeded", "{events:?}\n{}", cluster.agent_log("n1"));
    assert_eq!((job.input_objects, job.input_bytes), (2, 6 + b.len() as u64));
    let prefix = format!("results/acme/{id}/attempt-1/");
    assert_eq!(job.outputs, [format!("az://{}/{container}/{prefix}", Azurite::ACCOUNT)]);
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.starts_with("stage-in ")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("stage-out ")), "{reasons:?}");

    // Checked with a client built here, not the agent's code path: bytes and checksums.
    let joined = emulators::azure_get(azurite, &container, &format!("{prefix}joined.bin")).await;
    assert_eq!(joined, [&b"hello "[..], &b].concat());
    let sums = emulators::azure_get(azurite, &container, &format!("{prefix}sums/b.md5")).await;
    assert!(String::from_utf8_lossy(&sums).starts_with(&md5_hex(&b)), "{}", String::from_utf8_lossy(&sums));
    no_secrets_in_logs(&cluster);
}

/// The services' logs carry no signature, key or token, though presigned URLs went through both.
fn no_secrets_in_logs(cluster: &Cluster) {
    for (who, log) in [("broker", cluster.broker_log()), ("agent", cluster.agent_log("n1"))] {
        assert!(!log.is_empty(), "{who} log is empty");
        for secret in ["X-Amz-Signature", "X-Amz-Credential", "sig=", "hbk_", "-----BEGIN", Azurite::KEY, "AWS_SECRET"]
        {
            assert!(!log.contains(secret), "the {who} log holds {secret:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_inputs_become_s3_outputs_in_parts() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("out"), unique_name("in"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    // 12 MiB: over the 8 MiB multipart threshold, so the output goes up in 5 MiB parts.
    let b = random_bytes(12 << 20, 2);
    put_azure(azurite, &container, "ds/a.txt", b"hello ".to_vec()).await;
    put_azure(azurite, &container, "ds/sub/b.bin", b.clone()).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, moto, &bucket, azurite, &container)).await;

    let yaml = format!(
        "name: azure-to-s3\ncommand: {JOIN}\ninputs: [{{uri: 'az://{account}/{container}/ds/', path: data/}}]\n\
         outputs: [{{path: out/, to: 's3://{bucket}/runs'}}]\n",
        account = Azurite::ACCOUNT
    );
    let id = submit_as(&cluster, "acme", &yaml).await.unwrap();
    let events = watch_to_end(&mut cluster.admin().await, &id).await;
    let job = get(&mut cluster.admin().await, &id).await;
    assert_eq!(job.state, "succeeded", "{events:?}\n{}", cluster.agent_log("n1"));
    let prefix = format!("runs/acme/{id}/attempt-1/");
    assert_eq!(job.outputs, [format!("s3://{bucket}/{prefix}")]);
    let joined = emulators::s3_get(moto, &bucket, &format!("{prefix}joined.bin")).await;
    assert_eq!(md5_hex(&joined), md5_hex(&[&b"hello "[..], &b].concat()));
    assert_eq!(joined.len(), 6 + b.len());
    let head = moto.client().head_object().bucket(&bucket).key(format!("{prefix}joined.bin")).send().await.unwrap();
    let etag = head.e_tag().unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "a 3-part upload's ETag, got {etag}");
    let sums = emulators::s3_get(moto, &bucket, &format!("{prefix}sums/b.md5")).await;
    assert!(String::from_utf8_lossy(&sums).starts_with(&md5_hex(&b)));
    no_secrets_in_logs(&cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_data_uris_are_clear_400s_and_store_nothing() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("refuse"), unique_name("refuse"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    put_s3(moto, &bucket, "acme/x.bin", b"x".to_vec()).await;
    put_s3(moto, &bucket, "globex/secret.bin", b"s".to_vec()).await;
    let cluster = Cluster::start_with(TTL, &[], |d| setup(d, moto, &bucket, azurite, &container)).await;
    let input = |uri: &str| format!("name: x\ncommand: [\"true\"]\ninputs: [{{uri: '{uri}', path: data/}}]\n");
    let other_bucket = format!("s3://{bucket}/acme/");
    let cases = [
        ("acme", input("s3://no-such-bucket/x"), "not a configured storage location"),
        ("acme", input(&format!("s3://{bucket}/missing.bin")), "does not exist"),
        ("acme", input(&format!("s3://{bucket}/nothing-here/")), "no objects under"),
        ("acme", input("http://169.254.169.254/latest/meta-data/"), "scheme \"http\" is not allowed"),
        ("acme", input("file:///etc/passwd"), "scheme \"file\" is not allowed"),
        ("acme", input(&format!("s3://user@{bucket}/acme/x.bin")), "userinfo"),
        ("acme", input(&format!("s3://{bucket}/acme/%2e%2e/globex/secret.bin")), "escapes"),
        ("acme", input(&format!("s3://{bucket}/acme/../globex/secret.bin")), ". or .. segments"),
        ("globex", input(&format!("s3://{bucket}/acme/x.bin")), "tenant globex may not use"),
        (
            "globex",
            format!("name: x\ncommand: [\"true\"]\noutputs: [{{path: out/, to: '{other_bucket}'}}]\n"),
            "tenant globex may not use",
        ),
    ];
    for (tenant, yaml, want) in &cases {
        let err = submit_as(&cluster, tenant, yaml).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{yaml}: {err:?}");
        assert!(err.message().contains(want), "{yaml}: want {want:?} in {:?}", err.message());
    }
    let list = proto::ListJobsRequest { limit: 100, ..Default::default() };
    let jobs = cluster.admin().await.list(list).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty(), "refused submits stored jobs: {jobs:?}");
    // The same prefix is fine for its own tenant.
    submit_as(&cluster, "globex", &input(&format!("s3://{bucket}/globex/secret.bin"))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_hold_no_cloud_credentials() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("creds"), unique_name("creds"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    put_s3(moto, &bucket, "in.txt", b"data".to_vec()).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, moto, &bucket, azurite, &container)).await;
    // The job itself prints its environment: nothing of the broker's credentials reaches it either.
    let yaml = format!(
        "name: env\ncommand: [\"sh\", \"-c\", \"env; cat data\"]\ninputs: [{{uri: 's3://{bucket}/in.txt', path: data}}]\n"
    );
    let id = submit_as(&cluster, "acme", &yaml).await.unwrap();
    watch_to_end(&mut cluster.admin().await, &id).await;
    assert_eq!(get(&mut cluster.admin().await, &id).await.state, "succeeded");
    let environ = std::fs::read(format!("/proc/{}/environ", cluster.agent_pid("n1"))).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let config = std::fs::read_to_string(cluster.path("agent-n1.toml")).unwrap();
    let logs = cluster.admin().await.logs(proto::LogsRequest { job_id: id, ..Default::default() }).await.unwrap();
    let job_env = String::from_utf8_lossy(&logs.into_inner().output).to_string();
    for (what, text) in [("agent environment", &*environ), ("agent config", &config), ("job environment", &job_env)] {
        for secret in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_", Azurite::KEY] {
            assert!(!text.contains(secret), "{what} holds {secret:?}");
        }
    }
    assert!(job_env.contains("data"), "the job read its staged input: {job_env}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_dying_mid_upload_fails_the_job_clearly_after_retries() {
    let own = emulators::own_moto().await;
    let azurite = emulators::azurite().await;
    let (bucket, container) = (unique_name("dies"), unique_name("dies"));
    own.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, &own, &bucket, azurite, &container)).await;
    // 64 MiB out in 5 MiB parts: the store is killed once the upload has started.
    let yaml = format!(
        "name: dies\nmax_attempts: 2\ncommand: [\"sh\", \"-c\", \"mkdir out && head -c 67108864 /dev/urandom > out/big.bin\"]\n\
         outputs: [{{path: out/, to: 's3://{bucket}/runs/'}}]\n"
    );
    let id = submit_as(&cluster, "acme", &yaml).await.unwrap();
    let mut admin = cluster.admin().await;
    eventually("stage-out to start", || {
        let mut admin = admin.clone();
        let id = id.clone();
        async move {
            let req = proto::WatchJobRequest { job_id: id, tenant: String::new(), after_seq: 0 };
            let mut stream = admin.watch(req).await.ok()?.into_inner();
            let first = tokio::time::timeout(Duration::from_millis(200), async {
                while let Some(Ok(ev)) = tokio_stream::StreamExt::next(&mut stream).await {
                    if ev.reason.starts_with("stage-out") {
                        return Some(());
                    }
                }
                None
            });
            first.await.ok().flatten()
        }
    })
    .await;
    own.kill();
    let events = watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    assert_eq!(job.state, "failed", "{events:?}");
    assert!(!states(&events).contains(&"succeeded"));
    assert!(job.reason.contains("stage-out failed") && job.reason.contains("no attempts left"), "{}", job.reason);
    assert_eq!(job.attempts, 2, "the job was tried again: {events:?}");
    assert!(job.outputs.is_empty());
    assert!(events.iter().any(|e| e.reason.contains("attempt 1 failed: stage-out failed")), "{events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_writes_under_a_fresh_attempt_prefix() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("retry"), unique_name("retry"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, moto, &bucket, azurite, &container)).await;
    // Attempt 1 writes its first output but not the second, so its stage-out fails; attempt 2 both.
    let yaml = format!(
        "name: retry\nmax_attempts: 2\ncommand: [\"sh\", \"-c\", \"mkdir -p out && echo $HYBROKER_ATTEMPT > out/n.txt && \
         if [ $HYBROKER_ATTEMPT = 2 ]; then mkdir -p more && echo two > more/m.txt; fi\"]\n\
         outputs: [{{path: out/, to: 'az://{account}/{container}/r/'}}, {{path: more/, to: 'az://{account}/{container}/r/'}}]\n",
        account = Azurite::ACCOUNT
    );
    let id = submit_as(&cluster, "acme", &yaml).await.unwrap();
    let events = watch_to_end(&mut cluster.admin().await, &id).await;
    let job = get(&mut cluster.admin().await, &id).await;
    assert_eq!(job.state, "succeeded", "{events:?}");
    assert_eq!(job.attempts, 2);
    let prefix = format!("r/acme/{id}/attempt-2/");
    assert_eq!(job.outputs, vec![format!("az://{}/{container}/{prefix}", Azurite::ACCOUNT); 2]);
    assert_eq!(emulators::azure_get(azurite, &container, &format!("{prefix}n.txt")).await, b"2\n");
    assert_eq!(emulators::azure_get(azurite, &container, &format!("{prefix}m.txt")).await, b"two\n");
    assert!(events.iter().any(|e| e.reason.contains("more/ does not exist")), "{events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_object_is_staged_in_parallel_and_uploaded_in_parts() {
    // The local store: an S3-compatible server inside the broker over a directory we can read.
    let mut objects = std::path::PathBuf::new();
    let cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| {
        objects = dir.join("objects");
        let broker_extra = format!(
            "[[tenant]]\nname = \"acme\"\nstorage = [\"local://lab/acme/\"]\n\
             [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{}\"\n",
            objects.display()
        );
        Setup { broker_extra: Some(broker_extra), broker_env: vec![], agent_extra: AGENT_STAGING.into() }
    })
    .await;
    let mut admin = cluster.admin().await;
    // A 256 MiB output goes up in parts; a second job stages it in (parallel ranges) and copies it.
    let make = "name: make\ncommand: [\"sh\", \"-c\", \"mkdir out && head -c 268435456 /dev/urandom > out/big.bin\"]\n\
                outputs: [{path: out/, to: 'local://lab/acme/gen/'}]\n";
    let made = submit_as(&cluster, "acme", make).await.unwrap();
    let events = tokio::time::timeout(DEADLINE * 2, watch_to_end(&mut admin, &made)).await.unwrap();
    let job = get(&mut admin, &made).await;
    assert_eq!(job.state, "succeeded", "{events:?}\n{}", cluster.agent_log("n1"));
    let big = format!("{}big.bin", job.outputs[0]);
    let copy = format!(
        "name: copy\ncommand: [\"sh\", \"-c\", \"mkdir out && cp data/big.bin out/copy.bin\"]\n\
         inputs: [{{uri: '{big}', path: data/}}]\noutputs: [{{path: out/, to: 'local://lab/acme/copies/'}}]\n"
    );
    let id = submit_as(&cluster, "acme", &copy).await.unwrap();
    let events = tokio::time::timeout(DEADLINE * 2, watch_to_end(&mut admin, &id)).await.unwrap();
    let job = get(&mut admin, &id).await;
    assert_eq!(job.state, "succeeded", "{events:?}\n{}", cluster.agent_log("n1"));
    assert_eq!(job.input_bytes, 256 << 20);
    let original = std::fs::read(objects.join(format!("lab/acme/gen/acme/{made}/attempt-1/big.bin"))).unwrap();
    let copied = std::fs::read(objects.join(format!("lab/acme/copies/acme/{id}/attempt-1/copy.bin"))).unwrap();
    assert_eq!(original.len(), 256 << 20);
    assert_eq!(md5_hex(&copied), md5_hex(&original));

    // Bodies stream between sockets and files: the broker, which serves the local store, never held
    // the 256 MiB object in memory.
    let broker = processes_with(cluster.path("broker.toml").to_str().unwrap());
    assert_eq!(broker.len(), 1, "{broker:?}");
    let peak = peak_rss_mib(broker[0]);
    assert!(peak < 192, "the broker's peak rss is {peak} MiB");

    // The object's multipart ETag gives no MD5; the store recorded a CRC32C when the upload
    // completed, which stage-in checks: a byte changed on the store's disk is refused.
    let stored = objects.join(format!("lab/acme/gen/acme/{made}/attempt-1/big.bin"));
    let file = std::fs::OpenOptions::new().write(true).open(&stored).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[!original[200 << 20]], 200 << 20).unwrap();
    let id = submit_as(&cluster, "acme", &copy.replace("name: copy\n", "name: copy\nmax_attempts: 1\n")).await.unwrap();
    let events = tokio::time::timeout(DEADLINE * 2, watch_to_end(&mut admin, &id)).await.unwrap();
    let job = get(&mut admin, &id).await;
    assert_eq!(job.state, "failed", "{events:?}");
    let refused = "stage-in of data/big.bin: crc32c mismatch: the store's x-amz-checksum-crc32c says";
    assert!(events.iter().any(|e| e.reason.contains(refused)), "{events:?}\n{}", cluster.agent_log("n1"));
}

/// Peak resident memory of process `pid`, from `/proc/PID/status`.
fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// PUTs `body` to moto with a CRC32 (what AWS SDKs send by default; moto 5.2 without the optional
/// `crc32c` module computes a plain CRC32 for CRC32C too): moto computes it
/// (`x-amz-sdk-checksum-algorithm` alone), or records `value` as given, unchecked, as a store whose
/// copy was damaged would hold it.
async fn put_s3_with_crc32(moto: &Moto, bucket: &str, key: &str, body: Vec<u8>, value: Option<&str>) {
    hybroker::tls::install_crypto_provider();
    let mut put = reqwest::Client::new()
        .put(format!("{}/{bucket}/{key}", moto.endpoint()))
        .header("x-amz-sdk-checksum-algorithm", "CRC32");
    if let Some(value) = value {
        put = put.header("x-amz-checksum-crc32", value);
    }
    let response = put.body(body).send().await.unwrap();
    assert!(response.status().is_success(), "seeding s3://{bucket}/{key}: {}", response.status());
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_inputs_are_checked_against_the_stores_crc() {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("crc"), unique_name("crc"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    // 20 MiB: staged in as 16 MiB ranges (the first a whole GET, where S3 reports the checksum).
    let big = random_bytes(20 << 20, 7);
    put_s3_with_crc32(moto, &bucket, "ok/big.bin", big.clone(), None).await;
    put_s3_with_crc32(moto, &bucket, "bad/big.bin", big.clone(), Some("AAAAAA==")).await;
    let cluster =
        Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |d| setup(d, moto, &bucket, azurite, &container)).await;
    let mut admin = cluster.admin().await;
    let job = |dir: &str| {
        format!(
            "name: crc\nmax_attempts: 1\ncommand: [\"sh\", \"-c\", \"md5sum data/big.bin\"]\n\
             inputs: [{{uri: 's3://{bucket}/{dir}/big.bin', path: data/}}]\n"
        )
    };
    let id = submit_as(&cluster, "acme", &job("ok")).await.unwrap();
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "{events:?}\n{}", cluster.agent_log("n1"));
    let id = submit_as(&cluster, "acme", &job("bad")).await.unwrap();
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "failed", "{events:?}");
    let refused = "stage-in of data/big.bin: crc32 mismatch: the store's x-amz-checksum-crc32 says AAAAAA==";
    assert!(events.iter().any(|e| e.reason.contains(refused)), "{events:?}");
}
