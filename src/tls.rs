//! Mutual TLS for every internal hop: rustls configurations, the identity checks and the tonic glue.
//!
//! Both sides verify the peer chain with rustls' webpki verifiers and then check the end-entity
//! certificate beyond the chain (DESIGN §6): exactly one URI SAN that parses as an [`Identity`] in
//! our trust domain, a role allowed for the endpoint, an extendedKeyUsage extension that is present
//! and names the purpose (webpki accepts a certificate without one; we refuse it), and not a CA.
//! Only TLS 1.3 is offered, with ALPN `h2` and no session resumption.
//!
//! Servers feed [`tls_incoming`] to `Server::serve_with_incoming_shutdown`, so tonic's
//! `Request::peer_certs()` works ([`peer_identity`], [`require_role`]); clients use [`connect`].
//! A client whose certificate the server refuses fails at its first call with an opaque status:
//! [`explain_status`] turns that into a message a person can act on.

use std::error::Error as StdError;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::model::identity::{Identity, IdentityError, Role, validate_trust_domain};

/// ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";
/// Longest a server waits for one client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// Pause after an accept error such as "too many open files".
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Client TCP + TLS connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Client HTTP/2 keepalive ping interval.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// Errors from building TLS configurations or connecting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("could not read {what} {path}: {source}")]
    Read {
        /// What the file should hold ("ca certificate", "certificate", "private key").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("invalid pem in {what} {path}: {source}")]
    BadPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("no certificate in {what} {path}")]
    NoCertificate {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("no private key in {0}")]
    NoKey(PathBuf),
    /// rustls refused the configuration (bad key, key not matching the certificate, bad CA).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The webpki verifier could not be built.
    #[error("invalid TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The configured trust domain or role list is invalid.
    #[error("invalid TLS configuration: {0}")]
    Identity(#[from] IdentityError),
    /// The configuration names no allowed client role.
    #[error("invalid TLS configuration: no client role is allowed")]
    NoClientRoles,
    /// The URL cannot be dialled.
    #[error("invalid url {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A certificate file's leaf carries no usable identity.
    #[error("certificate {path} has no usable identity: {source}")]
    CertIdentity {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        source: PeerCertError,
    },
    /// Connecting failed.
    #[error("could not connect to {url}: {reason}")]
    Connect {
        /// The URL dialled.
        url: String,
        /// An explanation built from the error chain.
        reason: String,
    },
}

/// Certificate, key and CA bundle files of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The CA bundle that issues the peers' certificates.
    pub ca_cert: PathBuf,
    /// This endpoint's certificate chain.
    pub cert: PathBuf,
    /// This endpoint's private key.
    pub key: PathBuf,
}

/// The extended key usage a peer certificate must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    /// TLS client authentication (agents, gateways, admins).
    ClientAuth,
    /// TLS server authentication (the broker).
    ServerAuth,
}

impl std::fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyPurpose::ClientAuth => "clientAuth",
            KeyPurpose::ServerAuth => "serverAuth",
        })
    }
}

/// Why a chain-valid peer certificate is still refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    /// The DER cannot be parsed.
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// Not exactly one URI SAN.
    #[error("certificate has {0} URI SANs; exactly one is required")]
    UriSanCount(usize),
    /// The URI SAN is not a valid identity.
    #[error("certificate identity is invalid: {0}")]
    BadIdentity(IdentityError),
    /// The identity is in another trust domain.
    #[error("certificate identity {uri} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The identity URI.
        uri: String,
        /// Our trust domain.
        expected: String,
    },
    /// The role is not allowed at this endpoint.
    #[error("role {role} is not allowed here; allowed: {allowed}")]
    RoleNotAllowed {
        /// The peer's role.
        role: Role,
        /// The allowed roles, comma-separated.
        allowed: String,
    },
    /// No extendedKeyUsage extension.
    #[error("certificate has no extended key usage extension ({0} is required)")]
    NoEku(KeyPurpose),
    /// The extendedKeyUsage extension lacks the purpose.
    #[error("certificate extended key usage does not include {0}")]
    MissingEku(KeyPurpose),
    /// A CA certificate presented as an end entity.
    #[error("certificate is a CA certificate, not an end-entity certificate")]
    IsCa,
}

