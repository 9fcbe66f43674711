//! The attempt's view of the file system, built by the sandbox's PID 1 in its own mount namespace:
//! the host read-only (nosuid, nodev), the work directory read-write, a private `/tmp`, `/dev`
//! (only harmless nodes and the attempt's own GPUs), `/dev/shm` and `/proc`, the agent's config,
//! keys, work root and state hidden under empty file systems; then `pivot_root` and the old root
//! detached.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statvfs::{FsFlags, statvfs};

use super::spec::InitSpec;

/// Device nodes every attempt gets (besides its GPUs); the device cgroup allows exactly these.
pub const DEFAULT_DEVICES: [&str; 5] = ["null", "zero", "random", "urandom", "tty"];

const NONE: Option<&str> = None;

/// Builds the view under `spec.new_root` and makes it this process's root.
pub fn build(spec: &InitSpec) -> Result<(), String> {
    let root = &spec.new_root;
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE).map_err(|e| err("make / private", e))?;
    mount(Some("/"), root, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE)
        .map_err(|e| err("bind / to the new root", e))?;
    remount_read_only(root)?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));

    let tmp_opts = format!("mode=1777,size={}m", spec.tmp_mib);
    tmpfs(&inside(Path::new("/tmp")), &tmp_opts, MsFlags::empty())?;
    make_dev(spec, &inside(Path::new("/dev")), &tmp_opts)?;
    mount(Some("proc"), &inside(Path::new("/proc")), Some("proc"), nosuid_nodev() | MsFlags::MS_NOEXEC, NONE)
        .map_err(|e| err("mount /proc", e))?;
    for hidden in &spec.hide {
        hide(&inside(hidden), &inside(Path::new("/dev/null")))?;
    }
    let per_attempt_uid = spec.user.is_some();
    expose(&spec.work_dir, root, per_attempt_uid)?;
    for path in spec.read_write.iter().filter(|p| p.is_dir()) {
        expose(path, root, per_attempt_uid)?;
    }
    enter(root)
}

fn err(what: &str, e: nix::errno::Errno) -> String {
    format!("{what}: {e}")
}

fn nosuid_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// Remounts every mount under `root` read-only, nosuid and nodev, keeping the flags it has (a
/// user namespace may not clear them).
fn remount_read_only(root: &Path) -> Result<(), String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    for point in mount_points(&mountinfo).into_iter().filter(|p| p.starts_with(root)) {
        let kept = match statvfs(&point) {
            Ok(s) => kept_flags(s.flags()),
            // Under another mount, or a file system that went away: not reachable from the root.
            Err(_) => continue,
        };
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nosuid_nodev() | kept;
        match mount(NONE, &point, NONE, flags, NONE) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::EACCES) => {}
            Err(e) => return Err(format!("remount {} read-only: {e}", point.display())),
        }
    }
    Ok(())
}

/// The flags a bind remount must repeat.
fn kept_flags(f: FsFlags) -> MsFlags {
    let mut flags = MsFlags::empty();
    if f.contains(FsFlags::ST_NOEXEC) {
        flags |= MsFlags::MS_NOEXEC;
    }
    if f.contains(FsFlags::ST_NOATIME) {
        flags |= MsFlags::MS_NOATIME;
    }
    if f.contains(FsFlags::ST_NODIRATIME) {
        flags |= MsFlags::MS_NODIRATIME;
    }
    if f.contains(FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_RELATIME;
    } else if !f.contains(FsFlags::ST_NOATIME) {
        flags |= MsFlags::MS_STRICTATIME;
    }
    flags
}

/// Mount points in `/proc/self/mountinfo` order (parents before children), unescaped.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tmpfs(target: &Path, options: &str, extra: MsFlags) -> Result<(), String> {
    mount(Some("tmpfs"), target, Some("tmpfs"), nosuid_nodev() | extra, Some(options))
        .map_err(|e| format!("mount tmpfs on {}: {e}", target.display()))
}

