//! The operators' observability stack in `deploy/`, checked statically (its images are not available
//! here): Prometheus' config and alert rules pass `promtool`, the compose file and Grafana's
//! provisioning parse and fit together, and every query in the dashboards and alert rules names a
//! metric family the code exports ([`hybroker::metrics::NAMES`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn files_in(dir: &Path, ext: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| ext.contains(&e)))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {ext:?} files in {}", dir.display());
    files
}

/// The `hybroker_*` metric names a PromQL expression mentions (label values such as
/// `job="hybroker-agent"` are not names).
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("hybroker_").map(|i| from + i) {
        let end = at + bytes[at..].iter().take_while(|&&b| ident(b)).count();
        if at == 0 || !ident(bytes[at - 1]) {
            names.push(expr[at..end].to_owned());
        }
        from = end;
    }
    names
}

/// Whether `name` is an exported family, or a histogram's `_bucket`/`_sum`/`_count` series of one.
fn exported(name: &str) -> bool {
    let names = hybroker::metrics::NAMES;
    names.contains(&name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|family| names.contains(&family)))
}

/// Checks one PromQL expression: it queries something, and every metric it names is exported.
fn check_promql(expr: &str, at: &str, unknown: &mut Vec<String>) -> Vec<String> {
    let names = metric_names(expr);
    assert!(
        !names.is_empty() || expr.contains("up{") || expr.starts_with("up"),
        "{at}: `{expr}` names no hybroker metric (nor `up`)"
    );
    for name in &names {
        if !exported(name) {
            unknown.push(format!("{at}: `{name}` in `{expr}`"));
        }
    }
    names
}

fn run_promtool(args: &[&str]) {
    let out = match Command::new("promtool").args(args).current_dir(deploy()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("promtool is not installed: run scripts/install-emulators.sh (Debian's `prometheus` package)")
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_prometheus_config_and_alert_rules() {
    // `check config` also checks the rule files it names, relative to the config file.
    run_promtool(&["check", "config", "prometheus/prometheus.yml"]);
    run_promtool(&["check", "rules", "prometheus/alerts.yml"]);
}

/// The alert rules' unit tests (`prometheus/alerts_test.yml`): with every configured site reported
/// (0 included), "site has no agents" fires for a site with none, not for an elastic one.
#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    run_promtool(&["test", "rules", "prometheus/alerts_test.yml"]);
}

#[test]
fn prometheus_scrapes_every_service_and_the_alerts_cover_the_fleet() {
    let config = yaml(&deploy().join("prometheus/prometheus.yml"));
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| job["job_name"].as_str().expect("job_name"))
        .collect();
    for role in ["broker", "gateway", "agent"] {
        assert!(jobs.contains(&format!("hybroker-{role}").as_str()), "no scrape job for the {role}: {jobs:?}");
    }
    // The agents come from the broker's service discovery on its metrics listener.
    let agent_job = config["scrape_configs"].as_sequence().unwrap().iter().find(|j| j["job_name"] == "hybroker-agent");
    let discovery =
        agent_job.and_then(|j| j["http_sd_configs"][0]["url"].as_str()).expect("agents from http_sd_configs");
    let broker = config["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str().expect("the broker's target");
    assert_eq!(
        discovery,
        format!("http://{broker}/sd/agents"),
        "agents are discovered at the broker's metrics listener"
    );

    let rules = yaml(&deploy().join("prometheus/alerts.yml"));
    let mut unknown = Vec::new();
    let mut queried = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
            assert!(rule["for"].as_str().is_some(), "{name}: no `for`");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{name}: no severity label");
            for annotation in ["summary", "description"] {
                assert!(rule["annotations"][annotation].as_str().is_some(), "{name}: no {annotation}");
            }
            queried.extend(check_promql(expr, name, &mut unknown));
            if expr.starts_with("up{") {
                queried.insert("up".to_owned());
            }
        }
    }
    assert!(unknown.is_empty(), "alert rules query metrics the code does not export:\n{}", unknown.join("\n"));
    // Agent lost, GPU unhealthy, price feed stale, queue wait over target, tenant near budget,
    // launches that did not enrol.
    for metric in [
        "up",
        "hybroker_capacity_launches_total",
        "hybroker_gpu_healthy",
        "hybroker_price_feed_stale",
        "hybroker_queue_oldest_wait_seconds",
        "hybroker_tenant_budget_used_ratio",
    ] {
        assert!(queried.contains(metric), "no alert on {metric}");
    }
}

/// Every panel, rows' collapsed panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

