//! The gateway against its own OpenAPI document: schemathesis (pinned, installed by
//! `scripts/install-emulators.sh`) generates requests from `/openapi.json` for every operation and
//! checks every answer (no 5xx, documented status, content type, headers and schema), against a
//! real broker and gateway on port 0. A fixed seed and a bounded number of examples keep it
//! repeatable and short.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::gateway::wait_ready;
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
const MAX_EXAMPLES: &str = "25";
const SEED: &str = "17";

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

    let started = Instant::now();
    let out = Command::new(st)
        .current_dir(reports.path())
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
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
    // The numbers for the record: operations, test cases, time.
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("operations") || l.contains("test cases") || l.contains("passed"))
        .collect();
    println!("schemathesis: {:.1} s\n{}", elapsed.as_secs_f64(), summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {}):\n{stdout}\n{stderr}\ngateway log:\n{}",
        out.status,
        std::fs::read_to_string(&gateway.log).unwrap_or_default()
    );
    let report = std::fs::read_to_string(&junit).unwrap();
    assert!(report.contains("testcase"), "no operations were tested:\n{stdout}");
}
