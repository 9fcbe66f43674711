//! `hybroker bench staging`: the agent's stage-in of one big object from the embedded
//! S3-compatible store ([`LocalS3Server`], which reads files [`crate::storage::local::READ_CHUNK`] at a time: a fast
//! server) against plain `curl` of the same presigned URL, in one process run. Target: the agent
//! reaches at least [`TARGET`] of curl's rate.
//!
//! The object is random data, uploaded once with one presigned PUT that carries `Content-MD5`
//! (so the store records its ETag and never rehashes it on a GET); the store records its CRC32C.
//! Every run downloads it twice, with curl and with [`stage_in`] (which checks it as an agent does:
//! against the store's full-object CRC32C, its ranges summed in parallel; the broker knows no MD5
//! of an S3 object), each into a fresh file deleted again
//! before the next download; the order alternates (curl first on odd runs) so neither side always
//! finds a warmer or a fuller page cache. Both are timed by the wall clock, curl including its
//! process start, the agent from its call to its return (the URL is presigned before either).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;
use hyper::body::Bytes;
use md5::{Digest, Md5};
use reqwest::header::CONTENT_LENGTH;

use crate::agent::staging::{
    self, CompletedUpload, FoundFile, InputFile, StagingLimits, UploadPlan, UrlSource, stage_in,
};
use crate::storage::local::LocalS3Server;
use crate::storage::s3::S3Store;
use crate::storage::{ObjectStore, Presigned};

/// The share of curl's rate the agent's stage-in should reach.
pub const TARGET: f64 = 0.9;
/// Bytes per generated block (and per upload chunk).
const BLOCK: usize = 1 << 20;
/// The largest object one S3 PUT may hold, in MiB.
const MAX_PUT_MIB: u64 = 5 << 10;
/// The bucket and key of the benchmark object.
const BUCKET: &str = "bench";
const KEY: &str = "staging/object.bin";
/// Lifetime of the presigned requests (far longer than a run).
const URL_TTL: Duration = Duration::from_secs(3600);

/// `hybroker bench staging`'s flags.
#[derive(Debug, Clone, Args)]
pub struct StagingArgs {
    /// Size of the object, in MiB (at most 5120, one PUT).
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Runs; each downloads the object once with curl and once with the agent's stage-in.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Stage-in's requests in flight at once.
    #[arg(long, default_value_t = StagingLimits::default().concurrency)]
    pub concurrency: usize,
    /// Stage-in's range size, in MiB.
    #[arg(long, default_value_t = StagingLimits::default().range_size >> 20)]
    pub range_mib: u64,
    /// Where the store's files and the downloads go (a fresh subdirectory, removed afterwards);
    /// default: the system's temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// What stage-in checks the object against: `crc` (the store's CRC32C, ranges summed in
    /// parallel: what an agent does with S3 and the local store) or `md5` (the whole file's MD5 in
    /// order, as the broker gives it for Azure, and as every object was checked before CRCs).
    #[arg(long, value_enum, default_value_t = Check::Crc)]
    pub check: Check,
}

/// What the staging benchmark's stage-in checks the object against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    Crc,
    Md5,
}

impl StagingArgs {
    /// Refuses flag values the run cannot honour.
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=MAX_PUT_MIB).contains(&self.size_mib) {
            anyhow::bail!("--size-mib must be 1 to {MAX_PUT_MIB} (the object is uploaded with one put)");
        }
        if self.runs == 0 || self.concurrency == 0 || self.range_mib == 0 {
            anyhow::bail!("--runs, --concurrency and --range-mib must be at least 1");
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its table (missing the target is not an error).
pub async fn run(args: StagingArgs) -> anyhow::Result<()> {
    args.validate()?;
    let curl = curl_version().await?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = parent.join(format!("hybroker-bench-staging-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let result = run_in(&args, &root, &curl).await;
    if let Err(e) = std::fs::remove_dir_all(&root) {
        eprintln!("could not remove {}: {e}", root.display());
    }
    result
}

/// `curl --version`'s first line, or a clear error when there is no curl to compare with.
async fn curl_version() -> anyhow::Result<String> {
    let output = tokio::process::Command::new("curl").arg("--version").output().await;
    match output {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(text.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        }
        Ok(out) => anyhow::bail!("`curl --version` failed ({}); the benchmark compares against curl", out.status),
        Err(e) => anyhow::bail!("curl is not available ({e}); the benchmark compares against curl, install it"),
    }
}

/// The benchmark inside its fresh directory `root`. The store is served by a runtime of its own
/// (two worker threads), so the agent's tasks do not queue behind the server's as they would not
/// with a remote store (they still share the machine's cores).
async fn run_in(args: &StagingArgs, root: &Path, curl: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("local-store")
        .enable_all()
        .build()
        .context("starting the local store's runtime")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dir = root.join("store");
    let started = runtime.spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the local store")?;
        let server = LocalS3Server::new(&dir, listener)?;
        let store = server.store(BUCKET).await?;
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        anyhow::Ok(store)
    });
    let result = match started.await {
        Ok(Ok(store)) => measure(args, root, curl, store).await,
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("the local store's start failed: {e}")),
    };
    let _ = stop.send(());
    runtime.shutdown_background();
    result
}