#[test]
fn dashboards_parse_and_query_only_exported_metrics() {
    let datasources = yaml(&deploy().join("grafana/provisioning/datasources/datasources.yaml"));
    let uids: BTreeSet<&str> = datasources["datasources"]
        .as_sequence()
        .expect("datasources")
        .iter()
        .map(|ds| ds["uid"].as_str().expect("datasource uid"))
        .collect();

    let mut unknown = Vec::new();
    let mut titles = BTreeSet::new();
    for path in files_in(&deploy().join("grafana/dashboards"), &["json"]) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: Json = serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        let title = dashboard["title"].as_str().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{file}: no title"));
        titles.insert(title.to_owned());
        assert!(dashboard["uid"].as_str().is_some(), "{file}: no uid");
        let panels = panels(&dashboard);
        assert!(panels.iter().any(|p| p["type"] != "row"), "{file}: no panels");

        for panel in &panels {
            let at = format!("{file} / {}", panel["title"].as_str().unwrap_or("?"));
            for target in panel["targets"].as_array().into_iter().flatten() {
                let datasource = &target["datasource"];
                let datasource = if datasource.is_null() { &panel["datasource"] } else { datasource };
                let uid = datasource["uid"].as_str().unwrap_or_else(|| panic!("{at}: target without datasource"));
                assert!(uids.contains(uid), "{at}: datasource `{uid}` is not provisioned ({uids:?})");
                match datasource["type"].as_str() {
                    Some("prometheus") => {
                        let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{at}: no expr"));
                        check_promql(expr, &at, &mut unknown);
                    }
                    Some("tempo") => assert!(target["query"].as_str().is_some(), "{at}: no TraceQL query"),
                    other => panic!("{at}: unexpected datasource type {other:?}"),
                }
            }
        }
        for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
            if variable["type"] == "query" {
                let at = format!("{file} / variable {}", variable["name"]);
                let query = &variable["query"];
                let query = query["query"].as_str().or(query.as_str()).unwrap_or_else(|| panic!("{at}: no query"));
                check_promql(query, &at, &mut unknown);
            }
        }
    }
    assert!(unknown.is_empty(), "dashboards query metrics the code does not export:\n{}", unknown.join("\n"));
    for title in ["hybroker / Fleet", "hybroker / Jobs & cost", "hybroker / Job drill-down"] {
        assert!(titles.contains(title), "no dashboard {title:?}: {titles:?}");
    }

    // The drill-down searches Tempo by the job id typed into a textbox.
    let drilldown: Json = serde_json::from_str(&read(&deploy().join("grafana/dashboards/job-drilldown.json"))).unwrap();
    let variables = drilldown["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "job_id" && v["type"] == "textbox"),
        "the drill-down has no job_id textbox"
    );
    let searches_job = panels(&drilldown).iter().flat_map(|p| p["targets"].as_array().into_iter().flatten()).any(|t| {
        t["datasource"]["type"] == "tempo"
            && t["query"].as_str().is_some_and(|q| q.contains(r#"{ .hybroker.job.id = "$job_id" }"#))
    });
    assert!(searches_job, "the drill-down has no TraceQL search by $job_id");
}

#[test]
fn compose_file_and_grafana_provisioning_fit_together() {
    let compose = yaml(&deploy().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    for name in ["otel-collector", "tempo", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "the compose file has no {name} service");
    }
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let image = service["image"].as_str().unwrap_or_else(|| panic!("{name}: no image"));
        let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or_default();
        assert!(!tag.is_empty() && tag != "latest" && !tag.contains('/'), "{name}: image {image} is not pinned");
        // Every bind mount's source is a file or folder in deploy/.
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            if let Some(source) = volume.split(':').next().and_then(|s| s.strip_prefix("./")) {
                assert!(deploy().join(source).exists(), "{name}: mounts missing ./{source}");
            }
        }
    }
    let collector = yaml(&deploy().join("otel-collector.yaml"));
    assert!(
        collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].as_str().is_some_and(|e| e.ends_with(":4317"))
    );
    assert_eq!(collector["exporters"]["otlp/tempo"]["endpoint"].as_str(), Some("tempo:4317"));
    assert!(yaml(&deploy().join("tempo.yaml"))["storage"]["trace"]["backend"].as_str().is_some());

    let types: BTreeSet<String> = files_in(&deploy().join("grafana/provisioning/datasources"), &["yaml", "yml"])
        .iter()
        .flat_map(|path| {
            let file = yaml(path);
            let list = file["datasources"].as_sequence().cloned().unwrap_or_default();
            list.into_iter().map(|ds| ds["type"].as_str().expect("datasource type").to_owned()).collect::<Vec<_>>()
        })
        .collect();
    assert!(types.contains("prometheus") && types.contains("tempo"), "datasources: {types:?}");

    // The file provider reads the folder the compose file mounts the dashboards into.
    let grafana_volumes: Vec<&str> =
        services["grafana"]["volumes"].as_sequence().unwrap().iter().filter_map(Yaml::as_str).collect();
    for path in files_in(&deploy().join("grafana/provisioning/dashboards"), &["yaml", "yml"]) {
        for provider in yaml(&path)["providers"].as_sequence().expect("providers") {
            assert_eq!(provider["type"].as_str(), Some("file"));
            let folder = provider["options"]["path"].as_str().expect("provider path");
            assert!(
                grafana_volumes.iter().any(|v| v.starts_with("./grafana/dashboards:") && v.contains(folder)),
                "grafana does not mount the dashboards at {folder}: {grafana_volumes:?}"
            );
        }
    }
}
