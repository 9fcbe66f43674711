//! Per-attempt UIDs, claimed host-wide: one file per UID under a shared directory
//! (`/run/hybroker/uids/<uid>`), `flock`ed for the attempt's life, so several agents on one host
//! never hand out the same UID at once. A failed attempt's work directory may be kept for a while,
//! still owned by its UID: the claim file then names it and its expiry, and the UID is not reused
//! until it is gone (removed by whoever claims the UID after the expiry, or by [`UidPool::sweep`]).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A range of UIDs (used as GIDs too) and the directory of their claims.
#[derive(Debug)]
pub struct UidPool {
    dir: PathBuf,
    first: u32,
    count: u32,
    /// Round robin: a UID just released is the last to be reused.
    next: AtomicU32,
}

/// A claimed UID; released (the lock dropped) with it.
#[derive(Debug)]
pub struct UidClaim {
    pub uid: u32,
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("uid claims in {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("every uid of sandbox.uid_range ({first}-{last}) is in use on this host")]
    Exhausted { first: u32, last: u32 },
}

impl UidPool {
    /// The pool `first..=last`, with its claims in `dir` (made 0700 if missing).
    pub fn new(dir: &Path, first: u32, last: u32) -> Result<Self, UidError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| UidError::Dir { dir: dir.to_owned(), source })?;
        let count = last - first + 1;
        // Agents starting together begin at different places, so they rarely race for one file.
        let start = std::process::id() % count;
        Ok(Self { dir: dir.to_owned(), first, count, next: AtomicU32::new(start) })
    }

    /// Claims a free UID: not locked by any agent, not a user of this host, not holding a kept
    /// work directory. An expired kept directory is removed first.
    pub fn claim(&self) -> Result<UidClaim, UidError> {
        for _ in 0..self.count {
            let offset = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
            let uid = self.first + offset;
            if let Some(claim) = self.try_claim(uid)? {
                return Ok(claim);
            }
        }
        Err(UidError::Exhausted { first: self.first, last: self.first + self.count - 1 })
    }

    fn try_claim(&self, uid: u32) -> Result<Option<UidClaim>, UidError> {
        let path = self.dir.join(uid.to_string());
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| UidError::Dir { dir: self.dir.clone(), source })?;
        if file.try_lock().is_err() {
            return Ok(None);
        }
        // A real user's UID, or a real group's GID (the attempt's GID is its UID): never handed out.
        if matches!(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)), Ok(Some(_)))
            || matches!(nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(uid)), Ok(Some(_)))
        {
            return Ok(None);
        }
        if !clear_kept(&mut file) {
            return Ok(None);
        }
        Ok(Some(UidClaim { uid, file }))
    }

    /// Removes kept work directories whose time is up (of UIDs no agent holds now). Returns how
    /// many it removed.
    pub fn sweep(&self) -> usize {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let Ok(mut file) = std::fs::OpenOptions::new().read(true).write(true).open(entry.path()) else { continue };
            if file.try_lock().is_ok() && kept(&mut file).is_some() && clear_kept(&mut file) {
                removed += 1;
            }
        }
        removed
    }
}

impl UidPool {
    /// Failed attempts' work directories kept now (by any agent on the host).
    pub fn kept_dirs(&self) -> Vec<PathBuf> {
        let files = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        files.filter_map(|e| kept(&mut File::open(e.path()).ok()?)).map(|(_, dir)| dir).collect()
    }
}

impl UidClaim {
    /// Another descriptor of the claim's locked file: the lock lasts while any is open. The
    /// sandbox's init inherits one, so a UID stays claimed as long as the attempt's processes
    /// live, even when the agent is killed before it can end them.
    pub fn share(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.file.as_fd().try_clone_to_owned()
    }

    /// Records that `dir`, owned by this UID, is kept until `for_` from now: the UID is not
    /// reused before the directory is removed.
    pub fn keep(&mut self, dir: &Path, for_: Duration) {
        let until = (SystemTime::now() + for_).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let _ = self.file.set_len(0);
        let _ = self.file.rewind();
        let _ = write!(self.file, "{until} {}", dir.display());
    }
}

/// The kept directory recorded in a claim file, and until when (seconds since the epoch).
fn kept(file: &mut File) -> Option<(u64, PathBuf)> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    let (until, dir) = text.trim().split_once(' ')?;
    Some((until.parse().ok()?, PathBuf::from(dir)))
}

/// With the claim file locked: removes an expired kept directory and forgets it. Returns whether
/// the UID is free of kept directories now.
fn clear_kept(file: &mut File) -> bool {
    let Some((until, dir)) = kept(file) else { return true };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if now < until && dir.exists() {
        return false;
    }
    // A kept directory with a disk cap is still mounted.
    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(dir.with_extension("img"));
    if let Err(e) = remove_tree(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a kept work directory");
        return false;
    }
    let _ = file.set_len(0);
    true
}

/// Removes a directory tree that may be gone already.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pools_on_one_directory_never_hand_out_one_uid_twice() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidPool::new(dir.path(), 3_000_000, 3_000_003).unwrap();
        let b = UidPool::new(dir.path(), 3_000_000, 3_000_003).unwrap();
        let claims: Vec<UidClaim> = (0..4).map(|i| if i % 2 == 0 { a.claim() } else { b.claim() }.unwrap()).collect();
        let mut uids: Vec<u32> = claims.iter().map(|c| c.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        assert_eq!(uids.len(), 4, "{uids:?}");
        assert!(matches!(a.claim(), Err(UidError::Exhausted { .. })));
        drop(claims);
        assert!(b.claim().is_ok(), "released uids are free again");
    }

    #[test]
    fn a_kept_directory_holds_its_uid_until_it_expires_and_is_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pool = UidPool::new(&dir.path().join("uids"), 3_000_100, 3_000_100).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut claim = pool.claim().unwrap();
        claim.keep(&work, Duration::from_secs(3600));
        drop(claim);
        assert!(matches!(pool.claim(), Err(UidError::Exhausted { .. })), "kept: not reused");
        assert!(work.exists());
        let mut claim = pool.claim_file_for_test();
        claim.keep(&work, Duration::ZERO);
        drop(claim);
        let again = pool.claim().unwrap();
        assert_eq!(again.uid, 3_000_100);
        assert!(!work.exists(), "an expired kept directory is removed before its uid is reused");
    }

    impl UidPool {
        /// The claim of the pool's first UID, whatever it keeps.
        fn claim_file_for_test(&self) -> UidClaim {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(self.dir.join(self.first.to_string()));
            let file = file.unwrap();
            file.try_lock().unwrap();
            UidClaim { uid: self.first, file }
        }
    }
}
