//! The per-attempt sandbox through the real broker and agent processes: one tenant's job cannot
//! read, alter or even see another's; jobs cannot reach the agent's secrets or signal it; limits
//! end a job with a clear reason and leave the node healthy; a node that cannot sandbox says so.

use std::path::Path;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::common::{Cluster, Setup, eventually, get, processes_with, watch_to_end};
use crate::data::submit_as;

const TTL: Duration = Duration::from_secs(5);

/// A local store `vault` with a prefix per tenant.
fn two_tenants(dir: &Path, agent_extra: &str) -> Setup {
    let broker_extra = format!(
        "[[storage]]\nname = \"vault\"\ncloud = \"local\"\nregion = \"lab\"\ndir = \"{}\"\n\
         [[tenant]]\nname = \"acme\"\nstorage = [\"local://vault/acme/\"]\n\
         [[tenant]]\nname = \"globex\"\nstorage = [\"local://vault/globex/\"]\n\
         [[tenant]]\nname = \"ops\"\nadmin = true\n",
        dir.join("objects").display()
    );
    Setup { broker_extra: Some(broker_extra), agent_extra: agent_extra.to_owned(), ..Setup::default() }
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn marker(what: &str) -> String {
    format!("{what}-{}", fastrand::u64(..))
}

/// The first finding, as an attack: tenant A's job leaves a `setsid` watcher that walks every
/// process's work directory, reading inputs and appending to outputs; tenant B's job runs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_leftover_watcher_cannot_read_alter_or_see_another_tenants_job() {
    let cluster = Cluster::start_with(TTL, &[("node-a", "")], |d| two_tenants(d, "")).await;
    let secret: Vec<u8> = (0..64 * 1024).map(|_| fastrand::u8(..)).collect();
    let input = cluster.path("objects/vault/globex/in/data.bin");
    std::fs::create_dir_all(input.parent().unwrap()).unwrap();
    std::fs::write(&input, &secret).unwrap();
    let (watcher, victim) = (marker("watcher"), marker("victim"));
    // A: a watcher that survives its job (setsid, its own session and group), looting any work
    // directory it can reach through /proc; and a loop recording any process of B it sees.
    let a = format!(
        "name: attacker\ncommand: [sh, -c, \"setsid sh -c 'while :; do for d in /proc/[0-9]*; do \
         cat $d/cwd/in/data.bin >> /tmp/loot 2>/dev/null; echo pwned >> $d/cwd/out/result.bin 2>/dev/null; \
         done; sleep 0.05; done' {watcher} </dev/null >/dev/null 2>&1 & \
         mkdir -p out; i=0; while [ ! -e stop ] && [ $i -lt 600 ]; do \
         grep -l $V1$V2 /proc/[0-9]*/cmdline >> out/seen 2>/dev/null; i=$((i+1)); sleep 0.05; done; \
         ls /proc > out/procs; touch out/seen\"]\noutputs: [{{path: out/, to: 'local://vault/acme/a/'}}]\n\
         env: {{V1: '{v1}', V2: '{v2}'}}\n",
        // The marker is put together at run time, so A's own command line does not hold it.
        v1 = &victim[..4],
        v2 = &victim[4..],
    );
    let a_id = submit_as(&cluster, "acme", &a).await.unwrap();
    let a_dir = cluster.work_dir("node-a").join(&a_id).join("attempt-1");
    eventually("the watcher to run", || async { (!processes_with(&watcher).is_empty()).then_some(()) }).await;
    let b = format!(
        "name: victim\ncommand: [sh, -c, 'mkdir -p out && cp in/data.bin out/result.bin && sleep 2 && md5sum in/data.bin', {victim}]\n\
         inputs: [{{uri: 'local://vault/globex/in/', path: in/}}]\n\
         outputs: [{{path: out/, to: 'local://vault/globex/b/'}}]\n"
    );
    let b_id = submit_as(&cluster, "globex", &b).await.unwrap();
    let events = watch_to_end(&mut cluster.admin().await, &b_id).await;
    assert_eq!(get(&mut cluster.admin().await, &b_id).await.state, "succeeded", "{events:?}");
    std::fs::write(a_dir.join("stop"), "").unwrap();
    watch_to_end(&mut cluster.admin().await, &a_id).await;
    let a_job = get(&mut cluster.admin().await, &a_id).await;
    assert_eq!(a_job.state, "succeeded", "{a_job:?}\n{}", cluster.agent_log("node-a"));

    let result = std::fs::read(cluster.path(&format!("objects/vault/globex/b/globex/{b_id}/attempt-1/result.bin")));
    assert_eq!(md5_hex(&result.unwrap()), md5_hex(&secret), "B's output is B's input, unaltered");
    assert_eq!(md5_hex(&std::fs::read(&input).unwrap()), md5_hex(&secret), "B's input is unaltered");
    let a_out = cluster.path(&format!("objects/vault/acme/a/acme/{a_id}/attempt-1"));
    let seen = std::fs::read_to_string(a_out.join("seen")).unwrap();
    assert!(seen.is_empty(), "A saw B's processes: {seen}");
    let procs = std::fs::read_to_string(a_out.join("procs")).unwrap();
    let pids: Vec<&str> = procs.lines().filter(|l| l.parse::<u32>().is_ok()).collect();
    assert!(pids.len() <= 8, "A's /proc shows only its own few processes: {pids:?}");
    eventually("A's watcher to be gone with A's attempt", || async {
        processes_with(&watcher).is_empty().then_some(())
    })
    .await;
    assert!(!a_dir.exists(), "A's work directory is removed after stage-out");
}

