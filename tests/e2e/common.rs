//! A test cluster: a fresh PKI, the real `hybroker` binary as broker and agent processes on port 0,
//! and an admin job-service client over mutual TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hybroker::model::identity::Role;
use hybroker::pki::{self, Ca, IssueRequest};
use hybroker::proto::job_service_client::JobServiceClient;
use hybroker::proto::{self, SpecFormat};
use hybroker::tls::{self, TlsPaths};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_hybroker");
pub const TRUST_DOMAIN: &str = "test.hybroker.local";
/// Tenants every test broker declares: two ordinary ones with small limits, and an admin tenant.
pub const TENANTS: &str = "[[tenant]]\nname = \"acme\"\n\n[[tenant]]\nname = \"globex\"\nmax_queued_jobs = 5\n\
     requests_per_second = 5.0\nburst = 10\n\n[[tenant]]\nname = \"ops\"\nadmin = true\n";
/// Generous: CI machines are slow and shared; the tests wait on conditions, never on time.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub addr: SocketAddr,
    pub lease_ttl: Duration,
    broker: Option<Child>,
    agents: Vec<(String, Child)>,
    /// Replaces [`TENANTS`] in the broker config (tenants with storage prefixes, `[[storage]]`).
    pub broker_extra: Option<String>,
    /// Only the broker gets these (cloud credentials): agents must never see them.
    pub broker_env: Vec<(String, String)>,
    /// Appended to every agent config.
    pub agent_extra: String,
}

/// How a test configures its cluster beyond the defaults.
#[derive(Default)]
pub struct Setup {
    pub broker_extra: Option<String>,
    pub broker_env: Vec<(String, String)>,
    pub agent_extra: String,
}

impl Cluster {
    /// A broker (lease TTL as given) and agents `(node, simulated gpus)` at site `lab`.
    pub async fn start(lease_ttl: Duration, agents: &[(&str, &str)]) -> Cluster {
        Self::start_with(lease_ttl, agents, |_| Setup::default()).await
    }