/// Installs ring as the process-wide rustls provider; calling it again is harmless.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The provider every configuration here uses, whatever the process default is.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that requires client certificates of `client_roles` in `trust_domain`.
pub fn server_config(
    paths: &TlsPaths,
    trust_domain: &str,
    client_roles: &[Role],
) -> Result<Arc<ServerConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    if client_roles.is_empty() {
        return Err(TlsError::NoClientRoles);
    }
    let roots = load_roots(&paths.ca_cert)?;
    let (certs, key) = load_pair(paths)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let verifier = ClientIdentityVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
        roles: client_roles.to_vec(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection shows (and has checked) a full certificate chain.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration that presents our certificate and accepts only a `server_role` server.
pub fn client_config(
    paths: &TlsPaths,
    trust_domain: &str,
    server_role: Role,
) -> Result<Arc<ClientConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    let roots = load_roots(&paths.ca_cert)?;
    let (certs, key) = load_pair(paths)?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider()).build()?;
    let verifier = ServerIdentityVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
        role: server_role,
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Checks a chain-valid end-entity certificate beyond the chain; returns its identity.
pub fn check_peer_cert(
    der: &[u8],
    trust_domain: &str,
    roles: &[Role],
    purpose: KeyPurpose,
) -> Result<Identity, PeerCertError> {
    let cert = parse_cert(der)?;
    let basic = cert
        .basic_constraints()
        .map_err(|e| PeerCertError::Unparsable(e.to_string()))?;
    if basic.is_some_and(|b| b.value.ca) {
        return Err(PeerCertError::IsCa);
    }
    let identity = identity_of(&cert)?;
    if identity.trust_domain != trust_domain {
        return Err(PeerCertError::WrongTrustDomain {
            uri: identity.uri(),
            expected: trust_domain.to_string(),
        });
    }
    if !roles.contains(&identity.role) {
        return Err(PeerCertError::RoleNotAllowed {
            role: identity.role,
            allowed: role_list(roles),
        });
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| PeerCertError::Unparsable(e.to_string()))?
        .ok_or(PeerCertError::NoEku(purpose))?;
    let present = match purpose {
        KeyPurpose::ClientAuth => eku.value.client_auth,
        KeyPurpose::ServerAuth => eku.value.server_auth,
    };
    if !present {
        return Err(PeerCertError::MissingEku(purpose));
    }
    Ok(identity)
}

/// The identity in the first (leaf) certificate of a PEM file, e.g. our own certificate.
pub fn identity_of_cert_file(path: &Path) -> Result<Identity, TlsError> {
    let certs = load_certs("certificate", path)?;
    parse_cert(&certs[0])
        .and_then(|cert| identity_of(&cert))
        .map_err(|source| TlsError::CertIdentity {
            path: path.to_path_buf(),
            source,
        })
}

/// The trust domain of the identity in a PEM certificate file.
pub fn trust_domain_of_cert(path: &Path) -> Result<String, TlsError> {
    identity_of_cert_file(path).map(|identity| identity.trust_domain)
}

/// The identity of the verified peer of a server-side request.
pub fn peer_identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    parse_cert(leaf)
        .and_then(|cert| identity_of(&cert))
        .map_err(|e| Status::unauthenticated(format!("client {e}")))
}

/// [`peer_identity`], refused with `permission_denied` unless its role is in `allowed`.
pub fn require_role<T>(req: &Request<T>, allowed: &[Role]) -> Result<Identity, Status> {
    let identity = peer_identity(req)?;
    if allowed.contains(&identity.role) {
        Ok(identity)
    } else {
        Err(Status::permission_denied(format!(
            "role {} is not allowed here; allowed: {}",
            identity.role,
            role_list(allowed)
        )))
    }
}

/// Serves TLS streams accepted on `listener`, for `Server::serve_with_incoming_shutdown`.
///
/// Each handshake runs in its own task (at most [`MAX_HANDSHAKES`] at once, 10 s each); failed
/// handshakes are logged and skipped, so the stream only ends when it is dropped. Must be called
/// inside a tokio runtime.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(32);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = tx.closed() => return,
                permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        // Fails only when the server has stopped; the connection is then dropped.
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_handshake_error(peer, &e),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Logs a failed server handshake: refusals the verifier has not logged yet at warn, the rest
/// (probes, resets) at debug.
fn log_handshake_error(peer: std::net::SocketAddr, e: &io::Error) {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => {
            tracing::warn!(%peer, "refused client: no client certificate");
        }
        _ => tracing::debug!(%peer, error = %e, "tls handshake failed"),
    }
}

