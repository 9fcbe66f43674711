//! `hybroker plan FILE --config broker.toml`: where a job would run, from the broker's config, a
//! price snapshot, the job's data as the stores list it, and (what-if) the state of sites, without
//! a broker. The config is checked like the broker checks it at start; the data is resolved like
//! the broker resolves it at submit, except that an input whose size the store does not give takes
//! its `size_hint`, else 0; and the plan says every size and site state it assumed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::site_state::{self, SiteStateFile};
use crate::broker::data::DataPlane;
use crate::broker::placer::Placer;
use crate::config::BrokerConfig;
use crate::model::UnixMillis;
use crate::model::data::{DataUri, InputObject, JobData, OutputTarget};
use crate::model::job::JobSpec;
use crate::model::price::PriceSnapshot;
use crate::model::size::ByteSize;
use crate::model::text::escape;
use crate::placement::engine::Decision;
use crate::placement::sizes::{self, DataSize};

/// The longest a plan waits for the stores to list its inputs.
const STORE_READS: Duration = Duration::from_secs(120);

/// What to plan, and from what.
pub struct OfflineRequest<'a> {
    pub file: &'a Path,
    pub config: &'a Path,
    /// The price snapshot (default: the config's `prices.snapshot`).
    pub prices: Option<&'a Path>,
    pub tenant: &'a str,
    pub site_state: Option<&'a Path>,
    /// Read input sizes from the stores (else every input is its `size_hint`, or 0).
    pub read_stores: bool,
}

/// An offline plan: the decision (the same JSON as the gateway's), every input's and output's
/// size with where it came from, and what the plan assumed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfflinePlan {
    #[serde(flatten)]
    pub decision: Decision,
    pub sizes: Vec<DataSize>,
    pub assumed: Vec<String>,
}

/// Plans the job offline.
pub async fn plan_offline(request: &OfflineRequest<'_>) -> anyhow::Result<OfflinePlan> {
    let config = BrokerConfig::load_for_planning(request.config)?;
    if config.sites.is_empty() {
        anyhow::bail!("{} declares no [[site]]: there is nothing to plan", request.config.display());
    }
    // The broker's catalog: `[placement] catalog`, else the built-in one.
    config.placement.install_catalog().map_err(anyhow::Error::msg)?;
    let snapshot_path = request.prices.map_or_else(|| config.prices.snapshot.clone(), Path::to_path_buf);
    let snapshot: PriceSnapshot = crate::pricing::read_snapshot(&snapshot_path)?;
    let doc = std::fs::read(request.file).with_context(|| request.file.display().to_string())?;
    let spec = JobSpec::from_yaml(&doc, config.limits.max_spec_bytes)?;
    let state = match request.site_state {
        Some(path) => site_state::read(path, &config.sites)?,
        None => SiteStateFile::default(),
    };
    let tenant = (config.tenant(request.tenant))
        .ok_or_else(|| anyhow::anyhow!("no tenant {} in {}", request.tenant, request.config.display()))?;
    let (data, input_sizes) = if request.read_stores {
        let plane = DataPlane::for_planning(&config).await?;
        let resolved = tokio::time::timeout(STORE_READS, plane.resolve_for_plan(&tenant, &spec)).await;
        let resolved = resolved.map_err(|_| {
            anyhow::anyhow!(
                "the stores did not tell the input sizes within {}s (plan without them: --no-store-reads)",
                STORE_READS.as_secs()
            )
        })?;
        resolved.map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        unread_data(&spec, &config)?
    };
    let now = crate::pricing::now_ms();
    plan_with(&config, snapshot, &spec, (&data, input_sizes), &state, request.tenant, now)
}

/// The plan of a job whose data is resolved, in the state given.
fn plan_with(
    config: &BrokerConfig,
    snapshot: PriceSnapshot,
    spec: &JobSpec,
    (data, input_sizes): (&JobData, Vec<DataSize>),
    state: &SiteStateFile,
    tenant: &str,
    now: UnixMillis,
) -> anyhow::Result<OfflinePlan> {
    let (_tx, prices) = tokio::sync::watch::channel(Arc::new(snapshot));
    let placer = Placer::new(config, prices);
    let job = placer.request(tenant, spec, Some(data), None, now).map_err(anyhow::Error::msg)?;
    let planned = site_state::capacity(&config.sites, state);
    let capacity = planned.nodes.iter().map(|(site, nodes)| (site.as_str(), nodes.clone())).collect();
    let world = placer.world_with_waits(&capacity, |site| planned.waits.get(site).copied(), |_| Vec::new(), now);
    let decision = placer.place(&job, &world);
    let mut sizes = input_sizes;
    sizes.extend(sizes::output_sizes(spec, &job));
    let mut assumed = sizes::assumed(&sizes);
    assumed.extend(planned.assumed);
    Ok(OfflinePlan { decision, sizes, assumed })
}

