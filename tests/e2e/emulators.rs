//! Object-storage emulators for the tests: moto (S3) and Azurite (Azure Blob), installed by
//! `scripts/install-emulators.sh` into `$HYBROKER_EMULATORS` (default `~/.cache/hybroker/emulators`).
//!
//! [`moto`] and [`azurite`] start one shared instance per test binary, lazily; [`own_moto`] and
//! [`own_azurite`] start one owned by a test (killed on drop, or by `kill()` mid-test). Each listens on
//! a free port of 127.0.0.1 and is ready once it holds that port and answers HTTP. Emulators get
//! `PR_SET_PDEATHSIG` = SIGKILL: they die with the test binary, however it ends (normal exit, panic,
//! `kill -9`; statics are never dropped, so this is also how the shared ones end). That signal follows
//! the *thread* that forked, and test threads end after each test, so one spawner thread that never
//! ends starts them all. Logs: `$TMPDIR/hybroker-emulators-PID/` (shared), the owned one's temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use azure_storage::{CloudLocation, StorageCredentials};
use azure_storage_blobs::prelude::{BlobServiceClient, ClientBuilder};
use hybroker::storage::azure::{AzureBlobStore, AzureSettings};
use hybroker::storage::s3::{S3Settings, S3Store};
use nix::unistd::Pid;

use crate::common::DEADLINE;

/// A bucket or container name no other test of this binary uses: `prefix-N`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// moto's S3 server. Does not verify signatures: any key and secret are accepted.
pub struct Moto {
    pub port: u16,
    process: Process,
}

/// Azurite's Blob service with the well-known development account.
pub struct Azurite {
    pub port: u16,
    process: Process,
}

pub async fn moto() -> &'static Moto {
    static MOTO: tokio::sync::OnceCell<Moto> = tokio::sync::OnceCell::const_new();
    MOTO.get_or_init(|| async { Moto::new(start(Kind::Moto, shared_dir(), None).await) }).await
}

pub async fn azurite() -> &'static Azurite {
    static AZURITE: tokio::sync::OnceCell<Azurite> = tokio::sync::OnceCell::const_new();
    AZURITE.get_or_init(|| async { Azurite::new(start(Kind::Azurite, shared_dir(), None).await) }).await
}

/// A moto only this test uses, killed when dropped.
pub async fn own_moto() -> Moto {
    let dir = tempfile::tempdir().unwrap();
    Moto::new(start(Kind::Moto, dir.path().to_path_buf(), Some(dir)).await)
}

/// An Azurite only this test uses, killed when dropped.
pub async fn own_azurite() -> Azurite {
    let dir = tempfile::tempdir().unwrap();
    Azurite::new(start(Kind::Azurite, dir.path().to_path_buf(), Some(dir)).await)
}

impl Moto {
    pub const ACCESS_KEY: &str = "test";
    pub const SECRET_KEY: &str = "test";
    pub const REGION: &str = "us-east-1";

    fn new(process: Process) -> Self {
        Self { port: process.port, process }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.into(),
            region: Self::REGION.into(),
            endpoint: Some(self.endpoint()),
            profile: None,
            static_credentials: Some((Self::ACCESS_KEY.into(), Self::SECRET_KEY.into())),
        }
    }

    /// The product's store for `bucket` (which [`Moto::create_bucket`] makes).
    pub async fn store(&self, bucket: &str) -> S3Store {
        S3Store::new(self.settings(bucket)).await.unwrap_or_else(|e| panic!("S3Store for moto bucket {bucket}: {e}"))
    }

    /// Makes a bucket with moto's unsigned `PUT /bucket`.
    pub async fn create_bucket(&self, bucket: &str) {
        let response = http().put(format!("{}/{bucket}", self.endpoint())).send().await.unwrap();
        assert!(response.status().is_success(), "moto create bucket {bucket}: {}", response.status());
    }

    /// An aws-sdk-s3 client of this moto built here, independent of the product's code.
    pub fn client(&self) -> aws_sdk_s3::Client {
        use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let credentials = aws_sdk_s3::config::Credentials::new(Self::ACCESS_KEY, Self::SECRET_KEY, None, None, "test");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_s3::config::Region::new(Self::REGION))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(credentials)
            .http_client(http)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// `kill -9` (for owned instances: a shared one serves other tests).
    pub fn kill(&self) {
        self.process.kill();
    }

    pub fn pid(&self) -> Pid {
        self.process.pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }
}

