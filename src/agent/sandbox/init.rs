//! `hybroker sandbox-init`: the agent re-executes itself to build one attempt's sandbox, then runs
//! the job in it. It starts single-threaded (before any async runtime), already in the attempt's
//! cgroup (the executor joined it between fork and exec).
//!
//! Three processes:
//! - the **outer init** (the executor's child, in the host's PID namespace) unshares a PID
//!   namespace (and, without root, a user namespace first), forks the inner init, waits for it and
//!   exits the way the job did (the same code, or the same signal), so the executor sees the job;
//! - the **inner init** is PID 1 of the new namespace: it unshares the mount, IPC, UTS (and
//!   optionally network) namespaces, builds the file system view ([`super::mounts`]), sets the
//!   hostname, `no_new_privs`, drops to the attempt's UID/GID (every capability goes), forks the
//!   job and reaps every orphan until the job exits. When it exits the kernel kills whatever is
//!   left in the namespace;
//! - the **job**, exec'd with its own environment in its work directory.
//!
//! A failure before the job runs is written to the spec's error file and the outer init exits
//! with [`SETUP_FAILED`].

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, signal, sigprocmask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, execvpe, fork, getpid, pipe2, setgroups, setresgid, setresuid};

use super::spec::{InitSpec, SETUP_FAILED, USERNS_ID};

/// Runs the init for the spec at `spec_path`; never returns.
pub fn main(spec_path: &Path) -> ! {
    // Descriptors the agent passed down (the UID claim) stay with the inits, not the job.
    close_on_exec_above_stderr();
    let spec = match InitSpec::take(spec_path) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("hybroker sandbox-init: spec {}: {e}", spec_path.display());
            std::process::exit(SETUP_FAILED);
        }
    };
    let error_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&spec.error_file);
    let fail = move |why: String| -> ! {
        match error_file {
            Ok(mut f) => {
                let _ = f.write_all(why.as_bytes());
            }
            Err(_) => eprintln!("hybroker sandbox-init: {why}"),
        }
        std::process::exit(SETUP_FAILED)
    };
    if let Err(why) = outer_namespaces(&spec) {
        fail(why);
    }
    let (status_r, status_w) = match pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => fail(format!("pipe: {e}")),
    };
    // SAFETY: this process is single-threaded (the runtime is not started for sandbox-init).
    match unsafe { fork() } {
        Err(e) => fail(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(status_r);
            inner_init(&spec, status_w)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_w);
            // The executor's SIGTERM is for the job (same process group); the outer init stays
            // to report how the job ended.
            for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                // SAFETY: SIG_IGN is not a handler.
                unsafe {
                    let _ = signal(s, SigHandler::SigIgn);
                }
            }
            let mut message = Vec::new();
            let _ = std::fs::File::from(status_r).read_to_end(&mut message);
            let inner = loop {
                match waitpid(child, None) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match message.split_first() {
                Some((b'E', why)) => fail(String::from_utf8_lossy(why).into_owned()),
                Some((b'S', raw)) if raw.len() == 4 => {
                    let raw = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                    end_like(decode(child, raw))
                }
                _ => match inner {
                    Ok(status) => end_like(status),
                    Err(e) => fail(format!("waiting for the sandbox's init: {e}")),
                },
            }
        }
    }
}

/// Closes every descriptor above stderr except `keep`. Only PID 1 calls it, before anything it
/// runs could hold one of them; it never returns to code that owns them.
fn close_all_but(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && *fd != keep)
        .collect();
    for fd in fds {
        // SAFETY: closing descriptor numbers; the directory's own one is gone already (EBADF).
        unsafe { nix::libc::close(fd) };
    }
}

fn close_on_exec_above_stderr() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a descriptor number; a stale one (the directory's own) gives EBADF.
        unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
    }
}

/// The namespaces the outer init makes for its children: a PID namespace, inside a user
/// namespace without root.
fn outer_namespaces(spec: &InitSpec) -> Result<(), String> {
    match spec.userns {
        None => unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare pid namespace: {e}")),
        Some((uid, gid)) => {
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID)
                .map_err(|e| format!("unshare user and pid namespaces: {e}"))?;
            write_proc("/proc/self/setgroups", "deny")?;
            write_proc("/proc/self/uid_map", &format!("{USERNS_ID} {uid} 1"))?;
            write_proc("/proc/self/gid_map", &format!("{USERNS_ID} {gid} 1"))
        }
    }
}

fn write_proc(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

/// Decodes a raw wait status of `pid`.
fn decode(pid: Pid, raw: i32) -> WaitStatus {
    WaitStatus::from_raw(pid, raw).unwrap_or(WaitStatus::Exited(pid, 1))
}

/// Ends this process the way the job ended: the same exit code, or the same signal.
fn end_like(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, sig, _) => {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            // SAFETY: restoring the default action.
            unsafe {
                let _ = signal(sig, SigHandler::SigDfl);
            }
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&SigSet::all()), None);
            let _ = kill(getpid(), sig);
            std::process::exit(128 + sig as i32)
        }
        _ => std::process::exit(1),
    }
}

