//! Runs one attempt's process.
//!
//! The process gets its own process group, a clean environment and a private work directory. In a
//! sandbox ([`SandboxLaunch`]) it is `hybroker sandbox-init`, which joins the attempt's cgroup
//! before exec and runs the job in its namespaces as the attempt's UID (the caller kills the whole
//! cgroup afterwards, so nothing escapes, `setsid` included); without one (`isolation = "none"`)
//! it is the job itself, as `run_as` when the agent is root. Its stdout and stderr are appended to
//! `<work_dir>/output.log` and streamed to the caller. On max runtime or cancel the whole group
//! gets SIGTERM, then SIGKILL after a grace period; when the attempt ends, whatever is left of
//! the group is killed. On a spot interruption notice the deadline (RFC 3339) is written to the
//! file named by `HYBROKER_PREEMPT_FILE` (in the job's environment from the start, under the work
//! directory's `.hybroker/`), then the group gets SIGTERM, and SIGKILL at the deadline.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, lchown};
use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, User, getgrouplist, getuid, setgid, setgroups, setuid};
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::metadata::SpotNotice;
use super::sandbox::spec::{InitSpec, SETUP_FAILED};
use super::work_files::{AGENT_FILES_DIR, PREEMPT_FILE, PREEMPT_FILE_ENV, make_agent_files_dir, write_agent_file};

/// Default time between SIGTERM and SIGKILL on max runtime or cancel.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Name of the output file in the work directory.
pub const OUTPUT_LOG: &str = "output.log";
/// The attempt's process group id is kept in `<job dir>/attempt-<n>.pid` while it runs: beside the
/// work directory, in the agent-owned parent, where the job's user can neither plant a symlink nor
/// delete it.
const PID_EXTENSION: &str = "pid";
/// Largest chunk of output read and sent at once.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// How long output pipes may stay open after the process group is gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a SIGKILLed process may take to die before `run` stops waiting for it.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long one chunk may wait for room in the caller's channel before chunks are dropped
/// from the stream (never from the log file).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// The agent's variables a job inherits; every other one (config, credentials) is dropped.
const KEPT_AGENT_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// What to run for one attempt.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job, exported as `HYBROKER_JOB_ID`.
    pub job_id: String,
    /// The attempt number, exported as `HYBROKER_ATTEMPT`.
    pub attempt: u32,
    /// argv; `command[0]` is looked up in `PATH` (the agent's, unless `env` sets one).
    pub command: Vec<String>,
    /// The job's environment; `HYBROKER_JOB_ID`, `HYBROKER_ATTEMPT` and `CUDA_VISIBLE_DEVICES`
    /// in it are overridden.
    pub env: BTreeMap<String, String>,
    /// GPU indices or UUIDs, comma separated; `""` hides every GPU from a CPU job.
    pub cuda_visible_devices: String,
    /// Wall-clock limit from spawn; the group is then terminated.
    pub max_runtime: Duration,
    /// Per-attempt work directory, created with mode 0700; the process runs there.
    pub work_dir: PathBuf,
    /// Unprivileged user to run as; applied only when the agent runs as root.
    pub run_as: Option<String>,
    /// Time between SIGTERM and SIGKILL; normally [`DEFAULT_GRACE`].
    pub grace: Duration,
    /// The attempt's sandbox; `None` runs the process directly (`isolation = "none"`).
    pub sandbox: Option<SandboxLaunch>,
    /// The node's spot interruption notice, once there is one (`None`: not a spot watcher).
    pub preempt: Option<watch::Receiver<Option<SpotNotice>>>,
    /// The broker's order to preempt this attempt, once given: handled like a spot notice.
    pub preempt_order: Option<watch::Receiver<Option<SpotNotice>>>,
}

