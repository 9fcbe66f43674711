//! Finds output files without following symbolic links.
//!
//! The work directory belongs to the job's user while the agent may be root. Every path below it
//! is looked up one component at a time, relative to the already opened parent directory
//! (`/proc/self/fd/<parent>/<name>`: `openat` with std only) and with `O_NOFOLLOW`, so a link
//! planted anywhere, even while the walk runs, is never followed. Files are reopened the same way
//! to be uploaded and must still be the file that was found (device, inode and size).
//!
//! A declared output path that is, or passes through, a symbolic link or a special file is an
//! error; inside an output directory such entries (and names that are not UTF-8) are skipped.

use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::libc::{O_DIRECTORY, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK};

use super::{FoundFile, Stage, StagingError, relative_components};

/// A regular file found in an output.
#[derive(Debug, Clone)]
pub(super) struct Found {
    /// What the broker is told.
    pub file: FoundFile,
    /// Its path from the work directory, one component each.
    pub rel: Vec<String>,
    dev: u64,
    ino: u64,
}

impl Found {
    /// Its work-dir path, for errors.
    pub(super) fn display(&self) -> String {
        self.rel.join("/")
    }
}

/// Everything the outputs hold.
#[derive(Debug, Default)]
pub(super) struct Walked {
    /// Regular files, by output and path.
    pub found: Vec<Found>,
    /// `"<work-dir path>: <why>"` of entries not uploaded.
    pub skipped: Vec<String>,
}

/// Finds the files of every output (work-dir paths, a file or a directory each).
pub(super) fn find_outputs(work_dir: &Path, outputs: &[String]) -> Result<Walked, StagingError> {
    let root = open_root(work_dir).map_err(|e| io_error(".".into(), e))?;
    if let Err(e) = std::fs::metadata(beneath(&root, "")) {
        let why = format!("opening files without following symbolic links needs /proc: {e}");
        return Err(io_error(".".into(), io::Error::other(why)));
    }
    let mut walked = Walked::default();
    for (index, spec) in outputs.iter().enumerate() {
        let parts = relative_components("output", spec)?;
        find_output(&root, index as u32, spec, &parts, &mut walked)?;
    }
    walked.found.sort_by(|a, b| (a.file.output, &a.file.path).cmp(&(b.file.output, &b.file.path)));
    walked.skipped.sort();
    Ok(walked)
}

/// Opens a found file again for reading, refusing anything but that same file.
pub(super) fn open_found(work_dir: &Path, found: &Found) -> io::Result<File> {
    let (last, parents) = found.rel.split_last().ok_or_else(|| io::Error::other("empty path"))?;
    let mut dir = open_root(work_dir)?;
    for name in parents {
        dir = open_dir(&dir, name.as_ref())?;
    }
    let file =
        OpenOptions::new().read(true).custom_flags(O_NOFOLLOW | O_NONBLOCK | O_NOCTTY).open(beneath(&dir, last))?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.dev() != found.dev || meta.ino() != found.ino {
        return Err(io::Error::other("it was replaced after it was found"));
    }
    if meta.len() != found.file.size {
        return Err(io::Error::other(format!("it changed size from {} to {} bytes", found.file.size, meta.len())));
    }
    Ok(file)
}

fn open_root(work_dir: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(O_DIRECTORY).open(work_dir)
}

/// `name` in the opened directory `dir`, as a path the kernel resolves relative to it.
fn beneath(dir: &File, name: &(impl AsRef<OsStr> + ?Sized)) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name.as_ref())
}

fn open_dir(dir: &File, name: &OsStr) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(O_NOFOLLOW | O_DIRECTORY).open(beneath(dir, name))
}

/// `lstat` of `name` in `dir`.
fn lstat(dir: &File, name: &OsStr) -> io::Result<Metadata> {
    std::fs::symlink_metadata(beneath(dir, name))
}

/// What an entry is, when it is not uploaded.
fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        Some("a symbolic link")
    } else if kind.is_file() || kind.is_dir() {
        None
    } else {
        Some("a special file")
    }
}

