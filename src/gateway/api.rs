//! The tenants' HTTP API: the JSON shapes the gateway serves and the CLI reads. One definition for
//! both sides, and the source of the OpenAPI document's schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::model::job::JobSpec;
use crate::model::price::PriceSnapshot;
use crate::model::site::Site;
use crate::model::state::JobState;
pub use crate::placement::decision::Decision;

/// A job as tenants see it (no lease epochs or other internals).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub tenant: String,
    #[schema(value_type = JobState)]
    pub state: String,
    pub attempts: u32,
    pub max_attempts: u32,
    /// Attempts a spot interruption ended: counted in `attempts`, not toward `max_attempts`
    /// (left out while 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preemptions: u32,
    /// The site the job was placed at, once placed.
    pub site: Option<String>,
    /// The agent (`site/node`) of the current or last attempt.
    pub agent: Option<String>,
    pub exit_code: Option<i32>,
    /// Why the job is in its state (the last transition's reason).
    pub reason: String,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The job spec as submitted (canonical JSON of the docs/design.md §3 fields); `secret_env` values
    /// show as `"<redacted>"`: the API never returns them.
    #[schema(value_type = JobSpec)]
    pub spec: serde_json::Value,
    /// Input objects found at submit (listed or HEADed), and their total size in bytes.
    pub input_objects: u32,
    pub input_bytes: u64,
    /// Where the succeeded attempt wrote each output: one URI prefix per output, in spec order
    /// (`<to>/<tenant>/<job-id>/attempt-<n>/`); empty until the job succeeds.
    pub outputs: Vec<String>,
    /// The job's W3C trace id (32 hex digits): its submission, placement, dispatch and every
    /// attempt, for an operator's trace search (Grafana → *Job drill-down*, or Tempo); absent
    /// when it was not traced.
    pub trace_id: Option<String>,
}

/// `POST /v1/jobs` answer; the same for a repeated submit with the same `Idempotency-Key` and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub id: String,
    /// `/v1/jobs/{id}`
    pub url: String,
}

/// One page of `GET /v1/jobs`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One job event (the `data` of a Server-Sent Event whose `id` is `seq` and `event` is `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub seq: u64,
    pub job_id: String,
    #[schema(value_type = JobState)]
    pub state: String,
    pub attempt: u32,
    pub agent: Option<String>,
    pub reason: String,
    pub exit_code: Option<i32>,
    /// RFC 3339 with milliseconds.
    pub at: String,
}

/// `GET /v1/prices`: the broker's current prices and the sites they apply to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prices {
    /// Whether the snapshot is older than the broker allows (placement then says so).
    pub stale: bool,
    /// The broker's clock (Unix milliseconds), to read the prices' ages against.
    pub now_ms: i64,
    /// Every compute, egress and storage price with its source and fetch time.
    pub snapshot: PriceSnapshot,
    /// The configured sites (without their capacity providers' launch settings), to read
    /// prices per site and instance type.
    pub sites: Vec<Site>,
}

/// `POST /v1/jobs/{id}/cancel` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: String,
}

/// One GPU of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    /// Canonical model id, e.g. `H100-80GB`.
    pub model: String,
    /// The name NVML reports.
    pub name: String,
    pub memory_mib: u64,
    pub healthy: bool,
    /// Simulated GPUs (tests, demos) are marked everywhere they are shown.
    pub simulated: bool,
    pub utilization_pct: u32,
    pub temperature_c: u32,
    pub power_mw: u32,
    pub ecc_errors: u64,
    pub mig_enabled: bool,
}

/// An agent (one node of a site), for admin tenants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    /// `site/node`
    pub id: String,
    pub site: String,
    pub node: String,
    pub connected: bool,
    /// Takes no new work; running jobs finish.
    pub draining: bool,
    /// How the agent isolates attempts: `sandbox`, `userns` (a non-root agent: namespaces only)
    /// or `none` (no isolation: the node is dedicated to one tenant).
    #[serde(default)]
    pub isolation: String,
    /// The only tenant whose jobs this node runs (`[[dedicated]]` in the broker's config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated_tenant: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub gpus: Vec<Gpu>,
    pub labels: BTreeMap<String, String>,
    pub running_jobs: Vec<String>,
    /// RFC 3339.
    pub last_seen: String,
    /// When the certificate it last connected with expires (RFC 3339); absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<Agent>,
}