/// How to start an attempt in its sandbox: `hybroker sandbox-init` with a spec, in its cgroup.
#[derive(Debug, Clone)]
pub struct SandboxLaunch {
    /// The `hybroker` binary.
    pub init_program: PathBuf,
    /// The sandbox; the command, environment, work directory and files are filled in here.
    pub spec: InitSpec,
    /// `cgroup.procs` of the attempt's cgroup: the child writes `0` to each before exec.
    pub join_fds: Arc<Vec<OwnedFd>>,
    /// The attempt's UID claim, inherited by the init (which holds it as long as the attempt lives).
    pub claim: Option<Arc<OwnedFd>>,
}

/// How an attempt's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited by itself with this code.
    Exited(i32),
    /// It was killed by this signal, not by us.
    Signaled(i32),
    /// It ran past its max runtime (carried here) and was killed.
    TimedOut(Duration),
    /// It was cancelled and killed.
    Cancelled,
    /// It never ran; the text says why.
    StartFailed(String),
    /// It hit a limit of its sandbox (memory, disk); the text says which, as people read it.
    LimitReached(String),
    /// A spot interruption notice stopped it; the text is the notice's reason.
    Preempted(String),
}

impl Outcome {
    /// The exit code, when the process exited by itself.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Exited(code) => Some(*code),
            _ => None,
        }
    }

    /// Whether the process exited with code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Exited(0))
    }

    /// A short text for people, like "exited with code 3".
    pub fn reason(&self) -> String {
        match self {
            Outcome::Exited(code) => format!("exited with code {code}"),
            Outcome::Signaled(signal) => format!("killed by signal {signal}"),
            Outcome::TimedOut(max) => {
                format!("killed after max runtime {}", humantime::format_duration(*max))
            }
            Outcome::Cancelled => "cancelled".to_owned(),
            Outcome::StartFailed(why) => format!("could not start: {why}"),
            Outcome::LimitReached(why) | Outcome::Preempted(why) => why.clone(),
        }
    }
}

/// Why the wait for the process stopped.
enum Stop {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
    Preempted(SpotNotice),
}

