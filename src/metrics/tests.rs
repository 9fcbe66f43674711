use std::collections::BTreeMap;

use super::*;

/// One parsed sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict little parser of the text format: HELP and TYPE come before a family's samples, and
/// every other line is `name{labels} value`.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}').expect("closing brace"))),
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(&name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        samples.push((name, labels, value));
    }
    (types, samples)
}

fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").expect("label=\"");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.insert(key.to_string(), value);
        s = rest[end + 1..].strip_prefix(',').unwrap_or(&rest[end + 1..]);
    }
    out
}

#[test]
fn names_match_the_declared_families() {
    let declared: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    assert_eq!(declared, NAMES);
    for f in FAMILIES {
        assert!(f.name.starts_with("hybroker_") || f.name.starts_with("process_"), "{}", f.name);
        assert_eq!(f.kind == Kind::Counter, f.name.ends_with("_total"), "{}", f.name);
        assert!(f.buckets.windows(2).all(|w| w[0] < w[1]), "{}", f.name);
        assert!(!f.labels.contains(&"job") && !f.labels.contains(&"job_id"));
    }
}

#[test]
fn renders_counters_gauges_and_escaped_labels() {
    let r = Registry::default();
    r.inc("hybroker_jobs_finished_total", &["succeeded", "lab"], 1.0);
    r.inc("hybroker_jobs_finished_total", &["succeeded", "lab"], 2.0);
    r.inc("hybroker_tls_handshake_failures_total", &["we\"ird\\\nreason"], 1.0);
    r.set_family("hybroker_agents_connected", vec![(vec!["lab".into()], 2.0), (vec!["cloud".into()], 0.0)]);
    r.set("hybroker_agent_attempts_running", &[], 3.0);
    let text = r.render();
    let (types, samples) = parse(&text);
    assert_eq!(types["hybroker_jobs_finished_total"], "counter");
    assert_eq!(types["hybroker_agents_connected"], "gauge");
    assert!(!types.contains_key("hybroker_jobs"), "empty families are left out:\n{text}");
    let find = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
            .map(|s| s.2)
    };
    assert_eq!(find("hybroker_jobs_finished_total", Some(("state", "succeeded"))), Some(3.0));
    assert_eq!(find("hybroker_tls_handshake_failures_total", Some(("reason", "we\"ird\\\nreason"))), Some(1.0));
    assert_eq!(find("hybroker_agents_connected", Some(("site", "cloud"))), Some(0.0));
    assert_eq!(find("hybroker_agent_attempts_running", None), Some(3.0));
    // Replacing a family drops the series not given again.
    r.set_family("hybroker_agents_connected", vec![(vec!["lab".into()], 1.0)]);
    assert!(!r.render().contains("cloud"));
}

#[test]
fn histogram_buckets_are_cumulative_and_end_at_the_count() {
    let r = Registry::default();
    for v in [0.00005, 0.003, 0.003, 2.0, 99.0] {
        r.observe("hybroker_gateway_request_duration_seconds", &["/v1/jobs/{id}"], v);
    }
    r.observe("hybroker_gateway_request_duration_seconds", &["/healthz"], 0.0002);
    let (types, samples) = parse(&r.render());
    assert_eq!(types["hybroker_gateway_request_duration_seconds"], "histogram");
    for route in ["/v1/jobs/{id}", "/healthz"] {
        let of = |suffix: &str| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|(n, l, _)| {
                    n == &format!("hybroker_gateway_request_duration_seconds{suffix}") && l["route"] == route
                })
                .collect()
        };
        let buckets = of("_bucket");
        let family = FAMILIES.iter().find(|f| f.name == "hybroker_gateway_request_duration_seconds").unwrap();
        assert_eq!(buckets.len(), family.buckets.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0].2 <= w[1].2), "cumulative");
        let les: Vec<f64> = buckets.iter().map(|b| b.1["le"].parse::<f64>().unwrap()).collect();
        assert!(les.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(buckets.last().unwrap().1["le"], "+Inf");
        let count = of("_count")[0].2;
        assert_eq!(buckets.last().unwrap().2, count);
        assert_eq!(count, if route == "/healthz" { 1.0 } else { 5.0 });
    }
    let sum = samples.iter().find(|(n, l, _)| n.ends_with("_sum") && l["route"] == "/v1/jobs/{id}").unwrap().2;
    assert!((sum - 101.00605).abs() < 1e-9, "{sum}");
    // 0.00005 and 0.0002 fall in the first bucket (≤ 0.0001) and the second; 99 only in +Inf.
    let first =
        samples.iter().find(|(n, l, _)| n.ends_with("_bucket") && l["route"] == "/v1/jobs/{id}" && l["le"] == "0.0001");
    assert_eq!(first.unwrap().2, 1.0);
}

/// A registry's sample value, from its rendered text.
fn sample(r: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, samples) = parse(&r.render());
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
}

