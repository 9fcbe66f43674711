//! Job data (docs/design.md §3): data URIs, the plan a submission resolves to (input objects with their
//! sizes, output targets), where each attempt's outputs go, and what staging moved. Pure: resolving
//! a URI against the configured locations and listing objects happen in the broker.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The three data URI schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// `s3://<bucket>/<key-or-prefix>`
    S3,
    /// `az://<account>/<container>/<path>`
    Az,
    /// `local://<location>/<path>`
    Local,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Az => "az",
            Scheme::Local => "local",
        }
    }
}

/// A parsed data URI: which store (bucket, `account/container` or local location) and the path in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataUri {
    pub scheme: Scheme,
    /// `bucket` (s3), `account/container` (az) or the location name (local).
    pub store: String,
    /// The key or prefix inside the store; may be empty (the whole store) or end with `/` (a prefix).
    pub path: String,
}

impl DataUri {
    /// Parses and checks a URI. Anything but the three schemes, and any userinfo, escape, query,
    /// fragment, space, control character, empty or `.`/`..` segment is refused: that is the SSRF
    /// guard (an `http://169.254.169.254/` or `file:///etc/passwd` never reaches an HTTP client).
    pub fn parse(uri: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(format!("{uri:?} is not a data URI (s3://, az:// or local://)"));
        };
        let (scheme, store_segments) = match scheme {
            "s3" => (Scheme::S3, 1),
            "az" => (Scheme::Az, 2),
            "local" => (Scheme::Local, 1),
            _ => return Err(format!("scheme {scheme:?} is not allowed; use s3://, az:// or local://")),
        };
        if rest.contains(['@', '%', '\\', '?', '#', ':']) || rest.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!("{uri:?} may not contain userinfo, ports, escapes, queries, fragments or spaces"));
        }
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.len() < store_segments || segments[..store_segments].iter().any(|s| s.is_empty()) {
            return Err(format!("{uri:?} must name the bucket, account/container or location"));
        }
        let path_segments = &segments[store_segments..];
        let last = path_segments.len().saturating_sub(1);
        for (i, s) in path_segments.iter().enumerate() {
            if *s == "." || *s == ".." {
                return Err(format!("{uri:?} may not contain . or .. segments"));
            }
            // Only the last segment may be empty: `prefix/` names a prefix, `a//b` is refused.
            if s.is_empty() && i != last {
                return Err(format!("{uri:?} may not contain empty segments (//)"));
            }
        }
        Ok(DataUri { scheme, store: segments[..store_segments].join("/"), path: path_segments.join("/") })
    }

    /// Names a prefix (ends with `/`, or is the whole store) rather than one object.
    pub fn is_prefix(&self) -> bool {
        self.path.is_empty() || self.path.ends_with('/')
    }

    /// Whether this URI lies within `allowed` (a URI prefix from the tenant's config), on a segment
    /// boundary: `s3://b/acme/` allows `s3://b/acme/x` but not `s3://b/acme2/x`.
    pub fn is_within(&self, allowed: &DataUri) -> bool {
        if self.scheme != allowed.scheme || self.store != allowed.store {
            return false;
        }
        if allowed.path.is_empty() || allowed.path.ends_with('/') {
            self.path.starts_with(&allowed.path)
        } else {
            self.path == allowed.path || self.path.starts_with(&format!("{}/", allowed.path))
        }
    }
}

impl fmt::Display for DataUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/{}", self.scheme.as_str(), self.store, self.path)
    }
}

/// What a submission resolved to; stored with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobData {
    pub inputs: Vec<InputObject>,
    pub outputs: Vec<OutputTarget>,
    /// Where the job's checkpoint goes (its `path` is the work-directory path); with `residency`,
    /// it follows the first output's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<OutputTarget>,
}

impl JobData {
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty() && self.checkpoint.is_none()
    }

    /// Bytes of input, as listed at submit (what placement prices moving).
    pub fn input_bytes(&self) -> u64 {
        self.inputs.iter().map(|i| i.size).sum()
    }

    /// The outputs with placement's choice of location filled in (`chosen`: one location per
    /// output, in order, as a decision gives them). Outputs with a fixed location are unchanged.
    pub fn with_chosen_outputs(&self, chosen: &[String]) -> JobData {
        let mut data = self.clone();
        let first = chosen.first();
        let targets = data.outputs.iter_mut().zip(chosen).chain(data.checkpoint.as_mut().zip(first));
        for (output, location) in targets {
            if let Some(choice) = output.choices.iter().find(|c| &c.location == location) {
                output.location = choice.location.clone();
                output.to = choice.to.clone();
                output.prefix = choice.prefix.clone();
            }
        }
        data
    }

    /// Whether every output has its location (none waits for placement to choose).
    pub fn outputs_resolved(&self) -> bool {
        self.outputs.iter().chain(&self.checkpoint).all(|o| !o.location.is_empty())
    }
}

