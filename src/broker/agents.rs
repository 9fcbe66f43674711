//! The agent service: one bidirectional stream per agent, and the core's record of each agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::core::{AttemptData, Cmd};
use super::data::DataPlane;
use super::staging;
use crate::model::agent::{AttemptReport, Inventory};
use crate::model::identity::Role;
use crate::placement::bind::FreeCapacity;
use crate::proto::{self, agent_message::Msg as In, broker_message::Msg as Out};
use crate::tls;

/// Messages queued to one agent before it counts as too slow and its stream is closed.
const OUTBOX: usize = 4096;
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

pub type Outbox = mpsc::Sender<Result<proto::BrokerMessage, Status>>;

/// One open stream to an agent.
pub struct Conn {
    pub id: u64,
    pub tx: Outbox,
}

/// Resources held by one attempt on an agent.
#[derive(Debug, Clone)]
pub struct Alloc {
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The core's view of one agent.
pub struct AgentEntry {
    pub id: String,
    pub site: String,
    pub node: String,
    pub inventory: Inventory,
    pub conn: Option<Conn>,
    pub last_seen: Instant,
    /// Resources held by attempts, keyed by (job id, epoch); change only through `allocate`/`release`.
    allocs: HashMap<(String, u64), Alloc>,
    /// Sums over `allocs`, kept so that dispatch needs no walk over them.
    used_cpus: u32,
    used_memory_mib: u64,
    held_gpus: Vec<u32>,
    /// Takes no new work; running attempts finish.
    pub draining: bool,
}

/// What the job service shows of an agent.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub id: String,
    pub site: String,
    pub node: String,
    pub inventory: Inventory,
    pub connected: bool,
    pub running_jobs: Vec<String>,
    pub last_seen_ms: i64,
    pub draining: bool,
}

impl AgentEntry {
    pub fn new(id: &str, site: &str, node: &str) -> Self {
        Self {
            id: id.to_string(),
            site: site.to_string(),
            node: node.to_string(),
            inventory: Inventory::default(),
            conn: None,
            last_seen: Instant::now(),
            allocs: HashMap::new(),
            used_cpus: 0,
            used_memory_mib: 0,
            held_gpus: Vec::new(),
            draining: false,
        }
    }

    pub fn conn_id(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.id)
    }

    /// Queues a message; an agent whose outbox is full or gone loses its stream (it reconnects and
    /// reconciles), so no message is silently dropped on a stream that stays open.
    pub fn send(&mut self, msg: Out) {
        let Some(conn) = &self.conn else { return };
        if conn.tx.try_send(Ok(proto::BrokerMessage { msg: Some(msg) })).is_err() {
            tracing::warn!(agent = self.id, "agent stream is full or closed; dropping it");
            self.conn = None;
        }
    }

    /// Books resources for an attempt (replacing what the same attempt held).
    pub fn allocate(&mut self, job_id: &str, epoch: u64, alloc: Alloc) {
        self.release(job_id, epoch);
        self.used_cpus += alloc.cpus;
        self.used_memory_mib += alloc.memory_mib;
        self.held_gpus.extend(&alloc.gpus);
        self.allocs.insert((job_id.to_string(), epoch), alloc);
    }

    /// Frees what the attempt held, if anything.
    pub fn release(&mut self, job_id: &str, epoch: u64) {
        if let Some(a) = self.allocs.remove(&(job_id.to_string(), epoch)) {
            self.used_cpus -= a.cpus;
            self.used_memory_mib -= a.memory_mib;
            for gpu in &a.gpus {
                if let Some(i) = self.held_gpus.iter().position(|g| g == gpu) {
                    self.held_gpus.swap_remove(i);
                }
            }
        }
    }

    /// Frees everything, returning what was held.
    pub fn take_allocs(&mut self) -> HashMap<(String, u64), Alloc> {
        (self.used_cpus, self.used_memory_mib) = (0, 0);
        self.held_gpus.clear();
        std::mem::take(&mut self.allocs)
    }

    /// The attempts holding resources here: (job id, epoch).
    pub fn attempts(&self) -> impl Iterator<Item = &(String, u64)> {
        self.allocs.keys()
    }

    /// Healthy GPUs, CPUs and memory not held by any attempt.
    pub fn free(&self) -> FreeCapacity {
        FreeCapacity {
            gpus: self
                .inventory
                .gpus
                .iter()
                .filter(|g| g.healthy && !self.held_gpus.contains(&g.index))
                .map(|g| (g.index, g.model.clone()))
                .collect(),
            cpus: self.inventory.cpus.saturating_sub(self.used_cpus),
            memory_mib: self.inventory.memory_mib.saturating_sub(self.used_memory_mib),
        }
    }

    pub fn view(&self) -> AgentView {
        let seen = SystemTime::now() - self.last_seen.elapsed();
        let mut running_jobs: Vec<String> = self.allocs.keys().map(|(job, _)| job.clone()).collect();
        running_jobs.sort();
        AgentView {
            id: self.id.clone(),
            site: self.site.clone(),
            node: self.node.clone(),
            inventory: self.inventory.clone(),
            connected: self.conn.is_some(),
            running_jobs,
            last_seen_ms: seen.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
            draining: self.draining,
        }
    }
}

