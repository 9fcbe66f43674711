//! The public listener: the shared accept loop ([`accept_connections`]), rustls (ALPN `h2`,
//! `http/1.1`) when the config gives a public certificate, plain HTTP on loopback otherwise, and
//! hyper-util's auto builder (HTTP/1.1 and HTTP/2) per connection. On shutdown it stops
//! accepting, asks every connection to finish its requests and waits a bounded time for them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::tls::{Connection, HandshakeGate, HandshakeLimits, ServerTls, accept_connections};

/// Longest a client may take for its request headers (the TLS handshake's bounds are
/// [`HandshakeLimits`]'s).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors setting up the public listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not read {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: rustls_pki_types::pem::Error },
    #[error("public tls configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The public HTTPS configuration from a PEM certificate chain and key (any CA).
pub fn public_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ServeError> {
    let read_err = |what, path: &Path| {
        let path = path.display().to_string();
        move |source| ServeError::Read { what, path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(read_err("certificate", cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(read_err("private key", key))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains connections for at most
/// `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<arc_swap::ArcSwap<ServerConfig>>>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) {
    // The broker's limits on unfinished handshakes: a ClientHello within 3 s, at most 1,024
    // unfinished per client address. Plain HTTP (loopback only) has no handshakes to limit.
    let tls = tls.map(|config| ServerTls { config, gate: HandshakeGate::new(HandshakeLimits::default()), live: None });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let (closing_tx, closing) = watch::channel(false);
    let serve_one = move |connection, peer| {
        let (builder, router, closing) = (builder.clone(), router.clone(), closing.clone());
        async move { serve_connection(&builder, connection, peer, router, closing).await }
    };
    let mut connections = accept_connections("gateway", listener, tls, shutdown, serve_one).await;
    let started = std::time::Instant::now();
    let _ = closing_tx.send(true);
    let open = connections.len();
    tracing::info!(open, "gateway stopped accepting; waiting up to {grace:?} for open connections to finish");
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = connections.len(), "dropping connections still open after {grace:?}");
        connections.abort_all();
    }
    tracing::info!("gateway exiting after {:?}", started.elapsed());
}

/// One connection, HTTP/1.1 or HTTP/2; finishes gracefully once `closing` turns true. Every
/// request carries the peer's address (`ConnectInfo`).
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    io: Connection,
    peer: SocketAddr,
    router: Router,
    mut closing: watch::Receiver<bool>,
) {
    let service = tower::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let service = TowerToHyperService::new(service);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = async { drop(closing.wait_for(|c| *c).await) } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
