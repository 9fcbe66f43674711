use super::*;

const LIMIT: usize = 64 * 1024;

#[test]
fn full_design_spec_parses_and_only_later_features_are_refused() {
    let yaml = r#"
name: finetune-resnet
command: ["python3", "train.py", "--epochs", "3"]
env: {BATCH_SIZE: "256"}
resources:
  gpus: 2
  gpu_model: [H100-80GB, A100-80GB]
  cpus: 16
  memory_gib: 64
expected_runtime: 2h
max_runtime: 6h
max_attempts: 3
priority: 50
inputs:
  - uri: s3://acme-datasets-eu/imagenet-mini/
    path: data/
outputs:
  - path: out/
    to: az://acmeml/results/
policy:
  residency: eu
  clouds: [aws, azure]
  max_usd_per_hour: 40
  max_usd_total: 200
  spot: allowed
  deadline: 2026-12-01T18:00:00Z
labels: {team: vision}
"#;
    JobSpec::from_yaml(yaml.as_bytes(), LIMIT).unwrap();
    let both = "name: x\ncommand: [echo]\noutputs: [{path: out/, residency: eu, to: 's3://b/x/'}]\n";
    let SpecError::Invalid(errors) = JobSpec::from_yaml(both.as_bytes(), LIMIT).unwrap_err() else { panic!() };
    assert_eq!(errors[0].field, "outputs[0]");
}

#[test]
fn defaults_and_json_round_trip() {
    let spec = JobSpec::from_yaml(b"name: x\ncommand: [echo, hi]\nmax_runtime: 90s\n", LIMIT).unwrap();
    assert_eq!(spec.max_attempts, 3);
    assert_eq!(spec.priority, 50);
    assert_eq!(spec.resources, Resources::default());
    assert_eq!(spec.max_runtime(), Duration::from_secs(90));
    let again = JobSpec::from_json(spec.to_json().as_bytes(), LIMIT).unwrap();
    assert_eq!(again, spec);
}

#[test]
fn secret_env_is_validated_like_env_and_never_shown() {
    let yaml = "name: x\ncommand: [env]\nenv: {A: '1'}\nsecret_env: {TOKEN: hunter2-value, PIN: 4321}\n";
    let spec = JobSpec::from_yaml(yaml.as_bytes(), LIMIT).unwrap();
    assert_eq!(spec.secret_env["TOKEN"].expose(), "hunter2-value");
    assert_eq!(spec.secret_env["PIN"].expose(), "4321");
    for shown in [format!("{spec:?}"), spec.to_json()] {
        assert!(!shown.contains("hunter2-value") && !shown.contains("4321"), "{shown}");
        assert!(shown.contains("TOKEN") && shown.contains("<redacted>"), "{shown}");
    }
    // What the store keeps reads back as the names with the placeholder.
    let stored = JobSpec::from_json(spec.to_json().as_bytes(), LIMIT).unwrap();
    assert_eq!(stored, spec.without_secret_values());
    assert_eq!(stored.secret_env["TOKEN"].expose(), "<redacted>");

    let bad = format!(
        "name: x\ncommand: [env]\nenv: {{A: '1'}}\nsecret_env: {{A: s, 1B: s, HYBROKER_X: s, BIG: {}}}\n",
        "v".repeat(40 * 1024)
    );
    let SpecError::Invalid(errors) = JobSpec::from_yaml(bad.as_bytes(), 128 * 1024).unwrap_err() else { panic!() };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["secret_env.1B", "secret_env.A", "secret_env.BIG", "secret_env.HYBROKER_X"], "{errors:?}");
    assert!(errors[1].message.contains("also in env"), "{errors:?}");
    assert!(errors.iter().all(|e| !e.message.contains("vvvv")), "{errors:?}");
    let many: String = (0..65).map(|i| format!("S{i}: v\n  ")).collect();
    let many = format!("name: x\ncommand: [env]\nsecret_env:\n  {many}\n");
    let SpecError::Invalid(errors) = JobSpec::from_yaml(many.as_bytes(), LIMIT).unwrap_err() else { panic!() };
    assert_eq!(errors[0].field, "secret_env", "{errors:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = b"name: ''\ncommand: []\npriority: 101\nmax_attempts: 0\nresources: {cpus: 0}\n";
    let SpecError::Invalid(errors) = JobSpec::from_yaml(yaml, LIMIT).unwrap_err() else { panic!() };
    let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["name", "command", "resources.cpus", "max_attempts", "priority"]);
}

