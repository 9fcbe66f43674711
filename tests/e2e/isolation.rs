//! The broker's side of isolation: leases belong to their agent (an impostor can neither adopt
//! another agent's attempt nor keep its lease alive), nodes without isolation run only the tenant
//! they are dedicated to, and the broker's files at rest are private.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use hybroker::model::identity::Role;
use hybroker::proto::agent_service_client::AgentServiceClient;
use hybroker::proto::{self, AttemptPhase, agent_message::Msg as In, broker_message::Msg as Out};
use hybroker::tls;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::common::*;

/// An agent driven over raw gRPC with its own agent certificate: it registers with the inventory
/// and attempts given, and heartbeats until dropped.
struct RawAgent {
    tx: mpsc::Sender<proto::AgentMessage>,
    inbound: tonic::Streaming<proto::BrokerMessage>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RawAgent {
    async fn register(
        cluster: &Cluster,
        node: &str,
        inventory: proto::Inventory,
        attempts: Vec<proto::AttemptUpdate>,
    ) -> Result<RawAgent, tonic::Status> {
        let paths = cluster.issue(Role::Agent, node, Some("lab"));
        let config = tls::client_config(&paths, TRUST_DOMAIN, Role::Broker).unwrap();
        let channel = tls::connect(&format!("https://{}", cluster.addr), config, None).await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let register = proto::Register {
            site: "lab".into(),
            node: node.into(),
            inventory: Some(inventory),
            attempts,
            ..Default::default()
        };
        tx.send(proto::AgentMessage { msg: Some(In::Register(register)) }).await.unwrap();
        let inbound = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
        // The protocol's cadence (not a synchronisation): well inside the lease.
        let period = cluster.lease_ttl / 10;
        let beats = tx.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let beat = proto::AgentMessage { msg: Some(In::Heartbeat(proto::Heartbeat { inventory: None })) };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        Ok(RawAgent { tx, inbound, heartbeat })
    }

    /// The next broker message that `wanted` picks, within the deadline.
    async fn next<T>(&mut self, what: &str, wanted: impl Fn(Out) -> Option<T>) -> T {
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                let msg =
                    self.inbound.message().await.unwrap_or_else(|e| panic!("stream failed waiting for {what}: {e}"));
                let msg = msg.unwrap_or_else(|| panic!("stream ended waiting for {what}"));
                if let Some(found) = msg.msg.and_then(&wanted) {
                    return found;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
    }
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn inventory(isolation: &str, cpus: u32) -> proto::Inventory {
    proto::Inventory { cpus, memory_mib: 65536, isolation: isolation.into(), ..Default::default() }
}

async fn submit_as(cluster: &Cluster, tenant: &str, yaml: &str) -> String {
    let mut admin = cluster.admin().await;
    let request = proto::SubmitRequest {
        spec: yaml.as_bytes().to_vec(),
        format: proto::SpecFormat::Yaml.into(),
        idempotency_key: String::new(),
        tenant: tenant.into(),
    };
    admin.submit(request).await.unwrap().into_inner().job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_can_neither_adopt_another_agents_attempt_nor_keep_its_lease_alive() {
    let ttl = Duration::from_secs(2);
    let mut cluster = Cluster::start(ttl, &[("node-a", "")]).await;
    let mut admin = cluster.admin().await;
    let id = submit(&mut admin, "name: pinned\ncommand: [sh, -c, 'echo $$ > pid; exec sleep 30']\n").await;
    let job = wait_job(&admin, &id, "the attempt running on node-a", |j| j.state == "running").await;
    assert_eq!(job.agent, "lab/node-a");

    // Another agent certificate registers naming node-a's running attempt (the first lease has
    // epoch 1). It has no room, so nothing can be dispatched to it either.
    let attempt = proto::AttemptUpdate {
        job_id: id.clone(),
        attempt: 1,
        epoch: 1,
        phase: AttemptPhase::Running.into(),
        ..Default::default()
    };
    let mut impostor = RawAgent::register(&cluster, "node-x", inventory("sandbox", 0), vec![attempt.clone()])
        .await
        .expect("a sandboxed agent registers");
    let stop = |m| match m {
        Out::Stop(s) if s.job_id == id && s.epoch == 1 => Some(s.reason),
        _ => None,
    };
    let reason = impostor.next("the impostor to be told to stop the attempt", stop).await;
    assert!(reason.contains("another agent"), "{reason}");
    // Reporting it again on the open stream is refused the same way.
    impostor.tx.send(proto::AgentMessage { msg: Some(In::Update(attempt)) }).await.unwrap();
    impostor.next("a second stop", stop).await;
    let log = cluster.broker_log();
    assert!(log.contains("refused to adopt another agent's attempt at register"), "{log}");
    assert_eq!(get(&mut admin, &id).await.agent, "lab/node-a", "the attempt is still node-a's");

    // The real agent dies; the impostor keeps heartbeating. The lease expires on time.
    let pid_file = cluster.work_dir("node-a").join(&id).join("attempt-1/pid");
    let killed = Instant::now();
    cluster.kill_agent("node-a");
    let job = wait_job(&admin, &id, "the lease to expire", |j| j.state != "running").await;
    let took = killed.elapsed();
    println!("lease expiry after the agent's kill -9, an impostor heartbeating: {took:?} (lease ttl {ttl:?})");
    if let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    assert!(!impostor.heartbeat.is_finished(), "the impostor was heartbeating all along");
    assert_eq!((job.state.as_str(), job.attempts), ("queued", 1), "{job:?}");
    assert!(job.reason.contains("lease expired"), "{}", job.reason);
    // Expiry runs on a tick of a quarter lease; the rest is slack for a loaded machine (with an
    // impostor renewing it, the lease would never expire).
    assert!(took < ttl + Duration::from_secs(8), "the lease outlived its agent by {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_isolation_runs_only_the_tenant_it_is_dedicated_to() {
    let extra = format!("{TENANTS}\n[[dedicated]]\nagent = \"lab/node-9\"\ntenant = \"acme\"\n");
    let mut cluster =
        Cluster::start_with(Duration::from_secs(5), &[], |_| Setup { broker_extra: Some(extra), ..Default::default() })
            .await;

    // Not dedicated: refused, naming the config key. An agent older than the field reads as none.
    for (node, isolation) in [("node-8", "none"), ("node-7", "")] {
        let refused = RawAgent::register(&cluster, node, inventory(isolation, 8), vec![]).await;
        let err = refused.err().unwrap_or_else(|| panic!("{node} without isolation must be refused"));
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&format!("lab/{node}")) && err.message().contains("[[dedicated]]"), "{err:?}");
    }

    // Dedicated to acme: it registers, and gets acme's job but never globex's, although it has room.
    let mut node9 = RawAgent::register(&cluster, "node-9", inventory("none", 8), vec![]).await.expect("dedicated");
    node9.next("registered", |m| matches!(m, Out::Registered(_)).then_some(())).await;
    let other = submit_as(&cluster, "globex", "name: other\ncommand: [sh, -c, 'echo globex']\n").await;
    let mine = submit_as(&cluster, "acme", "name: mine\ncommand: [sh, -c, 'echo acme']\n").await;
    let assigned = node9.next("acme's job", |m| if let Out::Assign(a) = m { Some(a.job_id) } else { None }).await;
    assert_eq!(assigned, mine, "the first assignment of the dedicated node is acme's job");
    let mut admin = cluster.admin().await;
    assert_eq!(get(&mut admin, &other).await.state, "queued", "globex's job waits: the only node is acme's");

    // A sandboxed node takes any tenant: globex's job runs there.
    cluster.start_agent("node-a", "");
    let events = watch_to_end(&mut admin, &other).await;
    assert_eq!(states(&events).last(), Some(&"succeeded"), "{events:?}");
    assert!(events.iter().all(|e| e.agent != "lab/node-9"), "{events:?}");

    // The fleet shows it: over the admin API, and through the gateway with `hybroker agents get`.
    let info = admin.get_agent(proto::GetAgentRequest { agent_id: "lab/node-9".into() }).await.unwrap().into_inner();
    assert_eq!((info.inventory.unwrap().isolation.as_str(), info.dedicated_tenant.as_str()), ("none", "acme"));
    let gateway = cluster.start_gateway();
    let key = cluster.tenant_key("ops");
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("HYBROKER_GATEWAY", &gateway.url)
            .env("HYBROKER_TOKEN", &key)
            .output()
            .unwrap()
    };
    let out = run(&["agents", "get", "lab/node-9"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("isolation: none\n") && text.contains("tenants:   acme only (dedicated)\n"), "{text}");
    let out = run(&["agents", "get", "lab/node-a", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["isolation"], "sandbox", "{json}");
    assert!(json.get("dedicated_tenant").is_none(), "{json}");
    let out = run(&["agents", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with("lab/node-9 ")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.ends_with("none       acme"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_private_and_a_world_readable_one_is_narrowed_at_start() {
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let mut admin = cluster.admin().await;
    submit(&mut admin, "name: stored\ncommand: [\"true\"]\n").await;
    let files = ["broker.db", "broker.db-wal", "broker.db-shm"].map(|f| cluster.path(f));
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&cluster.path("pki/broker-key.pem")), 0o600);

    // An older broker left them world-readable: the next start narrows them and says so.
    cluster.kill_broker();
    for file in files.iter().filter(|f| f.exists()) {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(cluster.path("pki/broker-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    cluster.start_broker(0);
    let mut admin = cluster.admin().await;
    submit(&mut admin, "name: stored-again\ncommand: [\"true\"]\n").await;
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&cluster.path("pki/broker-key.pem")), 0o600);
    let log = cluster.broker_log();
    let db = cluster.path("broker.db").display().to_string();
    let narrowed = log.lines().find(|l| l.contains("narrowed its mode") && l.contains(&db) && l.contains("0644"));
    assert!(narrowed.is_some_and(|l| l.contains("WARN")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sites_a_dedicated_nodes_room_counts_only_for_its_tenant() {
    let snapshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let extra = format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"eu\"\naws = [\"eu-west-1\"]\nazure = [\"westeurope\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"eu\"\ngpu_hour_usd = 1.5\n\
         [[tenant]]\nname = \"acme\"\n[[tenant]]\nname = \"globex\"\n\
         [[dedicated]]\nagent = \"lab/node-9\"\ntenant = \"acme\"\n",
        snapshot.display()
    );
    let cluster =
        Cluster::start_with(Duration::from_secs(5), &[], |_| Setup { broker_extra: Some(extra), ..Default::default() })
            .await;
    let mut node9 = RawAgent::register(&cluster, "node-9", inventory("none", 8), vec![]).await.expect("dedicated");
    node9.next("registered", |m| matches!(m, Out::Registered(_)).then_some(())).await;
    let job = "name: x\ncommand: [\"true\"]\nexpected_runtime: 1h\n";

    // The plan shows the lab's room to acme only.
    let mut admin = cluster.admin().await;
    let plan = |tenant: &str| proto::SubmitRequest {
        spec: job.as_bytes().to_vec(),
        format: proto::SpecFormat::Yaml.into(),
        idempotency_key: String::new(),
        tenant: tenant.into(),
    };
    let decision = |json: String| serde_json::from_str::<serde_json::Value>(&json).unwrap();
    let acme_plan = decision(admin.plan(plan("acme")).await.unwrap().into_inner().decision_json);
    let globex_plan = decision(admin.plan(plan("globex")).await.unwrap().into_inner().decision_json);
    assert_eq!(acme_plan["chosen"]["site"], "lab", "{acme_plan}");
    assert!(globex_plan["chosen"].is_null(), "the dedicated node's room is acme's alone: {globex_plan}");
    println!("globex's plan: {}", globex_plan["candidates"]);

    let other = submit_as(&cluster, "globex", job).await;
    let mine = submit_as(&cluster, "acme", job).await;
    let assigned = node9.next("acme's job", |m| if let Out::Assign(a) = m { Some(a.job_id) } else { None }).await;
    assert_eq!(assigned, mine, "the first assignment of the dedicated node is acme's job");
    let other = get(&mut admin, &other).await;
    assert!(other.agent.is_empty() && matches!(other.state.as_str(), "queued" | "placed"), "{other:?}");
}
