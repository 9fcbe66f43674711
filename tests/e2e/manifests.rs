//! The Kubernetes manifests in `deploy/kubernetes`: rendered as kustomize would (the test renders
//! the kustomization itself: its namespace and labels), validated against the Kubernetes API
//! schemas with `kubernetes-validate --strict`, checked for what a schema cannot see (`fit.rs`:
//! mounts, ConfigMap keys, Secret names and keys as the README makes them, ports, the broker's
//! service name, the agents' node name), and run (`run.rs`): the ConfigMaps' configs with the
//! README's Secrets, laid out as the pods mount them, bring up a broker, a ready gateway and an
//! agent that enrols under the node name the DaemonSet gives it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value as Yaml;

mod fit;
mod pod;
mod readme;
mod run;

pub use pod::PodRoot;
pub use readme::Readme;
pub use run::make_pki;

/// The Kubernetes versions the manifests are validated against: an old and the newest supported.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.31.0", "1.37.0"];

pub fn kube_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A YAML string, or "" for anything else.
pub fn text(v: &Yaml) -> &str {
    v.as_str().unwrap_or("")
}

/// A YAML sequence's items (none for anything else).
pub fn items(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map_or(&[], |s| s.as_slice())
}

/// The manifests as kustomize renders `deploy/kubernetes`.
pub struct Manifests {
    pub docs: Vec<Yaml>,
}

impl Manifests {
    /// Each resource of `kustomization.yaml` in order, with the kustomization's namespace on every
    /// object but the Namespace and its labels added to every object's own labels.
    pub fn render() -> Manifests {
        let kustomization: Yaml = serde_yaml_ng::from_str(&read(&kube_dir().join("kustomization.yaml"))).unwrap();
        let namespace = text(&kustomization["namespace"]).to_string();
        assert!(!namespace.is_empty(), "kustomization.yaml sets no namespace");
        let mut labels = serde_yaml_ng::Mapping::new();
        for set in items(&kustomization["labels"]) {
            labels.extend(set["pairs"].as_mapping().cloned().unwrap_or_default());
        }
        let mut docs = Vec::new();
        for file in items(&kustomization["resources"]) {
            let path = kube_dir().join(text(file));
            let source = read(&path);
            for document in serde_yaml_ng::Deserializer::from_str(&source) {
                let mut doc: Yaml = serde::Deserialize::deserialize(document)
                    .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
                if doc.is_null() {
                    continue;
                }
                let kind = text(&doc["kind"]).to_string();
                let meta =
                    doc["metadata"].as_mapping_mut().unwrap_or_else(|| panic!("{}: no metadata", path.display()));
                if kind != "Namespace" {
                    meta.insert("namespace".into(), namespace.clone().into());
                }
                let own = meta.entry("labels".into()).or_insert_with(|| Yaml::Mapping(Default::default()));
                own.as_mapping_mut().unwrap().extend(labels.clone());
                docs.push(doc);
            }
        }
        Manifests { docs }
    }

    /// The object of `kind` called `name` (panics when there is none).
    pub fn get(&self, kind: &str, name: &str) -> &Yaml {
        self.find(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
    }

    pub fn find(&self, kind: &str, name: &str) -> Option<&Yaml> {
        self.docs.iter().find(|d| text(&d["kind"]) == kind && text(&d["metadata"]["name"]) == name)
    }

    /// The Deployments, StatefulSets and DaemonSets.
    pub fn workloads(&self) -> impl Iterator<Item = &Yaml> {
        self.docs.iter().filter(|d| matches!(text(&d["kind"]), "Deployment" | "StatefulSet" | "DaemonSet"))
    }

    /// The workload whose container runs `hybroker ROLE`.
    pub fn workload(&self, role: &str) -> &Yaml {
        self.workloads()
            .find(|w| text(&container(w)["args"][0]) == role)
            .unwrap_or_else(|| panic!("no workload runs `hybroker {role}`"))
    }

    /// `https://<service>.<namespace>.svc:<port>` of the Service port called `port`.
    pub fn service_url(&self, service: &str, port: &str) -> String {
        let svc = self.get("Service", service);
        let number = items(&svc["spec"]["ports"])
            .iter()
            .find(|p| text(&p["name"]) == port)
            .and_then(|p| p["port"].as_u64())
            .unwrap_or_else(|| panic!("Service {service} has no port {port}"));
        format!("https://{service}.{}.svc:{number}", text(&svc["metadata"]["namespace"]))
    }
}

/// A workload's pod spec.
pub fn pod_spec(workload: &Yaml) -> &Yaml {
    &workload["spec"]["template"]["spec"]
}

/// A workload's one container.
pub fn container(workload: &Yaml) -> &Yaml {
    let containers = items(&pod_spec(workload)["containers"]);
    assert_eq!(containers.len(), 1, "{} runs one container", text(&workload["metadata"]["name"]));
    &containers[0]
}

/// The `--config` path in a workload's container arguments.
pub fn config_arg(workload: &Yaml) -> PathBuf {
    let args: Vec<&str> = items(&container(workload)["args"]).iter().map(text).collect();
    let at = args.iter().position(|a| *a == "--config").expect("the container names its config with --config");
    PathBuf::from(args[at + 1])
}

/// The kubernetes-validate script installed by `scripts/install-emulators.sh`.
fn kubernetes_validate() -> PathBuf {
    let dir = match std::env::var_os("HYBROKER_EMULATORS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/hybroker/emulators"),
    };
    let script = dir.join("kubernetes-validate/bin/kubernetes-validate");
    assert!(script.is_file(), "{} is missing: run scripts/install-emulators.sh", script.display());
    script
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas_strictly() {
    let manifests = Manifests::render();
    // Every manifest in the directory is a resource of the kustomization (none forgotten).
    let kustomization = read(&kube_dir().join("kustomization.yaml"));
    for entry in std::fs::read_dir(kube_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(kustomization.contains(&format!("- {name}\n")), "{name} is not listed in kustomization.yaml");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rendered.yaml");
    let stream: Vec<String> = manifests.docs.iter().map(|d| serde_yaml_ng::to_string(d).unwrap()).collect();
    std::fs::write(&rendered, stream.join("---\n")).unwrap();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "--kubernetes-version", version])
            .arg(&rendered)
            .output()
            .unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "kubernetes-validate --strict -k {version}:\n{report}");
        // A kind without a schema is only warned about: every object must have been checked.
        assert_eq!(report.matches(" passed for resource ").count(), manifests.docs.len(), "{report}");
    }
}

/// The schema check fails on what it should: a misspelt field and a wrong type.
#[test]
fn the_schema_check_refuses_a_misspelt_field() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = read(&kube_dir().join("gateway.yaml"));
    for (from, to) in [("readOnlyRootFilesystem", "readOnlyRootFileSystem"), ("port: 443", "port: \"443x\"")] {
        assert!(gateway.contains(from));
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, gateway.replacen(from, to, 1)).unwrap();
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0]])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{to} passed:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}
