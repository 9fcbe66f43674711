//! The gateway against its own OpenAPI document: schemathesis (pinned, installed by
//! `scripts/install-emulators.sh`) generates requests from `/openapi.json` for every operation and
//! checks every answer (no 5xx, documented status, content type, headers and schema), against a
//! real broker and gateway on port 0. A fixed seed and a bounded number of examples keep it
//! repeatable and short. Beside it: what the document says (typed specs, decisions and prices,
//! errors on every route, the events stream as SSE), and requests the schema allows answered as
//! documented.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;
use crate::gateway::{Api, problem, send, wait_ready};
use crate::placement::shipped_snapshot;

/// The checks run on every answer. Left out: `negative_data_rejection` and
/// `positive_data_acceptance` (the schema cannot say everything the broker checks: a known GPU
/// model, a data URI's location, `to` xor `residency`), `missing_required_header`,
/// `ignored_auth` (they send requests without the key, which the address limiter counts),
/// `unsupported_method` and `allow_header_conformance` (405 answers carry no `Allow` header),
/// and the stateful checks (the document declares no links).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";
/// Examples per operation and phase; with the fixed seed the run is the same every time.
const MAX_EXAMPLES: &str = "50";
const SEED: &str = "17";

/// The jobs of this run are never placed (no agents), so their event streams and followed logs
/// would never end (as documented: they end with the job). Before each request for one, the job
/// is cancelled, as if it had finished: the stream then sends every event up to `cancelled` and
/// ends, and schemathesis checks each event against the document.
const HOOKS: &str = r#"
import os, urllib.error, urllib.parse, urllib.request
import schemathesis

STREAMS = ("/v1/jobs/{id}/events", "/v1/jobs/{id}/logs")

@schemathesis.hook
def before_call(context, case, kwargs):
    job = (case.path_parameters or {}).get("id")
    if case.operation.path not in STREAMS or not isinstance(job, str):
        return
    url = "%s/v1/jobs/%s/cancel" % (os.environ["HYBROKER_GATEWAY_URL"], urllib.parse.quote(job, safe=""))
    request = urllib.request.Request(url, method="POST", data=b"",
                                     headers={"Authorization": "Bearer " + os.environ["HYBROKER_API_KEY"]})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except (urllib.error.HTTPError, ValueError):
        pass  # not a job of this tenant, or already finished
"#;

/// `$HYBROKER_EMULATORS`, else `~/.cache/hybroker/emulators` (as `scripts/install-emulators.sh`).
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("HYBROKER_EMULATORS") {
        Some(dir) => dir.into(),
        None => Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/hybroker/emulators"),
    }
}

/// A program of the schemathesis venv (`st`, `python`).
pub fn schemathesis_bin(name: &str) -> PathBuf {
    let program = tools_dir().join("schemathesis/bin").join(name);
    assert!(
        program.exists(),
        "schemathesis is not installed: run scripts/install-emulators.sh (scripts/test.sh does); looked for {}",
        program.display()
    );
    program
}

/// A broker with sites and prices (so plans and prices have content) but no agents and no
/// capacity providers: nothing a generated job says is ever run. One admin tenant with limits
/// far above what the run sends.
fn broker_config() -> String {
    format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\", \"p5.48xlarge\"]\n\
         [[tenant]]\nname = \"fuzz\"\nadmin = true\nrequests_per_second = 100000.0\nburst = 100000\n\
         max_queued_jobs = 100000\n",
        shipped_snapshot().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failures_in_the_gateway() {
    let st = schemathesis_bin("st");
    let cluster = Cluster::start_with(Duration::from_secs(5), &[], |_| Setup {
        broker_extra: Some(broker_config()),
        ..Setup::default()
    })
    .await;
    let limits = "unauthenticated_per_second = 100000.0\nunauthenticated_burst = 100000\n";
    let gateway = cluster.start_gateway_keyed("gateway", false, limits, "");
    wait_ready(&gateway).await;
    let key = cluster.tenant_key("fuzz");
    let reports = tempfile::tempdir().unwrap();
    let junit = reports.path().join("junit.xml");
    let hooks = reports.path().join("hooks.py");
    std::fs::write(&hooks, HOOKS).unwrap();

    let started = Instant::now();
    let out = Command::new(st)
        .current_dir(reports.path())
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .env("HYBROKER_GATEWAY_URL", &gateway.url)
        .env("HYBROKER_API_KEY", &key)
        .args(["run", &format!("{}/openapi.json", gateway.url)])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--checks", CHECKS, "--max-examples", MAX_EXAMPLES, "--seed", SEED])
        .args(["--phases", "examples,coverage,fuzzing", "--workers", "2", "--request-timeout", "20"])
        .args(["--suppress-health-check", "all", "--report", "junit"])
        .args(["--report-junit-path", junit.to_str().unwrap()])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The numbers for the record: operations, phases, test cases, time.
    let summary = stdout.split_once("SUMMARY").map_or("", |(_, s)| s);
    println!("schemathesis: {:.1} s{summary}", elapsed.as_secs_f64());
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {}):\n{stdout}\n{stderr}\ngateway log (end):\n{}",
        out.status,
        tail(&gateway.log(), 40)
    );
    let report = std::fs::read_to_string(&junit).unwrap();
    assert!(report.contains("testcase"), "no operations were tested:\n{stdout}");
}

