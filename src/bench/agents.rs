//! Simulated agents: each one a task with its own certificate and its own TLS connection, dialing
//! from one of several loopback source addresses. It registers with a CPU-only inventory,
//! heartbeats as told, and reports every assignment at once as exited with code 0. Like the real
//! agent it keeps its final reports until the broker acknowledges them, and reports them again when
//! it reconnects (after a broker restart); on any failure it reconnects with jittered backoff.
//! With a renewal kit, each agent renews its certificate once on its live stream when the fleet is
//! told to ([`Fleet::renew`]): it sends its pre-made CSR, and on `Renewed` dials with the new
//! certificate from then on, as the real agent does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::record::{Event, Events};
use super::renew::{Csr, RenewKit, RenewRound};
use super::setup::{TRUST_DOMAIN, node_name};
use crate::model::identity::Role;
use crate::model::retry::RetryPolicy;
use crate::proto::agent_service_client::AgentServiceClient;
use crate::proto::{self, agent_message::Msg as Out, broker_message::Msg as In};
use crate::tls;

/// TLS handshakes in flight at once while the fleet first connects.
const SETUP_HANDSHAKES: usize = 256;
/// Connections per loopback source address (each address has about 28,000 ports).
const PER_SOURCE: usize = 1000;
/// Messages queued to the broker on one stream.
const OUTBOX: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What every agent shares.
struct Shared {
    url: String,
    inventory: proto::Inventory,
    events: Events,
    /// Held during each agent's first connection only.
    setup: Arc<Semaphore>,
    /// Bumped to make every agent drop its connection and reconnect at once.
    storm: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    /// Failed connects, handshakes and stream opens.
    failures: AtomicU64,
    /// Streams that broke after registering (not a storm, not asked to reconnect).
    dropped: AtomicU64,
    /// Set to make every agent with a CSR renew once.
    renew: watch::Receiver<Option<RenewRound>>,
    /// The trust bundle renewed certificates are loaded with.
    ca_pem: String,
}

/// The running fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    storm: watch::Sender<u64>,
    renew: watch::Sender<Option<RenewRound>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts one agent per TLS configuration (agent `i` is `<site_of(i)>/node-<i>`), each reporting
    /// `cpus` CPUs, against the broker at `url`; with `kit`, agent `i` renews with CSR `i`.
    pub fn spawn(
        url: String,
        configs: Vec<Arc<ClientConfig>>,
        site_of: &dyn Fn(usize) -> String,
        cpus: u32,
        events: Events,
        kit: RenewKit,
    ) -> Fleet {
        let (storm, storm_rx) = watch::channel(0);
        let (renew, renew_rx) = watch::channel(None);
        let mut csrs = kit.csrs.into_iter();
        let (stop, stop_rx) = watch::channel(false);
        let inventory = proto::Inventory {
            gpus: vec![],
            cpus,
            memory_mib: u64::from(cpus) * 4096,
            labels: Default::default(),
            isolation: "sandbox".into(),
        };
        let shared = Arc::new(Shared {
            url,
            inventory,
            events,
            setup: Arc::new(Semaphore::new(SETUP_HANDSHAKES)),
            storm: storm_rx,
            stop: stop_rx,
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            renew: renew_rx,
            ca_pem: kit.ca_pem,
        });
        let mut tasks = JoinSet::new();
        for (index, tls) in configs.into_iter().enumerate() {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (index / PER_SOURCE % 254) as u8));
            let renewal = csrs.next().map(|csr| Renewal { csr, due: None, sent: None, answered: false });
            let node = node_name(index);
            let agent = Agent { index, site: site_of(index), node, tls, source, pending: HashMap::new(), renewal };
            tasks.spawn(agent.run(shared.clone()));
        }
        Fleet { shared, storm, renew, stop, tasks }
    }

    /// Failed connects, handshakes and stream opens so far.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Streams that broke after registering so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Every agent drops its connection at once and reconnects.
    pub fn storm(&self) {
        self.storm.send_modify(|n| *n += 1);
    }

    /// Every agent with a CSR renews once, at a uniformly random point of `round`'s window.
    pub fn renew(&self, round: RenewRound) {
        self.renew.send_replace(Some(round));
    }

    /// Stops every agent and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// How a session ended.