/// Runs `launch` to its end: output goes to `output` (best effort; the log file has it all) and
/// to the log file; `cancel` turning true stops it. Never panics on process trouble: a launch
/// that cannot start gives [`Outcome::StartFailed`].
pub async fn run(launch: Launch, output: mpsc::Sender<Vec<u8>>, mut cancel: watch::Receiver<bool>) -> Outcome {
    let prepared = match prepare(&launch).await {
        Ok(prepared) => prepared,
        Err(why) => return Outcome::StartFailed(why),
    };
    let mut command = prepared.command;
    let (log, prepared) = (prepared.log, PreparedFiles { error_file: prepared.error_file });
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            // A sandbox's spec (the job's environment, secrets included) is read and removed by
            // its init; an init that never ran leaves it to us.
            if launch.sandbox.is_some() {
                let _ = std::fs::remove_file(sandbox_spec_path(&launch.work_dir));
            }
            return Outcome::StartFailed(format!("{}: {error}", launch.command[0]));
        }
    };
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return Outcome::StartFailed("process vanished right after spawn".to_owned());
    };
    let group = GroupGuard(Pid::from_raw(pid));
    // If the agent dies, its successor finds this and ends the orphaned group (see `kill_leftovers`).
    let pid_file = launch.work_dir.with_extension(PID_EXTENSION);
    if let Err(e) = write_new(&pid_file, &pid.to_string()) {
        tracing::warn!(path = %pid_file.display(), error = %e, "cannot record the attempt's process group");
    }
    tracing::debug!(job = %launch.job_id, attempt = launch.attempt, pid, "attempt started");
    let streams = Streams::start(&mut child, log, output);

    let deadline = Instant::now().checked_add(launch.max_runtime);
    let (mut preempt, mut ordered) = (launch.preempt.clone(), launch.preempt_order.clone());
    let stop = tokio::select! {
        status = child.wait() => Stop::Exited(status),
        () = until(deadline) => Stop::TimedOut,
        () = cancelled(&mut cancel) => Stop::Cancelled,
        notice = preempted(&mut preempt) => Stop::Preempted(notice),
        notice = preempted(&mut ordered) => Stop::Preempted(notice),
    };
    let outcome = match stop {
        Stop::Exited(status) => exited(status),
        Stop::TimedOut | Stop::Cancelled | Stop::Preempted(_) => {
            let grace = match &stop {
                Stop::Preempted(notice) => {
                    // The deadline first, so that the job's SIGTERM handler finds it.
                    let deadline = format!("{}\n", notice.deadline_rfc3339());
                    if let Err(e) = write_agent_file(&launch.work_dir, PREEMPT_FILE, deadline.as_bytes()) {
                        tracing::warn!(job = %launch.job_id, error = %e, "cannot write the preempt file");
                    }
                    notice.time_left(std::time::SystemTime::now())
                }
                _ => launch.grace,
            };
            group.signal(Signal::SIGTERM);
            if let Stop::Preempted(notice) = &stop {
                let latency_ms = notice.seen_at.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(job = %launch.job_id, attempt = launch.attempt, latency_ms, deadline = %notice.deadline_rfc3339(),
                    reason = %notice.reason(), "preempted: SIGTERM sent to the attempt");
            }
            tokio::select! {
                _ = child.wait() => {}
                () = sleep(grace) => {
                    group.signal(Signal::SIGKILL);
                    if timeout(KILL_WAIT, child.wait()).await.is_err() {
                        // Stuck in the kernel (a hung driver, say). The attempt does not end before
                        // the process does: ending it would free GPUs the process still holds.
                        tracing::warn!(pid, "attempt's process survives SIGKILL; waiting for it to be reaped");
                        let _ = child.wait().await;
                    }
                }
            }
            match stop {
                Stop::TimedOut => Outcome::TimedOut(launch.max_runtime),
                Stop::Preempted(notice) => Outcome::Preempted(notice.reason()),
                _ => Outcome::Cancelled,
            }
        }
    };
    // The process is reaped; kill what is left of its group, then let the pipes drain.
    drop(group);
    let _ = std::fs::remove_file(&pid_file);
    let outcome = match &prepared.error_file {
        Some(path) => {
            let why = std::fs::read_to_string(path).unwrap_or_default();
            let _ = std::fs::remove_file(path);
            match outcome {
                Outcome::Exited(SETUP_FAILED) if !why.is_empty() => Outcome::StartFailed(format!("sandbox: {why}")),
                other => other,
            }
        }
        None => outcome,
    };
    streams.finish(DRAIN_TIMEOUT).await;
    tracing::debug!(job = %launch.job_id, attempt = launch.attempt, reason = %outcome.reason(), "attempt ended");
    outcome
}

/// Maps the process's own end to an outcome.
fn exited(status: std::io::Result<ExitStatus>) -> Outcome {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(signal)) => Outcome::Signaled(signal),
            (None, None) => Outcome::Exited(-1),
        },
        Err(error) => {
            // Practically unreachable: tokio lost the child. Its group is killed all the same.
            tracing::error!(%error, "waiting for the attempt's process failed");
            Outcome::Signaled(Signal::SIGKILL as i32)
        }
    }
}

/// Completes at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Completes when the cancel flag is true; never if its sender is gone without setting it.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Completes with the notice once there is one; never without a notice channel.
async fn preempted(notices: &mut Option<watch::Receiver<Option<SpotNotice>>>) -> SpotNotice {
    if let Some(rx) = notices
        && let Ok(notice) = rx.wait_for(Option::is_some).await
    {
        return notice.clone().expect("waited for a notice");
    }
    std::future::pending().await
}

/// The attempt's process group; SIGKILLed when dropped, so even an aborted `run` leaves no
/// process behind.
struct GroupGuard(Pid);

