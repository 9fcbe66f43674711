//! Cost of an attempt's cgroup: create (limits, device gate, metadata block) + join (spawn `true`
//! into it) + kill + remove, 200 times. Prints p50/p99; asserts nothing about the times.
//! `cargo test --lib cgroup::tests::bench -- --ignored --nocapture`

use super::cgroup2::Cgroup2Mount;
use super::*;

const ROUNDS: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1000.0
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let (p50, p99) = (percentile(&times, 0.50), percentile(&times, 0.99));
    println!("{what}: p50 {p50:.2} ms, p99 {p99:.2} ms over {} rounds", times.len());
}

/// Runs the rounds on `root`; `block` adds the metadata block. Returns (cgroup work, spawn+wait).
fn rounds(root: &CgroupRoot, block: bool) -> (Vec<Duration>, Vec<Duration>) {
    let limits = Limits { memory_bytes: Some(256 * MIB), cpu_millis: Some(1000), pids: Some(64) };
    let (mut cgroup, mut process) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let start = Instant::now();
        let attempt = root.create(&format!("bench-{round}"), &limits, &DeviceRules::basic()).unwrap();
        if block {
            attempt.block_ipv4(&[Ipv4Addr::new(169, 254, 169, 254)]).unwrap();
        }
        let created = start.elapsed();
        let spawned = Instant::now();
        assert!(spawn_in(&attempt, "true", &[]).wait().unwrap().success());
        let ran = spawned.elapsed();
        let teardown = Instant::now();
        assert!(attempt.kill_all(Duration::from_secs(5)));
        attempt.remove().unwrap();
        cgroup.push(created + teardown.elapsed());
        process.push(ran);
    }
    (cgroup, process)
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn bench_create_join_kill_remove() {
    if !root_or_skip() {
        return;
    }
    let mut baseline = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        assert!(Command::new("true").stdout(Stdio::piped()).stderr(Stdio::piped()).status().unwrap().success());
        baseline.push(start.elapsed());
    }
    report("spawn `true` + wait, no cgroup (baseline)", baseline);
    let host = TestRoot(CgroupRoot::detect(&format!("test/{}-bench", std::process::id())).unwrap());
    println!("host layout {:?}, controllers {:?}", host.layout(), host.controllers());
    for block in [false, true] {
        let (cgroup, process) = rounds(&host, block);
        report(&format!("host cgroups, metadata block {block}: create+kill+remove"), cgroup);
        report("  spawn `true` joined + wait", process);
    }
    let mount = Cgroup2Mount::new();
    let v2 = TestRoot::new(mount.layout(), "bench2");
    let (cgroup, process) = rounds(&v2, true);
    report("cgroup2 mount (BPF device gate + metadata block): create+kill+remove", cgroup);
    report("  spawn `true` joined + wait", process);
}
