//! A job's outputs back to the tenant with nothing but `hybroker`: `jobs outputs ID` lists them,
//! `--download DIR` writes them, resumes an interrupted `.part` with a range request and checks
//! the store's MD5 — from the embedded local store (bytes streamed through the gateway from the
//! broker), moto (S3) and Azurite (presigned URLs). Another tenant gets 404; a job that has not
//! succeeded gets 409.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use hybroker::gateway::api::JobOutputs;
use md5::{Digest, Md5};

use crate::common::{Cluster, Gateway, Setup, tenant_cli};
use crate::emulators::{Azurite, Moto};

const TTL: Duration = Duration::from_secs(3);

/// A cluster with a local store (`local://lab/`) and, when given, an S3 bucket on moto and an
/// Azure container on Azurite; tenant `acme` may use `acme/` of each, `globex` only
/// `local://lab/globex/`. One agent, one gateway, a key per tenant.
pub struct DataCluster {
    pub cluster: Cluster,
    pub gateway: Gateway,
    pub acme: String,
    pub globex: String,
    /// The local store's directory (bucket `lab` is `objects/lab`).
    pub objects: PathBuf,
}

impl DataCluster {
    pub async fn start(clouds: Option<(&Moto, &str, &Azurite, &str)>) -> DataCluster {
        let mut objects = PathBuf::new();
        let cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| {
            objects = dir.join("objects");
            let (mut acme, mut storage, mut env) = (vec!["local://lab/acme/".to_string()], String::new(), Vec::new());
            if let Some((moto, bucket, azurite, container)) = clouds {
                let key_file = dir.join("azure.key");
                std::fs::write(&key_file, Azurite::KEY).unwrap();
                acme.push(format!("s3://{bucket}/acme/"));
                acme.push(format!("az://{}/{container}/acme/", Azurite::ACCOUNT));
                storage = format!(
                    "[[storage]]\nname = \"s3data\"\ncloud = \"aws\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\nendpoint = \"{s3}\"\n\
                     [[storage]]\nname = \"azdata\"\ncloud = \"azure\"\nregion = \"westeurope\"\naccount = \"{account}\"\n\
                     container = \"{container}\"\nendpoint = \"{az}\"\naccount_key_file = \"{key}\"\n",
                    s3 = moto.endpoint(),
                    account = Azurite::ACCOUNT,
                    az = azurite.endpoint(),
                    key = key_file.display(),
                );
                env = crate::data::aws_env();
            }
            let acme = acme.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ");
            let broker_extra = format!(
                "[staging]\nmultipart_threshold_mib = 8\npart_size_mib = 5\n\
                 [[tenant]]\nname = \"acme\"\nstorage = [{acme}]\n\
                 [[tenant]]\nname = \"globex\"\nstorage = [\"local://lab/globex/\"]\n\
                 [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{}\"\n{storage}",
                objects.display()
            );
            Setup { broker_extra: Some(broker_extra), broker_env: env, agent_extra: String::new() }
        })
        .await;
        let gateway = cluster.start_gateway();
        let (acme, globex) = (cluster.tenant_key("acme"), cluster.tenant_key("globex"));
        DataCluster { cluster, gateway, acme, globex, objects }
    }

    /// `hybroker ARGS` as tenant acme.
    pub async fn cli(&self, args: &[&str]) -> Output {
        tenant_cli(&self.gateway, &self.acme, args).await
    }

    /// `hybroker ARGS` as tenant acme, which must succeed; its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(out.status.success(), "hybroker {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    }

    /// Submits a job spec as acme and follows it to success; its id.
    pub async fn run_job(&self, yaml: &str) -> String {
        let file = self.cluster.path(&format!("job-{}.yaml", fastrand::u64(..)));
        std::fs::write(&file, yaml).unwrap();
        let out = self.cli(&["submit", file.to_str().unwrap(), "--follow"]).await;
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}{}\n{}", text(&out.stderr), self.cluster.agent_log("n1"));
        stdout.lines().find_map(|l| l.strip_prefix("submitted ")).expect("the job id is printed").trim().to_string()
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `jobs outputs ID --output json`.
async fn listed(dc: &DataCluster, id: &str) -> JobOutputs {
    serde_json::from_str(&dc.ok(&["jobs", "outputs", id, "--output", "json"]).await).unwrap()
}