/// Connects to `url` (`https://host:port`) with mutual TLS; `server_name` overrides the name the
/// server certificate must carry (by default the URL host; IP addresses work).
pub async fn connect(
    url: &str,
    config: Arc<ClientConfig>,
    server_name: Option<&str>,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = endpoint(url, config, server_name)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| TlsError::Connect {
            url: url.to_string(),
            reason: explain_error(&e).unwrap_or_else(|| error_chain(&e)),
        })
}

/// Like [`connect`], but connects on first use (and reconnects as needed). Must be called inside
/// a tokio runtime.
pub fn connect_lazy(
    url: &str,
    config: Arc<ClientConfig>,
    server_name: Option<&str>,
) -> Result<Channel, TlsError> {
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
    config: Arc<ClientConfig>,
    server_name: Option<&str>,
) -> Result<(Endpoint, Dialer), TlsError> {
    let bad = |reason: String| TlsError::BadUrl {
        url: url.to_string(),
        reason,
    };
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
    let name = ServerName::try_from(name.to_string())
        .map_err(|_| bad(format!("invalid TLS server name {name:?}")))?;
    let plain = format!("http://{host}:{port}").parse::<Uri>();
    let origin = format!("https://{host}:{port}").parse::<Uri>();
    let (plain, origin) = plain
        .and_then(|p| Ok((p, origin?)))
        .map_err(|e| bad(e.to_string()))?;
    let endpoint = Endpoint::from(plain)
        .origin(origin)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let dialer = Dialer {
        connector: TlsConnector::from(config),
        host: bare_host.to_string(),
        port,
        name,
    };
    Ok((endpoint, dialer))
}

/// The connector service: TCP connect (no Nagle), then the rustls handshake.
#[derive(Clone)]
struct Dialer {
    connector: TlsConnector,
    host: String,
    port: u16,
    name: ServerName<'static>,
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
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this.connector.connect(this.name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A clear message for a failed call: transport and TLS failures are explained from the error
/// chain (only what it shows), other statuses give their message.
pub fn explain_status(status: &Status) -> String {
    if let Some(message) = status.source().and_then(explain_error) {
        return message;
    }
    let transport = matches!(
        status.code(),
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::Internal
    );
    match status.source() {
        Some(source) if transport => format!(
            "the connection to the broker failed: {}: {}",
            status.message(),
            error_chain(source)
        ),
        _ if status.message().is_empty() => status.code().description().to_string(),
        _ => status.message().to_string(),
    }
}

/// Explains the first TLS or socket failure in the chain of `err`, if there is one.
///
/// h2 keeps only the kind and text of I/O errors, so rustls errors are also recognised by text.
fn explain_error(err: &(dyn StdError + 'static)) -> Option<String> {
    const ALERT: &str = "received fatal alert: ";
    const BAD_PEER: &str = "invalid peer certificate: ";
    let mut connecting = false;
    let mut current = Some(err);
    while let Some(e) = current {
        connecting |= e.is::<tonic::ConnectError>();
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::AlertReceived(alert) => explain_alert(&format!("{alert:?}")),
                other => explain_tls_text(&other.to_string()),
            });
        }
        let text = e.to_string();
        if let Some(at) = text.find(ALERT) {
            let name: String = text[at + ALERT.len()..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            return Some(explain_alert(&name));
        }
        if let Some(at) = text.find(BAD_PEER) {
            return Some(explain_tls_text(&text[at..]));
        }
        if let Some(io_err) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind as K;
            let message = match io_err.kind() {
                K::ConnectionRefused => {
                    Some("could not reach the broker: connection refused".into())
                }
                K::TimedOut if connecting => {
                    Some("could not reach the broker: connection timed out".into())
                }
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    Some(format!(
                        "the broker closed the connection ({io_err}); if this happens at the first \
                         call, it may have refused our certificate (check that it is issued by \
                         the broker's CA, not expired, and has the right role)"
                    ))
                }
                _ => None,
            };
            if message.is_some() {
                return message;
            }
            if let Some(inner) = io_err.get_ref() {
                // `io::Error::source` skips the wrapped error itself: look at it first.
                current = Some(inner as &(dyn StdError + 'static));
                continue;
            }
        }
        current = e.source();
    }
    connecting.then(|| format!("could not reach the broker: {}", error_chain(err)))
}

/// Explains a TLS alert the broker sent us, by its rustls name.
fn explain_alert(name: &str) -> String {
    const REFUSALS: [&str; 9] = [
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "CertificateUnknown",
        "UnknownCA",
        "AccessDenied",
        "CertificateRequired",
        "DecryptError",
    ];
    if REFUSALS.contains(&name) {
        format!(
            "the broker refused the TLS handshake (alert {name}): check that your certificate is \
             issued by the broker's CA, not expired, and has the right role"
        )
    } else {
        format!("the TLS handshake with the broker failed (alert {name})")
    }
}

/// Explains a local rustls failure from its text.
fn explain_tls_text(text: &str) -> String {
    match text.strip_prefix("invalid peer certificate: ") {
        Some(reason) => {
            // Our own refusals print as `Other(OtherError(<message>))`.
            let reason = reason
                .strip_prefix("Other(OtherError(")
                .and_then(|r| r.strip_suffix("))"))
                .unwrap_or(reason);
            format!("refused the broker's certificate: {reason}")
        }
        None => format!("TLS error with the broker: {text}"),
    }
}

/// The messages of `err` and its sources, joined by ": " (repeats dropped).
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// Wraps webpki's client verifier with the identity checks.
#[derive(Debug)]
struct ClientIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    roles: Vec<Role>,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| log_refusal("client", end_entity, e))?;
        check_peer_cert(
            end_entity,
            &self.trust_domain,
            &self.roles,
            KeyPurpose::ClientAuth,
        )
        .map_err(|e| refuse("client", end_entity, e))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Wraps webpki's server verifier (chain and server name) with the identity checks.
