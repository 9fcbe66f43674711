//! What `hybroker sandbox-init` is told: written by the agent into a 0600 file in the agent-owned
//! job directory, read (and removed) by the init before it builds the sandbox.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Exit code of `sandbox-init` when the sandbox could not be built (the reason is in the error
/// file); the job never ran.
pub const SETUP_FAILED: i32 = 125;

/// The sandbox one attempt runs in and the command it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitSpec {
    /// argv; `argv[0]` is looked up in the job's `PATH`.
    pub argv: Vec<String>,
    /// The job's whole environment.
    pub env: Vec<(String, String)>,
    /// The attempt's work directory (same path inside the sandbox); the job starts there.
    pub work_dir: PathBuf,
    /// The sandbox's hostname.
    pub hostname: String,
    /// Root mode: the attempt's own `(uid, gid)`. `None` in user-namespace mode.
    pub user: Option<(u32, u32)>,
    /// User-namespace mode: the agent's `(uid, gid)`, mapped to [`USERNS_ID`] inside.
    pub userns: Option<(u32, u32)>,
    /// An empty network namespace instead of the host's network.
    pub private_network: bool,
    /// Host paths hidden from the job (agent config, keys, work root, state, the operator's list).
    pub hide: Vec<PathBuf>,
    /// Host paths the job may write besides its work directory.
    pub read_write: Vec<PathBuf>,
    /// Device nodes: `(host path, name under /dev)`.
    pub devices: Vec<(PathBuf, String)>,
    /// Size of the private `/tmp` and `/dev/shm` in MiB.
    pub tmp_mib: u64,
    /// An empty directory the agent owns, used as the mount point of the new root (every
    /// attempt's mount namespace is private, so all use the same one).
    pub new_root: PathBuf,
    /// Where the init writes why it could not build the sandbox (agent-owned, beside the work dir).
    pub error_file: PathBuf,
}

/// The job's uid and gid inside a user namespace: not 0, so exec drops every capability.
pub const USERNS_ID: u32 = 1000;

impl InitSpec {
    /// Writes the spec to `path` (0600, never following a link, never reusing a file).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::private_files::write_new(path, &text)
    }

    /// Reads the spec from `path` and removes the file.
    pub fn take(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read(path)?;
        let _ = std::fs::remove_file(path);
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_its_file_and_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attempt-1.sandbox");
        let spec = InitSpec {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            work_dir: dir.path().join("attempt-1"),
            user: Some((2_000_000, 2_000_000)),
            devices: vec![("/dev/full".into(), "nvidia0".into())],
            tmp_mib: 64,
            ..Default::default()
        };
        spec.write(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(InitSpec::take(&path).unwrap(), spec);
        assert!(!path.exists());
    }
}
