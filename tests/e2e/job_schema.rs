//! `deploy/schema/job.schema.json` as editors and CI tools use it: every example job file
//! validates against it with a real JSON Schema validator (jsonschema-rs from the schemathesis
//! venv, draft 2020-12), carries the editor hint that names it, and wrong files do not validate.

use std::path::Path;
use std::process::Command;

use crate::schemathesis::schemathesis_bin;

const HINT: &str = "# yaml-language-server: $schema=../deploy/schema/job.schema.json";

/// Validates each YAML file (read as editors read it: timestamps stay strings) against the schema;
/// prints `ok PATH` or `bad PATH: errors` per file.
const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema_rs
class Loader(yaml.SafeLoader):
    pass
Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
                                  for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
schema = json.load(open(sys.argv[1]))
validator = jsonschema_rs.Draft202012Validator(schema)
for path in sys.argv[2:]:
    doc = yaml.load(open(path), Loader=Loader)
    errors = ["%s: %s" % ("/".join(map(str, e.instance_path)), e.message) for e in validator.iter_errors(doc)]
    print(("bad %s: %s" % (path, "; ".join(errors))) if errors else ("ok " + path))
"#;

fn validate(files: &[&Path]) -> Vec<String> {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/schema/job.schema.json");
    let out =
        Command::new(schemathesis_bin("python")).args(["-c", VALIDATE]).arg(&schema).args(files).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

#[test]
fn every_example_validates_against_the_job_schema_and_names_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    examples.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    for example in &examples {
        let text = std::fs::read_to_string(example).unwrap();
        assert!(text.lines().any(|l| l == HINT), "{} lacks the editor hint `{HINT}`", example.display());
    }
    let paths: Vec<&Path> = examples.iter().map(|p| p.as_path()).collect();
    let results = validate(&paths);
    assert_eq!(results.len(), examples.len(), "{results:?}");
    for line in &results {
        assert!(line.starts_with("ok "), "{line}");
    }
}

#[test]
fn wrong_job_files_do_not_validate() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("no-command.yaml", "name: x\n", "command"),
        ("wrong-type.yaml", "name: x\ncommand: [a]\nresources: {gpus: two}\n", "resources/gpus"),
        ("unknown.yaml", "name: x\ncommand: [a]\ngpus: 2\n", "gpus"),
        ("bad-duration.yaml", "name: x\ncommand: [a]\nmax_runtime: soon\n", "max_runtime"),
        (
            "bad-size.yaml",
            "name: x\ncommand: [a]\ninputs: [{uri: s3://b/k, path: in, size_hint: 12 parsecs}]\n",
            "size_hint",
        ),
        ("bad-deadline.yaml", "name: x\ncommand: [a]\npolicy: {deadline: tomorrow}\n", "deadline"),
        ("too-many-gpus.yaml", "name: x\ncommand: [a]\nresources: {gpus: 65}\n", "gpus"),
    ];
    let mut files = Vec::new();
    for (name, text, _) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "name: x\ncommand: [a]\nmax_runtime: 1h 30m\npolicy: {deadline: 2026-12-01T18:00:00Z}\n")
        .unwrap();
    files.push(good);
    let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let results = validate(&paths);
    for ((name, _, field), line) in cases.iter().zip(&results) {
        assert!(line.starts_with("bad ") && line.contains(field), "{name}: {line}");
    }
    assert!(results.last().unwrap().starts_with("ok "), "{results:?}");
}
