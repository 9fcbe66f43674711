//! Real-kernel tests (root): each makes its own agent subtree with a unique name and removes it
//! even when it fails (Drop guards). v2 ones (a cgroup2 mount the test makes, a fake tree for
//! the limits) live in `tests/cgroup2.rs`.

mod bench;
mod cgroup2;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::getuid;

use super::*;

const V1_ROOT: &str = "/sys/fs/cgroup";
const MIB: u64 = 1024 * 1024;

/// Whether the test may run: root, or (not root) skipped, except under CI where it fails.
pub(crate) fn root_or_skip() -> bool {
    if getuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "this test needs root");
    eprintln!("skipped: needs root");
    false
}

/// A cgroup v1 host (this machine): the devices hierarchy is mounted.
fn v1_host() -> bool {
    let mounted = Path::new(V1_ROOT).join("devices/cgroup.procs").exists();
    if !mounted {
        eprintln!("skipped: no cgroup v1 hierarchies here");
    }
    mounted
}

/// An agent subtree for one test; on drop it removes every attempt in it and the subtree itself.
pub(super) struct TestRoot(pub(super) CgroupRoot);

impl TestRoot {
    pub(super) fn new(layout: Layout, test: &str) -> Self {
        let agent = format!("test/{}-{test}", std::process::id());
        TestRoot(CgroupRoot::new(layout, &agent).expect("agent subtree"))
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        self.0.sweep();
        for dir in self.0.v1.iter().map(|(_, d)| d).chain(&self.0.unified) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl std::ops::Deref for TestRoot {
    type Target = CgroupRoot;
    fn deref(&self) -> &CgroupRoot {
        &self.0
    }
}

/// Spawns `program args` with its stdio piped, joined to `cgroup` between fork and exec.
pub(super) fn spawn_in(cgroup: &AttemptCgroup, program: &str, args: &[&str]) -> Child {
    let fds = cgroup.join_fds().expect("join fds");
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls write(2) on descriptors opened before.
    unsafe {
        command.pre_exec(move || join(&fds));
    }
    command.spawn().expect("spawn")
}

/// Waits for the child to exit (at most `wait`), returning its status, stdout and stderr.
pub(super) fn finish(mut child: Child, wait: Duration) -> (ExitStatus, String, String) {
    let deadline = Instant::now() + wait;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("child did not exit within {wait:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status, out, err)
}

/// Polls `done` until it holds; panics naming `what` after `wait`.
pub(super) fn wait_for(what: &str, wait: Duration, done: impl FnMut() -> bool) {
    assert!(wait_until(Instant::now() + wait, done), "timed out waiting for {what}");
}

/// The pids of processes in `dir` whose command line is exactly `cmdline` (NUL-separated).
pub(super) fn procs_running(dir: &Path, cmdline: &str) -> Vec<i32> {
    v1::procs(dir).into_iter().filter(|pid| is_running(*pid, cmdline)).collect()
}

/// Whether `pid` is a live (not zombie) process running `cmdline`.
pub(super) fn is_running(pid: i32, cmdline: &str) -> bool {
    let wanted: Vec<u8> = cmdline.split(' ').flat_map(|w| w.bytes().chain([0])).collect();
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted)
}

fn v1_root(test: &str) -> TestRoot {
    TestRoot::new(Layout::V1 { root: PathBuf::from(V1_ROOT) }, test)
}

fn v1_dir(attempt: &AttemptCgroup, controller: v1::Controller) -> &Path {
    &attempt.v1.iter().find(|(c, _)| *c == controller).expect("controller mounted").1
}

#[test]
fn v1_memory_limit_gets_the_hog_oom_killed_and_counted() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("oom");
    let limits = Limits { memory_bytes: Some(32 * MIB), ..Limits::default() };
    let attempt = root.create("a1", &limits, &DeviceRules::basic()).unwrap();
    let memory = v1_dir(&attempt, v1::Controller::Memory).to_path_buf();
    let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (32 * MIB).to_string());

    // tail keeps the whole last line (200 MiB of zeros, no newline) in memory.
    let child = spawn_in(&attempt, "sh", &["-c", "head -c 209715200 /dev/zero | tail | wc -c"]);
    let (status, out, err) = finish(child, Duration::from_secs(30));
    assert!(attempt.oom_kills() >= 1, "no OOM kill: {status:?} out {out:?} err {err:?}");
    assert_ne!(out.trim(), "209715200", "tail survived 200 MiB under a 32 MiB limit");
    attempt.remove().unwrap();
    assert!(!memory.exists());
}

#[test]
fn v1_pids_limit_stops_a_fork_loop_and_kill_all_empties_it() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("pids");
    let limits = Limits { pids: Some(16), ..Limits::default() };
    let attempt = root.create("a1", &limits, &DeviceRules::basic()).unwrap();
    let pids = v1_dir(&attempt, v1::Controller::Pids).to_path_buf();
    let child = spawn_in(&attempt, "sh", &["-c", "for i in $(seq 100); do sleep 30 & done; wait"]);

    let events = pids.join("pids.events");
    wait_for("a fork refused by pids.max", Duration::from_secs(20), || {
        keyed_value(&events, "max").is_some_and(|n| n >= 1)
    });
    let inside = v1::procs(&pids).len();
    assert!((2..=16).contains(&inside), "{inside} processes under pids.max 16");
    assert!(attempt.kill_all(Duration::from_secs(10)));
    assert!(!attempt.is_populated());
    assert!(v1::procs(&pids).is_empty());
    let (status, _, _) = finish(child, Duration::from_secs(5));
    assert!(!status.success());
    attempt.remove().unwrap();
}