    /// Like [`Cluster::start`], with the setup made from the cluster's directory.
    pub async fn start_with(
        lease_ttl: Duration,
        agents: &[(&str, &str)],
        setup: impl FnOnce(&Path) -> Setup,
    ) -> Cluster {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init_ca(&pki_dir, TRUST_DOMAIN).unwrap();
        let ca = Ca::load(&pki_dir).unwrap();
        let Setup { broker_extra, broker_env, agent_extra } = setup(dir.path());
        let mut cluster = Cluster {
            dir,
            ca,
            addr: "127.0.0.1:0".parse().unwrap(),
            lease_ttl,
            broker: None,
            agents: vec![],
            broker_extra,
            broker_env,
            agent_extra,
        };
        cluster.issue(Role::Broker, "broker", None);
        cluster.start_broker(0);
        for (node, gpus) in agents {
            cluster.start_agent(node, gpus);
        }
        cluster
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a certificate into the PKI directory.
    pub fn issue(&self, role: Role, name: &str, site: Option<&str>) -> TlsPaths {
        let request = IssueRequest {
            role,
            name: name.into(),
            site: site.map(Into::into),
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 1,
        };
        let (cert, key) = self.ca.issue_to_dir(&self.path("pki"), &request).unwrap();
        TlsPaths { ca_cert: self.path("pki/ca.pem"), cert, key }
    }

    /// Starts (or restarts) the broker process on `port` (0 = any) and waits until it listens.
    pub fn start_broker(&mut self, port: u16) {
        let addr_file = self.path("broker.addr");
        let _ = std::fs::remove_file(&addr_file);
        let hb = (self.lease_ttl / 4).max(Duration::from_millis(100));
        let config = format!(
            "[broker]\nlisten = \"127.0.0.1:{port}\"\n[tls]\nca_cert = \"{pki}/ca.pem\"\ncert = \"{pki}/broker.pem\"\n\
             key = \"{pki}/broker-key.pem\"\n[store]\npath = \"{db}\"\n[leases]\nttl = \"{ttl}ms\"\nheartbeat_interval = \"{hb}ms\"\n{extra}",
            pki = self.path("pki").display(),
            db = self.path("broker.db").display(),
            ttl = self.lease_ttl.as_millis(),
            hb = hb.as_millis(),
            extra = self.broker_extra.as_deref().unwrap_or(TENANTS),
        );
        std::fs::write(self.path("broker.toml"), config).unwrap();
        let enroll_addr_file = self.path("broker.enroll.addr");
        let _ = std::fs::remove_file(&enroll_addr_file);
        let child = spawn_with(
            &[
                "broker",
                "--config",
                path_str(&self.path("broker.toml")),
                "--addr-file",
                path_str(&addr_file),
                "--enroll-addr-file",
                path_str(&enroll_addr_file),
            ],
            &self.path("broker.log"),
            &self.broker_env,
        );
        self.broker = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                self.addr = addr.trim().parse().unwrap();
                return;
            }
            if let Some(status) = self.broker.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited with {status}:\n{}", self.broker_log());
            }
            assert!(started.elapsed() < DEADLINE, "broker did not start:\n{}", self.broker_log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker process's pid.
    pub fn broker_pid(&self) -> i32 {
        self.broker.as_ref().map(|c| c.id() as i32).expect("broker started")
    }

    /// `kill -9` the broker.
    pub fn kill_broker(&mut self) {
        if let Some(mut child) = self.broker.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// `kill -TERM` the broker and wait for it to exit; returns how long it took. Panics (after a
    /// `kill -9`) when it is still running after `deadline`.
    pub fn terminate_broker(&mut self, deadline: Duration) -> Duration {
        let mut child = self.broker.take().expect("broker started");
        terminate(&mut child, deadline, "broker", &self.path("broker.log"))
    }

    pub fn start_agent(&mut self, node: &str, gpus: &str) {
        let tls = self.issue(Role::Agent, node, Some("lab"));
        let config_path = self.write_agent_config(node, gpus, &tls);
        let child = spawn(&["agent", "--config", path_str(&config_path)], &self.path(&format!("agent-{node}.log")));
        self.agents.push((node.to_string(), child));
    }

    /// [`Cluster::start_agent`] with extra environment (`NOTIFY_SOCKET`).
    pub fn start_agent_with_env(&mut self, node: &str, gpus: &str, env: &[(String, String)]) {
        let tls = self.issue(Role::Agent, node, Some("lab"));
        let config_path = self.write_agent_config(node, gpus, &tls);
        let log = self.path(&format!("agent-{node}.log"));
        let child = spawn_with(&["agent", "--config", path_str(&config_path)], &log, env);
        self.agents.push((node.to_string(), child));
    }

    pub fn work_dir(&self, node: &str) -> PathBuf {
        self.path(&format!("work-{node}"))
    }

    pub fn agent_pid(&self, node: &str) -> i32 {
        self.agents.iter().find(|(n, _)| n == node).map(|(_, c)| c.id() as i32).expect("agent started")
    }

    /// `kill -9` an agent.
    pub fn kill_agent(&mut self, node: &str) {
        let i = self.agents.iter().position(|(n, _)| n == node).expect("agent started");
        let (_, mut child) = self.agents.remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.path("broker.log")).unwrap_or_default()
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.path(&format!("agent-{node}.log"))).unwrap_or_default()
    }

    /// A job-service client with the given certificate.
    pub async fn client_as(&self, paths: &TlsPaths) -> JobServiceClient<Channel> {
        let config = tls::client_config(paths, TRUST_DOMAIN, Role::Broker).unwrap();
        JobServiceClient::new(tls::connect(&format!("https://{}", self.addr), config, None).await.unwrap())
    }