/// A job cannot read the agent's key, config or work root, the broker's database or the CA's
/// key, nor signal the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_read_the_agents_secrets_nor_signal_it() {
    let cluster = Cluster::start(TTL, &[("node-a", "")]).await;
    let secrets = [
        cluster.path("pki/node-a-key.pem"),
        cluster.path("agent-node-a.toml"),
        cluster.path("broker.db"),
        cluster.path("pki/issuing-ca-key.pem"),
        cluster.path("pki/root-key.pem"),
    ];
    for s in &secrets {
        eventually(&format!("{} on the host", s.display()), || async { s.is_file().then_some(()) }).await;
    }
    let reads: Vec<String> = secrets.iter().map(|s| format!("! cat {} >/dev/null", s.display())).collect();
    let work_root = cluster.work_dir("node-a");
    let agent = cluster.agent_pid("node-a");
    let script = format!(
        "{} && ! ls {root}/*/attempt-1.sandbox && [ -z \"$(ls -A {root} 2>/dev/null | grep -v $HYBROKER_JOB_ID)\" ] \
         && ! kill -0 {agent} && ! kill -TERM {agent} && echo contained",
        reads.join(" && "),
        root = work_root.display()
    );
    let yaml = format!("name: snoop\ncommand: [sh, -c, '{script}']\n");
    let mut admin = cluster.admin().await;
    let id = crate::common::submit(&mut admin, &yaml).await;
    let events = watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    assert_eq!(job.state, "succeeded", "{events:?}\n{}", cluster.agent_log("node-a"));
    assert!(crate::common::alive(nix::unistd::Pid::from_raw(agent)), "the agent lives");
}

/// A job that fills its disk cap fails with that reason; its work directory goes and the node
/// runs the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_filling_its_disk_cap_fails_with_that_reason() {
    let cluster = Cluster::start_with(TTL, &[("node-a", "")], |_| Setup {
        agent_extra: "[sandbox]\ndisk_mib = 16\n".into(),
        ..Setup::default()
    })
    .await;
    let mut admin = cluster.admin().await;
    let id = crate::common::submit(
        &mut admin,
        "name: filler\ncommand: [dd, 'if=/dev/zero', 'of=big', 'bs=1M', 'count=64']\n",
    )
    .await;
    let events = watch_to_end(&mut admin, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.state, "failed", "{events:?}");
    assert!(last.reason.contains("disk cap of 16 MiB reached"), "{}", last.reason);
    let dir = cluster.work_dir("node-a").join(&id).join("attempt-1");
    eventually("the work directory to be removed", || async { (!dir.exists()).then_some(()) }).await;
    let id = crate::common::submit(&mut admin, "name: after\ncommand: [sh, -c, 'echo ok > f && cat f']\n").await;
    watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "the node stays healthy");
}

