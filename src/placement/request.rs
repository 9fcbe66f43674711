//! What placement is asked: one job's needs, data and effective policy as plain values
//! ([`PlacementJob`]), built from a spec and its resolved data with [`PlacementJob::from_spec`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::UnixMillis;
use crate::model::data::JobData;
use crate::model::job::{JobSpec, Policy, Spot, deadline_at};
use crate::model::price::Cloud;
use crate::placement::wait::Need;

/// The policy placement enforces: the tenant's, narrowed by the job's ([`PlacementPolicy::narrow`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementPolicy {
    /// The residency group compute (and outputs) must stay in. `None`: derived from the inputs'
    /// locations (all in one group: that group; mixed or no inputs: no constraint).
    pub residency: Option<String>,
    /// Clouds compute may use; `None` = any. On-prem sites are always allowed.
    pub clouds: Option<Vec<Cloud>>,
    /// Sites compute may use; `None` = any.
    pub sites: Option<Vec<String>>,
    /// Cap on the compute $/hour of a candidate.
    pub max_usd_per_hour: Option<f64>,
    /// Cap on a candidate's estimated total (compute + egress + storage).
    pub max_usd_total: Option<f64>,
    /// Whether spot capacity may be used (where the site allows it too).
    pub spot: Spot,
    /// Longest acceptable wait before the job starts; `None` with no deadline: any estimated wait.
    pub max_wait: Option<Duration>,
    /// When the job must be done (wait + estimated runtime), Unix milliseconds.
    pub deadline: Option<UnixMillis>,
    /// Owned hardware first: an on-prem site that can start the job now wins whatever the price.
    pub owned_first: bool,
    /// What an hour of waiting costs, in dollars (the job's, else the tenant's, else the broker's).
    #[serde(default)]
    pub delay_usd_per_hour: f64,
}

impl PlacementPolicy {
    /// The tenant's policy (`self`) narrowed by a job's: residency must agree, clouds are
    /// intersected, caps, `max_wait` and deadlines take the smaller, spot is `never` if either says
    /// so. A job's policy can never widen its tenant's.
    /// A `deadline` given as a duration counts from `submitted_at`.
    pub fn narrow(&self, job: &Policy, submitted_at: UnixMillis) -> Result<PlacementPolicy, String> {
        let mut out = self.clone();
        if let Some(r) = &job.residency {
            match &self.residency {
                Some(t) if t != r => {
                    return Err(format!("policy.residency: {r} is outside the tenant's residency {t}"));
                }
                _ => out.residency = Some(r.clone()),
            }
        }
        if !job.clouds.is_empty() {
            let allowed = |c: &Cloud| self.clouds.as_ref().is_none_or(|t| t.contains(c));
            let mut clouds: Vec<Cloud> = job.clouds.iter().copied().filter(allowed).collect();
            clouds.sort();
            clouds.dedup();
            out.clouds = Some(clouds);
        }
        out.max_usd_per_hour = min_opt(self.max_usd_per_hour, job.max_usd_per_hour);
        out.max_usd_total = min_opt(self.max_usd_total, job.max_usd_total);
        if job.spot == Some(Spot::Never) {
            out.spot = Spot::Never;
        }
        out.max_wait = match (self.max_wait, job.max_wait) {
            (Some(a), Some(b)) => Some(a.min(b.0)),
            (a, b) => a.or(b.map(|d| d.0)),
        };
        if let Some(text) = &job.deadline {
            let ms = deadline_at(text, submitted_at).map_err(|e| format!("policy.deadline: {e}"))?;
            out.deadline = Some(self.deadline.map_or(ms, |t| t.min(ms)));
        }
        if let Some(d) = job.delay_usd_per_hour {
            out.delay_usd_per_hour = d;
        }
        Ok(out)
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Input bytes stored in one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementInput {
    /// The storage location's name.
    pub location: String,
    pub bytes: u64,
}

/// Where an output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputDest {
    /// A fixed storage location (the output gave `to`).
    Location(String),
    /// Placement picks a location of this residency group (the output gave `residency`): among
    /// `among` when not empty (e.g. the locations the tenant may write to), else any in the group.
    /// Outputs with the same group and list go to the same location.
    Choose { residency: String, among: Vec<String> },
}

/// One output and its estimated size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementOutput {
    /// The output's path in the work directory (`out/`), for reasons.
    #[serde(default)]
    pub path: String,
    pub dest: OutputDest,
    /// Estimated bytes written (see [`PlacementJob::from_spec`] for the default estimate).
    pub bytes: u64,
}

