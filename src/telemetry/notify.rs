//! systemd's service readiness protocol (`sd_notify`), for `Type=notify` units: one datagram per
//! state change to the socket systemd names in `NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket). `main.rs` reads that variable (and takes it out of the environment, so neither jobs
//! nor the broker's local agents inherit it) and [`install`]s the notifier; the services then say
//!
//! - [`ready`]: `READY=1` once they serve (broker: gRPC and enrol listeners; gateway: HTTP; agent:
//!   when it starts its broker sessions, whether or not the broker answers yet),
//! - [`reloading`]: `RELOADING=1` with `MONOTONIC_USEC=`, then `READY=1` when the guard drops,
//!   around a SIGHUP reload of the certificate files,
//! - [`stopping`]: `STOPPING=1` on SIGTERM or Ctrl-C,
//! - [`status`]: a `STATUS=` line `systemctl status` shows.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, tests in-process) every call does nothing. A send
//! that fails is logged once and never fails the service.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// A `NOTIFY_SOCKET` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract socket name (@name)")]
    BadAddress(String),
    #[error("NOTIFY_SOCKET {address:?}: {source}")]
    Socket { address: String, source: std::io::Error },
}

/// The process's notifier; none until [`install`].
static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

/// Sends to `NOTIFY_SOCKET` from now on. `None` (the variable unset) or an empty value: calls stay
/// no-ops. A bad value is logged and ignored: systemd then times the start out, which names the
/// unit, rather than the service refusing to run outside systemd.
pub fn install(notify_socket: Option<&OsStr>) {
    let Some(value) = notify_socket.filter(|v| !v.is_empty()) else { return };
    match Notifier::new(value) {
        Ok(notifier) => {
            tracing::debug!(socket = %value.to_string_lossy(), "systemd notifications on");
            let _ = NOTIFIER.set(notifier);
        }
        Err(e) => tracing::warn!("systemd notifications off: {e}"),
    }
}

/// `READY=1`, with a `STATUS=` line.
pub fn ready(status: &str) {
    if let Some(notifier) = NOTIFIER.get() {
        notifier.ready(status);
    }
}

/// A `STATUS=` line.
pub fn status(status: &str) {
    if let Some(notifier) = NOTIFIER.get() {
        notifier.status(status);
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    if let Some(notifier) = NOTIFIER.get() {
        notifier.stopping();
    }
}

/// `RELOADING=1` now (when the service was ready: a reload before that is part of starting) and
/// `READY=1` when the last guard of overlapping reloads drops.
pub fn reloading() -> Reload<'static> {
    Reload { notifier: NOTIFIER.get().filter(|n| n.begin_reload()) }
}

/// A reload in progress: `READY=1` follows when it drops.
#[must_use = "the reload ends (READY=1) when this drops"]
pub struct Reload<'a> {
    notifier: Option<&'a Notifier>,
}

impl Drop for Reload<'_> {
    fn drop(&mut self) {
        if let Some(notifier) = self.notifier {
            notifier.end_reload();
        }
    }
}

/// One `NOTIFY_SOCKET`: an unbound datagram socket and the address to send to.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// Whether READY=1 was sent (reloads before that send nothing), and reloads in progress; the
    /// lock also keeps each RELOADING/READY pair in order on the wire.
    state: Mutex<State>,
    /// A failed send is logged once.
    failed: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    ready: bool,
    reloads: u32,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`'s value: an absolute path, or `@name` for the abstract name
    /// `name`.
    pub fn new(notify_socket: &OsStr) -> Result<Self, NotifyError> {
        let shown = || notify_socket.to_string_lossy().into_owned();
        let bytes = notify_socket.as_bytes();
        let address = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(notify_socket),
            _ => return Err(NotifyError::BadAddress(shown())),
        }
        .map_err(|source| NotifyError::Socket { address: shown(), source })?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Socket { address: shown(), source })?;
        // A blocked systemd must never stall a service: drop the message instead.
        socket.set_nonblocking(true).map_err(|source| NotifyError::Socket { address: shown(), source })?;
        Ok(Notifier { socket, address, state: Mutex::new(State::default()), failed: AtomicBool::new(false) })
    }

    /// `READY=1` and `STATUS=…`.
    pub fn ready(&self, status: &str) {
        let mut state = self.state();
        state.ready = true;
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) {
        let _state = self.state();
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        let _state = self.state();
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// Counts a reload in; sends `RELOADING=1` for the first of overlapping ones. False before
    /// `READY=1`.
    fn begin_reload(&self) -> bool {
        let mut state = self.state();
        if !state.ready {
            return false;
        }
        state.reloads += 1;
        if state.reloads == 1 {
            self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading", monotonic_usec()));
        }
        true
    }

    /// Counts a reload out; sends `READY=1` when none is left.
    fn end_reload(&self) {
        let mut state = self.state();
        state.reloads = state.reloads.saturating_sub(1);
        if state.reloads == 0 {
            self.send("READY=1\nSTATUS=reloaded");
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.address)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET); later failures are not logged");
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

/// A status on one line: systemd reads one variable per line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn a_path_socket_gets_ready_reloading_ready_and_stopping_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        // Before READY=1 a reload is part of starting: nothing is sent.
        assert!(!notifier.begin_reload());
        notifier.ready("listening\non 127.0.0.1:1");
        assert!(notifier.begin_reload());
        assert!(notifier.begin_reload(), "an overlapping reload");
        notifier.end_reload();
        notifier.end_reload();
        notifier.stopping();
        let got = received(&listener);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], "READY=1\nSTATUS=listening on 127.0.0.1:1");
        let usec: u64 =
            got[1].strip_prefix("RELOADING=1\nMONOTONIC_USEC=").unwrap().split('\n').next().unwrap().parse().unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
        assert_eq!(got[2], "READY=1\nSTATUS=reloaded");
        assert_eq!(got[3], "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn an_abstract_name_is_reached_with_an_at_sign() {
        let name = format!("hybroker-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        listener.set_nonblocking(true).unwrap();
        Notifier::new(OsStr::new(&format!("@{name}"))).unwrap().status("hello");
        assert_eq!(received(&listener), ["STATUS=hello"]);
    }

    #[test]
    fn a_relative_path_is_refused_and_a_missing_socket_does_not_fail_the_sender() {
        assert!(matches!(Notifier::new(OsStr::new("notify.sock")), Err(NotifyError::BadAddress(_))));
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::new(dir.path().join("gone").as_os_str()).unwrap();
        notifier.ready("nobody listens");
        assert!(notifier.failed.load(Ordering::Relaxed));
    }
}
