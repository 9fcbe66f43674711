//! The server side of a TLS handshake: the pre-handshake timeout and the per-source limits on
//! unfinished handshakes ([`HandshakeGate`]), and why a handshake failed.
//!
//! A socket that never sends a ClientHello costs the server a task and a file descriptor until it
//! is dropped, so the ClientHello must arrive within [`HandshakeLimits::client_hello_timeout`]
//! (3 s) and the whole handshake within [`HandshakeLimits::handshake_timeout`] (10 s). Only
//! *unfinished* handshakes are limited: at most [`HandshakeLimits::per_source`] (1,024) per source
//! address, enough for a whole site behind one NAT address reconnecting at once, and
//! [`HandshakeLimits::total`] (16,384) in all, enough for 10,000 agents reconnecting together. A
//! finished (or failed) handshake frees its slot at once. A socket over a limit is closed as soon
//! as it is accepted and counted in `hybroker_tls_handshake_failures_total` with the reason
//! `too_many_unfinished` (its source is over its limit) or `server_busy` (the total is reached), so
//! one address cannot take the slots of the others and nothing waits in the listen backlog.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::verify::Refused;

/// Least time between two warnings about refused sockets.
const REFUSAL_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// The metric family of failed and refused handshakes.
pub(super) const FAILURES: &str = "hybroker_tls_handshake_failures_total";

/// How long a handshake may take and how many may be unfinished at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Longest wait for the client's first flight (the ClientHello) after the accept.
    pub client_hello_timeout: Duration,
    /// Longest a whole handshake may take after the accept.
    pub handshake_timeout: Duration,
    /// Unfinished handshakes from one source: an IPv4 address, or an IPv6 /64 (one host's prefix).
    pub per_source: usize,
    /// Unfinished handshakes from all sources together.
    pub total: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            client_hello_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            per_source: 1024,
            total: 16_384,
        }
    }
}

/// Why a server handshake did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// No complete ClientHello arrived in time.
    #[error("no client hello within {0:?}")]
    NoClientHello(Duration),
    /// The handshake did not finish in time.
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    /// TLS or the socket failed (the rustls error, if any, is inside).
    #[error(transparent)]
    Io(io::Error),
}

impl HandshakeError {
    /// The rustls error inside, if there is one.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            HandshakeError::Io(e) => e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        }
    }

    /// A bounded reason, the `reason` label of `hybroker_tls_handshake_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::NoClientHello(_) => "no_client_hello",
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Io(e) => match self.rustls_error() {
                Some(tls) => rustls_reason(tls),
                None if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => "closed",
                None => "other",
            },
        }
    }
}

/// A bounded reason for a rustls handshake error.
fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    use rustls::PeerIncompatible as P;
    match e {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::PeerIncompatible(
            P::Tls12NotOffered | P::Tls12NotOfferedOrEnabled | P::SupportedVersionsExtensionRequired,
        ) => "protocol_version",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        rustls::Error::InvalidMessage(_) => "bad_message",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong_eku",
            C::BadSignature => "bad_signature",
            C::BadEncoding => "bad_encoding",
            C::Revoked => "revoked",
            C::Other(other) => {
                let inner: &(dyn std::error::Error + 'static) = &*other.0;
                if let Some(Refused(refusal)) = inner.downcast_ref::<Refused>() {
                    refusal.reason()
                } else {
                    match inner.downcast_ref::<webpki::Error>() {
                        Some(webpki::Error::CaUsedAsEndEntity) => "ca_as_leaf",
                        Some(webpki::Error::PathLenConstraintViolated) => "path_len",
                        _ => "bad_certificate",
                    }
                }
            }
            _ => "bad_certificate",
        },
        _ => "other",
    }
}

/// Runs the server side of a handshake on `tcp` within `limits`' timeouts.
pub async fn accept_tls<IO: AsyncRead + AsyncWrite + Unpin>(
    tcp: IO,
    config: Arc<ServerConfig>,
    limits: &HandshakeLimits,
) -> Result<TlsStream<IO>, HandshakeError> {
    let deadline = Instant::now() + limits.handshake_timeout;
    let hello = LazyConfigAcceptor::new(Acceptor::default(), tcp);
    let start = tokio::time::timeout(limits.client_hello_timeout, hello)
        .await
        .map_err(|_| HandshakeError::NoClientHello(limits.client_hello_timeout))?
        .map_err(HandshakeError::Io)?;
    tokio::time::timeout_at(deadline, start.into_stream(config))
        .await
        .map_err(|_| HandshakeError::Timeout(limits.handshake_timeout))?
        .map_err(HandshakeError::Io)
}

