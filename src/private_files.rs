//! Files only the service's own user may read: the job store (with its WAL and shared-memory
//! files), the local object store, private keys. They are created 0600 (files) and 0700
//! (directories) with explicit modes, not through the process umask (the quickstart runs agents in
//! the same process, and their jobs inherit its umask). Ones found with a wider mode at start are
//! narrowed, and each is logged at WARN with its path and old mode.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A private file: read and write for its owner only.
pub const FILE_MODE: u32 = 0o600;
/// A private directory: its owner only.
pub const DIR_MODE: u32 = 0o700;
/// At start, at most this many narrowed paths are logged one by one; the rest are counted.
const LOGGED_ONE_BY_ONE: usize = 20;

/// Creates `dir` and its missing parents with mode 0700; existing ones are left as they are.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Creates `path` as an empty 0600 file unless it exists.
pub fn create_file(path: &Path) -> io::Result<()> {
    match fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` as a new 0600 file: whatever was there is removed first, and a
/// symbolic link planted in its place is never followed.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(bytes)
}

/// Narrows `path` to 0600 (a file) or 0700 (a directory) when its group or others have any
/// access, and returns the old mode then. A missing path or a symbolic link is left alone.
pub fn narrow(path: &Path) -> io::Result<Option<u32>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() || mode & 0o077 == 0 {
        return Ok(None);
    }
    let narrowed = if meta.is_dir() { DIR_MODE } else { FILE_MODE };
    fs::set_permissions(path, fs::Permissions::from_mode(narrowed))?;
    Ok(Some(mode))
}

/// [`narrow`], with a WARN naming the path and its old mode when it changed it.
pub fn narrow_logged(path: &Path) -> io::Result<()> {
    if let Some(old) = narrow(path)? {
        warn_narrowed(path, old);
    }
    Ok(())
}

/// Narrows `root` and everything under it (symbolic links are not followed); returns how many
/// paths changed. The first few are logged one by one, then one WARN counts them all.
pub fn narrow_tree(root: &Path) -> io::Result<usize> {
    let mut changed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        if let Some(old) = narrow(&path)? {
            changed += 1;
            if changed <= LOGGED_ONE_BY_ONE {
                warn_narrowed(&path, old);
            }
        }
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    if changed > LOGGED_ONE_BY_ONE {
        tracing::warn!(root = %root.display(), changed, "narrowed the modes of private files to owner-only");
    }
    Ok(changed)
}

fn warn_narrowed(path: &Path, old: u32) {
    tracing::warn!(
        path = %path.display(),
        old_mode = format!("{old:04o}"),
        "a private file was readable by others: narrowed its mode to owner-only"
    );
}

/// Writes a file so that readers see either nothing or the whole content (a listener's address
/// file): written beside it, then renamed over it. Not narrowed: address files are not secret.
pub fn write_atomically(path: &Path, content: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn wide_modes_are_narrowed_and_private_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        create_dir_all(&root.join("a/b")).unwrap();
        assert_eq!((mode(&root), mode(&root.join("a/b"))), (0o700, 0o700));
        create_file(&root.join("a/private")).unwrap();
        assert_eq!(mode(&root.join("a/private")), 0o600);
        fs::write(root.join("a/b/wide"), "x").unwrap();
        fs::set_permissions(root.join("a/b/wide"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("a/private"), fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(narrow_tree(&root).unwrap(), 2);
        assert_eq!(mode(&root.join("a")), 0o700);
        assert_eq!(mode(&root.join("a/b/wide")), 0o600);
        assert_eq!(mode(&root.join("a/private")), 0o400, "narrower than 0600 is kept");
        assert_eq!(narrow(&root.join("missing")).unwrap(), None);
        assert_eq!(narrow_tree(&root).unwrap(), 0);
    }
}