impl Azurite {
    pub const ACCOUNT: &str = azure_storage::EMULATOR_ACCOUNT;
    pub const KEY: &str = azure_storage::EMULATOR_ACCOUNT_KEY;

    fn new(process: Process) -> Self {
        Self { port: process.port, process }
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, Self::ACCOUNT)
    }

    pub fn settings(&self, container: &str) -> AzureSettings {
        AzureSettings {
            account: Self::ACCOUNT.into(),
            container: container.into(),
            endpoint: Some(self.endpoint()),
            account_key: Self::KEY.into(),
        }
    }

    /// The product's store for `container` (which [`Azurite::create_container`] makes).
    pub async fn store(&self, container: &str) -> AzureBlobStore {
        AzureBlobStore::new(self.settings(container))
            .await
            .unwrap_or_else(|e| panic!("AzureBlobStore for Azurite container {container}: {e}"))
    }

    /// An `azure_storage_blobs` client with the development account's shared key, built here.
    pub fn client(&self) -> BlobServiceClient {
        let location = CloudLocation::Emulator { address: "127.0.0.1".into(), port: self.port };
        ClientBuilder::with_location(location, StorageCredentials::emulator()).blob_service_client()
    }

    pub async fn create_container(&self, container: &str) {
        let created = self.client().container_client(container).create().await;
        created.unwrap_or_else(|e| panic!("Azurite create container {container}: {e}"));
    }

    /// `kill -9` (for owned instances: a shared one serves other tests).
    pub fn kill(&self) {
        self.process.kill();
    }

    pub fn pid(&self) -> Pid {
        self.process.pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }
}