/// Inputs and outputs mapped to the config's locations without asking the stores: every input is
/// its `size_hint`, else 0.
fn unread_data(spec: &JobSpec, config: &BrokerConfig) -> anyhow::Result<(JobData, Vec<DataSize>)> {
    let location = |field: &str, uri: &str| -> anyhow::Result<(String, DataUri)> {
        let parsed = DataUri::parse(uri).map_err(|e| anyhow::anyhow!("{field}: {e}"))?;
        let found = config.storage.iter().find(|s| s.uri_store() == (parsed.scheme, parsed.store.clone()));
        let found = found.ok_or_else(|| anyhow::anyhow!("{field}: {uri} is in no [[storage]] location"))?;
        Ok((found.name.clone(), parsed))
    };
    let mut data = JobData::default();
    let mut input_sizes = Vec::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let (name, uri) = location(&format!("inputs[{i}].uri"), &input.uri)?;
        let size = sizes::unread_input(i, &input.uri, input.size_hint, "--no-store-reads");
        data.inputs.push(InputObject {
            location: name,
            key: uri.path,
            path: input.path.clone(),
            size: size.bytes,
            etag: None,
            md5: None,
        });
        input_sizes.push(size);
    }
    for (i, output) in spec.outputs.iter().enumerate() {
        let Some(to) = &output.to else {
            // Given by residency: placement chooses among every location of the group.
            data.outputs.push(OutputTarget {
                path: output.path.clone(),
                location: String::new(),
                to: String::new(),
                prefix: String::new(),
                residency: output.residency.clone(),
                choices: Vec::new(),
            });
            continue;
        };
        let (name, uri) = location(&format!("outputs[{i}].to"), to)?;
        data.outputs.push(OutputTarget {
            path: output.path.clone(),
            location: name,
            to: to.clone(),
            prefix: uri.path,
            residency: None,
            choices: Vec::new(),
        });
    }
    Ok((data, input_sizes))
}

