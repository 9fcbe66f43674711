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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::{TlsPaths, client_config_from_pem, install_crypto_provider, server_config};
    use crate::model::identity::Role;
    use crate::pki::{Ca, IssueRequest, agent_csr, init_ca};

    const TD: &str = "hybroker.test";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn an_enrolled_chain_passes_the_brokers_tls_verifier() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), TD).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let broker = IssueRequest {
            role: Role::Broker,
            name: "broker".into(),
            site: None,
            dns: vec!["localhost".into()],
            ips: vec![],
            days: 1,
        };
        let (cert, key) = ca.issue_to_dir(dir.path(), &broker).unwrap();
        let paths = TlsPaths { ca_cert: dir.path().join("ca.pem"), cert, key };
        let server = server_config(&paths, TD, &[Role::Agent]).unwrap();
        let (key_pem, csr) = agent_csr(TD, "lab", "n1").unwrap();
        let signed = ca.sign_agent_csr(&csr, "lab", None, DAY).unwrap();
        let client = client_config_from_pem(
            ca.cert_pem().as_bytes(),
            signed.chain_pem.as_bytes(),
            key_pem.as_bytes(),
            TD,
            Role::Broker,
        )
        .unwrap();
        assert!(handshake(server.clone(), client).await.is_ok());
        // Without the issuing CA in the chain the root cannot be reached.
        let leaf_only = signed.chain_pem.replace(ca.issuing_cert_pem(), "");
        let client = client_config_from_pem(
            ca.cert_pem().as_bytes(),
            leaf_only.as_bytes(),
            key_pem.as_bytes(),
            TD,
            Role::Broker,
        )
        .unwrap();
        assert!(handshake(server, client).await.is_err());
    }

    /// A TLS handshake over an in-memory pipe; the server's verdict.
    async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server_side = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(a).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(mut tls) = tokio_rustls::TlsConnector::from(client).connect(name, b).await {
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
        }
        server_side.await.unwrap()
    }
}
