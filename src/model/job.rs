//! The job spec (docs/design.md §3): parsed from YAML or JSON, validated with every problem reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::data::DataUri;
use super::duration::HumanDuration;
use super::gpu::{is_known_model, known_models};
use super::secret::{SecretEnv, SecretValue};
use super::size::ByteSize;

/// Largest accepted values; they keep one job from exhausting the broker or an agent.
pub const MAX_GPUS: u32 = 64;
pub const MAX_CPUS: u32 = 1024;
pub const MAX_MEMORY_GIB: u32 = 16 * 1024;
pub const MAX_RUNTIME: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_MAX_RUNTIME: Duration = Duration::from_secs(24 * 3600);
pub const MAX_ATTEMPTS: u32 = 10;
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
const MAX_ENV: usize = 128;
const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
const MAX_SECRET_ENV: usize = 64;
const MAX_LABELS: usize = 64;
const MAX_DATA_ENTRIES: usize = 64;

/// What a tenant submits: a job file (YAML) or the body of `POST /v1/jobs` (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// 1 to 128 characters, no control or bidirectional formatting characters.
    #[schema(min_length = 1, max_length = 128, pattern = "\\S")]
    pub name: String,
    /// The program and its arguments (at most 256 of at most 4096 bytes each).
    #[schema(min_items = 1, max_items = 256)]
    pub command: Vec<String>,
    /// Environment variables (at most 128; names `[A-Za-z_][A-Za-z0-9_]*`, not `HYBROKER_*`,
    /// `CUDA_VISIBLE_DEVICES` or `TRACEPARENT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = env_schema)]
    pub env: BTreeMap<String, String>,
    /// Like `env`, but sealed at rest and never shown: serialised (stored, served) as
    /// `{NAME: "<redacted>"}`; the agent's assignment alone carries the values.
    /// Served as `"<redacted>"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub secret_env: SecretEnv,
    #[serde(default)]
    pub resources: Resources,
    /// What estimates (cost, waits) assume one attempt takes; at most `max_runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<HumanDuration>)]
    pub expected_runtime: Option<HumanDuration>,
    /// The hard limit on one attempt's wall time (default 24h, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<HumanDuration>)]
    pub max_runtime: Option<HumanDuration>,
    /// Attempts before the job fails (default 3).
    #[serde(default = "default_max_attempts")]
    #[schema(minimum = 1, maximum = 10, default = 3)]
    pub max_attempts: u32,
    /// Order among the tenant's own jobs (0–100, capped by the tenant's `max_priority`); fair
    /// share decides between tenants.
    #[serde(default = "default_priority")]
    #[schema(maximum = 100, default = 50)]
    pub priority: u32,
    /// The job may be stopped (SIGTERM, its checkpoint saved, `preempted`, queued again) for a
    /// higher-priority job of its tenant, or for another tenant under its fair share.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
    /// Objects staged into the work directory before the job starts (at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub inputs: Vec<Input>,
    /// Work-directory paths uploaded when the job succeeds (at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub outputs: Vec<Output>,
    /// A work-directory path the agent saves under the attempt's prefix and the next attempt
    /// finds again (spot interruptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// At most 64; keys 1–63 of `[A-Za-z0-9._-/]`, values at most 256 bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = labels_schema)]
    pub labels: BTreeMap<String, String>,
}

fn default_max_attempts() -> u32 {
    3
}

fn default_priority() -> u32 {
    50
}

/// What one attempt needs on a single node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs on one node (0 to 64; default 0).
    #[serde(default)]
    #[schema(maximum = 64, default = 0)]
    pub gpus: u32,
    /// Acceptable canonical GPU models (e.g. `H100-80GB`, `A100-80GB`, `L4`); empty = any. Only
    /// with `gpus` more than 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = gpu_models_schema)]
    pub gpu_model: Vec<String>,
    /// CPUs (1 to 1024; default 1).
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 1024, default = 1)]
    pub cpus: u32,
    /// Memory in GiB (1 to 16384; default 1).
    #[serde(default = "default_memory_gib")]
    #[schema(minimum = 1, maximum = 16384, default = 1)]
    pub memory_gib: u32,
}

fn default_cpus() -> u32 {
    1
}

