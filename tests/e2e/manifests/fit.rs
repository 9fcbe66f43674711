//! What a schema cannot check: that the manifests, the configs in their ConfigMaps, the README's
//! Secrets and the image fit together.

use std::net::SocketAddr;
use std::path::Path;

use hybroker::config::{AgentConfig, BrokerConfig, GatewayConfig};
use serde_yaml_ng::Value as Yaml;

use super::pod::{Volume, mount_of};
use super::readme::flag_values;
use super::{Manifests, Readme, config_arg, container, items, pod_spec, text};

/// The config text `workload` mounts at its `--config` path.
fn config_text<'a>(manifests: &'a Manifests, workload: &Yaml) -> &'a str {
    let path = config_arg(workload);
    let (Volume::ConfigMap(map), key) = mount_of(workload, &path).expect("the config is mounted") else {
        panic!("{} is not in a ConfigMap mount", path.display());
    };
    let value = &manifests.get("ConfigMap", &map)["data"][key.to_str().unwrap()];
    assert!(value.is_string(), "ConfigMap {map} has no key {}", key.display());
    text(value)
}

fn parse<T: serde::de::DeserializeOwned>(manifests: &Manifests, workload: &Yaml) -> T {
    let text = config_text(manifests, workload);
    hybroker::config::parse_toml(text, &config_arg(workload), std::iter::empty())
        .unwrap_or_else(|e| panic!("{}: {e}", config_arg(workload).display()))
}

/// The container port called `name`.
fn port(workload: &Yaml, name: &str) -> u16 {
    items(&container(workload)["ports"])
        .iter()
        .find(|p| text(&p["name"]) == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{} has no port {name}", text(&workload["metadata"]["name"]))) as u16
}

/// Every absolute path in a config lies under one of the container's mounts; one in a Secret
/// mount names a key the README puts in that Secret (a Secret mounted whole names the directory).
fn check_paths(workload: &Yaml, config: &toml::Value, readme: &Readme, problems: &mut Vec<String>) {
    let secrets = readme.secrets();
    let mut strings = Vec::new();
    collect_paths(config, &mut strings);
    for path in strings {
        match mount_of(workload, Path::new(&path)) {
            None => problems.push(format!("{path}: under no mount")),
            Some((Volume::Secret(name), rest)) => match secrets.get(&name) {
                None => problems.push(format!("{path}: Secret {name} is not made in the README")),
                Some(recipe) if !rest.as_os_str().is_empty() && !recipe.files.contains_key(rest.to_str().unwrap()) => {
                    problems.push(format!("{path}: the README's Secret {name} has no key {}", rest.display()))
                }
                Some(_) => {}
            },
            Some(_) => {}
        }
    }
}

fn collect_paths(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if s.starts_with('/') => out.push(s.clone()),
        toml::Value::Table(t) => t.values().for_each(|v| collect_paths(v, out)),
        toml::Value::Array(a) => a.iter().for_each(|v| collect_paths(v, out)),
        _ => {}
    }
}

/// The state a role writes lies on a writable volume (a claim, hostPath or emptyDir).
fn writable(workload: &Yaml, path: &Path, problems: &mut Vec<String>) {
    if !matches!(mount_of(workload, path), Some((Volume::Writable(_), _))) {
        problems.push(format!("{}: not on a writable volume", path.display()));
    }
}

fn same_port(what: &str, addr: Option<SocketAddr>, port: u16, problems: &mut Vec<String>) {
    if addr.map(|a| a.port()) != Some(port) {
        problems.push(format!("{what} {addr:?} is not the container port {port}"));
    }
}

/// The pod's `prometheus.io/port` annotation is its metrics port.
fn scraped(workload: &Yaml, metrics: Option<SocketAddr>, problems: &mut Vec<String>) {
    let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
    if text(&annotations["prometheus.io/scrape"]) != "true" {
        problems.push(format!("{}: not annotated for scraping", text(&workload["metadata"]["name"])));
    }
    let port: u16 = text(&annotations["prometheus.io/port"]).parse().unwrap_or(0);
    same_port("metrics.listen", metrics, port, problems);
    same_port("the metrics container port", metrics, self::port(workload, "metrics"), problems);
}

