//! The device gate's rules: the harmless nodes every attempt gets, its own GPU nodes and, for a
//! real GPU, the NVIDIA control nodes.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::cgroup::{Device, DeviceRules};
use super::mounts::DEFAULT_DEVICES;

/// NVIDIA's control nodes, given (where they exist) to attempts that hold a real GPU.
pub const NVIDIA_CONTROL: [&str; 4] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"];

/// The device node at `path`, by number.
pub fn device(path: &Path) -> Option<Device> {
    let meta = std::fs::metadata(path).ok()?;
    let kind = match meta.file_type() {
        t if t.is_char_device() => 'c',
        t if t.is_block_device() => 'b',
        _ => return None,
    };
    let rdev = meta.rdev();
    Some(Device { kind, major: nix::sys::stat::major(rdev) as u32, minor: nix::sys::stat::minor(rdev) as u32 })
}

/// The attempt's `(host path, name under /dev)` nodes for its GPUs, given as `(index, node)`: a
/// real GPU's node keeps its name (`nvidia<minor>`) and brings the control nodes that exist; a
/// simulated GPU's stand-in is named `nvidia<index>`.
pub fn attempt_nodes(gpus: &[(u32, PathBuf)]) -> Vec<(PathBuf, String)> {
    let real = |p: &Path| p.to_string_lossy().starts_with("/dev/nvidia");
    let mut nodes: Vec<(PathBuf, String)> = gpus
        .iter()
        .map(|(index, p)| match p.file_name() {
            Some(name) if real(p) => (p.clone(), name.to_string_lossy().into_owned()),
            _ => (p.clone(), format!("nvidia{index}")),
        })
        .collect();
    if gpus.iter().any(|(_, p)| real(p)) {
        for name in NVIDIA_CONTROL {
            let path = Path::new("/dev").join(name);
            if path.exists() {
                nodes.push((path, name.to_owned()));
            }
        }
    }
    nodes
}

/// Every device is denied except the default nodes, ptmx and ptys, and `nodes`. (Not
/// [`DeviceRules::basic`]: that allows `/dev/full`, which tests use as a GPU stand-in.)
pub fn rules<'a>(nodes: impl Iterator<Item = &'a Path>) -> DeviceRules {
    let mut allow: Vec<Device> = DEFAULT_DEVICES.iter().filter_map(|n| device(&Path::new("/dev").join(n))).collect();
    allow.push(Device::char(5, 2));
    allow.push(Device::char(136, Device::ANY_MINOR));
    allow.extend(nodes.filter_map(device));
    allow.dedup();
    DeviceRules { allow }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gate_allows_null_but_not_the_test_stand_ins() {
        let rules = rules(std::iter::empty());
        let null = device(Path::new("/dev/null")).unwrap();
        assert!(rules.allow.contains(&null));
        for stand_in in ["/dev/full", "/dev/kmsg"] {
            let d = device(Path::new(stand_in)).unwrap();
            assert!(!rules.allow.contains(&d), "{stand_in} must not be in the default set");
        }
        let with = super::rules([Path::new("/dev/full")].into_iter());
        assert!(with.allow.contains(&Device { kind: 'c', major: 1, minor: 7 }));
    }

    #[test]
    fn simulated_nodes_get_gpu_names_and_no_control_nodes() {
        let nodes = attempt_nodes(&[(1, PathBuf::from("/dev/full"))]);
        assert_eq!(nodes, vec![(PathBuf::from("/dev/full"), "nvidia1".to_owned())]);
    }
}