/// Downloads into `dir` and returns stderr (the final line says what was done).
async fn download(dc: &DataCluster, id: &str, dir: &Path) -> String {
    let out = dc.cli(&["jobs", "outputs", id, "--download", dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stderr)
}

/// Leaves the first half of `file` as its `.part` (optionally with one byte changed): an
/// interrupted download.
fn interrupt(file: &Path, corrupt: bool) -> PathBuf {
    let mut bytes = std::fs::read(file).unwrap();
    bytes.truncate(bytes.len() / 2);
    if corrupt {
        bytes[10] ^= 0xff;
    }
    let part = PathBuf::from(format!("{}.part", file.display()));
    std::fs::write(&part, bytes).unwrap();
    std::fs::remove_file(file).unwrap();
    part
}

/// Makes `out/a.txt` and a 3 MiB `out/sub/b.bin` (random), and the same in `copy/`; the outputs
/// are `(path, to)`.
fn maker(outputs: &[(&str, &str)]) -> String {
    let outputs: Vec<String> = outputs.iter().map(|(path, to)| format!("{{path: {path}, to: '{to}'}}")).collect();
    format!(
        "name: maker\ncommand: [\"sh\", \"-c\", \"mkdir -p out/sub && echo hello > out/a.txt && head -c 3145728 /dev/urandom > out/sub/b.bin && cp -r out copy\"]\n\
         outputs: [{}]\n",
        outputs.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn local_outputs_download_resume_and_verify_through_the_gateway() {
    let dc = DataCluster::start(None).await;
    let id = dc.run_job(&maker(&[("out/", "local://lab/acme/runs/")])).await;
    let stored =
        |key: &str| std::fs::read(dc.objects.join(format!("lab/acme/runs/acme/{id}/attempt-1/{key}"))).unwrap();
    let (a, b) = (stored("a.txt"), stored("sub/b.bin"));

    let outputs = listed(&dc, &id).await;
    assert_eq!((outputs.job_id.as_str(), outputs.attempt, outputs.outputs.len()), (id.as_str(), 1, 1));
    let objects = &outputs.outputs[0].objects;
    let got: Vec<(&str, u64, Option<&str>, &str)> =
        objects.iter().map(|o| (o.key.as_str(), o.size, o.md5.as_deref(), o.download.via.as_str())).collect();
    let (md5_a, md5_b) = (md5_hex(&a), md5_hex(&b));
    assert_eq!(
        got,
        [("a.txt", 6, Some(md5_a.as_str()), "gateway"), ("sub/b.bin", 3 << 20, Some(md5_b.as_str()), "gateway")]
    );
    assert!(objects[1].download.url.starts_with(&format!("/v1/jobs/{id}/outputs/0?key=")), "{:?}", objects[1].download);
    let table = dc.ok(&["jobs", "outputs", &id]).await;
    assert!(table.contains("sub/b.bin") && table.contains(&md5_b), "{table}");

    // Downloaded whole, then skipped as complete.
    let dir = dc.cluster.path("downloads");
    let stderr = download(&dc, &id, &dir).await;
    assert!(stderr.contains("downloaded 2 objects (3145734 bytes received, 0 resumed, 2 md5-verified)"), "{stderr}");
    let (file_a, file_b) = (dir.join("out/a.txt"), dir.join("out/sub/b.bin"));
    assert_eq!((std::fs::read(&file_a).unwrap(), std::fs::read(&file_b).unwrap()), (a.clone(), b.clone()));
    let stderr = download(&dc, &id, &dir).await;
    assert!(stderr.contains("downloaded 0 objects") && stderr.contains("skipped 2 already complete"), "{stderr}");

    // An interrupted download continues from its .part with a range: only the rest is received.
    let part = interrupt(&file_b, false);
    let stderr = download(&dc, &id, &dir).await;
    assert!(stderr.contains("downloaded 1 objects (1572864 bytes received, 1 resumed"), "{stderr}");
    assert_eq!(std::fs::read(&file_b).unwrap(), b);
    assert!(!part.exists());

    // A damaged .part fails the MD5 check: the object is named, the .part deleted; the next run
    // downloads it anew.
    let part = interrupt(&file_b, true);
    let out = dc.cli(&["jobs", "outputs", &id, "--download", dir.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("local://lab/acme/runs/acme/{id}/attempt-1/sub/b.bin: md5 mismatch")), "{stderr}");
    assert!(!part.exists() && !file_b.exists());
    download(&dc, &id, &dir).await;
    assert_eq!(std::fs::read(&file_b).unwrap(), b);

    // Keys stay inside the output's prefix: no way up to another job's objects.
    let http = reqwest::Client::new();
    for key in ["../../other/x", "sub/../../a.txt", "", "/etc/passwd"] {
        let url = format!("{}/v1/jobs/{id}/outputs/0", dc.gateway.url);
        let answer = http.get(url).query(&[("key", key)]).bearer_auth(&dc.acme).send().await.unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::BAD_REQUEST, "{key:?}");
        assert!(answer.text().await.unwrap().contains("is not an object key of the output"), "{key:?}");
    }
    let url = format!("{}/v1/jobs/{id}/outputs/0?key=a.txt", dc.gateway.url);
    let answer = http.get(&url).bearer_auth(&dc.acme).header("range", "bytes=2-").send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::PARTIAL_CONTENT);
    assert_eq!(answer.headers()["content-range"], "bytes 2-5/6");
    assert_eq!(answer.bytes().await.unwrap(), &b"llo\n"[..]);
    let answer = http.get(&url).bearer_auth(&dc.acme).header("range", "bytes=6-").send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(answer.headers()["content-range"], "bytes */6");

    // On a terminal (a pty from `script`, util-linux), stderr shows a byte progress bar.
    let tty_dir = dc.cluster.path("tty-downloads");
    let command = format!("{} jobs outputs {id} --download {}", crate::common::BIN, tty_dir.display());
    let mut script = tokio::process::Command::new("script");
    script
        .args(["-qec", &command, "/dev/null"])
        .env("HYBROKER_GATEWAY", &dc.gateway.url)
        .env("HYBROKER_TOKEN", &dc.acme);
    let out = tokio::time::timeout(crate::common::DEADLINE, script.output()).await.unwrap().unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}{}", text(&out.stderr));
    assert!(screen.contains("] ") && screen.contains(" / 3.0 MiB "), "no progress bar in {screen:?}");
    assert_eq!(std::fs::read(tty_dir.join("out/sub/b.bin")).unwrap(), b);

    // Another tenant: not found, as for the job itself.
    let out = tenant_cli(&dc.gateway, &dc.globex, &["jobs", "outputs", &id]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!("job {id} not found (404)")), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_has_not_succeeded_has_no_outputs_to_read() {
    let dc = DataCluster::start(None).await;
    let file = dc.cluster.path("sleeper.yaml");
    std::fs::write(
        &file,
        "name: sleeper\ncommand: [\"sleep\", \"60\"]\noutputs: [{path: out/, to: 'local://lab/acme/x/'}]\n",
    )
    .unwrap();
    let submitted = dc.ok(&["submit", file.to_str().unwrap()]).await;
    let id = submitted.trim().strip_prefix("submitted ").unwrap().to_string();
    let out = dc.cli(&["jobs", "outputs", &id]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("job {id} is ")), "{stderr}");
    assert!(stderr.contains("once it has succeeded (409)"), "{stderr}");
    dc.ok(&["jobs", "cancel", &id]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_and_azure_outputs_download_with_presigned_urls_resume_and_verify() {
    let (moto, azurite) = (crate::emulators::moto().await, crate::emulators::azurite().await);
    let (bucket, container) = (crate::emulators::unique_name("outs"), crate::emulators::unique_name("outs"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    let dc = DataCluster::start(Some((moto, &bucket, azurite, &container))).await;
    let s3 = format!("s3://{bucket}/acme/runs/");
    let az = format!("az://{}/{container}/acme/runs/", Azurite::ACCOUNT);
    let id = dc.run_job(&maker(&[("out/", &s3), ("copy/", &az)])).await;

    let outputs = listed(&dc, &id).await;
    assert_eq!(outputs.outputs.len(), 2);
    let prefix = format!("acme/runs/acme/{id}/attempt-1/");
    // Read with the emulators' own clients: what the CLI must reproduce.
    let from_s3 = crate::emulators::s3_get(moto, &bucket, &format!("{prefix}sub/b.bin")).await;
    let from_az = crate::emulators::azure_get(azurite, &container, &format!("{prefix}sub/b.bin")).await;
    assert_eq!(from_s3, from_az, "one job wrote both");
    for output in &outputs.outputs {
        let b = output.objects.iter().find(|o| o.key == "sub/b.bin").unwrap();
        assert_eq!((b.size, b.md5.as_deref()), (3 << 20, Some(md5_hex(&from_s3).as_str())), "{b:?}");
        assert_eq!(b.download.via, "store");
        assert!(b.download.expires_at.is_some() && b.download.url.starts_with("http://127.0.0.1:"), "{b:?}");
    }

    // Outside clients: boto3 reads the S3 output as before, and plain urllib uses the listing's
    // presigned URL and headers (no credentials); both see the listed MD5.
    let s3_b = outputs.outputs[0].objects.iter().find(|o| o.key == "sub/b.bin").unwrap();
    let headers = serde_json::to_string(&s3_b.download.headers).unwrap();
    let python = format!(
        "import boto3, hashlib, json, sys, urllib.request\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='{ak}', aws_secret_access_key='{sk}')\n\
         body = s3.get_object(Bucket='{bucket}', Key='{prefix}sub/b.bin')['Body'].read()\n\
         req = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))\n\
         fetched = urllib.request.urlopen(req).read()\n\
         print(hashlib.md5(body).hexdigest(), hashlib.md5(fetched).hexdigest())\n",
        endpoint = moto.endpoint(),
        ak = Moto::ACCESS_KEY,
        sk = Moto::SECRET_KEY,
    );
    let out = std::process::Command::new(crate::emulators::moto_python())
        .args(["-c", &python, &s3_b.download.url, &headers])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md5 = md5_hex(&from_s3);
    assert_eq!(text(&out.stdout).trim(), format!("{md5} {md5}"));

    let dir = dc.cluster.path("downloads");
    let stderr = download(&dc, &id, &dir).await;
    assert!(stderr.contains("downloaded 4 objects (6291468 bytes received, 0 resumed, 4 md5-verified)"), "{stderr}");
    let (file_s3, file_az) = (dir.join("out/sub/b.bin"), dir.join("copy/sub/b.bin"));
    assert_eq!(std::fs::read(&file_s3).unwrap(), from_s3);
    assert_eq!(std::fs::read(&file_az).unwrap(), from_s3);
    assert_eq!(std::fs::read(dir.join("copy/a.txt")).unwrap(), b"hello\n");

    // Resumed against each store's presigned URL with a range.
    interrupt(&file_s3, false);
    interrupt(&file_az, false);
    let stderr = download(&dc, &id, &dir).await;
    assert!(stderr.contains("downloaded 2 objects (3145728 bytes received, 2 resumed"), "{stderr}");
    assert_eq!(std::fs::read(&file_s3).unwrap(), from_s3);
    assert_eq!(std::fs::read(&file_az).unwrap(), from_s3);

    // A damaged .part of an Azure object is caught by the blob's MD5.
    interrupt(&file_az, true);
    let out = dc.cli(&["jobs", "outputs", &id, "--download", dir.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{az}acme/{id}/attempt-1/sub/b.bin: md5 mismatch")), "{stderr}");
}