#[derive(Debug)]
struct ServerIdentityVerifier {
    inner: Arc<WebPkiServerVerifier>,
    trust_domain: String,
    role: Role,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| log_refusal("server", end_entity, e))?;
        check_peer_cert(
            end_entity,
            &self.trust_domain,
            &[self.role],
            KeyPurpose::ServerAuth,
        )
        .map_err(|e| refuse("server", end_entity, e))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Logs why a peer certificate was refused, with the peer's URI SAN when it has one.
fn log_refusal(side: &str, end_entity: &[u8], reason: &dyn std::fmt::Display) {
    let peer = parse_cert(end_entity)
        .ok()
        .and_then(|cert| uri_sans(&cert).ok()?.into_iter().next())
        .unwrap_or_else(|| "<no URI SAN>".to_string());
    tracing::warn!(%peer, %reason, "refused {side} certificate");
}

/// Logs and wraps an identity-check failure as a rustls certificate error.
fn refuse(side: &str, end_entity: &[u8], err: PeerCertError) -> rustls::Error {
    log_refusal(side, end_entity, &err);
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(err)))))
}

/// A [`PeerCertError`] inside a rustls error. rustls shows `CertificateError::Other` with `Debug`,
/// so `Debug` here prints the message.
struct Refused(PeerCertError);

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Refused {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// Parses a DER certificate.
fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, PeerCertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PeerCertError::Unparsable(e.to_string()))
}

