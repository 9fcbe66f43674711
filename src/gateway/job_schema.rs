//! The JSON Schema (2020-12) of job files, `deploy/schema/job.schema.json`: generated from the
//! same types the broker validates with ([`JobSpec`] and its parts, as the OpenAPI document's
//! `JobSpec` schema), for editors (`# yaml-language-server: $schema=…`) and CI checks of job files.
//! `hybroker schema job` prints it; a test fails when the file is stale.

use serde_json::{Map, Value};
use utoipa::{PartialSchema, ToSchema};

use crate::model::job::JobSpec;

/// Where the schema says it lives (its `$id`).
pub const JOB_SCHEMA_ID: &str = "https://hybroker.dev/schema/job.schema.json";
/// The file in the repository, relative to its root.
pub const JOB_SCHEMA_FILE: &str = "deploy/schema/job.schema.json";

/// The job-file schema: the root is the `JobSpec` schema, the types it names are under `$defs`.
pub fn job_file_schema() -> Value {
    let mut named = Vec::new();
    JobSpec::schemas(&mut named);
    let mut defs = Map::new();
    for (name, schema) in named {
        defs.insert(name, to_value(&schema));
    }
    let mut root = match to_value(&JobSpec::schema()) {
        Value::Object(map) => map,
        other => Map::from_iter([("allOf".to_string(), Value::Array(vec![other]))]),
    };
    let mut doc = Map::new();
    doc.insert("$schema".into(), "https://json-schema.org/draft/2020-12/schema".into());
    doc.insert("$id".into(), JOB_SCHEMA_ID.into());
    doc.insert("title".into(), "hybroker job spec".into());
    doc.append(&mut root);
    doc.insert("$defs".into(), Value::Object(defs));
    let mut doc = Value::Object(doc);
    point_refs_at_defs(&mut doc);
    sort_keys(&mut doc);
    doc
}

/// The schema as the file holds it: pretty JSON and a final newline.
pub fn job_file_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&job_file_schema()).expect("a schema serialises");
    text.push('\n');
    text
}

fn to_value<T: serde::Serialize>(schema: &T) -> Value {
    serde_json::to_value(schema).expect("a schema serialises")
}

/// `#/components/schemas/X` (the OpenAPI document's) → `#/$defs/X`.
fn point_refs_at_defs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(s) if key == "$ref" => {
                        if let Some(name) = s.strip_prefix("#/components/schemas/") {
                            *s = format!("#/$defs/{name}");
                        }
                    }
                    _ => point_refs_at_defs(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(point_refs_at_defs),
        _ => {}
    }
}

/// Sorts every object's keys, so the file is the same whether or not serde_json keeps insertion
/// order (a feature another crate may turn on) and whatever order the types were found in.
fn sort_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, mut v) in entries {
                sort_keys(&mut v);
                map.insert(key, v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => map.iter().for_each(|(k, v)| match v {
                Value::String(s) if k == "$ref" => out.push(s.clone()),
                _ => refs(v, out),
            }),
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_schema_is_self_contained_and_closed() {
        let schema = job_file_schema();
        let mut found = Vec::new();
        refs(&schema, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r.strip_prefix("#/$defs/").unwrap_or_else(|| panic!("{r} points outside the file"));
            assert!(schema["$defs"][name].is_object(), "{r} is not defined");
        }
        assert_eq!(schema["additionalProperties"], false, "unknown fields are refused");
        assert_eq!(schema["required"], serde_json::json!(["name", "command"]));
        for part in ["Resources", "Input", "Output", "Policy", "HumanDuration", "ByteSize"] {
            assert!(schema["$defs"][part].is_object(), "{part} missing");
        }
    }

    #[test]
    fn the_file_in_the_repository_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(JOB_SCHEMA_FILE);
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            file == job_file_schema_text(),
            "{JOB_SCHEMA_FILE} is stale or missing: refresh it with `cargo run -- schema job > {JOB_SCHEMA_FILE}`"
        );
    }

    #[test]
    fn string_forms_match_what_the_broker_reads() {
        use crate::model::duration::{DURATION_PATTERN, HumanDuration};
        use crate::model::job::{RFC3339_PATTERN, deadline_at};
        use crate::model::size::{ByteSize, SIZE_PATTERN};
        let matches = |pattern: &str, text: &str| regex_lite::Regex::new(pattern).unwrap().is_match(text);
        for good in ["2h", "1h 30m", "90s", "1.5d", "500ms", "0", "2 hours", "1h30m", "3days 4h"] {
            assert!(matches(DURATION_PATTERN, good), "{good}");
            assert!(HumanDuration::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "5", "soon", "2h and more", "-1h"] {
            assert!(!matches(DURATION_PATTERN, bad), "{bad}");
            assert!(HumanDuration::parse(bad).is_err(), "{bad}");
        }
        for good in ["200GiB", "1.5 TB", "512mb", "4096", "7K", ".5GiB", "1B"] {
            assert!(matches(SIZE_PATTERN, good), "{good}");
            assert!(ByteSize::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "GiB", "-1GB", "12 parsecs", "1.2.3GB"] {
            assert!(!matches(SIZE_PATTERN, bad), "{bad}");
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        for good in ["2026-12-01T18:00:00Z", "2026-12-01T18:00:00.250Z", "2026-12-01 18:00:00"] {
            assert!(matches(RFC3339_PATTERN, good), "{good}");
            assert!(deadline_at(good, 0).is_ok(), "{good}");
        }
        for bad in ["tomorrow", "2026-12-01", "2026-12-01T18:00:00+01:00"] {
            assert!(!matches(RFC3339_PATTERN, bad), "{bad}");
        }
    }
}