/// Uploads the object, does the runs, prints the table.
async fn measure(args: &StagingArgs, root: &Path, curl: &str, store: S3Store) -> anyhow::Result<()> {
    let size = args.size_mib << 20;
    let limits =
        StagingLimits { concurrency: args.concurrency, range_size: args.range_mib << 20, ..Default::default() };
    println!(
        "staging benchmark: {} MiB object on the local store, {} runs; stage-in: {} requests in flight, \
         {} MiB ranges, checked by {}; {} cpus; {curl}",
        args.size_mib,
        args.runs,
        limits.concurrency,
        args.range_mib,
        match args.check {
            Check::Crc => "the store's crc32c",
            Check::Md5 => "md5",
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let started = Instant::now();
    let md5 = upload(&store, args.size_mib).await?;
    // Written back now, so that the first download does not share the disk with it.
    let object = root.join("store").join(BUCKET).join(KEY);
    tokio::task::spawn_blocking(move || std::fs::File::open(&object)?.sync_all())
        .await?
        .context("syncing the uploaded object")?;
    println!("uploaded and synced in {:.1} s", started.elapsed().as_secs_f64());

    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;
    let urls = StoreUrls { store: &store };
    let mut rows = Vec::new();
    for run in 1..=args.runs {
        let curl_first = run % 2 == 1;
        let (mut curl_s, mut agent_s) = (0.0, 0.0);
        for side in if curl_first { [true, false] } else { [false, true] } {
            if side {
                curl_s = curl_once(&store, &downloads.join(format!("curl-{run}.bin")), size).await?;
            } else {
                let md5 = (args.check == Check::Md5).then(|| md5.clone());
                let input = InputFile { path: "object.bin".into(), size, md5 };
                let work_dir = downloads.join(format!("stage-in-{run}"));
                agent_s = stage_in_once(&urls, &work_dir, input, &limits).await?;
            }
        }
        let mib = args.size_mib as f64;
        rows.push(Row { run, curl_first, curl: mib / curl_s, agent: mib / agent_s });
    }
    print_table(&rows);
    Ok(())
}

/// One run's rates in MiB/s.
struct Row {
    run: u32,
    curl_first: bool,
    curl: f64,
    agent: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.agent / self.curl
    }
}

/// Prints the runs, the best and median ratio, and whether they meet [`TARGET`].
fn print_table(rows: &[Row]) {
    println!("{:>3}  {:<8}  {:>11}  {:>15}  {:>7}", "run", "first", "curl MiB/s", "hybroker MiB/s", "ratio");
    for row in rows {
        let first = if row.curl_first { "curl" } else { "hybroker" };
        println!("{:>3}  {first:<8}  {:>11.1}  {:>15.1}  {:>6.1}%", row.run, row.curl, row.agent, 100.0 * row.ratio());
    }
    let mut ratios: Vec<f64> = rows.iter().map(Row::ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let best = ratios.last().copied().unwrap_or(0.0);
    let mid = ratios.len() / 2;
    let median = if ratios.len() % 2 == 1 { ratios[mid] } else { (ratios[mid - 1] + ratios[mid]) / 2.0 };
    let verdict = |r: f64| if r >= TARGET { "meets" } else { "misses" };
    println!(
        "best ratio {:.1}% ({} the {:.0}% target), median ratio {:.1}% ({} it)",
        100.0 * best,
        verdict(best),
        100.0 * TARGET,
        100.0 * median,
        verdict(median)
    );
}

/// Block `index` of the object: `base` with the index stamped at the start of every 4 KiB page,
/// so no two pages of the object are alike.
fn block(base: &[u8], index: u64) -> Bytes {
    let mut data = base.to_vec();
    for page in data.chunks_mut(4096) {
        for (byte, stamp) in page.iter_mut().zip(index.to_le_bytes()) {
            *byte ^= stamp;
        }
    }
    Bytes::from(data)
}

/// Generates the object (`mib` blocks), hashes it (printing the rates of MD5 and CRC32C), then
/// streams it to the store in one presigned PUT with `Content-MD5`; checks the store's size and
/// ETag. Returns the MD5 in base64.
async fn upload(store: &S3Store, mib: u64) -> anyhow::Result<String> {
    let mut base = vec![0u8; BLOCK];
    fastrand::Rng::new().fill(&mut base);
    let base = Bytes::from(base);
    let hashed = base.clone();
    let (digest, hashing, summing): ([u8; 16], Duration, Duration) = tokio::task::spawn_blocking(move || {
        let (mut md5, mut hashing) = (Md5::new(), Duration::ZERO);
        let (mut crc, mut summing) = (crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi), Duration::ZERO);
        for i in 0..mib {
            let data = block(&hashed, i);
            let started = Instant::now();
            md5.update(&data);
            hashing += started.elapsed();
            let started = Instant::now();
            crc.update(&data);
            summing += started.elapsed();
        }
        (md5.finalize().into(), hashing, summing)
    })
    .await?;
    let content_md5 = B64.encode(digest);
    println!(
        "on one core here md5 runs at {:.1} MiB/s (it bounds an object checked by its md5), crc32c at {:.1} MiB/s",
        mib as f64 / hashing.as_secs_f64(),
        mib as f64 / summing.as_secs_f64()
    );

    let put = store.presign_put(KEY, URL_TTL).await?;
    let body = futures::stream::iter((0..mib).map(move |i| Ok::<_, std::io::Error>(block(&base, i))));
    let size = mib << 20;
    let response = with_headers(reqwest::Client::new().put(&put.url), &put)
        .header(CONTENT_LENGTH, size)
        .header("content-md5", &content_md5)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .context("uploading the object")?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("uploading the object: http {status}: {}", text.trim());
    }
    let meta = store.head(KEY).await?.context("the uploaded object is missing")?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if meta.size != size || meta.etag.as_deref() != Some(hex.as_str()) {
        anyhow::bail!(
            "the store holds {} bytes with etag {:?}; {size} bytes with md5 {hex} were put",
            meta.size,
            meta.etag
        );
    }
    Ok(content_md5)
}