fn default_memory_gib() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Self { gpus: 0, gpu_model: Vec::new(), cpus: default_cpus(), memory_gib: default_memory_gib() }
    }
}

/// An object (or a prefix) staged into the work directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// `s3://bucket/key`, `az://account/container/path` or `local://location/path`.
    #[schema(pattern = "^(s3|az|local)://")]
    pub uri: String,
    /// A relative path inside the work directory.
    #[schema(min_length = 1, max_length = 1024)]
    pub path: String,
    /// The input's size when it cannot be read from its store (it does not exist yet), for pricing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ByteSize>)]
    pub size_hint: Option<ByteSize>,
}

/// A work-directory path uploaded when the job succeeds: give exactly one of `to` (a data URI
/// prefix) or `residency` (placement picks the location).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// A relative path inside the work directory.
    #[schema(min_length = 1, max_length = 1024)]
    pub path: String,
    /// `s3://bucket/prefix`, `az://account/container/prefix` or `local://location/prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(s3|az|local)://")]
    pub to: Option<String>,
    /// A residency group (`eu`, `us`): placement picks a storage location in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    /// The expected size of what the job writes here, for pricing egress and storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ByteSize>)]
    pub size_hint: Option<ByteSize>,
}

/// `checkpoint: {path: ckpt/, to: …}`: `to` (a data URI prefix) defaults to the first output's
/// location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// A relative path inside the work directory.
    #[schema(min_length = 1, max_length = 1024)]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(s3|az|local)://")]
    pub to: Option<String>,
}

pub use super::price::Cloud;

/// Whether spot capacity may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Spot {
    #[default]
    Allowed,
    Never,
}

/// Narrows the tenant's policy; enforced by placement (a later issue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The residency group compute and outputs must stay in (`eu`, `us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    /// Clouds the job may run in (on-prem sites are always allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clouds: Vec<Cloud>,
    /// The most compute may cost per hour, in dollars (more than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub max_usd_per_hour: Option<f64>,
    /// The most the job may cost in all, in dollars (more than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub max_usd_total: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<Spot>,
    /// Finish by: an RFC 3339 time, or a duration from submit (`4h`). Hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = deadline_schema)]
    pub deadline: Option<String>,
    /// Start by: the longest acceptable wait. Hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<HumanDuration>)]
    pub max_wait: Option<HumanDuration>,
    /// What an hour of waiting costs this job, in dollars: candidates compare
    /// `compute + egress + storage + wait × delay_usd_per_hour` (default: the tenant's, else the
    /// broker's `placement.delay_usd_per_hour`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0)]
    pub delay_usd_per_hour: Option<f64>,
}

/// An RFC 3339 time like `2026-12-01T18:00:00Z` (UTC), or a duration from submit like `4h`.
pub const RFC3339_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?[Zz]?$";

/// `env`'s schema: names as [`is_env_name`] takes them (not those hybroker sets: checked on submit).
fn env_schema() -> utoipa::openapi::schema::Schema {
    string_map(
        "^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        None,
        MAX_ENV,
        "Environment variables (at most 128; names `[A-Za-z_][A-Za-z0-9_]*`, not `HYBROKER_*`, \
         `CUDA_VISIBLE_DEVICES` or `TRACEPARENT`)",
    )
}

/// `labels`' schema: keys as [`is_label_key`] takes them, values at most 256 bytes.
fn labels_schema() -> utoipa::openapi::schema::Schema {
    let about = "At most 64 labels; keys 1–63 of `[A-Za-z0-9._-/]`, values at most 256 bytes";
    string_map("^[A-Za-z0-9._/-]{1,63}$", Some(256), MAX_LABELS, about)
}

/// An object of strings whose names match `names`.
fn string_map(names: &str, max_value: Option<usize>, max: usize, about: &str) -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let value = ObjectBuilder::new().schema_type(Type::String).max_length(max_value);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(names))))
        .additional_properties(Some(AdditionalProperties::RefOr(value.into())))
        .max_properties(Some(max))
        .description(Some(about))
        .build()
        .into()
}