impl GroupGuard {
    /// Signals the whole group; a group that is already gone is fine.
    fn signal(&self, signal: Signal) {
        match killpg(self.0, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(pgid = %self.0, %signal, %error, "signalling process group failed")
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Logs once per agent that `run_as` is ignored because the agent is not root.
fn note_run_as_ignored(user: &str) {
    static NOTED: AtomicBool = AtomicBool::new(false);
    if !NOTED.swap(true, Ordering::Relaxed) {
        tracing::info!(user, "agent is not root; jobs run as the agent's own user, not run_as");
    }
}

// ---- preparation: work directory, user, environment ----

/// A command ready to spawn and the log file its output goes to.
struct Prepared {
    command: Command,
    log: File,
    /// Sandboxed: where `sandbox-init` says why it could not build the sandbox.
    error_file: Option<PathBuf>,
}

/// What `run` looks at after the process.
struct PreparedFiles {
    error_file: Option<PathBuf>,
}

/// The user a job runs as, resolved from `run_as`.
struct Credentials {
    name: String,
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    home: PathBuf,
}

/// Everything before spawn; an error is the text of [`Outcome::StartFailed`].
async fn prepare(launch: &Launch) -> Result<Prepared, String> {
    let program = launch.command.first().ok_or("empty command")?;
    if program.is_empty() {
        return Err("empty command".to_owned());
    }
    for key in launch.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(format!("invalid environment variable name {key:?}"));
        }
    }
    let credentials = match &launch.run_as {
        _ if launch.sandbox.is_some() => None,
        Some(user) if getuid().is_root() => Some(resolve_user(user.clone()).await?),
        Some(user) => {
            note_run_as_ignored(user);
            None
        }
        None => None,
    };
    let dir = launch.work_dir.clone();
    let owner = match &launch.sandbox {
        Some(sandbox) => sandbox.spec.user,
        None => credentials.as_ref().map(|c| (c.uid.as_raw(), c.gid.as_raw())),
    };
    tokio::task::spawn_blocking(move || {
        make_work_dir(&dir, owner)?;
        // Without it the job still runs; only a spot notice's deadline cannot reach it.
        if let Err(e) = make_agent_files_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the agent's files directory");
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| format!("work directory: {e}"))?
    .map_err(|e| format!("work directory {}: {e}", launch.work_dir.display()))?;
    let log_path = launch.work_dir.join(OUTPUT_LOG);
    // O_NOFOLLOW: the directory belongs to the job's user, who must not point the agent elsewhere.
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&log_path)
        .await
        .map_err(|e| format!("{}: {e}", log_path.display()))?;

    let mut env: Vec<(String, String)> = Vec::new();
    for key in KEPT_AGENT_ENV {
        if let Some(value) = std::env::var_os(key) {
            env.push((key.to_owned(), value.to_string_lossy().into_owned()));
        }
    }
    if let Some(c) = &credentials {
        let home = c.home.to_string_lossy().into_owned();
        env.extend([("HOME".to_owned(), home), ("USER".into(), c.name.clone()), ("LOGNAME".into(), c.name.clone())]);
    }
    if launch.sandbox.is_some() {
        // The agent's home is not the job's (and is hidden or unwritable in the sandbox).
        env.push(("HOME".to_owned(), launch.work_dir.to_string_lossy().into_owned()));
    }
    env.extend(launch.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("HYBROKER_JOB_ID".to_owned(), launch.job_id.clone()),
        ("HYBROKER_ATTEMPT".to_owned(), launch.attempt.to_string()),
        ("CUDA_VISIBLE_DEVICES".to_owned(), launch.cuda_visible_devices.clone()),
        (
            PREEMPT_FILE_ENV.to_owned(),
            launch.work_dir.join(AGENT_FILES_DIR).join(PREEMPT_FILE).to_string_lossy().into_owned(),
        ),
    ]);
    if let Some(sandbox) = &launch.sandbox {
        return sandboxed_command(launch, sandbox, env, log);
    }