fn with_headers(mut builder: reqwest::RequestBuilder, req: &Presigned) -> reqwest::RequestBuilder {
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    builder
}

/// `curl -sS -f -o dest <presigned GET>`: its wall time in seconds; checks the size, then deletes
/// `dest`.
async fn curl_once(store: &S3Store, dest: &Path, size: u64) -> anyhow::Result<f64> {
    let get = store.presign_get(KEY, URL_TTL).await?;
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "-f", "-o"]).arg(dest);
    for (name, value) in &get.headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    command.arg(&get.url);
    let started = Instant::now();
    let status = command.status().await.context("running curl")?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        anyhow::bail!("curl failed ({status})");
    }
    let got = std::fs::metadata(dest).with_context(|| format!("curl's output {}", dest.display()))?.len();
    std::fs::remove_file(dest).with_context(|| format!("removing {}", dest.display()))?;
    if got != size {
        anyhow::bail!("curl wrote {got} bytes, the object has {size}");
    }
    Ok(seconds)
}

/// The agent's stage-in of the object into the fresh `work_dir` (with a fresh client, as curl
/// connects afresh): its wall time in seconds; checks the size, then deletes `work_dir`.
async fn stage_in_once(
    urls: &StoreUrls<'_>,
    work_dir: &Path,
    input: InputFile,
    limits: &StagingLimits,
) -> anyhow::Result<f64> {
    std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let http = staging::http_client(None)?;
    let initial = vec![urls.store.presign_get(KEY, URL_TTL).await?];
    let (path, size) = (work_dir.join(&input.path), input.size);
    let started = Instant::now();
    stage_in(&http, urls, work_dir, &[input], initial, limits, &|_| {}).await?;
    let seconds = started.elapsed().as_secs_f64();
    let got = std::fs::metadata(&path).with_context(|| format!("the staged {}", path.display()))?.len();
    std::fs::remove_dir_all(work_dir).with_context(|| format!("removing {}", work_dir.display()))?;
    if got != size {
        anyhow::bail!("stage-in wrote {got} bytes, the object has {size}");
    }
    Ok(seconds)
}

/// Fresh GETs of the benchmark object, as the broker would mint them.
struct StoreUrls<'s> {
    store: &'s S3Store,
}

#[async_trait]
impl UrlSource for StoreUrls<'_> {
    async fn input_urls(&self, indices: &[u32]) -> Result<Vec<Presigned>, String> {
        let mut urls = Vec::with_capacity(indices.len());
        for _ in indices {
            urls.push(self.store.presign_get(KEY, URL_TTL).await.map_err(|e| e.to_string())?);
        }
        Ok(urls)
    }

    async fn plan_outputs(&self, _files: &[FoundFile]) -> Result<Vec<UploadPlan>, String> {
        Err("the staging benchmark uploads nothing".into())
    }

    async fn part_urls(&self, _: u32, _: &str, _: &str, _: &[u32]) -> Result<Vec<Presigned>, String> {
        Err("the staging benchmark uploads nothing".into())
    }

    async fn complete_outputs(&self, _uploads: Vec<CompletedUpload>) -> Result<(), String> {
        Err("the staging benchmark uploads nothing".into())
    }
}
