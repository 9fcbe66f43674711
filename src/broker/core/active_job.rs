//! One unfinished job as the core holds it: its submission (shared with the store's write), the
//! one copy of where it stands, and what is derived from it (its stored status, its assignment).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::messages::{AgentMessage, AssignedInput, Assignment, StopAttempt};
use super::{CoreSettings, Now};
use crate::broker::secrets::{SecretKeys, SecretsError};
use crate::broker::tail::Tail;
use crate::model::UnixMillis;
use crate::model::data::JobData;
use crate::model::job::JobSpec;
use crate::model::state::Lifecycle;
use crate::placement::engine::Decision;
use crate::store::{JobRecord, JobStatus, JobSubmission, StoreError};

/// One unfinished job.
pub(super) struct ActiveJob {
    /// As submitted; the store's `NewJob` shares it.
    pub sub: Arc<JobSubmission>,
    /// State, attempts and epoch: the one copy.
    pub life: Lifecycle,
    /// Where it is placed, and the agent of its current attempt.
    pub site: Option<String>,
    pub agent: Option<String>,
    pub exit_code: Option<i32>,
    /// The reason of its latest event.
    pub reason: String,
    pub updated_at: UnixMillis,
    pub spec: Arc<JobSpec>,
    pub data: Option<Arc<JobData>>,
    /// The lease's deadline as granted (or last found renewed by expiry); its agent's messages
    /// push it further: `Core::lease_deadline`.
    pub lease_deadline: Option<Instant>,
    pub tail: Tail,
    /// The placement decision the job is placed on (engine placement only), and as stored.
    pub decision: Option<Arc<Decision>>,
    pub placement_json: Option<Arc<str>>,
    /// When it was placed (to place it again when it waits too long) and when its attempt began.
    pub placed_at: Option<Instant>,
    pub attempt_started: Option<Instant>,
    /// Engine placement: not before this (a job no site can take is retried now and then).
    pub next_placement: Option<Instant>,
    /// Placed and waiting: when to look again whether another site has become clearly better.
    pub replan_at: Option<Instant>,
    /// The submission's trace context (`sub.trace_context`, parsed once): the parent of the job's
    /// placement and dispatch spans.
    pub trace: opentelemetry::Context,
    /// The current attempt's dispatch span: the parent of the attempt's end.
    pub dispatched: opentelemetry::Context,
    /// The broker told its agent to preempt its current attempt (not yet reported).
    pub preempting: bool,
}

impl ActiveJob {
    /// A job as the store holds it; an attempt in flight gets one lease period from `now`.
    pub fn restore(rec: JobRecord, settings: &CoreSettings, now: Now) -> Result<Self, StoreError> {
        let JobRecord { submission: sub, status } = rec;
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("job {}: {what}: {e}", sub.id));
        let spec = JobSpec::from_json_unlimited(sub.spec_json.as_bytes()).map_err(|e| corrupt("stored spec", &e))?;
        let data = match sub.data_json.as_deref().map(serde_json::from_str::<JobData>) {
            None => None,
            Some(Ok(data)) => Some(Arc::new(data)),
            Some(Err(e)) => return Err(corrupt("stored data", &e)),
        };
        let life = Lifecycle {
            state: status.state,
            attempts: status.attempts,
            max_attempts: sub.max_attempts,
            preemptions: status.preemptions,
            epoch: status.epoch,
        };
        let decision = status.placement_json.as_deref().and_then(|d| serde_json::from_str(d).ok()).map(Arc::new);
        Ok(ActiveJob {
            trace: crate::telemetry::context::from_json(sub.trace_context.as_deref()),
            sub: Arc::new(sub),
            lease_deadline: life.state.has_attempt().then_some(now.at + settings.lease_ttl),
            life,
            site: status.site,
            agent: status.agent,
            exit_code: status.exit_code,
            reason: status.reason,
            updated_at: status.updated_at,
            spec: Arc::new(spec),
            data,
            tail: Tail::new(settings.log_tail_bytes),
            decision,
            placement_json: status.placement_json,
            placed_at: None,
            attempt_started: None,
            next_placement: None,
            replan_at: None,
            dispatched: opentelemetry::Context::new(),
            preempting: false,
        })
    }

    pub fn tenant(&self) -> &str {
        &self.sub.tenant
    }

    /// Its key in the queue.
    pub fn queue_key(&self) -> (Reverse<u32>, String) {
        (Reverse(self.sub.priority), self.sub.id.clone())
    }

    /// Its status as the store writes it.
    pub fn status(&self) -> JobStatus {
        JobStatus {
            state: self.life.state,
            attempts: self.life.attempts,
            preemptions: self.life.preemptions,
            epoch: self.life.epoch,
            site: self.site.clone(),
            agent: self.agent.clone(),
            exit_code: self.exit_code,
            reason: self.reason.clone(),
            placement_json: self.placement_json.clone(),
            updated_at: self.updated_at,
        }
    }

    /// The job's data with the output locations its placement decision chose (for minting URLs).
    pub fn effective_data(&self) -> Arc<JobData> {
        let data = self.data.clone().unwrap_or_default();
        match self.decision.as_ref().and_then(|d| d.chosen.as_ref()) {
            Some(chosen) if !data.outputs_resolved() => Arc::new(data.with_chosen_outputs(&chosen.output_locations)),
            _ => data,
        }
    }

    /// What the agent needs to run the job's current attempt on the given GPUs. The job's secrets
    /// are opened here, and only here: they travel in the assignment's `env` (over mutual TLS).
    pub fn assignment(
        &self,
        gpus: &[u32],
        trace_context: HashMap<String, String>,
        secrets: &SecretKeys,
    ) -> Result<Assignment, SecretsError> {
        let mut env: HashMap<String, String> = self.spec.env.clone().into_iter().collect();
        if let Some(sealed) = &self.sub.secret_env_sealed {
            env.extend(secrets.open(&self.sub.id, sealed)?.into_iter().map(|(k, v)| (k, v.expose().to_string())));
        }
        let data = self.data.as_deref();
        Ok(Assignment {
            job_id: self.sub.id.clone(),
            attempt: self.life.attempts,
            epoch: self.life.epoch,
            command: self.spec.command.clone(),
            env,
            gpu_indices: gpus.to_vec(),
            max_runtime: self.spec.max_runtime(),
            inputs: data
                .iter()
                .flat_map(|d| &d.inputs)
                .map(|i| AssignedInput { path: i.path.clone(), size: i.size, md5: i.md5.clone() })
                .collect(),
            outputs: data.iter().flat_map(|d| &d.outputs).map(|o| o.path.clone()).collect(),
            trace_context,
            cpus: self.spec.resources.cpus,
            memory_gib: self.spec.resources.memory_gib,
            checkpoint_path: data.and_then(|d| d.checkpoint.as_ref()).map(|c| c.path.clone()),
        })
    }

    /// Stop its current attempt.
    pub fn stop(&self, reason: &str) -> AgentMessage {
        AgentMessage::Stop(StopAttempt {
            job_id: self.sub.id.clone(),
            attempt: self.life.attempts,
            epoch: self.life.epoch,
            reason: reason.to_string(),
            preempt: false,
        })
    }

    /// Preempt its current attempt: the agent stops it like a spot notice (checkpoint saved).
    pub fn preempt(&self, reason: &str) -> AgentMessage {
        AgentMessage::Stop(StopAttempt {
            job_id: self.sub.id.clone(),
            attempt: self.life.attempts,
            epoch: self.life.epoch,
            reason: reason.to_string(),
            preempt: true,
        })
    }
}