/// The URI SANs of a certificate, in order.
fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, PeerCertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerCertError::Unparsable(e.to_string()))?;
    Ok(san
        .map(|ext| ext.value.general_names.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// The identity in the certificate's single URI SAN.
fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, PeerCertError> {
    match uri_sans(cert)?.as_slice() {
        [uri] => Identity::parse(uri).map_err(PeerCertError::BadIdentity),
        others => Err(PeerCertError::UriSanCount(others.len())),
    }
}

/// "a, b, c".
fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a file, naming it in the error.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the PEM certificates of a file (at least one).
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The CA bundle as a root store.
fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA certificate", path)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// Our certificate chain and private key.
fn load_pair(
    paths: &TlsPaths,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = load_certs("certificate", &paths.cert)?;
    let key =
        PrivateKeyDer::from_pem_slice(&read("private key", &paths.key)?).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey(paths.key.clone()),
            source => TlsError::BadPem {
                what: "private key",
                path: paths.key.clone(),
                source,
            },
        })?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, IssueRequest, Issued, LeafEku, LeafOptions, init_ca};
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    const TD: &str = "hybroker.test";
    const AGENT_URI: &str = "spiffe://hybroker.test/agent/lab/n1";

    /// A CA in a temporary directory, and helpers to write certificates next to it.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
    }

    impl Fixture {
        fn new() -> Self {
            install_crypto_provider();
            let dir = tempfile::tempdir().unwrap();
            init_ca(dir.path(), TD).unwrap();
            let ca = Ca::load(dir.path()).unwrap();
            Fixture { dir, ca }
        }

        /// Writes `issued` as `<name>.pem` / `<name>-key.pem`, trusting this fixture's CA.
        fn write(&self, name: &str, issued: &Issued) -> TlsPaths {
            let cert = self.dir.path().join(format!("{name}.pem"));
            let key = self.dir.path().join(format!("{name}-key.pem"));
            fs::write(&cert, &issued.cert_pem).unwrap();
            fs::write(&key, &issued.key_pem).unwrap();
            TlsPaths {
                ca_cert: self.dir.path().join("ca.pem"),
                cert,
                key,
            }
        }

        fn issue(&self, role: Role, name: &str, site: Option<&str>) -> TlsPaths {
            let issued = self
                .ca
                .issue(&IssueRequest {
                    role,
                    name: name.to_string(),
                    site: site.map(str::to_string),
                    dns: vec!["localhost".to_string()],
                    ips: vec!["127.0.0.1".parse().unwrap()],
                    days: 1,
                })
                .unwrap();
            self.write(name, &issued)
        }

        /// An agent-like leaf for `lab/n1`, modified by `edit`.
        fn custom(&self, name: &str, edit: impl FnOnce(&mut LeafOptions)) -> TlsPaths {
            let mut opts = LeafOptions {
                uris: vec![AGENT_URI.to_string()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                ..LeafOptions::default()
            };
            edit(&mut opts);
            self.write(name, &self.ca.issue_custom(&opts).unwrap())
        }

        fn server(&self, client_roles: &[Role]) -> Arc<ServerConfig> {
            let paths = self.issue(Role::Broker, "broker", None);
            server_config(&paths, TD, client_roles).unwrap()
        }

        fn agent_client(&self) -> Arc<ClientConfig> {
            client_config(
                &self.issue(Role::Agent, "n1", Some("lab")),
                TD,
                Role::Broker,
            )
            .unwrap()
        }
    }

    /// One real handshake on 127.0.0.1: (server's view: peer identity or error, client's view).
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Result<Identity, String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            tls.write_all(b"k").await.map_err(|e| e.to_string())?;
            // Wait for the client to close, so no reset races the byte.
            let _ = tls.read(&mut [0u8; 1]).await;
            parse_cert(&leaf)
                .and_then(|c| identity_of(&c))
                .map_err(|e| e.to_string())
        };
        let client_side = async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            // With TLS 1.3 a refused client certificate shows up at the first read.
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok(())
        };
        let both = async { tokio::join!(server_side, client_side) };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("handshake hung")
    }

    /// Asserts the server refused the client, with `reason` in the server-side error.
    async fn assert_refused(fx: &Fixture, client: TlsPaths, reason: &str) {
        let client = client_config(&client, TD, Role::Broker).unwrap();
        let (server, client) = handshake(fx.server(&[Role::Agent]), client).await;
        let err = server.expect_err("server accepted the client");
        assert!(
            err.contains(reason),
            "server error {err:?} lacks {reason:?}"
        );
        assert!(client.is_err(), "client did not see the refusal");
    }

    #[tokio::test]
    async fn valid_agent_is_accepted() {
        let fx = Fixture::new();
        let (server, client) = handshake(fx.server(&[Role::Agent]), fx.agent_client()).await;
        assert_eq!(server.unwrap(), Identity::agent(TD, "lab", "n1"));
        client.unwrap();
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let fx = Fixture::new();
        let roots = load_roots(&fx.dir.path().join("ca.pem")).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (server, client) = handshake(fx.server(&[Role::Agent]), Arc::new(client)).await;
        assert!(server.unwrap_err().contains("peer sent no certificates"));
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let fx = Fixture::new();
        let other = Ca::generate(TD).unwrap();
        let issued = other
            .issue_custom(&LeafOptions {
                uris: vec![AGENT_URI.to_string()],
                ..LeafOptions::default()
            })
            .unwrap();
        assert_refused(&fx, fx.write("foreign", &issued), "UnknownIssuer").await;
    }

    #[tokio::test]
    async fn expired_certificate_is_refused() {
        let fx = Fixture::new();
        let day = Duration::from_secs(24 * 3600);
        let paths = fx.custom("expired", |o| {
            o.not_before = SystemTime::now() - 3 * day;
            o.not_after = SystemTime::now() - day;
        });
        assert_refused(&fx, paths, "certificate expired").await;
    }

    #[tokio::test]
    async fn certificate_without_eku_is_refused() {
        let fx = Fixture::new();
        let paths = fx.custom("no-eku", |o| o.eku = LeafEku::None);
        assert_refused(&fx, paths, "no extended key usage").await;
    }

    #[tokio::test]
    async fn certificate_with_two_uri_sans_is_refused() {
        let fx = Fixture::new();
        let paths = fx.custom("two-uris", |o| {
            o.uris
                .push("spiffe://hybroker.test/agent/lab/n2".to_string());
        });
        assert_refused(&fx, paths, "has 2 URI SANs").await;
        let paths = fx.custom("no-uri", |o| o.uris.clear());
        assert_refused(&fx, paths, "has 0 URI SANs").await;
    }

    #[tokio::test]
    async fn ca_certificate_as_leaf_is_refused() {
        let fx = Fixture::new();
        let paths = fx.custom("ca-leaf", |o| o.is_ca = true);
        // webpki already refuses it (CaUsedAsEndEntity); our own check refuses it too.
        assert_refused(&fx, paths.clone(), "invalid peer certificate").await;
        let der = CertificateDer::from_pem_file(&paths.cert).unwrap();
        let err = check_peer_cert(&der, TD, &[Role::Agent], KeyPurpose::ClientAuth).unwrap_err();
        assert_eq!(err, PeerCertError::IsCa);
    }

    #[tokio::test]
    async fn wrong_role_or_trust_domain_is_refused() {
        let fx = Fixture::new();
        let client = fx.agent_client();
        let (server, client) = handshake(fx.server(&[Role::Admin, Role::Gateway]), client).await;
        let err = server.unwrap_err();
        assert!(
            err.contains("role agent is not allowed here; allowed: admin, gateway"),
            "{err}"
        );
        assert!(client.is_err());
        let paths = fx.custom("other-td", |o| {
            o.uris = vec!["spiffe://other.test/agent/lab/n1".to_string()];
        });
        assert_refused(&fx, paths, "not in trust domain hybroker.test").await;
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_an_agent_certificate() {
        let fx = Fixture::new();
        // An agent certificate (clientAuth only) presented by a server: webpki refuses it.
        let agent = fx.issue(Role::Agent, "rogue", Some("lab"));
        let server = server_config(&agent, TD, &[Role::Agent]).unwrap();
        let (_, client) = handshake(server, fx.agent_client()).await;
        assert!(client.unwrap_err().contains("invalid peer certificate"));
        // With serverAuth too, the role check refuses it.
        let both = fx.custom("rogue-both", |o| o.eku = LeafEku::Both);
        let server = server_config(&both, TD, &[Role::Agent]).unwrap();
        let (_, client) = handshake(server, fx.agent_client()).await;
        let err = client.unwrap_err();
        assert!(
            err.contains("role agent is not allowed here; allowed: broker"),
            "{err}"
        );
    }

    #[test]
    fn config_errors_name_the_file() {
        let fx = Fixture::new();
        let mut paths = fx.issue(Role::Broker, "b", None);
        paths.key = fx.dir.path().join("missing-key.pem");
        let err = server_config(&paths, TD, &[Role::Agent]).unwrap_err();
        assert!(
            err.to_string().starts_with("could not read private key "),
            "{err}"
        );
        paths.key = paths.cert.clone();
        let err = server_config(&paths, TD, &[Role::Agent]).unwrap_err();
        assert!(matches!(err, TlsError::NoKey(_)), "{err}");
        assert!(matches!(
            server_config(&fx.issue(Role::Broker, "b", None), TD, &[]),
            Err(TlsError::NoClientRoles)
        ));
        let agent = fx.issue(Role::Agent, "n1", Some("lab"));
        let identity = identity_of_cert_file(&agent.cert).unwrap();
        assert_eq!(identity, Identity::agent(TD, "lab", "n1"));
        assert_eq!(trust_domain_of_cert(&agent.cert).unwrap(), TD);
        let no_uri = fx.custom("no-uri", |o| o.uris.clear());
        let err = identity_of_cert_file(&no_uri.cert).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("has 0 URI SANs; exactly one is required"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tonic_health_check_over_mutual_tls() {
        let fx = Fixture::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let incoming = tls_incoming(listener, fx.server(&[Role::Agent, Role::Admin]));
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let intercept = move |req: Request<()>| {
            let _ = seen_tx.send(require_role(&req, &[Role::Agent])?);
            Ok(req)
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(intercept))
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        let check = || HealthCheckRequest {
            service: String::new(),
        };

        // An agent passes TLS and the interceptor, which sees its certificate.
        let channel = connect(&url, fx.agent_client(), None).await.unwrap();
        let reply = HealthClient::new(channel).check(check()).await.unwrap();
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
        assert_eq!(
            seen_rx.recv().await.unwrap(),
            Identity::agent(TD, "lab", "n1")
        );

        // An admin passes TLS but not `require_role`.
        let admin = fx.issue(Role::Admin, "ops", None);
        let admin = client_config(&admin, TD, Role::Broker).unwrap();
        let channel = connect_lazy(&url, admin, Some("localhost")).unwrap();
        let status = HealthClient::new(channel).check(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            explain_status(&status),
            "role admin is not allowed here; allowed: agent"
        );

        // A certificate from another CA: refused at the handshake, explained to the client.
        let other = Ca::generate(TD).unwrap();
        let opts = LeafOptions {
            uris: vec![AGENT_URI.to_string()],
            ..LeafOptions::default()
        };
        let foreign = fx.write("foreign", &other.issue_custom(&opts).unwrap());
        let foreign = client_config(&foreign, TD, Role::Broker).unwrap();
        let message = match connect(&url, foreign, None).await {
            Err(e) => e.to_string(),
            Ok(channel) => {
                let status = HealthClient::new(channel).check(check()).await.unwrap_err();
                explain_status(&status)
            }
        };
        assert!(message.contains("refused the TLS handshake"), "{message}");

        // The server survived the refused handshake.
        let channel = connect(&url, fx.agent_client(), None).await.unwrap();
        HealthClient::new(channel).check(check()).await.unwrap();

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn explain_status_reads_the_error_chain() {
        // h2 keeps only the kind and text of the I/O error that carried the rustls alert.
        let io_err = io::Error::new(
            io::ErrorKind::InvalidData,
            "received fatal alert: CertificateExpired",
        );
        let status = Status::from_error(Box::new(io_err));
        let message = explain_status(&status);
        assert!(
            message.starts_with("the broker refused the TLS handshake (alert CertificateExpired)"),
            "{message}"
        );
        let status = Status::from_error(Box::new(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(explain_status(&status).starts_with("the broker closed the connection"));
        let refused = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(Refused(PeerCertError::IsCa)),
        )));
        let status = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            refused,
        )));
        assert_eq!(
            explain_status(&status),
            "refused the broker's certificate: certificate is a CA certificate, not an \
             end-entity certificate"
        );
        let status = Status::not_found("job 7 not found");
        assert_eq!(explain_status(&status), "job 7 not found");
    }

    #[tokio::test]
    async fn unreachable_broker_is_explained() {
        let fx = Fixture::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = connect(&url, fx.agent_client(), None).await.unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        let err = connect("http://127.0.0.1:1", fx.agent_client(), None).await;
        assert!(matches!(err, Err(TlsError::BadUrl { .. })));
    }
}