/// The plan as people read it: the decision's table, then the sizes and the assumptions (escaped:
/// they quote the spec's URIs and the stores' answers).
pub fn plan_table(plan: &OfflinePlan) -> String {
    let mut out = super::explain::decision_table(&plan.decision);
    for (i, s) in plan.sizes.iter().enumerate() {
        let source = serde_json::to_value(s.source).ok().and_then(|v| v.as_str().map(str::to_owned));
        out.push_str(&format!(
            "{:<11}{} {}: {} ({})\n",
            if i == 0 { "sizes:" } else { "" },
            s.field,
            escape(&s.target),
            ByteSize(s.bytes),
            source.unwrap_or_default()
        ));
    }
    for (i, a) in plan.assumed.iter().enumerate() {
        out.push_str(&format!("{:<11}{}\n", if i == 0 { "assumed:" } else { "" }, escape(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_toml;
    use crate::placement::engine::{Rejection, RejectionKind, Verdict};

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// Plans `yaml` against the shipped hybrid config and price snapshot, without the stores.
    fn plan_in(yaml: &str, state: &str) -> OfflinePlan {
        let path = root().join("config/broker-hybrid.toml");
        let config: BrokerConfig = parse_toml(&std::fs::read_to_string(&path).unwrap(), &path, []).unwrap();
        let snapshot = crate::pricing::read_snapshot(&root().join("config/prices/snapshot.json")).unwrap();
        let spec = JobSpec::from_yaml(yaml.as_bytes(), 1 << 20).unwrap();
        let (data, sizes) = unread_data(&spec, &config).unwrap();
        let state: SiteStateFile = toml::from_str(state).unwrap();
        plan_with(&config, snapshot.clone(), &spec, (&data, sizes), &state, "acme", snapshot.fetched_at).unwrap()
    }

    fn plan(yaml: &str) -> OfflinePlan {
        plan_in(yaml, "")
    }

    #[test]
    fn offline_plans_keep_outputs_in_the_residency_of_the_inputs() {
        let job = "name: x\ncommand: [\"true\"]\ninputs: [{uri: s3://acme-datasets-eu/acme/in/, path: in/}]\n";
        let to_us = format!("{job}outputs: [{{path: out/, to: s3://acme-datasets-us/acme/r/}}]\n");
        let d = plan(&to_us).decision;
        assert_eq!(d.residency.as_deref(), Some("eu"));
        assert!(d.chosen.is_none());
        for c in &d.candidates {
            let why = "residency: output out/ goes to us, data in eu";
            assert_eq!(c.verdict, Verdict::Rejected(Rejection::new(RejectionKind::Residency, why)), "{}", c.site);
        }
        // An output given by residency is planned too (next to one given by `to`), in the group.
        let mixed = format!(
            "{job}outputs: [{{path: out/, to: s3://acme-datasets-eu/acme/r/}}, {{path: ckpt/, residency: eu}}]\n"
        );
        let d = plan(&mixed).decision;
        let eu = ["datasets-eu", "results-eu", "scratch"];
        assert!(d.chosen.is_some(), "{:#?}", d.candidates);
        for c in &d.candidates {
            assert_eq!(c.output_locations.len(), 2, "{c:?}");
            assert!(eu.contains(&c.output_locations[1].as_str()), "{c:?}");
        }
    }

    #[test]
    fn sizes_come_from_hints_and_the_plan_says_what_it_assumed() {
        let job = "name: x\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {gpus: 1}\n\
                   inputs: [{uri: s3://acme-datasets-eu/acme/a/, path: a/, size_hint: 500GB}, \
                   {uri: s3://acme-datasets-eu/acme/b, path: b}]\n\
                   outputs: [{path: out/, to: az://acmeml/results/acme/r/, size_hint: 10GB}, {path: logs/, residency: eu}]\n";
        let p = plan(job);
        let got: Vec<(&str, u64, sizes::SizeSource)> =
            p.sizes.iter().map(|s| (s.field.as_str(), s.bytes, s.source)).collect();
        use sizes::SizeSource::*;
        let each = 500_000_000_000 / 2;
        let want = [
            ("inputs[0]", 500_000_000_000, SizeHint),
            ("inputs[1]", 0, Assumed),
            ("outputs[0]", 10_000_000_000, SizeHint),
            ("outputs[1]", each, Estimate),
        ];
        assert_eq!(got, want);
        let assumed = p.assumed.join("\n");
        for said in [
            "inputs[0] s3://acme-datasets-eu/acme/a/ is 465.7GiB from size_hint",
            "inputs[1] ",
            "outputs[1] ",
            "lab-sto has room now",
        ] {
            assert!(assumed.contains(said), "{said:?} in\n{assumed}");
        }
        // The data is priced: moving 500 GB out of eu-west-1 costs something wherever it is not.
        let chosen = p.decision.chosen.as_ref().expect("placed");
        assert!(chosen.offer.cost.egress_usd + chosen.offer.cost.storage_usd > 0.0, "{chosen:?}");
        let table = plan_table(&p);
        assert!(table.contains("sizes:     inputs[0] s3://acme-datasets-eu/acme/a/: 465.7GiB (size_hint)"), "{table}");
        assert!(table.contains("assumed:   inputs[0]"), "{table}");
    }

    #[test]
    fn a_full_lab_waits_as_the_site_state_says() {
        let job = "name: x\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {gpus: 1, gpu_model: [H100-80GB]}\n";
        let lab = |p: &OfflinePlan| p.decision.candidates.iter().find(|c| c.site == "lab-sto").unwrap().verdict.clone();
        let free = plan(job);
        assert!(matches!(lab(&free), Verdict::Feasible(o) if o.wait_s == 0), "{:?}", lab(&free));
        // Full, with no wait given: busy for this job.
        let busy = plan_in(job, "[site.lab-sto]\nfree_gpus = {}\n");
        assert!(matches!(lab(&busy), Verdict::Rejected(r) if r.kind == RejectionKind::Capacity), "{:?}", lab(&busy));
        assert!(!busy.assumed.iter().any(|a| a.starts_with("lab-sto")), "{:?}", busy.assumed);
        // Full for H100s, with a wait: the job waits that long there.
        let waits = plan_in(job, "[site.lab-sto]\nfree_gpus = { \"L4-24GB\" = 4 }\nwait = \"5m\"\n");
        assert!(matches!(lab(&waits), Verdict::Feasible(o) if o.wait_s == 300), "{:?}", lab(&waits));
        // Free H100s: it starts now.
        let room = plan_in(job, "[site.lab-sto]\nfree_gpus = { \"H100-80GB\" = 1 }\nwait = \"5m\"\n");
        assert!(matches!(lab(&room), Verdict::Feasible(o) if o.wait_s == 0), "{:?}", lab(&room));
    }
}
