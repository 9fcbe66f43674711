//! Job spec files: YAML (docs/design.md §3) converted to the JSON the API takes, or a `.json` file sent as
//! is. Problems a file has on its own (unreadable, not YAML, not a mapping, a field of the wrong type
//! or unknown) are reported here, naming the file, line and column; what the values mean is the
//! gateway's to check, so its answer names the field.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use crate::model::job::JobSpec;

/// The request body for `POST /v1/jobs` from a spec file.
pub fn request_body(path: &Path) -> anyhow::Result<Vec<u8>> {
    let doc = std::fs::read(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let value: Value = serde_json::from_slice(&doc)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: not valid JSON: {e}", path.display(), e.line(), e.column()))?;
        check_mapping(&value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(doc);
    }
    let text = std::str::from_utf8(&doc)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (byte {})", path.display(), e.valid_up_to()))?;
    let value = yaml_to_json(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    check_field_types(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::to_vec(&value)?)
}

/// The spec's fields whose values are strings however YAML types them: `command: [sleep, 5]` and
/// `env: {BATCH_SIZE: 256}` mean the strings `"5"` and `"256"`, as when the broker reads the YAML.
#[derive(Deserialize)]
struct StringFields {
    name: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    secret_env: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
}

/// Converts a YAML job spec to JSON. Errors name the line (and column) of the problem.
pub fn yaml_to_json(text: &str) -> Result<Value, String> {
    let mut value: Value = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(at) => format!("invalid YAML at line {} column {}: {}", at.line(), at.column(), strip_location(&e)),
        None => format!("invalid YAML: {e}"),
    })?;
    check_mapping(&value)?;
    // Lenient where the broker's YAML reading is lenient; anything else is left to the gateway.
    if let (Ok(strings), Some(map)) = (serde_yaml_ng::from_str::<StringFields>(text), value.as_object_mut()) {
        let StringFields { name, command, env, secret_env, labels } = strings;
        if let Some(name) = name {
            map.insert("name".into(), Value::String(name));
        }
        if let Some(command) = command {
            map.insert("command".into(), command.into());
        }
        for (key, strings) in [("env", env), ("secret_env", secret_env), ("labels", labels)] {
            if let Some(strings) = strings {
                let object = strings.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                map.insert(key.into(), Value::Object(object));
            }
        }
    }
    Ok(value)
}

/// Reads the YAML into the spec's types as the broker reads a YAML spec, so a field of the wrong
/// type (or an unknown one) is reported at its line and column in the file, not at a position in
/// the JSON it is sent as.
fn check_field_types(text: &str) -> Result<(), String> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let Err(e) = serde_path_to_error::deserialize::<_, JobSpec>(de) else { return Ok(()) };
    // With a position, serde_yaml_ng's message names the field (or an unknown one's mapping).
    Err(match e.inner().location() {
        Some(at) => {
            format!("invalid job spec at line {} column {}: {}", at.line(), at.column(), strip_location(e.inner()))
        }
        None => format!("invalid job spec: {}: {}", e.path(), e.inner()),
    })
}

fn check_mapping(value: &Value) -> Result<(), String> {
    if value.is_object() {
        Ok(())
    } else {
        Err("a job spec must be a mapping of fields (name, command, resources, …)".into())
    }
}