#[test]
fn v1_kill_all_takes_setsid_double_forks() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("setsid");
    let attempt = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    let freezer = v1_dir(&attempt, v1::Controller::Freezer).to_path_buf();
    let child = spawn_in(&attempt, "sh", &["-c", "setsid sh -c 'sleep 300 &'; sleep 300"]);
    let mut sleepers = Vec::new();
    wait_for("two sleeps, one in its own session", Duration::from_secs(10), || {
        sleepers = procs_running(&freezer, "sleep 300");
        sleepers.len() == 2
    });

    assert!(attempt.kill_all(Duration::from_secs(10)));
    assert!(!attempt.is_populated());
    let (status, _, _) = finish(child, Duration::from_secs(5));
    assert_eq!(status.signal(), Some(9));
    for pid in sleepers {
        assert!(!is_running(pid, "sleep 300"), "sleep {pid} survived the kill");
    }
    attempt.remove().unwrap();
    assert!(!freezer.exists());
}

#[test]
fn v1_device_gate_allows_only_the_listed_nodes() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("devices");
    let only_null = DeviceRules { allow: vec![Device::char(1, 3)] };
    let attempt = root.create("a1", &Limits::default(), &only_null).unwrap();
    let devices = v1_dir(&attempt, v1::Controller::Devices);
    assert_eq!(std::fs::read_to_string(devices.join("devices.list")).unwrap().trim(), "c 1:3 rwm");

    let script = "echo x > /dev/null && echo null-ok; echo x > /dev/full; echo end";
    let (status, out, err) = finish(spawn_in(&attempt, "sh", &["-c", script]), Duration::from_secs(10));
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(out, "null-ok\nend\n");
    assert!(err.contains("/dev/full: Operation not permitted"), "{err}");
    attempt.remove().unwrap();
}

#[test]
fn sweep_kills_and_removes_what_a_previous_agent_left() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("sweep");
    let left = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    root.create("a2", &Limits::default(), &DeviceRules::basic()).unwrap();
    let child = spawn_in(&left, "sh", &["-c", "setsid sleep 300 & sleep 300"]);
    let freezer = v1_dir(&left, v1::Controller::Freezer).to_path_buf();
    wait_for("two sleeps", Duration::from_secs(10), || procs_running(&freezer, "sleep 300").len() == 2);
    let sleepers = procs_running(&freezer, "sleep 300");

    // The agent restarts: a new CgroupRoot over the same subtree.
    let restarted = CgroupRoot::new(root.layout().clone(), &format!("test/{}-sweep", std::process::id())).unwrap();
    assert_eq!(restarted.sweep(), 2);
    assert!(!freezer.exists());
    for (_, subtree) in &restarted.v1 {
        assert_eq!(std::fs::read_dir(subtree).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count(), 0);
    }
    assert!(sleepers.iter().all(|pid| !is_running(*pid, "sleep 300")));
    finish(child, Duration::from_secs(5));
    assert_eq!(restarted.sweep(), 0);
}

#[test]
fn v1_hybrid_host_gives_attempts_a_cgroup2_leaf_too() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("hybrid");
    let attempt = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    if !root.has_cgroup2() {
        let err = attempt.block_ipv4(&[Ipv4Addr::new(169, 254, 169, 254)]).unwrap_err();
        assert_eq!(err.source.kind(), std::io::ErrorKind::Unsupported);
        return;
    }
    let leaf = attempt.unified.clone().unwrap();
    assert_eq!(attempt.join_fds().unwrap().len(), attempt.v1.len() + 1);
    cgroup2::assert_metadata_blocked(&attempt);
    let child = spawn_in(&attempt, "sleep", &["300"]);
    wait_for("the sleep in the cgroup2 leaf", Duration::from_secs(5), || v2::is_populated(&leaf));
    assert!(attempt.kill_all(Duration::from_secs(5)));
    assert!(!v2::is_populated(&leaf));
    finish(child, Duration::from_secs(5));
    attempt.remove().unwrap();
    assert!(!leaf.exists());
}

#[test]
fn create_refuses_a_name_in_use_and_leaves_nothing_behind() {
    if !root_or_skip() || !v1_host() {
        return;
    }
    let root = v1_root("twice");
    let first = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    let err = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap_err();
    assert_eq!(err.source.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(first.dirs().all(Path::exists), "the failed create removed the first attempt's cgroup");
    let bad = DeviceRules { allow: vec![Device { kind: 'x', major: 1, minor: 3 }] };
    assert!(root.create("a2", &Limits::default(), &bad).is_err());
    assert!(!root.attempt("a2").dirs().any(Path::exists));
    first.remove().unwrap();
}

#[test]
fn names_become_one_safe_path_segment() {
    assert_eq!(path_segment("site-a/node-1"), "site-a_node-1");
    assert_eq!(path_segment(".."), "_..");
    assert_eq!(path_segment(""), "_");
    assert_eq!(path_segment("job_01J.2"), "job_01J.2");
    assert_eq!(path_segment(&"x".repeat(300)).len(), 200);
}

#[test]
fn v1_rules_and_quota() {
    assert_eq!(v1::device_rule(&Device::char(195, 0)), "c 195:0 rwm");
    assert_eq!(v1::device_rule(&Device::char(136, Device::ANY_MINOR)), "c 136:* rwm");
    assert_eq!(v1::cfs_quota_us(1500), 150_000);
    assert_eq!(v1::cfs_quota_us(1), 1_000);
}