/// One input object, as listed or HEADed at submit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputObject {
    /// The configured location's name.
    pub location: String,
    pub key: String,
    /// Where it lands, relative to the work directory.
    pub path: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Base64 MD5, when the store knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
}

/// One output: a work-directory path and where its files go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputTarget {
    /// In the work directory: a file or a directory.
    pub path: String,
    pub location: String,
    /// The destination URI as given (its path is the key prefix).
    pub to: String,
    /// Key prefix in the location (`to`'s path), empty or ending with `/`.
    pub prefix: String,
    /// An output that gave a residency group instead of `to`: placement picks one of these
    /// (location, `to`, prefix) — the tenant's writable prefixes in that group — and `location`,
    /// `to` and `prefix` above are empty until then ([`JobData::with_chosen_outputs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<OutputChoice>,
}

/// A location placement may choose for an output, and where in it the output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChoice {
    pub location: String,
    pub to: String,
    pub prefix: String,
}

impl OutputTarget {
    /// `<prefix><tenant>/<job-id>/attempt-<n>/`: each attempt writes under its own prefix, so a
    /// retry never mixes with an earlier attempt's files.
    pub fn attempt_prefix(&self, tenant: &str, job_id: &str, attempt: u32) -> String {
        format!("{}{tenant}/{job_id}/attempt-{attempt}/", self.prefix)
    }

    /// `<attempt prefix>checkpoint/`: where a checkpoint target keeps one attempt's checkpoint
    /// (`files/…` and the `complete.json` marker written last).
    pub fn checkpoint_prefix(&self, tenant: &str, job_id: &str, attempt: u32) -> String {
        format!("{}checkpoint/", self.attempt_prefix(tenant, job_id, attempt))
    }

    /// The URI of that prefix, for people.
    pub fn attempt_uri(&self, tenant: &str, job_id: &str, attempt: u32) -> String {
        let base = self.to.strip_suffix(&self.prefix).unwrap_or(&self.to);
        format!("{base}{}", self.attempt_prefix(tenant, job_id, attempt))
    }
}

/// Where an input object lands: a single-object input goes to `path` (or `path/<name>` when `path`
/// ends with `/`); an object under a prefix input goes to `path/<rest of its key>`. `None` when the
/// key can't be placed safely (empty, `.`/`..` segments, control characters).
pub fn input_destination(path: &str, uri_path: &str, is_prefix: bool, key: &str) -> Option<String> {
    let rest = if is_prefix {
        key.strip_prefix(uri_path)?
    } else if path.ends_with('/') {
        key.rsplit('/').next()?
    } else {
        return Some(path.to_string());
    };
    if rest.is_empty()
        || rest.starts_with('/')
        || rest.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        || rest.chars().any(char::is_control)
    {
        return None;
    }
    let dir = path.trim_end_matches('/');
    Some(if dir.is_empty() { rest.to_string() } else { format!("{dir}/{rest}") })
}

