//! The broker's live TLS connections by peer certificate, so that a revocation closes them at once.
//!
//! Each accepted socket is wrapped in a [`RevocableTcp`] before its handshake; once the handshake
//! has verified the peer, the connection is registered with its [`PeerCert`]. [`LiveConnections::close_denied`]
//! trips the switch of every connection whose certificate the deny list now refuses: its next read
//! or write fails (the pending read is woken), so hyper drops the connection and every stream on it
//! (an agent's session ends; a gateway's or admin's calls fail). A connection whose entry is gone
//! (it closed) unregisters itself when dropped.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::peer::{DenyList, PeerCert};

/// The registry of live connections of one server.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (PeerCert, Arc<Switch>)>>,
}

impl LiveConnections {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers the verified connection `tcp` of `peer`, unregistered when `tcp` is dropped.
    pub(super) fn register(self: &Arc<Self>, tcp: &mut RevocableTcp, peer: PeerCert) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (peer, tcp.switch.clone()));
        tcp.registration = Some((Arc::downgrade(self), id));
    }

    /// Closes every live connection whose certificate `deny` refuses; returns how many.
    pub fn close_denied(&self, deny: &dyn DenyList) -> u32 {
        let mut closed = 0;
        self.lock().retain(|_, (peer, switch)| match deny.denies_peer(peer) {
            Some(reason) => {
                tracing::info!(
                    peer = peer.identity_uri,
                    serial = peer.serial_hex,
                    reason,
                    "closing a revoked connection"
                );
                switch.trip();
                closed += 1;
                false
            }
            None => true,
        });
        closed
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (PeerCert, Arc<Switch>)>> {
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Trips once; wakes the connection's pending read and write.
#[derive(Debug, Default)]
struct Switch {
    tripped: AtomicBool,
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Switch {
    fn trip(&self) {
        self.tripped.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        wakers.into_iter().flatten().for_each(Waker::wake);
    }

    /// `Err` once tripped; otherwise remembers `cx`'s waker in `slot` (0 read, 1 write).
    fn check(&self, slot: usize, cx: &Context<'_>) -> io::Result<()> {
        if !self.tripped.load(Ordering::SeqCst) {
            let mut wakers = self.wakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !wakers[slot].as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                wakers[slot] = Some(cx.waker().clone());
            }
            drop(wakers);
            if !self.tripped.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
        Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the peer's certificate was revoked"))
    }
}

/// A server-side TCP stream that a revocation can close.
#[derive(Debug)]
pub struct RevocableTcp {
    tcp: TcpStream,
    switch: Arc<Switch>,
    registration: Option<(Weak<LiveConnections>, u64)>,
}

impl RevocableTcp {
    /// Wraps an accepted socket (not registered yet).
    pub fn new(tcp: TcpStream) -> Self {
        Self { tcp, switch: Arc::default(), registration: None }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Drop for RevocableTcp {
    fn drop(&mut self) {
        if let Some((live, id)) = self.registration.take()
            && let Some(live) = live.upgrade()
        {
            live.lock().remove(&id);
        }
    }
}

impl Connected for RevocableTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for RevocableTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(0, cx)?;
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for RevocableTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(1, cx)?;
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(1, cx)?;
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::model::UnixMillis;

    #[derive(Debug)]
    struct DenyUri(&'static str);

    impl DenyList for DenyUri {
        fn denies(&self, identity_uri: &str, _serial: &str, _issued_at: UnixMillis) -> Option<String> {
            (identity_uri == self.0).then(|| "test".to_string())
        }
    }

    fn peer(uri: &str) -> PeerCert {
        PeerCert { identity_uri: uri.into(), serial_hex: "1".into(), issued_at: 0, not_after: 0 }
    }

    /// A connected pair: the server side wrapped and registered as `uri`, and the client side.
    async fn registered(live: &Arc<LiveConnections>, uri: &str) -> (RevocableTcp, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut server = RevocableTcp::new(listener.accept().await.unwrap().0);
        live.register(&mut server, peer(uri));
        (server, client)
    }

    #[tokio::test]
    async fn a_denied_connection_fails_its_pending_read_and_others_stay() {
        let live = LiveConnections::new();
        let (mut revoked, _c1) = registered(&live, "spiffe://td/agent/s/a").await;
        let (kept, _c2) = registered(&live, "spiffe://td/agent/s/b").await;
        let pending = tokio::spawn(async move { revoked.read(&mut [0u8; 8]).await });
        tokio::task::yield_now().await;
        assert_eq!(live.close_denied(&DenyUri("spiffe://td/agent/s/a")), 1);
        let read = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("woken").unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(live.len(), 1, "the other connection stays registered");
        drop(kept);
        assert!(live.is_empty(), "a dropped connection unregisters itself");
    }
}
