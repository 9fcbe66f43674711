//! The broker as a child process of this same binary: start, wait until it serves, `kill -9`,
//! restart on the same port, stop; and its CPU time and peak memory from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::ClientConfig;
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::tls;

/// How long a (re)started broker may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped broker may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);

/// The running broker and what earlier (killed) processes of it used.
pub struct Broker {
    child: Child,
    config: PathBuf,
    addr_file: PathBuf,
    log: PathBuf,
    /// Where it listens (the same across restarts).
    pub addr: SocketAddr,
    /// CPU seconds of processes already killed.
    cpu_before: f64,
    /// The highest peak RSS of processes already killed, KiB.
    peak_before_kib: u64,
}

/// CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Resident set now (VmRSS), KiB.
    pub rss_kib: u64,
}

impl Broker {
    /// Starts `hybroker broker --config <config>` with its log in `dir`, and waits until it serves.
    pub async fn start(dir: &Path, config: PathBuf, admin: &Arc<ClientConfig>) -> anyhow::Result<Broker> {
        let addr_file = dir.join("broker.addr");
        let log = dir.join("broker.log");
        let child = spawn(&config, &addr_file, &log, None)?;
        let mut broker =
            Broker { child, config, addr_file, log, addr: "127.0.0.1:0".parse()?, cpu_before: 0.0, peak_before_kib: 0 };
        broker.addr = broker.wait_listening().await?;
        broker.wait_serving(admin).await?;
        Ok(broker)
    }

    /// `https://<addr>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The current process's id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The current process's figures (zero when it cannot be read).
    pub fn stats(&self) -> ProcStats {
        proc_stats(self.pid()).unwrap_or_default()
    }

    /// CPU seconds of every process so far, the current one included.
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_before + self.stats().cpu_seconds
    }

    /// The highest peak RSS of every process so far, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_before_kib.max(self.stats().peak_rss_kib)
    }

    /// `kill -9`s the broker and starts it again on the same port; returns at once (use
    /// [`Broker::wait_serving`] to wait for it).
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        let last = self.stats();
        self.child.start_kill().context("killing the broker")?;
        self.child.wait().await.context("waiting for the killed broker")?;
        self.cpu_before += last.cpu_seconds;
        self.peak_before_kib = self.peak_before_kib.max(last.peak_rss_kib);
        let _ = std::fs::remove_file(&self.addr_file);
        self.child = spawn(&self.config, &self.addr_file, &self.log, Some(self.addr))?;
        Ok(())
    }

    /// Stops the broker with SIGTERM, waits for it to exit (`kill -9` after `patience`) and starts
    /// it again on the same port; returns how long it took to exit.
    pub async fn terminate_and_restart(&mut self, patience: Duration) -> anyhow::Result<Duration> {
        let last = self.stats();
        let at = Instant::now();
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("signalling the broker")?;
        }
        if tokio::time::timeout(patience, self.child.wait()).await.is_err() {
            tracing::warn!("the broker did not exit within {patience:?} of SIGTERM; killing it");
            self.child.start_kill().context("killing the broker")?;
            self.child.wait().await.context("waiting for the killed broker")?;
        }
        let exited = at.elapsed();
        self.cpu_before += last.cpu_seconds;
        self.peak_before_kib = self.peak_before_kib.max(last.peak_rss_kib);
        let _ = std::fs::remove_file(&self.addr_file);
        self.child = spawn(&self.config, &self.addr_file, &self.log, Some(self.addr))?;
        Ok(exited)
    }

    /// Waits until the broker answers health checks (it loads its store before serving).
    pub async fn wait_serving(&mut self, admin: &Arc<ClientConfig>) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(channel) = tls::connect(&self.url(), admin.clone(), None).await {
                let check = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
                if check.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            self.check_alive(started)?;
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the broker with SIGTERM (SIGKILL if it does not exit in time).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    tracing::warn!(%status, "the broker exited unsuccessfully; see {}", self.log.display());
                }
            }
            Err(_) => {
                tracing::warn!("the broker did not stop within {STOP_TIMEOUT:?}; killing it");
                self.child.kill().await?;
            }
        }
        Ok(())
    }

    async fn wait_listening(&mut self) -> anyhow::Result<SocketAddr> {
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addr_file) {
                return text.trim().parse().with_context(|| format!("broker address {text:?}"));
            }
            self.check_alive(started)?;
            tokio::time::sleep(POLL).await;
        }
    }

    fn check_alive(&mut self, started: Instant) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the broker exited ({status}); see {}", self.log.display());
        }
        if started.elapsed() > START_TIMEOUT {
            anyhow::bail!("the broker did not serve within {START_TIMEOUT:?}; see {}", self.log.display());
        }
        Ok(())
    }
}

/// Starts the broker child, its stderr (and stdout) appended to `log`; `listen` overrides the
/// config's address (a restart keeps the port).
fn spawn(config: &Path, addr_file: &Path, log: &Path, listen: Option<SocketAddr>) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the hybroker binary")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("broker").arg("--config").arg(config).arg("--addr-file").arg(addr_file);
    if let Some(addr) = listen {
        cmd.env("HYBROKER_BROKER__LISTEN", addr.to_string());
    }
    cmd.stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file).kill_on_drop(true);
    cmd.spawn().context("starting the broker")
}

/// This process's figures.
pub fn own_stats() -> ProcStats {
    proc_stats(std::process::id()).unwrap_or_default()
}

/// A process's CPU time and memory, or `None` when it is gone.
fn proc_stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Some(ProcStats {
        cpu_seconds: ticks as f64 / per_second as f64,
        peak_rss_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}
