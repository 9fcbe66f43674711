//! The job service, for the gateway and admins: submit, get, list, cancel, watch, logs, agents.

use std::collections::HashMap;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::core::{AgentView, Cmd, Submit};
use super::data::DataPlane;
use super::keys::{KeyRing, sha256_hex};
use super::placer::Prices;
use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::model::data::JobData;
use crate::model::identity::{Identity, Role, validate_name};
use crate::model::job::JobSpec;
use crate::model::state::JobState;
use crate::proto;
use crate::store::{JobEvent, JobFilter, JobRecord, Reader};
use crate::tls;

const CALLERS: &[Role] = &[Role::Gateway, Role::Admin];
const DEFAULT_TENANT: &str = "default";
const MAX_LIST: u32 = 1000;
/// Most jobs in one SubmitBatch call.
const MAX_BATCH: usize = 10_000;

type SubmitReply = Result<(String, bool), ApiError>;

fn unavailable() -> Status {
    Status::unavailable("the broker's core is not running")
}

/// What the job service shares with the rest of the broker.
pub struct JobServiceParts {
    pub max_spec_bytes: usize,
    pub tenants: Arc<HashMap<String, TenantConfig>>,
    pub keys: Arc<KeyRing>,
    pub data: Arc<DataPlane>,
    /// The current prices, the age past which they are stale, and the sites (for `Prices`).
    pub prices: (Prices, std::time::Duration, Arc<Vec<crate::model::site::Site>>),
    /// Turns true when the broker stops: watch streams end (UNAVAILABLE) so their callers hang up.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub struct JobService {
    core: mpsc::Sender<Cmd>,
    reader: Reader,
    events: broadcast::Sender<JobEvent>,
    max_spec_bytes: usize,
    tenants: Arc<HashMap<String, TenantConfig>>,
    keys: Arc<KeyRing>,
    data: Arc<DataPlane>,
    /// The current prices and the age past which they count as stale.
    prices: (Prices, std::time::Duration, Arc<Vec<crate::model::site::Site>>),
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl JobService {
    /// Validates one submit, resolves its job data (listing inputs for their sizes) and hands it to
    /// the core with the call's trace context; the receiver yields the core's answer.
    async fn submit_one(
        &self,
        who: &Identity,
        req: proto::SubmitRequest,
        trace: (Option<String>, opentelemetry::Context),
    ) -> Result<oneshot::Receiver<SubmitReply>, Status> {
        let (tenant, spec, data) = self.parse_and_resolve(who, &req).await?;
        let key = match req.idempotency_key.as_str() {
            "" => None,
            k if k.len() <= 128 && k.chars().all(|c| c.is_ascii_graphic()) => Some(k.to_string()),
            _ => return Err(Status::invalid_argument("idempotency_key: at most 128 printable ASCII characters")),
        };
        let request_sha256 = request_hash(req.format, &req.spec, &spec);
        let (reply, rx) = oneshot::channel();
        let (trace_context, trace_parent) = trace;
        let cmd = Cmd::Submit(Submit {
            tenant,
            spec,
            idempotency_key: key,
            request_sha256,
            data,
            trace_context,
            trace_parent,
            reply,
        });
        // A full queue is backpressure: the caller retries; never block a gRPC worker here forever.
        self.core.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted("the broker is busy; retry shortly"),
            mpsc::error::TrySendError::Closed(_) => unavailable(),
        })?;
        Ok(rx)
    }

    /// The tenant, the validated spec and its resolved data (inputs listed for their sizes).
    async fn parse_and_resolve(
        &self,
        who: &Identity,
        req: &proto::SubmitRequest,
    ) -> Result<(String, Arc<JobSpec>, Option<Arc<JobData>>), Status> {
        let tenant = tenant_of(who, &req.tenant)?;
        let tenant = if tenant.is_empty() { DEFAULT_TENANT.to_string() } else { tenant };
        let Some(tenant_config) = self.tenants.get(&tenant) else {
            return Err(Status::permission_denied(format!("tenant {tenant} is not declared in the broker config")));
        };
        let spec = match proto::SpecFormat::try_from(req.format) {
            Ok(proto::SpecFormat::Json) => JobSpec::from_json(&req.spec, self.max_spec_bytes),
            // YAML is a superset of JSON: an unspecified format is read as YAML.
            Ok(proto::SpecFormat::Yaml | proto::SpecFormat::Unspecified) => {
                JobSpec::from_yaml(&req.spec, self.max_spec_bytes)
            }
            Err(_) => return Err(Status::invalid_argument(format!("format: unknown spec format {}", req.format))),
        }
        .map_err(ApiError::from)?;
        let data = if spec.inputs.is_empty() && spec.outputs.is_empty() && spec.checkpoint.is_none() {
            None
        } else {
            Some(Arc::new(self.data.resolve(tenant_config, &spec).await?))
        };
        Ok((tenant, Arc::new(spec), data))
    }

    pub fn new(
        core: mpsc::Sender<Cmd>,
        reader: Reader,
        events: broadcast::Sender<JobEvent>,
        parts: JobServiceParts,
    ) -> Self {
        let JobServiceParts { max_spec_bytes, tenants, keys, data, prices, stopping } = parts;
        Self { core, reader, events, max_spec_bytes, tenants, keys, data, prices, stopping }
    }

    async fn agent_view(&self, agent_id: String) -> Result<AgentView, Status> {
        let views: Vec<AgentView> = self.ask(|reply| Cmd::Agents { reply }).await?;
        views
            .into_iter()
            .find(|v| v.id == agent_id)
            .ok_or_else(|| Status::not_found(format!("agent {agent_id} not found")))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || Status::unavailable("the broker's core is not running");
        self.core.send(make(tx)).await.map_err(|_| unavailable())?;
        rx.await.map_err(|_| unavailable())
    }

    /// The job, if it exists and the caller may see it; another tenant's job is "not found".
    async fn visible_job(&self, id: &str, tenant: &str) -> Result<JobRecord, Status> {
        match self.reader.job(id).await.map_err(ApiError::from)? {
            Some(job) if tenant.is_empty() || job.submission.tenant == tenant => Ok(job),
            _ => Err(ApiError::job_not_found(id).into()),
        }
    }
}