/// `resources.gpu_model`'s schema: the canonical model ids.
fn gpu_models_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let model = ObjectBuilder::new().schema_type(Type::String).enum_values(Some(known_models().iter().copied()));
    ArrayBuilder::new()
        .items(model)
        .description(Some(
            "Acceptable canonical GPU models (e.g. `H100-80GB`); empty = any. Only with `gpus` more than 0.",
        ))
        .build()
        .into()
}

/// `policy.deadline`'s schema: an RFC 3339 time (UTC) or a duration.
fn deadline_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    let at = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(RFC3339_PATTERN))
        .description(Some("An RFC 3339 time in UTC, e.g. `2026-12-01T18:00:00Z`"));
    AnyOfBuilder::new()
        .item(at)
        .item(<HumanDuration as utoipa::PartialSchema>::schema())
        .description(Some("Finish by: an RFC 3339 time (UTC), or a duration from submit (`4h`). Hard."))
        .build()
        .into()
}

/// When a spec's `deadline` falls: an RFC 3339 time, or `submitted_at` + a duration.
pub fn deadline_at(text: &str, submitted_at: super::UnixMillis) -> Result<super::UnixMillis, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        let ms = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as super::UnixMillis);
        return Ok(ms);
    }
    match HumanDuration::parse(text) {
        Ok(d) => {
            Ok(submitted_at
                .saturating_add(super::UnixMillis::try_from(d.0.as_millis()).unwrap_or(super::UnixMillis::MAX)))
        }
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time like 2026-12-01T18:00:00Z nor a duration from submit like 4h"
        )),
    }
}

