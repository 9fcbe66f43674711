//! The agent service: one bidirectional stream per agent. Messages become core commands here, and
//! the core's [`AgentMessage`]s become `proto` messages here: the core speaks no protobuf.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::core::{AgentMessage, Assignment, AttemptData, Cmd, Conn, StopAttempt};
use super::data::DataPlane;
use super::staging;
use crate::model::agent::{AttemptReport, Inventory, Isolation};
use crate::model::identity::Role;
use crate::proto::{self, agent_message::Msg as In, broker_message::Msg as Out};
use crate::tls;

/// Messages queued to one agent before it counts as too slow and its stream is closed.
const OUTBOX: usize = 4096;
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC agent service.
pub struct AgentService {
    core: mpsc::Sender<Cmd>,
    next_conn: Arc<AtomicU64>,
    data: Arc<DataPlane>,
    /// Agent id (`site/node`) → the tenant it is dedicated to (`[[dedicated]]`).
    dedicated: Arc<HashMap<String, String>>,
    /// Signs renewals on the stream (none: renewals are refused).
    renewal: Option<Arc<super::renew::Renewal>>,
    /// Where each agent's stream comes from (Prometheus service discovery).
    addresses: Option<Arc<super::scrape_targets::AgentAddresses>>,
}

impl AgentService {
    pub fn new(core: mpsc::Sender<Cmd>, data: Arc<DataPlane>, dedicated: Arc<HashMap<String, String>>) -> Self {
        Self { core, next_conn: Arc::new(AtomicU64::new(1)), data, dedicated, renewal: None, addresses: None }
    }

    /// Records where each agent's stream comes from in `addresses`.
    pub fn with_addresses(mut self, addresses: Arc<super::scrape_targets::AgentAddresses>) -> Self {
        self.addresses = Some(addresses);
        self
    }

    /// Renews agents' certificates on their streams with `ca`, for `lifetime`.
    pub fn with_renewal(
        mut self,
        ca: Arc<crate::pki::Ca>,
        bundle: std::path::PathBuf,
        lifetime: Duration,
        revoked: Arc<super::revocations::Revocations>,
    ) -> Self {
        self.renewal = Some(Arc::new(super::renew::Renewal::new(ca, bundle, lifetime, revoked)));
        self
    }

    /// The calling agent's id, and the data of the attempt it names.
    async fn attempt<T>(&self, req: &Request<T>, job_id: &str, epoch: u64) -> Result<AttemptData, Status> {
        let who = tls::require_role(req, &[Role::Agent])?;
        staging::attempt_data(&self.core, &who.agent_id(), job_id, epoch).await
    }
}

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for AgentService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<proto::BrokerMessage, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = tls::require_role(&req, &[Role::Agent])?;
        let (site, node) = (who.site.clone().unwrap_or_default(), who.name.clone());
        let agent = who.agent_id();
        let peer_cert = super::renew::peer_cert(&req);
        let peer_ip = req.remote_addr().map(|a| a.ip());
        let cert_expiry = peer_cert.as_ref().map(|c| c.not_after);
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
        let reported = reg.inventory.as_ref().map(|i| i.isolation.clone()).unwrap_or_default();
        let inventory = Inventory::from(reg.inventory.unwrap_or_default());
        if inventory.isolation == Isolation::None && crate::config::dedicated_to(&self.dedicated, &agent).is_none() {
            tracing::warn!(agent, isolation = reported, "refused an agent without isolation: it is not dedicated");
            let runs = if reported.is_empty() {
                "reports no isolation (an agent older than the field), so it counts as isolation \"none\"".to_string()
            } else {
                format!("runs without isolation (isolation {reported:?})")
            };
            return Err(Status::failed_precondition(format!(
                "agent {agent} {runs}: its jobs are not kept apart, so it may run one tenant's jobs only, and it is \
                 not dedicated to a tenant; dedicate it in the broker's config ([[dedicated]] agent = \"{agent}\", \
                 tenant = \"<tenant>\") or run the agent sandboxed"
            )));
        }
        let attempts = reg.attempts.into_iter().map(AttemptReport::try_from).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel(OUTBOX);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut stream = super::renew::StreamCert::new(who, peer_cert, self.renewal.clone(), tx.clone());
        let connected = Cmd::Connected {
            agent: agent.clone(),
            site,
            node,
            cert_not_after: cert_expiry.unwrap_or(0),
            inventory,
            attempts,
            conn: Conn { id: conn, outbox: tx },
        };
        self.core.send(connected).await.map_err(|_| Status::unavailable("broker is shutting down"))?;
        if let (Some(addresses), Some(ip)) = (&self.addresses, peer_ip) {
            addresses.record(&agent, ip);
        }
        let core = self.core.clone();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = inbound.message() => msg,
                    () = stream.expired() => {
                        tracing::warn!(agent, "agent certificate expired on a live stream without renewal; ending the stream");
                        let _ = end_tx.send(Status::unauthenticated("your certificate expired and was not renewed on this stream"));
                        break;
                    }
                };
                let Ok(Some(msg)) = msg else { break };
                if let Some(reason) = stream.revoked() {
                    tracing::warn!(agent, reason, "agent certificate revoked; ending the stream");
                    let _ = end_tx.send(Status::permission_denied(format!("certificate revoked: {reason}")));
                    break;
                }
                if let Some(In::Renew(renew)) = msg.msg {
                    // The core shows (and stores) the renewed certificate's expiry.
                    if let Some(not_after) = stream.renew(&renew.csr_der)
                        && core.send(Cmd::CertRenewed { agent: agent.clone(), conn, not_after }).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
                let Some(cmd) = command(&agent, conn, msg) else { continue };
                if core.send(cmd).await.is_err() {
                    return;
                }
            }
            let _ = core.send(Cmd::Disconnected { agent, conn }).await;
        });
        let outbound = ReceiverStream::new(rx).map(|msg| Ok(proto::BrokerMessage { msg: Some(msg.into()) }));
        Ok(Response::new(Box::pin(super::renew::EndWhenExpired::new(outbound, end_rx))))
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

    async fn checkpoint_urls(
        &self,
        req: Request<proto::CheckpointUrlsRequest>,
    ) -> Result<Response<proto::CheckpointUrlsResponse>, Status> {
        let attempt = self.attempt(&req, &req.get_ref().job_id, req.get_ref().epoch).await?;
        let job_id = req.get_ref().job_id.clone();
        Ok(Response::new(staging::checkpoint_urls(&self.data, &job_id, &attempt, req.into_inner()).await?))
    }
}