/// The gRPC agent service.
pub struct AgentService {
    core: mpsc::Sender<Cmd>,
    next_conn: Arc<AtomicU64>,
    data: Arc<DataPlane>,
}

impl AgentService {
    pub fn new(core: mpsc::Sender<Cmd>, data: Arc<DataPlane>) -> Self {
        Self { core, next_conn: Arc::new(AtomicU64::new(1)), data }
    }

    /// The calling agent's id, and the data of the attempt it names.
    async fn attempt<T>(&self, req: &Request<T>, job_id: &str, epoch: u64) -> Result<AttemptData, Status> {
        let who = tls::require_role(req, &[Role::Agent])?;
        staging::attempt_data(&self.core, &who.agent_id(), job_id, epoch).await
    }
}

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for AgentService {
    type SessionStream = ReceiverStream<Result<proto::BrokerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = tls::require_role(&req, &[Role::Agent])?;
        let (site, node) = (who.site.clone().unwrap_or_default(), who.name.clone());
        let agent = who.agent_id();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10s"))??;
        let Some(proto::AgentMessage { msg: Some(In::Register(reg)) }) = first else {
            return Err(Status::invalid_argument("the first message of a session must be register"));
        };
        if reg.site != site || reg.node != node {
            return Err(Status::permission_denied(format!(
                "this certificate is for agent {site}/{node}; it may not register as {}/{}",
                reg.site, reg.node
            )));
        }
        let inventory = Inventory::from(reg.inventory.unwrap_or_default());
        let attempts = reg.attempts.into_iter().map(AttemptReport::try_from).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel(OUTBOX);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let connected =
            Cmd::Connected { agent: agent.clone(), site, node, inventory, attempts, conn: Conn { id: conn, tx } };
        self.core.send(connected).await.map_err(|_| Status::unavailable("broker is shutting down"))?;
        let core = self.core.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let Some(cmd) = command(&agent, conn, msg) else { continue };
                if core.send(cmd).await.is_err() {
                    return;
                }
            }
            let _ = core.send(Cmd::Disconnected { agent, conn }).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn input_urls(
        &self,
        req: Request<proto::InputUrlsRequest>,
    ) -> Result<Response<proto::InputUrlsResponse>, Status> {
        let attempt = self.attempt(&req, &req.get_ref().job_id, req.get_ref().epoch).await?;
        Ok(Response::new(staging::input_urls(&self.data, &attempt, req.into_inner()).await?))
    }

    async fn plan_outputs(
        &self,
        req: Request<proto::PlanOutputsRequest>,
    ) -> Result<Response<proto::PlanOutputsResponse>, Status> {
        let attempt = self.attempt(&req, &req.get_ref().job_id, req.get_ref().epoch).await?;
        let job_id = req.get_ref().job_id.clone();
        Ok(Response::new(staging::plan_outputs(&self.data, &job_id, &attempt, req.into_inner()).await?))
    }

    async fn part_urls(
        &self,
        req: Request<proto::PartUrlsRequest>,
    ) -> Result<Response<proto::PartUrlsResponse>, Status> {
        let attempt = self.attempt(&req, &req.get_ref().job_id, req.get_ref().epoch).await?;
        let job_id = req.get_ref().job_id.clone();
        Ok(Response::new(staging::part_urls(&self.data, &job_id, &attempt, req.into_inner()).await?))
    }

    async fn complete_outputs(
        &self,
        req: Request<proto::CompleteOutputsRequest>,
    ) -> Result<Response<proto::CompleteOutputsResponse>, Status> {
        let attempt = self.attempt(&req, &req.get_ref().job_id, req.get_ref().epoch).await?;
        let job_id = req.get_ref().job_id.clone();
        Ok(Response::new(staging::complete_outputs(&self.data, &job_id, &attempt, req.into_inner()).await?))
    }
}