/// An elastic site's capacity (admin tenants): its provider's live instances, the launches not
/// yet enrolled, this month's spend, and the (instance type, market) pools left out of placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SiteCapacity {
    pub site: String,
    /// `aws`, `azure` or `local`.
    pub provider: String,
    /// Live instances per state: `requested`, `booting`, `enrolled`, `retiring` (absent: none).
    pub instances_by_state: BTreeMap<String, u32>,
    pub instances: Vec<Instance>,
    /// Launches whose agent has not enrolled yet (requested or booting).
    pub pending_launches: u32,
    /// Instance-hours × $/h this month, launch to termination.
    pub spend_usd: f64,
    /// The part of `spend_usd` while no attempt ran (charged to the site, not to tenants).
    pub idle_usd: f64,
    pub unavailable: Vec<UnavailablePool>,
}

/// One live instance of an elastic site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// The launch id (`hbl-…`), also the cloud's client token and the instance's launch tag.
    pub launch_id: String,
    /// Absent until the cloud answered the launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// `requested`, `booting`, `enrolled` or `retiring`.
    pub state: String,
    pub instance_type: String,
    /// `on-demand` or `spot`.
    pub market: String,
    pub usd_per_hour: f64,
    /// Seconds since the launch was requested.
    pub age_s: u64,
    /// Seconds its agent has held no attempt (0 while busy or not enrolled).
    pub idle_s: u64,
    /// `site/node` once its agent enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Why it is retiring, or what its launch last met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An (instance type, market) of a site left out of placement after a capacity, quota or SKU error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UnavailablePool {
    pub instance_type: String,
    pub market: String,
    pub reason: String,
    /// When the error was met (RFC 3339).
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SiteList {
    pub sites: Vec<SiteCapacity>,
}

/// Every error: RFC 9457 problem details (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `https://hybroker.dev/problems/invalid-argument`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, the same for every problem of this kind (e.g. "Bad Request").
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, naming the field where there is one.
    pub detail: String,
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An HTTP request to make as given: a store's presigned URL (`via: store`; send no API key,
/// `headers` as they are) or a gateway route (`via: gateway`; `url` is its path, send the API key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HttpRequest {
    /// `GET` or `PUT`.
    pub method: String,
    pub url: String,
    /// `store` or `gateway`.
    pub via: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// When a presigned URL stops working (RFC 3339); absent for gateway routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// One stored object: a job's output file, or an object under the tenant's storage prefixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DataObject {
    /// Relative to the output's prefix (outputs) or to the listed URI's directory (data).
    pub key: String,
    pub uri: String,
    pub size: u64,
    /// The whole object's MD5 (hex) where the store keeps one: a single-part S3 upload's ETag,
    /// Azure's Content-MD5, the local store's ETag. Absent (a multipart upload): only the size
    /// can be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// How to download it: a presigned GET (S3, Azure; ranges allowed), or the gateway route that
    /// streams it from the broker (the local store; `Range: bytes=N-` resumes).
    pub download: HttpRequest,
}

/// One output of a job: its work-directory path, where the succeeded attempt wrote it, its objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobOutput {
    /// Index in the job's `outputs`.
    pub index: u32,
    /// The output's `path` in the job's work directory.
    pub path: String,
    /// The succeeded attempt's prefix of this output.
    pub uri: String,
    pub objects: Vec<DataObject>,
}

/// A succeeded job's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobOutputs {
    pub job_id: String,
    /// The attempt that succeeded (whose objects these are).
    pub attempt: u32,
    pub outputs: Vec<JobOutput>,
}

/// The objects at a URI: one object, or every object under a prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DataObjectList {
    pub objects: Vec<DataObject>,
}

/// An upload to plan: the object's URI (inside the tenant's prefixes) and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadRequest {
    pub uri: String,
    pub size: u64,
}

/// How to upload one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadPlan {
    pub uri: String,
    /// `single` (one PUT of the whole body to `put`), `multipart` (each part of `part_size`
    /// bytes to its URL in `parts`, then `POST /v1/data/uploads/complete` with their ETags) or
    /// `gateway` (the body to `put`, a gateway route that streams it to the broker). Send
    /// `Content-Length` and, best, `Content-MD5` with every PUT.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub put: Option<HttpRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<HttpRequest>,
}

/// One uploaded part: its number (from 1) and the `ETag` the store answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadedPart {
    pub number: u32,
    pub etag: String,
}

/// Completes a multipart upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompleteUpload {
    pub uri: String,
    pub upload_id: String,
    pub parts: Vec<UploadedPart>,
}