/// One job as placement sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementJob {
    /// GPUs on one node (multi-node jobs are not supported).
    pub gpus: u32,
    /// Acceptable canonical GPU models; empty = any.
    pub gpu_models: Vec<String>,
    pub cpus: u32,
    pub memory_gib: u32,
    /// Estimated runtime: `expected_runtime`, else `max_runtime`.
    pub runtime: Duration,
    pub inputs: Vec<PlacementInput>,
    pub outputs: Vec<PlacementOutput>,
    pub policy: PlacementPolicy,
    /// The tenant's remaining monthly budget, when it has one.
    pub budget_left_usd: Option<f64>,
    /// Placed again while waiting at a site: its own estimate there (the site's replay counts the
    /// job itself among those waiting, so it cannot be asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_at: Option<WaitingAt>,
}

/// Where a job already waits, and its estimate there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingAt {
    pub site: String,
    /// Its estimated start from now; `None`: no estimate.
    pub wait: Option<Duration>,
    /// Jobs ahead of it in the site's queue.
    pub ahead: u32,
}

impl PlacementJob {
    /// Builds the placement view of a validated spec and its resolved data. Inputs are summed per
    /// location. Outputs are `data.outputs` in the spec's order (a fixed location, or a residency
    /// group placement chooses in); without resolved outputs, the spec's outputs that give
    /// `residency`. An output's size is its `size_hint`; an output without one (and the
    /// checkpoint) gets the estimate: the job's input bytes divided evenly among its outputs (as
    /// much out as in; 0 without inputs).
    pub fn from_spec(
        spec: &JobSpec,
        data: &JobData,
        policy: PlacementPolicy,
        budget_left_usd: Option<f64>,
    ) -> PlacementJob {
        let mut per_location: BTreeMap<&str, u64> = BTreeMap::new();
        for input in &data.inputs {
            *per_location.entry(input.location.as_str()).or_default() += input.size;
        }
        let inputs = per_location
            .into_iter()
            .map(|(location, bytes)| PlacementInput { location: location.into(), bytes })
            .collect();
        // The spec's size hint of a resolved output (resolved outputs keep the spec's order).
        let hint = |i: usize, path: &str| {
            spec.outputs.get(i).filter(|o| o.path == path).and_then(|o| o.size_hint).map(|h| h.0)
        };
        let mut dests: Vec<(String, OutputDest, Option<u64>)> = data
            .outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let dest = match &o.residency {
                    Some(residency) if o.location.is_empty() => OutputDest::Choose {
                        residency: residency.clone(),
                        among: o.choices.iter().map(|c| c.location.clone()).collect(),
                    },
                    _ => OutputDest::Location(o.location.clone()),
                };
                (o.path.clone(), dest, hint(i, &o.path))
            })
            .collect();
        // A checkpoint with its own location is held to the same rules as an output there (one
        // that follows the first output's choice is settled with it).
        if let Some(c) = data.checkpoint.as_ref().filter(|c| c.residency.is_none()) {
            dests.push((c.path.clone(), OutputDest::Location(c.location.clone()), None));
        }
        // Outputs not resolved against storage (a dry run without data): placement still chooses.
        if data.outputs.is_empty() {
            for output in &spec.outputs {
                if let (None, Some(residency)) = (&output.to, &output.residency) {
                    let dest = OutputDest::Choose { residency: residency.clone(), among: Vec::new() };
                    dests.push((output.path.clone(), dest, output.size_hint.map(|h| h.0)));
                }
            }
        }
        let each = if dests.is_empty() { 0 } else { data.input_bytes() / dests.len() as u64 };
        let outputs = dests
            .into_iter()
            .map(|(path, dest, hint)| PlacementOutput { path, dest, bytes: hint.unwrap_or(each) })
            .collect();
        let r = &spec.resources;
        PlacementJob {
            gpus: r.gpus,
            gpu_models: r.gpu_model.clone(),
            cpus: r.cpus,
            memory_gib: r.memory_gib,
            runtime: spec.estimated_runtime(),
            inputs,
            outputs,
            policy,
            budget_left_usd,
            waiting_at: None,
        }
    }

    /// What the job needs, for queue-wait estimates.
    pub fn need(&self) -> Need {
        Need {
            gpus: self.gpus,
            gpu_models: self.gpu_models.clone(),
            cpus: self.cpus,
            memory_mib: u64::from(self.memory_gib) * 1024,
            runtime: self.runtime,
        }
    }

    /// Estimated hours of compute.
    pub fn hours(&self) -> f64 {
        self.runtime.as_secs_f64() / 3600.0
    }

    /// Whether `model` is acceptable to the job.
    pub fn accepts(&self, model: &str) -> bool {
        self.gpu_models.is_empty() || self.gpu_models.iter().any(|m| m == model)
    }
}
