//! The client's tonic glue: the endpoint and the connector (the server's accept loop is in
//! `incoming`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::TlsError;
use super::explain::{error_chain, explain_error};

/// Client TCP + TLS connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Client HTTP/2 keepalive ping interval.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// The client configuration a connector dials with: fixed, or the current one of a
/// [`Reloading`](super::Reloading) holder (loaded for each new connection, so a reload or renewal
/// applies to the next handshake and live connections stay).
#[derive(Debug, Clone)]
pub struct ClientTls(Arc<ArcSwap<ClientConfig>>);

impl ClientTls {
    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.0.load_full()
    }
}

impl From<Arc<ClientConfig>> for ClientTls {
    fn from(config: Arc<ClientConfig>) -> Self {
        Self(Arc::new(ArcSwap::new(config)))
    }
}

impl From<Arc<ArcSwap<ClientConfig>>> for ClientTls {
    fn from(swap: Arc<ArcSwap<ClientConfig>>) -> Self {
        Self(swap)
    }
}

/// Connects to `url` (`https://host:port`) with mutual TLS; `server_name` overrides the name the
/// server certificate must carry (by default the URL host; IP addresses work).
pub async fn connect(url: &str, config: impl Into<ClientTls>, server_name: Option<&str>) -> Result<Channel, TlsError> {
    let (endpoint, connector) = endpoint(url, config, server_name)?;
    dial(url, endpoint, connector).await
}

/// Like [`connect`], but the TCP connection (and every reconnection) leaves from `local`, such as
/// one of the loopback addresses `127.0.0.x`: one source address has only about 28,000 ports, so a
/// process that holds tens of thousands of connections spreads them over several.
pub async fn connect_from(
    url: &str,
    config: impl Into<ClientTls>,
    server_name: Option<&str>,
    local: IpAddr,
) -> Result<Channel, TlsError> {
    let (endpoint, mut connector) = endpoint(url, config, server_name)?;
    connector.local = Some(local);
    dial(url, endpoint, connector).await
}

async fn dial(url: &str, endpoint: Endpoint, connector: Dialer) -> Result<Channel, TlsError> {
    endpoint.connect_with_connector(connector).await.map_err(|e| TlsError::Connect {
        url: url.to_string(),
        reason: explain_error(&e).unwrap_or_else(|| error_chain(&e)),
    })
}

/// Like [`connect`], but connects on first use (and reconnects as needed). Must be called inside
/// a tokio runtime.
pub fn connect_lazy(url: &str, config: impl Into<ClientTls>, server_name: Option<&str>) -> Result<Channel, TlsError> {
    let (endpoint, connector) = endpoint(url, config, server_name)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A client TLS stream.
type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Builds the endpoint and the TCP + TLS connector for `url`.
///
/// tonic would insist on its own TLS settings for an `https` endpoint, so the endpoint dials
/// `http://host:port` through our connector (which always does TLS) and its origin stays `https`.
fn endpoint(
    url: &str,
    config: impl Into<ClientTls>,
    server_name: Option<&str>,
) -> Result<(Endpoint, Dialer), TlsError> {
    let bad = |reason: String| TlsError::BadUrl { url: url.to_string(), reason };
    let uri = url.parse::<Uri>().map_err(|e| bad(e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https".to_string()));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("a path is not allowed".to_string()));
    }
    let host = uri.host().ok_or_else(|| bad("no host".to_string()))?;
    let port = uri.port_u16().unwrap_or(443);
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let name = server_name.unwrap_or(bare_host);
    let name = ServerName::try_from(name.to_string()).map_err(|_| bad(format!("invalid TLS server name {name:?}")))?;
    let plain = format!("http://{host}:{port}").parse::<Uri>();
    let origin = format!("https://{host}:{port}").parse::<Uri>();
    let (plain, origin) = plain.and_then(|p| Ok((p, origin?))).map_err(|e| bad(e.to_string()))?;
    let endpoint = Endpoint::from(plain)
        .origin(origin)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let dialer = Dialer { tls: config.into(), host: bare_host.to_string(), port, name, local: None };
    Ok((endpoint, dialer))
}

/// The connector service: TCP connect (no Nagle), then the rustls handshake.
#[derive(Clone)]
struct Dialer {
    tls: ClientTls,
    host: String,
    port: u16,
    name: ServerName<'static>,
    /// The source address to bind before connecting; `None` lets the kernel choose.
    local: Option<IpAddr>,
}

impl Dialer {
    /// The TCP connection, from `local` when one is set.
    async fn tcp(&self) -> io::Result<TcpStream> {
        let Some(local) = self.local else {
            return TcpStream::connect((self.host.as_str(), self.port)).await;
        };
        let remote = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .find(|addr| addr.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| io::Error::other(format!("{} has no address of the family of {local}", self.host)))?;
        let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(local, 0))?;
        socket.connect(remote).await
    }
}

impl tower::Service<Uri> for Dialer {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = this.tcp().await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(this.tls.current()).connect(this.name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