/// The error's message without its trailing `at line L column C` (shown first instead).
fn strip_location(e: &serde_yaml_ng::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => format!("{}{}", &text[..i], text[i..].find(',').map_or("", |j| &text[i + j..])),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_specs_become_the_same_json_fields() {
        let yaml = "name: train\ncommand: [\"python3\", \"train.py\"]\nresources:\n  gpus: 2\n  gpu_model: [H100-80GB]\n\
                    max_runtime: 6h\npolicy:\n  max_usd_per_hour: 40.5\n  spot: allowed\n";
        let json = yaml_to_json(yaml).unwrap();
        assert_eq!(
            json,
            json!({"name": "train", "command": ["python3", "train.py"],
                   "resources": {"gpus": 2, "gpu_model": ["H100-80GB"]}, "max_runtime": "6h",
                   "policy": {"max_usd_per_hour": 40.5, "spot": "allowed"}})
        );
    }

    #[test]
    fn string_fields_stay_strings_as_written() {
        let yaml = "name: 2024\ncommand: [sleep, 5]\nenv: {BATCH_SIZE: 256, DEBUG: true}\nlabels: {run: 7}\n\
                    secret_env: {PIN: 0042}\n";
        let json = yaml_to_json(yaml).unwrap();
        assert_eq!(
            json,
            json!({"name": "2024", "command": ["sleep", "5"], "env": {"BATCH_SIZE": "256", "DEBUG": "true"},
                   "labels": {"run": "7"}, "secret_env": {"PIN": "0042"}})
        );
    }

    #[test]
    fn unknown_fields_and_odd_types_are_passed_on_for_the_gateway_to_name() {
        let json = yaml_to_json("name: x\ncommand: [a]\ngpus: 2\nenv: [a, b]\n").unwrap();
        assert_eq!(json, json!({"name": "x", "command": ["a"], "gpus": 2, "env": ["a", "b"]}));
    }

    #[test]
    fn bad_yaml_names_the_line() {
        let e = yaml_to_json("name: x\ncommand: [a\nresources: {gpus: 1}\n").unwrap_err();
        assert!(e.starts_with("invalid YAML at line 3 column 10: did not find expected ',' or ']', while"), "{e}");
        let e = yaml_to_json("name: x\n  bad: indent\n").unwrap_err();
        assert!(e.starts_with("invalid YAML at line 2"), "{e}");
    }

    #[test]
    fn a_wrong_type_deep_in_a_file_is_reported_at_its_yaml_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.yaml");
        let doc = "# a job\nname: x\ncommand: [a]\npolicy:\n  clouds: [aws]\n  max_usd_total: lots\n";
        std::fs::write(&file, doc).unwrap();
        let e = request_body(&file).unwrap_err().to_string();
        let want = format!(
            "{}: invalid job spec at line 6 column 18: policy.max_usd_total: invalid type: string",
            file.display()
        );
        assert!(e.starts_with(&want), "{e}");
        // Unknown fields too, where they are.
        std::fs::write(&file, "name: x\ncommand: [a]\nresources:\n  gpu: 2\n").unwrap();
        let e = request_body(&file).unwrap_err().to_string();
        assert!(e.contains("invalid job spec at line 4 column 3: resources: unknown field `gpu`,"), "{e}");
        // Durations and sizes too.
        std::fs::write(&file, "name: x\ncommand: [a]\ninputs:\n  - {uri: s3://b/k, path: in, size_hint: 12 parsecs}\n")
            .unwrap();
        let e = request_body(&file).unwrap_err().to_string();
        assert!(
            e.contains("invalid job spec at line 4 column 42: inputs[0].size_hint: \"12 parsecs\" is not a size"),
            "{e}"
        );
        std::fs::write(&file, "name: x\ncommand: [a]\nmax_runtime: soon\n").unwrap();
        let e = request_body(&file).unwrap_err().to_string();
        assert!(e.contains("invalid job spec at line 3 column 14: max_runtime: \"soon\" is not a duration"), "{e}");
        // Secret values are never quoted, even when their type is wrong.
        std::fs::write(&file, "name: x\ncommand: [a]\nsecret_env: {TOKEN: [hunter2]}\n").unwrap();
        let e = request_body(&file).unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_spec_must_be_a_mapping() {
        for doc in ["", "- a\n- b\n", "just text\n"] {
            let e = yaml_to_json(doc).unwrap_err();
            assert!(e.contains("mapping") || e.contains("invalid YAML"), "{doc:?}: {e}");
        }
    }

    #[test]
    fn files_name_themselves_in_errors_and_json_goes_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "name: x\ncommand: [a\n").unwrap();
        let e = request_body(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: invalid YAML at line", bad.display())), "{e}");

        let json = dir.path().join("job.json");
        let doc = "{ \"name\": \"x\",\n  \"command\": [\"a\"] }";
        std::fs::write(&json, doc).unwrap();
        assert_eq!(request_body(&json).unwrap(), doc.as_bytes());
        std::fs::write(&json, "{\n\"name\": }").unwrap();
        let e = request_body(&json).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2:", json.display())), "{e}");

        let e = request_body(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.yaml"));
    }

    #[test]
    fn every_example_converts() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let body = request_body(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let json: Value = serde_json::from_slice(&body).unwrap();
            crate::model::job::JobSpec::from_json(json.to_string().as_bytes(), 1 << 20)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}