/// Two agents on one host run attempts at once: each has its own UID, claimed host-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_host_never_share_a_uid() {
    let cluster = Cluster::start(TTL, &[("node-a", ""), ("node-b", "")]).await;
    let mut admin = cluster.admin().await;
    // One marker per job: every process of a job runs as that job's UID.
    let marks = [marker("uid"), marker("uid")];
    let mut ids = Vec::new();
    for mark in &marks {
        // Five of an agent's eight CPUs each: one such job per agent at a time.
        let yaml = format!("name: holder\ncommand: [sh, -c, 'sleep 60; :', {mark}]\nresources: {{cpus: 5}}\n");
        ids.push(crate::common::submit(&mut admin, &yaml).await);
    }
    let uids = eventually("both attempts running", || async {
        let firsts: Vec<i32> = marks.iter().filter_map(|m| processes_with(m).first().copied()).collect();
        (firsts.len() == 2).then(|| firsts.iter().map(|p| uid_of(*p)).collect::<Vec<u32>>())
    })
    .await;
    let agents: std::collections::BTreeSet<String> = futures_agents(&mut admin, &ids).await.into_iter().collect();
    assert_eq!(agents.len(), 2, "both agents run attempts: {agents:?}");
    let mut distinct = uids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 2, "{uids:?}");
    assert!(uids.iter().all(|u| (2_000_000..=2_065_535).contains(u)), "{uids:?}");
    for id in ids {
        let _ = admin.cancel(hybroker::proto::CancelJobRequest { job_id: id, ..Default::default() }).await;
    }
}

async fn futures_agents(
    admin: &mut hybroker::proto::job_service_client::JobServiceClient<tonic::transport::Channel>,
    ids: &[String],
) -> Vec<String> {
    let mut agents = Vec::new();
    for id in ids {
        agents.push(get(admin, id).await.agent);
    }
    agents
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("Uid: 0");
    line.split_whitespace().nth(1).and_then(|u| u.parse().ok()).unwrap_or(0)
}

/// Memory and process limits: a job over its memory is OOM-killed with that reason, a fork loop
/// stops at the pids limit, and the node runs the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_process_limits_end_a_job_with_a_clear_reason() {
    let extra = "[sandbox]\nmax_memory_mib = 64\npids = 32\n";
    let cluster =
        Cluster::start_with(TTL, &[("node-a", "")], |_| Setup { agent_extra: extra.into(), ..Setup::default() }).await;
    let mut admin = cluster.admin().await;
    // `tail -n 1` keeps a line without a newline in memory: 512 MiB of zeros.
    let id = crate::common::submit(
        &mut admin,
        "name: hog\ncommand: [sh, -c, 'head -c 512m /dev/zero | tail -n 1 > /dev/null']\n",
    )
    .await;
    let events = watch_to_end(&mut admin, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.state, "failed", "{events:?}");
    assert!(last.reason.starts_with("out of memory: ") && last.reason.contains("64 MiB"), "{}", last.reason);

    let started = std::time::Instant::now();
    let id = crate::common::submit(
        &mut admin,
        "name: forker\ncommand: [sh, -c, 'n=0; while [ $n -lt 100 ]; do (sleep 30) & n=$((n+1)); done; wait']\n",
    )
    .await;
    let events = watch_to_end(&mut admin, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.state, "failed", "the fork loop hit the pids limit: {events:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "the loop's children did not hold the job");
    let dir = cluster.work_dir("node-a").join(&id).join("attempt-1");
    eventually("the work directory to be removed", || async { (!dir.exists()).then_some(()) }).await;

    let id = crate::common::submit(&mut admin, "name: after\ncommand: [sh, -c, 'echo ok']\n").await;
    watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "the node stays healthy");
}

/// The unprivileged user non-root agents run as in these tests.
const NOBODY: u32 = 65534;

