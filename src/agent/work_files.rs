//! The agent's files for a job, in its work directory's `.hybroker/` (made by the agent before the
//! job starts, readable by the job): the spot interruption deadline (`preempt`, named by
//! `HYBROKER_PREEMPT_FILE`) and the checkpoint marker before its upload. The work directory is
//! the job's, so nothing here follows a link the job may have planted.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// The agent's files for the job, in its work directory (readable by the job).
pub const AGENT_FILES_DIR: &str = ".hybroker";
/// In [`AGENT_FILES_DIR`]: the spot interruption deadline, once there is one.
pub const PREEMPT_FILE: &str = "preempt";
/// The variable naming the preempt file.
pub const PREEMPT_FILE_ENV: &str = "HYBROKER_PREEMPT_FILE";

/// Writes `<work_dir>/.hybroker/<name>` (the preempt file, a checkpoint marker), following no
/// link the job may have planted (the directory is opened first without following one, the file
/// is made in it without following one either).
pub fn write_agent_file(work_dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(work_dir.join(AGENT_FILES_DIR))?;
    let path = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(contents)
}

/// Makes `<work_dir>/.hybroker` (0755, the agent's): the job reads the agent's files there.
pub(super) fn make_agent_files_dir(work_dir: &Path) -> std::io::Result<()> {
    let dir = work_dir.join(AGENT_FILES_DIR);
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && std::fs::symlink_metadata(&dir)?.is_dir() => Ok(()),
        other => other,
    }
}
