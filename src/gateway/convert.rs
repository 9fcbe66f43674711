//! From the broker's gRPC messages to the tenants' JSON shapes ([`super::api`]): internal fields
//! stay behind, empty strings become absent values and times become RFC 3339.

use std::time::{Duration, UNIX_EPOCH};

use super::api;
use crate::proto;

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The URL of a job, as in `Location` and [`api::Submitted::url`].
pub fn job_url(id: &str) -> String {
    format!("/v1/jobs/{id}")
}

impl From<proto::Job> for api::Job {
    fn from(j: proto::Job) -> Self {
        let spec = serde_json::from_str(&j.spec_json).unwrap_or(serde_json::Value::Null);
        Self {
            id: j.id,
            name: j.name,
            tenant: j.tenant,
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            preemptions: j.preemptions,
            site: non_empty(j.site),
            agent: non_empty(j.agent),
            exit_code: j.exit_code,
            reason: j.reason,
            labels: j.labels.into_iter().collect(),
            created_at: rfc3339(j.created_at_ms),
            updated_at: rfc3339(j.updated_at_ms),
            spec,
            input_objects: j.input_objects,
            input_bytes: j.input_bytes,
            outputs: j.outputs,
            trace_id: non_empty(j.trace_id),
        }
    }
}

impl From<proto::JobEvent> for api::JobEvent {
    fn from(e: proto::JobEvent) -> Self {
        Self {
            seq: e.seq,
            job_id: e.job_id,
            state: e.state,
            attempt: e.attempt,
            agent: non_empty(e.agent),
            reason: e.reason,
            exit_code: e.exit_code,
            at: rfc3339(e.at_ms),
        }
    }
}

impl From<proto::Gpu> for api::Gpu {
    fn from(g: proto::Gpu) -> Self {
        Self {
            index: g.index,
            uuid: g.uuid,
            model: g.model,
            name: g.name,
            memory_mib: g.memory_mib,
            healthy: g.healthy,
            simulated: g.simulated,
            utilization_pct: g.utilization_pct,
            temperature_c: g.temperature_c,
            power_mw: g.power_mw,
            ecc_errors: g.ecc_errors,
            mig_enabled: g.mig_enabled,
        }
    }
}

impl From<proto::AgentInfo> for api::Agent {
    fn from(a: proto::AgentInfo) -> Self {
        let inventory = a.inventory.unwrap_or_default();
        Self {
            id: a.id,
            site: a.site,
            node: a.node,
            connected: a.connected,
            draining: a.draining,
            isolation: inventory.isolation.clone(),
            dedicated_tenant: non_empty(a.dedicated_tenant),
            cpus: inventory.cpus,
            memory_mib: inventory.memory_mib,
            gpus: inventory.gpus.into_iter().map(api::Gpu::from).collect(),
            labels: inventory.labels.into_iter().collect(),
            running_jobs: a.running_jobs,
            last_seen: rfc3339(a.last_seen_ms),
            cert_not_after: (a.cert_not_after_ms > 0).then(|| rfc3339(a.cert_not_after_ms)),
        }
    }
}