/// A config for agent `node` that runs as [`NOBODY`]: its key, config and work directory are
/// handed to that user, the cluster directory made traversable.
fn unprivileged_agent_config(cluster: &Cluster, node: &str, extra: &str) -> std::path::PathBuf {
    use std::os::unix::fs::{PermissionsExt, chown};
    let tls = cluster.issue(hybroker::model::identity::Role::Agent, node, Some("lab"));
    let work = cluster.work_dir(node);
    std::fs::create_dir_all(&work).unwrap();
    let config = format!(
        "[agent]\nbroker_url = \"https://{addr}\"\nwork_dir = \"{work}\"\ncpus = 8\nmemory_mib = 65536\n\
         [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [reconnect]\nmin_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n{extra}",
        addr = cluster.addr,
        work = work.display(),
        ca = tls.ca_cert.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
    );
    let path = cluster.path(&format!("agent-{node}.toml"));
    std::fs::write(&path, config).unwrap();
    for owned in [&tls.key, &tls.cert, &path, &work] {
        chown(owned, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(cluster.path("pki"), std::fs::Permissions::from_mode(0o711)).unwrap();
    path
}

/// A non-root agent isolates its jobs in user namespaces: a job cannot read the agent's key or
/// config, nor signal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_agents_job_cannot_read_its_key_or_config_nor_signal_it() {
    let cluster = Cluster::start(TTL, &[]).await;
    let config = unprivileged_agent_config(&cluster, "plain", "");
    let log = std::fs::File::create(cluster.path("agent-plain.log")).unwrap();
    let mut agent = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", crate::common::BIN, "agent", "--config"])
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = agent.id();
    let mut admin = cluster.admin().await;
    let key = cluster.path("pki/plain-key.pem");
    let script = format!(
        "! cat {key} && ! cat {config} && ! kill -0 {pid} && [ $(id -u) -ne 0 ] && echo contained",
        key = key.display(),
        config = config.display()
    );
    let id = crate::common::submit(&mut admin, &format!("name: snoop\ncommand: [sh, -c, '{script}']\n")).await;
    let events = watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    let log = cluster.agent_log("plain");
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(job.state, "succeeded", "{events:?}\n{log}");
    assert!(log.contains("unprivileged user namespaces"), "the agent says what it lacks without root:\n{log}");
    let info = admin.get_agent(hybroker::proto::GetAgentRequest { agent_id: "lab/plain".into() }).await.unwrap();
    assert_eq!(info.into_inner().inventory.unwrap().isolation, "userns");
}

/// Where no sandbox is possible (a non-root agent in a user namespace that may not make more),
/// the agent refuses to start unless `isolation = "none"`; with it, it warns and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_sandbox_refuses_to_start_without_isolation_none() {
    // The broker takes an unisolated node only when its config dedicates it to one tenant.
    let dedicated = format!("{}\n[[dedicated]]\nagent = \"lab/bare\"\ntenant = \"acme\"\n", crate::common::TENANTS);
    let cluster = Cluster::start_with(TTL, &[], |_| Setup { broker_extra: Some(dedicated), ..Setup::default() }).await;
    // `unshare --user`, mapped by this (root) process, then max_user_namespaces = 0 in it, then
    // the agent as an unprivileged user: a kernel that allows no user namespace, for real.
    let run = |config: &Path, log: &Path| {
        // Exec'd again once mapped, as root of the namespace, it may set the namespace's limit.
        let inner = log.with_extension("sh");
        std::fs::write(
            &inner,
            format!(
                "echo 0 > /proc/sys/user/max_user_namespaces && \
                 exec setpriv --reuid 65534 --regid 65534 --clear-groups {bin} agent --config {config}\n",
                bin = crate::common::BIN,
                config = config.display()
            ),
        )
        .unwrap();
        let script = format!(
            "rm -f {fifo}; mkfifo {fifo} && (unshare --user sh -c 'read go < {fifo}; exec sh {inner}' & pid=$!; \
             while [ \"$(readlink /proc/$pid/ns/user)\" = \"$(readlink /proc/self/ns/user)\" ]; do sleep 0.01; done; \
             printf '0 0 1\\n65534 65534 1\\n' > /proc/$pid/uid_map && printf '0 0 1\\n65534 65534 1\\n' > /proc/$pid/gid_map \
             && echo go > {fifo}; wait $pid)",
            fifo = log.with_extension("fifo").display(),
            inner = inner.display(),
        );
        let log_file = std::fs::File::create(log).unwrap();
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap()
    };
    let config = unprivileged_agent_config(&cluster, "bare", "");
    let log = cluster.path("agent-bare.log");
    let status = run(&config, &log).wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("cannot sandbox attempts") && text.contains("isolation = \"none\""), "{text}");

    let config = unprivileged_agent_config(&cluster, "bare", "[sandbox]\nisolation = \"none\"\n");
    let mut agent = run(&config, &log);
    let mut admin = cluster.admin().await;
    let isolation = eventually("the agent to register", || {
        let mut admin = admin.clone();
        async move {
            let info = admin.get_agent(hybroker::proto::GetAgentRequest { agent_id: "lab/bare".into() }).await.ok()?;
            info.into_inner().inventory.map(|i| i.isolation)
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGKILL);
    for pid in crate::common::processes_with(&config.display().to_string()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = agent.wait();
    assert_eq!(isolation, "none");
    assert!(text.contains("WARN") && text.contains("isolation = \"none\""), "{text}");
    let _ = &mut admin;
}

/// Devices: a job's private /dev holds only its own GPU's node, which it opens; the device cgroup
/// built from the same rules refuses another attempt's node with EPERM (checked on the host's
/// nodes, where no mount hides them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_opens_its_own_gpu_node_and_the_device_cgroup_refuses_anothers() {
    use hybroker::agent::sandbox::cgroup::{CgroupRoot, Limits};
    use hybroker::agent::sandbox::devices;
    let extra = "[sandbox]\nsimulated_gpu_devices = [\"/dev/full\", \"/dev/kmsg\"]\n";
    let cluster = Cluster::start_with(TTL, &[("node-a", "2xL4-24GB")], |_| Setup {
        agent_extra: extra.into(),
        ..Setup::default()
    })
    .await;
    let mut admin = cluster.admin().await;
    let script = "(exec 3>/dev/nvidia$CUDA_VISIBLE_DEVICES) && [ $(ls /dev | grep -c nvidia) -eq 1 ] \
                  && ! (exec 4>/dev/kmsg) 2>/dev/null && ! (exec 4>/dev/full) 2>/dev/null";
    let id = crate::common::submit(
        &mut admin,
        &format!("name: own-gpu\ncommand: [sh, -c, '{script}']\nresources: {{gpus: 1}}\n"),
    )
    .await;
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "{events:?}\n{}", cluster.agent_log("node-a"));

    // The gate itself: an attempt cgroup holding GPU 0 (/dev/full) only.
    let root = CgroupRoot::detect(&marker("gate-test")).unwrap();
    let cgroup =
        root.create("attempt", &Limits::default(), &devices::rules([Path::new("/dev/full")].into_iter())).unwrap();
    let mut open = std::process::Command::new("sh");
    open.args(["-c", "(exec 3>/dev/full) || exit 10; (exec 4>/dev/kmsg) || exit 20"]);
    hybroker::agent::sandbox::join_before_exec(&mut open, cgroup.join_fds().unwrap());
    let out = open.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(20), "its own node opens, the other does not: {stderr}");
    assert!(stderr.contains("Operation not permitted"), "EPERM from the device cgroup: {stderr}");
    cgroup.remove().unwrap();
}

