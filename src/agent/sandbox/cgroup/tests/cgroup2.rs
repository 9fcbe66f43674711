//! cgroup v2 on a real cgroup2 mount the test makes (on this hybrid machine the same hierarchy as
//! `/sys/fs/cgroup/unified`, without controllers), and the limits on a fake tree.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

use super::*;

/// A cgroup2 mount on a temporary directory, unmounted on drop.
pub(super) struct Cgroup2Mount {
    dir: tempfile::TempDir,
}

impl Cgroup2Mount {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount").args(["-t", "cgroup2", "none"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "mount -t cgroup2: {status}");
        Cgroup2Mount { dir }
    }

    pub(super) fn layout(&self) -> Layout {
        Layout::V2 { root: self.dir.path().to_path_buf() }
    }
}

impl Drop for Cgroup2Mount {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Tries, from a child in the attempt, a TCP connect and a UDP send to the metadata address, over
/// IPv4 and as an IPv4-mapped IPv6 address, then a connect to a local listener; prints the errno
/// name (or `ok`) of each.
const PROBE: &str = r#"
import errno, socket, sys
def probe(family, kind, addr, send):
    s = socket.socket(family, kind)
    s.settimeout(1)
    try:
        s.sendto(b"x", addr) if send else s.connect(addr)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
    finally:
        s.close()
mapped = "::ffff:169.254.169.254"
print(probe(socket.AF_INET, socket.SOCK_STREAM, ("169.254.169.254", 80), False))
print(probe(socket.AF_INET6, socket.SOCK_STREAM, (mapped, 80), False))
print(probe(socket.AF_INET, socket.SOCK_DGRAM, ("169.254.169.254", 53), True))
print(probe(socket.AF_INET6, socket.SOCK_DGRAM, (mapped, 53), True))
print(probe(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", int(sys.argv[1])), False))
"#;

/// Blocks the metadata address for `attempt` and checks a child in it gets `EPERM` for it (and
/// not for a local listener), while this process, outside the attempt, does not.
pub(super) fn assert_metadata_blocked(attempt: &AttemptCgroup) {
    attempt.block_ipv4(&[METADATA]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let child = spawn_in(attempt, python, &["-c", PROBE, &port]);
    let (status, out, err) = finish(child, Duration::from_secs(20));
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(out, "EPERM\nEPERM\nEPERM\nEPERM\nok\n", "{err}");

    let outside = TcpStream::connect_timeout(&SocketAddr::from((METADATA, 80)), Duration::from_millis(300));
    assert!(outside.as_ref().is_ok() || outside.as_ref().unwrap_err().raw_os_error() != Some(1), "{outside:?}");
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"x", (METADATA, 53));
    assert!(udp.as_ref().is_ok() || udp.as_ref().unwrap_err().raw_os_error() != Some(1), "{udp:?}");
}

#[test]
fn v2_kill_all_takes_setsid_double_forks_and_populated_follows() {
    if !root_or_skip() {
        return;
    }
    let mount = Cgroup2Mount::new();
    let root = TestRoot::new(mount.layout(), "v2kill");
    let attempt = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    let leaf = attempt.unified.clone().unwrap();
    assert!(!attempt.is_populated());
    let child = spawn_in(&attempt, "sh", &["-c", "setsid sh -c 'sleep 300 &'; sleep 300"]);
    let mut sleepers = Vec::new();
    wait_for("two sleeps", Duration::from_secs(10), || {
        sleepers = procs_running(&leaf, "sleep 300");
        sleepers.len() == 2
    });
    assert!(attempt.is_populated());
    assert!(leaf.join("cgroup.kill").exists(), "this kernel has cgroup.kill");

    assert!(attempt.kill_all(Duration::from_secs(10)));
    assert!(!attempt.is_populated());
    assert_eq!(keyed_value(&leaf.join("cgroup.events"), "populated"), Some(0));
    let (status, _, _) = finish(child, Duration::from_secs(5));
    assert_eq!(status.signal(), Some(9));
    assert!(sleepers.iter().all(|pid| !is_running(*pid, "sleep 300")));
    attempt.remove().unwrap();
    assert!(!leaf.exists());
}

#[test]
fn v2_freeze_fallback_kills_everything_too() {
    if !root_or_skip() {
        return;
    }
    let mount = Cgroup2Mount::new();
    let root = TestRoot::new(mount.layout(), "v2freeze");
    let attempt = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    let leaf = attempt.unified.clone().unwrap();
    let child = spawn_in(&attempt, "sh", &["-c", "setsid sh -c 'sleep 300 &'; sleep 300"]);
    wait_for("two sleeps", Duration::from_secs(10), || procs_running(&leaf, "sleep 300").len() == 2);

    // Without cgroup.kill: freeze, kill each, thaw.
    v2::freeze_kill_thaw(&leaf, Instant::now() + Duration::from_secs(5));
    wait_for("the cgroup to empty", Duration::from_secs(10), || !v2::is_populated(&leaf));
    assert_eq!(keyed_value(&leaf.join("cgroup.events"), "frozen"), Some(0), "left frozen");
    finish(child, Duration::from_secs(5));
    attempt.remove().unwrap();
}

#[test]
fn v2_bpf_device_gate_allows_only_the_listed_nodes() {
    if !root_or_skip() {
        return;
    }
    let mount = Cgroup2Mount::new();
    let root = TestRoot::new(mount.layout(), "v2devices");
    let only_null = DeviceRules { allow: vec![Device::char(1, 3)] };
    let attempt = root.create("a1", &Limits::default(), &only_null).unwrap();
    let script = "echo x > /dev/null && echo null-ok; echo x > /dev/full; echo end";
    let (status, out, err) = finish(spawn_in(&attempt, "sh", &["-c", script]), Duration::from_secs(10));
    assert!(status.success(), "{status:?} {err}");
    assert_eq!(out, "null-ok\nend\n");
    assert!(err.contains("/dev/full: Operation not permitted"), "{err}");

    // A pseudo-terminal rule with any minor: /dev/full (1:7) stays shut, /dev/null opens.
    let wildcard = DeviceRules { allow: vec![Device::char(1, 3), Device::char(136, Device::ANY_MINOR)] };
    let other = root.create("a2", &Limits::default(), &wildcard).unwrap();
    let (_, out, err) = finish(spawn_in(&other, "sh", &["-c", script]), Duration::from_secs(10));
    assert_eq!(out, "null-ok\nend\n");
    assert!(err.contains("/dev/full: Operation not permitted"), "{err}");
    attempt.remove().unwrap();
    other.remove().unwrap();
}

#[test]
fn v2_metadata_address_is_refused_to_the_attempt_only() {
    if !root_or_skip() {
        return;
    }
    let mount = Cgroup2Mount::new();
    let root = TestRoot::new(mount.layout(), "v2metadata");
    let attempt = root.create("a1", &Limits::default(), &DeviceRules::basic()).unwrap();
    assert_metadata_blocked(&attempt);
    attempt.remove().unwrap();
}

#[test]
fn v2_limits_are_written_on_a_fake_tree() {
    let fake = tempfile::tempdir().unwrap();
    let root = fake.path();
    let agent = "site/node";
    let subtree = root.join(SUBTREE_DIR).join(path_segment(agent));
    std::fs::create_dir_all(&subtree).unwrap();
    let files = [
        (root.to_path_buf(), "cpuset cpu io memory hugetlb pids rdma misc\n", ""),
        (root.join(SUBTREE_DIR), "cpu io memory pids\n", "cpu\n"),
        (subtree.clone(), "cpu io memory pids\n", ""),
    ];
    for (dir, controllers, enabled) in &files {
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), enabled).unwrap();
    }
    let cgroups = CgroupRoot::new(Layout::V2 { root: root.to_path_buf() }, agent).unwrap();
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
    assert_eq!(read(root.join("cgroup.subtree_control")), "+memory +cpu +pids +io");
    assert_eq!(read(root.join(SUBTREE_DIR).join("cgroup.subtree_control")), "+memory +pids +io");
    assert_eq!(read(subtree.join("cgroup.subtree_control")), "+memory +cpu +pids +io");
    assert_eq!(cgroups.controllers(), ["memory", "cpu", "pids", "io", "devices"]);

    let leaf = subtree.join("a1");
    std::fs::create_dir(&leaf).unwrap();
    let controls = ["memory.max", "memory.swap.max", "memory.oom.group", "cpu.max", "pids.max"];
    for name in controls {
        std::fs::write(leaf.join(name), "").unwrap();
    }
    let limits = Limits { memory_bytes: Some(64 * MIB), cpu_millis: Some(1500), pids: Some(64) };
    v2::write_limits(&leaf, &limits).unwrap();
    let written: Vec<String> = controls.iter().map(|name| read(leaf.join(name))).collect();
    assert_eq!(written, ["67108864", "0", "1", "150000 100000", "64"]);

    // Files a controller would bring are written only where they exist.
    let bare = subtree.join("a2");
    std::fs::create_dir(&bare).unwrap();
    v2::write_limits(&bare, &limits).unwrap();
    assert_eq!(std::fs::read_dir(&bare).unwrap().count(), 0);

    // A directory that is no cgroup: the device gate fails with a clear error and the errno.
    if getuid().is_root() {
        let err = bpf::attach_device_gate(&bare, &DeviceRules::basic()).unwrap_err().to_string();
        assert!(err.contains("BPF_PROG_ATTACH of the hyb_devices program") && err.contains("os error"), "{err}");
    }
}

#[test]
fn bpf_programs_jump_where_they_should() {
    let rules = DeviceRules { allow: vec![Device::char(1, 3), Device::char(136, Device::ANY_MINOR)] };
    let device = bpf::device_program(&rules).unwrap();
    // 4 loads, 5 for a rule, 4 for a rule without a minor, 2 for the final deny.
    assert_eq!(device.len(), 15);
    let bad = DeviceRules { allow: vec![Device { kind: 'c', major: u32::MAX - 1, minor: 0 }] };
    assert!(bpf::device_program(&bad).is_err());
    // 1 load, 3 per address (a 64-bit immediate and a jump), allow, deny.
    assert_eq!(bpf::block_v4_program(&[METADATA, Ipv4Addr::LOCALHOST]).len(), 11);
}