    pub async fn admin(&self) -> JobServiceClient<Channel> {
        let paths = self.issue(Role::Admin, "test-admin", None);
        self.client_as(&paths).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_broker();
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn spawn(args: &[&str], log: &Path) -> Child {
    spawn_with(args, log, &[])
}

pub fn spawn_with(args: &[&str], log: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(BIN)
        .args(args)
        // Whatever cloud credentials the test runner has stay out of the services; the broker
        // gets its own through `env`.
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AZURE_STORAGE_KEY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info,hybroker=debug,h2=warn,tower=warn,hyper=warn,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Polls `check` until it yields a value or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn submit(client: &mut JobServiceClient<Channel>, yaml: &str) -> String {
    submit_keyed(client, yaml, "").await.unwrap()
}

pub async fn submit_keyed(
    client: &mut JobServiceClient<Channel>,
    yaml: &str,
    key: &str,
) -> Result<String, tonic::Status> {
    let request = proto::SubmitRequest {
        spec: yaml.as_bytes().to_vec(),
        format: SpecFormat::Yaml.into(),
        idempotency_key: key.into(),
        tenant: String::new(),
    };
    Ok(client.submit(request).await?.into_inner().job_id)
}

pub async fn get(client: &mut JobServiceClient<Channel>, id: &str) -> proto::Job {
    client.get(proto::GetJobRequest { job_id: id.into(), tenant: String::new() }).await.unwrap().into_inner()
}

/// Every event of the job until it is terminal.
pub async fn watch_to_end(client: &mut JobServiceClient<Channel>, id: &str) -> Vec<proto::JobEvent> {
    let request = proto::WatchJobRequest { job_id: id.into(), tenant: String::new(), after_seq: 0 };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(ev) = stream.next().await {
            events.push(ev.unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {id} did not finish; events so far: {events:?}"));
    events
}

/// Waits until the job's latest state satisfies `pred`; returns the job.
pub async fn wait_job(
    client: &JobServiceClient<Channel>,
    id: &str,
    what: &str,
    pred: impl Fn(&proto::Job) -> bool,
) -> proto::Job {
    eventually(what, || {
        let mut client = client.clone();
        let id = id.to_string();
        let pred = &pred;
        async move {
            let job = client.get(proto::GetJobRequest { job_id: id, tenant: String::new() }).await.ok()?.into_inner();
            pred(&job).then_some(job)
        }
    })
    .await
}

pub fn states(events: &[proto::JobEvent]) -> Vec<&str> {
    events.iter().map(|e| e.state.as_str()).collect()
}

/// A `hybroker gateway` process in front of a cluster's broker; killed when dropped.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with public TLS.
    pub url: String,
    log: PathBuf,
    child: Child,
}

impl Gateway {
    /// The gateway process's id (to signal it).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Gateway {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -TERM` the gateway and wait for it to exit; returns how long it took (panics past
    /// `deadline`).
    pub fn terminate(&mut self, deadline: Duration) -> Duration {
        terminate(&mut self.child, deadline, "gateway", &self.log)
    }
}

/// SIGTERM to `child`, then its exit awaited until `deadline` (then `kill -9` and a panic).
fn terminate(child: &mut Child, deadline: Duration, what: &str, log: &Path) -> Duration {
    use nix::sys::signal::{Signal, kill};
    let started = Instant::now();
    kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return started.elapsed();
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running {deadline:?} after SIGTERM:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Starts a gateway (plain HTTP on 127.0.0.1, port 0) and waits until it listens.
    pub fn start_gateway(&self) -> Gateway {
        self.start_gateway_named("gateway", false)
    }

    /// Starts a gateway called `name`; with `public_tls`, it serves HTTPS with a certificate for
    /// `localhost` from the test CA (its own PKI's `ca.pem` verifies it).
    pub fn start_gateway_named(&self, name: &str, public_tls: bool) -> Gateway {
        self.start_gateway_with(name, public_tls, "")
    }

    /// Like [`Cluster::start_gateway_named`], with `extra` appended to the gateway's config.
    pub fn start_gateway_with(&self, name: &str, public_tls: bool, extra: &str) -> Gateway {
        self.start_gateway_keyed(name, public_tls, "", extra)
    }

    /// Writes `<name>.toml`: a plain-HTTP gateway on a free port, certificate `name` from the test
    /// CA, this cluster's broker; returns its path (for tests that start the gateway themselves).
    pub fn plain_gateway_config(&self, name: &str) -> PathBuf {
        let tls = self.issue(Role::Gateway, name, None);
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nplain_http = true\n[broker]\nurl = \"https://{}\"\n\
             [tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.addr,
            tls.ca_cert.display(),
            tls.cert.display(),
            tls.key.display()
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        path
    }

    /// Like [`Cluster::start_gateway_with`], with `keys` added to its `[gateway]` section.
    pub fn start_gateway_keyed(&self, name: &str, public_tls: bool, keys: &str, extra: &str) -> Gateway {
        let tls = self.issue(Role::Gateway, name, None);
        let public = if public_tls {
            let public = self.issue(Role::Broker, &format!("{name}-public"), None);
            format!("public_cert = \"{}\"\npublic_key = \"{}\"\n", public.cert.display(), public.key.display())
        } else {
            "plain_http = true\n".to_string()
        };
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n{public}max_body_bytes = 1048576\n{keys}\n[broker]\nurl = \"https://{addr}\"\n\
             [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{extra}",
            addr = self.addr,
            ca = tls.ca_cert.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        );
        let config_path = self.path(&format!("{name}.toml"));
        let addr_file = self.path(&format!("{name}.addr"));
        let log = self.path(&format!("{name}.log"));
        let _ = std::fs::remove_file(&addr_file);
        std::fs::write(&config_path, config).unwrap();
        let mut child =
            spawn(&["gateway", "--config", path_str(&config_path), "--addr-file", path_str(&addr_file)], &log);
        let started = Instant::now();
        let addr: SocketAddr = loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                break addr.trim().parse().unwrap();
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("gateway exited with {status}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(started.elapsed() < DEADLINE, "gateway did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        let url = if public_tls { format!("https://localhost:{}", addr.port()) } else { format!("http://{addr}") };
        Gateway { url, log, child }
    }

    /// Runs `hybroker tenants ARGS` with an admin certificate; returns (success, stdout, stderr).
    pub fn tenants_command(&self, args: &[&str]) -> (bool, String, String) {
        self.operator_command("tenants", "tenants-admin", args)
    }

    /// Runs `hybroker admin ARGS` with an admin certificate; returns (success, stdout, stderr).
    pub fn admin_command(&self, args: &[&str]) -> (bool, String, String) {
        self.operator_command("admin", "cli-admin", args)
    }

    /// Runs `hybroker COMMAND ARGS` with the admin certificate `name` against this broker.
    fn operator_command(&self, command: &str, name: &str, args: &[&str]) -> (bool, String, String) {
        let admin = self.issue(Role::Admin, name, None);
        let out = Command::new(BIN)
            .arg(command)
            .args(["--broker", &format!("https://{}", self.addr)])
            .args([
                "--ca-cert",
                path_str(&admin.ca_cert),
                "--cert",
                path_str(&admin.cert),
                "--key",
                path_str(&admin.key),
            ])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// A new API key of `tenant` and its key id.
    pub fn tenant_key_with_id(&self, tenant: &str) -> (String, String) {
        let (ok, stdout, stderr) = self.tenants_command(&["add", tenant]);
        assert!(ok, "tenants add {tenant} failed: {stdout}{stderr}");
        let field = |name: &str| {
            stdout.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).expect("printed")
        };
        (field("key:"), field("key id:"))
    }

    /// A new API key of `tenant`.
    pub fn tenant_key(&self, tenant: &str) -> String {
        self.tenant_key_with_id(tenant).0
    }

    /// The enrol listener's URL (the broker runs with [`enrolling`]).
    pub fn enroll_url(&self) -> String {
        let addr = std::fs::read_to_string(self.path("broker.enroll.addr")).expect("the broker has an enrol listener");
        format!("https://{}", addr.trim())
    }

    /// Makes a join token with `admin agents token create ARGS` written to the join file `name`.
    pub fn join_file(&self, name: &str, args: &[&str]) -> PathBuf {
        let path = self.path(name);
        let url = self.enroll_url();
        let mut all = vec!["agents", "token", "create", "--output-file", path_str(&path), "--enroll-url", &url];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = self.admin_command(&all);
        assert!(ok, "token create failed: {stdout}{stderr}");
        path
    }

    /// Where an enrolling agent `node` keeps its certificate, key and CA bundle.
    pub fn joined_tls(&self, node: &str) -> TlsPaths {
        let dir = self.path(&format!("node-{node}"));
        TlsPaths { ca_cert: dir.join("ca.pem"), cert: dir.join("agent.pem"), key: dir.join("agent-key.pem") }
    }

    /// Starts an agent `node` that has no certificate and enrols with `join_file`.
    pub fn start_joining_agent(&mut self, node: &str, gpus: &str, join_file: &Path) {
        let tls = self.joined_tls(node);
        let config_path = self.write_agent_config(node, gpus, &tls);
        let args = ["agent", "--config", path_str(&config_path), "--join-file", path_str(join_file)];
        let child = spawn(&args, &self.path(&format!("agent-{node}.log")));
        self.agents.push((node.to_string(), child));
    }

    /// [`Cluster::start_joining_agent`] with extra environment (`HYBROKER_AGENT__*` overrides).
    pub fn start_joining_agent_with_env(&mut self, node: &str, gpus: &str, join_file: &Path, env: &[(String, String)]) {
        let tls = self.joined_tls(node);
        let config_path = self.write_agent_config(node, gpus, &tls);
        let args = ["agent", "--config", path_str(&config_path), "--join-file", path_str(join_file)];
        let child = spawn_with(&args, &self.path(&format!("agent-{node}.log")), env);
        self.agents.push((node.to_string(), child));
    }

    /// Writes `agent-<node>.toml` for an agent of site `lab` with its certificate files at `tls`.
    fn write_agent_config(&self, node: &str, gpus: &str, tls: &TlsPaths) -> PathBuf {
        let config = format!(
            "[agent]\nbroker_url = \"https://{addr}\"\nwork_dir = \"{work}\"\nsimulate_gpus = \"{gpus}\"\ncpus = 8\nmemory_mib = 65536\n\
             [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n[reconnect]\nmin_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n{extra}",
            addr = self.addr,
            work = self.work_dir(node).display(),
            ca = tls.ca_cert.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            extra = self.agent_extra,
        );
        let config_path = self.path(&format!("agent-{node}.toml"));
        std::fs::write(&config_path, config).unwrap();
        config_path
    }

    /// The exit status of agent `node` once it has exited (None while it runs).
    pub fn agent_exited(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.agents.iter_mut().find(|(n, _)| n == node).expect("agent started");
        child.try_wait().unwrap()
    }
}

/// A `[site.capacity]` for the `[[site]]` just above it: the `local` provider with instances that
/// never boot (`tests/fixtures/no-boot.sh`), so the site is elastic (placement may choose it with no
/// agent) and its jobs stay placed. The broker needs [`enrolling`] too.
pub fn no_boot_capacity() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/no-boot.sh");
    format!(
        "[site.capacity]\nprovider = \"local\"\nboot_timeout = \"1h\"\norphan_grace = \"1h\"\n\
         [site.capacity.local]\nbinary = \"{}\"\nisolation = \"none\"\n",
        script.display()
    )
}

/// Broker environment for enrolment: the enrol listener on port 0, the cluster's issuing CA
/// (`pki` in `dir`), agent certificates valid for `lifetime` (e.g. `20s`).
pub fn enrolling(dir: &Path, lifetime: &str) -> Vec<(String, String)> {
    vec![
        ("HYBROKER_BROKER__ENROLL_LISTEN".into(), "127.0.0.1:0".into()),
        ("HYBROKER_BROKER__CA_DIR".into(), dir.join("pki").display().to_string()),
        ("HYBROKER_BROKER__AGENT_CERT_LIFETIME".into(), lifetime.into()),
    ]
}

/// Whether a process runs (a zombie waiting to be reaped does not count).
pub fn alive(pid: nix::unistd::Pid) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    nix::sys::signal::kill(pid, None).is_ok() && !matches!(state, Some('Z') | Some('X') | None)
}

/// Host processes whose command line contains `text` (a marker a test put in a job's argv).
pub fn processes_with(text: &str) -> Vec<i32> {
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    let pids = entries.filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok());
    pids.filter(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(text) && alive(nix::unistd::Pid::from_raw(*pid))
    })
    .collect()
}

/// The test tenants, then a `[metrics]` section that writes its bound address to `file`.
pub fn tenants_with_metrics(file: &Path) -> String {
    format!("{TENANTS}\n[metrics]\nlisten = \"127.0.0.1:0\"\naddr_file = \"{}\"\n", file.display())
}

/// The metrics address a service wrote to `file`, once it has.
pub async fn metrics_addr(file: &Path) -> SocketAddr {
    eventually("the metrics address", || async { std::fs::read_to_string(file).ok()?.trim().parse().ok() }).await
}

/// The value of `series` (name and labels as rendered) in one scrape of `addr`; `None` when absent.
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// Runs `hybroker ARGS` against `gateway` with tenant `key` in the environment, as a tenant's user
/// would (no CA override, no stdin).
pub async fn tenant_cli(gateway: &Gateway, key: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("HYBROKER_GATEWAY", &gateway.url)
        .env("HYBROKER_TOKEN", key)
        .env_remove("HYBROKER_CA_CERT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("hybroker {args:?} did not finish within {DEADLINE:?}"))
        .unwrap()
}
