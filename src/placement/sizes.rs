//! Where the data sizes of a planned job come from — read from the stores, the spec's `size_hint`,
//! the output estimate, or assumed — and the sentences that say which sizes a plan assumed.
//!
//! An input's size is what its store lists; when the store cannot tell (the object does not exist
//! yet, no credentials), its `size_hint`; when neither, 0. An output's size is its `size_hint`, else
//! the estimate of [`PlacementJob::from_spec`] (the input bytes divided evenly among the outputs).

use serde::{Deserialize, Serialize};

use crate::model::job::JobSpec;
use crate::model::size::ByteSize;
use crate::placement::request::PlacementJob;

/// Where a size came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// Listed or HEADed in the input's store.
    Store,
    /// The spec's `size_hint`.
    SizeHint,
    /// An output without a hint: the job's input bytes divided evenly among its outputs.
    Estimate,
    /// Nothing known: 0 bytes.
    Assumed,
}

/// The size of one input or output as a plan priced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSize {
    /// `inputs[0]`, `outputs[1]`.
    pub field: String,
    /// The input's URI, or where the output goes (`to`, or `residency eu`).
    pub target: String,
    pub bytes: u64,
    pub source: SizeSource,
    /// Why the store did not give the size (its answer), when it was asked and did not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

/// An input read from its store: `bytes` in all.
pub fn listed_input(i: usize, uri: &str, bytes: u64) -> DataSize {
    DataSize { field: format!("inputs[{i}]"), target: uri.into(), bytes, source: SizeSource::Store, why: String::new() }
}

/// An input whose store did not tell its size (`why`): its `size_hint`, else 0.
pub fn unread_input(i: usize, uri: &str, hint: Option<ByteSize>, why: &str) -> DataSize {
    let (bytes, source) = match hint {
        Some(h) => (h.0, SizeSource::SizeHint),
        None => (0, SizeSource::Assumed),
    };
    DataSize { field: format!("inputs[{i}]"), target: uri.into(), bytes, source, why: why.into() }
}

/// The outputs' sizes as `job` (built by [`PlacementJob::from_spec`] from `spec`) prices them:
/// `size_hint` where the spec gives one, else the estimate. Outputs pair up by path.
pub fn output_sizes(spec: &JobSpec, job: &PlacementJob) -> Vec<DataSize> {
    spec.outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let bytes = job.outputs.iter().find(|p| p.path == o.path).map_or(0, |p| p.bytes);
            let target = match (&o.to, &o.residency) {
                (Some(to), _) => to.clone(),
                (None, Some(r)) => format!("residency {r}"),
                (None, None) => String::new(),
            };
            let source = if o.size_hint.is_some() { SizeSource::SizeHint } else { SizeSource::Estimate };
            DataSize { field: format!("outputs[{i}]"), target, bytes, source, why: String::new() }
        })
        .collect()
}

/// One line per size the plan did not read from a store or take from the spec as given: inputs
/// it assumed (0, or the hint because the store did not answer) and estimated outputs.
pub fn assumed(sizes: &[DataSize]) -> Vec<String> {
    sizes
        .iter()
        .filter_map(|s| {
            let size = ByteSize(s.bytes);
            // The store's answer may run over lines (the AWS SDK's credential chain): its first.
            let why = s.why.lines().next().map_or(String::new(), |w| format!(": {w}"));
            let what = match s.source {
                SizeSource::Store => return None,
                SizeSource::SizeHint if s.why.is_empty() => return None,
                SizeSource::SizeHint => format!("{size} from size_hint (not read from the store{why})"),
                SizeSource::Assumed => format!("0 bytes (no size from the store{why}; give size_hint)"),
                SizeSource::Estimate => {
                    format!("{size}, the input bytes divided evenly among the outputs (no size_hint)")
                }
            };
            Some(format!("{} {} is {what}", s.field, s.target))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::data::{InputObject, JobData, OutputTarget};
    use crate::placement::request::PlacementPolicy;

    fn spec(yaml: &str) -> JobSpec {
        JobSpec::from_yaml(yaml.as_bytes(), 1 << 20).unwrap()
    }

    fn data(input_bytes: &[u64], outputs: &[&str]) -> JobData {
        let inputs = input_bytes.iter().enumerate().map(|(i, &size)| InputObject {
            location: "s3".into(),
            key: format!("k{i}"),
            path: format!("in/{i}"),
            size,
            etag: None,
            md5: None,
        });
        let outputs = outputs.iter().map(|p| OutputTarget {
            path: (*p).into(),
            location: "s3".into(),
            to: "s3://b/out/".into(),
            prefix: "out/".into(),
            residency: None,
            choices: Vec::new(),
        });
        JobData { inputs: inputs.collect(), outputs: outputs.collect(), checkpoint: None }
    }

    const JOB: &str = "name: x\ncommand: [\"true\"]\ninputs: [{uri: s3://b/in/, path: in/}]\n";

    #[test]
    fn outputs_take_their_size_hint_and_the_others_the_estimate() {
        let s = spec(&format!(
            "{JOB}outputs: [{{path: a/, to: s3://b/out/, size_hint: 200GiB}}, {{path: b/, to: s3://b/out/}}]\n"
        ));
        let job = PlacementJob::from_spec(&s, &data(&[600, 400], &["a/", "b/"]), PlacementPolicy::default(), None);
        let bytes: Vec<u64> = job.outputs.iter().map(|o| o.bytes).collect();
        assert_eq!(bytes, [200 << 30, 500], "a hint wins; the other gets 1000 bytes in / 2 outputs");
        let sizes = output_sizes(&s, &job);
        assert_eq!(sizes[0].source, SizeSource::SizeHint);
        assert_eq!((sizes[1].source, sizes[1].bytes), (SizeSource::Estimate, 500));
        let said = assumed(&sizes);
        assert_eq!(
            said,
            ["outputs[1] s3://b/out/ is 500B, the input bytes divided evenly among the outputs (no size_hint)"]
        );
    }

    #[test]
    fn unresolved_residency_outputs_take_their_hint_too() {
        let s = spec(&format!("{JOB}outputs: [{{path: a/, residency: eu, size_hint: 1TB}}]\n"));
        let job = PlacementJob::from_spec(&s, &JobData::default(), PlacementPolicy::default(), None);
        assert_eq!(job.outputs[0].bytes, 1_000_000_000_000);
        assert_eq!(output_sizes(&s, &job)[0].target, "residency eu");
    }

    #[test]
    fn an_unread_input_takes_its_hint_else_zero_and_the_plan_says_so() {
        let hinted = unread_input(0, "s3://b/in/", Some(ByteSize(2 << 40)), "s3://b/in/ not found");
        assert_eq!((hinted.bytes, hinted.source), (2 << 40, SizeSource::SizeHint));
        let blind = unread_input(1, "az://a/c/x", None, "storage configuration: $KEY is not set");
        assert_eq!((blind.bytes, blind.source), (0, SizeSource::Assumed));
        let read = listed_input(2, "local://scratch/d/", 42);
        assert_eq!(
            assumed(&[hinted, blind, read]),
            [
                "inputs[0] s3://b/in/ is 2TiB from size_hint (not read from the store: s3://b/in/ not found)",
                "inputs[1] az://a/c/x is 0 bytes (no size from the store: storage configuration: $KEY is not set; give size_hint)",
            ]
        );
        // A hint given for an input the store has is not an assumption: the store's size wins.
        let given = DataSize { why: String::new(), ..unread_input(0, "s3://b/k", Some(ByteSize(1)), "") };
        assert!(assumed(&[given]).is_empty());
    }
}
