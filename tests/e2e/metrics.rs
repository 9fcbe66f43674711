//! `/metrics` on the broker, the agent and the gateway: the text format parses, and the numbers
//! match what the test did.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Cluster, DEADLINE, Setup, TENANTS, eventually, states, submit, watch_to_end};

const JOBS: usize = 3;

/// A `[metrics]` section writing its bound address to `file`.
fn section(file: &Path) -> String {
    format!("\n[metrics]\nlisten = \"127.0.0.1:0\"\naddr_file = \"{}\"\n", file.display())
}

/// Waits for a service's metrics address file.
fn metrics_addr(file: &Path) -> SocketAddr {
    let started = Instant::now();
    loop {
        if let Ok(addr) = std::fs::read_to_string(file) {
            return addr.trim().parse().unwrap();
        }
        assert!(started.elapsed() < DEADLINE, "{} was not written", file.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A plain HTTP/1.0 GET; returns the status line, headers and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

/// Feeds a scrape to `promtool check metrics` (Prometheus' own parser and linter).
async fn promtool_check(addr: SocketAddr) {
    use std::io::Write as _;
    let (_, body) = http_get(addr, "/metrics").await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-emulators.sh installs it)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\n{body}");
}

/// Scrapes `/metrics` and parses it strictly: HELP and TYPE before each family's samples, every
/// other line `name{labels} value`.
async fn scrape(addr: SocketAddr) -> Samples {
    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap();
                let labels = rest
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        assert!(typed.contains(&name) || typed.contains(family), "sample before its TYPE: {line}");
        assert!(hybroker::metrics::NAMES.contains(&family) || hybroker::metrics::NAMES.contains(&name.as_str()));
        samples.push((name, labels, value));
    }
    samples
}

/// The value of the first sample named `name` with all of `labels`.
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
}