/// Turns one stream message into a core command; invalid messages are logged and skipped.
fn command(agent: &str, conn: u64, msg: proto::AgentMessage) -> Option<Cmd> {
    let agent = agent.to_string();
    match msg.msg? {
        In::Renew(_) => None, // answered by the stream (`renew`), never a core command
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

impl From<AgentMessage> for Out {
    fn from(msg: AgentMessage) -> Self {
        match msg {
            AgentMessage::Registered { agent_id, heartbeat_interval, lease_ttl } => {
                Out::Registered(proto::Registered {
                    agent_id,
                    heartbeat_interval_ms: heartbeat_interval.as_millis() as u32,
                    lease_ttl_ms: lease_ttl.as_millis() as u32,
                })
            }
            AgentMessage::Assign(a) => Out::Assign(a.into()),
            AgentMessage::Stop(StopAttempt { job_id, attempt, epoch, reason, preempt }) => {
                Out::Stop(proto::StopAttempt { job_id, attempt, epoch, reason, preempt })
            }
            AgentMessage::Ack { job_id, epoch } => Out::Ack(proto::Ack { job_id, epoch }),
            AgentMessage::Reconnect { after, reason } => Out::Reconnect(proto::Reconnect {
                after_ms: after.as_millis().min(u128::from(u32::MAX)) as u32,
                reason,
            }),
            AgentMessage::Renewed(r) => Out::Renewed(proto::Renewed {
                cert_chain_pem: r.cert_chain_pem,
                issued_at_ms: r.issued_at,
                not_after_ms: r.not_after,
                error: r.error,
                ca_bundle_pem: r.ca_bundle_pem,
            }),
        }
    }
}

impl From<Assignment> for proto::Assignment {
    fn from(a: Assignment) -> Self {
        Self {
            job_id: a.job_id,
            attempt: a.attempt,
            epoch: a.epoch,
            command: a.command,
            env: a.env,
            gpu_indices: a.gpu_indices,
            max_runtime_ms: a.max_runtime.as_millis() as u64,
            inputs: a
                .inputs
                .into_iter()
                .map(|i| proto::AssignedInput { path: i.path, size: i.size, md5: i.md5.unwrap_or_default() })
                .collect(),
            outputs: a.outputs,
            trace_context: a.trace_context,
            cpus: a.cpus,
            memory_gib: a.memory_gib,
            checkpoint_path: a.checkpoint_path.unwrap_or_default(),
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