impl From<proto::SiteCapacityInfo> for api::SiteCapacity {
    fn from(s: proto::SiteCapacityInfo) -> Self {
        let mut instances_by_state = std::collections::BTreeMap::new();
        for i in &s.instances {
            *instances_by_state.entry(i.state.clone()).or_default() += 1;
        }
        let instances = s
            .instances
            .into_iter()
            .map(|i| api::Instance {
                launch_id: i.launch_id,
                instance_id: non_empty(i.instance_id),
                state: i.state,
                instance_type: i.instance_type,
                market: i.market,
                usd_per_hour: i.usd_per_hour,
                age_s: i.age_s,
                idle_s: i.idle_s,
                agent: non_empty(i.agent),
                reason: non_empty(i.reason),
            })
            .collect();
        let unavailable = s
            .unavailable
            .into_iter()
            .map(|u| api::UnavailablePool {
                instance_type: u.instance_type,
                market: u.market,
                reason: u.reason,
                since: rfc3339(u.since_ms),
            })
            .collect();
        Self {
            site: s.site,
            provider: s.provider,
            instances_by_state,
            instances,
            pending_launches: s.pending_launches,
            spend_usd: s.spend_usd,
            idle_usd: s.idle_usd,
            unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_lose_empty_fields_and_get_rfc3339_times() {
        let job = proto::Job {
            id: "j1".into(),
            tenant: "acme".into(),
            spec_json: r#"{"name":"x","command":["true"]}"#.into(),
            created_at_ms: 1_764_245_281_123,
            updated_at_ms: 0,
            ..Default::default()
        };
        let job = api::Job::from(job);
        assert_eq!((job.site.as_deref(), job.agent.as_deref()), (None, None));
        assert_eq!(job.created_at, "2025-11-27T12:08:01.123Z");
        assert_eq!(job.updated_at, "1970-01-01T00:00:00.000Z");
        assert_eq!(job.spec["command"][0], "true");
        let json = serde_json::to_value(&job).unwrap();
        assert!(json.get("epoch").is_none() && json.get("created_at_ms").is_none());
    }

    #[test]
    fn sites_count_instances_by_state_and_lose_empty_fields() {
        let instance = |id: &str, state: &str| proto::InstanceInfo {
            launch_id: format!("hbl-{id}"),
            instance_id: id.into(),
            state: state.into(),
            ..Default::default()
        };
        let info = proto::SiteCapacityInfo {
            site: "aws-us-east-1".into(),
            provider: "aws".into(),
            instances: vec![instance("i-1", "enrolled"), instance("", "requested"), instance("i-3", "enrolled")],
            unavailable: vec![proto::UnavailablePool {
                instance_type: "p5.48xlarge".into(),
                market: "spot".into(),
                reason: "InsufficientInstanceCapacity".into(),
                since_ms: 1_764_245_281_123,
            }],
            ..Default::default()
        };
        let site = api::SiteCapacity::from(info);
        let by_state: Vec<(&str, u32)> = site.instances_by_state.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        assert_eq!(by_state, [("enrolled", 2), ("requested", 1)]);
        assert_eq!(site.instances[1].instance_id, None);
        assert_eq!(site.instances[0].instance_id.as_deref(), Some("i-1"));
        assert_eq!(site.unavailable[0].since, "2025-11-27T12:08:01.123Z");
        let json = serde_json::to_value(&site.instances[1]).unwrap();
        assert!(json.get("instance_id").is_none() && json.get("agent").is_none(), "{json}");
    }

    #[test]
    fn agents_show_their_isolation_and_dedicated_tenant() {
        let inventory = proto::Inventory { isolation: "none".into(), ..Default::default() };
        let info = proto::AgentInfo {
            id: "lab/gpu-9".into(),
            inventory: Some(inventory),
            dedicated_tenant: "acme".into(),
            ..Default::default()
        };
        let agent = api::Agent::from(info);
        assert_eq!((agent.isolation.as_str(), agent.dedicated_tenant.as_deref()), ("none", Some("acme")));
        let json = serde_json::to_value(&agent).unwrap();
        assert_eq!((&json["isolation"], &json["dedicated_tenant"]), (&"none".into(), &"acme".into()));
        let shared = api::Agent::from(proto::AgentInfo { id: "lab/gpu-1".into(), ..Default::default() });
        assert!(serde_json::to_value(&shared).unwrap().get("dedicated_tenant").is_none());
        // The OpenAPI schema documents both fields.
        let schema = serde_json::to_value(<api::Agent as utoipa::PartialSchema>::schema()).unwrap();
        for field in ["isolation", "dedicated_tenant"] {
            assert!(schema["properties"][field]["description"].is_string(), "{field}: {schema}");
        }
    }
}