/// Attempts cannot reach the cloud's instance-metadata address: the sandbox's rule refuses the
/// connect with EPERM (without it, the connect would time out or be unreachable here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_reach_the_instance_metadata_address() {
    let cluster = Cluster::start(TTL, &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    let script = "timeout 10 bash -c \"exec 3<>/dev/tcp/169.254.169.254/80\" 2>&1 | grep \"Operation not permitted\"";
    let id = crate::common::submit(&mut admin, &format!("name: metadata\ncommand: [sh, -c, '{script}']\n")).await;
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "{events:?}\n{}", cluster.agent_log("node-a"));
}

/// Benchmark (not a test; `cargo test --release --test e2e sandbox_overhead -- --ignored
/// --nocapture`): 1,000 `true` jobs through the executor without and with the sandbox (UID claim,
/// cgroup, namespaces, mounts, teardown); prints p50/p99 of each and their difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on purpose"]
async fn sandbox_overhead() {
    use hybroker::agent::executor::{self, Launch, SandboxLaunch};
    use hybroker::agent::sandbox::{AttemptResources, Sandbox, SandboxOptions};
    const RUNS: usize = 1000;
    // The init binary: this build's, or another (a release build) named in HYBROKER_BENCH_INIT.
    let init: std::path::PathBuf =
        std::env::var_os("HYBROKER_BENCH_INIT").map_or(crate::common::BIN.into(), Into::into);
    println!("sandbox-init: {}", init.display());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("work");
    std::fs::create_dir_all(&root).unwrap();
    let sandbox = Sandbox::start(SandboxOptions {
        settings: Default::default(),
        work_root: root.clone(),
        hide: Vec::new(),
        agent: marker("bench"),
        init_program: init.clone(),
    })
    .unwrap();
    let launch = |i: usize| Launch {
        job_id: format!("job-{i}"),
        attempt: 1,
        command: vec!["true".into()],
        env: Default::default(),
        cuda_visible_devices: String::new(),
        max_runtime: Duration::from_secs(60),
        work_dir: root.join(format!("job-{i}")).join("attempt-1"),
        run_as: None,
        grace: Duration::from_secs(1),
        sandbox: None,
        preempt: None,
        preempt_order: None,
    };
    let (_cancel_tx, cancel) = tokio::sync::watch::channel(false);
    let mut plain = Vec::with_capacity(RUNS);
    let mut sandboxed = Vec::with_capacity(RUNS);
    let mut phases: [Vec<Duration>; 3] = Default::default();
    for i in 0..RUNS {
        let (tx, _rx) = tokio::sync::mpsc::channel(64);
        let started = std::time::Instant::now();
        let outcome = executor::run(launch(i), tx, cancel.clone()).await;
        plain.push(started.elapsed());
        assert!(outcome.succeeded(), "{outcome:?}");
        let _ = std::fs::remove_dir_all(root.join(format!("job-{i}")));

        let (tx, _rx) = tokio::sync::mpsc::channel(64);
        let started = std::time::Instant::now();
        let mut l = launch(i);
        let mut attempt =
            sandbox.begin(&l.job_id, 1, &l.work_dir, AttemptResources { cpus: 1, memory_gib: 1 }, vec![]).unwrap();
        l.sandbox = Some(SandboxLaunch {
            init_program: init.clone(),
            spec: attempt.spec.clone(),
            join_fds: std::sync::Arc::new(attempt.join_fds().unwrap()),
            claim: attempt.claim_fd().unwrap().map(std::sync::Arc::new),
        });
        let begun = started.elapsed();
        let outcome = executor::run(l, tx, cancel.clone()).await;
        let ran = started.elapsed();
        let outcome = attempt.after_process(outcome);
        attempt.finish(outcome.succeeded());
        sandboxed.push(started.elapsed());
        phases[0].push(begun);
        phases[1].push(ran - begun);
        phases[2].push(started.elapsed() - ran);
        assert!(outcome.succeeded(), "{outcome:?}");
        let _ = std::fs::remove_dir_all(root.join(format!("job-{i}")));
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort_unstable();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0
    };
    let (p50, p99) = (pct(&mut plain, 0.5), pct(&mut plain, 0.99));
    let (s50, s99) = (pct(&mut sandboxed, 0.5), pct(&mut sandboxed, 0.99));
    println!("{RUNS} `true` jobs: plain p50 {p50:.1} ms p99 {p99:.1} ms; sandboxed p50 {s50:.1} ms p99 {s99:.1} ms");
    println!("sandbox setup + teardown overhead: p50 {:.1} ms, p99 {:.1} ms", s50 - p50, s99 - p99);
    for (name, phase) in
        ["begin (uid, work dir, cgroup)", "run (sandbox-init, job)", "end (kill, remove)"].iter().zip(&mut phases)
    {
        println!("  {name}: p50 {:.1} ms, p99 {:.1} ms", pct(phase, 0.5), pct(phase, 0.99));
    }
}