/// The served document types what it serves: job specs (JSON and YAML bodies), decisions and
/// prices; every route lists the errors it can answer; the events stream is Server-Sent Events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_types_specs_decisions_and_prices_and_lists_every_error() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let doc: Value = reqwest::get(format!("{}/openapi.json", gateway.url)).await.unwrap().json().await.unwrap();
    specs_decisions_and_prices_are_typed(&doc);
    every_route_documents_the_errors_it_can_answer(&doc);
    the_events_stream_is_described_as_server_sent_events_of_job_events(&doc);
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// Every object schema that says nothing about its fields, with where it is.
fn untyped_objects(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let is_object = map.get("type") == Some(&json!("object"));
            let described = ["properties", "additionalProperties", "allOf", "oneOf", "anyOf", "$ref"]
                .iter()
                .any(|k| map.contains_key(*k));
            if is_object && !described {
                out.push(at.to_string());
            }
            map.iter().for_each(|(k, v)| untyped_objects(v, &format!("{at}/{k}"), out));
        }
        Value::Array(items) => {
            items.iter().enumerate().for_each(|(i, v)| untyped_objects(v, &format!("{at}/{i}"), out))
        }
        _ => {}
    }
}

fn specs_decisions_and_prices_are_typed(doc: &Value) {
    let paths = &doc["paths"];
    for path in ["/v1/jobs", "/v1/plan"] {
        let content = &paths[path]["post"]["requestBody"]["content"];
        assert_eq!(content["application/json"]["schema"], schema_ref("JobSpec"), "{path}");
        assert_eq!(content["application/yaml"]["schema"], schema_ref("JobSpec"), "{path}");
    }
    let ok = |path: &str, method: &str| {
        paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"].clone()
    };
    assert_eq!(ok("/v1/plan", "post"), schema_ref("Decision"));
    assert_eq!(ok("/v1/jobs/{id}/placement", "get"), schema_ref("Decision"));
    assert_eq!(ok("/v1/prices", "get"), schema_ref("Prices"));
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Job"]["properties"]["spec"]["$ref"], schema_ref("JobSpec")["$ref"]);
    assert_eq!(schemas["JobSpec"]["additionalProperties"], false);
    assert_eq!(schemas["JobState"]["enum"].as_array().unwrap().len(), 7);
    // Only the document itself is a free-form object.
    let mut untyped = Vec::new();
    untyped_objects(doc, "", &mut untyped);
    assert_eq!(untyped, ["/paths//openapi.json/get/responses/200/content/application/json/schema"]);
}

fn every_route_documents_the_errors_it_can_answer(doc: &Value) {
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = &op["responses"];
            let problem = |code: &str| responses[code]["content"]["application/problem+json"]["schema"].clone();
            assert_eq!(problem("413"), schema_ref("Problem"), "{method} {path}: 413");
            if op.get("security").is_none() {
                continue;
            }
            for code in ["401", "429", "503"] {
                assert_eq!(problem(code), schema_ref("Problem"), "{method} {path}: {code}");
            }
            assert!(responses["429"]["headers"]["Retry-After"].is_object(), "{method} {path}");
            assert!(responses["401"]["headers"]["WWW-Authenticate"].is_object(), "{method} {path}");
        }
    }
}

