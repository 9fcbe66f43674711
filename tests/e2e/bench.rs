//! `hybroker bench` as a smoke test: a small run with a broker kill and a reconnect storm must
//! complete every job and lose none. It asserts no speed: the numbers live in the bench output.

use std::process::Command;

use crate::common::BIN;

#[test]
fn a_small_bench_with_a_broker_kill_and_a_storm_completes_every_job_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("result.json");
    let out = Command::new(BIN)
        .args(["bench", "--agents", "20", "--jobs", "2000", "--kill-broker", "--storm"])
        .args(["--lease-ttl", "5s", "--deadline", "50s", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join("state/broker.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nbroker log (last lines):\n{tail}"
    );
    assert!(stdout.contains(&format!("result: {}", out_path.display())), "{stdout}");

    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(result["jobs"], 2000, "{result}");
    assert_eq!(result["submitted"], 2000, "{result}");
    assert_eq!(result["completed"], 2000, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["kill"]["lost"], 0, "{result}");
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["kill"]["acknowledged_at_kill"].as_u64().unwrap() >= 1000, "{result}");
    assert!(result["storm"]["reregistered_seconds"].is_number(), "{result}");
}

#[test]
fn the_placement_bench_runs_and_prints_its_numbers() {
    let out = Command::new(BIN).args(["bench", "placement", "--rounds", "1", "--cloud-sites", "10"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["decisions/s", "p99", "placed"] {
        assert!(stdout.contains(line), "{stdout}");
    }
}

#[test]
fn a_small_bench_with_sites_places_every_job_through_the_engine_on_the_onprem_agents() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("result.json");
    // 6 sites: 4 on-prem (the agents) and 2 cloud sites, which the tenant's cap rules out.
    let out = Command::new(BIN)
        .args(["bench", "--sites", "6", "--agents", "12", "--jobs", "1000", "--deadline", "50s", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("4 on-prem sites (the agents), 2 cloud sites"), "{stdout}");
    let config = std::fs::read_to_string(dir.path().join("state/broker.toml")).unwrap();
    assert_eq!(config.matches("[[site]]").count(), 6, "{config}");
    assert!(dir.path().join("state/prices.json").is_file());

    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!((result["sites"].as_u64(), result["completed"].as_u64()), (Some(6), Some(1000)), "{result}");
    assert_eq!((result["lost"].as_u64(), result["ok"].as_bool()), (Some(0), Some(true)), "{result}");
    assert_eq!(result["placed_by_engine"], 1000, "every job has a placement decision: {result}");
    let per_site = result["jobs_per_site"].as_object().unwrap();
    let sites: Vec<&str> = per_site.keys().map(String::as_str).collect();
    assert!(sites.iter().all(|s| ["lab-0", "lab-1", "lab-2", "lab-3"].contains(s)), "{result}");
    assert_eq!(per_site.values().map(|n| n.as_u64().unwrap()).sum::<u64>(), 1000, "{result}");
}

#[test]
fn a_small_bench_with_a_clean_broker_restart_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("result.json");
    let out = Command::new(BIN)
        .args(["bench", "--agents", "20", "--jobs", "2000", "--restart-broker"])
        .args(["--lease-ttl", "5s", "--deadline", "50s", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("state/broker.log")).unwrap_or_default();
    assert!(out.status.success(), "bench failed\nstdout:\n{stdout}\nbroker log:\n{log}");
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let restart = &result["kill"];
    assert_eq!((restart["signal"].as_str(), &result["ok"]), (Some("SIGTERM"), &true.into()), "{result}");
    assert_eq!(
        (&restart["lost"], &restart["completed_twice"], &result["extra_jobs"]),
        (&0.into(), &0.into(), &0.into())
    );
    // Well inside the broker's 10 s grace: the agents hang up when told to reconnect.
    assert!(restart["exit_seconds"].as_f64().unwrap() < 10.0, "{result}");
    assert!(restart["reregistered_seconds"].is_number(), "{result}");
    assert!(log.contains("told 20 agents to reconnect"), "{log}");
}

/// Runs `hybroker bench` with `args` in a fresh state directory; returns the result and the
/// broker's log, after asserting that it succeeded.
fn bench(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("result.json");
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--deadline", "50s", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("state/broker.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{}\nbroker log:\n{tail}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    (result, log)
}

#[test]
fn a_renewal_storm_renews_every_agent_on_its_stream_and_the_fleet_reconnects_on_the_new_certificates() {
    let (result, log) = bench(&["--agents", "20", "--jobs", "200", "--renew-storm", "--storm"]);
    let renewal = &result["renewal"];
    assert_eq!(renewal["mode"], "storm", "{result}");
    assert_eq!((&renewal["signed"], &renewal["refused"], &renewal["unanswered"]), (&20.into(), &0.into(), &0.into()));
    assert_eq!((&renewal["failed_connects"], &renewal["dropped_streams"]), (&0.into(), &0.into()), "{result}");
    assert!(renewal["broker_cpu_ms_per_renewal"].as_f64().unwrap() > 0.0, "{result}");
    // `admin agents` shows the renewed certificates' expiry, though no stream reconnected.
    assert_eq!(renewal["broker_shows_renewed"], 20, "{result}");
    // The broker signed each one (not the bench), on the agent's stream.
    assert_eq!(log.matches("agent certificate renewed").count(), 20, "{log}");
    // The reconnect storm afterwards dials on the renewed certificates, none refused.
    assert_eq!(result["storm"]["failed_connects"], 0, "{result}");
    assert_eq!(result["storm"]["on_renewed_certificates"], 20, "{result}");
    assert_eq!((&result["completed"], &result["lost"], &result["ok"]), (&200.into(), &0.into(), &true.into()));
}

#[test]
fn spread_renewals_run_alongside_the_jobs_and_the_throughput_is_compared_with_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = dir.path().join("baseline.json");
    std::fs::write(&baseline, r#"{"sustained_jobs_per_second": 1000.0}"#).unwrap();
    let baseline = baseline.to_str().unwrap();
    let (result, _) =
        bench(&["--agents", "20", "--jobs", "2000", "--renew", "--renew-window", "2s", "--baseline", baseline]);
    let renewal = &result["renewal"];
    assert_eq!((renewal["mode"].as_str(), renewal["window_seconds"].as_f64()), (Some("spread"), Some(2.0)), "{result}");
    assert_eq!((&renewal["signed"], &renewal["unanswered"], &renewal["ok"]), (&20.into(), &0.into(), &true.into()));
    assert_eq!(result["baseline"]["jobs_per_second"], 1000.0, "{result}");
    assert!(result["baseline"]["change_percent"].is_number(), "{result}");
    assert_eq!((&result["lost"], &result["ok"]), (&0.into(), &true.into()), "{result}");
}
