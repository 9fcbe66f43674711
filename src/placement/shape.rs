//! The resources of one node (free, total, or held by an attempt), as placement compares them.

use crate::placement::bind::FreeCapacity;

/// Resources of one node, free or total: GPUs per canonical model, CPUs, memory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeShape {
    /// (canonical model, count), sorted by model.
    pub gpus: Vec<(String, u32)>,
    pub cpus: u32,
    pub memory_mib: u64,
}

impl NodeShape {
    /// The shape of an agent's free (or, given its whole inventory, total) resources.
    pub fn of(free: &FreeCapacity) -> NodeShape {
        let gpus = gpu_counts(free.gpus.iter().map(|(_, m)| m.as_str()));
        NodeShape { gpus, cpus: free.cpus, memory_mib: free.memory_mib }
    }

    /// Whether every resource of `self` is at most `other`'s.
    pub(crate) fn within(&self, other: &NodeShape) -> bool {
        self.cpus <= other.cpus
            && self.memory_mib <= other.memory_mib
            && self.gpus.iter().all(|(m, n)| other.gpus.iter().any(|(om, on)| om == m && on >= n))
    }
}

/// GPU counts per model, sorted by model, from one model name per GPU.
pub fn gpu_counts<'a>(models: impl Iterator<Item = &'a str>) -> Vec<(String, u32)> {
    let mut counts: Vec<(String, u32)> = Vec::new();
    for model in models {
        match counts.iter_mut().find(|(m, _)| m == model) {
            Some((_, n)) => *n += 1,
            None => counts.push((model.to_owned(), 1)),
        }
    }
    counts.sort();
    counts
}
