//! Queue-wait estimates: when could a job of a given shape start at a site whose nodes are busy?
//! Pure and deterministic.
//!
//! [`Profile::build`] replays the site's dispatcher forward in time on estimates: every running
//! attempt ends at its start + `expected_runtime` (else `max_runtime`; one that ran past both ends
//! now), and at each such moment the jobs waiting at the site are bound in their queue order to the
//! first node with room, as `placement::bind` does, each then holding its node for its own
//! estimated runtime. What each node has free after every moment is recorded. A job appended to the
//! queue starts at the first recorded moment where some node has room for it
//! ([`Profile::earliest`]): the jobs ahead of it took their pick at that moment already, and a job
//! behind them that fits a gap starts in it, as the dispatcher lets it.
//!
//! Why scanning only the recorded moments is enough: a node's free resources change only at its
//! own moments, and a job that does not fit any node's free resources now fits none of them at
//! the start of the replay (the jobs bound then only took more). At the end of the replay every
//! node with a moment is back to its total and every other one never changed, so a job that fits
//! some node's total finds a moment, unless the node has resources that are never free (a GPU that
//! is unhealthy): then there is no estimate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use super::shape::NodeShape;

/// What one job needs and for how long: a waiting job, or the job asking for an estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub gpus: u32,
    /// Acceptable canonical GPU models; empty = any.
    pub gpu_models: Vec<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Estimated runtime: `expected_runtime`, else `max_runtime`.
    pub runtime: Duration,
}

impl Need {
    fn accepts(&self, model: &str) -> bool {
        self.gpu_models.is_empty() || self.gpu_models.iter().any(|m| m == model)
    }

    /// Whether the need fits a node's free resources.
    pub fn fits(&self, free: &NodeShape) -> bool {
        let gpus: u32 = free.gpus.iter().filter(|(m, _)| self.accepts(m)).map(|(_, n)| n).sum();
        gpus >= self.gpus && free.cpus >= self.cpus && free.memory_mib >= self.memory_mib
    }

    /// What the need takes out of `free` (GPUs of acceptable models, in model order).
    fn take(&self, free: &mut NodeShape) -> NodeShape {
        let mut left = self.gpus;
        let mut taken = Vec::new();
        for (m, n) in free.gpus.iter_mut().filter(|(m, _)| self.gpus > 0 && self.accepts(m)) {
            let k = left.min(*n);
            if k > 0 {
                *n -= k;
                left -= k;
                taken.push((m.clone(), k));
            }
        }
        free.cpus -= self.cpus;
        free.memory_mib -= self.memory_mib;
        NodeShape { gpus: taken, cpus: self.cpus, memory_mib: self.memory_mib }
    }
}

/// One node of the site: what is free now, and what each running attempt holds and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub free: NodeShape,
    /// (estimated time left, what the attempt holds).
    pub running: Vec<(Duration, NodeShape)>,
}

/// A site's replayed future: the moments its nodes' free resources change, and when each job
/// waiting there is estimated to start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// (time from now, a node's free resources from then on), by time.
    moments: Vec<(Duration, NodeShape)>,
    /// Per waiting job (in the order given): its estimated start, `None` when it never fits.
    pub starts: Vec<Option<Duration>>,
}

impl Profile {
    /// Replays the site: `nodes` as they are now, `waiting` in their queue order.
    pub fn build(nodes: Vec<Node>, waiting: &[Need]) -> Profile {
        let mut free: Vec<NodeShape> = Vec::with_capacity(nodes.len());
        // (when, sequence for a stable order, node, what it frees).
        let mut ends: BinaryHeap<Reverse<(Duration, usize, usize, NodeShape)>> = BinaryHeap::new();
        let mut seq = 0;
        for (i, node) in nodes.into_iter().enumerate() {
            for (left, held) in node.running {
                ends.push(Reverse((left, seq, i, held)));
                seq += 1;
            }
            free.push(node.free);
        }
        let mut starts = vec![None; waiting.len()];
        let mut pending: Vec<usize> = (0..waiting.len()).collect();
        let mut moments: Vec<(Duration, NodeShape)> = Vec::new();
        // The moment 0: what ends now (ran past its estimate and limit) is free, and what fits
        // then binds on any node. Recorded only for the nodes something ended on: see the module's
        // argument.
        let mut changed: Vec<usize> = Vec::new();
        while let Some(Reverse((t, _, node, held))) = ends.peek().cloned()
            && t.is_zero()
        {
            ends.pop();
            give_back(&mut free[node], &held);
            if !changed.contains(&node) {
                changed.push(node);
            }
        }
        let all: Vec<usize> = (0..free.len()).collect();
        bind(Duration::ZERO, &all, waiting, &mut pending, &mut free, &mut starts, &mut ends, &mut seq);
        changed.sort_unstable();
        moments.extend(changed.iter().map(|&n| (Duration::ZERO, free[n].clone())));
        while let Some(Reverse((at, ..))) = ends.peek() {
            let at = *at;
            changed.clear();
            while let Some(Reverse((t, _, node, held))) = ends.peek().cloned() {
                if t != at {
                    break;
                }
                ends.pop();
                give_back(&mut free[node], &held);
                if !changed.contains(&node) {
                    changed.push(node);
                }
            }
            changed.sort_unstable();
            if !pending.is_empty() {
                bind(at, &changed, waiting, &mut pending, &mut free, &mut starts, &mut ends, &mut seq);
            }
            moments.extend(changed.iter().map(|&n| (at, free[n].clone())));
        }
        Profile { moments, starts }
    }

    /// The earliest estimated start of a job behind every waiting job, `None` when no moment has
    /// room for it. Assumes it does not fit any node's free resources now (then it starts now).
    pub fn earliest(&self, need: &Need) -> Option<Duration> {
        self.moments.iter().find(|(_, free)| need.fits(free)).map(|(at, _)| *at)
    }

    /// How many jobs wait at the site.
    pub fn waiting(&self) -> usize {
        self.starts.len()
    }
}

/// Binds pending jobs in order, each to the first of `nodes` with room, at `at`.
#[allow(clippy::too_many_arguments)]
fn bind(
    at: Duration,
    nodes: &[usize],
    waiting: &[Need],
    pending: &mut Vec<usize>,
    free: &mut [NodeShape],
    starts: &mut [Option<Duration>],
    ends: &mut BinaryHeap<Reverse<(Duration, usize, usize, NodeShape)>>,
    seq: &mut usize,
) {
    pending.retain(|&j| {
        let need = &waiting[j];
        let Some(&node) = nodes.iter().find(|&&n| need.fits(&free[n])) else { return true };
        let held = need.take(&mut free[node]);
        starts[j] = Some(at);
        ends.push(Reverse((at + need.runtime, *seq, node, held)));
        *seq += 1;
        false
    });
}

/// Returns what an ended job held to its node.
fn give_back(free: &mut NodeShape, held: &NodeShape) {
    for (m, n) in &held.gpus {
        match free.gpus.iter_mut().find(|(fm, _)| fm == m) {
            Some((_, k)) => *k += n,
            None => {
                free.gpus.push((m.clone(), *n));
                free.gpus.sort();
            }
        }
    }
    free.cpus += held.cpus;
    free.memory_mib += held.memory_mib;
}

/// The time left of an attempt that has run `ran` of an estimated `expected` (else `max`): the
/// expected end, else the hard limit once past it, else now.
pub fn time_left(ran: Duration, expected: Option<Duration>, max: Duration) -> Duration {
    match expected {
        Some(e) if ran < e => e - ran,
        _ => max.saturating_sub(ran),
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
