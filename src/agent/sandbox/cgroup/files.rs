//! Small helpers over the cgroup file systems: control files, polling, names, removal.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::CgroupError;

/// `statfs` magic of a cgroup2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Removes a cgroup directory and any below it, leaf first, retrying while the kernel still
/// reports it busy (tasks leaving) until the deadline. A directory already gone is fine.
pub(super) fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), deadline)?;
            }
        }
    }
    let mut pause = Duration::from_micros(200);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(CgroupError::new(dir, e)),
        }
    }
}

/// Polls `done` with a growing pause until it holds or the deadline passes.
pub(super) fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_micros(100);
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// A name made into one safe path segment: characters other than ASCII letters, digits, `.`,
/// `_` and `-` become `_`, and it never starts with a dot (`.`/`..`), nor is empty.
pub(super) fn path_segment(name: &str) -> String {
    let mut segment: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    if segment.is_empty() || segment.starts_with('.') {
        segment.insert(0, '_');
    }
    segment.truncate(200);
    segment
}

/// Whether `path` is the root of a cgroup2 mount.
#[allow(clippy::useless_conversion, reason = "f_type is i64 on x86_64 but narrower on other targets")]
pub(super) fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut buf = std::mem::MaybeUninit::<nix::libc::statfs>::zeroed();
    // SAFETY: statfs writes into the buffer we own and reads the NUL-terminated path.
    let rc = unsafe { nix::libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    // SAFETY: statfs returned 0, so it filled the buffer (which was zeroed anyway).
    rc == 0 && i64::from(unsafe { buf.assume_init() }.f_type) == CGROUP2_SUPER_MAGIC
}

/// Writes a control file that must exist (one `write`, as the kernel parses each write whole).
pub(super) fn write_control(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).truncate(true).open(path).map_err(|e| CgroupError::new(path, e))?;
    file.write_all(value.as_bytes()).map_err(|e| CgroupError::other(path, e.kind(), format!("writing {value:?}: {e}")))
}

/// Writes a control file only where it exists (a controller the kernel lacks is skipped).
pub(super) fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() { write_control(path, value) } else { Ok(()) }
}

/// The number after `key` in a flat-keyed file (`memory.events`, `cgroup.events`, …).
pub(super) fn keyed_value(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}