#[test]
fn declared_series_read_zero_and_survive_replacing_their_family() {
    let r = Registry::default();
    r.declare("hybroker_agents_connected", &["lab"]);
    r.declare("hybroker_jobs_finished_total", &["succeeded", "lab"]);
    assert_eq!(sample(&r, "hybroker_agents_connected", &[("site", "lab")]), Some(0.0));
    assert_eq!(sample(&r, "hybroker_jobs_finished_total", &[("site", "lab")]), Some(0.0));
    r.set_family("hybroker_agents_connected", vec![(vec!["lab".into()], 2.0), (vec!["cloud".into()], 1.0)]);
    assert_eq!(sample(&r, "hybroker_agents_connected", &[("site", "lab")]), Some(2.0));
    // Left out: the declared site drops back to 0, the undeclared one disappears.
    r.set_family("hybroker_agents_connected", Vec::new());
    assert_eq!(sample(&r, "hybroker_agents_connected", &[("site", "lab")]), Some(0.0));
    assert_eq!(sample(&r, "hybroker_agents_connected", &[("site", "cloud")]), None);
    // Declaring again keeps a counter's value.
    r.inc("hybroker_jobs_finished_total", &["succeeded", "lab"], 2.0);
    r.declare("hybroker_jobs_finished_total", &["succeeded", "lab"]);
    assert_eq!(sample(&r, "hybroker_jobs_finished_total", &[("site", "lab")]), Some(2.0));
}

#[test]
fn handles_update_the_series_they_were_resolved_to() {
    let r = Registry::default();
    let counter = r.handle("hybroker_staging_bytes_total", &["in", "lab"]).unwrap();
    counter.inc(5.0);
    counter.inc(-1.0);
    r.inc("hybroker_staging_bytes_total", &["in", "lab"], 1.0);
    assert_eq!(sample(&r, "hybroker_staging_bytes_total", &[("direction", "in")]), Some(6.0));
    let histogram = r.handle("hybroker_placement_duration_seconds", &[]).unwrap();
    histogram.observe(0.002);
    assert_eq!(sample(&r, "hybroker_placement_duration_seconds_count", &[]), Some(1.0));
    assert_eq!(sample(&r, "hybroker_placement_duration_seconds_bucket", &[("le", "0.005")]), Some(1.0));
    assert_eq!(sample(&r, "hybroker_placement_duration_seconds_bucket", &[("le", "0.001")]), Some(0.0));
    // A gauge given again by `set_family` keeps its series, so its handle stays live.
    let gauge = r.handle("hybroker_queue_depth", &["lab"]).unwrap();
    r.set_family("hybroker_queue_depth", vec![(vec!["lab".into()], 3.0)]);
    assert_eq!(sample(&r, "hybroker_queue_depth", &[("site", "lab")]), Some(3.0));
    gauge.set(4.0);
    assert_eq!(sample(&r, "hybroker_queue_depth", &[("site", "lab")]), Some(4.0));
}

#[test]
fn concurrent_increments_are_all_counted() {
    const THREADS: usize = 8;
    const EACH: usize = 10_000;
    let r = Registry::default();
    let sites = ["a", "b", "c"];
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let r = &r;
            scope.spawn(move || {
                for i in 0..EACH {
                    r.inc("hybroker_jobs_finished_total", &["succeeded", sites[(t + i) % sites.len()]], 1.0);
                    r.observe("hybroker_staging_duration_seconds", &["in"], 1.0);
                }
            });
        }
    });
    let (_, samples) = parse(&r.render());
    let total: f64 = samples.iter().filter(|(n, _, _)| n == "hybroker_jobs_finished_total").map(|s| s.2).sum();
    assert_eq!(total, (THREADS * EACH) as f64);
    assert_eq!(sample(&r, "hybroker_staging_duration_seconds_count", &[]), Some((THREADS * EACH) as f64));
    assert_eq!(sample(&r, "hybroker_staging_duration_seconds_sum", &[]), Some((THREADS * EACH) as f64));
}

#[test]
fn series_render_sorted_by_label_values() {
    let r = Registry::default();
    for site in ["zeta", "alpha", "mid"] {
        r.inc("hybroker_staging_bytes_total", &["out", site], 1.0);
    }
    let (_, samples) = parse(&r.render());
    let sites: Vec<&str> = samples.iter().map(|(_, l, _)| l["site"].as_str()).collect();
    assert_eq!(sites, ["alpha", "mid", "zeta"]);
}

