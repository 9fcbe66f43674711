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
        assert!(f.name.starts_with("hybroker_"));
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
        assert_eq!(buckets.len(), FAMILIES[16].buckets.len() + 1);
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
