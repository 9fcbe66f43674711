//! The manifests run: the README's commands make the PKI and the Secrets, each pod's file view is
//! laid out in a directory (ConfigMaps, Secrets, volumes where the pod mounts them), and the real
//! binary runs each role with its ConfigMap's config unchanged but for addresses (loopback, port 0,
//! given as `HYBROKER_*` overrides, as an operator could): the broker starts, the gateway becomes
//! ready through it, and an agent enrols with the README's multi-use join token under the node name
//! the DaemonSet's `spec.nodeName` variable gives it, then runs a job in its sandbox.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::fit::node_name_variable;
use super::readme::flag_values;
use super::{Manifests, PodRoot, Readme};
use crate::common::{BIN, DEADLINE, eventually};

/// A service process, killed when dropped.
pub struct Service {
    child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(args: &[&str], env: &[(String, String)], log: PathBuf) -> Service {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Service { child, log }
    }

    /// Waits for `file` (an address the service writes once listening); panics if it exits first.
    pub fn wait_for(&mut self, file: &Path) -> String {
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(file)
                && !text.trim().is_empty()
            {
                return text.trim().to_string();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited with {status}:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(started.elapsed() < DEADLINE, "{} not written", file.display());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Runs `hybroker ARGS` in `dir`; panics unless it succeeds; returns its stdout.
pub fn hybroker_in(dir: &Path, args: &[String]) -> String {
    let out = Command::new(BIN).args(args).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "hybroker {}:\n{stdout}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The README's PKI commands run in `work`, plus what the README leaves to the operator: the
/// gateway's public certificate (any CA; here the same one, for `localhost`) and an admin's.
pub fn make_pki(readme: &Readme, work: &Path) {
    for args in readme.hybroker(&["pki"]) {
        hybroker_in(work, &args);
    }
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    hybroker_in(work, &words("pki issue --dir pki --role broker --name api.acme.example --dns localhost --out ."));
    hybroker_in(work, &words("pki issue --dir pki --role admin --name admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_configs_run_a_broker_a_ready_gateway_and_an_agent_named_after_its_node() {
    hybroker::tls::install_crypto_provider();
    let manifests = Manifests::render();
    let readme = Readme::load();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("operator");
    std::fs::create_dir_all(&work).unwrap();
    make_pki(&readme, &work);
    let secrets = readme.secrets();

    // The broker, on loopback ports of its own choosing.
    let broker_pod = manifests.workload("broker");
    let root = PodRoot::lay_out(&manifests, broker_pod, &secrets, &work, &dir.path().join("broker"));
    let (addr_file, enroll_file) = (dir.path().join("broker.addr"), dir.path().join("broker.enroll"));
    let config = root.config(broker_pod);
    let mut broker = Service::start(
        &["broker", "--config", p(&config), "--addr-file", p(&addr_file), "--enroll-addr-file", p(&enroll_file)],
        &env(&[
            ("HYBROKER_BROKER__LISTEN", "127.0.0.1:0"),
            ("HYBROKER_BROKER__ENROLL_LISTEN", "127.0.0.1:0"),
            ("HYBROKER_METRICS__LISTEN", "127.0.0.1:0"),
        ]),
        dir.path().join("broker.log"),
    );
    let broker_addr = broker.wait_for(&addr_file);
    let enroll_addr = broker.wait_for(&enroll_file);
    let grpc_url = manifests.service_url("hybroker-broker", "grpc");
    let service_host = grpc_url.trim_start_matches("https://").split(':').next().unwrap().to_string();

    // The gateway dials the broker by the Service's name in its certificate.
    let gateway_pod = manifests.workload("gateway");
    let root = PodRoot::lay_out(&manifests, gateway_pod, &secrets, &work, &dir.path().join("gateway"));
    let gateway_file = dir.path().join("gateway.addr");
    let mut gateway = Service::start(
        &["gateway", "--config", p(&root.config(gateway_pod)), "--addr-file", p(&gateway_file)],
        &env(&[
            ("HYBROKER_GATEWAY__LISTEN", "127.0.0.1:0"),
            ("HYBROKER_BROKER__URL", &format!("https://{broker_addr}")),
            ("HYBROKER_BROKER__SERVER_NAME", &service_host),
            ("HYBROKER_METRICS__LISTEN", "127.0.0.1:0"),
        ]),
        dir.path().join("gateway.log"),
    );
    let port = gateway.wait_for(&gateway_file).rsplit(':').next().unwrap().to_string();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(work.join("pki/ca.pem")).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let readyz = format!("https://localhost:{port}/readyz");
    eventually("the gateway's /readyz to answer 200", || {
        let get = http.get(&readyz).send();
        async move { get.await.ok().filter(|r| r.status() == 200) }
    })
    .await;

    // The README's join token, made with an admin certificate through a port-forward (here: the
    // loopback address); then the agent enrols with it under the DaemonSet's node name.
    let admin = |args: &[String]| {
        let mut all: Vec<String> = ["admin", "--broker", &format!("https://{broker_addr}")]
            .iter()
            .chain(&["--ca-cert", "pki/ca.pem", "--cert", "pki/admin.pem", "--key", "pki/admin-key.pem"])
            .map(|s| s.to_string())
            .collect();
        all.extend_from_slice(args);
        hybroker_in(&work, &all)
    };
    let mut token = readme.hybroker(&["admin", "agents", "token", "create"]).remove(0);
    let site = flag_values(&token, "--site")[0].to_string();
    let url_at = token.iter().position(|w| w == "--enroll-url").unwrap() + 1;
    token[url_at] = format!("https://{enroll_addr}");
    token.extend(["--server-name".to_string(), service_host.clone()]);
    admin(&token[1..]);
    let agent_pod = manifests.workload("agent");
    let root = PodRoot::lay_out(&manifests, agent_pod, &secrets, &work, &dir.path().join("agent"));
    let _agent = Service::start(
        &["agent", "--config", p(&root.config(agent_pod))],
        &env(&[
            (&node_name_variable(&manifests), "gpu-node-7"),
            ("HYBROKER_AGENT__BROKER_URL", &format!("https://{broker_addr}")),
            ("HYBROKER_AGENT__BROKER_SERVER_NAME", &service_host),
            ("HYBROKER_AGENT__SIMULATE_GPUS", "1xH100-80GB"),
            ("HYBROKER_METRICS__LISTEN", "127.0.0.1:0"),
            // The host's claims, as the DaemonSet's hostPath shares them with every agent here.
            ("HYBROKER_SANDBOX__UID_LOCK_DIR", "/run/hybroker/uids"),
        ]),
        dir.path().join("agent.log"),
    );
    let agent_id = format!("{site}/gpu-node-7");
    let listed = eventually("the agent to enrol and connect", || {
        let out = Command::new(BIN)
            .args(["admin", "--broker", &format!("https://{broker_addr}"), "--ca-cert", "pki/ca.pem"])
            .args(["--cert", "pki/admin.pem", "--key", "pki/admin-key.pem", "agents"])
            .current_dir(&work)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = text.contains(&agent_id).then_some(text);
        async move { found }
    })
    .await;
    assert!(listed.contains(&agent_id), "{listed}");
    assert!(root.host(Path::new("/var/lib/hybroker/tls/agent-key.pem")).is_file(), "the key is kept on the node");

    // A job runs there, in the sandbox the agent's config asks for.
    std::fs::write(work.join("job.yaml"), "name: k8s\ncommand: [sh, -c, 'echo from the daemonset']\n").unwrap();
    let submitted = admin(&["--output".into(), "json".into(), "submit".into(), "job.yaml".into(), "--wait".into()]);
    assert!(submitted.contains("succeeded") || submitted.contains("from the daemonset"), "{submitted}");
    drop(gateway);
    drop(broker);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
