//! Why a placement candidate is rejected: a [`RejectionKind`] that code matches on (the broker
//! refuses a job at submit when every site rejects it for the budget) and the text people read
//! (explanations, `hybroker jobs explain`, the API), e.g. `price cap: $31.20/h > $20/h`.
//!
//! JSON, inside a candidate: `"rejected": "<text>", "kind": "<kind>"`. A decision stored before
//! kinds were recorded has no `kind`, and one from a newer broker may carry a kind this version
//! does not know: both read as [`RejectionKind::Other`] with their text intact.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The rule a candidate breaks, in the order the engine checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionKind {
    /// An unknown storage location, or none in an output's residency group (whatever the site).
    Location,
    /// The site, or its cloud, is not in the policy's allow-lists.
    NotAllowed,
    /// The site, or one of the job's outputs, is outside the job's residency group.
    Residency,
    /// No node or instance type fits, no connected agent, or busy with no wait estimate.
    Capacity,
    /// A compute, egress or storage price is missing.
    NoPrice,
    /// Only a spot price, and the site or the policy refuses spot.
    Spot,
    /// The wait exceeds `max_wait`.
    MaxWait,
    /// Wait plus runtime end after the deadline.
    Deadline,
    /// The compute $/hour exceeds `max_usd_per_hour`.
    PriceCap,
    /// The estimated total exceeds `max_usd_total`.
    CostCap,
    /// The estimated total exceeds the tenant's monthly budget left.
    Budget,
    /// Not recorded (a decision stored by an older broker) or unknown to this version.
    #[serde(other)]
    Other,
}

/// A rejection: its kind and the reason as people read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    reason: String,
}

impl Rejection {
    pub fn new(kind: RejectionKind, reason: impl Into<String>) -> Rejection {
        Rejection { kind, reason: reason.into() }
    }

    /// The reason as people read it.
    pub fn as_str(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