/// The `process_*` metrics of a running service, and `hybroker_build_info`.
fn assert_process_metrics(samples: &Samples) {
    let get = |name: &str| value(samples, name, &[]).unwrap_or_else(|| panic!("no {name}: {samples:?}"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = get("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - DEADLINE.as_secs_f64() * 10.0, "started {started}, now {now}");
    assert!(get("process_cpu_seconds_total") >= 0.0);
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
    assert!(get("process_threads") >= 1.0);
    // At least stdin, stdout, stderr and a listening socket.
    assert!(get("process_open_fds") >= 4.0);
    assert!(get("process_max_fds") >= get("process_open_fds"));
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(value(samples, "hybroker_build_info", &version), Some(1.0), "{samples:?}");
}

#[tokio::test]
async fn every_service_serves_metrics_that_match_the_jobs_run() {
    let mut cluster = Cluster::start_with(Duration::from_secs(2), &[], |dir| Setup {
        broker_extra: Some(format!("{TENANTS}{}", section(&dir.join("broker.metrics")))),
        agent_extra: section(&dir.join("agent.metrics")),
        ..Setup::default()
    })
    .await;
    cluster.start_agent("node-1", "2xL4-24GB");
    let gateway = cluster.start_gateway_with("gateway", false, &section(&cluster.path("gateway.metrics")));
    let broker = metrics_addr(&cluster.path("broker.metrics"));
    let agent = metrics_addr(&cluster.path("agent.metrics"));
    let gateway_metrics = metrics_addr(&cluster.path("gateway.metrics"));

    let mut admin = cluster.admin().await;
    for i in 0..JOBS {
        let id =
            submit(&mut admin, &format!("name: m{i}\ncommand: [sh, -c, 'echo {i}']\nresources: {{gpus: 1}}\n")).await;
        let events = watch_to_end(&mut admin, &id).await;
        assert_eq!(states(&events).last(), Some(&"succeeded"), "{events:?}");
    }
    // A client that speaks no TLS at all is a failed handshake.
    let mut garbage = tokio::net::TcpStream::connect(cluster.addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(garbage);

    let samples = eventually("broker metrics after the jobs", || async {
        let s = scrape(broker).await;
        let ready = value(&s, "hybroker_agents_connected", &[("site", "lab")]) == Some(1.0)
            && value(&s, "hybroker_tls_handshake_failures_total", &[("reason", "bad_message")])
                .is_some_and(|n| n >= 1.0)
            && s.iter().filter(|(n, _, _)| n == "hybroker_jobs").all(|(_, _, v)| *v == 0.0);
        ready.then_some(s)
    })
    .await;
    // Known sites and states read 0 rather than nothing: `none` (queued jobs) and the agent's site.
    assert_eq!(value(&samples, "hybroker_jobs", &[("state", "queued"), ("site", "none")]), Some(0.0));
    assert_eq!(value(&samples, "hybroker_jobs", &[("state", "running"), ("site", "lab")]), Some(0.0));
    assert_eq!(value(&samples, "hybroker_queue_depth", &[("site", "lab")]), Some(0.0));
    assert_eq!(value(&samples, "hybroker_jobs_finished_total", &[("state", "failed"), ("site", "none")]), Some(0.0));
    assert_process_metrics(&samples);
    let finished = value(&samples, "hybroker_jobs_finished_total", &[("state", "succeeded"), ("site", "lab")]);
    assert_eq!(finished, Some(JOBS as f64), "{samples:?}");
    assert_eq!(value(&samples, "hybroker_submit_to_dispatch_seconds_count", &[]), Some(JOBS as f64));
    assert_eq!(value(&samples, "hybroker_submit_to_dispatch_seconds_bucket", &[("le", "+Inf")]), Some(JOBS as f64));
    // Millisecond timestamps: jobs dispatched within the millisecond of their submit add 0.
    assert!(value(&samples, "hybroker_submit_to_dispatch_seconds_sum", &[]).is_some_and(|s| s.is_finite() && s >= 0.0));

    let samples = eventually("agent metrics", || async {
        let s = scrape(agent).await;
        (value(&s, "hybroker_agent_attempts_running", &[]) == Some(0.0)).then_some(s)
    })
    .await;
    for gpu in ["0", "1"] {
        let at = [("gpu", gpu), ("model", "L4-24GB")];
        assert_eq!(value(&samples, "hybroker_gpu_healthy", &at), Some(1.0), "{samples:?}");
        assert!(value(&samples, "hybroker_gpu_memory_total_bytes", &at).is_some_and(|b| b > 20e9), "{samples:?}");
        for name in ["utilization_ratio", "memory_used_bytes", "temperature_celsius", "power_watts", "ecc_errors_total"]
        {
            assert!(value(&samples, &format!("hybroker_gpu_{name}"), &at).is_some(), "{name}: {samples:?}");
        }
    }
    assert!(value(&samples, "hybroker_gpu_healthy", &[("gpu", "2")]).is_none());
    assert_eq!(value(&samples, "hybroker_agent_staging_bytes_total", &[("direction", "out")]), Some(0.0));
    assert_process_metrics(&samples);

    let (head, _) = http_get(gateway.url.strip_prefix("http://").unwrap().parse().unwrap(), "/healthz").await;
    assert!(head.contains(" 200 "), "{head}");
    let samples = scrape(gateway_metrics).await;
    let labels = [("route", "/healthz"), ("method", "GET"), ("status", "200")];
    assert!(value(&samples, "hybroker_gateway_requests_total", &labels).is_some_and(|n| n >= 1.0), "{samples:?}");
    let count = value(&samples, "hybroker_gateway_request_duration_seconds_count", &[("route", "/healthz")]);
    assert!(count.is_some_and(|n| n >= 1.0), "{samples:?}");
    assert_process_metrics(&samples);
    for addr in [broker, agent, gateway_metrics] {
        promtool_check(addr).await;
    }
    drop(gateway);
    cluster.kill_agent("node-1");
}

/// A broker with sites configured and no agent yet: every configured site, tenant and job state
/// reads 0, and each site's kind and elasticity are there for the alert rules.
#[tokio::test]
async fn a_broker_reports_its_configured_sites_and_tenants_at_zero() {
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let cluster = Cluster::start_with(Duration::from_secs(2), &[], |dir| Setup {
        broker_extra: Some(format!(
            "[prices]\nsnapshot = \"{}\"\n\
             [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
             [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
             [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
             instance_types = [\"g6.xlarge\"]\n{}\
             [[tenant]]\nname = \"acme\"\n{}",
            snapshot.display(),
            crate::common::no_boot_capacity(),
            section(&dir.join("broker.metrics"))
        )),
        broker_env: crate::common::enrolling(dir, "24h"),
        ..Setup::default()
    })
    .await;
    let samples = scrape(metrics_addr(&cluster.path("broker.metrics"))).await;
    for site in ["lab", "aws-us-east-1"] {
        assert_eq!(value(&samples, "hybroker_agents_connected", &[("site", site)]), Some(0.0), "{samples:?}");
        assert_eq!(value(&samples, "hybroker_queue_depth", &[("site", site)]), Some(0.0));
        assert_eq!(value(&samples, "hybroker_jobs", &[("state", "running"), ("site", site)]), Some(0.0));
        for state in ["succeeded", "failed", "cancelled"] {
            assert_eq!(value(&samples, "hybroker_jobs_finished_total", &[("state", state), ("site", site)]), Some(0.0));
        }
        for tenant in ["acme", "default"] {
            let at = [("tenant", tenant), ("site", site)];
            assert_eq!(value(&samples, "hybroker_cost_estimated_usd_total", &at), Some(0.0), "{samples:?}");
            assert_eq!(value(&samples, "hybroker_cost_actual_usd_total", &at), Some(0.0));
        }
    }
    let info = |site: &str, kind: &str, elastic: &str| {
        value(&samples, "hybroker_site_info", &[("site", site), ("kind", kind), ("elastic", elastic)])
    };
    assert_eq!(info("lab", "onprem", "false"), Some(1.0), "{samples:?}");
    assert_eq!(info("aws-us-east-1", "aws", "true"), Some(1.0));
    assert_eq!(value(&samples, "hybroker_jobs", &[("state", "queued"), ("site", "none")]), Some(0.0));
    assert_process_metrics(&samples);
    promtool_check(metrics_addr(&cluster.path("broker.metrics"))).await;
}