fn io_error(path: String, source: io::Error) -> StagingError {
    StagingError::Io { stage: Stage::Out, path, source }
}

fn find_output(root: &File, output: u32, spec: &str, parts: &[&str], walked: &mut Walked) -> Result<(), StagingError> {
    let missing = || StagingError::MissingOutput(spec.to_owned());
    let rel: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    let Some((last, parents)) = parts.split_last() else {
        let top = root.try_clone().map_err(|e| io_error(".".into(), e))?;
        return walk_dir(top, output, &rel, walked);
    };
    let mut dir = root.try_clone().map_err(|e| io_error(".".into(), e))?;
    for (depth, name) in parents.iter().enumerate() {
        let so_far = parts[..=depth].join("/");
        let meta = match lstat(&dir, name.as_ref()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            other => other.map_err(|e| io_error(so_far.clone(), e))?,
        };
        if let Some(what) = not_regular(&meta) {
            return Err(StagingError::NotRegular { path: so_far, what });
        }
        if !meta.is_dir() {
            return Err(missing());
        }
        dir = open_dir(&dir, name.as_ref()).map_err(|e| io_error(so_far, e))?;
    }
    let meta = match lstat(&dir, last.as_ref()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        other => other.map_err(|e| io_error(rel.join("/"), e))?,
    };
    if let Some(what) = not_regular(&meta) {
        return Err(StagingError::NotRegular { path: rel.join("/"), what });
    }
    if meta.is_dir() {
        let top = open_dir(&dir, last.as_ref()).map_err(|e| io_error(rel.join("/"), e))?;
        return walk_dir(top, output, &rel, walked);
    }
    let file = FoundFile { output, path: String::new(), size: meta.len() };
    walked.found.push(Found { file, rel, dev: meta.dev(), ino: meta.ino() });
    Ok(())
}

/// Walks the opened directory `top` (at `top_rel` from the work directory) depth first. A
/// directory stays open only while it has subdirectories still to visit, so open descriptors are
/// bounded by the depth.
fn walk_dir(top: File, output: u32, top_rel: &[String], walked: &mut Walked) -> Result<(), StagingError> {
    // Directories still to visit: (open parent, path below the output's path).
    let mut pending: Vec<(Arc<File>, Vec<String>)> = Vec::new();
    let mut current = (Arc::new(top), Vec::new());
    loop {
        let (dir, below) = current;
        let here = top_rel.iter().chain(&below).cloned().collect::<Vec<_>>().join("/");
        let display = |name: &str| if here.is_empty() { name.to_owned() } else { format!("{here}/{name}") };
        let shown = if here.is_empty() { ".".to_owned() } else { here.clone() };
        let listing = std::fs::read_dir(beneath(&dir, "")).map_err(|e| io_error(shown.clone(), e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io_error(shown.clone(), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                walked.skipped.push(format!("{}: the name is not UTF-8", display(&name.to_string_lossy())));
                continue;
            };
            let meta = lstat(&dir, name.as_ref()).map_err(|e| io_error(display(name), e))?;
            if let Some(what) = not_regular(&meta) {
                walked.skipped.push(format!("{}: {what}", display(name)));
                continue;
            }
            let mut path = below.clone();
            path.push(name.to_owned());
            if meta.is_dir() {
                pending.push((dir.clone(), path));
                continue;
            }
            let file = FoundFile { output, path: path.join("/"), size: meta.len() };
            let rel = top_rel.iter().cloned().chain(path).collect();
            walked.found.push(Found { file, rel, dev: meta.dev(), ino: meta.ino() });
        }
        drop(dir);
        let Some((parent, path)) = pending.pop() else {
            return Ok(());
        };
        let name = path.last().cloned().unwrap_or_default();
        let shown = top_rel.iter().chain(&path).cloned().collect::<Vec<_>>().join("/");
        let opened = open_dir(&parent, name.as_ref()).map_err(|e| io_error(shown, e))?;
        current = (Arc::new(opened), path);
    }
}
