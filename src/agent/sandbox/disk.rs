//! A per-attempt cap on the work directory: a sparse ext4 image beside it, loop-mounted on it
//! (nodev, nosuid), owned by the attempt's UID. Filling it gives the job `ENOSPC`; the attempt's
//! reason then says `disk cap of N MiB reached`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One attempt's mounted image.
#[derive(Debug)]
pub struct DiskCap {
    pub mib: u64,
    image: PathBuf,
    mount_point: PathBuf,
}

impl DiskCap {
    /// Makes a `mib` MiB image at `image`, owned by `owner`, and mounts it on `dir` (which exists).
    pub fn mount(image: &Path, dir: &Path, mib: u64, owner: (u32, u32)) -> Result<Self, String> {
        // Owner-only: the image holds the job's files, readable by anyone who can read the image.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(image)
            .map_err(|e| format!("disk image {}: {e}", image.display()))?;
        file.set_len(mib * 1024 * 1024).map_err(|e| format!("disk image {}: {e}", image.display()))?;
        drop(file);
        let cap = DiskCap { mib, image: image.to_owned(), mount_point: dir.to_owned() };
        let owner = format!("root_owner={}:{},lazy_itable_init=1,nodiscard", owner.0, owner.1);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", &owner]).arg(image))?;
        run(Command::new("mount").args(["-o", "loop,nodev,nosuid,noatime"]).arg(image).arg(dir))?;
        let _ = std::fs::remove_dir(dir.join("lost+found"));
        Ok(cap)
    }

    /// Whether the job used up the cap: at `ENOSPC` ext4 still shows a little room (delayed
    /// allocation, a write's remainder), so "full" is less than 1 MiB or 2 % left.
    pub fn is_full(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.mount_point).is_ok_and(|s| {
            let block = s.fragment_size();
            let (left, total) = (s.blocks_available() * block, s.blocks() * block);
            left < (1 << 20).max(total / 50)
        })
    }

    /// Unmounts and deletes the image (the directory's contents go with it).
    pub fn remove(self) {
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{:?} failed: {}", command.get_program(), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Unmounts every mount under `root` but `except` (a killed agent's disk caps, but those of
/// work directories kept on purpose). Returns how many.
pub fn unmount_under(root: &Path, except: &[PathBuf]) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return 0 };
    let mut points: Vec<PathBuf> = super::mounts::mount_points(&info)
        .into_iter()
        .filter(|p| p.starts_with(root) && p != root && !except.contains(p))
        .collect();
    points.reverse();
    points.iter().filter(|p| nix::mount::umount2(p.as_path(), nix::mount::MntFlags::MNT_DETACH).is_ok()).count()
}
