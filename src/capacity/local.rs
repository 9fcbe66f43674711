//! The `local` provider: each "instance" is a `hybroker agent` process on this machine, started
//! from the launch's user data exactly as cloud-init would start it on a VM ([`user_data::play`]
//! under the instance's directory), with the instance type's GPUs simulated. It enrols with its
//! single-use join token like a VM. The quickstart and the tests use it, so an elastic site really
//! scales from zero on a laptop.
//!
//! An instance is its directory `<dir>/<instance id>/` holding `instance.json` (its launch, type,
//! market, process id) and `agent.log`; [`Provider::list`] reads the directories, so a restarted
//! broker finds what it launched. The agents die with the broker (`PR_SET_PDEATHSIG`): there is no
//! cloud to keep them, and a test's broker must not leave processes behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::user_data::{self, Played};
use super::{Instance, InstanceState, LaunchSpec, Provider, ProviderError};
use crate::model::price::Market;
use crate::model::site::instance_type;

/// Settings of one site's local provider.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    pub site: String,
    pub broker: String,
    /// The `hybroker` binary to run.
    pub binary: PathBuf,
    /// Instances' directories live here.
    pub dir: PathBuf,
    /// `sandbox.isolation` of the agents (`auto` or `none`).
    pub isolation: String,
}

/// `instance.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    instance_id: String,
    launch_id: String,
    site: String,
    broker: String,
    instance_type: String,
    spot: bool,
    launched_at: i64,
    pid: i32,
}

/// The instance id of a launch: `local-` and the launch id's hex.
pub fn instance_id(launch_id: &str) -> String {
    format!("local-{}", launch_id.strip_prefix("hbl-").unwrap_or(launch_id))
}

fn err(message: String) -> ProviderError {
    ProviderError::Invalid { code: "LocalLaunchFailed".into(), message }
}

impl LocalProvider {
    fn record_path(&self, instance_id: &str) -> PathBuf {
        self.dir.join(instance_id).join("instance.json")
    }

    fn read(&self, path: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    fn instance(record: &Record) -> Instance {
        Instance {
            instance_id: record.instance_id.clone(),
            launch_id: Some(record.launch_id.clone()),
            site: Some(record.site.clone()),
            instance_type: record.instance_type.clone(),
            market: if record.spot { Market::Spot } else { Market::OnDemand },
            state: if alive(record) { InstanceState::Running } else { InstanceState::Terminated },
            launched_at: Some(record.launched_at),
        }
    }

    fn start(&self, spec: &LaunchSpec, id: &str) -> Result<Record, ProviderError> {
        let ty = instance_type(&spec.instance_type)
            .ok_or_else(|| err(format!("unknown instance type {:?}", spec.instance_type)))?;
        let root = self.dir.join(id);
        std::fs::create_dir_all(&root).map_err(|e| err(format!("{}: {e}", root.display())))?;
        let Played { agent_config, .. } = user_data::play(&spec.user_data, &root).map_err(err)?;
        let log = std::fs::File::create(root.join("agent.log")).map_err(|e| err(format!("agent.log: {e}")))?;
        let log2 = log.try_clone().map_err(|e| err(e.to_string()))?;
        let gpus = match ty.gpu_model {
            Some(model) if ty.gpus > 0 => format!("{}x{model}", ty.gpus),
            _ => String::new(),
        };
        let mut cmd = std::process::Command::new(&self.binary);
        // A fresh VM's environment: none of the broker's (its cloud credentials, its HYBROKER_*).
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("agent")
            .arg("--config")
            .arg(&agent_config)
            .env("HYBROKER_AGENT__SIMULATE_GPUS", format!("\"{gpus}\""))
            .env("HYBROKER_AGENT__CPUS", ty.vcpus.to_string())
            .env("HYBROKER_AGENT__MEMORY_MIB", (u64::from(ty.memory_gib) * 1024).to_string())
            .env("HYBROKER_METRICS__LISTEN", "\"127.0.0.1:0\"")
            .env("HYBROKER_SANDBOX__ISOLATION", format!("\"{}\"", self.isolation))
            .env("HYBROKER_SANDBOX__UID_LOCK_DIR", format!("\"{}\"", root.join("uids").display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: between fork and exec only the async-signal-safe prctl runs.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| err(format!("cannot start {}: {e}", self.binary.display())))?;
        let record = Record {
            instance_id: id.to_string(),
            launch_id: spec.launch_id.clone(),
            site: spec.site.clone(),
            broker: spec.broker.clone(),
            instance_type: spec.instance_type.clone(),
            spot: spec.market == Market::Spot,
            launched_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            pid: child.id() as i32,
        };
        // Reaped by a thread of its own: the broker never waits on it otherwise.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let json = serde_json::to_vec_pretty(&record).expect("a record serialises");
        std::fs::write(self.record_path(id), json).map_err(|e| err(format!("instance.json: {e}")))?;
        Ok(record)
    }
}

/// Whether the record's process runs the agent of that instance.
fn alive(record: &Record) -> bool {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.pid)).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{}/stat", record.pid)).unwrap_or_default();
    let zombie = status.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(&record.instance_id)
}

#[async_trait]
impl Provider for LocalProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, ProviderError> {
        let id = instance_id(&spec.launch_id);
        if let Some(record) = self.read(&self.record_path(&id)) {
            return Ok(Self::instance(&record));
        }
        let this = self.clone();
        let spec = spec.clone();
        let record = tokio::task::spawn_blocking(move || this.start(&spec, &id))
            .await
            .map_err(|e| ProviderError::Transient { message: e.to_string() })??;
        Ok(Self::instance(&record))
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(record) = self.read(&entry.path().join("instance.json")) else { continue };
            if record.site == self.site && record.broker == self.broker {
                let instance = Self::instance(&record);
                if instance.state != InstanceState::Terminated {
                    out.push(instance);
                }
            }
        }
        Ok(out)
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ProviderError> {
        let path = self.record_path(instance_id);
        let Some(record) = self.read(&path) else { return Ok(()) };
        if alive(&record) {
            let pid = nix::unistd::Pid::from_raw(record.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while alive(&record) && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if alive(&record) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join(instance_id));
        Ok(())
    }
}