/// Turns one stream message into a core command; invalid messages are logged and skipped.
fn command(agent: &str, conn: u64, msg: proto::AgentMessage) -> Option<Cmd> {
    let agent = agent.to_string();
    match msg.msg? {
        In::Register(_) => {
            tracing::warn!(agent, "ignored a second register on one stream");
            None
        }
        In::Heartbeat(hb) => Some(Cmd::Heartbeat { agent, conn, inventory: hb.inventory.map(Inventory::from) }),
        In::Update(update) => match AttemptReport::try_from(update) {
            Ok(report) => Some(Cmd::Report { agent, conn, report }),
            Err(e) => {
                tracing::warn!(agent, error = %e, "ignored an invalid attempt update");
                None
            }
        },
        In::Output(chunk) => {
            Some(Cmd::Output { agent, conn, job_id: chunk.job_id, epoch: chunk.epoch, data: chunk.data })
        }
        In::Progress(p) => {
            let text = progress_text(&p);
            Some(Cmd::Progress { agent, conn, job_id: p.job_id, epoch: p.epoch, text })
        }
    }
}

/// A job event's text for staging progress, like `stage-in 40% (400 MiB of 1000 MiB, 3/10 files)`.
fn progress_text(p: &proto::StagingProgress) -> String {
    let stage = if p.stage == "out" { "stage-out" } else { "stage-in" };
    let pct = (p.bytes_done.min(p.bytes_total) * 100).checked_div(p.bytes_total).unwrap_or(100);
    format!(
        "{stage} {pct}% ({} of {} MiB, {}/{} files)",
        p.bytes_done >> 20,
        p.bytes_total >> 20,
        p.files_done,
        p.files_total
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpu::{parse_simulated, simulated_gpus};

    #[test]
    fn unhealthy_and_allocated_gpus_are_not_free() {
        let mut entry = AgentEntry::new("lab/a", "lab", "a");
        let mut gpus = simulated_gpus(&parse_simulated("4xH100-80GB").unwrap(), 0, "a");
        gpus[1].healthy = false;
        entry.inventory =
            Inventory { gpus, cpus: 16, memory_mib: 65536, labels: Default::default(), ..Default::default() };
        entry.allocate("job-1", 1, Alloc { gpus: vec![2], cpus: 4, memory_mib: 1024 });
        let free = entry.free();
        assert_eq!(free.gpus.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 3]);
        assert_eq!((free.cpus, free.memory_mib), (12, 64512));
        entry.release("job-1", 1);
        assert_eq!(entry.free().gpus.len(), 3);
        assert_eq!(entry.free().cpus, 16);
    }
}