fn the_events_stream_is_described_as_server_sent_events_of_job_events(doc: &Value) {
    let content = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
    assert_eq!(content.as_object().unwrap().len(), 1, "{content}");
    let event = &content["text/event-stream"]["schema"];
    assert_eq!(event["type"], "object");
    let data = &event["properties"]["data"];
    assert_eq!((&data["type"], &data["contentMediaType"]), (&json!("string"), &json!("application/json")));
    assert_eq!(data["contentSchema"]["anyOf"][0], schema_ref("JobEvent"));
    assert!(doc["components"]["schemas"]["JobEvent"].is_object());
    let last_event_id = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["parameters"][1];
    assert_eq!(
        (&last_event_id["name"], &last_event_id["schema"]["type"]),
        (&json!("Last-Event-ID"), &json!("integer"))
    );
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the schema once allowed and the gateway refused, now answered as documented; a job file
/// with a wrong type deep inside is reported at its YAML line, by the CLI and by the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_valid_requests_are_accepted_and_yaml_errors_name_their_line() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    wait_ready(&gateway).await;
    let key = cluster.tenant_key("acme");
    let api = Api::new(&gateway, &key);
    let job = json!({"name": "contract", "command": ["true"], "labels": {"team": "api"}});

    // A `null` and a `{}` cancel body cancel without a reason, as no body does.
    for body in ["null", "{}", ""] {
        let id = api.submit_ok(&job).await;
        let request = api.request(Method::POST, &format!("/v1/jobs/{id}/cancel"));
        let (status, _, cancelled) = send(request.header("content-type", "application/json").body(body)).await;
        assert_eq!(status, StatusCode::OK, "{body:?}: {cancelled}");
        assert_eq!(cancelled["state"], "cancelled", "{body:?}: {cancelled}");
    }
    // An empty `label=` (or `state=`) filters nothing; a label without a key is still refused.
    let all = api.job_ids("").await;
    assert_eq!(all.len(), 3);
    assert_eq!(api.job_ids("?label=").await, all);
    assert_eq!(api.job_ids("?label=&state=").await, all);
    assert_eq!(api.job_ids("?label=team%3Dapi").await, all);
    let (status, headers, body) = api.get("/v1/jobs?label=%3Dapi").await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).starts_with("label:"));
    // `{}` is not a job spec: the schema requires name and command, and so does the broker.
    for path in ["/v1/jobs", "/v1/plan"] {
        let (status, headers, body) = api.post(path, &json!({})).await;
        assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).contains("name"), "{path}: {body}");
    }
    // `Last-Event-ID` is a number (not nullable): `null` is refused, naming the header.
    let request = api.request(Method::GET, &format!("/v1/jobs/{}/events", all[0])).header("last-event-id", "null");
    let (status, headers, body) = send(request).await;
    assert!(problem(status, &headers, &body, StatusCode::BAD_REQUEST).starts_with("last-event-id:"));

    // A YAML body: accepted as a job file is, and a wrong type deep inside named at its line.
    let yaml = |text: &'static str| {
        api.request(Method::POST, "/v1/jobs").header("content-type", "application/yaml").body(text)
    };
    let (status, _, body) = send(yaml("name: from-yaml\ncommand: [sleep, 5]\nresources: {cpus: 1}\n")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bad = "name: x\ncommand: [a]\npolicy:\n  clouds: [aws]\n  max_wait: [1h]\n";
    let (status, headers, body) = send(yaml(bad)).await;
    let detail = problem(status, &headers, &body, StatusCode::BAD_REQUEST);
    assert!(detail.contains("policy.max_wait") && detail.contains("line 5 column 13"), "{detail}");
    let (status, headers, body) =
        send(api.request(Method::POST, "/v1/jobs").header("content-type", "text/csv").body("a,b")).await;
    assert!(problem(status, &headers, &body, StatusCode::UNSUPPORTED_MEDIA_TYPE).contains("application/yaml"));

    // The CLI reports the same file's problem at its line before sending anything.
    let file = cluster.path("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = tenant_cli(&gateway, &key, &["submit", file.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid job spec at line 5 column 13: policy.max_wait"), "{stderr}");
    assert_eq!(api.job_ids("").await.len(), 4, "the bad file made no job");
}