/// The object's bytes, read with a client built in the test (not the product's presigning).
pub async fn s3_get(moto: &Moto, bucket: &str, key: &str) -> Vec<u8> {
    let object = moto.client().get_object().bucket(bucket).key(key).send().await;
    let object = object.unwrap_or_else(|e| panic!("GET s3://{bucket}/{key} from moto: {e:?}"));
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

/// The blob's bytes, read with a client built in the test (not the product's presigning).
pub async fn azure_get(azurite: &Azurite, container: &str, blob: &str) -> Vec<u8> {
    let content = azurite.client().container_client(container).blob_client(blob).get_content().await;
    content.unwrap_or_else(|e| panic!("GET {container}/{blob} from Azurite: {e}"))
}

/// A plain client for emulator requests (each call makes its own: tests run on separate runtimes).
fn http() -> reqwest::Client {
    hybroker::tls::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Moto,
    Azurite,
}

struct Process {
    port: u16,
    pid: Pid,
    child: Mutex<Child>,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Process {
    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Python of moto's virtual environment (it has boto3): an outside S3 client for tests.
pub fn moto_python() -> PathBuf {
    install_dir().join("moto/bin/python")
}

/// `$HYBROKER_EMULATORS`, else `~/.cache/hybroker/emulators`.
fn install_dir() -> PathBuf {
    match std::env::var_os("HYBROKER_EMULATORS") {
        Some(dir) => dir.into(),
        None => Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/hybroker/emulators"),
    }
}

/// Logs of the shared emulators: `$TMPDIR/hybroker-emulators-PID`, kept after the run to be read;
/// those of runs whose process is gone are removed.
fn shared_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("hybroker-emulators-").and_then(|p| p.parse::<i32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("hybroker-emulators-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
    .clone()
}

/// Starts the emulator on a free port (another on a collision) and waits until it is ready.
async fn start(kind: Kind, dir: PathBuf, owned: Option<tempfile::TempDir>) -> Process {
    let root = install_dir();
    let (name, program) = match kind {
        Kind::Moto => ("moto", root.join("moto/bin/moto_server")),
        Kind::Azurite => ("azurite", root.join("azurite/node_modules/.bin/azurite-blob")),
    };
    assert!(
        program.exists(),
        "{name} is not installed: run scripts/install-emulators.sh (scripts/test.sh does); looked for {}",
        program.display()
    );
    for _attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.join(format!("{name}-{port}.log"));
        let args: Vec<String> = match kind {
            Kind::Moto => ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from).into(),
            // In memory (no --location then): nothing to clean up; its access log goes to the log.
            Kind::Azurite => {
                let port = port.to_string();
                let fixed = ["--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry"];
                ["--blobHost", "127.0.0.1", "--blobPort", &port].iter().chain(&fixed).map(|s| s.to_string()).collect()
            }
        };
        let child = spawn(Spawn { program: program.clone(), args, dir: dir.clone(), log: log.clone() }).await;
        let pid = Pid::from_raw(child.id() as i32);
        let mut process = Process { port, pid, child: Mutex::new(child), log, _dir: None };
        let started = Instant::now();
        let ready_url = match kind {
            Kind::Moto => format!("http://127.0.0.1:{port}/"),
            Kind::Azurite => format!("http://127.0.0.1:{port}/{}?comp=list", Azurite::ACCOUNT),
        };
        loop {
            let exited = process.child.lock().unwrap().try_wait().unwrap();
            if let Some(status) = exited {
                let log = std::fs::read_to_string(&process.log).unwrap_or_default();
                assert!(
                    log.contains("in use") || log.contains("EADDRINUSE"),
                    "{name} exited with {status} before it was ready:\n{log}"
                );
                break; // the port was taken meanwhile: another one
            }
            if listens(pid, port) && http().get(&ready_url).send().await.is_ok() {
                eprintln!("{name} ready on port {port} in {:?} (log {})", started.elapsed(), process.log.display());
                process._dir = owned;
                return process;
            }
            if started.elapsed() > DEADLINE {
                let log = std::fs::read_to_string(&process.log).unwrap_or_default();
                panic!("{name} not ready on port {port} after {DEADLINE:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("{name}: no free port after 5 attempts");
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (so no other server answers).
fn listens(pid: Pid, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    let Some(inode) = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 9 && fields[1] == local && fields[3] == "0A").then(|| fields[9].to_string())
    }) else {
        return false;
    };
    let socket = PathBuf::from(format!("socket:[{inode}]"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| target == socket)
}

struct Spawn {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    log: PathBuf,
}

/// Spawns on the spawner thread, the parent whose end kills the emulators.
async fn spawn(request: Spawn) -> Child {
    type Request = (Spawn, tokio::sync::oneshot::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        // Never ends: the sender lives in this static for the whole run.
        std::thread::Builder::new()
            .name("emulator-spawner".into())
            .spawn(move || {
                for (request, reply) in rx {
                    let _ = reply.send(spawn_now(&request));
                }
            })
            .unwrap();
        tx
    });
    let (reply, child) = tokio::sync::oneshot::channel();
    let program = request.program.clone();
    spawner.send((request, reply)).unwrap();
    child.await.unwrap().unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
}

fn spawn_now(request: &Spawn) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&request.log)?;
    let parent = nix::unistd::getpid();
    let mut command = Command::new(&request.program);
    command.args(&request.args).current_dir(&request.dir).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: between fork and exec the closure only makes the async-signal-safe prctl and getppid calls.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have ended before the prctl: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the test binary exited"));
            }
            Ok(())
        });
    }
    command.spawn()
}
