//! Generated protobuf and gRPC types, and their conversions to and from [`crate::model`] and
//! [`crate::store`] types. Generated types stop at the gRPC edges (README invariant 2).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("hybroker.v1");
}

pub use generated::*;

use std::time::{Duration, UNIX_EPOCH};

use crate::model::agent::{self, AttemptReport};
use crate::model::data;
use crate::model::gpu;
use crate::model::presigned::Presigned;
use crate::store;

impl From<Inventory> for agent::Inventory {
    fn from(p: Inventory) -> Self {
        Self {
            gpus: p.gpus.into_iter().map(gpu::Gpu::from).collect(),
            cpus: p.cpus,
            memory_mib: p.memory_mib,
            labels: p.labels.into_iter().collect(),
            isolation: agent::Isolation::parse(&p.isolation).unwrap_or(agent::Isolation::None),
        }
    }
}

impl From<agent::Inventory> for Inventory {
    fn from(m: agent::Inventory) -> Self {
        Self {
            gpus: m.gpus.into_iter().map(Gpu::from).collect(),
            cpus: m.cpus,
            memory_mib: m.memory_mib,
            labels: m.labels.into_iter().collect(),
            isolation: m.isolation.as_str().to_string(),
        }
    }
}

impl From<Gpu> for gpu::Gpu {
    fn from(p: Gpu) -> Self {
        Self {
            index: p.index,
            uuid: p.uuid,
            model: p.model,
            name: p.name,
            memory_mib: p.memory_mib,
            memory_used_mib: 0,
            healthy: p.healthy,
            simulated: p.simulated,
            utilization_pct: p.utilization_pct,
            temperature_c: p.temperature_c,
            power_mw: p.power_mw,
            ecc_errors: p.ecc_errors,
            mig_enabled: p.mig_enabled,
        }
    }
}

impl From<gpu::Gpu> for Gpu {
    fn from(m: gpu::Gpu) -> Self {
        Self {
            index: m.index,
            uuid: m.uuid,
            model: m.model,
            name: m.name,
            memory_mib: m.memory_mib,
            healthy: m.healthy,
            simulated: m.simulated,
            utilization_pct: m.utilization_pct,
            temperature_c: m.temperature_c,
            power_mw: m.power_mw,
            ecc_errors: m.ecc_errors,
            mig_enabled: m.mig_enabled,
        }
    }
}

impl TryFrom<AttemptUpdate> for AttemptReport {
    type Error = tonic::Status;

    fn try_from(u: AttemptUpdate) -> Result<Self, Self::Error> {
        let phase = match AttemptPhase::try_from(u.phase) {
            Ok(AttemptPhase::Running) => agent::Phase::Running,
            Ok(AttemptPhase::Exited) => agent::Phase::Exited,
            Ok(AttemptPhase::Failed) => agent::Phase::Failed,
            Ok(AttemptPhase::StagingFailed) => agent::Phase::StagingFailed,
            Ok(AttemptPhase::Preempted) => agent::Phase::Preempted,
            _ => return Err(tonic::Status::invalid_argument(format!("unknown attempt phase {}", u.phase))),
        };
        if phase == agent::Phase::Exited && u.exit_code.is_none() {
            return Err(tonic::Status::invalid_argument("an exited attempt needs an exit code"));
        }
        Ok(Self {
            job_id: u.job_id,
            attempt: u.attempt,
            epoch: u.epoch,
            phase,
            exit_code: u.exit_code,
            reason: u.reason,
            gpu_indices: u.gpu_indices,
            staging: u.staging.map(|s| data::StagingStats {
                in_bytes: s.in_bytes,
                in_files: s.in_files,
                in_ms: s.in_ms,
                out_bytes: s.out_bytes,
                out_files: s.out_files,
                out_ms: s.out_ms,
            }),
        })
    }
}

impl From<AttemptReport> for AttemptUpdate {
    fn from(r: AttemptReport) -> Self {
        let phase = match r.phase {
            agent::Phase::Running => AttemptPhase::Running,
            agent::Phase::Exited => AttemptPhase::Exited,
            agent::Phase::Failed => AttemptPhase::Failed,
            agent::Phase::StagingFailed => AttemptPhase::StagingFailed,
            agent::Phase::Preempted => AttemptPhase::Preempted,
        };
        Self {
            job_id: r.job_id,
            attempt: r.attempt,
            epoch: r.epoch,
            phase: phase.into(),
            exit_code: r.exit_code,
            reason: r.reason,
            gpu_indices: r.gpu_indices,
            staging: r.staging.map(|s| StagingStats {
                in_bytes: s.in_bytes,
                in_files: s.in_files,
                in_ms: s.in_ms,
                out_bytes: s.out_bytes,
                out_files: s.out_files,
                out_ms: s.out_ms,
            }),
        }
    }
}

impl From<store::JobRecord> for Job {
    fn from(r: store::JobRecord) -> Self {
        let data = r.effective_data();
        let store::JobRecord { submission: j, status: s } = r;
        let labels = serde_json::from_str::<serde_json::Value>(&j.spec_json)
            .ok()
            .and_then(|spec| serde_json::from_value(spec.get("labels")?.clone()).ok())
            .unwrap_or_default();
        let outputs = match s.state {
            crate::model::state::JobState::Succeeded => {
                data.outputs.iter().map(|o| o.attempt_uri(&j.tenant, &j.id, s.attempts)).collect()
            }
            _ => Vec::new(),
        };
        Self {
            labels,
            placement_json: s.placement_json.as_deref().unwrap_or_default().to_string(),
            trace_id: crate::telemetry::context::trace_id_of_json(j.trace_context.as_deref()).unwrap_or_default(),
            input_objects: data.inputs.len() as u32,
            input_bytes: data.input_bytes(),
            outputs,
            id: j.id,
            tenant: j.tenant,
            name: j.name,
            state: s.state.to_string(),
            spec_json: j.spec_json,
            attempts: s.attempts,
            preemptions: s.preemptions,
            max_attempts: j.max_attempts,
            site: s.site.unwrap_or_default(),
            agent: s.agent.unwrap_or_default(),
            exit_code: s.exit_code,
            reason: s.reason,
            created_at_ms: j.created_at,
            updated_at_ms: s.updated_at,
        }
    }
}

impl From<store::JobEvent> for JobEvent {
    fn from(e: store::JobEvent) -> Self {
        Self {
            seq: e.seq,
            job_id: e.job_id,
            state: e.state.to_string(),
            attempt: e.attempt,
            agent: e.agent.unwrap_or_default(),
            reason: e.reason,
            exit_code: e.exit_code,
            at_ms: e.at,
        }
    }
}

impl From<Presigned> for PresignedRequest {
    fn from(p: Presigned) -> Self {
        Self {
            method: p.method,
            url: p.url,
            headers: p.headers.into_iter().collect(),
            expires_at_ms: p.expires_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }
    }
}

impl From<PresignedRequest> for Presigned {
    fn from(p: PresignedRequest) -> Self {
        Self {
            method: p.method,
            url: p.url,
            headers: p.headers.into_iter().collect(),
            expires_at: UNIX_EPOCH + Duration::from_millis(p.expires_at_ms),
        }
    }
}
