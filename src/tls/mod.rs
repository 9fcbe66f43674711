//! Mutual TLS for every internal hop: rustls configurations, the identity checks and the tonic glue.
//!
//! Both sides verify the peer chain with rustls' webpki verifiers and then check the end-entity
//! certificate beyond the chain (docs/design.md §6): exactly one URI SAN that parses as an [`Identity`](crate::model::identity::Identity) in
//! our trust domain, a role allowed for the endpoint, an extendedKeyUsage extension that is present
//! and names the purpose (webpki accepts a certificate without one; we refuse it), and not a CA;
//! and the certificate profile (module `verify`): basicConstraints present, no certificate-signing key
//! usage, the root's path length constraint, [`CLOCK_SKEW`] of allowance on validity.
//! Only TLS 1.3 is offered, with ALPN `h2` and no session resumption.
//!
//! Servers feed [`tls_incoming`] to `Server::serve_with_incoming_shutdown`, so tonic's
//! `Request::peer_certs()` works ([`peer_identity`], [`require_role`]); it bounds the time to the
//! ClientHello and the unfinished handshakes per source address ([`HandshakeLimits`]). Clients use
//! [`connect`]. Every TCP server (also the gateway and the local store) accepts through
//! [`accept_connections`].
//! A client whose certificate the server refuses fails at its first call with an opaque status:
//! [`explain_status`] turns that into a message a person can act on.
//!
//! Revocation: a server built with [`server_config_with`] refuses what its [`DenyList`] refuses at
//! the handshake (`CertificateError::Revoked`, reason `revoked`); with [`ServerTls::revocable`] it
//! checks again after the handshake and registers each connection in [`LiveConnections`], so that
//! [`LiveConnections::close_denied`] closes those of a newly revoked certificate at once.
//! Reload: a [`Reloading`] holder owns the configuration built from a set of files and rebuilds it
//! when they change or on SIGHUP; servers ([`ServerTls`]) and connectors ([`ClientTls`]) load the
//! current one per connection, and it exports `hybroker_cert_expiry_timestamp_seconds`.

mod enroll;
mod explain;
mod handshake;
mod incoming;
#[cfg(test)]
mod incoming_tests;
mod live;
mod net;
mod peer;
#[cfg(test)]
mod profile_tests;
mod reload;
#[cfg(test)]
mod tests;
mod verify;

pub use enroll::{enroll_client_config, enroll_server_config, read_bundle};
pub use explain::explain_status;
pub use handshake::{
    HandshakeError, HandshakeGate, HandshakeLimits, HandshakeSlot, accept_tls, log_handshake_error, source_of,
};
pub use incoming::{Connection, ServerTls, accept_connections, tls_incoming, tls_incoming_served, tls_incoming_with};
pub use live::{LiveConnections, RevocableTcp};
pub use net::{ClientTls, connect, connect_from, connect_lazy};
pub use peer::{BACKDATE, DenyList, PeerCert, normalize_serial};
pub use reload::{
    PUBLIC, RELOAD_INTERVAL, Reloading, ReloadingClientTls, ReloadingServerTls, record_ca_expiry, record_expiry,
};
pub use verify::{
    CLOCK_SKEW, KeyPurpose, PeerCertError, check_peer_cert, identity_of_cert_file, peer_identity, require_role,
    trust_domain_of_cert,
};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;

use crate::model::identity::{IdentityError, Role, validate_trust_domain};
use verify::{AnchorPathLimits, ClientIdentityVerifier, ServerIdentityVerifier};

/// ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";

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
    /// A CA certificate of the bundle cannot be used as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    BadCa(String),
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
    /// In-memory PEM data is unusable (no item, or not valid PEM).
    #[error("invalid {what}: {reason}")]
    PemData {
        /// What the data should hold.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A replaced certificate file was refused at reload.
    #[error("not reloading {path}: {reason}")]
    BadReload {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
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
    server_config_with(paths, trust_domain, client_roles, None)
}

/// [`server_config`] whose verifier also refuses the certificates `deny` refuses (reason
/// `revoked`).
pub fn server_config_with(
    paths: &TlsPaths,
    trust_domain: &str,
    client_roles: &[Role],
    deny: Option<Arc<dyn DenyList>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    if client_roles.is_empty() {
        return Err(TlsError::NoClientRoles);
    }
    let ca_certs = load_certs("CA certificate", &paths.ca_cert)?;
    let roots = root_store(&ca_certs)?;
    let (certs, key) = load_pair(paths)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let verifier = ClientIdentityVerifier {
        inner,
        anchors: AnchorPathLimits::new(&ca_certs, provider().signature_verification_algorithms)?,
        trust_domain: trust_domain.to_string(),
        roles: client_roles.to_vec(),
        deny,
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
pub fn client_config(paths: &TlsPaths, trust_domain: &str, server_role: Role) -> Result<Arc<ClientConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    let ca_certs = load_certs("CA certificate", &paths.ca_cert)?;
    let (certs, key) = load_pair(paths)?;
    build_client_config(&ca_certs, certs, key, trust_domain, server_role)
}

/// Like [`client_config`], from PEM data in memory (the CA bundle, our chain and our key) instead
/// of files: for processes that hold many identities, such as `hybroker bench`.
pub fn client_config_from_pem(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    trust_domain: &str,
    server_role: Role,
) -> Result<Arc<ClientConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    let ca_certs = certs_from_pem("CA certificate", ca_pem)?;
    let certs = certs_from_pem("certificate", cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::PemData { what: "private key", reason: e.to_string() })?;
    build_client_config(&ca_certs, certs, key, trust_domain, server_role)
}

/// The client configuration of [`client_config`] and [`client_config_from_pem`].
fn build_client_config(
    ca_certs: &[CertificateDer<'static>],
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_domain: &str,
    server_role: Role,
) -> Result<Arc<ClientConfig>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(root_store(ca_certs)?, provider()).build()?;
    let verifier = ServerIdentityVerifier {
        inner,
        anchors: AnchorPathLimits::new(ca_certs, provider().signature_verification_algorithms)?,
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

/// The PEM certificates in `pem` (at least one).
fn certs_from_pem(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::PemData { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::PemData { what, reason: "no certificate found".to_string() });
    }
    Ok(certs)
}

/// Reads a file, naming it in the error.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

/// Reads the PEM certificates of a file (at least one).
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem { what, path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The CA bundle's certificates as a root store.
fn root_store(ca_certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert.clone())?;
    }
    Ok(Arc::new(roots))
}

/// The CA bundle file as a root store.
#[cfg(test)]
fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    root_store(&load_certs("CA certificate", path)?)
}

/// Our certificate chain and private key.
fn load_pair(paths: &TlsPaths) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = load_certs("certificate", &paths.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("private key", &paths.key)?).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey(paths.key.clone()),
        source => TlsError::BadPem { what: "private key", path: paths.key.clone(), source },
    })?;
    Ok((certs, key))
}