/// A private `/dev`: a tmpfs with the default nodes, the attempt's devices, `pts`, `shm`.
fn make_dev(spec: &InitSpec, dev: &Path, shm_opts: &str) -> Result<(), String> {
    mount(Some("tmpfs"), dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755,size=64k"))
        .map_err(|e| format!("mount tmpfs on /dev: {e}"))?;
    let nodes = DEFAULT_DEVICES.iter().map(|n| (Path::new("/dev").join(n), n.to_string()));
    for (host, name) in nodes.chain(spec.devices.iter().cloned()) {
        let target = dev.join(&name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("/dev/{name}: {e}"))?;
        }
        std::fs::write(&target, b"").map_err(|e| format!("/dev/{name}: {e}"))?;
        mount(Some(&host), &target, NONE, MsFlags::MS_BIND, NONE)
            .map_err(|e| format!("bind {} to /dev/{name}: {e}", host.display()))?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| format!("mount devpts: {e}"))?;
    symlink("pts/ptmx", &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    tmpfs(&shm, shm_opts, MsFlags::empty())?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, &dev.join(link))?;
    }
    Ok(())
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new().mode(0o755).create(path).map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn symlink(to: &str, link: &Path) -> Result<(), String> {
    std::os::unix::fs::symlink(to, link).map_err(|e| format!("symlink {}: {e}", link.display()))
}

/// Hides `target` (already inside the new root): an empty read-only tmpfs over a directory, an
/// unopenable node over a file. A path that is not there (under the private `/tmp`, say) is
/// hidden already.
fn hide(target: &Path, null: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(target) else { return Ok(()) };
    if meta.is_dir() {
        return tmpfs(target, "mode=0755,size=16k", MsFlags::MS_NOEXEC);
    }
    mount(Some(null), target, NONE, MsFlags::MS_BIND, NONE).map_err(|e| format!("hide {}: {e}", target.display()))?;
    // The flags it has are repeated: in a user namespace they are locked.
    let kept = statvfs(target).map(|s| kept_flags(s.flags())).unwrap_or(MsFlags::empty());
    let flags =
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nosuid_nodev() | MsFlags::MS_NOEXEC | kept;
    mount(NONE, target, NONE, flags, NONE).map_err(|e| format!("hide {}: {e}", target.display()))
}

/// Binds a host directory (the work directory, an operator's `read_write` path) read-write at
/// its own path. Its ancestors must be traversable by the job: one that is not (a 0700 temporary
/// directory, `/root`) gets an empty tmpfs in its place, and the path is made again in it; so do
/// paths under a tmpfs made earlier (the private `/tmp`, the hidden work root).
fn expose(dir: &Path, root: &Path, per_attempt_uid: bool) -> Result<(), String> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    for ancestor in ancestors.iter().rev().skip(1) {
        let target = inside(ancestor);
        match std::fs::metadata(&target) {
            Err(_) => mkdir(&target)?,
            Ok(m) if per_attempt_uid && m.mode() & 0o001 == 0 => {
                tmpfs(&target, "mode=0755,size=16k", MsFlags::MS_NOEXEC)?;
            }
            Ok(_) => {}
        }
    }
    let target = inside(dir);
    if std::fs::metadata(&target).is_err() {
        mkdir(&target)?;
    }
    bind_writable(dir, &target)
}

fn bind_writable(source: &Path, target: &Path) -> Result<(), String> {
    mount(Some(source), target, NONE, MsFlags::MS_BIND, NONE).map_err(|e| format!("bind {}: {e}", source.display()))?;
    let kept = statvfs(target).map(|s| kept_flags(s.flags())).unwrap_or(MsFlags::empty());
    mount(NONE, target, NONE, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | nosuid_nodev() | kept, NONE)
        .map_err(|e| format!("remount {} writable: {e}", source.display()))
}

/// `pivot_root` into `root` and detach the old root, so nothing of the host outside the view
/// stays reachable.
fn enter(root: &Path) -> Result<(), String> {
    std::env::set_current_dir(root).map_err(|e| format!("chdir new root: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detach the old root", e))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_in_order_and_unescaped() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    23 22 0:5 / /proc rw,nosuid shared:2 - proc proc rw\n\
                    24 22 0:6 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(info),
            vec![PathBuf::from("/"), PathBuf::from("/proc"), PathBuf::from("/mnt/with space")]
        );
    }

    #[test]
    fn kept_flags_repeat_noexec_and_atime() {
        let f = kept_flags(FsFlags::ST_NOEXEC | FsFlags::ST_RELATIME);
        assert!(f.contains(MsFlags::MS_NOEXEC) && f.contains(MsFlags::MS_RELATIME));
        assert!(kept_flags(FsFlags::empty()).contains(MsFlags::MS_STRICTATIME));
    }
}
