//! The tests' stand-in for what a cloud does with a launched instance: cloud-init and the
//! instance metadata service. For each instance the emulated cloud reports, the harness reads its
//! user data, plays it (`hybroker::capacity::user_data::play`) under a directory of its own, serves
//! that instance's metadata on loopback ([`Imds`]) and starts a real `hybroker agent` from the
//! played configuration, with the instance type's GPUs simulated; when the cloud says the instance
//! is gone, the agent is killed (the VM went away).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};

use hybroker::capacity::user_data::play;
use hybroker::model::site::instance_type;

use crate::common::spawn_with;
use crate::imds::Imds;

/// One booted instance: its agent process and its metadata service (served while it lives).
struct Booted {
    agent: Child,
    _imds: Imds,
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

/// The instances booted so far, by instance id.
pub struct CloudInit {
    dir: PathBuf,
    booted: Mutex<HashMap<String, Booted>>,
    /// Every instance ever booted, in order.
    seen: Mutex<Vec<String>>,
}

impl CloudInit {
    pub fn new(dir: &Path) -> Arc<CloudInit> {
        Arc::new(CloudInit { dir: dir.to_path_buf(), booted: Mutex::default(), seen: Mutex::default() })
    }

    /// Boots the instance once: plays its user data, serves its metadata, starts its agent.
    pub async fn boot(&self, instance_id: &str, instance_type_name: &str, user_data: &str) {
        if self.seen.lock().unwrap().iter().any(|i| i == instance_id) {
            return;
        }
        self.seen.lock().unwrap().push(instance_id.to_string());
        let root = self.dir.join(instance_id);
        let played = play(user_data, &root).unwrap_or_else(|e| panic!("user data of {instance_id}: {e}"));
        let imds = Imds::start(instance_id).await;
        let ty = instance_type(instance_type_name).expect("a catalog type");
        let gpus = ty.gpu_model.map_or(String::new(), |m| format!("{}x{m}", ty.gpus));
        let env = [
            ("HYBROKER_AGENT__METADATA_URL", format!("\"{}\"", imds.url())),
            ("HYBROKER_AGENT__SIMULATE_GPUS", format!("\"{gpus}\"")),
            ("HYBROKER_AGENT__CPUS", ty.vcpus.to_string()),
            ("HYBROKER_AGENT__MEMORY_MIB", (u64::from(ty.memory_gib) * 1024).to_string()),
            ("HYBROKER_METRICS__LISTEN", "\"127.0.0.1:0\"".into()),
            ("HYBROKER_SANDBOX__ISOLATION", "\"none\"".into()),
            ("HYBROKER_SANDBOX__UID_LOCK_DIR", format!("\"{}\"", root.join("uids").display())),
        ];
        let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let config = played.agent_config.to_str().unwrap();
        let agent = spawn_with(&["agent", "--config", config], &root.join("agent.log"), &env);
        self.booted.lock().unwrap().insert(instance_id.to_string(), Booted { agent, _imds: imds });
    }

    /// The instance is gone: its agent dies with it.
    pub fn gone(&self, instance_id: &str) {
        self.booted.lock().unwrap().remove(instance_id);
    }
}