/// What one attempt's staging moved; recorded on the attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingStats {
    pub in_bytes: u64,
    pub in_files: u32,
    pub in_ms: u64,
    pub out_bytes: u64,
    pub out_files: u32,
    pub out_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_into_store_and_path() {
        let u = DataUri::parse("az://acct/results/run1/").unwrap();
        assert_eq!((u.scheme, u.store.as_str(), u.path.as_str()), (Scheme::Az, "acct/results", "run1/"));
        assert!(u.is_prefix());
        let u = DataUri::parse("s3://bucket").unwrap();
        assert_eq!((u.store.as_str(), u.path.as_str()), ("bucket", ""));
        assert!(DataUri::parse("s3://bucket/a.bin").is_ok_and(|u| !u.is_prefix()));
        assert_eq!(DataUri::parse("local://lab/x/y").unwrap().to_string(), "local://lab/x/y");
    }

    #[test]
    fn the_ssrf_guard_refuses_everything_else() {
        for bad in [
            "http://169.254.169.254/latest/meta-data/",
            "https://example.com/x",
            "file:///etc/passwd",
            "gs://bucket/x",
            "s3://user@bucket/x",
            "s3://bucket:443/x",
            "s3://bucket/%2e%2e/x",
            "s3://bucket/a/../b",
            "s3://bucket/./b",
            "s3://bucket/a//b",
            "s3:///x",
            "az://acct",
            "az://acct//x",
            "s3://bucket/x?y",
            "s3://bucket/x#y",
            "s3://bucket/a b",
            "s3://bucket/a\\b",
            "bucket/key",
        ] {
            assert!(DataUri::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn allowed_prefixes_match_on_segment_boundaries() {
        let allowed = DataUri::parse("s3://b/acme/").unwrap();
        assert!(DataUri::parse("s3://b/acme/x/y").unwrap().is_within(&allowed));
        assert!(!DataUri::parse("s3://b/acme2/x").unwrap().is_within(&allowed));
        assert!(!DataUri::parse("s3://c/acme/x").unwrap().is_within(&allowed));
        assert!(!DataUri::parse("local://b/acme/x").unwrap().is_within(&allowed));
        let no_slash = DataUri::parse("s3://b/acme").unwrap();
        assert!(DataUri::parse("s3://b/acme/x").unwrap().is_within(&no_slash));
        assert!(!DataUri::parse("s3://b/acmex").unwrap().is_within(&no_slash));
        assert!(DataUri::parse("s3://b/anything").unwrap().is_within(&DataUri::parse("s3://b").unwrap()));
    }

    #[test]
    fn inputs_land_inside_their_path() {
        assert_eq!(input_destination("data/", "ds/", true, "ds/a/b.bin").as_deref(), Some("data/a/b.bin"));
        assert_eq!(input_destination("data", "ds/", true, "ds/b.bin").as_deref(), Some("data/b.bin"));
        assert_eq!(input_destination("in.bin", "ds/x.bin", false, "ds/x.bin").as_deref(), Some("in.bin"));
        assert_eq!(input_destination("in/", "ds/x.bin", false, "ds/x.bin").as_deref(), Some("in/x.bin"));
        for key in ["ds/../etc/passwd", "ds/a//b", "ds/", "ds/./a", "ds/a\nb"] {
            assert_eq!(input_destination("data/", "ds/", true, key), None, "{key}");
        }
    }

    #[test]
    fn attempts_write_under_their_own_prefix() {
        let o = OutputTarget {
            path: "out/".into(),
            location: "results".into(),
            to: "az://acct/results/runs/".into(),
            prefix: "runs/".into(),
            residency: None,
            choices: Vec::new(),
        };
        assert_eq!(o.attempt_prefix("acme", "j1", 2), "runs/acme/j1/attempt-2/");
        assert_eq!(o.checkpoint_prefix("acme", "j1", 2), "runs/acme/j1/attempt-2/checkpoint/");
        assert_eq!(o.attempt_uri("acme", "j1", 2), "az://acct/results/runs/acme/j1/attempt-2/");
    }

    #[test]
    fn a_checkpoint_that_follows_the_first_output_takes_its_chosen_location() {
        let choices = vec![
            OutputChoice { location: "eu1".into(), to: "s3://eu1/acme/".into(), prefix: "acme/".into() },
            OutputChoice { location: "eu2".into(), to: "s3://eu2/x/".into(), prefix: "x/".into() },
        ];
        let open = OutputTarget {
            path: "out/".into(),
            location: String::new(),
            to: String::new(),
            prefix: String::new(),
            residency: Some("eu".into()),
            choices,
        };
        let data = JobData {
            inputs: Vec::new(),
            outputs: vec![open.clone()],
            checkpoint: Some(OutputTarget { path: "ckpt/".into(), ..open }),
        };
        assert!(!data.outputs_resolved(), "the checkpoint waits for placement too");
        let chosen = data.with_chosen_outputs(&["eu2".into()]);
        assert!(chosen.outputs_resolved());
        let checkpoint = chosen.checkpoint.unwrap();
        assert_eq!(
            (checkpoint.path.as_str(), checkpoint.location.as_str(), checkpoint.prefix.as_str()),
            ("ckpt/", "eu2", "x/")
        );
    }
}