/// After `kill -9`, the attempt keeps its UID claimed (its sandbox's init holds the claim) and a
/// restarted agent starts clean: the attempt killed, its disk cap unmounted, its work directory
/// removed, its UID free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_starts_clean_after_kill_9() {
    let extra = "[sandbox]\ndisk_mib = 16\n";
    let mut cluster = Cluster::start_with(Duration::from_secs(30), &[("node-a", "")], |_| Setup {
        agent_extra: extra.into(),
        ..Setup::default()
    })
    .await;
    let mut admin = cluster.admin().await;
    let mark = marker("leftover");
    let id =
        crate::common::submit(&mut admin, &format!("name: leftover\ncommand: [sh, -c, 'sleep 60; :', {mark}]\n")).await;
    let pid = eventually("the job to run", || async { processes_with(&mark).first().copied() }).await;
    let uid = uid_of(pid);
    let dir = cluster.work_dir("node-a").join(&id).join("attempt-1");
    let mounted = || std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&dir.display().to_string());
    assert!(mounted(), "the disk cap is mounted on the work directory");
    let claim = Path::new("/run/hybroker/uids").join(uid.to_string());
    let claimed = || std::fs::File::open(&claim).unwrap().try_lock().is_err();
    cluster.kill_agent("node-a");
    assert!(
        crate::common::alive(nix::unistd::Pid::from_raw(pid)) && claimed(),
        "the attempt and its claim outlive the agent"
    );
    cluster.start_agent("node-a", "");
    eventually("the restarted agent to clear what is left", || async {
        (processes_with(&mark).is_empty() && !mounted() && !dir.exists() && !claimed()).then_some(())
    })
    .await;
}