enum End {
    Stop,
    Storm,
    /// The broker is going away: connect again after this pause.
    Reconnect(Duration),
    /// The connection failed or broke; whether it had registered.
    Broke {
        registered: bool,
    },
}

struct Agent {
    index: usize,
    site: String,
    node: String,
    tls: Arc<ClientConfig>,
    source: IpAddr,
    /// Final reports the broker has not acknowledged yet, by (job id, epoch).
    pending: HashMap<(String, u64), proto::AttemptUpdate>,
    renewal: Option<Renewal>,
}

/// An agent's one renewal.
struct Renewal {
    csr: Csr,
    /// When to send it (again, after a reconnect, while unanswered).
    due: Option<tokio::time::Instant>,
    /// When it was first sent.
    sent: Option<Instant>,
    answered: bool,
}

impl Agent {
    async fn run(mut self, shared: Arc<Shared>) {
        let mut storm = shared.storm.clone();
        let mut stop = shared.stop.clone();
        let mut renew = shared.renew.clone();
        let mut setup = Some(shared.setup.clone().acquire_owned().await.expect("never closed"));
        let policy = RetryPolicy::exponential(MIN_BACKOFF, MAX_BACKOFF).with_jitter(0.5);
        let mut failures = 0u32;
        loop {
            storm.borrow_and_update();
            let signals = Signals { storm: &mut storm, stop: &mut stop, renew: &mut renew };
            let end = self.session(&shared, signals, &mut setup).await;
            setup = None;
            match end {
                End::Stop => return,
                End::Storm => failures = 0,
                End::Reconnect(after) => {
                    failures = 1;
                    tokio::select! {
                        () = tokio::time::sleep(after) => {}
                        _ = stop.changed() => return,
                    }
                }
                End::Broke { registered } => {
                    if registered {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    failures = if registered { 1 } else { failures.saturating_add(1) };
                    let pause = policy.delay(failures, None, fastrand::f64());
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    /// One connection: register, then serve assignments until it ends.
    async fn session(
        &mut self,
        shared: &Shared,
        signals: Signals<'_>,
        setup: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> End {
        let Signals { storm, stop, renew } = signals;
        let index = self.index;
        // A renewal sent on a stream that broke before its answer is sent again on this one.
        if let Some(r) = &mut self.renewal
            && r.sent.is_some()
            && !r.answered
        {
            r.due = Some(tokio::time::Instant::now());
        }
        let failed = |why: String| {
            tracing::debug!(agent = index, "connecting failed: {why}");
            shared.failures.fetch_add(1, Ordering::Relaxed);
            End::Broke { registered: false }
        };
        let connect = tls::connect_from(&shared.url, self.tls.clone(), None, self.source);
        let channel = tokio::select! {
            connected = connect => match connected {
                Ok(channel) => channel,
                Err(e) => return failed(e.to_string()),
            },
            _ = stop.changed() => return End::Stop,
        };
        let (tx, rx) = mpsc::channel(OUTBOX);
        let register = proto::Register {
            site: self.site.clone(),
            node: self.node.clone(),
            inventory: Some(shared.inventory.clone()),
            attempts: self.pending.values().cloned().collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        tx.try_send(message(Out::Register(register))).expect("a new outbox has room");
        let mut inbound = match AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return failed(tls::explain_status(&status)),
        };
        let mut registered = false;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(3600));
        heartbeat.reset();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Ok(Some(proto::BrokerMessage { msg: Some(msg) })) = msg else {
                        if !registered {
                            return failed(format!("the stream ended before registering: {msg:?}"));
                        }
                        return End::Broke { registered };
                    };
                    if let In::Reconnect(r) = &msg {
                        return End::Reconnect(Duration::from_millis(u64::from(r.after_ms)));
                    }
                    if let In::Registered(r) = &msg {
                        registered = true;
                        *setup = None;
                        let every = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                        heartbeat = tokio::time::interval(every);
                        heartbeat.reset();
                    }
                    if let In::Renewed(answer) = msg {
                        self.renewed(answer, &shared.ca_pem, &shared.events);
                        continue;
                    }
                    if let Some(reply) = self.on_message(msg, &shared.events)
                        && tx.send(message(reply)).await.is_err()
                    {
                        return End::Broke { registered };
                    }
                }
                _ = heartbeat.tick() => {
                    if tx.send(message(Out::Heartbeat(proto::Heartbeat { inventory: None }))).await.is_err() {
                        return End::Broke { registered };
                    }
                }
                changed = renew.changed(), if self.renewal.as_ref().is_some_and(|r| r.due.is_none() && r.sent.is_none()) => {
                    let round = if changed.is_ok() { *renew.borrow_and_update() } else { None };
                    if let (Some(round), Some(r)) = (round, &mut self.renewal) {
                        r.due = Some(round.start + round.window.mul_f64(fastrand::f64()));
                    }
                }
                () = until_due(self.renewal.as_ref().and_then(|r| r.due)), if registered && self.renewal.as_ref().is_some_and(|r| r.due.is_some()) => {
                    let r = self.renewal.as_mut().expect("checked by the guard");
                    r.due = None;
                    r.sent.get_or_insert_with(Instant::now);
                    let request = proto::RenewRequest { csr_der: r.csr.csr_der.clone() };
                    if tx.send(message(Out::Renew(request))).await.is_err() {
                        return End::Broke { registered };
                    }
                }
                _ = storm.changed() => return End::Storm,
                _ = stop.changed() => return End::Stop,
            }
        }
    }

    /// Takes the broker's answer to the renewal: on success the agent dials with the new
    /// certificate from now on.
    fn renewed(&mut self, answer: proto::Renewed, ca_pem: &str, events: &Events) {
        let Some(r) = self.renewal.as_mut().filter(|r| r.sent.is_some() && !r.answered) else {
            tracing::warn!(agent = self.index, "a renewal answer with no renewal in flight");
            return;
        };
        let at = Instant::now();
        r.answered = true;
        let error = if answer.error.is_empty() {
            let loaded = tls::client_config_from_pem(
                ca_pem.as_bytes(),
                answer.cert_chain_pem.as_bytes(),
                r.csr.key_pem.as_bytes(),
                TRUST_DOMAIN,
                Role::Broker,
            );
            match loaded {
                Ok(config) => {
                    self.tls = config;
                    None
                }
                Err(e) => Some(format!("the renewed certificate does not load: {e}")),
            }
        } else {
            Some(answer.error)
        };
        let sent = r.sent.expect("checked above");
        let _ = events.send(Event::Renewed { agent: self.index, sent, at, error });
    }

    /// Applies one broker message; returns the report to send back.
    fn on_message(&mut self, msg: In, events: &Events) -> Option<Out> {
        match msg {
            In::Registered(_) => {
                let _ = events.send(Event::Registered { agent: self.index });
                None
            }
            In::Assign(a) => {
                let _ = events.send(Event::Assigned { job: a.job_id.clone(), at: Instant::now() });
                let update = proto::AttemptUpdate {
                    job_id: a.job_id,
                    attempt: a.attempt,
                    epoch: a.epoch,
                    phase: proto::AttemptPhase::Exited as i32,
                    exit_code: Some(0),
                    reason: String::new(),
                    gpu_indices: a.gpu_indices,
                    staging: None,
                };
                self.pending.insert((update.job_id.clone(), update.epoch), update.clone());
                Some(Out::Update(update))
            }
            In::Ack(ack) => {
                self.pending.remove(&(ack.job_id.clone(), ack.epoch));
                let _ = events.send(Event::Acked { job: ack.job_id, at: Instant::now() });
                None
            }
            In::Stop(_) => None, // every attempt has already exited
            // Reconnect ends the session and Renewed is taken there (`session`).
            In::Reconnect(_) | In::Renewed(_) => None,
        }
    }
}

/// The fleet-wide signals a session listens to.
struct Signals<'a> {
    storm: &'a mut watch::Receiver<u64>,
    stop: &'a mut watch::Receiver<bool>,
    renew: &'a mut watch::Receiver<Option<RenewRound>>,
}

/// Resolves at `due` (never without one).
async fn until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn message(msg: Out) -> proto::AgentMessage {
    proto::AgentMessage { msg: Some(msg) }
}