#[test]
fn process_stat_fields_are_counted_after_the_command_name() {
    // A command name with spaces and a parenthesis, as proc(5) allows.
    let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 150 0 0 20 0 7 0 \
                123456 2147483648 2048 18446744073709551615 1 1 0 0 0 0 0 4096 17987 0 0 0 17 3 0 0 0 0 0";
    let stats = process::parse_stat(stat).unwrap();
    assert_eq!(stats.cpu_seconds, 4.0);
    assert_eq!(stats.threads, 7.0);
    assert_eq!(stats.started_after_boot, 1234.56);
    assert_eq!(stats.virtual_bytes, 2147483648.0);
    assert_eq!(process::parse_stat("4242 (truncated) S 1 2"), None);
    assert_eq!(process::parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"), Some(1.7e9));
    assert_eq!(process::parse_resident_bytes("Name:\tx\nVmRSS:\t    2048 kB\nThreads:\t3\n"), Some(2048.0 * 1024.0));
}

#[cfg(target_os = "linux")]
#[test]
fn process_metrics_describe_this_process() {
    let r = Registry::default();
    process::publish(&r);
    process::publish_build_info(&r);
    let get = |name: &str| sample(&r, name, &[]).unwrap_or_else(|| panic!("{name} missing:\n{}", r.render()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = get("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 86_400.0, "started {started}, now {now}");
    assert!(get("process_threads") >= 1.0);
    assert!(get("process_open_fds") >= 3.0);
    assert!(get("process_max_fds") >= get("process_open_fds"));
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
    assert!(get("process_cpu_seconds_total") >= 0.0);
    let version = sample(&r, "hybroker_build_info", &[("version", env!("CARGO_PKG_VERSION"))]);
    assert_eq!(version, Some(1.0));
}

#[test]
fn a_brokers_known_sites_tenants_and_states_read_zero() {
    let site = |toml: &str| -> crate::model::site::Site { toml::from_str(toml).unwrap() };
    let sites = [
        site("name = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"eu\"\n"),
        site(
            "name = \"aws-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n[capacity]\nprovider = \"local\"\n",
        ),
    ];
    let r = Registry::default();
    declare_broker_series(&r, &sites, &["acme", "default"]);
    let zero =
        |name: &str, labels: &[(&str, &str)]| assert_eq!(sample(&r, name, labels), Some(0.0), "{name} {labels:?}");
    for site in ["lab", "aws-1"] {
        zero("hybroker_agents_connected", &[("site", site)]);
        zero("hybroker_queue_depth", &[("site", site)]);
        zero("hybroker_staging_bytes_total", &[("direction", "out"), ("site", site)]);
        zero("hybroker_cost_actual_usd_total", &[("tenant", "acme"), ("site", site)]);
        zero("hybroker_cost_estimated_usd_total", &[("tenant", "default"), ("site", site)]);
        for state in ["placed", "leased", "running"] {
            zero("hybroker_jobs", &[("state", state), ("site", site)]);
        }
    }
    for site in ["lab", "none"] {
        for state in ["succeeded", "failed", "cancelled"] {
            zero("hybroker_jobs_finished_total", &[("state", state), ("site", site)]);
        }
    }
    zero("hybroker_jobs", &[("state", "queued"), ("site", "none")]);
    zero("hybroker_queue_oldest_wait_seconds", &[("site", "none")]);
    assert_eq!(sample(&r, "hybroker_jobs", &[("state", "queued"), ("site", "lab")]), None, "queued jobs have no site");
    let info = |site: &str| sample(&r, "hybroker_site_info", &[("site", site)]).map(|_| ());
    assert!(info("lab").is_some() && info("aws-1").is_some());
    assert_eq!(sample(&r, "hybroker_site_info", &[("site", "aws-1"), ("kind", "aws"), ("elastic", "true")]), Some(1.0));
    assert_eq!(sample(&r, "hybroker_site_info", &[("site", "lab"), ("elastic", "false")]), Some(1.0));
    // A site with a capacity provider: its instances, spend and launch results read 0.
    for state in ["requested", "booting", "enrolled", "retiring"] {
        zero("hybroker_capacity_instances", &[("site", "aws-1"), ("state", state)]);
    }
    for part in ["used", "idle"] {
        zero("hybroker_capacity_usd_total", &[("site", "aws-1"), ("part", part)]);
    }
    zero("hybroker_capacity_launches_total", &[("site", "aws-1"), ("result", "boot_timeout")]);
    assert_eq!(sample(&r, "hybroker_capacity_instances", &[("site", "lab")]), None, "lab has no provider");
    // The core's tick replaces the gauges: the declared sites stay, at 0.
    r.set_family("hybroker_agents_connected", vec![(vec!["lab".into()], 2.0)]);
    r.set_family("hybroker_agents_connected", Vec::new());
    zero("hybroker_agents_connected", &[("site", "lab")]);

    let agent = Registry::default();
    declare_agent_series(&agent);
    assert_eq!(sample(&agent, "hybroker_agent_staging_bytes_total", &[("direction", "in")]), Some(0.0));
    assert_eq!(sample(&agent, "hybroker_agent_staging_bytes_total", &[("direction", "out")]), Some(0.0));
}
