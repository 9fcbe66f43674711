//! The core's live jobs: what each holds (its submission, shared with the store's write, and the
//! one copy of where it stands), submit, cancel, and the transitions that write a job's status.

use std::sync::Arc;

use super::active_job::ActiveJob;
use super::{Core, Effects, metrics, trace};
use crate::broker::tail::Tail;
use crate::error::ApiError;
use crate::model::data::{JobData, StagingStats};
use crate::model::job::JobSpec;
use crate::model::state::{Input, JobState, Lifecycle};
use crate::store::{AttemptEnd, JobEvent, JobSubmission, Write};

/// A submit as the core takes it.
pub(super) struct Submitted {
    pub tenant: String,
    pub spec: Arc<JobSpec>,
    pub key: Option<String>,
    pub request_sha256: String,
    pub data: Option<Arc<JobData>>,
    pub trace_context: Option<String>,
    pub trace_parent: opentelemetry::Context,
}

impl Core {
    /// A new job, or the one an earlier submit with the same idempotency key and document made.
    /// `out.keys` holds the batch's idempotency keys found in the store, and those of this batch.
    pub(super) fn submit(&mut self, submitted: Submitted, out: &mut Effects) -> Result<(String, bool), ApiError> {
        let Submitted { tenant, spec, key, request_sha256, data, trace_context, trace_parent } = submitted;
        if let Some(key) = &key
            && let Some((id, hash)) = out.keys.get(&(tenant.clone(), key.clone()))
        {
            if hash.as_ref().is_some_and(|h| *h != request_sha256) {
                return Err(ApiError::AlreadyExists(format!(
                    "Idempotency-Key {key:?} was already used for a different job spec (job {id})"
                )));
            }
            return Ok((id.clone(), true));
        }
        let cap = self.settings.tenants.get(&tenant).map_or(0, |t| t.max_queued_jobs);
        let unfinished = self.unfinished.get(&tenant).copied().unwrap_or(0);
        if unfinished >= cap {
            return Err(ApiError::ResourceExhausted(format!(
                "tenant {tenant} has {unfinished} unfinished jobs, its limit (max_queued_jobs {cap}); \
                 wait for some to finish"
            )));
        }
        self.admit(&tenant, &spec, data.as_deref())?;
        let now = self.now.ms;
        let id = uuid::Uuid::now_v7().to_string();
        // Sealed for this job id; from here on the job holds the names only.
        let (spec, secret_env_sealed) = if spec.secret_env.is_empty() {
            (spec, None)
        } else {
            let sealed =
                self.settings.secrets.seal(&id, &spec.secret_env).map_err(|e| ApiError::Internal(e.to_string()))?;
            (Arc::new(spec.without_secret_values()), Some(sealed))
        };
        if let Some(key) = &key {
            out.keys.insert((tenant.clone(), key.clone()), (id.clone(), Some(request_sha256.clone())));
        }
        *self.unfinished.entry(tenant.clone()).or_default() += 1;
        self.preemptible_jobs += usize::from(spec.preemptible);
        let sub = Arc::new(JobSubmission {
            id,
            tenant,
            name: spec.name.clone(),
            spec_json: spec.to_json(),
            priority: spec.priority,
            max_attempts: spec.max_attempts,
            idempotency_key: key,
            request_sha256: Some(request_sha256),
            data_json: data.as_ref().map(|d| serde_json::to_string(&**d).expect("job data serialises")),
            trace_context,
            secret_env_sealed,
            created_at: now,
        });
        let mut job = ActiveJob {
            life: Lifecycle::new(sub.max_attempts),
            sub,
            site: None,
            agent: None,
            exit_code: None,
            reason: String::new(),
            updated_at: now,
            spec,
            lease_deadline: None,
            tail: Tail::new(self.settings.log_tail_bytes),
            data,
            decision: None,
            placement_json: None,
            placed_at: None,
            attempt_started: None,
            next_placement: None,
            replan_at: None,
            trace: trace_parent,
            dispatched: opentelemetry::Context::new(),
            preempting: false,
        };
        let submitted = match &job.data {
            Some(d) if !d.inputs.is_empty() => {
                format!("submitted ({} input objects, {} bytes)", d.inputs.len(), d.input_bytes())
            }
            _ => "submitted".to_string(),
        };
        out.batch.push(Write::NewJob { job: job.sub.clone(), status: job.status() });
        self.event(&mut job, submitted, false, out);
        let id = job.sub.id.clone();
        self.queue.insert(job.queue_key());
        self.jobs.insert(id.clone(), job);
        Ok((id, false))
    }