#[test]
fn unknown_fields_and_enum_values_name_their_place() {
    let err = JobSpec::from_yaml(b"name: x\ncommand: [echo]\nresources: {gpu: 1}\n", LIMIT).unwrap_err();
    assert!(err.to_string().contains("resources") && err.to_string().contains("gpu"), "{err}");
    let err = JobSpec::from_json(br#"{"name":"x","command":["echo"],"policy":{"spot":"maybe"}}"#, LIMIT).unwrap_err();
    assert!(err.to_string().contains("policy.spot"), "{err}");
}

#[test]
fn data_uris_are_the_ssrf_guard() {
    for ok in ["s3://bucket/key", "s3://bucket/prefix/", "az://acct/container/path", "local://scratch/x"] {
        assert_eq!(check_data_uri(ok), Ok(()), "{ok}");
    }
    for bad in [
        "http://169.254.169.254/latest",
        "https://bucket.s3.amazonaws.com/x",
        "file:///etc/passwd",
        "gs://bucket/x",
        "s3://user:pw@bucket/x",
        "s3://bucket/%2e%2e/secret",
        "s3://bucket/../other",
        "s3:///key",
        "az://acct",
        "s3://bucket/x?versionId=1",
        "bucket/key",
    ] {
        assert!(check_data_uri(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn oversized_specs_are_refused_before_parsing() {
    let doc = vec![b' '; LIMIT + 1];
    assert_eq!(JobSpec::from_yaml(&doc, LIMIT), Err(SpecError::TooLarge { size: LIMIT + 1, limit: LIMIT }));
}

#[test]
fn bidi_and_control_characters_are_refused_in_names_labels_and_paths_naming_the_field() {
    let refused = |json: &str| -> Vec<FieldError> {
        match JobSpec::from_json(json.as_bytes(), LIMIT) {
            Err(SpecError::Invalid(errors)) => errors,
            other => panic!("{json}: {other:?}"),
        }
    };
    for c in ["\\u202e", "\\u202a", "\\u2066", "\\u2069", "\\u200e", "\\u200f", "\\u001b", "\\u0085"] {
        let errors = refused(&format!(r#"{{"name":"report{c}fdp.exe","command":["true"]}}"#));
        assert_eq!(errors[0].field, "name", "{c}");
        assert!(errors[0].message.contains("bidirectional formatting"), "{c}: {}", errors[0].message);
        let errors = refused(&format!(r#"{{"name":"x","command":["true"],"labels":{{"team":"a{c}b"}}}}"#));
        assert_eq!(errors[0].field, "labels.team", "{c}");
    }
    // A key with one is refused too, and named escaped, never raw.
    let errors = refused(r#"{"name":"x","command":["true"],"labels":{"te\u202eam":"a"}}"#);
    assert_eq!(errors[0].field, "labels.te\\u{202e}am");
    let errors = refused(r#"{"name":"x","command":["true"],"outputs":[{"path":"out\u202e/","to":"s3://b/x/"}]}"#);
    assert!(errors[0].message.contains("out\\u{202e}/"), "{:?}", errors[0]);
    // Other scripts and right-to-left text without controls are names like any other.
    let spec = r#"{"name":"تدريب-模型-é","command":["true"],"labels":{"team":"ج"}}"#;
    assert!(JobSpec::from_json(spec.as_bytes(), LIMIT).is_ok());
}

#[test]
fn a_checkpoint_is_checked_like_an_output() {
    let spec = "name: x\ncommand: [true]\ncheckpoint: {path: ckpt/, to: 's3://b/ckpt/'}\n";
    let spec = JobSpec::from_yaml(spec.as_bytes(), LIMIT).unwrap();
    assert_eq!(spec.checkpoint, Some(Checkpoint { path: "ckpt/".into(), to: Some("s3://b/ckpt/".into()) }));
    let follows = "name: x\ncommand: [true]\noutputs: [{path: out/, residency: eu}]\ncheckpoint: {path: ckpt}\n";
    assert!(JobSpec::from_yaml(follows.as_bytes(), LIMIT).is_ok(), "to defaults to the first output's location");
    let bad = "name: x\ncommand: [true]\ncheckpoint: {path: ../up, to: 'http://169.254.169.254/'}\n";
    let SpecError::Invalid(errors) = JobSpec::from_yaml(bad.as_bytes(), LIMIT).unwrap_err() else { panic!() };
    let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["checkpoint.path", "checkpoint.to"], "every problem at once");
    let nowhere = "name: x\ncommand: [true]\ncheckpoint: {path: ckpt/}\n";
    let SpecError::Invalid(errors) = JobSpec::from_yaml(nowhere.as_bytes(), LIMIT).unwrap_err() else { panic!() };
    assert_eq!(errors[0].field, "checkpoint.to");
    assert!(errors[0].message.contains("give `to`"), "{}", errors[0].message);
}

#[test]
fn a_deadline_is_a_time_or_a_duration_from_submit() {
    use super::deadline_at;
    assert_eq!(deadline_at("2026-12-01T18:00:00Z", 0), Ok(1_796_148_000_000));
    assert_eq!(deadline_at("4h", 1_000), Ok(1_000 + 4 * 3_600_000));
    assert!(deadline_at("soonish", 0).unwrap_err().contains("neither an RFC 3339 time"));
    // A duration too long for milliseconds stays far in the future instead of wrapping into the past.
    assert_eq!(deadline_at("1000000000 years", 1_000), Ok(i64::MAX));
}

#[test]
fn yaml_type_errors_name_the_field_and_its_yaml_line_and_column() {
    let doc = "name: x\ncommand: [a]\npolicy:\n  clouds: [aws]\n  max_usd_total: lots\n";
    let e = JobSpec::from_yaml(doc.as_bytes(), 1 << 20).unwrap_err().to_string();
    assert!(e.contains(": policy.max_usd_total: invalid type") && e.contains("line 5 column 18"), "{e}");
    assert!(!e.contains("line 1 column"), "{e}");
    assert_eq!(e.matches("max_usd_total").count(), 1, "{e}");
}