/// `network = "private"`: the job has only its own loopback; the broker's port, reachable from
/// the host, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_reaches_nothing_outside() {
    let extra = "[sandbox]\nnetwork = \"private\"\n";
    let cluster =
        Cluster::start_with(TTL, &[("node-a", "")], |_| Setup { agent_extra: extra.into(), ..Setup::default() }).await;
    let mut admin = cluster.admin().await;
    let port = cluster.addr.port();
    let script = format!("! timeout 5 bash -c \"exec 3<>/dev/tcp/127.0.0.1/{port}\"");
    let id = crate::common::submit(&mut admin, &format!("name: offline\ncommand: [sh, -c, '{script}']\n")).await;
    let events = watch_to_end(&mut admin, &id).await;
    assert_eq!(get(&mut admin, &id).await.state, "succeeded", "{events:?}\n{}", cluster.agent_log("node-a"));
    assert!(std::net::TcpStream::connect(cluster.addr).is_ok(), "the port is open on the host");
}

/// `keep_failed`: a failed attempt's work directory stays, still owned by its UID, and the UID's
/// claim names it (so the UID is not reused while it is there); a successful one's goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempts_work_directory_is_kept_with_its_uid_reserved() {
    use std::os::unix::fs::MetadataExt;
    // With a disk cap: the kept directory is a mount that must outlive an agent restart.
    let extra = "[sandbox]\nkeep_failed = \"1h\"\ndisk_mib = 64\n";
    let mut cluster =
        Cluster::start_with(TTL, &[("node-a", "")], |_| Setup { agent_extra: extra.into(), ..Setup::default() }).await;
    let mut admin = cluster.admin().await;
    let failed =
        crate::common::submit(&mut admin, "name: failing\ncommand: [sh, -c, 'echo partial > f; exit 3']\n").await;
    let ok = crate::common::submit(&mut admin, "name: passing\ncommand: [sh, -c, 'echo done > f']\n").await;
    watch_to_end(&mut admin, &failed).await;
    watch_to_end(&mut admin, &ok).await;
    let kept = cluster.work_dir("node-a").join(&failed).join("attempt-1");
    let gone = cluster.work_dir("node-a").join(&ok).join("attempt-1");
    eventually("the successful attempt's directory to go", || async { (!gone.exists()).then_some(()) }).await;
    let uid = std::fs::metadata(&kept).unwrap().uid();
    assert!((2_000_000..=2_065_535).contains(&uid), "kept, owned by the attempt's uid {uid}");
    assert_eq!(std::fs::read_to_string(kept.join("f")).unwrap(), "partial\n");
    let claim = std::fs::read_to_string(Path::new("/run/hybroker/uids").join(uid.to_string())).unwrap();
    assert!(claim.ends_with(&kept.display().to_string()), "the uid's claim names the kept directory: {claim}");

    // A restarted agent sweeps what its predecessor left, but not the kept directory's files.
    cluster.kill_agent("node-a");
    cluster.start_agent("node-a", "");
    eventually("the restarted agent to register", || {
        let mut admin = admin.clone();
        async move {
            let info =
                admin.get_agent(hybroker::proto::GetAgentRequest { agent_id: "lab/node-a".into() }).await.ok()?;
            info.into_inner().connected.then_some(())
        }
    })
    .await;
    assert_eq!(std::fs::read_to_string(kept.join("f")).unwrap(), "partial\n", "the kept files survive a restart");
}