/// One problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in a spec, or a document that could not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("job spec is {size} bytes, more than the {limit} allowed")]
    TooLarge { size: usize, limit: usize },
    #[error("job spec is not valid {format}: {message}")]
    Syntax { format: &'static str, message: String },
    #[error("invalid job spec: {}", join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl JobSpec {
    /// Parses YAML (a superset of JSON) and validates.
    pub fn from_yaml(doc: &[u8], limit: usize) -> Result<Self, SpecError> {
        check_size(doc, limit)?;
        let de = serde_yaml_ng::Deserializer::from_slice(doc);
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            // With a position, serde_yaml_ng's message names the field and its line and column.
            let path = if e.inner().location().is_some() { String::new() } else { e.path().to_string() };
            syntax("YAML", path, e.inner().to_string())
        })?;
        spec.validated()
    }

    /// Parses JSON and validates.
    pub fn from_json(doc: &[u8], limit: usize) -> Result<Self, SpecError> {
        check_size(doc, limit)?;
        Self::from_json_unlimited(doc)
    }

    /// Parses JSON of any size and validates: for a spec read back from the store, whose size
    /// was checked at submit.
    pub fn from_json_unlimited(doc: &[u8]) -> Result<Self, SpecError> {
        let mut de = serde_json::Deserializer::from_slice(doc);
        let spec: JobSpec = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| syntax("JSON", e.path().to_string(), e.inner().to_string()))?;
        spec.validated()
    }

    /// Canonical JSON, as stored and served.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job spec always serialises")
    }

    /// The spec with its secret values replaced by the placeholder (what the store gives back).
    pub fn without_secret_values(&self) -> Self {
        let mut spec = self.clone();
        spec.secret_env.values_mut().for_each(|v| *v = SecretValue::redacted());
        spec
    }

    /// The hard limit on one attempt's wall time.
    pub fn max_runtime(&self) -> Duration {
        self.max_runtime.map_or(DEFAULT_MAX_RUNTIME, |d| d.0)
    }

    /// What cost and wait estimates assume one attempt takes: `expected_runtime`, else `max_runtime`.
    pub fn estimated_runtime(&self) -> Duration {
        self.expected_runtime.map_or_else(|| self.max_runtime(), |d| d.0)
    }

    fn validated(self) -> Result<Self, SpecError> {
        let errors = self.problems();
        if errors.is_empty() { Ok(self) } else { Err(SpecError::Invalid(errors)) }
    }

    /// Every problem with the spec; empty when it is valid.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::default();
        let name = self.name.trim();
        if name.is_empty() || self.name.len() > 128 {
            p.add("name", "must be 1 to 128 characters");
        } else if let Some(problem) = super::text::display_control_problem(&self.name) {
            p.add("name", problem);
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            p.add("command", "must name a program (a list like [\"python3\", \"train.py\"])");
        }
        if self.command.len() > MAX_ARGS {
            p.add("command", format!("has {} arguments, at most {MAX_ARGS} allowed", self.command.len()));
        }
        for (i, arg) in self.command.iter().enumerate() {
            if arg.len() > MAX_ARG_BYTES || arg.contains('\0') {
                p.add(format!("command[{i}]"), format!("must be at most {MAX_ARG_BYTES} bytes without NUL"));
            }
        }
        self.check_env(&mut p);
        self.check_secret_env(&mut p);
        self.check_resources(&mut p);
        self.check_runtime(&mut p);
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            p.add("max_attempts", format!("must be 1 to {MAX_ATTEMPTS}"));
        }
        if self.priority > 100 {
            p.add("priority", "must be 0 to 100");
        }
        if self.labels.len() > MAX_LABELS {
            p.add("labels", format!("at most {MAX_LABELS} labels"));
        }
        for (k, v) in &self.labels {
            if !is_label_key(k) || v.len() > 256 {
                let k = super::text::escape(k);
                p.add(format!("labels.{k}"), "keys are 1-63 of [A-Za-z0-9._-/], values at most 256 bytes");
            } else if let Some(problem) = super::text::display_control_problem(v) {
                p.add(format!("labels.{k}"), format!("the value {problem}"));
            }
        }
        self.check_data(&mut p);
        p.0
    }

    fn check_env(&self, p: &mut Problems) {
        if self.env.len() > MAX_ENV {
            p.add("env", format!("at most {MAX_ENV} variables"));
        }
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            check_env_name(p, &field, k);
            if !env_value_ok(v) {
                p.add(&field, format!("values must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL"));
            }
        }
    }

    /// Names as in `env` and not also there; values never quoted in a problem.
    fn check_secret_env(&self, p: &mut Problems) {
        if self.secret_env.len() > MAX_SECRET_ENV {
            p.add("secret_env", format!("at most {MAX_SECRET_ENV} variables"));
        }
        for (k, v) in &self.secret_env {
            let field = format!("secret_env.{k}");
            if !check_env_name(p, &field, k) {
                continue;
            }
            if self.env.contains_key(k) {
                p.add(&field, "is also in env; give it in one of them");
            }
            if !env_value_ok(v.expose()) {
                p.add(&field, format!("values must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL"));
            }
        }
    }

    fn check_resources(&self, p: &mut Problems) {
        let r = &self.resources;
        if r.gpus > MAX_GPUS {
            p.add("resources.gpus", format!("must be 0 to {MAX_GPUS}"));
        }
        if !(1..=MAX_CPUS).contains(&r.cpus) {
            p.add("resources.cpus", format!("must be 1 to {MAX_CPUS}"));
        }
        if !(1..=MAX_MEMORY_GIB).contains(&r.memory_gib) {
            p.add("resources.memory_gib", format!("must be 1 to {MAX_MEMORY_GIB}"));
        }
        for (i, m) in r.gpu_model.iter().enumerate() {
            if !is_known_model(m) {
                p.add(
                    format!("resources.gpu_model[{i}]"),
                    format!("unknown GPU model {m:?}; known models: {}", known_models().join(", ")),
                );
            }
        }
        if r.gpus == 0 && !r.gpu_model.is_empty() {
            p.add("resources.gpu_model", "is given but resources.gpus is 0");
        }
    }

    fn check_runtime(&self, p: &mut Problems) {
        let max = self.max_runtime();
        if max.is_zero() || max > MAX_RUNTIME {
            p.add("max_runtime", "must be more than 0 and at most 30 days");
        }
        if let Some(expected) = self.expected_runtime
            && (expected.0.is_zero() || expected.0 > max)
        {
            p.add("expected_runtime", "must be more than 0 and at most max_runtime");
        }
    }

    /// Job data is checked here (the URIs' syntax; the broker resolves them against its locations
    /// and the tenant's allowed prefixes). Placement policy lands with a later issue, so a spec that
    /// uses it (or an output that leaves its location to placement) is refused rather than run without it.
    fn check_data(&self, p: &mut Problems) {
        if self.inputs.len() > MAX_DATA_ENTRIES || self.outputs.len() > MAX_DATA_ENTRIES {
            p.add("inputs", format!("at most {MAX_DATA_ENTRIES} inputs and {MAX_DATA_ENTRIES} outputs"));
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if let Err(e) = check_data_uri(&input.uri) {
                p.add(format!("inputs[{i}].uri"), e);
            }
            if let Err(e) = check_work_path(&input.path) {
                p.add(format!("inputs[{i}].path"), e);
            }
        }
        for (i, output) in self.outputs.iter().enumerate() {
            if let Err(e) = check_work_path(&output.path) {
                p.add(format!("outputs[{i}].path"), e);
            }
            match (&output.to, &output.residency) {
                (Some(to), None) => {
                    if let Err(e) = check_data_uri(to) {
                        p.add(format!("outputs[{i}].to"), e);
                    }
                }
                (None, Some(_)) => {}
                _ => p.add(format!("outputs[{i}]"), "give exactly one of `to` or `residency`"),
            }
        }
        if let Some(checkpoint) = &self.checkpoint {
            if let Err(e) = check_work_path(&checkpoint.path) {
                p.add("checkpoint.path", e);
            }
            match &checkpoint.to {
                Some(to) => {
                    if let Err(e) = check_data_uri(to) {
                        p.add("checkpoint.to", e);
                    }
                }
                None if self.outputs.is_empty() => {
                    p.add("checkpoint.to", "give `to`, or an output whose location the checkpoint goes to")
                }
                None => {}
            }
        }
        if let Some(policy) = &self.policy {
            if policy.max_usd_per_hour.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                p.add("policy.max_usd_per_hour", "must be a positive number");
            }
            if policy.max_usd_total.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                p.add("policy.max_usd_total", "must be a positive number");
            }
            if let Some(deadline) = &policy.deadline
                && let Err(e) = deadline_at(deadline, 0)
            {
                p.add("policy.deadline", e);
            }
            if policy.delay_usd_per_hour.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                p.add("policy.delay_usd_per_hour", "must be a number 0 or more");
            }
        }
    }
}

