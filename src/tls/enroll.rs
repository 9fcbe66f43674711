//! TLS of enrolment: the broker's enrol listener authenticates only itself (the agent has no
//! certificate yet; the join token in the request authenticates it), and the enrolling agent
//! verifies the broker with the CA bundle of its join file.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, ServerConfig};

use super::verify::{AnchorPathLimits, ServerIdentityVerifier};
use super::{ALPN_H2, TlsError, TlsPaths, certs_from_pem, load_certs, load_pair, provider, root_store};
use crate::model::identity::{Role, validate_trust_domain};

/// The enrol listener's configuration: the broker's certificate, no client certificate asked for,
/// TLS 1.3, ALPN `h2`, no resumption.
pub fn enroll_server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = load_pair(paths)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// An enrolling agent's configuration: no certificate of its own, a broker certificate of
/// `trust_domain` checked against `ca_pem` like every other client does.
pub fn enroll_client_config(ca_pem: &[u8], trust_domain: &str) -> Result<Arc<ClientConfig>, TlsError> {
    validate_trust_domain(trust_domain)?;
    let ca_certs = certs_from_pem("CA certificate", ca_pem)?;
    let inner = WebPkiServerVerifier::builder_with_provider(root_store(&ca_certs)?, provider()).build()?;
    let verifier = ServerIdentityVerifier {
        inner,
        anchors: AnchorPathLimits::new(&ca_certs, provider().signature_verification_algorithms)?,
        trust_domain: trust_domain.to_string(),
        role: Role::Broker,
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The trust bundle file's certificates, PEM as read (for handing to enrolled agents).
pub fn read_bundle(path: &std::path::Path) -> Result<String, TlsError> {
    load_certs("CA certificate", path)?;
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { what: "CA certificate", path: path.into(), source })
}
