//! The wait estimate against a plain replay: step through every moment, try every pending job on
//! every node, and append the asking job to the queue.

use proptest::prelude::*;

use super::*;

const MODELS: [&str; 2] = ["H100-80GB", "L4-24GB"];

fn shape(gpus: &[(&str, u32)], cpus: u32, memory_mib: u64) -> NodeShape {
    let mut gpus: Vec<(String, u32)> = gpus.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect();
    gpus.sort();
    NodeShape { gpus, cpus, memory_mib }
}

fn need(gpus: u32, cpus: u32, runtime_s: u64) -> Need {
    Need { gpus, gpu_models: Vec::new(), cpus, memory_mib: 1024, runtime: Duration::from_secs(runtime_s) }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A lab of two 8-GPU nodes, both full: one frees at 30 min, the other at 2 h.
fn full_lab() -> Vec<Node> {
    let free = shape(&[("H100-80GB", 0)], 0, 0);
    let held = shape(&[("H100-80GB", 8)], 64, 512 * 1024);
    vec![
        Node { free: free.clone(), running: vec![(secs(1800), held.clone())] },
        Node { free, running: vec![(secs(7200), held)] },
    ]
}

#[test]
fn a_job_waits_for_the_first_node_that_frees() {
    let p = Profile::build(full_lab(), &[]);
    assert_eq!(p.earliest(&need(8, 8, 3600)), Some(secs(1800)));
    assert_eq!(p.waiting(), 0);
}

#[test]
fn jobs_ahead_take_their_pick_first() {
    // One 8-GPU job waits: it takes the node that frees at 30 min for 10 h, so the next 8-GPU job
    // waits for the other node (2 h), and a 1-GPU job fits nowhere before 2 h either.
    let ahead = [need(8, 8, 36_000)];
    let p = Profile::build(full_lab(), &ahead);
    assert_eq!(p.starts, vec![Some(secs(1800))]);
    assert_eq!(p.earliest(&need(8, 8, 3600)), Some(secs(7200)));
    // A job that fits the gap left beside the first (it takes 8 of 64 CPUs) starts with it.
    let small = Profile::build(full_lab(), &[need(4, 8, 36_000)]);
    assert_eq!(small.earliest(&need(4, 8, 60)), Some(secs(1800)));
}

#[test]
fn a_job_no_node_can_hold_has_no_estimate() {
    let p = Profile::build(full_lab(), &[]);
    assert_eq!(p.earliest(&need(16, 8, 60)), None);
    let models = Need { gpu_models: vec!["L4-24GB".into()], ..need(1, 1, 60) };
    assert_eq!(p.earliest(&models), None);
}

#[test]
fn attempts_past_their_estimate_end_at_their_limit_then_now() {
    let h = |n: u64| secs(n * 3600);
    assert_eq!(time_left(h(1), Some(h(3)), h(24)), h(2));
    assert_eq!(time_left(h(4), Some(h(3)), h(24)), h(20));
    assert_eq!(time_left(h(25), Some(h(3)), h(24)), Duration::ZERO);
    assert_eq!(time_left(h(1), None, h(24)), h(23));
}

/// The plain replay: each queued job's start.
fn replay(nodes: &[Node], queue: &[Need]) -> Vec<Option<Duration>> {
    let mut free: Vec<NodeShape> = nodes.iter().map(|n| n.free.clone()).collect();
    let mut ends: Vec<(Duration, usize, NodeShape)> =
        nodes.iter().enumerate().flat_map(|(i, n)| n.running.iter().map(move |(t, s)| (*t, i, s.clone()))).collect();
    let mut starts: Vec<Option<Duration>> = vec![None; queue.len()];
    let mut at = Duration::ZERO;
    loop {
        let (done, rest): (Vec<_>, Vec<_>) = ends.into_iter().partition(|e| e.0 <= at);
        ends = rest;
        for (_, n, held) in done {
            give_back(&mut free[n], &held);
        }
        for (j, q) in queue.iter().enumerate() {
            if starts[j].is_some() {
                continue;
            }
            if let Some(n) = (0..free.len()).find(|&n| q.fits(&free[n])) {
                let held = q.take(&mut free[n]);
                starts[j] = Some(at);
                ends.push((at + q.runtime, n, held));
            }
        }
        let Some(next) = ends.iter().map(|e| e.0).min() else { break };
        at = next;
    }
    starts
}

fn random_shape(rng: &mut fastrand::Rng, max_gpus: u32) -> NodeShape {
    let mut gpus = vec![(MODELS[rng.usize(..2)].to_owned(), rng.u32(0..=max_gpus))];
    if rng.bool() {
        gpus.push((MODELS[1].to_owned(), rng.u32(0..=2)));
        gpus.sort();
        gpus.dedup_by(|a, b| a.0 == b.0);
    }
    NodeShape { gpus, cpus: rng.u32(0..=16), memory_mib: 1024 * rng.u64(0..=64) }
}

fn random_need(rng: &mut fastrand::Rng) -> Need {
    Need {
        gpus: rng.u32(0..=4),
        gpu_models: if rng.bool() { Vec::new() } else { vec![MODELS[rng.usize(..2)].to_owned()] },
        cpus: rng.u32(0..=8),
        memory_mib: 1024 * rng.u64(0..=32),
        // Coarse runtimes, so that moments coincide often.
        runtime: secs(600 * rng.u64(1..=6)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The profile's starts and estimate equal the plain replay's, for jobs that do not fit now.
    #[test]
    fn profile_equals_the_plain_replay(seed in any::<u64>()) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let nodes: Vec<Node> = (0..rng.usize(1..5))
            .map(|_| Node {
                free: random_shape(&mut rng, 2),
                running: (0..rng.usize(0..3)).map(|_| (secs(600 * rng.u64(0..=6)), random_shape(&mut rng, 4))).collect(),
            })
            .collect();
        let waiting: Vec<Need> = (0..rng.usize(0..8)).map(|_| random_need(&mut rng)).collect();
        let asking = random_need(&mut rng);
        let p = Profile::build(nodes.clone(), &waiting);
        let starts = replay(&nodes, &waiting);
        let expected = replay(&nodes, &[waiting.clone(), vec![asking.clone()]].concat()).pop().flatten();
        prop_assert_eq!(&p.starts, &starts, "{:?}\n{:?}", nodes, waiting);
        if !nodes.iter().any(|n| asking.fits(&n.free)) {
            prop_assert_eq!(p.earliest(&asking), expected);
        }
    }
}