/// PID 1 of the attempt's namespace; never returns.
fn inner_init(spec: &InitSpec, status: OwnedFd) -> ! {
    // The UID claim and the error file stay with the outer init: PID 1 runs as the job's user
    // and holds only its status pipe (and the standard streams).
    close_all_but(std::os::fd::AsRawFd::as_raw_fd(&status));
    let mut status = std::fs::File::from(status);
    let mut report = |message: &[u8]| {
        let _ = status.write_all(message);
    };
    let job = match setup(spec).and_then(|()| spawn_job(spec)) {
        Ok(job) => job,
        Err(why) => {
            report(format!("E{why}").as_bytes());
            // SAFETY: _exit ends this process without running anything else.
            unsafe { nix::libc::_exit(1) }
        }
    };
    let raw = reap_until(job);
    let mut message = vec![b'S'];
    message.extend_from_slice(&raw.to_ne_bytes());
    report(&message);
    // Every process left in the namespace is killed by the kernel now.
    unsafe { nix::libc::_exit(0) }
}

/// The sandbox around this process, up to the dropped credentials.
fn setup(spec: &InitSpec) -> Result<(), String> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if spec.private_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare mount, ipc, uts namespaces: {e}"))?;
    super::mounts::build(spec)?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    // Inherited from the agent (which may run shielded from the OOM killer); the job must not be.
    // Lowering it needs privileges an unprivileged agent lacks; then it is already the agent's.
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    match spec.user {
        Some((uid, gid)) => {
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            // Nothing the job execs can regain a capability (no_new_privs stops file caps too).
            for cap in 0..64 {
                // SAFETY: prctl with integer arguments; EINVAL past the last capability.
                unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            }
            setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
            setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
            // From root to a non-zero uid: every capability goes.
            setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
            // The UID's own keyrings may hold what its previous attempt left there.
            keyctl(KEYCTL_CLEAR, KEY_SPEC_USER_KEYRING).map_err(|e| format!("clear the user keyring: {e}"))?;
            keyctl(KEYCTL_CLEAR, KEY_SPEC_USER_SESSION_KEYRING)
                .map_err(|e| format!("clear the user session keyring: {e}"))?;
        }
        None => {
            let id = (Uid::from_raw(USERNS_ID), Gid::from_raw(USERNS_ID));
            setresgid(id.1, id.1, id.1).map_err(|e| format!("setresgid: {e}"))?;
            setresuid(id.0, id.0, id.0).map_err(|e| format!("setresuid: {e}"))?;
            drop_capabilities()?;
        }
    }
    // A session keyring of its own: the agent's (a service's) is shared with every attempt.
    keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0).map_err(|e| format!("new session keyring: {e}"))?;
    // Not dumpable: the job (another process of the same user) cannot open PID 1's /proc files.
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    super::seccomp::refuse_user_namespaces().map_err(|e| format!("seccomp filter: {e}"))?;
    std::env::set_current_dir(&spec.work_dir).map_err(|e| format!("chdir {}: {e}", spec.work_dir.display()))
}

const KEYCTL_JOIN_SESSION_KEYRING: i64 = 1;
const KEYCTL_CLEAR: i64 = 7;
const KEY_SPEC_USER_KEYRING: i64 = -4;
const KEY_SPEC_USER_SESSION_KEYRING: i64 = -5;

/// `keyctl(operation, argument)`: joining a new anonymous session keyring (argument 0 = NULL
/// name) or clearing a keyring.
fn keyctl(operation: i64, argument: i64) -> Result<(), Errno> {
    // SAFETY: keyctl with integer arguments (a NULL name for KEYCTL_JOIN_SESSION_KEYRING).
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_keyctl, operation, argument, 0, 0, 0) };
    match Errno::result(rc) {
        // A kernel without keyrings has none to share.
        Ok(_) | Err(Errno::ENOSYS) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Clears this process's capability sets (a user namespace's creator holds them all in it; its
/// uid is already non-zero, so changing uid does not clear them).
fn drop_capabilities() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset with a valid header and two data words, as the kernel's v3 ABI asks.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    Errno::result(rc).map(drop).map_err(|e| format!("capset: {e}"))
}

/// Forks and execs the job; an exec failure comes back as the error.
fn spawn_job(spec: &InitSpec) -> Result<Pid, String> {
    let program = spec.argv.first().ok_or("empty command")?;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("nul byte in {s:?}"));
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = spec.env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect::<Result<_, _>>()?;
    // The job's PATH decides where argv[0] is looked up (execvpe reads the caller's PATH).
    if let Some((_, path)) = spec.env.iter().find(|(k, _)| k == "PATH") {
        // SAFETY: single-threaded.
        unsafe { std::env::set_var("PATH", path) };
    }
    let (exec_r, exec_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: single-threaded; the child only resets signals and execs.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(exec_r);
            // Rust ignores SIGPIPE; a job expects the default.
            unsafe {
                let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
            }
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let errno = execvpe(&argv[0], &argv, &env).unwrap_err();
            let _ = nix::unistd::write(&exec_w, &(errno as i32).to_ne_bytes());
            unsafe { nix::libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(exec_w);
            let mut buf = [0u8; 4];
            let mut file = std::fs::File::from(exec_r);
            match file.read(&mut buf) {
                Ok(4) => {
                    let _ = waitpid(child, None);
                    let errno = Errno::from_raw(i32::from_ne_bytes(buf));
                    Err(format!("{program}: {}", std::io::Error::from_raw_os_error(errno as i32)))
                }
                _ => Ok(child),
            }
        }
    }
}

/// Reaps every process until the job exits; returns its raw wait status.
fn reap_until(job: Pid) -> i32 {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { nix::libc::waitpid(-1, &mut raw, 0) };
        if pid == job.as_raw() {
            return raw;
        }
        if pid < 0 && Errno::last() != Errno::EINTR {
            return raw;
        }
    }
}