    pub(super) fn cancel(
        &mut self,
        job_id: &str,
        tenant: Option<&str>,
        reason: String,
        out: &mut Effects,
    ) -> Result<(), ApiError> {
        let Some(mut job) = self.jobs.remove(job_id) else {
            return Err(ApiError::FailedPrecondition(format!(
                "job {job_id} is not active (already finished, or unknown)"
            )));
        };
        if tenant.is_some_and(|t| t != job.tenant()) {
            self.jobs.insert(job_id.to_string(), job);
            return Err(ApiError::job_not_found(job_id));
        }
        let had_attempt = job.life.state.has_attempt();
        job.life.apply(&Input::Cancel).expect("an active job can always be cancelled");
        self.queue.remove(&job.queue_key());
        let reason = if reason.is_empty() { "cancelled".to_string() } else { format!("cancelled: {reason}") };
        if had_attempt {
            let agent = job.agent.clone().unwrap_or_default();
            out.send(&agent, job.stop(&reason));
            self.end_attempt(&job, JobState::Cancelled, None, &reason, None, out);
        }
        self.transition(job, reason, None, out);
        Ok(())
    }

    /// Records the job's new state (its lifecycle already moved): status row and event. Terminal
    /// jobs leave the live state.
    pub(super) fn transition(&mut self, mut job: ActiveJob, reason: String, exit_code: Option<i32>, out: &mut Effects) {
        let state = job.life.state;
        job.exit_code = exit_code;
        job.updated_at = self.now.ms;
        self.event(&mut job, reason, true, out);
        if state.is_terminal() {
            metrics::finished(&job, state);
            if let Some(n) = self.unfinished.get_mut(job.tenant()) {
                *n = n.saturating_sub(1);
            }
            self.preemptible_jobs = self.preemptible_jobs.saturating_sub(usize::from(job.spec.preemptible));
            return;
        }
        if state == JobState::Queued {
            job.lease_deadline = None;
            self.queue.insert(job.queue_key());
        }
        self.jobs.insert(job.sub.id.clone(), job);
    }

    /// Appends the job's event; with `row`, also writes the job's status.
    pub(super) fn event(&mut self, job: &mut ActiveJob, reason: String, row: bool, out: &mut Effects) {
        let ev = JobEvent {
            seq: self.next_seq,
            job_id: job.sub.id.clone(),
            state: job.life.state,
            attempt: job.life.attempts,
            agent: job.agent.clone(),
            reason,
            exit_code: job.exit_code,
            at: job.updated_at,
        };
        job.reason.clone_from(&ev.reason);
        if row {
            out.batch.push(Write::UpdateJob { id: job.sub.id.clone(), status: job.status() });
        }
        self.next_seq += 1;
        out.batch.push(Write::Event(ev));
    }

    pub(super) fn end_attempt(
        &mut self,
        job: &ActiveJob,
        state: JobState,
        exit_code: Option<i32>,
        reason: &str,
        staging: Option<&StagingStats>,
        out: &mut Effects,
    ) {
        let cost_usd = self.accrue(job);
        self.accrue_usage(job);
        metrics::attempt_ended(job, cost_usd, staging);
        trace::attempt_ended(job, state, exit_code, reason, cost_usd);
        out.batch.push(Write::EndAttempt(AttemptEnd {
            job_id: job.sub.id.clone(),
            attempt: job.life.attempts,
            state,
            exit_code,
            reason: reason.to_string(),
            output: job.tail.bytes(),
            output_truncated: job.tail.truncated(),
            output_bytes: job.tail.total(),
            staging_json: staging.map(|s| serde_json::to_string(s).expect("stats serialise")),
            cost_usd,
            ended_at: self.now.ms,
        }));
    }
}

/// What an attempt's staging moved, for its final event.
pub(super) fn staged(s: &StagingStats) -> String {
    let size = |bytes: u64| match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    };
    format!(
        "staged in {} files ({}, {:.1} s), out {} files ({}, {:.1} s)",
        s.in_files,
        size(s.in_bytes),
        s.in_ms as f64 / 1000.0,
        s.out_files,
        size(s.out_bytes),
        s.out_ms as f64 / 1000.0
    )
}