/// Job data URIs: `s3://bucket/key`, `az://account/container/path`, `local://location/path`.
/// Anything else (http, file, userinfo, encoded or dot segments) is refused: that is the SSRF guard.
pub fn check_data_uri(uri: &str) -> Result<(), String> {
    DataUri::parse(uri).map(|_| ())
}

/// A relative path inside the work directory: no `.`/`..` or empty segments (a trailing `/` is
/// fine), no control or bidirectional formatting characters, and not the agent's own `output.log`.
fn check_work_path(path: &str) -> Result<(), String> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let bad_segment = trimmed.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if path.len() > 1024 || path.starts_with('/') || bad_segment || path.chars().any(super::text::is_display_control) {
        let shown = super::text::escape(path);
        return Err(format!("\"{shown}\" must be a relative path inside the work directory"));
    }
    if trimmed == "output.log" {
        return Err("output.log is the attempt's log, kept by the agent".into());
    }
    Ok(())
}

fn check_size(doc: &[u8], limit: usize) -> Result<(), SpecError> {
    if doc.len() > limit { Err(SpecError::TooLarge { size: doc.len(), limit }) } else { Ok(()) }
}

fn syntax(format: &'static str, path: String, message: String) -> SpecError {
    let message = if path == "." || path.is_empty() { message } else { format!("at {path}: {message}") };
    SpecError::Syntax { format, message }
}

/// Checks a variable's name for `env` and `secret_env`: well formed, and not one hybroker sets.
/// Returns whether the name is well formed.
fn check_env_name(p: &mut Problems, field: &str, name: &str) -> bool {
    if !is_env_name(name) {
        p.add(field, "names must match [A-Za-z_][A-Za-z0-9_]*");
        return false;
    }
    if name.starts_with("HYBROKER_") || name == "CUDA_VISIBLE_DEVICES" || name == "TRACEPARENT" {
        p.add(field, "is set by hybroker and may not be given");
    }
    true
}

/// A variable's value fits: at most [`MAX_ENV_VALUE_BYTES`], no NUL.
fn env_value_ok(value: &str) -> bool {
    value.len() <= MAX_ENV_VALUE_BYTES && !value.contains('\0')
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k.len() <= 128
}

fn is_label_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