/// What an `Idempotency-Key` is checked against: SHA-256 of the submitted document, or for a spec
/// with `secret_env` of its canonical JSON, which has the secret names and not their values (a
/// stored hash must not let anyone test guesses of a secret). A retry with the same key and the same
/// secrets matches; so does one that changes only secret values (it gets the first job).
fn request_hash(format: i32, doc: &[u8], spec: &JobSpec) -> String {
    if spec.secret_env.is_empty() {
        sha256_hex(&[&[format as u8][..], doc].concat())
    } else {
        sha256_hex(&[&b"spec without secret values\0"[..], spec.to_json().as_bytes()].concat())
    }
}

/// Gateways must say which tenant they act for; admins act for all tenants unless they name one.
fn tenant_of(who: &Identity, tenant: &str) -> Result<String, Status> {
    if tenant.is_empty() && who.role == Role::Gateway {
        return Err(Status::invalid_argument("tenant: required when calling as a gateway"));
    }
    if !tenant.is_empty() {
        validate_name("tenant", tenant).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(tenant.to_string())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::job_service_server::JobService for JobService {
    async fn plan(&self, req: Request<proto::SubmitRequest>) -> Result<Response<proto::PlanResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let (tenant, spec, data) = self.parse_and_resolve(&who, req.get_ref()).await?;
        let decision = self.ask(|reply| Cmd::Plan { tenant, spec, data, reply }).await??;
        let decision_json = serde_json::to_string(&decision).expect("decisions serialise");
        Ok(Response::new(proto::PlanResponse { decision_json }))
    }

    async fn prices(&self, req: Request<proto::PricesRequest>) -> Result<Response<proto::PricesResponse>, Status> {
        tls::require_role(&req, CALLERS)?;
        let snapshot = self.prices.0.borrow().clone();
        let now_ms = super::core::now_ms();
        let stale = now_ms.saturating_sub(snapshot.fetched_at) > self.prices.1.as_millis() as i64;
        let snapshot_json = serde_json::to_string(&*snapshot).expect("snapshots serialise");
        let sites_json = serde_json::to_string(&*self.prices.2).expect("sites serialise");
        Ok(Response::new(proto::PricesResponse { snapshot_json, stale, now_ms, sites_json }))
    }

    async fn submit(&self, req: Request<proto::SubmitRequest>) -> Result<Response<proto::SubmitResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let trace = crate::telemetry::context::current_for_job();
        let reply = self.submit_one(&who, req.into_inner(), trace).await?;
        let (job_id, duplicate) = reply.await.map_err(|_| unavailable())??;
        Ok(Response::new(proto::SubmitResponse { job_id, duplicate }))
    }

    async fn submit_batch(
        &self,
        req: Request<proto::SubmitBatchRequest>,
    ) -> Result<Response<proto::SubmitBatchResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let jobs = req.into_inner().jobs;
        if jobs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!("jobs: at most {MAX_BATCH} per batch")));
        }
        // All are handed to the core before any reply is awaited, so they share commits.
        let mut replies = Vec::with_capacity(jobs.len());
        let trace = crate::telemetry::context::current_for_job();
        for job in jobs {
            replies.push(self.submit_one(&who, job, trace.clone()).await);
        }
        let mut results = Vec::with_capacity(replies.len());
        for reply in replies {
            let result = match reply {
                Ok(rx) => match rx.await.map_err(|_| unavailable())? {
                    Ok((job_id, duplicate)) => {
                        proto::submit_result::Result::Ok(proto::SubmitResponse { job_id, duplicate })
                    }
                    Err(e) => proto::submit_result::Result::Error(e.to_string()),
                },
                Err(status) => proto::submit_result::Result::Error(status.message().to_string()),
            };
            results.push(proto::SubmitResult { result: Some(result) });
        }
        Ok(Response::new(proto::SubmitBatchResponse { results }))
    }

    async fn get(&self, req: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = tenant_of(&who, &req.tenant)?;
        Ok(Response::new(self.visible_job(&req.job_id, &tenant).await?.into()))
    }

    async fn list(&self, req: Request<proto::ListJobsRequest>) -> Result<Response<proto::ListJobsResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = tenant_of(&who, &req.tenant)?;
        let states = req
            .states
            .iter()
            .map(|s| JobState::from_str(s).map_err(|e| Status::invalid_argument(format!("states: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let labels = req
            .labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(Status::invalid_argument(format!("labels: {l:?} is not key=value"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let limit = if req.limit == 0 { 100 } else { req.limit.min(MAX_LIST) };
        let filter = JobFilter {
            tenant: (!tenant.is_empty()).then_some(tenant),
            states,
            labels,
            before: (!req.before.is_empty()).then_some(req.before),
            limit: limit + 1,
        };
        let mut jobs = self.reader.jobs(&filter).await.map_err(ApiError::from)?;
        let next_cursor = if jobs.len() > limit as usize {
            jobs.truncate(limit as usize);
            jobs.last().map(|j| j.submission.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListJobsResponse { jobs: jobs.into_iter().map(Into::into).collect(), next_cursor }))
    }

    async fn cancel(&self, req: Request<proto::CancelJobRequest>) -> Result<Response<proto::Job>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = tenant_of(&who, &req.tenant)?;
        let job = self.visible_job(&req.job_id, &tenant).await?;
        if job.status.state.is_terminal() {
            let (id, state) = (&job.submission.id, job.status.state);
            return Err(ApiError::FailedPrecondition(format!("job {id} is already {state}")).into());
        }
        let (job_id, reason) = (req.job_id.clone(), req.reason);
        let tenant = (!tenant.is_empty()).then_some(tenant);
        self.ask(|reply| Cmd::Cancel { job_id, tenant, reason, reply }).await??;
        Ok(Response::new(self.visible_job(&req.job_id, "").await?.into()))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<proto::WatchJobRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = tenant_of(&who, &req.tenant)?;
        // A job already finished has all its events in the store: send those after `after_seq` and end.
        let finished = self.visible_job(&req.job_id, &tenant).await?.status.state.is_terminal();
        // Subscribe before reading history, so no event falls between the two.
        let mut live = self.events.subscribe();
        let reader = self.reader.clone();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = req.after_seq;
            let mut backlog = true;
            loop {
                if backlog {
                    let Ok(history) = reader.events(&req.job_id, last).await else { return };
                    for ev in history {
                        last = ev.seq;
                        let done = ev.state.is_terminal();
                        if tx.send(Ok(ev.into())).await.is_err() || done {
                            return;
                        }
                    }
                    if finished {
                        return;
                    }
                    backlog = false;
                }
                // A watcher that went away must not keep a receiver of every event alive.
                let next = tokio::select! {
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|stop| *stop) => Err(broadcast::error::RecvError::Closed),
                    next = live.recv() => next,
                };
                match next {
                    Ok(ev) if ev.job_id == req.job_id && ev.seq > last => {
                        last = ev.seq;
                        let done = ev.state.is_terminal();
                        if tx.send(Ok(ev.into())).await.is_err() || done {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => backlog = true,
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("the broker is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn logs(&self, req: Request<proto::LogsRequest>) -> Result<Response<proto::LogsResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = tenant_of(&who, &req.tenant)?;
        let job = self.visible_job(&req.job_id, &tenant).await?;
        let job_id = req.job_id.clone();
        let live = self.ask(|reply| Cmd::Logs { job_id, reply }).await?;
        let live = live.filter(|l| req.attempt == 0 || l.attempt == req.attempt);
        let out = match live {
            Some(l) => Some(l),
            None => self.reader.attempt_output(&req.job_id, req.attempt).await.map_err(ApiError::from)?,
        };
        let done = job.status.state.is_terminal();
        let Some(out) = out else {
            if req.attempt != 0 {
                return Err(Status::not_found(format!("job {} has no attempt {}", req.job_id, req.attempt)));
            }
            return Ok(Response::new(proto::LogsResponse { done, ..Default::default() }));
        };
        // The tail holds the last `output.len()` bytes of `total`; serve what lies after `offset`.
        let total = out.total.max(out.output.len() as u64);
        let start = total - out.output.len() as u64;
        let (output, truncated) = if req.offset >= total {
            (Vec::new(), false)
        } else if req.offset >= start {
            (out.output[(req.offset - start) as usize..].to_vec(), false)
        } else {
            (out.output, out.truncated || req.offset < start)
        };
        Ok(Response::new(proto::LogsResponse { attempt: out.attempt, output, truncated, next_offset: total, done }))
    }

    async fn list_agents(
        &self,
        req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        tls::require_role(&req, CALLERS)?;
        let views: Vec<AgentView> = self.ask(|reply| Cmd::Agents { reply }).await?;
        let agents = views.into_iter().map(Into::into).collect();
        Ok(Response::new(proto::ListAgentsResponse { agents }))
    }

    async fn get_agent(&self, req: Request<proto::GetAgentRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        tls::require_role(&req, CALLERS)?;
        Ok(Response::new(self.agent_view(req.into_inner().agent_id).await?.into()))
    }

    async fn drain_agent(&self, req: Request<proto::DrainAgentRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        let (actor, agent) = drain_actor(req)?;
        let view = self.ask(|reply| Cmd::Drain { agent, actor, reply }).await??;
        Ok(Response::new(view.into()))
    }

    async fn undrain_agent(
        &self,
        req: Request<proto::DrainAgentRequest>,
    ) -> Result<Response<proto::AgentInfo>, Status> {
        let (actor, agent) = drain_actor(req)?;
        let view = self.ask(|reply| Cmd::Undrain { agent, actor, reply }).await??;
        Ok(Response::new(view.into()))
    }

    async fn authenticate(
        &self,
        req: Request<proto::AuthenticateRequest>,
    ) -> Result<Response<proto::TenantInfo>, Status> {
        tls::require_role(&req, &[Role::Gateway])?;
        let key = req.into_inner().key;
        let now = super::core::now_ms();
        let invalid = || Status::unauthenticated("invalid or revoked API key");
        let (key_id, tenant) = self.keys.verify(&key, now).ok_or_else(invalid)?;
        let Some(t) = self.tenants.get(&tenant) else {
            return Err(Status::unauthenticated(format!("tenant {tenant} is no longer declared in the broker config")));
        };
        Ok(Response::new(proto::TenantInfo {
            tenant,
            key_id,
            admin: t.admin,
            requests_per_second: t.requests_per_second,
            burst: t.burst,
        }))
    }
}

/// Who drains or undrains (the caller's identity, and the admin tenant a gateway acts for, as the
/// audit trail shows it) and which agent.
fn drain_actor(req: Request<proto::DrainAgentRequest>) -> Result<(String, String), Status> {
    let who = tls::require_role(&req, CALLERS)?;
    let req = req.into_inner();
    let actor = match (who.role, req.tenant.as_str()) {
        (Role::Gateway, tenant) if !tenant.is_empty() => format!("{} (tenant {tenant})", who.uri()),
        _ => who.uri(),
    };
    Ok((actor, req.agent_id))
}

impl From<AgentView> for proto::AgentInfo {
    fn from(v: AgentView) -> Self {
        Self {
            id: v.id,
            site: v.site,
            node: v.node,
            inventory: Some(v.inventory.into()),
            connected: v.connected,
            running_jobs: v.running_jobs,
            last_seen_ms: v.last_seen_ms,
            draining: v.draining,
            dedicated_tenant: v.dedicated.unwrap_or_default(),
            cert_not_after_ms: v.cert_not_after_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(yaml: &str) -> String {
        let spec = JobSpec::from_yaml(yaml.as_bytes(), 65536).unwrap();
        request_hash(proto::SpecFormat::Yaml as i32, yaml.as_bytes(), &spec)
    }

    #[test]
    fn the_idempotency_hash_leaves_secret_values_out_and_keeps_their_names() {
        let with = |name: &str, value: &str| format!("name: x\ncommand: [env]\nsecret_env: {{{name}: {value}}}\n");
        let stored = hash(&with("TOKEN", "guess-me-1"));
        // Whatever the value, the same hash: a stored hash cannot confirm a guess.
        assert_eq!(hash(&with("TOKEN", "guess-me-2")), stored);
        assert_ne!(hash(&with("OTHER", "guess-me-1")), stored, "names count");
        assert_ne!(hash("name: x\ncommand: [env]\nenv: {TOKEN: guess-me-1}\n"), stored);
        // Without secrets, the submitted document itself, as before.
        let plain = "name: x\ncommand: [env]\n";
        assert_eq!(hash(plain), sha256_hex(&[&[proto::SpecFormat::Yaml as u8][..], plain.as_bytes()].concat()));
    }
}