fn toml_of(manifests: &Manifests, workload: &Yaml) -> toml::Value {
    toml::from_str(config_text(manifests, workload)).unwrap()
}

#[test]
fn the_manifests_configs_secrets_and_image_fit_together() {
    let manifests = super::Manifests::render();
    let readme = Readme::load();
    let secrets = readme.secrets();
    let mut problems = Vec::new();

    // Services select exactly one workload, on ports it has.
    for svc in manifests.docs.iter().filter(|d| text(&d["kind"]) == "Service") {
        let selector = svc["spec"]["selector"].as_mapping().expect("a Service with a selector");
        let selected: Vec<&Yaml> = manifests
            .workloads()
            .filter(|w| selector.iter().all(|(k, v)| w["spec"]["template"]["metadata"]["labels"][text(k)] == *v))
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "Service {} selects {} workloads",
            text(&svc["metadata"]["name"]),
            selected.len()
        );
        for p in items(&svc["spec"]["ports"]) {
            port(selected[0], text(&p["targetPort"]));
        }
    }
    // One image for every role; its user for the roles that are not root.
    let containerfile = std::fs::read_to_string(super::kube_dir().join("../container/Containerfile")).unwrap();
    let image_user = containerfile.lines().find_map(|l| l.strip_prefix("USER ")).expect("the Containerfile sets USER");
    let image_uid: u64 = image_user.split(':').next().unwrap().parse().unwrap();
    let image = text(&container(manifests.workload("broker"))["image"]);
    for workload in manifests.workloads() {
        let name = text(&workload["metadata"]["name"]);
        assert_eq!(text(&container(workload)["image"]), image, "{name}: one image for all roles");
        assert!(config_arg(workload).is_absolute());
        for v in items(&pod_spec(workload)["volumes"]).iter().filter(|v| !v["secret"].is_null()) {
            let secret = text(&v["secret"]["secretName"]);
            if !secrets.contains_key(secret) {
                problems.push(format!("{name}: Secret {secret} is not made in the README"));
            }
        }
    }
    for role in ["broker", "gateway"] {
        let security = &pod_spec(manifests.workload(role))["securityContext"];
        assert_eq!(security["runAsNonRoot"].as_bool(), Some(true), "{role} runs as non-root");
        assert_eq!(security["runAsUser"].as_u64(), Some(image_uid), "{role} runs as the image's user");
    }
    for (name, recipe) in secrets.iter().filter(|(_, r)| r.kind.as_deref() == Some("kubernetes.io/tls")) {
        for key in ["tls.crt", "tls.key"] {
            assert!(recipe.files.contains_key(key), "Secret {name} of type kubernetes.io/tls lacks {key}");
        }
    }

    // The broker: ports, its certificate's name, its Secrets, state on its claim.
    let broker_pod = manifests.workload("broker");
    let broker: BrokerConfig = parse(&manifests, broker_pod);
    same_port("broker.listen", Some(broker.broker.listen), port(broker_pod, "grpc"), &mut problems);
    same_port("broker.enroll_listen", broker.broker.enroll_listen, port(broker_pod, "enrol"), &mut problems);
    scraped(broker_pod, broker.metrics.listen, &mut problems);
    check_paths(broker_pod, &toml_of(&manifests, broker_pod), &readme, &mut problems);
    writable(broker_pod, &broker.store.path, &mut problems);
    writable(broker_pod, &broker.secrets_key_file(), &mut problems);
    let ca_dir = broker.broker.ca_dir.as_deref().expect("the broker enrols agents: ca_dir");
    let Some((Volume::Secret(ca_secret), _)) = mount_of(broker_pod, ca_dir) else { panic!("ca_dir is not a Secret") };
    for key in ["ca.pem", "issuing-ca.pem", "issuing-ca-key.pem", "trust-domain"] {
        assert!(secrets[&ca_secret].files.contains_key(key), "the README's Secret {ca_secret} lacks {key}");
    }
    let grpc_url = manifests.service_url("hybroker-broker", "grpc");
    let host = grpc_url.trim_start_matches("https://").split(':').next().unwrap().to_string();
    let broker_issue = readme.hybroker(&["pki", "issue"]).into_iter().find(|c| flag_values(c, "--role") == ["broker"]);
    let dns = broker_issue.expect("the README issues the broker's certificate");
    assert!(flag_values(&dns, "--dns").contains(&host.as_str()), "the broker's certificate must name {host}");

    // The gateway dials the broker's Service; serves the port its Service targets.
    let gateway_pod = manifests.workload("gateway");
    let gateway: GatewayConfig = parse(&manifests, gateway_pod);
    assert_eq!(gateway.broker.url, grpc_url, "the gateway dials the broker's Service");
    same_port("gateway.listen", Some(gateway.gateway.listen), port(gateway_pod, "https"), &mut problems);
    scraped(gateway_pod, gateway.metrics.listen, &mut problems);
    check_paths(gateway_pod, &toml_of(&manifests, gateway_pod), &readme, &mut problems);
    let readiness = &container(gateway_pod)["readinessProbe"]["httpGet"];
    assert_eq!((text(&readiness["path"]), text(&readiness["scheme"])), ("/readyz", "HTTPS"));

    // The agents: GPU nodes, privileged root, the join Secret, state on the node, the node name.
    let agent_pod = manifests.workload("agent");
    let agent: AgentConfig = parse(&manifests, agent_pod);
    assert_eq!(agent.agent.broker_url, grpc_url, "agents dial the broker's Service");
    scraped(agent_pod, agent.metrics.listen, &mut problems);
    check_paths(agent_pod, &toml_of(&manifests, agent_pod), &readme, &mut problems);
    for path in
        [&agent.agent.work_dir, &agent.tls.cert, &agent.tls.key, &agent.tls.ca_cert, &agent.sandbox.uid_lock_dir]
    {
        writable(agent_pod, path, &mut problems);
    }
    let join = agent.agent.join_token_file.as_deref().expect("agents enrol with a join file");
    assert!(matches!(mount_of(agent_pod, join), Some((Volume::Secret(_), _))), "the join file comes from a Secret");
    let security = &container(agent_pod)["securityContext"];
    assert_eq!((security["privileged"].as_bool(), security["runAsUser"].as_u64()), (Some(true), Some(0)));
    let spec = pod_spec(agent_pod);
    assert!(items(&spec["tolerations"]).iter().any(|t| text(&t["key"]) == "nvidia.com/gpu"));
    assert!(spec["nodeSelector"].as_mapping().is_some_and(|m| !m.is_empty()), "agents run on GPU nodes only");
    assert_eq!(node_name_variable(&manifests), "HYBROKER_AGENT__NODE_NAME");
    let token = readme.hybroker(&["admin", "agents", "token", "create"]);
    let token = token.first().expect("the README makes the agents' join token");
    assert_eq!(flag_values(token, "--enroll-url"), [manifests.service_url("hybroker-broker", "enrol").as_str()]);
    let uses: u32 = flag_values(token, "--uses").first().expect("a multi-use token").parse().unwrap();
    assert!(uses > 1, "one token for every node of the site");
    let join_file = flag_values(token, "--output-file")[0];
    let (Volume::Secret(join_secret), key) = mount_of(agent_pod, join).unwrap() else { unreachable!() };
    assert_eq!(secrets[&join_secret].files.get(key.to_str().unwrap()).map(String::as_str), Some(join_file));

    assert!(problems.is_empty(), "the manifests do not fit together:\n  {}", problems.join("\n  "));
}

/// The variable the agents' DaemonSet fills from `spec.nodeName`.
pub fn node_name_variable(manifests: &Manifests) -> String {
    let env = items(&container(manifests.workload("agent"))["env"]);
    let var = env.iter().find(|e| text(&e["valueFrom"]["fieldRef"]["fieldPath"]) == "spec.nodeName");
    text(&var.expect("the DaemonSet passes spec.nodeName")["name"]).to_string()
}