/// Counts unfinished handshakes per source and in all; hands out [`HandshakeSlot`]s.
#[derive(Debug)]
pub struct HandshakeGate {
    limits: HandshakeLimits,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
    /// Sockets refused since the last warning, and when that was.
    refused_since_warning: u64,
    last_warning: Option<Instant>,
}

/// One unfinished handshake's place in its [`HandshakeGate`]; dropping it frees the place.
#[derive(Debug)]
pub struct HandshakeSlot {
    gate: Arc<HandshakeGate>,
    source: IpAddr,
}

impl HandshakeGate {
    /// A gate with no handshake in progress. Raises the process's soft open-file limit if the
    /// limits need more (each unfinished handshake holds a socket).
    pub fn new(limits: HandshakeLimits) -> Arc<Self> {
        ensure_open_file_limit(&limits);
        Arc::new(HandshakeGate { limits, state: Mutex::new(GateState::default()) })
    }

    /// A slot for a new connection from `peer`, or `None` (counted and logged) when its source or
    /// the whole gate is at its limit: the caller then closes the socket.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<HandshakeSlot> {
        let source = source_of(peer.ip());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let count = state.per_source.get(&source).copied().unwrap_or(0);
        let refusal = if count >= self.limits.per_source {
            Some("too_many_unfinished")
        } else if state.total >= self.limits.total {
            Some("server_busy")
        } else {
            None
        };
        if let Some(reason) = refusal {
            crate::metrics::global().inc(FAILURES, &[reason], 1.0);
            tracing::debug!(%peer, reason, "closed a socket before its handshake");
            state.refused_since_warning += 1;
            let now = Instant::now();
            if state.last_warning.is_none_or(|at| now.duration_since(at) >= REFUSAL_WARN_INTERVAL) {
                tracing::warn!(
                    %source,
                    reason,
                    refused = state.refused_since_warning,
                    unfinished = state.total,
                    "closing new connections: too many unfinished tls handshakes",
                );
                state.refused_since_warning = 0;
                state.last_warning = Some(now);
            }
            return None;
        }
        *state.per_source.entry(source).or_insert(0) += 1;
        state.total += 1;
        Some(HandshakeSlot { gate: Arc::clone(self), source })
    }

    /// The limits this gate enforces (and the handshake's timeouts).
    pub fn limits(&self) -> &HandshakeLimits {
        &self.limits
    }

    /// Unfinished handshakes in all.
    pub fn unfinished(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        state.total -= 1;
        if let Some(count) = state.per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                state.per_source.remove(&self.source);
            }
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` toward the hard limit so that `limits.total` unfinished
/// handshakes fit beside as many established connections; warns when the hard limit is too low
/// (sockets over it fail at accept, and the per-source limits no longer protect anyone).
fn ensure_open_file_limit(limits: &HandshakeLimits) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = u64::try_from(limits.total).unwrap_or(u64::MAX).saturating_mul(2).saturating_add(1024);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= wanted {
        return;
    }
    let target = wanted.min(hard);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        tracing::info!(from = soft, to = target, "raised the open file limit for tls handshakes");
    }
    if target < wanted {
        tracing::warn!(
            limit = target,
            wanted,
            "the open file limit is below what the tls handshake limits need; raise it (LimitNOFILE)",
        );
    }
}

/// The source a peer address is counted under: IPv4 addresses (also IPv4-mapped IPv6) as they
/// are, IPv6 addresses by their /64, since one host or site usually holds a whole /64 (counting
/// single addresses would let it pick a fresh one per connection). The gateway counts its
/// clients the same way.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// Counts and logs a failed server handshake: a missing client certificate (the refusal the
/// verifier does not log) at warn, the rest (probes, old TLS versions, resets, idle sockets) at
/// debug: they are counted by reason.
pub fn log_handshake_error(peer: SocketAddr, e: &HandshakeError) {
    let reason = e.reason();
    crate::metrics::global().inc(FAILURES, &[reason], 1.0);
    match e.rustls_error() {
        Some(rustls::Error::NoCertificatesPresented) => {
            tracing::warn!(%peer, "refused client: no client certificate");
        }
        _ => tracing::debug!(%peer, reason, error = %e, "tls handshake failed"),
    }
}
