//! A pod's file view, laid out in a directory: what each of its container's mounts shows (ConfigMap
//! keys as files, a Secret's files as the README makes them, empty directories for volumes that
//! start empty), and its config with the absolute paths moved under that directory, so the binary
//! can load and run it on the test machine.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_yaml_ng::Value as Yaml;

use super::readme::SecretRecipe;
use super::{Manifests, config_arg, container, items, pod_spec, text};

/// What backs a volume mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    ConfigMap(String),
    Secret(String),
    /// A PersistentVolumeClaim (template), an emptyDir or a hostPath mounted read-write.
    Writable(String),
    /// A host directory mounted read-only (the node's userland for the agent).
    HostReadOnly(String),
}

/// The mount of `workload`'s container under which `path` lies (the longest such mountPath), its
/// volume, and the rest of the path below the mount.
pub fn mount_of(workload: &Yaml, path: &Path) -> Option<(Volume, PathBuf)> {
    let mount = items(&container(workload)["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(text(&m["mountPath"])))
        .max_by_key(|m| text(&m["mountPath"]).len())?;
    let rest = path.strip_prefix(text(&mount["mountPath"])).unwrap().to_path_buf();
    Some((volume(workload, text(&mount["name"]), mount["readOnly"].as_bool() == Some(true)), rest))
}

/// The volume called `name` of `workload`'s pod (or its StatefulSet's claim templates).
pub fn volume(workload: &Yaml, name: &str, read_only: bool) -> Volume {
    let claims = items(&workload["spec"]["volumeClaimTemplates"]);
    if claims.iter().any(|c| text(&c["metadata"]["name"]) == name) {
        return Volume::Writable(name.to_string());
    }
    let v = items(&pod_spec(workload)["volumes"]).iter().find(|v| text(&v["name"]) == name).unwrap_or_else(|| {
        panic!("{}: a mount of volume {name}, which the pod lacks", text(&workload["metadata"]["name"]))
    });
    if !v["configMap"].is_null() {
        Volume::ConfigMap(text(&v["configMap"]["name"]).to_string())
    } else if !v["secret"].is_null() {
        Volume::Secret(text(&v["secret"]["secretName"]).to_string())
    } else if !v["hostPath"].is_null() && read_only {
        Volume::HostReadOnly(text(&v["hostPath"]["path"]).to_string())
    } else {
        Volume::Writable(name.to_string())
    }
}

/// A pod's file view under `root`.
pub struct PodRoot {
    pub root: PathBuf,
}

impl PodRoot {
    /// Lays out under `root` what `workload`'s container sees at each mount; a Secret's files are
    /// copied from `work`, where the README's commands made them.
    pub fn lay_out(
        manifests: &Manifests,
        workload: &Yaml,
        secrets: &BTreeMap<String, SecretRecipe>,
        work: &Path,
        root: &Path,
    ) -> PodRoot {
        let pod = PodRoot { root: root.to_path_buf() };
        for mount in items(&container(workload)["volumeMounts"]) {
            let at = pod.host(Path::new(text(&mount["mountPath"])));
            match volume(workload, text(&mount["name"]), mount["readOnly"].as_bool() == Some(true)) {
                Volume::ConfigMap(name) => {
                    std::fs::create_dir_all(&at).unwrap();
                    let map = manifests.get("ConfigMap", &name);
                    for (key, value) in map["data"].as_mapping().into_iter().flatten() {
                        std::fs::write(at.join(text(key)), text(value)).unwrap();
                    }
                }
                Volume::Secret(name) => {
                    std::fs::create_dir_all(&at).unwrap();
                    let recipe = secrets.get(&name).unwrap_or_else(|| panic!("the README makes no Secret {name}"));
                    for (key, file) in &recipe.files {
                        std::fs::copy(work.join(file), at.join(key))
                            .unwrap_or_else(|e| panic!("Secret {name}: {file} (key {key}): {e}"));
                    }
                }
                Volume::Writable(_) => std::fs::create_dir_all(&at).unwrap(),
                Volume::HostReadOnly(_) => {}
            }
        }
        pod
    }

    /// Where `path` (absolute, inside the pod) is on this machine.
    pub fn host(&self, path: &Path) -> PathBuf {
        let inside: PathBuf = path.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        self.root.join(inside)
    }

    /// `workload`'s config (`--config`) with every absolute path in it moved under the root: a
    /// file the binary loads here as the pod would there.
    pub fn config(&self, workload: &Yaml) -> PathBuf {
        let config = self.host(&config_arg(workload));
        let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        for (_, value) in table.iter_mut() {
            self.reroot(value);
        }
        let rooted = self.root.join("rooted-config.toml");
        std::fs::write(&rooted, toml::to_string(&table).unwrap()).unwrap();
        rooted
    }

    fn reroot(&self, value: &mut toml::Value) {
        match value {
            toml::Value::String(s) if s.starts_with('/') => *s = self.host(Path::new(s.as_str())).display().to_string(),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| self.reroot(v)),
            toml::Value::Array(a) => a.iter_mut().for_each(|v| self.reroot(v)),
            _ => {}
        }
    }
}