/// Found by review: a job had the agent's terminal session, the keys its UID's previous attempt
/// left in the UID's keyring, could see a hidden path named through a symbolic link, and could
/// make user namespaces (threads must still start: `clone3` falls back to `clone`). Two jobs
/// on one UID (a range of one), one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_gets_no_terminal_session_no_keys_of_its_uids_past_no_hidden_path_no_user_namespace() {
    // Outside /tmp (jobs have their own /tmp): a directory the job's user could read, hidden
    // from jobs by naming it through an absolute symbolic link.
    let host = std::path::PathBuf::from("/var/tmp").join(marker("hybroker-hide"));
    std::fs::create_dir_all(host.join("secret")).unwrap();
    std::fs::write(host.join("secret/token"), "s3cr3t").unwrap();
    std::os::unix::fs::symlink(host.join("secret"), host.join("link")).unwrap();
    for p in [host.clone(), host.join("secret")] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let extra = format!("[sandbox]\nuid_range = \"2100007-2100007\"\nhide = [\"{}\"]\n", host.join("link").display());
    let cluster =
        Cluster::start_with(TTL, &[("node-a", "")], |_| Setup { agent_extra: extra, ..Setup::default() }).await;
    let mut admin = cluster.admin().await;

    // The first job plants a key in its UID's keyring, then waits for the test to look at it.
    let first = marker("first");
    let script = format!(
        "perl -e \"my (\\$t, \\$d, \\$p) = (qq(user), qq(hbk-planted), qq(s3cr3t)); \
         syscall(248, \\$t, \\$d, \\$p, 6, -4) > 0 or die qq(add_key: \\$!)\" \
         && exec perl -e \"sleep 30\" {first}"
    );
    let id = crate::common::submit(&mut admin, &format!("name: plant\ncommand: [sh, -c, '{script}']\n")).await;
    let job = eventually("the first job to run", || async { processes_with(&first).first().copied() }).await;
    // Its own session (so no controlling terminal of the agent's): not the test's, which the
    // agent shares.
    let session = |pid: i32| nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_ne!(session(job), nix::unistd::getsid(None).unwrap(), "the job shares the agent's session");
    admin
        .cancel(hybroker::proto::CancelJobRequest { job_id: id.clone(), reason: "seen".into(), ..Default::default() })
        .await
        .unwrap();
    watch_to_end(&mut admin, &id).await;
    // The job is cancelled at once; its attempt's teardown (the init holds the UID's claim until
    // the last process is gone) may take a moment more on a busy machine, and the next job needs
    // the range's one UID.
    let claim = Path::new("/run/hybroker/uids/2100007");
    eventually("the cancelled attempt to release its uid", || async {
        let file = std::fs::File::open(claim).ok()?;
        file.try_lock().ok()
    })
    .await;

    // The second job has the same UID: no key of the first, and the hidden directory is empty.
    let script = format!(
        "if perl -e \"my (\\$t, \\$d) = (qq(user), qq(hbk-planted)); \
         exit(syscall(250, 10, -4, \\$t, \\$d, 0) >= 0 ? 0 : 1)\"; then echo key-leaked; exit 3; fi; \
         if [ -e {secret}/token ]; then echo hidden-path-visible; exit 4; fi; \
         if unshare -U true; then echo user-namespace; exit 5; fi; \
         python3 -c \"import threading; t = threading.Thread(target=print); t.start(); t.join()\" || exit 6",
        secret = host.join("secret").display()
    );
    let id = crate::common::submit(&mut admin, &format!("name: inherit\ncommand: [sh, -c, '{script}']\n")).await;
    let events = watch_to_end(&mut admin, &id).await;
    let state = get(&mut admin, &id).await.state;
    let _ = std::fs::remove_dir_all(&host);
    assert_eq!(state, "succeeded", "{events:?}\n{}", cluster.agent_log("node-a"));
}