    let mut command = Command::new(program);
    command
        .args(&launch.command[1..])
        .current_dir(&launch.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_clear()
        .envs(env);
    let credentials = credentials.map(|c| (c.uid, c.gid, c.groups));
    // SAFETY: the closure runs between fork and exec and only makes the async-signal-safe setsid,
    // setgroups, setgid and setuid system calls on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            // Its own session (no controlling terminal) and process group, signalled as one.
            nix::unistd::setsid()?;
            if let Some((uid, gid, groups)) = &credentials {
                setgroups(groups)?;
                setgid(*gid)?;
                setuid(*uid)?;
            }
            Ok(())
        });
    }
    Ok(Prepared { command, log, error_file: None })
}

/// Where an attempt's sandbox spec waits for its init: beside the work directory, in the
/// agent-owned job directory.
fn sandbox_spec_path(work_dir: &Path) -> PathBuf {
    work_dir.with_extension("sandbox")
}

/// `hybroker sandbox-init <spec>`, joining the attempt's cgroup before exec; the job's command and
/// environment go in the spec (a 0600 file beside the work directory, in the agent-owned job dir).
fn sandboxed_command(
    launch: &Launch,
    sandbox: &SandboxLaunch,
    env: Vec<(String, String)>,
    log: File,
) -> Result<Prepared, String> {
    let mut spec = sandbox.spec.clone();
    spec.argv = launch.command.clone();
    // Later entries win, as with `Command::env`.
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    merged.extend(env);
    spec.env = merged.into_iter().collect();
    spec.work_dir = launch.work_dir.clone();
    spec.error_file = launch.work_dir.with_extension("sandbox-error");
    let spec_path = sandbox_spec_path(&launch.work_dir);
    spec.write(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let mut command = Command::new(&sandbox.init_program);
    command
        .arg("sandbox-init")
        .arg(&spec_path)
        .current_dir(&launch.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_clear();
    let (fds, claim) = (sandbox.join_fds.clone(), sandbox.claim.clone());
    // SAFETY: between fork and exec the closure only calls write(2) and fcntl(2) on descriptors
    // opened before the fork.
    unsafe {
        command.pre_exec(move || {
            // Its own session: no controlling terminal (a job must not type into an operator's
            // shell), and its own process group, signalled as one.
            nix::unistd::setsid()?;
            crate::agent::sandbox::cgroup::join(&fds)?;
            if let Some(claim) = &claim {
                use std::os::fd::AsRawFd;
                if nix::libc::fcntl(claim.as_raw_fd(), nix::libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(Prepared { command, log, error_file: Some(spec.error_file) })
}

/// Looks up `user` (and its groups) off the async threads: NSS may be slow.
async fn resolve_user(user: String) -> Result<Credentials, String> {
    tokio::task::spawn_blocking(move || {
        let found = User::from_name(&user).map_err(|e| format!("run_as user {user:?}: {e}"))?;
        let found = found.ok_or_else(|| format!("run_as user {user:?} does not exist"))?;
        if found.uid.is_root() {
            return Err(format!("run_as user {user:?} is root"));
        }
        let c_name = CString::new(user.as_str()).map_err(|_| format!("run_as user {user:?}: nul byte"))?;
        let groups = getgrouplist(&c_name, found.gid).map_err(|e| format!("run_as user {user:?}: groups: {e}"))?;
        Ok(Credentials { name: user, uid: found.uid, gid: found.gid, groups, home: found.dir })
    })
    .await
    .map_err(|e| format!("run_as lookup: {e}"))?
}

/// Creates the work directory (mode 0700; parents as the umask says) and, for a `run_as` user,
/// hands it and everything already in it (staged inputs) to that user, without following links.
fn make_work_dir(dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        other => other?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        lchown(&path, Some(uid), Some(gid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

// ---- output: pipes to the log file and the caller ----

/// The tasks moving the process's output.
struct Streams {
    readers: Vec<JoinHandle<()>>,
    sink: JoinHandle<()>,
}

impl Streams {
    /// Starts reading the child's stdout and stderr into one ordered stream of chunks.
    fn start(child: &mut Child, log: File, output: mpsc::Sender<Vec<u8>>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_pipe(stdout, tx.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_pipe(stderr, tx)));
        }
        let sink = tokio::spawn(sink(rx, log, Forwarder { tx: Some(output), lagging: false, dropped: 0 }));
        Self { readers, sink }
    }

    /// Waits for the pipes to close (at most `drain`; a process that escaped the group could
    /// hold them), then for everything read to be written.
    async fn finish(self, drain: Duration) {
        let aborts: Vec<_> = self.readers.iter().map(JoinHandle::abort_handle).collect();
        let all = async {
            for reader in self.readers {
                let _ = reader.await;
            }
        };
        if timeout(drain, all).await.is_err() {
            tracing::warn!("output pipes still open after the process group ended; closing them");
            aborts.iter().for_each(AbortHandle::abort);
        }
        let _ = self.sink.await;
    }
}

/// Reads one pipe in chunks of at most [`CHUNK_BYTES`] until it closes.
async fn read_pipe(mut pipe: impl AsyncRead + Unpin, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0; CHUNK_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the attempt's output failed");
                break;
            }
        }
    }
}

/// Appends every chunk to the log file and forwards it to the caller.
async fn sink(mut rx: mpsc::Receiver<Vec<u8>>, mut log: File, mut forward: Forwarder) {
    let mut log_ok = true;
    while let Some(chunk) = rx.recv().await {
        if log_ok && let Err(error) = log.write_all(&chunk).await {
            tracing::warn!(%error, "writing {OUTPUT_LOG} failed; output only streamed from now");
            log_ok = false;
        }
        forward.send(chunk).await;
    }
    if let Err(error) = log.flush().await {
        tracing::warn!(%error, "flushing {OUTPUT_LOG} failed");
    }
    if forward.dropped > 0 {
        tracing::warn!(
            chunks = forward.dropped,
            "output consumer too slow; chunks left out of the stream (all are in {OUTPUT_LOG})"
        );
    }
}

/// Sends chunks to the caller without letting a slow or gone receiver stall the process.
struct Forwarder {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    /// Set after a send timed out: chunks are then only offered (dropped when the channel is
    /// full) until one fits again.
    lagging: bool,
    dropped: u64,
}

impl Forwarder {
    async fn send(&mut self, chunk: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(chunk) {
            Ok(()) => self.lagging = false,
            Err(TrySendError::Closed(_)) => self.tx = None,
            Err(TrySendError::Full(_)) if self.lagging => self.dropped += 1,
            Err(TrySendError::Full(chunk)) => match timeout(SEND_TIMEOUT, tx.send(chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.tx = None,
                Err(_) => {
                    self.lagging = true;
                    self.dropped += 1;
                }
            },
        }
    }
}

/// Creates `path` (never following a symlink, never reusing a file) with `text`.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    crate::private_files::write_new(path, text.as_bytes())
}

/// Ends the process groups of attempts that a previous agent process left running (it was killed
/// before it could stop them): any `<root>/<job>/attempt-<n>.pid` whose process still runs in
/// `<root>/<job>/attempt-<n>`. A pid reused by an unrelated process (after a reboot, say) has
/// another working directory and is left alone. The caller must hold the work directory's lock
/// (no other agent uses it). Returns how many groups were killed.
pub fn kill_leftovers(root: &Path) -> usize {
    let mut killed = 0;
    for job in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(job.path()).into_iter().flatten().flatten() {
            let pid_file = entry.path();
            if pid_file.extension().is_none_or(|e| e != PID_EXTENSION) {
                continue;
            }
            let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let _ = std::fs::remove_file(&pid_file);
            let Ok(pid) = text.trim().parse::<i32>() else { continue };
            let dir = pid_file.with_extension("");
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
            let same_dir = match (cwd, dir.canonicalize()) {
                (Ok(cwd), Ok(dir)) => cwd == dir,
                _ => false,
            };
            if same_dir && killpg(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                tracing::warn!(pid, dir = %dir.display(), "killed an attempt left running by a previous agent");
                killed += 1;
            }
        }
    }
    killed
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
