//! A placement decision as stored with a job and served as its explanation (a stable JSON
//! contract): every candidate with its verdict (an offer, or a [`Rejection`]) and the choice.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rejection::{Rejection, RejectionKind};
use crate::model::price::Market;

/// What a candidate would cost, in US dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CostBreakdown {
    pub compute_usd: f64,
    pub egress_usd: f64,
    pub storage_usd: f64,
    /// compute + egress + storage: the dollars the job is estimated to cost.
    pub total_usd: f64,
    /// The estimated wait × the job's `delay_usd_per_hour`: not paid, but what waiting is worth;
    /// candidates compare `total_usd + delay_usd`.
    #[serde(default)]
    pub delay_usd: f64,
    /// Compute $/hour (what `max_usd_per_hour` caps).
    pub usd_per_hour: f64,
    /// Estimated hours of compute.
    pub hours: f64,
}

/// A feasible candidate: what it would run on, when it could start, and its cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Offer {
    /// Cloud: the instance type; `None` on-prem.
    pub instance_type: Option<String>,
    /// Instances (always 1: single node).
    pub instances: u32,
    /// Cloud: on-demand or spot; `None` on-prem.
    pub market: Option<Market>,
    /// The GPU model priced (cloud: the type's; on-prem: the one whose price was used).
    pub gpu_model: Option<String>,
    /// Estimated wait before the job starts, seconds (0: now).
    pub wait_s: u64,
    /// Jobs waiting ahead of it at the site (when it waits).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ahead: u32,
    pub cost: CostBreakdown,
}

impl Offer {
    /// `wait ~35 min (4 jobs ahead)` when the job would wait; `None` when it starts now.
    pub fn wait_text(&self) -> Option<String> {
        if self.wait_s == 0 {
            return None;
        }
        let minutes = self.wait_s.div_ceil(60);
        let when =
            if minutes < 120 { format!("~{minutes} min") } else { format!("~{:.1} h", self.wait_s as f64 / 3600.0) };
        let ahead = match self.ahead {
            0 => String::new(),
            1 => " (1 job ahead)".to_owned(),
            n => format!(" ({n} jobs ahead)"),
        };
        Some(format!("wait {when}{ahead}"))
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A candidate's verdict. JSON: `"feasible": {…offer…}`, or `"rejected": "reason"` with the
/// rejection's `"kind"` (see [`super::rejection`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "VerdictJson")]
pub enum Verdict {
    /// It breaks no rule; what it would run on and cost.
    Feasible(Offer),
    /// The first rule it breaks, e.g. `price cap: $31.20/h > $20/h`.
    Rejected(Rejection),
}

/// One candidate: a site and where each output would go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    pub site: String,
    /// One location per job output, in the job's order.
    pub output_locations: Vec<String>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The chosen candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Chosen {
    pub site: String,
    pub output_locations: Vec<String>,
    #[serde(flatten)]
    pub offer: Offer,
}

/// A placement decision: stored with the job and served as its explanation (a stable JSON contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// `None` when every candidate was rejected.
    pub chosen: Option<Chosen>,
    /// Every candidate, by site name then output locations.
    pub candidates: Vec<Candidate>,
    /// The residency group enforced, if any (given by policy or derived from the inputs).
    pub residency: Option<String>,
    pub snapshot_id: String,
    /// How old the prices were at decision time.
    pub snapshot_age_ms: i64,
    /// Whether the prices were older than allowed.
    pub stale: bool,
}

/// A verdict's JSON fields, flattened into its candidate.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = Verdict)]
struct VerdictJson<O = Offer, R = String> {
    /// What the candidate would run on and cost (absent when rejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Offer>)]
    feasible: Option<O>,
    /// The first rule the candidate breaks, as people read it (absent when feasible).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    rejected: Option<R>,
    /// The rule's kind (with `rejected`).
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<RejectionKind>,
}

/// Described by [`VerdictJson`], the fields it writes.
impl utoipa::PartialSchema for Verdict {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <VerdictJson as utoipa::PartialSchema>::schema()
    }
}

impl ToSchema for Verdict {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <VerdictJson as ToSchema>::schemas(schemas);
    }
}

impl Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let json: VerdictJson<&Offer, &str> = match self {
            Verdict::Feasible(offer) => VerdictJson { feasible: Some(offer), rejected: None, kind: None },
            Verdict::Rejected(r) => VerdictJson { feasible: None, rejected: Some(r.as_str()), kind: Some(r.kind) },
        };
        json.serialize(serializer)
    }
}

impl TryFrom<VerdictJson> for Verdict {
    type Error = &'static str;

    fn try_from(v: VerdictJson) -> Result<Verdict, Self::Error> {
        match (v.feasible, v.rejected) {
            (Some(offer), None) => Ok(Verdict::Feasible(offer)),
            (None, Some(reason)) => {
                Ok(Verdict::Rejected(Rejection::new(v.kind.unwrap_or(RejectionKind::Other), reason)))
            }
            _ => Err("a candidate is either feasible or rejected"),
        }
    }
}
