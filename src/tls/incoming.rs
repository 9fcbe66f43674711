//! The one TCP accept loop of every server: the broker's gRPC listener (through [`tls_incoming`]),
//! the gateway's public listener and the local object store.
//!
//! [`accept_connections`] accepts until it is told to stop, passes each socket through the
//! [`HandshakeGate`] (TLS servers only: a socket over its source's limit is closed at once), runs
//! the TLS handshake in the connection's own task within the gate's timeouts, and hands the
//! finished [`Connection`] to the server's `serve`. A failed handshake is counted and logged
//! ([`log_handshake_error`]) and never reaches `serve`. The caller gets the connections' tasks
//! back, to drain or abort them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::handshake::{FAILURES, HandshakeGate, HandshakeLimits, accept_tls, log_handshake_error};
use super::live::{LiveConnections, RevocableTcp};
use super::peer::{DenyList, PeerCert};

/// Pause after an accept error such as "too many open files".
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A TLS server's side of the accept loop: its configuration (the current one is loaded for each
/// handshake, so a reload applies to new connections only), the gate that bounds its unfinished
/// handshakes, and optionally the registry of live connections with the deny list that closes
/// them ([`ServerTls::revocable`]).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ArcSwap<ServerConfig>>,
    pub gate: Arc<HandshakeGate>,
    pub live: Option<(Arc<LiveConnections>, Arc<dyn DenyList>)>,
}

impl ServerTls {
    /// A configuration that never changes, without a registry.
    pub fn fixed(config: Arc<ServerConfig>, gate: Arc<HandshakeGate>) -> Self {
        Self { config: Arc::new(ArcSwap::new(config)), gate, live: None }
    }

    /// Registers each verified connection in `live`, and refuses (after its handshake) a peer
    /// that `deny` refuses: the handshake's own check cannot see a revocation committed while it ran.
    pub fn revocable(mut self, live: Arc<LiveConnections>, deny: Arc<dyn DenyList>) -> Self {
        self.live = Some((live, deny));
        self
    }
}

/// An accepted connection, ready to serve: plain TCP, or TLS after a finished handshake.
#[derive(Debug)]
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<RevocableTcp>>),
}

/// Accepts on `listener` until `stop` resolves and spawns `serve` for each admitted connection (TLS
/// when `tls` is given); returns the connections' tasks still running. Dropping the listener on
/// return stops accepting.
pub async fn accept_connections<F, Fut>(
    server: &'static str,
    listener: TcpListener,
    tls: Option<ServerTls>,
    stop: impl Future<Output = ()>,
    serve: F,
) -> JoinSet<()>
where
    F: Fn(Connection, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(server, error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Over its source's limit of unfinished handshakes: dropping the socket closes it at once.
        let handshake = match &tls {
            None => None,
            Some(tls) => match tls.gate.admit(peer) {
                Some(slot) => Some((tls.config.load_full(), *tls.gate.limits(), slot, tls.live.clone())),
                None => continue,
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(server, %peer, error = %e, "could not set TCP_NODELAY");
        }
        let serve = serve.clone();
        connections.spawn(async move {
            let connection = match handshake {
                None => Connection::Plain(tcp),
                Some((config, limits, slot, live)) => {
                    let finished = accept_tls(RevocableTcp::new(tcp), config, &limits).await;
                    drop(slot);
                    match finished {
                        Ok(mut stream) => {
                            if let Some((live, deny)) = live
                                && !admit_peer(&mut stream, &live, deny.as_ref())
                            {
                                return;
                            }
                            Connection::Tls(Box::new(stream))
                        }
                        Err(e) => return log_handshake_error(peer, &e),
                    }
                }
            };
            serve(connection, peer).await;
        });
    }
    connections
}

/// Registers a verified connection in `live`, unless `deny` refuses its peer (counted as `revoked`).
/// Registered first, checked second: a revocation that lands in between closes it either way.
fn admit_peer(stream: &mut TlsStream<RevocableTcp>, live: &Arc<LiveConnections>, deny: &dyn DenyList) -> bool {
    let (tcp, session) = stream.get_mut();
    let Some(peer) = session.peer_certificates().and_then(|certs| PeerCert::from_der(certs.first()?).ok()) else {
        return true;
    };
    live.register(tcp, peer.clone());
    if let Some(reason) = deny.denies_peer(&peer) {
        crate::metrics::global().inc(FAILURES, &["revoked"], 1.0);
        tracing::warn!(peer = peer.identity_uri, serial = peer.serial_hex, reason, "refused a revoked certificate");
        return false;
    }
    true
}

/// Serves TLS streams accepted on `listener`, for `Server::serve_with_incoming_shutdown`, with the
/// default [`HandshakeLimits`]. Must be called inside a tokio runtime.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<RevocableTcp>, io::Error>> + Send + 'static {
    tls_incoming_with(listener, config, HandshakeGate::new(HandshakeLimits::default()))
}

/// [`tls_incoming`] with the limits of `gate` (which the caller may watch).
///
/// Each handshake runs in its own task; failed handshakes are counted, logged and skipped, so the
/// stream only ends when it is dropped (which stops the accept loop and the handshakes in flight).
pub fn tls_incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    gate: Arc<HandshakeGate>,
) -> impl Stream<Item = Result<TlsStream<RevocableTcp>, io::Error>> + Send + 'static {
    tls_incoming_served(listener, ServerTls::fixed(config, gate))
}

/// [`tls_incoming_with`] for a [`ServerTls`]: a reloading configuration, a registry of live
/// connections.
pub fn tls_incoming_served(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = Result<TlsStream<RevocableTcp>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(32);
    let receiver_gone = tx.clone();
    tokio::spawn(async move {
        let stop = async move { receiver_gone.closed().await };
        let pass_on = move |connection, _peer| {
            let tx = tx.clone();
            async move {
                // Fails only when the server has stopped; the connection is then dropped.
                if let Connection::Tls(stream) = connection {
                    drop(tx.send(Ok(*stream)).await);
                }
            }
        };
        accept_connections("grpc", listener, Some(tls), stop, pass_on).await.abort_all();
    });
    ReceiverStream::new(rx)
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Connection::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Connection::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Connection::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(tcp) => tcp.is_write_vectored(),
            Connection::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Connection::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Connection::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
